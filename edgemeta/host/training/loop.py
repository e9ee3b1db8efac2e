"""`train()`: one run of episodic meta-training into a model folder, as steps of a `_Run`: set up,
restore (checkpoint, initial weights), announce, the training steps with their validations and
checkpoints, and the summary (the package's docstring says what a run promises)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from edgemeta.errors import EdgemetaError
from edgemeta.host.config import Config, training_data
from edgemeta.host.data import EpisodeSampler
from edgemeta.host.evaluate import episode_accuracies, episode_inputs
from edgemeta.host.model_eval import keras_embedder
from edgemeta.host.modeldir import SPLITS_FILE, read_splits, write_json
from edgemeta.host.training.prefetch import EpisodePrefetcher
from edgemeta.host.training.progress import _Progress, first_validation_note, now
from edgemeta.host.training.rundir import (
    TrainResult,
    check_same_split,
    model_note,
    save_model,
    split_record,
    write_config,
    write_summary,
)
from edgemeta.host.training.strategy import device_summary, make_strategy
from edgemeta.host.training.trainer import EpisodicTrainer, _load_initial_weights
from edgemeta.stats import mean_ci95

STATE_FILE = "checkpoints/state.json"
STOP_REASONS = ("", "time budget", "interrupted", "no improvement")  # agreed across a cluster by index


def train(cfg: Config, out: str | Path, progress: bool = True, fresh: bool = False, prepared: tuple | None = None,
          cluster=None) -> TrainResult:
    """Meta-train as configured into the folder `out` (resuming from its checkpoint unless `fresh`);
    `prepared`: what `training_data(cfg)` returned, when the caller has loaded the data already;
    `cluster`: this process's place in a multi-worker cluster (`edgemeta.host.cluster.Cluster`, whose
    TF_CONFIG is set), else a single-host run.

    ``[train] max_minutes`` is this call's budget, counted from here (a resumed run gets it anew; the
    validation and saving when it ends come on top); a budget that ends before one training step is
    over is an error, with nothing written. Nothing is written before the first step has shown that."""
    begun = now()
    cfg, splits, train_split, notes = prepared or training_data(cfg)
    if not prepared:
        for note in notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
    run = _Run(cfg, Path(out), splits, train_split, fresh, cluster, begun)
    run.restore()
    run.bar = _Progress(cfg.train.episodes, progress and run.chief, run.done, budget_s=run.budget_s, begun=begun)
    if progress:
        run.announce()
    run.train_steps()
    return run.finish()


class _Run:
    """One call of `train`: the trainer, the folder it writes, the state recorded in state.json, and
    the counters of the steps between validations."""

    def __init__(self, cfg: Config, out: Path, splits: dict, train_split, fresh: bool, cluster, begun: float):
        tc, vc = cfg.train, cfg.validation
        self.cfg, self.out, self.splits, self.train_split, self.fresh, self.cluster = cfg, out, splits, train_split, fresh, cluster
        self.begun, self.chief = begun, cluster is None or cluster.is_chief
        # a cluster's strategy first: it configures TensorFlow's runtime, which nothing may have started
        strategy = make_strategy(tc.devices, cluster) if cluster is not None else None
        self.sizes = {"classes": {"train": train_split.num_classes, "val": splits["val"].num_classes},
                      "images": {"train": len(train_split.images), "val": len(splits["val"].images)}}
        sampler = EpisodeSampler(train_split, tc.way, tc.shot, tc.query, seed=tc.seed)
        self.val_sampler = EpisodeSampler(splits["val"], vc.way, vc.shot, vc.query, seed=vc.seed)
        tf.keras.utils.set_random_seed(tc.seed)
        self.trainer = trainer = EpisodicTrainer(cfg, sampler, strategy)
        self.model, self.method, self.replicas = trainer.model, trainer.method, trainer.episodes_per_step
        self.placement = device_summary(trainer.strategy, cluster)
        self.ckpt = trainer.checkpoint()
        self.ckpt_dir, self.state_path = out / "checkpoints", out / STATE_FILE
        self.record = split_record(cfg, splits) if self.chief else None
        self.state: dict = {"history": [], "best_val_acc": -1.0, "best_val_ci95": 0.0, "best_episode": 0, "elapsed_s": 0.0}
        self.folder: dict = {}  # the chief's checkpoint manager and TensorBoard writer, once open_folder made them
        self.budget_s, self.every_s = 60 * tc.max_minutes, 60 * tc.checkpoint_minutes
        self.bar: _Progress | None = None
        self.stopped_by, self.together = "episodes", cluster is not None  # together: the workers can leave together
        self.step_s, self.step_episodes = 0.0, 0  # training steps only (not the first, which compiles, nor validation)

    # ---- before the first step ----------------------------------------------------------------
    def restore(self) -> None:
        """The chief's checkpoint (else its initial weights), given to every worker; the episode to go on from."""
        tc, out, trainer = self.cfg.train, self.out, self.trainer
        ckpt_dir = self.ckpt_dir
        latest = tf.train.latest_checkpoint(str(ckpt_dir)) if self.chief and not self.fresh and ckpt_dir.is_dir() else None
        if latest:
            if self.record is not None:
                check_same_split(read_splits(out), self.record, out)
            self.ckpt.restore(latest).assert_existing_objects_matched()
            if self.state_path.exists():
                self.state = json.loads(self.state_path.read_text())
        if self.chief and trainer.episodes_done == 0 and tc.init_from:  # a resumed run has its weights from the checkpoint
            _load_initial_weights(self.model, tc.init_from)
        trainer.sync_from_chief()  # the other workers take the chief's restored (or initial) state
        self.done = done = trainer.episodes_done
        state = self.state
        # a run killed between the checkpoint's write and state.json's has validations recorded beyond its checkpoint
        state["history"] = [h for h in state["history"] if h["episode"] <= done]
        # a checkpoint by time keeps the losses since the last validation, so the next history row is the same as
        # in a run never stopped (only when state.json and the checkpoint are of the same step)
        pending = state.pop("pending", None)
        if state.get("checkpoint", {}).get("episode") != done:
            pending = None
        self.losses, self.accs = (list(pending["losses"]), list(pending["accs"])) if pending else ([], [])
        self.embed = keras_embedder(self.model)

    def announce(self) -> None:
        cfg, tc, vc, done, placement = self.cfg, self.cfg.train, self.cfg.validation, self.done, self.placement
        split, val = self.train_split, self.splits["val"]
        source = f"Omniglot {cfg.data.split}" if cfg.data.kind == "omniglot" else f"folder {cfg.data.root}"
        where = f"{self.cluster.describe()}: " if self.cluster is not None else ""
        print(f"{where}training {cfg.method.name} {cfg.model.backbone} on {source}: {split.num_classes} {split.name} "
              f"classes ({len(split.images)} images), {val.num_classes} val classes; episodes {done} to "
              f"{tc.episodes} of {tc.way}-way {tc.shot}-shot {tc.query}-query"
              + (f" (resumed from the checkpoint at episode {done})" if done else "")
              + (f", at most {tc.max_minutes:g} min (this run)" if tc.max_minutes else "")
              + f"; validation and a checkpoint every {vc.every} episodes ({vc.episodes} {vc.way}-way {vc.shot}-shot)"
              + (f", a checkpoint at least every {tc.checkpoint_minutes:g} min" if self.every_s else "")
              + "; the time left shows once episodes run", file=sys.stderr, flush=True)
        print(f"{where}{placement['strategy']}, {placement['replicas']} replica(s), {self.replicas} episode(s) per step "
              f"({self.trainer.meta_batch} per replica); this process on {', '.join(placement['devices'])}"
              + (f"; GPUs: {', '.join(placement['gpus'])}" if placement["gpus"] else "; no GPU"), file=sys.stderr, flush=True)

    # ---- writing --------------------------------------------------------------------------------
    def open_folder(self) -> None:
        """The run's first write (the chief's only): not before the run has trained within its budget, so
        that a refused run leaves the folder as it was. The other workers write nothing here."""
        if self.folder or not self.chief:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if self.fresh:
            for f in self.ckpt_dir.iterdir():
                f.unlink()
        self.folder["manager"] = tf.train.CheckpointManager(self.ckpt, self.ckpt_dir, max_to_keep=2)
        self.folder["writer"] = tf.summary.create_file_writer(str(self.out / "tensorboard"))
        write_config(self.cfg, self.out / "config.toml")
        if self.record is not None:
            write_json(self.out / SPLITS_FILE, self.record)

    def save_checkpoint(self, why: str) -> None:
        if self.chief:
            self.open_folder()
            self.folder["manager"].save(checkpoint_number=self.done)
            self.state["checkpoint"] = {"episode": self.done, "why": why, "elapsed_s": round(self.state["elapsed_s"], 1)}
            write_json(self.state_path, self.state)
            return
        # every worker saves (a save may read distributed variables); the others to a place they delete
        tmp = tempfile.mkdtemp(prefix=f"edgemeta-worker{self.cluster.rank}-")
        try:
            tf.train.CheckpointManager(self.ckpt, tmp, max_to_keep=1).save(checkpoint_number=self.done)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_summary(self, result: TrainResult) -> None:
        write_summary(self.cfg, self.out, self.model, self.method, result, self.state["history"], self.replicas, self.sizes,
                      self.placement, _rate(self.step_episodes, self.step_s))

    # ---- the training steps -----------------------------------------------------------------------
    def train_steps(self) -> None:
        """Step until the episodes, the budget, an interruption or the patience end the run; a checkpoint
        at each validation and by time. Ctrl-C keeps the last checkpoint; a lost worker is an error."""
        self.interrupted: list[str] = []
        old_handlers = self._catch_signals()
        prefetch = EpisodePrefetcher(self.trainer.prepare, self.done, self.replicas)
        self.last_val = "-" if self.state["best_val_acc"] < 0 else f"{100 * self.state['best_val_acc']:.2f}%"
        self.started, self.elapsed0 = now(), self.state["elapsed_s"]
        self.since_best, self.steps = 0, 0
        self.last_checkpoint, self.wrote, self.told = self.begun, False, not self.budget_s  # told: the note is decided
        try:
            while self.done < self.cfg.train.episodes:
                if self._step(*prefetch.next()):
                    break
        except KeyboardInterrupt:
            self.stopped_by, self.together = "interrupted", False
            print("\ninterrupted: the last checkpoint is kept; run the same command again to resume", file=sys.stderr)
        except tf.errors.OpError as e:
            if self.cluster is None:
                raise
            raise EdgemetaError(f"[train] {self.cluster.describe()} lost the cluster at episode {self.done} ({_lost_peer(e)}); "
                                "the chief's last checkpoint is kept: start every worker again with the same command to "
                                "resume") from None
        finally:
            prefetch.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)

    def _catch_signals(self) -> dict:
        """SIGTERM (and in a cluster SIGINT) stop the run at the next step; the handlers they replace."""
        interrupted = self.interrupted
        old = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: interrupted.append("SIGTERM"))}
        if self.cluster is not None:  # Ctrl-C in one worker stops the whole cluster at the next step; a second one at once
            def on_sigint(*_):
                if interrupted:
                    raise KeyboardInterrupt
                interrupted.append("SIGINT")
            old[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
        return old

    def _step(self, first: int, arrays) -> bool:
        """One training step and what follows it (a validation, a checkpoint by time); True ends the run."""
        tc, vc, budget_s = self.cfg.train, self.cfg.validation, self.budget_s
        t0 = now()
        out_of_time = budget_s > 0 and t0 - self.begun >= budget_s
        due = self.every_s > 0 and t0 - self.last_checkpoint >= self.every_s
        loss, acc, flags = self.trainer.step_flags(first, arrays, (out_of_time, bool(self.interrupted), due))
        if self.steps:  # not the run's first step: that one traces and compiles
            self.step_s += now() - t0
            self.step_episodes += self.replicas
        self.steps += 1
        if flags[0] and self.steps <= 2 and not self.wrote:  # the budget was over before one step of this run was
            raise EdgemetaError(
                f"[train] max_minutes = {tc.max_minutes:g} ({budget_s:.3g} s) is shorter than one training step: this "
                f"run's set-up{' and first step (compiling included)' if self.steps == 2 else ''} took {t0 - self.begun:.1f} s; "
                "give a budget longer than "
                f"that (e.g. {math.ceil((t0 - self.begun) / 60) + 1} min), or 0 for no limit; nothing was written")
        self.done += self.replicas
        self.losses.append(loss)
        self.accs.append(acc)
        elapsed = self.elapsed0 + now() - self.started
        self.bar.update(self.done, np.mean(self.losses[-50:]), np.mean(self.accs[-50:]), self.last_val)
        self._note_first_validation()
        if self.done % vc.every < self.replicas or self.done >= tc.episodes or bool(flags[0] or flags[1]):
            return self._validation(flags, elapsed)
        if flags[2]:  # a checkpoint by time (every worker at the same step: the flag is the cluster's)
            self.wrote = True
            self.state.update(elapsed_s=elapsed, pending={"losses": self.losses, "accs": self.accs})
            self.save_checkpoint("time")
            self.last_checkpoint = now()
        return False

    def _note_first_validation(self) -> None:
        """Once the rate is measured, the note when the budget ends before the next validation comes."""
        step_s, steps = self.step_s, self.steps
        if self.told or not self.chief or step_s <= 0 or not (step_s >= 5.0 or (steps > 3 and step_s >= 1.0) or steps > 100):
            return
        self.told = True
        vc = self.cfg.validation
        note = first_validation_note(self.done, self.step_episodes / step_s, self.budget_s - (now() - self.begun), vc.every,
                                     self.cfg.train.episodes, self.state["best_val_acc"] >= 0)
        if note:
            print(("\n" if self.bar.enabled and self.bar.tty else "") + f"note: {note}", file=sys.stderr, flush=True)

    def _validation(self, flags: tuple, elapsed: float) -> bool:
        """Validate (the chief), keep the best model, agree on stopping across the cluster and checkpoint;
        True ends the run."""
        self.wrote = True
        state, done = self.state, self.done
        reason = 1 if flags[0] else 2 if flags[1] else 0
        if self.chief:
            self.open_folder()
            out_of_patience = self._validate_and_keep(elapsed)
            reason = reason or (3 if out_of_patience else 0)
        self.losses, self.accs = [], []
        state["elapsed_s"] = elapsed
        state.pop("pending", None)
        # the chief's decision and best result, for every worker (a barrier while the chief validates)
        reason, best, best_ci, best_episode = (float(x) for x in self.trainer.from_chief(
            [tf.constant([reason, state["best_val_acc"], state["best_val_ci95"], state["best_episode"]], tf.float64)])[0])
        if not self.chief:
            state.update(best_val_acc=best, best_val_ci95=best_ci, best_episode=int(best_episode))
        self.save_checkpoint("validation")
        self.last_checkpoint = now()
        if self.chief:
            # the folder is a usable model folder while a long run goes on (eval, export)
            self.write_summary(TrainResult(done, state["best_val_acc"], state["best_val_ci95"], state["best_episode"],
                                           elapsed, "still running"))
        if reason:
            self.stopped_by = STOP_REASONS[int(reason)]
            return True
        return False

    def _validate_and_keep(self, elapsed: float) -> bool:
        """The chief's validation: a history row, TensorBoard, the model saved when it is the best; True when
        the patience has run out."""
        tc, vc, state, done = self.cfg.train, self.cfg.validation, self.state, self.done
        classify, inputs, support = episode_inputs(self.method, self.embed, self.splits["val"])
        val_acc, val_ci = mean_ci95(episode_accuracies(classify, inputs, self.val_sampler, vc.episodes,
                                                       support_embeddings=support))
        row = {"episode": done, "loss": float(np.mean(self.losses)), "train_acc": float(np.mean(self.accs)),
               "val_acc": val_acc, "val_ci95": val_ci, "learning_rate": self.trainer.learning_rate,
               "elapsed_s": round(elapsed, 1)}
        state["history"].append(row)
        with self.folder["writer"].as_default(step=done):
            for k in ("loss", "train_acc", "val_acc", "learning_rate"):
                tf.summary.scalar(k, row[k])
        if val_acc > state["best_val_acc"] or tc.classes == "trainval":
            state.update(best_val_acc=val_acc, best_val_ci95=val_ci, best_episode=done)
            save_model(self.model, self.method, self.out)
            self.since_best = 0
        else:
            self.since_best += 1
        self.last_val = f"{100 * val_acc:.2f}%"
        self.bar.update(done, row["loss"], row["train_acc"], self.last_val, force_line=True)
        return bool(vc.patience and self.since_best >= vc.patience)

    # ---- after the last step --------------------------------------------------------------------
    def finish(self) -> TrainResult:
        tc, state = self.cfg.train, self.state
        result = TrainResult(self.done, state["best_val_acc"], state["best_val_ci95"], state["best_episode"],
                             state["elapsed_s"], self.stopped_by, self.chief,
                             model_note(self.out, state, self.stopped_by, self.cfg.validation.every, tc.episodes, tc.classes,
                                        self.replicas) if self.chief else "")
        if self.chief and state["best_val_acc"] >= 0:
            self.write_summary(result)
        if self.together:
            self.trainer.from_chief([tf.constant(0)])  # the workers leave together, once the chief has written its summary
        return result


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
