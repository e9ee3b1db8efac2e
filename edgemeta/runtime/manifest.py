"""The model manifest: everything the board needs to know about an exported backbone.

Written by `edgemeta export` next to the .tflite files, read here. The runtime takes input
shape, quantisation, preprocessing, distance, the open-set threshold and the head from it and
from nowhere else.

Format 1 has no head section: its head is the nearest prototype under `distance`. Format 2 adds
``head``: ``{"kind": ..., ...}``, read and checked by its kind (runtime/heads/: the section each kind
writes, and the files beside the manifest it names). The top-level `distance` stays in both: the
open-set test is on prototype distance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgemeta.errors import EdgemetaError, denied
from edgemeta.files import read_regular, sha256_file
from edgemeta.preprocess import FrontEnd, read_preprocess
from edgemeta.runtime import heads
from edgemeta.runtime.heads.common import DISTANCES
from edgemeta.schema import MAX_EMBEDDING_DIM, Doc, Obj, show

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 3  # the newest; every format in READ_FORMATS is read (3: audio models, written only for them)
READ_FORMATS = (1, 2, 3)
MAX_MANIFEST_BYTES = 16 * 2**20  # a manifest is a few KB


@dataclass
class Variant:
    name: str
    file: str
    sha256: str
    quantization: str
    static_batch: int | None
    open_set_threshold: float | None
    # the calibration's median distance of a stranger to its nearest prototype (older exports: None):
    # the scale a store's own distances are compared with, to see images unlike the training data
    open_set_stranger_median: float | None = None

    @classmethod
    def from_dict(cls, name: str, d: dict | Obj) -> Variant:
        v = d if isinstance(d, Obj) else Obj(Doc("", "re-export the model"), d, f"variants.{name}")
        calibration = v.obj("open_set", default=None)
        median = calibration.get("unknown_median", float, default=None, nullable=True, min=0) if calibration else None
        return cls(name, v.file_name("file"), v.get("sha256", str), v.get("quantization", str),
                   v.get("static_batch", int, default=None, nullable=True, min=1),
                   v.get("open_set_threshold", float, default=None, nullable=True, min=0), median)


@dataclass
class Manifest:
    folder: Path
    raw: dict
    preprocess: FrontEnd
    distance: str
    embedding_dim: int
    variants: dict[str, Variant]
    default_variant: str
    head: heads.Head

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
            raise EdgemetaError(f"{path} is missing or not a file; the manifest lists it as variant {v.name}: re-export or copy it again")
        if verify and sha256_file(path) != v.sha256:
            raise EdgemetaError(f"{path} does not match its manifest checksum (damaged or replaced); re-export or copy it again")
        return path

    def sequence_paths(self, variant: str | None = None, verify: bool = True) -> tuple[Path, ...]:
        """The graphs a variant runs with besides its body (a sequence head's prefix and query graphs),
        checked against the manifest's checksums."""
        paths = self.head.graphs(self.folder, self.variant(variant), verify)
        if not paths:
            raise EdgemetaError(f"model {self.name}'s {self.head.kind} head runs no graphs of its own")
        return tuple(paths)


def read_manifest(folder_or_file: str | Path) -> Manifest:
    """Read and check a manifest (the folder holding manifest.json, or the file itself), and its head.

    Every key the runtime uses is checked here (schema.py): a bad one is one EdgemetaError line
    naming the file and the key."""
    p = Path(folder_or_file)
    path = p / MANIFEST_FILE if p.is_dir() else p
    if not path.is_file():
        raise EdgemetaError(f"no {MANIFEST_FILE} in {p}; export the model with `edgemeta export` first")
    try:
        raw = json.loads(read_regular(path, MAX_MANIFEST_BYTES, "manifest").decode())
    except PermissionError:
        raise denied(path, "read") from None
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise EdgemetaError(f"{path} is not a valid edgemeta manifest ({type(e).__name__}: {str(e)[:100]}); "
                            "re-export the model") from None
    doc = Doc(str(path), "re-export the model")
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if type(fmt) is not int or fmt not in READ_FORMATS:  # exactly an int: JSON's true and 1.0 are not formats
        raise EdgemetaError(f"{path} has manifest format {show(fmt)}; this edgemeta reads formats "
                            f"{', '.join(map(str, READ_FORMATS))}: upgrade edgemeta or re-export the model")
    top = Obj(doc, raw)
    top.get("name", str, default=None)
    dim = top.get("embedding_dim", int, min=1, max=MAX_EMBEDDING_DIM)
    distance = top.get("distance", str, choices=tuple(DISTANCES))
    pre = read_preprocess(top.get("preprocess", dict), doc)
    section = top.obj("variants")
    if not section.raw:
        raise doc.error("variants", "must name at least one variant")
    variants = {k: Variant.from_dict(k, section.obj(k)) for k in section.raw}
    default = top.get("default_variant", str, choices=tuple(variants))
    facts = heads.ModelFacts(path, distance, dim, pre.input_side)
    head = heads.read(None if raw["format"] == 1 else top.obj("head"), facts)
    return Manifest(path.parent, raw, pre, distance, dim, variants, default, head)
