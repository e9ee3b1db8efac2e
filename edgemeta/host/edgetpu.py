"""Edge TPU: will this model map, and compiling it when the compiler is here.

`edgetpu_compiler` (Coral, x86-64 Debian/Ubuntu only) maps a full-integer, static-shape model's
supported ops to the Edge TPU; at the first op it cannot map, that op and everything after it
run on the CPU. `static_check` predicts that from the .tflite alone, so a model can be judged
on any machine; `compile_model` runs the real compiler when it is on PATH and reads its report,
which is the authority.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.tflite_info import read_structure

COMPILER = "edgetpu_compiler"
# Ops the Edge TPU runs (Coral's "TensorFlow models on the Edge TPU", supported operations table).
EDGETPU_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS", "FULLY_CONNECTED",
    "L2_NORMALIZATION", "LOGISTIC", "LSTM", "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU",
    "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUARED_DIFFERENCE", "SQUEEZE",
    "STRIDED_SLICE", "SUB", "SUM", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
})
INSTALL_HINT = ("edgetpu_compiler is not on PATH: on x86-64 Debian/Ubuntu add Coral's apt repository "
                "(coral.ai/docs/edgetpu/compiler) and `apt-get install edgetpu-compiler`, then run "
                "`edgemeta edgetpu MODEL_DIR` again, or compile by hand: edgetpu_compiler -s -o OUT int8_static.tflite")


@dataclass
class MappingReport:
    tpu_ops: int
    cpu_ops: int
    problems: list[str] = field(default_factory=list)   # why ops stay on the CPU
    table: list[tuple[str, int, str]] = field(default_factory=list)  # (op, count, status) as the compiler says
    source: str = "static check"

    @property
    def fully_mapped(self) -> bool:
        return self.cpu_ops == 0 and not self.problems


def static_check(path: str | Path) -> MappingReport:
    """Predict the mapping from the model file: quantisation, static shapes, supported ops in order."""
    s = read_structure(path)
    problems = []
    float_tensors = s.tensor_types.get("float32", 0) + s.tensor_types.get("float16", 0)
    if float_tensors:
        problems.append(f"{float_tensors} float tensors: the Edge TPU needs a full-integer (int8/uint8) model; "
                        "use the int8_static variant")
    if s.dynamic_tensors:
        problems.append(f"{s.dynamic_tensors} tensors with a dynamic (batch) dimension: the Edge TPU needs static "
                        "shapes; use the int8_static variant")
    first_bad = next((i for i, op in enumerate(s.op_sequence) if op not in EDGETPU_OPS), None)
    if first_bad is not None:
        problems.append(f"{s.op_sequence[first_bad]} is not supported: it and the {len(s.op_sequence) - first_bad - 1} "
                        "ops after it would run on the CPU")
    cpu = len(s.op_sequence) if (float_tensors or s.dynamic_tensors) else (
        0 if first_bad is None else len(s.op_sequence) - first_bad)
    table = [(op, s.op_counts[op], "supported" if op in EDGETPU_OPS else "not supported") for op in s.op_counts]
    return MappingReport(len(s.op_sequence) - cpu, cpu, problems, table)


_ROW = re.compile(r"^([A-Z0-9_]+)\s+(\d+)\s+(\S.*?)\s*$")


def parse_compiler_report(text: str) -> MappingReport:
    """Read edgetpu_compiler -s output: the Operator / Count / Status table."""
    table, in_table = [], False
    for line in text.splitlines():
        if re.match(r"^Operator\s+Count\s+Status", line):
            in_table = True
            continue
        m = _ROW.match(line) if in_table else None
        if m:
            table.append((m.group(1), int(m.group(2)), m.group(3)))
    if not table:
        raise EdgemetaError("could not read the Edge TPU compiler's report (no Operator/Count/Status table); "
                            "run edgetpu_compiler -s by hand to see what it says")
    tpu = sum(n for _, n, status in table if status == "Mapped to Edge TPU")
    cpu = sum(n for _, n, status in table if status != "Mapped to Edge TPU")
    problems = [f"{op} x{n}: {status}" for op, n, status in table if status != "Mapped to Edge TPU"]
    return MappingReport(tpu, cpu, problems, table, source="edgetpu_compiler")


def compile_model(path: str | Path, out_dir: str | Path, allow_cpu_ops: bool = False, timeout: int = 600) -> tuple[Path, MappingReport]:
    """Run edgetpu_compiler on a full-integer static model; fail when ops stay on the CPU unless allowed."""
    exe = shutil.which(COMPILER)
    if not exe:
        raise EdgemetaError(INSTALL_HINT)
    path, out_dir = Path(path), Path(out_dir)
    proc = subprocess.run([exe, "-s", "-o", str(out_dir), str(path)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EdgemetaError(f"edgetpu_compiler failed on {path.name}: {last[0][:300]}")
    report = parse_compiler_report(proc.stdout)
    compiled = out_dir / f"{path.stem}_edgetpu.tflite"
    if not compiled.is_file():
        raise EdgemetaError(f"edgetpu_compiler did not write {compiled}")
    if not report.fully_mapped and not allow_cpu_ops:
        raise EdgemetaError(f"{report.cpu_ops} op(s) would run on the CPU ({'; '.join(report.problems)[:300]}); "
                            "change the model or pass --allow-cpu-ops")
    return compiled, report


def map_model(model_dir: str | Path, allow_cpu_ops: bool = False) -> dict:
    """`edgemeta edgetpu`: check that a model's int8_static variant maps to the Edge TPU (an error when
    it would not map fully, unless `allow_cpu_ops`) and, when the compiler is on PATH, compile it and
    record it as the model's edgetpu variant. Returns {model, source, tpu_ops, cpu_ops, problems,
    compiled} (compiled: the file, or None without the compiler)."""
    from edgemeta.runtime.manifest import read_manifest

    manifest = read_manifest(model_dir)
    source = manifest.model_path("int8_static")
    report = static_check(source)
    compiled = None
    if not report.fully_mapped and not allow_cpu_ops:
        raise EdgemetaError(f"{source.name} would not map fully to the Edge TPU: {'; '.join(report.problems)}")
    if shutil.which(COMPILER):
        compiled, report = compile_model(source, manifest.folder, allow_cpu_ops=allow_cpu_ops)
        from edgemeta.host.export import add_variant

        add_variant(manifest.folder, "edgetpu", compiled, quantization="int8", static_batch=1,
                    based_on="int8_static", extra={"edgetpu_ops": report.tpu_ops, "cpu_ops": report.cpu_ops})
    return {"model": str(source), "source": report.source, "tpu_ops": report.tpu_ops, "cpu_ops": report.cpu_ops,
            "problems": report.problems, "compiled": str(compiled) if compiled else None}
