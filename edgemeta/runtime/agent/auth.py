"""Who may talk to the agent: the token a TCP connection sends first, and where it may listen.

TCP beyond loopback needs `allow_remote` and a token (wire.load_token: a file of mode 600 or
$EDGEMETA_TOKEN); a connection's first line must then be the `auth` request (at most AUTH_LINE
bytes), compared in constant time, and anything else is refused and the connection closed (see
servers.serve_lines). The token travels in clear: use it on a network you trust, or reach the board
with `--via ssh:`. Before a TCP connection has sent its token it may hold its slot for
`auth_seconds` at most, and at most PREAUTH_TOTAL such connections wait at once, PREAUTH_PER_PEER
per address (one more pushes the oldest out: PreAuth).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import threading
import time

from edgemeta.errors import EdgemetaError
from edgemeta.wire import TOKEN_ENV, TOKEN_HINT, error_line

AUTH_LINE = 4096  # an unauthenticated connection's first line (the auth request) is at most this long
# Before a TCP connection has sent its token it holds a thread and a slot; so at most this many are
# held in all and per address, each for at most AUTH_SECONDS. A new one past either bound pushes out
# the oldest waiting one (so a flood cannot keep a real client out: it authenticates in milliseconds).
DEFAULT_AUTH_SECONDS = 10.0
PREAUTH_TOTAL = 8
PREAUTH_PER_PEER = 2


def authenticate(line: bytes, token: str) -> bool | None:
    """Whether an auth request line carries the token (compared in constant time); None: no auth request."""
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):
        return None
    args = req.get("args") if isinstance(req, dict) else None
    if not isinstance(args, dict) or req.get("op") != "auth" or not isinstance(args.get("token"), str):
        return None
    return hmac.compare_digest(args["token"].encode("utf-8", "replace"), token.encode())


def cut(sock: socket.socket, why: str, gently: bool = False) -> None:
    """End a connection from another thread: one answer line if it fits the send buffer, then the end
    of the stream. Gently: only our side is closed, so a request the client sends meanwhile is still
    read (and refused by its thread) instead of being answered by a reset that would also discard
    our line; otherwise both sides, which ends the connection's thread at once."""
    try:
        sock.send(error_line(None, why), socket.MSG_DONTWAIT)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_WR if gently else socket.SHUT_RDWR)
    except OSError:
        pass


class PreAuth:
    """TCP connections that have not sent their token yet: at most `total` in all and `per_peer` from
    one address, each for at most `seconds` (whatever it sends meanwhile). Past a bound, the oldest
    waiting connection (of that address, else of all) is cut to make room: a flood of idle or
    trickling connections cannot keep a client out, since a real one authenticates at once."""

    def __init__(self, seconds: float = DEFAULT_AUTH_SECONDS, total: int = PREAUTH_TOTAL, per_peer: int = PREAUTH_PER_PEER):
        self.seconds, self.total, self.per_peer = seconds, total, per_peer
        self._waiting: dict[socket.socket, tuple[str, float]] = {}  # insertion order: oldest first
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None

    def admit(self, sock: socket.socket, peer: str) -> None:
        with self._lock:
            mine = [s for s, (p, _) in self._waiting.items() if p == peer]
            oldest = mine[0] if len(mine) >= self.per_peer else \
                next(iter(self._waiting)) if len(self._waiting) >= self.total else None
            if oldest is not None:
                del self._waiting[oldest]
            self._waiting[sock] = (peer, time.monotonic() + self.seconds)
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, daemon=True, name="edgemeta-preauth")
                self._reaper.start()
        if oldest is not None:
            cut(oldest, "not authorised: too many connections are waiting to send their token; this one waited longest")

    def done(self, sock: socket.socket) -> None:
        """The connection authenticated, or ended."""
        with self._lock:
            self._waiting.pop(sock, None)

    def _reap(self) -> None:
        while True:
            time.sleep(min(0.25, self.seconds / 4))
            now = time.monotonic()
            with self._lock:
                late = [s for s, (_, deadline) in self._waiting.items() if deadline <= now]
                for s in late:
                    del self._waiting[s]
            for s in late:
                cut(s, f"not authorised: no token within {self.seconds:g} s")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def tcp_address(tcp: str, allow_remote: bool = False, token: str | None = None) -> tuple[str, int]:
    """(host, port) to listen on for `--tcp HOST:PORT`: loopback, or beyond only with allow_remote and a token."""
    host, _, port = (tcp or "").rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise EdgemetaError(f"cannot listen on {tcp!r}: write it as HOST:PORT with a port from 0 to 65535") from None
    if not _is_loopback(host):
        if not allow_remote:
            raise EdgemetaError(f"--tcp {tcp} listens beyond loopback, where anyone on the network could enroll, forget and "
                                "rename; add --allow-remote and a token (--token-file FILE or $EDGEMETA_TOKEN), "
                                "or listen on 127.0.0.1")
        if token is None:
            raise EdgemetaError(f"--allow-remote needs a token that clients must send: --token-file FILE (mode 600) or "
                                f"${TOKEN_ENV}; make one with: {TOKEN_HINT}")
    return host, number
