"""`edgemeta health`: load a model and embed one sample, the check deploy runs on a board after
installing a release (board side: numpy and the interpreter only)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.fewshot import FewShotRuntime
from edgemeta.runtime.store import EnrollmentStore


def check_health(model: str | Path, store: str | Path | None = None) -> dict:
    """{model, variant, runtime, ms, store}: the model loads and gives a finite embedding of the
    right size; `store` (when given and present) is {classes, matches_model}. A bad model raises."""
    t = time.perf_counter()
    rt = FewShotRuntime(model)
    emb = rt.embedder(np.full((1, *rt.manifest.preprocess.input_shape), 128, np.uint8))
    if emb.shape != (1, rt.manifest.embedding_dim) or not np.isfinite(emb).all():
        raise EdgemetaError(f"{model}: the model gives a bad embedding {emb.shape}")
    out = {"model": rt.manifest.name, "variant": rt.variant.name, "runtime": rt.embedder.runtime,
           "ms": round(1000 * (time.perf_counter() - t), 1), "store": None}
    if store and EnrollmentStore.exists(store):
        s = EnrollmentStore.open(store)
        out["store"] = {"classes": len(s.class_names), "matches_model": s.backbone.get("sha256") == rt.variant.sha256}
    return out
