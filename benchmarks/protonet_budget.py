"""Budgeted ProtoNet training, edgemeta beside learn2learn, judged by one evaluator.

    python -m benchmarks.protonet_budget --data ../shared/data/omniglot --minutes 25 [--episode 60w5s5q]
        [--slice-s 60] [--val-episodes 500] [--plot benchmarks/protonet_budget.png]
    python -m benchmarks.protonet_budget --quick          # half a minute each, a smoke run

Each side trains the same Conv-4 on the same Omniglot Vinyals train images (Adam 1e-3, constant), for
`--minutes` of its own training time. The sides take turns in slices of `--slice-s` seconds, so both
see the same machine through the run; after each slice the side's backbone embeds the validation
split in inference mode and edgemeta's evaluator scores it on the same seeded 20-way 1-shot
15-query validation episodes with the nearest-prototype head (evaluation time is not training time).
Reported: each side's final accuracy, and its training time to reach 95% and 97% of the final
validation accuracy of the weaker side (the accuracy both reached).
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


def time_to(curve: list[dict], target: float) -> float | None:
    for point in curve:
        if point["acc"] >= target:
            return point["train_s"]
    return None


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, curve in curves.items():
        ax.errorbar([p["train_s"] / 60 for p in curve], [100 * p["acc"] for p in curve],
                    yerr=[100 * p["ci95"] for p in curve], marker=".", capsize=2, label=name)
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("validation 20-way 1-shot accuracy (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("EDGEMETA_OMNIGLOT", "../shared/data/omniglot"))
    ap.add_argument("--sample", help=argparse.SUPPRESS)  # tests: a folder per class instead of Omniglot
    ap.add_argument("--episode", default="60w5s5q")
    ap.add_argument("--minutes", type=float, default=25.0, help="training time per side")
    ap.add_argument("--slice-s", type=float, default=60.0, help="turn length")
    ap.add_argument("--val-way", type=int, default=20)
    ap.add_argument("--val-episodes", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--quick", action="store_true", help="0.5 min per side, 10 s turns, 100 validation episodes")
    ap.add_argument("--plot", help="PNG of both validation curves")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.minutes, a.slice_s, a.val_episodes = min(a.minutes, 0.5), min(a.slice_s, 10.0), min(a.val_episodes, 100)
    sbs.set_tf_threads(a.threads)
    import numpy as np
    import tensorflow as tf

    from edgemeta.host.data import EpisodeSampler
    from edgemeta.host.evaluate import embed_split, episode_accuracies
    from edgemeta.host.methods import get_method
    from edgemeta.host.model_eval import keras_embedder
    from edgemeta.stats import mean_ci95

    way, shot, query = sbs.parse_episode(a.episode)
    cfg, splits = sbs.load_splits(a.data, ("train", "val"), a.sample)
    train, val = splits["train"], splits["val"]
    val_way = min(a.val_way, val.num_classes)
    val_sampler = EpisodeSampler(val, val_way, 1, min(15, val.min_class_size() - 1), seed=1234)
    head = get_method("protonet").classify
    root = sbs.peers.peers_dir(a.peers)
    peer, reason = (None, "--no-peer") if a.no_peer else sbs.peer_or_reason(root)
    budget = 60 * a.minutes
    print(f"# {sbs.machine()}; TensorFlow {tf.__version__}; {a.threads} threads each; {a.episode} episodes, "
          f"{a.minutes:g} min each in {a.slice_s:g} s turns; validation {a.val_episodes} x {val_way}-way 1-shot", flush=True)
    print(f"# peer: learn2learn {peer['learn2learn']}, torch {peer['torch']}" if peer else f"# peer: none ({reason})")

    def score(emb: np.ndarray) -> tuple[float, float]:
        return mean_ci95(episode_accuracies(head, emb, val_sampler, a.val_episodes))

    trainer = sbs.trainer_for(cfg, train, way, shot, query)
    embed = keras_embedder(trainer.model)
    trainer.step(0)  # compile (not counted)
    sides = {"edgemeta": {"train_s": 0.0, "episodes": 1, "curve": []}}
    with tempfile.TemporaryDirectory() as tmp:
        worker = None
        if peer:
            worker = sbs.PeerWorker(root, sbs.write_arrays(Path(tmp) / "data.npz", train=train, val=val), a.threads)
            worker.ask({"cmd": "protonet", "key": "budget", "way": way, "shot": shot, "query": query, "episodes": 1})
            sides["learn2learn"] = {"train_s": 0.0, "episodes": 1, "curve": []}
        names, turn = list(sides), 0
        while any(s["train_s"] < budget for s in sides.values()):
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                s = sides[name]
                left = min(a.slice_s, budget - s["train_s"])
                if left <= 0:
                    continue
                if name == "edgemeta":
                    t0 = time.perf_counter()
                    while time.perf_counter() - t0 < left:
                        trainer.step(s["episodes"])
                        s["episodes"] += 1
                    s["train_s"] += time.perf_counter() - t0
                    acc, ci = score(embed_split(embed, val))
                else:
                    r = worker.ask({"cmd": "protonet", "key": "budget", "way": way, "shot": shot, "query": query,
                                    "seconds": left, "lr": 1e-3})
                    s["episodes"] += len(r["ms"])
                    s["train_s"] += sum(r["ms"]) / 1000
                    emb_path = Path(tmp) / "val.npy"
                    worker.ask({"cmd": "embed", "key": "budget", "out": str(emb_path)})
                    acc, ci = score(np.load(emb_path))
                s["curve"].append({"train_s": round(s["train_s"], 1), "episodes": s["episodes"], "acc": acc, "ci95": ci})
                print(f"# {name}: {s['train_s'] / 60:.1f} min, {s['episodes']} episodes, val {100 * acc:.2f} +/- {100 * ci:.2f}",
                      file=sys.stderr, flush=True)
            turn += 1
        if worker:
            worker.close()
    ref = min(s["curve"][-1]["acc"] for s in sides.values())
    out = {"episode": a.episode, "minutes": a.minutes, "reference_acc": ref, "sides": {}}
    print(f"\n| side | episodes | episodes/s | final val {val_way}w1s (%) | time to 95% of {100 * ref:.2f} | time to 97% |")
    print("|---|---|---|---|---|---|")
    for name, s in sides.items():
        last = s["curve"][-1]
        t95, t97 = time_to(s["curve"], 0.95 * ref), time_to(s["curve"], 0.97 * ref)
        out["sides"][name] = {"episodes": s["episodes"], "train_s": s["train_s"], "final_acc": last["acc"],
                              "final_ci95": last["ci95"], "t95_s": t95, "t97_s": t97, "curve": s["curve"]}

        def fmt(t):
            return "not reached" if t is None else f"{t / 60:.1f} min"

        print(f"| {name} | {s['episodes']} | {s['episodes'] / max(s['train_s'], 1e-9):.2f} | {100 * last['acc']:.2f} +/- "
              f"{100 * last['ci95']:.2f} | {fmt(t95)} | {fmt(t97)} |")
    if a.plot:
        plot({n: s["curve"] for n, s in sides.items()}, Path(a.plot), f"ProtoNet Conv-4, {a.episode}, Omniglot Vinyals")
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
