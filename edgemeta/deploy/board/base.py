"""What every board command shares: the names in ROOT, the one-line answers for the host, Refused,
and the file primitives (atomic writes and symlink switches, from the shared edgemeta.atomic)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from edgemeta.atomic import NoSpaceError, fsync_dir, write_atomic
from edgemeta.runtime.paths import board_root

BUNDLE_FILE = "BUNDLE.json"
SIGNATURE_FILE = "BUNDLE.sig"
SIGNED_PREFIX = b"edgemeta bundle v1\n"  # the signature covers this prefix and BUNDLE.json's bytes
RELEASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a file name: no '/', no leading '.' or '-'
KEYS_DIR = "trusted_keys"
LOCK_FILE = ".lock"  # ROOT/.lock: held (flock) by whatever changes releases, current or history.json
INSTALLED = "venv/.installed"  # in a release: its venv is complete (pip succeeded; through the venv link)
VENVS = "venvs"  # ROOT/venvs/<runtime key>/: the venvs, shared by releases with the same runtime
STORES = "stores"  # ROOT/stores/<release id>/: each release's enrollment store
ACTIVATED = ".activated"  # ROOT/releases/<id>/.activated: its mtime is when the release last became current
STORE_FILE = "store.npz"  # edgemeta.runtime.store.STORE_FILE (that module needs numpy, which a bare board lacks)
UNPAIRED = ".unpaired"  # ROOT/stores/.unpaired: an older board's store, found before any release was active

root = board_root  # ROOT: $EDGEMETA_ROOT, else ~/.edgemeta (the one definition, shared with the board's edgemeta)


class Refused(Exception):
    """A bundle or command this board will not take; the message says why, in one line."""


def done(obj: dict, code: int = 0) -> None:
    try:
        print(json.dumps(obj), flush=True)
    except OSError:  # the host went away; what was done is done
        sys.stdout = open(os.devnull, "w")
    sys.exit(code)


def say(event: str, **fields) -> None:
    """A progress line for the host (it shows them as they come); nobody may be listening any more."""
    try:
        print(json.dumps({"event": event, **fields}), flush=True)
    except OSError:
        sys.stdout = open(os.devnull, "w")


def write_text(path: Path, text: str) -> None:
    """edgemeta.atomic.write_atomic (a temporary file of its own, fsync, rename, fsync of the folder),
    with a full disk refused in the board's words: nothing was changed, deploy again."""
    try:
        write_atomic(path, text)
    except NoSpaceError as e:
        raise Refused(f"no space left on the board to write {path} ({os.strerror(e.errno)}); free some space and deploy "
                      "again: nothing was changed") from None


def relink(link: Path, target: str) -> None:
    """Point the symlink `link` at `target` in one rename(2) over the old link (a temporary link of
    its own first, .NAME.PID.tmp, which lock_board removes when a killed writer left it)."""
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def run(args: list) -> None:
    """Run a program the board needs (venv, pip, systemctl); Refused, with its last line, when it fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} if os.environ.get("EDGEMETA_CLEAN_PIP") else None
    p = subprocess.run(args, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise Refused(f"{Path(args[0]).name} failed: " + ((p.stderr or p.stdout).strip().splitlines() or ["?"])[-1][:300])


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
