"""SNAIL, the model-based family: the cached support prefix, the padded board graphs, the board runtime
over an exported model, and the limits of its sequence graphs."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.heads.sequence import arrange, pad_support
from tests.support.builders import SNAIL_TINY

DIM = 64


@pytest.fixture(scope="module")
def snail():
    import keras

    from edgemeta.host.backbones import build_backbone
    from edgemeta.host.methods import get_method

    keras.utils.set_random_seed(0)
    method = get_method("snail", SNAIL_TINY)
    method.build(build_backbone("conv4", (28, 28, 1)), 5)
    return method


def support_set(rng, classes=4, shots=(2, 1, 2, 1)):
    labels = np.repeat(np.arange(classes), shots[:classes])
    return rng.normal(size=(len(labels), DIM)).astype(np.float32), labels, rng.normal(size=(6, DIM)).astype(np.float32)


def test_the_default_blocks_are_the_papers_omniglot_blocks():
    from edgemeta.host.methods.snail import SNAILParams, layout

    blocks = layout(SNAILParams())  # 20-way 5-shot: T = 101, so 7 dense blocks per TC block
    attention = [b for b in blocks if b[0] == "attention"]
    assert attention == [("attention", 64, 32), ("attention", 256, 128), ("attention", 512, 256)]
    dense = [b for b in blocks if b[0] == "dense"]
    assert [d for _, d, _ in dense] == [1, 2, 4, 8, 16, 32, 64] * 2 and {f for *_, f in dense} == {128}
    assert blocks.index(attention[1]) == 8  # attention, TC, attention, TC, attention


def test_queries_after_the_cached_prefix_answer_as_one_full_sequence_per_query(snail):
    """Each query is the next position after the same support prefix: the same logits as running the
    prefix over [support; that query] and reading its last position."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    emb, labels, queries = support_set(rng)
    batched = snail.sequence_logits(tf.constant(emb), tf.constant(labels), tf.constant(queries)).numpy()
    x = np.concatenate([emb, np.eye(5, dtype=np.float32)[labels]], axis=1)
    for i, q in enumerate(queries):
        full = np.concatenate([x, np.concatenate([q, np.zeros(5, np.float32)])[None]])
        features = snail.prefix(tf.constant(full), tf.ones([len(full)]), [-1e9] * snail.attention_blocks)
        last = (features[-1:] @ snail.out_w + snail.out_b).numpy()[0]
        np.testing.assert_allclose(batched[i], last, rtol=1e-4, atol=1e-5)
    # and a query never sees another query: asked alone, it gets the same answer
    alone = snail.sequence_logits(tf.constant(emb), tf.constant(labels), tf.constant(queries[2:3])).numpy()
    np.testing.assert_allclose(alone[0], batched[2], rtol=1e-4, atol=1e-5)


def test_the_padded_board_functions_answer_as_the_unpadded_sequence(snail):
    """The board's fixed-size graphs: padding on the left, zeroed and never attended, changes nothing."""
    rng = np.random.default_rng(2)
    prefix, query = snail.board_functions([-1e9] * snail.attention_blocks)
    for classes, shots in ((2, (1, 1)), (4, (2, 1, 2, 1)), (5, (2, 2, 2, 2, 2))):
        emb, labels, queries = support_set(rng, classes, shots)
        x, valid = pad_support(emb, labels, 5, 2)
        assert valid.sum() == len(labels) and not x[valid == 0].any()
        board = query(np.concatenate([queries, np.zeros((6, 5), np.float32)], 1), prefix(x, valid), valid).numpy()
        np.testing.assert_allclose(board[:, :classes], snail.classify(emb, labels, queries, classes), rtol=1e-4, atol=1e-5)


def test_the_support_order_is_a_fixed_shuffle_not_the_enrollment_order():
    emb = np.arange(20, dtype=np.float32)[:, None].repeat(3, 1)
    labels = np.repeat(np.arange(4), 5)
    x, lab = arrange(emb, labels)
    assert not np.array_equal(lab, labels)
    order = x[:, 0].astype(int)  # each row is still its own sample with its own label
    assert sorted(order.tolist()) == list(range(20)) and np.array_equal(lab, labels[order])
    x2, lab2 = arrange(emb, labels)
    assert np.array_equal(x, x2) and np.array_equal(lab, lab2)  # the same on every call: host and board agree


def test_training_episodes_draw_their_own_way_and_shot(snail):
    """With vary, each episode index draws its way from min_way..way and its shot from 1..shot; without, the
    episode is used whole."""
    from edgemeta.host.methods import get_method

    draws = {tuple(int(v) for v in snail.draw(5, 2, i)) for i in range(60)}
    assert {n for n, _ in draws} == {2, 3, 4, 5} and {k for _, k in draws} == {1, 2}
    assert draws == {tuple(int(v) for v in snail.draw(5, 2, i)) for i in range(60)}  # seeded by the index
    fixed = get_method("snail", {**SNAIL_TINY, "vary": False})
    assert {tuple(int(v) for v in fixed.draw(5, 2, i)) for i in range(10)} == {(5, 2)}


def test_bad_snail_parameters_are_one_line_each():
    from edgemeta.host.methods import get_method

    for params, says in (({"max_way": 1}, "max_way"), ({"min_way": 30}, "min_way"), ({"keys": 3}, "keys"),
                         ({"max_shot": "5"}, "must be an integer"), ({"max_way": 100, "max_shot": 100}, "4096"),
                         ({"width": 2}, "unknown key 'width'")):
        with pytest.raises(EdgemetaError, match=says):
            get_method("snail", params)


def test_an_exported_snail_answers_on_the_board_as_its_graphs_and_the_host_do(snail_exported, sample_dir, tmp_path):
    from edgemeta.host.data import DatasetSpec, EpisodeSampler, load_dataset
    from edgemeta.host.modeldir import load_keras, read_info
    from edgemeta.runtime.fewshot import FewShotRuntime
    from edgemeta.runtime.heads.sequence import SequenceGraphs
    from edgemeta.runtime.manifest import read_manifest

    manifest = read_manifest(snail_exported)
    assert manifest.head.kind == "sequence" and manifest.head.sequence.max_way == 5
    head = manifest.raw["head"]
    assert set(head["graphs"]) == {"float32", "int8"} and len(head["masks"]) == 3
    assert "sequence model" in manifest.raw["evaluation"]["head"]
    for quant in ("float32", "int8"):  # int8 inside, float at the edges
        ops = head["graphs"][quant]["prefix"]["ops"]
        assert {"BATCH_MATMUL", "SOFTMAX", "TANH", "LOGISTIC", "PAD"} <= set(ops)

    split = load_dataset(DatasetSpec(kind="folder", root=str(sample_dir), fractions=(0.0, 0.0, 1.0)),
                         read_info(snail_exported).preprocess, ("test",))["test"]
    ep = EpisodeSampler(split, 4, 2, 3, seed=5).episode(0)
    names = [f"c{i}" for i in range(4)]
    host = read_info(snail_exported).make_method(snail_exported, load_keras(snail_exported / "model.keras"))
    for variant, quant in (("int8_static", "int8"), ("float32", "float32")):
        rt = FewShotRuntime(snail_exported, variant=variant)
        store = tmp_path / variant
        for i, label in enumerate(names):
            rt.enroll_images(store, label, ep.support[ep.support_labels == i])
        answers = rt.classify_embeddings(rt.open_store(store), rt.embedder(ep.query), top_k=4)
        s = rt.open_store(store)
        graphs = SequenceGraphs(*manifest.sequence_paths(variant), DIM, 5, 2)
        scores = graphs.scores(s.embeddings, s.labels, rt.embedder(ep.query), 4)
        assert [a["top"][0]["label"] for a in answers] == [names[i] for i in scores.argmax(1)]
        assert all(abs(sum(t["probability"] for t in a["top"]) - 1) < 1e-5 for a in answers)
        if quant == "float32":  # the float graphs are the host's TensorFlow sequence model, padded
            np.testing.assert_allclose(scores, host.classify(s.embeddings, s.labels, rt.embedder(ep.query), 4),
                                       rtol=1e-3, atol=1e-3)
        assert rt.describe_head(s)["kind"] == "sequence"


def test_a_store_past_the_sequence_graphs_limits_is_refused_and_left_as_it_was(snail_exported, sample_dir, tmp_path):
    from edgemeta.runtime.fewshot import FewShotRuntime

    rt = FewShotRuntime(snail_exported)
    chars = sorted(p for p in sample_dir.iterdir() if p.is_dir())
    store = tmp_path / "s"
    for c in chars[:5]:
        rt.enroll(store, c.name, sorted(c.glob("*.png"))[:2])
    before = {f.name: f.read_bytes() for f in store.iterdir()}
    with pytest.raises(EdgemetaError, match="at most 5 classes"):
        rt.enroll(store, chars[5].name, sorted(chars[5].glob("*.png"))[:1])
    with pytest.raises(EdgemetaError, match="at most 2 samples per class"):
        rt.enroll(store, chars[0].name, sorted(chars[0].glob("*.png"))[2:3])
    with pytest.raises(EdgemetaError, match="head adaptation is for prototype and linear heads"):
        rt.adapt(store, steps=5)
    assert {f.name: f.read_bytes() for f in store.iterdir()} == before

    # through the CLI: one line, exit 2, the store untouched
    p = subprocess.run([sys.executable, "-m", "edgemeta", "enroll", "--store", str(store), "--model", str(snail_exported),
                        "--label", chars[6].name, str(sorted(chars[6].glob("*.png"))[0])], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "at most 5 classes" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert {f.name: f.read_bytes() for f in store.iterdir()} == before
    p = subprocess.run([sys.executable, "-m", "edgemeta", "classify", "--store", str(store), "--model", str(snail_exported),
                        "--json", str(sorted(chars[2].glob("*.png"))[5])], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)[0]["top"][0]["label"] in {c.name for c in chars[:5]}


def test_a_query_with_no_support_is_refused(snail_exported):
    from edgemeta.runtime.heads.sequence import SequenceGraphs
    from edgemeta.runtime.manifest import read_manifest

    graphs = SequenceGraphs(*read_manifest(snail_exported).sequence_paths(), DIM, 5, 2)
    with pytest.raises(EdgemetaError, match="needs a support set"):
        graphs.scores(np.zeros((0, DIM), np.float32), np.zeros(0, int), np.zeros((1, DIM), np.float32), 2)
    with pytest.raises(EdgemetaError, match="at most 5 classes"):
        graphs.scores(np.zeros((6, DIM), np.float32), np.arange(6), np.zeros((1, DIM), np.float32), 6)


def test_sequence_graphs_that_do_not_match_the_backbone_are_refused(snail_exported, tmp_path):
    from edgemeta.files import sha256_file
    from edgemeta.runtime.fewshot import FewShotRuntime

    bad = tmp_path / "m"
    shutil.copytree(snail_exported, bad)
    raw = json.loads((bad / "manifest.json").read_text())
    graphs = raw["head"]["graphs"]["int8"]
    # the query graph where the prefix graph belongs, with its checksum: shapes do not fit
    graphs["prefix"] = dict(graphs["query"])
    (bad / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EdgemetaError, match="do not match the model"):
        FewShotRuntime(bad)
    # a damaged graph file
    graphs["prefix"] = {"file": "sequence_prefix_int8.tflite", "sha256": sha256_file(bad / "sequence_prefix_int8.tflite")}
    (bad / "manifest.json").write_text(json.dumps(raw))
    FewShotRuntime(bad)
    (bad / "sequence_prefix_int8.tflite").write_bytes(b"damaged")
    with pytest.raises(EdgemetaError, match="checksum"):
        FewShotRuntime(bad)
    # and a manifest that says too much
    for change, says in ((lambda h: h.update(max_way=1), "max_way"), (lambda h: h["graphs"].update(fp16={}), "graphs"),
                         (lambda h: h["graphs"]["int8"].pop("query"), "query")):
        raw2 = json.loads((snail_exported / "manifest.json").read_text())
        change(raw2["head"])
        (bad / "manifest.json").write_text(json.dumps(raw2))
        with pytest.raises(EdgemetaError, match=says):
            FewShotRuntime(bad)


def test_a_bundle_carries_the_sequence_graphs_of_its_variant_only(snail_exported, sample_dir, tmp_path, monkeypatch):
    from edgemeta.deploy.bundle import build_bundle
    from edgemeta.runtime.fewshot import FewShotRuntime

    monkeypatch.setenv("HOME", str(tmp_path))  # the signing key made on first use lands here
    out = build_bundle("rpi5", snail_exported, tmp_path / "b")  # int8_static body: the int8 graphs
    model = out / "model"
    assert sorted(f.name for f in model.glob("*.tflite")) == ["int8_static.tflite", "sequence_prefix_int8.tflite",
                                                             "sequence_query_int8.tflite"]
    assert set(json.loads((model / "manifest.json").read_text())["head"]["graphs"]) == {"int8"}
    rt = FewShotRuntime(model)
    chars = sorted(p for p in sample_dir.iterdir() if p.is_dir())[:3]
    for c in chars:
        rt.enroll(tmp_path / "s", c.name, sorted(c.glob("*.png"))[:2])
    assert rt.classify(tmp_path / "s", [sorted(chars[1].glob("*.png"))[9]])[0]["top"][0]["label"] in {c.name for c in chars}


def test_eval_of_an_exported_variant_runs_the_board_sequence_graphs(snail_exported, sample_dir):
    from edgemeta.host.model_eval import evaluate_model_dir

    results, context, _, _ = evaluate_model_dir(str(snail_exported), folder=str(sample_dir), settings=((5, 1), (5, 5)),
                                                episodes=5, variant="int8_static")
    assert "int8 sequence graphs" in context["backend"]
    assert results[0].episodes == 5 and 0 <= results[0].accuracy <= 100
    assert results[1].episodes == 0 and "at most 5 classes x 2 shots" in results[1].note  # 5-shot: past the graphs
    host, context, _, _ = evaluate_model_dir(str(snail_exported), folder=str(sample_dir), settings=((5, 1),), episodes=5)
    assert context["backend"] == "keras (float32)" and host[0].episodes == 5
