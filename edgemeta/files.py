"""Opening files that someone else may have put in place: regular files only, read with a bound.

A FIFO where a token file or a manifest belongs blocks `open()` until a writer comes, forever in
a service; a device (/dev/zero, /dev/urandom) streams without end. Both are refused here with one
line, from the file that was opened (fstat), not from what the path named a moment before.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from edgemeta.errors import EdgemetaError

_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def open_regular(path: str | Path, what: str = "file") -> BinaryIO:
    """`open(path, "rb")` for a regular file (symlinks followed); OSError as open() raises it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise EdgemetaError(f"{what} {path} is {_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, not a regular "
                                "file; put the file itself there")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `max_bytes` (checked before reading)."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise EdgemetaError(f"{what} {path} is {size} bytes, more than the {max_bytes} such a file may hold")
        return f.read(max_bytes + 1)


def sha256_file(path: Path) -> str:
    """The sha256 of a regular file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open_regular(path, "model file") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
