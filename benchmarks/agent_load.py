"""The board agent under load: clients mixing classify and enroll over its Unix socket and loopback TCP.

    python -m benchmarks.agent_load [--seconds 60] [--clients 16] [--model models/omniglot-conv4]

Starts a real agent (`edgemeta serve --socket ... --tcp 127.0.0.1:PORT`) on the shipped model with
a fresh store, enrolls every character of samples/omniglot once, then runs CLIENTS client threads
for SECONDS, each on its own persistent connection (even ones on the Unix socket, odd ones on TCP),
each request a classify of 1-5 drawings (80 %) or an enroll of 1-2 drawings (20 %). Prints the
requests served, the errors (the goal is none), p50/p99 latency per operation, and the agent's
resident memory sampled every second (flat, or growing?).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1]) / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slope(samples: list[tuple[float, float]]) -> float | None:
    """MB per minute of a least-squares line through (seconds, MB) samples."""
    if len(samples) < 3:
        return None
    t, m = np.array(samples).T
    return round(60 * float(np.polyfit(t, m, 1)[0]), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="How long the clients run.")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default=str(REPO / "models" / "omniglot-conv4"))
    ap.add_argument("--samples", default=str(REPO / "samples" / "omniglot"))
    ap.add_argument("--json", action="store_true", help="Also print the figures as JSON.")
    args = ap.parse_args()

    from edgemeta.errors import EdgemetaError
    from edgemeta.remote import connect

    chars = {d.name: sorted(d.glob("*.png")) for d in sorted(Path(args.samples).iterdir()) if d.is_dir()}
    data = {c: [p.read_bytes() for p in files] for c, files in chars.items()}
    tmp = Path(tempfile.mkdtemp(prefix="agent_load_"))
    sock, port = tmp / "agent.sock", free_port()
    vias = [f"unix:{sock}", f"tcp:127.0.0.1:{port}"]
    env = {k: v for k, v in os.environ.items() if k != "EDGEMETA_TOKEN"}
    log = open(tmp / "agent.log", "w+")  # noqa: SIM115 - read back at the end
    agent = subprocess.Popen([sys.executable, "-m", "edgemeta", "serve", "--model", args.model, "--store", str(tmp / "store"),
                              "--socket", str(sock), "--tcp", f"127.0.0.1:{port}"], stderr=log, env=env)
    try:
        deadline = time.monotonic() + 60
        while "serving" not in (tmp / "agent.log").read_text():  # its one line once it listens
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the agent did not start: {(tmp / 'agent.log').read_text()}")
            time.sleep(0.1)
        setup = connect(vias[0])
        for c, blobs in data.items():
            setup.request("enroll", {"label": c}, blobs[:1])
        setup.close()

        stop = threading.Event()
        lat: dict[str, list[float]] = {"classify": [], "enroll": []}
        served: Counter = Counter()
        errors: Counter = Counter()
        lock = threading.Lock()

        def client(i: int) -> None:
            rng = random.Random(i)
            via = vias[i % 2]
            conn = None
            while not stop.is_set():
                c = rng.choice(list(data))
                op = "classify" if rng.random() < 0.8 else "enroll"
                blobs = rng.sample(data[c], rng.randint(1, 5) if op == "classify" else rng.randint(1, 2))
                # the same drawings again: duplicates allowed, so each enroll writes the store as a new one would
                reqargs = {"top_k": 3} if op == "classify" else {"label": c, "allow_duplicates": True}
                t = time.perf_counter()
                try:
                    conn = conn or connect(via)
                    conn.request(op, reqargs, blobs)
                except (EdgemetaError, OSError) as e:
                    with lock:
                        errors[f"{op} via {via.split(':')[0]}: {str(e)[:120]}"] += 1
                    if conn:
                        conn.close()
                    conn = None
                    continue
                dt = time.perf_counter() - t
                with lock:
                    lat[op].append(dt)
                    served[(op, via.split(":")[0])] += 1
            if conn:
                conn.close()

        memory = [(0.0, rss_mb(agent.pid))]
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while (elapsed := time.monotonic() - t0) < args.seconds:
            time.sleep(min(1.0, args.seconds - elapsed))
            memory.append((time.monotonic() - t0, rss_mb(agent.pid)))
        stop.set()
        for t in threads:
            t.join(30)
        wall = time.monotonic() - t0
        status = connect(vias[0]).request("status", {})
    finally:
        agent.terminate()
        agent.wait(30)
    log.seek(0)
    agent_log = log.read().strip().splitlines()
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)

    total = sum(served.values())
    every = sorted(lat["classify"] + lat["enroll"])
    figures = {
        "seconds": round(wall, 1), "clients": args.clients, "requests": total, "per_second": round(total / wall, 1),
        "served": {f"{op} via {via}": n for (op, via), n in sorted(served.items())},
        "errors": sum(errors.values()), "error_kinds": dict(errors),
        "latency_ms": {name: {"p50": round(1000 * float(np.percentile(v, 50)), 1), "p99": round(1000 * float(np.percentile(v, 99)), 1)}
                       for name, v in (("all", every), *lat.items()) if v},
        "rss_mb": {"start": round(memory[0][1], 1), "end": round(memory[-1][1], 1),
                   "min": round(min(m for _, m in memory), 1), "max": round(max(m for _, m in memory), 1),
                   "second_half_slope_mb_per_min": slope(memory[len(memory) // 2:])},
        "store_classes": status["classes"], "agent_requests": status["requests"],
        "agent_log_lines": len(agent_log), "agent_exit": agent.returncode,
    }
    print(f"{args.clients} clients for {wall:.0f} s: {total} requests served ({figures['per_second']}/s), "
          f"{figures['errors']} errors")
    for k, n in figures["served"].items():
        print(f"  {k:20s} {n}")
    for name, q in figures["latency_ms"].items():
        print(f"  latency {name:9s} p50 {q['p50']:7.1f} ms   p99 {q['p99']:7.1f} ms")
    for kind, n in errors.most_common(5):
        print(f"  error x{n}: {kind}")
    step = max(1, len(memory) // 10)
    print("agent RSS (MB) over time: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in memory[::step] + memory[-1:]))
    print(f"  min {figures['rss_mb']['min']}, max {figures['rss_mb']['max']}, second-half slope "
          f"{figures['rss_mb']['second_half_slope_mb_per_min']} MB/min")
    print(f"agent log: {len(agent_log)} line(s), exit {agent.returncode}: " + " | ".join(agent_log[:3]))
    if args.json:
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
