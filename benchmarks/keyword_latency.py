"""Keyword latency and cost on the board path (no TensorFlow), on this CPU, one interpreter thread:

- in-process: the front end per clip (decode + log-mel), the int8 embedding per clip, enrolling a
  keyword from three recordings (decode + embed + atomic store write), classifying one clip;
- what an operator waits for: the whole `edgemeta enroll --label W a.wav b.wav c.wav` process
  (Python start, model load, enroll) and `edgemeta classify x.wav`;
- `listen` on a 60 s stream of real recordings with gaps: time per classified window and the share
  of one CPU core it takes (process CPU time over the stream's duration; real time needs < 100%).

Medians over --runs, p10-p90 beside them. The recordings are samples/speech_commands (real voices).

    python -m benchmarks.keyword_latency --model models/keywords-conv4 --runs 30
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one board core, as the CLI does

import numpy as np  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "speech_commands"


def timed(fn, runs: int) -> tuple[float, float, float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    p10, p50, p90 = np.percentile(np.array(out) * 1e3, [10, 50, 90])
    return p50, p10, p90


def stream(seconds: float, seed: int = 0) -> np.ndarray:
    """Real recordings one after another with 0.4-1.5 s of room noise (-50 dBFS) between them."""
    from edgemeta.audio import decode_wav

    rng = np.random.default_rng(seed)
    files = sorted(SAMPLES.glob("*/*.wav"))
    parts, n = [], 0
    while n < seconds * 16000:
        x, _ = decode_wav(files[rng.integers(len(files))].read_bytes())
        gap = rng.normal(0, 10 ** (-50 / 20), int(rng.uniform(0.4, 1.5) * 16000)).astype(np.float32)
        parts += [x, gap]
        n += x.size + gap.size
    return np.concatenate(parts)[: int(seconds * 16000)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/keywords-conv4")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()

    from edgemeta.runtime.fewshot import UNKNOWN, FewShotRuntime
    from edgemeta.runtime.listen import Spotter

    rt = FewShotRuntime(args.model)
    clips = sorted((SAMPLES / "yes").glob("*.wav"))
    three, query = clips[:3], clips[3]
    pre = rt.manifest.preprocess
    x = pre.file(query)[None]
    rows = {"front end, one 1 s clip (decode + log-mel)": timed(lambda: pre.file(query), args.runs),
            "int8 embedding, one clip": timed(lambda: rt.embedder(x), args.runs)}
    tmp = Path(tempfile.mkdtemp())

    def enroll():
        shutil.rmtree(tmp / "s", ignore_errors=True)
        rt.enroll(tmp / "s", "yes", three)

    rows["enroll a keyword from 3 recordings, in-process (new store)"] = timed(enroll, args.runs)
    for w in ("no", "up", "down", "stop"):
        rt.enroll(tmp / "s", w, sorted((SAMPLES / w).glob("*.wav"))[:3])
    rows["classify one clip, in-process (decode + embed + head)"] = timed(lambda: rt.classify(tmp / "s", [query]), args.runs)

    cli = [sys.executable, "-m", "edgemeta"]

    def enroll_process():
        subprocess.run([*cli, "enroll", "--model", args.model, "--store", str(tmp / "p"), "--label", "yes", "--allow-duplicates",
                        *map(str, three)], check=True, capture_output=True)

    runs = max(5, args.runs // 3)
    rows["`edgemeta enroll` from 3 recordings, whole process"] = timed(enroll_process, runs)
    rows["`edgemeta classify` one clip, whole process"] = timed(
        lambda: subprocess.run([*cli, "classify", "--store", str(tmp / "s"), str(query)], check=True, capture_output=True), runs)

    store = rt.open_store(tmp / "s")
    head = rt.head(store)
    audio = stream(60.0)
    spotter = Spotter(pre, 16000, lambda w: head.classify(rt.embedder(w[None]), 1, unknown=UNKNOWN)[0])
    for i in range(0, audio.size, 800):  # 50 ms chunks, as `listen` reads them
        spotter.feed(audio[i:i + 800])
    spotter.flush()
    c = spotter.costs.summary()

    print(f"{args.model} ({rt.variant.name}, {rt.embedder.runtime}, 1 thread), {args.runs} runs, median ms (p10-p90)")
    for name, (p50, p10, p90) in rows.items():
        print(f"| {name} | {p50:.2f} ({p10:.2f}-{p90:.2f}) |")
    print(f"| listen, 60 s stream: {c['windows_classified']} utterances of {c['hops']} hops, per classified window | "
          f"{c['window_ms_median']:.2f} (p90 {c['window_ms_p90']:.2f}) |")
    print(f"| listen, share of one CPU core | {100 * c['cpu_share_of_one_core']:.2f}% |")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
