"""When does head adaptation help? Prototype head against adapted linear heads, by shot, on the
board's path (int8 embeddings through the interpreter, numpy heads) and the host's.

Omniglot has 20 drawings per class, so the shots are 1, 5, 10 and 15 with the remaining drawings as
queries (5 per class at 15 shots). Heads:
- prototype: nearest class mean (ProtoNet's, the board's default);
- proto-init linear: a linear head initialised from the prototypes and adapted by `--steps` steps
  at `--lr` (what `edgemeta adapt` does on a prototype model);
- the model's own head, for optimization-family models (MAML, ANIL, Meta-SGD): its meta-learned
  initialisation and rates, its test-time steps;
- whole network (host only, MAML and Meta-SGD): every layer adapted on the support set.

    .venv/bin/python -m benchmarks.head_adaptation --model models/omniglot-vinyals-conv4 \\
        --data ../shared/data/omniglot --split test --episodes 300
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--way", type=int, default=20)
    ap.add_argument("--shots", default="1,5,10,15")
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--variant", default="int8_static")
    a = ap.parse_args()

    from edgemeta.host.data import load_dataset
    from edgemeta.host.evaluate import evaluate, query_and_support
    from edgemeta.host.methods import get_method
    from edgemeta.host.model_eval import keras_embedder, training_dataset
    from edgemeta.host.modeldir import load_backbone
    from edgemeta.runtime.heads.linear import LinearHeadSpec, linear_scores
    from edgemeta.runtime.interpreter import Embedder
    from edgemeta.runtime.manifest import read_manifest

    model, info = load_backbone(a.model)
    split = load_dataset(training_dataset(info, a.data), info.preprocess, (a.split,))[a.split]
    method = info.make_method(a.model, model)
    proto = get_method("protonet")
    spec = LinearHeadSpec(init="proto", steps=a.steps, rates_w=[a.lr], rates_b=[a.lr])

    def proto_linear(s, labels, q, way):
        return linear_scores(spec, s, labels, q, way)

    manifest = read_manifest(a.model)
    board = Embedder(manifest.model_path(a.variant), threads=os.cpu_count() or 1)
    shift = manifest.head.support_shift  # enrolled as the board enrolls: (query, support) embeddings
    paths = {f"board ({a.variant})": query_and_support(board, split, shift),
             "host (keras float32)": query_and_support(keras_embedder(model), split, shift)}
    heads = {"prototype": proto.classify, f"proto-init linear, {a.steps} steps at {a.lr}": proto_linear}
    if info.algorithm != "protonet":
        heads[f"{info.algorithm} head, {method.params.test_steps} steps"] = method.classify
    print(f"{a.model}, {a.split} split ({split.num_classes} classes), {a.way}-way, {a.episodes} seeded episodes, accuracy %")
    shots = [int(s) for s in a.shots.split(",")]
    print(f"{'path':<24} {'head':<40} " + " ".join(f"{s:>2}-shot       " for s in shots))
    for path, (emb, sup) in paths.items():
        for head, fn in heads.items():
            cells = []
            for shot in shots:
                query = min(15, split.min_class_size() - shot)
                r = evaluate(None, fn, split, [(a.way, shot)], a.episodes, query=query, embeddings=emb,
                             support_embeddings=sup)[0]
                cells.append(f"{r.accuracy:6.2f} +/- {r.ci95:.2f}")
            print(f"{path:<24} {head:<40} " + " ".join(cells))
    if method.adapts_body:
        cells = []
        for shot in shots:
            query = min(15, split.min_class_size() - shot)
            r = evaluate(None, method.adapt_classify, split, [(a.way, shot)], a.episodes, query=query, embeddings=split.images)[0]
            cells.append(f"{r.accuracy:6.2f} +/- {r.ci95:.2f}")
        print(f"{'host (keras float32)':<24} {'whole network adapted':<40} " + " ".join(cells))


if __name__ == "__main__":
    main()
