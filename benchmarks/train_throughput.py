"""Training throughput of episodic meta-training on this machine.

Times the compiled training step that `edgemeta train` uses, on real Omniglot episodes (default:
60-way 5-shot 5-query with Conv-4, as the shipped models are trained), after warm-up steps, with the
episodes drawn ahead on a background thread as `edgemeta train` does (--no-prefetch: in the loop).

    python -m benchmarks.train_throughput --data ../shared/data/omniglot [--way 60 --shot 5 --query 5 --steps 200]
    python -m benchmarks.train_throughput --replicas 2   # one process, MirroredStrategy over 2 logical CPUs
    python -m benchmarks.train_throughput --workers 2    # 2 worker processes on 127.0.0.1, MultiWorkerMirroredStrategy

On one machine, two replicas or two workers share the same cores: the figures measure the overhead
of the distribution (all-reduce, process boundary), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

SELF = [sys.executable, "-m", "benchmarks.train_throughput"]  # this script again, in a new process
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch_workers(args, argv: list[str]) -> None:
    """Run this script once per worker (each one its own process) and print the chief's figures."""
    cluster = ",".join(f"127.0.0.1:{p}" for p in free_ports(args.workers))
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    procs = [subprocess.Popen([*SELF, *argv, "--cluster", cluster, "--task-index", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(args.workers)]
    outputs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        if p.returncode:
            sys.exit(f"a worker failed (exit {p.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}")
    print(outputs[0][0], end="")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("EDGEMETA_OMNIGLOT", "../shared/data/omniglot"))
    ap.add_argument("--backbone", default="conv4")
    ap.add_argument("--method", default="protonet")
    ap.add_argument("--way", type=int, default=60)
    ap.add_argument("--shot", type=int, default=5)
    ap.add_argument("--query", type=int, default=5)
    ap.add_argument("--meta-batch", type=int, default=1, help="[train] meta_batch (split across the replicas)")
    ap.add_argument("--steps", type=int, default=200, help="timed training steps (after 10 warm-up steps)")
    ap.add_argument("--replicas", type=int, default=1, help="replicas in this one process (logical CPUs, or GPUs if any)")
    ap.add_argument("--workers", type=int, default=0, help="run this many worker processes on 127.0.0.1 instead")
    ap.add_argument("--no-prefetch", action="store_true", help="draw each step's episodes in the loop")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of text")
    ap.add_argument("--cluster", help=argparse.SUPPRESS)
    ap.add_argument("--task-index", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.workers and args.cluster is None:
        argv = list(sys.argv[1:])
        i = argv.index("--workers")
        return launch_workers(args, argv[:i] + argv[i + 2:])

    from edgemeta.host.cluster import cluster_from_options

    cluster = cluster_from_options(args.cluster, args.task_index)

    import numpy as np
    import tensorflow as tf

    from edgemeta.host.config import config_from_dict
    from edgemeta.host.data import EpisodeSampler, load_dataset
    from edgemeta.host.training import EpisodicTrainer, device_summary, make_strategy
    from edgemeta.host.training.prefetch import EpisodePrefetcher

    strategy = make_strategy([], cluster) if cluster else None
    if not cluster and args.replicas > 1:
        gpus = tf.config.list_physical_devices("GPU")
        if len(gpus) < args.replicas:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
            strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.replicas)])
        else:
            strategy = tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(args.replicas)])
    cfg = config_from_dict({
        "data": {"kind": "omniglot", "root": args.data, "split": "vinyals"},
        "model": {"backbone": args.backbone},
        "method": {"name": args.method},
        "train": {"way": args.way, "shot": args.shot, "query": args.query, "meta_batch": args.meta_batch},
    })
    split = load_dataset(cfg.data, cfg.preprocess, ("train",))["train"]
    tf.keras.utils.set_random_seed(0)
    trainer = EpisodicTrainer(cfg, EpisodeSampler(split, args.way, args.shot, args.query), strategy)
    per_step = trainer.episodes_per_step
    warmup = 10
    prefetch = None if args.no_prefetch else EpisodePrefetcher(trainer.prepare, 0, per_step)

    def step(i: int) -> None:
        if prefetch is None:
            trainer.step(i * per_step)
        else:
            first, arrays = prefetch.next()
            trainer.step(first, arrays)

    for i in range(warmup):
        step(i)
    times = []
    start = time.perf_counter()
    for i in range(args.steps):
        t = time.perf_counter()
        step(warmup + i)
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    if prefetch is not None:
        prefetch.close()
    ms = 1000 * np.array(times)
    place = device_summary(trainer.strategy, cluster)
    row = {"mode": f"{cluster.num_workers} worker processes" if cluster else f"{args.replicas} replica(s) in one process",
           "strategy": place["strategy"], "replicas": trainer.replicas, "episodes_per_step": per_step,
           "median_ms_per_step": round(float(np.median(ms)), 1), "p10_ms": round(float(np.percentile(ms, 10)), 1),
           "p90_ms": round(float(np.percentile(ms, 90)), 1),
           "episodes_per_s": round(per_step * args.steps / total, 2), "prefetch": prefetch is not None,
           "devices": place["devices"], "gpus": place["gpus"], "cores": os.cpu_count(), "tensorflow": tf.__version__}
    if cluster is not None and not cluster.is_chief:
        return
    if args.json:
        print(json.dumps(row))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}, {row['mode']}: "
          f"{row['strategy']}, {trainer.replicas} replica(s); this process on {', '.join(place['devices'])}"
          + (f" (GPUs: {', '.join(place['gpus'])})" if place["gpus"] else ""))
    print(f"{args.method} {args.backbone} {args.way}-way {args.shot}-shot {args.query}-query, {per_step} episode(s) per step, "
          f"{args.steps} steps{'' if prefetch else ' (no prefetch)'}: median {row['median_ms_per_step']:.0f} ms/step "
          f"(p10 {row['p10_ms']:.0f}, p90 {row['p90_ms']:.0f}) = {row['episodes_per_s']:.2f} episodes/s")


if __name__ == "__main__":
    main()
