"""The command table: `python3 ~/.edgemeta-ops.pyz COMMAND [ARGS]`. The last line of output is JSON
for the host to read (lines before it, {"event": ...}, say how far a deploy got). Exit status: 0 ok,
3 refused (signature, checksum, an upload cut short, install, health, a full disk, another deploy
running, nothing to roll back), 2 usage."""

import inspect
import platform
import shutil
from pathlib import Path

from edgemeta.deploy.board.base import KEYS_DIR, VENVS, Refused, done, root
from edgemeta.deploy.board.lifecycle import cmd_activate, cmd_deploy, cmd_prune, cmd_rollback
from edgemeta.deploy.board.lock import lock_board, outlive_the_host
from edgemeta.deploy.board.receive import receive
from edgemeta.deploy.board.releases import (
    current,
    health,
    history,
    install,
    on_board,
    release_arg,
    release_details,
    release_state,
    size_on_disk,
)
from edgemeta.deploy.board.service import cmd_service
from edgemeta.deploy.board.trust import cmd_trust, trusted_keys
from edgemeta.errors import EdgemetaError


def cmd_preflight(release_id: str = "", key: str = "") -> None:
    """The board as deploy sees it first: architecture, Python, glibc, space, `current`; with RELEASE_ID, that
    release's state; with KEY, whether the venv of that runtime key is complete here (then an install
    is a link, no pip)."""
    r = root()
    st = shutil.disk_usage(r if r.exists() else Path.home())
    answer = {"arch": platform.machine(), "python": platform.python_version(), "glibc": " ".join(platform.libc_ver()),
              "root": str(r), "free_mb": st.free // 2**20, "current": current(), "releases": on_board(),
              "trusted_keys": sorted(trusted_keys().values())}  # fingerprints: the host stops an upload they refuse
    if release_id:
        answer["release"] = release_state(release_arg(release_id))  # active, installed (on the board, ready) or absent
    if key:
        answer["venv"] = (root() / VENVS / release_arg(key) / ".installed").is_file()
    done(answer)


def cmd_receive(release_id: str) -> None:
    release_id = release_arg(release_id)
    lock_board()
    done(receive(release_id))


def cmd_install(release_id: str) -> None:
    release_id = release_arg(release_id)
    lock_board()
    outlive_the_host()
    done({"installed": release_id, "venv": install(release_id) or "already"})


def cmd_health(release_id: str) -> None:
    done(health(release_arg(release_id, allow_current=True)))


def cmd_status() -> None:
    """Read-only (no lock): what the board runs, with a health check of `current` through `current`."""
    r, now = root(), current()
    keys = sorted(p.stem for p in (r / KEYS_DIR).glob("*.pub"))
    answer = {"root": str(r), "current": now, "history": history(), "releases": on_board(), "trusted_keys": keys,
              "details": {x: release_details(x) for x in on_board()},
              "venvs": sorted(v.name for v in (r / VENVS).glob("[!.]*")),
              "bytes": {"store": size_on_disk(r / "store"), "releases": size_on_disk(r / "releases"), "venvs": size_on_disk(r / VENVS)},
              "free_mb": shutil.disk_usage(r if r.exists() else Path.home()).free // 2**20}
    if now:
        try:
            answer["health"] = {"ok": True, **health(now, through=str(r / "current"))}
        except Refused as e:
            answer["health"] = {"ok": False, "error": str(e)}
    done(answer)



COMMANDS = {"preflight": cmd_preflight, "receive": cmd_receive, "install": cmd_install, "health": cmd_health,
            "activate": cmd_activate, "deploy": cmd_deploy, "rollback": cmd_rollback, "prune": cmd_prune, "status": cmd_status,
            "service": cmd_service, "trust": cmd_trust}
USAGE = {"trust": "KEYHEX [--add]", "deploy": "ID KEEP [--fresh-store]", "activate": "ID [KEEP] [--fresh-store]",
         "rollback": "[ID] [--fresh-store]"}  # where the parameters' names do not say it


def main(argv: list[str]) -> None:
    """Run the command `argv` names (argv: sys.argv[1:]) and exit with its status."""
    usage = f"usage: board_ops.py {'|'.join(COMMANDS)} [ARGS]"
    if not argv or argv[0] not in COMMANDS:
        done({"error": usage}, 2)
    name, args = argv[0], argv[1:]
    command = COMMANDS[name]
    try:
        inspect.signature(command).bind(*args)
    except TypeError:
        shown = USAGE.get(name) or " ".join(inspect.signature(command).parameters).upper()
        done({"error": f"usage: board_ops.py {name} {shown}".rstrip()}, 2)
    try:
        command(*args)
    except (Refused, EdgemetaError) as e:  # (EdgemetaError: edgemeta.atomic's, such as a write permission denied)
        done({"error": str(e)}, 3)
    except OSError as e:  # not foreseen above: still one line for the host, not a traceback
        done({"error": f"{name} failed: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")}, 3)
