"""The CLI as a user meets it: real subprocesses, exit codes, one-line errors."""

import json
import subprocess
import sys
import zipfile

import pytest

from edgemeta.host.evaluate import evaluate, parse_setting, results_json, results_markdown, results_table
from edgemeta.stats import mean_ci95


def run(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgemeta", *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sample_dir):
    from edgemeta.host.training import train
    from tests.support.builders import tiny_config

    out = tmp_path_factory.mktemp("cli_model")
    train(tiny_config(sample_dir, episodes=30), out, progress=False)
    return out


def test_help_shows_examples():
    for cmd in ([], ["train"], ["eval"]):
        proc = run(*cmd, "--help")
        assert proc.returncode == 0 and "Example" in proc.stdout


@pytest.mark.tf
def test_eval_table_json_and_report(model_dir, sample_dir, tmp_path):
    args = ["eval", "--model", str(model_dir), "--folder", str(sample_dir), "--episodes", "50"]
    table = run(*args, "--confusions", "2")
    assert table.returncode == 0, table.stderr
    for name in ("5-way 1-shot", "5-way 5-shot", "20-way 1-shot", "20-way 5-shot"):
        assert name in table.stdout
    assert "20-way 1-shot: most confused classes" in table.stdout
    report = tmp_path / "r.md"
    proc = run(*args, "--json", "--report", str(report))
    data = json.loads(proc.stdout)
    assert [r["setting"] for r in data["results"]] == ["5w1s", "5w5s", "20w1s", "20w5s"]
    assert all(20 < r["accuracy"] <= 100 and 0 < r["ci95"] < 10 and r["episodes"] == 50 for r in data["results"][:2])
    assert "| 5-way 1-shot | 15 | 50 |" in report.read_text()
    assert "confusions" not in data["results"][0]
    assert json.loads(report.with_suffix(".json").read_text())["results"] == data["results"]
    # seeded: the table run gave the same figures (its confusions are extra), another seed other ones
    for r in data["results"]:
        assert f" {r['accuracy']:.2f} +/- {r['ci95']:.2f} %" in table.stdout, r
    other = json.loads(run(*args, "--json", "--seed", "1").stdout)["results"]
    assert other != data["results"]


@pytest.mark.tf
def test_eval_says_when_there_are_too_few_images(model_dir, sample_dir):
    proc = run("eval", "--model", str(model_dir), "--folder", str(sample_dir), "--episodes", "20", "--setting", "5w5s",
               "--query", "19", "--json")
    r = json.loads(proc.stdout)["results"][0]
    assert r["query"] == 15 and "15 queries per class instead of 19" in r["note"]
    proc = run("eval", "--model", str(model_dir), "--folder", str(sample_dir), "--episodes", "5", "--setting", "60w1s", "--json")
    assert "skipped: the split has only 51 classes" in json.loads(proc.stdout)["results"][0]["note"]
    assert_one_line_error(run("eval", "--model", str(model_dir), "--folder", str(sample_dir), "--within-alphabet"),
                          "--within-alphabet needs Omniglot's alphabets")
    assert_one_line_error(run("eval", "--model", str(model_dir), "--within-alphabet", "--episodes", "5"),
                          "classes carry no alphabet")


@pytest.mark.slow
def test_errors_are_one_line(tmp_path, model_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nbackbone = "vgg99"\n')
    assert_one_line_error(run("train", "--config", str(cfg), "--out", str(tmp_path / "o")), "unknown backbone 'vgg99'")
    cfg.write_text('[model]\nalgorithm = "maml++"\n')
    assert_one_line_error(run("train", "--config", str(cfg), "--out", str(tmp_path / "o")), "unknown method")
    assert_one_line_error(run("train", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")), "does not exist")
    assert_one_line_error(run("eval", "--model", str(tmp_path)), "is not an edgemeta model folder")
    assert_one_line_error(run("eval", "--model", str(model_dir), "--folder", str(tmp_path / "none")), "does not exist")
    assert_one_line_error(run("eval", "--model", str(model_dir), "--setting", "fiveway"), "cannot read setting")
    # a folder dataset's model is evaluated on the test classes of its own recorded split
    data = json.loads(run("eval", "--model", str(model_dir), "--episodes", "20", "--setting", "5w1s", "--json").stdout)
    assert data["context"]["classes"] == 10 and "test classes of its seeded split" in data["context"]["data"]


def test_omniglot_errors(tmp_path, mini_omniglot):
    import shutil

    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nkind = "omniglot"\nsplit = "lake"\n')
    shutil.copy(mini_omniglot / "images_evaluation.zip", tmp_path)
    out = str(tmp_path / "o")
    assert_one_line_error(run("train", "--config", str(cfg), "--out", out, "--data", str(tmp_path)), "has neither images_background")
    (tmp_path / "images_background.zip").write_bytes(b"garbage")
    assert_one_line_error(run("train", "--config", str(cfg), "--out", out, "--data", str(tmp_path)), "is not a readable zip")
    # a zip cut short: the central directory is gone
    good = (mini_omniglot / "images_background.zip").read_bytes()
    (tmp_path / "images_background.zip").write_bytes(good[: len(good) // 2])
    assert_one_line_error(run("train", "--config", str(cfg), "--out", out, "--data", str(tmp_path)), "is not a readable zip")


def test_class_too_small_for_training(tmp_path, sample_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\nkind = "folder"\nroot = "{sample_dir}"\n[train]\nway = 5\nshot = 10\nquery = 15\n')
    assert_one_line_error(run("train", "--config", str(cfg), "--out", str(tmp_path / "o")),
                          "[train] shot = 10 and query = 15 need 25 images per class")


@pytest.mark.tf  # eval imports TensorFlow
def test_debug_shows_the_traceback(tmp_path):
    proc = run("--debug", "eval", "--model", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_setting_parser_and_ci():
    assert parse_setting("5w1s") == (5, 1) and parse_setting("20-way-5-shot") == (20, 5)
    mean, ci = mean_ci95([1.0, 0.0] * 50)
    assert mean == 0.5 and abs(ci - 1.96 * 0.5025 / 10) < 1e-3


def test_confusions_name_the_classes_the_embedding_cannot_separate():
    import numpy as np

    from edgemeta.host.data import FewShotSplit
    from edgemeta.host.methods.protonet import ProtoNet

    # 8 classes of 20 "images" whose embedding is their class's point plus noise; classes 2 and 5
    # share one point, so every error is a 2 <-> 5 confusion and nothing else is ever confused
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 20)
    centres = np.eye(8) * 10
    centres[5] = centres[2]
    emb = (centres[labels] + rng.normal(0, 0.5, (160, 8))).astype(np.float32)
    split = FewShotSplit("test", np.zeros((160, 1, 1, 1), np.uint8), labels, [f"c{i}" for i in range(8)])
    plain, counted = (evaluate(None, ProtoNet().classify, split, ((5, 1),), episodes=200, embeddings=emb, confusions=n)[0]
                      for n in (0, 3))
    assert plain.accuracy == counted.accuracy < 100
    assert counted.errors == round((100 - counted.accuracy) / 100 * 200 * 5 * 15)
    pairs = {(c["true"], c["predicted"]) for c in counted.confusions}
    assert pairs == {("c2", "c5"), ("c5", "c2")} and sum(c["count"] for c in counted.confusions) == counted.errors
    assert "c2 -> c5" in results_table([counted]) and "most confused classes" in results_markdown([counted], "t", {})
    assert "confusions" in results_json([counted])[0] and "confusions" not in results_json([plain])[0]


def test_python_m_and_console_script_agree():
    import shutil

    exe = shutil.which("edgemeta", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe, "the edgemeta console script is not installed next to this Python"
    assert subprocess.run([exe, "--version"], capture_output=True, text=True).stdout == run("--version").stdout


@pytest.mark.tf  # eval loads the Keras model
def test_corrupt_model_file(model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    with zipfile.ZipFile(bad / "model.keras", "w") as z:
        z.writestr("junk", "junk")
    assert_one_line_error(run("eval", "--model", str(bad), "--folder", str(tmp_path)), "cannot load")


# The commands as they were before cli.py became a package (edgemeta/cli/): names must not change
# (calibrate, status and launch came later; data and listen with audio).
COMMANDS = {
    (): {"adapt", "boards", "bundle", "calibrate", "classes", "classify", "console", "data", "demo", "deploy", "doctor", "edgetpu",
         "enroll", "eval", "export", "forget", "health", "inspect", "keygen", "launch", "listen", "new-store", "provision", "reenroll",
         "remote", "rename",
         "rollback", "serve", "status", "train"},
    ("boards",): {"show"},
    ("data",): {"speech"},
    ("remote",): {"adapt", "calibrate", "classes", "classify", "enroll", "forget", "new-store", "reenroll", "rename", "status"},
}


def listed_commands(help_text: str) -> set[str]:
    section = help_text.split("\nCommands:\n", 1)[1]
    return {line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.split()}


def test_every_command_is_reachable_from_help():
    from click.testing import CliRunner

    from edgemeta.cli import main

    for group, names in COMMANDS.items():
        proc = run(*group, "--help")
        assert proc.returncode == 0, proc.stderr
        assert listed_commands(proc.stdout) == names, group
        group_options = ["--via", "unix:/nowhere"] if group == ("remote",) else []  # remote's --via is required
        for name in names:
            r = CliRunner().invoke(main, [*group, *group_options, name, "--help"])
            assert r.exit_code == 0 and r.output.startswith(f"Usage: main {' '.join([*group, name])} "), (group, name, r.output)


def test_the_cli_imports_no_host_module():
    """`import edgemeta.cli` registers every command without TensorFlow, numpy or a host-only module."""
    code = ("import sys, edgemeta.cli, edgemeta.cli.board; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'numpy') or m.startswith('edgemeta.host')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
