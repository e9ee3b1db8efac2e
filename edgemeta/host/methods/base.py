"""The protocol every meta-learning algorithm implements, and the episode it is given.

A method wraps a backbone and never owns it (learn2learn's rule): ``build`` is handed the
backbone and creates only the method's own variables (a head initialisation, learned inner
learning rates). Training calls ``episode_loss`` on one episode at a time; evaluation and the
board call the numpy head (``classify`` over embeddings), or, for methods that adapt the whole
network (``adapts_body``), the host-only ``adapt_classify`` over images. Export writes the head the
method hands it (``board_head``: a runtime/heads/ kind, which says how it is written and read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from edgemeta.runtime.heads import Head
from edgemeta.schema import table


@dataclass
class TaskEpisode:
    """One episode as TensorFlow tensors: images scaled to [0, 1], labels 0..way-1, and the
    number of training episodes done so far (for schedules inside a method, e.g. MAML++'s)."""

    support: Any
    support_labels: Any
    query: Any
    query_labels: Any
    way: int
    progress: Any = 0


class Method(Protocol):
    name: ClassVar[str]
    family: ClassVar[str]                # "metric", "optimization" or "model"
    Params: ClassVar[type]               # frozen dataclass read from the config's [method] table
    params: Any
    adapts_body: ClassVar[bool]          # evaluation adapts the body too (host only)

    def build(self, backbone, way: int) -> None:
        """Create the method's own variables (under the caller's strategy scope)."""

    # Optional: ``start_training()``, called by the trainer alone after ``build`` (same scope), loads
    # what only training needs (ProtoNet's distillation teacher); raises EdgemetaError on bad input.

    @property
    def variables(self) -> list:
        """Trainable variables the method owns, besides the backbone's."""

    def episode_loss(self, episode: TaskEpisode, training: bool):
        """TensorFlow: (loss, accuracy) of one episode."""

    def classify(self, support_emb: np.ndarray, support_labels: np.ndarray, query_emb: np.ndarray, way: int) -> np.ndarray:
        """numpy, the board's head: class scores (higher is better) of query embeddings."""

    def board_head(self) -> Head:
        """The head the board runs (runtime/heads/): what export writes into the manifest and beside it."""

    def head_spec(self) -> dict:
        """The manifest's ``head`` section (JSON scalars) of `board_head`, but for the files export adds."""

    def load_head(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore the method's variables from what ``head_arrays`` returned."""

    def head_arrays(self) -> dict[str, np.ndarray]:
        """The method's learned variables as numpy arrays (saved beside the backbone)."""


def make_params(cls, name: str, values: dict):
    """A method's frozen Params from its config table, each key checked by name and type (schema.table)."""
    return table(cls, values, f"[method] for {name}")


def accuracy(logits, labels):
    import tensorflow as tf

    return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels), tf.float32))


def cross_entropy(logits, labels):
    import tensorflow as tf

    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
