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

    loop.py      train(): one run, step by step
    trainer.py   EpisodicTrainer: the model, the method, the optimizer and the compiled step
    strategy.py  the distribution strategy and its description
    prefetch.py  the coming steps' episodes, drawn on a thread
    progress.py  the progress line, the time left, the note on the first validation (and the clock)
    rundir.py    what a run writes into its folder
"""

from edgemeta.host.training.loop import train
from edgemeta.host.training.rundir import TrainResult, machine_description
from edgemeta.host.training.strategy import device_summary, make_strategy
from edgemeta.host.training.trainer import EpisodicTrainer

__all__ = ["EpisodicTrainer", "TrainResult", "device_summary", "machine_description", "make_strategy", "train"]
