"""Shared parts of the side-by-side benchmarks: the data both sides train on, the learn2learn worker
process, edgemeta's trainer for one episode shape, and small statistics.

Both sides get the same images: edgemeta's own loader reads the Omniglot Vinyals split (28x28, rotations
as classes, as `edgemeta train` trains), and the arrays go to the peer through one .npz file.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np

from benchmarks import peers

HERE = Path(__file__).resolve().parent


def parse_episode(text: str) -> tuple[int, int, int]:
    """'60w5s5q' -> (60, 5, 5)."""
    import re

    m = re.fullmatch(r"(\d+)w(\d+)s(\d+)q", text.strip())
    if not m:
        raise SystemExit(f"an episode shape looks like 60w5s5q, not {text!r}")
    return int(m[1]), int(m[2]), int(m[3])


def set_tf_threads(threads: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def load_splits(data: str, splits=("train",), sample: str | None = None):
    """edgemeta's splits: the Omniglot Vinyals split from `data`, or (tests) a folder per class `sample`."""
    from edgemeta.host.config import config_from_dict
    from edgemeta.host.data import load_dataset

    if sample:
        cfg = config_from_dict({"data": {"kind": "folder", "root": sample, "fractions": [0.6, 0.2, 0.2]},
                                "model": {"backbone": "conv4"}})
    else:
        cfg = config_from_dict({"data": {"kind": "omniglot", "root": data, "split": "vinyals"}, "model": {"backbone": "conv4"}})
    return cfg, load_dataset(cfg.data, cfg.preprocess, tuple(splits))


def trainer_for(cfg_base, split, way: int, shot: int, query: int, method: str = "protonet", params: dict | None = None,
                meta_batch: int = 1, seed: int = 0, fused: bool = True, parallel_tasks: int = 1):
    """edgemeta's EpisodicTrainer (the compiled step `edgemeta train` runs) for one episode shape.
    fused=False: ProtoNet's Keras batch-norm pass instead of the fused one (the state before the change)."""
    import tensorflow as tf

    from edgemeta.host.data import EpisodeSampler
    from edgemeta.host.training import EpisodicTrainer

    cfg = _config(cfg_base, way, shot, query, method, params, meta_batch, seed, parallel_tasks)
    tf.keras.utils.set_random_seed(seed)
    trainer = EpisodicTrainer(cfg, EpisodeSampler(split, way, shot, query, seed=seed))
    if not fused and hasattr(trainer.method, "training_forward"):
        trainer.method.training_forward = None
    return trainer


def _config(cfg_base, way, shot, query, method, params, meta_batch, seed, parallel_tasks):
    import dataclasses

    from edgemeta.host.config import config_from_dict

    data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg_base.data).items()}
    return config_from_dict({
        "data": data, "model": {"backbone": "conv4"}, "method": {"name": method, **(params or {})},
        "train": {"way": way, "shot": shot, "query": query, "meta_batch": meta_batch, "seed": seed, "lr_schedule": "constant",
                  "parallel_tasks": parallel_tasks},
    })


class PeerWorker:
    """learn2learn in its own process, on the peer's own Python (`benchmarks/l2l_worker.py`)."""

    def __init__(self, root: Path, data_npz: Path, threads: int, seed: int = 0):
        py = peers.l2l_python(root)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([str(py), str(HERE / "l2l_worker.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        self.info = self.ask({"cmd": "setup", "data": str(data_npz), "threads": threads, "seed": seed,
                              "examples": str(peers.l2l_examples(root))})

    def ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the learn2learn worker stopped (exit {self.proc.wait()}) on {msg['cmd']}")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=30)


def write_arrays(path: Path, **splits) -> Path:
    arrays = {}
    for name, split in splits.items():
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split.images, split.labels.astype(np.int32)
    np.savez(path, **arrays)
    return path


def peer_or_reason(peers_root: Path) -> tuple[dict | None, str]:
    found = peers.l2l_versions(peers_root)
    if found:
        return found, ""
    return None, f"learn2learn is not installed under {peers_root} (python -m benchmarks.peers installs it)"


def machine() -> str:
    """The training summary's machine description with the load average: these figures are taken beside other work."""
    from edgemeta.host.training import machine_description

    return f"{machine_description()}, load average {os.getloadavg()[0]:.1f}"


def median_p(values, q=(10, 90)) -> tuple[float, float, float]:
    v = np.asarray(values, float)
    return float(np.median(v)), float(np.percentile(v, q[0])), float(np.percentile(v, q[1]))
