"""The enrollment store: which classes are known, from which support embeddings (the file: store/format.py).

Every change rewrites the file to a temporary name, fsyncs it and renames it over the old one
(then fsyncs the folder): a crash at any moment leaves the last good store. Writers take an
exclusive lock, so an agent and a command line can share a store. A writer killed mid-write leaves
its temporary file behind; the next writer removes it under the lock (only names of TMP_NAME's form).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from edgemeta.arrays import load_npz
from edgemeta.atomic import fsync_dir, write_atomic
from edgemeta.errors import EdgemetaError, denied
from edgemeta.runtime.heads import linear
from edgemeta.runtime.heads.common import check_adapt
from edgemeta.runtime.heads.linear import LinearHeadSpec
from edgemeta.runtime.heads.open_set import recalibrate
from edgemeta.runtime.store.format import (
    ARCHIVE_DIR,
    HEAD_PREFIX,
    LOCK_FILE,
    SAMPLE_ID_BYTES,
    STORE_FILE,
    STORE_FIX,
    STORE_FORMAT,
    TMP_NAME,
    TMP_PREFIX,
    TMP_SUFFIX,
    check_finite,
    read_store,
)
from edgemeta.runtime.store.labels import check_label
from edgemeta.schema import Doc

T = TypeVar("T")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


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
        got = read_store(Doc(str(path), STORE_FIX), arrays)
        store = cls(folder, got.meta, got.embeddings, got.labels, got.class_names, got.samples)
        store.query_embeddings = got.query_embeddings
        store.head_spec, store.head_w, store.head_b = got.head_spec, got.head.get("w"), got.head.get("b")
        if got.sample_ids is not None:
            store.sample_ids = got.sample_ids
        if got.negatives is not None:
            store.negatives = got.negatives[0]
            if store.samples is not None:
                if got.negatives[1] is None:  # a store keeping samples keeps its negatives' too: re-enrollment needs them
                    raise Doc(str(path), STORE_FIX).error("negative_samples", "is missing (this store keeps samples)")
                store.negative_samples = got.negatives[1]
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
        check_finite(embeddings)
        if (queries is None) != (self.query_embeddings is None) or (queries is not None and queries.shape != embeddings.shape):
            raise EdgemetaError("this store's backbone enrolls with support views: give each sample's one-view embedding "
                                "along with its support embedding" if self.query_embeddings is not None else
                                "this store's backbone enrolls without support views: give no one-view embeddings")
        if queries is not None:
            check_finite(queries)
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
        check_finite(embeddings)
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
        check_finite(embeddings)
        if queries is not None:
            check_finite(queries)
        self.query_embeddings = None if queries is None else queries.astype(np.float32)
        self.embeddings = embeddings.astype(np.float32)
        if negatives is not None:
            check_finite(negatives)
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
