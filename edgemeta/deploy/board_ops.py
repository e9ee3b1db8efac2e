"""The board-side operations (the package edgemeta.deploy.board) as the host uploads them: one zip
application of that package and the modules it shares with the rest of edgemeta (edgemeta.atomic,
edgemeta.runtime.paths), run with the board's python3 and its standard library alone:

    python3 ~/.edgemeta-ops.pyz COMMAND [ARGS]

`python -m edgemeta.deploy.board_ops OUT.pyz` writes it, to run by hand or copy to a board. The names
the host side needs from the board's checks (the bundle's file names, the release id rule, the
ed25519 verifier) are re-exported here.
"""

import atexit
import functools
import io
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import edgemeta
from edgemeta.atomic import write_atomic
from edgemeta.deploy.board import ed25519
from edgemeta.deploy.board.base import BUNDLE_FILE, INSTALLED, KEYS_DIR, RELEASE_ID, SIGNATURE_FILE, SIGNED_PREFIX, Refused
from edgemeta.deploy.board.ed25519 import ed25519_verify, public_key_problem
from edgemeta.deploy.board.trust import fingerprint

__all__ = ["BUNDLE_FILE", "INSTALLED", "KEYS_DIR", "RELEASE_ID", "SIGNATURE_FILE", "SIGNED_PREFIX", "Refused", "ed25519_verify",
           "fingerprint", "public_key_problem", "write_zipapp", "zipapp_bytes", "zipapp_file"]

# the curve's internals, which tests/test_deploy.py checks as board_ops._P, board_ops._add, ...
_B, _L, _P, _add, _decode_point = ed25519._B, ed25519._L, ed25519._P, ed25519._add, ed25519._decode_point
_is_identity, _multiply = ed25519._is_identity, ed25519._multiply

# What the zip application holds besides edgemeta/deploy/board/*.py: the packages above the board's and
# the modules it shares, which therefore must import nothing but the standard library
# (tests/test_board_zipapp.py runs the application with no site-packages).
SHARED = ("__init__.py", "errors.py", "atomic.py", "runtime/__init__.py", "runtime/paths.py", "deploy/__init__.py")
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip entry can have: no build time in the bytes


def zipapp_files() -> dict[str, bytes]:
    """{name in the zip application: the source's bytes}; its __main__.py is the board package's."""
    package = Path(edgemeta.__file__).parent
    names = [f"edgemeta/{n}" for n in SHARED] + [f"edgemeta/deploy/board/{p.name}" for p in (package / "deploy" / "board").glob("*.py")]
    files = {name: (package.parent / name).read_bytes() for name in names}
    files["__main__.py"] = files["edgemeta/deploy/board/__main__.py"]
    return files


@functools.cache
def zipapp_bytes() -> bytes:
    """The zip application, the same bytes (and so the same sha256, which the upload checks) for the
    same sources: entries sorted, fixed times and modes, stored rather than deflated (zlib's output
    may change with its version; the application is some 70 KB)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in sorted(zipapp_files().items()):
            entry = zipfile.ZipInfo(name, FIXED_TIME)
            entry.create_system = 3  # Unix, wherever it is built, so that the mode bits below are read
            entry.external_attr = 0o644 << 16
            z.writestr(entry, data)
    return out.getvalue()


def write_zipapp(path: str | Path) -> Path:
    """Write the zip application to `path` (in one rename); `python3 PATH COMMAND [ARGS]` runs it."""
    write_atomic(path, zipapp_bytes())
    return Path(path)


@functools.cache
def zipapp_file() -> Path:
    """The zip application in a temporary folder of this process (removed at its exit), for running
    it on this machine as a board would: tests and benchmarks."""
    folder = tempfile.mkdtemp(prefix="edgemeta-ops-")
    atexit.register(shutil.rmtree, folder, True)
    return write_zipapp(Path(folder) / "board_ops.pyz")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m edgemeta.deploy.board_ops OUT.pyz")
    print(write_zipapp(sys.argv[1]))
