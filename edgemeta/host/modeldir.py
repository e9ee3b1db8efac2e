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
from edgemeta.preprocess import Preprocess

MODEL_FILE = "model.keras"
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
    preprocess: Preprocess
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
        return cls(d["backbone"], d["algorithm"], d["distance"], Preprocess.from_dict(d["preprocess"]),
                   int(d["embedding_dim"]), d.get("data", {}), d.get("training", {}), d.get("method", {}))

    def make_method(self, model_dir: str | Path | None = None, backbone=None, way: int = 5, overrides: dict | None = None):
        """The folder's method with its parameters (`overrides` replace some, e.g. the batch-norm mode of
        an evaluation), built over `backbone` and its learned arrays restored."""
        from edgemeta.host.methods import get_method

        params = {k: v for k, v in (self.method or {}).items() if k != "name"} | (overrides or {})
        method = get_method(self.algorithm, params)
        if backbone is not None:
            arrays = read_npz(Path(model_dir) / METHOD_FILE) if model_dir and (Path(model_dir) / METHOD_FILE).is_file() else {}
            trained_way = arrays["w0"].shape[1] if "w0" in arrays else way
            method.build(backbone, trained_way)
            if arrays:
                method.load_head(arrays)
        return method


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


def load_keras(path: Path):
    """A saved Keras model, with a clear error when the file is damaged."""
    import keras

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a damaged file
        raise EdgemetaError(f"cannot load {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                            "the file is damaged, retrain or restore it") from None


def load_backbone(model_dir: str | Path):
    """(keras model, ModelInfo) of a model folder."""
    info = read_info(model_dir)
    return load_keras(Path(model_dir) / MODEL_FILE), info
