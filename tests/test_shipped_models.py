"""The models shipped in models/: complete, and their recorded figures are what the code measures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgemeta.files import sha256_file
from edgemeta.runtime.manifest import read_manifest

MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED = ["omniglot-vinyals-conv4", "omniglot-conv4"]


@pytest.mark.parametrize("name", SHIPPED)
def test_model_folder_is_complete(name):
    d = MODELS / name
    for f in ("config.toml", "model.keras", "model.json", "history.csv", "curve.png", "eval.md", "eval.json",
              "manifest.json", "export.md"):
        assert (d / f).is_file(), f"{name}/{f} is missing"
    m = read_manifest(d)
    for v in m.variants.values():
        assert sha256_file(d / v.file) == v.sha256
    info = json.loads((d / "model.json").read_text())
    assert info["training"]["episodes"] > 1000 and info["training"]["wall_time_s"] > 0 and "cores" in info["training"]["machine"]
    ev = json.loads((d / "eval.json").read_text())
    assert [r["setting"] for r in ev["results"]] == ["5w1s", "5w5s", "20w1s", "20w5s"]
    assert all(r["episodes"] == 1000 and r["query"] == 15 for r in ev["results"])


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_recorded_int8_figures_are_reproduced(name, omniglot_dir):
    """Re-measure 5-way 1-shot and 20-way 1-shot through the int8 model and the manifest's head: the manifest
    must say the same."""
    from edgemeta.host.data import DatasetSpec, load_dataset
    from edgemeta.host.evaluate import evaluate, query_and_support
    from edgemeta.host.methods.protonet import ProtoNet
    from edgemeta.runtime.interpreter import Embedder

    m = read_manifest(MODELS / name)
    d = m.raw["source"]["data"]
    split = load_dataset(DatasetSpec(root=str(omniglot_dir), split=d["split"], rotations=d["rotations"]), m.preprocess, ("test",))["test"]
    embed = Embedder(m.model_path("int8_static"), threads=2)
    emb, support = query_and_support(embed, split, m.head.support_shift)  # enrolled as the board enrolls them
    results = evaluate(embed, ProtoNet().classify, split, ((5, 1), (20, 1)), episodes=1000, seed=0, embeddings=emb,
                       support_embeddings=support)
    recorded = {r["setting"]: r for r in m.raw["variants"]["int8_static"]["evaluation"]}
    for r in results:
        assert r.accuracy == pytest.approx(recorded[f"{r.way}w{r.shot}s"]["accuracy"], abs=0.01)
    # the goal: quantisation costs at most 0.3 points against the float Keras model on the same episodes
    float20 = next(r for r in m.raw["evaluation"]["keras_float32"] if r["setting"] == "20w1s")["accuracy"]
    assert recorded["20w1s"]["accuracy"] >= float20 - 0.3


def test_the_readme_demo_on_the_default_model():
    p = subprocess.run([sys.executable, "-m", "edgemeta", "demo", "--episodes", "3", "--json"], capture_output=True, text=True,
                       cwd=MODELS.parent)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["model"] == "omniglot-conv4" and s["way"] == 20 and s["shot"] == 1 and s["accuracy"] > 85


@pytest.mark.slow
def test_the_shipped_snail_model_answers_on_the_board_as_recorded(omniglot_dir):
    """The model-based family's shipped model: its board files are all there (the float32 sequence graphs are
    left out of git: `edgemeta export` writes them), and its int8 board path gives the recorded 5w1s figure."""
    from edgemeta.host.data import DatasetSpec, load_dataset
    from edgemeta.host.evaluate import evaluate
    from edgemeta.runtime.heads.sequence import SequenceGraphs
    from edgemeta.runtime.interpreter import Embedder

    d = MODELS / "omniglot-vinyals-snail"
    m = read_manifest(d)
    assert m.head.kind == "sequence" and (m.head.sequence.max_way, m.head.sequence.max_shot) == (20, 5)
    for name in ("int8_static", "int8"):
        assert sha256_file(d / m.variants[name].file) == m.variants[name].sha256
    graphs = SequenceGraphs(*m.sequence_paths("int8_static"), m.embedding_dim, 20, 5, threads=2)  # checksums checked
    info = json.loads((d / "model.json").read_text())
    assert info["training"]["episodes"] > 10000 and info["algorithm"] == "snail"
    src = m.raw["source"]["data"]
    split = load_dataset(DatasetSpec(root=str(omniglot_dir), split=src["split"], rotations=src["rotations"]), m.preprocess,
                         ("test",))["test"]
    # 5w1s alone: the same 1000 seeded episodes as the record; 20w1s costs four times as much per episode on the
    # sequence graphs (the CI's largest test), and the same graphs answer both
    results = evaluate(Embedder(m.model_path("int8_static"), threads=2), graphs.scores, split, ((5, 1),),
                       episodes=1000, seed=0)
    recorded = {r["setting"]: r for r in m.raw["variants"]["int8_static"]["evaluation"]}
    for r in results:
        assert r.accuracy == pytest.approx(recorded[f"{r.way}w{r.shot}s"]["accuracy"], abs=0.01)
