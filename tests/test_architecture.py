"""The shape of the tree, checked: the layer rules (import-linter contracts in pyproject.toml), no import
circles, no file over 450 lines, and head kinds named only by runtime/heads/."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

from edgemeta.runtime import heads

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("edgemeta", "firmware_tools")
MAX_LINES = 450
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# String literals equal to a head kind that are not one: (file, the literal, why)
NOT_A_HEAD = {("edgemeta/host/backbones.py", "linear")}  # a Keras layer's activation


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, timeout=300)


def sources():
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def test_the_layer_contracts_hold():
    got = lint_imports(REPO)
    assert got.returncode == 0, got.stdout[-4000:] + got.stderr[-2000:]
    assert "0 broken" in got.stdout


def test_a_runtime_module_importing_the_host_breaks_the_contract(tmp_path):
    """The contract is not vacuous: one import of the host from the board's runtime (or of TensorFlow)
    fails it, naming the arrow."""
    for name in (*PACKAGES, "pyproject.toml"):
        src = REPO / name
        (shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, tmp_path / name))
    paths = tmp_path / "edgemeta" / "runtime" / "paths.py"
    paths.write_text(paths.read_text() + "\n\ndef _late():\n    import edgemeta.host.config  # noqa: F401\n")
    got = lint_imports(tmp_path)
    assert got.returncode != 0
    assert "edgemeta.runtime is not allowed to import edgemeta.host" in got.stdout
    assert "edgemeta.runtime.paths -> edgemeta.host.config" in got.stdout
    assert "not allowed to import tensorflow" in got.stdout  # host.config reaches it, as the second contract says


def test_no_module_imports_itself_round_a_circle():
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    circles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if module < imported and graph.chain_exists(imported=module, importer=imported):
                circles.append(f"{module} <-> {imported}: {' -> '.join(graph.find_shortest_chain(importer=imported, imported=module))}")
    assert not circles, "\n".join(circles)


def test_no_source_file_is_over_450_lines():
    long = [f"{p.relative_to(REPO)}: {n}" for p in sources() if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, long


def test_head_kinds_are_named_only_inside_runtime_heads():
    kinds = set(heads.kinds())
    assert {"prototype", "linear", "sequence"} <= kinds
    found = []
    for path in sources():
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("edgemeta/runtime/heads/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in kinds and (rel, node.value) not in NOT_A_HEAD:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, found
