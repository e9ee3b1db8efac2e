"""A bundle received from the host (a tar stream on stdin) and checked before it becomes a release
folder, so nothing of it runs unchecked: its BUNDLE.sig by a trusted key (trust.check_signature),
exactly the files BUNDLE.json lists, each with its sha256, and this board's architecture."""

import hashlib
import json
import os
import platform
import shutil
import sys
import tarfile
from pathlib import Path

from edgemeta.deploy.board.base import BUNDLE_FILE, SIGNATURE_FILE, Refused, root
from edgemeta.deploy.board.releases import release_state
from edgemeta.deploy.board.trust import check_signature, fingerprint


def sha256_path(path: Path) -> str:
    # as edgemeta.files.sha256_file, but a failure here is a Refused answer of the command table
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_files(folder: Path, files: dict) -> None:
    """The folder holds exactly BUNDLE.json, BUNDLE.sig and the listed files, each with its sha256."""
    dirs = {""}
    for name, digest in files.items():
        parts = name.split("/")
        if not isinstance(digest, str) or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise Refused(f"{BUNDLE_FILE} lists an unsafe or malformed entry {name[:80]!r}")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    expected = set(files) | {BUNDLE_FILE, SIGNATURE_FILE}
    unexpected = []
    for top, subdirs, names in os.walk(folder):
        here = Path(top).relative_to(folder).as_posix()
        here = "" if here == "." else here
        for n in subdirs + names:
            rel = f"{here}/{n}" if here else n
            path = Path(top) / n
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                unexpected.append(rel)
            elif path.is_dir() and rel not in dirs:
                unexpected.append(rel + "/")
                subdirs.remove(n)  # named once, not each file under it
            elif path.is_file() and rel not in expected:
                unexpected.append(rel)
    missing = sorted(n for n in files if not (folder / n).is_file() or (folder / n).is_symlink())
    changed = sorted(n for n, digest in files.items() if n not in missing and sha256_path(folder / n) != digest)
    if changed or missing or unexpected:
        shown = changed + [f"{n} missing" for n in missing] + [f"unexpected {e}" for e in sorted(unexpected)]
        raise Refused("checksum mismatch: " + ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else ""))


def check_bundle(folder: Path) -> tuple[dict, bytes]:
    """(BUNDLE.json, signing key) of a received bundle that may become a release."""
    try:
        manifest = (folder / BUNDLE_FILE).read_bytes()
        info = json.loads(manifest)
    except (OSError, ValueError) as e:
        raise Refused(f"{BUNDLE_FILE} unreadable: {e}") from None
    key = check_signature(folder, manifest)  # first: what follows trusts BUNDLE.json
    if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
        raise Refused(f"{BUNDLE_FILE} is not an edgemeta bundle manifest")
    check_files(folder, info["files"])
    if platform.machine() != info.get("arch"):
        raise Refused(f"bundle is for {info.get('arch')}, this board is {platform.machine()}")
    return info, key


def unpack(stream, part: Path) -> None:
    """Extract a tar stream into `part`; Refused when an entry is unsafe, the stream is cut short
    (the connection dropped) or the board cannot write it. A stream cut at a member boundary reads
    as a shorter archive: check_files then finds the files it lacks."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = Path(member.name)
                if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                    raise Refused(f"unsafe entry {member.name!r} in the bundle")
                tar.extract(member, part, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except getattr(tarfile, "FilterError", ()) as e:  # (Python 3.12+, and backports) before TarError, its base
        raise Refused(f"unsafe entry in the bundle: {e}") from None
    except (tarfile.TarError, EOFError) as e:
        raise Refused(f"the upload ended early or is not a tar stream ({e}): the connection may have dropped; "
                      "deploy again") from None
    except OSError as e:  # a full disk, most likely
        raise Refused(f"cannot unpack the upload into {part}: {e.strerror or e}") from None


def receive(release_id: str) -> dict:
    """Unpack a bundle (a tar stream on stdin) and check it (check_bundle) before it becomes
    ROOT/releases/<release_id>. The same release already installed there is kept (ids name the content)."""
    rel = root() / "releases"
    rel.mkdir(parents=True, exist_ok=True)
    for stale in rel.glob(".*.partial"):  # a transfer cut short by an earlier deploy
        shutil.rmtree(stale, ignore_errors=True)
    part = rel / f".{release_id}.partial"
    part.mkdir()
    try:
        unpack(sys.stdin.buffer, part)
        info, key = check_bundle(part)
        if info.get("release", release_id) != release_id:
            raise Refused(f"the bundle is release {str(info['release'])[:80]!r}, not {release_id}")
    except Refused:
        shutil.rmtree(part, ignore_errors=True)
        raise
    answer = {"received": release_id, "files": len(info["files"]), "key": fingerprint(key)}
    final = rel / release_id
    if release_state(release_id) != "absent":
        shutil.rmtree(part)
        return {**answer, "note": f"already on the board ({release_state(release_id)})"}
    if final.exists():  # a half-built earlier copy
        shutil.rmtree(final)
    os.rename(part, final)
    return answer

