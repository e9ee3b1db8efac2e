"""The sequence head: a model-based head (SNAIL) on the board, sequence graphs over the stored support
embeddings.

The export writes two TFLite graphs of fixed shapes (host/methods/snail.py builds them):

    prefix(x (P, C0), valid (P,)) -> features (P, C)        the support sequence, once per store state
    query(xq (Q, C0), features (P, C), valid (P,)) -> logits (Q, max_way)   any number of queries

P = max_way * max_shot. A store's support (embedding + one-hot label, in a fixed seeded order,
the same on the host) fills the last positions; the first are padding: zeroed, and never read by
attention, so the answer is the unpadded sequence's. A store larger than the graph is refused
with the limit named, never answered from a cut sequence. numpy and the interpreter only.

Manifest section: ``{"kind": "sequence", "method", "max_way", "max_shot", "distance", "graphs":
{quantization: {"prefix"|"query": {"file", "sha256"}}}}``, float32 and int8 graphs: an int8 body runs
with the int8 ones, any other with float32 (`sequence_quantization`); a bundle carries its variant's
pair only. The nearest prototype still decides "unknown", as for the linear head.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgemeta.atomic import write_atomic
from edgemeta.errors import EdgemetaError
from edgemeta.files import sha256_file
from edgemeta.runtime.heads import ExportContext, Head, ModelFacts, ScoreFn, adaptation_is_for, register
from edgemeta.runtime.heads.common import answers, store_prototypes
from edgemeta.schema import show

if TYPE_CHECKING:
    from edgemeta.runtime.heads.common import Classifier, PrototypeHead
    from edgemeta.runtime.manifest import Variant
    from edgemeta.runtime.store import EnrollmentStore
    from edgemeta.schema import Obj

SEQUENCE_QUANTIZATIONS = ("float32", "int8")
MAX_SEQUENCE = 4096  # support positions a sequence graph may have (host/methods/snail.py allows as many)
CALIBRATION_CLASSES = 300  # the seeded training classes the graphs' int8 conversion is calibrated on
ORDER_SEED = 0  # the support order the host evaluates and the board classifies with


def arrange(support_emb: np.ndarray, support_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The support samples and labels in the sequence's order: a fixed seeded shuffle, so that a
    store's enrollment order (class by class) is not an order the model never saw in training."""
    order = np.random.default_rng(ORDER_SEED).permutation(len(support_labels))
    return np.asarray(support_emb, np.float32)[order], np.asarray(support_labels)[order]


def pad_support(support_emb: np.ndarray, support_labels: np.ndarray, max_way: int, max_shot: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The prefix graph's input for a support set: (P, C0) sequence (embedding + one-hot label, in the
    `arrange` order, at the last positions) and its valid mask (P,), P = max_way * max_shot."""
    x, labels = arrange(support_emb, support_labels)
    n, positions, dim = len(labels), max_way * max_shot, x.shape[1]
    seq = np.zeros((positions, dim + max_way), np.float32)
    valid = np.zeros(positions, np.float32)
    seq[positions - n:, :dim] = x
    seq[np.arange(positions - n, positions), dim + labels] = 1.0
    valid[positions - n:] = 1.0
    return seq, valid


def check_limits(counts: list[int], max_way: int, max_shot: int) -> None:
    """Refuse a support set the sequence graph cannot read: more classes or more samples per class
    than it was exported for."""
    if len(counts) > max_way:
        raise EdgemetaError(f"this model's sequence head reads at most {max_way} classes, the store would have "
                            f"{len(counts)}; forget a class first, or use a prototype model for more classes")
    if counts and max(counts) > max_shot:
        raise EdgemetaError(f"this model's sequence head reads at most {max_shot} samples per class, a class would have "
                            f"{max(counts)}; forget that class and enroll it again with at most {max_shot} samples")


class SequenceGraphs:
    """The two graphs of one quantisation, loaded; `scores` answers queries after a support set.

    The prefix's features of the last support set are kept, so asking again after the same store
    costs the queries only."""

    def __init__(self, prefix: str | Path, query: str | Path, embedding_dim: int, max_way: int, max_shot: int,
                 threads: int = 1):
        from edgemeta.runtime.interpreter import open_interpreter

        self.dim, self.max_way, self.max_shot = embedding_dim, max_way, max_shot
        self.positions, c0 = max_way * max_shot, embedding_dim + max_way
        (_, self.prefix), (_, self.query) = open_interpreter(prefix, threads), open_interpreter(query, threads)
        p_in = {len(d["shape"]): d for d in self.prefix.get_input_details()}
        q_in = self.query.get_input_details()
        self._x, self._valid = p_in.get(2), p_in.get(1)
        self._xq = next((d for d in q_in if d["shape_signature"][0] == -1), None)
        self._features = next((d for d in q_in if len(d["shape"]) == 2 and d["shape_signature"][0] != -1), None)
        self._qvalid = next((d for d in q_in if len(d["shape"]) == 1), None)
        want = f"prefix ({self.positions}, {c0}) and ({self.positions},), query (n, {c0}), (P, C), ({self.positions},)"
        ok = (None not in (self._x, self._valid, self._xq, self._features, self._qvalid)
              and tuple(self._x["shape"]) == (self.positions, c0) and tuple(self._valid["shape"]) == (self.positions,)
              and int(self._xq["shape"][1]) == c0 and int(self._features["shape"][0]) == self.positions
              and tuple(self._qvalid["shape"]) == (self.positions,))
        if ok:
            out = self.prefix.get_output_details()[0]
            ok = tuple(out["shape"]) == tuple(self._features["shape"])
            ok = ok and int(self.query.get_output_details()[0]["shape"][-1]) == max_way
        if not ok:
            raise EdgemetaError(f"{Path(prefix).name} / {Path(query).name} do not match the model (embedding size {embedding_dim}, "
                                f"at most {max_way} classes x {max_shot} shots: inputs {want}); re-export the model")
        self._batch = int(self._xq["shape"][0])
        self._cached: tuple[str, np.ndarray] | None = None

    def features(self, support_emb: np.ndarray, support_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The prefix's features of a support set (kept for the next call with the same set) and its mask."""
        check_limits(np.bincount(support_labels).tolist() if len(support_labels) else [], self.max_way, self.max_shot)
        seq, valid = pad_support(support_emb, support_labels, self.max_way, self.max_shot)
        key = hashlib.sha256(seq.tobytes()).hexdigest()
        if self._cached is None or self._cached[0] != key:
            self.prefix.set_tensor(self._x["index"], seq)
            self.prefix.set_tensor(self._valid["index"], valid)
            self.prefix.invoke()
            self._cached = (key, self.prefix.get_tensor(self.prefix.get_output_details()[0]["index"]).copy())
        return self._cached[1], valid

    def scores(self, support_emb: np.ndarray, support_labels: np.ndarray, query_emb: np.ndarray, way: int,
               batch: int = 64) -> np.ndarray:
        """Logits (Q, way) of each query embedding after the support set (labels 0..way-1)."""
        if len(support_labels) == 0:
            raise EdgemetaError("a query needs a support set: enroll some classes first")
        if way > self.max_way:
            check_limits([1] * way, self.max_way, self.max_shot)
        features, valid = self.features(support_emb, support_labels)
        query_emb = np.asarray(query_emb, np.float32)
        out = np.empty((len(query_emb), way), np.float32)
        for i in range(0, len(query_emb), batch):
            chunk = query_emb[i:i + batch]
            xq = np.concatenate([chunk, np.zeros((len(chunk), self.max_way), np.float32)], axis=1)
            if len(chunk) != self._batch:
                self.query.resize_tensor_input(self._xq["index"], [len(chunk), xq.shape[1]])
                self.query.allocate_tensors()
                self._batch = len(chunk)
            self.query.set_tensor(self._xq["index"], xq)
            self.query.set_tensor(self._features["index"], features)
            self.query.set_tensor(self._qvalid["index"], valid)
            self.query.invoke()
            out[i:i + len(chunk)] = self.query.get_tensor(self.query.get_output_details()[0]["index"])[:, :way]
        return out


class SequenceHead:
    """A store's classes read by the sequence graphs; the nearest prototype still decides "unknown"
    (the open-set threshold is on prototype distance, as for the linear head)."""

    def __init__(self, protos: PrototypeHead, graphs: SequenceGraphs, embeddings: np.ndarray, labels: np.ndarray):
        self.protos, self.graphs, self.embeddings, self.labels = protos, graphs, embeddings, labels

    @property
    def names(self) -> list[str]:
        return self.protos.names

    def classify(self, queries: np.ndarray, top_k: int = 1, unknown: str = "unknown") -> list[dict]:
        """As PrototypeHead.classify, with classes ranked by the sequence model's logits."""
        logits = self.graphs.scores(self.embeddings, self.labels, queries, len(self.names))
        return answers(self.names, -logits, self.protos.distances(queries), self.protos.threshold, top_k, unknown)


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


@register
@dataclass(frozen=True)
class Sequence(Head):
    """A model's sequence head; `loaded`: its graphs for one variant (`load`); `make_graphs`: how the
    method that hands it to export makes them, (embeddings, labels, convert, seed=) -> ({quant: {part:
    bytes}}, masks)."""

    kind = "sequence"

    distance: str
    sequence: SequenceSpec
    loaded: SequenceGraphs | None = field(default=None, compare=False, repr=False)
    make_graphs: Callable | None = field(default=None, compare=False, repr=False)

    @property
    def method(self) -> str:
        return self.sequence.method

    @classmethod
    def read(cls, section: Obj | None, facts: ModelFacts) -> Sequence:
        """The section's limits and its graphs' files (checked when a variant opens them)."""
        max_way = section.get("max_way", int, min=2, max=MAX_SEQUENCE)
        max_shot = section.get("max_shot", int, min=1, max=MAX_SEQUENCE)
        if max_way * max_shot > MAX_SEQUENCE:
            raise section.doc.error(section.path("max_shot"), f"times max_way must be at most {MAX_SEQUENCE}, "
                                    f"got {max_way * max_shot}")
        graphs = section.obj("graphs")
        unknown = sorted(set(graphs.raw) - set(SEQUENCE_QUANTIZATIONS))
        if unknown or not graphs.raw:
            raise section.doc.error(graphs.where, f"must hold graphs of {' or '.join(SEQUENCE_QUANTIZATIONS)}, got "
                                    f"{show(sorted(graphs.raw))}")
        files = {}
        for quant in graphs.raw:
            g = graphs.obj(quant)
            files[quant] = {part: (g.obj(part).file_name("file"), g.obj(part).get("sha256", str)) for part in ("prefix", "query")}
        return cls(facts.distance, SequenceSpec(section.get("method", str, default="snail"), max_way, max_shot, files))

    def to_manifest(self) -> dict:
        s = self.sequence
        return {"kind": self.kind, "method": s.method, "max_way": s.max_way, "max_shot": s.max_shot,
                "max_support": s.max_way * s.max_shot, "distance": self.distance}

    def write(self, out: Path, ctx: ExportContext) -> dict:
        """The graphs (float32 and int8), calibrated on the embeddings of CALIBRATION_CLASSES seeded training classes."""
        from edgemeta.runtime.tflite_info import read_structure

        ctx.log("converting the sequence graphs (float32, int8) ...")
        embeddings, labels = ctx.sample(CALIBRATION_CLASSES)
        graphs, masks = self.make_graphs(embeddings, labels, ctx.convert, seed=ctx.seed)
        files: dict = {}
        for quant, parts in graphs.items():
            for part, data in parts.items():
                path = out / f"sequence_{part}_{quant}.tflite"
                write_atomic(path, data)
                files.setdefault(quant, {})[part] = {"file": path.name, "sha256": sha256_file(path), "size": len(data),
                                                     "ops": read_structure(path, data).ops}
            ctx.log(f"  sequence {quant}: " + ", ".join(f"{part} {files[quant][part]['size'] / 2**20:.1f} MiB" for part in parts))
        return {"graphs": files, "masks": masks}

    def files(self, folder: Path, variant: Variant, verify: bool = True) -> list[Path]:
        return self.graphs(folder, variant, verify)

    def graphs(self, folder: Path, variant: Variant, verify: bool = True) -> list[Path]:
        """The prefix and query graphs `variant` runs with, checked against the manifest's checksums."""
        return self._paths(folder, sequence_quantization(variant.quantization), verify, f" for variant {variant.name}")

    def _paths(self, folder: Path, quant: str, verify: bool, which: str = "") -> list[Path]:
        if quant not in self.sequence.graphs:
            raise EdgemetaError(f"model {folder.name} has no {quant} sequence graphs{which}; re-export the model")
        paths = []
        for part in ("prefix", "query"):
            name, sha = self.sequence.graphs[quant][part]
            path = folder / name
            if not path.is_file():
                raise EdgemetaError(f"{path} is missing or not a file; the manifest lists it as the {quant} sequence {part} "
                                    "graph: re-export or copy it again")
            if verify and sha256_file(path) != sha:
                raise EdgemetaError(f"{path} does not match its manifest checksum (damaged or replaced); re-export or copy it again")
            paths.append(path)
        return paths

    def reduced(self, section: dict, variant: Variant) -> dict:
        quant = sequence_quantization(variant.quantization)
        return {**section, "graphs": {quant: section["graphs"][quant]}}

    def load(self, folder: Path, variant: Variant, dim: int, threads: int = 1, verify: bool = True) -> Sequence:
        s = self.sequence
        return replace(self, loaded=SequenceGraphs(*self.graphs(folder, variant, verify), dim, s.max_way, s.max_shot,
                                                   threads=threads))

    def check_adaptable(self, model: str) -> None:
        raise EdgemetaError(f"model {model} classifies with a sequence model ({self.sequence.method}), which reads the "
                            f"support set as it is: {adaptation_is_for()}")

    def check_store(self, store: EnrollmentStore) -> None:
        check_limits(list(store.counts().values()), self.sequence.max_way, self.sequence.max_shot)

    def build(self, store: EnrollmentStore, threshold: float | None) -> Classifier:
        if self.loaded is None:
            raise RuntimeError("a sequence head classifies once its graphs are loaded (Head.load)")
        return SequenceHead(store_prototypes(store, self.distance, threshold), self.loaded, store.embeddings, store.labels)

    def describe(self, store: EnrollmentStore) -> dict:
        s = self.sequence
        return {"kind": self.kind, "method": s.method, "max_way": s.max_way, "max_shot": s.max_shot, "adapt": None}

    @staticmethod
    def text(d: dict) -> str:
        return (f"sequence model ({d.get('method')}) over the store's samples, at most {d.get('max_way')} classes x "
                f"{d.get('max_shot')} samples (no adaptation)")

    def variant_scores(self, folder: Path, quantization: str, dim: int, threads: int = 1) -> tuple[ScoreFn, str]:
        quant, s = sequence_quantization(quantization), self.sequence
        graphs = SequenceGraphs(*self._paths(folder, quant, verify=True), dim, s.max_way, s.max_shot, threads=threads)
        return graphs.scores, f"the {quant} sequence graphs"

    def description(self) -> str:
        s = self.sequence
        return (f"sequence model ({s.method}) over the stored support embeddings, at most {s.max_way} classes x "
                f"{s.max_shot} shots; int8 graphs with int8 bodies, float32 graphs with float bodies")
