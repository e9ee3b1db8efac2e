"""Episodic meta-training on the host (TensorFlow).

`train(cfg, out)` trains a backbone with the configured algorithm, validates every
``validation.every`` episodes on fixed seeded validation episodes, keeps the best model in
``out/model.keras``, and checkpoints at each validation and at least every ``[train]
checkpoint_minutes`` of wall time, so that an interrupted run (Ctrl-C, a killed job, a time budget)
resumes from at most that far back when started again with the same output folder. ``[train]
max_minutes`` is the budget of one run (a resumed run gets it anew); when it ends, the run validates
and saves what it has, so a budget that ends before the first scheduled validation still leaves a
model (its last weights). A folder dataset's class split is recorded in ``out/splits.json``.

Runs under a `tf.distribute` strategy: MirroredStrategy over all GPUs when there are several, one
device otherwise, or, as one worker of a cluster (`edgemeta.host.cluster`: TF_CONFIG or
``--cluster``), MultiWorkerMirroredStrategy over every worker's GPUs (else its CPU). One optimizer
step is a meta-batch of ``[train] meta_batch`` episodes split across all replicas (at least one per
replica), whose gradients are averaged. Episode ``i`` of the run is always episode ``i`` of the
seeded sampler, taken by exactly one replica, so the episodes do not depend on how many processes
share the replicas, and a resumed run continues the same sequence. In a cluster the chief (worker 0)
validates, writes TensorBoard, the model and the checkpoints; the others write their checkpoints to
a temporary folder and delete it (TensorFlow's multi-worker rule) and take the chief's state when a
run resumes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.host.config import Config, dump_toml, training_data
from edgemeta.host.data import EpisodeSampler
from edgemeta.host.evaluate import episode_accuracies, episode_inputs, mean_ci95
from edgemeta.host.methods import TaskEpisode, get_method
from edgemeta.host.modeldir import (
    INFO_FILE,
    METHOD_FILE,
    MODEL_FILE,
    SPLITS_FILE,
    ModelInfo,
    load_backbone,
    load_keras,
    read_info,
    read_splits,
    write_atomic,
    write_json,
    write_npz,
)

STATE_FILE = "checkpoints/state.json"
STOP_REASONS = ("", "time budget", "interrupted", "no improvement")  # agreed across a cluster by index
HISTORY_FIELDS = ("episode", "loss", "train_acc", "val_acc", "val_ci95", "learning_rate", "elapsed_s")
FLAGS = 3  # what each step carries across a cluster: out of time, interrupted, checkpoint due
_clock = time.monotonic  # every duration of a run (budget, checkpoints, rate, progress) is read from this (tests replace it)


@dataclass
class TrainResult:
    episodes: int
    best_val_acc: float
    best_val_ci95: float
    best_episode: int
    elapsed_s: float
    stopped_by: str
    chief: bool = True   # False on the other workers of a cluster, which write no model folder
    model_note: str = ""  # what the folder's model.keras holds after this run (or why there is none yet)


def make_strategy(devices: list[str], cluster=None):
    """MultiWorkerMirroredStrategy for a cluster (TF_CONFIG, written by `edgemeta.host.cluster`), else
    MirroredStrategy over the given devices (or all GPUs when there are several), else one device.

    A cluster's strategy must be made before anything else starts TensorFlow's runtime."""
    import tensorflow as tf

    if cluster is not None:
        if devices:
            raise EdgemetaError("[train] devices cannot be combined with a cluster: each worker trains on all of its "
                                "GPUs (else its CPU); choose them with CUDA_VISIBLE_DEVICES on each worker")
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)  # NCCL on GPUs, ring on CPUs
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if devices:
        return tf.distribute.MirroredStrategy(devices) if len(devices) > 1 else tf.distribute.OneDeviceStrategy(devices[0])
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def device_summary(strategy, cluster=None) -> dict:
    """Where training runs, for the run summary: the strategy, its replicas and this process's devices,
    with the GPUs' names as the driver reports them."""
    import tensorflow as tf

    gpus = []
    for d in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(d)
        except Exception:  # details are best effort
            details = {}
        gpus.append(details.get("device_name", d.name))
    name = type(strategy).__name__
    name = "MultiWorkerMirroredStrategy" if name == "CollectiveAllReduceStrategy" else name  # the public name
    out = {"strategy": name, "replicas": int(strategy.num_replicas_in_sync),
           "devices": [str(d) for d in strategy.extended.worker_devices], "gpus": gpus}
    if cluster is not None:
        out.update(workers=cluster.num_workers, worker=cluster.rank, address=cluster.address)
    return out


class EpisodePrefetcher:
    """Draws the episodes of the coming steps on a background thread, `depth` steps ahead, so that the
    sampling and stacking of images (numpy, on the host) overlaps the training step on the device.

    ``next()`` returns ``(first, arrays)`` in order: the step's first episode index and what
    `EpisodicTrainer.prepare` made for it."""

    def __init__(self, prepare, first: int, per_step: int, depth: int = 3):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(prepare, first, per_step), daemon=True,
                                        name="edgemeta-episodes")
        self._thread.start()

    def _run(self, prepare, first: int, per_step: int) -> None:
        import queue

        while not self._stop.is_set():
            try:
                item = (first, prepare(first))
            except BaseException as e:  # handed to the training loop, which raises it
                item = (first, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return
            first += per_step

    def next(self):
        first, arrays = self._queue.get()
        if isinstance(arrays, BaseException):
            raise arrays
        return first, arrays

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _minutes(seconds: float) -> str:
    m = seconds / 60
    return f"{m:.1f}" if m < 10 else f"{m:.0f}"


class _Progress:
    """A one-line progress display on a terminal; off a terminal (a log, a background job) a line every
    `log_every_s` seconds and at each validation, with the measured rate and the time left.

    With a time budget of `budget_s` seconds counted from `begun`, the time left is the smaller of what
    the episodes left need at the measured rate and what is left of the budget, and says which ends the run."""

    def __init__(self, total: int, enabled: bool, done: int = 0, log_every_s: float = 30.0, budget_s: float = 0.0,
                 begun: float | None = None):
        self.total, self.enabled, self.tty = total, enabled, sys.stderr.isatty()
        self.start, self.first = _clock(), done  # a resumed run counts its own episodes only
        self.log_every_s, self.last_line = log_every_s, self.start
        self.budget_s, self.begun = budget_s, self.start if begun is None else begun

    def time_left(self, done: int) -> tuple[float, float | None] | None:
        """(seconds left, and what the episodes would need when the budget ends the run first, else None);
        None before a rate is measured or once the episodes are done."""
        now = _clock()
        rate = (done - self.first) / max(now - self.start, 1e-9)
        if rate <= 0 or done >= self.total:
            return None
        by_episodes = (self.total - done) / rate
        if self.budget_s > 0:
            by_budget = max(0.0, self.budget_s - (now - self.begun))
            if by_budget < by_episodes:
                return by_budget, by_episodes
        return by_episodes, None

    def line(self, done: int, loss: float, acc: float, val: str) -> str:
        seconds = _clock() - self.start
        rate = (done - self.first) / max(seconds, 1e-9)
        speed = f"{rate:.3g} ep/s" if rate >= 1 else f"{1 / rate:.3g} s/ep" if rate > 0 else "- ep/s"
        left = self.time_left(done)
        if left is None:
            left_text = ""
        elif left[1] is not None:
            left_text = f"  {_minutes(left[0])} min left (time budget; {self.total} episodes would need {_minutes(left[1])})"
        else:
            left_text = f"  {_minutes(left[0])} min left" + (" (episodes, within the budget)" if self.budget_s > 0 else "")
        filled = int(30 * done / self.total)
        return (f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} episodes  "
                f"loss {loss:.3f}  acc {100 * acc:5.1f}%  val {val}  {speed}{left_text}")

    def update(self, done: int, loss: float, acc: float, val: str, force_line: bool = False) -> None:
        if not self.enabled:
            return
        now = _clock()
        if self.tty and (force_line or now - self.last_line >= 0.5):
            self.last_line = now
            print("\r" + self.line(done, loss, acc, val), end="\n" if force_line else "", file=sys.stderr, flush=True)
        elif not self.tty and (force_line or now - self.last_line >= self.log_every_s):
            self.last_line = now
            print(self.line(done, loss, acc, val), file=sys.stderr, flush=True)


class EpisodicTrainer:
    """The model, the method's variables, the optimizer and the compiled training step under one
    distribution strategy.

    ``step(first)`` trains on episodes ``first .. first + episodes_per_step - 1`` of `sampler`: the
    ``[train] meta_batch`` episodes of one step are split across the replicas (``meta_batch`` here is
    each replica's share, rounded up, and at least 1), replica ``r`` takes ``meta_batch`` consecutive
    episodes from ``first + r * meta_batch``, their gradients are averaged over all of them, and the
    optimizer takes one step. Returns the mean loss and accuracy. `strategy`: one made already (a
    cluster's must be made before TensorFlow starts); else `make_strategy` of the configured devices."""

    def __init__(self, cfg: Config, sampler: EpisodeSampler, strategy=None):
        import keras
        import tensorflow as tf

        from edgemeta.host.backbones import build_backbone

        tc = cfg.train
        self.sampler, self.method = sampler, get_method(cfg.method.name, cfg.method.params)
        self.strategy = strategy or make_strategy(tc.devices)
        self.replicas = replicas = self.strategy.num_replicas_in_sync
        self.meta_batch = meta_batch = -(-tc.meta_batch // replicas)  # this replica's share of the meta-batch
        self.episodes_per_step = per_step = replicas * meta_batch
        # the replicas this process runs (all of them, except in a cluster)
        ids: list[int] = []
        self.strategy.experimental_distribute_values_from_function(
            lambda ctx: ids.append(ctx.replica_id_in_sync_group) or tf.constant(0))
        self.local_replicas = ids
        self.multi_worker = len(ids) < replicas
        with self.strategy.scope():
            self.model = build_backbone(cfg.model.backbone, cfg.model.preprocess.input_shape)
            self.method.build(self.model, tc.way)
            self.method.start_training(load_teacher(self.method.teacher_folder()))
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

        def replica_step(support, support_labels, query, query_labels, episode, flags):
            # The meta-batch is a loop, not a wider batch: tasks must not share batch-norm statistics.
            def body(t, loss, acc, grads):
                lt, at, gt = task_grads(support[t], support_labels[t], query[t], query_labels[t], episode[t])
                return t + 1, loss + lt, acc + at, [a + g for a, g in zip(grads, gt, strict=True)]

            zeros = [tf.zeros_like(v) for v in variables]
            _, loss, acc, grads = tf.while_loop(lambda t, *_: t < meta_batch, body,
                                                (tf.constant(0), tf.constant(0.0), tf.constant(0.0), zeros),
                                                parallel_iterations=tc.parallel_tasks)
            # the optimizer sums the replicas' gradients (an all-reduce across the cluster): the sum over
            # every episode of the step, divided here by their number
            optimizer.apply_gradients(zip([g / per_step for g in grads], variables, strict=True))
            return tf.concat([tf.stack([loss / meta_batch, acc / meta_batch]), flags], 0)

        @tf.function
        def train_step(inputs):
            # one reduction for the loss, the accuracy and the stop flags of every worker
            total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=inputs), axis=None)
            return tf.concat([total[:2] / replicas, total[2:]], 0)

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

    def state_variables(self) -> list:
        """Everything a checkpoint holds: the backbone's weights and statistics, the method's, the optimizer's."""
        seen, out = set(), []
        for v in [*self.model.variables, *self.method.variables, *self.optimizer.variables]:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
        return out

    def from_chief(self, values: list):
        """The chief's values of `values` (tensors of any dtype and shape) on every worker: an all-reduce
        to which only the chief's first replica contributes. Outside a cluster, `values` as they are."""
        import tensorflow as tf

        if not self.multi_worker:
            return [tf.convert_to_tensor(v) for v in values]
        values = [tf.convert_to_tensor(v) for v in values]
        groups: dict = {}
        for i, v in enumerate(values):  # one all-reduce per dtype, of the values flattened and concatenated
            groups.setdefault(v.dtype, []).append(i)
        out = [None] * len(values)
        for members in groups.values():
            flat = tf.concat([tf.reshape(values[i], [-1]) for i in members], 0)
            per_replica = self.strategy.experimental_distribute_values_from_function(
                lambda ctx, flat=flat: flat if ctx.replica_id_in_sync_group == 0 else tf.zeros_like(flat))
            total = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            offset = 0
            for i in members:
                size = int(tf.size(values[i]))
                out[i] = tf.reshape(total[offset:offset + size], tf.shape(values[i]))
                offset += size
        return out

    def sync_from_chief(self) -> None:
        """Give every worker the chief's weights and optimizer state (after the chief restored a
        checkpoint or loaded init_from weights), so only the chief needs the output folder."""
        if not self.multi_worker:
            return
        variables = self.state_variables()
        for v, value in zip(variables, self.from_chief(variables), strict=True):
            v.assign(value)

    def prepare(self, first: int) -> dict:
        """The numpy arrays of step `first` for each replica this process runs (thread-safe: the sampler
        draws episode i from (seed, i) alone)."""
        out = {}
        for r in self.local_replicas:
            index = [first + r * self.meta_batch + t for t in range(self.meta_batch)]
            eps = [self.sampler.episode(i) for i in index]
            out[r] = (np.stack([e.support for e in eps]), np.stack([e.support_labels for e in eps]),
                      np.stack([e.query for e in eps]), np.stack([e.query_labels for e in eps]), np.array(index, np.int64))
        return out

    def step(self, first: int, arrays: dict | None = None, flags: tuple[float, ...] = ()) -> tuple[float, float]:
        """One step; see `step_flags` (which also returns the cluster's stop flags)."""
        loss, acc, _ = self.step_flags(first, arrays, flags)
        return loss, acc

    def step_flags(self, first: int, arrays: dict | None = None, flags: tuple[float, ...] = ()):
        """Train on the episodes of step `first` (`arrays`: what `prepare(first)` returned, e.g. from the
        prefetcher). `flags`: this process's (out of time, interrupted, checkpoint due), missing ones 0;
        returns (loss, accuracy, the flags summed over the cluster), so that every worker stops, or
        checkpoints, at the same step."""
        import tensorflow as tf

        arrays = arrays if arrays is not None else self.prepare(first)
        lead = self.local_replicas[0]
        flags = tuple(float(f) for f in flags) + (0.0,) * (FLAGS - len(flags))

        def value(ctx):
            r = ctx.replica_id_in_sync_group
            support, support_labels, query, query_labels, index = arrays[r]
            return (tf.cast(support, tf.float32) / 255.0, tf.constant(support_labels),
                    tf.cast(query, tf.float32) / 255.0, tf.constant(query_labels), tf.constant(index, tf.int64),
                    tf.constant(flags if r == lead else (0.0,) * FLAGS, tf.float32))

        out = self._train_step(self.strategy.experimental_distribute_values_from_function(value)).numpy()
        return float(out[0]), float(out[1]), tuple(float(f) for f in out[2:])


def train(cfg: Config, out: str | Path, progress: bool = True, fresh: bool = False, prepared: tuple | None = None,
          cluster=None) -> TrainResult:
    """Meta-train as configured into the folder `out` (resuming from its checkpoint unless `fresh`);
    `prepared`: what `training_data(cfg)` returned, when the caller has loaded the data already;
    `cluster`: this process's place in a multi-worker cluster (`edgemeta.host.cluster.Cluster`, whose
    TF_CONFIG is set), else a single-host run.

    ``[train] max_minutes`` is this call's budget, counted from here (a resumed run gets it anew; the
    validation and saving when it ends come on top); a budget that ends before one training step is
    over is an error, with nothing written. Nothing is written before the first step has shown that."""
    import tensorflow as tf

    from edgemeta.host.model_eval import keras_embedder

    begun = _clock()
    out = Path(out)
    cfg, splits, train_split, notes = prepared or training_data(cfg)
    chief = cluster is None or cluster.is_chief
    if not prepared:
        for note in notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
    tc, vc = cfg.train, cfg.validation
    # a cluster's strategy first: it configures TensorFlow's runtime, which nothing may have started
    strategy = make_strategy(tc.devices, cluster) if cluster is not None else None
    sizes = {"classes": {"train": train_split.num_classes, "val": splits["val"].num_classes},
             "images": {"train": len(train_split.images), "val": len(splits["val"].images)}}
    sampler = EpisodeSampler(train_split, tc.way, tc.shot, tc.query, seed=tc.seed)
    val_sampler = EpisodeSampler(splits["val"], vc.way, vc.shot, vc.query, seed=vc.seed)
    tf.keras.utils.set_random_seed(tc.seed)
    trainer = EpisodicTrainer(cfg, sampler, strategy)
    model, method, replicas = trainer.model, trainer.method, trainer.episodes_per_step
    placement = device_summary(trainer.strategy, cluster)
    ckpt = trainer.checkpoint()
    ckpt_dir = out / "checkpoints"
    record = _split_record(cfg, splits) if chief else None

    state = {"history": [], "best_val_acc": -1.0, "best_val_ci95": 0.0, "best_episode": 0, "elapsed_s": 0.0}
    state_path = out / STATE_FILE
    latest = tf.train.latest_checkpoint(str(ckpt_dir)) if chief and not fresh and ckpt_dir.is_dir() else None
    if latest:
        if record is not None:
            _check_same_split(read_splits(out), record, out)
        ckpt.restore(latest).assert_existing_objects_matched()
        if state_path.exists():
            state = json.loads(state_path.read_text())
    if chief and trainer.episodes_done == 0 and tc.init_from:  # a resumed run has its weights from the checkpoint
        _load_initial_weights(model, tc.init_from)
    trainer.sync_from_chief()  # the other workers take the chief's restored (or initial) state
    done = trainer.episodes_done
    # a run killed between the checkpoint's write and state.json's has validations recorded beyond its checkpoint
    state["history"] = [h for h in state["history"] if h["episode"] <= done]
    # a checkpoint by time keeps the losses since the last validation, so the next history row is the same as
    # in a run never stopped (only when state.json and the checkpoint are of the same step)
    pending = state.pop("pending", None)
    if state.get("checkpoint", {}).get("episode") != done:
        pending = None
    embed = keras_embedder(model)
    folder: dict = {}  # the chief's checkpoint manager and TensorBoard writer, once open_folder made them

    def open_folder() -> None:
        """The run's first write (the chief's only): not before the run has trained within its budget, so
        that a refused run leaves the folder as it was. The other workers write nothing here."""
        if folder or not chief:
            return
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            for f in ckpt_dir.iterdir():
                f.unlink()
        folder["manager"] = tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=2)
        folder["writer"] = tf.summary.create_file_writer(str(out / "tensorboard"))
        _write_config(cfg, out / "config.toml")
        if record is not None:
            write_json(out / SPLITS_FILE, record)

    def validate() -> tuple[float, float]:
        classify, inputs, support = episode_inputs(method, embed, splits["val"])
        return mean_ci95(episode_accuracies(classify, inputs, val_sampler, vc.episodes, support_embeddings=support))

    def save_checkpoint(why: str) -> None:
        if chief:
            open_folder()
            folder["manager"].save(checkpoint_number=done)
            state["checkpoint"] = {"episode": done, "why": why, "elapsed_s": round(state["elapsed_s"], 1)}
            write_json(state_path, state)
            return
        # every worker saves (a save may read distributed variables); the others to a place they delete
        tmp = tempfile.mkdtemp(prefix=f"edgemeta-worker{cluster.rank}-")
        try:
            tf.train.CheckpointManager(ckpt, tmp, max_to_keep=1).save(checkpoint_number=done)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    budget_s, every_s = 60 * tc.max_minutes, 60 * tc.checkpoint_minutes
    bar = _Progress(tc.episodes, progress and chief, done, budget_s=budget_s, begun=begun)
    if progress:
        source = f"Omniglot {cfg.data.split}" if cfg.data.kind == "omniglot" else f"folder {cfg.data.root}"
        where = f"{cluster.describe()}: " if cluster is not None else ""
        print(f"{where}training {cfg.method.name} {cfg.model.backbone} on {source}: {train_split.num_classes} {train_split.name} "
              f"classes ({len(train_split.images)} images), {splits['val'].num_classes} val classes; episodes {done} to "
              f"{tc.episodes} of {tc.way}-way {tc.shot}-shot {tc.query}-query"
              + (f" (resumed from the checkpoint at episode {done})" if done else "")
              + (f", at most {tc.max_minutes:g} min (this run)" if tc.max_minutes else "")
              + f"; validation and a checkpoint every {vc.every} episodes ({vc.episodes} {vc.way}-way {vc.shot}-shot)"
              + (f", a checkpoint at least every {tc.checkpoint_minutes:g} min" if every_s else "")
              + "; the time left shows once episodes run", file=sys.stderr, flush=True)
        print(f"{where}{placement['strategy']}, {placement['replicas']} replica(s), {replicas} episode(s) per step "
              f"({trainer.meta_batch} per replica); this process on {', '.join(placement['devices'])}"
              + (f"; GPUs: {', '.join(placement['gpus'])}" if placement["gpus"] else "; no GPU"), file=sys.stderr, flush=True)
    last_val = "-" if state["best_val_acc"] < 0 else f"{100 * state['best_val_acc']:.2f}%"
    started, elapsed0 = _clock(), state["elapsed_s"]
    stopped_by, since_best = "episodes", 0
    losses, accs = (list(pending["losses"]), list(pending["accs"])) if pending else ([], [])
    step_s, step_episodes, steps = 0.0, 0, 0  # training steps only (not the first, which compiles, nor validation)
    last_checkpoint, wrote, told = begun, False, not budget_s  # told: the note on the first validation is decided
    together = cluster is not None  # the workers stopped at the same step and can leave together
    interrupted = []
    old_handlers = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: interrupted.append("SIGTERM"))}
    if cluster is not None:  # Ctrl-C in one worker stops the whole cluster at the next step; a second one at once
        def on_sigint(*_):
            if interrupted:
                raise KeyboardInterrupt
            interrupted.append("SIGINT")
        old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
    prefetch = EpisodePrefetcher(trainer.prepare, done, replicas)
    try:
        while done < tc.episodes:
            first, arrays = prefetch.next()
            t0 = _clock()
            out_of_time = budget_s > 0 and t0 - begun >= budget_s
            due = every_s > 0 and t0 - last_checkpoint >= every_s
            loss, acc, flags = trainer.step_flags(first, arrays, (out_of_time, bool(interrupted), due))
            if steps:  # not the run's first step: that one traces and compiles
                step_s += _clock() - t0
                step_episodes += replicas
            steps += 1
            if flags[0] and steps <= 2 and not wrote:  # the budget was over before one step of this run was
                raise EdgemetaError(
                    f"[train] max_minutes = {tc.max_minutes:g} ({budget_s:.3g} s) is shorter than one training step: this "
                    f"run's set-up{' and first step (compiling included)' if steps == 2 else ''} took {t0 - begun:.1f} s; "
                    "give a budget longer than "
                    f"that (e.g. {math.ceil((t0 - begun) / 60) + 1} min), or 0 for no limit; nothing was written")
            done += replicas
            losses.append(loss)
            accs.append(acc)
            elapsed = elapsed0 + _clock() - started
            at_val = done % vc.every < replicas or done >= tc.episodes or bool(flags[0] or flags[1])
            bar.update(done, np.mean(losses[-50:]), np.mean(accs[-50:]), last_val)
            if not told and chief and step_s > 0 and (step_s >= 5.0 or (steps > 3 and step_s >= 1.0) or steps > 100):
                told = True
                note = _first_validation_note(done, step_episodes / step_s, budget_s - (_clock() - begun), vc.every,
                                              tc.episodes, state["best_val_acc"] >= 0)
                if note:
                    print(("\n" if bar.enabled and bar.tty else "") + f"note: {note}", file=sys.stderr, flush=True)
            if at_val:
                wrote = True
                reason = 1 if flags[0] else 2 if flags[1] else 0
                if chief:
                    open_folder()
                    val_acc, val_ci = validate()
                    lr = trainer.learning_rate
                    row = {"episode": done, "loss": float(np.mean(losses)), "train_acc": float(np.mean(accs)),
                           "val_acc": val_acc, "val_ci95": val_ci, "learning_rate": lr, "elapsed_s": round(elapsed, 1)}
                    state["history"].append(row)
                    with folder["writer"].as_default(step=done):
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
                    if not reason and vc.patience and since_best >= vc.patience:
                        reason = 3
                losses, accs = [], []
                state["elapsed_s"] = elapsed
                state.pop("pending", None)
                # the chief's decision and best result, for every worker (a barrier while the chief validates)
                reason, best, best_ci, best_episode = (float(x) for x in trainer.from_chief(
                    [tf.constant([reason, state["best_val_acc"], state["best_val_ci95"], state["best_episode"]], tf.float64)])[0])
                if not chief:
                    state.update(best_val_acc=best, best_val_ci95=best_ci, best_episode=int(best_episode))
                save_checkpoint("validation")
                last_checkpoint = _clock()
                if chief:
                    # the folder is a usable model folder while a long run goes on (eval, export)
                    _write_summary(cfg, out, model, method, TrainResult(done, state["best_val_acc"], state["best_val_ci95"],
                                   state["best_episode"], elapsed, "still running"), state["history"], replicas, sizes,
                                   placement, _rate(step_episodes, step_s))
                if reason:
                    stopped_by = STOP_REASONS[int(reason)]
                    break
            elif flags[2]:  # a checkpoint by time (every worker at the same step: the flag is the cluster's)
                wrote = True
                state.update(elapsed_s=elapsed, pending={"losses": losses, "accs": accs})
                save_checkpoint("time")
                last_checkpoint = _clock()
    except KeyboardInterrupt:
        stopped_by, together = "interrupted", False
        print("\ninterrupted: the last checkpoint is kept; run the same command again to resume", file=sys.stderr)
    except tf.errors.OpError as e:
        if cluster is None:
            raise
        raise EdgemetaError(f"[train] {cluster.describe()} lost the cluster at episode {done} ({_lost_peer(e)}); the "
                            "chief's last checkpoint is kept: start every worker again with the same command to resume") from None
    finally:
        prefetch.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    result = TrainResult(done, state["best_val_acc"], state["best_val_ci95"], state["best_episode"],
                         state["elapsed_s"], stopped_by, chief,
                         _model_note(out, state, stopped_by, vc.every, tc.episodes, tc.classes, replicas) if chief else "")
    if chief and state["best_val_acc"] >= 0:
        _write_summary(cfg, out, model, method, result, state["history"], replicas, sizes, placement,
                       _rate(step_episodes, step_s))
    if together:
        trainer.from_chief([tf.constant(0)])  # the workers leave together, once the chief has written its summary
    return result


def _first_validation_note(done: int, rate: float, budget_left_s: float, every: int, episodes: int,
                           validated_before: bool) -> str:
    """The note when, at the measured `rate` (episodes per second), the run's next validation would
    come after its budget ends, with what then happens and what to set; "" when it comes in time."""
    upcoming = min((done // every + 1) * every, episodes)
    need = (upcoming - done) / rate
    if need <= budget_left_s:
        return ""
    reach = done + int(rate * max(budget_left_s, 0.0))
    return (f"the first validation of this run (episode {upcoming}) would come in about {_minutes(need)} min at the "
            f"measured {rate:.3g} episodes/s, after the time budget ends ({_minutes(max(budget_left_s, 0.0))} min left): "
            f"the run will validate once, when the budget ends (near episode {reach}), and model.keras will hold those "
            f"last weights" + (" unless an earlier validation scored higher" if validated_before else "")
            + f"; to validate on the way, set [validation] every to at most {max(1, int(0.9 * (reach - done)))}")


def _model_note(out: Path, state: dict, stopped_by: str, every: int, episodes: int, classes: str, replicas: int) -> str:
    """What model.keras holds after a run, in words (or why there is none yet)."""
    history = state["history"]
    if state["best_val_acc"] < 0 or not history:
        checkpoint = state.get("checkpoint")
        return ("no model.keras yet: no validation ran" + (
            f"; run the same command again to resume from the checkpoint at episode {checkpoint['episode']}"
            if checkpoint else ""))
    path, best = out / MODEL_FILE, state["best_episode"]
    if classes == "trainval":
        return f"model in {path}: the last validated weights (episode {best}; trainval keeps the last)"
    last = history[-1]["episode"]
    if len(history) == 1 and stopped_by in ("time budget", "interrupted") and last % every >= replicas and last < episodes:
        why = "the time budget ended" if stopped_by == "time budget" else "the run was interrupted"
        return (f"model in {path}: the last weights (episode {last}), validated once, at the stop: {why} before the "
                f"first scheduled validation (episode {min(every, episodes)})")
    return f"model in {path}: the best validated weights (episode {best}" + (", the last)" if best == last else ")")


def _split_record(cfg: Config, splits: dict) -> dict | None:
    """A folder dataset's class split, as splits.json records it (None for Omniglot, whose splits are named)."""
    if cfg.data.kind != "folder":
        return None
    from edgemeta.host.data.dataset import _folder_files  # the class folders, listed as the loader lists them

    files = _folder_files(Path(cfg.data.root).expanduser())
    named = {"train": splits["train"].class_names, "val": splits["val"].class_names}
    held = {n for names in named.values() for n in names}
    named["test"] = [n for n in files if n not in held]
    return {"format": 1, "kind": "folder", "root": cfg.data.root, "fractions": list(cfg.data.fractions),
            "seed": cfg.data.seed,
            "how": "the sorted class folders, permuted with [data] seed and cut by [data] fractions; "
                   "edgemeta eval and export use these lists",
            "classes": named, "images": {k: sum(len(files[n]) for n in v) for k, v in named.items()}}


def _check_same_split(old: dict | None, new: dict, out: Path) -> None:
    """A resumed run must train on the classes it started with: a class folder added, removed or renamed
    can reshuffle the seeded split, and the checkpoint may then have seen classes that are now held out."""
    if old is None or old.get("classes") == new["classes"]:
        return
    moved = sorted({n for k in ("train", "val", "test") for n in set(old["classes"].get(k, [])) ^ set(new["classes"][k])})
    if not moved:
        return
    raise EdgemetaError(f"the classes of {new['root']} are no longer split as when the run in {out} started "
                        f"({len(moved)} class(es) changed split, e.g. {moved[0]!r}; {out / SPLITS_FILE} has the old "
                        "split): restore the folder (or [data] fractions and seed), or start over with --fresh")


def _lost_peer(e) -> str:
    """What a collective's error says about the worker that went away, in a few words."""
    import re

    text = str(getattr(e, "message", "") or e)
    peer = re.search(r"/job:(\w+)/replica:\d+/task:(\d+)", text)
    addr = re.search(r"ipv[46]:([^\s,]+?):? Failed to connect|(\d+\.\d+\.\d+\.\d+:\d+)", text)
    where = f"{peer.group(1)} {peer.group(2)}" if peer else "another worker"
    where += f" at {addr.group(1) or addr.group(2)}" if addr else ""
    return f"{type(e).__name__}: {where} stopped answering"


def _rate(episodes: int, seconds: float) -> float | None:
    return round(episodes / seconds, 2) if episodes and seconds > 0 else None


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


def load_teacher(folder: str):
    """The backbone of the model folder a method distils (`Method.teacher_folder`), None for none: the
    trainer loads it, so that a method reads no model folder."""
    if not folder:
        return None
    if not Path(folder).is_dir():
        raise EdgemetaError(f"[method] teacher {folder} is not a folder; give a trained model folder")
    return load_backbone(folder)[0]


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


def machine_description() -> str:
    """CPU model, cores, OS, architecture and Python: where a figure was measured."""
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
                   sizes: dict, placement: dict | None = None, episodes_per_s: float | None = None) -> None:
    import tensorflow as tf

    info = ModelInfo(
        backbone=cfg.model.backbone, algorithm=cfg.method.name, distance=method.distance,
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
                  "machine": machine_description(), "tensorflow": tf.__version__,
                  # where it ran (strategy, replicas, this process's devices, GPU names) and how fast the training
                  # steps of the last run went (validation and the first, compiling step left out)
                  **({"placement": placement} if placement else {}),
                  **({"episodes_per_s": episodes_per_s} if episodes_per_s else {})},
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

