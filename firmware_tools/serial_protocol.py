"""The serial wire protocol between the host and the board agent (written spec + implementation).

The host (``edgemeta remote --via serial:/dev/ttyUSB0``) sends requests over a UART to the board
agent (``edgemeta serve --serial /dev/ttyS0``), which answers each one. A UART gives an ordered
byte stream with no framing, no integrity check and no flow control, and the line may carry boot
messages or noise; so everything travels in self-delimiting, checksummed, versioned frames.

Frame layout (protocol version 1; all integers unsigned, big-endian)::

    offset  size  field
    0       4     magic        A5 5A 45 4D  (0xA5 0x5A then ASCII "EM")
    4       1     version      1
    5       1     type         1 REQUEST, 2 RESPONSE, 3 ERROR, 4 CHUNK
    6       2     flags        reserved: senders write 0, receivers ignore
    8       4     request_id   chosen by the host; every frame of one exchange carries it
    12      4     length       N, payload bytes; a receiver rejects N > its limit (default 65536)
    16      N     payload      depends on type, below
    16+N    4     crc32        zlib.crc32 of bytes [0, 16+N), i.e. header + payload

Payloads:

- REQUEST: UTF-8 JSON object ``{"op": str, "args": object, "attachments": [size, ...]}``; the
  list declares how many binary attachments follow and the byte size of each (may be empty).
- CHUNK: one piece of an attachment, ``index u16 | offset u32 | total u32 | data``: ``index``
  into the request's attachment list, ``offset`` of ``data`` in that attachment, ``total`` its
  full size (must equal the declared size). A CHUNK payload is at most 4096 bytes, so ``data``
  is at most 4086 bytes. The chunks of one attachment are sent in order (offset 0, 4086, ...);
  an attachment of size 0 has no chunks.
- RESPONSE: UTF-8 JSON object, the handler's result.
- ERROR: UTF-8 JSON object ``{"message": str, "type": str}``, ``message`` one human line.

Exchange: the host sends REQUEST then the CHUNKs of attachment 0, 1, ... (all with the same
``request_id``), and the board answers with one RESPONSE or one ERROR carrying that id. Ids of
other exchanges are stale (e.g. the answer to a request that had timed out) and are skipped.

Receiving: a reader scans for the magic (bytes before it are garbage, dropped), checks the
version and the length limit as soon as the header is in (no waiting for a bogus 4 GB payload),
then the CRC. On any bad frame it drops only the first magic byte and scans again, so a valid
frame that was swallowed by a corrupt header is still found. Each failure is a
:class:`FrameError` subclass carrying the header's ``request_id`` when the header was read; the
board answers those with an ERROR frame, so the host fails fast instead of waiting for its
timeout. No retries at this layer.

Timers measure progress, never whole frames, so they hold at any baud rate (at 9600 baud a byte
takes about 1 ms, a full CHUNK frame 4.3 s); chunk sizes therefore do not depend on the baud
rate (a smaller chunk would only add 30 bytes of framing per piece). A frame is truncated when no
byte of it has arrived for ``stall_timeout`` seconds (default 1 s; a healthy UART sender never
pauses that long between bytes). The board drops a request whose attachments stop arriving, with
a TruncatedFrame ERROR, when no byte of any frame has arrived for ``stall_timeout`` after its
last complete frame. The host's ``timeout`` runs from when the request can have reached the board
(its bytes' wire time at ``port.baudrate``, or when the last write returned if that was later)
to the first byte of the answer; an answer whose bytes are still arriving is waited for, so a
large answer on a slow line is not taken for a lost one. A cut-off sender is still reported a
``stall_timeout`` after its last byte.

>>> import serial                                                          # doctest: +SKIP
>>> port = serial.Serial("/dev/ttyUSB0", baudrate=115200, timeout=0.1)     # doctest: +SKIP
>>> SerialClient(port).request("enroll", {"label": "cat"}, [png_bytes])     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from firmware_tools.serial_frames import (
    _CHUNK,
    _U32,
    CHUNK_DATA_MAX,
    CHUNK_PAYLOAD_MAX,
    HEADER_SIZE,
    MAGIC,
    MAX_ATTACHMENT_BYTES,
    MAX_PAYLOAD,
    STALL_TIMEOUT,
    VERSION,
    BadCrc,
    BadMagic,
    BadPayload,
    Frame,
    FrameError,
    FrameReader,
    FrameType,
    Handler,
    OversizeFrame,
    Port,
    ProtocolError,
    RemoteError,
    TruncatedFrame,
    UnknownFrameType,
    UnsupportedVersion,
    _chunk_frames,
    _json_frame,
    _json_payload,
    _one_line,
    decode_frame,
    encode_frame,
)

__all__ = [
    "MAGIC", "VERSION", "HEADER_SIZE", "MAX_PAYLOAD", "CHUNK_PAYLOAD_MAX", "CHUNK_DATA_MAX",
    "FrameType", "Frame", "encode_frame", "decode_frame", "FrameReader", "SerialClient", "serve",
    "ProtocolError", "RemoteError", "FrameError", "BadMagic", "BadCrc", "UnsupportedVersion",
    "OversizeFrame", "TruncatedFrame", "UnknownFrameType", "BadPayload",
]

_log = logging.getLogger(__name__)


# --- host side ----------------------------------------------------------------------------------


class SerialClient:
    """The host end: one request at a time, answered by the board's :func:`serve` loop.

    ``timeout`` is how long to wait for the answer to begin once the request can have reached the
    board: after its wire time at ``port.baudrate`` (when the port has one) or after the last
    write returned, whichever is later. It covers the board's work; an answer whose bytes are still
    arriving is waited for, until it is complete or stops for ``stall_timeout``.
    """

    def __init__(self, port: Port, *, timeout: float = 10.0, max_payload: int = MAX_PAYLOAD,
                 stall_timeout: float = STALL_TIMEOUT) -> None:
        self._port = port
        self._reader = FrameReader(port, max_payload=max_payload, stall_timeout=stall_timeout)
        self._timeout = timeout
        self._max_payload = max_payload
        # A random start keeps answers meant for an earlier host session from matching ours.
        self._next_id = secrets.randbits(32)
        self._lock = threading.Lock()

    def request(self, op: str, args: dict[str, Any], attachments: Sequence[bytes] = (), *,
                timeout: float | None = None) -> dict[str, Any]:
        """Send ``op`` with JSON ``args`` and binary attachments; return the board's JSON answer.

        Raises RemoteError when the board answers with an ERROR frame, ProtocolError on timeout or
        a malformed answer, ValueError/TypeError for arguments that cannot be sent.
        """
        if not isinstance(op, str) or not op:
            raise ValueError("op must be a non-empty string")
        if not isinstance(args, dict):
            raise TypeError(f"args must be a dict, not {type(args).__name__}")
        blobs = [bytes(a) for a in attachments]
        if len(blobs) > 0xFFFF:
            raise ValueError(f"{len(blobs)} attachments, the protocol carries at most 65535")
        with self._lock:
            rid = self._next_id
            self._next_id = (rid + 1) & _U32
            try:
                head = _json_frame(FrameType.REQUEST, rid, {"op": op, "args": args, "attachments": [len(b) for b in blobs]},
                                   self._max_payload)
            except ValueError as exc:
                raise ValueError(f"request '{op}' cannot be sent: {exc} (send large data as attachments)") from None
            started, sent = time.monotonic(), len(head)
            self._port.write(head)
            for index, blob in enumerate(blobs):
                for chunk in _chunk_frames(rid, index, blob, CHUNK_DATA_MAX):
                    self._port.write(chunk)
                    sent += len(chunk)
            wire = _wire_seconds(self._port, sent)
            arrived = max(started + wire, time.monotonic())  # a write may return before its bytes are out
            return self._await(op, rid, self._timeout if timeout is None else timeout, arrived, wire)

    def _await(self, op: str, rid: int, timeout: float, arrived: float, wire: float) -> dict[str, Any]:
        deadline = arrived + timeout
        rejected = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0 and not self._reader.in_flight:
                break  # past the deadline only while a frame's bytes are arriving (its stall timer ends it)
            try:
                frame = self._reader.read_frame(left if left > 0 else 0.1)
            except FrameError as exc:
                rejected += 1
                _log.warning("ignored a bad frame from the board: %s", exc)
                continue
            if frame is None:
                continue
            if frame.request_id != rid or frame.type not in (FrameType.RESPONSE, FrameType.ERROR):
                _log.debug("skipped stale %s frame for request %d", frame.type.name, frame.request_id)
                continue
            try:
                body = _json_payload(frame)
            except BadPayload as exc:
                raise ProtocolError(f"malformed answer to '{op}' from the board: {exc}") from None
            if frame.type is FrameType.ERROR:
                message = _one_line(str(body.get("message") or "no message"))
                raise RemoteError(f"board error for '{op}': {message}", str(body.get("type", "")))
            return body
        extra = f"; {rejected} corrupt frame(s) were dropped" if rejected else ""
        if wire >= 0.5:
            extra = f" after the request's {wire:.1f} s on the wire at {self._port.baudrate} baud" + extra
        raise ProtocolError(f"no answer from the board to '{op}' within {timeout:g} s{extra} "
                            "(check the cable, the baud rate and that `edgemeta serve --serial` runs on the board)")


def _wire_seconds(port: Port, nbytes: int) -> float:
    """How long ``nbytes`` take on the line at the port's settings (0 when it has no baud rate)."""
    try:
        baud = float(port.baudrate)  # type: ignore[attr-defined]
        bits = 1 + int(getattr(port, "bytesize", 8)) + (getattr(port, "parity", "N") != "N") + float(getattr(port, "stopbits", 1))
    except (AttributeError, TypeError, ValueError):
        return 0.0
    return nbytes * bits / baud if baud > 0 else 0.0


# --- board side ---------------------------------------------------------------------------------


@dataclass
class _Pending:
    """A REQUEST whose attachments are still arriving."""

    request_id: int
    op: str
    args: dict[str, Any]
    sizes: list[int]
    parts: list[bytearray] = field(default_factory=list)
    last_progress: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, frame: Frame, max_attachment_bytes: int) -> _Pending:
        rid = frame.request_id
        body = _json_payload(frame)
        op, args, sizes = body.get("op"), body.get("args", {}), body.get("attachments", [])
        if not isinstance(op, str) or not op:
            raise BadPayload(f"request {rid} has no 'op' string", rid)
        if not isinstance(args, dict):
            raise BadPayload(f"request {rid}: 'args' must be a JSON object", rid)
        if (not isinstance(sizes, list) or len(sizes) > 0xFFFF
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= _U32 for s in sizes)):
            raise BadPayload(f"request {rid}: 'attachments' must be a list of byte sizes", rid)
        if sum(sizes) > max_attachment_bytes:
            raise BadPayload(f"request {rid}: {sum(sizes)} attachment bytes exceed the board's limit of {max_attachment_bytes}", rid)
        return cls(rid, op, args, sizes, [bytearray() for _ in sizes])

    @property
    def complete(self) -> bool:
        return all(len(p) == s for p, s in zip(self.parts, self.sizes, strict=True))

    def add(self, frame: Frame) -> None:
        rid, payload = self.request_id, frame.payload
        if len(payload) < _CHUNK.size:
            raise BadPayload(f"request {rid}: chunk payload of {len(payload)} bytes is shorter than its header", rid)
        index, offset, total = _CHUNK.unpack_from(payload)
        data = payload[_CHUNK.size :]
        if index >= len(self.sizes):
            raise BadPayload(f"request {rid}: chunk for attachment {index}, the request declared {len(self.sizes)}", rid)
        got = len(self.parts[index])
        if total != self.sizes[index]:
            raise BadPayload(f"request {rid}: attachment {index} chunk says {total} bytes, the request declared {self.sizes[index]}", rid)
        if offset != got:
            raise BadPayload(f"request {rid}: attachment {index} chunk at offset {offset}, expected {got} (a chunk was lost)", rid)
        if offset + len(data) > total:
            raise BadPayload(f"request {rid}: attachment {index} chunk runs past its {total} bytes", rid)
        self.parts[index] += data
        self.last_progress = time.monotonic()


def _send_error(port: Port, rid: int, message: str, kind: str, max_payload: int) -> None:
    port.write(_json_frame(FrameType.ERROR, rid, {"message": _one_line(message), "type": kind}, max_payload))


def _answer(port: Port, req: _Pending, handler: Handler, max_payload: int) -> None:
    try:
        result = handler(req.op, req.args, [bytes(p) for p in req.parts])
    except Exception as exc:  # the handler's failure is the client's answer, and the loop goes on
        _log.info("request %d '%s' failed: %s", req.request_id, req.op, exc)
        _send_error(port, req.request_id, str(exc) or type(exc).__name__, type(exc).__name__, max_payload)
        return
    if not isinstance(result, dict):
        _send_error(port, req.request_id, f"handler for '{req.op}' returned {type(result).__name__}, not a dict", "TypeError", max_payload)
        return
    try:
        frame = _json_frame(FrameType.RESPONSE, req.request_id, result, max_payload)
    except (TypeError, ValueError, RecursionError) as exc:
        _send_error(port, req.request_id, f"answer to '{req.op}' cannot be sent: {exc}", type(exc).__name__, max_payload)
        return
    port.write(frame)


def serve(port: Port, handler: Handler, stop: threading.Event | None = None, *, max_payload: int = MAX_PAYLOAD,
          max_attachment_bytes: int = MAX_ATTACHMENT_BYTES, stall_timeout: float = STALL_TIMEOUT,
          poll_interval: float = 0.2) -> None:
    """The board end: answer requests on ``port`` until ``stop`` is set (forever when None).

    ``handler(op, args, attachments)`` returns a JSON-able dict; an exception it raises becomes an
    ERROR frame with the exception's message. Bad frames are answered with ERROR when their request
    id could be read, else skipped. A request whose attachments stop arriving (no byte of a frame
    for ``stall_timeout`` seconds, however long each chunk takes) is answered with a TruncatedFrame
    ERROR. Errors of the port itself (unplugged, closed) propagate.
    ``stop`` is checked every ``poll_interval`` seconds plus at most one ``port.timeout``.
    """
    reader = FrameReader(port, max_payload=max_payload, stall_timeout=stall_timeout)
    pending: _Pending | None = None

    def fail(rid: int, message: str, kind: str) -> None:
        nonlocal pending
        _log.warning("request %d rejected: %s", rid, message)
        _send_error(port, rid, message, kind, max_payload)
        if pending is not None and pending.request_id == rid:
            pending = None  # later chunks of it are dropped silently below

    while stop is None or not stop.is_set():
        try:
            frame = reader.read_frame(poll_interval)
        except FrameError as exc:
            if exc.request_id is not None:
                fail(exc.request_id, f"bad frame: {exc}", type(exc).__name__)
            else:
                _log.warning("skipped a bad frame: %s", exc)
            continue
        # Progress is any byte of a frame, not only a complete chunk: at 38400 baud and below one chunk
        # frame takes longer than stall_timeout to arrive. While a frame is arriving the reader's own
        # stall timer decides (and reports the frame as truncated, with its request id).
        if (pending is not None and not reader.in_flight
                and time.monotonic() - max(pending.last_progress, reader.last_progress) > stall_timeout):
            got, want = sum(map(len, pending.parts)), sum(pending.sizes)
            fail(pending.request_id, f"attachments stopped arriving ({got} of {want} bytes received, then nothing for "
                 f"{stall_timeout:g} s)", "TruncatedFrame")
        if frame is None:
            continue
        if frame.type is FrameType.REQUEST:
            if pending is not None:
                fail(pending.request_id, "a new request arrived before this one's attachments were complete", "TruncatedFrame")
            try:
                pending = _Pending.start(frame, max_attachment_bytes)
            except FrameError as exc:
                fail(frame.request_id, str(exc), type(exc).__name__)
                continue
        elif frame.type is FrameType.CHUNK and pending is not None and frame.request_id == pending.request_id:
            try:
                pending.add(frame)
            except FrameError as exc:
                fail(frame.request_id, str(exc), type(exc).__name__)
                continue
        else:
            _log.debug("skipped %s frame for request %d", frame.type.name, frame.request_id)
            continue
        if pending.complete:
            req, pending = pending, None
            _answer(port, req, handler, max_payload)
