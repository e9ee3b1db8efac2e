"""Export a trained backbone to TFLite variants with a manifest (host, TensorFlow).

Variants (see ../shared/TOOLCHAIN.md for why each exists):
  float32        dynamic batch, the float reference
  dynamic_range  int8 weights, float activations; dynamic batch
  int8           full-integer (int8 in and out), calibrated on real training images; dynamic batch
  int8_static    the same with a static batch of 1: for boards (XNNPACK, tflite-runtime) and the
                 input of the Edge TPU compiler
Each variant is measured with the evaluation protocol through the TFLite interpreter, and the
open-set threshold is calibrated for it on validation episodes. The head is the one the method hands
over (`board_head`, runtime/heads/): it writes its own manifest section and files, and is read back as
the board reads it before the variants are measured with it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.files import sha256_file
from edgemeta.host.evaluate import (
    calibrate_open_set,
    choose_board_head,
    embed_split,
    episode_inputs,
    evaluate,
    fitting_settings,
    queries_used,
    query_and_support,
    results_json,
)
from edgemeta.host.methods import get_method
from edgemeta.host.model_eval import keras_embedder, model_splits, training_dataset
from edgemeta.host.modeldir import SPLITS_FILE, load_backbone, read_splits, write_atomic, write_json
from edgemeta.quiet import native_stderr_silenced
from edgemeta.runtime import heads
from edgemeta.runtime.heads.prototype import Prototype
from edgemeta.runtime.interpreter import Embedder, interpreter_module, runtime_version
from edgemeta.runtime.manifest import MANIFEST_FILE
from edgemeta.runtime.tflite_info import read_structure
from edgemeta.schema import Doc, Obj

BOARD_HEADS = ("auto", "own", heads.PROTOTYPE)  # a head chosen on validation: the method's own, or the nearest prototype
VARIANTS = ("float32", "dynamic_range", "int8", "int8_static")
DEFAULT_VARIANT = "int8_static"


def convert(model, quantization: str, representative: np.ndarray | None = None) -> bytes:
    """Keras model -> .tflite bytes. quantization: float32 | dynamic_range | int8 (int8 in and out)."""
    import tensorflow as tf

    def rep():
        for img in representative:
            yield [img[None].astype(np.float32) / 255.0]

    data = _convert(tf.lite.TFLiteConverter.from_keras_model(model), quantization, rep, int8_io=True)
    if quantization != "float32" and len(data) > 0.5 * model.count_params() * 4:
        raise EdgemetaError("quantised export came out as large as float weights: weights were not frozen; "
                            "this is a bug in edgemeta's export")
    return data


def convert_function(fn, quantization: str, representative, owner) -> bytes:
    """A tf.function of fixed input signature -> .tflite bytes (float32, or int8 inside with float
    inputs and outputs: a sequence graph's masks and features are easier to feed as floats).
    `representative`: a callable giving {input name: array} dicts; `owner`: a tf.Module holding the variables."""
    import tensorflow as tf

    return _convert(tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], owner),
                    quantization, representative, int8_io=False)


def _convert(conv, quantization: str, representative, int8_io: bool) -> bytes:
    import tensorflow as tf

    if quantization != "float32":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        # FULLY_CONNECTED v9 instead of v12, which tflite-runtime 2.14 cannot load
        conv._experimental_disable_per_channel_quantization_for_dense_layers = True
    if quantization == "int8":
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
    # The converter's MLIR diagnostics go straight to fd 2, and Keras prints its intermediate
    # SavedModel's signature ("Saved artifact at ...") to stdout: neither is for the user.
    with native_stderr_silenced(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Statistics for quantized inputs were expected": float inputs are meant
        return conv.convert()


def _static_copy(model, info):
    from edgemeta.host.backbones import build_backbone

    static = build_backbone(info.backbone, info.preprocess.input_shape, batch_size=1)
    static.set_weights(model.get_weights())
    return static


def export_model(model_dir: str | Path, out: str | Path | None = None, data: str = "", folder: str = "",
                 episodes: int = 1000, calibration_images: int = 300, seed: int = 0, log=print,
                 board_head: str = "auto") -> dict:
    """Write the .tflite variants and manifest.json for a model folder; returns the manifest.

    `board_head` for a method whose head is chosen on validation (a linear head; BOARD_HEADS): "own" (its
    meta-learned head), the nearest prototype (heads.PROTOTYPE), or "auto": whichever scores higher on
    validation episodes (recorded in the manifest's head section).
    Everything is written into a hidden folder inside `out` first and moved into place only when the
    whole export succeeded (the manifest last): a failed export leaves `out` as it was."""
    if board_head not in BOARD_HEADS:
        raise EdgemetaError(f"board head must be one of {', '.join(BOARD_HEADS)}, got {board_head!r}")
    model_dir = Path(model_dir)
    out = Path(out) if out else model_dir
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        manifest = _export_into(model_dir, stage, data, folder, episodes, calibration_images, seed, log, board_head)
        for f in sorted(stage.iterdir(), key=lambda f: f.name == MANIFEST_FILE):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _export_into(model_dir: Path, out: Path, data: str, folder: str, episodes: int, calibration_images: int, seed: int,
                 log, board_head: str) -> dict:
    model, info = load_backbone(model_dir)
    method = info.make_method(model_dir, model)
    head = method.board_head()  # the head the board runs, as the method learned it (runtime/heads/)
    distance = head.distance  # the open-set test is nearest-prototype distance
    spec = training_dataset(info, folder or data)
    splits, recorded = model_splits(model_dir, info, spec)  # a folder dataset: the classes its run recorded
    if recorded:
        log(f"splits: {recorded}")
        write_json(out / SPLITS_FILE, read_splits(model_dir))  # carried beside the variants (the staging folder)
    rng = np.random.default_rng(seed)
    train_images = splits["train"].images
    representative = train_images[rng.choice(len(train_images), size=min(calibration_images, len(train_images)), replace=False)]

    float_embed = keras_embedder(model)
    classify = method.classify
    choice = None
    if head.chosen_on_validation:  # the board head: the method's own or the nearest prototype, chosen on val
        chosen, scores = choose_board_head(method, embed_split(float_embed, splits["val"]), splits["val"], seed=seed)
        choice = {"val_accuracy": scores, "best_on_val": chosen,
                  "protocol": "mean accuracy over the standard settings, 200 seeded validation episodes each, Keras float32 body"}
        chosen = chosen if board_head == "auto" else board_head
        choice["chosen"] = chosen
        log(f"board head: {chosen} (validation: own head {scores['own']:.2f}%, prototype {scores[heads.PROTOTYPE]:.2f}%)")
        if chosen == heads.PROTOTYPE:
            head = Prototype(distance, method=head.method)
            classify = get_method("protonet").classify
    section = head.to_manifest() | ({"selection": choice} if choice else {})
    # the head's own files (a linear head's arrays, a sequence head's graphs) beside the backbone's variants
    section.update(head.write(out, heads.ExportContext(lambda n: _training_sample(float_embed, splits["train"], n, seed),
                                                       convert_function, seed, log)))
    facts = heads.ModelFacts(out / MANIFEST_FILE, distance, info.embedding_dim, info.preprocess.input_side)
    board = heads.read(Obj(Doc(str(out / MANIFEST_FILE), "this is a bug in edgemeta's export; please report it"),
                           section, "head"), facts)  # as the board will read it
    settings = fitting_settings(splits["test"])
    limits = method.limits
    shift = board.support_shift  # enrolled samples are embedded as the mean of their support views
    runtime, _ = interpreter_module()
    variants, evaluations = {}, {}
    static = _static_copy(model, info)
    for name in VARIANTS:
        log(f"converting {name} ...")
        quant = "int8" if name.startswith("int8") else name
        data_bytes = convert(static if name.endswith("_static") else model, quant, representative)
        path = out / f"{name}.tflite"
        write_atomic(path, data_bytes)
        structure = read_structure(path, data_bytes)
        embedder = Embedder(path, threads=os.cpu_count() or 1)
        val_emb, val_sup = query_and_support(embedder, splits["val"], shift)
        test_emb, test_sup = query_and_support(embedder, splits["test"], shift)
        open_set = calibrate_open_set(val_emb, splits["val"], distance, seed=seed, support_embeddings=val_sup)
        if info.training.get("classes") == "trainval":  # no held-out classes are left to calibrate on
            open_set["calibration"] += "; the model also trained on these classes, so new classes may sit farther out"
        # the board's own scoring of this variant where it is not the method's numpy head (a sequence head's
        # graphs: int8 ones with an int8 body, float32 with a float one)
        graphs = board.variant_scores(out, quant, info.embedding_dim, threads=os.cpu_count() or 1)
        results = evaluate(embedder, graphs[0] if graphs else classify, splits["test"], settings, episodes, seed=seed,
                           embeddings=test_emb, limits=limits, support_embeddings=test_sup)
        evaluations[name] = results
        variants[name] = {
            "file": path.name, "sha256": sha256_file(path), "size": len(data_bytes), "quantization": quant,
            "static_batch": 1 if name.endswith("_static") else None,
            "input": vars(structure.inputs[0]), "output": vars(structure.outputs[0]),
            "ops": structure.ops, "tensor_types": structure.tensor_types,
            "open_set_threshold": open_set["threshold"], "open_set": open_set,
            "evaluation": results_json(results),
        }
        log(f"  {name}: {len(data_bytes) / 1024:.0f} KiB, " + ", ".join(f"{r.name} {r.accuracy:.2f}%" for r in results if r.episodes))

    # the Keras body with the method's own head (a sequence model in TensorFlow), or the one chosen instead
    float_emb, float_sup = query_and_support(float_embed, splits["test"], shift)
    float_results = evaluate(float_embed, classify, splits["test"], settings, episodes, seed=seed, limits=limits,
                             embeddings=float_emb, support_embeddings=float_sup)
    evaluation = {"keras_float32": results_json(float_results)}
    if method.adapts_body:  # the host-only figure: every layer adapted on each support set
        classify, images, _ = episode_inputs(method, None, splits["test"])
        evaluation["keras_float32_whole_network"] = results_json(
            evaluate(None, classify, splits["test"], settings, episodes, seed=seed, embeddings=images))
    queries = queries_used(float_results, smallest=splits["test"].min_class_size())  # what the settings really used
    manifest = {
        "format": 3 if info.preprocess.kind == "audio" else 2,  # 3: a preprocess kind that boards before it cannot read
        "name": model_dir.resolve().name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "backbone": info.backbone, "algorithm": info.algorithm,
        "embedding_dim": info.embedding_dim, "distance": distance, "head": section,
        "method": info.method or {"name": info.algorithm},
        "preprocess": {**info.preprocess.to_dict(), **_preprocess_notes(info.preprocess)},
        "default_variant": DEFAULT_VARIANT,
        "variants": variants,
        "evaluation": {"protocol": f"{episodes} seeded episodes per setting (seed {seed}), {queries}, "
                                   f"mean accuracy and 95% CI in percent; test split of {spec.kind}"
                                   + (f" {spec.split}" if spec.kind == "omniglot" else "")
                                   + (f" ({splits['test'].num_classes} classes recorded in {SPLITS_FILE} at training)"
                                      if recorded else f" ({splits['test'].num_classes} classes)"),
                       **({"test_classes": splits["test"].class_names} if spec.kind == "folder" else {}),
                       "runtime": f"{runtime} {runtime_version(runtime)}",
                       "head": "the board's: " + board.description(),
                       **evaluation},
        "source": {"model.keras_sha256": sha256_file(model_dir / "model.keras"), "data": info.data},
        "training": info.training,
    }
    write_json(out / MANIFEST_FILE, manifest)
    write_atomic(out / "export.md", export_report(manifest))
    return manifest


def _training_sample(embed, train, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels (0..n-1) of every image of `classes` seeded training classes (all if fewer):
    what a head that writes graphs calibrates them on (`heads.ExportContext.sample`)."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(train.num_classes, min(classes, train.num_classes), replace=False)
    index = np.concatenate([train.class_indices()[c] for c in picked])
    labels = np.repeat(np.arange(len(picked)), [len(train.class_indices()[c]) for c in picked])
    embeddings = np.concatenate([embed(train.images[index[i:i + 1024]]) for i in range(0, len(index), 1024)])
    return embeddings, labels


def add_variant(folder: Path, name: str, path: Path, quantization: str, static_batch: int | None, based_on: str,
                extra: dict) -> None:
    """Record a file made from an existing variant (the Edge TPU compilation) in the manifest."""
    import json

    manifest_path = Path(folder) / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    base = manifest["variants"][based_on]
    manifest["variants"][name] = {
        "file": path.name, "sha256": sha256_file(path), "size": path.stat().st_size, "quantization": quantization,
        "static_batch": static_batch, "input": base["input"], "output": base["output"],
        "open_set_threshold": base["open_set_threshold"], "based_on": based_on, **extra,
    }
    write_json(manifest_path, manifest)


def export_report(manifest: dict) -> str:
    """Markdown summary of a manifest's variants: size, ops, accuracy per setting."""
    settings = [r["setting"] for r in manifest["evaluation"]["keras_float32"]]
    test_classes = manifest["evaluation"].get("test_classes")
    lines = [f"# Export of {manifest['name']}", "", f"- {manifest['evaluation']['protocol']}",
             *([f"- test classes: {', '.join(test_classes)}"] if test_classes else []),
             f"- interpreter: {manifest['evaluation']['runtime']}", "",
             "| variant | size (KiB) | " + " | ".join(settings) + " | open-set threshold (unknown accepted) |",
             "|---|---|" + "---|" * len(settings) + "---|"]

    def cells(results):
        return " | ".join(f"{r['accuracy']:.2f} +/- {r['ci95']:.2f}" if r["episodes"] else "-" for r in results)

    lines.append(f"| keras float32 | - | {cells(manifest['evaluation']['keras_float32'])} | - |")
    if "keras_float32_whole_network" in manifest["evaluation"]:  # host only: every layer adapted
        lines.append(f"| keras float32, whole network adapted (host only) | - | "
                     f"{cells(manifest['evaluation']['keras_float32_whole_network'])} | - |")
    for name, v in manifest["variants"].items():
        if "evaluation" not in v:
            continue
        lines.append(f"| {name} | {v['size'] / 1024:.0f} | {cells(v['evaluation'])} | "
                     f"{v['open_set_threshold']:.3g} ({100 * v['open_set']['unknown_accept_rate']:.1f}%) |")
    lines += ["", "Ops (highest version): " + ", ".join(f"{k} v{v}" for k, v in manifest["variants"][DEFAULT_VARIANT]["ops"].items())]
    return "\n".join(lines) + "\n"


def _preprocess_notes(pre) -> dict:
    """What a reader of the manifest needs to feed the model without edgemeta (not read back)."""
    if pre.kind == "audio":
        return {"note": pre.describe() + "; uint8 = (dB + top_db) * 255 / top_db", "scale": "x / 255 (input range [0, 1])"}
    return {"resize": "lanczos", "scale": "x / 255 (input range [0, 1])",
            "polarity": "inverted: dark ink becomes bright" if pre.invert else "as stored"}
