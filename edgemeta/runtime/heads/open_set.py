"""The open-set threshold of an enrolled set, from the enrolled samples themselves (numpy only).

A query is answered "unknown" when its nearest prototype is farther than the threshold. The model's
threshold (calibrated at export on its validation classes) fits data like the model's training data;
on a user's own images the distances can sit on another scale altogether (photos of faces 0.7 apart
under an Omniglot model whose threshold is 22.5: every stranger accepted). So a store can calibrate
its own threshold from what it holds, by leaving samples out:

- known distances: each sample's distance to its own class's prototype computed without it (classes
  with at least 2 samples): what a new sample of an enrolled class looks like;
- stranger distances: each sample's distance to the nearest prototype of the *other* classes (as if
  its class had never been enrolled), and every "none of these" negative sample's distance to the
  nearest prototype: what a stranger looks like.

The threshold is the `accept` quantile of the known distances (that share of new samples of enrolled
classes is still answered), or, with `false_accept`, the largest threshold at which at most that share
of the strangers is accepted. Both rates are reported at the chosen threshold. Leaving a sample out
makes a class's prototype one sample weaker than the enrolled one, so the known figure is slightly
pessimistic; the stranger figure is an estimate from the enrolled classes and negatives, not a promise.

A store's unknown test is its meta "open_set" setting (`OPEN_SET_MODES`; none: the model's threshold),
which every head kind's "unknown" decision takes its threshold from (`threshold`); a calibrated one is
recomputed from the store on every save (`recalibrate`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.heads.common import DISTANCES, class_sums, prototypes
from edgemeta.schema import MAX_ABS_VALUE, Obj

if TYPE_CHECKING:
    from edgemeta.runtime.store import EnrollmentStore

DEFAULT_ACCEPT = 0.95
# meta["open_set"]["mode"]: "calibrated" (from the enrolled samples, recomputed on every save, with
# "distance", "accept" or "false_accept" and the last "report"), "manual" ("threshold" set by the user) or
# "off" (never "unknown"). No open_set key: the model's threshold.
OPEN_SET_MODES = ("calibrated", "manual", "off")
# Samples the out-of-domain warning looks at (after every CLI enroll): its cost stays flat in the store's size.
DOMAIN_SAMPLES = 512
# A store whose typical stranger distance is this many times smaller or larger than the model's
# calibration's holds images the model was not trained on (in-domain Omniglot: 0.5 to 1.6; grey face
# photos under the Omniglot model: about 0.03).
DOMAIN_RATIO = 5.0


def paired_distances(a: np.ndarray, b: np.ndarray, distance: str) -> np.ndarray:
    """Row i of `a` against row i of `b`: DISTANCES[distance] on the diagonal, without the (n, n) matrix."""
    if distance == "squared_euclidean":
        d = a.astype(np.float64) - b
        return np.einsum("ij,ij->i", d, d)
    if distance == "cosine":
        an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return 1.0 - np.einsum("ij,ij->i", an, bn)
    raise ValueError(f"unknown distance {distance!r}")


def leave_one_out(embeddings: np.ndarray, labels: np.ndarray, num_classes: int, distance: str,
                  negatives: np.ndarray | None = None, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(known distances, stranger distances) of an enrolled set, as the module docstring says. `queries`:
    each sample embedded as a query is (one view), when the prototypes average support views: the
    held-out sample is asked as a query would be, or the threshold would be tighter than the queries."""
    q = embeddings if queries is None else queries
    sums, counts = class_sums(embeddings, labels, num_classes)
    protos = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    many = counts[labels] >= 2
    own = labels[many]
    loo = (sums[own] - embeddings[many]) / (counts[own] - 1)[:, None]
    known = paired_distances(q[many], loo, distance)
    strangers = []
    if num_classes >= 2:
        strangers.append(nearest(q, protos, distance, exclude=labels))
    if negatives is not None and len(negatives):
        strangers.append(nearest(negatives, protos, distance))
    return known, np.concatenate(strangers) if strangers else np.zeros(0)


def nearest(queries: np.ndarray, protos: np.ndarray, distance: str, exclude: np.ndarray | None = None,
            rows: int = 1024) -> np.ndarray:
    """Each query's distance to its nearest prototype (not its own class `exclude[i]`), `rows` queries at a
    time: memory stays rows x classes, not samples x classes (10000 one-shot classes would be 400 MB)."""
    out = np.empty(len(queries))
    for i in range(0, len(queries), rows):
        d = DISTANCES[distance](queries[i:i + rows].astype(np.float32), protos)
        if exclude is not None:
            d[np.arange(len(d)), exclude[i:i + rows]] = np.inf
        out[i:i + rows] = d.min(axis=1)
    return out


def calibrate(embeddings: np.ndarray, labels: np.ndarray, num_classes: int, distance: str,
              negatives: np.ndarray | None = None, accept: float | None = DEFAULT_ACCEPT,
              false_accept: float | None = None, queries: np.ndarray | None = None) -> dict:
    """The store's threshold and what it is expected to do (JSON-ready); EdgemetaError when the enrolled
    set cannot tell: no class with two samples (accept), or no strangers at all (false_accept).
    `queries`: the samples' one-view embeddings under support views (`leave_one_out`)."""
    known, strangers = leave_one_out(embeddings, labels, num_classes, distance, negatives, queries)
    n_neg = 0 if negatives is None else len(negatives)
    if false_accept is not None:
        if not len(strangers):
            raise EdgemetaError("calibrating for a false-accept rate needs strangers: enroll a second class, or "
                                "negatives (`edgemeta enroll --negative`)")
        s = np.sort(strangers)
        k = math.floor(false_accept * len(s))  # accept at most k strangers: stay below the (k+1)-th
        threshold = float(np.nextafter(s[k], -np.inf)) if k < len(s) else float(s[-1])
    else:
        if not len(known):
            raise EdgemetaError("calibrating needs a class with at least 2 samples (its samples are left out one at a "
                                "time); enroll more samples of a class, or set --threshold yourself")
        threshold = float(np.quantile(known, accept))
    threshold = max(threshold, 0.0)
    return {
        "threshold": threshold,
        "known_accept": float(np.mean(known <= threshold)) if len(known) else None,
        "false_accept": float(np.mean(strangers <= threshold)) if len(strangers) else None,
        "known_samples": int(len(known)), "strangers": int(len(strangers)), "negatives": int(n_neg),
        "stranger_median": float(np.median(strangers)) if len(strangers) else None,
        "rule": (f"at most {100 * false_accept:g}% of strangers accepted" if false_accept is not None
                 else f"{100 * accept:g}% of left-out known samples accepted"),
    }


def domain_warning(stranger_median: float | None, reference: float | None) -> str | None:
    """A warning when the store's typical stranger distance is far from the model's calibration's
    (`reference`: its stranger median, else its threshold): images unlike the model's training data."""
    if not stranger_median or not reference:
        return None
    ratio = stranger_median / reference
    if 1 / DOMAIN_RATIO <= ratio <= DOMAIN_RATIO:
        return None
    return (f"these samples look unlike the model's training data: different classes sit {ratio:.2g} times as far "
            "apart as in its calibration, so expect poor accuracy and a wrong unknown test; calibrate this store "
            "(`edgemeta calibrate`) or train a model on data like yours")


# --- a store's own unknown test ---------------------------------------------------------------------------

def check_setting(open_set: Obj | None) -> None:
    """A store's meta "open_set", checked as it is read (store.py); None: the model's threshold."""
    if open_set is None:
        return
    mode = open_set.get("mode", str, choices=OPEN_SET_MODES)
    if mode == "manual":
        open_set.get("threshold", float, min=0, max=MAX_ABS_VALUE)
    if mode == "calibrated":
        open_set.get("distance", str)
        open_set.get("accept", float, default=None, nullable=True, min=0, max=1)
        open_set.get("false_accept", float, default=None, nullable=True, min=0, max=1)
        report = open_set.obj("report", default=None)
        if report is not None:
            report.get("threshold", float, default=None, nullable=True, min=0, max=MAX_ABS_VALUE)


def setting(mode: str, distance: str, accept: float | None = None, false_accept: float | None = None,
            threshold: float | None = None) -> dict | None:
    """The meta "open_set" of a mode: "calibrated" (at `accept` or `false_accept`, under `distance`),
    "manual" (`threshold`), "off", or "model" (None: the model's threshold)."""
    if mode == "calibrated" and (accept is None) == (false_accept is None):
        raise EdgemetaError("calibrate for one of --accept or --false-accept, not both")
    return {"calibrated": {"mode": "calibrated", "distance": distance, "accept": accept, "false_accept": false_accept},
            "manual": {"mode": "manual", "threshold": threshold}, "off": {"mode": "off"}, "model": None}[mode]


def threshold(open_set: dict | None, model_threshold: float | None) -> float | None:
    """The unknown test's distance for a store's setting: its own (calibrated or set), else the model's; None: off."""
    if not open_set:
        return model_threshold
    if open_set["mode"] == "off":
        return None
    if open_set["mode"] == "manual":
        return float(open_set["threshold"])
    t = (open_set.get("report") or {}).get("threshold")
    return model_threshold if t is None else float(t)


def calibrate_store(store: EnrollmentStore, open_set: dict) -> dict:
    """`calibrate` of a store's samples for a calibrated setting; EdgemetaError when the store cannot tell."""
    return calibrate(store.embeddings, store.labels, len(store.class_names), open_set["distance"], store.negatives,
                     accept=open_set.get("accept"), false_accept=open_set.get("false_accept"), queries=store.query_embeddings)


def recalibrate(store: EnrollmentStore) -> None:
    """A calibrated threshold follows the store: recomputed from what it holds on every save. When the
    store cannot tell (no class with two samples left), the report says why and the model's threshold applies."""
    o = store.open_set
    if not o or o.get("mode") != "calibrated":
        return
    try:
        o["report"] = calibrate_store(store, o)
    except EdgemetaError as e:
        o["report"] = {"threshold": None, "note": f"{e}; the model's threshold applies meanwhile"}


def describe(store: EnrollmentStore, distance: str, model_threshold: float | None, reference: float | None) -> dict:
    """What decides "unknown" for a store (JSON-ready): mode, threshold, the calibration's expected rates,
    and a warning when the enrolled samples look unlike the model's training data (`reference`: the
    model's calibration's stranger median, else its threshold)."""
    o = store.open_set or {"mode": "model"}
    out = {"mode": o["mode"], "threshold": threshold(store.open_set, model_threshold), "negatives": len(store.negatives)}
    if o["mode"] == "calibrated":
        out.update({k: v for k, v in (o.get("report") or {}).items() if k != "threshold"})
    elif o["mode"] == "model":
        out["calibration"] = "the model's, from its validation classes at export"
    if len(store.class_names) >= 2:  # a median: a seeded sample of at most DOMAIN_SAMPLES samples will do
        pick = np.random.default_rng(0).permutation(len(store.labels))[:DOMAIN_SAMPLES]
        asked = store.embeddings if store.query_embeddings is None else store.query_embeddings  # as queries are
        protos = prototypes(store.embeddings, store.labels, len(store.class_names))
        strangers = nearest(asked[pick], protos, distance, exclude=store.labels[pick])
        out["warning"] = domain_warning(float(np.median(strangers)), reference)
    return out
