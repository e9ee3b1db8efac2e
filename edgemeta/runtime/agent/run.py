"""`edgemeta serve`: load the agent and serve it on every listener asked for, until stopped.

SIGTERM stops gracefully: no new connection, every request already started answered, later ones
refused with an answer, then exit.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.agent.auth import DEFAULT_AUTH_SECONDS, tcp_address
from edgemeta.runtime.agent.core import DEFAULT_IDLE_TIMEOUT, Agent
from edgemeta.runtime.agent.serial_port import DEFAULT_SERIAL_REOPEN_FOR, open_serial, serve_serial
from edgemeta.runtime.agent.servers import DEFAULT_MAX_CONNECTIONS, close_server, make_server, serve_stdio, stop_accepting
from edgemeta.wire import MAX_LINE, load_token

DRAIN_SECONDS = 30.0  # on SIGTERM: how long requests already started may take to be answered


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
            close_server(s)
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
        stop_accepting(s)
    left = agent.drain(drain_seconds)
    if serial_thread is not None:
        serial_thread.join(max(1.0, drain_seconds))  # it answers the request in hand, then sees `stop`
    for s in servers:
        close_server(s)
    if left:
        log(f"stopped with {left} request(s) still running after {drain_seconds:g} s; they got no answer")
    if failures:
        raise failures[0]
