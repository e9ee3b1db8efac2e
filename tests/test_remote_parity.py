"""Issue 30: every board command an operator needs has a `remote` form with the same options, messages
and exit codes; the new ones (calibrate, reenroll, new-store, enroll --from-folders / --negative) run
through a real agent on a Unix socket and a serial cable (ptys)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from edgemeta.cli import main
from edgemeta.cli.remote import BOARD_ONLY, BOARD_ONLY_OPTIONS
from tests.support.ptys import NullModem

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "omniglot-conv4"
OTHER = REPO / "models" / "omniglot-vinyals-conv4"
SAMPLES = REPO / "samples" / "omniglot"
RUNTIME_OPTIONS = {"store", "model", "variant", "threads", "edgetpu", "xnnpack"}  # the agent has its own


def edgemeta(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgemeta", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def board_commands() -> dict[str, click.Command]:
    from edgemeta.cli import board

    return {name: cmd for name, cmd in main.commands.items() if cmd.callback.__module__ == board.__name__}


def test_every_board_command_has_a_remote_form_with_the_same_options():
    remote = main.commands["remote"]
    board = board_commands()
    assert {"enroll", "calibrate", "reenroll", "new-store", "classify", "forget"} <= set(board)
    missing = sorted(set(board) - set(remote.commands) - set(BOARD_ONLY))
    assert not missing, f"board commands without a remote form: {missing}"
    for name, cmd in board.items():
        if name in BOARD_ONLY:
            continue
        theirs = {p.name for p in remote.commands[name].params}
        mine = {p.name for p in cmd.params} - RUNTIME_OPTIONS - {o for c, o in BOARD_ONLY_OPTIONS if c == name}
        assert mine <= theirs, (name, sorted(mine - theirs))


@pytest.fixture
def classes_folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    for c in sorted(os.listdir(SAMPLES))[:3]:
        shutil.copytree(SAMPLES / c, root / c, ignore=shutil.ignore_patterns("*_1[0-9].png", "*_2*.png"))
    return root


def start(store, *listen):
    proc = subprocess.Popen([sys.executable, "-m", "edgemeta", "serve", "--model", str(MODEL), "--store", str(store), *listen],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert line.startswith("serving"), line + proc.stderr.read()
    return proc


def stop(proc):
    proc.terminate()
    proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read()


def session(via: str, board_store: Path, agent_store: Path, classes_folder: Path, negatives: Path):
    """The same operator session on the board and through `remote`: equal output and exit codes."""
    steps = [
        (["enroll", "--from-folders", classes_folder], "enrolled 9 sample(s) as"),
        (["enroll", "--negative", negatives], "negative sample(s)"),
        (["calibrate", "--false-accept", "0.2", "--json"], '"mode": "calibrated"'),
        (["calibrate", "--show"], "answers 'unknown' when"),
        (["calibrate", "--threshold", "off"], "never answers 'unknown'"),
        (["classes", "--json"], '"classes"'),
        (["rename", sorted(os.listdir(classes_folder))[0], "first"], "renamed"),
        (["forget", "--label", "first"], "forgot 'first' (9 sample(s))"),
    ]
    for args, want in steps:
        b = edgemeta(args[0], "--store", board_store, *(["--model", MODEL] if args[0] in ("enroll", "calibrate") else []),
                     *args[1:])
        r = edgemeta("remote", "--via", via, *args)
        assert b.returncode == r.returncode == 0, (args, b.stderr, r.stderr)
        assert want in b.stdout and want in r.stdout, (args, b.stdout, r.stdout)
        if args[0] != "classes" and "--json" not in args:
            assert b.stdout == r.stdout, (args, b.stdout, r.stdout)
    # errors: the same line (the board's names its store path, the agent's its own) and exit 2, before or after the wire
    for args in (["enroll", "--label", "x", "--negative", negatives], ["calibrate", "--accept", "2"],
                 ["calibrate", "--accept", "0.9", "--show"], ["enroll", "--from-folders", classes_folder / "nope"]):
        b = edgemeta(args[0], "--store", board_store, "--model", MODEL, *args[1:])
        r = edgemeta("remote", "--via", via, *args)
        assert b.returncode == r.returncode == 2 and b.stderr == r.stderr and b.stderr.startswith("error: "), (args, b.stderr, r.stderr)
    r = edgemeta("remote", "--via", via, "forget", "--label", "nope")
    assert r.returncode == 2 and "no class 'nope'" in r.stderr and r.stderr.count("\n") == 1
    # a model upgrade done by hand: reenroll with the agent's model is a no-op that re-embeds; new-store archives
    r = edgemeta("remote", "--via", via, "reenroll", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["samples"] == 18, r.stderr
    r = edgemeta("remote", "--via", via, "new-store")
    assert r.returncode == 0 and "the store is empty now; the old one is kept as" in r.stdout, r.stderr
    kept = Path(r.stdout.strip().rsplit(" ", 1)[1])
    assert kept.parent == agent_store / "archive" and kept.is_file()
    r = edgemeta("remote", "--via", via, "classes", "--json")
    assert json.loads(r.stdout)["classes"] == {}, r.stdout
    b = edgemeta("new-store", "--store", board_store)
    assert b.returncode == 0 and (board_store / "archive").is_dir() and not (board_store / "store.npz").exists()
    # the folder takes a new store: enroll works after new-store, and the archive stays
    assert edgemeta("remote", "--via", via, "enroll", "--label", "again", *sorted((classes_folder).iterdir())[:1]).returncode == 0
    assert kept.is_file()


def test_the_board_session_and_the_remote_one_say_the_same_over_a_socket(tmp_path, classes_folder):
    negatives = tmp_path / "neg"
    shutil.copytree(SAMPLES / sorted(os.listdir(SAMPLES))[5], negatives)
    sock = tmp_path / "a.sock"
    proc = start(tmp_path / "agent-store", "--socket", str(sock))
    try:
        session(f"unix:{sock}", tmp_path / "board-store", tmp_path / "agent-store", classes_folder, negatives)
    finally:
        stop(proc)


def test_new_ops_over_a_serial_cable(tmp_path, classes_folder):
    cable = NullModem()
    board_end, host_end = cable.names
    proc = start(tmp_path / "store", "--serial", board_end)
    via = f"serial:{host_end}"
    try:
        r = edgemeta("remote", "--via", via, "enroll", "--from-folders", classes_folder, "--json")
        assert r.returncode == 0 and [c["added"] for c in json.loads(r.stdout)] == [9, 9, 9], r.stderr
        r = edgemeta("remote", "--via", via, "calibrate", "--accept", "0.9", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["mode"] == "calibrated", r.stderr
        r = edgemeta("remote", "--via", via, "reenroll")
        assert r.returncode == 0 and "re-enrolled 27 sample(s)" in r.stdout, r.stderr
    finally:
        stop(proc)
        cable.close()


def test_carry_writes_a_store_for_another_model_and_leaves_the_old_one(tmp_path, classes_folder):
    store, out = tmp_path / "s", tmp_path / "for-vinyals"
    assert edgemeta("enroll", "--model", MODEL, "--store", store, "--from-folders", classes_folder).returncode == 0
    before = (store / "store.npz").read_bytes()
    r = edgemeta("reenroll", "--store", store, "--model", OTHER, "--out", out, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["carried"] == "re-embedded", r.stderr
    assert (store / "store.npz").read_bytes() == before
    r = edgemeta("classify", "--store", out, sorted((classes_folder / sorted(os.listdir(classes_folder))[0]).iterdir())[0])
    assert r.returncode == 0 and "(distance" in r.stdout, r.stderr
    # a store that kept no samples cannot be carried: one line, nothing written
    bare = tmp_path / "bare"
    assert edgemeta("enroll", "--model", MODEL, "--store", bare, "--no-keep-samples", "--from-folders", classes_folder).returncode == 0
    r = edgemeta("reenroll", "--store", bare, "--model", OTHER, "--out", tmp_path / "x")
    assert r.returncode == 2 and "kept no samples" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "x" / "store.npz").exists()
