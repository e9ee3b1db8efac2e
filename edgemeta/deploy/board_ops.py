"""Board-side release management, run over SSH with the board's own python3 (standard library only,
so it works before edgemeta is installed there). Deploy copies this file to ROOT/bin/ first.

    python3 board_ops.py COMMAND [ARGS]     ROOT: $EDGEMETA_ROOT, else ~/.edgemeta

    ROOT/releases/<id>/        one bundle each, with its own venv/
    ROOT/releases/.<id>.partial  an upload in progress (removed by the next receive)
    ROOT/current -> releases/<id>   switched atomically (symlink renamed over the old one)
    ROOT/history.json          activated releases, newest last (rollback goes one back)
    ROOT/store/                the enrollment store, shared by all releases

Exit status: 0 ok, 3 refused (checksum, health, nothing to roll back), 2 usage. The last line of
output is JSON for the host to read.
"""

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path


def root() -> Path:
    # a copy of edgemeta.runtime.paths.board_root (this file runs with the standard library alone)
    return Path(os.environ.get("EDGEMETA_ROOT") or "~/.edgemeta").expanduser()


def done(obj: dict, code: int = 0) -> None:
    print(json.dumps(obj))
    sys.exit(code)


def history() -> list:
    p = root() / "history.json"
    return json.loads(p.read_text()) if p.exists() else []


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def current() -> str:
    link = root() / "current"
    return os.readlink(link).split("/")[-1] if link.is_symlink() else ""


def cmd_preflight() -> None:
    r = root()
    st = shutil.disk_usage(r if r.exists() else Path.home())
    done({"arch": platform.machine(), "python": platform.python_version(), "glibc": " ".join(platform.libc_ver()),
          "root": str(r), "free_mb": st.free // 2**20, "current": current(),
          "releases": sorted(p.name for p in (r / "releases").glob("[!.]*")) if (r / "releases").exists() else []})


def cmd_receive(rid: str) -> None:
    rel = root() / "releases"
    rel.mkdir(parents=True, exist_ok=True)
    for stale in rel.glob(".*.partial"):  # a transfer cut short by an earlier deploy
        shutil.rmtree(stale, ignore_errors=True)
    part = rel / f".{rid}.partial"
    part.mkdir()
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
        for member in tar:
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                done({"error": f"unsafe entry {member.name!r} in the bundle"}, 3)
            tar.extract(member, part)
    final = rel / rid
    if final.exists() and rid != current():
        shutil.rmtree(final)
    if final.exists():
        shutil.rmtree(part)
        done({"received": rid, "note": "already present and active"})
    os.rename(part, final)
    done({"received": rid})


def cmd_verify(rid: str) -> None:
    rel = root() / "releases" / rid
    try:
        info = json.loads((rel / "BUNDLE.json").read_text())
    except (OSError, ValueError) as e:
        done({"error": f"BUNDLE.json unreadable: {e}"}, 3)
    present = {p.relative_to(rel).as_posix() for p in rel.rglob("*") if p.is_file() and "venv" not in p.relative_to(rel).parts}
    present.discard("BUNDLE.json")
    bad = sorted(name for name, digest in info["files"].items()
                 if not (rel / name).is_file() or hashlib.sha256((rel / name).read_bytes()).hexdigest() != digest)
    extra = sorted(present - set(info["files"]))
    if bad or extra:
        if rid != current():
            shutil.rmtree(rel, ignore_errors=True)
        done({"error": "checksum mismatch: " + ", ".join(bad + [f"unexpected {e}" for e in extra])}, 3)
    if platform.machine() != info["arch"]:
        done({"error": f"bundle is for {info['arch']}, this board is {platform.machine()}"}, 3)
    done({"verified": rid, "files": len(info["files"])})


def cmd_install(rid: str) -> None:
    rel = root() / "releases" / rid
    info = json.loads((rel / "BUNDLE.json").read_text())
    venv = rel / "venv"
    if not (venv / "bin" / "edgemeta").exists():
        shutil.rmtree(venv, ignore_errors=True)
        args = [sys.executable, "-m", "venv", str(venv)]
        if info.get("system_site_packages"):
            args.insert(3, "--system-site-packages")
        run(args)
        pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
        if (rel / "wheelhouse").is_dir():
            pip += ["--no-index", "--find-links", str(rel / "wheelhouse")]
        run(pip + ["-r", str(rel / "requirements.txt"), str(rel / "wheels" / info["wheel"])])
    done({"installed": rid})


def run(args: list) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} if os.environ.get("EDGEMETA_CLEAN_PIP") else None
    p = subprocess.run(args, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        done({"error": f"{Path(args[0]).name} failed: " + ((p.stderr or p.stdout).strip().splitlines() or ["?"])[-1][:300]}, 3)


def cmd_health(rid: str) -> None:
    rel = root() / "releases" / (rid if rid != "current" else current())
    exe = rel / "venv" / "bin" / "edgemeta"
    p = subprocess.run([str(exe), "health", "--model", str(rel / "model"), "--store", str(root() / "store"), "--json"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        done({"error": "health check failed: " + ((p.stderr or p.stdout).strip().splitlines() or ["?"])[-1][:300]}, 3)
    done({"healthy": rel.name, **json.loads(p.stdout)})


def switch(rid: str) -> None:
    r = root()
    tmp = r / ".current.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(f"releases/{rid}", tmp)
    os.replace(tmp, r / "current")  # rename(2) over the old link: atomic


def cmd_activate(rid: str) -> None:
    if not (root() / "releases" / rid / "venv" / "bin" / "edgemeta").exists():
        done({"error": f"release {rid} is not installed"}, 3)
    previous = current()
    switch(rid)
    h = [x for x in history() if x != rid] + [rid]
    write_atomic(root() / "history.json", json.dumps(h))
    (root() / "store").mkdir(exist_ok=True)
    unit = root() / "releases" / rid / "edgemeta-agent.service"
    if unit.exists():  # ready for `sudo cp ROOT/edgemeta-agent.service /etc/systemd/system/`
        write_atomic(root() / "edgemeta-agent.service", unit.read_text().replace("@ROOT@", str(root().resolve())))
    done({"active": rid, "previous": previous})


def cmd_rollback() -> None:
    h = history()
    now = current()
    older = [x for x in h if x != now and (root() / "releases" / x / "venv").exists()]
    if not older:
        done({"error": "no earlier release to roll back to"}, 3)
    target = older[-1]
    switch(target)
    write_atomic(root() / "history.json", json.dumps([x for x in h if x != now]))
    done({"active": target, "rolled_back_from": now})


def cmd_prune(keep: str) -> None:
    h, now = history(), current()
    keep_set = set(h[-int(keep):]) | {now}
    removed = []
    for p in (root() / "releases").glob("[!.]*"):
        if p.name not in keep_set:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    done({"removed": removed})


def cmd_status() -> None:
    done({"current": current(), "history": history(),
          "releases": sorted(p.name for p in (root() / "releases").glob("[!.]*")) if (root() / "releases").exists() else []})


COMMANDS = {"preflight": cmd_preflight, "receive": cmd_receive, "verify": cmd_verify, "install": cmd_install,
            "health": cmd_health, "activate": cmd_activate, "rollback": cmd_rollback, "prune": cmd_prune, "status": cmd_status}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        done({"error": f"usage: board_ops.py {'|'.join(COMMANDS)} [ARGS]"}, 2)
    COMMANDS[sys.argv[1]](*sys.argv[2:])
