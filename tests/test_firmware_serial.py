"""The serial wire protocol, end to end over real pseudo-terminals opened with pyserial.

Two pty pairs are joined master-to-master by a small pump thread, like a crossed serial cable:
the host opens one slave, the board agent the other, both with ``serial.Serial(name, ...)``.
Faults (garbage, corrupt and cut frames) are written as raw bytes through the host's port.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import serial

from firmware_tools.serial_protocol import (
    CHUNK_DATA_MAX,
    CHUNK_PAYLOAD_MAX,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    STALL_TIMEOUT,
    VERSION,
    BadCrc,
    Frame,
    FrameError,
    FrameReader,
    FrameType,
    OversizeFrame,
    ProtocolError,
    RemoteError,
    SerialClient,
    TruncatedFrame,
    UnsupportedVersion,
    decode_frame,
    encode_frame,
    serve,
)
from tests.support.ptys import NullModem

PORT_TIMEOUT = 0.05
STALL = 0.3  # board-side stall timeout in these tests: short, so fault tests stay fast


# --- helpers ------------------------------------------------------------------------------------


class Recorder:
    """A port wrapper that keeps every byte written, to check what went on the wire."""

    def __init__(self, port: Any) -> None:
        self.port, self.written = port, bytearray()

    @property
    def timeout(self) -> float | None:
        return self.port.timeout

    @property
    def in_waiting(self) -> int:
        return self.port.in_waiting

    def read(self, size: int = 1) -> bytes:
        return self.port.read(size)

    def write(self, data: bytes) -> int:
        self.written += data
        return self.port.write(data)


class MemoryPort:
    """An in-memory byte source with pyserial's read semantics (an empty read waits ``timeout``)."""

    def __init__(self, data: bytes = b"", timeout: float | None = 0.005) -> None:
        self.data, self.timeout = bytearray(data), timeout

    @property
    def in_waiting(self) -> int:
        return len(self.data)

    def read(self, size: int = 1) -> bytes:
        if not self.data:
            time.sleep(self.timeout or 0)
            return b""
        out = bytes(self.data[:size])
        del self.data[:size]
        return out

    def write(self, data: bytes) -> int:
        return len(data)


def raw_header(rid: int, length: int, ftype: int = FrameType.REQUEST, version: int = VERSION) -> bytes:
    """A header written from the module docstring's table, independently of encode_frame."""
    return MAGIC + struct.pack(">BBHII", version, ftype, 0, rid, length)


def request_frame(rid: int, op: str = "echo", args: dict | None = None, sizes: list[int] | None = None) -> bytes:
    payload = json.dumps({"op": op, "args": args or {}, "attachments": sizes or []}).encode()
    return encode_frame(Frame(FrameType.REQUEST, rid, payload))


def answer_for(port: Any, rid: int, timeout: float = 3.0) -> tuple[Frame, dict]:
    """The first RESPONSE/ERROR frame for ``rid`` arriving on ``port``."""
    reader, deadline = FrameReader(port), time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = reader.read_frame(deadline - time.monotonic())
        if frame is not None and frame.request_id == rid:
            return frame, json.loads(frame.payload)
    raise AssertionError(f"no answer for request {rid} within {timeout} s")


@dataclass
class Board:
    host: Any  # the host's pyserial port
    board: Any  # the board's pyserial port
    client: SerialClient
    calls: list[tuple[str, dict, list[bytes]]] = field(default_factory=list)


def handler_for(calls: list) -> Any:
    def handler(op: str, args: dict, attachments: list[bytes]) -> dict:
        calls.append((op, args, attachments))
        if op == "fail":
            raise ValueError("no class named 'cat'\nenroll it first")
        if op == "not_a_dict":
            return ["oops"]  # type: ignore[return-value]
        return {"op": op, "args": args, "sizes": [len(a) for a in attachments],
                "sha256": [hashlib.sha256(a).hexdigest() for a in attachments]}
    return handler


@pytest.fixture
def link() -> Iterator[tuple[Any, Any]]:
    modem = NullModem()
    host = serial.Serial(modem.names[0], baudrate=115200, timeout=PORT_TIMEOUT)
    board = serial.Serial(modem.names[1], baudrate=115200, timeout=PORT_TIMEOUT)
    try:
        yield host, board
    finally:
        host.close()
        board.close()
        modem.close()


@pytest.fixture
def board(link) -> Iterator[Board]:
    host, board_port = link
    b = Board(host, board_port, SerialClient(host, timeout=5.0))
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(board_port, handler_for(b.calls), stop),
                              kwargs={"stall_timeout": STALL, "poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield b
    finally:
        stop.set()
        thread.join(3)
        assert not thread.is_alive(), "serve() did not return after stop was set"


# --- frames, without a port -----------------------------------------------------------------------


def test_encode_decode_round_trip_and_every_corruption_is_detected():
    rng = random.Random(7)
    for case in range(300):
        size = rng.choice([0, 1, rng.randrange(2, 64), rng.randrange(64, 6000)])
        frame = Frame(rng.choice(list(FrameType)), rng.choice([0, 1, 0xFFFFFFFF, rng.getrandbits(32)]), rng.randbytes(size))
        wire = encode_frame(frame)
        assert len(wire) == HEADER_SIZE + size + 4
        assert wire[:4] == MAGIC and wire[4] == VERSION
        assert int.from_bytes(wire[-4:], "big") == zlib.crc32(wire[:-4])
        assert decode_frame(wire) == frame
        flipped = bytearray(wire)
        flipped[rng.randrange(len(wire))] ^= 1 << rng.randrange(8)
        with pytest.raises(FrameError):
            decode_frame(bytes(flipped))
        with pytest.raises(FrameError):
            decode_frame(wire[: rng.randrange(len(wire))])
        if case < 5:
            with pytest.raises(FrameError):
                decode_frame(wire + b"\x00")


def test_encode_refuses_what_the_wire_cannot_carry():
    with pytest.raises(ValueError, match="u32"):
        encode_frame(Frame(FrameType.REQUEST, 1 << 32, b""))
    with pytest.raises(ValueError, match="limit"):
        encode_frame(Frame(FrameType.REQUEST, 1, bytes(MAX_PAYLOAD + 1)))


def test_reader_resyncs_through_random_garbage_and_never_crashes():
    rng = random.Random(11)
    sent, stream = [], bytearray()
    for i in range(40):
        garbage = bytearray(rng.randbytes(rng.randrange(0, 300)))
        if i % 3 == 0:  # a fake header: right magic and version, random id and length (some oversize)
            garbage += raw_header(rng.getrandbits(32), rng.randrange(0, MAX_PAYLOAD + 5000)) + rng.randbytes(rng.randrange(50))
        if i % 5 == 0:  # a bare magic followed by junk, and a half magic
            garbage += MAGIC + rng.randbytes(rng.randrange(20)) + MAGIC[:2]
        frame = Frame(rng.choice(list(FrameType)), i, rng.randbytes(rng.randrange(0, 3000)))
        sent.append(frame)
        stream += garbage + encode_frame(frame)
    stream += rng.randbytes(500)
    reader = FrameReader(MemoryPort(bytes(stream)), stall_timeout=0.02)
    got, errors = [], []
    for _ in range(10_000):
        try:
            frame = reader.read_frame(0.05)
        except FrameError as exc:
            errors.append(exc)
            continue
        if frame is None:
            break
        got.append(frame)
    assert got == sent  # every valid frame recovered, in order, nothing invented
    assert errors, "the fake headers should have been reported"
    assert {type(e) for e in errors} <= {BadCrc, OversizeFrame, TruncatedFrame, UnsupportedVersion, FrameError}
    t0 = time.monotonic()
    assert reader.read_frame(0.1) is None  # a silent line ends at the deadline
    assert time.monotonic() - t0 < 1.0


def test_reader_rejects_oversize_length_and_unknown_version_without_waiting_for_payload():
    reader = FrameReader(MemoryPort(raw_header(555, MAX_PAYLOAD + 1)), stall_timeout=60)
    with pytest.raises(OversizeFrame) as info:
        reader.read_frame(5)
    assert info.value.request_id == 555
    reader = FrameReader(MemoryPort(raw_header(9, 10, version=VERSION + 1) + bytes(14)), stall_timeout=60)
    with pytest.raises(UnsupportedVersion, match="version 2"):
        reader.read_frame(5)


def test_reader_reports_a_frame_cut_mid_payload_once_the_line_goes_quiet():
    wire = request_frame(31, sizes=[])
    reader = FrameReader(MemoryPort(wire[:-6]), stall_timeout=0.05)
    t0 = time.monotonic()
    with pytest.raises(TruncatedFrame) as info:
        reader.read_frame(5)
    assert info.value.request_id == 31
    assert time.monotonic() - t0 < 2


def test_reader_needs_a_finite_port_timeout():
    with pytest.raises(ValueError, match="timeout"):
        FrameReader(MemoryPort(timeout=None))


# --- over a real pty link -------------------------------------------------------------------------


def test_request_with_two_attachments_arrives_byte_identical_in_bounded_chunks(board):
    rng = random.Random(3)
    first, second = rng.randbytes(20_000), rng.randbytes(21_111)
    wire = Recorder(board.host)
    result = SerialClient(wire, timeout=5).request("enroll", {"label": "ka", "shots": 2}, [first, second])
    op, args, attachments = board.calls[-1]
    assert (op, args) == ("enroll", {"label": "ka", "shots": 2})
    assert attachments == [first, second]
    assert result == {"op": "enroll", "args": {"label": "ka", "shots": 2}, "sizes": [20_000, 21_111],
                      "sha256": [hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()]}
    reader, frames = FrameReader(MemoryPort(bytes(wire.written))), []
    while (frame := reader.read_frame(0.05)) is not None:
        frames.append(frame)
    chunks = [f for f in frames if f.type is FrameType.CHUNK]
    assert frames[0].type is FrameType.REQUEST and len(frames) == 1 + len(chunks)
    assert len(chunks) == -(-20_000 // CHUNK_DATA_MAX) + -(-21_111 // CHUNK_DATA_MAX)
    assert max(len(c.payload) for c in chunks) <= CHUNK_PAYLOAD_MAX == 4096


def test_handler_exception_comes_back_as_one_line_remote_error(board):
    with pytest.raises(RemoteError) as info:
        board.client.request("fail", {"label": "cat"})
    message = str(info.value)
    assert "no class named 'cat' enroll it first" in message and "\n" not in message
    assert info.value.type == "ValueError" and isinstance(info.value, ProtocolError)
    with pytest.raises(RemoteError, match="returned list, not a dict"):
        board.client.request("not_a_dict", {})
    assert board.client.request("ping", {})["op"] == "ping"  # the loop kept serving


def test_garbage_and_a_fake_header_before_a_valid_frame_are_skipped(board):
    rng = random.Random(5)
    # Noise, a fake header (id 7, 40-byte payload) that swallows the start of the real frame, half a magic.
    board.host.write(rng.randbytes(700) + raw_header(7, 40) + MAGIC[:3] + b"\x00" + MAGIC[:2])
    assert board.client.request("ping", {"n": 1}) == {"op": "ping", "args": {"n": 1}, "sizes": [], "sha256": []}
    assert [c[0] for c in board.calls] == ["ping"]


def test_flipped_crc_is_rejected_with_an_error_and_the_board_keeps_serving(board):
    wire = bytearray(request_frame(4242))
    wire[-1] ^= 0xFF
    board.host.write(bytes(wire))
    frame, body = answer_for(board.host, 4242)
    assert frame.type is FrameType.ERROR and body["type"] == "BadCrc" and "CRC mismatch" in body["message"]
    assert board.calls == []  # the corrupt request never reached the handler
    assert board.client.request("ping", {})["op"] == "ping"


def test_truncated_request_is_answered_after_the_stall_timeout(board):
    t0 = time.monotonic()
    board.host.write(request_frame(99, args={"x": "y" * 100})[:-10])
    frame, body = answer_for(board.host, 99, timeout=3)
    assert frame.type is FrameType.ERROR and body["type"] == "TruncatedFrame"
    assert STALL <= time.monotonic() - t0 < 3
    assert board.client.request("ping", {})["op"] == "ping"
    assert [c[0] for c in board.calls] == ["ping"]


def test_oversize_length_field_is_rejected_and_the_board_keeps_serving(board):
    board.host.write(raw_header(555, 1 << 31))
    frame, body = answer_for(board.host, 555)
    assert frame.type is FrameType.ERROR and body["type"] == "OversizeFrame" and str(MAX_PAYLOAD) in body["message"]
    assert board.client.request("ping", {})["op"] == "ping"


def test_lost_chunk_is_answered_with_an_error(board):
    board.host.write(request_frame(77, sizes=[10_000]))
    # Per the documented CHUNK layout: index u16, offset u32, total u32, data. Offset 0 never sent.
    board.host.write(encode_frame(Frame(FrameType.CHUNK, 77, struct.pack(">HII", 0, CHUNK_DATA_MAX, 10_000) + bytes(100))))
    frame, body = answer_for(board.host, 77)
    assert frame.type is FrameType.ERROR and "expected 0" in body["message"]
    assert board.calls == []
    assert board.client.request("ping", {}, [b"abc"])["sizes"] == [3]


def test_requests_with_bad_payloads_are_answered_with_errors(board):
    for rid, payload in [(81, b"\xff\xfe not utf-8"), (82, b"[1, 2]"), (83, b"[" * 60_000), (84, b'{"args": {}}'),
                         (85, b'{"op": "x", "attachments": [-1]}')]:
        board.host.write(encode_frame(Frame(FrameType.REQUEST, rid, payload)))
        frame, body = answer_for(board.host, rid)
        assert frame.type is FrameType.ERROR and body["type"] == "BadPayload", payload[:20]
    body = raw_header(86, 0, ftype=7)  # 7: no such frame type, but an intact frame
    board.host.write(body + struct.pack(">I", zlib.crc32(body)))
    frame, body = answer_for(board.host, 86)
    assert body["type"] == "UnknownFrameType"
    assert board.calls == []
    assert board.client.request("ping", {})["op"] == "ping"


def test_client_skips_stale_frames_for_other_requests(board):
    # Answers to some earlier exchange are already on the line when the client asks.
    board.board.write(encode_frame(Frame(FrameType.RESPONSE, 12345, b'{"op":"stale"}'))
                      + encode_frame(Frame(FrameType.ERROR, 12346, b'{"message":"stale error"}')))
    assert board.client.request("ping", {})["op"] == "ping"


def test_client_gives_up_on_a_truncated_or_missing_answer(link):
    host, board_port = link

    def half_answer() -> None:  # a broken board: reads the request, sends half of its answer
        request = None
        reader, deadline = FrameReader(board_port), time.monotonic() + 3
        while request is None and time.monotonic() < deadline:
            request = reader.read_frame(0.2)
        if request is not None:
            board_port.write(encode_frame(Frame(FrameType.RESPONSE, request.request_id, b'{"ok":true}'))[:-3])

    thread = threading.Thread(target=half_answer, daemon=True)
    thread.start()
    client = SerialClient(host, timeout=1.0, stall_timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match=r"no answer from the board to 'ping' within 1 s; 1 corrupt frame"):
        client.request("ping", {})
    assert time.monotonic() - t0 < 2.5
    thread.join(3)
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match="no answer"):  # nobody answers at all
        client.request("ping", {}, timeout=0.3)
    assert time.monotonic() - t0 < 1.5


# --- property-based (hypothesis): any bytes at all ------------------------------------------------


def test_decode_frame_takes_any_bytes():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    near_frames = st.binary(max_size=40).map(lambda b: MAGIC + bytes([VERSION]) + b)  # past the magic and version

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.binary(max_size=80) | near_frames)
    def prop(data: bytes) -> None:
        try:
            frame = decode_frame(data)
        except FrameError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert encode_frame(frame) == data  # only an exact frame decodes

    prop()


# --- slow links: a NullModem paced like a UART -----------------------------------------------------


def wire_seconds(nbytes: int, baud: int) -> float:
    return nbytes * 10 / baud  # 10 bits a character: start, 8 data, stop


def request_wire_bytes(sizes: list[int], args: dict | None = None) -> int:
    chunks = sum(-(-s // CHUNK_DATA_MAX) for s in sizes)
    return len(request_frame(1, "slow_echo", args, sizes)) + sum(sizes) + chunks * (HEADER_SIZE + 10 + 4)


@pytest.fixture
def slow_link(request) -> Iterator[tuple[Any, Any, int]]:
    """A host and a board port joined by a NullModem paced at ``request.param`` baud (both ports set to it)."""
    baud = request.param
    modem = NullModem(baud=baud)
    host = serial.Serial(modem.names[0], baudrate=baud, timeout=PORT_TIMEOUT)
    board_port = serial.Serial(modem.names[1], baudrate=baud, timeout=PORT_TIMEOUT)
    try:
        yield host, board_port, baud
    finally:
        host.close()
        board_port.close()
        modem.close()


def slow_handler(calls: list) -> Any:
    """Like handler_for, plus ``args["sleep"]`` seconds of work and an answer padded by ``args["pad"]`` bytes."""
    plain = handler_for(calls)

    def handler(op: str, args: dict, attachments: list[bytes]) -> dict:
        time.sleep(args.get("sleep", 0))
        return {**plain(op, args, attachments), "pad": "p" * args.get("pad", 0)}
    return handler


@pytest.fixture
def slow_board(slow_link) -> Iterator[tuple[Any, Any, int, list]]:
    """serve() on the board end of a slow link with the agent's defaults (stall timeout, poll interval)."""
    host, board_port, baud = slow_link
    calls: list = []
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(board_port, slow_handler(calls), stop), daemon=True)
    thread.start()
    try:
        yield host, board_port, baud, calls
    finally:
        stop.set()
        thread.join(3)
        assert not thread.is_alive(), "serve() did not return after stop was set"


def test_null_modem_paces_bytes_at_a_uart_character_time():
    modem = NullModem(baud=19200)
    a = serial.Serial(modem.names[0], timeout=PORT_TIMEOUT)
    b = serial.Serial(modem.names[1], timeout=PORT_TIMEOUT)
    try:
        data = random.Random(1).randbytes(960)  # 0.5 s at 1920 bytes a second
        t0 = time.monotonic()
        a.write(data)
        got = bytearray()
        while len(got) < len(data) and time.monotonic() - t0 < 5:
            got += b.read(len(data) - len(got))
        took = time.monotonic() - t0
    finally:
        a.close()
        b.close()
        modem.close()
    assert got == data
    assert 0.49 <= took < 1.0, took


@pytest.mark.parametrize(("slow_link", "size", "sleep", "pad", "timeout"), [
    (9600, 6_500, 0, 0, 1.5),  # one and a half chunks; a chunk frame alone takes 4.3 s at 9600 baud
    (38400, 6_500, 1.0, 0, 1.5),  # the handler's second would be eaten by the request's 1.7 s on the wire
    (38400, 20_000, 0, 3_000, 0.5),  # five chunks, and an answer that takes 0.8 s to arrive
], indirect=["slow_link"], ids=["9600-6.5KB", "38400-6.5KB-slow-handler", "38400-20KB-3KB-answer"])
def test_an_image_crosses_a_slow_link(slow_board, size, sleep, pad, timeout):
    """At 38400 baud and below a chunk frame takes longer than the stall timeout to arrive: the
    board and the client must time progress (bytes arriving), not whole frames, and the client's
    answer timeout must not run while its own request is still on the wire."""
    host, _, baud, calls = slow_board
    image = random.Random(size).randbytes(size)
    args = {"label": "cup", "sleep": sleep, "pad": pad}
    assert wire_seconds(request_wire_bytes([size], args), baud) + sleep > timeout  # the request alone outlasts it
    t0 = time.monotonic()
    result = SerialClient(host, timeout=timeout).request("slow_echo", args, [image])
    took = time.monotonic() - t0
    assert calls[-1][2] == [image]
    assert result["sha256"] == [hashlib.sha256(image).hexdigest()] and result["pad"] == "p" * pad
    want = wire_seconds(request_wire_bytes([size], args) + pad, baud) + sleep
    assert want * 0.9 < took < want + 3, (took, want)  # paced like the baud rate, and no long stall


@pytest.mark.parametrize("slow_link", [19200], indirect=True)
def test_a_frame_cut_on_a_slow_link_is_reported_once_the_line_goes_quiet(slow_board):
    """The cut frame takes longer than the stall timeout to arrive: no error while its bytes still
    come, one TruncatedFrame error about a stall timeout after the last byte, and the board serves on."""
    host, _, baud, calls = slow_board
    head = request_frame(515, "slow_echo", sizes=[6_500])
    cut = encode_frame(Frame(FrameType.CHUNK, 515, struct.pack(">HII", 0, 0, 6_500) + bytes(CHUNK_DATA_MAX)))[:2_500]
    t0 = time.monotonic()
    host.write(head + cut)
    on_wire = wire_seconds(len(head) + len(cut), baud)
    assert on_wire > STALL_TIMEOUT
    frame, body = answer_for(host, 515, timeout=on_wire + STALL_TIMEOUT + 3)
    took = time.monotonic() - t0
    assert frame.type is FrameType.ERROR and body["type"] == "TruncatedFrame", body
    assert "truncated frame for request 515" in body["message"], body
    assert on_wire + STALL_TIMEOUT * 0.9 < took < on_wire + STALL_TIMEOUT + 1.5, (took, on_wire)
    assert calls == []
    assert SerialClient(host, timeout=2).request("ping", {})["op"] == "ping"


@pytest.mark.parametrize("slow_link", [38400], indirect=True)
def test_the_client_waits_for_an_answer_still_arriving_and_reports_one_cut_off(slow_link):
    """A broken board sends half of a 6 KB answer: the client waits past its timeout while the
    bytes come (0.8 s of them against a 0.3 s timeout), then reports the cut frame once they stop."""
    host, board_port, baud = slow_link
    payload = json.dumps({"pad": "p" * 6_000}).encode()
    cut = (HEADER_SIZE + len(payload) + 4) // 2

    def half_answer() -> None:
        request = None
        reader, deadline = FrameReader(board_port), time.monotonic() + 3
        while request is None and time.monotonic() < deadline:
            request = reader.read_frame(0.2)
        if request is not None:
            board_port.write(encode_frame(Frame(FrameType.RESPONSE, request.request_id, payload))[:cut])

    thread = threading.Thread(target=half_answer, daemon=True)
    thread.start()
    client = SerialClient(host, timeout=0.3, stall_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match=r"no answer from the board to 'ping' within 0.3 s; 1 corrupt frame"):
        client.request("ping", {})
    took = time.monotonic() - t0
    on_wire = wire_seconds(cut, baud)
    assert on_wire * 0.9 < took < on_wire + 0.3 + 1.5, (took, on_wire)
    thread.join(3)


SENTINEL = 0xFFFFFFFF  # the request id of the last, valid request; the fuzzed frames use others


class DrainPort(MemoryPort):
    """A MemoryPort that keeps what the board writes."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data, timeout=0.001)
        self.written = bytearray()

    def write(self, data: bytes) -> int:
        self.written += data
        return len(data)


def split_frames(wire: bytes) -> list[Frame]:
    """The frames `wire` is made of, back to back; fails on any byte that is not part of an intact frame."""
    frames, at = [], 0
    while at < len(wire):
        (length,) = struct.unpack_from(">I", wire, at + 12)
        frames.append(decode_frame(wire[at : at + HEADER_SIZE + length + 4]))
        at += HEADER_SIZE + length + 4
    return frames


def test_the_board_answers_any_byte_stream_with_intact_one_line_frames():
    """Garbage, fake headers, corrupt and truncated frames, requests with JSON of any shape, stray
    and wrong chunks, then one valid request: serve() neither raises nor hangs, writes only intact
    RESPONSE/ERROR frames with one-line messages, and still answers the valid request at the end."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    rids = st.sampled_from([1, 2, 3]) | st.integers(0, SENTINEL - 1)
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                          max_leaves=8)
    sizes = st.lists(st.integers(0, 40), max_size=3) | values
    request = st.builds(lambda rid, op, args, att: encode_frame(Frame(FrameType.REQUEST, rid, json.dumps(
        {"op": op, "args": args, "attachments": att}).encode())),
        rids, st.sampled_from(["echo", "fail", "not_a_dict"]) | values, st.dictionaries(st.text(max_size=5), values, max_size=3)
        | values, sizes)
    chunk = st.builds(lambda rid, index, offset, total, data: encode_frame(Frame(FrameType.CHUNK, rid, struct.pack(
        ">HII", index, offset, total) + data)), rids, st.integers(0, 3), st.integers(0, 50), st.integers(0, 50),
        st.binary(max_size=50))
    raw = st.builds(lambda rid, ftype, payload: encode_frame(Frame(FrameType.REQUEST, rid, payload))[:5] + bytes([ftype])
                    + encode_frame(Frame(FrameType.REQUEST, rid, payload))[6:], rids, st.integers(0, 255), st.binary(max_size=60))
    fake_header = st.builds(lambda rid, n, version, tail: raw_header(rid, n, version=version) + tail, rids,
                            st.integers(0, MAX_PAYLOAD + 10), st.sampled_from([VERSION, 0, 2, 255]), st.binary(max_size=30))
    frame = request | chunk | raw | fake_header
    damaged = st.builds(lambda f, i, bit, cut: (f[:i] + bytes([f[i % len(f)] ^ (1 << bit)]) + f[i + 1:])[:cut] if cut else f,
                        frame, st.integers(0, 60), st.integers(0, 7), st.integers(0, 80))
    segment = st.binary(max_size=40) | frame | damaged

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(segment, max_size=6))
    def prop(segments: list[bytes]) -> None:
        calls: list = []
        handle = handler_for(calls)
        stop = threading.Event()

        def handler(op: str, args: dict, attachments: list[bytes]) -> dict:
            if op == "sentinel":
                stop.set()  # serve() returns once it has written this answer
            return handle(op, args, attachments)

        port, raised = DrainPort(b"".join(segments) + request_frame(SENTINEL, op="sentinel")), []

        def run() -> None:
            try:
                serve(port, handler, stop, stall_timeout=0.01, poll_interval=0.01)
            except BaseException as exc:  # the property: nothing escapes serve()
                raised.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(10)
        assert not raised, raised
        assert not thread.is_alive(), "serve() hung, or never answered the valid request at the end"
        answers = split_frames(bytes(port.written))
        for f in answers:
            assert f.type in (FrameType.RESPONSE, FrameType.ERROR)
            body = json.loads(f.payload)
            if f.type is FrameType.ERROR:
                assert isinstance(body["message"], str) and body["message"] and "\n" not in body["message"], body
        assert answers[-1].request_id == SENTINEL and answers[-1].type is FrameType.RESPONSE, answers[-1]

    prop()
