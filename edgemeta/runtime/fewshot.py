"""Few-shot enrollment and classification on the board: manifest + interpreter + store + head.

>>> rt = FewShotRuntime("models/omniglot-conv4")                   # doctest: +SKIP
>>> rt.enroll("store/", "alpha", ["a1.png", "a2.png"])             # doctest: +SKIP
>>> rt.adapt("store/", steps=10)                                   # doctest: +SKIP
>>> rt.classify("store/", ["query.png"], top_k=3)                  # doctest: +SKIP

The head a store is classified with is the model's (runtime/heads/: nearest prototype, the manifest's
linear head with its steps, a sequence model), or, once the store has an adapt setting, a linear head
adapted with that many steps (prototype models: initialised from the prototypes, proto-MAML). The
adapted weights are recomputed and saved with every change of the store, so classify only reads them.
Whatever the head, "unknown" is the nearest prototype farther than the store's threshold
(runtime/heads/open_set.py: the model's, or the store's own).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgemeta.boards import Board, load_board_file
from edgemeta.errors import EdgemetaError
from edgemeta.preprocess import ImageLimits, load_images
from edgemeta.runtime.heads import open_set
from edgemeta.runtime.heads.common import Classifier, embed_support
from edgemeta.runtime.heads.linear import LinearHeadSpec
from edgemeta.runtime.interpreter import Embedder
from edgemeta.runtime.manifest import read_manifest
from edgemeta.runtime.store import EnrollmentStore, check_adapt, check_label, sample_ids

UNKNOWN = "unknown"
# A deployed release keeps the board profile it was built for beside its model folder.
RELEASE_BOARD_FILE = "board.toml"


class Enrolled(NamedTuple):
    """What an enrollment did: the class's sample count now, how many samples were added, and the
    duplicates skipped (a name each, saying why)."""

    samples: int
    added: int
    duplicates: list[str]


def release_board(model: str | Path) -> Board | None:
    """The board profile of the release a model folder belongs to (its board.toml beside the model), or None."""
    path = Path(model).parent / RELEASE_BOARD_FILE
    return load_board_file(path) if path.is_file() else None


class FewShotRuntime:
    """One loaded backbone. `enroll`/`forget`/`rename` change a store atomically; `classify` reads it.

    Images are decoded within `limits`: given, else the release's board profile's (board.toml beside
    the model folder), else `ImageLimits.default()`."""

    def __init__(self, model: str | Path, variant: str | None = None, threads: int = 1, edgetpu: str | None = None,
                 verify: bool = True, xnnpack: bool = True, limits: ImageLimits | None = None):
        self.board = release_board(model)
        self.limits = limits or (self.board.image_limits if self.board else ImageLimits.default())
        self.manifest = read_manifest(model)
        self.variant = self.manifest.variant(variant)
        self.embedder = Embedder(self.manifest.model_path(self.variant.name, verify), threads=threads, edgetpu=edgetpu,
                                 xnnpack=xnnpack)
        pre = self.manifest.preprocess
        if self.embedder.input_shape != pre.input_shape or self.embedder.dim != self.manifest.embedding_dim:
            raise EdgemetaError(f"{self.variant.file} does not match its manifest: model input {self.embedder.input_shape} "
                                f"-> {self.embedder.dim}, manifest {pre.input_shape} -> {self.manifest.embedding_dim}; re-export")
        self.threshold_of_model = self.variant.open_set_threshold
        # the model's head (runtime/heads/), with what it runs for this variant loaded along with the body
        self.model_head = self.manifest.head.load(self.manifest.folder, self.variant, self.manifest.embedding_dim, threads,
                                                  verify)
        self.backbone = {"model": self.manifest.name, "variant": self.variant.name, "sha256": self.variant.sha256,
                         "embedding_dim": self.manifest.embedding_dim, "model_path": str(Path(model))}
        if self.model_head.support_shift:  # a store's prototypes must not mix samples embedded with and without views
            self.backbone["support_shift"] = self.model_head.support_shift

    @property
    def support_shift(self) -> int:
        """The support views this runtime enrolls with: its store identity's (`backbone`), one source of truth."""
        return int(self.backbone.get("support_shift", 0))

    def images(self, files: list[str | Path]) -> tuple[np.ndarray, list[str]]:
        return load_images(files, self.manifest.preprocess, limits=self.limits)

    def embed_support(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Enrolled samples' (support embeddings, one-view embeddings or None): with the head's support
        views, the mean over each sample's views and, for the store's open-set calibration, its plain
        embedding (what a query of it would give); without them, the plain embedding and None."""
        plain = self.embedder(images)
        if not self.support_shift:
            return plain, None
        return embed_support(self.embedder, images, self.support_shift, plain), plain

    def open_store(self, folder: str | Path) -> EnrollmentStore:
        store = EnrollmentStore.open(folder)
        store.check_backbone(self.backbone)
        return store

    def head_spec(self, adapt: dict | None) -> LinearHeadSpec | None:
        """The linear head for a store's adapt setting (None: the model's head itself classifies)."""
        if not adapt:
            return self.model_head.linear_head(None)
        self.model_head.check_adaptable(self.manifest.name)
        return self.model_head.linear_head(check_adapt(adapt.get("steps"), adapt.get("lr")))

    def save(self, store: EnrollmentStore) -> None:
        """Save a changed store (inside its lock) with its head adapted for this model; a store that the
        model's head cannot read (past a sequence head's limits) is refused before anything is written."""
        self.model_head.check_store(store)
        store.set_head(self.head_spec(store.adapt))
        store.save()

    def enroll(self, folder: str | Path, label: str, files: list[str | Path], keep_samples: bool = True,
               adapt: tuple[int, float | None] | None = None, allow_duplicates: bool = False) -> Enrolled:
        """Embed the samples and add them to the class (created if new): see `enroll_images`.
        `adapt` (steps, lr) also sets the store's adaptation, as `adapt` does."""
        if adapt is not None:
            check_adapt(*adapt)
        images, names = self.images(files)  # all inputs are read before the store is touched
        return self.enroll_images(folder, label, images, keep_samples, adapt, names=names, allow_duplicates=allow_duplicates)

    def enroll_images(self, folder: str | Path, label: str, images: np.ndarray, keep_samples: bool = True,
                      adapt: tuple[int, float | None] | None = None, names: list[str] | None = None,
                      allow_duplicates: bool = False) -> Enrolled:
        """`enroll` for images already preprocessed to the model's input: `enroll_classes` of one class."""
        return self.enroll_classes(folder, [(label, images, names)], keep_samples, adapt, allow_duplicates)[0]

    def enroll_classes(self, folder: str | Path, classes: list[tuple[str, np.ndarray, list[str] | None]],
                       keep_samples: bool = True, adapt: tuple[int, float | None] | None = None,
                       allow_duplicates: bool = False) -> list[Enrolled]:
        """Enroll (label, preprocessed images, their names or None) for each class, in one change of the
        store: all or nothing. A sample already in the store (the same pixels) or given twice is skipped
        and reported, unless `allow_duplicates`: so a retried request (its answer lost on a serial line)
        does not count its samples twice. Nothing is written when nothing changes."""
        if adapt is not None:
            adapt = self._resolve_adapt(*adapt)
        for label, _, _ in classes:
            check_label(label)
        embedded = [(*self.embed_support(images), sample_ids(images)) for _, images, _ in classes]
        EnrollmentStore.check_folder(Path(folder))
        with EnrollmentStore.locked(folder):
            if EnrollmentStore.exists(folder):
                store = self.open_store(folder)
            else:
                store = EnrollmentStore.create(folder, self.backbone, keep_samples, self.manifest.preprocess.input_shape)
            done = []
            for (label, images, names), (embeddings, queries, ids) in zip(classes, embedded, strict=True):
                dups = [] if allow_duplicates else store.duplicates(ids)
                skipped = [(names[i] if names else f"sample {i + 1}")
                           + (f" (already enrolled as {known!r})" if known is not None else " (given twice)") for i, known in dups]
                fresh = np.setdiff1d(np.arange(len(images)), [i for i, _ in dups]).astype(np.intp)
                count = (store.add(label, embeddings[fresh], images[fresh] if store.samples is not None else None, ids[fresh],
                                   None if queries is None else queries[fresh])
                         if len(fresh) else store.counts().get(check_label(label), 0))
                done.append(Enrolled(count, len(fresh), skipped))
            if adapt is not None:
                store.set_adapt(*adapt)
            if adapt is not None or any(d.added for d in done):
                self.save(store)
        return done

    def enroll_negatives(self, folder: str | Path, images: np.ndarray) -> int:
        """Add "none of these" samples to a store (open-set calibration only); returns how many it has."""
        embeddings = self.embedder(images)
        with EnrollmentStore.locked(folder):
            store = self.open_store(folder)
            count = store.add_negatives(embeddings, images if store.negative_samples is not None else None)
            self.save(store)
        return count

    def threshold(self, store: EnrollmentStore) -> float | None:
        """The unknown test's distance for a store: its own (calibrated or set), else the model's; None: off."""
        return open_set.threshold(store.open_set, self.threshold_of_model)

    def set_open_set(self, folder: str | Path, mode: str, accept: float | None = None, false_accept: float | None = None,
                     threshold: float | None = None) -> dict:
        """Set a store's unknown test: "calibrated" (from its samples, at `accept` or `false_accept`),
        "manual" (`threshold`), "off", or "model" (the model's threshold); returns describe_open_set."""
        setting = open_set.setting(mode, self.manifest.distance, accept, false_accept, threshold)
        EnrollmentStore.open(folder)
        with EnrollmentStore.locked(folder):
            store = self.open_store(folder)
            if mode == "calibrated":  # refuse now what would only leave a note in the store
                open_set.calibrate_store(store, setting)
            store.set_open_set(setting)
            self.save(store)
        return self.describe_open_set(store)

    def describe_open_set(self, store: EnrollmentStore) -> dict:
        """What decides "unknown" for a store (JSON-ready): mode, threshold, the calibration's expected
        rates and a warning when the enrolled samples look unlike the model's training data."""
        return open_set.describe(store, self.manifest.distance, self.threshold_of_model,
                                 self.variant.open_set_stranger_median or self.threshold_of_model)

    def _resolve_adapt(self, steps: int, lr: float | None) -> tuple[int, float | None]:
        """A checked setting, with a prototype model's default rate written out (a linear model's None
        means its own learned rates)."""
        steps, lr = check_adapt(steps, lr)
        if steps:
            self.model_head.check_adaptable(self.manifest.name)
        return self.model_head.adapt_setting(steps, lr)

    def adapt(self, folder: str | Path, steps: int, lr: float | None = None) -> dict:
        """Set a store's head adaptation (0 steps: off, back to the model's own head); returns the setting."""
        steps, lr = self._resolve_adapt(steps, lr)
        EnrollmentStore.open(folder)  # a clear error before a lock file is created in a wrong folder
        with EnrollmentStore.locked(folder):
            store = self.open_store(folder)
            store.set_adapt(steps, lr)
            self.save(store)
        return self.describe_head(store)

    def describe_head(self, store: EnrollmentStore) -> dict:
        """What a store is classified with, JSON-ready: {"kind", ...} as its head kind says (heads.describe_text)."""
        return self.model_head.describe(store)

    def reenroll(self, folder: str | Path) -> int:
        """Re-embed a store's kept samples with this backbone (after a model upgrade); returns the sample count."""
        with EnrollmentStore.locked(folder):
            store = EnrollmentStore.open(folder)
            self._reembed(store)
            self.save(store)
        return len(store.labels)

    def carry(self, folder: str | Path, to: str | Path) -> dict:
        """A copy of the store in `folder` for this model, written into the new folder `to` (`folder` is
        only read, under its lock): its kept samples re-embedded, or the same store when it was
        enrolled with this model already. What a board's activation runs before it switches models."""
        to = Path(to)
        if to.exists() and any(to.iterdir()):
            raise EdgemetaError(f"{to} is not empty; carry writes a new store folder")
        with EnrollmentStore.locked(folder):
            store = EnrollmentStore.open(folder)
            try:
                store.check_backbone(self.backbone)
                how = "same model"
            except EdgemetaError:
                self._reembed(store)
                how = "re-embedded"
            store.folder = to
            to.mkdir(parents=True, exist_ok=True)
            self.save(store)
        return {"carried": how, "classes": len(store.class_names), "samples": len(store.labels),
                "model": self.backbone["model"], "variant": self.backbone["variant"]}

    def _reembed(self, store: EnrollmentStore) -> None:
        if store.samples is None:
            raise EdgemetaError(f"store {store.folder} kept no samples (enroll with --keep-samples), so model "
                                f"{self.manifest.name} cannot use its {len(store.class_names)} class(es): enroll them again")
        if store.samples.shape[1:] != self.manifest.preprocess.input_shape:
            raise EdgemetaError(f"the kept samples are {store.samples.shape[1:]}, model {self.manifest.name} takes "
                                f"{self.manifest.preprocess.input_shape} (another input kind): enroll the classes again")
        negatives = None if store.negative_samples is None or not len(store.negative_samples) else \
            self.embedder(store.negative_samples)
        support, queries = self.embed_support(store.samples)
        store.replace_embeddings(support, self.backbone, negatives, queries)

    def head(self, store: EnrollmentStore) -> Classifier:
        """The classifier of a store, built by the model's head with the store's open-set threshold: the
        prototypes, a linear head (persisted by the last change; recomputed if missing or stale), or the
        sequence model over the store's samples."""
        return self.model_head.build(store, self.threshold(store))

    def classify_embeddings(self, store: EnrollmentStore, embeddings: np.ndarray, top_k: int = 1) -> list[dict]:
        if not store.class_names:
            raise EdgemetaError(f"store {store.folder} has no classes; enroll some first")
        return self.head(store).classify(embeddings, top_k, unknown=UNKNOWN)

    def classify(self, folder: str | Path, files: list[str | Path], top_k: int = 1) -> list[dict]:
        store = self.open_store(folder)
        images, names = self.images(files)
        results = self.classify_embeddings(store, self.embedder(images), top_k)
        for name, r in zip(names, results, strict=True):
            r["file"] = name
        return results
