"""The board CLI's cold start and peak memory, this tree against another commit, side by side in one run.

Each run is a new process: `edgemeta classify` of one PNG against a store of the 52 sample classes
(samples/omniglot, enrolled once with this tree's CLI: the store format is shared), on the shipped int8
model; the two trees alternate run by run, so the machine's noise falls on both alike. Prints the median
and p10-p90 wall time and the median peak RSS (the child's ru_maxrss) of each.

    python -m benchmarks.cold_start_compare --baseline 9bf9460 --runs 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "omniglot-conv4"
SAMPLES = REPO / "samples" / "omniglot"


def unpack(commit: str, into: Path) -> Path:
    """The tree of `commit`, exported (no checkout, no build: the CLI runs from the sources)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "edgemeta", "firmware_tools", "boards"],
                             check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    tar = into / "tree.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    # the wheel maps boards/ to edgemeta.boards_data; from the sources, a link does the same
    (into / "edgemeta" / "boards_data").symlink_to(into / "boards")
    return into


CLI = "import sys; from edgemeta.cli import main; sys.argv[0] = 'edgemeta'; main()"


def one_run(tree: Path, store: Path, query: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CLI, "classify", "--store", str(store), str(query)], check=True,
                   capture_output=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="the commit to compare with (e.g. main's before a change)")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store, base = tmp / "store", unpack(args.baseline, tmp / "base")
        subprocess.run([sys.executable, "-m", "edgemeta", "enroll", "--store", str(store), "--model", str(MODEL),
                        "--from-folders", str(SAMPLES)], check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        query = next(iter(sorted(next(iter(sorted(SAMPLES.iterdir()))).iterdir())))
        trees = {"this tree": REPO, f"baseline {args.baseline}": base}
        times: dict[str, list[float]] = {name: [] for name in trees}
        for tree in trees.values():  # one warm-up each: the file cache, .pyc files
            one_run(tree, store, query)
        for _ in range(args.runs):
            for name, tree in trees.items():
                times[name].append(one_run(tree, store, query))
        # peak RSS: a fresh measuring process per tree, so ru_maxrss is that tree's own
        for name, tree in trees.items():
            peak = subprocess.run([sys.executable, "-c", (
                "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"),
                sys.executable, "-c", CLI,
                "classify", "--store", str(store), str(query)], env={**os.environ, "PYTHONPATH": str(tree)},
                check=True, capture_output=True, text=True, cwd=tree).stdout
            t = sorted(times[name])
            p10, p90 = t[len(t) // 10], t[(9 * len(t)) // 10]
            print(f"{name:24s} cold start median {statistics.median(t) * 1000:6.0f} ms (p10-p90 {p10 * 1000:.0f}-"
                  f"{p90 * 1000:.0f}), peak RSS {int(peak) / 1024:5.1f} MiB, {len(t)} runs")


if __name__ == "__main__":
    main()
