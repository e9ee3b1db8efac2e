"""The linear head: a softmax head adapted by a few gradient steps, in numpy (the board's and the host's).

The optimization-family methods (MAML, ANIL, Meta-SGD) classify with ``logits = emb @ W + b``
after a few steps of gradient descent on the softmax cross-entropy of the support set. On the
board the body is frozen (it is the int8 backbone) and only this head adapts; the same function
gives the host-side figures of the board path, so what is measured is what ships. Any store may
also adapt one (`edgemeta adapt`): over a prototype model it starts from the prototypes.

Initialisations:
- ``"learned"``: the meta-learned ``W0, b0`` (MAML, ANIL, Meta-SGD). Class ``i`` takes column ``i``;
  classes beyond the trained way start from zero columns.
- ``"proto"``: from the prototypes, ``W = 2 p``, ``b = -|p|^2``, so that before any step the head
  equals the squared-Euclidean prototype classifier (Triantafillou et al. 2020, proto-MAML).
- ``"zero"``: zeros (the "zeroing trick" of Kao et al. 2022; way-agnostic).

Manifest section: ``{"kind": "linear", "init", "steps", "per_parameter_rates", "file": "head.npz",
"sha256"}``; the arrays (learned rates, initial weights) lie beside the manifest in ``head.npz``. A
store keeps the head it is classified with and its adapted weights (``head_*`` arrays, store.py),
recomputed on every change and read back while current (`cached`). The nearest prototype still
decides "unknown": the open-set threshold was calibrated on prototype distances.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgemeta.arrays import load_npz
from edgemeta.atomic import write_atomic
from edgemeta.errors import EdgemetaError
from edgemeta.files import sha256_file
from edgemeta.runtime.heads import ExportContext, Head, ModelFacts, register
from edgemeta.runtime.heads.common import PrototypeHead, answers, prototypes, store_prototypes
from edgemeta.schema import MAX_ABS_VALUE, Doc, Obj, array

if TYPE_CHECKING:
    from edgemeta.runtime.heads.common import Classifier
    from edgemeta.runtime.manifest import Variant
    from edgemeta.runtime.store import EnrollmentStore

INITS = ("learned", "proto", "zero")
MAX_STEPS = 1000  # adaptation steps a head may take (a board adapts on every change of its store)


@dataclass
class LinearHeadSpec:
    """What a model's manifest says about its head. ``rates_w``/``rates_b`` hold one learning rate
    per step: a scalar, or an array shaped like W / b (Meta-SGD's per-parameter rates)."""

    init: str = "proto"
    steps: int = 0
    rates_w: list = field(default_factory=list)
    rates_b: list = field(default_factory=list)
    w0: np.ndarray | None = None
    b0: np.ndarray | None = None

    def rate(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The learning rates of step k (the last one is reused past the learned steps)."""
        k = min(k, len(self.rates_w) - 1)
        return np.asarray(self.rates_w[k], np.float32), np.asarray(self.rates_b[k], np.float32)


def initial_head(spec: LinearHeadSpec, support: np.ndarray, labels: np.ndarray, way: int) -> tuple[np.ndarray, np.ndarray]:
    dim = support.shape[1]
    if spec.init == "proto":
        p = prototypes(support, labels, way).astype(np.float32)
        return 2.0 * p.T, -np.einsum("ij,ij->i", p, p)
    w, b = np.zeros((dim, way), np.float32), np.zeros(way, np.float32)
    if spec.init == "learned":
        n = min(way, spec.w0.shape[1])
        w[:, :n], b[:n] = spec.w0[:, :n], spec.b0[:n]
    return w, b


def _slice_rate(rate: np.ndarray, way: int) -> np.ndarray:
    """A per-parameter rate array of the trained way, cut or padded (with its mean) to `way` classes."""
    if rate.ndim == 0 or rate.shape[-1] == way:
        return rate
    if rate.shape[-1] > way:
        return rate[..., :way]
    pad = np.full(rate.shape[:-1] + (way - rate.shape[-1],), rate.mean(), np.float32)
    return np.concatenate([rate, pad], axis=-1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def adapt_linear(spec: LinearHeadSpec, support: np.ndarray, labels: np.ndarray, way: int,
                 steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) after `steps` (default: the spec's) gradient steps of mean softmax cross-entropy on the support set."""
    support = support.astype(np.float32)
    w, b = initial_head(spec, support, labels, way)
    onehot = np.eye(way, dtype=np.float32)[labels]
    for k in range(spec.steps if steps is None else steps):
        d = (softmax(support @ w + b) - onehot) / len(support)  # d loss / d logits
        rw, rb = spec.rate(k)
        w = w - _slice_rate(rw, way) * (support.T @ d)
        b = b - _slice_rate(rb, way) * d.sum(axis=0)
    return w, b


def linear_scores(spec: LinearHeadSpec, support: np.ndarray, labels: np.ndarray, query: np.ndarray, way: int) -> np.ndarray:
    """Logits of the queries after adapting the head on the support set."""
    w, b = adapt_linear(spec, support, labels, way)
    return query.astype(np.float32) @ w + b


def spec_arrays(spec: LinearHeadSpec) -> dict[str, np.ndarray]:
    """The arrays of a spec as written to an exported model's ``head.npz``."""
    out = {"rates_w": np.stack([np.asarray(r, np.float32) for r in spec.rates_w]),
           "rates_b": np.stack([np.asarray(r, np.float32) for r in spec.rates_b])}
    if spec.init == "learned":
        out["w0"], out["b0"] = spec.w0.astype(np.float32), spec.b0.astype(np.float32)
    return out


def spec_from_manifest(section: dict | Obj, arrays: dict[str, np.ndarray], dim: int, *, arrays_doc: Doc | None = None,
                       prefix: str = "") -> LinearHeadSpec:
    """A linear head from a manifest's ``head`` section and its ``head.npz`` arrays (or a store's meta
    "head" and its ``head_*`` arrays: `prefix`), checked against the embedding size: float arrays of the
    right shapes, finite. Raises EdgemetaError naming the file (`section`'s document, `arrays_doc`) and the key."""
    s = section if isinstance(section, Obj) else Obj(Doc("", "re-export the model"), section, "head")
    adoc = arrays_doc or Doc("", s.doc.fix)
    init = s.get("init", str, choices=INITS)
    steps = s.get("steps", int, min=0, max=MAX_STEPS)
    w0 = b0 = None
    if init == "learned":
        w0 = array(adoc, prefix + "w0", arrays.get("w0"), "float", (dim, None), finite=True)
        b0 = array(adoc, prefix + "b0", arrays.get("b0"), "float", (w0.shape[1],), finite=True)

    def rates(key: str, like: np.ndarray | None) -> np.ndarray:
        """One rate per step: a scalar each, or (Meta-SGD, learned init only) an array shaped like W / b."""
        a = arrays.get(key)
        per_param = like is not None and isinstance(a, np.ndarray) and a.ndim > 1
        return array(adoc, prefix + key, a, "float", (None, *like.shape) if per_param else (None,), finite=True)

    rates_w, rates_b = rates("rates_w", w0), rates("rates_b", b0)
    if len(rates_w) < 1 or len(rates_w) != len(rates_b):
        raise adoc.error(prefix + "rates_w", f"and {prefix}rates_b need one rate per step, the same number of steps "
                         f"(at least 1), got {len(rates_w)} and {len(rates_b)}")
    return LinearHeadSpec(init=init, steps=steps, rates_w=list(rates_w), rates_b=list(rates_b), w0=w0, b0=b0)


# --- a store's adapted head: recomputed on every change, read back while current --------------------------

def head_key(spec: LinearHeadSpec, embeddings: np.ndarray, labels: np.ndarray, way: int) -> str:
    """What an adapted head is a function of: its spec and the support set."""
    h = hashlib.sha256(json.dumps([spec.init, spec.steps, way]).encode())
    for name, a in sorted(spec_arrays(spec).items()) + [("embeddings", embeddings), ("labels", labels)]:
        a = np.ascontiguousarray(a)
        h.update(f"{name}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def adapted(spec: LinearHeadSpec, embeddings: np.ndarray, labels: np.ndarray, way: int) -> tuple[np.ndarray, np.ndarray]:
    """adapt_linear, refused when it diverged: a rate too large gives NaN / huge weights, hence NaN answers."""
    with np.errstate(over="ignore", invalid="ignore"):
        w, b = adapt_linear(spec, embeddings, labels, way)
    if not (np.isfinite(w).all() and np.isfinite(b).all()) or max(np.abs(w).max(), np.abs(b).max()) > MAX_ABS_VALUE:
        raise EdgemetaError(f"adapting the head ({spec.steps} step(s)) diverged to NaN or huge weights; use a smaller "
                            "rate (`edgemeta adapt --lr`) or fewer steps")
    return w, b


def stored_head(spec: LinearHeadSpec, embeddings: np.ndarray, labels: np.ndarray, way: int
                ) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    """What a store saves of its head: (meta "head" {init, steps, key}, W, b); no weights without classes."""
    if not way:
        return {"init": spec.init, "steps": spec.steps}, None, None
    w, b = adapted(spec, embeddings, labels, way)
    return {"init": spec.init, "steps": spec.steps, "key": head_key(spec, embeddings, labels, way)}, w, b


def stored_arrays(spec: LinearHeadSpec, w: np.ndarray | None, b: np.ndarray | None) -> dict[str, np.ndarray]:
    """A store's head arrays (store.py prefixes them): the spec's, as in head.npz, and the adapted W, b."""
    arrays = dict(spec_arrays(spec))
    if w is not None:
        arrays.update(w=w.astype(np.float32), b=b.astype(np.float32))
    return arrays


def read_stored(doc: Doc, meta: Obj | None, arrays: dict[str, np.ndarray], dim: int, prefix: str) -> LinearHeadSpec | None:
    """A store's head, checked: its meta "head" and its arrays (`prefix` stripped); None when it has none.
    Adapted weights of shapes that no longer fit are stale, recomputed (`cached`), not refused."""
    if meta is not None:
        meta.get("key", str, default=None)
    for key, ndim in (("w", 2), ("b", 1)):
        if key in arrays:
            array(doc, prefix + key, arrays[key], "float", (None,) * ndim, finite=True)
    if meta is None or "rates_w" not in arrays:  # no arrays: an older writer dropped them
        return None
    return spec_from_manifest(meta, arrays, dim, arrays_doc=doc, prefix=prefix)


def cached(store: EnrollmentStore, spec: LinearHeadSpec) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of `spec` adapted on a store's samples: the persisted ones when they are current."""
    way, meta = len(store.class_names), store.meta.get("head")
    key = meta.get("key") if isinstance(meta, dict) else None
    if (store.head_w is not None and store.head_b is not None and store.head_w.shape == (store.embeddings.shape[1], way)
            and store.head_b.shape == (way,) and key == head_key(spec, store.embeddings, store.labels, way)):
        return store.head_w, store.head_b
    return adapted(spec, store.embeddings, store.labels, way)


class LinearHead:
    """A linear softmax head (``logits = emb @ w + b``) over the same classes as a PrototypeHead, which
    still decides "unknown": the open-set threshold was calibrated on nearest-prototype distances, so
    that test stays as it is."""

    def __init__(self, protos: PrototypeHead, w: np.ndarray, b: np.ndarray):
        if w.shape != (protos.dim, len(protos.names)) or b.shape != (len(protos.names),):
            raise ValueError(f"head of shape {w.shape}, {b.shape} does not fit {len(protos.names)} classes of dim {protos.dim}")
        self.protos, self.w, self.b = protos, w.astype(np.float32), b.astype(np.float32)

    @property
    def names(self) -> list[str]:
        return self.protos.names

    def classify(self, queries: np.ndarray, top_k: int = 1, unknown: str = "unknown") -> list[dict]:
        """As PrototypeHead.classify, with classes ranked by logits and probabilities their softmax."""
        dist = self.protos.distances(queries)
        logits = queries.astype(np.float32) @ self.w + self.b
        return answers(self.names, -logits, dist, self.protos.threshold, top_k, unknown)


def over_prototypes(protos: PrototypeHead, store: EnrollmentStore, spec: LinearHeadSpec | None) -> Classifier:
    """A store's classifier: `spec` adapted over its samples (persisted by its last change), or, without a
    spec (or a class), the prototypes themselves."""
    if spec is None or not store.class_names:
        return protos
    return LinearHead(protos, *cached(store, spec))


def describe_adapted(spec: LinearHeadSpec, store: EnrollmentStore) -> dict:
    """A store classified by a linear head, JSON-ready (`Linear.text` reads it)."""
    lr = store.adapt.get("lr") if store.adapt else None
    return {"kind": Linear.kind, "init": spec.init, "steps": spec.steps, "lr": lr, "adapt": store.adapt}


HEAD_NPZ = "head.npz"  # the arrays of a model's linear head, beside its manifest


@register
@dataclass(frozen=True)
class Linear(Head):
    """A model's linear head: its spec, and the file of its arrays (`file`, `sha256`) once written."""

    kind = "linear"
    chosen_on_validation = True  # a body meta-trained to be adapted can leave its frozen-body head near chance
    adapts = True

    distance: str
    linear: LinearHeadSpec
    per_parameter_rates: bool = False
    method: str | None = None
    file: str = HEAD_NPZ
    sha256: str | None = None

    @classmethod
    def read(cls, section: Obj | None, facts: ModelFacts) -> Linear:
        name, sha = section.file_name("file"), section.get("sha256", str)
        per_param_said = section.get("per_parameter_rates", bool, default=False)
        file = facts.path.parent / name
        _check_file(file, sha)
        try:
            arrays = load_npz(file)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise EdgemetaError(f"{file} is not a readable head ({type(e).__name__}); re-export the model") from None
        spec = spec_from_manifest(section, arrays, facts.embedding_dim, arrays_doc=Doc(str(file), "re-export the model"))
        per_param = np.asarray(spec.rates_w[0]).ndim > 0
        if per_param != per_param_said:
            raise EdgemetaError(f"{file}: its rates are {'' if per_param else 'not '}per-parameter, the manifest says "
                                f"per_parameter_rates {per_param_said}; re-export the model")
        method = section.raw.get("method")
        return cls(facts.distance, spec, per_param, method if isinstance(method, str) else None, name, sha)

    def to_manifest(self) -> dict:
        return {"kind": self.kind, "init": self.linear.init, "steps": self.linear.steps, "method": self.method,
                "per_parameter_rates": self.per_parameter_rates}

    def write(self, out: Path, ctx: ExportContext) -> dict:
        arrays = spec_arrays(self.linear)
        write_atomic(out / self.file, lambda f: np.savez(f, **arrays))
        return {"file": self.file, "sha256": sha256_file(out / self.file)}

    def files(self, folder: Path, variant: Variant, verify: bool = True) -> list[Path]:
        if verify:
            _check_file(folder / self.file, self.sha256)
        return [folder / self.file]

    def linear_head(self, adapt: tuple[int, float | None] | None) -> LinearHeadSpec:
        if adapt is None:
            return self.linear
        steps, lr = adapt
        return replace(self.linear, steps=steps) if lr is None else replace(self.linear, steps=steps, rates_w=[lr], rates_b=[lr])

    def build(self, store: EnrollmentStore, threshold: float | None) -> Classifier:
        return over_prototypes(store_prototypes(store, self.distance, threshold), store, self.store_linear_head(store))

    def describe(self, store: EnrollmentStore) -> dict:
        return describe_adapted(self.store_linear_head(store), store)

    @staticmethod
    def text(d: dict) -> str:
        lr = "the model's learned rates" if d["lr"] is None else f"rate {d['lr']:g}"
        return f"linear head, {d['init']} init, {d['steps']} step(s) at {lr}"

    def scores(self, support: np.ndarray, labels: np.ndarray, queries: np.ndarray, way: int) -> np.ndarray:
        return linear_scores(self.linear, support, labels, queries, way)

    def description(self) -> str:
        return f"linear, {self.linear.init} init, {self.linear.steps} steps over the frozen body's embeddings"


def _check_file(file: Path, sha: str | None) -> None:
    if not file.is_file():
        raise EdgemetaError(f"{file} is missing or not a file; the manifest lists it as the model's head: re-export or copy it again")
    if sha is not None and sha256_file(file) != sha:
        raise EdgemetaError(f"{file} does not match its manifest checksum (damaged or replaced); re-export or copy it again")
