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

from edgemeta.errors import EdgemetaError
from edgemeta.host.config import Config, dump_toml, training_data
from edgemeta.host.data import EpisodeSampler
from edgemeta.host.evaluate import episode_accuracies, episode_inputs, mean_ci95
from edgemeta.host.methods import TaskEpisode, get_method
from edgemeta.host.modeldir import INFO_FILE, METHOD_FILE, MODEL_FILE, ModelInfo, load_keras, read_info, write_atomic, write_json, write_npz

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
    """A one-line progress display on a terminal; off a terminal (a log, a background job) a line every
    `log_every_s` seconds and at each validation, with the measured rate and the time left."""

    def __init__(self, total: int, enabled: bool, done: int = 0, log_every_s: float = 30.0):
        self.total, self.enabled, self.tty = total, enabled, sys.stderr.isatty()
        self.start, self.first = time.monotonic(), done  # a resumed run counts its own episodes only
        self.log_every_s, self.last_line = log_every_s, time.monotonic()

    def line(self, done: int, loss: float, acc: float, val: str) -> str:
        seconds = time.monotonic() - self.start
        rate = (done - self.first) / max(seconds, 1e-9)
        speed = f"{rate:.3g} ep/s" if rate >= 1 else f"{1 / rate:.3g} s/ep" if rate > 0 else "- ep/s"
        left = f"  {(self.total - done) / rate / 60:.1f} min left" if rate > 0 and done < self.total else ""
        filled = int(30 * done / self.total)
        return (f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} episodes  "
                f"loss {loss:.3f}  acc {100 * acc:5.1f}%  val {val}  {speed}{left}")

    def update(self, done: int, loss: float, acc: float, val: str, force_line: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty and (force_line or now - self.last_line >= 0.5):
            self.last_line = now
            print("\r" + self.line(done, loss, acc, val), end="\n" if force_line else "", file=sys.stderr, flush=True)
        elif not self.tty and (force_line or now - self.last_line >= self.log_every_s):
            self.last_line = now
            print(self.line(done, loss, acc, val), file=sys.stderr, flush=True)


class EpisodicTrainer:
    """The model, the method's variables, the optimizer and the compiled training step under one
    distribution strategy.

    ``step(first)`` trains on episodes ``first .. first + episodes_per_step - 1`` of `sampler`:
    each replica takes ``meta_batch`` consecutive episodes, their gradients are averaged over all
    of them, and the optimizer takes one step. Returns the mean loss and accuracy."""

    def __init__(self, cfg: Config, sampler: EpisodeSampler):
        import keras
        import tensorflow as tf

        from edgemeta.host.backbones import build_backbone

        tc = cfg.train
        self.sampler, self.method = sampler, get_method(cfg.method.name, cfg.method.params)
        self.strategy = make_strategy(tc.devices)
        self.replicas = replicas = self.strategy.num_replicas_in_sync
        self.meta_batch = meta_batch = tc.meta_batch
        self.episodes_per_step = per_step = replicas * meta_batch
        with self.strategy.scope():
            self.model = build_backbone(cfg.model.backbone, cfg.model.preprocess.input_shape)
            self.method.build(self.model, tc.way)
            self.variables = self.model.trainable_variables + self.method.variables
            steps = max(1, tc.episodes // per_step)
            if tc.lr_schedule == "cosine":
                self.schedule = keras.optimizers.schedules.CosineDecay(tc.learning_rate, decay_steps=steps)
            else:
                rate = tc.lr_decay_rate if tc.lr_schedule == "step" else 1.0
                self.schedule = keras.optimizers.schedules.ExponentialDecay(
                    tc.learning_rate, decay_steps=max(1, tc.lr_decay_every // per_step), decay_rate=rate, staircase=True)
            self.optimizer = keras.optimizers.Adam(self.schedule)
            self.optimizer.build(self.variables)
        optimizer, method, strategy, variables = self.optimizer, self.method, self.strategy, self.variables

        def task_grads(support, support_labels, query, query_labels, episode):
            if tc.augments:  # one seeded draw per episode, so a resumed run sees the same images
                seed = tf.stack([tf.constant(tc.seed, tf.int64), tf.cast(episode, tf.int64)])
                n = tf.shape(support)[0]
                both = random_affine(tf.concat([support, query], 0), seed, tc.augment_shift, tc.augment_rotate, tc.augment_scale)
                support, query = both[:n], both[n:]
            with tf.GradientTape() as tape:
                loss, acc = method.episode_loss(
                    TaskEpisode(support, support_labels, query, query_labels, tc.way, progress=episode), training=True)
            grads = tape.gradient(loss, variables)
            return loss, acc, [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)]

        def replica_step(support, support_labels, query, query_labels, episode):
            # The meta-batch is a loop, not a wider batch: tasks must not share batch-norm statistics.
            def body(t, loss, acc, grads):
                lt, at, gt = task_grads(support[t], support_labels[t], query[t], query_labels[t], episode[t])
                return t + 1, loss + lt, acc + at, [a + g for a, g in zip(grads, gt, strict=True)]

            zeros = [tf.zeros_like(v) for v in variables]
            _, loss, acc, grads = tf.while_loop(lambda t, *_: t < meta_batch, body,
                                                (tf.constant(0), tf.constant(0.0), tf.constant(0.0), zeros))
            optimizer.apply_gradients(zip([g / per_step for g in grads], variables, strict=True))
            return loss / meta_batch, acc / meta_batch

        @tf.function
        def train_step(inputs):
            loss, acc = strategy.run(replica_step, args=inputs)
            mean = tf.distribute.ReduceOp.MEAN
            return strategy.reduce(mean, loss, axis=None), strategy.reduce(mean, acc, axis=None)

        self._train_step = train_step

    @property
    def episodes_done(self) -> int:
        return int(self.optimizer.iterations.numpy()) * self.episodes_per_step

    @property
    def learning_rate(self) -> float:
        return float(self.schedule(self.optimizer.iterations))

    def checkpoint(self):
        import tensorflow as tf

        variables = self.method.variables
        extra = {"method": {f"v{i}": v for i, v in enumerate(variables)}} if variables else {}
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, **extra)

    def step(self, first: int) -> tuple[float, float]:
        import tensorflow as tf

        def value(ctx):
            r = ctx.replica_id_in_sync_group
            index = [first + r * self.meta_batch + t for t in range(self.meta_batch)]
            eps = [self.sampler.episode(i) for i in index]
            return (tf.cast(np.stack([e.support for e in eps]), tf.float32) / 255.0,
                    tf.constant(np.stack([e.support_labels for e in eps])),
                    tf.cast(np.stack([e.query for e in eps]), tf.float32) / 255.0,
                    tf.constant(np.stack([e.query_labels for e in eps])),
                    tf.constant(index, tf.int64))

        loss, acc = self._train_step(self.strategy.experimental_distribute_values_from_function(value))
        return float(loss), float(acc)


def train(cfg: Config, out: str | Path, progress: bool = True, fresh: bool = False, prepared: tuple | None = None) -> TrainResult:
    """Meta-train as configured into the folder `out` (resuming from its checkpoint unless `fresh`);
    `prepared`: what `training_data(cfg)` returned, when the caller has loaded the data already."""
    import tensorflow as tf

    from edgemeta.host.model_eval import keras_embedder

    out = Path(out)
    cfg, splits, train_split, notes = prepared or training_data(cfg)
    if not prepared:
        for note in notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
    tc, vc = cfg.train, cfg.validation
    sizes = {"classes": {"train": train_split.num_classes, "val": splits["val"].num_classes},
             "images": {"train": len(train_split.images), "val": len(splits["val"].images)}}
    sampler = EpisodeSampler(train_split, tc.way, tc.shot, tc.query, seed=tc.seed)
    val_sampler = EpisodeSampler(splits["val"], vc.way, vc.shot, vc.query, seed=vc.seed)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)  # only once the data fits: a refused run leaves nothing
    tf.keras.utils.set_random_seed(tc.seed)
    trainer = EpisodicTrainer(cfg, sampler)
    model, method, replicas = trainer.model, trainer.method, trainer.episodes_per_step
    ckpt = trainer.checkpoint()
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
        classify, inputs = episode_inputs(method, embed, splits["val"])
        return mean_ci95(episode_accuracies(classify, inputs, val_sampler, vc.episodes))

    writer = tf.summary.create_file_writer(str(out / "tensorboard"))
    bar = _Progress(tc.episodes, progress, done)
    if progress:
        source = f"Omniglot {cfg.data.split}" if cfg.data.kind == "omniglot" else f"folder {cfg.data.root}"
        print(f"training {cfg.method.name} {cfg.model.backbone} on {source}: {train_split.num_classes} {train_split.name} "
              f"classes ({len(train_split.images)} images), {splits['val'].num_classes} val classes; episodes {done} to "
              f"{tc.episodes} of {tc.way}-way {tc.shot}-shot {tc.query}-query"
              + (f", at most {tc.max_minutes:g} min" if tc.max_minutes else "")
              + f"; validation every {vc.every} episodes ({vc.episodes} {vc.way}-way {vc.shot}-shot); the time left shows "
              "once episodes run", file=sys.stderr, flush=True)
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
                    _save_model(model, method, out)
                    since_best = 0
                else:
                    since_best += 1
                last_val = f"{100 * val_acc:.2f}%"
                bar.update(done, row["loss"], row["train_acc"], last_val, force_line=True)
                state["elapsed_s"] = elapsed
                manager.save(checkpoint_number=done)
                write_json(state_path, state)
                # the folder is a usable model folder while a long run goes on (eval, export)
                _write_summary(cfg, out, model, method, TrainResult(done, state["best_val_acc"], state["best_val_ci95"],
                               state["best_episode"], elapsed, "still running"), state["history"], replicas, sizes)
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
        _write_summary(cfg, out, model, method, result, state["history"], replicas, sizes)
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
    from edgemeta.host.config import load_config

    try:
        if path.exists() and load_config(path) == cfg:
            return
    except Exception:  # an unreadable old file is simply replaced
        pass
    write_atomic(path, dump_toml(cfg))


def _save_model(model, method, out: Path) -> None:
    tmp = out / f".tmp-{MODEL_FILE}"  # Keras insists on the .keras suffix
    model.save(tmp)
    arrays = method.head_arrays()
    if arrays:  # the method's own variables (head initialisation, learned rates) beside the backbone
        write_npz(out / METHOD_FILE, arrays)
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


def _write_summary(cfg: Config, out: Path, model, method, result: TrainResult, history: list[dict], replicas: int,
                   sizes: dict) -> None:
    import tensorflow as tf

    info = ModelInfo(
        backbone=cfg.model.backbone, algorithm=cfg.method.name, distance=getattr(method, "distance", ""),
        method=cfg.method.to_dict(),
        preprocess=cfg.model.preprocess, embedding_dim=int(model.output_shape[-1]),
        # what it was trained on: a folder dataset is found again by its path and seeded split (Omniglot by
        # --data / $EDGEMETA_OMNIGLOT and its split); each kind records only its own fields
        data={"kind": cfg.data.kind, **({"split": cfg.data.split, "rotations": cfg.data.rotations} if cfg.data.kind == "omniglot"
                                        else {"root": cfg.data.root, "fractions": list(cfg.data.fractions), "seed": cfg.data.seed}),
              **sizes},
        training={"episodes": result.episodes, "episodes_per_step": replicas, "meta_batch": cfg.train.meta_batch,
                  "best_episode": result.best_episode,
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
    plot_curve(history, out / "curve.png", title=f"{cfg.method.name} {cfg.model.backbone} ({cfg.data.kind} {cfg.data.split})")


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

