"""Board-side release management, run over SSH with the board's own python3 (standard library only,
so it works before edgemeta is installed there). Deploy copies this file to the board first.

    python3 board_ops.py COMMAND [ARGS]     ROOT: $EDGEMETA_ROOT, else ~/.edgemeta

    ROOT/releases/<id>/        one bundle each; venv -> ../../venvs/<runtime key> once installed
    ROOT/releases/.<id>.partial  an upload in progress (removed by the next receive)
    ROOT/venvs/<key>/          a runtime venv (made here; <key>/.installed once complete), shared by the
                               releases whose BUNDLE.json names that runtime key: a model-only upgrade
                               reuses it (no pip); prune removes the ones no kept release links to
    ROOT/current -> releases/<id>   switched atomically (symlink renamed over the old one)
    ROOT/history.json          activated releases, oldest first; `current` is one of them (rollback steps
                               back through it, `rollback --to ID` jumps to any release on the board;
                               an activation drops the entries after current and appends its release)
    ROOT/stores/<id>/          the enrollment store of release <id>, made when <id> is activated from the
                               store being left: its kept samples re-embedded by <id>'s own edgemeta when
                               the model changed (`reenroll --out`), the same store when it did not. The
                               store being left is only read, so a rollback carries again (enrollments
                               made since come along); a store a later carry replaces goes to
                               ROOT/stores/.archive/, never deleted
    ROOT/releases/<id>/store -> ../../stores/<id>   so that switching `current` switches model and store at once
    ROOT/store -> current/store   the path the agent, `remote` and operators use (an older board's
                               ROOT/store folder becomes ROOT/stores/<current id> at its next activation)
    ROOT/trusted_keys/<fingerprint>.pub   ed25519 public keys (hex) that may sign bundles, each put
                               there by `trust KEYHEX` (over the host's ssh login, which is what
                               authenticates it: `edgemeta deploy --trust-key`); none at first, and
                               a board that trusts no key takes no bundle (no trust on first use)
    ROOT/edgemeta-agent.service  the agent's systemd unit (`service` installs it where systemd runs)
    ROOT/.lock                 held by the one command changing the board (deploy, activate, rollback, ...)

`deploy ID KEEP [--fresh-store]` is a whole deploy in one process, which goes on when the host's ssh
dies: receive the bundle from stdin, install its venv, carry the store to it (or, with --fresh-store,
give it an empty one: the old store stays where it is), health-check the new release with it, write
history.json and the agent's unit, switch `current`, check again through `current` (switching back if
that fails), prune. A store that cannot be carried (it kept no samples, or the new model takes
another input) stops the deploy before anything changed, saying so.
`current` never names a release whose health check has not passed; a release whose install or
check failed is removed at once. `activate ID [KEEP]` does the same for a release on the board;
`rollback [ID]` too (health check of the target, switch, check through `current`, switch back).

`receive` checks a bundle before it becomes a release folder, so nothing of it runs unchecked: its
BUNDLE.sig must be an ed25519 signature, by a trusted key, over SIGNED_PREFIX + BUNDLE.json (strict
verification: see ed25519_verify), and the folder must hold exactly the files BUNDLE.json lists (no
more, none missing), each with its sha256. Release ids match RELEASE_ID; a bundle that names its
release in BUNDLE.json must be that one. A board that trusts no key yet refuses every bundle, saying
how to trust yours.

`trust KEYHEX [--add]` trusts an ed25519 public key (64 hex digits) from now on, under the lock, in
one atomic write. It refuses a key no signer can have (not a canonical point, of small order, not in
the prime-order subgroup: public_key_problem), and, on a board that trusts other keys already, any
key unless --add says to trust it beside them. A key trusted already is no change.

Exit status: 0 ok, 3 refused (signature, checksum, an upload cut short, install, health, a full disk,
another deploy running, nothing to roll back), 2 usage. The last line of output is JSON for the host
to read; lines before it ({"event": ...}) say how far a deploy got.
"""

import datetime as dt
import errno
import fcntl
import hashlib
import inspect
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

BUNDLE_FILE = "BUNDLE.json"
SIGNATURE_FILE = "BUNDLE.sig"
SIGNED_PREFIX = b"edgemeta bundle v1\n"  # the signature covers this prefix and BUNDLE.json's bytes
RELEASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a file name: no '/', no leading '.' or '-'
KEYS_DIR = "trusted_keys"


class Refused(Exception):
    """A bundle this board will not take; the message says why, in one line."""


def root() -> Path:
    # a copy of edgemeta.runtime.paths.board_root (this file runs with the standard library alone)
    return Path(os.environ.get("EDGEMETA_ROOT") or "~/.edgemeta").expanduser()


def done(obj: dict, code: int = 0) -> None:
    try:
        print(json.dumps(obj), flush=True)
    except OSError:  # the host went away; what was done is done
        sys.stdout = open(os.devnull, "w")
    sys.exit(code)


def release_arg(rid: str, allow_current: bool = False) -> str:
    """A release id given on the command line, checked before it is used in a path."""
    if allow_current and rid == "current":
        return current()
    if not RELEASE_ID.fullmatch(rid):
        done({"error": f"invalid release id {rid[:80]!r}: letters, digits, '.', '_' and '-' only (at most 128), "
                       "starting with a letter or digit"}, 2)
    return rid


# --- ed25519 verification (RFC 8032, sections 5.1.1-5.1.7), standard library only ---------------
# Points in extended coordinates (X, Y, Z, T): x = X/Z, y = Y/Z, x*y = T/Z, on -x^2 + y^2 = 1 + d x^2 y^2.
#
# The curve's group has 8 * L points: a subgroup of prime order L, where the base point B and every
# real key and every real R (= [r]B) lie, and 8 points of small order (the identity among them). RFC
# 8032 lets a verifier take any point, and so does its cofactored equation; this one is strict
# (the "strict" column of "Taming the many EdDSAs", Chalkias et al. 2020), because a board must never take
# a signature anyone could have made:
#   - a public key or R of small order: with A = identity, R = identity and S = 0 the equation holds for
#     every message: a signature anyone can make (the identity key 0100..00 is such a key);
#   - a public key with a small-order part (mixed order, [L]A != identity): no signer's key is one, and
#     with one the equation holds or not depending on the verifier's choice of equation;
#   - an encoding that is not the canonical one of its point (y >= p; x = 0 with the sign bit set), S >= L,
#     a key or signature of the wrong length: one signature would have several spellings.
# With A and B in the prime-order subgroup, the cofactorless equation [S]B = R + [k]A checked here also
# refuses an R with a small-order part, which the cofactored one ([8][S]B = [8]R + [8][k]A) would take.

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493  # the order of the base point
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_IDENTITY = (0, 1, 1, 0)


def _add(p: tuple, q: tuple) -> tuple:
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = 2 * _D * t1 * t2 % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _double(p: tuple) -> tuple:
    x1, y1, z1, _ = p
    a, b = x1 * x1 % _P, y1 * y1 % _P
    c = 2 * z1 * z1 % _P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1)
    g = a - b
    f = c + g
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _neg(p: tuple) -> tuple:
    return (-p[0]) % _P, p[1], p[2], (-p[3]) % _P


def _multiply(n: int, p: tuple) -> tuple:
    """[n]P, double and add (public scalars only: the time depends on n)."""
    q = _IDENTITY
    for i in range(n.bit_length() - 1, -1, -1):
        q = _double(q)
        if (n >> i) & 1:
            q = _add(q, p)
    return q


def _is_identity(p: tuple) -> bool:
    x, y, z, _ = p
    return x % _P == 0 and (y - z) % _P == 0


def _small_order(p: tuple) -> bool:
    """[8]P is the identity: P is one of the 8 points of small order (the identity included)."""
    return _is_identity(_double(_double(_double(p))))


def _decode_point(s: bytes) -> tuple | None:
    """Section 5.1.3: the point a 32-byte string encodes, or None where it encodes none or is not its
    point's canonical encoding (y >= p; x = 0 with the sign bit set): one point, one encoding."""
    if len(s) != 32:
        return None
    n = int.from_bytes(s, "little")
    x_0, y = n >> 255, n & ((1 << 255) - 1)
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P  # a candidate root of u/v
    if v * x * x % _P == (-u) % _P:
        x = x * _SQRT_M1 % _P
    if v * x * x % _P != u:
        return None
    if x == 0 and x_0:
        return None
    if x & 1 != x_0:
        x = _P - x
    return x, y, 1, x * y % _P


_B = _decode_point((4 * pow(5, _P - 2, _P) % _P).to_bytes(32, "little"))  # y = 4/5, x even


def _public_point(public_key: bytes) -> tuple[tuple | None, str]:
    """(the point, "") of a key a signer can have, else (None, why not): not 32 bytes, not the canonical
    encoding of a curve point, of small order, or not in the prime-order subgroup."""
    if len(public_key) != 32:
        return None, f"{len(public_key)} bytes, not 32"
    a = _decode_point(public_key)
    if a is None:
        return None, "not the canonical encoding of a curve point"
    if _small_order(a):
        return None, "a point of small order (such as the identity), for which anyone can sign"
    if not _is_identity(_multiply(_L, a)):
        return None, "a point outside the prime-order subgroup (of mixed order), which no signer has"
    return a, ""


def public_key_problem(public_key: bytes) -> str:
    """Why `public_key` cannot be a signer's ed25519 public key, "" when it can (see _public_point)."""
    return _public_point(public_key)[1]


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Section 5.1.7, strict: True when `signature` is `public_key`'s signature of `message` (PureEdDSA,
    Ed25519). Refused besides: a public key that public_key_problem names, an R of small order or not
    canonically encoded, S >= L (see the comment above _P for why each)."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    r, s = _decode_point(signature[:32]), int.from_bytes(signature[32:], "little")
    if r is None or _small_order(r) or s >= _L:  # (the cheap checks first)
        return False
    a = _public_point(public_key)[0]
    if a is None:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % _L
    table = {(1, 0): _B, (0, 1): _neg(a), (1, 1): _add(_B, _neg(a))}
    q = _IDENTITY  # [S]B - [k]A, both scalars walked bit by bit at once (Straus)
    for i in range(max(s.bit_length(), k.bit_length()) - 1, -1, -1):
        q = _double(q)
        bits = ((s >> i) & 1, (k >> i) & 1)
        if bits != (0, 0):
            q = _add(q, table[bits])
    return _is_identity(_add(q, _neg(r)))  # [S]B - [k]A - R: cofactorless, so R is in the subgroup too


# --- bundle checks --------------------------------------------------------------------------------

def fingerprint(public_key: bytes) -> str:
    """How a key is named to people and in trusted_keys/ (the host's edgemeta prints the same)."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def trusted_keys() -> dict[bytes, str]:
    """{public key: fingerprint} of the keys this board takes bundles from."""
    keys = {}
    for path in sorted((root() / KEYS_DIR).glob("*.pub")):
        try:
            key = bytes.fromhex(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            key = b""
        if len(key) != 32:
            raise Refused(f"{path} is not an ed25519 public key (64 hex digits); fix or remove it")
        keys[key] = fingerprint(key)
    return keys


NO_TRUSTED_KEY = ("this board trusts no signing key yet: deploy with `edgemeta deploy --trust-key` (it sends the "
                  "bundle's key {fp} over your ssh login to be trusted), or run `python3 board_ops.py trust KEYHEX` on the board")


def check_signature(folder: Path, manifest: bytes) -> bytes:
    """The signing key, once BUNDLE.sig checks out against `manifest` and its key is trusted here."""
    try:
        sig = json.loads((folder / SIGNATURE_FILE).read_text())
    except FileNotFoundError:
        raise Refused(f"the bundle is not signed (no {SIGNATURE_FILE}); build it with `edgemeta bundle`, which signs it") from None
    except (OSError, ValueError) as e:
        raise Refused(f"{SIGNATURE_FILE} unreadable: {e}") from None
    try:
        if sig.get("algorithm") != "ed25519":
            raise ValueError(f"algorithm {sig.get('algorithm')!r}, not ed25519")
        key, signature = bytes.fromhex(sig["public_key"]), bytes.fromhex(sig["signature"])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise Refused(f"{SIGNATURE_FILE} is not an edgemeta bundle signature: {e}") from None
    trusted = trusted_keys()
    if not trusted:
        raise Refused(NO_TRUSTED_KEY.format(fp=fingerprint(key)))
    if key not in trusted:
        raise Refused(f"the bundle is signed by key {fingerprint(key)}, which this board does not trust (it trusts "
                      f"{', '.join(sorted(trusted.values()))}): sign it with that key, or trust this one beside it "
                      "(edgemeta deploy --trust-key --add-key)")
    if not ed25519_verify(key, SIGNED_PREFIX + manifest, signature):
        raise Refused(f"bad signature: {BUNDLE_FILE} was changed after it was signed with key {fingerprint(key)}")
    return key


def sha256_path(path: Path) -> str:
    # a copy of edgemeta.runtime.manifest.sha256_file (this file runs with the standard library alone)
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


# --- commands -------------------------------------------------------------------------------------

LOCK_FILE = ".lock"  # ROOT/.lock: held (flock) by whatever changes releases, current or history.json
INSTALLED = "venv/.installed"  # in a release: its venv is complete (pip succeeded; through the venv link)
VENVS = "venvs"  # ROOT/venvs/<runtime key>/: the venvs, shared by releases with the same runtime
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# what this file writes in ROOT (.trusted_keys.PID.tmp: left by the trust on first use of older versions)
TEMP_NAMES = re.compile(r"\.(current|history\.json|edgemeta-agent\.service|trusted_keys|store)\..+\.tmp")
_lock_fd = -1
STORES = "stores"  # ROOT/stores/<release id>/: each release's enrollment store
ACTIVATED = ".activated"  # ROOT/releases/<id>/.activated: its mtime is when the release last became current
STORE_FILE = "store.npz"  # edgemeta.runtime.store.STORE_FILE (this file runs with the standard library alone)
UNPAIRED = ".unpaired"  # ROOT/stores/.unpaired: an older board's store, found before any release was active
_store_lock_fd = -1  # the store being carried, held from its snapshot until `current` has switched


def lock_board() -> None:
    """Take ROOT/.lock for the rest of this process (the kernel drops it when the process ends, killed
    or not), so two deploys or rollbacks never interleave; then remove what killed ones left behind."""
    global _lock_fd
    r = root()
    r.mkdir(parents=True, exist_ok=True)
    _lock_fd = os.open(r / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(_lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Refused("another deploy or rollback is changing this board right now; wait until it is done and "
                      "try again") from None
    for p in r.iterdir():  # nobody else writes here while the lock is held: these are a killed writer's
        if TEMP_NAMES.fullmatch(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in (r / KEYS_DIR).glob(".*.tmp"):  # a killed `trust`'s write_atomic
        p.unlink()
    for p in (r / STORES).glob(".*.carry"):  # a killed carry's (the store it read is untouched)
        shutil.rmtree(p, ignore_errors=True)
    for p in (r / STORES).glob(".*.snapshot"):
        shutil.rmtree(p, ignore_errors=True)
    for p in (r / "releases").glob("*/.store.*.tmp"):
        p.unlink()
    settle_stores()


def outlive_the_host() -> None:
    """A transaction finishes on its own once it has started: the host's ssh may die (killed, the
    connection dropped) and take stdout with it; the board must not stop half way."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited by pip and the health check


def say(event: str, **fields) -> None:
    """A progress line for the host (it shows them as they come); nobody may be listening any more."""
    try:
        print(json.dumps({"event": event, **fields}), flush=True)
    except OSError:
        sys.stdout = open(os.devnull, "w")


def history() -> list:
    p = root() / "history.json"
    return json.loads(p.read_text()) if p.exists() else []


def history_upto(now: str) -> list:
    """The activated releases, oldest first, ending with `now`. Entries after it were written by an
    activation killed before its switch, which never made them active."""
    h = history()
    return h[: h.index(now) + 1] if now in h else h


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: a temporary file of its own (never one a killed writer left), fsync,
    rename, fsync the folder (so the rename survives a power cut). On any error the temporary file is
    removed and `path` is as it was; a full disk is a Refused."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise Refused(f"no space left on the board to write {path} ({e.strerror}); free some space and deploy "
                          "again: nothing was changed") from None
        raise
    fsync_dir(path.parent)


def current() -> str:
    link = root() / "current"
    return os.readlink(link).split("/")[-1] if link.is_symlink() else ""


def installed(rid: str) -> bool:
    """The release's venv is complete. (A release activated before the INSTALLED mark existed was
    complete when it was activated: it is in history.json or current.)"""
    rel = root() / "releases" / rid
    if (rel / INSTALLED).is_file():
        return True
    return (rel / "venv" / "bin" / "edgemeta").exists() and rid in history() + [current()]


def release_state(rid: str) -> str:
    return "active" if rid == current() else "installed" if installed(rid) else "absent"


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


def venv_link(rid: str) -> str:
    """The runtime key of the venv a release links to ("": a venv of its own, or none yet)."""
    link = root() / "releases" / rid / "venv"
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


def cmd_preflight(rid: str = "", key: str = "") -> None:
    """The board as deploy sees it first: architecture, Python, glibc, space, `current`; with RID, that
    release's state; with KEY, whether the venv of that runtime key is complete here (then an install
    is a link, no pip)."""
    r = root()
    st = shutil.disk_usage(r if r.exists() else Path.home())
    answer = {"arch": platform.machine(), "python": platform.python_version(), "glibc": " ".join(platform.libc_ver()),
              "root": str(r), "free_mb": st.free // 2**20, "current": current(), "releases": on_board(),
              "trusted_keys": sorted(trusted_keys().values())}  # fingerprints: the host stops an upload they refuse
    if rid:
        answer["release"] = release_state(release_arg(rid))  # active, installed (on the board, ready) or absent
    if key:
        answer["venv"] = (root() / VENVS / release_arg(key) / ".installed").is_file()
    done(answer)


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


def receive(rid: str) -> dict:
    """Unpack a bundle (a tar stream on stdin) and check it (check_bundle) before it becomes
    ROOT/releases/<rid>. The same release already installed there is kept (ids name the content)."""
    rel = root() / "releases"
    rel.mkdir(parents=True, exist_ok=True)
    for stale in rel.glob(".*.partial"):  # a transfer cut short by an earlier deploy
        shutil.rmtree(stale, ignore_errors=True)
    part = rel / f".{rid}.partial"
    part.mkdir()
    try:
        unpack(sys.stdin.buffer, part)
        info, key = check_bundle(part)
        if info.get("release", rid) != rid:
            raise Refused(f"the bundle is release {str(info['release'])[:80]!r}, not {rid}")
    except Refused:
        shutil.rmtree(part, ignore_errors=True)
        raise
    answer = {"received": rid, "files": len(info["files"]), "key": fingerprint(key)}
    final = rel / rid
    if release_state(rid) != "absent":
        shutil.rmtree(part)
        return {**answer, "note": f"already on the board ({release_state(rid)})"}
    if final.exists():  # a half-built earlier copy
        shutil.rmtree(final)
    os.rename(part, final)
    return answer


def cmd_receive(rid: str) -> None:
    rid = release_arg(rid)
    lock_board()
    done(receive(rid))


def cmd_trust(keyhex: str, add: str = "") -> None:
    """Trust the ed25519 public key KEYHEX (64 hex digits) to sign bundles from now on: an explicit step,
    run over the host's ssh login (edgemeta deploy --trust-key), never implied by a bundle. Refuses a
    key no signer can have (public_key_problem) and, where the board trusts other keys, any key
    unless `--add`."""
    if add not in ("", "--add") or not re.fullmatch(r"[0-9a-fA-F]{64}", keyhex):
        done({"error": f"usage: board_ops.py trust KEYHEX [--add] (KEYHEX: the ed25519 public key, 64 hex digits; "
                       f"not {(keyhex if add in ('', '--add') else add)[:80]!r})"}, 2)
    key = bytes.fromhex(keyhex)
    fp = fingerprint(key)
    problem = public_key_problem(key)
    if problem:
        raise Refused(f"key {fp} is not an ed25519 public key a signer can have ({problem}): not trusted")
    lock_board()  # one `trust` or deploy at a time: two first trusts never both win
    trusted = trusted_keys()
    if key in trusted:
        done({"trusted": fp, "keys": sorted(trusted.values()), "note": "trusted already"})
    if trusted and not add:
        raise Refused(f"this board trusts key {', '.join(sorted(trusted.values()))} already, not {fp}: to trust {fp} "
                      "beside it, say so (board_ops.py trust KEYHEX --add; edgemeta deploy --trust-key --add-key)")
    folder = root() / KEYS_DIR
    if not folder.is_dir():
        folder.mkdir(mode=0o755)
        fsync_dir(root())
    write_atomic(folder / f"{fp}.pub", key.hex() + "\n")
    done({"trusted": fp, "keys": sorted([*trusted.values(), fp])})


def pip_hint(message: str, rel: Path) -> str:
    if "No matching distribution" in message and not (rel / "wheelhouse").is_dir():
        return (f"{message} (if this board has no internet access, deploy with --wheelhouse: the bundle then "
                "carries every wheel)")
    return message


def runtime_key(info: dict, rid: str) -> str:
    """Which venv a release runs in: BUNDLE.json's runtime key (a digest of its requirements, edgemeta's
    wheel and the Python it is for: bundle.runtime_key), or, for a bundle made before there were
    runtime keys, a venv of its own named by its release id."""
    key = info.get("runtime")
    return key if isinstance(key, str) and RELEASE_ID.fullmatch(key) else rid


def install(rid: str) -> str:
    """Link the release to the venv of its runtime, making that venv first unless it is complete
    already (ROOT/venvs/<key>/.installed): "made" (pip ran), "reused" (a model-only upgrade: no pip),
    or "" when the release was installed already. A failed install removes the release at once
    (never `current`) and the venv it was making: a half-built one is nothing to keep."""
    rel = root() / "releases" / rid
    if installed(rid):
        return ""
    try:
        info = json.loads((rel / BUNDLE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise Refused(f"release {rid} is not on this board (or its {BUNDLE_FILE} is unreadable: {e})") from None
    venv = root() / VENVS / runtime_key(info, rid)
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
            write_atomic(venv / ".installed", "")
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
        if rid != current():
            shutil.rmtree(rel, ignore_errors=True)
        raise
    return made


def cmd_install(rid: str) -> None:
    rid = release_arg(rid)
    lock_board()
    outlive_the_host()
    done({"installed": rid, "venv": install(rid) or "already"})


def run(args: list) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} if os.environ.get("EDGEMETA_CLEAN_PIP") else None
    p = subprocess.run(args, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise Refused(f"{Path(args[0]).name} failed: " + ((p.stderr or p.stdout).strip().splitlines() or ["?"])[-1][:300])


def health(rid: str, through: str = "", store: Path | None = None) -> dict:
    """Load the release's model and embed a sample with its own venv (`through`: by that path, such
    as ROOT/current, instead of releases/<rid>); Refused when it fails."""
    rel = Path(through) if through else root() / "releases" / rid
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
    return {"healthy": rid, **json.loads(p.stdout)}


def cmd_health(rid: str) -> None:
    done(health(release_arg(rid, allow_current=True)))


# --- the enrollment store, carried from release to release ---------------------------------------

def store_of(rid: str) -> Path:
    return root() / STORES / rid


def relink(link: Path, target: str) -> None:
    """Point the symlink `link` at `target` in one rename(2) over the old link (a temporary link of
    its own first, .NAME.PID.tmp, which lock_board removes when a killed writer left it)."""
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def settle_stores() -> None:
    """Make the store layout whole (under the board lock): an older board's ROOT/store folder, shared by
    every release, becomes the active release's (or, before any release, the one the first activation
    carries from); the active release has its store and link; ROOT/store points at current/store.
    Each step is one rename, and one killed midway is finished by the next call."""
    r, now = root(), current()
    legacy = r / "store"
    if legacy.is_dir() and not legacy.is_symlink():
        (r / STORES).mkdir(exist_ok=True)
        dest = store_of(now) if now else r / STORES / UNPAIRED
        if dest.exists():
            archive_store(dest, "replaced")
        os.rename(legacy, dest)
        fsync_dir(r)
    if now:  # (a board with no release yet is left as it is)
        store_of(now).mkdir(parents=True, exist_ok=True)
        link = r / "releases" / now / "store"
        if not link.is_symlink():
            relink(link, f"../../{STORES}/{now}")
        if not legacy.is_symlink():
            relink(legacy, "current/store")


def archive_store(folder: Path, why: str) -> Path:
    """Move a store folder aside into ROOT/stores/.archive/ (a store is never deleted)."""
    dest = root() / STORES / ".archive" / f"{folder.name.lstrip('.')}-{why}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(folder, dest)
    return dest


def prepare_store(rid: str, fresh: bool) -> tuple[dict, Path]:
    """The store release `rid` will have, built in ROOT/stores/.<rid>.carry (under the board lock;
    commit_store puts it in place, discard_store drops it): the active release's store (or an
    older board's unpaired one), re-embedded by `rid`'s own edgemeta when its model differs (the
    source is only read: a snapshot is re-embedded), or an empty one when there is nothing to carry
    or `fresh`. The source's lock is held from the snapshot until `current` has switched
    (release_store_lock), so no enrollment slips between the two. Refused, with nothing changed,
    when the store cannot be carried."""
    global _store_lock_fd
    now = current()
    src = store_of(now) if now else root() / STORES / UNPAIRED
    (root() / STORES).mkdir(exist_ok=True)
    work, snap = root() / STORES / f".{rid}.carry", root() / STORES / f".{rid}.snapshot"
    for p in (work, snap):
        shutil.rmtree(p, ignore_errors=True)
    has = (src / STORE_FILE).is_file()
    info: dict = {"carried": "nothing to carry"}
    if has and fresh:
        info = {"carried": f"fresh: {rid} starts with an empty store; the one before stays in {src}"}
    if not has or fresh:
        work.mkdir()
    else:
        _store_lock_fd = os.open(src / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(_store_lock_fd, fcntl.LOCK_EX)  # an enroll in progress finishes first
        try:
            snap.mkdir()
            shutil.copy2(src / STORE_FILE, snap / STORE_FILE)
            info = reembed(rid, snap, work)
        except BaseException:
            release_store_lock()
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(snap, ignore_errors=True)
    return info, work


def discard_store(work: Path) -> None:
    release_store_lock()
    shutil.rmtree(work, ignore_errors=True)


def commit_store(rid: str, work: Path) -> None:
    """Put the store prepare_store built in place for `rid`, just before `current` switches to it."""
    target = store_of(rid)
    if target.exists():  # a release activated before (a rollback): its old store is kept, not reused
        archive_store(target, "replaced")
    os.rename(work, target)
    relink(root() / "releases" / rid / "store", f"../../{STORES}/{rid}")


def reembed(rid: str, snapshot: Path, out: Path) -> dict:
    """`edgemeta reenroll --out` of release `rid` (else of the active release, when rid's edgemeta is
    older than --out) on the snapshot, into `out`: {carried, classes, samples, ...}."""
    rel = root() / "releases" / rid
    tools = [rel / "venv" / "bin" / "edgemeta"]
    if current():
        tools.append(root() / "current" / "venv" / "bin" / "edgemeta")
    last = ""
    for exe in tools:
        try:
            p = subprocess.run([str(exe), "reenroll", "--model", str(rel / "model"), "--store", str(snapshot), "--out", str(out),
                                "--json"], capture_output=True, text=True)
        except OSError as e:
            last = f"cannot run {exe}: {e.strerror}"
            continue
        if p.returncode == 0:
            return json.loads(p.stdout.strip().splitlines()[-1])
        last = ((p.stderr or p.stdout).strip().splitlines() or ["?"])[-1].removeprefix("error: ")[:300]
        shutil.rmtree(out, ignore_errors=True)
        if "--out" not in last:  # a real answer, not an edgemeta too old to know the option
            break
    raise Refused(f"the board's store cannot be carried to {rid}: {last}; nothing was changed. To start {rid} with an "
                  f"empty store instead (the current one stays on the board, in ROOT/{STORES}/), deploy with --fresh-store")


def release_store_lock() -> None:
    global _store_lock_fd
    if _store_lock_fd >= 0:
        os.close(_store_lock_fd)
        _store_lock_fd = -1


def switch(rid: str) -> None:
    r = root()
    relink(r / "current", f"releases/{rid}")
    try:  # when it was last active, for prune (rollbacks and roll-forwards count, as deploys do)
        (r / "releases" / rid / ACTIVATED).touch()
    except OSError:
        pass


def last_active(rid: str) -> int:
    """When release `rid` last became current (ns), or -1 (never, or on a board older than this)."""
    try:
        return (root() / "releases" / rid / ACTIVATED).stat().st_mtime_ns
    except OSError:
        return -1


def agent_user() -> tuple[str, str]:
    """(user, group) the agent's systemd unit runs as: the one deploying (who owns ROOT and its store)."""
    import grp
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name


def unwritable(folder: Path) -> list[str]:
    """What in `folder` (itself included) the deploying user could not write."""
    paths = [folder, *folder.rglob("*")] if folder.exists() else []
    return [str(p) for p in paths if not p.is_symlink() and not os.access(p, os.W_OK)]


def keep_arg(keep: str) -> int:
    if not keep.isdigit() or int(keep) < 1:
        done({"error": f"prune: keep must be a whole number of releases, 1 or more, not {keep[:20]!r}"}, 2)
    return int(keep)


def activate(rid: str, fresh: bool, fresh_store: bool = False) -> dict:
    """The transaction (under the lock): install (when not yet), carry the store to the release (see
    prepare_store), health-check the release itself with it, write its history entry and unit, switch
    `current` atomically (model and store together), check again through `current`. `current` never
    names an unchecked release: a failure before the switch leaves the board as it was (a release
    this deploy brought, `fresh`, or installed is removed), one after it switches back."""
    user, group = agent_user()
    stores = root() / STORES
    blocked = unwritable(stores)
    if blocked:  # the agent runs as this user and writes the store: say so now, not when it first enrolls
        raise Refused(f"{blocked[0]} is not writable by {user}, who the agent runs as: sudo chown -R {user}: {stores}")
    previous = current()
    made, work = "", None
    try:
        made = install(rid)
        if made:
            say("installed", release=rid, venv=made, key=venv_link(rid))
        if rid != previous:
            info, work = prepare_store(rid, fresh_store)
            say("store", release=rid, **info)
        checked = health(rid, store=work)
    except Refused as e:
        if work is not None:
            discard_store(work)
        if (fresh or made) and rid != previous:
            shutil.rmtree(root() / "releases" / rid, ignore_errors=True)
            remove_unused_venvs()
        kept = f"{previous} stays active" if previous else "no release is active"
        raise Refused(f"{e}; {kept}" + (f", {rid} was removed" if (fresh or made) and rid != previous else "")) from None
    say("healthy", **checked)
    answer = {"active": rid, "previous": previous, "installed": made}
    if rid == previous:
        return {**answer, "note": "already active"}
    try:
        unit = root() / "releases" / rid / "edgemeta-agent.service"
        if unit.exists():  # ready for `sudo cp ROOT/edgemeta-agent.service /etc/systemd/system/`
            text = unit.read_text().replace("@ROOT@", str(root().resolve())).replace("@USER@", user).replace("@GROUP@", group)
            write_atomic(root() / "edgemeta-agent.service", text)  # the same for every release: it runs ROOT/current
            if os.getuid() == 0:
                answer["warning"] = ("the agent's systemd unit runs as root because this deploy logs in as root; "
                                     "deploy as an unprivileged user (such as pi@board) instead")
        upto = history_upto(previous)
        switch_checked(rid, previous, [x for x in upto if x != rid] + [rid], work)
    except BaseException:
        if work is not None and work.exists():  # failed before its store was put in place
            discard_store(work)
        raise
    return answer


def switch_checked(rid: str, previous: str, after: list, store: Path | None = None) -> None:
    """Write history.json as `after`, put `rid`'s prepared `store` in place (commit_store), switch
    `current` to `rid` (whose own health check passed) and check it again through `current`, the
    path the agent takes; on a failure switch back to `previous` with the history as it was. Killed
    anywhere, `current` is `previous` or `rid`, both checked."""
    before = history()
    if after != before:
        write_atomic(root() / "history.json", json.dumps(after))  # (entries after current: harmless, see history.json)
    if store is not None:
        commit_store(rid, store)
    switch(rid)
    try:
        settle_stores()  # ROOT/store -> current/store, on the first activation
        health(rid, through=str(root() / "current"))
    except Refused as e:
        if previous:
            switch(previous)
            write_atomic(root() / "history.json", json.dumps(before))
        raise Refused(f"{e} (through current, after the switch); " + (f"switched back to {previous}" if previous else
                                                                       "no earlier release to switch back to")) from None
    finally:
        release_store_lock()  # an enroll that waited now meets the new store (and is refused by the old model)
    restart_agent()


def cmd_activate(rid: str, keep: str = "", store: str = "") -> None:
    """Activate a release that is on the board (received, perhaps installed); with KEEP, prune after."""
    if keep == "--fresh-store":
        keep, store = "", keep
    rid, n, fresh_store = release_arg(rid), keep_arg(keep) if keep else 0, store_arg(store)
    lock_board()
    outlive_the_host()
    remove_half_built(spare=rid)
    answer = activate(rid, fresh=False, fresh_store=fresh_store)
    done({**answer, "pruned": prune(n)} if n else answer)


def cmd_deploy(rid: str, keep: str, store: str = "") -> None:
    """The whole deploy of one board, in this one process so that a dying host cannot leave it half done:
    receive the bundle (a tar stream on stdin), then activate it (see `activate`), then prune to KEEP."""
    rid, n, fresh_store = release_arg(rid), keep_arg(keep), store_arg(store)
    lock_board()
    outlive_the_host()
    remove_half_built()
    got = receive(rid)
    say("received", **got)
    done({**activate(rid, fresh="note" not in got, fresh_store=fresh_store), "pruned": prune(n)})


def store_arg(flag: str) -> bool:
    if flag not in ("", "--fresh-store"):
        done({"error": f"expected --fresh-store or nothing, not {flag[:40]!r}"}, 2)
    return flag == "--fresh-store"


def cmd_rollback(to: str = "", store: str = "") -> None:
    """Switch to the release activated before `current` (one step back through history.json, which
    stays as it is, so a second rollback goes one further), or to release `to`, older or newer (roll
    forward), if it is on the board. The target is health-checked before the switch and through
    `current` after it (switching back if that fails): `current` is never an unchecked release."""
    if to == "--fresh-store":
        to, store = "", to
    fresh_store, target = store_arg(store), release_arg(to) if to else ""
    lock_board()
    outlive_the_host()
    remove_half_built(spare=target)
    now, h = current(), history()
    others = [x for x in on_board() if x != now and installed(x)]
    if target:
        if target == now:
            done({"active": now, "rolled_back_from": now, "note": "already active"})
        if target not in others:
            on = [f"{x} (active)" if x == now else x for x in on_board() if x == now or installed(x)]
            raise Refused(f"release {target} is not on this board" + (f"; on it: {', '.join(on)}" if on else ""))
    else:
        older = [x for x in (h[: h.index(now)] if now in h else h) if x in others]
        if not older:
            raise Refused("no earlier release to roll back to" + (f"; on the board: {', '.join(others)} (rollback --to ID)"
                                                                  if others else ""))
        target = older[-1]
    work = None
    try:
        info, work = prepare_store(target, fresh_store)
        say("store", release=target, **info)
        checked = health(target, store=work)
    except Refused as e:
        if work is not None:
            discard_store(work)
        raise Refused(f"{e}; {now or 'no release'} stays active") from None
    say("healthy", **checked)
    try:
        switch_checked(target, now, h if target in h else history_upto(now) + [target], work)
    except BaseException:
        if work.exists():
            discard_store(work)
        raise
    done({"active": target, "rolled_back_from": now, "healthy": checked})


def on_board() -> list[str]:
    rel = root() / "releases"
    return sorted(p.name for p in rel.glob("[!.]*")) if rel.is_dir() else []


def prune(keep: int) -> list[str]:
    """Remove releases beyond the `keep` most recently active ones (current among them; a release left
    by `rollback --to` counts as recent, however old it is in history.json), then the venvs no remaining
    release uses. Under the lock."""
    now, h = current(), history()
    recent = sorted(on_board(), key=lambda x: (last_active(x), h.index(x) if x in h else -1), reverse=True)
    keep_set = set(recent[:keep]) | {now}
    removed = []
    for name in on_board():
        if name not in keep_set:
            shutil.rmtree(root() / "releases" / name, ignore_errors=True)
            if store_of(name).is_dir():  # its enrollments went on to the releases after it; kept all the same
                archive_store(store_of(name), "pruned")
            removed.append(name)
    return removed + [f"venvs/{v}" for v in remove_unused_venvs()]


def cmd_prune(keep: str) -> None:
    n = keep_arg(keep)
    lock_board()
    done({"removed": prune(n)})


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def release_details(rid: str) -> dict:
    """What a release on the board is: its model (name, algorithm, variant), runtime, venv, when it was built."""
    rel = root() / "releases" / rid
    info, manifest = read_json(rel / BUNDLE_FILE), read_json(rel / "model" / "manifest.json")
    try:
        runtime = (rel / "requirements.txt").read_text().splitlines()[0]  # the interpreter package, pinned
    except (OSError, IndexError):
        runtime = ""
    wheel = str(info.get("wheel", "")).split("-")  # edgemeta-VERSION-py3-none-any.whl
    return {"state": release_state(rid), "model": manifest.get("name", info.get("model", "")),
            "algorithm": manifest.get("algorithm", ""), "variant": info.get("variant") or manifest.get("default_variant", ""),
            "board": info.get("board", ""), "runtime": runtime, "edgemeta": wheel[1] if len(wheel) > 2 else "",
            "built": info.get("created", ""), "venv": venv_link(rid)}


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


AGENT_UNIT = "edgemeta-agent"
UNIT_PATH = Path(f"/etc/systemd/system/{AGENT_UNIT}.service")


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


COMMANDS = {"preflight": cmd_preflight, "receive": cmd_receive, "install": cmd_install, "health": cmd_health,
            "activate": cmd_activate, "deploy": cmd_deploy, "rollback": cmd_rollback, "prune": cmd_prune, "status": cmd_status,
            "service": cmd_service, "trust": cmd_trust}
USAGE = {"trust": "KEYHEX [--add]", "deploy": "ID KEEP [--fresh-store]", "activate": "ID [KEEP] [--fresh-store]",
         "rollback": "[ID] [--fresh-store]"}  # where the parameters' names do not say it

if __name__ == "__main__":
    usage = f"usage: board_ops.py {'|'.join(COMMANDS)} [ARGS]"
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        done({"error": usage}, 2)
    command = COMMANDS[sys.argv[1]]
    try:
        inspect.signature(command).bind(*sys.argv[2:])
    except TypeError:
        shown = USAGE.get(sys.argv[1]) or " ".join(inspect.signature(command).parameters).upper()
        done({"error": f"usage: board_ops.py {sys.argv[1]} {shown}".rstrip()}, 2)
    try:
        command(*sys.argv[2:])
    except Refused as e:
        done({"error": str(e)}, 3)
    except OSError as e:  # not foreseen above: still one line for the host, not a traceback
        done({"error": f"{sys.argv[1]} failed: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")}, 3)
