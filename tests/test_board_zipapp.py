"""The board-side operations as deploy uploads them: one zip application (edgemeta.deploy.board_ops),
built the same byte for byte from the same sources, that runs on an interpreter with nothing
installed and imports nothing but the standard library and the edgemeta modules it carries."""

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile

from edgemeta.deploy import board_ops

# RFC 8032, section 7.1, TEST 1: a public key a signer can have
KEY = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


def bare(*args: str, env: dict | None = None, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """python -I -S ARGS with a clean environment: no site-packages, no PYTHONPATH, no user site, so
    only the standard library and what the zip application holds can be imported."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
    return subprocess.run([sys.executable, "-I", "-S", *args], input=stdin, capture_output=True, timeout=120, env=clean)


def answer(p: subprocess.CompletedProcess) -> dict:
    lines = p.stdout.decode().strip().splitlines()
    assert p.stderr == b"" and len(lines) == 1, (p.stdout, p.stderr)  # one JSON line, no traceback
    return json.loads(lines[0])


def test_the_zip_application_is_the_same_bytes_for_the_same_sources():
    data = board_ops.zipapp_bytes()
    code = "from edgemeta.deploy.board_ops import zipapp_bytes; import hashlib; print(hashlib.sha256(zipapp_bytes()).hexdigest())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert other == hashlib.sha256(data).hexdigest()  # built again, in another process
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        entries = z.infolist()
    names = [e.filename for e in entries]
    assert names == sorted(names) and "__main__.py" in names and "edgemeta/deploy/board/commands.py" in names
    assert all(n == "__main__.py" or n.startswith("edgemeta/") and n.endswith(".py") for n in names), names  # sources only
    assert {e.date_time for e in entries} == {board_ops.FIXED_TIME}


def test_its_commands_run_with_the_standard_library_alone(tmp_path):
    ops = str(board_ops.zipapp_file())
    env = {"EDGEMETA_ROOT": str(tmp_path / "board"), "HOME": str(tmp_path)}
    for args in ([], ["--help"], ["health", "../x"], ["trust", "xyz"]):
        p = bare(ops, *args, env=env)
        assert p.returncode == 2 and answer(p)["error"].startswith(("usage: ", "invalid release id")), (args, p.stdout)
    p = bare(ops, "preflight", env=env)
    assert p.returncode == 0 and answer(p)["releases"] == [] and answer(p)["root"] == env["EDGEMETA_ROOT"]
    p = bare(ops, "trust", KEY, env=env)  # under the board lock, written by the shared edgemeta.atomic
    assert p.returncode == 0 and answer(p)["trusted"] == board_ops.fingerprint(bytes.fromhex(KEY)), p.stdout
    p = bare(ops, "status", env=env)
    assert p.returncode == 0 and answer(p)["trusted_keys"] == [board_ops.fingerprint(bytes.fromhex(KEY))], p.stdout
    p = bare(ops, "receive", "r1", env=env, stdin=b"not a tar stream")
    assert p.returncode == 3 and "not a tar stream" in answer(p)["error"]
    assert os.listdir(tmp_path / "board" / "releases") == []


def test_it_imports_nothing_but_the_standard_library_and_what_it_carries():
    ops = str(board_ops.zipapp_file())
    code = ("import json, sys; sys.path.insert(0, sys.argv[1])\n"
            "for m in ('base', 'commands', 'ed25519', 'lifecycle', 'lock', 'receive', 'releases', 'service', 'stores', 'trust'):\n"
            "    __import__('edgemeta.deploy.board.' + m)\n"
            "print(json.dumps({'path': sys.path, 'modules': {n: getattr(m, '__file__', None) for n, m in sys.modules.items()\n"
            "                  if n.split('.')[0] not in sys.stdlib_module_names and n not in sys.builtin_module_names}}))")
    p = bare("-c", code, ops)
    assert p.returncode == 0, p.stderr
    seen = json.loads(p.stdout)
    assert not [x for x in seen["path"] if "site-packages" in x], seen["path"]
    outside = {n: f for n, f in seen["modules"].items() if not (n.split(".")[0] == "edgemeta" and f.startswith(ops + os.sep))}
    assert outside == {"__main__": None}, outside  # (the -c code itself)
    with zipfile.ZipFile(ops) as z:
        carried = {n.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for n in z.namelist() if n != "__main__.py"}
    assert set(seen["modules"]) - {"__main__"} <= carried
