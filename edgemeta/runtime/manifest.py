"""The model manifest: everything the board needs to know about an exported backbone.

Written by `edgemeta export` next to the .tflite files, read here. The runtime takes input
shape, quantisation, preprocessing, distance and the open-set threshold from it and from
nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edgemeta.errors import EdgemetaError
from edgemeta.preprocess import Preprocess

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Variant:
    name: str
    file: str
    sha256: str
    quantization: str
    static_batch: int | None
    open_set_threshold: float | None

    @classmethod
    def from_dict(cls, name: str, d: dict) -> Variant:
        return cls(name, d["file"], d["sha256"], d["quantization"], d.get("static_batch"), d.get("open_set_threshold"))


@dataclass
class Manifest:
    folder: Path
    raw: dict
    preprocess: Preprocess
    distance: str
    embedding_dim: int
    variants: dict[str, Variant]
    default_variant: str

    @property
    def name(self) -> str:
        return self.raw.get("name", self.folder.name)

    def variant(self, name: str | None = None) -> Variant:
        name = name or self.default_variant
        if name not in self.variants:
            raise EdgemetaError(f"model {self.name} has no variant {name!r}; it has: {', '.join(self.variants)}")
        return self.variants[name]

    def model_path(self, variant: str | None = None, verify: bool = True) -> Path:
        """Path of a variant's .tflite, checked against the manifest's checksum."""
        v = self.variant(variant)
        path = self.folder / v.file
        if not path.is_file():
            raise EdgemetaError(f"{path} is missing; the manifest lists it as variant {v.name}: re-export or copy it again")
        if verify and sha256_file(path) != v.sha256:
            raise EdgemetaError(f"{path} does not match its manifest checksum (damaged or replaced); re-export or copy it again")
        return path


def read_manifest(folder_or_file: str | Path) -> Manifest:
    """Read and check a manifest (the folder holding manifest.json, or the file itself)."""
    p = Path(folder_or_file)
    path = p / MANIFEST_FILE if p.is_dir() else p
    if not path.is_file():
        raise EdgemetaError(f"no {MANIFEST_FILE} in {p}; export the model with `edgemeta export` first")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != MANIFEST_FORMAT:
            raise EdgemetaError(f"{path} has manifest format {raw.get('format')!r}; this edgemeta reads format "
                                f"{MANIFEST_FORMAT}: upgrade edgemeta or re-export the model")
        variants = {k: Variant.from_dict(k, v) for k, v in raw["variants"].items()}
        m = Manifest(path.parent, raw, Preprocess.from_dict(raw["preprocess"]), raw["distance"], int(raw["embedding_dim"]),
                     variants, raw["default_variant"])
    except EdgemetaError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise EdgemetaError(f"{path} is not a valid edgemeta manifest ({type(e).__name__}: {e}); re-export the model") from None
    if m.default_variant not in variants:
        raise EdgemetaError(f"{path}: default variant {m.default_variant!r} is not among its variants")
    return m
