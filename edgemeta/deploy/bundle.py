"""A bundle: one self-contained, checksummed and signed release of a model for one board profile.

    BUNDLE.json            board, model, variant, edgemeta version, sha256 of every other file, the
                           release id: model-variant-<digest of the content> (new_release_id), and the
                           runtime key (runtime_key): releases with the same one share a venv on a board
    BUNDLE.sig             ed25519 signature of BUNDLE.json by the user's key (deploy/signing.py)
    model/manifest.json    the manifest, reduced to the variant this board takes
    model/<variant>.tflite
    model/...              the files the model's head needs with that variant (its kind says which:
                           a linear head's arrays, a sequence head's graphs of the variant's quantisation)
    wheels/edgemeta-*.whl  edgemeta itself
    requirements.txt       the board's runtime, pinned
    wheelhouse/            optional: every wheel for the board's platform, for offline installs
    board.toml             the profile the bundle was made for
    edgemeta-agent.service systemd unit for `edgemeta serve` (a template: the board fills in its root
                           and the unprivileged user that deploys, who the agent runs as)
The bundle is refused before anything leaves the host when the board cannot run the model. A board
takes only the files BUNDLE.json lists, signed by the key it trusts (deploy/board_ops.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from edgemeta.atomic import NO_SPACE, NoSpaceError
from edgemeta.boards import Board, boards_dir, load_board
from edgemeta.deploy.board_ops import BUNDLE_FILE, SIGNATURE_FILE
from edgemeta.errors import EdgemetaError
from edgemeta.files import sha256_file
from edgemeta.runtime.manifest import Manifest, Variant, read_manifest
from edgemeta.runtime.tflite_info import read_structure

BASE_REQUIREMENTS = ["pillow>=9.1", "click>=8.1", "tflite>=2.10", "pyserial>=3.5"]  # Pillow 9.4: Debian bookworm


def requirements(board: Board) -> list[str]:
    rt = board.runtime
    return [f"{rt['package']}=={rt['version']}", rt.get("numpy", "numpy"), *BASE_REQUIREMENTS]


def check_model_for_board(model_dir: str | Path, board: Board) -> tuple[Manifest, Variant]:
    """(manifest, variant) the board will run, or an error saying why it cannot."""
    if not board.supported:
        raise EdgemetaError(f"board {board.name} is not supported: {board.raw.get('unsupported_reason', '')}")
    manifest = read_manifest(model_dir)
    name = board.variant
    if name not in manifest.variants:
        fix = "run `edgemeta edgetpu MODEL_DIR` where edgetpu_compiler is installed" if name == "edgetpu" else "re-export the model"
        raise EdgemetaError(f"board {board.name} takes the {name} variant, which {manifest.name} does not have; {fix}")
    # the head's own graphs (a sequence head's) run on the board's interpreter too
    paths = [manifest.model_path(name), *manifest.head.graphs(manifest.folder, manifest.variant(name))]
    for path in paths:
        problems = board.check_ops(read_structure(path).ops)
        if problems:
            raise EdgemetaError(f"{board.runtime['package']} {board.runtime['version']} on {board.name} cannot load {path.name}: "
                                + "; ".join(problems))
    if name == "edgetpu" or board.raw.get("delegate", {}).get("name") == "edgetpu":
        from edgemeta.host.edgetpu import static_check

        report = static_check(manifest.model_path("int8_static"))
        if not report.fully_mapped:
            raise EdgemetaError(f"{manifest.name} does not map fully to the Edge TPU: {'; '.join(report.problems)}")
    return manifest, manifest.variant(name)


def _edgemeta_wheel(dest: Path) -> Path:
    """Build edgemeta's own wheel from the source tree this package runs from."""
    src = Path(__file__).resolve().parents[2]
    if not (src / "pyproject.toml").is_file():
        raise EdgemetaError("bundling needs edgemeta's source tree (run from a git checkout installed with pip -e)")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest), str(src)],
                          capture_output=True, text=True)
    wheels = sorted(dest.glob("edgemeta-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise EdgemetaError(f"could not build the edgemeta wheel: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return wheels[-1]


def download_wheelhouse(board: Board, dest: Path) -> None:
    """Every wheel the board needs, for its platform and Python, so it installs without an index.

    Boards that take numpy and Pillow from the OS (32-bit Raspberry Pi OS: PyPI has no armv7l
    numpy) get the rest; their venv sees the OS packages (--system-site-packages)."""
    tags = []
    for tag in board.runtime["wheel_platforms"]:
        tags += ["--platform", tag]
    reqs = requirements(board)
    if board.runtime.get("system_packages"):
        reqs = [r for r in reqs if not r.lower().startswith(("numpy", "pillow"))]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", board.raw["python"],
           *tags, "-d", str(dest), *reqs]
    if board.runtime.get("system_packages"):
        cmd.insert(4, "--no-deps")  # numpy would be pulled in again by tflite-runtime and tflite
        cmd += ["flatbuffers"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgemetaError(f"pip could not download wheels for {board.name}: "
                            f"{(proc.stderr or proc.stdout).strip().splitlines()[-1][:300]}")


SERVICE = """[Unit]
Description=edgemeta few-shot agent
After=network.target

[Service]
User=@USER@
Group=@GROUP@
ExecStart=@ROOT@/current/venv/bin/edgemeta serve --model @ROOT@/current/model --store @ROOT@/store --socket @ROOT@/agent.sock
Restart=on-failure
RestartSec=2
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def _listed_files(folder: Path) -> set[str] | None:
    """The files of a bundle edgemeta wrote (from its BUNDLE.json, itself and BUNDLE.sig included), or None if it is none."""
    try:
        info = json.loads((folder / BUNDLE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != 1 or not isinstance(info.get("files"), dict):
        return None
    return {*info["files"], BUNDLE_FILE, SIGNATURE_FILE}


def _check_replaceable(out: Path) -> None:
    """`out` may be (re)written: it does not exist, is empty, or is a bundle edgemeta wrote and nothing else.
    Anything else may be a user's files, which a new bundle must never delete."""
    if out.is_symlink():
        raise EdgemetaError(f"{out} is a symbolic link; pass the folder it points to as --out")
    if not out.exists():
        return
    if not out.is_dir():
        raise EdgemetaError(f"{out} is a file, not a bundle folder; choose another --out")
    if not any(out.iterdir()):
        return
    listed = _listed_files(out)
    if listed is None:
        raise EdgemetaError(f"{out} is not empty and is not a bundle edgemeta wrote (no valid {BUNDLE_FILE}); "
                            "nothing was changed: choose a new or empty folder for --out, or move its files away")
    extra = sorted(rel for p in out.rglob("*") if not p.is_dir() and (rel := p.relative_to(out).as_posix()) not in listed)
    if extra:
        raise EdgemetaError(f"{out} is a bundle but also holds files that are not part of it ({', '.join(extra[:3])}"
                            f"{', ...' if len(extra) > 3 else ''}); nothing was changed: move them away or choose another --out")


def build_bundle(board_name: str, model_dir: str | Path, out: str | Path, wheelhouse: bool = False,
                 sign_key: str | Path | None = None, log=lambda msg: None) -> Path:
    """Write the bundle folder `out` for one board, signed with `sign_key` (default: the user's key,
    made on first use and said so through `log`); returns it.

    `out` must be new, empty, or a bundle edgemeta wrote (which is replaced). The bundle is built in a
    sibling folder and renamed into place only when complete: a failed build leaves `out` as it was."""
    from edgemeta.deploy.signing import sign_bundle, signing_key

    board = load_board(board_name)
    _check_replaceable(Path(out))  # before any work, so a refusal costs nothing
    key = signing_key(sign_key, log)
    manifest, variant = check_model_for_board(model_dir, board)
    final = Path(os.path.abspath(out))  # a real name to put siblings beside, even for "." or "a/.."
    final.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = final.with_name(f".{final.name}.building-{token}")  # same filesystem as `out`: the swap is a rename
    tmp.mkdir()
    try:
        _write_bundle(tmp, board, manifest, variant, wheelhouse)
        sign_bundle(tmp, key)
        _check_replaceable(final)  # again: someone may have put files there during the build
        if final.exists():
            old = final.with_name(f".{final.name}.old-{token}")
            final.rename(old)
            try:
                tmp.rename(final)
            except BaseException:
                old.rename(final)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # the failed build's half-written folder, never `out`
        if isinstance(e, OSError) and e.errno in NO_SPACE and not isinstance(e, EdgemetaError):
            raise NoSpaceError(f"no space left on the device to build the bundle in {final.parent} ({e.strerror}); "
                               f"free some space or choose another --out: {out} was not changed") from None
        raise
    return Path(out)


def wheel_digest(wheel: Path) -> str:
    """sha256 over the names and contents of a wheel's files: pip stamps every build's zip with the
    time, so two builds of the same source differ as files but not here."""
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            h.update(name.encode() + b"\0" + hashlib.sha256(z.read(name)).digest())
    return h.hexdigest()


def new_release_id(folder: Path, info: dict) -> str:
    """The release id of a bundle: model-variant-<digest> of what a board runs, so the same model with
    the same runtime (requirements, profile, edgemeta's own code) is the same release however often it
    is built. The digest covers BUNDLE.json's fields but its build time, and its files with their
    sha256, edgemeta's wheel by its contents and the wheelhouse left out (how the runtime is
    installed, not what). Not checked here: deploy checks it against board_ops.RELEASE_ID."""
    files = {}
    for name, digest in info["files"].items():
        if name.startswith("wheelhouse/"):
            continue
        files[name] = wheel_digest(folder / name) if name == f"wheels/{info.get('wheel')}" else digest
    content = {k: v for k, v in info.items() if k not in ("created", "files", "release")}
    canonical = json.dumps({**content, "files": files}, sort_keys=True).encode()
    return f"{info['model']}-{info['variant']}-{hashlib.sha256(canonical).hexdigest()[:12]}"


def runtime_key(folder: Path, info: dict) -> str:
    """The digest of what a release's venv holds: its pinned requirements, edgemeta's wheel (by its
    contents), the Python and architecture it is for, whether it sees the OS's packages. A board keeps
    one venv per key (ROOT/venvs/<key>), so a release that changes only the model installs nothing."""
    content = {"requirements": (folder / "requirements.txt").read_text(), "wheel": wheel_digest(folder / "wheels" / info["wheel"]),
               **{k: info[k] for k in ("python", "arch", "system_site_packages")}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _write_bundle(out: Path, board: Board, manifest: Manifest, variant: Variant, wheelhouse: bool) -> None:
    """Fill the empty folder `out` with the bundle."""
    (out / "model").mkdir()
    shutil.copy2(manifest.folder / variant.file, out / "model" / variant.file)
    reduced = dict(manifest.raw)
    for path in manifest.head.files(manifest.folder, variant):  # what the head needs with this variant, and only that
        shutil.copy2(path, out / "model" / path.name)
    if "head" in reduced:
        reduced["head"] = manifest.head.reduced(manifest.raw["head"], variant)
    reduced["variants"] = {variant.name: manifest.raw["variants"][variant.name]}
    reduced["default_variant"] = variant.name
    (out / "model" / "manifest.json").write_text(json.dumps(reduced, indent=2) + "\n")
    (out / "wheels").mkdir()
    wheel = _edgemeta_wheel(out / "wheels")
    (out / "requirements.txt").write_text("\n".join(requirements(board)) + "\n")
    if wheelhouse:
        download_wheelhouse(board, out / "wheelhouse")
    shutil.copy2(boards_dir() / f"{board.name}.toml", out / "board.toml")
    (out / "edgemeta-agent.service").write_text(SERVICE)  # @ROOT@ is filled in on the board at activation
    files = sorted(p for p in out.rglob("*") if p.is_file())
    info = {"format": 1, "board": board.name, "arch": board.raw["arch"], "python": board.raw["python"],
            "model": manifest.name, "variant": variant.name, "model_sha256": variant.sha256, "wheel": wheel.name,
            "system_site_packages": bool(board.runtime.get("system_packages")),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "files": {p.relative_to(out).as_posix(): sha256_file(p) for p in files}}
    info["runtime"] = runtime_key(out, info)
    info["release"] = new_release_id(out, info)
    (out / BUNDLE_FILE).write_text(json.dumps(info, indent=2) + "\n")
