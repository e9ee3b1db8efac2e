"""Small configs, models and inputs the tests build: tiny training configs, a tiny SNAIL, a linear-head model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "omniglot"
SHIPPED = REPO / "models" / "omniglot-conv4"

# a SNAIL small enough to train and export in seconds: 5 classes x 2 shots at most
SNAIL_TINY = {"max_way": 5, "max_shot": 2, "min_way": 2, "filters": 8, "keys": 4}


def tiny_config(sample_dir, **train_overrides):
    """A 5-way 1-shot Conv-4 config over a folder of characters: trains in seconds (60 episodes by default)."""
    from edgemeta.host.config import config_from_dict

    return config_from_dict({
        "data": {"kind": "folder", "root": str(sample_dir), "fractions": [0.6, 0.2, 0.2]},
        "model": {"backbone": "conv4"},
        "train": {"way": 5, "shot": 1, "query": 3, "episodes": 60, "lr_decay_every": 1000, **train_overrides},
        "validation": {"every": 30, "episodes": 100, "way": 5, "shot": 1, "query": 5},
    })


def drawings(char: str, drawers) -> list[str]:
    """The sample character's drawings whose drawer number (the file name's last two digits) is in drawers."""
    return [str(p) for p in sorted((SAMPLE / char).glob("*.png")) if int(p.stem[-2:]) in drawers]


def linear_model(dst: Path, arrays: dict | None = None, **section) -> Path:
    """A copy of the shipped model turned into a format-2 model with a linear head (head.npz beside
    the manifest). Default: a learned init whose bias makes every query the second class."""
    shutil.copytree(SHIPPED, dst, ignore=shutil.ignore_patterns("model.keras", "*.png", "*.csv"))
    if arrays is None:
        arrays = {"rates_w": np.array([0.01], np.float32), "rates_b": np.array([0.01], np.float32),
                  "w0": np.zeros((64, 5), np.float32), "b0": np.array([0, 50, 0, 0, 0], np.float32)}
    np.savez(dst / "head.npz", **arrays)
    m = json.loads((dst / "manifest.json").read_text())
    m["format"] = 2
    m["head"] = {"kind": "linear", "method": "maml", "init": "learned", "steps": 3, "file": "head.npz",
                 "sha256": hashlib.sha256((dst / "head.npz").read_bytes()).hexdigest(), "per_parameter_rates": False,
                 **section}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst
