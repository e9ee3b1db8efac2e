"""The board agent and `edgemeta remote` over a Unix socket, loopback TCP, a serial cable (ptys) and SSH."""

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from tests.support.ptys import NullModem

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "omniglot"


def drawings(char, drawers):
    return [str(p) for p in sorted((SAMPLE / char).glob("*.png")) if int(p.stem[-2:]) in drawers]


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgemeta", *args], capture_output=True, text=True, timeout=timeout)


def start_agent(exported, store, *listen, env=None):
    proc = subprocess.Popen([sys.executable, "-m", "edgemeta", "serve", "--model", str(exported), "--store", str(store), *listen],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
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


def test_remote_over_ssh_refuses_a_host_that_looks_like_an_option(tmp_path, monkeypatch):
    marker = tmp_path / "proxy-command-ran"
    for host in (f"-oProxyCommand=touch {marker}", "pi@-oProxyCommand=x", "board;touch x", ""):
        r = cli("remote", "--via", f"ssh:{host}", "status", timeout=60)
        assert r.returncode == 2 and r.stdout == "", (host, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "is not an ssh destination" in r.stderr or "write it as" in r.stderr, r.stderr
    assert not marker.exists()
    # a good host goes to ssh after `--`, so ssh reads it as the destination whatever it is
    from edgemeta import remote as agent

    seen = []

    class Proc:
        stdin = stdout = io.BytesIO()

    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kw: seen.append(argv) or Proc())
    agent.connect("ssh:pi@kitchen", "cfg")
    argv = seen[0]
    assert argv[0] == "ssh" and argv[argv.index("pi@kitchen") - 1] == "--" and argv.index("--") > argv.index("-F")


@pytest.mark.parametrize("listen", [["--tcp", "0.0.0.0:notaport"], []])
def test_serve_bad_options(exported, tmp_path, listen):
    r = cli("serve", "--model", str(exported), "--store", str(tmp_path / "s"), *listen)
    assert r.returncode == 2 and r.stderr.startswith("error: ")


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "omniglot-conv4"


def test_adapt_op_and_classify_with_the_stores_head(tmp_path):
    from edgemeta.runtime.agent import Agent
    from edgemeta.runtime.fewshot import FewShotRuntime
    from edgemeta.runtime.store import STORE_FILE, EnrollmentStore

    agent = Agent(SHIPPED, tmp_path / "store")

    def ask(op, args=None, files=()):
        line = json.dumps({"id": 1, "op": op, "args": args or {},
                           "attachments": [base64.b64encode(Path(f).read_bytes()).decode() for f in files]})
        return json.loads(agent.answer_line(line.encode()))

    chars = ["Keble_character01", "Keble_character05", "Tengwar_character03"]
    for c in chars:
        assert ask("enroll", {"label": c}, drawings(c, range(1, 6)))["ok"]
    before = (tmp_path / "store" / STORE_FILE).read_bytes()
    for bad in ({"steps": -1}, {"steps": 1001}, {"steps": "10"}, {"steps": True}, {"steps": 5, "lr": 0},
                {"steps": 5, "lr": "0.1"}, {"steps": 5, "lr": float("inf")}, {}):
        a = ask("adapt", bad)
        assert not a["ok"] and ("adaptation steps" in a["error"] or "learning rate" in a["error"]), (bad, a)
    a = ask("enroll", {"label": "x", "adapt": -2}, drawings("Keble_character02", [1]))
    assert not a["ok"] and "got -2" in a["error"]
    assert (tmp_path / "store" / STORE_FILE).read_bytes() == before  # nothing written
    a = ask("adapt", {"steps": 15, "lr": 0.05})
    assert a["ok"] and a["result"] == {"kind": "linear", "init": "proto", "steps": 15, "lr": 0.05,
                                       "adapt": {"steps": 15, "lr": 0.05}}
    queries = [f for c in chars for f in drawings(c, [14, 15])]
    got = ask("classify", {"top_k": 2}, queries)["result"]["results"]
    rt = FewShotRuntime(SHIPPED)
    store = EnrollmentStore.open(tmp_path / "store")
    want = rt.head(store).classify(rt.embedder(rt.images(queries)[0]), 2)
    assert [r["top"][0]["label"] for r in got] == [r["top"][0]["label"] for r in want]
    assert [r["top"][0]["probability"] for r in got] == pytest.approx([r["top"][0]["probability"] for r in want])
    assert type(agent._head).__name__ == "LinearHead"
    # forget through the agent recomputes the head without the class
    assert ask("forget", {"label": chars[1]})["ok"]
    assert EnrollmentStore.open(tmp_path / "store").head_w.shape == (64, 2)
    assert ask("classes")["result"]["head"]["adapt"] == {"steps": 15, "lr": 0.05}
    assert ask("adapt", {"steps": 0})["result"] == {"kind": "prototype", "adapt": None}
    ask("classify", {}, queries[:1])
    assert type(agent._head).__name__ == "PrototypeHead"


def test_remote_adapt(tmp_path):
    sock = tmp_path / "agent.sock"
    proc = start_agent(SHIPPED, tmp_path / "store", "--socket", str(sock))
    try:
        via = f"unix:{sock}"
        assert cli("remote", "--via", via, "enroll", "--label", "alpha", *drawings("Keble_character01", [1, 2])).returncode == 0
        r = cli("remote", "--via", via, "adapt", "--steps", "12")
        assert r.returncode == 0 and "proto init, 12 step(s) at rate 0.01" in r.stdout, r.stderr
        r = cli("remote", "--via", via, "adapt", "--steps", "-4")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "got -4" in r.stderr
        r = cli("remote", "--via", via, "classes")
        assert "head adapted with 12 step(s)" in r.stdout, r.stdout
    finally:
        stop(proc)


# --- issue 12: authentication, one agent per socket, serial ports that come and go, bounds ------

TOKEN = "k7Qv9-s3cr3t-Zq1xW8pL2mN4"  # never on a command line, never in a log
PNG = sorted(SAMPLE.glob("*/*.png"))[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_file(tmp_path, mode=0o600, text=TOKEN):
    p = tmp_path / "token"
    p.write_text(text + "\n")
    p.chmod(mode)
    return p


def serve_cli(tmp_path, *listen, timeout=60, env=None):
    """`edgemeta serve` expected to refuse its options (an agent that starts instead runs into the timeout)."""
    return subprocess.run([sys.executable, "-m", "edgemeta", "serve", "--model", str(SHIPPED), "--store",
                           str(tmp_path / "store"), *listen], capture_output=True, text=True, timeout=timeout, env=env)


def request_line(op, args=None, files=(), rid=1):
    atts = [base64.b64encode(Path(f).read_bytes()).decode() for f in files]
    return (json.dumps({"id": rid, "op": op, "args": args or {}, "attachments": atts}) + "\n").encode()


def answers(sock, timeout=30):
    """Every answer line until the agent closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return [json.loads(x) for x in data.splitlines()]


def one_line_error(r):
    return r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_tcp_beyond_loopback_needs_allow_remote_and_a_private_token(tmp_path):
    port = free_port()
    r = serve_cli(tmp_path, "--tcp", f"0.0.0.0:{port}")
    assert one_line_error(r) and "--allow-remote" in r.stderr and "token" in r.stderr, r.stderr
    env = {k: v for k, v in os.environ.items() if k != "EDGEMETA_TOKEN"}
    r = serve_cli(tmp_path, "--tcp", f"0.0.0.0:{port}", "--allow-remote", env=env)
    assert one_line_error(r) and "needs a token" in r.stderr, r.stderr
    r = serve_cli(tmp_path, "--tcp", f"0.0.0.0:{port}", "--allow-remote", "--token-file", str(token_file(tmp_path, 0o640)))
    assert one_line_error(r) and "chmod 600" in r.stderr and TOKEN not in r.stderr, r.stderr
    r = serve_cli(tmp_path, "--tcp", f"0.0.0.0:{port}", "--allow-remote", "--token-file", str(token_file(tmp_path, text="short")))
    assert one_line_error(r) and "at least 16" in r.stderr, r.stderr
    r = serve_cli(tmp_path, "--tcp", f"0.0.0.0:{port}", "--allow-remote", "--token-file", str(tmp_path / "nothing"))
    assert one_line_error(r) and "does not exist" in r.stderr, r.stderr


def test_remote_tcp_with_a_token(tmp_path):
    port, tf = free_port(), token_file(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "EDGEMETA_TOKEN"}
    proc = start_agent(SHIPPED, tmp_path / "store", "--tcp", f"0.0.0.0:{port}", "--allow-remote", "--token-file", str(tf), env=env)
    try:
        assert TOKEN not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        # no token, a wrong one, an over-long first line: one refusal each, then the connection is closed
        wrong = request_line("auth", {"token": TOKEN[:-1] + "X"})
        for first in (request_line("status"), wrong, request_line("auth", {"token": 5}), b"x" * 100_000 + b"\n",
                      request_line("enroll", {"label": "a"}, [PNG])):
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(first + request_line("status", rid=2))
                got = answers(c)
            assert len(got) == 1 and not got[0]["ok"] and got[0]["error"].startswith("not authorised"), got
        # the right token first, then requests as usual
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(request_line("auth", {"token": TOKEN}, rid=7) + request_line("status", rid=8))
            c.shutdown(socket.SHUT_WR)
            got = answers(c)
        assert [a["id"] for a in got] == [7, 8] and all(a["ok"] for a in got), got
        via = ["remote", "--via", f"tcp:127.0.0.1:{port}"]
        r = cli(*via, "--token-file", str(tf), "enroll", "--label", "alpha", *drawings("Keble_character01", [1, 2]))
        assert r.returncode == 0 and "now has 2 sample(s)" in r.stdout, r.stderr
        r = subprocess.run([sys.executable, "-m", "edgemeta", *via, "classes", "--json"], capture_output=True, text=True,
                           timeout=120, env={**env, "EDGEMETA_TOKEN": TOKEN})
        assert r.returncode == 0 and json.loads(r.stdout)["classes"] == {"alpha": 2}, r.stderr
        r = subprocess.run([sys.executable, "-m", "edgemeta", *via, "status"], capture_output=True, text=True, timeout=120,
                           env={**env, "EDGEMETA_TOKEN": "W" * 20})
        assert one_line_error(r) and "not authorised" in r.stderr, r.stderr
        r = subprocess.run([sys.executable, "-m", "edgemeta", *via, "forget", "--label", "alpha"], capture_output=True,
                           text=True, timeout=120, env=env)
        assert one_line_error(r) and "not authorised" in r.stderr and "token" in r.stderr, r.stderr
        tf.chmod(0o644)
        r = cli(*via, "--token-file", str(tf), "status")
        assert one_line_error(r) and "chmod 600" in r.stderr, r.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    log = proc.stderr.read()
    assert proc.returncode == 0 and TOKEN not in log and "Traceback" not in log, log
    assert "refused 127.0.0.1:" in log and "unencrypted" in log


def test_loopback_tcp_needs_no_token(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "EDGEMETA_TOKEN"}
    proc = start_agent(SHIPPED, tmp_path / "store", "--tcp", f"127.0.0.1:{port}", env=env)
    try:
        r = cli("remote", "--via", f"tcp:127.0.0.1:{port}", "status", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["classes"] == 0, r.stderr
        # a client that sends a token anyway is served too
        r = subprocess.run([sys.executable, "-m", "edgemeta", "remote", "--via", f"tcp:127.0.0.1:{port}", "status"],
                           capture_output=True, text=True, timeout=120, env={**env, "EDGEMETA_TOKEN": TOKEN})
        assert r.returncode == 0, r.stderr
    finally:
        stop(proc)


def test_a_second_agent_on_a_live_socket_is_refused_and_a_stale_socket_is_taken_over(tmp_path):
    sock = tmp_path / "agent.sock"
    first = start_agent(SHIPPED, tmp_path / "store", "--socket", str(sock))
    try:
        r = serve_cli(tmp_path, "--socket", str(sock))
        assert one_line_error(r) and "already" in r.stderr and str(sock) in r.stderr, r.stderr
        assert cli("remote", "--via", f"unix:{sock}", "status").returncode == 0  # the first agent still answers
    finally:
        first.kill()  # SIGKILL: its socket file stays behind, stale
        first.wait(timeout=10)
    assert sock.is_socket()
    second = start_agent(SHIPPED, tmp_path / "store", "--socket", str(sock))
    try:
        assert cli("remote", "--via", f"unix:{sock}", "status").returncode == 0
    finally:
        stop(second)
    assert not sock.exists()


def wait_for(check, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return False


def test_the_serial_port_goes_away_and_comes_back(tmp_path):
    link = tmp_path / "ttyX"  # the device path the agent is told, like /dev/serial/by-id/...
    cable = NullModem()
    link.symlink_to(cable.names[0])
    proc = start_agent(SHIPPED, tmp_path / "store", "--serial", str(link))
    try:
        assert cli("remote", "--via", f"serial:{cable.names[1]}", "--timeout", "10", "status").returncode == 0
        cable.close()  # unplugged
        link.unlink()
        time.sleep(1.5)
        assert proc.poll() is None
        cable = NullModem()  # plugged in again, at the same path
        link.symlink_to(cable.names[0])
        assert wait_for(lambda: cli("remote", "--via", f"serial:{cable.names[1]}", "--timeout", "3", "status").returncode == 0, 30)
        r = cli("remote", "--via", f"serial:{cable.names[1]}", "enroll", "--label", "a", *drawings("Keble_character01", [1]))
        assert r.returncode == 0, r.stderr
    finally:
        stop(proc)
        cable.close()
    log = proc.stderr.read()
    assert "went away" in log and "is back" in log and "Traceback" not in log, log


def test_a_serial_port_gone_for_good_ends_the_agent_non_zero(tmp_path):
    link = tmp_path / "ttyX"
    cable = NullModem()
    link.symlink_to(cable.names[0])
    proc = start_agent(SHIPPED, tmp_path / "store", "--serial", str(link), "--serial-reopen-for", "2")
    try:
        cable.close()
        link.unlink()
        proc.wait(timeout=30)  # systemd's Restart=on-failure then starts it again
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stderr.read()
    assert proc.returncode == 2 and "has been gone for 2 s" in log and "Traceback" not in log, log


def test_hang_ups_are_quiet_and_an_over_long_line_gets_one_answer(tmp_path):
    sock = tmp_path / "agent.sock"
    proc = start_agent(SHIPPED, tmp_path / "store", "--socket", str(sock))
    try:
        assert cli("remote", "--via", f"unix:{sock}", "enroll", "--label", "a", str(PNG)).returncode == 0
        for _ in range(5):  # ask, and hang up before the answer
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(str(sock))
                c.sendall(request_line("classify", {}, [PNG] * 20))
        with socket.socket(socket.AF_UNIX) as c:  # one line over the 64 MiB limit, then a request
            c.connect(str(sock))
            c.sendall(b'{"id": 1, "op": "status", "pad": "' + b"x" * (64 * 2**20) + b'"}\n' + request_line("status", rid=2))
            c.shutdown(socket.SHUT_WR)
            got = answers(c, timeout=60)
        assert len(got) == 2 and not got[0]["ok"] and "longer than the agent's limit" in got[0]["error"], got[:3]
        assert got[1]["id"] == 2 and got[1]["ok"]
        assert cli("remote", "--via", f"unix:{sock}", "status").returncode == 0
    finally:
        stop(proc)
    log = proc.stderr.read()
    assert "Traceback" not in log and "BrokenPipe" not in log and log.count("\n") <= 2, log


def test_idle_connections_are_closed_and_their_number_is_capped(tmp_path):
    sock = tmp_path / "agent.sock"
    proc = start_agent(SHIPPED, tmp_path / "store", "--socket", str(sock), "--max-connections", "2", "--idle-timeout", "3")
    held = []
    try:
        for _ in range(2):
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(sock))
            c.sendall(request_line("status"))
            assert c.makefile("rb").readline()
            held.append(c)
        with socket.socket(socket.AF_UNIX) as c:  # a third at once: one clear answer, then closed
            c.connect(str(sock))
            got = answers(c)
        assert len(got) == 1 and "busy" in got[0]["error"] and "2 connections" in got[0]["error"], got
        held.pop().close()
        assert wait_for(lambda: cli("remote", "--via", f"unix:{sock}", "status").returncode == 0, 10)
        t0 = time.monotonic()
        held[0].settimeout(20)
        assert held[0].recv(100) == b""  # idle: the agent closed it
        assert time.monotonic() - t0 < 10
    finally:
        for c in held:
            c.close()
        stop(proc)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    from edgemeta.runtime.agent import Agent

    a = Agent(SHIPPED, tmp_path_factory.mktemp("agent") / "store")
    line = request_line("enroll", {"label": "alpha"}, drawings("Keble_character01", [1, 2]))
    assert json.loads(a.answer_line(line))["ok"]
    return a


INTERNALS = re.compile(r"object at 0x|Traceback|\b[A-Z]\w*(Error|Exception)\b|internal error \w+Error")


def check_answer(raw: bytes) -> dict:
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    a = json.loads(raw)
    assert isinstance(a, dict) and isinstance(a["ok"], bool)
    if not a["ok"]:
        assert isinstance(a["error"], str) and a["error"] and "\n" not in a["error"], a
        assert not INTERNALS.search(a["error"]), a["error"]
    return a


IMG = base64.b64encode(PNG.read_bytes()).decode()


@pytest.mark.parametrize("line", [
    b'{"id": 2, "op": "classify", "args": {"top_k": 1e999}, "attachments": ["' + IMG.encode() + b'"]}',
    json.dumps({"id": 3, "op": "classify", "args": {"top_k": 10**30}, "attachments": [IMG]}).encode(),
    json.dumps({"id": 4, "op": "classify", "args": {"top_k": "2"}, "attachments": [IMG]}).encode(),
    json.dumps({"id": 5, "op": "enroll", "args": {"label": ["x"]}, "attachments": [IMG]}).encode(),
    json.dumps({"id": 6, "op": "rename", "args": {"old": "alpha", "new": None}}).encode(),
    json.dumps({"id": 7, "op": ["classify"], "args": {}, "attachments": 5}).encode(),
    json.dumps({"id": 8, "op": "classify", "args": [], "attachments": [IMG]}).encode(),
    json.dumps({"id": 9, "op": "classify", "attachments": "not a list"}).encode(),
    json.dumps({"id": 10, "op": "classify", "attachments": [{"a": 1}]}).encode(),
    json.dumps({"id": 11, "op": "classify", "attachments": ["%%%"]}).encode(),
    json.dumps({"id": 12, "op": "classify", "attachments": [base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()]}).encode(),
    json.dumps({"id": 13, "op": "classify", "attachments": [base64.b64encode(PNG.read_bytes()[:100]).decode()]}).encode(),
    json.dumps({"id": 14, "op": "adapt", "args": {"steps": 1e308}}).encode(),
    json.dumps({"id": 15, "op": "forget", "args": {"label": {"a": 1}}}).encode(),
    json.dumps({"id": 16}).encode(),
    b"[" * 100_000, b"\xff\xfe\x00", b'{"id": 1, "op": "status", "n": ' + b"9" * 5000 + b"}", b"[1, 2]", b"null",
])
def test_error_answers_are_one_sentence_without_python_internals(agent, line):
    a = check_answer(agent.answer_line(line))
    assert not a["ok"], a


def test_serial_errors_are_sentences_too(agent):
    from edgemeta.errors import EdgemetaError

    with pytest.raises(EdgemetaError) as e:
        agent.call("classify", {"top_k": float("inf")}, [PNG.read_bytes()])
    assert not INTERNALS.search(str(e.value))
    with pytest.raises(EdgemetaError) as e:
        agent.call("enroll", {"label": 7}, [b"\x00" * 10])
    assert "label must be a string" in str(e.value)


def test_fuzzed_requests_get_one_clean_answer_each(agent):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                          max_leaves=12)
    blobs = st.binary(max_size=300) | st.sampled_from([PNG.read_bytes(), PNG.read_bytes()[:100], b"GIF89a" + b"\0" * 30])
    attachments = st.lists(blobs.map(lambda b: base64.b64encode(b).decode()) | values, max_size=3) | values
    ops = st.sampled_from(["enroll", "classify", "classes", "status", "adapt", "rename", "auth", "nope"]) | values
    requests = st.fixed_dictionaries({"id": values, "op": ops, "args": st.dictionaries(
        st.sampled_from(["label", "top_k", "adapt", "lr", "steps", "old", "new", "token"]), values, max_size=4) | values,
        "attachments": attachments})

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(requests | st.binary(max_size=200))
    def prop(req):
        line = req if isinstance(req, bytes) else json.dumps(req).encode()
        check_answer(agent.answer_line(line))

    prop()

    # what the serial transport hands the agent: an op string, an args object, raw attachment bytes
    from edgemeta.errors import EdgemetaError

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.sampled_from(["enroll", "classify", "classes", "status", "adapt", "rename", "auth", "nope"]) | st.text(max_size=8),
           st.dictionaries(st.sampled_from(["label", "top_k", "adapt", "lr", "steps", "old", "new"]), values, max_size=4),
           st.lists(blobs, max_size=3))
    def serial_prop(op, args, atts):
        try:
            assert isinstance(agent.call(op, args, atts), dict)
        except EdgemetaError as e:
            assert str(e) and "\n" not in str(e) and not INTERNALS.search(str(e)), str(e)

    serial_prop()


def labels():
    """Strings a user or an attacker might give as a label: any code point, control characters,
    path-like names, long ones."""
    from hypothesis import strategies as st

    chars = st.characters()
    return (st.text(chars, max_size=40) | st.text(chars, min_size=120, max_size=140)
            | st.sampled_from(["../x", "/etc/passwd", "a/b", ".", "..", "store.npz", ".lock", "~root", "$(id)", "NUL", " a "])
            | st.text(st.sampled_from("ab\x00\x07\t\n\r\x1b\x7f\x85\u2028 ./"), max_size=8))


def test_check_label_takes_any_value():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from edgemeta.errors import EdgemetaError
    from edgemeta.runtime.store import MAX_LABEL, check_label

    @settings(max_examples=400, deadline=None, database=None)
    @given(labels() | st.none() | st.integers() | st.binary(max_size=8) | st.lists(st.text(max_size=3), max_size=2))
    def prop(value):
        try:
            label = check_label(value)
        except EdgemetaError as e:
            assert str(e).startswith(("a label", "label ")) and "\n" not in str(e) and len(str(e)) < 300, str(e)
            return
        assert isinstance(value, str) and label == value.strip() and 0 < len(label) <= MAX_LABEL
        assert not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in label)

    prop()


def test_fuzzed_labels_stay_data_in_the_store(tmp_path):
    """enroll, rename and forget with any label, over the agent: one answer line each, nothing
    written but the store's own files, and the store still opens with every name a valid label."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from edgemeta.runtime.agent import Agent
    from edgemeta.runtime.store import EnrollmentStore, check_label

    a = Agent(SHIPPED, tmp_path / "data" / "store")
    assert json.loads(a.answer_line(request_line("enroll", {"label": "alpha"}, drawings("Keble_character01", [1]))))["ok"]
    img = base64.b64encode(PNG.read_bytes()).decode()
    before = set(os.listdir(tmp_path / "data" / "store"))

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.sampled_from(["enroll", "rename", "forget"]), labels(), labels())
    def prop(op, label, other):
        args = {"enroll": {"label": label}, "forget": {"label": label}, "rename": {"old": other, "new": label}}[op]
        line = json.dumps({"id": 1, "op": op, "args": args, "attachments": [img] if op == "enroll" else []})
        raw = a.answer_line(line.encode())
        answer = json.loads(raw)
        assert raw.count(b"\n") == 1 and isinstance(answer["ok"], bool)
        assert answer["ok"] or ("\n" not in answer["error"] and "Traceback" not in answer["error"]), answer

    prop()
    assert sorted(os.listdir(tmp_path)) == ["data"] and sorted(os.listdir(tmp_path / "data")) == ["store"]
    assert set(os.listdir(tmp_path / "data" / "store")) == before
    names = EnrollmentStore.open(tmp_path / "data" / "store").class_names
    assert names and all(check_label(n) == n for n in names)


def test_a_label_that_is_not_unicode_text_is_refused(tmp_path):
    # "\udcff" is what Python makes of `--label $'\xff'` on a command line; JSON can carry "\ud800" as an escape
    from edgemeta.runtime.agent import Agent

    a = Agent(SHIPPED, tmp_path / "store")
    for label in ("\udcff", "a\ud800"):
        answer = check_answer(a.answer_line(request_line("enroll", {"label": label}, drawings("Keble_character01", [1]))))
        assert not answer["ok"] and "label" in answer["error"], answer
    # C1 controls, line separators and bidi overrides are refused too; an emoji with a ZWJ is text
    from edgemeta.errors import EdgemetaError
    from edgemeta.runtime.store import check_label

    for label in ("a\x85b", "a\u2028b", "abc\u202edcba"):
        with pytest.raises(EdgemetaError, match="printable"):
            check_label(label)
    assert check_label("\U0001f469\u200d\U0001f52c") == "\U0001f469\u200d\U0001f52c"


def test_check_labels_fast_path_accepts_no_character_the_full_test_refuses():
    """check_label takes str.isprintable as a fast yes; over every code point it never says yes where
    the per-character test says no."""
    import sys

    from edgemeta.runtime.store.labels import _printable

    assert not [hex(i) for i in range(sys.maxunicode + 1) if chr(i).isprintable() and not _printable(chr(i))]


@pytest.mark.parametrize("limit", [40, 1000, 5000])
def test_serve_lines_answers_each_request_line_once(agent, limit):
    from edgemeta.runtime.agent import serve_lines

    agent_limit, agent.max_request_bytes = agent.max_request_bytes, limit
    try:
        status = b'{"id": 9, "op": "status"}\n'
        lines = [status, b"x" * (limit + 1) + b"\n", b"\n", b"y" * (3 * limit) + b"\n", status, b"z" * limit + b"\n",
                 b"   \n", status.rstrip()]
        out = io.BytesIO()
        serve_lines(agent, io.BytesIO(b"".join(lines)), out)
        got = [check_answer(x + b"\n") for x in out.getvalue().splitlines()]
        assert len(got) == 6  # blank lines are no requests
        assert [a["ok"] for a in got] == [True, False, False, True, False, True]
        assert all("longer than the agent's limit" in a["error"] for a in got[1:3])
        assert "not valid JSON" in got[4]["error"]  # exactly at the limit: read, and answered as the bad JSON it is
    finally:
        agent.max_request_bytes = agent_limit


def release(tmp_path, board, **keys):
    """A deployed release's layout: model/ with board.toml beside it."""
    root = tmp_path / "release"
    shutil.copytree(SHIPPED, root / "model")
    text = (Path(__file__).resolve().parents[1] / "boards" / f"{board}.toml").read_text()
    for k, v in keys.items():
        text = re.sub(rf"(?m)^{k}\s*=.*$", f"{k} = {v}", text)
    (root / "board.toml").write_text(text)
    return root / "model"


def test_image_limits_come_from_the_release_board(tmp_path):
    from edgemeta.errors import EdgemetaError
    from edgemeta.preprocess import ImageLimits
    from edgemeta.runtime.agent import Agent
    from edgemeta.runtime.fewshot import FewShotRuntime
    from edgemeta.runtime.store import STORE_FILE

    model = release(tmp_path, "rpi-zero2w", max_image_pixels=10_000)  # a 105x105 drawing is 11025 pixels
    rt = FewShotRuntime(model)
    with pytest.raises(EdgemetaError, match="more than the limit of"):
        rt.images([PNG])
    a = Agent(model, tmp_path / "store")
    got = check_answer(a.answer_line(request_line("enroll", {"label": "a"}, [PNG])))
    assert not got["ok"] and "more than the limit of" in got["error"] and "max_image_pixels" in got["error"], got
    assert not (tmp_path / "store" / STORE_FILE).exists()
    r = cli("enroll", "--store", str(tmp_path / "cli"), "--model", str(model), "--label", "a", str(PNG))
    assert one_line_error(r) and "more than the limit of" in r.stderr, r.stderr
    assert rt.limits.max_pixels == 10_000 and rt.limits.max_bytes == 24 * 2**20
    assert a.decode_slots == 1  # 512 MB
    assert Agent(release(tmp_path / "big", "rpi5"), tmp_path / "s5").decode_slots == 2
    assert FewShotRuntime(SHIPPED).limits == ImageLimits.default()  # no board.toml beside models/omniglot-conv4


def test_an_attachment_is_held_to_the_byte_limit_before_it_is_base64_decoded(tmp_path):
    from edgemeta.runtime.agent import Agent

    a = Agent(release(tmp_path, "rpi4", max_image_bytes=1000), tmp_path / "store")
    over = json.dumps({"id": 1, "op": "classify", "attachments": ["!" * 1400]}).encode()  # not even base64
    got = check_answer(a.answer_line(over))
    assert "over 1000 bytes" in got["error"] and "max_image_bytes" in got["error"], got
    under = json.dumps({"id": 1, "op": "classify", "attachments": ["!" * 1332]}).encode()  # 1332 chars: up to 999 bytes
    assert "not valid base64" in check_answer(a.answer_line(under))["error"]


def big_png(side=4000):
    a = np.full((side, side), 255, np.uint8)
    a[::50, :] = 0
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_a_large_request_does_not_stall_small_ones(tmp_path):
    sock = tmp_path / "agent.sock"
    big = tmp_path / "big.png"
    big.write_bytes(big_png())  # 16 megapixels in 25 KB: a slow decode in a small request
    proc = start_agent(SHIPPED, tmp_path / "store", "--socket", str(sock))
    try:
        assert cli("remote", "--via", f"unix:{sock}", "enroll", "--label", "a", str(PNG)).returncode == 0
        done = {}

        def large():
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(str(sock))
                c.sendall(request_line("enroll", {"label": "big"}, [big] * 30))
                c.settimeout(300)
                done["answer"] = json.loads(c.makefile("rb").readline())
            done["t"] = time.monotonic()

        small_line = request_line("classify", {}, [PNG])
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(sock))
            f = c.makefile("rwb")
            t = threading.Thread(target=large)
            t0 = time.monotonic()
            t.start()
            stamps = [t0]
            while t.is_alive():
                f.write(small_line)
                f.flush()
                assert json.loads(f.readline())["ok"]
                stamps.append(time.monotonic())
            t.join()
        assert done["answer"]["ok"], done
        during = [s for s in stamps if s < done["t"]]
        gaps = np.diff(during + [done["t"]])  # before: no small answer from the moment the large one took the lock
        took = done["t"] - t0
        assert took > 1.0, took  # the large request is slow enough to tell
        assert len(during) > 5 and gaps.max() < took / 3, (took, len(during), gaps.max())
    finally:
        stop(proc)


def peak_rss_mb(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status)[1]) / 1024 for k in ("VmRSS", "VmHWM")}


def test_concurrent_large_requests_are_read_one_at_a_time(tmp_path):
    sock = tmp_path / "agent.sock"
    proc = start_agent(SHIPPED, tmp_path / "store", "--socket", str(sock))
    try:
        assert cli("remote", "--via", f"unix:{sock}", "status").returncode == 0
        base = peak_rss_mb(proc.pid)["VmHWM"]
        line = request_line("classify", {}, []).replace(b'"attachments": []',
                                                        b'"attachments": ["' + base64.b64encode(os.urandom(30 * 2**20)) + b'"]')
        got = []

        def send():
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(str(sock))
                c.sendall(line)
                c.settimeout(300)
                got.append(json.loads(c.makefile("rb").readline()))

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 4 and all("cannot read image attachment 1" in a["error"] for a in got), got
        grown = peak_rss_mb(proc.pid)["VmHWM"] - base
        assert grown < 150, grown  # one 40 MB line at a time (four at once, before: ~450 MB)
        assert peak_rss_mb(proc.pid)["VmRSS"] - base < 30  # and given back afterwards
    finally:
        stop(proc)
