"""The on-device enrollment store: which classes are known, from which support embeddings.

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

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
import re
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from edgemeta.arrays import load_npz
from edgemeta.atomic import fsync_dir, write_atomic
from edgemeta.errors import EdgemetaError, denied
from edgemeta.preprocess import IMAGE_SIZES
from edgemeta.runtime.heads import linear
from edgemeta.runtime.heads.linear import LinearHeadSpec
from edgemeta.runtime.heads.open_set import check_setting, recalibrate
from edgemeta.runtime.schema import MAX_ABS_VALUE, MAX_EMBEDDING_DIM, Doc, Obj, array, show

STORE_FILE = "store.npz"
LOCK_FILE = ".lock"
TMP_PREFIX, TMP_SUFFIX = ".store.", ".npz.tmp"
# The names tempfile.mkstemp gives save()'s temporary files (8 characters of [a-z0-9_]): only files of
# exactly this form are ever removed (the kill tests in tests/test_runtime.py check that they still match).
TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"[a-z0-9_]{8}" + re.escape(TMP_SUFFIX))
STORE_FORMAT = 1  # the head keys are optional, so format-1 readers and writers still get along
MAX_LABEL = 128
MAX_ADAPT_STEPS = 1000
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
T = TypeVar("T")


def check_label(label: str) -> str:
    label = label.strip() if isinstance(label, str) else ""
    if not label:
        raise EdgemetaError("a label must not be empty")
    # str.isprintable (C speed) implies _printable for every character; only a label it refuses (ZWJ,
    # no-break spaces, private use) needs the per-character test
    if len(label) > MAX_LABEL or not (label.isprintable() or all(_printable(c) for c in label)):
        raise EdgemetaError(f"label {label[:40]!r} is not allowed: at most {MAX_LABEL} printable characters")
    return label


# Bidirectional embeddings, overrides and isolates: they make a label print as another one.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _printable(c: str) -> bool:
    """Not a control (C0, DEL, C1), a lone surrogate (not text: it cannot be written as UTF-8), a
    line or paragraph separator, or a bidi control. Other format characters (ZWJ in emoji) are allowed."""
    return unicodedata.category(c) not in ("Cc", "Cs", "Zl", "Zp") and c not in _BIDI


def check_adapt(steps, lr=None) -> tuple[int, float | None]:
    """A head-adaptation setting: steps an integer in [0, MAX_ADAPT_STEPS], lr None or a finite positive number."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= MAX_ADAPT_STEPS:
        raise EdgemetaError(f"adaptation steps must be an integer from 0 (off) to {MAX_ADAPT_STEPS}, got {steps!r}")
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0):
        raise EdgemetaError(f"the adaptation learning rate must be a finite positive number, got {lr!r}")
    return steps, None if lr is None else float(lr)


def _check_finite(embeddings: np.ndarray) -> None:
    """What a store takes must be what it can read back (read_store's limits)."""
    if not np.isfinite(embeddings).all() or (embeddings.size and np.abs(embeddings).max() > MAX_ABS_VALUE):
        raise EdgemetaError(f"the model gave NaN, infinite or huge (beyond ±{MAX_ABS_VALUE:g}) embeddings for these "
                            "samples; nothing was written: check the model (re-export it) and the samples")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_store(doc: Doc, arrays: dict[str, np.ndarray]) -> tuple[dict, np.ndarray, np.ndarray, list[str], np.ndarray | None,
                                                           LinearHeadSpec | None, dict[str, np.ndarray],
                                                           tuple[np.ndarray, np.ndarray | None] | None,
                                                           np.ndarray | None]:
    """A store's arrays checked against the format above (the module docstring): (meta, embeddings float32,
    labels int32, class_names, samples, head spec, head arrays, (negatives, their samples) or None, query
    embeddings or None). Every failure names the file and the key."""
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
    return meta, emb.astype(np.float32), labels.astype(np.int32), names, samples, spec, head, negatives, queries


class EnrollmentStore:
    """Load with `EnrollmentStore.open(folder)`, change, then `save()` (inside `locked()` for writers)."""

    def __init__(self, folder: Path, meta: dict, embeddings: np.ndarray, labels: np.ndarray, class_names: list[str],
                 samples: np.ndarray | None):
        self.folder, self.meta = folder, meta
        self.embeddings, self.labels, self.class_names, self.samples = embeddings, labels, class_names, samples
        # the linear head (None: nearest prototype), set by the runtime from the model and the adapt setting
        self.head_spec: LinearHeadSpec | None = None
        self.head_w: np.ndarray | None = None
        self.head_b: np.ndarray | None = None
        self.sample_ids = np.zeros((len(embeddings), SAMPLE_ID_BYTES), np.uint8)
        self.negatives = np.zeros((0, embeddings.shape[1]), np.float32)
        self.negative_samples: np.ndarray | None = None if samples is None else np.zeros((0, *samples.shape[1:]), np.uint8)
        # each sample's one-view (query) embedding, kept when the backbone enrolls with support views
        self.query_embeddings: np.ndarray | None = (np.zeros((0, embeddings.shape[1]), np.float32)
                                                    if meta["backbone"].get("support_shift", 0) else None)

    # --- opening --------------------------------------------------------------------------

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / STORE_FILE).is_file()

    @classmethod
    def create(cls, folder: str | Path, backbone: dict, keep_samples: bool, sample_shape: tuple[int, ...]) -> EnrollmentStore:
        folder = Path(folder)
        cls.check_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dim = int(backbone["embedding_dim"])
        meta = {"format": STORE_FORMAT, "backbone": backbone, "created": _now(), "updated": _now()}
        samples = np.zeros((0, *sample_shape), np.uint8) if keep_samples else None
        return cls(folder, meta, np.zeros((0, dim), np.float32), np.zeros(0, np.int32), [], samples)

    @staticmethod
    def _own_file(name: str) -> bool:
        """The lock, the archive of replaced stores, or a temporary file of save() (left behind when a
        writer was killed)."""
        return name in (LOCK_FILE, ARCHIVE_DIR) or TMP_NAME.fullmatch(name) is not None

    @classmethod
    def archive(cls, folder: str | Path) -> Path | None:
        """Start a new store in `folder`: the current one is moved (never deleted) to
        folder/archive/store-<UTC time>.npz, where `edgemeta` never reads it again; None when there was none."""
        folder = Path(folder)
        if not cls.exists(folder):
            return None
        with cls.locked(folder):
            cls.open(folder)  # a damaged store is named, not archived unread
            kept = folder / ARCHIVE_DIR / f"store-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')}.npz"
            kept.parent.mkdir(exist_ok=True)
            os.replace(folder / STORE_FILE, kept)
            fsync_dir(kept.parent)
            fsync_dir(folder)
        return kept

    @classmethod
    def check_folder(cls, folder: Path) -> None:
        """A store folder is a store, or new, or empty (of anything but the store's own leftovers from a
        killed first write): never someone else's folder."""
        if folder.exists() and not folder.is_dir():
            raise EdgemetaError(f"{folder} is a file, not a store folder")
        if folder.is_dir() and not cls.exists(folder) and not all(cls._own_file(p.name) for p in folder.iterdir()):
            raise EdgemetaError(f"{folder} is not an enrollment store (no {STORE_FILE}) and not empty; "
                                "use a new or empty folder for --store")

    @classmethod
    def open(cls, folder: str | Path) -> EnrollmentStore:
        """Read a store, every array and meta key checked (`read_store`): a damaged one is one EdgemetaError
        line naming the file and the key, before anything could be changed and written back."""
        folder = Path(folder)
        path = folder / STORE_FILE
        if not path.is_file():
            what = "does not exist" if not folder.exists() else f"is not an enrollment store (no {STORE_FILE})"
            raise EdgemetaError(f"{folder} {what}; enroll a class first (`edgemeta enroll --store {folder} ...`)")
        try:
            arrays = load_npz(path)
        except PermissionError:  # someone else's store: theirs to share, never "damaged"
            raise denied(path, "read") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            why = str(e)[:160] if isinstance(e, ValueError) else type(e).__name__
            raise EdgemetaError(f"{path} is damaged ({why}); {STORE_FIX}") from None
        meta, emb, labels, names, samples, spec, head, negatives, queries = read_store(Doc(str(path), STORE_FIX), arrays)
        store = cls(folder, meta, emb, labels, names, samples)
        store.query_embeddings = queries
        store.head_spec, store.head_w, store.head_b = spec, head.get("w"), head.get("b")
        if "sample_ids" in arrays:
            store.sample_ids = arrays["sample_ids"]
        if negatives is not None:
            store.negatives = negatives[0]
            if store.samples is not None:
                if negatives[1] is None:  # a store keeping samples keeps its negatives' too: re-enrollment needs them
                    raise Doc(str(path), STORE_FIX).error("negative_samples", "is missing (this store keeps samples)")
                store.negative_samples = negatives[1]
        return store

    @staticmethod
    @contextlib.contextmanager
    def locked(folder: str | Path) -> Iterator[None]:
        """Exclusive writer lock on the store folder (blocks until free); removes killed writers' leftovers."""
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - closed by the with below
        except PermissionError:
            lock_file = folder / LOCK_FILE
            raise denied(lock_file if lock_file.exists() else folder, "change the store at") from None
        with lock as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                # Every writer saves under this lock, so any temporary file of save()'s form now is
                # one whose writer died before renaming it: never an acknowledged change.
                for p in folder.iterdir():
                    if TMP_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                        p.unlink(missing_ok=True)
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @classmethod
    def update(cls, folder: str | Path, change: Callable[[EnrollmentStore], T]) -> T:
        """Open the store under its lock, apply `change` to it and save it; returns what `change` returns."""
        cls.open(folder)  # a clear error before a lock file is created in a wrong folder
        with cls.locked(folder):
            store = cls.open(folder)
            result = change(store)
            store.save()
        return result

    # --- reading --------------------------------------------------------------------------

    @property
    def backbone(self) -> dict:
        return self.meta["backbone"]

    def check_backbone(self, backbone: dict) -> None:
        mine = self.backbone
        if mine.get("sha256") == backbone.get("sha256") and mine.get("embedding_dim") != backbone.get("embedding_dim"):
            raise EdgemetaError(f"store {self.folder} says its embeddings have {mine.get('embedding_dim')} dimensions, its "
                                f"model {backbone.get('model')} gives {backbone.get('embedding_dim')}; {STORE_FIX}")
        if mine.get("sha256") != backbone.get("sha256"):
            raise EdgemetaError(
                f"store {self.folder} was enrolled with {mine.get('model')}/{mine.get('variant')} "
                f"(sha256 {str(mine.get('sha256'))[:12]}), not with {backbone.get('model')}/{backbone.get('variant')} "
                f"(sha256 {str(backbone.get('sha256'))[:12]}): embeddings of different backbones do not mix; "
                + ("re-enroll the kept samples with `edgemeta reenroll`" if self.samples is not None
                   else "use the matching model or enroll into a new store"))
        if mine.get("support_shift", 0) != backbone.get("support_shift", 0):
            def views(shift):
                return f"support views of {shift} px" if shift else "no support views"
            raise EdgemetaError(
                f"store {self.folder} was enrolled with {views(mine.get('support_shift', 0))}, model "
                f"{backbone.get('model')}'s head enrolls with {views(backbone.get('support_shift', 0))}: its prototypes "
                "would mix the two; " + ("re-enroll the kept samples with `edgemeta reenroll`" if self.samples is not None
                                         else "use the matching model or enroll into a new store"))

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c[i]) for i, name in enumerate(self.class_names)}

    @property
    def adapt(self) -> dict | None:
        """The head-adaptation setting {steps, lr} (lr None: the model's own rates), or None: off."""
        return self.meta.get("adapt")

    def linear_head(self, spec: LinearHeadSpec) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) of `spec` adapted on this store's samples: the persisted ones when they are current."""
        return linear.cached(self, spec)

    def class_index(self, label: str) -> int:
        try:
            return self.class_names.index(label)
        except ValueError:
            raise EdgemetaError(f"no class {label!r} in store {self.folder}; `edgemeta classes` lists them") from None

    # --- changing (call save() afterwards) ------------------------------------------------

    def duplicates(self, ids: np.ndarray) -> list[tuple[int, str | None]]:
        """(index into `ids`, the class it is enrolled as, or None: repeated within `ids`) of each sample
        already in the store or given twice. Samples of an older store without ids are not compared."""
        known = {row.tobytes(): self.class_names[label] for row, label in zip(self.sample_ids, self.labels, strict=True)
                 if row.any()}
        out, seen = [], set()
        for i, row in enumerate(ids):
            key = row.tobytes()
            if key in known or key in seen:
                out.append((i, known.get(key)))
            seen.add(key)
        return out

    def add(self, label: str, embeddings: np.ndarray, samples: np.ndarray | None = None, ids: np.ndarray | None = None,
            queries: np.ndarray | None = None) -> int:
        """Add support samples to a class (created when new); returns the class's sample count. `ids`
        (`sample_ids` of the samples) let later enrollments find duplicates; `queries`: their one-view
        embeddings, given exactly when the store's backbone enrolls with support views."""
        label = check_label(label)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embeddings.shape[1]:
            raise EdgemetaError(f"embeddings of shape {embeddings.shape} do not fit this store (dim {self.embeddings.shape[1]})")
        if not len(embeddings):  # a class without samples has no prototype
            raise EdgemetaError(f"no samples to enroll as {label!r}; give at least one")
        _check_finite(embeddings)
        if (queries is None) != (self.query_embeddings is None) or (queries is not None and queries.shape != embeddings.shape):
            raise EdgemetaError("this store's backbone enrolls with support views: give each sample's one-view embedding "
                                "along with its support embedding" if self.query_embeddings is not None else
                                "this store's backbone enrolls without support views: give no one-view embeddings")
        if queries is not None:
            _check_finite(queries)
            self.query_embeddings = np.concatenate([self.query_embeddings, queries.astype(np.float32)])
        if label not in self.class_names:
            self.class_names.append(label)
        idx = self.class_names.index(label)
        self.embeddings = np.concatenate([self.embeddings, embeddings.astype(np.float32)])
        self.labels = np.concatenate([self.labels, np.full(len(embeddings), idx, np.int32)])
        new_ids = np.zeros((len(embeddings), SAMPLE_ID_BYTES), np.uint8) if ids is None else ids.astype(np.uint8)
        self.sample_ids = np.concatenate([self.sample_ids, new_ids])
        if self.samples is not None:
            if samples is None or samples.shape[1:] != self.samples.shape[1:]:
                raise EdgemetaError("this store keeps samples; give the preprocessed samples along with the embeddings")
            self.samples = np.concatenate([self.samples, samples.astype(np.uint8)])
        return int(np.sum(self.labels == idx))

    def forget(self, label: str) -> int:
        """Remove a class; returns how many samples it had."""
        idx = self.class_index(label)
        keep = self.labels != idx
        removed = int(np.sum(~keep))
        self.embeddings, self.labels, self.sample_ids = self.embeddings[keep], self.labels[keep], self.sample_ids[keep]
        if self.samples is not None:
            self.samples = self.samples[keep]
        if self.query_embeddings is not None:
            self.query_embeddings = self.query_embeddings[keep]
        self.labels = np.where(self.labels > idx, self.labels - 1, self.labels).astype(np.int32)
        del self.class_names[idx]
        return removed

    def rename(self, old: str, new: str) -> None:
        idx = self.class_index(old)
        new = check_label(new)
        if new in self.class_names:
            raise EdgemetaError(f"class {new!r} already exists; forget it first or choose another name")
        self.class_names[idx] = new

    def set_adapt(self, steps: int, lr: float | None) -> None:
        """Adapt the head with `steps` steps at rate `lr` (None: the model's own); 0 steps turns it off."""
        steps, lr = check_adapt(steps, lr)
        if steps:
            self.meta["adapt"] = {"steps": steps, "lr": lr}
        else:
            self.meta.pop("adapt", None)

    def add_negatives(self, embeddings: np.ndarray, samples: np.ndarray | None = None) -> int:
        """Add "none of these" samples (for the open-set calibration only); returns how many the store has."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embeddings.shape[1] or not len(embeddings):
            raise EdgemetaError(f"no negative samples of this store's dimension {self.embeddings.shape[1]} to add")
        _check_finite(embeddings)
        self.negatives = np.concatenate([self.negatives, embeddings.astype(np.float32)])
        if self.negative_samples is not None:
            if samples is None or samples.shape[1:] != self.negative_samples.shape[1:]:
                raise EdgemetaError("this store keeps samples; give the preprocessed samples along with the embeddings")
            self.negative_samples = np.concatenate([self.negative_samples, samples.astype(np.uint8)])
        return len(self.negatives)

    @property
    def open_set(self) -> dict | None:
        """The store's own unknown test (OPEN_SET_MODES), or None: the model's threshold."""
        return self.meta.get("open_set")

    def set_open_set(self, setting: dict | None) -> None:
        """Set the unknown test (None: back to the model's); a calibrated one is computed by save()."""
        if setting is None:
            self.meta.pop("open_set", None)
        else:
            self.meta["open_set"] = dict(setting)

    def set_head(self, spec: LinearHeadSpec | None) -> None:
        """The linear head to classify with (None: nearest prototype); adapted by save()."""
        self.head_spec = spec

    def replace_embeddings(self, embeddings: np.ndarray, backbone: dict, negatives: np.ndarray | None = None,
                           queries: np.ndarray | None = None) -> None:
        """After re-embedding the kept samples (and negative samples) with another backbone; `queries`: the
        samples' one-view embeddings when that backbone enrolls with support views, else None."""
        _check_finite(embeddings)
        if queries is not None:
            _check_finite(queries)
        self.query_embeddings = None if queries is None else queries.astype(np.float32)
        self.embeddings = embeddings.astype(np.float32)
        if negatives is not None:
            _check_finite(negatives)
            self.negatives = negatives.astype(np.float32)
        self.meta["backbone"] = backbone

    def save(self) -> None:
        self.meta["updated"] = _now()
        self._adapt_head()
        recalibrate(self)  # a calibrated threshold follows the store
        arrays = {"embeddings": self.embeddings, "labels": self.labels,
                  "class_names": np.array(self.class_names, dtype=str), "meta": np.array(json.dumps(self.meta))}
        if not self.class_names:
            arrays["class_names"] = np.zeros(0, dtype="<U1")
        if self.samples is not None:
            arrays["samples"] = self.samples
        if self.sample_ids.any():
            arrays["sample_ids"] = self.sample_ids
        if self.query_embeddings is not None:
            arrays["query_embeddings"] = self.query_embeddings
        if len(self.negatives):
            arrays["negatives"] = self.negatives
            if self.negative_samples is not None:
                arrays["negative_samples"] = self.negative_samples
        arrays.update(self._head_arrays())
        # what is written must open again: the same checks as open(), so a bug cannot leave an unreadable store
        read_store(Doc(f"{self.folder / STORE_FILE} (not written)", "this is a bug in edgemeta; please report it"), arrays)
        # temporary names TMP_PREFIX + 8 characters + TMP_SUFFIX: what TMP_NAME cleans up after a kill
        # 0o600: the enrolled samples are the operator's data, readable by the agent's user alone
        write_atomic(self.folder / STORE_FILE, lambda f: np.savez(f, **arrays), mode=0o600, prefix=TMP_PREFIX, suffix=TMP_SUFFIX)

    def _adapt_head(self) -> None:
        """Recompute the adapted head (on every save, so it always matches the samples), and its meta."""
        self.meta.pop("head", None)
        self.head_w = self.head_b = None
        if self.head_spec is not None:
            self.meta["head"], self.head_w, self.head_b = linear.stored_head(self.head_spec, self.embeddings, self.labels,
                                                                              len(self.class_names))

    def _head_arrays(self) -> dict[str, np.ndarray]:
        if self.head_spec is None:
            return {}
        return {HEAD_PREFIX + k: v for k, v in linear.stored_arrays(self.head_spec, self.head_w, self.head_b).items()}
