"""Which keys may sign the bundles a board takes: ROOT/trusted_keys/<fingerprint>.pub, each put there
by `trust KEYHEX` (over the host's ssh login, which is what authenticates it), and the check of a
bundle's BUNDLE.sig against them. A board that trusts no key takes no bundle (no trust on first use)."""

import hashlib
import json
import re
from pathlib import Path

from edgemeta.atomic import fsync_dir
from edgemeta.deploy.board.base import BUNDLE_FILE, KEYS_DIR, SIGNATURE_FILE, SIGNED_PREFIX, Refused, done, root, write_text
from edgemeta.deploy.board.ed25519 import ed25519_verify, public_key_problem
from edgemeta.deploy.board.lock import lock_board

NO_TRUSTED_KEY = ("this board trusts no signing key yet: deploy with `edgemeta deploy --trust-key` (it sends the "
                  "bundle's key {fp} over your ssh login to be trusted), or run "
                  "`python3 ~/.edgemeta-ops.pyz trust KEYHEX` on the board")


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
                      "beside it, say so (python3 ~/.edgemeta-ops.pyz trust KEYHEX --add; edgemeta deploy --trust-key --add-key)")
    folder = root() / KEYS_DIR
    if not folder.is_dir():
        folder.mkdir(mode=0o755)
        fsync_dir(root())
    write_text(folder / f"{fp}.pub", key.hex() + "\n")
    done({"trusted": fp, "keys": sorted([*trusted.values(), fp])})
