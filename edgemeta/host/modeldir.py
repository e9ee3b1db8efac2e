"""A model folder: what `edgemeta train` writes and `edgemeta eval` / `export` read.

    model.keras     the trained backbone (best validation checkpoint; the last weights when a time budget
                    or an interruption ended the run before its first scheduled validation)
    method.npz      the method's own learned variables, if it has any (MAML's head, learned rates)
    model.json      what the backbone needs around it: preprocessing, algorithm, distance,
                    embedding size, dataset, training summary
    config.toml     the resolved training configuration
    splits.json     a folder dataset's class split (train / val / test class names, fractions, seed):
                    eval and export use these classes, export copies it beside the variants
    history.csv     learning curve (episodes, loss, accuracy, validation accuracy)
    curve.png       the same as a plot
    eval.md/.json   evaluation report, when `edgemeta eval --report` wrote one
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgemeta.atomic import write_atomic
from edgemeta.errors import EdgemetaError
from edgemeta.host.backbones import MODEL_FILE, load_keras
from edgemeta.preprocess import FrontEnd, read_preprocess

__all__ = ["INFO_FILE", "METHOD_FILE", "MODEL_FILE", "SPLITS_FILE", "ModelInfo", "load_backbone", "load_keras", "read_info",
           "read_method_arrays", "read_npz", "read_splits", "write_atomic", "write_json", "write_npz"]

METHOD_FILE = "method.npz"  # the method's own learned variables (MAML's head initialisation, learned rates), if any;
# not the exported head.npz, which export writes beside the .tflite files, often into this same folder
INFO_FILE = "model.json"
SPLITS_FILE = "splits.json"
INFO_FORMAT = 1


@dataclass
class ModelInfo:
    backbone: str
    algorithm: str
    distance: str
    preprocess: FrontEnd
    embedding_dim: int
    data: dict
    training: dict
    method: dict = field(default_factory=dict)  # [method] name and parameters (older folders: protonet defaults)

    def to_dict(self) -> dict:
        return {"format": INFO_FORMAT, "backbone": self.backbone, "algorithm": self.algorithm,
                "distance": self.distance, "preprocess": self.preprocess.to_dict(),
                "embedding_dim": self.embedding_dim, "data": self.data, "training": self.training,
                "method": self.method or {"name": self.algorithm}}

    @classmethod
    def from_dict(cls, d: dict) -> ModelInfo:
        return cls(d["backbone"], d["algorithm"], d["distance"], read_preprocess(d["preprocess"]),
                   int(d["embedding_dim"]), d.get("data", {}), d.get("training", {}), d.get("method", {}))

    def make_method(self, model_dir: str | Path | None = None, backbone=None, way: int = 5, overrides: dict | None = None):
        """The folder's method with its parameters (`overrides` replace some, e.g. the batch-norm mode of
        an evaluation), built over `backbone` and its learned arrays (method.npz) restored. The folder is
        read here; `methods.restore_method` builds the method."""
        from edgemeta.host.methods import restore_method

        params = {k: v for k, v in (self.method or {}).items() if k != "name"} | (overrides or {})
        arrays = read_method_arrays(model_dir) if model_dir and backbone is not None else {}
        return restore_method(self.algorithm, params, backbone, arrays, way)


def read_method_arrays(model_dir: str | Path) -> dict:
    """A model folder's method.npz, {} when the method has no variables of its own."""
    path = Path(model_dir) / METHOD_FILE
    return read_npz(path) if path.is_file() else {}


def write_npz(path: Path, arrays: dict) -> None:
    import numpy as np

    write_atomic(path, lambda f: np.savez(f, **arrays))


def read_npz(path: Path) -> dict:
    from edgemeta.arrays import load_npz  # numpy, only when a model's arrays are read

    try:
        return load_npz(path)
    except (OSError, ValueError) as e:
        raise EdgemetaError(f"{path} is damaged ({e}); retrain or restore the model folder") from None


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_splits(model_dir: str | Path) -> dict | None:
    """A model folder's recorded class split (splits.json), None when it has none (Omniglot, older runs)."""
    path = Path(model_dir) / SPLITS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        classes = record["classes"]
        if not all(isinstance(classes.get(k), list) and all(isinstance(n, str) for n in classes[k])
                   for k in ("train", "val", "test")):
            raise ValueError("classes must list train, val and test class names")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EdgemetaError(f"{path} is damaged ({e}); restore it, or delete it to split the classes again by "
                            "[data] seed and fractions") from None
    return record


def read_info(model_dir: str | Path) -> ModelInfo:
    """The metadata of a model folder, with a clear error when it is not one."""
    d = Path(model_dir)
    if not (d / INFO_FILE).is_file() or not (d / MODEL_FILE).is_file():
        raise EdgemetaError(f"{d} is not an edgemeta model folder (needs {MODEL_FILE} and {INFO_FILE}); "
                            "train one with `edgemeta train` or use one under models/")
    try:
        return ModelInfo.from_dict(json.loads((d / INFO_FILE).read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise EdgemetaError(f"{d / INFO_FILE} is damaged ({e}); retrain or restore the model folder") from None


def load_backbone(model_dir: str | Path):
    """(keras model, ModelInfo) of a model folder."""
    info = read_info(model_dir)
    return load_keras(Path(model_dir) / MODEL_FILE), info
