"""The JSON-lines wire both ends speak: the board's agent (runtime/agent) and the host's clients (remote).

One request per line: {"id", "op", "args", "attachments": [base64]}; exactly one answer per request
line, {"id", "ok": true, "result"} or {"id", "ok": false, "error"} (one sentence for a person).
Over TCP beyond loopback the first line is the `auth` request carrying the shared token
(`load_token`: a file of mode 600 or $EDGEMETA_TOKEN), which both ends read the same way.

A base layer: the standard library and edgemeta's base modules only, never runtime, host, deploy or
the CLI, so that the board's server and the host's clients can share it without importing each other.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

from edgemeta.errors import EdgemetaError
from edgemeta.files import open_regular

MAX_LINE = 64 * 2**20  # default limit of one request line (and of an answer line a client reads)
LARGE_LINE = 2**20  # lines longer than this are read in chunks of this size
TOKEN_ENV = "EDGEMETA_TOKEN"
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 1024  # the auth line is at most runtime.agent.auth.AUTH_LINE bytes
TOKEN_HINT = "(umask 077; python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE)"


# --- framing ---------------------------------------------------------------------------------


def error_answer(request_id: Any, message: str) -> dict:
    return {"id": request_id, "ok": False, "error": message}


def error_line(request_id: Any, message: str) -> bytes:
    return (json.dumps(error_answer(request_id, message)) + "\n").encode()


def dump_answer(result: dict) -> bytes:
    """One answer as its line; an answer that is not JSON becomes an error answer (never a traceback)."""
    try:
        return (json.dumps(result) + "\n").encode()
    except (TypeError, ValueError):
        return error_line(result.get("id"), "internal error: the answer could not be written as JSON")


def parse_request(line: bytes | bytearray | str) -> dict:
    """A request line as a dict, or an EdgemetaError that says what is wrong with it."""
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


# --- reading long lines within a bound -------------------------------------------------------


def discard_line(rfile, most: int) -> bool:
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


def read_rest(rfile, first: bytes, limit: int) -> bytearray | None:
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


# --- the shared token ------------------------------------------------------------------------


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


# --- the client end --------------------------------------------------------------------------


class LineClient:
    """JSON-lines requests over a connected stream (socket file or a subprocess's pipes)."""

    def __init__(self, reader, writer, closer=None):
        self.reader, self.writer, self.closer, self.next_id = reader, writer, closer, 1

    def request(self, op: str, args: dict, attachments: list[bytes] = ()) -> dict:
        request_id, self.next_id = self.next_id, self.next_id + 1
        msg = {"id": request_id, "op": op, "args": args, "attachments": [base64.b64encode(a).decode() for a in attachments]}
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
