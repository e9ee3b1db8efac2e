"""The hosts a fleet command reaches: the hosts file, and running one operation on each.

A hosts file has one ssh destination a line ([user@]host or an ~/.ssh/config alias); '#' starts
a comment. Every name is checked (sshcmd.check_host) before any board is reached.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from edgemeta.errors import EdgemetaError
from edgemeta.sshcmd import check_host

NO_HOSTS = "no hosts given: pass --host user@board (repeatable) or --hosts FILE"


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


def each_host(hosts: list[str], work: Callable[[str], HostResult], parallel: int = 4) -> list[HostResult]:
    """`work` on every host, `parallel` at once, in the hosts' order. Every name is checked first, so a
    bad one stops all before any board is reached."""
    if not hosts:
        raise EdgemetaError(NO_HOSTS)
    for h in hosts:
        check_host(h)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(work, hosts))


def read_hosts_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise EdgemetaError(f"cannot read hosts file {path}: {e.strerror}") from None
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]
