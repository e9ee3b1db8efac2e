"""Reading a bundle folder on the host: its manifest, who signed it and the release id it installs as.

Apart from bundle.py (which builds bundles and imports numpy and the model reader), so that the
fleet commands read a bundle without loading either. The formats are board_ops.py's, which checks
the same things again on the board.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgemeta.deploy.board_ops import BUNDLE_FILE, RELEASE_ID, SIGNATURE_FILE, SIGNED_PREFIX, ed25519_verify, fingerprint
from edgemeta.errors import EdgemetaError


def bundle_info(bundle: Path) -> dict:
    """A bundle's BUNDLE.json, or a one-line error when `bundle` is not a bundle folder."""
    try:
        info = json.loads((Path(bundle) / BUNDLE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise EdgemetaError(f"{bundle} is not a bundle (its {BUNDLE_FILE}: {getattr(e, 'strerror', None) or e}); "
                            "build one with `edgemeta bundle`") from None
    if not isinstance(info, dict) or not isinstance(info.get("files"), dict) or not all(
            isinstance(info.get(k), str) for k in ("model", "variant", "arch", "board")):
        raise EdgemetaError(f"{bundle}/{BUNDLE_FILE} is not an edgemeta bundle manifest; rebuild it with `edgemeta bundle`")
    return info


def bundle_signer(bundle: Path) -> bytes | None:
    """The public key BUNDLE.sig names (not checked), or None where it names none: the board then
    refuses the bundle in its own words (unsigned, unreadable signature)."""
    try:
        sig = json.loads((Path(bundle) / SIGNATURE_FILE).read_text())
        key = bytes.fromhex(sig["public_key"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return key if len(key) == 32 else None


def checked_signer(bundle: Path) -> bytes:
    """The bundle's signing key, once its signature of BUNDLE.json checks out here, as the board will check
    it (so --trust-key never makes a board trust a key for a bundle that is not that key's)."""
    try:
        sig = json.loads((Path(bundle) / SIGNATURE_FILE).read_text())
        key, signature = bytes.fromhex(sig["public_key"]), bytes.fromhex(sig["signature"])
        manifest = (Path(bundle) / BUNDLE_FILE).read_bytes()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise EdgemetaError(f"--trust-key: {bundle} has no readable signature ({SIGNATURE_FILE}: {getattr(e, 'strerror', None) or e}); "
                            "build the bundle with `edgemeta bundle`, which signs it") from None
    if sig.get("algorithm") != "ed25519" or not ed25519_verify(key, SIGNED_PREFIX + manifest, signature):
        raise EdgemetaError(f"--trust-key: the signature in {bundle}/{SIGNATURE_FILE} does not check out (key {fingerprint(key)}); "
                            "rebuild the bundle with `edgemeta bundle`: no key was trusted")
    return key


def release_id(bundle: Path) -> str:
    """The name of the bundle's release folder on a board: the id BUNDLE.json gives
    (bundle.new_release_id: model-variant-<digest of the content>; a bundle made before ids named the
    content: model-variant-<BUNDLE.json digest>), checked against board_ops.RELEASE_ID (which the
    board checks too)."""
    info = bundle_info(bundle)
    given = info.get("release")
    if not isinstance(given, str):
        given = f"{info['model']}-{info['variant']}-{hashlib.sha256((bundle / BUNDLE_FILE).read_bytes()).hexdigest()[:10]}"
    if not RELEASE_ID.fullmatch(given):
        raise EdgemetaError(f"release id {given[:80]!r} (from the model name {info['model'][:60]!r} and variant {info['variant'][:20]!r} "
                            "in BUNDLE.json) is not a valid release id: letters, digits, '.', '_' and '-' only, at most 128, "
                            "starting with a letter or digit; rename the model")
    return given
