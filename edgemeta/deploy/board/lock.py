"""ROOT/.lock: the one command changing a board holds it (deploy, activate, rollback, prune, trust,
...), and whoever takes it first removes what killed writers left behind."""

import fcntl
import os
import re
import shutil
import signal

from edgemeta.deploy.board.base import KEYS_DIR, LOCK_FILE, STORES, Refused, root
from edgemeta.deploy.board.stores import settle_stores

# what the board writes in ROOT (.trusted_keys.PID.tmp: left by the trust on first use of older versions)
TEMP_NAMES = re.compile(r"\.(current|history\.json|edgemeta-agent\.service|trusted_keys|store)\..+\.tmp")
_lock_fd = -1


def lock_board() -> None:
    """Take ROOT/.lock for the rest of this process (the kernel drops it when the process ends, killed
    or not), so two deploys or rollbacks never interleave; then remove what killed ones left behind."""
    global _lock_fd
    r = root()
    r.mkdir(parents=True, exist_ok=True)
    _lock_fd = os.open(r / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(_lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Refused("another deploy or rollback is changing this board right now; wait until it is done and "
                      "try again") from None
    for p in r.iterdir():  # nobody else writes here while the lock is held: these are a killed writer's
        if TEMP_NAMES.fullmatch(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in (r / KEYS_DIR).glob(".*.tmp"):  # a killed `trust`'s write_atomic
        p.unlink()
    for p in (r / STORES).glob(".*.carry"):  # a killed carry's (the store it read is untouched)
        shutil.rmtree(p, ignore_errors=True)
    for p in (r / STORES).glob(".*.snapshot"):
        shutil.rmtree(p, ignore_errors=True)
    for p in (r / "releases").glob("*/.store.*.tmp"):
        p.unlink()
    settle_stores()


def outlive_the_host() -> None:
    """A transaction finishes on its own once it has started: the host's ssh may die (killed, the
    connection dropped) and take stdout with it; the board must not stop half way."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited by pip and the health check

