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
from typing import Any, ClassVar

import numpy as np

from edgemeta.errors import EdgemetaError
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


class Method:
    """The base of every method: what callers use, declared here with its default, so nothing probes a
    method for a member. A method's module may import TensorFlow at its top: the registry imports it
    only when the method is chosen."""

    name: ClassVar[str]
    family: ClassVar[str]                # "metric", "optimization" or "model"
    Params: ClassVar[type]               # frozen dataclass read from the config's [method] table (methods/params.py)
    adapts_body: ClassVar[bool] = False  # evaluation adapts the body too (host only: `adapt_classify`)
    distance: ClassVar[str] = ""         # the metric the embedding is trained for, recorded in model.json ("" for none)

    def __init__(self, params: Any = None):
        self.params = params or self.Params()

    def build(self, backbone, way: int) -> None:
        """Create the method's own variables (under the caller's strategy scope)."""
        raise NotImplementedError

    def teacher_folder(self) -> str:
        """A trained model folder whose backbone the training distils ("" for none): the trainer loads it
        and hands it to `start_training`."""
        return ""

    def start_training(self, teacher=None) -> None:
        """Called by the trainer alone after ``build`` (same scope): set up what only training needs, with
        `teacher`, the backbone of `teacher_folder` when it names one; raises EdgemetaError on bad input."""

    @property
    def limits(self) -> tuple[int, int] | None:
        """The most classes and shots per class the method reads (None: any number)."""
        return self.params.limits

    @property
    def variables(self) -> list:
        """Trainable variables the method owns, besides the backbone's."""
        return []

    def episode_loss(self, episode: TaskEpisode, training: bool):
        """TensorFlow: (loss, accuracy) of one episode."""
        raise NotImplementedError

    def classify(self, support_emb: np.ndarray, support_labels: np.ndarray, query_emb: np.ndarray, way: int) -> np.ndarray:
        """numpy, the board's head: class scores (higher is better) of query embeddings."""
        raise NotImplementedError

    def adapt_classify(self, support, support_labels, query, way: int) -> np.ndarray:
        """Host only, for a method that `adapts_body`: adapt on a support set (uint8 images), the queries' scores."""
        raise EdgemetaError(f"{self.name} does not adapt the body on a support set; classify its embeddings")

    def board_head(self) -> Head:
        """The head the board runs (runtime/heads/): what export writes into the manifest and beside it."""
        raise NotImplementedError

    def head_spec(self) -> dict:
        """The manifest's ``head`` section (JSON scalars) of `board_head`, but for the files export adds."""
        return self.board_head().to_manifest()

    def load_head(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore the method's variables from what ``head_arrays`` returned."""

    def head_arrays(self) -> dict[str, np.ndarray]:
        """The method's learned variables as numpy arrays (saved beside the backbone)."""
        return {}


def make_params(cls, name: str, values: dict):
    """A method's frozen Params from its config table, each key checked by name and type (schema.table)."""
    return table(cls, values, f"[method] for {name}")
