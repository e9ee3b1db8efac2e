"""Edge TPU mapping. The real edgetpu_compiler cannot be installed here (Coral's apt repository is
out of reach), so the compiler path runs against a stand-in script that behaves like it (writes
<name>_edgetpu.tflite, prints an Operator/Count/Status report); the static check is real."""

import json
import os
import stat
import subprocess
import sys

import pytest

from edgemeta.errors import EdgemetaError
from edgemeta.host.edgetpu import parse_compiler_report, static_check

REPORT = """Edge TPU Compiler version 16.0.0
Model compiled successfully in 100 ms.
Number of Edge TPU subgraphs: 1
Total number of operations: {total}

Operator                       Count      Status

CONV_2D                        4          Mapped to Edge TPU
MAX_POOL_2D                    4          Mapped to Edge TPU
{extra}"""


def test_static_check_of_each_variant(exported):
    assert static_check(exported / "int8_static.tflite").fully_mapped
    dynamic = static_check(exported / "int8.tflite")
    assert not dynamic.fully_mapped and any("dynamic" in p for p in dynamic.problems)
    assert any("float tensors" in p for p in static_check(exported / "float32.tflite").problems)


def test_parse_report():
    ok = parse_compiler_report(REPORT.format(total=9, extra="RESHAPE                        1          Mapped to Edge TPU\n"))
    assert ok.fully_mapped and ok.tpu_ops == 9
    row = "RESHAPE                        1          More than one subgraph is not supported\n"
    bad = parse_compiler_report(REPORT.format(total=9, extra=row))
    assert bad.cpu_ops == 1 and "RESHAPE x1: More than one subgraph is not supported" in bad.problems
    with pytest.raises(EdgemetaError, match="could not read"):
        parse_compiler_report("Internal compiler error. Aborting!")


def _stand_in_compiler(bindir, status):
    script = bindir / "edgetpu_compiler"
    script.write_text(f"""#!{sys.executable}
import shutil, sys, pathlib
out, model = pathlib.Path(sys.argv[sys.argv.index("-o") + 1]), pathlib.Path(sys.argv[-1])
shutil.copy(model, out / (model.stem + "_edgetpu.tflite"))
print({REPORT.format(total=9, extra="RESHAPE                        1          " + status + chr(10))!r})
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("status, code", [("Mapped to Edge TPU", 0), ("Operation is working on an unsupported data type", 2)])
def test_compile_with_a_compiler_on_path(exported, tmp_path, status, code):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(exported, model)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _stand_in_compiler(bindir, status)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "edgemeta", "edgetpu", str(model)], capture_output=True, text=True, env=env)
    assert proc.returncode == code, proc.stderr
    manifest = json.loads((model / "manifest.json").read_text())
    if code == 0:
        assert manifest["variants"]["edgetpu"]["file"] == "int8_static_edgetpu.tflite" and "compiled:" in proc.stdout
    else:
        assert "edgetpu" not in manifest["variants"] and "would run on the CPU" in proc.stderr
        ok = subprocess.run([sys.executable, "-m", "edgemeta", "edgetpu", str(model), "--allow-cpu-ops"], env=env)
        assert ok.returncode == 0


def test_without_a_compiler_says_how(exported):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    proc = subprocess.run([sys.executable, "-m", "edgemeta", "edgetpu", str(exported)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "9 op(s) on the Edge TPU, 0 on the CPU" in proc.stdout
    assert "apt-get install edgetpu-compiler" in proc.stdout
