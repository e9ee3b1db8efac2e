"""The board agent and `edgemeta remote` over a Unix socket, loopback TCP, a serial cable (ptys) and SSH."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ptys import NullModem

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "omniglot"


def drawings(char, drawers):
    return [str(p) for p in sorted((SAMPLE / char).glob("*.png")) if int(p.stem[-2:]) in drawers]


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgemeta", *args], capture_output=True, text=True, timeout=timeout)


def start_agent(exported, store, *listen):
    proc = subprocess.Popen([sys.executable, "-m", "edgemeta", "serve", "--model", str(exported), "--store", str(store), *listen],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # "serving ... on ..." once it listens
    assert line.startswith("serving"), line + proc.stderr.read()
    return proc


def stop(proc):
    proc.terminate()
    proc.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr.read()


def exercise(via):
    """The operator's session through `edgemeta remote --via VIA`."""
    r = cli("remote", "--via", via, "enroll", "--label", "alpha", *drawings("Keble_character01", [1, 2]))
    assert r.returncode == 0 and "now has 2 sample(s)" in r.stdout, r.stderr
    assert cli("remote", "--via", via, "enroll", "--label", "beta", *drawings("Keble_character02", [1, 2])).returncode == 0
    r = cli("remote", "--via", via, "classify", "--json", "--top-k", "2", *drawings("Keble_character01", [9]))
    res = json.loads(r.stdout)[0]
    assert res["top"][0]["label"] == "alpha" and res["file"].endswith("_09.png")
    assert cli("remote", "--via", via, "rename", "beta", "gamma").returncode == 0
    r = cli("remote", "--via", via, "classes", "--json")
    assert json.loads(r.stdout)["classes"] == {"alpha": 2, "gamma": 2}
    # errors are one line, and the agent keeps serving afterwards
    r = cli("remote", "--via", via, "forget", "--label", "nope")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no class 'nope'" in r.stderr and r.stderr.count("\n") == 1
    r = cli("remote", "--via", via, "enroll", "--label", "x", __file__)  # this file is no image
    assert r.returncode == 2 and "cannot read image" in r.stderr, r.stderr
    assert cli("remote", "--via", via, "forget", "--label", "gamma").returncode == 0
    r = cli("remote", "--via", via, "status", "--json")
    st = json.loads(r.stdout)
    assert st["classes"] == 1 and st["variant"] == "int8_static"


def test_unix_socket(exported, tmp_path):
    sock = tmp_path / "agent.sock"
    proc = start_agent(exported, tmp_path / "store", "--socket", str(sock))
    try:
        exercise(f"unix:{sock}")
        # the CLI and the agent share the store: a change by one is seen by the other
        r = cli("enroll", "--store", str(tmp_path / "store"), "--label", "delta", *drawings("Tengwar_character01", [1]))
        assert r.returncode == 0, r.stderr
        assert "delta" in json.loads(cli("remote", "--via", f"unix:{sock}", "classes", "--json").stdout)["classes"]
    finally:
        stop(proc)
    assert not sock.exists()


def test_tcp_on_loopback(exported, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_agent(exported, tmp_path / "store", "--tcp", f"127.0.0.1:{port}")
    try:
        exercise(f"tcp:127.0.0.1:{port}")
        # garbage on the wire gets an error line back, not a dead agent
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"this is not json\n")
            assert json.loads(c.makefile().readline())["ok"] is False
        assert cli("remote", "--via", f"tcp:127.0.0.1:{port}", "status").returncode == 0
    finally:
        stop(proc)


def test_serial_cable(exported, tmp_path):
    cable = NullModem()
    board_end, host_end = cable.names
    proc = start_agent(exported, tmp_path / "store", "--serial", board_end)
    try:
        exercise(f"serial:{host_end}@115200")
        with open(host_end, "wb", buffering=0) as f:  # line noise, then a normal request still works
            f.write(b"\x00\xff garbage \xa5\x5a noise")
        time.sleep(0.5)
        assert cli("remote", "--via", f"serial:{host_end}", "status").returncode == 0
    finally:
        stop(proc)
        cable.close()


def test_unreachable_agents_say_so(tmp_path):
    r = cli("remote", "--via", f"unix:{tmp_path / 'none.sock'}", "status")
    assert r.returncode == 2 and "is `edgemeta serve` running?" in r.stderr
    r = cli("remote", "--via", "carrier-pigeon:coop", "status")
    assert r.returncode == 2 and "unknown transport" in r.stderr
    r = cli("remote", "--via", "serial:/dev/does-not-exist", "status")
    assert r.returncode == 2 and "cannot open serial port" in r.stderr


@pytest.mark.parametrize("listen", [["--tcp", "0.0.0.0:notaport"], []])
def test_serve_bad_options(exported, tmp_path, listen):
    r = cli("serve", "--model", str(exported), "--store", str(tmp_path / "s"), *listen)
    assert r.returncode == 2 and r.stderr.startswith("error: ")
