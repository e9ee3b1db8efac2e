"""Prototypical Networks.

Snell, Swersky and Zemel (2017), "Prototypical Networks for Few-shot Learning", NeurIPS.
Each class is represented by the mean of its support embeddings (its prototype); a query is
classified by a softmax over negative squared Euclidean distances to the prototypes. Training
episodes use more classes than test episodes (e.g. 60-way for Omniglot), which the paper found
to help. The method has no variables of its own: its head is the numpy prototype head.

Optionally the episode loss also distils a trained teacher model (Hinton, Vinyals and Dean 2015;
"born-again" self-distillation of a few-shot embedding as in Tian et al. 2020, "Rethinking Few-Shot
Image Classification"): the teacher's prototype softmax over the same episode, softened by a
temperature, is a second target besides the labels. The student keeps the configured backbone, so
the board model's size and latency do not change; the teacher is only read during training.

`support_shift` enrolls each support sample as the mean embedding of itself and four copies moved by
that many pixels (test-time augmentation of the support set, chosen on validation): classifying costs
the same, enrolling a sample five backbone passes instead of one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from edgemeta.errors import EdgemetaError
from edgemeta.host.backbones import MODEL_FILE, fused_training_forward, load_keras
from edgemeta.host.methods.base import Method, TaskEpisode
from edgemeta.host.methods.losses import accuracy, cross_entropy
from edgemeta.host.methods.params import ProtoNetParams
from edgemeta.runtime.heads.common import prototypes, squared_euclidean
from edgemeta.runtime.heads.prototype import Prototype


class ProtoNet(Method):
    name = "protonet"
    family = "metric"
    Params = ProtoNetParams
    distance = "squared_euclidean"

    def __init__(self, params: ProtoNetParams | None = None):
        super().__init__(params)
        self.teacher = None           # the frozen backbone distilled in training (`start_training`)
        self.training_forward = None  # Conv-4's fused training pass (`build`)

    def build(self, backbone, way: int) -> None:
        self.backbone = backbone
        side = min(backbone.input_shape[1:3])
        if self.params.support_shift > side // 4:
            raise EdgemetaError(f"[method] support_shift {self.params.support_shift} moves a {side}-pixel image too far; "
                                f"at most {side // 4} pixels")
        # Conv-4's training pass with fused batch-norm kernels (the same arithmetic, about 1.5-2x
        # faster on a CPU); None for other backbones, which run as Keras runs them
        self.training_forward = fused_training_forward(backbone)
        self.teacher = None

    def teacher_folder(self) -> str:
        return self.params.teacher

    def start_training(self, teacher=None) -> None:
        """Take the teacher (training only: evaluating or exporting a distilled model never needs it):
        `teacher`, the backbone the trainer loaded from `teacher_folder`; without one (the method used
        on its own), its model file is loaded here."""
        if not self.params.teacher:
            return
        if teacher is None:
            teacher = load_keras(Path(self.params.teacher) / MODEL_FILE)
        if tuple(teacher.input_shape[1:]) != tuple(self.backbone.input_shape[1:]):
            raise EdgemetaError(f"[method] teacher {self.params.teacher} reads images of shape {teacher.input_shape[1:]}, "
                                f"this model {self.backbone.input_shape[1:]}; give a teacher with the same [model] preprocessing")
        teacher.trainable = False  # frozen: its batch norm runs on its moving statistics
        self.teacher = teacher

    def episode_loss(self, episode: TaskEpisode, training: bool):
        n_support = tf.shape(episode.support)[0]
        # One forward pass over support and query together, as in the reference implementation,
        # so batch-norm statistics are computed over the whole episode.
        images = tf.concat([episode.support, episode.query], axis=0)
        fast = self.training_forward if training else None
        emb = fast(images) if fast is not None else self.backbone(images, training=training)
        onehot = tf.one_hot(episode.support_labels, episode.way, dtype=emb.dtype)
        logits = _prototype_logits(emb, n_support, onehot)
        loss = cross_entropy(logits, episode.query_labels)
        if self.teacher is not None and training:
            t = self.params.temperature
            log_soft = tf.nn.log_softmax(tf.stop_gradient(_prototype_logits(self.teacher(images, training=False), n_support, onehot)) / t)
            # KL(teacher || student) at temperature t, times t^2 so its gradients keep the labels' scale
            kl = tf.reduce_mean(tf.reduce_sum(tf.exp(log_soft) * (log_soft - tf.nn.log_softmax(logits / t)), axis=1))
            loss = (1.0 - self.params.distill) * loss + self.params.distill * t * t * kl
        return loss, accuracy(logits, episode.query_labels)

    def classify(self, support_emb: np.ndarray, support_labels: np.ndarray, query_emb: np.ndarray, way: int) -> np.ndarray:
        return -squared_euclidean(query_emb, prototypes(support_emb, support_labels, way))

    def board_head(self) -> Prototype:
        return Prototype(self.distance, self.params.support_shift, self.name)


def _prototype_logits(emb, n_support, onehot):
    """Negative squared Euclidean distances of the query embeddings (after the first n_support) to the class means."""
    emb_s, emb_q = emb[:n_support], emb[n_support:]
    protos = tf.matmul(onehot, emb_s, transpose_a=True) / tf.reduce_sum(onehot, axis=0)[:, None]
    return -(tf.reduce_sum(emb_q**2, axis=1, keepdims=True) + tf.reduce_sum(protos**2, axis=1)[None, :]
             - 2.0 * tf.matmul(emb_q, protos, transpose_b=True))
