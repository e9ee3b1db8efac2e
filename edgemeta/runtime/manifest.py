"""The model manifest: everything the board needs to know about an exported backbone.

Written by `edgemeta export` next to the .tflite files, read here. The runtime takes input
shape, quantisation, preprocessing, distance, the open-set threshold and the head from it and
from nowhere else.

Format 1 has no head section: its head is the nearest prototype under `distance`. Format 2 adds
``head``: ``{"kind": "prototype", "distance": ...}`` or ``{"kind": "linear", "init", "steps",
"file": "head.npz", "sha256", ...}``, whose arrays (learned rates, initial weights) lie beside the
manifest. The top-level `distance` stays in both: the open-set test is on prototype distance.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.preprocess import Preprocess
from edgemeta.runtime.linear_head import LinearHeadSpec, spec_from_manifest

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 2  # the newest; every format in READ_FORMATS is read
READ_FORMATS = (1, 2)
HEAD_KINDS = ("prototype", "linear")


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


@dataclass(frozen=True)
class Head:
    """The model's head: nearest prototype, or a linear head (`linear`) adapted on the support set."""

    kind: str
    distance: str  # the prototype distance: the prototype head's, and the open-set test's in either kind
    linear: LinearHeadSpec | None = None


@dataclass
class Manifest:
    folder: Path
    raw: dict
    preprocess: Preprocess
    distance: str
    embedding_dim: int
    variants: dict[str, Variant]
    default_variant: str
    head: Head

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
    """Read and check a manifest (the folder holding manifest.json, or the file itself), and its head."""
    p = Path(folder_or_file)
    path = p / MANIFEST_FILE if p.is_dir() else p
    if not path.is_file():
        raise EdgemetaError(f"no {MANIFEST_FILE} in {p}; export the model with `edgemeta export` first")
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or raw.get("format") not in READ_FORMATS:
            fmt = raw.get("format") if isinstance(raw, dict) else None
            raise EdgemetaError(f"{path} has manifest format {fmt!r}; this edgemeta reads formats "
                                f"{', '.join(map(str, READ_FORMATS))}: upgrade edgemeta or re-export the model")
        variants = {k: Variant.from_dict(k, v) for k, v in raw["variants"].items()}
        dim = int(raw["embedding_dim"])
        distance = raw["distance"]
        if not isinstance(distance, str):
            raise TypeError(f"distance must be a string, got {distance!r}")
        head = Head("prototype", distance) if raw["format"] == 1 else _read_head(path, raw["head"], distance, dim)
        m = Manifest(path.parent, raw, Preprocess.from_dict(raw["preprocess"]), distance, dim, variants,
                     raw["default_variant"], head)
    except EdgemetaError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise EdgemetaError(f"{path} is not a valid edgemeta manifest ({type(e).__name__}: {e}); re-export the model") from None
    if m.default_variant not in variants:
        raise EdgemetaError(f"{path}: default variant {m.default_variant!r} is not among its variants")
    return m


def _read_head(path: Path, section, distance: str, dim: int) -> Head:
    """A format-2 head section; a linear head's arrays are read from its checksummed file."""
    if not isinstance(section, dict) or section.get("kind") not in HEAD_KINDS:
        kind = section.get("kind") if isinstance(section, dict) else section
        raise EdgemetaError(f"{path}: unknown head kind {kind!r} (this edgemeta knows {', '.join(HEAD_KINDS)}); "
                            "upgrade edgemeta or re-export the model")
    if section["kind"] == "prototype":
        if section.get("distance", distance) != distance:
            raise EdgemetaError(f"{path}: head distance {section.get('distance')!r} disagrees with the manifest's "
                                f"{distance!r}; re-export the model")
        return Head("prototype", distance)
    name, sha = section.get("file"), section.get("sha256")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise EdgemetaError(f"{path}: the linear head's file must be a file name beside the manifest, got {name!r}; re-export")
    if not isinstance(sha, str) or not isinstance(section.get("per_parameter_rates", False), bool):
        raise EdgemetaError(f"{path}: the linear head section needs a sha256 string (and per_parameter_rates true or "
                            "false); re-export the model")
    file = path.parent / name
    if not file.is_file():
        raise EdgemetaError(f"{file} is missing; the manifest lists it as the model's head: re-export or copy it again")
    if sha256_file(file) != sha:
        raise EdgemetaError(f"{file} does not match its manifest checksum (damaged or replaced); re-export or copy it again")
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise EdgemetaError(f"{file} is not a readable head ({type(e).__name__}); re-export the model") from None
    try:
        spec = spec_from_manifest(section, arrays, dim)
        per_param = np.asarray(spec.rates_w[0]).ndim > 0
    except (ValueError, TypeError, IndexError) as e:
        raise EdgemetaError(f"{file} does not fit the manifest's head ({e}); re-export the model") from None
    if per_param != section.get("per_parameter_rates", False):
        raise EdgemetaError(f"{file}: its rates are {'' if per_param else 'not '}per-parameter, the manifest says "
                            f"per_parameter_rates {section.get('per_parameter_rates', False)}; re-export the model")
    return Head("linear", distance, spec)
