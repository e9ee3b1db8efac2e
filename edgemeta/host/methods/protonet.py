"""Prototypical Networks.

Snell, Swersky and Zemel (2017), "Prototypical Networks for Few-shot Learning", NeurIPS.
Each class is represented by the mean of its support embeddings (its prototype); a query is
classified by a softmax over negative squared Euclidean distances to the prototypes. Training
episodes use more classes than test episodes (e.g. 60-way for Omniglot), which the paper found
to help. The method has no variables of its own: its head is the numpy prototype head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemeta.host.methods.base import TaskEpisode, accuracy, cross_entropy
from edgemeta.runtime.head import prototypes, squared_euclidean


@dataclass(frozen=True)
class ProtoNetParams:
    pass


class ProtoNet:
    name = "protonet"
    family = "metric"
    Params = ProtoNetParams
    adapts_body = False
    distance = "squared_euclidean"

    def __init__(self, params: ProtoNetParams | None = None):
        self.params = params or ProtoNetParams()

    def build(self, backbone, way: int) -> None:
        from edgemeta.host.backbones import fused_training_forward

        self.backbone = backbone
        # Conv-4's training pass with fused batch-norm kernels (the same arithmetic, about 1.5-2x
        # faster on a CPU); None for other backbones, which run as Keras runs them
        self.training_forward = fused_training_forward(backbone)

    @property
    def variables(self) -> list:
        return []

    def episode_loss(self, episode: TaskEpisode, training: bool):
        import tensorflow as tf

        n_support = tf.shape(episode.support)[0]
        # One forward pass over support and query together, as in the reference implementation,
        # so batch-norm statistics are computed over the whole episode.
        images = tf.concat([episode.support, episode.query], axis=0)
        fast = getattr(self, "training_forward", None) if training else None
        emb = fast(images) if fast is not None else self.backbone(images, training=training)
        emb_s, emb_q = emb[:n_support], emb[n_support:]
        onehot = tf.one_hot(episode.support_labels, episode.way, dtype=emb.dtype)
        protos = tf.matmul(onehot, emb_s, transpose_a=True) / tf.reduce_sum(onehot, axis=0)[:, None]
        dist = (tf.reduce_sum(emb_q**2, axis=1, keepdims=True) + tf.reduce_sum(protos**2, axis=1)[None, :]
                - 2.0 * tf.matmul(emb_q, protos, transpose_b=True))
        return cross_entropy(-dist, episode.query_labels), accuracy(-dist, episode.query_labels)

    def classify(self, support_emb: np.ndarray, support_labels: np.ndarray, query_emb: np.ndarray, way: int) -> np.ndarray:
        return -squared_euclidean(query_emb, prototypes(support_emb, support_labels, way))

    def head_spec(self) -> dict:
        return {"kind": "prototype", "distance": self.distance, "method": self.name}

    def head_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def load_head(self, arrays: dict[str, np.ndarray]) -> None:
        pass
