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

from edgemeta.arrays import load_npz
from edgemeta.errors import EdgemetaError, denied
from edgemeta.files import open_regular, read_regular
from edgemeta.preprocess import Preprocess
from edgemeta.runtime.head import DISTANCES
from edgemeta.runtime.linear_head import LinearHeadSpec, spec_from_manifest
from edgemeta.runtime.schema import MAX_EMBEDDING_DIM, Doc, Obj, show

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 2  # the newest; every format in READ_FORMATS is read
READ_FORMATS = (1, 2)
HEAD_KINDS = ("prototype", "linear", "sequence")
SEQUENCE_QUANTIZATIONS = ("float32", "int8")
MAX_MANIFEST_BYTES = 16 * 2**20  # a manifest is a few KB
MAX_SEQUENCE = 4096  # support positions a sequence graph may have (host/methods/snail.py allows as many)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path, "model file") as f:
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


def sequence_quantization(variant_quantization: str) -> str:
    """The sequence graphs a backbone variant runs with: int8 with an int8 body, float32 otherwise."""
    return "int8" if variant_quantization == "int8" else "float32"


@dataclass(frozen=True)
class SequenceSpec:
    """A model-based head (SNAIL): its graphs per quantisation, {quant: {"prefix"|"query": (file, sha256)}},
    and the largest support set they read."""

    method: str
    max_way: int
    max_shot: int
    graphs: dict


@dataclass(frozen=True)
class Head:
    """The model's head: nearest prototype, a linear head (`linear`) adapted on the support set, or a
    sequence model (`sequence`) that reads the support set."""

    kind: str
    distance: str  # the prototype distance: the prototype head's, and the open-set test's in every kind
    linear: LinearHeadSpec | None = None
    sequence: SequenceSpec | None = None
    support_shift: int = 0  # a prototype head's support views: enrolled samples are embedded as their mean


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
            raise EdgemetaError(f"{path} is missing or not a file; the manifest lists it as variant {v.name}: re-export or copy it again")
        if verify and sha256_file(path) != v.sha256:
            raise EdgemetaError(f"{path} does not match its manifest checksum (damaged or replaced); re-export or copy it again")
        return path


    def sequence_paths(self, variant: str | None = None, verify: bool = True) -> tuple[Path, Path]:
        """The prefix and query graphs a variant runs with, checked against the manifest's checksums."""
        spec, quant = self.head.sequence, sequence_quantization(self.variant(variant).quantization)
        if spec is None or quant not in spec.graphs:
            raise EdgemetaError(f"model {self.name} has no {quant} sequence graphs for variant {self.variant(variant).name}; "
                                "re-export the model")
        paths = []
        for part in ("prefix", "query"):
            name, sha = spec.graphs[quant][part]
            path = self.folder / name
            if not path.is_file():
                raise EdgemetaError(f"{path} is missing or not a file; the manifest lists it as the {quant} sequence {part} graph: "
                                    "re-export or copy it again")
            if verify and sha256_file(path) != sha:
                raise EdgemetaError(f"{path} does not match its manifest checksum (damaged or replaced); re-export or copy it again")
            paths.append(path)
        return paths[0], paths[1]


def read_manifest(folder_or_file: str | Path) -> Manifest:
    """Read and check a manifest (the folder holding manifest.json, or the file itself), and its head.

    Every key the runtime uses is checked here (runtime/schema.py): a bad one is one EdgemetaError line
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
    pre = Preprocess.from_dict(top.get("preprocess", dict), doc)
    section = top.obj("variants")
    if not section.raw:
        raise doc.error("variants", "must name at least one variant")
    variants = {k: Variant.from_dict(k, section.obj(k)) for k in section.raw}
    default = top.get("default_variant", str, choices=tuple(variants))
    head = Head("prototype", distance) if raw["format"] == 1 else _read_head(path, top.obj("head"), distance, dim, pre)
    return Manifest(path.parent, raw, pre, distance, dim, variants, default, head)


def _read_head(path: Path, section: Obj, distance: str, dim: int, pre: Preprocess) -> Head:
    """A format-2 head section; a linear head's arrays are read from its checksummed file."""
    kind = section.raw.get("kind")
    if kind not in HEAD_KINDS or not isinstance(kind, str):
        raise EdgemetaError(f"{path}: unknown head kind {kind!r} (this edgemeta knows {', '.join(HEAD_KINDS)}); "
                            "upgrade edgemeta or re-export the model")
    if kind == "prototype":
        if section.get("distance", str, default=distance) != distance:
            raise EdgemetaError(f"{path}: head distance {section.raw['distance']!r} disagrees with the manifest's "
                                f"{distance!r}; re-export the model")
        return Head("prototype", distance, support_shift=section.get("support_shift", int, default=0, min=0,
                                                                     max=pre.image_size // 4))
    if kind == "sequence":
        return Head("sequence", distance, sequence=_read_sequence(section))
    name, sha = section.file_name("file"), section.get("sha256", str)
    per_param_said = section.get("per_parameter_rates", bool, default=False)
    file = path.parent / name
    if not file.is_file():
        raise EdgemetaError(f"{file} is missing or not a file; the manifest lists it as the model's head: re-export or copy it again")
    if sha256_file(file) != sha:
        raise EdgemetaError(f"{file} does not match its manifest checksum (damaged or replaced); re-export or copy it again")
    try:
        arrays = load_npz(file)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise EdgemetaError(f"{file} is not a readable head ({type(e).__name__}); re-export the model") from None
    spec = spec_from_manifest(section, arrays, dim, arrays_doc=Doc(str(file), "re-export the model"))
    per_param = np.asarray(spec.rates_w[0]).ndim > 0
    if per_param != per_param_said:
        raise EdgemetaError(f"{file}: its rates are {'' if per_param else 'not '}per-parameter, the manifest says "
                            f"per_parameter_rates {per_param_said}; re-export the model")
    return Head("linear", distance, spec)


def _read_sequence(section: Obj) -> SequenceSpec:
    """A sequence head's section: its limits and its graphs' files (checked when a variant opens them)."""
    max_way = section.get("max_way", int, min=2, max=MAX_SEQUENCE)
    max_shot = section.get("max_shot", int, min=1, max=MAX_SEQUENCE)
    if max_way * max_shot > MAX_SEQUENCE:
        raise section.doc.error(section.path("max_shot"), f"times max_way must be at most {MAX_SEQUENCE}, got {max_way * max_shot}")
    graphs = section.obj("graphs")
    unknown = sorted(set(graphs.raw) - set(SEQUENCE_QUANTIZATIONS))
    if unknown or not graphs.raw:
        raise section.doc.error(graphs.where, f"must hold graphs of {' or '.join(SEQUENCE_QUANTIZATIONS)}, got "
                                f"{show(sorted(graphs.raw))}")
    files = {}
    for quant in graphs.raw:
        g = graphs.obj(quant)
        files[quant] = {part: (g.obj(part).file_name("file"), g.obj(part).get("sha256", str)) for part in ("prefix", "query")}
    return SequenceSpec(section.get("method", str, default="snail"), max_way, max_shot, files)
