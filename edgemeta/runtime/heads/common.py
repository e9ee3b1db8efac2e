"""What every head kind shares, in numpy: class means of embeddings and distances to them, support
views, ranked answers, and the nearest-prototype "unknown" decision (`PrototypeHead`).

Every kind answers "unknown" the same way: the open-set threshold is calibrated on nearest-prototype
distances (at export, or by the store: open_set.py), so a linear or sequence head ranks the classes
with its own scores while the prototypes of the same store decide whether the query is known at all.
Used by host-side evaluation on precomputed embeddings and by the board runtime alike, so the head
that is measured is the head that ships.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edgemeta.errors import EdgemetaError

if TYPE_CHECKING:
    from edgemeta.runtime.store import EnrollmentStore

MAX_ADAPT_STEPS = 1000  # a store's head adaptation (steps of the support-set fit before classifying)


def check_adapt(steps, lr=None) -> tuple[int, float | None]:
    """A head-adaptation setting: steps an integer in [0, MAX_ADAPT_STEPS], lr None or a finite positive number."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= MAX_ADAPT_STEPS:
        raise EdgemetaError(f"adaptation steps must be an integer from 0 (off) to {MAX_ADAPT_STEPS}, got {steps!r}")
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0):
        raise EdgemetaError(f"the adaptation learning rate must be a finite positive number, got {lr!r}")
    return steps, None if lr is None else float(lr)


def class_sums(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class embedding sums (float64) and sample counts for classes 0..num_classes-1.

    Sorting once and summing contiguous runs is ~20x faster than np.add.at for thousands of samples."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
    sums = np.zeros((num_classes, embeddings.shape[1]), np.float64)
    present = np.flatnonzero(counts)
    if len(present):
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts[present])[:-1]]).astype(np.intp)  # intp is 32-bit on armv7l
        sums[present] = np.add.reduceat(embeddings[order].astype(np.float64), starts, axis=0)
    return sums, counts


def prototypes(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean embedding of each class 0..num_classes-1: (num_classes, dim) float32; every class needs a sample."""
    sums, counts = class_sums(embeddings, labels, num_classes)
    if (counts == 0).any():
        raise ValueError("every class needs at least one sample")
    return (sums / counts[:, None]).astype(np.float32)


# A support view moves the image by `shift` pixels along one axis: up, down, left, right.
VIEW_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def support_views(images: np.ndarray, shift: int) -> list[np.ndarray]:
    """The images (n, h, w, c) and, for a shift above 0, four copies moved by `shift` pixels, the
    uncovered border filled with the background (each image's top-left pixel)."""
    views = [images]
    if shift <= 0:
        return views
    h, w = images.shape[1:3]
    for dy, dx in VIEW_DIRECTIONS:
        dy, dx = dy * shift, dx * shift
        out = np.broadcast_to(images[:, :1, :1, :], images.shape).copy()
        out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = images[:, max(-dy, 0):h - max(dy, 0),
                                                                              max(-dx, 0):w - max(dx, 0)]
        views.append(out)
    return views


def embed_support(embed, images: np.ndarray, shift: int, plain: np.ndarray | None = None) -> np.ndarray:
    """An enrolled sample's embedding: the mean over its support views (`shift` 0: the plain embedding,
    `embed(images)`, which `plain` gives when it is already computed).

    A 1-shot prototype is one drawing's embedding; averaging it over small moves of the drawing makes
    it less tied to where that drawing sat on the page (test-time augmentation of the support set
    only: queries keep one pass, so classifying costs the same)."""
    plain = embed(images) if plain is None else plain
    if shift <= 0:
        return plain
    moved = [embed(v) for v in support_views(images, shift)[1:]]
    return np.mean([plain, *moved], axis=0, dtype=np.float64).astype(np.float32)


def squared_euclidean(queries: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """(n, dim) x (c, dim) -> (n, c) squared Euclidean distances, as ProtoNets are trained."""
    q2 = np.einsum("ij,ij->i", queries, queries)[:, None]
    p2 = np.einsum("ij,ij->i", protos, protos)[None, :]
    return np.maximum(q2 + p2 - 2.0 * queries @ protos.T, 0.0)


def cosine_distance(queries: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """(n, dim) x (c, dim) -> (n, c) 1 - cosine similarity."""
    qn = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    pn = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    return 1.0 - qn @ pn.T


DISTANCES = {"squared_euclidean": squared_euclidean, "cosine": cosine_distance}


class Classifier(Protocol):
    """A store's classes, built by a head kind (`Head.build`): ranked answers with the "unknown" test."""

    names: list[str]

    def classify(self, queries: np.ndarray, top_k: int = 1, unknown: str = "unknown") -> list[dict]:
        """For each query: label (or `unknown`), known, the nearest prototype's distance, and the top-k classes."""


class PrototypeHead:
    """Named prototypes, updated incrementally as samples arrive, and classification against them.

    Keeps each class's embedding sum and count, so adding samples costs O(dim) and a query costs
    one distance computation against the prototype matrix (rebuilt lazily after a change).
    `threshold`: nearest-prototype distance above which the answer is "unknown" (None: never).
    """

    def __init__(self, dim: int, distance: str = "squared_euclidean", threshold: float | None = None):
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}")
        self.dim, self.distance, self.threshold = dim, distance, threshold
        self.names: list[str] = []
        self._sums = np.zeros((0, dim), np.float64)
        self._counts = np.zeros(0, np.int64)
        self._protos: np.ndarray | None = None

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, labels: np.ndarray, names: list[str], **kwargs) -> PrototypeHead:
        head = cls(embeddings.shape[1], **kwargs)
        head.names = list(names)
        head._sums, head._counts = class_sums(embeddings, labels, len(names))
        return head

    def add(self, name: str, embeddings: np.ndarray) -> None:
        if name not in self.names:
            self.names.append(name)
            self._sums = np.vstack([self._sums, np.zeros((1, self.dim))])
            self._counts = np.append(self._counts, 0)
        i = self.names.index(name)
        self._sums[i] += embeddings.sum(axis=0)
        self._counts[i] += len(embeddings)
        self._protos = None

    def remove(self, name: str) -> None:
        i = self.names.index(name)
        del self.names[i]
        self._sums = np.delete(self._sums, i, axis=0)
        self._counts = np.delete(self._counts, i)
        self._protos = None

    def rename(self, old: str, new: str) -> None:
        self.names[self.names.index(old)] = new

    @property
    def prototypes(self) -> np.ndarray:
        if self._protos is None:
            self._protos = (self._sums / np.maximum(self._counts, 1)[:, None]).astype(np.float32)
        return self._protos

    def distances(self, queries: np.ndarray) -> np.ndarray:
        """(n, c) distances of the queries to the prototypes."""
        if not self.names:
            raise ValueError("no classes")
        return DISTANCES[self.distance](queries.astype(np.float32), self.prototypes)

    def classify(self, queries: np.ndarray, top_k: int = 1, unknown: str = "unknown") -> list[dict]:
        """For each query: the label (or `unknown`), whether it is known, the nearest distance, and
        the top-k classes with distances and softmax probabilities over negative distances."""
        dist = self.distances(queries)
        return answers(self.names, dist, dist, self.threshold, top_k, unknown)


def answers(names: list[str], cost: np.ndarray, dist: np.ndarray, threshold: float | None, top_k: int,
            unknown: str) -> list[dict]:
    """Per query: the top-k classes by `cost` (lower is better; probabilities softmax(-cost)) with their
    prototype distances `dist`; "unknown" when the nearest prototype is farther than `threshold`."""
    k = min(max(top_k, 1), len(names))
    order = np.argpartition(cost, k - 1, axis=1)[:, :k] if k < len(names) else np.tile(np.arange(k), (len(cost), 1))
    order = np.take_along_axis(order, np.argsort(np.take_along_axis(cost, order, axis=1), axis=1), axis=1)
    prob = np.exp(-cost + cost.min(axis=1, keepdims=True))  # shifted for stability
    prob /= prob.sum(axis=1, keepdims=True)
    nearest = dist.min(axis=1)
    out = []
    for i, row in enumerate(order):
        known = threshold is None or nearest[i] <= threshold
        out.append({"label": names[row[0]] if known else unknown, "known": bool(known), "distance": float(nearest[i]),
                    "top": [{"label": names[j], "distance": float(dist[i, j]), "probability": float(prob[i, j])}
                            for j in row]})
    return out


def store_prototypes(store: EnrollmentStore, distance: str, threshold: float | None) -> PrototypeHead:
    """A store's prototypes with the "unknown" test at `threshold`: what every kind decides "unknown" with."""
    return PrototypeHead.from_embeddings(store.embeddings, store.labels, store.class_names, distance=distance,
                                         threshold=threshold)
