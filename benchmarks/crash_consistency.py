"""Crash consistency: SIGKILL real edgemeta processes while they change a store or a board's release.

    flock /tmp/edgemeta-bench.lock .venv/bin/python -m benchmarks.crash_consistency --kills 400 [--seed 12] [--json]

Store writers: `edgemeta enroll` (into an existing store and, the first write, into a new empty
folder), `forget`, `rename`, `reenroll` (between the two shipped Omniglot models), run as real
processes, and the same operations sent to a real agent (`edgemeta serve --socket`). Half of the
kills come at a random moment of the operation; the other half are timed to land inside the store's
write: the process runs under KILL_IN_WRITE, which SIGKILLs it after K bytes of the temporary file
(K random), after the whole file but before the rename, or after the rename but before the answer.

After each kill: the store loads (in a new agent too), it holds every acknowledged change (the CLI
returned 0, the agent answered ok) and nothing else than the killed operation's change or its absence,
a next enroll works, and after it the folder holds only the store and its lock (no temporary file).

Board releases: `board_ops.py activate` and `rollback` between two complete releases on a board root
in a temporary folder, killed at random moments or before/after each of the calls that change the
board (symlink, rename, fsync). After each kill `current` is one of the two releases, complete (every
file of its BUNDLE.json with its sha256, its venv's edgemeta), the health check through `current`
passes (`board_ops.py health current`: load the model, embed), and the next activation works and
leaves no temporary file.

Prints one row per operation: kills, kills that landed inside a write (a temporary file was left),
violations (the goal is 0), and lists each violation.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from edgemeta.deploy.board_ops import INSTALLED, zipapp_file
from edgemeta.errors import EdgemetaError
from edgemeta.runtime.store import LOCK_FILE, STORE_FILE, TMP_NAME, EnrollmentStore

REPO = Path(__file__).resolve().parents[1]

MODELS = [REPO / "models" / "omniglot-conv4", REPO / "models" / "omniglot-vinyals-conv4"]
SAMPLES = sorted((REPO / "samples" / "omniglot").glob("*/*.png"))
BOARD_OPS = zipapp_file()  # the board-side operations as deploy uploads them: a zip application (in a temporary folder)

# `edgemeta ARGS` with edgemeta.atomic.write_atomic wrapped: its $EDGEMETA_KILL_WRITE-th call (1 by
# default) SIGKILLs the process at $EDGEMETA_KILL_AT: "bytes:K" (after K bytes of the temporary file;
# beyond its size: after the whole file), "before-rename" or "after-rename".
KILL_IN_WRITE = r"""
import os, runpy, signal, sys
import edgemeta.atomic as atomic
point, nth = os.environ["EDGEMETA_KILL_AT"], int(os.environ.get("EDGEMETA_KILL_WRITE", "1"))
real, calls = atomic.write_atomic, [0]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
class Killing:
    def __init__(self, f, left):
        self.f, self.left = f, left
    def write(self, b):
        b = bytes(b)
        if len(b) > self.left:
            self.f.write(b[:self.left])
            self.f.flush()
            die()
        self.left -= len(b)
        return self.f.write(b)
    def __getattr__(self, name):
        return getattr(self.f, name)
def write_atomic(path, data, *args, **kwargs):
    calls[0] += 1
    if calls[0] != nth:
        return real(path, data, *args, **kwargs)
    if point == "after-rename":
        real(path, data, *args, **kwargs)
        die()
    def body(f):
        g = Killing(f, int(point[6:])) if point.startswith("bytes:") else f
        data(g) if callable(data) else g.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        die()  # before-rename, or K beyond the file's size
    real(path, body, *args, **kwargs)
atomic.write_atomic = write_atomic  # before edgemeta.runtime.store imports it
sys.argv = ["edgemeta", *sys.argv[1:]]
runpy.run_module("edgemeta", run_name="__main__", alter_sys=True)
"""

# `board_ops.pyz ARGS` SIGKILLed before or after ($EDGEMETA_KILL_WHEN) its $EDGEMETA_KILL_EVENT-th call
# of os.symlink, os.replace or os.fsync: the calls by which activation changes the board.
KILL_IN_SWITCH = r"""
import os, runpy, signal, sys
k, when, n = int(os.environ["EDGEMETA_KILL_EVENT"]), os.environ["EDGEMETA_KILL_WHEN"], [0]
def wrap(fn):
    def call(*a, **kw):
        n[0] += 1
        if n[0] == k and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = fn(*a, **kw)
        if n[0] == k and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return call
for name in ("symlink", "replace", "fsync"):
    setattr(os, name, wrap(getattr(os, name)))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# activate: fsync + rename + folder fsync of the unit and of history.json, then symlink + rename + folder fsync of current;
# rollback: history.json and current
SWITCH_EVENTS = {"activate": 9, "rollback": 6}

State = tuple | None  # (sorted (label, samples) pairs, backbone sha256), None: no store


@dataclass
class Row:
    kills: int = 0
    random: int = 0
    targeted: int = 0
    in_write: int = 0
    acked: int = 0  # operations that finished (and were checked as acknowledged) instead of being killed
    violations: list[str] = field(default_factory=list)


class Results(dict):
    """Rows of counts by operation; `row_type` is the dataclass one row is (deploy_kills has its own)."""

    row_type = Row

    def row(self, name: str):
        return self.setdefault(name, self.row_type())

    def total(self, attr: str) -> int:
        return sum(len(r.violations) if attr == "violations" else getattr(r, attr) for r in self.values())


def observe(folder: Path) -> State:
    """The store's classes and backbone; EdgemetaError when it does not load."""
    if not EnrollmentStore.exists(folder):
        return None
    s = EnrollmentStore.open(folder)
    return tuple(sorted(s.counts().items())), s.backbone.get("sha256")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TMP_NAME.fullmatch(p.name)) if folder.is_dir() else []


def only_store_files(folder: Path) -> list[str]:
    """What is in a store folder besides the store and its lock (after a write: nothing)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in (STORE_FILE, LOCK_FILE))


def changed(state: State, op: str, label: str, new: str = "", n: int = 0, sha: str = "") -> State:
    counts = dict(state[0]) if state else {}
    if op == "enroll":
        counts[label] = counts.get(label, 0) + n
    elif op == "forget":
        del counts[label]
    elif op == "rename":
        counts[new] = counts.pop(label)
    return tuple(sorted(counts.items())), sha or (state[1] if state else "")


def model_sha(model: Path) -> str:
    m = json.loads((model / "manifest.json").read_text())
    return m["variants"][m["default_variant"]]["sha256"]


def model_of(state: State) -> Path:
    """The model a store was enrolled with (a new store: the first)."""
    return next((m for m in MODELS if state and model_sha(m) == state[1]), MODELS[0])


class StoreBench:
    """Kills of store writers, through the CLI and through the agent, with the checks after each."""

    def __init__(self, work: Path, rng: random.Random, results: Results, seed_samples: int = 1500,
                 log=print):
        from edgemeta.runtime.fewshot import FewShotRuntime

        self.work, self.rng, self.results, self.log = work, rng, results, log
        self.rts = {m: FewShotRuntime(m) for m in MODELS}
        self.images = self.rts[MODELS[0]].images([str(p) for p in SAMPLES[:8]])[0]
        self.durations: dict[str, float] = defaultdict(lambda: 1.0)
        self.labels = 0
        # one long-lived store with kept samples (reenroll needs them), big enough that a write takes a while
        self.store, self.agent_store = work / "store", work / "agent-store"
        rt = self.rts[MODELS[0]]
        pool = rt.images([str(p) for p in SAMPLES[:200]])[0]
        for _ in range(3):
            rt.enroll_images(self.store, self.label(), pool[self.rng.sample(range(len(pool)), 1)], keep_samples=True,
                             allow_duplicates=True)
        rt.enroll_images(self.store, self.label(), pool.repeat(max(1, seed_samples // len(pool)), axis=0), allow_duplicates=True)
        shutil.copytree(self.store, self.agent_store)
        self.folders = 0

    def label(self) -> str:
        self.labels += 1
        return f"c{self.labels}"

    def pngs(self, k: int) -> list[Path]:
        return self.rng.sample(SAMPLES, k)

    # --- one kill ----------------------------------------------------------------------------

    def plan(self, op: str, folder: Path, state: State) -> tuple[list[str], State, list[Path]]:
        """(edgemeta arguments, the state the operation leads to, its image files)."""
        counts, model = dict(state[0]) if state else {}, model_of(state)
        if op in ("first", "enroll"):
            label = self.rng.choice([*counts, self.label()]) if counts and self.rng.random() < 0.5 else self.label()
            files = self.pngs(self.rng.randint(1, 3))
            after = changed(state, "enroll", label, n=len(files), sha=model_sha(model))
            # the same drawings again and again: duplicates allowed, so every enroll changes the store
            return (["enroll", "--store", str(folder), "--model", str(model), "--label", label, "--allow-duplicates",
                     *map(str, files)], after, files)
        if op == "forget":
            label = self.rng.choice(sorted(counts))
            return ["forget", "--store", str(folder), "--label", label], changed(state, "forget", label), []
        if op == "rename":
            old, new = self.rng.choice(sorted(counts)), self.label()
            return ["rename", "--store", str(folder), old, new], changed(state, "rename", old, new), []
        other = MODELS[1 - MODELS.index(model)]
        return ["reenroll", "--store", str(folder), "--model", str(other)], changed(state, "reenroll", "", sha=model_sha(other)), []

    def target(self, folder: Path) -> str:
        """Where inside the write a targeted kill lands."""
        r = self.rng.random()
        if r < 0.15:
            return "before-rename"
        if r < 0.25:
            return "after-rename"
        size = (folder / STORE_FILE).stat().st_size if EnrollmentStore.exists(folder) else 20_000
        return f"bytes:{self.rng.randint(0, size)}"

    def folder_for(self, op: str, store: Path) -> Path:
        if op != "first":
            return store
        self.folders += 1
        folder = self.work / f"new{self.folders}"
        if self.rng.random() < 0.5:
            folder.mkdir()  # an empty folder, or (the other half) one that does not exist yet
        return folder

    def _kill_in(self, kind: str, store: Path, kill, op: str, targeted: bool) -> None:
        """One kill by `kill(name, row, op, folder, targeted)` in `store`, or in a new folder for a first write."""
        name = f"{kind} {op}" if op != "first" else f"{kind} enroll (first write)"
        folder = self.folder_for(op, store)
        try:
            kill(name, self.results.row(name), op, folder, targeted)
        finally:
            if op == "first":
                shutil.rmtree(folder, ignore_errors=True)

    def kill_cli(self, op: str, targeted: bool) -> None:
        self._kill_in("cli", self.store, self._kill_cli, op, targeted)

    def _kill_cli(self, name: str, row: Row, op: str, folder: Path, targeted: bool) -> None:
        before = observe(folder)
        if op in ("forget", "rename") and not before[0]:
            return
        args, after, _ = self.plan(op, folder, before)
        env = dict(os.environ)
        if targeted:
            env["EDGEMETA_KILL_AT"] = self.target(folder)
            cmd = [sys.executable, "-c", KILL_IN_WRITE, *args]
        else:
            cmd = [sys.executable, "-m", "edgemeta", *args]
        t = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
        if not targeted:
            try:
                proc.wait(timeout=self.rng.uniform(0, self.durations[op]))
            except subprocess.TimeoutExpired:
                proc.kill()
        out, err = proc.communicate(timeout=300)
        if proc.returncode == 0:  # finished before the kill: acknowledged
            self.durations[op] = time.monotonic() - t
            row.acked += 1
            self.check(row, folder, [after], f"{name} acknowledged")
            return
        if proc.returncode != -signal.SIGKILL:
            row.violations.append(f"{name}: exit {proc.returncode} without a kill: {err.decode()[-300:]}")
            return
        row.kills += 1
        row.targeted += targeted
        row.random += not targeted
        row.in_write += bool(leftovers(folder))
        now = self.check(row, folder, [before, after], f"{name} killed ({env.get('EDGEMETA_KILL_AT', 'random')})")
        if now != "bad":
            self.next_enroll(row, folder, now, name)

    def check(self, row: Row, folder: Path, allowed: list[State], what: str):
        """The store loads and is one of the allowed states; returns it (or "bad")."""
        try:
            now = observe(folder)
        except EdgemetaError as e:
            row.violations.append(f"{what}: the store does not load: {e}")
            return "bad"
        if now not in allowed:
            row.violations.append(f"{what}: the store holds {now}, expected one of {allowed}")
            return "bad"
        return now

    def next_enroll(self, row: Row, folder: Path, state: State, what: str) -> None:
        """An enroll after the kill (in this process: the same code as the CLI's) works and leaves no temporary file."""
        label, model = self.label(), model_of(state)
        try:
            self.rts[model].enroll_images(folder, label, self.images[:1], keep_samples=True, allow_duplicates=True)
        except EdgemetaError as e:
            row.violations.append(f"{what}: the next enroll failed: {e}")
            return
        self.check(row, folder, [changed(state, "enroll", label, n=1, sha=model_sha(model))], f"{what}, next enroll")
        extra = only_store_files(folder)
        if extra:
            row.violations.append(f"{what}: after the next enroll the folder still holds {extra}")

    # --- the agent ----------------------------------------------------------------------------

    def start_agent(self, folder: Path, sock: Path, kill_at: str | None = None) -> subprocess.Popen:
        args = ["serve", "--model", str(MODELS[0]), "--store", str(folder), "--socket", str(sock)]
        env = dict(os.environ)
        if kill_at:
            env["EDGEMETA_KILL_AT"] = kill_at
            cmd = [sys.executable, "-c", KILL_IN_WRITE, *args]
        else:
            cmd = [sys.executable, "-m", "edgemeta", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)
        line = proc.stderr.readline().decode()
        if not line.startswith("serving"):
            proc.kill()
            raise RuntimeError(f"the agent did not start: {line}{proc.stderr.read().decode()[-500:]}")
        return proc

    @staticmethod
    def request(op: str, args: dict, files: list[Path] = ()) -> bytes:
        atts = [base64.b64encode(p.read_bytes()).decode() for p in files]
        return (json.dumps({"id": 1, "op": op, "args": args, "attachments": atts}) + "\n").encode()

    def ask(self, sock: Path, op: str, args: dict, files: list[Path] = ()) -> dict:
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(60)
            c.connect(str(sock))
            c.sendall(self.request(op, args, files))
            return json.loads(c.makefile("rb").readline())

    def kill_agent(self, op: str, targeted: bool) -> None:
        self._kill_in("agent", self.agent_store, self._kill_agent, op, targeted)

    def _kill_agent(self, name: str, row: Row, op: str, folder: Path, targeted: bool) -> None:
        before = observe(folder)
        if op in ("forget", "rename") and not (before and before[0]):
            return
        args, after, files = self.plan("enroll" if op == "first" else op, folder, before)
        if op in ("first", "enroll"):
            request = self.request("enroll", {"label": args[args.index("--label") + 1], "allow_duplicates": True}, files)
        elif op == "forget":
            request = self.request("forget", {"label": args[-1]})
        else:
            request = self.request("rename", {"old": args[-2], "new": args[-1]})
        sock = self.work / "agent.sock"
        kill_at = self.target(folder) if targeted else None
        agent = self.start_agent(folder, sock, kill_at)
        answer = b""
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(sock))
            t = time.monotonic()
            c.sendall(request)
            c.settimeout(None if targeted else self.rng.uniform(0, self.durations["agent " + op]))
            try:
                while not answer.endswith(b"\n"):
                    chunk = c.recv(1 << 16)
                    if not chunk:
                        break
                    answer += chunk
            except TimeoutError:
                pass
            if not targeted and answer.endswith(b"\n"):
                self.durations["agent " + op] = time.monotonic() - t
            agent.kill()
            agent.wait()
            agent.stderr.close()
            c.settimeout(5)
            try:  # an answer on its way when the agent died still counts: the client has it
                while chunk := c.recv(1 << 16):
                    answer += chunk
            except OSError:
                pass
        reply = json.loads(answer.splitlines()[0]) if answer.endswith(b"\n") else None
        if reply is not None and not reply.get("ok"):
            row.violations.append(f"{name}: the agent answered an error: {reply.get('error')}")
            return
        acked = reply is not None
        row.acked += acked
        row.kills += 1
        row.targeted += targeted
        row.random += not targeted
        row.in_write += bool(leftovers(folder))
        what = f"{name} killed ({kill_at or 'random'}{', acknowledged' if acked else ''})"
        now = self.check(row, folder, [after] if acked else [before, after], what)
        if now == "bad":
            return
        # a new agent loads the store as it is, and its next enroll works
        agent, label, enrolled = self.start_agent(folder, sock), self.label(), {}
        try:
            classes = self.ask(sock, "classes", {})
            if not classes.get("ok") or tuple(sorted(classes["result"]["classes"].items())) != (now[0] if now else ()):
                row.violations.append(f"{what}: a new agent sees {classes}, the store holds {now}")
            enrolled = self.ask(sock, "enroll", {"label": label, "allow_duplicates": True}, SAMPLES[:1])
            if not enrolled.get("ok"):
                row.violations.append(f"{what}: the next enroll failed: {enrolled.get('error')}")
        except (OSError, ValueError) as e:
            row.violations.append(f"{what}: a new agent did not answer: {e}")
        finally:
            agent.terminate()
            agent.wait(timeout=30)
            agent.stderr.close()
        if enrolled.get("ok"):
            self.check(row, folder, [changed(now, "enroll", label, n=1, sha=model_sha(MODELS[0]))], f"{what}, next enroll")
            extra = only_store_files(folder)
            if extra:
                row.violations.append(f"{what}: after the next enroll the folder still holds {extra}")


# --- board releases ------------------------------------------------------------------------------


def make_release(root: Path, rid: str) -> None:
    """A complete release as deploy leaves one: model, BUNDLE.json with the sha256 of every file, the
    agent's unit, and a venv whose edgemeta is this checkout's (`install` skips a release that has one)."""
    from edgemeta.deploy.bundle import SERVICE

    rel = root / "releases" / rid
    (rel / "model").mkdir(parents=True)
    src = MODELS[0]
    manifest = json.loads((src / "manifest.json").read_text())
    variant = manifest["default_variant"]
    manifest["variants"] = {variant: manifest["variants"][variant]}
    (rel / "model" / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy2(src / manifest["variants"][variant]["file"], rel / "model")
    (rel / "edgemeta-agent.service").write_text(SERVICE)
    files = {p.relative_to(rel).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in rel.rglob("*") if p.is_file()}
    (rel / "BUNDLE.json").write_text(json.dumps({"format": 1, "files": files}))
    exe = rel / "venv" / "bin" / "edgemeta"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -m edgemeta \"$@\"\n")
    exe.chmod(0o755)
    (rel / INSTALLED).write_text("")  # what board_ops writes once a venv is complete


def release_problems(root: Path) -> list[str]:
    """Why the board's `current` is not a complete release (empty: it is one)."""
    link = root / "current"
    if not link.is_symlink():
        return ["current is not a symbolic link"]
    rel = link.resolve()
    if rel.parent != (root / "releases").resolve() or not rel.is_dir():
        return [f"current points to {os.readlink(link)}, not a release"]
    try:
        files = json.loads((rel / "BUNDLE.json").read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return [f"{rel.name}: BUNDLE.json unreadable ({e})"]
    bad = [n for n, digest in files.items() if not (rel / n).is_file() or hashlib.sha256((rel / n).read_bytes()).hexdigest() != digest]
    if not os.access(rel / "venv" / "bin" / "edgemeta", os.X_OK):
        bad.append("venv/bin/edgemeta")
    try:
        if (root / "history.json").exists():
            assert isinstance(json.loads((root / "history.json").read_text()), list)
    except (ValueError, AssertionError):
        bad.append("history.json")
    return [f"{rel.name}: {b} missing or changed" for b in bad]


def board_ops(root: Path, *args: str, kill: tuple[int, str] | None = None, delay: float | None = None):
    env = {**os.environ, "EDGEMETA_ROOT": str(root)}
    if kill:
        env["EDGEMETA_KILL_EVENT"], env["EDGEMETA_KILL_WHEN"] = str(kill[0]), kill[1]
        cmd = [sys.executable, "-c", KILL_IN_SWITCH, str(BOARD_OPS), *args]
    else:
        cmd = [sys.executable, str(BOARD_OPS), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    if delay is not None:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out.decode(), err.decode()


def activation_kills(work: Path, kills: int, rng: random.Random, results: Results, health_every: int = 1) -> None:
    """Kill activate/rollback `kills` times; check the board after each (see the module's docstring)."""
    root = work / "board"
    for rid in ("rel-a", "rel-b"):
        make_release(root, rid)
    rc, out, err = board_ops(root, "activate", "rel-a")
    assert rc == 0, out + err
    duration, n = 0.1, 0
    while n < kills:
        cur = os.readlink(root / "current").split("/")[-1]
        hist = json.loads((root / "history.json").read_text()) if (root / "history.json").exists() else []
        hist = hist[: hist.index(cur) + 1] if cur in hist else hist  # as board_ops reads it (history_upto)
        older = [x for x in hist if x != cur]
        op = "rollback" if older and n % 2 else "activate"
        new = older[-1] if op == "rollback" else ("rel-b" if cur == "rel-a" else "rel-a")
        args = ["rollback"] if op == "rollback" else ["activate", new]
        row = results.row(f"board {op}")
        targeted = rng.random() < 0.5
        kill = (rng.randint(1, SWITCH_EVENTS[op]), rng.choice(["before", "after"])) if targeted else None
        t = time.monotonic()
        rc, out, err = board_ops(root, *args, kill=kill, delay=None if targeted else rng.uniform(0, duration))
        what = f"{op} {new} killed ({f'{kill[1]} call {kill[0]}' if kill else 'random'})"
        if rc == 0:
            duration = time.monotonic() - t if not targeted else duration
            row.acked += 1
            now = os.readlink(root / "current").split("/")[-1]
            if now != new:
                row.violations.append(f"{op} {new} answered ok, current is {now}")
            continue
        if rc != -signal.SIGKILL:
            row.violations.append(f"{op} {new}: exit {rc} without a kill: {(out + err)[-300:]}")
            continue
        n += 1
        row.kills += 1
        row.targeted += targeted
        row.random += not targeted
        row.in_write += any(p.name.endswith(".tmp") for p in root.iterdir())
        problems = release_problems(root)
        now = (root / "current").resolve().name if (root / "current").is_symlink() else None
        if now not in (cur, new):
            problems.append(f"current is {now}, neither {cur} nor {new}")
        if not problems and n % health_every == 0:
            rc, out, err = board_ops(root, "health", "current")
            if rc != 0:
                problems.append(f"health check through current failed: {(out + err)[-300:]}")
        if problems:
            row.violations.append(f"{what}: {'; '.join(problems)}")
        # the next activation works and leaves no temporary file
        other = "rel-b" if now == "rel-a" else "rel-a"
        rc, out, err = board_ops(root, "activate", other)
        left = sorted(p.name for p in root.iterdir() if p.name.endswith(".tmp"))
        if rc != 0 or left:
            row.violations.append(f"{what}: the next activation: exit {rc} {(out + err)[-200:]}, left {left}")


# --- the whole run -------------------------------------------------------------------------------

STORE_OPS = ["first", "enroll", "forget", "rename", "reenroll"]
AGENT_OPS = ["first", "enroll", "forget", "rename"]


def run(cli_kills_per_op: int, agent_kills_per_op: int, activation: int, seed: int = 12, work: Path | None = None,
        log=print, health_every: int = 1) -> Results:
    rng, results = random.Random(seed), Results()
    tmp = tempfile.TemporaryDirectory(prefix="crash-") if work is None else None
    work = Path(tmp.name) if tmp else work
    try:
        bench = StoreBench(work, rng, results) if cli_kills_per_op or agent_kills_per_op else None
        for kind, ops, per_op in (("cli", STORE_OPS, cli_kills_per_op), ("agent", AGENT_OPS, agent_kills_per_op)):
            for i in range(per_op * len(ops) * 4 if per_op else 0):  # bounded: ops that finish before their kill do not count
                op = ops[i % len(ops)]
                name = f"{kind} {op}" if op != "first" else f"{kind} enroll (first write)"
                if results.row(name).kills >= per_op:
                    if all(results.row(f"{kind} {o}" if o != "first" else f"{kind} enroll (first write)").kills >= per_op for o in ops):
                        break
                    continue
                # alternate random and targeted kills per operation
                (bench.kill_cli if kind == "cli" else bench.kill_agent)(op, targeted=results.row(name).kills % 2 == 1)
            if per_op:
                log(f"{kind}: done")
        if activation:
            activation_kills(work, activation, rng, results, health_every)
    finally:
        if tmp:
            tmp.cleanup()
    return results


def format_table(results: Results, first: str, columns: dict[str, str], width: int = 28) -> str:
    """One line per row and a total line; `columns` maps a row attribute to its header."""
    widths = {attr: max(7, len(head) + 2) for attr, head in columns.items()}

    def line(name: str, value) -> str:
        return f"{name:<{width}}" + "".join(f"{value(attr):>{widths[attr]}}" for attr in columns)

    rows = [f"{first:<{width}}" + "".join(f"{head:>{widths[a]}}" for a, head in columns.items())]
    for name, r in results.items():
        rows.append(line(name, lambda a, r=r: len(r.violations) if a == "violations" else getattr(r, a)))
    rows.append(line("total", results.total))
    return "\n".join(rows)


def table(results: Results) -> str:
    return format_table(results, "operation", {"kills": "kills", "random": "random", "targeted": "timed",
                                               "in_write": "in a write", "acked": "finished", "violations": "violations"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=400, help="Store-writer kills in all (60%% through the CLI, 40%% the agent).")
    ap.add_argument("--activation-kills", type=int, default=100, help="Kills of board_ops activate/rollback.")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--json", action="store_true", help="Also print the counts as JSON.")
    a = ap.parse_args()
    t = time.monotonic()
    results = run(max(1, round(0.6 * a.kills / len(STORE_OPS))), max(1, round(0.4 * a.kills / len(AGENT_OPS))),
                  a.activation_kills, a.seed, log=lambda m: print(m, file=sys.stderr))
    print(table(results))
    print(f"({time.monotonic() - t:.0f} s; 'in a write': a temporary file was left, so the kill came between its "
          "creation and the rename; 'finished': operations done before their kill, checked as acknowledged)")
    for name, r in results.items():
        for v in r.violations:
            print(f"VIOLATION {name}: {v}")
    if a.json:
        print(json.dumps({k: {**vars(r), "violations": len(r.violations)} for k, r in results.items()}))
    sys.exit(1 if results.total("violations") else 0)


if __name__ == "__main__":
    main()
