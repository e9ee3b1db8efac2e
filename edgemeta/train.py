"""Episodic meta-training on the host (TensorFlow).

`train(cfg, out)` trains a backbone with the configured algorithm, validates every
``validation.every`` episodes on fixed seeded validation episodes, keeps the best model in
``out/model.keras``, and checkpoints so that an interrupted run (Ctrl-C, a killed job, a time
budget) resumes where it stopped when started again with the same output folder.

Runs under a `tf.distribute` strategy: MirroredStrategy over all GPUs when there are several
(each replica takes its own episode and gradients are averaged, so one step is a meta-batch
of that many episodes), one device otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemeta.config import Config, dump_toml
from edgemeta.data import EpisodeSampler, load_dataset, merge_splits
from edgemeta.errors import EdgemetaError
from edgemeta.evaluate import embed_split, episode_accuracies, mean_ci95
from edgemeta.methods import get_method
from edgemeta.modeldir import INFO_FILE, MODEL_FILE, ModelInfo, load_keras, read_info, write_atomic, write_json

STATE_FILE = "checkpoints/state.json"
HISTORY_FIELDS = ("episode", "loss", "train_acc", "val_acc", "val_ci95", "learning_rate", "elapsed_s")


@dataclass
class TrainResult:
    episodes: int
    best_val_acc: float
    best_val_ci95: float
    best_episode: int
    elapsed_s: float
    stopped_by: str


def make_strategy(devices: list[str]):
    """MirroredStrategy over the given devices (or all GPUs when there are several), else one device."""
    import tensorflow as tf

    if devices:
        return tf.distribute.MirroredStrategy(devices) if len(devices) > 1 else tf.distribute.OneDeviceStrategy(devices[0])
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


class _Progress:
    """A one-line progress display on a terminal; plain log lines otherwise (background jobs)."""

    def __init__(self, total: int, enabled: bool, done: int = 0):
        self.total, self.enabled, self.tty = total, enabled, sys.stderr.isatty()
        self.start, self.first = time.monotonic(), done  # a resumed run counts its own episodes only

    def update(self, done: int, loss: float, acc: float, val: str, force_line: bool = False) -> None:
        if not self.enabled:
            return
        rate = (done - self.first) / max(time.monotonic() - self.start, 1e-9)
        width = 30
        filled = int(width * done / self.total)
        text = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} episodes  "
                f"loss {loss:.3f}  acc {100 * acc:5.1f}%  val {val}  {rate:.1f} ep/s")
        if self.tty:
            print("\r" + text, end="\n" if force_line else "", file=sys.stderr, flush=True)
        elif force_line:
            print(text, file=sys.stderr, flush=True)


class EpisodicTrainer:
    """The model, optimizer and compiled training step under one distribution strategy.

    ``step(first)`` trains on episodes ``first .. first + replicas - 1`` of `sampler` (one per
    replica, gradients averaged) and returns the mean loss and accuracy."""

    def __init__(self, cfg: Config, sampler: EpisodeSampler):
        import keras
        import tensorflow as tf

        from edgemeta.backbones import build_backbone

        tc = cfg.train
        self.sampler, self.method = sampler, get_method(cfg.model.algorithm)
        self.strategy = make_strategy(tc.devices)
        self.replicas = replicas = self.strategy.num_replicas_in_sync
        with self.strategy.scope():
            self.model = build_backbone(cfg.model.backbone, cfg.model.preprocess.input_shape)
            self.schedule = keras.optimizers.schedules.ExponentialDecay(
                tc.learning_rate, decay_steps=max(1, tc.lr_decay_every // replicas), decay_rate=tc.lr_decay_rate, staircase=True)
            self.optimizer = keras.optimizers.Adam(self.schedule)
            self.optimizer.build(self.model.trainable_variables)
        model, optimizer, method, strategy = self.model, self.optimizer, self.method, self.strategy

        def replica_step(support, support_labels, query, query_labels, episode):
            if tc.augments:  # one seeded draw per episode, so a resumed run sees the same images
                seed = tf.stack([tf.constant(tc.seed, tf.int64), tf.cast(episode, tf.int64)])
                n = tf.shape(support)[0]
                both = random_affine(tf.concat([support, query], 0), seed, tc.augment_shift, tc.augment_rotate, tc.augment_scale)
                support, query = both[:n], both[n:]
            with tf.GradientTape() as tape:
                loss, acc = method.episode_loss(model, support, support_labels, query, query_labels, tc.way, training=True)
                scaled = loss / replicas
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss, acc

        @tf.function
        def train_step(inputs):
            loss, acc = strategy.run(replica_step, args=inputs)
            mean = tf.distribute.ReduceOp.MEAN
            return strategy.reduce(mean, loss, axis=None), strategy.reduce(mean, acc, axis=None)

        self._train_step = train_step

    @property
    def episodes_done(self) -> int:
        return int(self.optimizer.iterations.numpy()) * self.replicas

    @property
    def learning_rate(self) -> float:
        return float(self.schedule(self.optimizer.iterations))

    def step(self, first: int) -> tuple[float, float]:
        import tensorflow as tf

        eps = [self.sampler.episode(first + r) for r in range(self.replicas)]

        def value(ctx):
            e = eps[ctx.replica_id_in_sync_group]
            return (tf.cast(e.support, tf.float32) / 255.0, tf.constant(e.support_labels),
                    tf.cast(e.query, tf.float32) / 255.0, tf.constant(e.query_labels),
                    tf.constant(first + ctx.replica_id_in_sync_group, tf.int64))

        loss, acc = self._train_step(self.strategy.experimental_distribute_values_from_function(value))
        return float(loss), float(acc)


def train(cfg: Config, out: str | Path, progress: bool = True, fresh: bool = False) -> TrainResult:
    """Meta-train as configured into the folder `out` (resuming from its checkpoint unless `fresh`)."""
    import tensorflow as tf

    from edgemeta.host import keras_embedder

    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    splits = load_dataset(cfg.data, cfg.model.preprocess, ("train", "val"))
    tc, vc = cfg.train, cfg.validation
    train_split = merge_splits("trainval", splits["train"], splits["val"]) if tc.classes == "trainval" else splits["train"]
    sampler = EpisodeSampler(train_split, tc.way, tc.shot, tc.query, seed=tc.seed)
    val_sampler = EpisodeSampler(splits["val"], vc.way, vc.shot, vc.query, seed=vc.seed)
    tf.keras.utils.set_random_seed(tc.seed)
    trainer = EpisodicTrainer(cfg, sampler)
    model, method, replicas = trainer.model, trainer.method, trainer.replicas
    ckpt = tf.train.Checkpoint(model=model, optimizer=trainer.optimizer)
    manager = tf.train.CheckpointManager(ckpt, out / "checkpoints", max_to_keep=2)

    state = {"history": [], "best_val_acc": -1.0, "best_val_ci95": 0.0, "best_episode": 0, "elapsed_s": 0.0}
    state_path = out / STATE_FILE
    if fresh:
        for f in (out / "checkpoints").iterdir():
            f.unlink()
    elif manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        if state_path.exists():
            state = json.loads(state_path.read_text())
    done = trainer.episodes_done
    if done == 0 and tc.init_from:  # a resumed run has its weights from the checkpoint
        _load_initial_weights(model, tc.init_from)
    _write_config(cfg, out / "config.toml")
    embed = keras_embedder(model)

    def validate() -> tuple[float, float]:
        emb = embed_split(embed, splits["val"])
        return mean_ci95(episode_accuracies(method.classify, emb, val_sampler, vc.episodes))

    writer = tf.summary.create_file_writer(str(out / "tensorboard"))
    bar = _Progress(tc.episodes, progress, done)
    last_val = "-" if state["best_val_acc"] < 0 else f"{100 * state['best_val_acc']:.2f}%"
    started, elapsed0 = time.monotonic(), state["elapsed_s"]
    stopped_by, losses, accs, since_best = "episodes", [], [], 0
    interrupted = []
    old_handler = signal.signal(signal.SIGTERM, lambda *_: interrupted.append("SIGTERM"))
    try:
        while done < tc.episodes:
            loss, acc = trainer.step(done)
            done += replicas
            losses.append(loss)
            accs.append(acc)
            elapsed = elapsed0 + time.monotonic() - started
            out_of_time = tc.max_minutes > 0 and elapsed >= 60 * tc.max_minutes
            at_val = done % vc.every < replicas or done >= tc.episodes or out_of_time or interrupted
            if done % 50 < replicas:
                bar.update(done, np.mean(losses[-50:]), np.mean(accs[-50:]), last_val)
            if at_val:
                val_acc, val_ci = validate()
                lr = trainer.learning_rate
                row = {"episode": done, "loss": float(np.mean(losses)), "train_acc": float(np.mean(accs)),
                       "val_acc": val_acc, "val_ci95": val_ci, "learning_rate": lr, "elapsed_s": round(elapsed, 1)}
                state["history"].append(row)
                losses, accs = [], []
                with writer.as_default(step=done):
                    for k in ("loss", "train_acc", "val_acc", "learning_rate"):
                        tf.summary.scalar(k, row[k])
                if val_acc > state["best_val_acc"] or tc.classes == "trainval":
                    state.update(best_val_acc=val_acc, best_val_ci95=val_ci, best_episode=done)
                    _save_model(model, out)
                    since_best = 0
                else:
                    since_best += 1
                last_val = f"{100 * val_acc:.2f}%"
                bar.update(done, row["loss"], row["train_acc"], last_val, force_line=True)
                state["elapsed_s"] = elapsed
                manager.save(checkpoint_number=done)
                write_json(state_path, state)
                if out_of_time:
                    stopped_by = "time budget"
                    break
                if interrupted:
                    stopped_by = "interrupted"
                    break
                if vc.patience and since_best >= vc.patience:
                    stopped_by = "no improvement"
                    break
    except KeyboardInterrupt:
        stopped_by = "interrupted"
        print("\ninterrupted: the last checkpoint is kept; run the same command again to resume", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    result = TrainResult(done, state["best_val_acc"], state["best_val_ci95"], state["best_episode"],
                         state["elapsed_s"], stopped_by)
    if state["best_val_acc"] >= 0:
        _write_summary(cfg, out, model, method, result, state["history"], replicas)
    return result


def random_affine(images, seed, shift: float, rotate: float, scale: float):
    """Shift, rotate and scale each image of a batch (N, H, W, C) by its own stateless random draw.

    Edges are extended from the border pixels, which suits both white-background scans and photos."""
    import math

    import tensorflow as tf

    shape = tf.shape(images)
    n, h, w = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 4)

    def draw(i, bound):
        return tf.random.stateless_uniform([n], seeds[i], -bound, bound)

    theta = draw(0, rotate * math.pi / 180)
    s = 1.0 + draw(1, scale)
    tx, ty = draw(2, shift) * w, draw(3, shift) * h
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # The op maps each output pixel to the input pixel it samples: the inverse of rotate-scale-shift about the centre.
    a0, a1 = tf.cos(theta) / s, tf.sin(theta) / s
    b0, b1 = -tf.sin(theta) / s, tf.cos(theta) / s
    a2 = cx - a0 * (cx + tx) - a1 * (cy + ty)
    b2 = cy - b0 * (cx + tx) - b1 * (cy + ty)
    zeros = tf.zeros_like(theta)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="NEAREST")


def _load_initial_weights(model, source: str) -> None:
    """Copy the weights of a trained model (folder or .keras file) into `model`, which must have the same architecture."""
    path = Path(source)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise EdgemetaError(f"[train] init_from: no model at {source} (give a model folder or its {MODEL_FILE})")
    src = load_keras(path)
    try:
        model.set_weights(src.get_weights())
    except ValueError as e:
        raise EdgemetaError(f"[train] init_from: {source} does not match the configured backbone: {str(e).splitlines()[0]}") from None


def _init_training(source: str) -> dict:
    """The training summary of the model a run started from, so the total cost stays on record."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    if not (folder / INFO_FILE).is_file():
        return {}
    t = read_info(folder).training
    return {k: t[k] for k in ("episodes", "wall_time_s", "best_val_acc", "classes", "init_training") if k in t}


def _write_config(cfg: Config, path: Path) -> None:
    """Record the resolved configuration, keeping an existing file (and its comments) that says the same."""
    from edgemeta.config import load_config

    try:
        if path.exists() and load_config(path) == cfg:
            return
    except Exception:  # an unreadable old file is simply replaced
        pass
    write_atomic(path, dump_toml(cfg))


def _save_model(model, out: Path) -> None:
    tmp = out / f".tmp-{MODEL_FILE}"  # Keras insists on the .keras suffix
    model.save(tmp)
    tmp.replace(out / MODEL_FILE)


def _machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def _write_summary(cfg: Config, out: Path, model, method, result: TrainResult, history: list[dict], replicas: int) -> None:
    import tensorflow as tf

    info = ModelInfo(
        backbone=cfg.model.backbone, algorithm=cfg.model.algorithm, distance=method.distance,
        preprocess=cfg.model.preprocess, embedding_dim=int(model.output_shape[-1]),
        data={"kind": cfg.data.kind, "split": cfg.data.split, "rotations": cfg.data.rotations,
              "fractions": list(cfg.data.fractions), "seed": cfg.data.seed,
              # a folder dataset is found again by its path (Omniglot by --data / $EDGEMETA_OMNIGLOT)
              **({"root": cfg.data.root} if cfg.data.kind == "folder" else {})},
        training={"episodes": result.episodes, "episodes_per_step": replicas, "best_episode": result.best_episode,
                  "best_val_acc": round(100 * result.best_val_acc, 2), "best_val_ci95": round(100 * result.best_val_ci95, 2),
                  "validation": f"{cfg.validation.episodes} episodes {cfg.validation.way}-way {cfg.validation.shot}-shot "
                                f"{cfg.validation.query}-query on the val split"
                                + (" (trained on too: not held out; last weights kept)" if cfg.train.classes == "trainval" else ""),
                  "classes": cfg.train.classes,
                  "wall_time_s": round(result.elapsed_s, 1), "stopped_by": result.stopped_by,
                  **({"init_from": cfg.train.init_from, "init_training": _init_training(cfg.train.init_from)}
                     if cfg.train.init_from else {}),
                  "machine": _machine(), "tensorflow": tf.__version__},
    )
    write_json(out / INFO_FILE, info.to_dict())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    w.writerows(history)
    write_atomic(out / "history.csv", buf.getvalue())
    plot_curve(history, out / "curve.png", title=f"{cfg.model.algorithm} {cfg.model.backbone} ({cfg.data.kind} {cfg.data.split})")


def plot_curve(history: list[dict], path: Path, title: str) -> None:
    """Training loss and validation accuracy against episodes, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    ep = [h["episode"] for h in history]
    fig, ax1 = plt.subplots(figsize=(7, 4), dpi=100)
    ax1.plot(ep, [h["loss"] for h in history], color="tab:blue", label="training loss")
    ax1.set_xlabel("episodes")
    ax1.set_ylabel("training loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.errorbar(ep, [100 * h["val_acc"] for h in history], yerr=[100 * h["val_ci95"] for h in history],
                 color="tab:red", marker=".", capsize=2, label="validation accuracy")
    ax2.set_ylabel("validation accuracy (%)", color="tab:red")
    ax1.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())

