"""Kill the host's `edgemeta deploy` (SIGKILL or SIGTERM) at random moments against a real sshd board.

    flock /tmp/edgemeta-bench.lock .venv/bin/python -m benchmarks.deploy_kills --kills 40 [--seed 3] [--json]
    flock /tmp/edgemeta-bench.lock .venv/bin/python -m benchmarks.deploy_kills --timings [--repeat 3]

--timings instead times whole commands on such a board: benchmarks/deploy_timings.py (first deploy,
model-only upgrade, redeploy, rollback, roll forward, status, remote enroll).

The board is a real OpenSSH server on 127.0.0.1 (tests/support/sshd.py) with its own root; the bundle is
omniglot-conv4 for generic-x86_64 with a wheelhouse (the board installs offline). Each kill deploys
either a new release with a runtime of its own (upload, venv + install, health check, switch: "new") or a release the board
has installed but not active ("on board": health check and switch only), starts `edgemeta deploy`
as a real process, and sends it the signal (to the host process alone: the ssh it started may run
on, as when a laptop dies) at a random moment of that kind of deploy, or, for every other pair of
kills, as the host prints a step (STEPS: the upload starts, the board has the whole bundle, the
release was checked and is about to be switched to).

After each kill, once the board is quiet again (the host's ssh processes, the board's sshd
sessions and every process with the board's EDGEMETA_ROOT have ended), the checks:
  - `current` is the release active before the deploy or the one deployed, and is complete (every
    file of its BUNDLE.json with its sha256, its venv's edgemeta);
  - `board_ops.py health current` passes (load the model, embed);
  - no upload folder, no release without a complete venv, no half-made venv (ROOT/venvs), no
    temporary file is left on the board;
  - a host that exited by itself before the signal exited 0 and the deployed release is active;
  - SIGTERM that came once the handler was installed (always so for a timed one): exit 143, one
    line, no traceback.
At the end one more deploy runs unkilled and the same checks hold.

Prints one row per kind of deploy and signal: kills, how many landed after the board had the whole
upload, boards left on the old / the new release, violations (the goal is 0; each is listed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import crash_consistency as cc
from edgemeta.deploy.board_ops import INSTALLED

REPO = Path(__file__).resolve().parents[1]

MODEL = REPO / "models" / "omniglot-conv4"
BOARD = "generic-x86_64"
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}


@dataclass
class Row:
    kills: int = 0
    timed: int = 0  # signalled at a step the host printed, not at a random moment
    after_upload: int = 0  # the host had printed "uploaded" (or, on board, the activation had begun)
    old: int = 0  # the board was left on the release active before
    new: int = 0  # ... on the one deployed (the board finished on its own)
    finished: int = 0  # the deploy ended before the signal came (not a kill)
    violations: list[str] = field(default_factory=list)


class Results(cc.Results):
    row_type = Row


def variant(base: Path, dest: Path, new_runtime: bool = True) -> Path:
    """A new release of `base`: its board.toml gains a comment, so its content and id differ; with
    `new_runtime` its requirements.txt too, so the board makes a venv for it (pip, from the wheelhouse)
    instead of linking the one it has (a model-only upgrade); re-signed."""
    from edgemeta.deploy.bundle import new_release_id, runtime_key
    from edgemeta.deploy.signing import sign_bundle, signing_key
    from edgemeta.files import sha256_file

    shutil.copytree(base, dest)
    for name in ("board.toml", "requirements.txt") if new_runtime else ("board.toml",):
        with open(dest / name, "a") as f:
            f.write(f"# release {dest.name}\n")
    info = json.loads((dest / "BUNDLE.json").read_text())
    info["files"] = {k: sha256_file(dest / k) for k in info["files"]}
    info["runtime"] = runtime_key(dest, info)
    info["release"] = new_release_id(dest, info)
    (dest / "BUNDLE.json").write_text(json.dumps(info))
    sign_bundle(dest, signing_key())
    return dest


def rid_of(bundle: Path) -> str:
    return json.loads((bundle / "BUNDLE.json").read_text())["release"]


def _procs() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgrp) of every process."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            out.append((int(d.name), fields[0], int(fields[1]), int(fields[2])))
    return out


def _has_root(pid: int, root: Path) -> bool:
    try:
        return f"EDGEMETA_ROOT={root}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def wait_quiet(board, pgid: int, timeout: float = 600) -> None:
    """Until the host's processes (its ssh), the board's sshd sessions and every process working on the
    board's root have ended: then nothing will change the board any more."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        live = [p for p in _procs() if p[1] != "Z"]
        busy = [p for p in live if p[3] == pgid or p[2] == board.proc.pid or _has_root(p[0], board.root)]
        if not busy:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the board was still busy after {timeout:.0f} s")


def board_problems(root: Path, allowed: tuple[str, ...]) -> list[str]:
    """What is wrong with the board now (empty: nothing)."""
    problems = cc.release_problems(root)
    now = (root / "current").resolve().name if (root / "current").is_symlink() else ""
    if now not in allowed:
        problems.append(f"current is {now or 'nothing'}, not {' or '.join(allowed)}")
    if not problems:
        rc, out, err = cc.board_ops(root, "health", "current")
        if rc != 0:
            problems.append(f"health check through current failed: {(out + err).strip()[-300:]}")
    rel = root / "releases"
    left = [p.name for p in rel.iterdir() if p.name.startswith(".") or (p.name != now and not (p / INSTALLED).is_file())]
    left += [p.name for p in root.iterdir() if p.name.endswith(".tmp")]
    left += [f"venvs/{v.name}" for v in (root / "venvs").glob("*") if not (v / ".installed").is_file()]
    if left:
        problems.append(f"left on the board: {sorted(left)}")
    return problems


class Bench:
    def __init__(self, work: Path, lab, rng: random.Random, results: Results, log=print):
        from edgemeta.deploy.bundle import build_bundle

        self.work, self.lab, self.rng, self.results, self.log = work, lab, rng, results, log
        self.board = lab.add_board()
        self.base = build_bundle(BOARD, MODEL, work / "bundles" / "base", wheelhouse=True)
        self.bundles = {rid_of(self.base): self.base}
        self.durations = {"new": 15.0, "on board": 4.0}

    def deploy(self, bundle: Path) -> subprocess.Popen:
        # --trust-key: the board's first deploy trusts the bundle's key (a step before the upload); later ones
        # find it trusted and skip that step
        return subprocess.Popen([sys.executable, "-m", "edgemeta", "deploy", "--ssh-config", str(self.lab.ssh_config),
                                 "--bundle", str(bundle), "--host", self.board.alias, "--trust-key"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)

    def current(self) -> str:
        link = self.board.root / "current"
        return link.resolve().name if link.is_symlink() else ""

    def on_board(self) -> list[str]:
        """Releases installed on the board, not active, whose bundle we have."""
        rel = self.board.root / "releases"
        return sorted(p.name for p in rel.glob("[!.]*") if p.name != self.current() and (p / INSTALLED).is_file()
                      and p.name in self.bundles)

    def target(self, kind: str) -> Path:
        if kind == "on board" and self.on_board():
            return self.bundles[self.rng.choice(self.on_board())]
        b = variant(self.base, self.work / "bundles" / f"r{len(self.bundles)}")
        self.bundles[rid_of(b)] = b
        return b

    def unkilled(self, kind: str) -> None:
        """One deploy to its end (and its duration, for the kill times)."""
        bundle = self.target(kind)
        t = time.monotonic()
        p = self.deploy(bundle)
        out, err = p.communicate(timeout=900)
        wait_quiet(self.board, p.pid)
        if p.returncode != 0:
            raise RuntimeError(f"deploy failed: {out}{err}")
        self.durations[kind] = time.monotonic() - t
        problems = board_problems(self.board.root, (rid_of(bundle),))
        if problems:
            self.results.row("unkilled deploys").violations.append("; ".join(problems))

    def kill(self, kind: str, sig_name: str, timed: bool = False, at: str = "") -> None:
        """One deploy, signalled at a random moment, or (`timed`) as soon as the host prints one of
        the STEPS of that kind of deploy (or the line holding `at`)."""
        before = self.current()
        real_kind = kind if kind == "new" or self.on_board() else "new"
        at = at or (self.rng.choice(STEPS[real_kind]) if timed else "")
        bundle = self.target(real_kind)
        rid = rid_of(bundle)
        row = self.results.row(f"{real_kind} {sig_name}")
        delay = self.rng.uniform(0, self.durations[real_kind])
        p = self.deploy(bundle)
        seen = ""
        if at:
            for line in p.stderr:
                seen += line
                if at in line:
                    p.send_signal(SIGNALS[sig_name])  # the host process alone, not its ssh
                    break
        else:
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                p.send_signal(SIGNALS[sig_name])
        out, err = p.communicate(timeout=900)
        err = seen + err
        wait_quiet(self.board, p.pid)
        what = f"{real_kind} deploy of {rid} ({sig_name} {f'at {at!r}' if at else f'after {delay:.2f} s'})"
        if p.returncode >= 0 and p.returncode != 128 + SIGNALS[sig_name]:  # it ended by itself first
            row.finished += 1
            if p.returncode != 0:
                row.violations.append(f"{what}: ended before the signal with exit {p.returncode}: {(out + err)[-300:]}")
            problems = board_problems(self.board.root, (rid,))
        else:
            row.kills += 1
            row.timed += bool(at)
            row.after_upload += ("uploaded" in err) if real_kind == "new" else ("activating it" in err)
            problems = board_problems(self.board.root, (before, rid))
            now = self.current()
            row.old += now == before
            row.new += now == rid
            if sig_name == "SIGTERM" and (p.returncode == 143 or at):  # the handler was in place (not in start-up)
                lines = [ln for ln in err.splitlines() if ln.strip()]
                if p.returncode != 143 or "Traceback" in err or not lines[-1].startswith("error: deploy stopped by SIGTERM"):
                    problems.append(f"SIGTERM: exit {p.returncode}, not 143 and one line: {err[-400:]!r}")
        if problems:
            row.violations.append(f"{what}: {'; '.join(problems)}")


# where a timed signal lands: as the host prints the line saying that the board ... starts the upload
# (preflight), has the whole bundle and installs it (uploaded), is about to activate the release it has
# (activating it), has checked the release and switches (health check of)
STEPS = {"new": ("preflight", "uploaded", "health check of"), "on board": ("preflight", "activating it", "health check of")}


def run(kills: int, seed: int = 3, work: Path | None = None, lab=None, on_board_share: float = 0.5, log=print) -> Results:
    """`kills` host kills (about `on_board_share` of them activations of a release on the board),
    SIGKILL and SIGTERM alternately, then one unkilled deploy; `lab` is a tests/support/sshd.py SshLab (made
    here when None)."""
    from tests.support.sshd import SshLab

    rng, results = random.Random(seed), Results()
    tmp = tempfile.TemporaryDirectory(prefix="deploy-kills-") if work is None else None
    work = Path(tmp.name) if tmp else work
    own_lab = lab is None
    lab = SshLab(work / "ssh") if own_lab else lab
    try:
        bench = Bench(work, lab, rng, results, log)
        bench.unkilled("new")  # the board's first release (kills of "on board" deploy a new one until there is one)
        for i in range(kills):
            kind = "on board" if rng.random() < on_board_share else "new"
            bench.kill(kind, "SIGKILL" if i % 2 == 0 else "SIGTERM", timed=i % 4 >= 2)  # half at random moments
            if (i + 1) % 10 == 0:
                log(f"{i + 1} kills")
        bench.unkilled("new")  # and the next deploy leaves the board clean too
    finally:
        if own_lab:
            lab.stop()
        if tmp:
            tmp.cleanup()
    return results


def table(results: Results) -> str:
    return cc.format_table(results, "deploy, signal", {"kills": "kills", "timed": "timed", "after_upload": "after upload",
                                                       "old": "left old", "new": "left new", "finished": "finished",
                                                       "violations": "violations"}, width=20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=40, help="Kills of the host's deploy in all.")
    ap.add_argument("--on-board-share", type=float, default=0.5, help="Share of kills that activate a release on the board.")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="Also print the counts as JSON.")
    ap.add_argument("--timings", action="store_true", help="Time whole commands instead (benchmarks/deploy_timings.py).")
    ap.add_argument("--repeat", type=int, default=3, help="With --timings: rounds (each on a new board).")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="deploy-kills-") as tmp:
        os.environ["EDGEMETA_CONFIG"] = str(Path(tmp) / "config")  # a signing key of its own, never the user's
        if a.timings:
            import deploy_timings

            deploy_timings.print_results(deploy_timings.run(a.repeat, Path(tmp), log=lambda m: print(m, file=sys.stderr)))
            return
        t = time.monotonic()
        results = run(a.kills, a.seed, Path(tmp), on_board_share=a.on_board_share, log=lambda m: print(m, file=sys.stderr))
    print(table(results))
    print(f"({time.monotonic() - t:.0f} s; 'timed': signalled as the host printed a step (preflight, uploaded, "
          "activating it, health check of), the others at a random moment; 'after upload': the board had the whole "
          "bundle when the host died (on board: the activation had begun); 'left old/new': the release active "
          "afterwards; 'finished': deploys that ended before their signal, checked as deploys)")
    for name, r in results.items():
        for v in r.violations:
            print(f"VIOLATION {name}: {v}")
    if a.json:
        print(json.dumps({k: {**vars(r), "violations": len(r.violations)} for k, r in results.items()}))
    sys.exit(1 if results.total("violations") else 0)


if __name__ == "__main__":
    main()
