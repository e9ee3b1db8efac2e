"""MAML meta-training, edgemeta beside learn2learn (its Omniglot example), in one run on this machine.

    python -m benchmarks.maml_side_by_side --data ../shared/data/omniglot [--way 5 --shot 1 --meta-batch 32
        --steps 1 --rounds 3 --per-round 2 --threads 2] [--orders second,first]

The episodes are those of learn2learn's `examples/vision/maml_omniglot.py` and of edgemeta's
`benchmarks/configs/maml-vinyals-5w1s.toml` (Finn et al.): 5-way, 1 sample per class to adapt on and 1
to score, 32 tasks per meta-batch, one inner step at 0.4, Adam 1e-3. The network is the same on both
sides: the max-pooled Conv-4 edgemeta trains (learn2learn's `CNN4` with 1 channel and a 64-d
embedding). A third arm runs the example's own `OmniglotCNN` (Finn et al.'s strided convolutions,
about a quarter of the multiply-adds: a different network, shown for what the example costs;
`--no-strided` leaves it out).
Each side runs in its own process (peak memory is per process) on the same Vinyals train images; the
processes take turns, `--per-round` meta-batches each per round. Memory: the peak RSS of the process,
and the peak above its RSS once its libraries and data were loaded (the two sides hold the images
differently: uint8 in edgemeta, float32 tensors in learn2learn's dataset), split into what the first
meta-batch leaves resident (edgemeta: the traced and compiled step) and the most any later meta-batch
rises above the RSS it started from (the meta-gradient's own working memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from benchmarks import sidebyside as sbs  # noqa: E402
from benchmarks.l2l_worker import reset_peak, rss_mb  # noqa: E402  (standard library only)

SELF = [sys.executable, "-m", "benchmarks.maml_side_by_side"]  # this script again, in a new process


def child(argv: list[str]) -> None:
    """edgemeta's side: one process, one MAML trainer, answering JSON lines like benchmarks/l2l_worker.py."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--sample")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr
    sbs.set_tf_threads(a.threads)
    cfg, splits = sbs.load_splits(a.data, ("train",), a.sample)
    state: dict = {"base": rss_mb()}
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        key = (msg["way"], msg["shot"], msg["first_order"], msg["steps"], msg["meta_batch"])
        if key not in state:
            params = {"inner_lr": 0.4, "inner_steps": msg["steps"], "first_order": msg["first_order"]}
            state[key] = [sbs.trainer_for(cfg, splits["train"], msg["way"], msg["shot"], msg["shot"], method="maml",
                                          params=params, meta_batch=msg["meta_batch"]), 0]
        trainer, done = state[key]
        ms = []
        start_rss = reset_peak()
        for _ in range(msg["iterations"]):
            t = time.perf_counter()
            trainer.step(done)
            ms.append(1000 * (time.perf_counter() - t))
            done += trainer.episodes_per_step
        state[key][1] = done
        proto_out.write(json.dumps({"ms": ms, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                                    "base_rss_mb": round(state["base"], 1),
                                    "call_peak_mb": round(rss_mb("VmHWM") - start_rss, 1), "rss_mb": round(rss_mb(), 1)}) + "\n")


STRIDED = "learn2learn, its example's strided OmniglotCNN"
NETS = {"edgemeta": "cnn4", "learn2learn": "cnn4", STRIDED: "omniglot_cnn"}  # l2l_worker's network per arm


class EdgemetaWorker(sbs.PeerWorker):
    def __init__(self, data: str, sample: str | None, threads: int):
        cmd = [*SELF, "--child", "--data", data, "--threads", str(threads)] + (["--sample", sample] if sample else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("EDGEMETA_OMNIGLOT", "../shared/data/omniglot"))
    ap.add_argument("--sample", help=argparse.SUPPRESS)
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1, help="inner steps")
    ap.add_argument("--orders", default="second,first")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=2, help="meta-batches per side and round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-strided", action="store_true", help="leave out the example's strided OmniglotCNN arm")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    root = sbs.peers.peers_dir(a.peers)
    peer, reason = (None, "--no-peer") if a.no_peer else sbs.peer_or_reason(root)
    print(f"# {sbs.machine()}; {a.threads} threads each; MAML {a.way}-way {a.shot}-shot, {a.shot} query per class, "
          f"meta-batch {a.meta_batch}, {a.steps} inner step(s); each side in its own process")
    print(f"# peer: learn2learn {peer['learn2learn']}, torch {peer['torch']}" if peer else f"# peer: none ({reason})")
    out = {"rows": [], "peer": peer, "peer_missing": reason}
    with tempfile.TemporaryDirectory() as tmp:
        npz = None
        if peer:
            _, splits = sbs.load_splits(a.data, ("train",), a.sample)
            npz = sbs.write_arrays(Path(tmp) / "data.npz", train=splits["train"])
        for order in a.orders.split(","):
            first = order.strip().startswith("first")
            workers = {"edgemeta": EdgemetaWorker(a.data, a.sample, a.threads)}
            if peer:
                workers["learn2learn"] = sbs.PeerWorker(root, npz, a.threads)
                if not a.no_strided:
                    workers[STRIDED] = sbs.PeerWorker(root, npz, a.threads)
            base = {"cmd": "maml", "way": a.way, "shot": a.shot, "meta_batch": a.meta_batch, "steps": a.steps,
                    "first_order": first}
            times, sampling, last, first_left, later_peak = {n: [] for n in workers}, {n: [] for n in workers}, {}, {}, {}
            for n, w in workers.items():
                warm = w.ask({**base, "net": NETS[n], "iterations": 1})  # compile / warm up
                first_left[n] = warm["rss_mb"] - warm["base_rss_mb"]
            names = list(workers)
            for r in range(a.rounds):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    last[n] = workers[n].ask({**base, "net": NETS[n], "iterations": a.per_round})
                    times[n].extend(last[n]["ms"])
                    later_peak[n] = max(later_peak.get(n, 0.0), last[n]["call_peak_mb"])
                    sampling[n].extend(last[n].get("sample_ms", []))
            for w in workers.values():
                w.close()
            label = "first order" if first else "second order"
            for n in names:
                med, p10, p90 = sbs.median_p(times[n])
                # learn2learn times its Taskset apart; edgemeta's numpy episode drawing is inside its step
                sample = sbs.median_p(sampling[n])[0] if sampling[n] else None
                out["rows"].append({"order": label, "side": n, "median_ms": round(med, 1), "p10_ms": round(p10, 1),
                                    "p90_ms": round(p90, 1), "sampling_ms": None if sample is None else round(sample, 1),
                                    "peak_rss_mb": last[n]["peak_rss_mb"],
                                    "above_base_mb": round(last[n]["peak_rss_mb"] - last[n]["base_rss_mb"], 1),
                                    "first_left_mb": round(first_left[n], 1), "later_peak_mb": round(later_peak[n], 1)})
    print("\n| MAML | side | ms per meta-batch (median, p10-p90) | of which task sampling | peak RSS (MB) | peak above loaded (MB) "
          "| left resident by the first meta-batch (MB) | later meta-batches: peak above their start (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        samp = "in the step" if r["sampling_ms"] is None else f"{r['sampling_ms']:.0f}"
        print(f"| {r['order']} | {r['side']} | {r['median_ms']:.0f} ({r['p10_ms']:.0f}-{r['p90_ms']:.0f}) | {samp} | "
              f"{r['peak_rss_mb']:.0f} | {r['above_base_mb']:.0f} | {r['first_left_mb']:.0f} | {r['later_peak_mb']:.0f} |")
    if peer:
        for order in ("second order", "first order"):
            rows = {r["side"]: r for r in out["rows"] if r["order"] == order}
            if "learn2learn" in rows and "edgemeta" in rows:  # the same network on both sides
                l2l, em = rows["learn2learn"], rows["edgemeta"]
                print(f"{order}: learn2learn / edgemeta time {l2l['median_ms'] / em['median_ms']:.2f}x "
                      f"({(l2l['median_ms'] - l2l['sampling_ms']) / em['median_ms']:.2f}x without learn2learn's task sampling)")
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
