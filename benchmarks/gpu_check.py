"""The GPU host path, checked on a machine with an NVIDIA GPU, in under 8 minutes.

Installs the `gpu` extra (TensorFlow with CUDA) into its own venv, trains the vinyals config
(models/omniglot-vinyals-conv4/config.toml: ProtoNet Conv-4, 100-way 1-shot 5-query) for a few minutes
with `edgemeta train`, samples the GPU's utilisation with nvidia-smi meanwhile, and prints episodes/s
(training steps only, from the run's model.json), the mean GPU utilisation, where TensorFlow placed
the training and the ratio to the CPU figure of BENCHMARKS.md. On a machine without a GPU it says so
and exits with status 2.

    python -m benchmarks.gpu_check --data ../shared/data/omniglot [--minutes 3] [--venv .venv-gpu]
    python -m benchmarks.gpu_check --no-install   # use this interpreter's TensorFlow (already with CUDA)

Exit status: 0 when training ran on a GPU, 1 when it ran but not on a GPU (or failed), 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "models" / "omniglot-vinyals-conv4" / "config.toml"
# BENCHMARKS.md: this config's training steps (100-way 1-shot 5-query) on the 2-core development CPU,
# `benchmarks/train_throughput.py --way 100 --shot 1 --query 5`
CPU_EPISODES_PER_S = 2.49
INSTALL_TIMEOUT_S = 240


def gpus() -> list[str]:
    """The GPUs nvidia-smi lists ('' when there is no nvidia-smi or no GPU)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


class Utilisation:
    """nvidia-smi's utilisation.gpu of GPU 0, sampled every second on a thread."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []  # (time, utilisation %, memory used MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout.strip()
                util, mem = (float(x) for x in out.split(",")[:2])
                self.samples.append((time.monotonic(), util, mem))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def mean(self, since: float) -> tuple[float, float, int]:
        """Mean utilisation and peak memory over the samples taken after `since` (the training's steps)."""
        s = [x for x in self.samples if x[0] >= since] or self.samples
        if not s:
            return float("nan"), float("nan"), 0
        return sum(x[1] for x in s) / len(s), max(x[2] for x in s), len(s)


def once_at_the_end(text: str) -> str:
    """The config's TOML with [validation] every set past any budget (the time budget's stop still validates)."""
    lines, section, done = [], "", False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        if section == "[validation]" and stripped.split("=")[0].strip() == "every":
            line, done = "every = 1000000000", True
        lines.append(line)
    if not done:
        lines += ([] if "[validation]" in text else ["[validation]"]) + ["every = 1000000000"]
    return "\n".join(lines) + "\n"


def install(venv: Path) -> Path:
    """A venv with `pip install -e '.[gpu]'`; its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    t = time.monotonic()
    print(f"installing the gpu extra into {venv} (pip install -e '.[gpu]') ...", flush=True)
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", f"{REPO}[gpu]"], timeout=INSTALL_TIMEOUT_S)
    if proc.returncode:
        sys.exit(f"error: pip install -e '.[gpu]' failed (exit {proc.returncode}); see pip's output above")
    print(f"installed in {time.monotonic() - t:.0f} s", flush=True)
    return python


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("EDGEMETA_OMNIGLOT", str(REPO.parent / "shared" / "data" / "omniglot")))
    ap.add_argument("--minutes", type=float, default=3.0, help="training time budget ([train] max_minutes)")
    ap.add_argument("--venv", default=str(REPO / ".venv-gpu"), help="where to install the gpu extra")
    ap.add_argument("--no-install", action="store_true", help="use this interpreter (its TensorFlow must see the GPU)")
    ap.add_argument("--cpu-episodes-per-s", type=float, default=CPU_EPISODES_PER_S, help="the CPU figure to compare with")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    ap.add_argument("--without-gpu", action="store_true",
                    help="run the training part anyway (to test this script on a machine without a GPU; exits 1)")
    args = ap.parse_args()
    if args.minutes <= 0 or args.minutes > 5:
        sys.exit("error: --minutes must be in (0, 5] (the whole check stays under 8 minutes)")

    found = gpus()
    if not found and not args.without_gpu:
        print("no GPU on this machine (nvidia-smi is missing or lists none): nothing to check; "
              "the CPU figures are in BENCHMARKS.md (benchmarks/train_throughput.py)")
        return 2
    print("GPU(s): " + ("; ".join(found) or "none (--without-gpu)"), flush=True)
    started = time.monotonic()
    python = Path(sys.executable) if args.no_install else install(Path(args.venv))

    out = Path(tempfile.mkdtemp(prefix="edgemeta-gpu-check-"))
    # the vinyals config as shipped, validated once at the end of the budget instead of every 500 episodes
    config = out / "config.toml"
    config.write_text(once_at_the_end(CONFIG.read_text()))
    cmd = [str(python), "-m", "edgemeta", "train", "--config", str(config), "--data", args.data, "--out", str(out / "run"),
           "--max-minutes", str(args.minutes), "--fresh", "--quiet"]
    print("training: " + " ".join(cmd[1:]), flush=True)
    util = Utilisation()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60 * args.minutes + 150)
    except subprocess.TimeoutExpired:
        util.stop()
        print("error: training did not stop within its budget plus 150 s", file=sys.stderr)
        return 1
    util.stop()
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        print(f"error: edgemeta train failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    training = json.loads((out / "run" / "model.json").read_text())["training"]
    place = training.get("placement", {})
    rate = training.get("episodes_per_s") or 0.0
    # utilisation while steps ran: after the first 20 s (TensorFlow start, data, compilation)
    mean_util, peak_mem, n = util.mean(t0 + 20)
    on_gpu = any("GPU" in d.upper() for d in place.get("devices", []))
    figures = {"gpus": found, "devices": place.get("devices"), "strategy": place.get("strategy"),
               "episodes": training["episodes"], "episodes_per_s": rate, "gpu_utilisation_pct": round(mean_util, 1) if n else None,
               "gpu_memory_peak_mib": peak_mem if n else None, "utilisation_samples": n, "cpu_episodes_per_s": args.cpu_episodes_per_s,
               "ratio_to_cpu": round(rate / args.cpu_episodes_per_s, 1) if args.cpu_episodes_per_s else None,
               "best_val_acc": training.get("best_val_acc"), "total_s": round(time.monotonic() - started)}
    print(f"trained {figures['episodes']} episodes on {', '.join(figures['devices'] or ['?'])} ({figures['strategy']})")
    print(f"episodes/s: {rate:.2f} (training steps; the CPU figure is {args.cpu_episodes_per_s:.2f}: "
          f"{figures['ratio_to_cpu']}x)")
    print(f"GPU utilisation: mean {mean_util:.0f}% over {n} samples, peak memory {peak_mem:.0f} MiB")
    print(f"whole check: {figures['total_s']} s")
    if args.json:
        print(json.dumps(figures))
    shutil.rmtree(out, ignore_errors=True)
    if not on_gpu:
        print("error: TensorFlow did not train on the GPU (see devices above): is the gpu extra's CUDA usable here?",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
