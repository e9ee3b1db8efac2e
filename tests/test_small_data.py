"""A user's own small folder of photos, first try: 20 classes x 5 images through train, eval and export
with the default episode settings, which shrink to fit and say so; what cannot fit names its key."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tf  # trains and exports with TensorFlow

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "omniglot"


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgemeta", *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, fragment):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr


def small_folder(root: Path, classes: int, per_class: int) -> Path:
    for c in sorted(p.name for p in SAMPLE.iterdir())[:classes]:
        (root / c).mkdir(parents=True)
        for f in sorted((SAMPLE / c).glob("*.png"))[:per_class]:
            shutil.copy(f, root / c / f.name)
    return root


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    base = tmp_path_factory.mktemp("small")
    data = small_folder(base / "photos", 20, 5)
    cfg = base / "c.toml"
    cfg.write_text(f'[data]\nkind = "folder"\nroot = "{data}"\n\n[train]\nepisodes = 30\n')
    p = cli("train", "--config", str(cfg), "--out", str(base / "model"))
    assert p.returncode == 0, p.stderr
    return base, p


def test_defaults_shrink_to_a_small_folder_and_say_so(small_model):
    base, p = small_model
    notes = [line for line in p.stderr.splitlines() if line.startswith("note: ")]
    # 12 / 4 / 4 classes of 5 images: the 60-way 5-shot training and 20-way 15-query validation cannot be
    assert any("[train] 12-way 2-shot 3-query instead of the default 60-way 5-shot 5-query" in n for n in notes), notes
    assert any("[validation] 4-way 1-shot 4-query instead of the default 20-way 1-shot 15-query" in n for n in notes), notes
    assert any(line.startswith("training protonet conv4 on folder") and "12 train classes (60 images)" in line
               for line in p.stderr.splitlines()), p.stderr
    data = json.loads((base / "model" / "model.json").read_text())["data"]
    assert data["kind"] == "folder" and "split" not in data and "rotations" not in data
    assert data["classes"] == {"train": 12, "val": 4}
    evaluated = json.loads(cli("eval", "--model", str(base / "model"), "--episodes", "20", "--json").stdout)
    r = evaluated["results"]
    assert [x["setting"] for x in r] == ["5w1s", "5w5s", "20w1s", "20w5s", "4w1s"]
    assert r[-1]["episodes"] == 20 and r[-1]["query"] == 4 and all(x["episodes"] == 0 for x in r[:4])
    # the split is on record: which 4 people (here: characters) the model never saw
    split = json.loads((base / "model" / "splits.json").read_text())
    classes = split["classes"]
    assert [len(classes[k]) for k in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(classes["train"] + classes["val"] + classes["test"]) == sorted(p.name for p in (base / "photos").iterdir())
    assert split["fractions"] == [0.6, 0.2, 0.2] and split["seed"] == 0 and split["images"]["test"] == 20
    assert evaluated["context"]["test classes"] == ", ".join(classes["test"])
    assert "test classes of its seeded split, as recorded at training in" in evaluated["context"]["data"]
    text = cli("eval", "--model", str(base / "model"), "--episodes", "20").stdout
    assert f"test classes (4): {', '.join(classes['test'])}" in text, text


def test_a_class_folder_added_after_training_changes_no_split(small_model):
    """The seeded split of 21 classes is another split: eval keeps the recorded classes, a resumed
    training refuses to go on with the others."""
    base, _ = small_model
    grown = base / "grown"
    shutil.copytree(base / "photos", grown)
    small_folder(base / "extra", 21, 5)
    newcomer = sorted(p.name for p in (base / "extra").iterdir())[20]
    shutil.copytree(base / "extra" / newcomer, grown / newcomer)
    before = json.loads(cli("eval", "--model", str(base / "model"), "--episodes", "20", "--json").stdout)
    after = cli("eval", "--model", str(base / "model"), "--data", str(grown), "--episodes", "20", "--json")
    assert after.returncode == 0, after.stderr
    after = json.loads(after.stdout)
    assert after["results"] == before["results"] and after["context"]["test classes"] == before["context"]["test classes"]
    assert f"1 class folder(s) of {grown} in no recorded split (added since training, e.g. '{newcomer}') left out" \
        in after["context"]["data"]
    p = cli("train", "--config", str(base / "c.toml"), "--out", str(base / "model"), "--data", str(grown), "--episodes", "40",
            "--quiet")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
        f"error: the classes of {grown} are no longer split as when the run in {base / 'model'} started"), p.stderr
    assert json.loads((base / "model" / "model.json").read_text())["training"]["episodes"] == 30  # not trained on


def test_export_of_a_small_model_works_and_a_failed_one_leaves_nothing(small_model):
    base, _ = small_model
    model = base / "model"
    before = sorted(p.name for p in model.iterdir())
    tiny = small_folder(base / "six", 6, 5)  # not the folder it was trained on: the recorded classes are not there
    p = cli("export", str(model), "--folder", str(tiny), "--episodes", "10")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {tiny} has no class folder"), p.stderr
    assert "recorded in" in p.stderr and sorted(p.name for p in model.iterdir()) == before
    # an older run folder (no splits.json): the seeded split of the six classes, 4 / 1 / 1, nothing to calibrate on
    older = base / "older"
    shutil.copytree(model, older)
    (older / "splits.json").unlink()
    before = sorted(p.name for p in older.iterdir())
    p = cli("export", str(older), "--folder", str(tiny), "--episodes", "10")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr  # progress lines, then the one error line
    assert p.stderr.strip().splitlines()[-1].startswith("error: open-set calibration needs at least 2 validation classes")
    assert sorted(p.name for p in older.iterdir()) == before  # no float32.tflite, no hidden staging folder
    board = base / "board"
    p = cli("export", str(model), "--out", str(board), "--episodes", "10")
    assert p.returncode == 0, p.stderr
    manifest = json.loads((board / "manifest.json").read_text())
    assert "the val split is small" in manifest["variants"]["int8_static"]["open_set"]["calibration"]
    assert manifest["variants"]["int8_static"]["evaluation"][-1]["setting"] == "4w1s"
    assert not [p for p in board.iterdir() if p.name.startswith(".export-")]
    # the split travels with the exported model, and the report says what it measured on
    assert (board / "splits.json").read_text() == (model / "splits.json").read_text()
    test_classes = json.loads((model / "splits.json").read_text())["classes"]["test"]
    assert manifest["evaluation"]["test_classes"] == test_classes
    report = (board / "export.md").read_text()
    assert "15 queries per class" not in report  # the 5-image classes leave 4 queries beside the 1 shot
    assert "10 seeded episodes per setting (seed 0), 4 queries per class (fewer than 15: the smallest class has 5 " \
           "images), mean accuracy" in report, report
    assert f"- test classes: {', '.join(test_classes)}" in report


def test_a_setting_the_file_gives_that_does_not_fit_is_named_before_tensorflow_loads(tmp_path):
    data = small_folder(tmp_path / "photos", 20, 5)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\nkind = "folder"\nroot = "{data}"\n\n[validation]\nway = 20\n')
    p = cli("train", "--config", str(cfg), "--out", str(tmp_path / "m"))
    one_line_error(p, "[validation] way = 20 needs 20 classes but the val split has 4; lower [validation] way")
    assert not (tmp_path / "m").exists()  # a refused run leaves no folder behind
    cfg.write_text(f'[data]\nkind = "folder"\nroot = "{data}"\n\n[train]\nshot = 4\nquery = 4\n')
    one_line_error(cli("train", "--config", str(cfg), "--out", str(tmp_path / "m")),
                   "[train] shot = 4 and query = 4 need 8 images per class but the train split's smallest class has 5")
