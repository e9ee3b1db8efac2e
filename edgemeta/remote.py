"""The host's side of a board's agent: connections over a Unix socket, TCP, ssh and serial.

`connect(via)` gives a client whose `request(op, args, attachments)` returns the agent's result or
raises EdgemetaError with the agent's (or ssh's, or the board's) one line, and `close()`. The
JSON-lines clients are wire.LineClient; over ssh the command line is sshcmd.ssh_argv's, with
one shared OpenSSH connection (ControlMaster); serial speaks firmware_tools.serial_protocol.
Nothing of the board's server is imported here, and runtime never imports this module.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import tempfile

from edgemeta.deploy.ssh import ssh_failure
from edgemeta.errors import EdgemetaError
from edgemeta.runtime.paths import ROOT_SH
from edgemeta.sshcmd import SshOptions, as_ssh_options, check_host, ssh_argv
from edgemeta.wire import LineClient, load_token


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


# Run on the board with the active release's python: join stdin/stdout to the running agent's Unix
# socket (ROOT/agent.sock, where the systemd unit has it listen) or, when no agent answers there,
# become an agent of its own on stdio (loading the model for this one connection).
AGENT_RELAY = """import os, socket, sys, threading
path, exe, model, store = sys.argv[1:5]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(path)
except OSError:
    os.execv(exe, [exe, "serve", "--stdio", "--model", model, "--store", store])
def up():
    while True:
        data = os.read(0, 1 << 16)
        if not data:
            break
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
out = sys.stdout.buffer
while True:
    data = s.recv(1 << 16)
    if not data:
        break
    out.write(data)
    out.flush()
"""

class AgentOverSsh:
    """A client of a board's agent through one shared OpenSSH connection (ControlMaster: the first call
    opens it, later ones within CONTROL_PERSIST s reuse it), talking to the running agent when there is
    one (AGENT_RELAY). When the agent's end closes unanswered, the error is ssh's or the board's own line."""

    def __init__(self, host: str, ssh: SshOptions | str | None = None, timeout: float = 30.0):
        self.host = check_host(host)
        self.ssh = as_ssh_options(ssh)
        remote = (f'{ROOT_SH}; exec "$R/current/venv/bin/python" -c {shlex.quote(AGENT_RELAY)} "$R/agent.sock" '
                  '"$R/current/venv/bin/edgemeta" "$R/current/model" "$R/store"')
        argv = ssh_argv(self.host, "sh -c " + shlex.quote(remote), self.ssh, timeout, shared=True)
        self.err = tempfile.TemporaryFile()  # (a file: ssh's stderr can never block it)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        self.client = LineClient(self.proc.stdout, self.proc.stdin)

    def request(self, op: str, args: dict, attachments: list[bytes] = ()) -> dict:
        try:
            return self.client.request(op, args, attachments)
        except EdgemetaError as e:
            if "closed the connection without answering" not in str(e):
                raise
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                raise e from None
            self.err.seek(0)
            lines = [ln for ln in self.err.read().decode(errors="replace").strip().splitlines() if ln.strip()]
            if code == 255:
                raise ssh_failure(self.host, "\n".join(lines), self.ssh) from None
            if code == 127 or (lines and "current/venv/bin/python" in lines[-1]):
                raise EdgemetaError(f"no release is active on {self.host}: deploy one first (edgemeta deploy)") from None
            raise EdgemetaError(f"the agent on {self.host} closed the connection without answering"
                                + (f": {lines[-1]}" if lines else f" (exit {code})")) from None

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err.close()
