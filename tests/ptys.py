"""A serial cable without hardware: two pseudo-terminals whose master sides are cross-connected."""

from __future__ import annotations

import os
import select
import threading
import tty


class NullModem:
    """Relays bytes between two pty masters (select-driven, no polling) until closed or a side hangs up.

    `NullModem()` makes two raw pty pairs and exposes their slave device names in `.names`, to be
    opened with pyserial at each end. `NullModem(master_a, master_b)` joins masters the caller made
    (e.g. one whose slave is a shell's controlling terminal)."""

    def __init__(self, master_a: int | None = None, master_b: int | None = None) -> None:
        self._own: list[int] = []
        if master_a is None or master_b is None:
            (master_a, sa), (master_b, sb) = os.openpty(), os.openpty()
            for fd in (master_a, sa, master_b, sb):
                tty.setraw(fd)  # no echo, no CR/LF mapping, no line editing: bytes pass unchanged
            self.names = os.ttyname(sa), os.ttyname(sb)
            self._own = [master_a, sa, master_b, sb]
        self._a, self._b = master_a, master_b
        os.set_blocking(self._a, False)
        os.set_blocking(self._b, False)
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        peer = {self._a: self._b, self._b: self._a}
        pending = {self._a: bytearray(), self._b: bytearray()}  # bytes waiting to go INTO that master
        while True:
            readable = [self._wake_r] + [fd for fd in peer if len(pending[peer[fd]]) < 1 << 20]
            r, w, _ = select.select(readable, [fd for fd in peer if pending[fd]], [])
            if self._wake_r in r:
                return
            for fd in r:
                try:
                    pending[peer[fd]] += os.read(fd, 65536)
                except BlockingIOError:
                    pass
                except OSError:  # EIO: a side hung up
                    return
            for fd in w:
                try:
                    del pending[fd][: os.write(fd, pending[fd])]
                except BlockingIOError:
                    pass
                except OSError:
                    return

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(2)
        for fd in (*self._own, self._wake_r, self._wake_w):
            os.close(fd)
