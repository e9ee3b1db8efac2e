"""--port, --identity and --accept-new-host-key (issue 30): a board on its own port with its own key,
reached for the first time, against real sshd servers on 127.0.0.1 (tests/support/sshd.py) and a client that
knows nothing of the board (lab.stranger: no port, no key, an empty known_hosts; never ~/.ssh's);
the options' checks; the one ssh command line; the `fleet` extra."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgemeta.cli import main
from edgemeta.deploy.bundle import build_bundle

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
USER = os.environ.get("USER", "root")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle("generic-x86_64", REPO / "models" / "omniglot-conv4", tmp_path_factory.mktemp("bundles") / "b",
                        wheelhouse=True)


def edgemeta(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemeta", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def failed_row(p: subprocess.CompletedProcess) -> str:
    """The one FAILED line of a one-host deploy or status."""
    rows = [ln for ln in p.stdout.splitlines() if "FAILED" in ln]
    assert p.returncode == 1 and len(rows) == 1, (p.returncode, p.stdout, p.stderr)
    return rows[0]


def one_line_error(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    return lines[0]


def close_shared_connection(cfg: Path, port: int, host: str) -> None:
    """End the ssh connection `remote --via ssh:` keeps open (its host key was checked when it opened)."""
    from edgemeta.sshcmd import control_dir

    subprocess.run(["ssh", "-F", str(cfg), "-p", str(port), "-o", f"ControlPath={control_dir()}/%C", "-O", "exit", "--", host],
                   capture_output=True, timeout=30)


@pytest.fixture
def users_known_hosts():
    """~/.ssh/known_hosts (of the user ssh runs as: ssh reads the passwd entry, not $HOME) is never written."""
    import pwd

    path = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh" / "known_hosts"
    before = path.read_bytes() if path.exists() else None
    yield
    assert (path.read_bytes() if path.exists() else None) == before


def test_first_contact_with_a_board_on_its_own_port_and_key(lab, bundle, tmp_path, users_known_hosts):
    board = lab.add_board()
    cfg, known = lab.stranger(board, "first-contact")
    host = f"{USER}@127.0.0.1"
    assert board.port != 22 and ".ssh" not in str(lab.client_key) and known.read_text() == ""
    ssh = ["--ssh-config", cfg, "--port", board.port, "--identity", lab.client_key]

    # unknown host key: refused everywhere, with the way on; nothing recorded
    scan = f"ssh-keyscan -t ed25519 -p {board.port} 127.0.0.1 > board.key"
    for p in (edgemeta("status", "--host", host, *ssh), edgemeta("deploy", "--bundle", bundle, "--host", host, *ssh, "--dry-run")):
        row = failed_row(p)
        assert f"{known} has no host key for 127.0.0.1 (port {board.port}) yet" in row and scan in row, row
        assert "--accept-new-host-key" in row and "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub" in row, row
    for p in (edgemeta("remote", "--via", f"ssh:{host}", *ssh, "status"), edgemeta("doctor", "--host", host, *ssh)):
        line = one_line_error(p)
        assert "has no host key for 127.0.0.1" in line and scan in line and "--accept-new-host-key" in line, line
    assert known.read_text() == ""

    # the first contact, opted in: the key is recorded, the deploy goes through, later calls need no flag
    p = edgemeta("deploy", "--bundle", bundle, "--host", host, *ssh, "--trust-key", "--accept-new-host-key")
    assert p.returncode == 0 and " ok " in p.stdout, p.stdout + p.stderr
    assert known.read_text().split() == [f"[127.0.0.1]:{board.port}", *board.host_pub.split()]
    p = edgemeta("status", "--host", host, *ssh)
    assert p.returncode == 0 and f"{host}: active " in p.stdout, p.stdout + p.stderr
    p = edgemeta("remote", "--via", f"ssh:{host}", *ssh, "status")
    assert p.returncode == 0 and "omniglot-conv4/int8_static" in p.stdout, p.stderr
    p = edgemeta("rollback", "--host", host, *ssh)  # nothing to go back to: the board's own answer, over ssh
    assert "ssh to" not in p.stdout + p.stderr, p.stdout + p.stderr

    # a changed host key is refused, with or without the flag, and known_hosts keeps the old one
    recorded = known.read_text()
    lab.new_host_key(board)
    close_shared_connection(cfg, board.port, host)
    for p in (edgemeta("status", "--host", host, *ssh, "--accept-new-host-key"),
              edgemeta("deploy", "--bundle", bundle, "--host", host, *ssh, "--accept-new-host-key", "--dry-run")):
        row = failed_row(p)
        assert "is not the one known_hosts has for it" in row and "--accept-new-host-key never replaces" in row, row
        assert f'-R "[127.0.0.1]:{board.port}"' in row, row
    line = one_line_error(edgemeta("remote", "--via", f"ssh:{host}", *ssh, "--accept-new-host-key", "status"))
    assert "is not the one known_hosts has for it" in line, line
    assert known.read_text() == recorded


def test_the_careful_first_contact_of_the_readme(lab, tmp_path, users_known_hosts):
    """ssh-keyscan, its fingerprint compared with the board's own (what its console shows), then added:
    no --accept-new-host-key needed."""
    board = lab.add_board()
    cfg, known = lab.stranger(board, "careful")
    scanned = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-p", str(board.port), "127.0.0.1"], capture_output=True,
                             text=True, timeout=30).stdout
    def fingerprint(text: str) -> str:
        p = subprocess.run(["ssh-keygen", "-lf", "-"], input=text, capture_output=True, text=True, check=True)
        return p.stdout.split()[1]

    on_console = fingerprint((board.dir / "host_key.pub").read_text())  # ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub
    assert fingerprint(scanned) == on_console
    known.write_text(scanned)
    p = edgemeta("status", "--host", f"{USER}@127.0.0.1", "--ssh-config", cfg, "--port", board.port, "--identity", lab.client_key)
    assert p.returncode == 0 and "no release active" in p.stdout, p.stdout + p.stderr


def test_an_unreachable_board_with_accept_new_is_one_line_and_records_nothing(lab, tmp_path, users_known_hosts):
    from tests.support.sshd import free_port

    board = lab.add_board()
    cfg, known = lab.stranger(board, "unreachable")
    ssh = ["--ssh-config", cfg, "--port", free_port(), "--identity", lab.client_key, "--accept-new-host-key"]
    host = f"{USER}@127.0.0.1"
    row = failed_row(edgemeta("status", "--host", host, *ssh))
    assert f"ssh to {host} failed: ssh: connect to host 127.0.0.1 port {ssh[3]}: Connection refused (is the board on" in row, row
    assert row.endswith("; no host key was recorded"), row
    line = one_line_error(edgemeta("remote", "--via", f"ssh:{host}", *ssh, "status"))
    assert "Connection refused (is the board on" in line and line.endswith("; no host key was recorded"), line
    assert known.read_text() == ""


SSH_COMMANDS = [["deploy", "--bundle", "."], ["rollback"], ["status"], ["doctor"]]


def bad_identities(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    loose = tmp_path / "loose"
    shutil.copy(key, loose)
    loose.chmod(0o644)
    return {"missing": (tmp_path / "nope", "no such file"), "loose": (loose, "chmod 600"),
            "public": (Path(f"{key}.pub"), "is a public key"), "folder": (tmp_path, "is a directory")}


def test_bad_ssh_options_are_one_line_and_exit_2_on_every_command(tmp_path):
    runner = CliRunner()
    cases = [(["--port", v], "Invalid value for '--port'") for v in ("0", "65536", "-1", "99999999999", "x")]
    cases += [(["--identity", str(path)], why) for path, why in bad_identities(tmp_path).values()]
    cases += [(["--ssh-config", str(tmp_path / "no-config")], "cannot read it")]
    for args, why in cases:
        for cmd in SSH_COMMANDS:
            r = runner.invoke(main, [*cmd, "--host", "nobody@192.0.2.1", *args])
            lines = [x for x in r.output.splitlines() if x.strip()]
            assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0], (cmd, args, r.output)
        r = runner.invoke(main, ["remote", "--via", "ssh:nobody@192.0.2.1", *args, "status"])
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and why in lines[0], (args, r.output)
    for args in (["--port", "2222"], ["--accept-new-host-key"]):  # ssh options where nothing goes over ssh
        for cmd in (["doctor"], ["remote", "--via", "unix:/nowhere", "status"]):
            r = runner.invoke(main, [*cmd[:3], *args, *cmd[3:]])
            assert r.exit_code == 2 and "for reaching a board over ssh" in r.output, (cmd, args, r.output)


@pytest.mark.skipif(os.geteuid() != 0 and shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_an_identity_file_you_cannot_read_is_one_line(tmp_path):
    key = tmp_path / "theirs"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    if os.geteuid() == 0:  # root without the capabilities that pass over file modes
        os.chown(key, 54321, 54321)
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    else:
        key.chmod(0)
        prefix = []
    for cmd in (["status", "--host", "nobody@192.0.2.1"], ["remote", "--via", "ssh:nobody@192.0.2.1"]):
        p = subprocess.run([*prefix, sys.executable, "-m", "edgemeta", *cmd, "--identity", str(key),
                            *(["status"] if cmd[0] == "remote" else [])], capture_output=True, text=True, timeout=120)
        line = one_line_error(p)
        assert "--identity" in line and ("not readable" in line or "Permission denied" in line), line


def test_one_ssh_command_line_for_deploy_and_remote(monkeypatch, tmp_path):
    from edgemeta.deploy import ssh
    from edgemeta.remote import AgentOverSsh

    seen = []

    class FakeSsh:
        returncode = 0
        stdin = stdout = None

        def __init__(self, argv, **kw):
            seen.append(argv)
            self.stdout, self.stdin = iter([b"{}\n"]), open(os.devnull, "wb")

        def communicate(self, input=None, timeout=None):
            return b"{}", b""

        def wait(self, timeout=None):
            return 0

        def kill(self):
            pass

    key, cfg = tmp_path / "50%key", tmp_path / "cfg"
    cfg.write_text("")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    monkeypatch.setattr(ssh.subprocess, "Popen", FakeSsh)
    opts = ssh.SshOptions(str(cfg), 2222, str(key), True).checked()
    ssh.Remote("pi@kitchen", opts).ops("status")
    ssh.Remote("pi@kitchen", opts).transact(["rollback"])
    AgentOverSsh("pi@kitchen", opts, timeout=10)
    run, transact, agent = seen
    assert run[:-1] == transact[:-1] == ssh.ssh_argv("pi@kitchen", "x", opts)[:-1]
    want = ["-F", str(cfg), "-p", "2222", "-i", str(key).replace("%", "%%"), "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=accept-new"]
    for argv in seen:
        assert argv[0] == "ssh" and "BatchMode=yes" in argv and argv[argv.index("--") + 1] == "pi@kitchen"
        i = argv.index("-F")
        assert argv[i:i + len(want)] == want, argv
        assert argv.index("--") > argv.index("StrictHostKeyChecking=accept-new")
    assert "ControlMaster=auto" in agent and "ControlMaster=auto" not in run
    def unshared(argv):  # without the command and the ("-o", "Control...") pairs
        out = []
        for i, a in enumerate(argv[:-1]):
            if not (a.startswith("Control") or (a == "-o" and argv[i + 1].startswith("Control"))):
                out.append(a)
        return out

    assert unshared(agent) == unshared(run)
    plain = ssh.ssh_argv("pi@kitchen", "x", None)  # without the options: nothing of them, and host keys as ssh checks them
    assert not {"-p", "-i", "-F"} & set(plain) and not any("StrictHostKeyChecking" in a for a in plain)


def test_every_numeric_option_of_every_command_and_group_has_both_bounds():
    """As tests/test_cli_hardening.py, with the groups' own options (remote --port, --timeout) too."""
    def params(group: click.Group, path=()):
        for p in group.params:
            yield path, p
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from params(cmd, (*path, name))
            else:
                yield from (((*path, name), p) for p in cmd.params)

    numeric = [(path, p) for path, p in params(main) if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))]
    ports = {path: (p.type.min, p.type.max) for path, p in numeric if p.name == "port"}
    for path in ("deploy",), ("rollback",), ("status",), ("doctor",), ("remote",):  # every command that reaches a board over ssh
        assert ports.get(path) == (1, 65535), (path, ports)
    loose = [(path, p.opts) for path, p in numeric
             if not isinstance(p.type, click.types._NumberRangeBase) or p.type.min is None or p.type.max is None]
    assert not loose, loose


def test_the_fleet_extra_is_what_deploying_needs():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["fleet"] == ["cryptography>=42"]
    for name in ("host", "gpu"):
        assert set(extras["fleet"]) <= set(extras[name]), name
    assert not any("tensorflow" in r for r in extras["fleet"] + extras["device"])


def test_signing_without_cryptography_names_the_fleet_extra(monkeypatch, tmp_path):
    from edgemeta.deploy import signing
    from edgemeta.errors import EdgemetaError

    monkeypatch.setitem(sys.modules, "cryptography", None)
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives", None)
    with pytest.raises(EdgemetaError, match=r"pip install 'edgemeta\[fleet\]'"):
        signing.create_key(tmp_path / "key.pem")


def test_the_first_contact_line_says_to_make_a_missing_ssh_folder(tmp_path):
    from edgemeta.deploy.ssh import SshOptions, ssh_failure

    known = tmp_path / "clean-home" / ".ssh" / "known_hosts"
    cfg = tmp_path / "cfg"
    cfg.write_text(f"Host *\n  UserKnownHostsFile {known}\n")
    line = str(ssh_failure("pi@kitchen", "Host key verification failed.\n", SshOptions(str(cfg), 2222)))
    assert f"{known} has no host key for kitchen (port 2222) yet" in line, line
    assert f"then `mkdir -p -m 700 {known.parent}` and `cat board.key >> {known}`" in line, line
    known.parent.mkdir(parents=True)
    assert "mkdir" not in str(ssh_failure("pi@kitchen", "Host key verification failed.\n", SshOptions(str(cfg), 2222)))
