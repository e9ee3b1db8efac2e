"""Serving the agent over JSON lines: a Unix socket, TCP (socket servers) and stdin/stdout.

Bounds (`Agent` arguments, `edgemeta serve` options): a request line is at most
`max_request_bytes` (an over-long line gets one error and the rest of it is discarded); at most
`max_connections` connections are served at once on each listener (one more gets a one-line "busy"
answer; the local socket has its own count, so TCP clients never crowd it out); a connection idle
for `idle_timeout` seconds is closed. Reads of large request lines take one of the agent's
`decode_slots`. On a stop (run.run_agent) a request already on its way is read and refused with
an answer, never reset.
"""

from __future__ import annotations

import json
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.agent.auth import AUTH_LINE, DEFAULT_AUTH_SECONDS, PreAuth, authenticate, cut, tcp_address
from edgemeta.runtime.agent.core import STOPPING, Agent
from edgemeta.wire import LARGE_LINE, TOKEN_ENV, discard_line, error_line, parse_request, read_rest

DEFAULT_MAX_CONNECTIONS = 32


def _answer_large(agent: Agent, line: bytearray | None) -> bytes | None:
    """The answer to a long line (None: over the limit), holding one copy of it at a time: its bytes
    become text, the text a request whose attachments are dropped one by one as they are decoded."""
    if line is None:
        return None
    try:
        text = line.decode("utf-8")
        line.clear()
        req = parse_request(text)
    except UnicodeDecodeError:
        return error_line(None, "bad request: a request line must be UTF-8 JSON")
    except EdgemetaError as e:
        return error_line(None, str(e))
    del text
    return agent.answer(req)


def _too_long(limit: int) -> bytes:
    return error_line(None, f"request line longer than the agent's limit of {limit} bytes; "
                             "send fewer or smaller images per request")


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
            verdict = authenticate(first, token) if complete else None
            if verdict:
                authenticated = True
                on_auth()
                send(_ok_line(first, {"token": "accepted"}))
                return True
            agent.log(f"refused {peer}: {'wrong token' if verdict is False else 'no token'}")
            time.sleep(0.2)  # a refusal costs the guesser time
            send(error_line(None, "not authorised: wrong token" if verdict is False else
                             f"not authorised: this agent needs its token first (edgemeta remote --token-file FILE, "
                             f"or ${TOKEN_ENV})"))
            if not complete:
                discard_line(rfile, limit)
            return False
        if complete:
            if first.strip():
                send(agent.answer_line(first))
            return True
        if len(first) > limit:
            send(_too_long(limit))
            discard_line(rfile, sys.maxsize)
            return True
        if not agent.large_lines.acquire(timeout=agent.idle_timeout):
            send(error_line(None, "the agent is busy with other large requests; try again in a moment"))
            discard_line(rfile, sys.maxsize)
            return True
        try:
            answer = _answer_large(agent, read_rest(rfile, first, limit))
        finally:
            agent.large_lines.release()
        if answer is None:
            send(_too_long(limit))
            discard_line(rfile, sys.maxsize)
        else:
            send(answer)
        return True

    while True:  # even when stopping: a request already on its way is read and refused, never reset
        first = rfile.readline((min(LARGE_LINE, limit) if authenticated else AUTH_LINE) + 1)
        if not first:
            return
        if not agent.begin():  # stopping: this request is refused with an answer, not dropped
            send(error_line(None, STOPPING))
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


class _Serving(socketserver.ThreadingMixIn):
    """A thread per connection, at most `gate`'s count at once (each listener has its own, so TCP
    clients never crowd out the local socket); over TCP with a token, `preauth` bounds the
    connections that have not authenticated yet."""

    daemon_threads = True
    block_on_close = False
    gate: threading.BoundedSemaphore
    most: int
    connections: set  # open ones, so that a stop can end the idle ones
    preauth: PreAuth | None = None
    log = staticmethod(lambda msg: None)

    def process_request(self, request, client_address) -> None:
        self.connections.add(request)
        if self.preauth is not None:
            self.preauth.admit(request, client_address[0] if isinstance(client_address, tuple) else "")
        if not self.gate.acquire(blocking=False):
            try:
                request.settimeout(0.5)
                request.sendall(error_line(None, f"the agent is busy: {self.most} connections are open, the most it serves "
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
    connection has `auth_seconds` to send it (see PreAuth)."""
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
        server.preauth = PreAuth(auth_seconds)
    server.connections = set()
    return server


def stop_accepting(server) -> None:
    if getattr(server, "serving", False):  # shutdown() waits for serve_forever, forever if it never ran
        server.shutdown()
        server.serving = False
    server.server_close()


def close_server(server) -> None:
    """Stop accepting, end the connections still open (idle ones: run after Agent.drain), remove the socket file."""
    stop_accepting(server)
    for sock in list(server.connections):
        cut(sock, STOPPING, gently=True)
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


def serve_stdio(agent: Agent, stdin, stdout) -> None:
    try:
        serve_lines(agent, stdin, stdout, end_on_stop=True)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the other end (ssh) went away
