"""Real OpenSSH servers on 127.0.0.1 for deployment tests: each one plays a board.

Throwaway host and client keys; an ssh client config with one alias per board (boardN) that
pins the host key in its own known_hosts file and sends EDGEMETA_ROOT, so each "board" keeps
its releases in its own folder although they share this machine (and PIP_INDEX_URL when a board is
given one: a board that reaches no package index). `stranger` gives a client that knows nothing of a
board (no port, no key, an empty known_hosts: the first contact), `new_host_key` restarts a board's
sshd with another host key (a reinstalled board, or someone in between).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return Path(f"{path}.pub").read_text().strip()


@dataclass
class Board:
    alias: str
    port: int
    root: Path
    proc: subprocess.Popen
    dir: Path | None = None
    host_pub: str = ""  # "ssh-ed25519 AAAA..." of its host key now


def start_sshd(config: Path, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=open(log, "a"))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc


class SshLab:
    def __init__(self, base: Path):
        if not Path(SSHD).exists():
            raise RuntimeError("sshd is not installed (apt-get install openssh-server); .ci/run installs it")
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self.client_key = base / "client_key"
        self.client_pub = keygen(self.client_key)
        self.known_hosts = base / "known_hosts"
        self.known_hosts.write_text("")
        self.ssh_config = base / "ssh_config"
        self.ssh_config.write_text("")
        self.boards: list[Board] = []

    def add_board(self, authorized: bool = True, env: dict[str, str] | None = None) -> Board:
        n = len(self.boards) + 1
        d = self.base / f"board{n}"
        d.mkdir()
        host_key = d / "host_key"
        host_pub = keygen(host_key)
        auth = d / "authorized_keys"
        auth.write_text(self.client_pub + "\n" if authorized else "")
        port = free_port()
        cfg = d / "sshd_config"
        cfg.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {auth}\n"
                       "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                       f"PidFile {d / 'sshd.pid'}\nAcceptEnv EDGEMETA_ROOT PIP_INDEX_URL\nPermitRootLogin prohibit-password\n")
        proc = start_sshd(cfg, port, d / "sshd.log")
        with open(self.known_hosts, "a") as f:
            f.write(f"[127.0.0.1]:{port} {' '.join(host_pub.split()[:2])}\n")
        alias = f"board{n}"
        root = d / "edgemeta"
        with open(self.ssh_config, "a") as f:
            f.write(f"Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User {os.environ.get('USER', 'root')}\n"
                    f"  IdentityFile {self.client_key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {self.known_hosts}\n"
                    f"  StrictHostKeyChecking yes\n  SetEnv EDGEMETA_ROOT={root}"
                    + "".join(f" {k}={v}" for k, v in (env or {}).items()) + "\n  LogLevel ERROR\n\n")
        board = Board(alias, port, root, proc, d, " ".join(host_pub.split()[:2]))
        self.boards.append(board)
        return board

    def stranger(self, board: Board, name: str) -> tuple[Path, Path]:
        """(ssh config, known_hosts) of a client that has never reached `board`: the config names no
        port, no key and no host, only an empty known_hosts of its own (never ~/.ssh's) and the board's
        EDGEMETA_ROOT; reach the board as USER@127.0.0.1 with --port and --identity."""
        d = self.base / name
        d.mkdir()
        known, cfg = d / "known_hosts", d / "ssh_config"
        known.write_text("")
        cfg.write_text(f"Host *\n  UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n"
                       f"  SetEnv EDGEMETA_ROOT={board.root}\n  LogLevel ERROR\n")
        return cfg, known

    def new_host_key(self, board: Board) -> str:
        """Restart `board`'s sshd, on the same port, with a new host key; the new public key."""
        board.proc.terminate()
        board.proc.wait(timeout=10)
        key = board.dir / "host_key"
        key.unlink()
        Path(f"{key}.pub").unlink()
        board.host_pub = " ".join(keygen(key).split()[:2])
        board.proc = start_sshd(board.dir / "sshd_config", board.port, board.dir / "sshd.log")
        return board.host_pub

    def ssh(self, board: Board, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", board.alias, command],
                              capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        for b in self.boards:
            b.proc.terminate()
            b.proc.wait(timeout=10)
