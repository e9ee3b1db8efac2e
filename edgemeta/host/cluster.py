"""A training cluster: which workers take part and which one this process is.

`edgemeta train` runs as one worker of a `tf.distribute.MultiWorkerMirroredStrategy` cluster when
``TF_CONFIG`` is set or ``--cluster host:port,host:port --task-index i`` is given (which writes
``TF_CONFIG`` for TensorFlow). Everything here is checked before TensorFlow loads, so a malformed
cluster, an index out of range or a port already in use is one line, not a traceback.

    >>> c = cluster_from_options("127.0.0.1:23456,127.0.0.1:23457", 1)
    >>> c.num_workers, c.is_chief, c.address
    (2, False, '127.0.0.1:23457')
"""

from __future__ import annotations

import errno
import json
import os
import socket
from dataclasses import dataclass

from edgemeta.errors import EdgemetaError

JOBS = ("chief", "worker")  # the task types MultiWorkerMirroredStrategy trains with


@dataclass(frozen=True)
class Cluster:
    """The cluster's jobs ({"worker": [addresses]}, optionally with a one-entry "chief") and this task."""

    jobs: dict
    task_type: str
    task_index: int

    @property
    def workers(self) -> list[str]:
        """Every training task in the order of their place in the cluster (the chief first)."""
        return [*self.jobs.get("chief", []), *self.jobs.get("worker", [])]

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def is_chief(self) -> bool:
        """TensorFlow's rule: the "chief" task if there is one, else worker 0."""
        return self.task_type == "chief" or ("chief" not in self.jobs and self.task_index == 0)

    @property
    def address(self) -> str:
        return self.jobs[self.task_type][self.task_index]

    @property
    def rank(self) -> int:
        """This task's place among `workers`."""
        return self.workers.index(self.address)

    def tf_config(self) -> str:
        return json.dumps({"cluster": self.jobs, "task": {"type": self.task_type, "index": self.task_index}})

    def describe(self) -> str:
        role = "chief" if self.is_chief else "worker"
        return f"worker {self.rank} of {self.num_workers} ({role}, {self.address})"


def parse_address(text: str, where: str) -> tuple[str, int]:
    """host:port (IPv6 as [addr]:port) -> (host, port), or a one-line error naming `where`."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise EdgemetaError(f"{where}: {text.strip()!r} is not host:port (e.g. 10.0.0.2:23456, a port from 1 to 65535)")
    return host, int(port)


def parse_cluster(spec: str) -> list[str]:
    """--cluster's comma-separated host:port list, checked."""
    where = "--cluster"
    entries = [e.strip() for e in spec.split(",")]
    if not spec.strip() or any(not e for e in entries):
        raise EdgemetaError(f"{where} must be a comma-separated list of host:port, one per worker "
                            f"(e.g. 10.0.0.1:23456,10.0.0.2:23456), got {spec!r}")
    for e in entries:
        parse_address(e, where)
    dupes = sorted({e for e in entries if entries.count(e) > 1})
    if dupes:
        raise EdgemetaError(f"{where} names {dupes[0]} twice: each worker needs its own host:port")
    return entries


def cluster_from_options(spec: str | None, task_index: int | None, environ=None) -> Cluster | None:
    """The cluster from --cluster/--task-index (which then replace TF_CONFIG in `environ`), else from
    TF_CONFIG, else None (a single-host run)."""
    environ = os.environ if environ is None else environ
    if spec is None and task_index is not None:
        raise EdgemetaError("--task-index needs --cluster (the host:port of every worker)")
    if spec is not None:
        workers = parse_cluster(spec)
        if task_index is None:
            raise EdgemetaError("--cluster needs --task-index: this worker's place in the list, from 0 (the chief)")
        if not 0 <= task_index < len(workers):
            raise EdgemetaError(f"--task-index {task_index} is out of range: --cluster lists {len(workers)} worker(s), "
                                f"so it must be 0 to {len(workers) - 1}")
        cluster = Cluster({"worker": workers}, "worker", task_index)
        environ["TF_CONFIG"] = cluster.tf_config()
        return cluster
    raw = environ.get("TF_CONFIG", "").strip()
    return cluster_from_tf_config(raw) if raw else None


def cluster_from_tf_config(raw: str) -> Cluster:
    """A TF_CONFIG value ({"cluster": {"worker": [...]}, "task": {"type": "worker", "index": 0}}), checked."""
    where = "TF_CONFIG"
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError as e:
        raise EdgemetaError(f"{where} is not valid JSON ({e.msg} at character {e.pos}); unset it or give "
                            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}') from None
    if not isinstance(conf, dict) or not isinstance(conf.get("cluster"), dict) or not isinstance(conf.get("task"), dict):
        raise EdgemetaError(f'{where} needs a "cluster" object and a "task" object, e.g. '
                            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}')
    jobs, task = conf["cluster"], conf["task"]
    other = sorted(set(jobs) - set(JOBS))
    if other:
        raise EdgemetaError(f"{where}: edgemeta trains with MultiWorkerMirroredStrategy, whose cluster has only "
                            f"'chief' and 'worker' tasks, not {other[0]!r}")
    for job, addresses in jobs.items():
        if not isinstance(addresses, list) or not addresses or not all(isinstance(a, str) for a in addresses):
            raise EdgemetaError(f'{where}: cluster "{job}" must be a non-empty list of "host:port" strings')
        for a in addresses:
            parse_address(a, f"{where} cluster {job}")
    if len(jobs.get("chief", [])) > 1:
        raise EdgemetaError(f"{where}: a cluster has at most one chief")
    if "worker" not in jobs and "chief" not in jobs:
        raise EdgemetaError(f'{where}: the cluster lists no "worker" tasks')
    everyone = [a for addresses in jobs.values() for a in addresses]
    dupes = sorted({a for a in everyone if everyone.count(a) > 1})
    if dupes:
        raise EdgemetaError(f"{where} names {dupes[0]} twice: each worker needs its own host:port")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in jobs:
        raise EdgemetaError(f"{where}: task type {kind!r} is not one of the cluster's jobs ({', '.join(jobs)})")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(jobs[kind]):
        raise EdgemetaError(f"{where}: task index {index!r} is out of range: the cluster has {len(jobs[kind])} "
                            f"{kind} task(s), so it must be 0 to {len(jobs[kind]) - 1}")
    return Cluster({job: list(jobs[job]) for job in JOBS if job in jobs}, kind, index)


def check_port_free(cluster: Cluster) -> None:
    """Refuse to start when this worker's own port is taken (TensorFlow would abort in C++ on it).

    Binds to the port on every address with SO_REUSEADDR, as the gRPC server does, so a port left in
    TIME_WAIT by a worker that was just stopped is not mistaken for one in use."""
    host, port = parse_address(cluster.address, "this worker's address")
    for family, addr in ((socket.AF_INET, ("0.0.0.0", port)), (socket.AF_INET6, ("::", port))):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 here
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise EdgemetaError(f"port {port} of this worker ({cluster.describe()}) is in use by another program; "
                                    "stop it or give this worker another port in --cluster / TF_CONFIG") from None
        finally:
            s.close()


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def plan_cluster(hosts: list[str], port: int) -> list[str]:
    """Every worker's host:port for `hosts` (ssh destinations, [user@]host, or localhost): local workers on
    127.0.0.1 with consecutive ports from `port`, a remote one at its host name and `port` (plus its rank
    among the workers on that host)."""
    if not hosts:
        raise EdgemetaError("--hosts must name at least one host (localhost or an ssh destination)")
    if not 0 < port < 65536 - len(hosts):
        raise EdgemetaError(f"--port must leave room for {len(hosts)} consecutive ports below 65536, got {port}")
    seen: dict[str, int] = {}
    out = []
    for h in hosts:
        name = h.rpartition("@")[2]
        if not name or any(c.isspace() for c in h) or h.startswith("-"):
            raise EdgemetaError(f"--hosts: {h!r} is not localhost or an ssh destination ([user@]host)")
        key = "127.0.0.1" if name in LOCAL_HOSTS else name
        n = seen.get(key, 0)
        seen[key] = n + 1
        out.append(f"{'[::1]' if name == '::1' else key}:{port + n}")
    return out


def launch(hosts: list[str], port: int, train_args: list[str], remote_dir: str = "", remote_edgemeta: str = "edgemeta",
           log=print) -> int:
    """Start `edgemeta train TRAIN_ARGS --cluster ... --task-index i` on every host (locally, or with plain
    ssh), print their output prefixed with the worker's index, and return the worst exit status.

    A worker that fails is reported at once; the others stop by themselves when they lose the cluster."""
    import shlex
    import subprocess
    import sys
    import threading

    for a in train_args:
        if a in ("--cluster", "--task-index") or a.startswith(("--cluster=", "--task-index=")):
            raise EdgemetaError("launch writes --cluster and --task-index itself; leave them out of the train options")
    addresses = plan_cluster(hosts, port)
    spec = ",".join(addresses)
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    procs = []
    for i, host in enumerate(hosts):
        args = ["train", *train_args, "--cluster", spec, "--task-index", str(i)]
        if host.rpartition("@")[2] in LOCAL_HOSTS:
            cmd = [sys.executable, "-m", "edgemeta", *args]
        else:  # the remote shell gets one quoted command line; host keys are checked as ssh always does
            from edgemeta.sshcmd import ssh_argv

            remote = " ".join(shlex.quote(x) for x in [remote_edgemeta, *args])
            if remote_dir:
                remote = f"cd {shlex.quote(remote_dir)} && {remote}"
            cmd = ssh_argv(host, remote)  # the one ssh command line: BatchMode, ConnectTimeout, keep-alive probes
        log(f"[w{i}] {host}: {addresses[i]}")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))

    def relay(i: int, stream) -> None:
        for line in stream:
            log(f"[w{i}] {line.rstrip()}")

    threads = [threading.Thread(target=relay, args=(i, p.stdout), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join(timeout=5)
    for i, c in enumerate(codes):
        if c:
            log(f"[w{i}] exited with status {c}")
    return max(codes)
