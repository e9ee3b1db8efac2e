"""Accuracy against shots and against ways, float against int8, prototype head against the adapted
head: two PNGs a user reads at a glance.

    python -m benchmarks.accuracy_plots --model models/omniglot-conv4 --data ../shared/data/omniglot \\
        [--episodes 200] [--out benchmarks]       # writes accuracy_vs_shots.png, accuracy_vs_ways.png

The model's test split (for `omniglot-conv4` the lake split's 659 evaluation characters, unseen in
training), seeded episodes, 95% intervals. Shots 1, 2, 5, 10, 15 at 5-way (Omniglot has 20 drawings a
class, so 20 shots would leave no query; 15 leaves 5), ways 5, 20, 50, 100 and every test class at 1
shot. Lines: Keras float32 and the board's int8_static embeddings (LiteRT) with the prototype head,
and the int8 embeddings with the adapted head (the prototype-initialised linear head of
`edgemeta adapt`, `--steps` steps at `--lr`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "omniglot-conv4"))
    ap.add_argument("--data", default=os.environ.get("EDGEMETA_OMNIGLOT", "../shared/data/omniglot"))
    ap.add_argument("--folder", help="evaluate on every class of this folder-per-class dataset instead")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--shots", default="1,2,5,10,15")
    ap.add_argument("--ways", default="5,20,50,100,all")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--variant", default="int8_static")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgemeta.host.config import config_from_dict
    from edgemeta.host.data import load_dataset
    from edgemeta.host.evaluate import evaluate, query_and_support
    from edgemeta.host.methods import get_method
    from edgemeta.host.model_eval import keras_embedder, training_dataset
    from edgemeta.host.modeldir import load_backbone
    from edgemeta.runtime.heads.linear import LinearHeadSpec, linear_scores
    from edgemeta.runtime.interpreter import Embedder
    from edgemeta.runtime.manifest import read_manifest

    model, info = load_backbone(a.model)
    if a.folder:
        cfg = config_from_dict({"data": {"kind": "folder", "root": a.folder, "fractions": [0.0, 0.0, 1.0]},
                                "model": {"backbone": info.backbone}})
        split = load_dataset(cfg.data, info.preprocess, ("test",))["test"]
    else:
        split = load_dataset(training_dataset(info, a.data), info.preprocess, ("test",))["test"]
    proto = get_method("protonet").classify
    spec = LinearHeadSpec(init="proto", steps=a.steps, rates_w=[a.lr], rates_b=[a.lr])

    def adapted(s, labels, q, way):
        return linear_scores(spec, s, labels, q, way)

    manifest = read_manifest(a.model)
    board = Embedder(manifest.model_path(a.variant), threads=os.cpu_count() or 1)
    embedders = {"float32": keras_embedder(model), a.variant: board}
    shift = manifest.head.support_shift  # enrolled as the board enrolls: (query, support) embeddings
    emb = {k: query_and_support(f, split, shift) for k, f in embedders.items()}
    lines = {"Keras float32, prototype": (emb["float32"], proto), f"{a.variant}, prototype": (emb[a.variant], proto),
             f"{a.variant}, adapted linear ({a.steps} steps)": (emb[a.variant], adapted)}
    size = split.min_class_size()
    shots = [s for s in (int(x) for x in a.shots.split(",")) if s < size]
    ways = sorted({min(split.num_classes, int(w)) if w != "all" else split.num_classes for w in a.ways.split(",")})
    ways = [w for w in ways if w >= 2]
    out = {"model": a.model, "split": f"{split.name} ({split.num_classes} classes)", "episodes": a.episodes,
           "shots": {}, "ways": {}}
    for name, ((e, sup), head) in lines.items():
        out["shots"][name] = [r.__dict__ for r in evaluate(None, head, split, [(5 if split.num_classes >= 5 else 2, s)
                                                                                 for s in shots],
                                                             a.episodes, query=min(15, size - max(shots)), embeddings=e,
                                                             support_embeddings=sup)]
        out["ways"][name] = [r.__dict__ for r in evaluate(None, head, split, [(w, 1) for w in ways], a.episodes,
                                                            query=min(15, size - 1), embeddings=e, support_embeddings=sup)]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for axis, values, label, fname in (("shots", shots, "shots (5-way)", "accuracy_vs_shots.png"),
                                       ("ways", ways, "ways (1-shot)", "accuracy_vs_ways.png")):
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for name in lines:
            rows = out[axis][name]
            ax.errorbar(values, [r["accuracy"] for r in rows], yerr=[r["ci95"] for r in rows], marker="o", capsize=3,
                        label=name)
        ax.set_xscale("log")
        ax.set_xticks(values)
        ax.set_xticklabels([str(v) for v in values])
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{Path(a.model).name}, {split.num_classes} unseen test classes, {a.episodes} episodes")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(a.out) / fname)
        plt.close(fig)
    print(f"# {a.model}, {out['split']}, {a.episodes} seeded episodes, accuracy % (95% CI)")
    for axis, values in (("shots", shots), ("ways", ways)):
        print(f"| {axis} | " + " | ".join(str(v) for v in values) + " |")
        print("|---" * (len(values) + 1) + "|")
        for name in lines:
            print(f"| {name} | " + " | ".join(f"{r['accuracy']:.2f} +/- {r['ci95']:.2f}" for r in out[axis][name]) + " |")
    print(f"plots: {Path(a.out) / 'accuracy_vs_shots.png'}, {Path(a.out) / 'accuracy_vs_ways.png'}")
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
