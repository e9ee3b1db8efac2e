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


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "omniglot-conv4"


def test_adapt_op_and_classify_with_the_stores_head(tmp_path):
    import base64

    from edgemeta.runtime.agent import Agent
    from edgemeta.runtime.classifier import FewShotRuntime
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
