"""Few-shot enrollment and classification on the board: manifest + interpreter + store + head.

>>> rt = FewShotRuntime("models/omniglot-conv4")                   # doctest: +SKIP
>>> rt.enroll("store/", "alpha", ["a1.png", "a2.png"])             # doctest: +SKIP
>>> rt.classify("store/", ["query.png"], top_k=3)                  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.preprocess import load_images
from edgemeta.runtime.head import DISTANCES, PrototypeHead
from edgemeta.runtime.interpreter import Embedder
from edgemeta.runtime.manifest import read_manifest
from edgemeta.runtime.store import EnrollmentStore

UNKNOWN = "unknown"


class FewShotRuntime:
    """One loaded backbone. `enroll`/`forget`/`rename` change a store atomically; `classify` reads it."""

    def __init__(self, model: str | Path, variant: str | None = None, threads: int = 1, edgetpu: str | None = None,
                 verify: bool = True, xnnpack: bool = True):
        self.manifest = read_manifest(model)
        self.variant = self.manifest.variant(variant)
        self.embedder = Embedder(self.manifest.model_path(self.variant.name, verify), threads=threads, edgetpu=edgetpu,
                                 xnnpack=xnnpack)
        pre = self.manifest.preprocess
        if self.embedder.input_shape != pre.input_shape or self.embedder.dim != self.manifest.embedding_dim:
            raise EdgemetaError(f"{self.variant.file} does not match its manifest: model input {self.embedder.input_shape} "
                                f"-> {self.embedder.dim}, manifest {pre.input_shape} -> {self.manifest.embedding_dim}; re-export")
        if self.manifest.distance not in DISTANCES:
            raise EdgemetaError(f"manifest distance {self.manifest.distance!r} is unknown; known: {', '.join(DISTANCES)}")
        self.threshold = self.variant.open_set_threshold
        self.backbone = {"model": self.manifest.name, "variant": self.variant.name, "sha256": self.variant.sha256,
                         "embedding_dim": self.manifest.embedding_dim, "model_path": str(Path(model))}

    def images(self, files: list[str | Path]) -> tuple[np.ndarray, list[str]]:
        return load_images(files, self.manifest.preprocess)

    def open_store(self, folder: str | Path) -> EnrollmentStore:
        store = EnrollmentStore.open(folder)
        store.check_backbone(self.backbone)
        return store

    def enroll(self, folder: str | Path, label: str, files: list[str | Path], keep_samples: bool = False) -> int:
        """Embed the samples and add them to the class (created if new); returns its sample count."""
        images, _ = self.images(files)  # all inputs are read before the store is touched
        return self.enroll_images(folder, label, images, keep_samples)

    def enroll_images(self, folder: str | Path, label: str, images: np.ndarray, keep_samples: bool = False) -> int:
        """`enroll` for images already preprocessed to the model's input."""
        embeddings = self.embedder(images)
        EnrollmentStore.check_folder(Path(folder))
        with EnrollmentStore.locked(folder):
            if EnrollmentStore.exists(folder):
                store = self.open_store(folder)
            else:
                store = EnrollmentStore.create(folder, self.backbone, keep_samples, self.manifest.preprocess.input_shape)
            count = store.add(label, embeddings, images if store.samples is not None else None)
            store.save()
        return count

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
            store.save()
        return len(store.labels)

    def head(self, store: EnrollmentStore) -> PrototypeHead:
        """The prototype head of a store's classes, with this variant's open-set threshold."""
        return PrototypeHead.from_embeddings(store.embeddings, store.labels, store.class_names,
                                             distance=self.manifest.distance, threshold=self.threshold)

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
