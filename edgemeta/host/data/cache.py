"""On-disk cache of decoded images, so a second run starts in seconds instead of minutes."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgemeta.arrays import load_npz
from edgemeta.atomic import write_atomic

CACHE_FORMAT = 1


def cache_dir() -> Path:
    """$EDGEMETA_CACHE, else $XDG_CACHE_HOME/edgemeta, else ~/.cache/edgemeta."""
    if os.environ.get("EDGEMETA_CACHE"):
        return Path(os.environ["EDGEMETA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgemeta"


def fingerprint(files: list[Path], extra: dict) -> str:
    """A key that changes when any source file (name, size, mtime) or a setting changes."""
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **extra}, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached_arrays(name: str, key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load ``name-key.npz`` from the cache, or build the arrays and store them atomically.

    Arrays only (strings as unicode arrays), read with allow_pickle=False. A cache that cannot
    be written (read-only home, full disk) is not an error: the data is simply decoded again.
    """
    path = cache_dir() / f"{name}-{key}.npz"
    if path.exists():
        try:
            return load_npz(path)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            pass  # a damaged cache file is rebuilt below
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: np.savez(f, **arrays), suffix=".tmp.npz")
    except OSError:
        pass
    return arrays
