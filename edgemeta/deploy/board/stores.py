"""The enrollment store, carried from release to release: ROOT/stores/<release id>/ for each release,
made when it is activated from the store being left (re-embedded by its own edgemeta when the model
changed), ROOT/releases/<id>/store linking to it and ROOT/store to current/store. A store is only
ever read to be carried and is never deleted: one a later carry replaces goes to stores/.archive/."""

import datetime as dt
import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

from edgemeta.atomic import fsync_dir
from edgemeta.deploy.board.base import STORE_FILE, STORES, UNPAIRED, Refused, relink, root
from edgemeta.deploy.board.releases import current

_store_lock_fd = -1  # the store being carried, held from its snapshot until `current` has switched


def store_of(release_id: str) -> Path:
    return root() / STORES / release_id


def settle_stores() -> None:
    """Make the store layout whole (under the board lock): an older board's ROOT/store folder, shared by
    every release, becomes the active release's (or, before any release, the one the first activation
    carries from); the active release has its store and link; ROOT/store points at current/store.
    Each step is one rename, and one killed midway is finished by the next call."""
    r, now = root(), current()
    legacy = r / "store"
    if legacy.is_dir() and not legacy.is_symlink():
        (r / STORES).mkdir(exist_ok=True)
        dest = store_of(now) if now else r / STORES / UNPAIRED
        if dest.exists():
            archive_store(dest, "replaced")
        os.rename(legacy, dest)
        fsync_dir(r)
    if now:  # (a board with no release yet is left as it is)
        store_of(now).mkdir(parents=True, exist_ok=True)
        link = r / "releases" / now / "store"
        if not link.is_symlink():
            relink(link, f"../../{STORES}/{now}")
        if not legacy.is_symlink():
            relink(legacy, "current/store")


def archive_store(folder: Path, why: str) -> Path:
    """Move a store folder aside into ROOT/stores/.archive/ (a store is never deleted)."""
    dest = root() / STORES / ".archive" / f"{folder.name.lstrip('.')}-{why}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(folder, dest)
    return dest


def prepare_store(release_id: str, fresh: bool) -> tuple[dict, Path]:
    """The store release `release_id` will have, built in ROOT/stores/.<release_id>.carry (under the board lock;
    commit_store puts it in place, discard_store drops it): the active release's store (or an
    older board's unpaired one), re-embedded by `release_id`'s own edgemeta when its model differs (the
    source is only read: a snapshot is re-embedded), or an empty one when there is nothing to carry
    or `fresh`. The source's lock is held from the snapshot until `current` has switched
    (release_store_lock), so no enrollment slips between the two. Refused, with nothing changed,
    when the store cannot be carried."""
    global _store_lock_fd
    now = current()
    src = store_of(now) if now else root() / STORES / UNPAIRED
    (root() / STORES).mkdir(exist_ok=True)
    work, snap = root() / STORES / f".{release_id}.carry", root() / STORES / f".{release_id}.snapshot"
    for p in (work, snap):
        shutil.rmtree(p, ignore_errors=True)
    has = (src / STORE_FILE).is_file()
    info: dict = {"carried": "nothing to carry"}
    if has and fresh:
        info = {"carried": f"fresh: {release_id} starts with an empty store; the one before stays in {src}"}
    if not has or fresh:
        work.mkdir()
    else:
        _store_lock_fd = os.open(src / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(_store_lock_fd, fcntl.LOCK_EX)  # an enroll in progress finishes first
        try:
            snap.mkdir()
            shutil.copy2(src / STORE_FILE, snap / STORE_FILE)
            info = reembed(release_id, snap, work)
        except BaseException:
            release_store_lock()
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(snap, ignore_errors=True)
    return info, work


def discard_store(work: Path) -> None:
    release_store_lock()
    shutil.rmtree(work, ignore_errors=True)


def commit_store(release_id: str, work: Path) -> None:
    """Put the store prepare_store built in place for `release_id`, just before `current` switches to it."""
    target = store_of(release_id)
    if target.exists():  # a release activated before (a rollback): its old store is kept, not reused
        archive_store(target, "replaced")
    os.rename(work, target)
    relink(root() / "releases" / release_id / "store", f"../../{STORES}/{release_id}")


def reembed(release_id: str, snapshot: Path, out: Path) -> dict:
    """`edgemeta reenroll --out` of release `release_id` (else of the active release, when release_id's edgemeta is
    older than --out) on the snapshot, into `out`: {carried, classes, samples, ...}."""
    rel = root() / "releases" / release_id
    tools = [rel / "venv" / "bin" / "edgemeta"]
    if current():
        tools.append(root() / "current" / "venv" / "bin" / "edgemeta")
    last = ""
    for exe in tools:
        try:
            p = subprocess.run([str(exe), "reenroll", "--model", str(rel / "model"), "--store", str(snapshot), "--out", str(out),
                                "--json"], capture_output=True, text=True)
        except OSError as e:
            last = f"cannot run {exe}: {e.strerror}"
            continue
        if p.returncode == 0:
            return json.loads(p.stdout.strip().splitlines()[-1])
        last = ((p.stderr or p.stdout).strip().splitlines() or ["?"])[-1].removeprefix("error: ")[:300]
        shutil.rmtree(out, ignore_errors=True)
        if "--out" not in last:  # a real answer, not an edgemeta too old to know the option
            break
    raise Refused(f"the board's store cannot be carried to {release_id}: {last}; nothing was changed. To start {release_id} with an "
                  f"empty store instead (the current one stays on the board, in ROOT/{STORES}/), deploy with --fresh-store")


def release_store_lock() -> None:
    global _store_lock_fd
    if _store_lock_fd >= 0:
        os.close(_store_lock_fd)
        _store_lock_fd = -1

