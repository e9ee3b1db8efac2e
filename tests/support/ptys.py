"""A serial cable without hardware: two pseudo-terminals whose master sides are cross-connected."""

from __future__ import annotations

import os
import select
import threading
import time
import tty


class NullModem:
    """Relays bytes between two pty masters (select-driven, no polling) until closed or a side hangs up.

    `NullModem()` makes two raw pty pairs and exposes their slave device names in `.names`, to be
    opened with pyserial at each end. `NullModem(master_a, master_b)` joins masters the caller made
    (e.g. one whose slave is a shell's controlling terminal).

    A pty moves bytes as fast as the processes do and ignores the baud rate it is set to.
    `NullModem(baud=9600)` paces each direction like a UART at that rate: at most `baud / 10` bytes
    a second (a start bit, 8 data bits, a stop bit), on a clock, so a burst waits for the wire.
    The relay then holds at most `tx_buffer` bytes per direction (about a UART driver's transmit
    buffer), so a sender's blocking write() returns once its bytes are that close to the wire,
    as on a real port, and not as soon as the relay has swallowed them."""

    TICK = 0.005  # paced: seconds of wire time handed to a master per write

    def __init__(self, master_a: int | None = None, master_b: int | None = None, *, baud: int | None = None,
                 tx_buffer: int = 4096) -> None:
        if baud is not None and baud <= 0:
            raise ValueError(f"baud must be positive, not {baud}")
        self._own: list[int] = []
        if master_a is None or master_b is None:
            (master_a, sa), (master_b, sb) = os.openpty(), os.openpty()
            for fd in (master_a, sa, master_b, sb):
                tty.setraw(fd)  # no echo, no CR/LF mapping, no line editing: bytes pass unchanged
            self.names = os.ttyname(sa), os.ttyname(sb)
            self._own = [master_a, sa, master_b, sb]
        self._a, self._b = master_a, master_b
        self.baud = baud
        self._rate = baud / 10 if baud else None  # bytes per second on the wire
        self._hold = tx_buffer if baud else 1 << 20
        os.set_blocking(self._a, False)
        os.set_blocking(self._b, False)
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        peer = {self._a: self._b, self._b: self._a}
        pending = {self._a: bytearray(), self._b: bytearray()}  # bytes waiting to go INTO that master
        # Paced: the time the last byte handed to that master had finished on the wire. A batch of k
        # bytes is handed over once its last bit is through (wire_free + k/rate), never earlier.
        wire_free = {self._a: 0.0, self._b: 0.0}
        batch = max(1, int(self._rate * self.TICK)) if self._rate else 65536
        while True:
            now = time.monotonic()
            writable, wait = [], None
            for fd in peer:
                if not pending[fd]:
                    continue
                due = wire_free[fd] + min(len(pending[fd]), batch) / self._rate if self._rate else now
                if due <= now:
                    writable.append(fd)
                else:
                    wait = due - now if wait is None else min(wait, due - now)
            readable = [self._wake_r] + [fd for fd in peer if len(pending[peer[fd]]) < self._hold]
            r, w, _ = select.select(readable, writable, [], wait)
            if self._wake_r in r:
                return
            for fd in r:
                into = peer[fd]
                try:
                    data = os.read(fd, min(65536, self._hold - len(pending[into])))
                except BlockingIOError:
                    continue
                except OSError:  # EIO: a side hung up
                    return
                if not pending[into]:  # an idle wire: these bytes start on it now
                    wire_free[into] = max(wire_free[into], time.monotonic())
                pending[into] += data
            for fd in w:
                try:
                    sent = os.write(fd, pending[fd][:batch])
                except BlockingIOError:
                    continue
                except OSError:
                    return
                del pending[fd][:sent]
                if self._rate:
                    wire_free[fd] += sent / self._rate

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(2)
        for fd in (*self._own, self._wake_r, self._wake_w):
            os.close(fd)
