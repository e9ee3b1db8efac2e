"""Few-shot enrollment and classification on the board: manifest + interpreter + store + head.

>>> rt = FewShotRuntime("models/omniglot-conv4")                   # doctest: +SKIP
>>> rt.enroll("store/", "alpha", ["a1.png", "a2.png"])             # doctest: +SKIP
>>> rt.adapt("store/", steps=10)                                   # doctest: +SKIP
>>> rt.classify("store/", ["query.png"], top_k=3)                  # doctest: +SKIP

The head a store is classified with: the model's own (nearest prototype, or the manifest's linear
head with its steps), or, once the store has an adapt setting, a linear head adapted with that
many steps (prototype models: initialised from the prototypes, proto-MAML). The adapted weights
are recomputed and saved with every change of the store, so classify only reads them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from edgemeta.boards import Board, load_board_file
from edgemeta.errors import EdgemetaError
from edgemeta.preprocess import ImageLimits, load_images
from edgemeta.runtime.head import LinearHead, PrototypeHead
from edgemeta.runtime.interpreter import Embedder
from edgemeta.runtime.linear_head import LinearHeadSpec
from edgemeta.runtime.manifest import read_manifest
from edgemeta.runtime.store import EnrollmentStore, check_adapt

UNKNOWN = "unknown"
# A deployed release keeps the board profile it was built for beside its model folder.
RELEASE_BOARD_FILE = "board.toml"
# Proto-MAML's rate for prototype models. A step moves the logits by about lr * |x|^2 times the
# support residual (at most 1); |x|^2 is 85-113 on the shipped models, so 0.01 moves them by at most
# about one unit per step, a small step next to their logit gaps. On samples/omniglot (int8, 10 steps)
# 0.01 costs nothing, 0.1 about 0.1 point at 5 and 10 shots, 1.0 from 0.3 to 1.5 points.
DEFAULT_PROTO_LR = 0.01


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
        self.threshold = self.variant.open_set_threshold
        self.backbone = {"model": self.manifest.name, "variant": self.variant.name, "sha256": self.variant.sha256,
                         "embedding_dim": self.manifest.embedding_dim, "model_path": str(Path(model))}

    def images(self, files: list[str | Path]) -> tuple[np.ndarray, list[str]]:
        return load_images(files, self.manifest.preprocess, limits=self.limits)

    def open_store(self, folder: str | Path) -> EnrollmentStore:
        store = EnrollmentStore.open(folder)
        store.check_backbone(self.backbone)
        return store

    def head_spec(self, adapt: dict | None) -> LinearHeadSpec | None:
        """The linear head for a store's adapt setting (None: the nearest-prototype head)."""
        linear = self.manifest.head.linear
        if not adapt:
            return linear
        steps, lr = check_adapt(adapt.get("steps"), adapt.get("lr"))
        if linear is None:
            lr = DEFAULT_PROTO_LR if lr is None else lr
            return LinearHeadSpec(init="proto", steps=steps, rates_w=[lr], rates_b=[lr])
        return replace(linear, steps=steps) if lr is None else replace(linear, steps=steps, rates_w=[lr], rates_b=[lr])

    def save(self, store: EnrollmentStore) -> None:
        """Save a changed store (inside its lock) with its head adapted for this model."""
        store.set_head(self.head_spec(store.adapt))
        store.save()

    def enroll(self, folder: str | Path, label: str, files: list[str | Path], keep_samples: bool = False,
               adapt: tuple[int, float | None] | None = None) -> int:
        """Embed the samples and add them to the class (created if new); returns its sample count.
        `adapt` (steps, lr) also sets the store's adaptation, as `adapt` does."""
        if adapt is not None:
            check_adapt(*adapt)
        images, _ = self.images(files)  # all inputs are read before the store is touched
        return self.enroll_images(folder, label, images, keep_samples, adapt)

    def enroll_images(self, folder: str | Path, label: str, images: np.ndarray, keep_samples: bool = False,
                      adapt: tuple[int, float | None] | None = None) -> int:
        """`enroll` for images already preprocessed to the model's input."""
        if adapt is not None:
            adapt = self._resolve_adapt(*adapt)
        embeddings = self.embedder(images)
        EnrollmentStore.check_folder(Path(folder))
        with EnrollmentStore.locked(folder):
            if EnrollmentStore.exists(folder):
                store = self.open_store(folder)
            else:
                store = EnrollmentStore.create(folder, self.backbone, keep_samples, self.manifest.preprocess.input_shape)
            count = store.add(label, embeddings, images if store.samples is not None else None)
            if adapt is not None:
                store.set_adapt(*adapt)
            self.save(store)
        return count

    def _resolve_adapt(self, steps: int, lr: float | None) -> tuple[int, float | None]:
        """A checked setting, with a prototype model's default rate written out (a linear model's None
        means its own learned rates)."""
        steps, lr = check_adapt(steps, lr)
        if lr is None and self.manifest.head.linear is None:
            lr = DEFAULT_PROTO_LR
        return steps, lr

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
        """What a store is classified with: {"kind", "init", "steps", "lr", "adapt"} (JSON-ready)."""
        spec = self.head_spec(store.adapt)
        if spec is None:
            return {"kind": "prototype", "adapt": store.adapt}
        lr = store.adapt.get("lr") if store.adapt else None
        return {"kind": "linear", "init": spec.init, "steps": spec.steps, "lr": lr, "adapt": store.adapt}

    def reenroll(self, folder: str | Path) -> int:
        """Re-embed a store's kept samples with this backbone (after a model upgrade); returns the sample count."""
        with EnrollmentStore.locked(folder):
            store = EnrollmentStore.open(folder)
            if store.samples is None:
                raise EdgemetaError(f"store {folder} kept no samples (enroll with --keep-samples); enroll the classes again instead")
            if store.samples.shape[1:] != self.manifest.preprocess.input_shape:
                raise EdgemetaError(f"the kept samples are {store.samples.shape[1:]}, this model takes "
                                    f"{self.manifest.preprocess.input_shape}; enroll the classes again instead")
            store.replace_embeddings(self.embedder(store.samples), self.backbone)
            self.save(store)
        return len(store.labels)

    def head(self, store: EnrollmentStore) -> PrototypeHead | LinearHead:
        """The head a store is classified with, with this variant's open-set threshold: the prototype
        head, or the linear head (persisted by the last change; recomputed if missing or stale)."""
        protos = PrototypeHead.from_embeddings(store.embeddings, store.labels, store.class_names,
                                               distance=self.manifest.distance, threshold=self.threshold)
        spec = self.head_spec(store.adapt)
        if spec is None or not store.class_names:
            return protos
        return LinearHead(protos, *store.linear_head(spec))

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
