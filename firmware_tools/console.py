"""Log in on a board's serial console and run one shell command: for a board with no network yet.

A UART console is a terminal meant for people: getty prompts for a user, login for a password,
then a shell echoes what is typed and prints prompts. :func:`run_on_console` plays the person:

1. wakes the line with Enter and answers ``login:`` and ``Password:`` (or finds a shell prompt
   already there). It answers a prompt only once the line has gone quiet, since a prompt is the
   last thing printed before the board waits for input (and "Last login: ..." is not a prompt);
2. sends the command between two markers built with ``printf``, so the typed (echoed) line never
   contains the marker text itself, only the command's output does::

       printf '__EM_%s_%s__\\n' BEGIN <nonce>; { <command>
       } </dev/null; printf '__EM_%s_%s__ %s\\n' END <nonce> "$?"

   The command's own line keeps a trailing ``# comment`` or ``&`` from swallowing the end
   marker, and ``</dev/null`` keeps a command that reads stdin from eating our input;
3. returns the exit status and exactly the bytes printed between the markers (CRs removed);
4. logs out again if it logged in (``logout=True``), leaving the console as it found it.

>>> port = open_console("/dev/ttyUSB0", 115200)                                   # doctest: +SKIP
>>> run_on_console(port, "pi", "s3cret", "hostname -I; uname -m")                  # doctest: +SKIP
(0, '192.168.1.23\\naarch64\\n')
"""

from __future__ import annotations

import codecs
import re
import secrets
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import serial

__all__ = ["ConsoleError", "DEFAULT_PROMPT", "SerialLike", "open_console", "run_on_console"]

DEFAULT_PROMPT = r"[$#] ?$"  # "pi@raspberrypi:~ $ ", "root@cam-1:~# ", "$ "
_POLL = 0.1  # read timeout: also how long the line must be quiet before a prompt is answered
_REWAKE = 3.0  # a booting board prints no prompt for a while: press Enter again this often
_LOGIN_RE = re.compile(r"(?:\A|\n)(?!Last )[^\n]*login: ?\Z")
_PASSWORD_RE = re.compile(r"[Pp]assword: ?\Z")
_LOGIN_INCORRECT = "Login incorrect"
# CSI sequences (colours, bash's bracketed-paste switch "\x1b[?2004h"), charset and keypad switches
_ANSI_RE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>])")


class ConsoleError(Exception):
    """The console did not behave: wrong password, timeout, port problem. One line, says what to check."""


class SerialLike(Protocol):
    """What is used of a ``serial.Serial``: a blocking ``read`` that gives up after ``timeout`` seconds."""

    timeout: float | None

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes) -> int | None: ...


def open_console(device: str, baud: int = 115200) -> serial.Serial:
    """Open a serial console the way Raspberry Pi OS sets it up: 8N1, no flow control."""
    try:
        import serial
    except ImportError:
        raise ConsoleError("pyserial is not installed: pip install pyserial") from None
    try:
        # exclusive: a second program on the same port would steal half of the bytes
        return serial.Serial(device, baudrate=baud, bytesize=serial.EIGHTBITS, parity=serial.PARITY_NONE,
                             stopbits=serial.STOPBITS_ONE, timeout=_POLL, xonxoff=False, rtscts=False, exclusive=True)
    except (serial.SerialException, OSError, ValueError) as e:
        raise ConsoleError(f"cannot open {device} at {baud} baud: {e}") from None


def run_on_console(
    port: SerialLike,
    user: str,
    password: str,
    command: str,
    timeout: float = 30.0,
    prompt_regex: str = DEFAULT_PROMPT,
    *,
    logout: bool = True,
) -> tuple[int, str]:
    """Log in on the console at ``port`` if needed, run ``command`` in the shell, return (exit status, output).

    ``timeout`` bounds the whole exchange (login and command). ``prompt_regex`` recognises the
    shell prompt at the end of the screen (ANSI colour codes are removed before matching).
    ``command`` runs in the login shell with stdin from /dev/null; stderr is on the same
    terminal, so it is part of the output. Raises :class:`ConsoleError`.
    """
    for what, value in (("user", user), ("password", password)):
        if not value or "\r" in value or "\n" in value:
            raise ConsoleError(f"bad {what}: it must be one non-empty line")
    if not command.strip():
        raise ConsoleError("empty command")
    try:
        prompt = re.compile(prompt_regex)
    except re.error as e:
        raise ConsoleError(f"bad prompt_regex {prompt_regex!r}: {e}") from None
    name = getattr(port, "port", None) or getattr(port, "name", None) or "the serial port"
    session = _Session(port, time.monotonic() + timeout, timeout, name)
    old_timeout = getattr(port, "timeout", None)
    try:
        port.timeout = _POLL
        logged_in_here = _log_in(session, user, password, prompt)
        status, output = _run(session, command)
        if logout and logged_in_here:
            session.send("exit\r")
        return status, output
    finally:
        port.timeout = old_timeout


class _Session:
    """The port, a deadline and what arrived since the last thing we typed."""

    def __init__(self, port: SerialLike, deadline: float, timeout: float, name: str) -> None:
        self.port, self.deadline, self.timeout, self.name = port, deadline, timeout, name
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two reads
        self.text = ""

    def read(self) -> bool:
        """Wait up to one poll interval for bytes; False if the line stayed quiet."""
        try:
            data = self.port.read(max(1, getattr(self.port, "in_waiting", 0) or 0))
        except OSError as e:  # pyserial's SerialException is an OSError
            raise ConsoleError(f"reading {self.name} failed: {e}") from None
        if data:
            self.text += self.decoder.decode(data)
        return bool(data)

    def send(self, text: str) -> None:
        self.text = ""
        try:
            self.port.write(text.encode())
            if hasattr(self.port, "flush"):
                self.port.flush()
        except OSError as e:
            raise ConsoleError(f"writing {self.name} failed: {e}") from None

    def screen(self) -> str:
        """What a person would see: no colour codes, no carriage returns."""
        return _ANSI_RE.sub("", self.text).replace("\r", "")

    def check_deadline(self, waiting_for: str) -> None:
        if time.monotonic() > self.deadline:
            tail = self.screen()[-80:]
            seen = f"last output: {tail!r}" if tail else "nothing received"
            raise ConsoleError(f"timed out after {self.timeout:g}s on {self.name} waiting for {waiting_for}; {seen}")


def _log_in(s: _Session, user: str, password: str, prompt: re.Pattern[str]) -> bool:
    """Reach a shell prompt; True if we had to log in."""
    if hasattr(s.port, "reset_input_buffer"):
        s.port.reset_input_buffer()  # stale boot messages are not an answer to our Enter
    s.send("\r")
    last_wake = time.monotonic()
    sent_user = sent_password = False
    while True:
        if not sent_user:
            waiting_for = "a login or shell prompt (is the board up, the baud rate right, the serial console enabled?)"
        elif not sent_password:
            waiting_for = "the password prompt"
        else:
            waiting_for = f"the shell prompt after logging in (prompt_regex {prompt.pattern!r})"
        s.check_deadline(waiting_for)
        if s.read():
            if sent_password and _LOGIN_INCORRECT in s.screen():
                raise ConsoleError(f"login as {user!r} on {s.name} failed: Login incorrect (wrong user name or password)")
            continue  # a prompt is answered only once the board has stopped printing
        screen = s.screen()
        if not screen or screen.endswith("\n"):
            if not sent_user and time.monotonic() - last_wake > _REWAKE:
                s.send("\r")
                last_wake = time.monotonic()
            continue
        if _LOGIN_RE.search(screen):
            if sent_password:  # asked again without a message: some getty/login pairs do that
                raise ConsoleError(f"login as {user!r} on {s.name} failed: asked for the login again (wrong user name or password)")
            s.send(user + "\r")
            sent_user = True
        elif _PASSWORD_RE.search(screen):
            if sent_password:
                raise ConsoleError(f"login as {user!r} on {s.name} failed: asked for the password again (wrong password)")
            if not sent_user:  # someone else's half-finished login: abort it, a fresh login prompt follows
                s.send("\r")
                continue
            s.send(password + "\r")
            sent_password = True
        elif prompt.search(screen):
            return sent_user


def _run(s: _Session, command: str) -> tuple[int, str]:
    nonce = secrets.token_hex(6)
    begin, end = f"__EM_BEGIN_{nonce}__", f"__EM_END_{nonce}__"
    typed = (f"printf '__EM_%s_%s__\\n' BEGIN {nonce}; {{ {command}\n"
             f"}} </dev/null; printf '__EM_%s_%s__ %s\\n' END {nonce} \"$?\"\n")
    s.send(typed.replace("\n", "\r"))  # Enter, as a terminal sends it
    begin_re = re.compile(re.escape(begin) + r"\n")
    end_re = re.compile(re.escape(end) + r" (\d+)\n")
    while True:
        s.check_deadline("the command to finish (its end marker)")
        s.read()
        text = s.text.replace("\r", "")
        b = begin_re.search(text)
        e = end_re.search(text, b.end()) if b else None
        if e:
            return int(e.group(1)), text[b.end():e.start()]
