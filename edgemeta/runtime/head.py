"""Prototype head in numpy: class means of embeddings and distances to them.

Used by host-side evaluation on precomputed embeddings and by the board runtime alike, so
the head that is measured is the head that ships.
"""

from __future__ import annotations

import numpy as np


def prototypes(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean embedding of each class 0..num_classes-1: (num_classes, dim) float32."""
    sums = np.zeros((num_classes, embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, embeddings)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return (sums / counts[:, None]).astype(np.float32)


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
