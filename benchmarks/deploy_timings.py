"""Wall time of whole `edgemeta` commands against a board: deploy, upgrade, rollback, status, remote enroll.

    flock /tmp/edgemeta-bench.lock .venv/bin/python -m benchmarks.deploy_timings [--repeat 3] [--emulated [--emulated-repeat 1]]

On each round a never-deployed board: a real OpenSSH server on 127.0.0.1 (tests/support/sshd.py, profile
generic-x86_64) and, with --emulated (root, qemu-user-static, debootstrap: tests/support/emulated_pi.py), a
Raspberry Pi OS 64-bit userland under qemu with its own sshd (profile rpi5). Bundles carry a
wheelhouse (the board installs offline). Timed, each a whole CLI run from this host:
  - first deploy: upload, a new venv with the runtime installed from the wheelhouse, health check, switch
  - model-only upgrade: another model (omniglot-vinyals-conv4) with the same runtime: upload, link the
    venv the board has, health check, switch
  - redeploy of the active release: nothing to do
  - rollback (to the first release), roll forward (`rollback --to` the upgrade), `status` (with its
    health check of the active release)
  - remote enroll of two images over `--via ssh:`: cold (no shared ssh connection yet, an agent
    started for the call), warm (the shared connection, still an agent per call) and with the agent
    running (the shared connection to `edgemeta serve --socket ROOT/agent.sock`, as the service runs it)
  - a rollback and a roll forward that carry a store of 55 classes (1123 samples) between the two
    models: each re-embeds every kept sample with the target release before the switch
Prints the median of --repeat rounds per step and board, and every run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.deploy_kills import rid_of

REPO = Path(__file__).resolve().parents[1]

MODELS = (REPO / "models" / "omniglot-conv4", REPO / "models" / "omniglot-vinyals-conv4")
DRAWINGS = sorted((REPO / "samples" / "omniglot" / "Keble_character01").glob("*.png"))
IMAGES = {label: DRAWINGS[2 * i:2 * i + 2] for i, label in enumerate("abc")}  # (the same image twice is skipped)


def round_on(board_alias: str, lab, bundles: tuple[Path, Path], times: dict[str, list[float]], log=print) -> None:
    """One round of every timed step on a never-deployed board."""
    cli = [sys.executable, "-m", "edgemeta"]
    ssh = ["--ssh-config", str(lab.ssh_config)]
    first, upgrade = bundles

    def timed(what: str, argv: list[str], expect: str) -> None:
        t = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=1800)
        times.setdefault(what, []).append(time.monotonic() - t)
        if p.returncode != 0 or expect not in p.stderr + p.stdout:
            raise RuntimeError(f"{what}: exit {p.returncode}, {expect!r} not said: {p.stdout}{p.stderr}")
        log(f"{board_alias}: {what}: {times[what][-1]:.1f} s")

    def on_board(command: str) -> None:
        p = subprocess.run(["ssh", "-F", str(lab.ssh_config), "-o", "BatchMode=yes", "--", board_alias, command],
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"{command!r} on {board_alias}: {p.stderr}")

    host = ["--host", board_alias]
    # (--trust-key: the board trusts the bundle's key first, one more ssh call, as every first deploy does)
    timed("first deploy", [*cli, "deploy", "--bundle", str(first), *host, *ssh, "--trust-key"], "runtime installed in a new venv")
    timed("model-only upgrade (venv reused)", [*cli, "deploy", "--bundle", str(upgrade), *host, *ssh], "reused: same runtime")
    timed("redeploy of the active release", [*cli, "deploy", "--bundle", str(upgrade), *host, *ssh], "nothing to do")
    timed("rollback", [*cli, "rollback", *host, *ssh], f"active: {rid_of(first)}")
    timed("roll forward (rollback --to)", [*cli, "rollback", "--to", rid_of(upgrade), *host, *ssh], f"active: {rid_of(upgrade)}")
    timed("status (with a health check)", [*cli, "status", *host, *ssh], "health   ok")
    from edgemeta.sshcmd import control_dir

    subprocess.run(["ssh", "-F", str(lab.ssh_config), "-o", f"ControlPath={control_dir()}/%C", "-O", "exit", board_alias],
                   capture_output=True)  # no shared connection left from an earlier round
    remote = [*cli, "remote", "--via", f"ssh:{board_alias}", *ssh, "--timeout", "600", "enroll", "--label"]
    timed("remote enroll, cold (new ssh connection, agent per call)", [*remote, "a", *map(str, IMAGES["a"])], "enrolled 2 sample(s)")
    timed("remote enroll, shared ssh connection, agent per call", [*remote, "b", *map(str, IMAGES["b"])], "enrolled 2 sample(s)")
    start = ('R="${EDGEMETA_ROOT:-$HOME/.edgemeta}"; setsid nohup "$R/current/venv/bin/edgemeta" serve --model "$R/current/model" '
             '--store "$R/store" --socket "$R/agent.sock" >/dev/null 2>&1 </dev/null & echo $! > "$R/agent.pid"; '
             'for i in $(seq 600); do [ -S "$R/agent.sock" ] && exit 0; sleep 0.1; done; exit 1')
    on_board(start)
    try:
        timed("remote enroll, shared ssh connection, running agent", [*remote, "c", *map(str, IMAGES["c"])], "enrolled 2 sample(s)")
    finally:
        on_board('R="${EDGEMETA_ROOT:-$HOME/.edgemeta}"; kill "$(cat "$R/agent.pid")"')
    # the store the board carries to the other model: every sample character (52 classes, 1123 drawings)
    timed("remote enroll --from-folders of 52 classes (1123 drawings)",
          [*remote[:-2], "enroll", "--from-folders", str(REPO / "samples" / "omniglot")], "enrolled")
    timed("rollback carrying that store (re-embedded for the other model)", [*cli, "rollback", *host, *ssh],
          "re-embedded (55 class(es), 1123 sample(s)")
    timed("roll forward carrying it back", [*cli, "rollback", "--to", rid_of(upgrade), *host, *ssh], "re-embedded")


def run(repeat: int, work: Path, emulated: int = 0, log=print) -> dict[str, dict[str, list[float]]]:
    """{board: {step: [seconds per round]}}: `repeat` rounds on loopback boards, `emulated` on the emulated Pi."""
    from edgemeta.deploy.bundle import build_bundle
    from tests.support.sshd import SshLab

    lab = SshLab(work / "ssh")
    out: dict[str, dict[str, list[float]]] = {}
    try:
        kinds = [("loopback sshd (x86_64)", "generic-x86_64", repeat)] + ([("emulated Pi (aarch64, qemu)", "rpi5", emulated)]
                                                                          if emulated else [])
        for name, profile, rounds in kinds:
            bundles = tuple(build_bundle(profile, m, work / profile / m.name, wheelhouse=True) for m in MODELS)
            pi = None
            if profile == "rpi5":
                from tests.support.emulated_pi import EmulatedPi

                pi = EmulatedPi(lab, "arm64")  # (the OS image is cached; its edgemeta root starts empty)
            try:
                for i in range(rounds):
                    if pi:
                        shutil.rmtree(pi.edgemeta_root, ignore_errors=True)  # a never-deployed board again
                    round_on(pi.alias if pi else lab.add_board().alias, lab, bundles, out.setdefault(name, {}), log)
                    log(f"{name}: round {i + 1} of {rounds}")
            finally:
                if pi:
                    pi.stop()
    finally:
        lab.stop()
    return out


def print_results(results: dict[str, dict[str, list[float]]]) -> None:
    for board, steps in results.items():
        print(f"{board}:")
        for what, secs in steps.items():
            print(f"  {what:<62} median {statistics.median(secs):6.1f} s  (runs: {', '.join(f'{x:.1f}' for x in secs)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="Rounds per board (each on a never-deployed board).")
    ap.add_argument("--emulated", action="store_true", help="Also on an emulated arm64 Raspberry Pi (root; minutes).")
    ap.add_argument("--emulated-repeat", type=int, default=1, help="Rounds on the emulated Pi.")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="deploy-timings-") as tmp:
        os.environ["EDGEMETA_CONFIG"] = str(Path(tmp) / "config")  # a signing key of its own, never the user's
        t = time.monotonic()
        results = run(a.repeat, Path(tmp), a.emulated_repeat if a.emulated else 0, log=lambda m: print(m, file=sys.stderr))
    print_results(results)
    print(f"({time.monotonic() - t:.0f} s in all; `{shlex.join(['python', '-m', 'benchmarks.deploy_timings', *sys.argv[1:]])}`)")


if __name__ == "__main__":
    main()
