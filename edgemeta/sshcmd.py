"""The one place edgemeta builds an ssh command line (`ssh_argv`), with the checks of what goes on it:
destinations that ssh cannot read as an option, a port, a private key ssh will use, the private folder
of shared connections. Standard library only: the fleet's runner (deploy/ssh.py), the host agent
clients (remote.py) and the multi-machine training launcher (host/cluster.py) all use it."""

from __future__ import annotations

import os
import re
import shlex
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgemeta.errors import EdgemetaError

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
