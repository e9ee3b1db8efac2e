"""Two model folders on the same seeded test episodes: each one's accuracy and their paired difference.

Two models' intervals overlap long before their difference is noise: the same episodes make the
per-episode difference far less spread than either accuracy, so its interval says whether B beats A.
Keras float32 backbones through each method's numpy head (non-transductive batch norm).

    .venv/bin/python -m benchmarks.paired_eval benchmarks/runs/lake-trainval-teacher models/omniglot-conv4 \\
        --data ../shared/data/omniglot
    .venv/bin/python -m benchmarks.paired_eval models/omniglot-conv4 models/omniglot-conv4 --support-shift-a 0 \\
        --data ../shared/data/omniglot     # one model with and without its support views
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="model folder A (the reference)")
    ap.add_argument("b", help="model folder B")
    ap.add_argument("--data", default="", help="Omniglot location (else $EDGEMETA_OMNIGLOT)")
    ap.add_argument("--settings", default="5w1s,5w5s,20w1s,20w5s")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--within-alphabet", action="store_true", help="every episode's classes from one alphabet")
    ap.add_argument("--support-shift-a", type=int, default=None, help="A's support views (default: the model's own)")
    ap.add_argument("--support-shift-b", type=int, default=None, help="B's support views (default: the model's own)")
    a = ap.parse_args()

    from edgemeta.errors import EdgemetaError
    from edgemeta.host.data import EpisodeSampler, load_dataset
    from edgemeta.host.data.episodes import alphabets
    from edgemeta.host.evaluate import episode_accuracies, episode_inputs, head_support_shift, parse_setting
    from edgemeta.host.model_eval import keras_embedder, training_dataset
    from edgemeta.host.modeldir import load_backbone
    from edgemeta.stats import mean_ci95

    try:
        splits, inputs, shifts = {}, {}, {}
        for name, folder, shift in (("A", a.a, a.support_shift_a), ("B", a.b, a.support_shift_b)):
            model, info = load_backbone(folder)
            key = (training_dataset(info, a.data), info.preprocess)
            if key not in splits:  # two models of one dataset and preprocessing share its loaded split
                splits[key] = load_dataset(*key, ("test",))["test"]
            method = info.make_method(folder, model, overrides={} if shift is None else {"support_shift": shift})
            inputs[name] = (*episode_inputs(method, keras_embedder(model), splits[key], head_only=True), splits[key])
            shifts[name] = head_support_shift(method)
        if inputs["A"][3].class_names != inputs["B"][3].class_names:
            raise EdgemetaError("the two models were trained on different splits; their test episodes differ")
        if a.within_alphabet:
            alphabets(inputs["A"][3])  # refuses a split without alphabets
    except EdgemetaError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"A = {a.a}, B = {a.b}; {a.episodes} seeded episodes (seed {a.seed}) per setting, 15 queries, "
          f"{'within one alphabet' if a.within_alphabet else 'classes from the whole split'}, Keras float32; "
          f"support views: A {shifts['A']} px, B {shifts['B']} px (0: none)")
    print("| setting | A | B | B - A (paired) |\n|---|---|---|---|")
    for text in a.settings.split(","):
        way, shot = parse_setting(text)
        accs = {}
        for name, (classify, emb, support, split) in inputs.items():
            sampler = EpisodeSampler(split, way, shot, 15, seed=a.seed, within_groups=a.within_alphabet)
            accs[name] = np.asarray(episode_accuracies(classify, emb, sampler, a.episodes, None, support))
        (ma, ca), (mb, cb) = mean_ci95(accs["A"]), mean_ci95(accs["B"])
        md, cd = mean_ci95(accs["B"] - accs["A"])
        print(f"| {text} | {100 * ma:.2f} +/- {100 * ca:.2f} | {100 * mb:.2f} +/- {100 * cb:.2f} | "
              f"{100 * md:+.2f} +/- {100 * cd:.2f} |")


if __name__ == "__main__":
    main()
