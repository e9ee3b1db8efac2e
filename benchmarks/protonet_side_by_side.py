"""ProtoNet meta-training speed, edgemeta beside learn2learn, in one run on this machine.

    python -m benchmarks.protonet_side_by_side --data ../shared/data/omniglot [--episodes 60w5s5q,60w1s5q,20w5s15q]
        [--rounds 4 --per-round 3 --threads 2] [--no-peer] [--no-before] [--check-numerics 20]

Same Conv-4, same images (the Omniglot Vinyals train split at 28x28, loaded once by edgemeta and handed
to the peer), same way / shot / queries, Adam at 1e-3, the same number of threads for both. The sides
take turns: in every round each runs `--per-round` episodes of each shape, the order turning round by
round, so both see the same machine (shared machines drift; ratios from one run hold, absolute times
do not). An episode's time includes drawing it: edgemeta's `EpisodicTrainer.prepare` and its compiled
step (in the loop, not on the prefetch thread `edgemeta train` uses), learn2learn's `Taskset.sample()`
and its example's `fast_adapt`, `backward` and `step`.

"before": edgemeta's step with Keras's own batch-norm layers (the training pass before the fused one),
in the same rounds. `--check-numerics N`: N steps from the same weights and episodes with the fused and
the Keras pass, and the largest difference of their losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from benchmarks import sidebyside as sbs


def name_of(shape: tuple[int, int, int]) -> str:
    return "{}w{}s{}q".format(*shape)


def edgemeta_episodes(trainer, start: int, n: int) -> tuple[list[float], list[float]]:
    ms, losses = [], []
    for i in range(start, start + n):
        t = time.perf_counter()
        loss, _ = trainer.step(i)
        ms.append(1000 * (time.perf_counter() - t))
        losses.append(loss)
    return ms, losses


def check_numerics(cfg, split, shape, steps: int) -> dict:
    """The fused and the Keras batch-norm pass from the same weights on the same episodes, and a control:
    the Keras pass from weights moved by one float32 rounding step (x (1 + 2**-23)). Adam's first steps
    divide each gradient by its own size, so rounding-level differences become lr-sized steps: the control
    shows how far two runs drift from rounding alone."""
    import numpy as np

    way, shot, query = shape
    runs, grads = {}, {}
    for name in ("fused", "keras", "control"):
        trainer = sbs.trainer_for(cfg, split, way, shot, query, fused=name == "fused")
        if name == "control":
            for v in trainer.model.trainable_variables:
                v.assign(v.numpy() * np.float32(1 + 2**-23))
        grads[name] = first_gradients(trainer), first_gradients(trainer, noise=1e-3)
        runs[name] = [trainer.step(i)[0] for i in range(steps)]

    def drift(a, b):
        return max(abs(x - y) for x, y in zip(runs[a], runs[b], strict=True))

    def rel(i):
        return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-30))
                   for x, y in zip(grads["fused"][i], grads["keras"][i], strict=True))

    return {"episode": name_of(shape), "steps": steps, "loss_fused": runs["fused"], "loss_keras": runs["keras"],
            "loss_control": runs["control"], "max_abs_diff": drift("fused", "keras"), "control_max_abs_diff": drift("keras", "control"),
            "first_step_grad_rel_diff": rel(0), "first_step_grad_rel_diff_no_ties": rel(1)}


def first_gradients(trainer, noise: float = 0.0) -> list:
    """The gradients of episode 0's loss at the trainer's current weights (nothing is updated); `noise`:
    uniform noise of that size added to the images, which breaks the ties of max-pooling over blank
    background (equal values, where either pass may route the gradient to a different one of them)."""
    import numpy as np
    import tensorflow as tf

    from edgemeta.host.methods import TaskEpisode

    e = trainer.sampler.episode(0)
    rng = np.random.default_rng(0)

    def images(a):
        return tf.constant(a.astype(np.float32) / 255.0 + noise * rng.random(a.shape, np.float32))

    ep = TaskEpisode(images(e.support), tf.constant(e.support_labels), images(e.query), tf.constant(e.query_labels),
                     trainer.sampler.way)
    saved = [v.numpy() for v in trainer.model.non_trainable_variables]
    with tf.GradientTape() as tape:
        loss, _ = trainer.method.episode_loss(ep, training=True)
    out = [g.numpy() for g in tape.gradient(loss, trainer.model.trainable_variables)]
    for v, value in zip(trainer.model.non_trainable_variables, saved, strict=True):
        v.assign(value)  # the moving statistics as they were
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("EDGEMETA_OMNIGLOT", "../shared/data/omniglot"))
    ap.add_argument("--sample", help=argparse.SUPPRESS)  # tests: a folder per class instead of Omniglot
    ap.add_argument("--episodes", default="60w5s5q,60w1s5q,20w5s15q")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=3, help="episodes per side, shape and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", help="the peers' folder (benchmarks/peers.py)")
    ap.add_argument("--no-peer", action="store_true", help="edgemeta alone")
    ap.add_argument("--no-before", action="store_true", help="leave out edgemeta's Keras batch-norm pass")
    ap.add_argument("--check-numerics", type=int, default=0, metavar="N")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    sbs.set_tf_threads(a.threads)
    import tensorflow as tf

    shapes = [sbs.parse_episode(s) for s in a.episodes.split(",")]
    cfg, splits = sbs.load_splits(a.data, ("train",), a.sample)
    split = splits["train"]
    root = sbs.peers.peers_dir(a.peers)
    peer_versions, reason = (None, "--no-peer") if a.no_peer else sbs.peer_or_reason(root)
    out = {"machine": sbs.machine(), "tensorflow": tf.__version__, "threads": a.threads,
           "train_images": len(split.images), "train_classes": split.num_classes, "peer": peer_versions,
           "peer_missing": reason, "rows": []}
    print(f"# {out['machine']}; TensorFlow {tf.__version__}; {a.threads} threads each; "
          f"{split.num_classes} train classes, {len(split.images)} images 28x28", flush=True)
    if peer_versions:
        print(f"# learn2learn {peer_versions['learn2learn']}, torch {peer_versions['torch']}"
              + (f" (CUDA {peer_versions['cuda_build']} build, run on the CPU)" if peer_versions.get("cuda_build") else ""))
    else:
        print(f"# peer: none ({reason})")
    arms = {"edgemeta": {}, **({} if a.no_before else {"edgemeta, Keras BN (before)": {}})}
    with tempfile.TemporaryDirectory() as tmp:
        worker = None
        if peer_versions:
            worker = sbs.PeerWorker(root, sbs.write_arrays(Path(tmp) / "data.npz", train=split), a.threads)
            arms["learn2learn"] = {}
        trainers = {}
        for shape in shapes:
            key = name_of(shape)
            trainers[("edgemeta", key)] = sbs.trainer_for(cfg, split, *shape, fused=True)
            if not a.no_before:
                trainers[("edgemeta, Keras BN (before)", key)] = sbs.trainer_for(cfg, split, *shape, fused=False)
        times = {(arm, name_of(s)): [] for arm in arms for s in shapes}
        counters = dict.fromkeys(times, 0)

        def run(arm, shape, n, record=True):
            key = name_of(shape)
            if arm == "learn2learn":
                r = worker.ask({"cmd": "protonet", "key": key, "way": shape[0], "shot": shape[1], "query": shape[2],
                                "episodes": n, "lr": 1e-3})
                ms = r["ms"]
            else:
                ms, _ = edgemeta_episodes(trainers[(arm, key)], counters[(arm, key)], n)
            counters[(arm, key)] += n
            if record:
                times[(arm, key)].append(ms)

        for shape in shapes:  # compile / warm up every side first
            for arm in arms:
                run(arm, shape, a.warmup, record=False)
        names = list(arms)
        for r in range(a.rounds):
            for shape in shapes:
                order = names[r % len(names):] + names[:r % len(names)]
                for arm in order:
                    run(arm, shape, a.per_round)
            print(f"# round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
        if worker:
            worker.close()
    import numpy as np

    print("\n| episode | " + " | ".join(f"{arm} ms/episode (median, p10-p90)" for arm in names)
          + (" | learn2learn / edgemeta (per-round medians) |" if "learn2learn" in arms else " |"))
    print("|---" * (len(names) + 1 + ("learn2learn" in arms)) + "|")
    for shape in shapes:
        key = name_of(shape)
        row = {"episode": key}
        cells = []
        for arm in names:
            flat = [t for chunk in times[(arm, key)] for t in chunk]
            med, p10, p90 = sbs.median_p(flat)
            row[arm] = {"median_ms": round(med, 1), "p10_ms": round(p10, 1), "p90_ms": round(p90, 1), "episodes": len(flat)}
            cells.append(f"{med:.0f} ({p10:.0f}-{p90:.0f})")
        if "learn2learn" in arms:
            per_round = [np.median(p) / np.median(e) for p, e in zip(times[("learn2learn", key)], times[("edgemeta", key)],
                                                                     strict=True)]
            row["speedup"] = round(row["learn2learn"]["median_ms"] / row["edgemeta"]["median_ms"], 2)
            row["speedup_rounds"] = [round(float(x), 2) for x in per_round]
            cells.append(f"**{row['speedup']:.2f}x** ({min(per_round):.2f}-{max(per_round):.2f})")
        out["rows"].append(row)
        print(f"| {key} | " + " | ".join(cells) + " |")
    if a.check_numerics:
        num = check_numerics(cfg, split, shapes[-1], a.check_numerics)
        out["numerics"] = num
        print(f"\nnumerics, {num['episode']}, from the same weights: the gradients of the fused and the Keras batch-norm "
              f"pass differ by {num['first_step_grad_rel_diff_no_ties']:.1e} (relative to each tensor's largest) once 1e-3 "
              f"noise breaks max-pooling's ties over blank background, by {num['first_step_grad_rel_diff']:.1e} on the "
              f"images as they are (the tied maxima's gradient goes to a different one of them). Over {num['steps']} steps "
              f"the losses differ by at most {num['max_abs_diff']:.2e}; the Keras pass from weights one rounding step "
              f"apart (control) drifts by {num['control_max_abs_diff']:.2e}")
        print("losses, fused / Keras / control: " + ", ".join(
            f"{a:.4f}/{b:.4f}/{c:.4f}" for a, b, c in zip(num["loss_fused"], num["loss_keras"], num["loss_control"], strict=True)))
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
