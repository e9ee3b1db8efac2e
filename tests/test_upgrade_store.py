"""Issue 30: a model upgrade carries the board's enrollments. Two shipped models of one input kind
(the lake and the vinyals Conv-4), deployed in turn to a real sshd board on 127.0.0.1; the operator
works through `remote --via ssh:` only, and every enrollment stays usable after each step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgemeta.deploy.bundle import build_bundle

REPO = Path(__file__).resolve().parents[1]
LAKE, VINYALS = REPO / "models" / "omniglot-conv4", REPO / "models" / "omniglot-vinyals-conv4"
SAMPLES = REPO / "samples" / "omniglot"
CHARS = sorted(os.listdir(SAMPLES))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The two models for the same board: the second is a model-only upgrade (same runtime, no pip)."""
    base = tmp_path_factory.mktemp("upgrade")
    lake = build_bundle("generic-x86_64", LAKE, base / "lake", wheelhouse=True)
    vinyals = build_bundle("generic-x86_64", VINYALS, base / "vinyals", wheelhouse=True)
    return lake, vinyals


def run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "edgemeta", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def board_status(lab, board) -> dict:
    p = lab.ssh(board, "python3 $HOME/.edgemeta-ops.pyz status")
    return json.loads(p.stdout.strip().splitlines()[-1])


def drawing(char: int, n: int) -> str:
    return str(sorted((SAMPLES / CHARS[char]).glob("*.png"))[n])


def test_upgrades_and_rollbacks_carry_every_enrollment(lab, bundles):
    lake, vinyals = bundles
    board = lab.add_board()
    remote = ("remote", "--via", f"ssh:{board.alias}", "--ssh-config", lab.ssh_config)
    deploy = ("deploy", "--ssh-config", lab.ssh_config, "--host", board.alias)

    def classes() -> dict:
        r = run(*remote, "classes", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def names_right(chars) -> int:
        r = run(*remote, "classify", "--json", *[drawing(c, 15) for c in chars])
        assert r.returncode == 0, r.stderr
        return sum(x["label"] == f"c{c}" for x, c in zip(json.loads(r.stdout), chars, strict=True))

    p = run(*deploy, "--bundle", lake, "--trust-key")
    assert p.returncode == 0, p.stdout + p.stderr
    first = board_status(lab, board)["current"]
    for c in range(4):
        assert run(*remote, "enroll", "--label", f"c{c}", *[drawing(c, i) for i in range(3)]).returncode == 0
    assert names_right(range(4)) >= 3

    # upgrade to the other model: the kept samples are re-embedded before the switch
    p = run(*deploy, "--bundle", vinyals)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "store for" in p.stderr and "re-embedded (4 class(es), 12 sample(s) for omniglot-vinyals-conv4)" in p.stderr, p.stderr
    second = board_status(lab, board)["current"]
    got = classes()
    assert got["backbone"]["model"] == "omniglot-vinyals-conv4" and got["classes"] == {f"c{c}": 3 for c in range(4)}
    assert names_right(range(4)) >= 3
    assert run(*remote, "enroll", "--label", "c4", *[drawing(4, i) for i in range(3)]).returncode == 0  # enrolled after the upgrade

    # back: the enrollment made since comes along, re-embedded for the old model
    p = run("rollback", "--ssh-config", lab.ssh_config, "--host", board.alias)
    assert p.returncode == 0, p.stdout + p.stderr
    assert board_status(lab, board)["current"] == first
    got = classes()
    assert got["backbone"]["model"] == "omniglot-conv4" and set(got["classes"]) == {f"c{c}" for c in range(5)}
    assert names_right(range(5)) >= 4
    # and forward again, by id
    p = run("rollback", "--ssh-config", lab.ssh_config, "--host", board.alias, "--to", second)
    assert p.returncode == 0 and board_status(lab, board)["current"] == second, p.stdout + p.stderr
    assert set(classes()["classes"]) == {f"c{c}" for c in range(5)}
    # nothing was deleted: the stores replaced by later carries are in the archive
    archived = list((board.root / "stores" / ".archive").iterdir())
    assert archived and all((a / "store.npz").is_file() for a in archived)
    assert (board.root / "store").is_symlink() and (board.root / "store" / "store.npz").is_file()


def test_a_store_that_cannot_be_carried_stops_the_deploy_before_anything_changes(lab, bundles):
    lake, vinyals = bundles
    board = lab.add_board()
    remote = ("remote", "--via", f"ssh:{board.alias}", "--ssh-config", lab.ssh_config)
    deploy = ("deploy", "--ssh-config", lab.ssh_config, "--host", board.alias)
    assert run(*deploy, "--bundle", lake, "--trust-key").returncode == 0
    r = run(*remote, "enroll", "--no-keep-samples", "--label", "x", drawing(0, 0), drawing(0, 1))
    assert r.returncode == 0, r.stderr
    before = board_status(lab, board)
    store_bytes = (board.root / "store" / "store.npz").read_bytes()
    p = run(*deploy, "--bundle", vinyals)
    assert p.returncode == 1 and "cannot be carried" in p.stdout and "kept no samples" in p.stdout, p.stdout + p.stderr
    assert "--fresh-store" in p.stdout
    after = board_status(lab, board)
    assert after["current"] == before["current"] and after["releases"] == before["releases"]
    assert (board.root / "store" / "store.npz").read_bytes() == store_bytes
    assert run(*remote, "classes", "--json").returncode == 0  # the board still serves its store
    # the way out it names: an empty store for the new model, the old one kept on the board
    p = run(*deploy, "--bundle", vinyals, "--fresh-store")
    assert p.returncode == 0 and "starts with an empty store" in p.stderr, p.stdout + p.stderr
    assert json.loads(run(*remote, "classes", "--json").stdout)["classes"] == {}
    old = board.root / "stores" / before["current"] / "store.npz"
    assert old.read_bytes() == store_bytes


def test_an_older_boards_shared_store_is_adopted_at_its_next_activation(lab, bundles):
    """Boards deployed before stores were paired with releases have one ROOT/store folder."""
    lake, vinyals = bundles
    board = lab.add_board()
    deploy = ("deploy", "--ssh-config", lab.ssh_config, "--host", board.alias)
    assert run(*deploy, "--bundle", lake, "--trust-key").returncode == 0
    cur = board_status(lab, board)["current"]
    # make it look like an older board: a real ROOT/store folder, no stores/, no release link
    exe = board.root / "current" / "venv" / "bin" / "edgemeta"
    (board.root / "store").unlink()
    shutil.rmtree(board.root / "stores")
    (board.root / "releases" / cur / "store").unlink()
    r = lab.ssh(board, f"{exe} enroll --model {board.root}/current/model --store {board.root}/store --label old "
                       f"{drawing(1, 0)} {drawing(1, 1)}")
    assert r.returncode == 0, r.stderr
    p = run(*deploy, "--bundle", vinyals)
    assert p.returncode == 0 and "re-embedded (1 class(es), 2 sample(s)" in p.stderr, p.stdout + p.stderr
    assert (board.root / "store").is_symlink()
    assert (board.root / "stores" / cur / "store.npz").is_file()  # the old folder, now the old release's store
    r = run("remote", "--via", f"ssh:{board.alias}", "--ssh-config", lab.ssh_config, "classes", "--json")
    assert json.loads(r.stdout)["classes"] == {"old": 2}


def test_deploy_keeps_the_releases_most_recently_active(lab, bundles, tmp_path):
    """Before: after `rollback --to` an old release, the next deploy pruned the release rolled back
    from (the history after the active release is dropped), though it had just been active."""
    lake, vinyals = bundles
    maml = build_bundle("generic-x86_64", REPO / "models" / "omniglot-vinyals-maml", tmp_path / "maml", wheelhouse=True)
    snail = build_bundle("generic-x86_64", REPO / "models" / "omniglot-vinyals-snail", tmp_path / "snail", wheelhouse=True)
    board = lab.add_board()
    deploy = ("deploy", "--ssh-config", lab.ssh_config, "--host", board.alias)
    ids = []
    for b in (lake, vinyals, maml):
        p = run(*deploy, "--bundle", b, *(["--trust-key"] if not ids else []))
        assert p.returncode == 0, p.stdout + p.stderr
        ids.append(board_status(lab, board)["current"])
    p = run("rollback", "--ssh-config", lab.ssh_config, "--host", board.alias, "--to", ids[0])
    assert p.returncode == 0, p.stdout + p.stderr
    p = run("rollback", "--ssh-config", lab.ssh_config, "--host", board.alias, "--to", "nope")
    assert p.returncode == 1 and f"{ids[0]} (active)" in p.stdout and ids[2] in p.stdout, p.stdout  # all of them, the active one marked
    p = run(*deploy, "--bundle", snail)
    assert p.returncode == 0, p.stdout + p.stderr
    st = board_status(lab, board)
    assert sorted(st["releases"]) == sorted([st["current"], ids[0], ids[2]]), (st["releases"], ids)  # the 3 last active
