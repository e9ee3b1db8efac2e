"""Board-side figures on this machine: embedding latency, enrollment, head cost, cold start, memory.

    python -m benchmarks.runtime_latency --model models/omniglot-conv4 [--runtime ai_edge_litert|tflite_runtime|tensorflow|keras]

Uses the exported variants of MODEL (int8_static, int8, float32) and the Omniglot sample in
samples/omniglot for real images. Times are medians over repeated runs, one interpreter thread.
Cold start and peak memory are measured on `edgemeta classify` in a new process each time.

`--runtime keras` is what a user would do without edgemeta's runtime: TensorFlow, the float Keras
backbone (MODEL/model.keras) and `model.predict` (and the compiled call beside it); its cold start is
a new process that loads the Keras model, decodes the PNG, embeds it and takes the nearest of the
same 1000 prototypes. Run it from a venv with TensorFlow; the others from one with that interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SELF = [sys.executable, "-m", "benchmarks.runtime_latency"]  # this script again, in a new process
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "omniglot"


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def sample_files(classes: int = 5, per_class: int = 5) -> list[str]:
    """The first `per_class` drawings of the first `classes` characters of samples/omniglot."""
    chars = sorted(p for p in SAMPLE.iterdir() if p.is_dir())
    return [str(p) for c in chars[:classes] for p in sorted(c.glob("*.png"))[:per_class]]


def query_file() -> str:
    """One drawing none of sample_files' enrolment shots use: the second character's last."""
    chars = sorted(p for p in SAMPLE.iterdir() if p.is_dir())
    return str(sorted(chars[1].glob("*.png"))[-1])


def cold_start(cmd: list[str], env: dict, runs: int) -> str:
    """Median wall time and largest peak RSS of `runs` fresh processes running `cmd`, as a report line."""
    results = [child_run(cmd, env) for _ in range(runs)]
    wall, rss = np.median([r[0] for r in results]), max(r[1] for r in results)
    return f"  wall {1000 * wall:.0f} ms (median of {runs}), peak RSS {rss:.0f} MiB"


def child_run(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall time (s) and peak RSS (MiB) of one command, measured from a fresh watcher process."""
    watcher = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True); dt = time.perf_counter() - t; "
               "assert p.returncode == 0, p.stderr.decode(); "
               "print(json.dumps([dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))")
    out = subprocess.run([sys.executable, "-c", watcher, *cmd], capture_output=True, text=True, env=env, check=True)
    return tuple(json.loads(out.stdout))


def keras_classify(model_dir: str, png: str, prototypes: str) -> None:
    """The cold-start job of the Keras path (a child process): load, decode, embed, nearest prototype."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from edgemeta.host.modeldir import MODEL_FILE, load_keras
    from edgemeta.preprocess import load_images
    from edgemeta.runtime.manifest import read_manifest

    tf.config.threading.set_intra_op_parallelism_threads(1)
    model = load_keras(Path(model_dir) / MODEL_FILE)
    images, _ = load_images([png], read_manifest(model_dir).preprocess)
    emb = model.predict(images.astype(np.float32) / 255.0, verbose=0)
    print(int(np.argmin(((np.load(prototypes) - emb) ** 2).sum(axis=1))))


def keras_embed(model_dir: str, threads: str, repeat: str) -> None:
    """Embedding latency of the Keras path (a child process: TensorFlow's thread count is fixed at start)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from edgemeta.host.model_eval import keras_embedder
    from edgemeta.host.modeldir import MODEL_FILE, load_keras
    from edgemeta.preprocess import load_images
    from edgemeta.runtime.manifest import read_manifest

    tf.config.threading.set_intra_op_parallelism_threads(int(threads))
    tf.config.threading.set_inter_op_parallelism_threads(1)
    images, _ = load_images(sample_files(), read_manifest(model_dir).preprocess)
    model = load_keras(Path(model_dir) / MODEL_FILE)
    compiled, x = keras_embedder(model), images.astype(np.float32) / 255.0
    if threads == "1":
        print(f"  (TensorFlow {tf.__version__})")
    for name, fn in (("model.predict", lambda b: model.predict(x[:b], verbose=0)), ("compiled call", lambda b: compiled(images[:b]))):
        one = median_ms(lambda f=fn: f(1), int(repeat))
        b25 = median_ms(lambda f=fn: f(25), max(20, int(repeat) // 10))
        print(f"  {threads} thread(s) float32 {name:14s} batch 1: {one:.3f} ms/image   batch 25: {b25:.2f} ms "
              f"({b25 / 25:.3f} ms/image)", flush=True)


def keras_main(args) -> None:
    from edgemeta.runtime.manifest import read_manifest

    print(f"runtime: keras (TensorFlow's Keras), float32 model.keras; machine {os.uname().machine}, {os.cpu_count()} cores; "
          f"median of {args.repeat}")
    print("\nembedding latency")
    for threads in (1, 2):
        out = subprocess.run([*SELF, "--keras-embed", args.model, str(threads), str(args.repeat)],
                             capture_output=True, text=True, check=True)
        print(out.stdout, end="")
    with tempfile.TemporaryDirectory() as tmp:
        # the head's cost does not depend on the values: random prototypes of the model's embedding size
        protos = Path(tmp) / "prototypes.npy"
        dim = read_manifest(args.model).embedding_dim
        np.save(protos, np.random.default_rng(0).normal(size=(1000, dim)).astype(np.float32))
        print("\ncold start (new process: TensorFlow, load model.keras, decode 1 PNG, predict, nearest of 1000 prototypes; "
              "1 thread) and peak memory")
        print(cold_start([*SELF, "--keras-classify", args.model, query_file(), str(protos)],
                         dict(os.environ), args.cold))


def main() -> None:
    if sys.argv[1:2] == ["--keras-classify"]:
        return keras_classify(*sys.argv[2:5])
    if sys.argv[1:2] == ["--keras-embed"]:
        return keras_embed(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "omniglot-conv4"))
    ap.add_argument("--runtime", default="ai_edge_litert", choices=["ai_edge_litert", "tflite_runtime", "tensorflow", "keras"])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--cold", type=int, default=5, help="cold-start runs (new processes)")
    args = ap.parse_args()
    if args.runtime == "keras":
        return keras_main(args)
    os.environ["EDGEMETA_RUNTIME"] = args.runtime

    from edgemeta.runtime.fewshot import FewShotRuntime
    from edgemeta.runtime.heads.common import PrototypeHead
    from edgemeta.runtime.interpreter import Embedder, runtime_version
    from edgemeta.runtime.manifest import read_manifest

    manifest = read_manifest(args.model)
    rt = FewShotRuntime(args.model)
    images, _ = rt.images(sample_files())
    print(f"runtime: {args.runtime} {runtime_version(args.runtime)}; model {manifest.name}; machine {os.uname().machine}, "
          f"{os.cpu_count()} cores; 1 interpreter thread unless said; median of {args.repeat}")

    print("\nembedding latency")
    for threads in (1, 2):
        for variant in ("int8_static", "int8", "float32"):
            emb = Embedder(manifest.model_path(variant), threads=threads)
            one = median_ms(lambda e=emb: e(images[:1]), args.repeat)
            line = f"  {threads} thread(s) {variant:12s} batch 1: {one:.3f} ms/image"
            if not emb.static_batch:
                b25 = median_ms(lambda e=emb: e(images[:25], batch=25), max(20, args.repeat // 10))
                line += f"   batch 25: {b25:.2f} ms ({b25 / 25:.3f} ms/image)"
            print(line)

    with tempfile.TemporaryDirectory() as tmp:
        files = sample_files(classes=1)
        counter = iter(range(10**6))
        enroll = median_ms(lambda: rt.enroll(Path(tmp) / "s", f"class{next(counter)}", files, allow_duplicates=True), 30)
        print(f"\nenroll a 5-shot class (decode 5 PNGs, preprocess, embed, atomic store write): {enroll:.2f} ms")
        if rt.support_shift:  # the head's support views embed each sample 5 times: the same enroll without them
            plain = FewShotRuntime(args.model)
            plain.backbone.pop("support_shift")  # the same runtime enrolling without views, into stores that say so
            off = median_ms(lambda: plain.enroll(Path(tmp) / "p", f"class{next(counter)}", files, allow_duplicates=True), 30)
            one = [median_ms(lambda r=r: r.enroll(Path(tmp) / f"one{r.support_shift}", f"class{next(counter)}", files[:1],
                                                  allow_duplicates=True), 30) for r in (rt, plain)]
            print(f"  with the head's support views ({rt.support_shift} px, 5 passes per sample) against none, "
                  f"one after the other: 5-shot {enroll:.2f} / {off:.2f} ms ({enroll / off:.2f}x), "
                  f"1-shot {one[0]:.2f} / {one[1]:.2f} ms ({one[0] / one[1]:.2f}x)")

        print("\nhead cost for one query (prototypes kept; distances, top-5, open-set) and full classify")
        rng = np.random.default_rng(0)
        query_emb = rt.embedder(images[:1])
        query = [query_file()]
        real = rt.embedder(images)
        for n in (10, 100, 1000):
            emb = real[rng.integers(0, len(real), 5 * n)] + rng.normal(0, 0.05, (5 * n, real.shape[1])).astype(np.float32)
            labels = np.repeat(np.arange(n), 5)
            head = PrototypeHead.from_embeddings(emb, labels, [f"c{i}" for i in range(n)], threshold=rt.threshold_of_model)
            head_ms = median_ms(lambda h=head: h.classify(query_emb, top_k=5), args.repeat)
            build_ms = median_ms(lambda e=emb, lb=labels, h=head: PrototypeHead.from_embeddings(e, lb, h.names), 50)
            store = Path(tmp) / f"store{n}"
            from edgemeta.runtime.store import EnrollmentStore

            s = EnrollmentStore.create(store, rt.backbone, False, rt.manifest.preprocess.input_shape)
            s.class_names = list(head.names)
            s.embeddings, s.labels = emb.astype(np.float32), labels.astype(np.int32)
            if s.query_embeddings is not None:  # a support-view model's store keeps one-view embeddings too
                s.query_embeddings = s.embeddings
            s.save()
            full_ms = median_ms(lambda st=store: rt.classify(st, query, top_k=5), 50)
            print(f"  {n:5d} classes: head {head_ms:.3f} ms; head build from store {build_ms:.3f} ms; "
                  f"classify 1 PNG incl. store load {full_ms:.2f} ms")

        print("\ncold start (new process: edgemeta classify, 1000-class store, 1 PNG) and peak memory")
        # `python -m edgemeta`: the same CLI as the console script, also where edgemeta runs from PYTHONPATH
        env = {**os.environ, "EDGEMETA_RUNTIME": args.runtime}
        cmd = [sys.executable, "-m", "edgemeta", "classify", "--store", str(Path(tmp) / "store1000"), "--model", args.model]
        print(cold_start([*cmd, *query], env, args.cold))


if __name__ == "__main__":
    main()
