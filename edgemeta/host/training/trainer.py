"""The model, the method's variables, the optimizer and the compiled training step under one
distribution strategy (`EpisodicTrainer`), and what it starts from (initial weights, a teacher)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from edgemeta.errors import EdgemetaError
from edgemeta.host.backbones import build_backbone
from edgemeta.host.config import Config
from edgemeta.host.data import EpisodeSampler
from edgemeta.host.data.augment import random_affine, spec_masks
from edgemeta.host.methods import TaskEpisode, get_method
from edgemeta.host.modeldir import MODEL_FILE, load_backbone, load_keras
from edgemeta.host.training.strategy import make_strategy

FLAGS = 3  # what each step carries across a cluster: out of time, interrupted, checkpoint due


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
            self.model = build_backbone(cfg.model.backbone, cfg.preprocess.input_shape)
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
            if tc.masks:
                seed = tf.stack([tf.constant(tc.seed + 1, tf.int64), tf.cast(episode, tf.int64)])
                n = tf.shape(support)[0]
                both = spec_masks(tf.concat([support, query], 0), seed, tc.augment_time_mask, tc.augment_freq_mask)
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
