"""Training throughput of episodic meta-training on this machine.

Times the compiled training step that `edgemeta train` uses, on real Omniglot episodes (default:
60-way 5-shot 5-query with Conv-4, as the shipped models are trained), after warm-up steps.

    python benchmarks/train_throughput.py --data ../shared/data/omniglot [--way 60 --shot 5 --query 5 --steps 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("EDGEMETA_OMNIGLOT", "../shared/data/omniglot"))
    ap.add_argument("--backbone", default="conv4")
    ap.add_argument("--way", type=int, default=60)
    ap.add_argument("--shot", type=int, default=5)
    ap.add_argument("--query", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200, help="timed training steps (after 10 warm-up steps)")
    args = ap.parse_args()

    import numpy as np
    import tensorflow as tf

    from edgemeta.host.config import config_from_dict
    from edgemeta.host.data import EpisodeSampler, load_dataset
    from edgemeta.host.train import EpisodicTrainer

    cfg = config_from_dict({
        "data": {"kind": "omniglot", "root": args.data, "split": "vinyals"},
        "model": {"backbone": args.backbone},
        "train": {"way": args.way, "shot": args.shot, "query": args.query},
    })
    split = load_dataset(cfg.data, cfg.model.preprocess, ("train",))["train"]
    trainer = EpisodicTrainer(cfg, EpisodeSampler(split, args.way, args.shot, args.query))
    for i in range(10):
        trainer.step(i)
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        trainer.step(10 + i)
        times.append(time.perf_counter() - t)
    ms = 1000 * np.array(times)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}, "
          f"{trainer.replicas} replica(s) on {trainer.strategy.extended.worker_devices}")
    print(f"{args.backbone} {args.way}-way {args.shot}-shot {args.query}-query, {args.steps} steps: "
          f"median {np.median(ms):.0f} ms/step (p10 {np.percentile(ms, 10):.0f}, p90 {np.percentile(ms, 90):.0f}) "
          f"= {1000 * trainer.replicas / np.median(ms):.2f} episodes/s")


if __name__ == "__main__":
    main()
