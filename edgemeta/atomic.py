"""Atomic file replacement, the one implementation every writer uses (standard library only, so
the board side and firmware_tools can import it; the board-side operations, which run on a bare
board before edgemeta is installed, carry it in their zip application: deploy/board_ops.py).

Write to a temporary file in the same folder, fsync it, rename it over the target, then fsync the
folder so the rename itself survives a power cut: a crash at any point leaves the old content or
the new, never a mix.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from edgemeta.errors import EdgemetaError, denied

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(EdgemetaError, OSError):
    """A full disk (or quota): the user's to fix, so a one-line EdgemetaError; still an OSError (with
    its errno) for callers that treat a failed write as harmless (the dataset cache)."""


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; not every file system lets a directory be fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def default_mode() -> int:
    """The permission bits `open()` gives a new file: 0o666 less this process's umask."""
    try:  # Linux: read without changing it (os.umask can only be read by setting it, racing other threads)
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | Path, data: bytes | str | Callable[[BinaryIO], None], mode: int | None = None,
                 prefix: str | None = None, suffix: str = ".tmp") -> None:
    """Replace `path` with `data` (bytes, text, or a function that writes to the open file).

    `mode` sets permission bits where the file system has them (FAT has none); by default the file
    gets what `open()` would give it (0o666 less the umask), not the temporary file's 0o600, so an
    exported model is readable where a copied one would be; `prefix`/`suffix`
    name the temporary file (a reader that cleans up leftovers of killed writers matches them).
    A full disk is an EdgemetaError, and `path` and its folder are left as they were."""
    path = Path(path)
    try:
        _write(path, data, mode, prefix, suffix)
    except PermissionError:
        raise denied(path, "write") from None
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        err = NoSpaceError(f"no space left on the device to write {path} ({e.strerror}); free some space "
                           "and try again: nothing was changed")
        err.errno = e.errno  # (not strerror: OSError would then print "[Errno 28] ..." instead of the message)
        raise err from None
    fsync_dir(path.parent)


def _write(path: Path, data: bytes | str | Callable[[BinaryIO], None], mode: int | None, prefix: str | None,
           suffix: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix if prefix is not None else f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            try:
                os.fchmod(f.fileno(), default_mode() if mode is None else mode)
            except OSError:
                pass
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
