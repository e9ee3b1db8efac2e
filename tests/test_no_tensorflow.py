"""The board side in an environment where TensorFlow is not installed at all."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgemeta.runtime.fewshot import FewShotRuntime

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def board_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with edgemeta[device] only: numpy, Pillow, click, LiteRT."""
    venv = tmp_path_factory.mktemp("board") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{REPO}[device]"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def test_tensorflow_is_really_absent(board_venv):
    proc = subprocess.run([str(board_venv / "bin" / "python"), "-c", "import tensorflow"], capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'tensorflow'" in proc.stderr
    proc = subprocess.run([str(board_venv / "bin" / "python"), "-c",
                           "import sys, edgemeta.cli, edgemeta.runtime.fewshot, edgemeta.runtime.interpreter as i;"
                           "print(i.interpreter_module()[0]); assert 'keras' not in sys.modules"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ai_edge_litert", proc.stderr


def test_enroll_and_classify_without_tensorflow(board_venv, exported, tmp_path):
    exe = str(board_venv / "bin" / "edgemeta")
    sample = REPO / "samples" / "omniglot"
    store = str(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for label in ("Keble_character01", "Tengwar_character02"):
        files = [str(p) for p in sorted((sample / label).glob("*.png"))[:3]]
        p = subprocess.run([exe, "enroll", "--store", store, "--model", str(exported), "--label", label, *files],
                           capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
    query = str(sorted((sample / "Keble_character01").glob("*.png"))[-1])
    p = subprocess.run([exe, "classify", "--store", store, "--json", "--top-k", "2", query], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    board = json.loads(p.stdout)[0]
    # the host (this process, whichever interpreter it has) gives the same answer from the same store
    host = FewShotRuntime(exported).classify(store, [query], top_k=2)[0]
    assert board["top"][0]["label"] == host["top"][0]["label"]
    assert abs(board["distance"] - host["distance"]) <= 1e-4 * max(1.0, host["distance"])
    # an adapted linear head, computed and saved on the board, answers as the host's from the same store
    p = subprocess.run([exe, "adapt", "--store", store, "--steps", "10", "--lr", "0.05"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "proto init, 10 step(s)" in p.stdout, p.stderr
    p = subprocess.run([exe, "classify", "--store", store, "--json", "--top-k", "2", query], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    board, host = json.loads(p.stdout)[0], FewShotRuntime(exported).classify(store, [query], top_k=2)[0]
    assert [t["label"] for t in board["top"]] == [t["label"] for t in host["top"]]
    assert abs(board["top"][0]["probability"] - host["top"][0]["probability"]) < 1e-4
    (tmp_path / "c.toml").write_text("[train]\nway = 5\n")
    p = subprocess.run([exe, "train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "needs TensorFlow" in p.stderr and "pip install 'edgemeta[host]'" in p.stderr


def test_demo_without_tensorflow(board_venv, exported):
    sample = REPO / "samples" / "omniglot"
    p = subprocess.run([str(board_venv / "bin" / "edgemeta"), "demo", "--model", str(exported), "--samples", str(sample),
                        "--way", "5", "--episodes", "2", "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["runtime"] == "ai_edge_litert" and s["queries"] == 2 * 5 * 19 and 20 < s["accuracy"] <= 100
    assert s["enroll_ms_per_class"] > 0 and s["classify_ms_per_image"] > 0


@pytest.fixture(scope="session")
def tflite_runtime_venv(tmp_path_factory) -> Path:
    """tflite-runtime 2.14 (the 32-bit Pi's runtime; x86-64 wheel here) with numpy < 2, no TensorFlow."""
    venv = tmp_path_factory.mktemp("tflite_rt") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = str(venv / "bin" / "pip")
    proc = subprocess.run([pip, "install", "-q", "tflite-runtime==2.14.0", "numpy<2", "pillow", "click", "tflite"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([pip, "install", "-q", "--no-deps", str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def test_board_op_tables_agree_with_a_real_tflite_runtime_2_14(tflite_runtime_venv, exported, tmp_path):
    """`inspect --board rpi3b-32bit` predicts what tflite-runtime 2.14 loads; load each variant to check."""
    from edgemeta.boards import load_board
    from edgemeta.runtime.tflite_info import read_structure

    board = load_board("rpi3b-32bit")
    py = str(tflite_runtime_venv / "bin" / "python")
    for variant in ("int8_static", "int8", "float32", "dynamic_range"):
        predicted_ok = not board.check_ops(read_structure(exported / f"{variant}.tflite").ops)
        code = ("import sys, numpy as np; from edgemeta.runtime.interpreter import Embedder;"
                f"e = Embedder({str(exported / (variant + '.tflite'))!r}, runtime='tflite_runtime');"
                "print(e(np.zeros((3, 28, 28, 1), np.uint8)).shape)")
        p = subprocess.run([py, "-c", code], capture_output=True, text=True)
        assert (p.returncode == 0) == predicted_ok, (variant, p.stderr[-500:])
        if predicted_ok:
            assert p.stdout.strip() == "(3, 64)"
    # and the whole enroll/classify path runs on that runtime
    exe = str(tflite_runtime_venv / "bin" / "edgemeta")
    env = {**os.environ, "EDGEMETA_RUNTIME": "tflite_runtime"}
    sample = REPO / "samples" / "omniglot" / "Keble_character01"
    files = [str(p) for p in sorted(sample.glob("*.png"))]
    p = subprocess.run([exe, "enroll", "--store", str(tmp_path / "s"), "--model", str(exported), "--label", "k1", *files[:2]],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([exe, "classify", "--store", str(tmp_path / "s"), "--json", files[5]], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and json.loads(p.stdout)[0]["top"][0]["label"] == "k1", p.stderr


@pytest.mark.parametrize("runtime", ["tflite_runtime", "ai_edge_litert"])
def test_snail_sequence_graphs_load_and_answer_on_both_board_runtimes(tflite_runtime_venv, board_venv, snail_exported,
                                                                     tmp_path, runtime):
    """The board profiles' op tables admit the sequence graphs, and each board runtime, without TensorFlow,
    gives the same logits as this host's interpreter on the same support set and queries."""
    import numpy as np

    from edgemeta.boards import load_board
    from edgemeta.runtime.heads.sequence import SequenceGraphs
    from edgemeta.runtime.manifest import read_manifest
    from edgemeta.runtime.tflite_info import read_structure

    manifest = read_manifest(snail_exported)
    for quant, board in (("int8", "rpi3b-32bit"), ("float32", "rpi3b-32bit"), ("int8", "rpi5")):
        for part in ("prefix", "query"):
            ops = read_structure(snail_exported / manifest.raw["head"]["graphs"][quant][part]["file"]).ops
            assert not load_board(board).check_ops(ops), (quant, part, board)
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 0, 1, 2, 3])
    np.savez(tmp_path / "in.npz", s=rng.normal(size=(7, 64)).astype(np.float32), l=labels,
             q=rng.normal(size=(9, 64)).astype(np.float32))
    here = SequenceGraphs(*manifest.sequence_paths(), 64, 5, 2)
    with np.load(tmp_path / "in.npz") as z:
        expected = here.scores(z["s"], z["l"], z["q"], 4)
    venv = tflite_runtime_venv if runtime == "tflite_runtime" else board_venv
    code = (f"import numpy as np, os; os.environ['EDGEMETA_RUNTIME'] = {runtime!r};"
            "from edgemeta.runtime.manifest import read_manifest; from edgemeta.runtime.heads.sequence import SequenceGraphs;"
            f"m = read_manifest({str(snail_exported)!r}); z = np.load({str(tmp_path / 'in.npz')!r});"
            "g = SequenceGraphs(*m.sequence_paths(), 64, 5, 2);"
            f"np.save({str(tmp_path / 'out.npy')!r}, g.scores(z['s'], z['l'], z['q'], 4))")
    p = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-1500:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-3, atol=0.05)
