"""Where training runs: the `tf.distribute` strategy, and its description for the run summary."""

from __future__ import annotations

import tensorflow as tf

from edgemeta.errors import EdgemetaError


def make_strategy(devices: list[str], cluster=None):
    """MultiWorkerMirroredStrategy for a cluster (TF_CONFIG, written by `edgemeta.host.cluster`), else
    MirroredStrategy over the given devices (or all GPUs when there are several), else one device.

    A cluster's strategy must be made before anything else starts TensorFlow's runtime."""
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
