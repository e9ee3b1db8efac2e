"""Signing bundles on the host: one ed25519 key per user, made once, kept private.

    $EDGEMETA_CONFIG, else $XDG_CONFIG_HOME/edgemeta, else ~/.config/edgemeta   (mode 0700)
        signing_key.pem     the private key, PKCS#8 PEM, mode 0600; never printed
    BUNDLE.sig              beside BUNDLE.json in every bundle:
                            {"format": 1, "algorithm": "ed25519", "public_key": HEX, "signature": HEX},
                            the signature of board_ops.SIGNED_PREFIX + the bytes of BUNDLE.json

A board takes bundles signed by the keys it trusts and refuses all others, unsigned ones and changed
ones (board_ops.py checks the signature with the standard library alone, strictly: no small-order or
mixed-order key, no non-canonical encoding). It trusts no key on its own, not even the first
deploy's: `edgemeta deploy --trust-key` sends the bundle's public key over the user's ssh login
(`board_ops.py trust KEYHEX`), and it is that login that authenticates it. Signing uses the
`cryptography` package (the `fleet` extra; `host` and `gpu` include it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgemeta.deploy.board_ops import BUNDLE_FILE, SIGNATURE_FILE, SIGNED_PREFIX, fingerprint
from edgemeta.errors import EdgemetaError

KEY_FILE = "signing_key.pem"


def config_dir() -> Path:
    """$EDGEMETA_CONFIG, else $XDG_CONFIG_HOME/edgemeta, else ~/.config/edgemeta."""
    if os.environ.get("EDGEMETA_CONFIG"):
        return Path(os.environ["EDGEMETA_CONFIG"]).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "edgemeta"


def default_key_path() -> Path:
    return config_dir() / KEY_FILE


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        raise EdgemetaError("signing bundles needs the cryptography package: pip install 'edgemeta[fleet]' (what bundling and "
                            "deploying need, without TensorFlow; 'edgemeta[host]' has it too)") from None
    return serialization, Ed25519PrivateKey


def public_bytes(key) -> bytes:
    serialization, _ = _crypto()
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def create_key(path: str | Path | None = None) -> str:
    """Write a new private key to `path` (default: the user's), readable by the user alone; its fingerprint.
    Refuses to replace a key: boards trust the key they were told to trust (deploy --trust-key)."""
    serialization, Ed25519PrivateKey = _crypto()
    path = Path(path) if path else default_key_path()
    if path.exists() or path.is_symlink():
        raise EdgemetaError(f"{path} already exists (key {fingerprint(public_bytes(load_key(path)))}): boards trust that key, "
                            "so keep it; move it away first to make a new one")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even for a moment
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return fingerprint(public_bytes(key))


def load_key(path: str | Path):
    """The private key at `path`; refused when others may read it (as ssh refuses such keys)."""
    serialization, Ed25519PrivateKey = _crypto()
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except OSError as e:
        raise EdgemetaError(f"cannot read signing key {path}: {e.strerror}") from None
    if mode & 0o077:
        raise EdgemetaError(f"signing key {path} is readable by others (mode {mode:04o}): chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise EdgemetaError(f"{path} is not an unencrypted PEM private key: {why}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgemetaError(f"{path} is not an ed25519 key (make one with `edgemeta keygen`)")
    return key


def signing_key(path: str | Path | None = None, log=lambda msg: None):
    """The key bundles are signed with: `path`, else the user's, made on first use (and said so through `log`).
    A `path` given that does not exist is an error: a typo must not make a new key that boards then refuse."""
    if path:
        if not Path(path).exists():
            raise EdgemetaError(f"no signing key at {path}: make one with `edgemeta keygen --key {path}`, "
                                "or leave --sign-key out to use your own")
        return load_key(path)
    default = default_key_path()
    if not default.exists() and not default.is_symlink():
        fp = create_key(default)
        log(f"created your signing key {default} (key {fp}); a board trusts it once told to (edgemeta deploy --trust-key): "
            "keep it and back it up")
    return load_key(default)


def sign_bundle(folder: str | Path, key) -> str:
    """Write folder/BUNDLE.sig for folder/BUNDLE.json as it is now; the key's fingerprint."""
    folder = Path(folder)
    pub = public_bytes(key)
    signature = key.sign(SIGNED_PREFIX + (folder / BUNDLE_FILE).read_bytes())
    sig = {"format": 1, "algorithm": "ed25519", "public_key": pub.hex(), "signature": signature.hex()}
    (folder / SIGNATURE_FILE).write_text(json.dumps(sig, indent=2) + "\n")
    return fingerprint(pub)
