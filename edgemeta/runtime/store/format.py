"""The enrollment store's file format: what `store.npz` holds, read into a checked `StoreFile`.

One folder holding one ``store.npz`` (arrays only, read with allow_pickle=False):
    embeddings   (n, dim) float32  support embeddings, one row per enrolled sample
    labels       (n,) int32        index into class_names
    class_names  (c,) str          labels are data, never used as file names
    samples      (n, H, W, C) uint8, optional: the preprocessed samples themselves, so classes
                 can be re-enrolled after a model upgrade
    meta         () str            JSON: format, backbone identity, timestamps, and optionally
                 "adapt" {steps, lr} (the store's head-adaptation setting), "head" {init, steps, key}
                 and "open_set" (the store's own unknown test: OPEN_SET_MODES, runtime/heads/open_set.py)
    sample_ids   (n, 16) uint8, optional: the first 16 bytes of each sample's pixels' sha256 (zeros: not
                 known, an older store), so the same image is not enrolled twice
    query_embeddings (n, dim) float32, when the model's head enrolls with support views (backbone
                 "support_shift" above 0): each sample's one-view embedding, as a query's; the open-set
                 calibration asks these, the prototypes average the support views in `embeddings`
    negatives    (m, dim) float32, optional: "none of these" samples, never a class: they only teach
                 the open-set calibration what a stranger looks like (negative_samples: their pixels,
                 kept when the store keeps samples)
    head_*       optional: the linear head the store is classified with: its spec (head_rates_w,
                 head_rates_b, head_w0, head_b0 as in a model's head.npz) and its adapted weights
                 head_w (dim, c), head_b (c,), recomputed on every save; `key` hashes what they were
                 computed from, so a head left stale (an older edgemeta rewrote the store) is recomputed
                 (runtime/heads/linear.py reads, writes and checks them).
Stores without these keys (older ones) load as before, with nothing to adapt.
Every change rewrites the file to a temporary name, fsyncs it and renames it over the old one
(then fsyncs the folder): a crash at any moment leaves the last good store. Writers take an
exclusive lock, so an agent and a command line can share a store. A writer killed mid-write leaves
its temporary file behind; the next writer removes it under the lock (only names of TMP_NAME's form).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.preprocess import IMAGE_SIZES
from edgemeta.runtime.heads import linear
from edgemeta.runtime.heads.common import MAX_ADAPT_STEPS
from edgemeta.runtime.heads.linear import LinearHeadSpec
from edgemeta.runtime.heads.open_set import check_setting
from edgemeta.runtime.store.labels import check_label
from edgemeta.schema import MAX_ABS_VALUE, MAX_EMBEDDING_DIM, Doc, Obj, array, show

STORE_FILE = "store.npz"
LOCK_FILE = ".lock"
TMP_PREFIX, TMP_SUFFIX = ".store.", ".npz.tmp"
# The names tempfile.mkstemp gives save()'s temporary files (8 characters of [a-z0-9_]): only files of
# exactly this form are ever removed (the kill tests in tests/test_runtime.py check that they still match).
TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"[a-z0-9_]{8}" + re.escape(TMP_SUFFIX))
STORE_FORMAT = 1  # the head keys are optional, so format-1 readers and writers still get along
HEAD_PREFIX = "head_"
ARCHIVE_DIR = "archive"  # stores replaced by `new_store`, kept for the user
STORE_FIX = "restore it from a backup or start a new store"
SAMPLE_ID_BYTES = 16
MAX_SUPPORT_SHIFT = IMAGE_SIZES[1] // 4  # as the manifest allows: a quarter of the image side


def sample_ids(images: np.ndarray) -> np.ndarray:
    """(n, SAMPLE_ID_BYTES) uint8: what tells two preprocessed samples apart (the same pixels, the same id)."""
    out = np.zeros((len(images), SAMPLE_ID_BYTES), np.uint8)
    for i, img in enumerate(images):
        h = hashlib.sha256(repr(img.shape).encode())
        h.update(np.ascontiguousarray(img, dtype=np.uint8).tobytes())
        out[i] = np.frombuffer(h.digest()[:SAMPLE_ID_BYTES], np.uint8)
    return out


def check_finite(embeddings: np.ndarray) -> None:
    """What a store takes must be what it can read back (read_store's limits)."""
    if not np.isfinite(embeddings).all() or (embeddings.size and np.abs(embeddings).max() > MAX_ABS_VALUE):
        raise EdgemetaError(f"the model gave NaN, infinite or huge (beyond ±{MAX_ABS_VALUE:g}) embeddings for these "
                            "samples; nothing was written: check the model (re-export it) and the samples")



@dataclass
class StoreFile:
    """What one store.npz holds, every array checked (read_store)."""

    meta: dict
    embeddings: np.ndarray  # (n, dim) float32
    labels: np.ndarray  # (n,) int32
    class_names: list[str]
    samples: np.ndarray | None
    head_spec: LinearHeadSpec | None
    head: dict[str, np.ndarray]  # the head_* arrays without their prefix
    negatives: tuple[np.ndarray, np.ndarray | None] | None  # (embeddings, their samples)
    query_embeddings: np.ndarray | None
    sample_ids: np.ndarray | None


def read_store(doc: Doc, arrays: dict[str, np.ndarray]) -> StoreFile:
    """A store's arrays checked against the format above (the module docstring). Every failure names the
    file and the key."""
    text = array(doc, "meta", arrays.get("meta"), "str", ())
    try:
        meta = json.loads(str(text))
    except (ValueError, RecursionError):
        raise doc.error("meta", "is not valid JSON") from None
    top = Obj(doc, meta, "meta")
    fmt = meta.get("format")
    if type(fmt) is not int or fmt != STORE_FORMAT:
        raise EdgemetaError(f"{doc.name} has store format {show(fmt)}, this edgemeta reads {STORE_FORMAT}")
    backbone = top.obj("backbone")
    for key in ("model", "variant", "sha256"):
        backbone.get(key, str)
    backbone.get("model_path", str, default=None)
    dim = backbone.get("embedding_dim", int, min=1, max=MAX_EMBEDDING_DIM)
    views = backbone.get("support_shift", int, default=0, min=0, max=MAX_SUPPORT_SHIFT) > 0
    top.get("created", str, default=None)
    top.get("updated", str, default=None)
    if meta.get("adapt") is not None:  # absent or null: no adaptation
        adapt = top.obj("adapt")
        adapt.get("steps", int, min=0, max=MAX_ADAPT_STEPS)
        lr = adapt.get("lr", float, default=None, nullable=True)
        if lr is not None and lr <= 0:
            raise doc.error("meta.adapt.lr", f"must be a positive number or null, got {show(lr)}")
    head_meta = top.obj("head", default=None)
    if head_meta is not None:
        head_meta.get("key", str, default=None)
    check_setting(top.obj("open_set", default=None))

    emb = array(doc, "embeddings", arrays.get("embeddings"), "float", (None, dim), finite=True)
    labels = array(doc, "labels", arrays.get("labels"), "int", (len(emb),))
    names = [str(n) for n in array(doc, "class_names", arrays.get("class_names"), "str", (None,))]
    seen: set[str] = set()  # a set: scanning the earlier names made a 10000-class store take 0.8 s to open
    for i, name in enumerate(names):
        try:
            ok = check_label(name) == name
        except EdgemetaError:
            ok = False
        if not ok or name in seen:
            why = "repeats an earlier class" if ok else "is not a valid label"
            raise doc.error(f"class_names[{i}]", f"{why}, got {show(name)}")
        seen.add(name)
    # range before the cast to int32, which would wrap a large index into range
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise doc.error("labels", f"must be class indices from 0 to {len(names) - 1}, got {labels.min()} to {labels.max()}")
    counts = np.bincount(labels.astype(np.intp), minlength=len(names))  # intp: int32 on a 32-bit board, where int64 is refused
    if len(names) and counts.min() == 0:
        raise doc.error("labels", f"must give every class a sample, class {names[int(counts.argmin())]!r} has none")
    samples = arrays.get("samples")
    if samples is not None:
        array(doc, "samples", samples, "uint8", (len(emb), None, None, None))
    queries = arrays.get("query_embeddings")
    if views and queries is None:
        raise doc.error("query_embeddings", "is missing (the store's model enrolls with support views)")
    if queries is not None:
        if not views:
            raise doc.error("query_embeddings", "is there, but the store's model enrolls without support views")
        queries = array(doc, "query_embeddings", queries, "float", (len(emb), dim), finite=True).astype(np.float32)
    head = {k[len(HEAD_PREFIX):]: v for k, v in arrays.items() if k.startswith(HEAD_PREFIX)}
    spec = linear.read_stored(doc, head_meta, head, dim, HEAD_PREFIX)
    if "sample_ids" in arrays:
        array(doc, "sample_ids", arrays["sample_ids"], "uint8", (len(emb), SAMPLE_ID_BYTES))
    negatives = None
    if "negatives" in arrays:
        neg = array(doc, "negatives", arrays["negatives"], "float", (None, dim), finite=True)
        neg_samples = arrays.get("negative_samples")
        if neg_samples is not None:
            shape = (len(neg), *samples.shape[1:]) if samples is not None else (len(neg), None, None, None)
            array(doc, "negative_samples", neg_samples, "uint8", shape)
        negatives = (neg.astype(np.float32), neg_samples)
    return StoreFile(meta, emb.astype(np.float32), labels.astype(np.int32), names, samples, spec, head, negatives, queries,
                     arrays.get("sample_ids"))


