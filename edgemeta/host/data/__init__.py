"""Datasets for episodic few-shot learning (numpy + Pillow only, no TensorFlow; augment.py, the
trainer's augmentation, is the one TensorFlow module, imported only by it).

A dataset is loaded as named splits (``train``, ``val``, ``test``) of `FewShotSplit`: uint8
images, an integer class label per image and the class names. `EpisodeSampler` draws seeded
N-way K-shot Q-query episodes from one split.
"""

from edgemeta.host.data.dataset import DatasetSpec, FewShotSplit, load_dataset, merge_splits
from edgemeta.host.data.episodes import Episode, EpisodeSampler

__all__ = ["DatasetSpec", "Episode", "EpisodeSampler", "FewShotSplit", "load_dataset", "merge_splits"]
