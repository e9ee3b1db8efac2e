"""Export and the board runtime: variants, manifest, enrollment store, classification, bad input."""

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.classifier import FewShotRuntime
from edgemeta.runtime.store import STORE_FILE, EnrollmentStore
from edgemeta.runtime.tflite_info import read_structure

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "omniglot"


def drawings(char: str, drawers) -> list[str]:
    return [str(p) for p in sorted((SAMPLE / char).glob("*.png")) if int(p.stem[-2:]) in drawers]


def run(*args, exe=None):
    cmd = [exe, *args] if exe else [sys.executable, "-m", "edgemeta", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def one_line_error(proc, fragment):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


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
    from edgemeta.backbones import conv4
    from edgemeta.export import convert

    assert len(convert(conv4((28, 28, 1), width=8), "float32")) > 0
    out = capfd.readouterr().out  # (stderr holds TensorFlow's import chatter, silenced by the CLI)
    assert out == "", out[:200]


def test_enroll_classify_forget_rename(exported, tmp_path):
    rt = FewShotRuntime(exported)
    store = tmp_path / "store"
    chars = ["Keble_character01", "Keble_character05", "Tengwar_character03", "Tengwar_character10"]
    for c in chars:
        assert rt.enroll(store, c, drawings(c, range(1, 4))) == 3
    assert rt.enroll(store, chars[0], drawings(chars[0], [4])) == 4  # samples add to a class
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
    rt.threshold = 1e-9  # nothing is near enough
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
    with pytest.raises(EdgemetaError, match="threads must be at least 1"):
        FewShotRuntime(exported, threads=0)
    # from the CLI: the one line and nothing else (LiteRT's half-built Delegate used to print a
    # traceback at exit), exit 2, and no store created
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "edgemeta", "enroll", "--store", str(store), "--model", str(exported),
                           "--label", "a", "--edgetpu", "usb", str(next(SAMPLE.glob("*/*.png")))], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot load the Edge TPU delegate")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not store.exists()
