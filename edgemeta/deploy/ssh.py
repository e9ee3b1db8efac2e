"""Deploying bundles to boards through the system's OpenSSH client.

~/.ssh/config, keys and known_hosts are honoured as ssh does (BatchMode: no password prompts; a
host whose key is unknown or changed is refused by ssh itself, and ssh_failure says how to go on).
Every ssh this module starts has its command line from ssh_argv, the one place that turns SshOptions
(`--ssh-config`, `--port`, `--identity`, `--accept-new-host-key`) into ssh options. Every board-side step runs
board_ops.py with the board's python3; see that file for the layout on the board. Host names are
checked (check_host) and always follow `--` on ssh's command line, so none is taken for an option.

Order for one host: upload board_ops.py (checked by its sha256 before it replaces the old copy) ->
preflight (architecture, Python, whether the release is active, on the board, or absent, whether
the venv of its runtime is there, and the signing keys the board trusts: an upload signed by a key
it does not trust stops here, before anything is sent) -> where the board must make a venv,
edgemeta/doctor.py's checks (the ones `edgemeta doctor` runs: venv, package index or wheelhouse,
system packages, space, write access, Python and glibc against the profile), any failure stopping
the deploy with its fix -> with `trust_key` (`--trust-key`), where the board does not trust the
bundle's key yet, `board_ops.py trust KEY` (once the bundle's signature checked out here; a board
that trusts other keys takes one more only with `add_key`, `--add-key`): a board never trusts a key
on its own, the ssh login the user has is what authenticates the key -> then one ssh call that
the board runs to the end on its own, whatever happens to this process: `board_ops.py deploy`,
which takes the bundle as a tar stream, checks its signature (by a trusted key) and that the files
are exactly the signed list, installs the runtime in the release's venv (never TensorFlow),
health-checks the new release (load the model, embed a sample), and only then switches `current`
atomically and prunes old releases. A release already active is left alone; one on the board
already is activated without upload or install.

A release id names the content (bundle.release_name), so `--dry-run` names the release the real
run deploys. SIGTERM or Ctrl-C (stop_on_signals) stops every ssh this process started: an upload
cut short is refused by the board, a board that has the whole bundle finishes the deploy itself.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from edgemeta.deploy.board_ops import BUNDLE_FILE, RELEASE_ID, SIGNATURE_FILE, SIGNED_PREFIX, ed25519_verify, fingerprint
from edgemeta.errors import EdgemetaError
from edgemeta.runtime.paths import ROOT_SH

OPS = Path(__file__).with_name("board_ops.py")
OPS_REMOTE = "$HOME/.edgemeta-ops.py"  # outside ROOT so several roots on one account share it
NO_HOSTS = "no hosts given: pass --host user@board (repeatable) or --hosts FILE"
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


@dataclass
class HostResult:
    host: str
    ok: bool
    release: str = ""
    steps: list[str] = field(default_factory=list)
    error: str = ""
    note: str = ""  # "already active", "activated from the board's copy", "rolled back from ..."
    trusted_key: str = ""  # the fingerprint of the signing key this deploy made the board trust (--trust-key)

    def stepper(self, log) -> Callable[[str], None]:
        """A function that records a step of this host's operation and logs it as `log(host, msg)`."""
        def step(msg: str) -> None:
            self.steps.append(msg)
            log(self.host, msg)

        return step


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


# Writes board_ops.py on the board only once all of it arrived (its sha256), in one rename.
PUT_OPS = ("import hashlib, os, sys\n"
           "path, data = sys.argv[1], sys.stdin.buffer.read()\n"
           "if hashlib.sha256(data).hexdigest() != sys.argv[2]:\n"
           "    sys.exit(f'board_ops.py arrived damaged or cut short ({len(data)} bytes): deploy again')\n"
           "tmp = f'{path}.{os.getpid()}.tmp'\n"
           "with open(tmp, 'wb') as f:\n"
           "    f.write(data)\n"
           "os.replace(tmp, path)\n")


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
        data = OPS.read_bytes()
        p = self.run(f"python3 -c {shlex.quote(PUT_OPS)} \"{OPS_REMOTE}\" {hashlib.sha256(data).hexdigest()}", input=data)
        if p.returncode:
            self._answer(p, "upload board_ops.py")

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


def bundle_info(bundle: Path) -> dict:
    """A bundle's BUNDLE.json, or a one-line error when `bundle` is not a bundle folder."""
    try:
        info = json.loads((Path(bundle) / BUNDLE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise EdgemetaError(f"{bundle} is not a bundle (its {BUNDLE_FILE}: {getattr(e, 'strerror', None) or e}); "
                            "build one with `edgemeta bundle`") from None
    if not isinstance(info, dict) or not isinstance(info.get("files"), dict) or not all(
            isinstance(info.get(k), str) for k in ("model", "variant", "arch", "board")):
        raise EdgemetaError(f"{bundle}/{BUNDLE_FILE} is not an edgemeta bundle manifest; rebuild it with `edgemeta bundle`")
    return info


def bundle_signer(bundle: Path) -> bytes | None:
    """The public key BUNDLE.sig names (not checked), or None where it names none: the board then
    refuses the bundle in its own words (unsigned, unreadable signature)."""
    try:
        sig = json.loads((Path(bundle) / SIGNATURE_FILE).read_text())
        key = bytes.fromhex(sig["public_key"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return key if len(key) == 32 else None


def checked_signer(bundle: Path) -> bytes:
    """The bundle's signing key, once its signature of BUNDLE.json checks out here, as the board will check
    it (so --trust-key never makes a board trust a key for a bundle that is not that key's)."""
    try:
        sig = json.loads((Path(bundle) / SIGNATURE_FILE).read_text())
        key, signature = bytes.fromhex(sig["public_key"]), bytes.fromhex(sig["signature"])
        manifest = (Path(bundle) / BUNDLE_FILE).read_bytes()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise EdgemetaError(f"--trust-key: {bundle} has no readable signature ({SIGNATURE_FILE}: {getattr(e, 'strerror', None) or e}); "
                            "build the bundle with `edgemeta bundle`, which signs it") from None
    if sig.get("algorithm") != "ed25519" or not ed25519_verify(key, SIGNED_PREFIX + manifest, signature):
        raise EdgemetaError(f"--trust-key: the signature in {bundle}/{SIGNATURE_FILE} does not check out (key {fingerprint(key)}); "
                            "rebuild the bundle with `edgemeta bundle`: no key was trusted")
    return key


def release_id(bundle: Path) -> str:
    """The name of the bundle's release folder on a board: the id BUNDLE.json gives
    (bundle.release_name: model-variant-<digest of the content>; a bundle made before ids named the
    content: model-variant-<BUNDLE.json digest>), checked against board_ops.RELEASE_ID (which the
    board checks too)."""
    info = bundle_info(bundle)
    rid = info.get("release")
    if not isinstance(rid, str):
        rid = f"{info['model']}-{info['variant']}-{hashlib.sha256((bundle / BUNDLE_FILE).read_bytes()).hexdigest()[:10]}"
    if not RELEASE_ID.fullmatch(rid):
        raise EdgemetaError(f"release id {rid[:80]!r} (from the model name {info['model'][:60]!r} and variant {info['variant'][:20]!r} "
                            "in BUNDLE.json) is not a valid release id: letters, digits, '.', '_' and '-' only, at most 128, "
                            "starting with a letter or digit; rename the model")
    return rid


def board_event(step: Callable[[str], None]) -> Callable[[dict], None]:
    """How a board's progress lines ({"event": ...}) are told, one step each."""
    def event(e: dict) -> None:
        if e["event"] == "received":
            step(f"uploaded; signature (key {e['key']}, trusted) and checksums of {e['files']} files verified on the board"
                 + (f"; {e['note']}: kept" if e.get("note") else ""))
        elif e["event"] == "installed":
            step(f"runtime installed in a new venv (venvs/{e.get('key')})" if e.get("venv") == "made" else
                 f"runtime venv venvs/{e.get('key')} reused: same runtime, no install")
        elif e["event"] == "healthy":
            step(f"health check of {e.get('healthy')} passed before the switch ({e.get('model')}/{e.get('variant')} on "
                 f"{e.get('runtime')}, {e.get('ms')} ms)")
        elif e["event"] == "store":
            how = e.get("carried", "")
            step(f"store for {e.get('release')}: {how}" + (f" ({e['classes']} class(es), {e['samples']} sample(s) for "
                                                           f"{e.get('model')})" if "samples" in e else ""))
        elif e["event"] == "agent":
            step("the agent's service restarted on the new release" if e.get("restarted") else f"warning: {e.get('error')}")
    return event


def not_ready(checks: list[dict]) -> str:
    """One line for the checks that failed ("" when none did): each with its fix."""
    failed = [c for c in checks if c["status"] == "fail"]
    return "; ".join(f"{c['check']}: {c['detail']}" + (f" (fix: {c['fix']})" if c["fix"] else "") for c in failed)


def key_refusal(host: str, fp: str, trusted: list[str], trust_key: bool, add_key: bool) -> str:
    """Why a board that trusts the keys `trusted` (fingerprints) does not get a bundle signed by key `fp`
    ("" when it does, or will once trusted: with `trust_key`, and `add_key` where it trusts others)."""
    if fp in trusted or (trust_key and (add_key or not trusted)):
        return ""
    if not trusted:
        return (f"{host} trusts no signing key yet: deploy with --trust-key to trust the bundle's key {fp} there (it "
                "goes over your ssh login, which is what makes it trusted); nothing was uploaded")
    return (f"the bundle is signed by key {fp}, which {host} does not trust (it trusts {', '.join(trusted)}): sign it with "
            f"that key, or trust {fp} beside it with --trust-key --add-key; nothing was uploaded")


def deploy_host(host: str, bundle: Path, ssh: SshOptions | str | None = None, dry_run: bool = False, keep: int = 3,
                log=lambda host, msg: None, service: bool = False, trust_key: bool = False,
                add_key: bool = False, fresh_store: bool = False) -> HostResult:
    """Deploy one bundle to one host (with `service`, then install the agent's systemd unit); never
    raises, the result says what happened. The board carries its store to the new release (its kept
    samples re-embedded when the model changes), or with `fresh_store` gives it an empty one. With
    `trust_key`, a board that trusts no key first trusts
    the bundle's (once its signature checked out here); with `add_key` too, a board that trusts
    other keys trusts it beside them. Without, a board that would refuse the bundle's key is
    refused before the upload."""
    from edgemeta.boards import load_board_file

    info = bundle_info(bundle)
    release = release_id(bundle)
    store_flag = ["--fresh-store"] if fresh_store else []
    result = HostResult(host, False, release)
    step = result.stepper(log)

    try:
        signer = checked_signer(bundle) if trust_key else bundle_signer(bundle)
        remote = Remote(host, ssh)
        remote.install_ops()
        key = info.get("runtime") if isinstance(info.get("runtime"), str) else ""
        pre = remote.ops("preflight", release, *([key] if key else []), timeout=60)
        if pre["arch"] != info["arch"]:
            raise EdgemetaError(f"{host} is {pre['arch']}, the bundle is for {info['board']} ({info['arch']}); "
                                "build the bundle for this board's profile")
        if tuple(int(x) for x in pre["python"].split(".")[:2]) < (3, 10):
            raise EdgemetaError(f"{host} has Python {pre['python']}; edgemeta needs 3.10 or newer on the board")
        step(f"preflight: {pre['arch']}, Python {pre['python']}, {pre['free_mb']} MB free, active: {pre['current'] or 'none'}")
        state = pre.get("release", "absent")
        trusted = pre.get("trusted_keys", [])
        to_trust = signer if signer and trust_key and fingerprint(signer) not in trusted else None
        if signer and (state == "absent" or trust_key):  # an upload, or an explicit trust: would the board take the key?
            refusal = key_refusal(host, fingerprint(signer), trusted, trust_key, add_key)
            if refusal:
                raise EdgemetaError(("dry run: would fail: " if dry_run else "") + refusal)
        if state == "absent" and not pre.get("venv"):  # the board will make a venv: can it?
            wheelhouse = any(n.startswith("wheelhouse/") for n in info["files"])
            profile = load_board_file(bundle / "board.toml", info["board"]).raw
            problems = not_ready(doctor_on_host(host, ssh, profile, wheelhouse=wheelhouse, board_python=True))
            if problems:
                raise EdgemetaError(("dry run: would fail: " if dry_run else "not ready: ") + problems)
            step("doctor: the board can make the release's venv" + (" (offline, from the wheelhouse)" if wheelhouse else ""))
        if to_trust and dry_run:
            step(f"dry run: would trust signing key {fingerprint(to_trust)} (the bundle's) on this board"
                 + (f", beside {', '.join(trusted)}" if trusted else ""))
        elif to_trust:
            answer = remote.ops("trust", to_trust.hex(), *(["--add"] if trusted else []), timeout=60)
            result.trusted_key = answer["trusted"]
            step(f"trusted signing key {answer['trusted']} (the bundle's, sent over ssh) on this board from now on"
                 + (f", beside {', '.join(trusted)}" if trusted else ""))
        if state == "active":
            step(f"{release} is already active: nothing to do")
            result.ok, result.note = True, "already active"
        elif dry_run:
            step(f"dry run: would activate {release}, which is on the board already (health check, switch; no upload, "
                 "no install)" if state == "installed" else
                 f"dry run: would upload {release} ({len(info['files'])} files), verify, "
                 + ("link the runtime venv the board has" if pre.get("venv") else "install") + ", health-check and activate it")
            result.ok = True
            return result
        else:
            if state == "installed":
                step(f"{release} is on the board already: activating it without upload or install")
                act = remote.transact(["activate", release, str(keep), *store_flag], on_event=board_event(step))
                result.note = "activated the board's copy"
            else:
                act = remote.transact(["deploy", release, str(keep), *store_flag], bundle, on_event=board_event(step))
            step(f"activated (previous: {act['previous'] or 'none'}); health check through current passed")
            if act.get("warning"):
                step(f"warning: {act['warning']}")
        result.ok = True
        if service and not dry_run:
            step(install_service(remote))
    except EdgemetaError as e:
        result.error = str(e)
        result.ok = False
    return result


def install_service(remote: Remote) -> str:
    """Install and start the agent's systemd unit on a board (board_ops.py service); where the board
    runs no systemd, a warning that says how to start the agent instead."""
    answer = remote.ops("service", timeout=120)
    if answer["service"] == "no systemd":
        return (f"warning: no systemd on {remote.host}: the agent is not installed as a service; start it yourself (at boot, "
                f"from your init system): {answer['command']} (the unit for systemd is {answer['unit']})")
    return f"agent service enabled and started ({answer['unit']}): {answer['runs']}"


def each_host(hosts: list[str], work: Callable[[str], HostResult], parallel: int = 4) -> list[HostResult]:
    """`work` on every host, `parallel` at once, in the hosts' order. Every name is checked first, so a
    bad one stops all before any board is reached."""
    if not hosts:
        raise EdgemetaError(NO_HOSTS)
    for h in hosts:
        check_host(h)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(work, hosts))


def check_trust_flags(trust_key: bool, add_key: bool) -> None:
    if add_key and not trust_key:
        raise EdgemetaError("--add-key trusts the bundle's key beside the keys a board trusts: give it with --trust-key")


def deploy_fleet(hosts: list[str], bundle: Path, ssh: SshOptions | str | None = None, dry_run: bool = False, parallel: int = 4,
                 log=lambda host, msg: None, service: bool = False, trust_key: bool = False,
                 add_key: bool = False, fresh_store: bool = False) -> list[HostResult]:
    """Deploy to many hosts with bounded concurrency; one bad host does not stop the others. A bad
    host name, ssh options ssh cannot use (SshOptions.checked), a bundle without a valid release id or
    (with `trust_key`) without a signature that checks out stops everything before any host is reached."""
    for h in hosts:
        check_host(h)
    ssh = as_ssh_options(ssh).checked()
    release_id(bundle)
    check_trust_flags(trust_key, add_key)
    if trust_key:
        checked_signer(bundle)
    return each_host(hosts, lambda h: deploy_host(h, bundle, ssh, dry_run, log=log, service=service, trust_key=trust_key,
                                                  add_key=add_key, fresh_store=fresh_store), parallel)


def deploy_release(hosts: list[str], bundle: str | Path | None = None, board: str | None = None, model: str | Path | None = None,
                   wheelhouse: bool = False, ssh: SshOptions | str | None = None, dry_run: bool = False, parallel: int = 4,
                   log=lambda host, msg: None, sign_key: str | Path | None = None, service: bool = False,
                   trust_key: bool = False, add_key: bool = False, fresh_store: bool = False) -> list[HostResult]:
    """`edgemeta deploy`: deploy a bundle already built, or one built here (in a temporary folder,
    signed with `sign_key`, default the user's) from `model` for the `board` profile, to every host
    (as deploy_fleet: `trust_key` to trust the bundle's key on a board that trusts none yet, with
    `add_key` on one that trusts others)."""
    import tempfile

    from edgemeta.deploy.bundle import build_bundle

    if not hosts:
        raise EdgemetaError(NO_HOSTS)
    for h in hosts:
        check_host(h)
    ssh = as_ssh_options(ssh).checked()
    check_trust_flags(trust_key, add_key)
    with tempfile.TemporaryDirectory() as tmp:
        if bundle:
            path = Path(bundle)
        elif board and model:
            path = build_bundle(board, model, Path(tmp) / "bundle", wheelhouse=wheelhouse, sign_key=sign_key,
                                log=lambda msg: log("bundle", msg))
        else:
            raise EdgemetaError("pass --bundle DIR, or --board NAME with --model DIR")
        return deploy_fleet(hosts, path, ssh, dry_run, parallel, log=log, service=service, trust_key=trust_key,
                            add_key=add_key, fresh_store=fresh_store)


def rollback_host(host: str, ssh: SshOptions | str | None = None, to: str = "", log=lambda host, msg: None,
                  fresh_store: bool = False) -> HostResult:
    """Roll one board back (or to release `to`, older or newer); never raises. The board checks the
    target before and after the switch and switches back when it fails."""
    result = HostResult(host, False)
    step = result.stepper(log)

    try:
        remote = Remote(host, ssh)
        remote.install_ops()
        r = remote.transact(["rollback", *([to] if to else []), *(["--fresh-store"] if fresh_store else [])],
                            on_event=board_event(step))
        result.ok, result.release = True, r["active"]
        result.note = r.get("note") or f"was {r['rolled_back_from'] or 'none'}"
        if not r.get("note"):
            step(f"active: {r['active']} (was {r['rolled_back_from'] or 'none'}); health check through current passed")
    except EdgemetaError as e:
        result.error = str(e)
    return result


def status_host(host: str, ssh: SshOptions | str | None = None) -> dict:
    """What one board runs (board_ops.py status: releases, history, health of current, store, space),
    with "host", "ok" and, when the board could not be asked, "error"; never raises."""
    try:
        remote = Remote(host, ssh)
        remote.install_ops()
        return {"host": host, "ok": True, **remote.ops("status", timeout=300)}
    except EdgemetaError as e:
        return {"host": host, "ok": False, "error": str(e)}


def doctor_on_host(host: str, ssh: SshOptions | str | None = None, profile: dict | None = None, wheelhouse: bool = False,
                   board_python: bool = False) -> list[dict]:
    """edgemeta/doctor.py's checks run on a board: the file goes over ssh to the active release's
    python (the board's python3 before the first deploy, or always with `board_python`: the one
    that makes venvs), with the board's root."""
    from edgemeta import doctor

    args = ["--json"] + (["--profile-json", json.dumps(profile)] if profile else []) + (["--wheelhouse"] if wheelhouse else [])
    pick = "" if board_python else '[ -x "$R/current/venv/bin/python" ] && P="$R/current/venv/bin/python"; '
    p = Remote(host, ssh).run(f'{ROOT_SH}; P=python3; {pick}exec "$P" - --root "$R" ' + shlex.join(args),
                                     input=Path(doctor.__file__).read_bytes(), timeout=120)
    err = p.stderr.decode(errors="replace").strip().splitlines()
    if p.returncode == 255:
        raise ssh_failure(host, p.stderr.decode(errors="replace"), ssh)
    try:
        return json.loads(p.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EdgemetaError(f"doctor on {host} gave no answer: {err[-1] if err else 'no output'}") from None


def read_hosts_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise EdgemetaError(f"cannot read hosts file {path}: {e.strerror}") from None
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


# --- `edgemeta remote --via ssh:HOST` ------------------------------------------------------------

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
