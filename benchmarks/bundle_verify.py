"""What a board spends checking a bundle at deploy (edgemeta.deploy.board, standard library only): one ed25519
signature verification (pure Python, RFC 8032) and, for a bundle folder, the whole check (signature,
exact file list, sha256 of every file).

    python -m benchmarks.bundle_verify [--bundle DIR] [--repeat 30] [--ops board_ops.pyz]

Run it with the board's python3 on the board for its figures: only the standard library, this file
and the board-side operations' zip application are needed (`python -m edgemeta.deploy.board_ops
board_ops.pyz` writes it; copy both and run `python3 bundle_verify.py --ops board_ops.pyz` there: --ops
puts that zip application first on sys.path). Without --ops the same modules are imported from this checkout.
Signing the sample needs `cryptography`.
Times are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# RFC 8032, section 7.1, TEST 2: a real key and signature, so no third-party package is needed here
PUBLIC = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
MESSAGE = bytes.fromhex("72")
SIGNATURE = bytes.fromhex("92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
                          "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00")


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="A bundle folder (edgemeta bundle --out DIR) to check as a board would.")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--ops", help="The board-side operations' zip application to take the modules from (default: this checkout).")
    args = ap.parse_args()
    if args.ops:  # a zip application outside this checkout: its modules, not the checkout's
        sys.path.insert(0, args.ops)
    from edgemeta.deploy.board import base, receive, trust
    from edgemeta.deploy.board.ed25519 import ed25519_verify

    assert ed25519_verify(PUBLIC, MESSAGE, SIGNATURE)
    verify = ed25519_verify
    print(f"ed25519 verify, RFC 8032 TEST 2:         {median_ms(lambda: verify(PUBLIC, MESSAGE, SIGNATURE), args.repeat):7.2f} ms")
    manifest = os.urandom(8192)  # about a BUNDLE.json's size
    print(f"ed25519 verify, 8 KiB message (invalid): {median_ms(lambda: verify(PUBLIC, manifest, SIGNATURE), args.repeat):7.2f} ms")
    if args.bundle:
        folder = Path(args.bundle)
        root = Path(tempfile.mkdtemp(prefix="bundle-verify-"))  # a board root that trusts the bundle's key, as `trust` leaves one
        os.environ["EDGEMETA_ROOT"] = str(root)
        key = bytes.fromhex(json.loads((folder / base.SIGNATURE_FILE).read_text())["public_key"])
        (root / base.KEYS_DIR).mkdir()
        (root / base.KEYS_DIR / f"{trust.fingerprint(key)}.pub").write_text(key.hex() + "\n")
        info = json.loads((folder / base.BUNDLE_FILE).read_text())
        size = sum((folder / n).stat().st_size for n in info["files"]) / 2**20

        def check() -> str:
            try:
                receive.check_bundle(folder)
                return "taken"
            except base.Refused as e:  # another board's architecture is refused last, after all the work
                return f"refused: {e}"

        ms = median_ms(check, max(3, args.repeat // 10))
        print(f"whole check of {folder} ({len(info['files'])} files, {size:.1f} MiB): {ms:.1f} ms ({check()})")
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
