"""Reading .npy and .npz files without trusting the sizes their headers declare.

``np.load`` allocates what a header says before it reads a byte of data, so a 100-byte .npy that
declares a shape of (10**6, 10**6) ends in MemoryError (or the kernel's OOM killer on a board).
These readers check each array's declared size against the bytes that really hold it (the file's
size, or the zip member's size) and against a limit, then read with pickles refused. Every
failure is a ValueError whose message says what is wrong; callers add which file and what to do.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edgemeta.files import open_regular

MAX_ARRAY_BYTES = 2**30  # no file edgemeta reads holds more; far above a store of 100 000 samples


def _declared(f: BinaryIO, name: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, Fortran order, dtype, data bytes) from a .npy header; `f` is left at the start of the data."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"{name}: .npy version {version} is not supported")
    except (ValueError, EOFError, SyntaxError, TypeError) as e:
        raise ValueError(f"{name}: not a valid .npy header ({str(e)[:120]})") from None
    if dtype.hasobject:
        raise ValueError(f"{name}: holds Python objects, which are never loaded")
    return shape, fortran, dtype, math.prod(shape) * dtype.itemsize


def _read(f: BinaryIO, name: str, available: int, max_bytes: int) -> np.ndarray:
    """One array from `f` (a .npy stream of `available` bytes, header included)."""
    start = f.tell()
    shape, fortran, dtype, size = _declared(f, name)
    data = available - (f.tell() - start)
    if size > max_bytes:
        raise ValueError(f"{name} declares {size} bytes of data {shape}, over the limit of {max_bytes}")
    if size != data:
        raise ValueError(f"{name} declares {size} bytes of data {shape} but holds {data}: truncated or damaged")
    buf = bytearray(size)  # writable, like np.load's arrays
    if size and f.readinto(buf) != size:
        raise ValueError(f"{name} ends before its {size} bytes of data: truncated")
    return np.frombuffer(buf, dtype).reshape(shape, order="F" if fortran else "C")


def load_npy(path: str | Path, max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
    """The array of a .npy file, its declared size checked first. OSError for an unreadable file."""
    path = Path(path)
    with open_regular(path, "array file") as f:
        return _read(f, path.name, os.fstat(f.fileno()).st_size, max_bytes)


def load_npz(path: str | Path, max_bytes: int = MAX_ARRAY_BYTES) -> dict[str, np.ndarray]:
    """{name: array} of a .npz file (what np.savez / savez_compressed write), every member's declared
    size checked against its uncompressed size and all of them together against `max_bytes`.
    zipfile never inflates a member past the size its directory states, so the check bounds memory."""
    out: dict[str, np.ndarray] = {}
    left = max_bytes
    try:
        with open_regular(path, "array file") as raw, zipfile.ZipFile(raw) as z:
            for info in z.infolist():
                name = info.filename
                if not name.endswith(".npy"):
                    raise ValueError(f"member {name[:80]!r} is not a .npy array")
                if info.file_size > left:
                    raise ValueError(f"member {name[:80]!r} is {info.file_size} bytes, over the limit of {max_bytes} in all")
                with z.open(info) as f:
                    out[name[:-4]] = _read(f, name, info.file_size, left)
                left -= info.file_size
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a valid .npz archive ({e})") from None
    except EOFError:
        raise ValueError("the archive ends early (truncated)") from None
    return out
