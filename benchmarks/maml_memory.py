"""Peak memory and time of one meta-gradient: MAML (second order) against first-order MAML, ANIL
and ProtoNet, on the same Omniglot-sized episode (Conv-4, 28x28).

Each method runs in its own process (peak RSS is per process, TensorFlow's own ~1.1 GB included);
the comparison is the peak above ProtoNet's, which needs no inner loop.

    .venv/bin/python -m benchmarks.maml_memory            # 20-way 5-shot 15-query, 5 inner steps
    .venv/bin/python -m benchmarks.maml_memory --way 5 --shot 1 --query 15 --steps 1

Then, with --meta-batch N (and --data): second-order MAML through `edgemeta train`'s compiled step on
Omniglot, a meta-batch of N such tasks, for each `[train] parallel_tasks` in --parallel (tasks of the
meta-batch computed at once): the peak above the loaded process and the time per meta-batch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SELF = [sys.executable, "-m", "benchmarks.maml_memory"]  # this script again, in a new process
CASES = [("maml", {}), ("maml", {"first_order": True}), ("anil", {}), ("protonet", {})]


def child(name: str, params: dict, way: int, shot: int, query: int, steps: int, repeats: int) -> dict:
    import resource
    import time

    import numpy as np
    import tensorflow as tf

    from edgemeta.host.backbones import build_backbone
    from edgemeta.host.methods import TaskEpisode, get_method

    if name != "protonet":
        params = {**params, "inner_steps": steps}
    method = get_method(name, params)
    backbone = build_backbone("conv4", (28, 28, 1))
    method.build(backbone, way)
    variables = backbone.trainable_variables + method.variables
    rng = np.random.default_rng(0)
    ep = TaskEpisode(tf.constant(rng.random((way * shot, 28, 28, 1), np.float32)), tf.constant(np.repeat(np.arange(way), shot), tf.int32),
                     tf.constant(rng.random((way * query, 28, 28, 1), np.float32)), tf.constant(np.repeat(np.arange(way), query), tf.int32),
                     way)

    @tf.function
    def meta_gradient():
        with tf.GradientTape() as tape:
            loss, _ = method.episode_loss(ep, training=True)
        return tape.gradient(loss, variables)

    meta_gradient()  # trace and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        meta_gradient()
    ms = 1000 * (time.perf_counter() - start) / repeats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": name + (" (first order)" if params.get("first_order") else ""), "ms_per_task": round(ms, 1),
            "peak_rss_mb": round(peak, 1)}


def trainer_child(data: str, way: int, shot: int, query: int, steps: int, meta_batch: int, parallel: int) -> dict:
    import time

    from benchmarks import sidebyside as sbs
    from benchmarks.l2l_worker import reset_peak, rss_mb

    sbs.set_tf_threads(2)
    cfg, splits = sbs.load_splits(data, ("train",), None)
    base = rss_mb()
    trainer = sbs.trainer_for(cfg, splits["train"], way, shot, query, method="maml", meta_batch=meta_batch,
                              params={"inner_lr": 0.1, "inner_steps": steps}, parallel_tasks=parallel)
    trainer.step(0)  # trace and compile
    start, ms = reset_peak(), []
    for i in (1, 2):
        t = time.perf_counter()
        trainer.step(i * meta_batch)
        ms.append(1000 * (time.perf_counter() - t))
    return {"parallel_tasks": parallel, "ms_per_meta_batch": round(min(ms)), "peak_above_loaded_mb": round(rss_mb("VmHWM") - base),
            "resident_after_first_mb": round(start - base)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--way", type=int, default=20)
    ap.add_argument("--shot", type=int, default=5)
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--meta-batch", type=int, default=0, help="also a meta-batch of this many tasks through the trainer")
    ap.add_argument("--parallel", default="1,10", help="[train] parallel_tasks values for --meta-batch")
    ap.add_argument("--data", default="../shared/data/omniglot")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--trainer-child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        name, params = json.loads(a.child)
        print(json.dumps(child(name, params, a.way, a.shot, a.query, a.steps, a.repeats)))
        return
    if a.trainer_child:
        print(json.dumps(trainer_child(a.data, a.way, a.shot, a.query, a.steps, a.meta_batch, a.trainer_child)))
        return
    shape = ["--way", str(a.way), "--shot", str(a.shot), "--query", str(a.query), "--steps", str(a.steps)]
    if a.meta_batch:
        print(f"second-order MAML, Conv-4, meta-batch of {a.meta_batch} tasks of {a.way}-way {a.shot}-shot {a.query}-query, "
              f"{a.steps} inner steps, through edgemeta train's compiled step; each setting in its own process")
        print("| parallel_tasks | ms per meta-batch | peak above the loaded process (MB) | resident after the first meta-batch (MB) |")
        print("|---|---|---|---|")
        for parallel in (int(x) for x in a.parallel.split(",")):
            out = subprocess.run([*SELF, "--trainer-child", str(parallel), "--meta-batch", str(a.meta_batch),
                                  "--data", a.data, *shape], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {parallel} | {r['ms_per_meta_batch']} | {r['peak_above_loaded_mb']} | {r['resident_after_first_mb']} |")
        print()
    print(f"Conv-4, {a.way}-way {a.shot}-shot {a.query}-query, {a.steps} inner steps, one task per meta-gradient")
    print(f"{'method':<26} {'ms/task':>8} {'peak RSS (MB)':>14} {'above ProtoNet (MB)':>20}")
    rows = []
    for name, params in CASES:
        out = subprocess.run([*SELF, "--child", json.dumps([name, params]), *shape,
                              "--repeats", str(a.repeats)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[-1]["peak_rss_mb"]
    for r in rows:
        print(f"{r['method']:<26} {r['ms_per_task']:>8} {r['peak_rss_mb']:>14} {r['peak_rss_mb'] - base:>20.0f}")


if __name__ == "__main__":
    main()
