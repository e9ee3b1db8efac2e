"""Seeded N-way K-shot Q-query episodes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.host.data.dataset import FewShotSplit


@dataclass
class Episode:
    """One few-shot task. Support images are grouped by class (``shot`` in a row per class);
    labels are 0..way-1 in the order of ``classes`` (indices into the split's class list)."""

    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    classes: np.ndarray


def alphabets(split: FewShotSplit) -> list[np.ndarray]:
    """The split's classes grouped by alphabet, for within-alphabet episodes; a clear error when its
    class names carry none."""
    groups = split.class_groups()
    if groups is None:
        raise EdgemetaError(f"within-alphabet episodes need classes named Alphabet/character (Omniglot); "
                            f"the {split.name} split's classes carry no alphabet")
    return groups


class EpisodeSampler:
    """Draws episodes from one split.

    Episode ``i`` depends only on ``(seed, i)``, not on which episodes were drawn before, so a
    resumed training run or a re-run evaluation sees exactly the same tasks.

    >>> sampler = EpisodeSampler(split, way=5, shot=1, query=15, seed=0)
    >>> ep = sampler.episode(0)   # ep.support: (5, 28, 28, 1) uint8, ep.query: (75, 28, 28, 1)
    """

    def __init__(self, split: FewShotSplit, way: int, shot: int, query: int, seed: int = 0,
                 within_groups: bool = False):
        if way < 2 or shot < 1 or query < 1:
            raise EdgemetaError(f"an episode needs way >= 2, shot >= 1 and query >= 1 (got {way}-way {shot}-shot {query}-query)")
        if way > split.num_classes:
            raise EdgemetaError(f"{way}-way episodes need {way} classes but the {split.name} split has "
                                f"{split.num_classes}; lower the way or add classes")
        self._index = split.class_indices()
        small = [(split.class_names[c], len(ix)) for c, ix in enumerate(self._index) if len(ix) < shot + query]
        if small:
            name, n = small[0]
            raise EdgemetaError(f"class {name!r} of the {split.name} split has {n} images but {shot}-shot "
                                f"{query}-query episodes need {shot + query} per class ({len(small)} classes "
                                "are too small); add images or lower shot/query")
        self.split, self.way, self.shot, self.query, self.seed = split, way, shot, query, seed
        # within_groups: all classes of an episode from one group (Omniglot: one alphabet), the group
        # drawn uniformly among those with at least `way` classes. Characters of one alphabet look
        # alike, as a user's own classes often do: the harder and more realistic task.
        self._groups = None
        if within_groups:
            groups = alphabets(split)
            self._groups = [g for g in groups if len(g) >= way]
            if not self._groups:
                raise EdgemetaError(f"within-alphabet {way}-way episodes need an alphabet with {way} classes; the "
                                    f"{split.name} split's largest has {max(len(g) for g in groups)}; lower the way")

    def indices(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Episode ``i`` as indices into the split: (classes, support images, query images).

        Evaluation on precomputed embeddings uses this directly."""
        rng = np.random.default_rng((self.seed, i))
        pool = self.split.num_classes if self._groups is None else self._groups[rng.integers(len(self._groups))]
        classes = rng.choice(pool, size=self.way, replace=False)
        picks = np.stack([rng.choice(self._index[c], size=self.shot + self.query, replace=False) for c in classes])
        return classes, picks[:, :self.shot].ravel(), picks[:, self.shot:].ravel()

    def episode(self, i: int) -> Episode:
        classes, support, query = self.indices(i)
        images = self.split.images
        return Episode(
            support=images[support],
            support_labels=np.repeat(np.arange(self.way, dtype=np.int32), self.shot),
            query=images[query],
            query_labels=np.repeat(np.arange(self.way, dtype=np.int32), self.query),
            classes=classes,
        )
