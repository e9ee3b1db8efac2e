"""Where a board keeps edgemeta: ROOT is $EDGEMETA_ROOT, else ~/.edgemeta.

    ROOT/releases/<id>/   one deployed bundle each, with its own venv
    ROOT/current          the active release (a symlink)
    ROOT/store/           the enrollment store, shared by all releases

This is the one definition (standard library only: the board-side operations, which run on a bare
board, carry it in their zip application, deploy/board_ops.py); doctor.py is told the root with --root.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "EDGEMETA_ROOT"
DEFAULT_ROOT = "~/.edgemeta"

# The same rule in POSIX sh, for command lines run on a board over ssh: it sets $R to the root.
ROOT_SH = f'R="${{{ROOT_ENV}:-$HOME/{DEFAULT_ROOT.removeprefix("~/")}}}"'


def board_root() -> Path:
    """This machine's edgemeta root (it need not exist)."""
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT).expanduser()
