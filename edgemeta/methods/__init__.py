"""Meta-learning algorithms, one per file, behind the `FewShotMethod` protocol.

An algorithm does not own the backbone: it is given one and says how an episode becomes a
loss (training) and how a support set becomes a classifier (evaluation).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.methods.protonet import ProtoNet


class FewShotMethod(Protocol):
    name: str
    distance: str

    def episode_loss(self, backbone, support, support_labels, query, query_labels, way: int, training: bool):
        """TensorFlow: (loss, accuracy) of one episode."""

    def classify(self, support_emb: np.ndarray, support_labels: np.ndarray, query_emb: np.ndarray, way: int) -> np.ndarray:
        """numpy: class scores (higher is better) of query embeddings given a support set."""


METHODS = {"protonet": ProtoNet}


def get_method(name: str) -> FewShotMethod:
    if name not in METHODS:
        raise EdgemetaError(f"unknown algorithm {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]()
