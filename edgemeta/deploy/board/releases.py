"""The releases on a board and their venvs: which one is current, the history of activations, the
install of a release's runtime (a venv shared by the releases with the same runtime key) and its
health check (load the model, embed a sample, with the release's own edgemeta)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from edgemeta.deploy.board.base import (
    ACTIVATED,
    BUNDLE_FILE,
    INSTALLED,
    RELEASE_ID,
    VENVS,
    Refused,
    done,
    read_json,
    relink,
    root,
    run,
    write_text,
)


def history() -> list:
    p = root() / "history.json"
    return json.loads(p.read_text()) if p.exists() else []


def history_upto(now: str) -> list:
    """The activated releases, oldest first, ending with `now`. Entries after it were written by an
    activation killed before its switch, which never made them active."""
    h = history()
    return h[: h.index(now) + 1] if now in h else h


def current() -> str:
    link = root() / "current"
    return os.readlink(link).split("/")[-1] if link.is_symlink() else ""


def installed(release_id: str) -> bool:
    """The release's venv is complete. (A release activated before the INSTALLED mark existed was
    complete when it was activated: it is in history.json or current.)"""
    rel = root() / "releases" / release_id
    if (rel / INSTALLED).is_file():
        return True
    return (rel / "venv" / "bin" / "edgemeta").exists() and release_id in history() + [current()]


def release_state(release_id: str) -> str:
    return "active" if release_id == current() else "installed" if installed(release_id) else "absent"


def on_board() -> list[str]:
    rel = root() / "releases"
    return sorted(p.name for p in rel.glob("[!.]*")) if rel.is_dir() else []


def release_arg(release_id: str, allow_current: bool = False) -> str:
    """A release id given on the command line, checked before it is used in a path."""
    if allow_current and release_id == "current":
        return current()
    if not RELEASE_ID.fullmatch(release_id):
        done({"error": f"invalid release id {release_id[:80]!r}: letters, digits, '.', '_' and '-' only (at most 128), "
                       "starting with a letter or digit"}, 2)
    return release_id


def remove_half_built(spare: str = "") -> list[str]:
    """Remove uploads cut short, venvs and releases whose install never finished (the board lost power,
    or an older edgemeta left them); never `current` or `spare`. Under the lock."""
    rel = root() / "releases"
    removed = []
    for v in sorted((root() / VENVS).glob("[!.]*")):  # first: a release linking to one is then not installed
        if not (v / ".installed").is_file():
            shutil.rmtree(v, ignore_errors=True)
    for p in sorted(rel.glob(".*.partial")) + sorted(rel.glob("[!.]*")):
        if p.name.endswith(".partial") or (p.name not in (current(), spare) and not installed(p.name)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def venv_link(release_id: str) -> str:
    """The runtime key of the venv a release links to ("": a venv of its own, or none yet)."""
    link = root() / "releases" / release_id / "venv"
    return os.readlink(link).split("/")[-1] if link.is_symlink() else ""


def remove_unused_venvs() -> list[str]:
    """Remove the venvs no release on the board links to. Under the lock."""
    used = {venv_link(p.name) for p in (root() / "releases").glob("[!.]*")}
    removed = []
    for v in sorted((root() / VENVS).glob("[!.]*")):
        if v.name not in used:
            shutil.rmtree(v, ignore_errors=True)
            removed.append(v.name)
    return removed


def pip_hint(message: str, rel: Path) -> str:
    if "No matching distribution" in message and not (rel / "wheelhouse").is_dir():
        return (f"{message} (if this board has no internet access, deploy with --wheelhouse: the bundle then "
                "carries every wheel)")
    return message


def venv_name(info: dict, release_id: str) -> str:
    """The folder in ROOT/venvs a release runs in: BUNDLE.json's runtime key (a digest of its requirements,
    edgemeta's wheel and the Python it is for: bundle.runtime_key), or, for a bundle made before there
    were runtime keys, a venv of its own named by its release id."""
    key = info.get("runtime")
    return key if isinstance(key, str) and RELEASE_ID.fullmatch(key) else release_id


def install(release_id: str) -> str:
    """Link the release to the venv of its runtime, making that venv first unless it is complete
    already (ROOT/venvs/<key>/.installed): "made" (pip ran), "reused" (a model-only upgrade: no pip),
    or "" when the release was installed already. A failed install removes the release at once
    (never `current`) and the venv it was making: a half-built one is nothing to keep."""
    rel = root() / "releases" / release_id
    if installed(release_id):
        return ""
    try:
        info = json.loads((rel / BUNDLE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise Refused(f"release {release_id} is not on this board (or its {BUNDLE_FILE} is unreadable: {e})") from None
    venv = root() / VENVS / venv_name(info, release_id)
    made = "reused"
    try:
        wheel = f"wheels/{info['wheel']}"
        if wheel not in info["files"]:
            raise Refused(f"{BUNDLE_FILE} names the wheel {wheel!r}, which it does not list")
        if not (venv / ".installed").is_file():
            made = "made"
            shutil.rmtree(venv, ignore_errors=True)  # a venv is made where it stays: its scripts name their path
            venv.parent.mkdir(exist_ok=True)
            args = [sys.executable, "-m", "venv", str(venv)]
            if info.get("system_site_packages"):
                args.insert(3, "--system-site-packages")
            run(args)
            pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
            if (rel / "wheelhouse").is_dir():
                pip += ["--no-index", "--find-links", str(rel / "wheelhouse")]
            try:
                run(pip + ["-r", str(rel / "requirements.txt"), str(rel / wheel)])
            except Refused as e:
                raise Refused(pip_hint(str(e), rel)) from None
            write_text(venv / ".installed", "")
        link, tmp = rel / "venv", rel / ".venv.tmp"
        if link.is_dir() and not link.is_symlink():  # a venv of its own, half made by an older edgemeta
            shutil.rmtree(link)
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(f"../../{VENVS}/{venv.name}", tmp)
        os.replace(tmp, link)
    except BaseException:
        if not (venv / ".installed").is_file():
            shutil.rmtree(venv, ignore_errors=True)
        if release_id != current():
            shutil.rmtree(rel, ignore_errors=True)
        raise
    return made


def health(release_id: str, through: str = "", store: Path | None = None) -> dict:
    """Load the release's model and embed a sample with its own venv (`through`: by that path, such
    as ROOT/current, instead of releases/<release_id>); Refused when it fails."""
    rel = Path(through) if through else root() / "releases" / release_id
    exe = rel / "venv" / "bin" / "edgemeta"
    if store is None:  # the store it runs with
        store = rel / "store" if (rel / "store").is_dir() else root() / "store"
    try:
        p = subprocess.run([str(exe), "health", "--model", str(rel / "model"), "--store", str(store), "--json"],
                           capture_output=True, text=True)
    except OSError as e:
        raise Refused(f"health check failed: cannot run {exe}: {e.strerror}") from None
    if p.returncode != 0:
        raise Refused("health check failed: " + ((p.stderr or p.stdout).strip().splitlines() or ["?"])[-1][:300])
    return {"healthy": release_id, **json.loads(p.stdout)}


def switch(release_id: str) -> None:
    r = root()
    relink(r / "current", f"releases/{release_id}")
    try:  # when it was last active, for prune (rollbacks and roll-forwards count, as deploys do)
        (r / "releases" / release_id / ACTIVATED).touch()
    except OSError:
        pass


def last_active(release_id: str) -> int:
    """When release `release_id` last became current (ns), or -1 (never, or on a board older than this)."""
    try:
        return (root() / "releases" / release_id / ACTIVATED).stat().st_mtime_ns
    except OSError:
        return -1


def release_details(release_id: str) -> dict:
    """What a release on the board is: its model (name, algorithm, variant), runtime, venv, when it was built."""
    rel = root() / "releases" / release_id
    info, manifest = read_json(rel / BUNDLE_FILE), read_json(rel / "model" / "manifest.json")
    try:
        runtime = (rel / "requirements.txt").read_text().splitlines()[0]  # the interpreter package, pinned
    except (OSError, IndexError):
        runtime = ""
    wheel = str(info.get("wheel", "")).split("-")  # edgemeta-VERSION-py3-none-any.whl
    return {"state": release_state(release_id), "model": manifest.get("name", info.get("model", "")),
            "algorithm": manifest.get("algorithm", ""), "variant": info.get("variant") or manifest.get("default_variant", ""),
            "board": info.get("board", ""), "runtime": runtime, "edgemeta": wheel[1] if len(wheel) > 2 else "",
            "built": info.get("created", ""), "venv": venv_link(release_id)}


def size_on_disk(folder: Path) -> int:
    """Bytes of the files under `folder` (links not followed)."""
    total = 0
    for top, _, names in os.walk(folder):
        for n in names:
            try:
                total += os.lstat(os.path.join(top, n)).st_size
            except OSError:
                pass  # removed meanwhile
    return total

