"""Linear softmax head adapted by a few gradient steps, in numpy (the board's and the host's).

The optimization-family methods (MAML, ANIL, Meta-SGD) classify with ``logits = emb @ W + b``
after a few steps of gradient descent on the softmax cross-entropy of the support set. On the
board the body is frozen (it is the int8 backbone) and only this head adapts; the same function
gives the host-side figures of the board path, so what is measured is what ships.

Initialisations:
- ``"learned"``: the meta-learned ``W0, b0`` (MAML, ANIL, Meta-SGD). Class ``i`` takes column ``i``;
  classes beyond the trained way start from zero columns.
- ``"proto"``: from the prototypes, ``W = 2 p``, ``b = -|p|^2``, so that before any step the head
  equals the squared-Euclidean prototype classifier (Triantafillou et al. 2020, proto-MAML).
- ``"zero"``: zeros (the "zeroing trick" of Kao et al. 2022; way-agnostic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgemeta.runtime.head import prototypes
from edgemeta.runtime.schema import Doc, Obj, array

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
