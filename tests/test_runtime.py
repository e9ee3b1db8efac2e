"""Export and the board runtime: variants, manifest, enrollment store, classification, bad input."""

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.fewshot import FewShotRuntime
from edgemeta.runtime.store import STORE_FILE, EnrollmentStore
from edgemeta.runtime.tflite_info import read_structure
from tests.support.builders import SAMPLE, SHIPPED, drawings, linear_model
from tests.support.cli import one_line_error, run


def test_manifest_and_variants(exported):
    m = json.loads((exported / "manifest.json").read_text())
    assert set(m["variants"]) == {"float32", "dynamic_range", "int8", "int8_static"} and m["default_variant"] == "int8_static"
    for v in m["variants"].values():
        data = (exported / v["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == v["sha256"] and len(data) == v["size"]
    f32, i8 = m["variants"]["float32"], m["variants"]["int8_static"]
    assert 400_000 < f32["size"] < 500_000 and i8["size"] < f32["size"] / 3  # weights frozen, then quantised
    assert i8["input"]["shape"] == [1, 28, 28, 1] and i8["input"]["dtype"] == "int8"
    assert abs(i8["input"]["scale"] - 1 / 255) < 1e-5 and i8["input"]["zero_point"] == -128
    assert set(read_structure(exported / "int8_static.tflite").tensor_types) <= {"int8", "int32"}  # no float left
    assert set(i8["ops"]) == {"CONV_2D", "MAX_POOL_2D", "RESHAPE"}
    assert m["preprocess"]["image_size"] == 28 and m["distance"] == "squared_euclidean"
    assert m["training"]["episodes"] == 60 and m["source"]["model.keras_sha256"]
    # quantisation costs little: int8 within 2 points of the float model on the same episodes
    acc = {k: v["evaluation"][0]["accuracy"] for k, v in m["variants"].items()}
    assert abs(acc["int8_static"] - m["evaluation"]["keras_float32"][0]["accuracy"]) < 2.0
    assert acc["float32"] == pytest.approx(m["evaluation"]["keras_float32"][0]["accuracy"], abs=0.2)
    assert 0 < i8["open_set"]["known_accept_rate"] <= 1 and i8["open_set_threshold"] > 0
    assert "| int8_static |" in (exported / "export.md").read_text()


def test_conversion_prints_nothing(capfd):
    from edgemeta.host.backbones import conv4
    from edgemeta.host.export import convert

    assert len(convert(conv4((28, 28, 1), width=8), "float32")) > 0
    out = capfd.readouterr().out  # (stderr holds TensorFlow's import chatter, silenced by the CLI)
    assert out == "", out[:200]


def test_enroll_classify_forget_rename(exported, tmp_path):
    rt = FewShotRuntime(exported)
    store = tmp_path / "store"
    chars = ["Keble_character01", "Keble_character05", "Tengwar_character03", "Tengwar_character10"]
    for c in chars:
        assert rt.enroll(store, c, drawings(c, range(1, 4))).samples == 3
    assert rt.enroll(store, chars[0], drawings(chars[0], [4])).samples == 4  # samples add to a class
    queries = [f for c in chars for f in drawings(c, range(11, 21))]
    results = rt.classify(store, queries, top_k=3)
    truth = [c for c in chars for _ in range(10)]
    top3 = np.mean([t in [x["label"] for x in r["top"]] for t, r in zip(truth, results, strict=True)])
    assert top3 > 0.8 and all(len(r["top"]) == 3 for r in results)
    assert all(abs(sum(x["probability"] for x in r["top"]) - 1) < 0.5 for r in results)
    s = EnrollmentStore.open(store)
    assert s.counts() == {chars[0]: 4, chars[1]: 3, chars[2]: 3, chars[3]: 3}
    # it persists: a new runtime (a reboot) sees the same classes and answers the same
    again = FewShotRuntime(exported).classify(store, queries[:5], top_k=3)
    assert [r["top"] for r in again] == [r["top"] for r in results[:5]]
    s.forget(chars[1])
    s.rename(chars[2], "tengwar three")
    s.save()
    assert EnrollmentStore.open(store).counts() == {chars[0]: 4, "tengwar three": 3, chars[3]: 3}
    assert {r["label"] for r in rt.classify(store, queries)} <= {chars[0], "tengwar three", chars[3], "unknown"}


def test_open_set_answers_unknown(exported, tmp_path):
    rt = FewShotRuntime(exported)
    rt.threshold_of_model = 1e-9  # nothing is near enough
    rt.enroll(tmp_path / "s", "a", drawings("Keble_character01", [1]))
    r = rt.classify(tmp_path / "s", drawings("Keble_character02", [1]))[0]
    assert r["label"] == "unknown" and not r["known"] and r["top"][0]["label"] == "a"


def test_npy_inputs_match_images(exported, tmp_path):
    from PIL import Image

    rt = FewShotRuntime(exported)
    files = drawings("Keble_character03", [1, 2])
    stack = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
    np.save(tmp_path / "stack.npy", stack)
    a, _ = rt.images(files)
    b, names = rt.images([tmp_path / "stack.npy"])
    np.testing.assert_array_equal(a, b)
    assert names[1].endswith("stack.npy[1]")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_umask_modes_and_the_store_stays_private(exported, tmp_path, umask):
    """write_atomic's files are what open() would make (a temporary file's 0o600 would leave an exported
    model unreadable to the agent's user); the enrolled samples are the one exception, 0o600 always."""
    import os
    import stat

    from edgemeta.atomic import write_atomic

    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "manifest.json", "{}")
        FewShotRuntime(exported).enroll(tmp_path / "s", "a", drawings("Keble_character01", [1]))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "manifest.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "s" / STORE_FILE).stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_last_good_store(exported, tmp_path, monkeypatch):
    rt = FewShotRuntime(exported)
    store = tmp_path / "s"
    rt.enroll(store, "a", drawings("Keble_character01", [1, 2]))
    before = (store / STORE_FILE).read_bytes()

    def crash(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError):
        rt.enroll(store, "b", drawings("Keble_character02", [1]))
    assert (store / STORE_FILE).read_bytes() == before
    assert sorted(p.name for p in store.iterdir()) == [".lock", STORE_FILE]


# `edgemeta ...` in a process that is SIGKILLed inside the store write, after half the file is on disk.
KILLED_IN_WRITE = """
import os, runpy, signal, sys
import numpy as np
def killed_mid_write(f, **arrays):
    f.write(b"PK\\x03\\x04" + bytes(4096))
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
np.savez = killed_mid_write
sys.argv = ["edgemeta", *sys.argv[1:]]
runpy.run_module("edgemeta", run_name="__main__", alter_sys=True)
"""


def test_a_kill_inside_the_first_write_leaves_a_folder_the_next_enroll_takes(exported, tmp_path):
    store = tmp_path / "s"
    enroll = ["enroll", "--store", str(store), "--model", str(exported), "--label", "a", drawings("Keble_character01", [1])[0]]
    p = subprocess.run([sys.executable, "-c", KILLED_IN_WRITE, *enroll], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    left = sorted(x.name for x in store.iterdir())  # what a kill leaves: the lock and a partial temporary file
    assert len(left) == 2 and left[0] == ".lock" and left[1].startswith(".store.") and left[1].endswith(".npz.tmp"), left
    p = run(*enroll)
    assert p.returncode == 0 and "now has 1 sample(s)" in p.stdout, p.stderr
    assert sorted(x.name for x in store.iterdir()) == [".lock", STORE_FILE]


# First writes of a big store (so that most of the time goes to writing) into new folders, until killed.
FIRST_WRITES = """
import json, sys
from pathlib import Path
import numpy as np
from edgemeta.runtime.store import EnrollmentStore
base, backbone, shape = Path(sys.argv[1]), json.loads(sys.argv[2]), tuple(json.loads(sys.argv[3]))
emb = np.ones((4000, backbone["embedding_dim"]), np.float32)
samples = np.zeros((4000, *shape), np.uint8)
print("ready", flush=True)
for i in range(10**6):
    folder = base / str(i)
    with EnrollmentStore.locked(folder):
        s = EnrollmentStore.create(folder, backbone, True, shape)
        s.add("a", emb, samples)
        s.save()
"""


def test_random_kills_during_first_writes_leave_folders_that_take_the_next_enroll(exported, tmp_path):
    rt = FewShotRuntime(exported)
    images, _ = rt.images(drawings("Keble_character01", [1]))
    rng = random.Random(12)
    deadline, kills = time.monotonic() + 4, 0
    while kills < 5 or time.monotonic() < deadline:
        base = tmp_path / str(kills)
        child = subprocess.Popen([sys.executable, "-c", FIRST_WRITES, str(base), json.dumps(rt.backbone),
                                  json.dumps(list(rt.manifest.preprocess.input_shape))], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.2))
        child.kill()
        child.wait()
        child.stdout.close()
        kills += 1
    folders = sorted(tmp_path.glob("*/*"))
    in_write = [f for f in folders if any(x.name.endswith(".npz.tmp") for x in f.iterdir())]
    assert in_write, f"no kill of {kills} landed inside a write"
    for folder in folders:
        rt.enroll_images(folder, "b", images)
        assert sorted(x.name for x in folder.iterdir()) == [".lock", STORE_FILE], folder


def test_leftover_cleanup_removes_only_the_stores_own_temporary_files(exported, tmp_path):
    rt = FewShotRuntime(exported)
    store = tmp_path / "s"
    rt.enroll(store, "a", drawings("Keble_character01", [1]))
    leftover = ".store.k9_x2qpz.npz.tmp"  # save()'s form: .store. + 8 of [a-z0-9_] + .npz.tmp
    users = ["notes.txt", "store.npz.tmp", ".store.npz.tmp", ".store.backup.npz", ".store.k9_x2qpzz.npz.tmp",
             ".store.K9_X2QPZ.npz.tmp", ".store.k9_x2qpz.npz.tmp.keep", "x.store.k9_x2qpz.npz.tmp"]
    for name in [leftover, *users]:
        (store / name).write_bytes(b"someone's data")
    rt.enroll(store, "b", drawings("Keble_character02", [1]))
    assert sorted(x.name for x in store.iterdir()) == sorted([".lock", STORE_FILE, *users])
    assert all((store / name).read_bytes() == b"someone's data" for name in users)
    # a folder with a user's file besides a lock and a leftover is still not taken for a store, and left alone
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in [".lock", leftover, "holiday.jpg"]:
        (photos / name).write_bytes(b"x")
    with pytest.raises(EdgemetaError, match="is not an enrollment store"):
        rt.enroll(photos, "a", drawings("Keble_character01", [1]))
    assert sorted(x.name for x in photos.iterdir()) == sorted([".lock", leftover, "holiday.jpg"])


def test_reenroll_after_a_model_upgrade(exported, tmp_path):
    store = tmp_path / "s"
    FewShotRuntime(exported).enroll(store, "a", drawings("Keble_character01", [1, 2]), keep_samples=True)
    other = FewShotRuntime(exported, variant="float32")
    with pytest.raises(EdgemetaError, match="re-enroll the kept samples"):
        other.classify(store, drawings("Keble_character01", [3]))
    assert other.reenroll(store) == 2
    assert other.classify(store, drawings("Keble_character01", [3]))[0]["top"][0]["label"] == "a"


def test_cli_round_trip(exported, tmp_path):
    store = str(tmp_path / "s")
    p = run("enroll", "--store", store, "--model", str(exported), "--label", "alpha", *drawings("Keble_character01", [1, 2]))
    assert p.returncode == 0 and "now has 2 sample(s)" in p.stdout and p.stderr == "", p.stderr
    run("enroll", "--store", store, "--label", "beta", *drawings("Keble_character02", [1, 2]))  # model from the store
    p = run("classify", "--store", store, "--json", "--top-k", "2", *drawings("Keble_character01", [5]))
    r = json.loads(p.stdout)[0]
    assert r["top"][0]["label"] == "alpha" and len(r["top"]) == 2
    assert json.loads(run("classes", "--store", store, "--json").stdout)["classes"] == {"alpha": 2, "beta": 2}
    assert run("rename", "--store", store, "beta", "gamma").returncode == 0
    assert run("forget", "--store", store, "--label", "alpha").returncode == 0
    assert json.loads(run("classes", "--store", store, "--json").stdout)["classes"] == {"gamma": 2}
    p = run("inspect", str(exported / "int8_static.tflite"))
    assert "CONV_2D v3" in p.stdout and "int8 [1, 28, 28, 1]" in p.stdout


def test_bad_input_is_one_line_and_leaves_the_store_alone(exported, tmp_path):
    store = tmp_path / "s"
    FewShotRuntime(exported).enroll(store, "a", drawings("Keble_character01", [1]))
    before = (store / STORE_FILE).read_bytes()
    enroll = ["enroll", "--store", str(store), "--model", str(exported)]
    bad_img = tmp_path / "bad.png"
    bad_img.write_bytes(b"\x89PNG not really")
    one_line_error(run(*enroll, "--label", "b", str(bad_img)), "cannot read image")
    one_line_error(run(*enroll, "--label", "b", str(tmp_path / "missing.png")), "does not exist")
    one_line_error(run(*enroll, "--label", "  ", drawings("Keble_character01", [2])[0]), "label must not be empty")
    one_line_error(run("forget", "--store", str(store), "--label", "zzz"), "no class 'zzz'")
    one_line_error(run(*enroll, "--variant", "float32", "--label", "b", drawings("Keble_character01", [2])[0]),
                   "embeddings of different backbones do not mix")
    np.save(tmp_path / "f.npy", np.zeros((28, 28), np.float32))
    one_line_error(run(*enroll, "--label", "b", str(tmp_path / "f.npy")), "expected uint8 image data")
    assert (store / STORE_FILE).read_bytes() == before

    notstore = tmp_path / "photos"
    notstore.mkdir()
    (notstore / "holiday.jpg").write_bytes(b"x")
    one_line_error(run("enroll", "--store", str(notstore), "--model", str(exported), "--label", "a",
                       drawings("Keble_character01", [1])[0]), "is not an enrollment store")
    one_line_error(run("classes", "--store", str(notstore)), "is not an enrollment store")
    assert sorted(p.name for p in notstore.iterdir()) == ["holiday.jpg"]
    (store / STORE_FILE).write_bytes(before[:100])
    one_line_error(run("classes", "--store", str(store)), "is damaged")


def test_damaged_models_and_manifests(exported, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(exported, bad)
    data = (bad / "int8_static.tflite").read_bytes()
    (bad / "int8_static.tflite").write_bytes(data[: len(data) // 3])
    one_line_error(run("inspect", str(bad / "int8_static.tflite")), "damaged or truncated")
    img = drawings("Keble_character01", [1])[0]
    one_line_error(run("enroll", "--store", str(tmp_path / "s"), "--model", str(bad), "--label", "a", img),
                   "does not match its manifest checksum")
    (bad / "x.tflite").write_bytes(b"hello world, not a model")
    one_line_error(run("inspect", str(bad / "x.tflite")), "is not a TFLite model")
    (bad / "manifest.json").unlink()
    one_line_error(run("enroll", "--store", str(tmp_path / "s"), "--model", str(bad), "--label", "a", img), "no manifest.json")
    shutil.copy(exported / "manifest.json", bad / "manifest.json")
    m = json.loads((bad / "manifest.json").read_text())
    m["embedding_dim"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    shutil.copy(exported / "int8_static.tflite", bad / "int8_static.tflite")
    one_line_error(run("enroll", "--store", str(tmp_path / "s"), "--model", str(bad), "--label", "a", img),
                   "does not match its manifest")
    (bad / "manifest.json").write_text("{not json")
    one_line_error(run("classify", "--store", str(tmp_path / "s"), "--model", str(bad), img), "not a valid edgemeta manifest")
    assert not (tmp_path / "s").exists()


def test_missing_edge_tpu_runtime_names_the_fix(exported, tmp_path):
    # no libedgetpu on this machine: the delegate cannot load, and the message says what to install
    with pytest.raises(EdgemetaError, match="apt-get install libedgetpu1-std"):
        FewShotRuntime(exported, edgetpu="usb")
    with pytest.raises(EdgemetaError, match="threads must be a whole number from 1 to 64"):
        FewShotRuntime(exported, threads=0)
    # from the CLI: the one line and nothing else (LiteRT's half-built Delegate used to print a
    # traceback at exit), exit 2, and no store created
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "edgemeta", "enroll", "--store", str(store), "--model", str(exported),
                           "--label", "a", "--edgetpu", "usb", str(next(SAMPLE.glob("*/*.png")))], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot load the Edge TPU delegate")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not store.exists()


# --- head adaptation (on the shipped model: its manifest is format 1) ------------------------------

CHARS = ["Keble_character01", "Keble_character05", "Tengwar_character03", "Tengwar_character10"]


def enroll_chars(rt, store, chars=CHARS, adapt=None):
    for c in chars:
        rt.enroll(store, c, drawings(c, range(1, 6)), adapt=adapt)


def test_format_1_and_2_manifests(tmp_path):
    from edgemeta.runtime.manifest import read_manifest

    # a format-1 manifest (before the head section): the shipped model's, as an older export wrote it
    old = tmp_path / "format1"
    shutil.copytree(SHIPPED, old)
    raw = json.loads((old / "manifest.json").read_text())
    raw["format"] = 1
    del raw["head"]
    (old / "manifest.json").write_text(json.dumps(raw))
    m = read_manifest(old)
    assert (m.head.kind, m.head.distance, m.head.linear) == ("prototype", "squared_euclidean", None)
    assert read_manifest(SHIPPED).head.kind == "prototype"
    lin = read_manifest(linear_model(tmp_path / "lin"))
    assert lin.head.kind == "linear" and lin.head.linear.init == "learned" and lin.head.linear.steps == 3
    assert lin.head.linear.w0.shape == (64, 5) and lin.distance == "squared_euclidean"


def test_adapted_head_is_persisted_reused_and_undone_by_forget(tmp_path, monkeypatch):
    import edgemeta.runtime.heads.linear as store_mod  # the store's adapted head is computed there
    from edgemeta.runtime.heads.linear import LinearHeadSpec, adapt_linear

    rt = FewShotRuntime(SHIPPED)
    store = tmp_path / "s"
    enroll_chars(rt, store, adapt=(20, 0.05))
    s = EnrollmentStore.open(store)  # a reopen (a reboot) finds the head, equal to a recomputation
    assert s.adapt == {"steps": 20, "lr": 0.05} and s.head_w.shape == (64, 4)
    w, b = adapt_linear(LinearHeadSpec("proto", 20, [0.05], [0.05]), s.embeddings, s.labels, 4)
    np.testing.assert_allclose(s.head_w, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.head_b, b, rtol=1e-5, atol=1e-4)
    queries = [f for c in CHARS for f in drawings(c, range(11, 16))]
    adapted = rt.classify(store, queries, top_k=2)

    def no_recomputation(*a, **k):
        raise AssertionError("classify recomputed the head")

    monkeypatch.setattr(store_mod, "adapt_linear", no_recomputation)
    assert rt.classify(store, queries, top_k=2) == adapted  # read from the store, not recomputed
    monkeypatch.undo()
    # a store whose head is missing (written by an older edgemeta) or stale is recomputed on the fly
    with np.load(store / STORE_FILE) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("head_")}
    np.savez(store / STORE_FILE, **arrays)
    again = rt.classify(store, queries, top_k=2)
    assert [[t["label"] for t in r["top"]] for r in again] == [[t["label"] for t in r["top"]] for r in adapted]
    assert [t["probability"] for r in again for t in r["top"]] == pytest.approx([t["probability"] for r in adapted for t in r["top"]])
    assert EnrollmentStore.open(store).head_w is None  # classify only reads; the next change writes it again
    rt.adapt(store, 20, 0.05)
    # forget (from the CLI, without a model) recomputes the head without the class: the same head as
    # a store that never had it
    assert run("forget", "--store", str(store), "--label", CHARS[1]).returncode == 0
    never = tmp_path / "never"
    enroll_chars(rt, never, [c for c in CHARS if c != CHARS[1]], adapt=(20, 0.05))
    a, b_ = EnrollmentStore.open(store), EnrollmentStore.open(never)
    assert a.head_w.shape == (64, 3)
    np.testing.assert_allclose(a.head_w, b_.head_w, rtol=1e-5, atol=1e-5)
    assert run("rename", "--store", str(store), CHARS[0], "first").returncode == 0
    np.testing.assert_allclose(EnrollmentStore.open(store).head_w, b_.head_w, rtol=1e-5, atol=1e-5)
    # 0 steps turns it off: the nearest-prototype answers again, as in a store never adapted
    plain = tmp_path / "plain"
    enroll_chars(rt, plain, [c for c in CHARS if c != CHARS[1]])
    assert rt.adapt(never, 0) == {"kind": "prototype", "adapt": None}
    assert EnrollmentStore.open(never).adapt is None and EnrollmentStore.open(never).head_w is None
    assert rt.classify(never, queries, top_k=2) == rt.classify(plain, queries, top_k=2)


def test_zero_steps_from_the_prototypes_gives_the_prototype_answers(tmp_path):
    from edgemeta.runtime.heads.linear import LinearHead, LinearHeadSpec

    rt = FewShotRuntime(SHIPPED)
    enroll_chars(rt, tmp_path / "s")
    store = EnrollmentStore.open(tmp_path / "s")
    protos = rt.head(store)
    linear = LinearHead(protos, *store.linear_head(LinearHeadSpec("proto", 0, [0.1], [0.1])))
    queries = [f for c in CHARS for f in drawings(c, range(11, 21))] + drawings("Keble_character02", range(1, 11))
    emb = rt.embedder(rt.images(queries)[0])
    want, got = protos.classify(emb, top_k=3), linear.classify(emb, top_k=3)
    assert [(r["label"], [t["label"] for t in r["top"]]) for r in got] == [(r["label"], [t["label"] for t in r["top"]]) for r in want]
    assert [r["distance"] for r in got] == pytest.approx([r["distance"] for r in want])
    assert any(r["label"] == "unknown" for r in got)  # the open-set test is still the prototypes'


def test_a_linear_head_model_classifies_with_its_head(tmp_path):
    model = linear_model(tmp_path / "lin")
    store = str(tmp_path / "s")
    for c in CHARS[:3]:
        p = run("enroll", "--store", store, "--model", str(model), "--label", c, *drawings(c, range(1, 4)))
        assert p.returncode == 0, p.stderr
    queries = [f for c in CHARS[:3] for f in drawings(c, [12, 13])]
    p = run("classify", "--store", store, "--json", "--top-k", "3", *queries)
    res = json.loads(p.stdout)
    # the learned bias of column 1 wins for every query (the prototypes would say otherwise), and the
    # distance is still the nearest prototype's, which decides "unknown"
    assert {r["top"][0]["label"] for r in res} == {CHARS[1]} and all(r["top"][0]["probability"] > 0.99 for r in res)
    assert all(r["distance"] == min(t["distance"] for t in r["top"]) for r in res)
    s = EnrollmentStore.open(store)
    assert s.adapt is None and s.meta["head"]["init"] == "learned" and s.meta["head"]["steps"] == 3
    # a stale head (the model's steps changed since the store was written) is recomputed, not used
    rt = FewShotRuntime(model)
    spec3 = rt.head_spec(None)
    m = json.loads((model / "manifest.json").read_text())
    m["head"]["steps"] = 500
    (model / "manifest.json").write_text(json.dumps(m))
    rt500 = FewShotRuntime(model)
    emb = rt500.embedder(rt500.images(queries)[0])
    np.testing.assert_allclose(rt500.head(s).w, s.linear_head(rt500.head_spec(None))[0])
    assert not np.allclose(rt500.head(s).w, s.linear_head(spec3)[0])
    assert len(rt500.head(s).classify(emb)) == len(queries)
    # --adapt overrides the model's steps (and --lr its learned rates)
    p = run("adapt", "--store", store, "--model", str(model), "--steps", "7", "--lr", "0.02")
    assert p.returncode == 0 and "learned init, 7 step(s) at rate 0.02" in p.stdout, p.stderr
    s = EnrollmentStore.open(store)
    assert s.adapt == {"steps": 7, "lr": 0.02} and s.meta["head"]["steps"] == 7
    np.testing.assert_allclose(s.head_spec.rates_w, [0.02])


def test_damaged_or_mismatched_heads_are_one_line_errors(tmp_path):
    img = drawings("Keble_character01", [1])[0]

    def enroll(model):
        return run("enroll", "--store", str(tmp_path / "s"), "--model", str(model), "--label", "a", img)

    m = linear_model(tmp_path / "m1")
    (m / "head.npz").write_bytes((m / "head.npz").read_bytes()[:50])
    one_line_error(enroll(m), "head.npz does not match its manifest checksum")
    data = (m / "head.npz").read_bytes()
    man = json.loads((m / "manifest.json").read_text())
    man["head"]["sha256"] = hashlib.sha256(data).hexdigest()  # damaged, but the checksum says so
    (m / "manifest.json").write_text(json.dumps(man))
    one_line_error(enroll(m), "head.npz is not a readable head")
    (m / "head.npz").unlink()
    one_line_error(enroll(m), "head.npz is missing")
    bad_shape = {"rates_w": np.array([0.1], np.float32), "rates_b": np.array([0.1], np.float32),
                 "w0": np.zeros((63, 5), np.float32), "b0": np.zeros(5, np.float32)}
    one_line_error(enroll(linear_model(tmp_path / "m2", bad_shape)), "w0 must be a float array of shape (64, n)")
    one_line_error(enroll(linear_model(tmp_path / "m3", steps="10")), "head.steps must be an integer")
    one_line_error(enroll(linear_model(tmp_path / "m4", init="random")), "head.init must be one of")
    one_line_error(enroll(linear_model(tmp_path / "m5", per_parameter_rates=True)), "per-parameter")
    one_line_error(enroll(linear_model(tmp_path / "m6", file="../head.npz")), "file name beside the manifest")
    one_line_error(enroll(linear_model(tmp_path / "m7", kind="memory")), "unknown head kind 'memory'")
    m8 = linear_model(tmp_path / "m8")
    man = json.loads((m8 / "manifest.json").read_text())
    man["head"] = {"kind": "prototype", "distance": "cosine"}
    (m8 / "manifest.json").write_text(json.dumps(man))
    one_line_error(enroll(m8), "disagrees with the manifest's 'squared_euclidean'")
    man["format"] = 4
    (m8 / "manifest.json").write_text(json.dumps(man))
    one_line_error(enroll(m8), "this edgemeta reads formats 1, 2, 3")
    assert not (tmp_path / "s").exists()


def test_bad_adaptation_settings_are_one_line_and_write_nothing(tmp_path):
    store = tmp_path / "s"
    FewShotRuntime(SHIPPED).enroll(store, "a", drawings("Keble_character01", [1, 2]))
    before = (store / STORE_FILE).read_bytes()
    adapt = ["adapt", "--store", str(store), "--model", str(SHIPPED)]
    one_line_error(run(*adapt, "--steps", "-1"), "from 0 (off) to 1000, got -1")
    one_line_error(run(*adapt, "--steps", "1001"), "got 1001")
    one_line_error(run(*adapt, "--steps", "ten"), "got 'ten'")
    one_line_error(run(*adapt, "--steps", "2.5"), "got '2.5'")
    for lr in ("0", "-0.1", "inf", "nan", "fast"):
        one_line_error(run(*adapt, "--steps", "5", "--lr", lr), "learning rate must be a finite positive number")
    enroll = ["enroll", "--store", str(store), "--label", "b", drawings("Keble_character02", [1])[0]]
    one_line_error(run(*enroll, "--adapt", "-3"), "got -3")
    one_line_error(run(*enroll, "--lr", "0.1"), "--lr goes with --adapt")
    one_line_error(run("adapt", "--store", str(tmp_path / "none"), "--model", str(SHIPPED), "--steps", "3"), "does not exist")
    assert (store / STORE_FILE).read_bytes() == before and not (tmp_path / "none").exists()
    # and the good ones, from the CLI: the default rate of a prototype model is written out
    p = run("enroll", *enroll[1:], "--adapt", "5")
    assert p.returncode == 0, p.stderr
    assert EnrollmentStore.open(store).adapt == {"steps": 5, "lr": 0.01}
    p = run("classes", "--store", str(store))
    assert "head adapted with 5 step(s)" in p.stdout
    assert json.loads(run("classes", "--store", str(store), "--json").stdout)["adapt"] == {"steps": 5, "lr": 0.01}
    p = run(*adapt, "--steps", "0")
    assert p.returncode == 0 and "nearest prototype" in p.stdout and EnrollmentStore.open(store).adapt is None
