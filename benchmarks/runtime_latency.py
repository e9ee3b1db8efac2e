"""Board-side figures on this machine: embedding latency, enrollment, head cost, cold start, memory.

    python benchmarks/runtime_latency.py --model models/omniglot-conv4 [--runtime ai_edge_litert|tensorflow]

Uses the exported variants of MODEL (int8_static, int8, float32) and the Omniglot sample in
samples/omniglot for real images. Times are medians over repeated runs, one interpreter thread.
Cold start and peak memory are measured on `edgemeta classify` in a new process each time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "omniglot"


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def child_run(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall time (s) and peak RSS (MiB) of one command, measured from a fresh watcher process."""
    watcher = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True); dt = time.perf_counter() - t; "
               "assert p.returncode == 0, p.stderr.decode(); "
               "print(json.dumps([dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))")
    out = subprocess.run([sys.executable, "-c", watcher, *cmd], capture_output=True, text=True, env=env, check=True)
    return tuple(json.loads(out.stdout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "omniglot-conv4"))
    ap.add_argument("--runtime", default="ai_edge_litert", choices=["ai_edge_litert", "tflite_runtime", "tensorflow"])
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    os.environ["EDGEMETA_RUNTIME"] = args.runtime

    from edgemeta.runtime.classifier import FewShotRuntime
    from edgemeta.runtime.head import PrototypeHead
    from edgemeta.runtime.interpreter import Embedder, runtime_version
    from edgemeta.runtime.manifest import read_manifest

    manifest = read_manifest(args.model)
    chars = sorted(p for p in SAMPLE.iterdir() if p.is_dir())
    rt = FewShotRuntime(args.model)
    images, _ = rt.images([str(p) for c in chars[:5] for p in sorted(c.glob("*.png"))[:5]])
    print(f"runtime: {args.runtime} {runtime_version(args.runtime)}; model {manifest.name}; machine {os.uname().machine}, "
          f"{os.cpu_count()} cores; 1 thread; median of {args.repeat}")

    print("\nembedding latency")
    for variant in ("int8_static", "int8", "float32"):
        emb = Embedder(manifest.model_path(variant), threads=1)
        one = median_ms(lambda e=emb: e(images[:1]), args.repeat)
        line = f"  {variant:12s} batch 1: {one:.3f} ms/image"
        if not emb.static_batch:
            b25 = median_ms(lambda e=emb: e(images[:25], batch=25), max(20, args.repeat // 10))
            line += f"   batch 25: {b25:.2f} ms ({b25 / 25:.3f} ms/image)"
        print(line)

    with tempfile.TemporaryDirectory() as tmp:
        files = [str(p) for p in sorted(chars[0].glob("*.png"))[:5]]
        counter = iter(range(10**6))
        enroll = median_ms(lambda: rt.enroll(Path(tmp) / "s", f"class{next(counter)}", files, allow_duplicates=True), 30)
        print(f"\nenroll a 5-shot class (decode 5 PNGs, preprocess, embed, atomic store write): {enroll:.2f} ms")

        print("\nhead cost for one query (prototypes kept; distances, top-5, open-set) and full classify")
        rng = np.random.default_rng(0)
        query_emb = rt.embedder(images[:1])
        query_file = [str(sorted(chars[1].glob("*.png"))[-1])]
        real = rt.embedder(images)
        for n in (10, 100, 1000):
            emb = real[rng.integers(0, len(real), 5 * n)] + rng.normal(0, 0.05, (5 * n, real.shape[1])).astype(np.float32)
            labels = np.repeat(np.arange(n), 5)
            head = PrototypeHead.from_embeddings(emb, labels, [f"c{i}" for i in range(n)], threshold=rt.threshold_of_model)
            head_ms = median_ms(lambda h=head: h.classify(query_emb, top_k=5), args.repeat)
            build_ms = median_ms(lambda e=emb, lb=labels, h=head: PrototypeHead.from_embeddings(e, lb, h.names), 50)
            store = Path(tmp) / f"store{n}"
            from edgemeta.runtime.store import EnrollmentStore

            s = EnrollmentStore.create(store, rt.backbone, False, rt.manifest.preprocess.input_shape)
            s.class_names = list(head.names)
            s.embeddings, s.labels = emb.astype(np.float32), labels.astype(np.int32)
            s.save()
            full_ms = median_ms(lambda st=store: rt.classify(st, query_file, top_k=5), 50)
            print(f"  {n:5d} classes: head {head_ms:.3f} ms; head build from store {build_ms:.3f} ms; "
                  f"classify 1 PNG incl. store load {full_ms:.2f} ms")

        print("\ncold start (new process: edgemeta classify, 1000-class store, 1 PNG) and peak memory")
        exe = str(Path(sys.executable).parent / "edgemeta")
        env = {**os.environ, "EDGEMETA_RUNTIME": args.runtime}
        runs = [child_run([exe, "classify", "--store", str(Path(tmp) / "store1000"), "--model", args.model, *query_file], env)
                for _ in range(5)]
        wall, rss = np.median([r[0] for r in runs]), max(r[1] for r in runs)
        print(f"  wall {1000 * wall:.0f} ms (median of 5), peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
