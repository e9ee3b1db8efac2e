"""Images over slow serial links: the largest that gets through, and a 6.5 KB round trip, per baud rate.

    python -m benchmarks.serial_links                        # before (git 5026f1f) and after, all rates
    python -m benchmarks.serial_links --only after --bauds 9600,115200 --cap 20

Each rate runs the board's ``serve()`` and the host's ``SerialClient`` (the agent's and the CLI's
defaults: port timeout 0.1 s, stall timeout 1 s, answer timeout 30 s) on the two ends of a real
pseudo-terminal pair joined by ``tests/support/ptys.py``'s NullModem, paced like a UART at that rate (baud/10
bytes a second each way, a 4 KB transmit buffer). The handler answers each request with the sizes and
sha256 of its attachments, which are checked. Sizes are tried smallest first, and a size whose wire
time would overrun the rate's time cap (``--cap`` seconds) is not tried; the first failure ends a rate.

"before" is ``firmware_tools/serial_protocol.py`` as of ``--before REV``, read with ``git show`` into
a temporary module (both ends run it); "after" is the working tree's module. The theoretical wire time
is the bytes of the request's frames and of the answer frame at 10 bits a byte, no gaps.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

import serial

from tests.support.ptys import NullModem

REPO = Path(__file__).resolve().parent.parent

BAUDS = [9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600]
SIZES = [1_000, 3_800, 6_500, 20_000, 64_000]
ROUND_TRIP = 6_500
BEFORE = "5026f1f"  # the last commit with the per-frame stall timers (before issue 29's slow-link fix)


def load_module(rev: str | None, tmp: Path) -> ModuleType:
    """serial_protocol as of git ``rev`` (None: the working tree), as a module of its own."""
    if rev is None:
        from firmware_tools import serial_protocol
        return serial_protocol
    source = subprocess.run(["git", "show", f"{rev}:firmware_tools/serial_protocol.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    path = tmp / f"serial_protocol_{rev}.py"
    path.write_text(source)
    name = f"serial_protocol_{rev}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def handler(op: str, args: dict, attachments: list[bytes]) -> dict:
    return {"sizes": [len(a) for a in attachments], "sha256": [hashlib.sha256(a).hexdigest() for a in attachments]}


def wire_bytes(sp: ModuleType, size: int, image: bytes) -> int:
    """Bytes on the wire for one request with one attachment of ``size`` and its answer."""
    request = sp._json_frame(sp.FrameType.REQUEST, 1, {"op": "enroll", "args": {"label": "cup"}, "attachments": [size]},
                             sp.MAX_PAYLOAD)
    chunks = sp._chunk_frames(1, 0, image, sp.CHUNK_DATA_MAX)
    answer = sp._json_frame(sp.FrameType.RESPONSE, 1, handler("enroll", {}, [image]), sp.MAX_PAYLOAD)
    return len(request) + sum(map(len, chunks)) + len(answer)


class Link:
    """serve() on one end of a paced NullModem, a SerialClient on the other."""

    def __init__(self, sp: ModuleType, baud: int, timeout: float) -> None:
        self.modem = NullModem(baud=baud)
        self.host = serial.Serial(self.modem.names[0], baudrate=baud, timeout=0.1)
        self.board = serial.Serial(self.modem.names[1], baudrate=baud, timeout=0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=sp.serve, args=(self.board, handler, self.stop), daemon=True)
        self.thread.start()
        self.client = sp.SerialClient(self.host, timeout=timeout)
        self.sp = sp

    def send(self, image: bytes) -> tuple[bool, float, str]:
        t0 = time.monotonic()
        try:
            answer = self.client.request("enroll", {"label": "cup"}, [image])
        except self.sp.ProtocolError as exc:
            return False, time.monotonic() - t0, str(exc)
        took = time.monotonic() - t0
        ok = answer == handler("enroll", {}, [image])
        return ok, took, "" if ok else f"wrong answer {answer!r:.80}"

    def close(self) -> None:
        self.stop.set()
        self.thread.join(3)
        self.host.close()
        self.board.close()
        self.modem.close()


def run_rate(sp: ModuleType, baud: int, sizes: list[int], cap: float, timeout: float) -> dict:
    rng = random.Random(baud)
    out: dict = {"largest": 0, "tried": [], "round_trip": None, "failure": ""}
    spent = 0.0
    for size in sizes:
        image = rng.randbytes(size)
        need = wire_bytes(sp, size, image) * 10 / baud
        if spent + need > cap:
            break
        link = Link(sp, baud, timeout)  # a fresh link each time: no leftovers of a failed exchange
        try:
            ok, took, why = link.send(image)
        finally:
            link.close()
        spent += took
        out["tried"].append(size)
        if size == ROUND_TRIP:
            out["round_trip"] = (took, need) if ok else None
        if not ok:
            out["failure"] = f"{size} B after {took:.1f} s: {why[:110]}"
            break
        out["largest"] = size
    if ROUND_TRIP not in out["tried"] and ROUND_TRIP not in sizes:
        image = rng.randbytes(ROUND_TRIP)
        link = Link(sp, baud, timeout)
        try:
            ok, took, _ = link.send(image)
        finally:
            link.close()
        out["round_trip"] = (took, wire_bytes(sp, ROUND_TRIP, image) * 10 / baud) if ok else None
    return out


def kb(n: int) -> str:
    return "none" if not n else f"{n / 1000:g} KB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bauds", default=",".join(map(str, BAUDS)))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="attachment sizes in bytes, smallest first")
    ap.add_argument("--cap", type=float, default=60.0, help="seconds of wire time per rate and version")
    ap.add_argument("--timeout", type=float, default=30.0, help="the client's answer timeout (the CLI's default)")
    ap.add_argument("--before", default=BEFORE, help="git revision of the old module")
    ap.add_argument("--only", choices=["before", "after", "both"], default="both")
    a = ap.parse_args(argv)
    bauds, sizes = [int(b) for b in a.bauds.split(",")], sorted(int(s) for s in a.sizes.split(","))
    versions = {"before": a.before, "after": None}
    if a.only != "both":
        versions = {a.only: versions[a.only]}
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, rev in versions.items():
            sp = load_module(rev, Path(tmp))
            for baud in bauds:
                r = results[name, baud] = run_rate(sp, baud, sizes, a.cap, a.timeout)
                print(f"# {name} {baud}: largest {kb(r['largest'])}, tried {r['tried']}"
                      + (f"; failed: {r['failure']}" if r["failure"] else ""), flush=True)
    print()
    names = list(versions)
    head = ["baud"] + [f"largest image through, {n}" for n in names] + [f"6.5 KB round trip, {n}" for n in names]
    print("| " + " | ".join(head + ["wire time of the 6.5 KB exchange"]) + " |")
    print("|" + "---|" * (len(head) + 1))
    for baud in bauds:
        cells = [str(baud)]
        for n in names:
            r = results[n, baud]
            largest = kb(r["largest"])
            if not r["failure"] and r["tried"] and r["tried"][-1] != sizes[-1]:
                largest += f" (larger not tried: {a.cap:g} s cap)"
            cells.append(largest)
        wire = None
        for n in names:
            rt = results[n, baud]["round_trip"]
            cells.append(f"{rt[0]:.2f} s" if rt else "failed")
            wire = wire or (rt[1] if rt else None)
        if wire is None:
            sp = load_module(None, Path("."))
            image = bytes(ROUND_TRIP)
            wire = wire_bytes(sp, ROUND_TRIP, image) * 10 / baud
        cells.append(f"{wire:.2f} s")
        print("| " + " | ".join(cells) + " |")
    print(f"\n{time.monotonic() - t_all:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
