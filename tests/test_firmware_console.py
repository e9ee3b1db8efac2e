"""UART console automation against a real terminal: a pseudo-terminal with getty+login+shell behind it.

The "board" is a Python process whose controlling terminal is the slave of one pty pair, like
getty on /dev/ttyAMA0: it prompts for a login, checks the password with echo off, then execs a
real interactive shell on that terminal. The host opens the slave of a second pty pair with
pyserial, like /dev/ttyUSB0; a thread copies bytes between the two masters (the "cable").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tty
from collections.abc import Callable, Iterator

import pytest

from tests.support.ptys import NullModem

serial = pytest.importorskip("serial")

from firmware_tools.console import ConsoleError, open_console, run_on_console  # noqa: E402

USER, PASSWORD = "pi", "s3cret"

BOARD = r"""
import fcntl, os, sys, termios, time

user, password, shell = sys.argv[1:4]
fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # make the tty our controlling terminal, as getty does

def out(text):
    os.write(1, text.encode())

def read_line(echo):
    saved = termios.tcgetattr(0)
    attrs = termios.tcgetattr(0)
    attrs[3] = attrs[3] | termios.ECHO if echo else attrs[3] & ~termios.ECHO
    termios.tcsetattr(0, termios.TCSANOW, attrs)
    line = b""
    while not line.endswith(b"\n"):  # canonical mode: one read is one line
        chunk = os.read(0, 1024)
        if not chunk:
            sys.exit(0)
        line += chunk
    termios.tcsetattr(0, termios.TCSANOW, saved)
    return line.decode().strip()

out("[    3.141592] systemd[1]: Started serial-getty@ttyAMA0.service.\n")
while True:
    out("\nDebian GNU/Linux 12 raspberrypi ttyAMA0\n\nraspberrypi login: ")
    name = read_line(echo=True)
    if not name:
        continue
    out("Password: ")
    given = read_line(echo=False)
    out("\n")
    if name == user and given == password:
        break
    time.sleep(0.3)  # login's fail delay, shortened
    out("\nLogin incorrect\n")

out("Linux raspberrypi 6.6.51+rpt-rpi-v8 #1 SMP PREEMPT Debian 1:6.6.51-1+rpt3 aarch64\n\n")
out("Last login: ")  # a pause after "login: " must not look like a login prompt
time.sleep(0.4)
out("Tue Nov 26 10:00:00 2024 on ttyAMA0\n")
env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), "TERM": "vt220", "PS1": "pi@raspberrypi:~ $ "}
if shell == "bash":
    os.execve("/bin/bash", ["bash", "--norc", "--noprofile", "-i"], env)
os.execve("/bin/sh", ["sh", "-i"], env)
"""


@pytest.fixture
def make_board() -> Iterator[Callable[..., tuple[serial.Serial, subprocess.Popen]]]:
    cleanup: list[Callable[[], None]] = []

    def make(shell: str = "bash") -> tuple[serial.Serial, subprocess.Popen]:
        board_master, board_slave = os.openpty()
        host_master, host_slave = os.openpty()
        tty.setraw(host_slave)  # a serial port does not echo or translate; set before any byte flows
        proc = subprocess.Popen([sys.executable, "-c", BOARD, USER, PASSWORD, shell], stdin=board_slave, stdout=board_slave,
                                stderr=board_slave, start_new_session=True, close_fds=True)
        os.close(board_slave)
        cable = NullModem(board_master, host_master)
        port = open_console(os.ttyname(host_slave), 115200)

        def done() -> None:
            port.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
            cable.close()
            for fd in (board_master, host_master, host_slave):
                os.close(fd)

        cleanup.append(done)
        return port, proc

    yield make
    for done in reversed(cleanup):
        done()


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_login_and_run(make_board, shell: str):
    port, _ = make_board(shell)
    status, output = run_on_console(port, USER, PASSWORD, "echo hello; uname -s", timeout=20)
    assert (status, output) == (0, "hello\nLinux\n")


def test_exit_status_and_stderr(make_board):
    port, _ = make_board()
    status, output = run_on_console(port, USER, PASSWORD, "ls /no/such/dir", timeout=20, logout=False)
    assert status == 2 and "No such file or directory" in output and "\r" not in output
    # the end marker survives a trailing comment; stdin is /dev/null, so cat does not eat our input
    assert run_on_console(port, USER, PASSWORD, "(exit 7) # a comment", timeout=20, logout=False) == (7, "")
    assert run_on_console(port, USER, PASSWORD, "cat; printf 'no newline'", timeout=20, logout=False) == (0, "no newline")


def test_already_logged_in_and_logout(make_board):
    port, proc = make_board()
    _, pid1 = run_on_console(port, USER, PASSWORD, "echo $$", timeout=20, logout=False)
    _, pid2 = run_on_console(port, USER, PASSWORD, "echo $$", timeout=20)  # finds the shell prompt: same shell
    assert pid1 == pid2 and pid1.strip().isdigit()
    time.sleep(0.3)
    assert proc.poll() is None  # it did not log in, so it leaves the shell as it found it
    port, proc = make_board()
    assert run_on_console(port, USER, PASSWORD, "true", timeout=20) == (0, "")
    assert proc.wait(timeout=5) == 0  # it logged in, so it typed "exit" afterwards


def test_wrong_password(make_board):
    port, _ = make_board()
    with pytest.raises(ConsoleError, match="Login incorrect") as err:
        run_on_console(port, USER, "wrong", "true", timeout=20)
    assert "\n" not in str(err.value)


def test_silent_port_times_out():
    master, slave = os.openpty()
    tty.setraw(slave)
    port = open_console(os.ttyname(slave), 115200)
    try:
        start = time.monotonic()
        with pytest.raises(ConsoleError, match=r"timed out after 1s .* waiting for a login or shell prompt .*nothing received"):
            run_on_console(port, USER, PASSWORD, "true", timeout=1.0)
        assert 1.0 <= time.monotonic() - start < 3.0
        assert os.read(master, 100) == b"\r"  # it pressed Enter to wake the console
    finally:
        port.close()
        os.close(master)
        os.close(slave)


def test_open_console_errors():
    with pytest.raises(ConsoleError, match="cannot open /dev/nonexistent-tty at 115200 baud"):
        open_console("/dev/nonexistent-tty")
    with pytest.raises(ConsoleError, match="bad password"):
        run_on_console(object(), USER, "two\nlines", "true")  # type: ignore[arg-type]
