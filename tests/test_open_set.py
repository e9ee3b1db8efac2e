"""The store's own open-set test: calibrated from its enrolled samples, set by hand or off; negatives,
folders of samples, duplicates, and the out-of-domain warning. Real stores on disk, the shipped model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.fewshot import FewShotRuntime
from edgemeta.runtime.heads.open_set import calibrate, leave_one_out
from edgemeta.runtime.store import STORE_FILE, EnrollmentStore

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "omniglot-conv4"
SAMPLE = REPO / "samples" / "omniglot"
CHARS = sorted(p.name for p in SAMPLE.iterdir())


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edgemeta", *args], capture_output=True, text=True, timeout=300)


def one_line_error(proc, fragment):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_leave_one_out_distances_are_what_a_new_sample_and_a_stranger_would_see():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, 4)).astype(np.float32)
    labels = np.array([0, 0, 0, 1, 1, 2, 2])  # class 2 too
    known, strangers = leave_one_out(emb, labels, 3, "squared_euclidean", negatives=emb[:1] + 5)
    # sample 0 against the mean of samples 1 and 2 of its class
    assert known[0] == pytest.approx(float(np.sum((emb[0] - emb[1:3].mean(axis=0)) ** 2)), rel=1e-5)
    # sample 3 (class 1) against the nearest prototype of classes 0 and 2
    others = [emb[0:3].mean(axis=0), emb[5:7].mean(axis=0)]
    assert strangers[3] == pytest.approx(min(float(np.sum((emb[3] - p) ** 2)) for p in others), rel=1e-5)
    assert len(known) == 7 and len(strangers) == 7 + 1  # every sample left out, plus the one negative


def test_calibration_keeps_its_promise_on_the_samples_it_saw_and_refuses_what_it_cannot_tell():
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=4, size=(6, 8))
    labels = np.repeat(np.arange(6), 5)
    emb = (centres[labels] + rng.normal(size=(30, 8))).astype(np.float32)
    known, strangers = leave_one_out(emb, labels, 6, "squared_euclidean")
    a = calibrate(emb, labels, 6, "squared_euclidean", accept=0.9)
    assert a["known_accept"] >= 0.9 and a["known_accept"] == pytest.approx(np.mean(known <= a["threshold"]))
    f = calibrate(emb, labels, 6, "squared_euclidean", accept=None, false_accept=0.1)
    assert f["false_accept"] <= 0.1 and np.mean(strangers <= f["threshold"]) <= 0.1
    with pytest.raises(EdgemetaError, match="needs a class with at least 2 samples"):
        calibrate(emb[::5], labels[::5], 6, "squared_euclidean")
    with pytest.raises(EdgemetaError, match="needs strangers"):
        calibrate(emb[:5], labels[:5], 1, "squared_euclidean", accept=None, false_accept=0.1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """20 classes of samples/omniglot enrolled from folders of 10 drawings each, through the CLI."""
    root = tmp_path_factory.mktemp("classes")
    for c in CHARS[:20]:
        (root / c).mkdir()
        for p in sorted((SAMPLE / c).glob("*.png"))[:10]:
            (root / c / p.name).write_bytes(p.read_bytes())
    folder = tmp_path_factory.mktemp("s") / "store"
    p = cli("enroll", "--store", str(folder), "--model", str(SHIPPED), "--from-folders", str(root), "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert [o["label"] for o in out] == CHARS[:20] and all(o["added"] == o["samples"] == 10 for o in out)
    return folder


def strangers_accepted(folder) -> float:
    """Share of drawings of the 32 characters never enrolled answered as an enrolled class."""
    rt = FewShotRuntime(SHIPPED)
    files = [str(p) for c in CHARS[20:] for p in sorted((SAMPLE / c).glob("*.png"))[:5]]
    return float(np.mean([r["known"] for r in rt.classify(folder, files)]))


def test_a_calibrated_store_accepts_fewer_strangers_and_follows_its_classes(store, tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    (folder / STORE_FILE).write_bytes((store / STORE_FILE).read_bytes())
    before = strangers_accepted(folder)
    p = cli("calibrate", "--store", str(folder), "--false-accept", "0.05", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["mode"] == "calibrated" and info["false_accept"] <= 0.05 and info["strangers"] == 200
    after = strangers_accepted(folder)
    assert after < before - 0.2 and after < 0.25, (before, after)
    assert "at most 5% of strangers accepted" in cli("calibrate", "--store", str(folder), "--show").stdout
    # the threshold is recomputed from what the store holds whenever it changes
    assert cli("forget", "--store", str(folder), "--label", CHARS[0]).returncode == 0
    again = json.loads(cli("calibrate", "--store", str(folder), "--show", "--json").stdout)
    assert again["strangers"] == 190 and again["threshold"] != info["threshold"]
    # negatives add to the strangers the calibration sees
    neg = [str(p) for p in sorted((SAMPLE / CHARS[-1]).glob("*.png"))[:4]]
    assert cli("enroll", "--store", str(folder), "--negative", *neg).returncode == 0
    assert json.loads(cli("calibrate", "--store", str(folder), "--show", "--json").stdout)["negatives"] == 4
    assert CHARS[-1] not in EnrollmentStore.open(folder).class_names  # never a class
    # by hand, off, and back to the model's
    cli("calibrate", "--store", str(folder), "--threshold", "0")
    assert strangers_accepted(folder) == 0.0
    cli("calibrate", "--store", str(folder), "--threshold", "off")
    assert strangers_accepted(folder) == 1.0
    p = cli("calibrate", "--store", str(folder), "--threshold", "model", "--json")
    assert json.loads(p.stdout)["threshold"] == FewShotRuntime(SHIPPED).threshold_of_model


def test_calibration_errors_are_one_line_and_leave_the_store_as_it_was(store, tmp_path):
    folder = tmp_path / "one-shot"
    assert cli("enroll", "--store", str(folder), "--model", str(SHIPPED), "--label", "a",
               str(next((SAMPLE / CHARS[0]).glob("*.png")))).returncode == 0
    before = (folder / STORE_FILE).read_bytes()
    one_line_error(cli("calibrate", "--store", str(folder)), "needs a class with at least 2 samples")
    one_line_error(cli("calibrate", "--store", str(folder), "--false-accept", "0.05"), "needs strangers")
    one_line_error(cli("calibrate", "--store", str(folder), "--accept", "95"), "--accept is a share between 0 and 1")
    one_line_error(cli("calibrate", "--store", str(folder), "--threshold", "-1"), "--threshold is a distance")
    one_line_error(cli("calibrate", "--store", str(folder), "--accept", "0.9", "--threshold", "1"), "give one of")
    assert (folder / STORE_FILE).read_bytes() == before
    # a damaged setting is named when the store is read
    with np.load(folder / STORE_FILE) as z:
        arrays = dict(z)
    meta = json.loads(str(arrays["meta"]))
    meta["open_set"] = {"mode": "manual", "threshold": "high"}
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(folder / STORE_FILE, **arrays)
    one_line_error(cli("classify", "--store", str(folder), str(next((SAMPLE / CHARS[1]).glob("*.png")))),
                   "meta.open_set.threshold")


def test_enroll_takes_folders_and_skips_the_same_image_twice(tmp_path):
    folder, files = tmp_path / "store", sorted((SAMPLE / CHARS[0]).glob("*.png"))
    assert cli("enroll", "--store", str(folder), "--model", str(SHIPPED), "--label", "a", *map(str, files[:3])).returncode == 0
    p = cli("enroll", "--store", str(folder), "--label", "a", str(SAMPLE / CHARS[0]), "--json")
    out = json.loads(p.stdout)
    assert out["added"] == len(files) - 3 and out["samples"] == len(files) and len(out["duplicates"]) == 3
    p = cli("enroll", "--store", str(folder), "--label", "b", str(files[0]), str(files[0]))
    assert p.returncode == 0 and "enrolled 0 sample(s)" in p.stdout and "already enrolled as 'a'" in p.stdout
    assert EnrollmentStore.open(folder).counts() == {"a": len(files)}  # nothing of b: it had only a duplicate
    assert json.loads(cli("enroll", "--store", str(folder), "--label", "a", "--allow-duplicates", str(files[0]),
                          "--json").stdout)["added"] == 1
    one_line_error(cli("enroll", "--store", str(folder), "--label", "x", str(SAMPLE)), "use --from-folders")
    one_line_error(cli("enroll", "--store", str(folder), str(files[0])), "say what the samples are")
    one_line_error(cli("enroll", "--store", str(folder), "--label", "x"), "give the samples")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("x")
    one_line_error(cli("enroll", "--store", str(folder), "--label", "x", str(tmp_path / "mixed")), "notes.txt is not a sample")
    one_line_error(cli("enroll", "--store", str(folder), "--from-folders", str(tmp_path / "mixed")), "has no sub-folders")


def test_samples_unlike_the_training_data_get_a_warning(tmp_path):
    """Smooth grey photos-like blobs under the Omniglot model: classes sit far closer than its calibration's."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for c in range(4):
        (root / f"p{c}").mkdir(parents=True)
        base = rng.uniform(90, 160, size=(8, 8))
        for i in range(4):
            img = np.kron(base + rng.normal(scale=3, size=(8, 8)), np.ones((12, 12)))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"p{c}" / f"{i}.png")
    p = cli("enroll", "--store", str(tmp_path / "s"), "--model", str(SHIPPED), "--from-folders", str(root))
    assert p.returncode == 0 and "warning: these samples look unlike the model's training data" in p.stderr, p.stderr
    p = cli("enroll", "--store", str(tmp_path / "t"), "--model", str(SHIPPED), "--from-folders", str(SAMPLE))
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr


def test_the_agent_skips_a_retried_enroll(tmp_path):
    from edgemeta.runtime.agent import Agent

    agent = Agent(SHIPPED, tmp_path / "s")
    png = next((SAMPLE / CHARS[0]).glob("*.png")).read_bytes()
    assert agent.handle("enroll", {"label": "a"}, [png])["added"] == 1
    again = agent.handle("enroll", {"label": "a"}, [png])
    assert again["added"] == 0 and again["samples"] == 1 and again["duplicates"] == ["sample 1 (already enrolled as 'a')"]
    with pytest.raises(EdgemetaError, match="allow_duplicates must be true or false"):
        agent.handle("enroll", {"label": "a", "allow_duplicates": "yes"}, [png])


def test_classify_refuses_top_k_below_one(store):
    one_line_error(cli("classify", "--store", str(store), "--top-k", "0", str(next((SAMPLE / CHARS[0]).glob("*.png")))),
                   "Invalid value for '--top-k': 0 is not in the range 1<=x<=1000")
