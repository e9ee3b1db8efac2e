"""Deployment against real OpenSSH servers on 127.0.0.1 (the generic-x86_64 board profile)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgemeta.deploy.bundle import build_bundle
from edgemeta.runtime.manifest import sha256_file

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "omniglot"


@pytest.fixture(scope="module")
def bundle(exported, tmp_path_factory):
    return build_bundle("generic-x86_64", exported, tmp_path_factory.mktemp("bundles") / "b1", wheelhouse=True)


def deploy(lab, *args):
    return subprocess.run([sys.executable, "-m", "edgemeta", "deploy", "--ssh-config", str(lab.ssh_config), *args],
                          capture_output=True, text=True, timeout=900)


def status(lab, board):
    p = lab.ssh(board, "python3 $HOME/.edgemeta-ops.py status")
    return json.loads(p.stdout.strip().splitlines()[-1])


def rebundle(bundle: Path, dest: Path, change=None) -> Path:
    """A copy of a bundle, optionally changed, with BUNDLE.json re-signed (as a new build would be)."""
    shutil.copytree(bundle, dest)
    if change:
        change(dest)
    info = json.loads((dest / "BUNDLE.json").read_text())
    info["created"] = dest.name  # a new build: new release id
    info["files"] = {k: sha256_file(dest / k) for k in info["files"]}
    (dest / "BUNDLE.json").write_text(json.dumps(info))
    return dest


def test_deploy_enroll_classify_and_upgrade(lab, bundle, tmp_path):
    board = lab.add_board()
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ok" in p.stdout and "checksums verified on the board" in p.stderr
    first = status(lab, board)["current"]
    assert first and (board.root / "current" / "venv" / "bin" / "edgemeta").exists()
    unit = (board.root / "edgemeta-agent.service").read_text()
    assert f"ExecStart={board.root}/current/venv/bin/edgemeta serve" in unit and "@ROOT@" not in unit
    venv_py = board.root / "current" / "venv" / "bin" / "python"
    assert lab.ssh(board, f"{venv_py} -c 'import tensorflow'").returncode != 0  # never TensorFlow on a board
    # enroll and classify on the board from here: the images travel over ssh to the deployed release
    exe, store = board.root / "current/venv/bin/edgemeta", board.root / "store"
    files = [str(p) for p in sorted((SAMPLE / "Keble_character01").glob("*.png"))]
    remote = [sys.executable, "-m", "edgemeta", "remote", "--via", f"ssh:{board.alias}", "--ssh-config", str(lab.ssh_config)]
    r = subprocess.run([*remote, "enroll", "--label", "k1", files[0], files[1]], capture_output=True, text=True)
    assert r.returncode == 0 and "now has 2 sample(s)" in r.stdout, r.stderr
    r = subprocess.run([*remote, "classify", "--json", files[7]], capture_output=True, text=True)
    assert json.loads(r.stdout)[0]["top"][0]["label"] == "k1", r.stderr
    # upgrade: a new release becomes current, the store survives
    p = deploy(lab, "--bundle", str(rebundle(bundle, tmp_path / "b2")), "--host", board.alias)
    assert p.returncode == 0, p.stderr
    st = status(lab, board)
    assert st["current"] != first and st["history"][-2:] == [first, st["current"]]
    r = lab.ssh(board, f"{exe} classes --store {store} --json")
    assert json.loads(r.stdout)["classes"] == {"k1": 2}
    # and back by hand
    p = subprocess.run([sys.executable, "-m", "edgemeta", "rollback", "--ssh-config", str(lab.ssh_config), "--host", board.alias],
                       capture_output=True, text=True)
    assert p.returncode == 0 and status(lab, board)["current"] == first, p.stderr


def test_failed_health_check_rolls_back(lab, bundle, tmp_path):
    board = lab.add_board()
    assert deploy(lab, "--bundle", str(bundle), "--host", board.alias).returncode == 0
    good = status(lab, board)["current"]

    def break_manifest(d):
        m = json.loads((d / "model/manifest.json").read_text())
        m["embedding_dim"] = 7
        (d / "model/manifest.json").write_text(json.dumps(m))

    p = deploy(lab, "--bundle", str(rebundle(bundle, tmp_path / "bad", break_manifest)), "--host", board.alias)
    assert p.returncode == 1 and "health check failed" in p.stdout and f"rolled back to {good}" in p.stdout
    st = status(lab, board)
    assert st["current"] == good and st["history"] == [good]


def test_tampered_bundle_is_refused(lab, bundle, tmp_path):
    board = lab.add_board()
    assert deploy(lab, "--bundle", str(bundle), "--host", board.alias).returncode == 0
    good = status(lab, board)["current"]
    bad = rebundle(bundle, tmp_path / "tampered")
    with open(bad / "model" / "int8_static.tflite", "r+b") as f:  # changed after signing
        f.seek(2000)
        f.write(b"\x00\x01\x02\x03")
    p = deploy(lab, "--bundle", str(bad), "--host", board.alias)
    assert p.returncode == 1 and "checksum mismatch: model/int8_static.tflite" in p.stdout
    st = status(lab, board)
    assert st["current"] == good and len(st["releases"]) == 1


def test_fleet_with_bad_hosts_and_a_cut_transfer(lab, bundle, exported, tmp_path):
    ok1, ok2 = lab.add_board(), lab.add_board()
    refused = lab.add_board(authorized=False)
    with open(lab.ssh_config, "a") as f:
        f.write("Host gone\n  HostName 127.0.0.1\n  Port 9\n  ConnectTimeout 3\n\n")
    # a transfer cut midway leaves a partial upload behind; the next deploy cleans it up
    data = subprocess.run(["tar", "-C", str(bundle), "-cf", "-", "."], capture_output=True).stdout
    ops = (Path(__file__).parents[1] / "edgemeta/deploy/board_ops.py").read_bytes()
    subprocess.run(["ssh", "-F", str(lab.ssh_config), ok1.alias, "cat > .edgemeta-ops.py"], input=ops, check=True)
    cut = subprocess.run(["ssh", "-F", str(lab.ssh_config), ok1.alias, "python3 $HOME/.edgemeta-ops.py receive cut"],
                         input=data[: len(data) // 2], capture_output=True)
    assert cut.returncode != 0 and list((ok1.root / "releases").glob(".cut.partial"))
    hosts = tmp_path / "fleet.txt"
    hosts.write_text(f"# the fleet\n{ok1.alias}\n{refused.alias}\ngone\n{ok2.alias}\n")
    p = deploy(lab, "--bundle", str(bundle), "--hosts", str(hosts), "--parallel", "2", "--json")
    assert p.returncode == 1
    results = {r["host"]: r for r in json.loads(p.stdout)}
    assert results[ok1.alias]["ok"] and results[ok2.alias]["ok"]
    assert not results[refused.alias]["ok"] and "Permission denied" in results[refused.alias]["error"]
    assert not results["gone"]["ok"] and "ssh to gone failed" in results["gone"]["error"]
    assert not list((ok1.root / "releases").glob(".*.partial"))
    # the wrong architecture is refused before anything is uploaded
    arm = build_bundle("rpi5", exported, tmp_path / "arm")
    p = deploy(lab, "--bundle", str(arm), "--host", ok2.alias)
    assert p.returncode == 1 and "is x86_64, the bundle is for rpi5 (aarch64)" in p.stdout


def test_dry_run_changes_nothing(lab, bundle):
    board = lab.add_board()
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--dry-run")
    assert p.returncode == 0 and "dry run: would upload" in p.stderr
    assert not (board.root / "releases").exists()


def test_bundle_refuses_what_the_board_cannot_run(exported, tmp_path):
    p = subprocess.run([sys.executable, "-m", "edgemeta", "bundle", "--board", "rpi-coral-usb", "--model", str(exported),
                        "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert p.returncode == 2 and "takes the edgetpu variant" in p.stderr and not (tmp_path / "b").exists()
    p = subprocess.run([sys.executable, "-m", "edgemeta", "bundle", "--board", "coral-devboard", "--model", str(exported),
                        "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert p.returncode == 2 and "Python 3.7" in p.stderr


def bundle_cli(exported, out):
    return subprocess.run([sys.executable, "-m", "edgemeta", "bundle", "--board", "generic-x86_64", "--model", str(exported),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_bundle(exported, tmp_path_factory):
    return build_bundle("generic-x86_64", exported, tmp_path_factory.mktemp("small") / "b")


def test_bundle_never_deletes_a_folder_it_did_not_write(exported, small_bundle, tmp_path):
    mine = tmp_path / "my-stuff"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    p = bundle_cli(exported, mine)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert str(mine) in p.stderr and "not a bundle edgemeta wrote" in p.stderr and "choose a new or empty folder" in p.stderr
    assert tree(mine) == {"thesis.txt": b"years of work"}
    # a bundle with a user's file put into it is not taken for edgemeta's alone either
    shutil.copytree(small_bundle, tmp_path / "b")
    (tmp_path / "b" / "model" / "notes.txt").write_text("mine")
    before = tree(tmp_path / "b")
    p = bundle_cli(exported, tmp_path / "b")
    assert p.returncode == 2 and "model/notes.txt" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert tree(tmp_path / "b") == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["b", "my-stuff"]  # no half-built sibling left


def test_bundle_replaces_its_own_earlier_bundle(exported, small_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(small_bundle, out)
    (out / "requirements.txt").write_text("from the earlier build\n")  # a file the bundle lists
    p = bundle_cli(exported, out)
    assert p.returncode == 0, p.stderr
    new = tree(out)
    assert new.keys() == tree(small_bundle).keys()
    assert new["requirements.txt"] == (small_bundle / "requirements.txt").read_bytes()
    assert json.loads(new["BUNDLE.json"])["files"] == {k: sha256_file(out / k) for k in new if k != "BUNDLE.json"}
    assert [x.name for x in tmp_path.iterdir()] == ["b"]


def test_a_failed_build_leaves_the_earlier_bundle_intact(exported, small_bundle, tmp_path, monkeypatch):
    import edgemeta.deploy.bundle as bundle_mod
    from edgemeta.errors import EdgemetaError

    out = tmp_path / "b"
    shutil.copytree(small_bundle, out)
    before = tree(out)

    def no_wheel(dest):  # the build fails late, after the model was checked and copied
        raise EdgemetaError("could not build the edgemeta wheel: test")

    monkeypatch.setattr(bundle_mod, "_edgemeta_wheel", no_wheel)
    with pytest.raises(EdgemetaError, match="could not build the edgemeta wheel"):
        build_bundle("generic-x86_64", exported, out)
    assert tree(out) == before
    assert [x.name for x in tmp_path.iterdir()] == ["b"]
    # a bad model: refused, the bundle untouched
    bad = tmp_path / "bad-model"
    shutil.copytree(exported, bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(EdgemetaError):
        build_bundle("generic-x86_64", bad, out)
    assert tree(out) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["b", "bad-model"]


def test_doctor_over_ssh_before_and_after_deploy(lab, bundle):
    board = lab.add_board()
    doctor = [sys.executable, "-m", "edgemeta", "doctor", "--board", "generic-x86_64", "--host", board.alias,
              "--ssh-config", str(lab.ssh_config), "--json"]
    before = subprocess.run(doctor, capture_output=True, text=True)
    checks = {c["check"]: c for c in json.loads(before.stdout)}
    assert before.returncode == 1 and checks["interpreter"]["status"] == "fail" and "pip install" in checks["interpreter"]["fix"]
    assert checks["architecture"]["status"] == "pass" and checks["python"]["status"] == "pass"
    assert deploy(lab, "--bundle", str(bundle), "--host", board.alias).returncode == 0
    after = subprocess.run(doctor, capture_output=True, text=True)
    checks = {c["check"]: c for c in json.loads(after.stdout)}
    assert after.returncode == 0 and checks["interpreter"]["detail"] == "ai_edge_litert 2.3.0", after.stdout


def test_a_linear_head_travels_with_its_model(tmp_path):
    from test_runtime import linear_model

    from edgemeta.runtime.manifest import read_manifest

    out = build_bundle("generic-x86_64", linear_model(tmp_path / "lin"), tmp_path / "b")
    m = read_manifest(out / "model")  # checks head.npz against its checksum
    assert m.head.kind == "linear" and m.head.linear.w0.shape == (64, 5)
    assert "model/head.npz" in json.loads((out / "BUNDLE.json").read_text())["files"]
