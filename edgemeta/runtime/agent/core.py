"""The agent itself: one loaded model and store answering requests from many threads.

Transports (servers, serial) hand each request to `Agent.call` (or a JSON line to `answer_line`);
the operations are the handlers of ops.HANDLERS. Images are decoded outside the store lock, within
the board's image limits; decodes of large images take one of `decode_slots` (1 on boards under
2 GB), so small requests are never queued behind them.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.preprocess import ImageLimits
from edgemeta.runtime.agent.ops import HANDLERS, OPS, show
from edgemeta.runtime.fewshot import FewShotRuntime
from edgemeta.runtime.store import STORE_FILE, EnrollmentStore
from edgemeta.wire import MAX_LINE, dump_answer, error_answer, parse_request

# Images at most this big (encoded bytes and decoded pixels: a VGA frame) are decoded without a
# decode slot: each costs a few MB at most, so they never wait behind a large image.
SMALL_IMAGE_BYTES = 2**20
SMALL_IMAGE_PIXELS = 640 * 480
DEFAULT_IDLE_TIMEOUT = 60.0
STOPPING = "the agent is stopping (a restart or shutdown); send the request again in a moment"


def default_decode_slots(board) -> int:
    """Large decodes at once: 1 on boards with less than 2 GB (or no profile), else 2."""
    memory = board.raw.get("memory_mb") if board is not None else None
    return 2 if isinstance(memory, int) and memory >= 2048 else 1


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

    def images(self, attachments: Any) -> np.ndarray:
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

    def load(self) -> EnrollmentStore | None:
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
        if not isinstance(op, str) or op not in HANDLERS:
            raise EdgemetaError(f"unknown operation {show(op)}; known: {', '.join(OPS[:-1])}")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise EdgemetaError("bad request: args must be a JSON object")
        with self._count:
            self.requests += 1
        return HANDLERS[op](self, args, attachments)

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
            self.log(f"internal error answering {show(op)}: {type(e).__name__}: {str(e)[:200]}")
            raise EdgemetaError("internal error: the agent could not answer this request (the agent's log has the details)") from None
        finally:
            self.end()

    # --- JSON lines -------------------------------------------------------------------------

    def answer_line(self, line: bytes | bytearray | str) -> bytes:
        """The one answer line to one request line."""
        try:
            req = parse_request(line)
        except EdgemetaError as e:
            return dump_answer(error_answer(None, str(e)))
        return self.answer(req)

    def answer(self, req: dict) -> bytes:
        """The answer line to a parsed request (its attachments are consumed)."""
        request_id = req.get("id")
        try:
            atts = req.pop("attachments", [])
            result = {"id": request_id, "ok": True, "result": self.call(req.get("op"), req.get("args"), atts)}
        except EdgemetaError as e:
            result = error_answer(request_id, str(e))
        return dump_answer(result)


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
