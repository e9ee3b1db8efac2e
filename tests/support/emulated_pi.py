"""An emulated Raspberry Pi OS userland (Debian bookworm arm64/armhf under qemu user emulation) that
serves SSH on a loopback port, so deployment can be tested on a real aarch64/armv7l Python.

The root filesystem is built once with debootstrap and kept in ~/.cache/edgemeta/ (or
$EDGEMETA_PI_CACHE), so later runs start in seconds. The recipe follows ../shared/TOOLCHAIN.md:
register the emulator with binfmt_misc by hand, bind /proc and /dev (never /sys: LiteRT's CPU
detection crashes under emulation with it), and run the chroot's own sshd.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.support.sshd import SshLab, free_port, keygen

QEMU = {"arm64": ("qemu-aarch64", "aarch64"), "armhf": ("qemu-arm", "armv7l")}
PACKAGES = {"arm64": "python3,python3-venv,openssh-server",
            "armhf": "python3,python3-venv,python3-numpy,python3-pil,openssh-server"}


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEMETA_PI_CACHE") or Path.home() / ".cache" / "edgemeta" / "emulated-pi")


def debian_mirror() -> str:
    for f in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.sources")]:
        if f.is_file():
            text = f.read_text()
            m = re.search(r"^URIs:\s*(\S+)\s*\nSuites:[^\n]*\bbookworm\b", text, re.M) or \
                re.search(r"^deb\s+(\S+)\s+bookworm\s", text, re.M)
            if m and "security" not in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def register_binfmt(arch: str) -> None:
    name = QEMU[arch][0]
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)], check=True)
    if not (misc / name).exists():
        conf = Path(f"/usr/lib/binfmt.d/{name}.conf").read_text().strip()
        (misc / "register").write_text(conf)


def build_rootfs(arch: str) -> Path:
    root = cache_dir() / f"bookworm-{arch}"
    if (root / ".edgemeta-ready").exists():
        return root
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["debootstrap", f"--arch={arch}", "--variant=minbase", f"--include={PACKAGES[arch]}", "bookworm",
                           str(partial), debian_mirror()], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap {arch} failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    (partial / ".edgemeta-ready").write_text("ok\n")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


class EmulatedPi:
    """A booted-enough Pi userland: its own arm sshd on 127.0.0.1, reachable as an alias of `lab`."""

    def __init__(self, lab: SshLab, arch: str = "arm64"):
        register_binfmt(arch)
        self.arch, self.machine = arch, QEMU[arch][1]
        self.root = build_rootfs(arch)
        # The OS image is cached between runs, the board's edgemeta state is not: every session
        # starts as a never-deployed board that trusts no signing key (an earlier run's throwaway
        # key would otherwise make the first deploy a key change, and refused); tests trust the
        # session's key with `deploy --trust-key`.
        shutil.rmtree(self.root / "root" / ".edgemeta", ignore_errors=True)
        self.mounts = []
        for sub in ("proc", "dev"):
            target = self.root / sub
            subprocess.run(["mount", "--bind", f"/{sub}", str(target)], check=True)
            self.mounts.append(target)
        etc = self.root / "etc" / "ssh"
        host_key = etc / "edgemeta_host_key"
        for p in (host_key, Path(f"{host_key}.pub")):
            p.unlink(missing_ok=True)
        host_pub = keygen(host_key)
        (self.root / "root" / ".ssh").mkdir(parents=True, exist_ok=True)
        (self.root / "root" / ".ssh" / "authorized_keys").write_text(lab.client_pub + "\n")
        (self.root / "run" / "sshd").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (etc / "edgemeta_sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey /etc/ssh/edgemeta_host_key\n"
            "AuthorizedKeysFile /root/.ssh/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPidFile /run/edgemeta_sshd.pid\nPermitRootLogin prohibit-password\n")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}  # nothing of the host's leaks in
        subprocess.run(["chroot", str(self.root), "/usr/sbin/sshd", "-f", "/etc/ssh/edgemeta_sshd_config"], check=True, env=env)
        import socket

        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        self.alias = f"pi-{arch}"
        with open(lab.known_hosts, "a") as f:
            f.write(f"[127.0.0.1]:{self.port} {' '.join(host_pub.split()[:2])}\n")
        with open(lab.ssh_config, "a") as f:
            f.write(f"Host {self.alias}\n  HostName 127.0.0.1\n  Port {self.port}\n  User root\n  IdentityFile {lab.client_key}\n"
                    f"  IdentitiesOnly yes\n  UserKnownHostsFile {lab.known_hosts}\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n\n")
        self.edgemeta_root = self.root / "root" / ".edgemeta"

    def stop(self) -> None:
        pid = self.root / "run" / "edgemeta_sshd.pid"
        if pid.exists():
            try:
                os.kill(int(pid.read_text().strip()), 15)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(0.5)
        for target in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(target)], check=False)
