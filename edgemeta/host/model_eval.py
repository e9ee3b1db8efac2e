"""Host-side glue between model folders, datasets and the evaluation protocol (TensorFlow)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.host.data import DatasetSpec, FewShotSplit, load_dataset
from edgemeta.host.data.dataset import SPLITS
from edgemeta.host.evaluate import (
    STANDARD_SETTINGS,
    SettingResult,
    episode_inputs,
    evaluate,
    fitting_settings,
    head_support_shift,
    results_markdown,
    results_table,
)
from edgemeta.host.modeldir import SPLITS_FILE, load_backbone, read_splits


def keras_embedder(model):
    """uint8 images -> embeddings through a Keras backbone in inference mode (compiled once)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def run(images):
        return model(tf.cast(images, tf.float32) / 255.0, training=False)

    return lambda images: run(images).numpy()


def training_dataset(info, data: str = "") -> DatasetSpec:
    """The dataset a model was trained on, as recorded in its model.json (`data` overrides the location)."""
    d = info.data
    if d.get("kind") == "folder":
        root = data or d.get("root", "")
        if not root:
            raise EdgemetaError("the model was trained on a folder dataset whose location is not recorded; pass --folder")
        return DatasetSpec(kind="folder", root=root, fractions=tuple(d.get("fractions", (0.6, 0.2, 0.2))), seed=d.get("seed", 0))
    return DatasetSpec(kind="omniglot", root=data, split=d["split"], rotations=d.get("rotations", True))


def model_splits(model_dir: str | Path, info, spec: DatasetSpec, names: tuple[str, ...] = SPLITS
                 ) -> tuple[dict[str, FewShotSplit], str]:
    """The splits `names` of the dataset a model was trained on, and a line on where their classes come from.

    A folder dataset whose run recorded splits.json gets exactly the classes listed there: a class folder
    added since training, which can reshuffle the seeded split and move training classes into the test
    split, is left out (and said so); a recorded class that is missing is an error naming it. Without a
    record (Omniglot, whose splits are named; older runs), the seeded split is computed again."""
    record = read_splits(model_dir) if spec.kind == "folder" else None
    if record is None:
        return load_dataset(spec, info.preprocess, names), ""
    where = Path(model_dir) / SPLITS_FILE
    for name in names:
        if not record["classes"][name]:
            raise EdgemetaError(f"the run recorded no {name} classes in {where} ([data] fractions "
                                f"{record.get('fractions')}); evaluate a folder of other classes with --folder")
    every = load_dataset(replace(spec, fractions=(0.0, 0.0, 1.0)), info.preprocess, ("test",))["test"]
    index = {n: i for i, n in enumerate(every.class_names)}
    out = {}
    for name in names:
        wanted = record["classes"][name]
        missing = [n for n in wanted if n not in index]
        if missing:
            raise EdgemetaError(f"{spec.root} has no class folder {missing[0]!r}, one of the {len(wanted)} {name} classes "
                                f"recorded in {where} ({len(missing)} missing); restore it, or pass the folder it is in")
        chosen = np.array([index[n] for n in wanted])
        mask = np.isin(every.labels, chosen)
        remap = np.full(every.num_classes, -1, dtype=np.int32)
        remap[chosen] = np.arange(len(chosen), dtype=np.int32)
        out[name] = FewShotSplit(name, every.images[mask], remap[every.labels[mask]], list(wanted))
    recorded = {n for k in SPLITS for n in record["classes"][k]}
    extra = [n for n in every.class_names if n not in recorded]
    text = f"as recorded at training in {where}"
    if extra:
        text += (f"; {len(extra)} class folder(s) of {spec.root} in no recorded split (added since training, e.g. "
                 f"{extra[0]!r}) left out")
    return out, text


def split_class_list(split: FewShotSplit, most: int = 40) -> str:
    """A split's class names for a report, the first `most` of them."""
    names = split.class_names
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def evaluate_model_dir(model_dir: str, data: str = "", folder: str = "", split: str = "test",
                       settings=STANDARD_SETTINGS, episodes: int = 1000, query: int = 15, seed: int = 0,
                       variant: str | None = None, confusions: int = 0,
                       head_only: bool = False, transductive: bool | None = None,
                       within_alphabet: bool = False, support_shift: int | None = None
                       ) -> tuple[list[SettingResult], dict, str, str]:
    """Evaluate a trained model folder on its dataset's test split (or every class of `folder`).

    With `variant` (e.g. "int8_static"), the backbone is that exported .tflite run through the
    board runtime's interpreter instead of the Keras model; the head is the same numpy code. A method
    that adapts the whole network (MAML, Meta-SGD) does so on the host; with a `variant` or
    `head_only` it takes the board's path instead: the body frozen, only the numpy head adapted.
    `support_shift` overrides a ProtoNet head's support views (default: the model's, or with a `variant`
    the manifest's, as the board enrolls).
    Returns the results, their context (what was measured), a text table and a Markdown report."""
    model, info = load_backbone(model_dir)
    recorded = ""
    if folder:
        spec = DatasetSpec(kind="folder", root=folder, fractions=(0.0, 0.0, 1.0))
        source = f"folder {folder} (all classes)"
        data_split = load_dataset(spec, info.preprocess, (split,))[split]
    else:
        spec = training_dataset(info, data)
        splits, recorded = model_splits(model_dir, info, spec, (split,))
        data_split = splits[split]
        source = (f"Omniglot, {spec.split} split, {split} classes" if spec.kind == "omniglot"
                  else f"folder {spec.root}, {split} classes of its seeded split, "
                       + (recorded or f"computed again (no {SPLITS_FILE} in the model folder)"))
    if model.input_shape[1:] != info.preprocess.input_shape:
        raise EdgemetaError(f"{model_dir}: model input {model.input_shape[1:]} does not match model.json "
                            f"preprocessing {info.preprocess.input_shape}; the folder is inconsistent")
    if variant:
        from edgemeta.runtime.interpreter import Embedder, runtime_version
        from edgemeta.runtime.manifest import read_manifest

        manifest = read_manifest(model_dir)
        if support_shift is None and manifest.head.support_shift:
            support_shift = manifest.head.support_shift
    overrides = {} if transductive is None else {"transductive": transductive}
    if support_shift is not None:
        overrides["support_shift"] = support_shift
    method = info.make_method(model_dir, model, overrides=overrides)
    if variant:
        embedder = Embedder(manifest.model_path(variant), threads=os.cpu_count() or 1)
        backend = f"{variant}.tflite through {embedder.runtime} {runtime_version(embedder.runtime)}"
        board = manifest.head
        # the board's own scoring where it is not the method's numpy head (a sequence head's graphs)
        graphs = board.variant_scores(manifest.folder, manifest.variant(variant).quantization, info.embedding_dim,
                                      threads=os.cpu_count() or 1)
    else:
        embedder, backend, board, graphs = keras_embedder(model), "keras (float32)", None, None
    head_only = head_only or bool(variant)  # an exported variant is the board's body: frozen
    classify, inputs, support = episode_inputs(method, embedder, data_split, head_only)
    if graphs is not None:
        classify = graphs[0]
        backend += f", {graphs[1]}"
    elif board is not None and board.kind != method.board_head().kind:  # export chose it on validation
        classify = board.scores
        backend += f", the manifest's head: {board.description()} (chosen on validation at export)"
    elif method.adapts_body:
        backend += (f", body frozen, head adapted ({method.params.test_steps} steps, the board's path)" if head_only else
                    f", whole network adapted ({method.params.test_steps} steps, "
                    f"{'transductive' if method.params.transductive else 'non-transductive'} batch norm)")
    if head_support_shift(method):
        backend += (f", support views: each enrolled sample the mean of itself and 4 copies moved "
                    f"{head_support_shift(method)} px")
    if settings == STANDARD_SETTINGS:  # the defaults: a small dataset also gets the largest setting it fits
        settings = fitting_settings(data_split)
    results = evaluate(embedder, classify, data_split, settings, episodes, query, seed, embeddings=inputs,
                       confusions=confusions, within_groups=within_alphabet, limits=method.limits,
                       support_embeddings=support)
    context = {"model": Path(model_dir).name, "algorithm": info.algorithm, "backbone": info.backbone,
               "backend": backend, "data": source, "classes": data_split.num_classes,
               "images": len(data_split.images),
               **({f"{split} classes": split_class_list(data_split)} if spec.kind == "folder" and not folder else {}),
               "episodes per setting": episodes, "seed": seed,
               "episodes": ("within one alphabet (drawn uniformly among those with enough characters)" if within_alphabet
                            else "classes drawn from the whole split")}
    md = results_markdown(results, f"Evaluation of {Path(model_dir).name}", context)
    return results, context, results_table(results), md



