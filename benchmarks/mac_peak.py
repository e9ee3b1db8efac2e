"""How far the board path is from this CPU's limit: multiply-accumulates per image of each backbone,
the MAC/s the embedding achieves (float32 and int8), and the CPU's measured peak in the same process.

    python -m benchmarks.mac_peak [--model models/omniglot-conv4] [--threads 1,2] [--repeat 50]

MACs are counted from the Keras layers (convolutions and dense layers; batch norm folds away at
export). The embedding's rate is images/s x MACs/image through the interpreter (LiteRT), float32 at
batch 25 and the static-batch int8 graph image by image. The peak is a large matrix multiply through
the same interpreter (a 256 x 1024 x 1024 FULLY_CONNECTED graph, float32 and full int8, converted
here) and numpy's float32 matmul (BLAS), each with the same threads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from benchmarks.runtime_latency import REPO, median_ms, sample_files


def macs_per_image(model) -> int:
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            k = int(np.prod(layer.kernel_size))
            total += h * w * c_out * k * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            total += int(np.prod(layer.kernel.shape))
    return int(total)


def matmul_graphs(tmp: Path, m: int = 256, k: int = 1024, n: int = 1024) -> dict[str, Path]:
    import keras
    import tensorflow as tf

    inp = keras.Input((k,), batch_size=m, name="x")
    model = keras.Model(inp, keras.layers.Dense(n, use_bias=False)(inp))
    out = {}
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    out["float32"] = tmp / "mm_float.tflite"
    out["float32"].write_bytes(conv.convert())
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    conv.representative_dataset = lambda: ([rng.random((m, k), np.float32)] for _ in range(4))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    out["int8"] = tmp / "mm_int8.tflite"
    out["int8"].write_bytes(conv.convert())
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "omniglot-conv4"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=50)
    a = ap.parse_args(argv)

    from edgemeta.host.backbones import build_backbone
    from edgemeta.runtime.fewshot import FewShotRuntime
    from edgemeta.runtime.interpreter import Embedder, open_interpreter, runtime_version
    from edgemeta.runtime.manifest import read_manifest

    print("| backbone | input | MACs per image |\n|---|---|---|")
    for name, shape in (("conv4", (28, 28, 1)), ("conv4", (84, 84, 3)), ("resnet12", (28, 28, 1)), ("resnet12", (84, 84, 3))):
        print(f"| {name} | {'x'.join(map(str, shape))} | {macs_per_image(build_backbone(name, shape)) / 1e6:.2f} M |")
    manifest = read_manifest(a.model)
    rt = FewShotRuntime(a.model)
    images, _ = rt.images(sample_files())
    from edgemeta.host.modeldir import load_backbone

    macs = macs_per_image(load_backbone(a.model)[0])
    runtime = rt.embedder.runtime
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(sys.stderr):  # the converter's own notes
            graphs = matmul_graphs(Path(tmp))
        print(f"\n# {manifest.name} ({macs / 1e6:.2f} M MACs/image), {runtime} {runtime_version(runtime)}, "
              f"{os.cpu_count()} cores; medians of {a.repeat}")
        print("| threads | what | ms | GMAC/s | share of the peak of its kind |\n|---|---|---|---|---|")
        for threads in (int(t) for t in a.threads.split(",")):
            peak = {}
            for kind, path in graphs.items():
                _, it = open_interpreter(path, threads)
                d = it.get_input_details()[0]
                x = (np.random.default_rng(0).integers(-128, 127, d["shape"]).astype(np.int8) if kind == "int8"
                     else np.random.default_rng(0).random(d["shape"], np.float32))
                it.set_tensor(d["index"], x)
                ms = median_ms(it.invoke, max(5, a.repeat // 5))
                peak[kind] = 256 * 1024 * 1024 / (ms / 1000) / 1e9
                rows.append({"threads": threads, "what": f"peak: {kind} 256x1024x1024 matmul (interpreter)", "ms": ms,
                             "gmacs": peak[kind]})
            aa = np.random.default_rng(0).random((1024, 1024), np.float32)
            ms = median_ms(lambda x=aa: x @ x, max(5, a.repeat // 5))
            rows.append({"threads": threads, "what": "numpy float32 1024^3 matmul (BLAS, its own threads)", "ms": ms,
                         "gmacs": 1024**3 / (ms / 1000) / 1e9})
            for variant, batch in (("float32", 25), ("int8_static", 1)):
                emb = Embedder(manifest.model_path(variant), threads=threads)
                b = 1 if emb.static_batch else batch
                ms = median_ms(lambda e=emb, b=b: e(images[:b], batch=b) if b > 1 else e(images[:1]), a.repeat)
                kind = "int8" if variant.startswith("int8") else "float32"
                g = b * macs / (ms / 1000) / 1e9
                rows.append({"threads": threads, "what": f"embed {variant}, batch {b}", "ms": ms, "gmacs": g,
                             "share": g / peak[kind]})
            for r in rows:
                if r["threads"] == threads:
                    share = f"{100 * r['share']:.0f}%" if "share" in r else "-"
                    print(f"| {threads} | {r['what']} | {r['ms']:.3f} | {r['gmacs']:.1f} | {share} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
