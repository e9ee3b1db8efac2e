"""The whole network adapted on the board: the numpy inner loop (edgemeta/runtime/suffix.py) of a trained MAML model,
timed on one core, and its answers against the TensorFlow inner loop's (`adapt_classify`) on seeded test episodes.

    python -m benchmarks.suffix_adapt [--model models/omniglot-vinyals-maml] [--data ../shared/data/omniglot]

Times are medians over `--repeat` runs with one BLAS thread (a board core; OPENBLAS_NUM_THREADS=1 is set before
numpy loads), on real test images. Peak memory is what numpy allocates during one adaptation (tracemalloc).
MACs: one forward pass by `suffix.macs`; a gradient step costs about three forwards (the backward about two).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: one core, as on a board

import argparse  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.runtime_latency import median_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/omniglot-vinyals-maml")
    ap.add_argument("--data", default="../shared/data/omniglot")
    ap.add_argument("--episodes", type=int, default=50, help="seeded 5-way 1-shot test episodes for the agreement")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()

    from edgemeta.host.data import EpisodeSampler, load_dataset
    from edgemeta.host.model_eval import training_dataset
    from edgemeta.host.modeldir import load_backbone
    from edgemeta.runtime import suffix

    model, info = load_backbone(a.model)
    method = info.make_method(a.model, model)
    spec = method.suffix_spec()
    split = load_dataset(training_dataset(info, a.data), info.preprocess, ("test",))["test"]
    convs = [layer for layer in spec.plan if layer["op"] == "conv"]
    width = spec.body[convs[0]["w"]].shape[-1]
    print(f"{a.model}: {info.algorithm}, {len(convs)} conv layers of {width} channels on {spec.input_shape}, {spec.steps} test steps, "
          f"{'transductive' if spec.transductive else 'support-set'} batch norm; numpy {np.__version__}, one BLAS thread")

    print(f"\n{'setting':<14} {'adapt (s)':>9} {'stats (ms)':>10} {'query (ms)':>10} {'adapt MACs':>11} {'query MACs':>10} "
          f"{'peak MiB':>8}")
    for way, shot in ((5, 1), (5, 5), (20, 1)):
        ep = EpisodeSampler(split, way, shot, 1, seed=0).episode(0)
        s, q = ep.support.astype(np.float32) / 255.0, ep.query[:1].astype(np.float32) / 255.0
        adapted = suffix.adapt(spec, s, ep.support_labels, way)
        stats = suffix.query_stats(spec, adapted, s)
        t_adapt = median_ms(lambda: suffix.adapt(spec, s, ep.support_labels, way), a.repeat) / 1000  # noqa: B023
        t_stats = median_ms(lambda: suffix.query_stats(spec, adapted, s), 4 * a.repeat) / 1000  # noqa: B023
        t_query = median_ms(lambda: suffix.logits(spec, adapted, None, q, stats), 20 * a.repeat) / 1000  # noqa: B023
        forward = suffix.macs(spec.plan, spec.body, spec.input_shape, batch=len(s), way=way)
        proto = forward if spec.head.init == "proto" else 0
        adapt_macs = proto + 3 * spec.steps * forward + forward  # the steps, then the support statistics for the queries
        query_macs = suffix.macs(spec.plan, spec.body, spec.input_shape, batch=1, way=way)
        tracemalloc.start()
        suffix.adapt(spec, s, ep.support_labels, way)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        print(f"{f'{way}-way {shot}-shot':<14} {t_adapt:9.3f} {1000 * t_stats:10.2f} {1000 * t_query:10.2f} {adapt_macs / 1e6:10.0f}M "
              f"{query_macs / 1e6:9.1f}M {peak:8.1f}")
    print("adapt: the inner loop's steps; stats: the support set's batch norm statistics under the adapted weights (once per "
          "adaptation); query: one image's logits with them")

    # agreement with the TensorFlow inner loop on seeded test episodes (the episodes `edgemeta eval` draws)
    sampler = EpisodeSampler(split, 5, 1, 15, seed=0)
    labels = np.repeat(np.arange(5), 15)
    acc_np, acc_tf, same, worst = [], [], 0, 0.0
    t0 = time.perf_counter()
    for i in range(a.episodes):
        ep = sampler.episode(i)
        want = method.adapt_classify(ep.support, ep.support_labels, ep.query, 5)
        s, q = ep.support.astype(np.float32) / 255.0, ep.query.astype(np.float32) / 255.0
        got = suffix.logits(spec, suffix.adapt(spec, s, ep.support_labels, 5), s, q)
        acc_np.append(np.mean(got.argmax(1) == labels))
        acc_tf.append(np.mean(want.argmax(1) == labels))
        same += int((got.argmax(1) == want.argmax(1)).sum())
        worst = max(worst, float(np.abs(got - want).max() / max(1.0, np.abs(want).max())))
    print(f"\n{a.episodes} seeded 5-way 1-shot 15-query test episodes ({time.perf_counter() - t0:.0f} s): "
          f"numpy {100 * np.mean(acc_np):.2f} %, TensorFlow {100 * np.mean(acc_tf):.2f} %; "
          f"same answer on {same} of {75 * a.episodes} queries; largest logit difference {worst:.1e} of the logits' scale")


if __name__ == "__main__":
    main()
