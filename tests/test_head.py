import numpy as np
import pytest

from edgemeta.runtime.heads.common import PrototypeHead, cosine_distance, prototypes, squared_euclidean
from edgemeta.runtime.heads.linear import LinearHead, LinearHeadSpec, adapt_linear


def test_prototypes_are_class_means():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    labels = rng.integers(0, 5, 50)
    want = np.stack([emb[labels == c].mean(0) for c in range(5)])
    np.testing.assert_allclose(prototypes(emb, labels, 5), want, rtol=1e-5, atol=1e-6)


def test_distances():
    q = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    p = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    np.testing.assert_allclose(squared_euclidean(q, p), [[0, 2], [5, 1]], atol=1e-6)
    np.testing.assert_allclose(cosine_distance(q, p), [[0, 1], [1, 0]], atol=1e-6)


def test_incremental_head_equals_batch_head():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(40, 6)).astype(np.float32)
    labels = np.repeat(np.arange(8), 5)
    names = [f"c{i}" for i in range(8)]
    batch = PrototypeHead.from_embeddings(emb, labels, names)
    inc = PrototypeHead(6)
    for i in rng.permutation(40):
        inc.add(names[labels[i]], emb[i:i + 1])
    inc_order = [inc.names.index(n) for n in names]
    np.testing.assert_allclose(inc.prototypes[inc_order], batch.prototypes, rtol=1e-5, atol=1e-6)
    q = rng.normal(size=(10, 6)).astype(np.float32)
    for a, b in zip(inc.classify(q, 3), batch.classify(q, 3), strict=True):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert [t["distance"] for t in a["top"]] == pytest.approx([t["distance"] for t in b["top"]], rel=1e-5)


def test_top_k_order_threshold_and_changes():
    head = PrototypeHead(2, threshold=0.5)
    head.add("a", np.array([[0.0, 0.0]]))
    head.add("b", np.array([[1.0, 0.0], [3.0, 0.0]]))  # prototype (2, 0)
    head.add("c", np.array([[0.0, 5.0]]))
    r = head.classify(np.array([[0.2, 0.0], [10.0, 10.0]], np.float32), top_k=3)
    assert [t["label"] for t in r[0]["top"]] == ["a", "b", "c"] and r[0]["label"] == "a" and r[0]["known"]
    assert r[0]["top"][0]["probability"] > r[0]["top"][1]["probability"] > r[0]["top"][2]["probability"]
    assert abs(sum(t["probability"] for t in r[0]["top"]) - 1) < 1e-6
    assert r[1]["label"] == "unknown" and not r[1]["known"]
    head.remove("a")
    head.rename("b", "bee")
    assert head.classify(np.array([[0.2, 0.0]], np.float32))[0]["top"][0]["label"] == "bee"


def three_classes(rng, n):
    """Classes told apart by a small shift along dim 1, while dim 0 is loud noise whose class means
    also differ: the prototypes' bisectors follow dim 0 and fail, a linear head can follow dim 1."""
    y = np.repeat(np.arange(3), n)
    x0 = rng.normal(size=3 * n) * 3 + np.array([0.0, 2.0, 4.0])[y]
    x1 = np.array([0.0, 1.0, 2.0])[y] + rng.normal(size=3 * n) * 0.1
    return np.stack([x0, x1, rng.normal(size=3 * n)], 1).astype(np.float32), y


def test_adaptation_helps_where_prototypes_are_a_poor_classifier():
    rng = np.random.default_rng(0)
    support, labels = three_classes(rng, 20)
    query, truth = three_classes(rng, 200)
    names = ["a", "b", "c"]
    protos = PrototypeHead.from_embeddings(support, labels, names)
    proto_acc = np.mean([names.index(r["label"]) for r in protos.classify(query)] == truth)
    w, b = adapt_linear(LinearHeadSpec(init="proto", steps=300, rates_w=[0.3], rates_b=[0.3]), support, labels, 3)
    adapted_acc = np.mean([names.index(r["label"]) for r in LinearHead(protos, w, b).classify(query)] == truth)
    assert proto_acc < 0.7 and adapted_acc > 0.9, (proto_acc, adapted_acc)


def test_zero_steps_from_the_prototypes_is_the_prototype_head():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(30, 8)).astype(np.float32)
    labels = np.repeat(np.arange(6), 5)
    protos = PrototypeHead.from_embeddings(emb, labels, [f"c{i}" for i in range(6)], threshold=9.0)
    w, b = adapt_linear(LinearHeadSpec(init="proto", steps=0, rates_w=[0.1], rates_b=[0.1]), emb, labels, 6)
    q = rng.normal(size=(40, 8)).astype(np.float32) * 1.5
    want, got = protos.classify(q, top_k=3), LinearHead(protos, w, b).classify(q, top_k=3)
    assert any(not r["known"] for r in want) and any(r["known"] for r in want)  # both sides of the threshold
    for a, g in zip(want, got, strict=True):
        assert (a["label"], a["known"]) == (g["label"], g["known"]) and a["distance"] == pytest.approx(g["distance"])
        assert [t["label"] for t in a["top"]] == [t["label"] for t in g["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in g["top"]], abs=1e-4)


def test_linear_head_ranks_by_logits_and_keeps_the_prototype_open_set_test():
    protos = PrototypeHead(2, threshold=1.0)
    protos.add("a", np.array([[0.0, 0.0]]))
    protos.add("b", np.array([[4.0, 0.0]]))
    head = LinearHead(protos, np.zeros((2, 2), np.float32), np.array([0.0, 3.0], np.float32))  # always "b"
    near_a, far = head.classify(np.array([[0.1, 0.0], [0.0, 9.0]], np.float32), top_k=2)
    assert near_a["label"] == "b" and near_a["known"] and near_a["distance"] == pytest.approx(0.01)
    assert [t["label"] for t in near_a["top"]] == ["b", "a"] and near_a["top"][0]["probability"] > 0.9
    assert near_a["top"][1]["distance"] == pytest.approx(0.01) and near_a["top"][0]["distance"] == pytest.approx(15.21)
    assert far["label"] == "unknown" and not far["known"] and far["top"][0]["label"] == "b"
    with pytest.raises(ValueError, match="does not fit"):
        LinearHead(protos, np.zeros((2, 3), np.float32), np.zeros(3, np.float32))
