"""The agent as a systemd service: the user it runs as, its unit (ROOT/edgemeta-agent.service, written
at activation, installed by `service`) and its restart after a switch."""

import os
import shutil
from pathlib import Path

from edgemeta.deploy.board.base import Refused, done, root, run, say
from edgemeta.deploy.board.releases import current

AGENT_UNIT = "edgemeta-agent"
UNIT_PATH = Path(f"/etc/systemd/system/{AGENT_UNIT}.service")


def agent_user() -> tuple[str, str]:
    """(user, group) the agent's systemd unit runs as: the one deploying (who owns ROOT and its store)."""
    import grp
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name


def unwritable(folder: Path) -> list[str]:
    """What in `folder` (itself included) the deploying user could not write."""
    paths = [folder, *folder.rglob("*")] if folder.exists() else []
    return [str(p) for p in paths if not p.is_symlink() and not os.access(p, os.W_OK)]


def systemd_runs() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def as_root(args: list) -> list:
    return args if os.getuid() == 0 else ["sudo", "-n", *args]  # -n: never wait for a password nobody types


def our_unit_installed() -> bool:
    """The agent's unit is installed in systemd and runs this root's `current`."""
    try:
        return f"{root().resolve()}/current/" in UNIT_PATH.read_text()
    except OSError:
        return False


def restart_agent() -> None:
    """After a switch: a running agent (the systemd service of this root) restarts on the new release;
    where it cannot, say so (the switch stands either way)."""
    if not (systemd_runs() and our_unit_installed()):
        return
    try:
        run(as_root(["systemctl", "try-restart", AGENT_UNIT]))
        say("agent", restarted=True)
    except Refused as e:
        say("agent", restarted=False, error=f"{e}; restart it: sudo systemctl restart {AGENT_UNIT}")


def cmd_service() -> None:
    """Install and start the agent's systemd unit (ROOT/edgemeta-agent.service, written at activation:
    User= the deploying user, Restart=on-failure, this root's store), with sudo -n unless root; where
    systemd does not run, answer how to start the agent instead."""
    unit = root() / "edgemeta-agent.service"
    if not current() or not unit.is_file():
        raise Refused("no release is active on this board: deploy one first")
    start = next((ln.split("=", 1)[1] for ln in unit.read_text().splitlines() if ln.startswith("ExecStart=")), "")
    if not systemd_runs():
        done({"service": "no systemd", "unit": str(unit), "command": start})
    sudo = "" if os.getuid() == 0 else "sudo "
    by_hand = f"{sudo}cp {unit} {UNIT_PATH} && {sudo}systemctl daemon-reload && {sudo}systemctl enable --now {AGENT_UNIT}"
    try:
        for args in (["cp", str(unit), str(UNIT_PATH)], ["systemctl", "daemon-reload"], ["systemctl", "enable", AGENT_UNIT],
                     ["systemctl", "restart", AGENT_UNIT]):
            run(as_root(args))
    except Refused as e:
        raise Refused(f"{e}; install it by hand on the board: {by_hand}") from None
    done({"service": "enabled", "unit": str(UNIT_PATH), "runs": start})

