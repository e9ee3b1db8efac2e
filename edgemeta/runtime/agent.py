"""The board agent: one loaded model and store answering requests, and clients to reach it.

Operations (args are JSON, images travel as attachments of raw file bytes):
    enroll   {label, [adapt, lr]} + images -> {label, samples}
    classify {top_k}           + images  -> {results: [...]}
    classes  {}                          -> {classes: {label: samples}, backbone, head}
    forget   {label}                     -> {label, removed}
    rename   {old, new}                  -> {old, new}
    adapt    {steps, [lr]}               -> {kind, init, steps, lr, adapt} (steps 0: off)
    status   {}                          -> model, variant, runtime, classes, requests, uptime
Transports: JSON lines over a Unix socket, loopback TCP or stdin/stdout (one request per line:
{"id", "op", "args", "attachments": [base64]}; answers {"id", "ok", "result"} or {"id", "ok":
false, "error"}), and the framed serial protocol of firmware_tools.serial_protocol.
`run_agent` is `edgemeta serve`: it loads the agent and serves it until stopped.
"""

from __future__ import annotations

import base64
import json
import socket
import socketserver
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.classifier import UNKNOWN, FewShotRuntime
from edgemeta.runtime.paths import ROOT_SH
from edgemeta.runtime.store import STORE_FILE, EnrollmentStore, check_adapt

MAX_LINE = 64 * 2**20


class Agent:
    """Keeps the interpreter, the store and its head in memory; one request at a time."""

    def __init__(self, model: str | Path, store: str | Path, threads: int = 1, edgetpu: str | None = None):
        self.rt = FewShotRuntime(model, threads=threads, edgetpu=edgetpu)
        self.store_dir = Path(store)
        self.lock = threading.Lock()
        self.started, self.requests = time.monotonic(), 0
        self._store: EnrollmentStore | None = None
        self._stamp: float | None = None
        self._head = None

    def _images(self, attachments: list[bytes]) -> np.ndarray:
        if not attachments:
            raise EdgemetaError("no images attached")
        pre = self.rt.manifest.preprocess
        return np.stack([pre.file(f"attachment {i + 1}", data) for i, data in enumerate(attachments)])

    def _load(self) -> EnrollmentStore | None:
        """The store, re-read when another writer (the CLI) changed it since we last looked."""
        path = self.store_dir / STORE_FILE
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if stamp != self._stamp:
            self._store = self.rt.open_store(self.store_dir) if stamp else None
            self._head = self.rt.head(self._store) if self._store and self._store.class_names else None
            self._stamp = stamp
        return self._store

    def handle(self, op: str, args: dict[str, Any], attachments: list[bytes]) -> dict:
        with self.lock:
            self.requests += 1
            if op == "enroll":
                adapt = (args["adapt"], args.get("lr")) if args.get("adapt") is not None else None
                if adapt is not None:
                    check_adapt(*adapt)  # before the images are decoded
                images = self._images(attachments)
                count = self.rt.enroll_images(self.store_dir, args.get("label", ""), images, adapt=adapt)
                return {"label": str(args.get("label", "")).strip(), "samples": count}
            if op == "adapt":
                return self.rt.adapt(self.store_dir, args.get("steps"), args.get("lr"))
            if op == "classify":
                images = self._images(attachments)
                if self._load() is None or self._head is None:
                    raise EdgemetaError(f"store {self.store_dir} has no classes; enroll some first")
                return {"results": self._head.classify(self.rt.embedder(images), int(args.get("top_k", 1)), unknown=UNKNOWN)}
            if op == "classes":
                store = self._load()
                return {"classes": store.counts() if store else {}, "backbone": self.rt.backbone,
                        "head": self.rt.describe_head(store) if store else None}
            if op in ("forget", "rename"):
                with EnrollmentStore.locked(self.store_dir):
                    store = self.rt.open_store(self.store_dir)
                    if op == "forget":
                        out = {"label": args.get("label"), "removed": store.forget(str(args.get("label", "")))}
                    else:
                        store.rename(str(args.get("old", "")), str(args.get("new", "")))
                        out = {"old": args.get("old"), "new": str(args.get("new", "")).strip()}
                    self.rt.save(store)
                return out
            if op == "status":
                store = self._load()
                return {"model": self.rt.manifest.name, "variant": self.rt.variant.name, "runtime": self.rt.embedder.runtime,
                        "classes": len(store.class_names) if store else 0, "requests": self.requests,
                        "uptime_s": round(time.monotonic() - self.started, 1)}
            raise EdgemetaError(f"unknown operation {op!r}; known: enroll, classify, classes, forget, rename, adapt, status")

    # --- JSON lines -------------------------------------------------------------------------

    def answer_line(self, line: bytes) -> bytes:
        rid = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
            rid = req.get("id")
            atts = [base64.b64decode(a, validate=True) for a in req.get("attachments", [])]
            result = {"id": rid, "ok": True, "result": self.handle(str(req.get("op", "")), req.get("args") or {}, atts)}
        except EdgemetaError as e:
            result = {"id": rid, "ok": False, "error": str(e)}
        except (ValueError, TypeError) as e:
            result = {"id": rid, "ok": False, "error": f"bad request: {e}"}
        except Exception as e:  # keep serving: one bad request must not take the agent down
            result = {"id": rid, "ok": False, "error": f"internal error {type(e).__name__}: {e}"}
        return (json.dumps(result) + "\n").encode()


def _stream_handler(agent: Agent):
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while True:
                line = self.rfile.readline(MAX_LINE)
                if not line:
                    return
                if line.strip():
                    self.wfile.write(agent.answer_line(line))
                    self.wfile.flush()

    return Handler


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(agent: Agent, unix_path: str | None = None, tcp: str | None = None):
    """A socket server for the agent: a Unix socket, or TCP on host:port (loopback unless told otherwise)."""
    if unix_path:
        p = Path(unix_path)
        if p.exists() or p.is_symlink():
            if not p.is_socket():
                raise EdgemetaError(f"{p} exists and is not a socket; choose another --socket path")
            p.unlink()
        server = _UnixServer(str(p), _stream_handler(agent))
        p.chmod(0o660)
        return server
    host, _, port = (tcp or "").rpartition(":")
    try:
        return _TcpServer((host or "127.0.0.1", int(port)), _stream_handler(agent))
    except (ValueError, OSError) as e:
        raise EdgemetaError(f"cannot listen on {tcp!r}: {e}") from None


# --- clients ---------------------------------------------------------------------------------


class LineClient:
    """JSON-lines requests over a connected stream (socket file or a subprocess's pipes)."""

    def __init__(self, reader, writer, closer=None):
        self.reader, self.writer, self.closer, self.next_id = reader, writer, closer, 1

    def request(self, op: str, args: dict, attachments: list[bytes] = ()) -> dict:
        rid, self.next_id = self.next_id, self.next_id + 1
        msg = {"id": rid, "op": op, "args": args, "attachments": [base64.b64encode(a).decode() for a in attachments]}
        self.writer.write((json.dumps(msg) + "\n").encode())
        self.writer.flush()
        line = self.reader.readline(MAX_LINE)
        if not line:
            raise EdgemetaError("the agent closed the connection without answering")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise EdgemetaError(answer.get("error", "the agent reported an error"))
        return answer["result"]

    def close(self) -> None:
        if self.closer:
            self.closer()


def connect(via: str, ssh_config: str | None = None, timeout: float = 30.0):
    """A client for `--via`: unix:PATH, tcp:HOST:PORT, ssh:[user@]host, serial:DEVICE[@BAUD]."""
    kind, _, target = via.partition(":")
    if not target:
        raise EdgemetaError(f"--via {via!r}: write it as unix:PATH, tcp:HOST:PORT, ssh:USER@HOST or serial:DEVICE[@BAUD]")
    if kind in ("unix", "tcp"):
        try:
            if kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(target)
            else:
                host, _, port = target.rpartition(":")
                sock = socket.create_connection((host, int(port)), timeout=timeout)
        except (OSError, ValueError) as e:
            raise EdgemetaError(f"cannot reach the agent at {via}: {e}; is `edgemeta serve` running?") from None
        f = sock.makefile("rwb")
        return LineClient(f, f, lambda: (f.close(), sock.close()))
    if kind == "ssh":
        import shlex
        import subprocess

        remote = f'{ROOT_SH}; exec "$R/current/venv/bin/edgemeta" serve --stdio --model "$R/current/model" --store "$R/store"'
        cmd = ["ssh", "-o", "BatchMode=yes", *(["-F", ssh_config] if ssh_config else []), target, "sh -c " + shlex.quote(remote)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def close():
            proc.stdin.close()
            proc.wait(timeout=30)

        client = LineClient(proc.stdout, proc.stdin, close)
        client.proc = proc
        return client
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
    for line in iter(lambda: stdin.readline(MAX_LINE), b""):
        if line.strip():
            stdout.write(agent.answer_line(line))
            stdout.flush()


def serve_serial(agent: Agent, device: str, baud: int, stop: threading.Event | None = None) -> None:
    import serial

    from firmware_tools.serial_protocol import serve

    try:
        port = serial.Serial(device, baudrate=baud, timeout=0.1)
    except serial.SerialException as e:
        raise EdgemetaError(f"cannot open serial port {device}: {e}") from None
    try:
        serve(port, agent.handle, stop)
    finally:
        port.close()


def run_agent(model: str | Path, store: str | Path, *, threads: int = 1, edgetpu: str | None = None,
              unix_path: str | None = None, tcp: str | None = None, serial_device: str | None = None, baud: int = 115200,
              stdio: bool = False, log=lambda msg: None) -> None:
    """Load an agent and answer requests until stopped.

    With `stdio`, JSON lines on stdin/stdout until stdin ends (the other listeners are ignored).
    Otherwise on a Unix socket and/or TCP (JSON lines) and/or a serial port (framed), each in its
    own thread, until SIGTERM or Ctrl-C; then the socket server is shut down and its socket file
    removed. `log` gets one line once the agent listens. Call it from the main thread (signals).
    """
    import signal
    import sys

    if not (unix_path or tcp or serial_device or stdio):
        raise EdgemetaError("say where to listen: --socket PATH, --tcp HOST:PORT, --serial DEVICE or --stdio")
    agent = Agent(model, store, threads=threads, edgetpu=edgetpu)
    if stdio:
        serve_stdio(agent, sys.stdin.buffer, sys.stdout.buffer)
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = make_server(agent, unix_path, tcp) if (unix_path or tcp) else None
    workers = []
    if server:
        workers.append(threading.Thread(target=server.serve_forever, daemon=True))
    if serial_device:
        workers.append(threading.Thread(target=serve_serial, args=(agent, serial_device, baud, stop), daemon=True))
    for t in workers:
        t.start()
    where = ", ".join(x for x in (unix_path, tcp, serial_device and f"{serial_device}@{baud}") if x)
    log(f"serving {agent.rt.manifest.name}/{agent.rt.variant.name} on {where}")
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    if server:
        server.shutdown()
        server.server_close()
        if unix_path:
            Path(unix_path).unlink(missing_ok=True)
