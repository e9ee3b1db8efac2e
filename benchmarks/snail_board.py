"""SNAIL's board path beside the prototype head: latency per query, the support pass, memory.

    python -m benchmarks.snail_board --model benchmarks/runs/snail-vinyals [--threads 1]

For 5-way and 20-way stores (1 and 5 shots, real sample characters from samples/omniglot, int8_static
body), on this machine's interpreter: the sequence head's support pass (the prefix graph, run once per
store change), one query after a cached prefix, a classify call that has to run the prefix, and the
nearest-prototype head over the same embeddings; then the peak RSS of `edgemeta classify` of one image
in a fresh process with this model and with the prototype model (`--proto`). Medians of repeated runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.runtime_latency import SAMPLE, child_run, median_ms


def setting_times(graphs, support: np.ndarray, labels: np.ndarray, query: np.ndarray, way: int, repeat: int) -> list[str]:
    """Median ms of the support pass, one query after it, a classify that runs it, and the prototype head."""
    from edgemeta.runtime.heads.common import PrototypeHead

    def prefix():
        graphs._cached = None  # forget the kept support pass
        graphs.features(support, labels)

    def cold():
        graphs._cached = None
        graphs.scores(support, labels, query, way)

    protos = PrototypeHead.from_embeddings(support, labels, [str(i) for i in range(way)])
    return [f"{median_ms(prefix, repeat):.2f}", f"{median_ms(lambda: graphs.scores(support, labels, query, way), repeat):.2f}",
            f"{median_ms(cold, repeat):.2f}", f"{median_ms(lambda: protos.classify(query), repeat):.3f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--proto", default=str(Path(__file__).resolve().parents[1] / "models" / "omniglot-vinyals-conv4"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()

    from edgemeta.runtime.fewshot import FewShotRuntime
    from edgemeta.runtime.heads.sequence import SequenceGraphs
    from edgemeta.runtime.interpreter import runtime_version

    rt = FewShotRuntime(args.model, threads=args.threads)
    graphs: SequenceGraphs = rt.model_head.loaded  # the sequence head's graphs, loaded with the body
    chars = sorted(p for p in SAMPLE.iterdir() if p.is_dir())
    files = [sorted(c.glob("*.png")) for c in chars]
    print(f"# {rt.manifest.name}, variant {rt.variant.name}, {rt.embedder.runtime} {runtime_version(rt.embedder.runtime)}, "
          f"{args.threads} thread(s); sequence graphs for {graphs.max_way} classes x {graphs.max_shot} shots "
          f"({sum(p.stat().st_size for p in rt.manifest.sequence_paths()) / 2**20:.1f} MiB)")
    print("| store | support pass (prefix graph) ms | one query, prefix cached, ms | classify incl. prefix ms | "
          "prototype head ms |")
    print("|---|---|---|---|---|")
    for way, shot in ((5, 1), (5, 5), (20, 1), (20, 5)):
        if way > min(graphs.max_way, len(chars)) or shot > graphs.max_shot:
            continue
        support = np.concatenate([rt.embedder(rt.images(f[:shot])[0]) for f in files[:way]])
        labels = np.repeat(np.arange(way), shot)
        query = rt.embedder(rt.images([files[0][-1]])[0])

        print(f"| {way}-way {shot}-shot | " + " | ".join(setting_times(graphs, support, labels, query, way, args.repeat)) + " |")

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ}
        exe = [sys.executable, "-m", "edgemeta"]
        print("\n| model | `edgemeta classify` of one image, fresh process: wall s | peak RSS MiB |")
        print("|---|---|---|")
        for name, model in (("snail", args.model), ("prototype", args.proto)):
            store = Path(tmp) / name
            for f in files[:5]:
                subprocess.run([*exe, "enroll", "--store", str(store), "--model", model, "--label", f[0].parent.name,
                                *map(str, f[:5])], check=True, capture_output=True)
            runs = [child_run([*exe, "classify", "--store", str(store), "--model", model, str(files[0][-1])], env)
                    for _ in range(3)]
            print(f"| {name} ({Path(model).name}) | {np.median([r[0] for r in runs]):.2f} | {max(r[1] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
