"""Running commands on boards through the system's OpenSSH client: the ssh runner.

~/.ssh/config, keys and known_hosts are honoured as ssh does (BatchMode: no password prompts; a
host whose key is unknown or changed is refused by ssh itself, and ssh_failure says how to go on).
Every ssh edgemeta starts (Remote here, remote.AgentOverSsh) has its command line from ssh_argv,
the one place that turns SshOptions (`--ssh-config`, `--port`, `--identity`,
`--accept-new-host-key`) into ssh options. Host names are checked (check_host) and always follow
`--` on ssh's command line, so none is taken for an option. SIGTERM or Ctrl-C (stop_on_signals)
stops every ssh this process started.

Remote runs the board operations (a zip application that deploy/board_ops.py builds) with the board's
python3 (uploaded first, checked by its sha256 before it replaces the old copy); deploy/board/ says the
layout on the board, fleet_ops the order of a deploy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from edgemeta.deploy.board_ops import zipapp_bytes
from edgemeta.errors import EdgemetaError
from edgemeta.sshcmd import SshOptions, as_ssh_options, check_host, ssh_argv

OPS_REMOTE = "$HOME/.edgemeta-ops.pyz"  # the board_ops zip application; outside ROOT so several roots on one account share it
OPS_LEGACY = "$HOME/.edgemeta-ops.py"  # what edgemeta before the zip application uploaded: removed, so nobody runs it by hand
def _resolved(host: str, ssh: SshOptions | str | None) -> dict[str, str]:
    """What ssh would use for `host` (ssh -G: hostname, port, userknownhostsfile ...), read locally; {} if ssh cannot say."""
    try:
        p = subprocess.run(ssh_argv(host, None, ssh, flags=("-G",)), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in p.stdout.splitlines() if p.returncode == 0 else ():
        key, _, value = line.partition(" ")
        out.setdefault(key, value)
    return out


def _home(path: str) -> str:
    """`path` with ~ as ssh expands it: the home of the user's passwd entry (ssh does not read $HOME)."""
    import pwd

    if path == "~" or path.startswith("~/"):
        try:
            return pwd.getpwuid(os.getuid()).pw_dir + path[1:]
        except KeyError:
            pass
    return os.path.expanduser(path)


def ssh_failure(host: str, stderr: str, ssh: SshOptions | str | None = None) -> EdgemetaError:
    """The one-line error for an ssh that failed itself (exit 255), from its stderr: a host key known_hosts
    does not have yet or one that changed, each with how to go on; a board that cannot be reached;
    else ssh's last line."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith("Warning: Permanently added")]
    text = "\n".join(lines)
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or re.search(r"Host key for .* has changed", text):
        sent = re.search(r"key sent by the remote host is\s+(\S+?)\.?\s*$", text, re.M)
        offending = re.search(r"Offending \S+ key in (\S+)", text)
        remove = re.search(r"^(ssh-keygen -f .* -R .*)$", text, re.M)
        return EdgemetaError(
            f"ssh to {host} refused: the host key it sent{f' ({sent.group(1)})' if sent else ''} is not the one known_hosts has "
            f"for it{f' ({offending.group(1)})' if offending else ''}: either the board was reinstalled or someone is in between. "
            "Compare it with the key the board shows on its own console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub); "
            f"only if they match, remove the old key ({remove.group(1) if remove else 'ssh-keygen -R HOST'}) "
            "and connect as at a first contact. "
            "--accept-new-host-key never replaces a known key")
    if "Host key verification failed" in text or "host key is known for" in text:
        where = _resolved(host, ssh)
        name, port = where.get("hostname") or host.rpartition("@")[2], where.get("port") or "22"
        known = (where.get("userknownhostsfile") or "~/.ssh/known_hosts").split()[0]
        folder = os.path.dirname(_home(known))
        mkdir = "" if os.path.isdir(folder) else f"`mkdir -p -m 700 {shlex.quote(folder)}` and "
        return EdgemetaError(
            f"ssh to {host} refused: {known} has no host key for {name} (port {port}) yet: a board never reached from here. "
            f"Check it: `ssh-keyscan -t ed25519 -p {port} {name} > board.key`, `ssh-keygen -lf board.key` must show the "
            "fingerprint the board shows on its own console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), then "
            f"{mkdir}`cat board.key >> {known}`; or, on a network you trust, run again with --accept-new-host-key to record it "
            "at this first connection")
    last = lines[-1] if lines else "unknown error"
    if re.match(r"ssh: (connect to host|Could not resolve hostname)", last):
        return EdgemetaError(f"ssh to {host} failed: {last} (is the board on, on this network, with its ssh server on that port? "
                             "--port sets the port)" + ("; no host key was recorded" if as_ssh_options(ssh).accept_new_host_key else ""))
    return EdgemetaError(f"ssh to {host} failed: {last}")


# Every ssh this process starts, so that SIGTERM can stop them all (stop_on_signals); none starts after.
_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()
_stopping: list[int] = []  # the signal, once one came


class Stopped(BaseException):
    """SIGTERM or SIGINT during a deploy (raised in the main thread; a BaseException so that no
    `except Exception` takes it for a deploy error)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """From now on SIGTERM and SIGINT stop every ssh this process runs (the worker threads then end
    at once) and raise Stopped in the main thread; a second signal is ignored."""
    def handler(signum: int, frame) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        with _children_lock:
            _stopping.append(signum)
            for proc in _children:
                proc.terminate()
        raise Stopped(signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)


def _spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    with _children_lock:
        if _stopping:
            raise EdgemetaError(f"stopped by {signal.Signals(_stopping[0]).name}")
        proc = subprocess.Popen(argv, **kwargs)
        _children.add(proc)
    return proc


def _forget(proc: subprocess.Popen) -> None:
    with _children_lock:
        _children.discard(proc)


# Writes the board_ops zip application on the board only once all of it arrived (its sha256), in one
# rename, then removes an older edgemeta's board_ops.py (argv[3]).
PUT_OPS = ("import hashlib, os, sys\n"
           "path, data = sys.argv[1], sys.stdin.buffer.read()\n"
           "if hashlib.sha256(data).hexdigest() != sys.argv[2]:\n"
           "    sys.exit(f'board_ops.pyz arrived damaged or cut short ({len(data)} bytes): deploy again')\n"
           "tmp = f'{path}.{os.getpid()}.tmp'\n"
           "with open(tmp, 'wb') as f:\n"
           "    f.write(data)\n"
           "os.replace(tmp, path)\n"
           "if os.path.isfile(sys.argv[3]):\n"
           "    os.remove(sys.argv[3])\n")


class Remote:
    """One board reached with `ssh [-F config] HOST`."""

    def __init__(self, host: str, ssh: SshOptions | str | None = None, connect_timeout: int = 10):
        self.host = check_host(host)
        self.ssh = as_ssh_options(ssh)
        self.connect_timeout = connect_timeout

    def argv(self, command: str) -> list[str]:
        return ssh_argv(self.host, command, self.ssh, self.connect_timeout)

    def run(self, command: str, input: bytes | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        """Run a shell command line on the board (the caller quotes every argument)."""
        argv = self.argv(command)
        proc = _spawn(argv, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise EdgemetaError(f"{self.host}: no answer within {timeout:.0f} s") from None
        finally:
            _forget(proc)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def ops(self, *args: str, timeout: float = 900) -> dict:
        """Run a board_ops.py command; its last output line is JSON. Errors become EdgemetaError."""
        p = self.run(f"python3 {OPS_REMOTE} " + shlex.join(args), timeout=timeout)
        return self._answer(p, args[0])

    def _answer(self, p: subprocess.CompletedProcess, what: str) -> dict:
        out = p.stdout.decode(errors="replace").strip().splitlines()
        try:
            answer = json.loads(out[-1]) if out else {}
        except ValueError:
            answer = {}
        if p.returncode == 255:  # ssh's own failure: connection, authentication, host key
            raise ssh_failure(self.host, p.stderr.decode(errors="replace"), self.ssh)
        if p.returncode != 0 or "error" in answer:
            msg = answer.get("error") or (p.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
            raise EdgemetaError(f"{what} on {self.host}: {msg}")
        return answer

    def install_ops(self) -> None:
        data = zipapp_bytes()
        p = self.run(f"python3 -c {shlex.quote(PUT_OPS)} \"{OPS_REMOTE}\" {hashlib.sha256(data).hexdigest()} \"{OPS_LEGACY}\"",
                     input=data)
        if p.returncode:
            self._answer(p, "upload board_ops.pyz")

    def transact(self, args: list[str], bundle: Path | None = None, on_event: Callable[[dict], None] = lambda e: None,
                 timeout: float = 3600) -> dict:
        """Run a board_ops.py command that reports progress ({"event": ...} lines, passed to `on_event`
        as they come), streaming `bundle` to it as a tar archive when given."""
        argv = self.argv(f"python3 {OPS_REMOTE} " + shlex.join(args))
        with tempfile.TemporaryFile() as err:  # (a file: the board's stderr can never block its stdout)
            proc = _spawn(argv, stdin=subprocess.PIPE if bundle else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
            watchdog = threading.Timer(timeout, proc.kill)
            watchdog.start()
            try:
                if bundle:
                    try:
                        with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                            for path in sorted(bundle.rglob("*")):
                                tar.add(path, arcname=path.relative_to(bundle).as_posix(), recursive=False)
                    except BrokenPipeError:
                        pass  # the board side stopped reading; its answer below says why
                    finally:
                        try:
                            proc.stdin.close()
                        except BrokenPipeError:
                            pass
                lines = []
                for raw in proc.stdout:
                    lines.append(raw)
                    try:
                        event = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(event, dict) and "event" in event:
                        on_event(event)
                proc.wait()
            finally:
                watchdog.cancel()
                _forget(proc)
            err.seek(0)
            answer = [ln for ln in lines if b'"event"' not in ln]
            return self._answer(subprocess.CompletedProcess(argv, proc.returncode, b"".join(answer), err.read()), args[0])
