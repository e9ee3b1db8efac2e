"""The board agent: one loaded model and store answering requests, and clients to reach it.

Operations (args are JSON, images travel as attachments of raw file bytes):
    enroll   {label, [adapt, lr]} + images -> {label, samples}
    classify {top_k}           + images  -> {results: [...]}
    classes  {}                          -> {classes: {label: samples}, backbone, head}
    forget   {label}                     -> {label, removed}
    rename   {old, new}                  -> {old, new}
    adapt    {steps, [lr]}               -> {kind, init, steps, lr, adapt} (steps 0: off)
    status   {}                          -> model, variant, runtime, classes, requests, uptime
    auth     {token}                     -> {token: "accepted" | "not needed"}
Transports: JSON lines over a Unix socket, TCP or stdin/stdout (one request per line:
{"id", "op", "args", "attachments": [base64]}; exactly one answer per request line, {"id", "ok",
"result"} or {"id", "ok": false, "error"}), and the framed serial protocol of
firmware_tools.serial_protocol. Error answers are one sentence for a person, never Python internals.

TCP beyond loopback needs `allow_remote` and a token (`load_token`: a file of mode 600 or
$EDGEMETA_TOKEN); a connection's first line must then be the `auth` request (at most AUTH_LINE
bytes), compared in constant time, and anything else is refused and the connection closed. The
token travels in clear: use it on a network you trust, or reach the board with `--via ssh:`.

Bounds (`Agent` arguments, `edgemeta serve` options): a request line is at most
`max_request_bytes` (an over-long line gets one error and the rest of it is discarded); at most
`max_connections` connections are served at once on each listener (one more gets a one-line "busy"
answer; the local socket has its own count, so TCP clients never crowd it out); a connection idle
for `idle_timeout` seconds is closed. Before a TCP connection has sent its token it may hold its
slot for `auth_seconds` at most, and at most 8 such connections wait at once, 2 per address (a
ninth pushes the oldest out). SIGTERM stops gracefully: no new connection, every request already
started answered, later ones refused with an answer, then exit. Images are decoded outside the store lock,
within the board's image limits; decodes of large images (and reads of large request lines) take
one of `decode_slots` (1 on boards under 2 GB), so small requests are never queued behind them.

`run_agent` is `edgemeta serve`: it loads the agent and serves it until stopped.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import ipaddress
import json
import os
import socket
import socketserver
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.files import open_regular
from edgemeta.limits import MAX_TOP_K
from edgemeta.preprocess import ImageLimits
from edgemeta.runtime.classifier import UNKNOWN, FewShotRuntime
from edgemeta.runtime.store import STORE_FILE, EnrollmentStore, check_adapt

MAX_LINE = 64 * 2**20  # default limit of one request line (JSON lines transports)
AUTH_LINE = 4096  # an unauthenticated connection's first line (the auth request) is at most this long
LARGE_LINE = 2**20  # request lines longer than this are read within the decode slots
# Images at most this big (encoded bytes and decoded pixels: a VGA frame) are decoded without a
# decode slot: each costs a few MB at most, so they never wait behind a large image.
SMALL_IMAGE_BYTES = 2**20
SMALL_IMAGE_PIXELS = 640 * 480
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_SERIAL_REOPEN_FOR = 300.0
# Before a TCP connection has sent its token it holds a thread and a slot; so at most this many are
# held in all and per address, each for at most AUTH_SECONDS. A new one past either bound pushes out
# the oldest waiting one (so a flood cannot keep a real client out: it authenticates in milliseconds).
DEFAULT_AUTH_SECONDS = 10.0
PREAUTH_TOTAL = 8
PREAUTH_PER_PEER = 2
DRAIN_SECONDS = 30.0  # on SIGTERM: how long requests already started may take to be answered
STOPPING = "the agent is stopping (a restart or shutdown); send the request again in a moment"
TOKEN_ENV = "EDGEMETA_TOKEN"
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 1024  # the auth line is at most AUTH_LINE bytes
TOKEN_HINT = "(umask 077; python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE)"
OPS = ("enroll", "classify", "classes", "forget", "rename", "adapt", "calibrate", "reenroll", "new_store", "status", "auth")
OPEN_SET_MODES = ("calibrated", "manual", "off", "model", "show")


def default_decode_slots(board) -> int:
    """Large decodes at once: 1 on boards with less than 2 GB (or no profile), else 2."""
    memory = board.raw.get("memory_mb") if board is not None else None
    return 2 if isinstance(memory, int) and memory >= 2048 else 1


def _show(value: Any) -> str:
    """A short rendering of a JSON value for an error message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _text(args: dict, key: str) -> str:
    value = args.get(key, "")
    if not isinstance(value, str):
        raise EdgemetaError(f"bad request: {key} must be a string, got {_show(value)}")
    return value


class Agent:
    """Keeps the interpreter, the store and its head in memory.

    Requests may come from many threads: images are decoded outside the lock (large ones within
    `decode_slots`), the interpreter and the store are used under it, one request at a time."""

    def __init__(self, model: str | Path, store: str | Path, threads: int = 1, edgetpu: str | None = None, *,
                 limits: ImageLimits | None = None, decode_slots: int | None = None,
                 max_request_bytes: int = MAX_LINE, idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
                 log=None):
        self.rt = FewShotRuntime(model, threads=threads, edgetpu=edgetpu, limits=limits)
        self.limits = self.rt.limits
        self.decode_slots = default_decode_slots(self.rt.board) if decode_slots is None else decode_slots
        if self.decode_slots < 1 or max_request_bytes < 1:
            raise EdgemetaError("decode slots and the request size limit must be at least 1")
        self._decoding = threading.BoundedSemaphore(self.decode_slots)
        self.large_lines = threading.BoundedSemaphore(self.decode_slots)
        self.max_request_bytes = max_request_bytes
        self.idle_timeout = idle_timeout or None
        self.log = log or (lambda msg: None)
        self.store_dir = Path(store)
        self.lock = threading.Lock()
        self._count = threading.Lock()
        self.started, self.requests = time.monotonic(), 0
        self._store: EnrollmentStore | None = None
        self._stamp: float | None = None
        self._head = None
        self._active, self._quiet, self.stopping = 0, threading.Condition(), False

    # --- requests in flight (a graceful stop answers each of them) ----------------------------

    def begin(self) -> bool:
        """Count a request as started; False once the agent is stopping (refuse it with STOPPING)."""
        with self._quiet:
            if self.stopping:
                return False
            self._active += 1
            return True

    def end(self) -> None:
        with self._quiet:
            self._active -= 1
            self._quiet.notify_all()

    def drain(self, seconds: float) -> int:
        """Take no new request; wait up to `seconds` for those started; how many are still running."""
        with self._quiet:
            self.stopping = True
            self._quiet.wait_for(lambda: self._active == 0, timeout=seconds)
            return self._active

    # --- images -----------------------------------------------------------------------------

    def _attachment(self, name: str, attachments: list | tuple, i: int) -> bytes:
        """Attachment i's bytes, taken out of a list (so that only one copy is alive at a time); a
        base64 one is refused by its encoded size before it is decoded."""
        item = attachments[i]
        if isinstance(attachments, list):
            attachments[i] = None
        if isinstance(item, (bytes, bytearray, memoryview)):
            return item
        if not isinstance(item, str):
            raise EdgemetaError("bad request: attachments must be base64 strings")
        if len(item) > 4 * -(-self.limits.max_bytes // 3):
            raise EdgemetaError(f"image {name} is over {self.limits.max_bytes} bytes, the limit per image; resize or "
                                "recompress it, or raise the limit (max_image_bytes in the board profile, "
                                "or $EDGEMETA_MAX_IMAGE_BYTES)")
        try:
            encoded = item.encode("ascii")
            del item
            return base64.b64decode(encoded, validate=True)
        except (UnicodeEncodeError, binascii.Error, ValueError):
            raise EdgemetaError(f"bad request: {name} is not valid base64") from None

    def _images(self, attachments: Any) -> np.ndarray:
        """Decode the attachments, one at a time, outside the store lock; large images within a decode slot.
        A list of attachments is consumed."""
        if not isinstance(attachments, (list, tuple)):
            raise EdgemetaError("bad request: attachments must be a list of base64 strings")
        if not attachments:
            raise EdgemetaError("no images attached")
        pre = self.rt.manifest.preprocess
        out = []
        for i in range(len(attachments)):
            name = f"attachment {i + 1}"
            data = self._attachment(name, attachments, i)
            if _small_image(data):
                out.append(pre.file(name, data, limits=self.limits))
            else:
                with self._decoding:
                    out.append(pre.file(name, data, limits=self.limits))
            del data
        return np.stack(out)

    # --- operations -------------------------------------------------------------------------

    def _load(self) -> EnrollmentStore | None:
        """The store, re-read when another writer (the CLI) changed it since we last looked."""
        path = self.store_dir / STORE_FILE
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if stamp != self._stamp:
            self._store = self.rt.open_store(self.store_dir) if stamp else None
            self._head = self.rt.head(self._store) if self._store and self._store.class_names else None
            self._stamp = stamp
        return self._store

    def handle(self, op: str, args: dict[str, Any], attachments: list[bytes | str]) -> dict:
        """Answer one request; attachments are bytes (serial) or base64 strings (JSON lines). A list of
        attachments is consumed: each is dropped from it once decoded."""
        if op is None or op == "":
            raise EdgemetaError(f"bad request: say which operation (op): {', '.join(OPS[:-1])}")
        if not isinstance(op, str) or op not in OPS:
            raise EdgemetaError(f"unknown operation {_show(op)}; known: {', '.join(OPS[:-1])}")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise EdgemetaError("bad request: args must be a JSON object")
        with self._count:
            self.requests += 1
        if op == "auth":
            return {"token": "not needed"}
        if op == "enroll":
            return self._enroll(args, attachments)
        if op == "classify":
            top_k = args.get("top_k", 1)
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
                raise EdgemetaError(f"bad request: top_k must be a whole number from 1 to {MAX_TOP_K}, got {_show(top_k)}")
            images = self._images(attachments)
            with self.lock:
                if self._load() is None or self._head is None:
                    raise EdgemetaError(f"store {self.store_dir} has no classes; enroll some first")
                return {"results": self._head.classify(self.rt.embedder(images), top_k, unknown=UNKNOWN)}
        if op in ("forget", "rename"):
            names = [_text(args, "label")] if op == "forget" else [_text(args, "old"), _text(args, "new")]
            with self.lock, EnrollmentStore.locked(self.store_dir):
                store = self.rt.open_store(self.store_dir)
                if op == "forget":
                    out = {"label": names[0], "removed": store.forget(names[0])}
                else:
                    store.rename(*names)
                    out = {"old": names[0], "new": names[1].strip()}
                self.rt.save(store)
            return out
        with self.lock:
            if op == "adapt":
                return self.rt.adapt(self.store_dir, args.get("steps"), args.get("lr"))
            if op == "calibrate":
                return self._calibrate(args)
            if op == "reenroll":
                return {"samples": self.rt.reenroll(self.store_dir), "model": self.rt.manifest.name}
            if op == "new_store":
                kept = EnrollmentStore.archive(self.store_dir)
                return {"archived": str(kept) if kept else None}
            store = self._load()
            if op == "classes":
                return {"classes": store.counts() if store else {}, "backbone": self.rt.backbone,
                        "head": self.rt.describe_head(store) if store else None}
            return {"model": self.rt.manifest.name, "variant": self.rt.variant.name, "runtime": self.rt.embedder.runtime,
                    "classes": len(store.class_names) if store else 0, "requests": self.requests,
                    "uptime_s": round(time.monotonic() - self.started, 1)}

    def _enroll(self, args: dict, attachments: list) -> dict:
        """One class ({label}), several in one change ({labels, counts}: the attachments in that order, as
        `enroll --from-folders` sends them), or {negative: true} samples for calibration."""
        flags = {k: args.get(k, d) for k, d in (("allow_duplicates", False), ("negative", False), ("keep_samples", True))}
        for k, v in flags.items():
            if not isinstance(v, bool):
                raise EdgemetaError(f"bad request: {k} must be true or false, got {_show(v)}")
        adapt = (args["adapt"], args.get("lr")) if args.get("adapt") is not None else None
        if adapt is not None:
            check_adapt(*adapt)  # before the images are decoded
        if flags["negative"]:
            if adapt is not None or "label" in args or "labels" in args:
                raise EdgemetaError("bad request: negative samples take no label and no adapt")
            images = self._images(attachments)
            with self.lock:
                return {"negatives": self.rt.enroll_negatives(self.store_dir, images), "added": len(images)}
        if "labels" in args:
            labels, counts = args.get("labels"), args.get("counts")
            if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels)
                    or not isinstance(counts, list) or len(counts) != len(labels)
                    or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts)
                    or not isinstance(attachments, (list, tuple)) or sum(counts) != len(attachments)):
                raise EdgemetaError("bad request: labels (names) and counts (images of each, in attachment order) must "
                                    "be lists of the same length whose counts add up to the attachments")
        else:
            labels, counts = [_text(args, "label")], [len(attachments) if isinstance(attachments, (list, tuple)) else 0]
        images = self._images(attachments)
        classes, at = [], 0
        for label, n in zip(labels, counts, strict=True):
            classes.append((label, images[at:at + n], None))
            at += n
        with self.lock:
            done = self.rt.enroll_classes(self.store_dir, classes, keep_samples=flags["keep_samples"], adapt=adapt,
                                          allow_duplicates=flags["allow_duplicates"])
        out = [{"label": c[0].strip(), "samples": d.samples, "added": d.added, "duplicates": d.duplicates}
               for c, d in zip(classes, done, strict=True)]
        return {"classes": out} if "labels" in args else out[0]

    def _calibrate(self, args: dict) -> dict:
        """{mode: calibrated (accept | false_accept) | manual (threshold) | off | model | show}, as `edgemeta calibrate`."""
        mode = args.get("mode", "calibrated")
        if mode not in OPEN_SET_MODES:
            raise EdgemetaError(f"bad request: mode must be one of {', '.join(OPEN_SET_MODES)}, got {_show(mode)}")
        if mode == "show":
            store = self._load()
            if store is None:
                raise EdgemetaError(f"store {self.store_dir} has no classes; enroll some first")
            return self.rt.describe_open_set(store)
        numbers = {}
        for key, lo, hi in (("accept", 0, 1), ("false_accept", 0, 1), ("threshold", 0, float("inf"))):
            v = args.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v < hi
                                  or (key != "threshold" and v == 0)):
                raise EdgemetaError(f"bad request: {key} out of range, got {_show(v)}")
            numbers[key] = v
        if mode == "calibrated" and numbers["accept"] is None and numbers["false_accept"] is None:
            numbers["accept"] = 0.95
        if mode == "manual" and numbers["threshold"] is None:
            raise EdgemetaError("bad request: mode manual needs a threshold")
        return self.rt.set_open_set(self.store_dir, mode, **numbers)

    def call(self, op: str, args: dict[str, Any], attachments: list[bytes | str]) -> dict:
        """`handle` for a transport: every failure is an EdgemetaError of one sentence for a person;
        an unexpected one is logged (one line) and answered without Python internals."""
        if not self.begin():
            raise EdgemetaError(STOPPING)
        try:
            return self.handle(op, args, attachments)
        except EdgemetaError:
            raise
        except MemoryError:
            raise EdgemetaError("not enough memory to answer this request; send fewer or smaller images") from None
        except Exception as e:  # keep serving: one bad request must not take the agent down
            self.log(f"internal error answering {_show(op)}: {type(e).__name__}: {str(e)[:200]}")
            raise EdgemetaError("internal error: the agent could not answer this request (the agent's log has the details)") from None
        finally:
            self.end()

    # --- JSON lines -------------------------------------------------------------------------

    def answer_line(self, line: bytes | bytearray | str) -> bytes:
        """The one answer line to one request line."""
        try:
            req = _parse_request(line)
        except EdgemetaError as e:
            return _dump(_error(None, str(e)))
        return self.answer(req)

    def answer(self, req: dict) -> bytes:
        """The answer line to a parsed request (its attachments are consumed)."""
        rid = req.get("id")
        try:
            atts = req.pop("attachments", [])
            result = {"id": rid, "ok": True, "result": self.call(req.get("op"), req.get("args"), atts)}
        except EdgemetaError as e:
            result = _error(rid, str(e))
        return _dump(result)


def _dump(result: dict) -> bytes:
    try:
        return (json.dumps(result) + "\n").encode()
    except (TypeError, ValueError):
        return _error_line(result.get("id"), "internal error: the answer could not be written as JSON")


def _error(rid: Any, message: str) -> dict:
    return {"id": rid, "ok": False, "error": message}


def _error_line(rid: Any, message: str) -> bytes:
    return (json.dumps(_error(rid, message)) + "\n").encode()


def _parse_request(line: bytes | bytearray) -> dict:
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        raise EdgemetaError(f"bad request: not valid JSON ({e.msg} at character {e.pos}); send one JSON object per line") from None
    except UnicodeDecodeError:
        raise EdgemetaError("bad request: a request line must be UTF-8 JSON") from None
    except RecursionError:
        raise EdgemetaError("bad request: the JSON is nested too deeply") from None
    except ValueError:  # e.g. an integer of more than 4300 digits
        raise EdgemetaError("bad request: not valid JSON; send one JSON object per line") from None
    if not isinstance(req, dict):
        raise EdgemetaError("bad request: a request is a JSON object with op, args and attachments")
    return req


def _small_image(data: bytes) -> bool:
    """Whether an image is small enough to decode without a decode slot (from its header only)."""
    if len(data) > SMALL_IMAGE_BYTES:
        return False
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Exception:  # not an image, or a bomb: decoded within a slot, where decode_image says what is wrong
        return False
    return w * h <= SMALL_IMAGE_PIXELS


# --- serving JSON lines ----------------------------------------------------------------------


def _discard_line(rfile, most: int) -> bool:
    """Read and drop the rest of a line (at most `most` bytes); whether its end was reached."""
    dropped = 0
    while dropped <= most:
        chunk = rfile.readline(LARGE_LINE)
        if not chunk:
            return False
        if chunk.endswith(b"\n"):
            return True
        dropped += len(chunk)
    return False


def _read_rest(rfile, first: bytes, limit: int) -> bytearray | None:
    """The rest of a long line after `first`, or None when it is longer than `limit` (newline aside)."""
    buf = bytearray(first)
    while not buf.endswith(b"\n"):
        room = limit + 1 - len(buf)
        if room <= 0:
            return None
        chunk = rfile.readline(min(LARGE_LINE, room))
        if not chunk:
            break  # the last line, without a newline
        buf += chunk
    return buf


def _answer_large(agent: Agent, line: bytearray | None) -> bytes | None:
    """The answer to a long line (None: over the limit), holding one copy of it at a time: its bytes
    become text, the text a request whose attachments are dropped one by one as they are decoded."""
    if line is None:
        return None
    try:
        text = line.decode("utf-8")
        line.clear()
        req = _parse_request(text)
    except UnicodeDecodeError:
        return _error_line(None, "bad request: a request line must be UTF-8 JSON")
    except EdgemetaError as e:
        return _error_line(None, str(e))
    del text
    return agent.answer(req)


def _too_long(limit: int) -> bytes:
    return _error_line(None, f"request line longer than the agent's limit of {limit} bytes; "
                             "send fewer or smaller images per request")


def _authenticate(line: bytes, token: str) -> bool | None:
    """Whether an auth request line carries the token (compared in constant time); None: no auth request."""
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):
        return None
    args = req.get("args") if isinstance(req, dict) else None
    if not isinstance(args, dict) or req.get("op") != "auth" or not isinstance(args.get("token"), str):
        return None
    return hmac.compare_digest(args["token"].encode("utf-8", "replace"), token.encode())


def serve_lines(agent: Agent, rfile, wfile, token: str | None = None, peer: str = "a client",
                on_auth: Callable[[], None] = lambda: None, end_on_stop: bool = False) -> None:
    """Answer JSON request lines from `rfile` on `wfile` until the end of input: exactly one answer
    per request line (blank lines are skipped). With `token`, the first line must be the auth
    request carrying it (`on_auth` is called once it did); anything else gets one refusal and the
    connection is done. Once the agent is stopping, a request that starts gets a refusal and the
    connection ends; one already started is answered first (then, with `end_on_stop`, this returns:
    a stream that nobody else can close, stdin)."""

    def send(data: bytes) -> None:
        wfile.write(data)
        wfile.flush()

    limit = agent.max_request_bytes
    authenticated = token is None

    def one(first: bytes) -> bool:
        """Answer the request line that begins with `first`; whether the connection goes on."""
        nonlocal authenticated
        size = min(LARGE_LINE, limit) if authenticated else AUTH_LINE
        complete = first.endswith(b"\n") or len(first) <= size
        if not authenticated:
            if complete and not first.strip():
                return True
            verdict = _authenticate(first, token) if complete else None
            if verdict:
                authenticated = True
                on_auth()
                send(_ok_line(first, {"token": "accepted"}))
                return True
            agent.log(f"refused {peer}: {'wrong token' if verdict is False else 'no token'}")
            time.sleep(0.2)  # a refusal costs the guesser time
            send(_error_line(None, "not authorised: wrong token" if verdict is False else
                             f"not authorised: this agent needs its token first (edgemeta remote --token-file FILE, "
                             f"or ${TOKEN_ENV})"))
            if not complete:
                _discard_line(rfile, limit)
            return False
        if complete:
            if first.strip():
                send(agent.answer_line(first))
            return True
        if len(first) > limit:
            send(_too_long(limit))
            _discard_line(rfile, sys.maxsize)
            return True
        if not agent.large_lines.acquire(timeout=agent.idle_timeout):
            send(_error_line(None, "the agent is busy with other large requests; try again in a moment"))
            _discard_line(rfile, sys.maxsize)
            return True
        try:
            answer = _answer_large(agent, _read_rest(rfile, first, limit))
        finally:
            agent.large_lines.release()
        if answer is None:
            send(_too_long(limit))
            _discard_line(rfile, sys.maxsize)
        else:
            send(answer)
        return True

    while True:  # even when stopping: a request already on its way is read and refused, never reset
        first = rfile.readline((min(LARGE_LINE, limit) if authenticated else AUTH_LINE) + 1)
        if not first:
            return
        if not agent.begin():  # stopping: this request is refused with an answer, not dropped
            send(_error_line(None, STOPPING))
            return
        try:
            if not one(first):
                return
        finally:
            agent.end()
        if end_on_stop and agent.stopping:
            return


def _ok_line(line: bytes, result: dict) -> bytes:
    req = json.loads(line)
    return (json.dumps({"id": req.get("id"), "ok": True, "result": result}) + "\n").encode()


def _stream_handler(agent: Agent, token: str | None):
    class Handler(socketserver.StreamRequestHandler):
        timeout = agent.idle_timeout  # per read and write: an idle connection is closed

        def handle(self) -> None:
            peer = f"{self.client_address[0]}:{self.client_address[1]}" if isinstance(self.client_address, tuple) else "a client"
            preauth = getattr(self.server, "preauth", None)
            try:
                serve_lines(agent, self.rfile, self.wfile, token, peer,
                            on_auth=(lambda: preauth.done(self.request)) if preauth else (lambda: None))
            except (OSError, ValueError):
                pass  # the client hung up, reset the connection or went idle: nobody to answer

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:
                pass

    return Handler


def _cut(sock: socket.socket, why: str, gently: bool = False) -> None:
    """End a connection from another thread: one answer line if it fits the send buffer, then the end
    of the stream. Gently: only our side is closed, so a request the client sends meanwhile is still
    read (and refused by its thread) instead of being answered by a reset that would also discard
    our line; otherwise both sides, which ends the connection's thread at once."""
    try:
        sock.send(_error_line(None, why), socket.MSG_DONTWAIT)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_WR if gently else socket.SHUT_RDWR)
    except OSError:
        pass


class _PreAuth:
    """TCP connections that have not sent their token yet: at most `total` in all and `per_peer` from
    one address, each for at most `seconds` (whatever it sends meanwhile). Past a bound, the oldest
    waiting connection (of that address, else of all) is cut to make room: a flood of idle or
    trickling connections cannot keep a client out, since a real one authenticates at once."""

    def __init__(self, seconds: float = DEFAULT_AUTH_SECONDS, total: int = PREAUTH_TOTAL, per_peer: int = PREAUTH_PER_PEER):
        self.seconds, self.total, self.per_peer = seconds, total, per_peer
        self._waiting: dict[socket.socket, tuple[str, float]] = {}  # insertion order: oldest first
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None

    def admit(self, sock: socket.socket, peer: str) -> None:
        with self._lock:
            mine = [s for s, (p, _) in self._waiting.items() if p == peer]
            oldest = mine[0] if len(mine) >= self.per_peer else \
                next(iter(self._waiting)) if len(self._waiting) >= self.total else None
            if oldest is not None:
                del self._waiting[oldest]
            self._waiting[sock] = (peer, time.monotonic() + self.seconds)
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, daemon=True, name="edgemeta-preauth")
                self._reaper.start()
        if oldest is not None:
            _cut(oldest, "not authorised: too many connections are waiting to send their token; this one waited longest")

    def done(self, sock: socket.socket) -> None:
        """The connection authenticated, or ended."""
        with self._lock:
            self._waiting.pop(sock, None)

    def _reap(self) -> None:
        while True:
            time.sleep(min(0.25, self.seconds / 4))
            now = time.monotonic()
            with self._lock:
                late = [s for s, (_, deadline) in self._waiting.items() if deadline <= now]
                for s in late:
                    del self._waiting[s]
            for s in late:
                _cut(s, f"not authorised: no token within {self.seconds:g} s")


class _Serving(socketserver.ThreadingMixIn):
    """A thread per connection, at most `gate`'s count at once (each listener has its own, so TCP
    clients never crowd out the local socket); over TCP with a token, `preauth` bounds the
    connections that have not authenticated yet."""

    daemon_threads = True
    block_on_close = False
    gate: threading.BoundedSemaphore
    most: int
    connections: set  # open ones, so that a stop can end the idle ones
    preauth: _PreAuth | None = None
    log = staticmethod(lambda msg: None)

    def process_request(self, request, client_address) -> None:
        self.connections.add(request)
        if self.preauth is not None:
            self.preauth.admit(request, client_address[0] if isinstance(client_address, tuple) else "")
        if not self.gate.acquire(blocking=False):
            try:
                request.settimeout(0.5)
                request.sendall(_error_line(None, f"the agent is busy: {self.most} connections are open, the most it serves "
                                                  "at once; try again in a moment"))
            except OSError:
                pass
            if self.preauth is not None:
                self.preauth.done(request)
            self.connections.discard(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            if self.preauth is not None:
                self.preauth.done(request)
            self.connections.discard(request)
            self.gate.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            if self.preauth is not None:
                self.preauth.done(request)
            self.connections.discard(request)
            self.gate.release()

    def handle_error(self, request, client_address) -> None:
        e = sys.exc_info()[1]
        self.log(f"connection dropped: {type(e).__name__}: {str(e)[:200]}")


class _UnixServer(_Serving, socketserver.UnixStreamServer):
    pass


class _TcpServer(_Serving, socketserver.TCPServer):
    allow_reuse_address = True


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def tcp_address(tcp: str, allow_remote: bool = False, token: str | None = None) -> tuple[str, int]:
    """(host, port) to listen on for `--tcp HOST:PORT`: loopback, or beyond only with allow_remote and a token."""
    host, _, port = (tcp or "").rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise EdgemetaError(f"cannot listen on {tcp!r}: write it as HOST:PORT with a port from 0 to 65535") from None
    if not _is_loopback(host):
        if not allow_remote:
            raise EdgemetaError(f"--tcp {tcp} listens beyond loopback, where anyone on the network could enroll, forget and "
                                "rename; add --allow-remote and a token (--token-file FILE or $EDGEMETA_TOKEN), "
                                "or listen on 127.0.0.1")
        if token is None:
            raise EdgemetaError(f"--allow-remote needs a token that clients must send: --token-file FILE (mode 600) or "
                                f"${TOKEN_ENV}; make one with: {TOKEN_HINT}")
    return host, number


def load_token(token_file: str | Path | None = None, environ=None) -> str | None:
    """The shared token: from `token_file` (a regular file nobody but its owner may read), else
    $EDGEMETA_TOKEN, else None. It is checked here and never shown in a message."""
    environ = os.environ if environ is None else environ
    if token_file:
        path = Path(token_file)
        source = f"token file {path}"
        try:
            with open_regular(path, "token file") as f:  # a FIFO there would block serve forever
                mode = os.fstat(f.fileno()).st_mode  # of the file read, not of what the path named a moment before
                if mode & 0o077:
                    raise EdgemetaError(f"{source} can be read or written by group or others (mode {stat.S_IMODE(mode):o}); "
                                        f"make it private: chmod 600 {path}")
                text = f.read(MAX_TOKEN_LENGTH + 2).decode("ascii")
        except FileNotFoundError:
            raise EdgemetaError(f"{source} does not exist; make one with: {TOKEN_HINT}") from None
        except UnicodeDecodeError:
            raise EdgemetaError(f"{source} must hold one line of printable ASCII") from None
        except OSError as e:
            raise EdgemetaError(f"cannot read {source}: {e.strerror or e}") from None
    else:
        text = environ.get(TOKEN_ENV, "")
        source = f"${TOKEN_ENV}"
        if not text.strip():
            return None
    token = text.strip()
    if not token or any(not (33 <= ord(c) <= 126) for c in token):
        raise EdgemetaError(f"{source} must hold one line of printable ASCII without spaces; make one with: {TOKEN_HINT}")
    if len(token) > MAX_TOKEN_LENGTH:
        raise EdgemetaError(f"{source} holds more than {MAX_TOKEN_LENGTH} characters; a token of 32 to 64 random ones will do")
    if len(token) < MIN_TOKEN_LENGTH:
        raise EdgemetaError(f"{source} holds a token of {len(token)} characters; use at least {MIN_TOKEN_LENGTH} random ones, "
                            f"e.g. {TOKEN_HINT}")
    return token


def _live_socket(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False  # a stale socket file: its agent is gone
        except OSError as e:
            raise EdgemetaError(f"cannot tell whether an agent listens on {path} ({e.strerror or e}); "
                                "remove it if none does, or choose another --socket path") from None
    return True


def _claim_socket_path(p: Path):
    """Hold `PATH.lock` and make sure no live agent listens on PATH; remove a stale socket file."""
    import fcntl

    lock = open(f"{p}.lock", "a")  # noqa: SIM115 - held open for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise EdgemetaError(f"another agent is already serving on {p}; stop it first, or choose another --socket path") from None
    try:
        if p.exists() or p.is_symlink():
            if not p.is_socket():
                raise EdgemetaError(f"{p} exists and is not a socket; choose another --socket path")
            if _live_socket(p):
                raise EdgemetaError(f"an agent is already listening on {p}; stop it first "
                                    "(systemctl stop edgemeta-agent), or choose another --socket path")
            p.unlink()
    except BaseException:
        lock.close()
        raise
    return lock


def make_server(agent: Agent, unix_path: str | None = None, tcp: str | None = None, *, token: str | None = None,
                allow_remote: bool = False, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                auth_seconds: float = DEFAULT_AUTH_SECONDS):
    """A socket server for the agent: a Unix socket, or TCP on host:port (loopback unless
    allow_remote and a token), serving at most `max_connections` at once; with a token, a
    connection has `auth_seconds` to send it (see _PreAuth)."""
    gate = threading.BoundedSemaphore(max_connections)
    if unix_path:
        p = Path(unix_path)
        lock = _claim_socket_path(p)
        try:
            server = _UnixServer(str(p), _stream_handler(agent, None))
            p.chmod(0o660)
        except OSError as e:
            lock.close()
            raise EdgemetaError(f"cannot listen on {p}: {e.strerror or e}") from None
        server.path_lock, server.path_inode = lock, p.stat().st_ino
    else:
        host, port = tcp_address(tcp or "", allow_remote, token)
        cls = _Tcp6Server if ":" in host else _TcpServer
        try:
            server = cls((host, port), _stream_handler(agent, token))
        except OSError as e:
            raise EdgemetaError(f"cannot listen on {tcp!r}: {e.strerror or e}") from None
    server.gate, server.most, server.log = gate, max_connections, agent.log
    if token is not None and not unix_path:
        server.preauth = _PreAuth(auth_seconds)
    server.connections = set()
    return server


def _stop_accepting(server) -> None:
    if getattr(server, "serving", False):  # shutdown() waits for serve_forever, forever if it never ran
        server.shutdown()
        server.serving = False
    server.server_close()


def _close_server(server) -> None:
    """Stop accepting, end the connections still open (idle ones: run after Agent.drain), remove the socket file."""
    _stop_accepting(server)
    for sock in list(server.connections):
        _cut(sock, STOPPING, gently=True)
    deadline = time.monotonic() + 1.0  # their threads read what is on the way, refuse it, and close
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.02)
    if isinstance(server, _UnixServer):
        p = Path(server.server_address)
        try:
            if p.stat().st_ino == server.path_inode:  # ours, not one that replaced it
                p.unlink()
        except OSError:
            pass
        server.path_lock.close()


# --- clients ---------------------------------------------------------------------------------


class LineClient:
    """JSON-lines requests over a connected stream (socket file or a subprocess's pipes)."""

    def __init__(self, reader, writer, closer=None):
        self.reader, self.writer, self.closer, self.next_id = reader, writer, closer, 1

    def request(self, op: str, args: dict, attachments: list[bytes] = ()) -> dict:
        rid, self.next_id = self.next_id, self.next_id + 1
        msg = {"id": rid, "op": op, "args": args, "attachments": [base64.b64encode(a).decode() for a in attachments]}
        lost = None
        try:
            self.writer.write((json.dumps(msg) + "\n").encode())
            self.writer.flush()
        except OSError as e:  # the agent may have answered (busy, not authorised) and closed
            lost = e
        try:
            line = self.reader.readline(MAX_LINE)
        except TimeoutError:
            raise EdgemetaError("the agent did not answer in time (raise --timeout?)") from None
        except OSError as e:
            lost = lost or e
            line = b""
        if not line:
            why = f" ({lost.strerror or lost})" if lost else ""
            raise EdgemetaError(f"the agent closed the connection without answering{why}")
        try:
            answer = json.loads(line)
        except ValueError:
            raise EdgemetaError("the agent's answer is not valid JSON; is that an edgemeta agent?") from None
        if not isinstance(answer, dict):
            raise EdgemetaError("the agent's answer is not a JSON object; is that an edgemeta agent?")
        if not answer.get("ok"):
            raise EdgemetaError(str(answer.get("error", "the agent reported an error")))
        return answer.get("result")

    def close(self) -> None:
        if self.closer:
            self.closer()


def connect(via: str, ssh_config: str | None = None, timeout: float = 30.0, token_file: str | None = None):
    """A client for `--via`: unix:PATH, tcp:HOST:PORT, ssh:[user@]host, serial:DEVICE[@BAUD].

    Over tcp the token (`token_file`, else $EDGEMETA_TOKEN) is sent first when there is one."""
    kind, _, target = via.partition(":")
    if not target:
        raise EdgemetaError(f"--via {via!r}: write it as unix:PATH, tcp:HOST:PORT, ssh:USER@HOST or serial:DEVICE[@BAUD]")
    if kind in ("unix", "tcp"):
        token = load_token(token_file) if kind == "tcp" else None
        try:
            if kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(target)
            else:
                host, _, port = target.rpartition(":")
                sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        except (OSError, ValueError) as e:
            raise EdgemetaError(f"cannot reach the agent at {via}: {getattr(e, 'strerror', None) or e}; "
                                "is `edgemeta serve` running?") from None
        f = sock.makefile("rwb")
        client = LineClient(f, f, lambda: (f.close(), sock.close()))
        if token is not None:
            try:
                client.request("auth", {"token": token})
            except EdgemetaError:
                client.close()
                raise
        return client
    if kind == "ssh":  # one shared OpenSSH connection, to the running agent when there is one (deploy's client)
        from edgemeta.deploy.ssh import AgentOverSsh

        return AgentOverSsh(target, ssh_config, timeout)
    if kind == "serial":
        import serial

        from firmware_tools.serial_protocol import SerialClient

        device, _, baud = target.partition("@")
        try:
            port = serial.Serial(device, baudrate=int(baud or 115200), timeout=0.1)
        except (serial.SerialException, ValueError) as e:
            raise EdgemetaError(f"cannot open serial port {device}: {e}") from None
        sc = SerialClient(port, timeout=timeout)
        return _SerialAdapter(sc, port)
    raise EdgemetaError(f"--via {via!r}: unknown transport {kind!r}; use unix, tcp, ssh or serial")


class _SerialAdapter:
    def __init__(self, client, port):
        self.client, self.port = client, port

    def request(self, op: str, args: dict, attachments: list[bytes] = ()) -> dict:
        from firmware_tools.serial_protocol import ProtocolError

        try:
            return self.client.request(op, args, list(attachments))
        except ProtocolError as e:
            raise EdgemetaError(str(e)) from None

    def close(self) -> None:
        self.port.close()


def serve_stdio(agent: Agent, stdin, stdout) -> None:
    try:
        serve_lines(agent, stdin, stdout, end_on_stop=True)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the other end (ssh) went away


# --- serial ----------------------------------------------------------------------------------


def open_serial(device: str, baud: int):
    import serial

    try:
        return serial.Serial(device, baudrate=baud, timeout=0.1)
    except (serial.SerialException, OSError, ValueError) as e:
        raise EdgemetaError(f"cannot open serial port {device}: {e}") from None


def serve_serial(agent: Agent, device: str, baud: int, stop: threading.Event | None = None, *,
                 reopen_for: float = DEFAULT_SERIAL_REOPEN_FOR, port=None, log=None) -> None:
    """Answer framed requests on a serial port until `stop` is set.

    When the port goes away (a USB adapter unplugged, the cable's far end gone) it is reopened at
    the same path, with backoff; when it cannot be for `reopen_for` seconds, EdgemetaError (so the
    agent exits non-zero and systemd restarts it). The first open's error is raised at once."""
    from firmware_tools.serial_protocol import serve

    log = log or agent.log
    stop = stop or threading.Event()
    port = port if port is not None else open_serial(device, baud)
    while True:
        try:
            serve(port, agent.call, stop)
        except Exception as e:  # SerialException, OSError: the port went away under us
            log(f"serial port {device} went away ({str(e)[:200] or type(e).__name__}); reopening it")
        finally:
            try:
                port.close()
            except Exception:  # closing a port that is gone may fail too
                pass
        if stop.is_set():
            return
        port = _reopen_serial(device, baud, stop, reopen_for)
        if port is None:
            return
        log(f"serial port {device} is back")


def _reopen_serial(device: str, baud: int, stop: threading.Event, reopen_for: float):
    deadline, delay = time.monotonic() + reopen_for, 0.2
    while True:
        if stop.wait(min(delay, max(0.0, deadline - time.monotonic()))):
            return None
        try:
            return open_serial(device, baud)
        except EdgemetaError as e:
            last = e
        if time.monotonic() >= deadline:
            raise EdgemetaError(f"serial port {device} has been gone for {reopen_for:g} s ({last}); exiting, "
                                "so that the service manager restarts the agent")
        delay = min(delay * 2, 5.0)


# --- the agent process -----------------------------------------------------------------------


def _return_large_blocks_to_the_os() -> None:
    """Serve every allocation of 1 MiB or more (a large request's line, text and image bytes) from
    its own mapping, returned to the system when freed. glibc's default raises that threshold to the
    largest block freed so far (up to 32 MiB) and keeps freed blocks in each thread's arena, so an
    agent that answered a few large requests on several connections kept ~40 MB per arena for good."""
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, 2**20)  # M_MMAP_THRESHOLD; a fixed value also ends the raising
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass



def run_agent(model: str | Path, store: str | Path, *, threads: int = 1, edgetpu: str | None = None,
              unix_path: str | None = None, tcp: str | None = None, serial_device: str | None = None, baud: int = 115200,
              stdio: bool = False, allow_remote: bool = False, token_file: str | None = None,
              idle_timeout: float = DEFAULT_IDLE_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS,
              decode_slots: int | None = None, max_request_bytes: int = MAX_LINE,
              serial_reopen_for: float = DEFAULT_SERIAL_REOPEN_FOR, auth_seconds: float = DEFAULT_AUTH_SECONDS,
              drain_seconds: float = DRAIN_SECONDS, log=lambda msg: None) -> None:
    """Load an agent and answer requests until stopped.

    With `stdio`, JSON lines on stdin/stdout until stdin ends (the other listeners are ignored).
    Otherwise on a Unix socket and/or TCP (JSON lines) and/or a serial port (framed), each in its
    own thread, until SIGTERM or Ctrl-C. A stop is graceful: the listeners close first, every
    request already started is answered (for up to `drain_seconds`), one that starts meanwhile is
    refused with an answer, then idle connections are ended and the socket file removed. A serial
    port that stays gone for `serial_reopen_for` seconds ends it with EdgemetaError. `log` gets one
    line once the agent listens, and one per event worth an operator's attention (never a token).
    Call it from the main thread (signals).
    """
    import signal

    if not (unix_path or tcp or serial_device or stdio):
        raise EdgemetaError("say where to listen: --socket PATH, --tcp HOST:PORT, --serial DEVICE or --stdio")
    token = load_token(token_file) if tcp and not stdio else None
    if tcp and not stdio:
        tcp_address(tcp, allow_remote, token)  # refused before the model is loaded
    _return_large_blocks_to_the_os()
    agent = Agent(model, store, threads=threads, edgetpu=edgetpu, decode_slots=decode_slots,
                  max_request_bytes=max_request_bytes, idle_timeout=idle_timeout if not stdio else None, log=log)
    if stdio:
        def stop_between_requests(*_):
            if agent.drain(0) == 0:  # between requests: nothing to finish
                raise SystemExit(0)
            # else the request in progress is answered and serve_lines returns before the next one

        signal.signal(signal.SIGTERM, stop_between_requests)
        serve_stdio(agent, sys.stdin.buffer, sys.stdout.buffer)
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    servers, workers, failures = [], [], []
    try:
        for kind in ("unix", "tcp"):
            if kind == "unix" and unix_path or kind == "tcp" and tcp:
                servers.append(make_server(agent, unix_path if kind == "unix" else None, tcp if kind == "tcp" else None,
                                           token=token, allow_remote=allow_remote, max_connections=max_connections,
                                           auth_seconds=auth_seconds))
        port = open_serial(serial_device, baud) if serial_device else None
    except BaseException:
        for s in servers:
            _close_server(s)
        raise

    def serial_worker():
        try:
            serve_serial(agent, serial_device, baud, stop, reopen_for=serial_reopen_for, port=port, log=log)
        except BaseException as e:
            failures.append(e if isinstance(e, EdgemetaError) else EdgemetaError(f"the serial port thread failed: {e}"))
            stop.set()

    workers = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for s in servers:
        s.serving = True
    serial_thread = threading.Thread(target=serial_worker, daemon=True) if serial_device else None
    for t in workers + ([serial_thread] if serial_thread else []):
        t.start()
    where = ", ".join(x for x in (unix_path, tcp, serial_device and f"{serial_device}@{baud}") if x)
    log(f"serving {agent.rt.manifest.name}/{agent.rt.variant.name} on {where}")
    if token is not None:
        log(f"tcp {tcp}: every connection must send the token first; it travels unencrypted, so use this only on a "
            "network you trust (or reach the board with --via ssh:)")
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        stop.set()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the drain short
    for s in servers:
        _stop_accepting(s)
    left = agent.drain(drain_seconds)
    if serial_thread is not None:
        serial_thread.join(max(1.0, drain_seconds))  # it answers the request in hand, then sees `stop`
    for s in servers:
        _close_server(s)
    if left:
        log(f"stopped with {left} request(s) still running after {drain_seconds:g} s; they got no answer")
    if failures:
        raise failures[0]
