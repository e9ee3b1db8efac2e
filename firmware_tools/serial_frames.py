"""Frames of the serial wire protocol: layout, encoding, checks and the reader that pulls frames out of
a noisy byte stream. The written spec, with the exchange built on these frames, is serial_protocol.py's."""

from __future__ import annotations

import enum
import json
import logging
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

_log = logging.getLogger("firmware_tools.serial_protocol")  # one logger for the protocol

MAGIC = b"\xa5\x5aEM"
VERSION = 1
_HEADER = struct.Struct(">4sBBHII")  # magic, version, type, flags, request_id, length
_CRC = struct.Struct(">I")
_CHUNK = struct.Struct(">HII")  # attachment index, offset, total size
HEADER_SIZE = _HEADER.size  # 16
TRAILER_SIZE = _CRC.size  # 4
MAX_PAYLOAD = 64 * 1024
CHUNK_PAYLOAD_MAX = 4096
CHUNK_DATA_MAX = CHUNK_PAYLOAD_MAX - _CHUNK.size  # 4086
MAX_ATTACHMENT_BYTES = 16 * 1024 * 1024  # board-side memory bound per request
STALL_TIMEOUT = 1.0  # seconds without a byte of the frame in flight; no healthy sender pauses this long
_U32 = 0xFFFFFFFF



class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    ERROR = 3
    CHUNK = 4


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    request_id: int
    payload: bytes = b""


class ProtocolError(Exception):
    """A request could not be completed over the serial link; the message is one line for people."""


class RemoteError(ProtocolError):
    """The board answered with an ERROR frame. ``type`` is the board-side exception's class name."""

    def __init__(self, message: str, type: str = "") -> None:
        super().__init__(message)
        self.type = type


class FrameError(ProtocolError):
    """A received frame was rejected. ``request_id`` is the header's id when the header was read."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class BadMagic(FrameError):
    """The bytes do not start with the magic (only from :func:`decode_frame`; a reader resyncs)."""


class BadCrc(FrameError):
    pass


class UnsupportedVersion(FrameError):
    pass


class OversizeFrame(FrameError):
    pass


class TruncatedFrame(FrameError):
    pass


class UnknownFrameType(FrameError):
    pass


class BadPayload(FrameError):
    """The frame is intact but its payload does not follow the spec (bad JSON, bad chunk)."""


class Port(Protocol):
    """What is used of ``serial.Serial``: ``read(n)`` returns at most n bytes, waiting up to ``timeout``."""

    timeout: float | None

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes, /) -> int | None: ...


Handler = Callable[[str, dict[str, Any], list[bytes]], dict[str, Any]]


# --- frames -------------------------------------------------------------------------------------


def encode_frame(frame: Frame, *, max_payload: int = MAX_PAYLOAD) -> bytes:
    """The wire bytes of one frame."""
    if not 0 <= frame.request_id <= _U32:
        raise ValueError(f"request_id {frame.request_id} does not fit in u32")
    if len(frame.payload) > max_payload:
        raise ValueError(f"payload of {len(frame.payload)} bytes exceeds the {max_payload}-byte frame limit")
    head = _HEADER.pack(MAGIC, VERSION, FrameType(frame.type), 0, frame.request_id, len(frame.payload))
    body = head + bytes(frame.payload)
    return body + _CRC.pack(zlib.crc32(body))


def _check_header(buf: bytes | bytearray, max_payload: int) -> tuple[int, int, int]:
    """(type, request_id, length) of the header at buf[0:16]; raises before any payload is awaited."""
    _, version, ftype, _flags, rid, length = _HEADER.unpack_from(buf)
    if version != VERSION:
        raise UnsupportedVersion(f"frame for request {rid} uses protocol version {version}, this side speaks {VERSION}", rid)
    if length > max_payload:
        raise OversizeFrame(f"frame for request {rid} declares {length} payload bytes, the limit is {max_payload}", rid)
    return ftype, rid, length


def _finish(buf: bytes | bytearray, ftype: int, rid: int, length: int) -> Frame:
    """Check the CRC and type of a complete frame at buf[0:16+length+4]."""
    end = HEADER_SIZE + length
    (got,) = _CRC.unpack_from(buf, end)
    want = zlib.crc32(memoryview(buf)[:end])
    if got != want:
        raise BadCrc(f"CRC mismatch in frame for request {rid} (got {got:#010x}, computed {want:#010x})", rid)
    try:
        ftype = FrameType(ftype)
    except ValueError:
        raise UnknownFrameType(f"unknown frame type {ftype} for request {rid}", rid) from None
    return Frame(ftype, rid, bytes(buf[HEADER_SIZE:end]))


def decode_frame(data: bytes, *, max_payload: int = MAX_PAYLOAD) -> Frame:
    """Decode exactly one frame (no leading garbage, no trailing bytes); any defect raises FrameError."""
    if data[: len(MAGIC)] != MAGIC:
        raise BadMagic("data does not start with the frame magic")
    if len(data) < HEADER_SIZE:
        raise TruncatedFrame(f"{len(data)} bytes is shorter than a frame header")
    ftype, rid, length = _check_header(data, max_payload)
    size = HEADER_SIZE + length + TRAILER_SIZE
    if len(data) < size:
        raise TruncatedFrame(f"frame for request {rid} needs {size} bytes, got {len(data)}", rid)
    if len(data) > size:
        raise FrameError(f"{len(data) - size} bytes after the end of the frame for request {rid}", rid)
    return _finish(data, ftype, rid, length)


def _json_frame(ftype: FrameType, rid: int, obj: dict[str, Any], max_payload: int) -> bytes:
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return encode_frame(Frame(ftype, rid, payload), max_payload=max_payload)


def _json_payload(frame: Frame) -> dict[str, Any]:
    try:
        obj = json.loads(frame.payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested 60k deep
        raise BadPayload(f"{frame.type.name} payload for request {frame.request_id} is not UTF-8 JSON: {exc}", frame.request_id) from None
    if not isinstance(obj, dict):
        raise BadPayload(f"{frame.type.name} payload for request {frame.request_id} is not a JSON object", frame.request_id)
    return obj


def _chunk_frames(rid: int, index: int, data: bytes, chunk_data: int) -> list[bytes]:
    total = len(data)
    return [encode_frame(Frame(FrameType.CHUNK, rid, _CHUNK.pack(index, off, total) + data[off : off + chunk_data]))
            for off in range(0, total, chunk_data)]


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- reader -------------------------------------------------------------------------------------


class FrameReader:
    """Pulls frames out of a byte stream that may hold garbage, corrupt or cut-off frames.

    ``read_frame(timeout)`` returns the next valid frame, returns None when none completed before
    the deadline (a partial frame stays buffered for the next call), or raises a FrameError for a
    rejected frame (the reader has already moved past it; call again to continue). A partial frame
    is reported as TruncatedFrame once no byte has arrived for ``stall_timeout`` seconds.
    ``in_flight`` and ``last_progress`` tell a caller whether a frame is arriving and when its
    last byte came, so its own timers can count progress rather than complete frames.
    """

    def __init__(self, port: Port, *, max_payload: int = MAX_PAYLOAD, stall_timeout: float = STALL_TIMEOUT) -> None:
        if getattr(port, "timeout", None) is None:
            # read() would block forever on a silent line and no deadline could be kept.
            raise ValueError("the serial port needs a finite read timeout, e.g. serial.Serial(..., timeout=0.1)")
        self._port = port
        self._max_payload = max_payload
        self._stall_timeout = stall_timeout
        self._buf = bytearray()
        self._last_rx = time.monotonic()
        self._frame_rx = self._last_rx

    @property
    def in_flight(self) -> bool:
        """True when the start of a frame is buffered and the rest has not arrived yet."""
        return self._buf.startswith(MAGIC)

    @property
    def last_progress(self) -> float:
        """``time.monotonic()`` when the last byte that belongs to a frame (one starting with the magic,
        complete or not) arrived; bytes outside frames (noise, boot messages) do not count."""
        return self._frame_rx

    def read_frame(self, timeout: float) -> Frame | None:
        # Overshoot past the deadline is bounded by one port.read(), i.e. by port.timeout.
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            if time.monotonic() >= deadline:
                return None
            self._receive()

    def _parse(self) -> Frame | None:
        buf = self._buf
        start = buf.find(MAGIC)
        if start < 0:
            # Keep a tail that could be the first bytes of a magic split across reads.
            del buf[: max(0, len(buf) - (len(MAGIC) - 1))]
            return None
        if start:
            _log.debug("skipped %d garbage bytes", start)
            del buf[:start]
        self._frame_rx = self._last_rx  # what is buffered from here on is (the start of) a frame
        if len(buf) < HEADER_SIZE:
            return None
        try:
            ftype, rid, length = _check_header(buf, self._max_payload)
            if len(buf) < HEADER_SIZE + length + TRAILER_SIZE:
                return None
            frame = _finish(buf, ftype, rid, length)
        except FrameError:
            del buf[:1]  # rescan from the next byte: a real frame may hide inside the bad one
            raise
        del buf[: HEADER_SIZE + length + TRAILER_SIZE]
        return frame

    def _check_stall(self) -> None:
        # Only called after a read came back empty: the rest of a frame is not merely waiting unread
        # in the OS buffer, it has stopped arriving.
        buf = self._buf
        if not buf or time.monotonic() - self._last_rx <= self._stall_timeout:
            return
        if not buf.startswith(MAGIC):
            buf.clear()  # a lone partial magic that never completed
            return
        rid = _HEADER.unpack_from(buf)[4] if len(buf) >= HEADER_SIZE else None
        have = len(buf)
        del buf[:1]
        about = f"frame for request {rid}" if rid is not None else "frame header"
        raise TruncatedFrame(f"truncated {about}: only {have} bytes arrived before the line went quiet for {self._stall_timeout:g} s", rid)

    def _receive(self) -> None:
        buf = self._buf
        need = HEADER_SIZE - len(buf)
        if len(buf) >= HEADER_SIZE:  # _parse left a plausible header in front: wait for its whole frame
            need = HEADER_SIZE + _HEADER.unpack_from(buf)[5] + TRAILER_SIZE - len(buf)
        # Ask for what is already waiting too, so a burst is taken in one call instead of per frame part.
        waiting = min(getattr(self._port, "in_waiting", 0) or 0, HEADER_SIZE + self._max_payload + TRAILER_SIZE)
        data = self._port.read(max(need, waiting, 1))
        if data:
            buf += data
            self._last_rx = time.monotonic()
            return
        if not self._port.timeout:
            time.sleep(0.01)  # a non-blocking port (timeout=0) must not turn the wait into a busy loop
        self._check_stall()
