"""Training within a wall-time budget (issue 30): checkpoints by time as well as at validations, a
budget per run, the time left bounded by the budget, the note when the first validation will not come
in time, the last weights kept when the budget ends first, and budgets that cannot work refused.

Most tests run on a fake clock that advances 10 s per training step, so minutes of "wall time" pass in
a second; one runs the CLI on the real clock and kills it with SIGKILL."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest

import edgemeta.host.training.progress as train_module
from edgemeta.errors import EdgemetaError
from edgemeta.host.config import config_from_dict
from edgemeta.host.training import EpisodicTrainer, train

pytestmark = pytest.mark.tf  # trains with TensorFlow

STEP_S = 10.0  # fake seconds per training step


class Killed(Exception):
    """Stands for SIGKILL in-process: the run ends with no chance to save anything."""


def config(sample_dir, every=500, **train):
    return config_from_dict({
        "data": {"kind": "folder", "root": str(sample_dir), "fractions": [0.6, 0.2, 0.2]},
        "model": {"backbone": "conv4"},
        "train": {"way": 5, "shot": 1, "query": 3, "episodes": 100000, "lr_decay_every": 1000, **train},
        "validation": {"every": every, "episodes": 20, "way": 5, "shot": 1, "query": 5},
    })


@pytest.fixture
def fake_clock(monkeypatch):
    """train.py's clock, advanced STEP_S by every training step; `kill_at`: raise Killed after that many steps."""
    clock = {"t": 1000.0, "steps": 0, "kill_at": None}
    step_flags = EpisodicTrainer.step_flags

    def timed_step(self, *args, **kwargs):
        out = step_flags(self, *args, **kwargs)
        clock["t"] += STEP_S
        clock["steps"] += 1
        if clock["kill_at"] is not None and clock["steps"] >= clock["kill_at"]:
            raise Killed
        return out

    monkeypatch.setattr(train_module, "_clock", lambda: clock["t"])
    monkeypatch.setattr(EpisodicTrainer, "step_flags", timed_step)
    return clock


def test_a_killed_run_resumes_from_a_checkpoint_written_by_time_before_any_validation(tmp_path, sample_dir, fake_clock):
    # a checkpoint every 0.5 min = 3 steps of 10 s; the first validation (episode 10) does not come; killed at step 6
    fake_clock["kill_at"] = 6
    with pytest.raises(Killed):
        train(config(sample_dir, every=10, checkpoint_minutes=0.5), tmp_path / "killed", progress=False)
    state = json.loads((tmp_path / "killed" / "checkpoints" / "state.json").read_text())
    assert state["checkpoint"] == {"episode": 4, "why": "time", "elapsed_s": 40.0}
    assert state["history"] == [] and not (tmp_path / "killed" / "model.keras").exists()  # no validation ran
    assert (tmp_path / "killed" / "splits.json").is_file() and (tmp_path / "killed" / "config.toml").is_file()
    fake_clock["kill_at"] = None
    again = train(config(sample_dir, every=10, episodes=10, checkpoint_minutes=0.5), tmp_path / "killed", progress=False)
    assert again.episodes == 10 and again.stopped_by == "episodes"
    assert fake_clock["steps"] == 6 + 6  # 4 episodes came from the checkpoint: 6 more steps, not 10
    # the same weights and the same history row as a run never killed (the losses since the last validation are kept)
    whole = train(config(sample_dir, every=10, episodes=10, checkpoint_minutes=0), tmp_path / "whole", progress=False)
    assert (again.best_val_acc, again.best_episode) == pytest.approx((whole.best_val_acc, whole.best_episode), rel=1e-6)
    rows = [json.loads((tmp_path / d / "checkpoints" / "state.json").read_text())["history"] for d in ("killed", "whole")]
    assert len(rows[0]) == len(rows[1]) == 1
    assert (rows[0][0]["loss"], rows[0][0]["train_acc"]) == pytest.approx((rows[1][0]["loss"], rows[1][0]["train_acc"]), rel=1e-5)


def test_without_time_checkpoints_the_kill_leaves_nothing_to_resume(tmp_path, sample_dir, fake_clock):
    fake_clock["kill_at"] = 6
    with pytest.raises(Killed):
        train(config(sample_dir, checkpoint_minutes=0), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints" / "state.json").exists()


def test_the_budget_ends_the_run_with_its_last_weights_and_says_so(tmp_path, sample_dir, fake_clock, capsys):
    # 2 min = 12 steps; the first validation (episode 500) would need 83 min at 0.1 episodes/s
    result = train(config(sample_dir, max_minutes=2, checkpoint_minutes=0.5), tmp_path, progress=True)
    err = capsys.readouterr().err
    assert result.stopped_by == "time budget" and result.episodes == 13  # the 13th step starts at 120 s: flagged, the last
    assert (tmp_path / "model.keras").is_file() and result.best_episode == 13
    assert "the last weights (episode 13), validated once, at the stop: the time budget ended before the first " \
           "scheduled validation (episode 500)" in result.model_note
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1, err
    assert notes[0].startswith("note: the first validation of this run (episode 500) would come in about 83 min at the "
                               "measured 0.1 episodes/s, after the time budget ends (1.7 min left)"), notes
    assert "set [validation] every to at most 9" in notes[0] and "model.keras will hold those last weights" in notes[0]
    # every time-left figure is within the budget, and says the budget is what ends the run
    lefts = [float(m) for m in re.findall(r"([\d.]+) min left \(time budget; 100000 episodes would need", err)]
    assert lefts and max(lefts) <= 2.0 and min(lefts) >= 0, err
    assert "min left (episodes" not in err
    history = json.loads((tmp_path / "checkpoints" / "state.json").read_text())["history"]
    assert [h["episode"] for h in history] == [13]


def test_the_note_stays_away_when_the_first_validation_comes_in_time(tmp_path, sample_dir, fake_clock, capsys):
    result = train(config(sample_dir, episodes=8, max_minutes=5), tmp_path, progress=True)
    err = capsys.readouterr().err
    assert result.stopped_by == "episodes" and "note: the first validation" not in err
    assert re.search(r"min left \(episodes, within the budget\)", err), err  # the episodes end the run first


def test_time_left_is_the_smaller_of_the_episodes_and_the_budget(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(train_module, "_clock", lambda: clock["t"])
    short = train_module._Progress(100, True, 0, budget_s=600.0, begun=0.0)
    long = train_module._Progress(1000, True, 0, budget_s=600.0, begun=0.0)
    unbounded = train_module._Progress(1000, True, 0)
    clock["t"] = 60.0  # 10 episodes in the first minute of a 10-min budget
    assert short.time_left(10) == (540.0, None)  # 90 episodes: 9 min, as much as the budget has left
    assert "9.0 min left (episodes, within the budget)" in short.line(10, 1.0, 0.5, "-")
    assert long.time_left(10) == (540.0, 5940.0)  # 990 episodes would need 99 min; the budget ends the run in 9
    assert "9.0 min left (time budget; 1000 episodes would need 99)" in long.line(10, 1.0, 0.5, "-")
    assert unbounded.time_left(10) == (5940.0, None) and "99 min left" in unbounded.line(10, 1.0, 0.5, "-")


def test_the_budget_is_this_runs_not_the_total(tmp_path, sample_dir, fake_clock):
    first = train(config(sample_dir, max_minutes=1, checkpoint_minutes=0), tmp_path, progress=False)
    assert first.stopped_by == "time budget" and first.episodes == 7 and first.elapsed_s >= 60
    second = train(config(sample_dir, max_minutes=1, checkpoint_minutes=0), tmp_path, progress=False)
    # before: 70 s of earlier training counted against the budget, and the resumed run stopped after one step
    assert second.stopped_by == "time budget" and second.episodes == 14
    assert second.elapsed_s >= 130  # the total on record still counts both runs


def test_a_budget_shorter_than_a_step_is_refused_and_writes_nothing(tmp_path, sample_dir, fake_clock):
    with pytest.raises(EdgemetaError, match=r"max_minutes = 0.1 \(6 s\) is shorter than one training step: this run's set-up "
                                            r"and first step \(compiling included\) took 10.0 s; .*nothing was written"):
        train(config(sample_dir, max_minutes=0.1), tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()
    # a folder with a run in it is left as it was
    train(config(sample_dir, episodes=3), tmp_path / "old", progress=False)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "old").rglob("*")}
    with pytest.raises(EdgemetaError, match="shorter than one training step"):
        train(config(sample_dir, episodes=10, max_minutes=0.1), tmp_path / "old", progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "old").rglob("*")} == before


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgemeta", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("line, fragment", [
    ("max_minutes = nan", "[train] max_minutes must be a finite number of minutes, at least 0"),
    ("max_minutes = -1", "[train] max_minutes must be a finite number of minutes, at least 0 (0: no limit), not -1"),
    ("checkpoint_minutes = inf", "[train] checkpoint_minutes must be a finite number"),
])
def test_bad_budgets_in_the_config_are_one_line_before_tensorflow(tmp_path, sample_dir, line, fragment):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\nkind = "folder"\nroot = "{sample_dir}"\n[train]\n{line}\n')
    p = cli("train", "--config", str(cfg), "--out", str(tmp_path / "out"))
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], p.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_budget_shorter_than_a_step(tmp_path, sample_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\nkind = "folder"\nroot = "{sample_dir}"\n[train]\nway = 5\nshot = 1\nquery = 3\n'
                   "[validation]\nway = 5\n")
    p = cli("train", "--config", str(cfg), "--out", str(tmp_path / "out"), "--max-minutes", "0.00001", "--quiet")
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: [train] max_minutes = 1e-05 (0.0006 s) is shorter than one training step"), lines
    assert not (tmp_path / "out").exists()


def test_sigkill_after_a_time_checkpoint_and_the_next_run_resumes(tmp_path, sample_dir):
    """The real clock: a checkpoint every 0.6 s, validation never; SIGKILL gives no chance to save."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\nkind = "folder"\nroot = "{sample_dir}"\n[train]\nway = 5\nshot = 1\nquery = 3\n'
                   "episodes = 100000\ncheckpoint_minutes = 0.01\n[validation]\nevery = 100000\nepisodes = 20\nway = 5\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "edgemeta", "train", "--config", str(cfg), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoints" / "state.json"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert state.exists(), proc.communicate()[1]
    time.sleep(0.5)  # let a state.json being replaced settle
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert json.loads(state.read_text())["checkpoint"]["why"] == "time"
    assert not (out / "model.keras").exists()  # no validation ran
    # the checkpoint TensorFlow restores (state.json may be one behind if the kill fell between the two writes)
    latest = int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"', (out / "checkpoints" / "checkpoint").read_text())[1])
    assert latest > 0
    again = cli("train", "--config", str(cfg), "--out", str(out), "--episodes", str(latest + 5))
    assert again.returncode == 0, again.stderr
    assert f"episodes {latest} to {latest + 5} of 5-way 1-shot 3-query (resumed from the checkpoint at episode {latest})" \
           in again.stderr, again.stderr
    assert f"stopped after {latest + 5} episodes (episodes)" in again.stdout
