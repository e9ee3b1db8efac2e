"""edgemeta: meta-train few-shot models on the host, run them on small boards.

The public API is small; host-side names import TensorFlow only when first used, so
``import edgemeta`` stays cheap and TensorFlow-free (the board side relies on that).

>>> import edgemeta
>>> cfg = edgemeta.load_config("models/omniglot-vinyals-conv4/config.toml")
>>> result = edgemeta.train(cfg, "runs/vinyals")                           # doctest: +SKIP
>>> results, *_ = edgemeta.evaluate_model_dir("runs/vinyals", data="../shared/data/omniglot")  # doctest: +SKIP
"""

from importlib import import_module

from edgemeta.errors import EdgemetaError

__version__ = "0.1.0"

_LAZY = {
    "load_config": "edgemeta.host.config",
    "DatasetSpec": "edgemeta.host.data",
    "load_dataset": "edgemeta.host.data",
    "EpisodeSampler": "edgemeta.host.data",
    "build_backbone": "edgemeta.host.backbones",
    "train": "edgemeta.host.training",
    "evaluate_model_dir": "edgemeta.host.model_eval",
}

__all__ = ["EdgemetaError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgemeta' has no attribute {name!r}")
