"""The board agent: one loaded model and store answering requests (the host's clients are edgemeta.remote).

Operations (args are JSON, images travel as attachments of raw file bytes):
    enroll   {label, [adapt, lr]} + images -> {label, samples}
    classify {top_k}           + images  -> {results: [...]}
    classes  {}                          -> {classes: {label: samples}, backbone, head}
    forget   {label}                     -> {label, removed}
    rename   {old, new}                  -> {old, new}
    adapt    {steps, [lr]}               -> {kind, init, steps, lr, adapt} (steps 0: off)
    status   {}                          -> model, variant, runtime, classes, requests, uptime
    auth         {token}                     -> {token: "accepted" | "not needed"}
Transports: JSON lines over a Unix socket, TCP or stdin/stdout (edgemeta.wire), and the framed
serial protocol of firmware_tools.serial_protocol. Error answers are one sentence for a person,
never Python internals.

The package, by job:
    core         Agent: requests in flight, image decoding, the store, `call` and `answer_line`
    ops          the op table: one handler per operation
    auth         the token a TCP connection sends first, and where the agent may listen
    servers      socket servers (Unix, TCP), serve_lines, serve_stdio
    serial_port  serving the framed protocol on a serial port
    run          run_agent, which is `edgemeta serve`

It imports nothing of the host (host, deploy, remote, cli) and never TensorFlow.
"""

from edgemeta.runtime.agent.auth import AUTH_LINE, DEFAULT_AUTH_SECONDS, PREAUTH_PER_PEER, PREAUTH_TOTAL, tcp_address
from edgemeta.runtime.agent.core import DEFAULT_IDLE_TIMEOUT, STOPPING, Agent, default_decode_slots
from edgemeta.runtime.agent.ops import HANDLERS, OPEN_SET_MODES, OPS
from edgemeta.runtime.agent.run import DRAIN_SECONDS, run_agent
from edgemeta.runtime.agent.serial_port import DEFAULT_SERIAL_REOPEN_FOR, open_serial, serve_serial
from edgemeta.runtime.agent.servers import DEFAULT_MAX_CONNECTIONS, make_server, serve_lines, serve_stdio
from edgemeta.wire import LARGE_LINE, MAX_LINE, TOKEN_ENV, load_token

__all__ = ["AUTH_LINE", "DEFAULT_AUTH_SECONDS", "DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_CONNECTIONS", "DEFAULT_SERIAL_REOPEN_FOR",
           "DRAIN_SECONDS", "HANDLERS", "LARGE_LINE", "MAX_LINE", "OPEN_SET_MODES", "OPS", "PREAUTH_PER_PEER", "PREAUTH_TOTAL",
           "STOPPING", "TOKEN_ENV", "Agent", "default_decode_slots", "load_token", "make_server", "open_serial", "run_agent",
           "serve_lines", "serve_serial", "serve_stdio", "tcp_address"]
