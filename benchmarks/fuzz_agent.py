"""Coverage-guided fuzzing (atheris, libFuzzer) of what the board agent parses from the outside.

    pip install atheris      # not a dependency of edgemeta; a wheel exists for CPython 3.11 on x86-64
    python -m benchmarks.fuzz_agent [--runs 20000] [--seed 1]

Each input's first byte picks one target, the rest is its input:

- `frame`:  firmware_tools.serial_protocol.decode_frame: a Frame, or a FrameError.
- `serial`: the board end of the serial link, serve(), reading the input as a byte stream from
            its port: it must return, write only intact RESPONSE/ERROR frames, messages one line.
- `line`:   one request line to the agent (Agent.answer_line, on the shipped model, a fresh store):
            exactly one JSON answer line; an error is one sentence with no Python internals.
- `label`:  edgemeta.runtime.store.check_label on the input as text (any code point, surrogates
            included): a label that encodes as UTF-8, or a one-line EdgemetaError.

Runs a fixed number of inputs (seeded, so a run repeats), then prints how many ran per target and
the findings: crashes (an exception other than the target's own error type) and broken properties,
each kind once with its first input. Exit status 1 when there was a crash. libFuzzer's own timeout
(-timeout=10) stops the run on a hang.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["firmware_tools", "edgemeta"]):
    from edgemeta.errors import EdgemetaError
    from edgemeta.runtime.agent import Agent
    from edgemeta.runtime.store import check_label
    from firmware_tools.serial_protocol import Frame, FrameError, FrameType, decode_frame, encode_frame, serve

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["frame", "serial", "line", "label"]
INTERNALS = re.compile(r"object at 0x|Traceback|internal error \w+Error")
ran: Counter = Counter()
findings: dict[str, tuple[int, bytes]] = {}  # kind -> (count, first input)
crashes = 0


class DrainPort:
    """A serial port whose input is `data`; it sets `stop` once that is used up and keeps what is written."""

    def __init__(self, data: bytes, stop: threading.Event) -> None:
        self.data, self.stop, self.written, self.timeout = bytearray(data), stop, bytearray(), 0.0005

    @property
    def in_waiting(self) -> int:
        return len(self.data)

    def read(self, size: int = 1) -> bytes:
        if not self.data:
            self.stop.set()
            time.sleep(self.timeout)
            return b""
        out = bytes(self.data[:size])
        del self.data[:size]
        return out

    def write(self, data: bytes) -> int:
        self.written += data
        return len(data)


def echo(op: str, args: dict, attachments: list[bytes]) -> dict:
    if op == "fail":
        raise ValueError("a handler's error\nover two lines")
    return {"op": op, "sizes": [len(a) for a in attachments]}


def check(ok: bool, kind: str, data: bytes) -> None:
    if not ok:
        n, first = findings.get(kind, (0, data))
        findings[kind] = (n + 1, first)


def one_sentence(message: str) -> bool:
    return bool(message) and "\n" not in message and not INTERNALS.search(message)


def fuzz_frame(data: bytes) -> None:
    try:
        frame = decode_frame(data)
    except FrameError as e:
        check(one_sentence(str(e)), "frame: error not one line", data)
        return
    check(encode_frame(frame) == data, "frame: decoded bytes that are not exactly one frame", data)


def fuzz_serial(data: bytes) -> None:
    stop = threading.Event()
    port = DrainPort(data, stop)
    serve(port, echo, stop, stall_timeout=0.001, poll_interval=0.001)
    wire, at = bytes(port.written), 0
    while at < len(wire):
        length = int.from_bytes(wire[at + 12 : at + 16], "big")
        try:
            frame = decode_frame(wire[at : at + 20 + length])
        except FrameError:
            check(False, "serial: the board wrote a broken frame", data)
            return
        at += 20 + length
        check(frame.type in (FrameType.RESPONSE, FrameType.ERROR), "serial: the board wrote a frame of a wrong type", data)
        if frame.type is FrameType.ERROR:
            check(one_sentence(json.loads(frame.payload).get("message", "")), "serial: error message not one line", data)


def fuzz_line(agent: Agent, data: bytes) -> None:
    raw = agent.answer_line(data)
    check(raw.endswith(b"\n") and raw.count(b"\n") == 1, "line: not exactly one answer line", data)
    answer = json.loads(raw)
    check(isinstance(answer, dict) and isinstance(answer.get("ok"), bool), "line: answer is not {ok: bool, ...}", data)
    if not answer.get("ok"):
        check(isinstance(answer.get("error"), str) and one_sentence(answer["error"]), "line: error not one clean sentence", data)


def fuzz_label(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicode(len(data))
    try:
        label = check_label(text)
    except EdgemetaError as e:
        check("\n" not in str(e), "label: error not one line", data)
        return
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:
        check(False, "label: accepted a label that is not Unicode text (a lone surrogate)", data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20000, help="Inputs to run, all targets together.")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)  # serve() logs each rejected frame; the findings are the output here

    tmp = Path(tempfile.mkdtemp(prefix="fuzz_agent_"))
    agent = Agent(REPO / "models" / "omniglot-conv4", tmp / "store")
    png = sorted((REPO / "samples" / "omniglot").glob("*/*.png"))[0].read_bytes()
    enroll = json.dumps({"id": 1, "op": "enroll", "args": {"label": "alpha"}, "attachments": [base64.b64encode(png).decode()]})
    agent.answer_line(enroll.encode())
    seeds = [  # one valid input per target, for libFuzzer to mutate from
        bytes([0]) + encode_frame(Frame(FrameType.REQUEST, 7, b'{"op":"echo","args":{},"attachments":[]}')),
        bytes([1]) + encode_frame(Frame(FrameType.REQUEST, 8, b'{"op":"echo","args":{},"attachments":[3]}'))
        + encode_frame(Frame(FrameType.CHUNK, 8, bytes(10) + b"abc")),
        bytes([2]) + b'{"id": 2, "op": "classify", "args": {"top_k": 2}, "attachments": []}',
        bytes([2]) + enroll.replace("alpha", "beta").encode(),
        bytes([3]) + b"\x00a label",  # (\x00: ConsumeUnicode reads the rest as ASCII)
    ]
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, s in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(s)

    def one_input(data: bytes) -> None:
        global crashes
        target = TARGETS[data[0] % len(TARGETS)] if data else "frame"
        ran[target] += 1
        try:
            if target == "frame":
                fuzz_frame(data[1:])
            elif target == "serial":
                fuzz_serial(data[1:])
            elif target == "line":
                fuzz_line(agent, data[1:])
            else:
                fuzz_label(data[1:])
        except Exception as e:  # a crash: counted and reported, and the run goes on
            crashes += 1
            check(False, f"{target}: crash {type(e).__name__}: {str(e)[:100]}", data)
        if sum(ran.values()) >= args.runs:
            report(tmp)

    atheris.Setup([sys.argv[0], f"-seed={args.seed}", "-timeout=10", "-max_len=2048", "-rss_limit_mb=2048",
                   "-print_final_stats=0", str(corpus)], one_input)
    atheris.Fuzz()


def report(tmp: Path) -> None:
    print(f"\n{sum(ran.values())} inputs: " + ", ".join(f"{t} {ran[t]}" for t in TARGETS) + f"; crashes: {crashes}")
    for kind, (n, first) in sorted(findings.items()):
        print(f"  {n:6d} x {kind}; first input {first[:80]!r}")
    if not findings:
        print("  no findings")
    sys.stdout.flush()
    shutil.rmtree(tmp, ignore_errors=True)
    os._exit(1 if crashes else 0)  # libFuzzer's loop does not return; end the run here


if __name__ == "__main__":
    main()
