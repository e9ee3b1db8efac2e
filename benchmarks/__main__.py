"""The benchmark suite: every side-by-side and board figure of BENCHMARKS.md in one command.

    python -m benchmarks --data ../shared/data/omniglot            # the full suite (the budgeted run: 2 x 25 min)
    python -m benchmarks --quick                                   # a few minutes: every script on short settings
    python -m benchmarks --quick --only protonet,maml --no-peer    # some of them, edgemeta alone
    python -m benchmarks --smoke                                   # seconds: tiny settings on samples/omniglot, no peer

Each script runs in its own process, one after the other (never two at a time: they time the CPU);
its output goes to OUT/<name>.txt (default runs/bench-<time>/) and the plots into OUT. First the suite
sets up its peers (benchmarks/peers.py: learn2learn 0.2.0 and PyTorch in their own folder, outside
this repository); `--no-peer` runs edgemeta's side alone. Exit status 1 when a script failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import peers

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLE = REPO / "samples" / "omniglot"

# the board-path figures run in a venv with that interpreter and no TensorFlow (benchmarks/peers.py sets them up)
BOARD_VENV = {"runtime_latency": "ai_edge_litert", "runtime_latency_tflite": "tflite_runtime"}


def steps(a, out: Path) -> list[tuple[str, list[str]]]:
    """(name, arguments after the script) for each script, as the mode asks."""
    data, peer_dir = ["--data", a.data], (["--peers", a.peers] if a.peers else [])
    peer = ["--no-peer"] if a.no_peer or a.smoke else peer_dir
    sample = ["--sample", str(SAMPLE)]
    model = ["--model", a.model]
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    table = {
        "peers": {"full": peer_dir, "quick": peer_dir, "smoke": None},
        "protonet_side_by_side": {
            "full": [*data, *peer, "--check-numerics", "30"],
            "quick": [*data, *peer, "--episodes", "60w5s5q,20w5s15q", "--rounds", "2", "--per-round", "2",
                      "--warmup", "1", "--check-numerics", "5"],
            "smoke": [*sample, *peer, "--episodes", "5w1s2q", "--rounds", "1", "--per-round", "1", "--warmup", "1",
                      "--check-numerics", "2"]},
        "maml_side_by_side": {
            "full": [*data, *peer],
            "quick": [*data, *peer, "--meta-batch", "8", "--rounds", "2", "--per-round", "1"],
            "smoke": [*sample, *peer, "--meta-batch", "2", "--rounds", "1", "--per-round", "1", "--orders", "first"]},
        "protonet_budget": {
            "full": [*data, *peer, "--minutes", "25", "--plot", str(out / "protonet_budget.png")],
            "quick": [*data, *peer, "--quick", "--plot", str(out / "protonet_budget.png")],
            "smoke": [*sample, *peer, "--episode", "5w1s2q", "--minutes", "0.04", "--slice-s", "1", "--val-way", "5",
                      "--val-episodes", "5", "--plot", str(out / "protonet_budget.png")]},
        "runtime_latency": {"full": model, "quick": [*model, "--repeat", "30"], "smoke": [*model, "--repeat", "2", "--cold", "1"]},
        "runtime_latency_tflite": {"full": [*model, "--runtime", "tflite_runtime"],
                                   "quick": [*model, "--runtime", "tflite_runtime", "--repeat", "30"], "smoke": None},
        "runtime_latency_tf": {"full": [*model, "--runtime", "tensorflow"],
                               "quick": [*model, "--runtime", "tensorflow", "--repeat", "30"], "smoke": None},
        "runtime_latency_keras": {"full": [*model, "--runtime", "keras"],
                                  "quick": [*model, "--runtime", "keras", "--repeat", "30"],
                                  "smoke": [*model, "--runtime", "keras", "--repeat", "2", "--cold", "1"]},
        "accuracy_plots": {
            "full": [*model, *data, "--episodes", "200", "--out", str(out)],
            "quick": [*model, *data, "--episodes", "30", "--out", str(out)],
            "smoke": [*model, "--folder", str(SAMPLE), "--episodes", "2", "--shots", "1,5", "--ways", "5,20",
                      "--out", str(out)]},
        "head_scale": {"full": model, "quick": [*model, "--repeat", "5"],
                       "smoke": [*model, "--classes", "10,100", "--repeat", "1"]},
        "mac_peak": {"full": model, "quick": [*model, "--repeat", "10"], "smoke": [*model, "--repeat", "1", "--threads", "1"]},
    }
    chosen = [s.strip() for s in a.only.split(",")] if a.only else list(table)
    unknown = [c for c in chosen if c not in table]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown[0]!r}; choose among: {', '.join(table)}")
    out_steps = []
    for name in chosen:
        args = table[name][mode]
        # without peers the ai-edge-litert figures come from this Python; tflite-runtime needs its own venv
        if args is None or (a.no_peer and name in ("peers", "runtime_latency_tflite")):
            continue
        out_steps.append((name, args))
    return out_steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                 epilog="example: python -m benchmarks --quick --data ../shared/data/omniglot",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("EDGEMETA_OMNIGLOT", "../shared/data/omniglot"),
                    help="the Omniglot folder (images_background.zip, images_evaluation.zip)")
    ap.add_argument("--model", default=str(REPO / "models" / "omniglot-conv4"), help="the model the board figures use")
    ap.add_argument("--peers", help="the peers' folder (default $EDGEMETA_PEERS or ~/.cache/edgemeta-bench/peers)")
    ap.add_argument("--no-peer", action="store_true", help="edgemeta's side alone (no install, no network)")
    ap.add_argument("--quick", action="store_true", help="short settings: a few minutes in all")
    ap.add_argument("--smoke", action="store_true", help="tiny settings on samples/omniglot, edgemeta alone (tests)")
    ap.add_argument("--only", help="comma-separated names of the benchmarks to run")
    ap.add_argument("--out", help="folder for the outputs and plots (default runs/bench-<time>)")
    a = ap.parse_args(argv)
    out = Path(a.out or REPO / "runs" / time.strftime("bench-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    failed, summary = [], []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    for name, args in steps(a, out):
        module = "benchmarks." + ("runtime_latency" if name.startswith("runtime_latency") else name)
        python = Path(sys.executable)
        if name in BOARD_VENV and not a.no_peer and not a.smoke:
            python = peers.board_python(peers.peers_dir(a.peers), BOARD_VENV[name])
            if not python.exists():
                print(f"!! {name} failed: no {BOARD_VENV[name]} venv at {python.parent.parent} (the peers step sets it up)", flush=True)
                failed.append(name)
                summary.append(f"{name}: failed, 0 s")
                continue
        cmd = [str(python), "-m", module, *args]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        dt = time.perf_counter() - t0
        (out / f"{name}.txt").write_text(p.stdout + ("\n--- stderr ---\n" + p.stderr if p.returncode else ""))
        print(p.stdout, end="" if p.stdout.endswith("\n") or not p.stdout else "\n", flush=True)
        if p.returncode:
            tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"!! {name} failed (exit {p.returncode}): {tail}", flush=True)
            failed.append(name)
        summary.append(f"{name}: {'failed' if p.returncode else 'ok'}, {dt:.0f} s")
    print("\n== summary (outputs in " + str(out) + ")\n" + "\n".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
