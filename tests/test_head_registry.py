"""The head registry (runtime/heads/): a head kind edgemeta does not ship, written in one file and
registered there (tests/support/nearest_sample_head.py), is read from a manifest, carried by a bundle and
classifies a store, with no other file changed."""

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import tests.support.nearest_sample_head as plugin  # the whole kind: registered on import
from edgemeta.errors import EdgemetaError
from edgemeta.runtime import heads

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "omniglot-conv4"
SAMPLE = REPO / "samples" / "omniglot"
CHARS = ["Keble_character01", "Keble_character05", "Tengwar_character03"]


def drawings(char, numbers):
    files = sorted((SAMPLE / char).glob("*.png"))
    return [str(files[i - 1]) for i in numbers]


def model_with_the_new_head(dst: Path, temperature: float = 0.5) -> Path:
    """The shipped model, its manifest's head section and file written by the new kind."""
    shutil.copytree(SHIPPED, dst)
    head = plugin.NearestSample("squared_euclidean", temperature)
    raw = json.loads((dst / "manifest.json").read_text())
    raw["head"] = head.to_manifest() | head.write(dst, None)
    (dst / "manifest.json").write_text(json.dumps(raw))
    return dst


def test_no_file_of_edgemeta_names_the_new_kind():
    assert plugin.NearestSample.kind in heads.kinds() and heads.kind(plugin.NearestSample.kind) is plugin.NearestSample
    assert not [p for p in (REPO / "edgemeta").rglob("*.py") if plugin.NearestSample.kind in p.read_text()]
    with pytest.raises(ValueError, match="registered already"):  # a kind string is one kind
        heads.register(type("Other", (plugin.NearestSample,), {}))


def test_a_new_head_kind_is_read_carried_by_a_bundle_and_classifies(tmp_path, monkeypatch):
    from edgemeta.cli import describe_head
    from edgemeta.deploy.bundle import build_bundle
    from edgemeta.runtime.fewshot import FewShotRuntime
    from edgemeta.runtime.manifest import read_manifest

    model = model_with_the_new_head(tmp_path / "m")
    m = read_manifest(model)
    assert isinstance(m.head, plugin.NearestSample) and m.head.temperature == 0.5 and m.head.support_shift == 0

    # the bundle carries the kind's file (checksummed in BUNDLE.json) and its manifest section
    monkeypatch.setenv("HOME", str(tmp_path))  # the signing key made on first use lands here
    out = build_bundle("rpi5", model, tmp_path / "b")
    info = json.loads((out / "BUNDLE.json").read_text())
    assert f"model/{plugin.FILE}" in info["files"] and (out / "model" / plugin.FILE).is_file()
    assert json.loads((out / "model" / "manifest.json").read_text())["head"] == json.loads(
        (model / "manifest.json").read_text())["head"]
    with zipfile.ZipFile(next((out / "wheels").glob("edgemeta-*.whl"))) as wheel:  # the board gets the heads package
        assert {f"edgemeta/runtime/heads/{k}.py" for k in ("__init__", "common", "prototype", "linear", "sequence")} \
            <= set(wheel.namelist())

    # the bundle's model enrolls and classifies with the new head: the nearest sample ranks the classes,
    # the nearest prototype decides "unknown" as in every kind
    rt = FewShotRuntime(out / "model")
    store = tmp_path / "s"
    for c in CHARS:
        rt.enroll(store, c, drawings(c, [1, 2, 3]))
    queries = [f for c in CHARS for f in drawings(c, [11, 12])]
    got = rt.classify(store, queries, top_k=3)
    s = rt.open_store(store)
    emb = rt.embedder(rt.images(queries)[0])
    cost = plugin.nearest_per_class("squared_euclidean", s.embeddings, s.labels, emb, 3)
    assert [[t["label"] for t in r["top"]] for r in got] == [[s.class_names[i] for i in np.argsort(row)] for row in cost]
    prob = np.exp(-cost / 0.5 + (cost / 0.5).min(axis=1, keepdims=True))
    assert [r["top"][0]["probability"] for r in got] == pytest.approx(list(prob.max(axis=1) / prob.sum(axis=1)), rel=1e-5)
    assert all(r["distance"] == min(t["distance"] for t in r["top"]) for r in got)  # the prototypes' distance
    assert sum(r["label"] == c for r, c in zip(got, [c for c in CHARS for _ in range(2)], strict=True)) >= 4
    rt.threshold_of_model = 1e-9  # nothing is near enough
    assert {r["label"] for r in rt.classify(store, queries)} == {"unknown"}

    # it describes itself, and a store's head adaptation is refused: this kind does not adapt
    assert rt.describe_head(s) == {"kind": plugin.NearestSample.kind, "temperature": 0.5}
    assert describe_head(rt.describe_head(s)) == "nearest enrolled sample, temperature 0.5"
    before = (store / "store.npz").read_bytes()
    with pytest.raises(EdgemetaError, match="does not adapt on the board: head adaptation is for prototype and linear"):
        rt.adapt(store, 5)
    assert (store / "store.npz").read_bytes() == before


def test_the_new_kinds_file_is_checked_as_the_manifest_is_read(tmp_path):
    from edgemeta.runtime.manifest import read_manifest

    model = model_with_the_new_head(tmp_path / "m")
    (model / plugin.FILE).write_text(json.dumps({"temperature": 9.0}))
    with pytest.raises(EdgemetaError, match="does not match its manifest checksum"):
        read_manifest(model)
    raw = json.loads((model / "manifest.json").read_text())
    raw["head"]["kind"] = "nearest_samples"
    (model / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EdgemetaError, match="unknown head kind 'nearest_samples'.*knows prototype, linear, sequence, nearest_sample"):
        read_manifest(model)
