"""Serving the agent on a serial port: the framed protocol of firmware_tools.serial_protocol.

A port that goes away (a USB adapter unplugged) is reopened at the same path with backoff; one
that stays gone for `reopen_for` seconds ends the agent with EdgemetaError, so that the service
manager restarts it.
"""

from __future__ import annotations

import threading
import time

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.agent.core import Agent

DEFAULT_SERIAL_REOPEN_FOR = 300.0


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
