"""Board profiles (boards/*.toml): what a board runs and which model variant it takes.

Profiles live in the repository's top-level boards/ folder, which the wheel carries as the
edgemeta.boards_data package; $EDGEMETA_BOARDS points at another folder of profiles.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgemeta.errors import EdgemetaError
from edgemeta.files import read_regular

if TYPE_CHECKING:
    from edgemeta.preprocess import ImageLimits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def boards_dir() -> Path:
    if os.environ.get("EDGEMETA_BOARDS"):
        return Path(os.environ["EDGEMETA_BOARDS"])
    checkout = Path(__file__).resolve().parents[1] / "boards"
    if checkout.is_dir():
        return checkout
    return Path(__file__).resolve().parent / "boards_data"  # installed wheel


@dataclass
class Board:
    name: str
    raw: dict

    @property
    def title(self) -> str:
        return self.raw["title"]

    @property
    def runtime(self) -> dict:
        return self.raw["runtime"]

    @property
    def variant(self) -> str:
        return self.raw["model"]["variant"]

    @property
    def supported(self) -> bool:
        return self.raw.get("supported", True)

    @property
    def image_limits(self) -> ImageLimits:
        """What one image may cost to decode on this board: the profile's max_image_pixels and
        max_image_bytes (built-in defaults where it has none; $EDGEMETA_MAX_IMAGE_PIXELS /
        $EDGEMETA_MAX_IMAGE_BYTES override). Pass it to load_images / Preprocess.file / decode_image."""
        from edgemeta.preprocess import ImageLimits  # numpy + Pillow, only when asked

        return ImageLimits.resolve(self.raw.get("max_image_pixels"), self.raw.get("max_image_bytes"))

    def max_op_versions(self) -> dict[str, int]:
        path = boards_dir() / "op_tables" / f"{self.runtime['op_table']}.toml"
        try:
            return tomllib.loads(path.read_text())["max_versions"]
        except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
            raise EdgemetaError(f"op table {path} of board {self.name} is missing or broken ({e})") from None

    def check_ops(self, ops: dict[str, int]) -> list[str]:
        """Problems loading a model with these {op: version} on this board's runtime (empty: fine)."""
        limits = self.max_op_versions()
        if not limits:
            return []
        problems = []
        for op, version in sorted(ops.items()):
            if op not in limits:
                problems.append(f"{op} v{version}: not in {self.runtime['package']} {self.runtime['version']}'s op table")
            elif version > limits[op]:
                problems.append(f"{op} v{version}: {self.runtime['package']} {self.runtime['version']} loads up to v{limits[op]}")
        return problems


def list_boards() -> list[Board]:
    return [load_board(p.stem) for p in sorted(boards_dir().glob("*.toml"))]


# optional top-level keys that must be positive integers when present
POSITIVE_INT_KEYS = ("memory_mb", "threads", "max_image_pixels", "max_image_bytes")


def load_board(name: str) -> Board:
    path = boards_dir() / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in boards_dir().glob("*.toml")))
        raise EdgemetaError(f"unknown board {name!r}; known boards: {known}")
    return load_board_file(path, name)


def load_board_file(path: str | Path, name: str | None = None) -> Board:
    """A profile from a file (a release's board.toml on the board), named by its file unless told."""
    path = Path(path)
    try:
        raw = tomllib.loads(read_regular(path, 2**20, "board profile").decode())
        for key in ("title", "arch", "python", "runtime", "model"):
            raw[key]  # noqa: B018 - presence check
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError) as e:
        raise EdgemetaError(f"board profile {path} is broken ({type(e).__name__}: {e})") from None
    for key in POSITIVE_INT_KEYS:
        v = raw.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EdgemetaError(f"board profile {path} is broken: {key} must be a positive integer, got {v!r}")
    return Board(name or path.stem, raw)
