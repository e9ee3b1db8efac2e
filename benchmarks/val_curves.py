"""Validation accuracy against wall time for several training runs, as a PNG and a table.

A method that has not converged in the time there was shows here how far it got.

    .venv/bin/python -m benchmarks.val_curves --out benchmarks/optimization_family.png \\
        MAML=runs/maml-5w1s ANIL=runs/anil-20w1s
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_history(folder: Path) -> list[dict]:
    with open(folder / "history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER (a folder holding history.csv)")
    ap.add_argument("--out", required=True, help="PNG to write")
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for spec in a.runs:
        label, _, folder = spec.partition("=")
        rows = read_history(Path(folder))
        minutes = [r["elapsed_s"] / 60 for r in rows]
        acc = [100 * r["val_acc"] for r in rows]
        ax.errorbar(minutes, acc, yerr=[100 * r["val_ci95"] for r in rows], marker=".", capsize=2, label=label)
        best = max(rows, key=lambda r: r["val_acc"])
        print(f"{label}: {len(rows)} validations, last at {rows[-1]['episode']:.0f} episodes / {minutes[-1]:.1f} min: "
              f"{acc[-1]:.2f}%; best {100 * best['val_acc']:.2f} +/- {100 * best['val_ci95']:.2f}% "
              f"at {best['episode']:.0f} episodes ({best['elapsed_s'] / 60:.1f} min)")
    ax.set_xlabel("training wall time (minutes, 2-core CPU)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out)


if __name__ == "__main__":
    main()
