"""Multi-worker training: real worker processes on 127.0.0.1 (CPU) under MultiWorkerMirroredStrategy.

Tolerance: a two-worker run must give the weights and optimizer state of a one-process run with two
replicas (MirroredStrategy over two logical CPUs) within a relative 1e-5 of each tensor's largest
value. In practice they are bit-identical: the replicas take the same episodes, and an all-reduce of
two values is one commutative addition. Batch-norm running statistics are compared too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgemeta.errors import EdgemetaError
from edgemeta.host.cluster import Cluster, check_port_free, cluster_from_options, cluster_from_tf_config, parse_cluster

pytestmark = pytest.mark.tf  # real worker processes train with TensorFlow

REL_TOL = 1e-5

PROTONET = """
[data]
kind = "folder"
root = "{root}"
fractions = [0.6, 0.2, 0.2]
[train]
way = 5
shot = 1
query = 3
episodes = 40
lr_decay_every = 20
augment_shift = 0.1
[validation]
every = 10
episodes = 20
way = 5
shot = 1
query = 5
"""

MAML = """
[data]
kind = "folder"
root = "{root}"
fractions = [0.6, 0.2, 0.2]
[method]
name = "maml"
inner_steps = 1
test_steps = 2
[train]
way = 5
shot = 1
query = 3
episodes = 32
meta_batch = 4
lr_decay_every = 1000
[validation]
every = 8
episodes = 20
way = 5
shot = 1
query = 5
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def consecutive_free_ports(n: int) -> int:
    """The first of `n` consecutive free ports on 127.0.0.1."""
    for _ in range(50):
        first = free_ports(1)[0]
        if first + n >= 65536:
            continue
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", first + i))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no consecutive free ports")


def worker_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    (tmp / "tmpdir").mkdir(exist_ok=True)
    env.update(TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmp / "tmpdir"))  # the workers' temporary checkpoints go here
    return env


def start_workers(config: Path, outs: list[Path], tmp: Path, *extra: str) -> list[subprocess.Popen]:
    """One `edgemeta train` per worker; worker i writes to outs[i] (only the chief should write anything)."""
    cluster = ",".join(f"127.0.0.1:{p}" for p in free_ports(len(outs)))
    env = worker_env(tmp)
    return [subprocess.Popen([sys.executable, "-m", "edgemeta", "train", "--config", str(config), "--out", str(out),
                              "--quiet", "--cluster", cluster, "--task-index", str(i), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for i, out in enumerate(outs)]


def finish(procs: list[subprocess.Popen], timeout: float = 150) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a worker did not finish in time: " + p.communicate()[1][-3000:])
        results.append((p.returncode, out, err))
    return results


def checkpoint(out: Path) -> dict:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(out / "checkpoints")))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if "OBJECT_GRAPH" not in k}


def assert_same_state(a: Path, b: Path) -> None:
    x, y = checkpoint(a), checkpoint(b)
    assert sorted(x) == sorted(y)
    assert any("moving_mean" in k for k in x) and any("optimizer" in k for k in x)
    for k in x:
        if x[k].dtype.kind == "f":
            scale = max(float(np.max(np.abs(x[k]))), 1e-12)
            assert float(np.max(np.abs(x[k] - y[k]))) <= REL_TOL * scale, k
        else:
            assert np.array_equal(x[k], y[k]), k


def history(out: Path) -> list[dict]:
    return json.loads((out / "checkpoints" / "state.json").read_text())["history"]


@pytest.fixture(scope="module")
def configs(tmp_path_factory, sample_dir):
    root = tmp_path_factory.mktemp("configs")
    paths = {}
    for name, text in (("protonet", PROTONET), ("maml", MAML)):
        paths[name] = root / f"{name}.toml"
        paths[name].write_text(text.format(root=sample_dir))
    return paths


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, configs):
    """Each configuration trained in one process with two replicas (MirroredStrategy, two logical CPUs);
    one process per run (a second MirroredStrategy in one process reuses collective keys)."""
    outs = {name: tmp_path_factory.mktemp(f"one-{name}") for name in configs}
    script = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from dataclasses import replace
from edgemeta.host.config import load_config
from edgemeta.host.training import train
cfg = load_config(sys.argv[1])
train(replace(cfg, train=replace(cfg.train, devices=["/cpu:0", "/cpu:1"])), sys.argv[2], progress=False)
"""
    env = worker_env(tmp_path_factory.mktemp("one"))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(configs[n]), str(outs[n])], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for n in configs]
    for rc, _, err in finish(procs, timeout=300):
        assert rc == 0, err[-3000:]
    return outs


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, configs):
    tmp = tmp_path_factory.mktemp("two")
    outs = [tmp / "chief", tmp / "worker1"]
    results = finish(start_workers(configs["protonet"], outs, tmp))
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    return tmp, outs, results


def test_two_workers_train_to_the_end_like_one_process_with_two_replicas(two_workers, one_process):
    tmp, (chief, worker1), results = two_workers
    assert "worker 0 of 2 (chief" in results[0][1] and "stopped after 40 episodes (episodes)" in results[0][1]
    assert "worker 1 of 2 (worker" in results[1][1] and "the chief wrote the model" in results[1][1]
    # only the chief writes: the other worker's --out is never made, its temporary checkpoints are gone
    assert not worker1.exists() and not list((tmp / "tmpdir").iterdir())
    for name in ("model.keras", "model.json", "history.csv", "curve.png", "config.toml"):
        assert (chief / name).is_file(), name
    assert list((chief / "tensorboard").iterdir())
    training = json.loads((chief / "model.json").read_text())["training"]
    assert training["episodes_per_step"] == 2 and training["episodes_per_s"] > 0
    assert training["placement"]["strategy"] == "MultiWorkerMirroredStrategy"
    assert training["placement"]["workers"] == 2 and training["placement"]["replicas"] == 2
    assert training["placement"]["devices"] == ["/job:worker/replica:0/task:0/device:CPU:0"]
    reference = one_process["protonet"]
    assert_same_state(chief, reference)
    mine, theirs = history(chief), history(reference)
    assert [h["episode"] for h in mine] == [h["episode"] for h in theirs] == [10, 20, 30, 40]
    for a, b in zip(mine, theirs, strict=True):
        assert abs(a["loss"] - b["loss"]) <= REL_TOL * abs(b["loss"]) and a["val_acc"] == pytest.approx(b["val_acc"], abs=1e-9)


def test_a_killed_worker_and_a_restarted_cluster_resume_from_the_last_checkpoint(tmp_path, configs, one_process):
    """MAML (the optimization family; its meta-batch of 4 tasks split 2 + 2 over the workers): kill worker 1
    mid-run; the chief says so in one line and exits; both restarted (with `edgemeta launch`), the run
    resumes from the chief's last checkpoint and ends exactly where an uninterrupted one-process
    two-replica run does."""
    outs = [tmp_path / "chief", tmp_path / "worker1"]
    state = outs[0] / "checkpoints" / "state.json"
    # the first run could go on for ever (the step schedule does not depend on [train] episodes)
    procs = start_workers(configs["maml"], outs, tmp_path, "--episodes", "100000")
    deadline = time.monotonic() + 150
    while not state.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    assert state.exists(), [p.communicate()[1][-2000:] for p in procs]
    procs[1].send_signal(signal.SIGKILL)
    rc, _, err = finish([procs[0]], timeout=120)[0]
    procs[1].wait()
    assert rc == 2, err[-3000:]
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert line and "lost the cluster" in line[0] and "start every worker again" in line[0]
    assert "Traceback" not in err
    kept = history(outs[0])[-1]["episode"]
    assert 8 <= kept < 32

    # restarted with the launcher (both workers on this host, the chief's folder for both)
    proc = subprocess.run([sys.executable, "-m", "edgemeta", "launch", "--hosts", "localhost,localhost",
                           "--port", str(consecutive_free_ports(2)), "--", "--config", str(configs["maml"]),
                           "--out", str(outs[0]), "--quiet"], capture_output=True, text=True, timeout=150,
                          env=worker_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "[w0] worker 0 of 2 (chief, 127.0.0.1:" in proc.stdout and "stopped after 32 episodes (episodes)" in proc.stdout
    assert "[w1] worker 1 of 2 (worker" in proc.stdout
    episodes = [h["episode"] for h in history(outs[0])]
    assert episodes == list(range(8, kept + 1, 8)) + list(range(kept + 8, 33, 8))  # the same sequence, continued
    assert not outs[1].exists()
    assert_same_state(outs[0], one_process["maml"])


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemeta", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--cluster", "127.0.0.1", "--task-index", "0"], {}, "is not host:port"),
    (["--cluster", "a:1,,b:2", "--task-index", "0"], {}, "comma-separated list of host:port"),
    (["--cluster", "127.0.0.1:70000", "--task-index", "0"], {}, "a port from 1 to 65535"),
    (["--cluster", "127.0.0.1:2345,127.0.0.1:2346", "--task-index", "2"], {}, "--task-index 2 is out of range"),
    (["--cluster", "127.0.0.1:2345"], {}, "--cluster needs --task-index"),
    (["--task-index", "1"], {}, "--task-index needs --cluster"),
    ([], {"TF_CONFIG": "{not json"}, "TF_CONFIG is not valid JSON"),
    ([], {"TF_CONFIG": json.dumps({"cluster": {"worker": ["127.0.0.1:2345"]}, "task": {"type": "worker", "index": 3}})},
     "task index 3 is out of range"),
    ([], {"TF_CONFIG": json.dumps({"cluster": {"ps": ["127.0.0.1:2345"]}, "task": {"type": "ps", "index": 0}})},
     "only 'chief' and 'worker' tasks"),
])
def test_bad_cluster_input_is_one_line_and_exit_2(configs, tmp_path, args, env, message):
    proc = run_cli("train", "--config", str(configs["protonet"]), "--out", str(tmp_path / "out"), *args, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_port_in_use_is_one_line_and_exit_2(configs, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("train", "--config", str(configs["protonet"]), "--out", str(tmp_path / "out"),
                       "--cluster", f"127.0.0.1:{port},127.0.0.1:{free_ports(1)[0]}", "--task-index", "0")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} of this worker" in lines[0] and "is in use" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_launch_plans_addresses_and_refuses_its_own_options():
    from edgemeta.host.cluster import launch, plan_cluster

    assert plan_cluster(["localhost", "127.0.0.1", "me@gpu2", "gpu3", "gpu2"], 23456) == [
        "127.0.0.1:23456", "127.0.0.1:23457", "gpu2:23456", "gpu3:23456", "gpu2:23457"]
    for hosts in (["-oProxyCommand=x"], ["a b"], []):
        with pytest.raises(EdgemetaError):
            plan_cluster(hosts, 23456)
    with pytest.raises(EdgemetaError, match="writes --cluster and --task-index itself"):
        launch(["localhost"], 23456, ["--config", "c.toml", "--task-index", "0"])


def test_cluster_parsing():
    env: dict = {}
    c = cluster_from_options("127.0.0.1:23456, [::1]:23457", 1, env)
    assert c == Cluster({"worker": ["127.0.0.1:23456", "[::1]:23457"]}, "worker", 1)
    assert not c.is_chief and c.rank == 1 and c.num_workers == 2
    assert cluster_from_tf_config(env["TF_CONFIG"]) == c  # what --cluster writes is what TensorFlow reads
    assert cluster_from_options(None, None, {}) is None
    chief = cluster_from_tf_config(json.dumps({"cluster": {"chief": ["h0:1"], "worker": ["h1:1", "h2:1"]},
                                               "task": {"type": "worker", "index": 0}}))
    assert not chief.is_chief and chief.rank == 1 and chief.workers == ["h0:1", "h1:1", "h2:1"]
    for bad in ("a:1,a:1", "host:port", ":1", "a b:1"):
        with pytest.raises(EdgemetaError):
            parse_cluster(bad)
    with socket.socket() as s:  # a free port passes, even one left in TIME_WAIT by a stopped worker
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check_port_free(Cluster({"worker": [f"127.0.0.1:{port}"]}, "worker", 0))
