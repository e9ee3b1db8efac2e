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
import stat
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgemeta.deploy.board_ops import zipapp_bytes
from edgemeta.errors import EdgemetaError

OPS_REMOTE = "$HOME/.edgemeta-ops.pyz"  # the board_ops zip application; outside ROOT so several roots on one account share it
OPS_LEGACY = "$HOME/.edgemeta-ops.py"  # what edgemeta before the zip application uploaded: removed, so nobody runs it by hand
# [user@]host, an ~/.ssh/config alias or [user@][IPv6]: never anything ssh could read as an option or a shell could split
HOST = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._+-]*@)?(?:[A-Za-z0-9_:][A-Za-z0-9._:%-]*|\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9]+)?\])")


def check_host(host: str) -> str:
    """`host` if it is a plain ssh destination, else a one-line error (a host such as -oProxyCommand=...
    would be an ssh option)."""
    if not isinstance(host, str) or len(host) > 255 or not HOST.fullmatch(host):
        raise EdgemetaError(f"host {str(host)[:80]!r} is not an ssh destination edgemeta takes: write user@host, host, "
                            "an ~/.ssh/config alias or user@[IPv6] (letters, digits, '.', '_', '-'; never starting with '-')")
    return host


PORT_RANGE = (1, 65535)


@dataclass(frozen=True)
class SshOptions:
    """How ssh reaches the boards of one command: `config` (ssh -F; default ~/.ssh/config and
    /etc/ssh/ssh_config, as ssh reads them), `port` and `identity` (a private key file) for every
    host, and `accept_new_host_key`: record the host key of a host known_hosts does not know yet
    (OpenSSH's StrictHostKeyChecking=accept-new; a changed key is still refused). They go on ssh's
    command line (ssh_argv), where they win over what the config says for the host."""

    config: str | None = None
    port: int | None = None
    identity: str | None = None
    accept_new_host_key: bool = False

    def checked(self) -> SshOptions:
        """These options, once each is one ssh can use (the identity as an absolute path), else a
        one-line error naming the option and the fix; nothing is reached over the network."""
        port = self.port
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not PORT_RANGE[0] <= port <= PORT_RANGE[1]):
            raise EdgemetaError(f"--port {str(port)[:20]!r}: a port is a whole number from {PORT_RANGE[0]} to {PORT_RANGE[1]} "
                                "(ssh's is 22)")
        if self.config and self.config != "none":  # (ssh -F none: no config at all)
            try:
                with open(self.config, "rb"):
                    pass
            except OSError as e:
                raise EdgemetaError(f"--ssh-config {self.config}: cannot read it ({e.strerror}): give an ssh config file "
                                    "(the format of ~/.ssh/config)") from None
        identity = check_identity(self.identity) if self.identity else None
        return SshOptions(self.config, port, identity, bool(self.accept_new_host_key))


def as_ssh_options(ssh: SshOptions | str | None) -> SshOptions:
    """SshOptions from SshOptions, or from an ssh config path alone (or None: ssh's defaults)."""
    return ssh if isinstance(ssh, SshOptions) else SshOptions(config=ssh or None)


def check_identity(path: str) -> str:
    """`path` as an absolute path, where it is a private key file ssh will use: it exists, is a file you
    can read, is not readable by others (ssh ignores such a key) and is not a public key; else a
    one-line error with the fix."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    if "${" in full:  # ssh expands ${VAR} in identity paths and has no escape for it
        raise EdgemetaError(f"--identity {path}: ssh reads '${{...}}' in a key's path as an environment variable: "
                            "rename the file or link it from a plain path")
    try:
        fd = os.open(full, os.O_RDONLY)
    except FileNotFoundError:
        raise EdgemetaError(f"--identity {path}: no such file: give the private key the board knows "
                            "(e.g. ~/.ssh/kitchen_ed25519, made with ssh-keygen -t ed25519 -f ~/.ssh/kitchen_ed25519)") from None
    except OSError as e:
        raise EdgemetaError(f"--identity {path}: cannot read it ({e.strerror}): it must be a file you can read") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EdgemetaError(f"--identity {path} is not a file: give the private key file itself")
        try:
            head = os.read(fd, 64)
        except OSError as e:
            raise EdgemetaError(f"--identity {path}: cannot read it ({e.strerror}): it must be a file you can read") from None
    finally:
        os.close(fd)
    if head.lstrip().startswith((b"ssh-", b"ecdsa-", b"sk-")):
        raise EdgemetaError(f"--identity {path} is a public key: give the private key (the same name without .pub)")
    if st.st_uid == os.getuid() and st.st_mode & 0o077:  # as OpenSSH checks it (sshkey_perm_ok)
        raise EdgemetaError(f"--identity {path} can be read by others (mode {stat.S_IMODE(st.st_mode):04o}), so ssh will not "
                            f"use it: chmod 600 {shlex.quote(full)}")
    return full


CONTROL_PERSIST = 120  # seconds an idle shared ssh connection stays up for the next `remote` call


def control_dir() -> Path:
    """This user's private folder for OpenSSH's shared-connection sockets (ControlPath): mode 700 and
    owned by the user, or an error (a socket there would let others use the connection)."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"edgemeta-ssh-{os.getuid()}"
    try:
        base.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = base.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise EdgemetaError(f"{base} is not a private folder of yours (yours alone, mode 700): remove it and try again")
    return base


def ssh_argv(host: str, command: str | None, ssh: SshOptions | str | None = None, connect_timeout: float = 10,
             shared: bool = False, flags: tuple[str, ...] = ()) -> list[str]:
    """The ssh command line for `host` (checked; always after `--`) running `command` (one string the
    board's shell reads; None: none, as with `flags=("-G",)`): the one place edgemeta builds one.

    BatchMode (never a prompt), ConnectTimeout, and ServerAlive probes (a board that vanishes
    ends ssh within a minute instead of a TCP timeout); the options of `ssh` (-F, -p, -i with
    IdentitiesOnly, StrictHostKeyChecking=accept-new) as ssh options, which come before every
    config file and so win over it; with `shared`, one connection shared by later calls
    (ControlMaster, in control_dir(), kept CONTROL_PERSIST seconds)."""
    opts = as_ssh_options(ssh)
    argv = ["ssh", *flags, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if opts.config:
        argv += ["-F", opts.config]
    if opts.port is not None:
        argv += ["-p", str(int(opts.port))]
    if opts.identity:  # -i takes the path as it is (no quoting, no splitting); ssh expands '%' in it, so '%%'
        argv += ["-i", opts.identity.replace("%", "%%"), "-o", "IdentitiesOnly=yes"]
    if opts.accept_new_host_key:
        argv += ["-o", "StrictHostKeyChecking=accept-new"]
    if shared:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir()}/%C", "-o", f"ControlPersist={CONTROL_PERSIST}"]
    return [*argv, "--", check_host(host), *([] if command is None else [command])]


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
