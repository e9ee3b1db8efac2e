import numpy as np
import pytest

from edgemeta.runtime.head import PrototypeHead, cosine_distance, prototypes, squared_euclidean


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
