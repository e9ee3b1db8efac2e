"""A model-based head on the board: SNAIL's sequence graphs over the stored support embeddings.

The export writes two TFLite graphs of fixed shapes (host/methods/snail.py builds them):

    prefix(x (P, C0), valid (P,)) -> features (P, C)        the support sequence, once per store state
    query(xq (Q, C0), features (P, C), valid (P,)) -> logits (Q, max_way)   any number of queries

P = max_way * max_shot. A store's support (embedding + one-hot label, in a fixed seeded order,
the same on the host) fills the last positions; the first are padding: zeroed, and never read by
attention, so the answer is the unpadded sequence's. A store larger than the graph is refused
with the limit named, never answered from a cut sequence. numpy and the interpreter only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edgemeta.errors import EdgemetaError

ORDER_SEED = 0  # the support order the host evaluates and the board classifies with


def arrange(support_emb: np.ndarray, support_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The support samples and labels in the sequence's order: a fixed seeded shuffle, so that a
    store's enrollment order (class by class) is not an order the model never saw in training."""
    order = np.random.default_rng(ORDER_SEED).permutation(len(support_labels))
    return np.asarray(support_emb, np.float32)[order], np.asarray(support_labels)[order]


def pad_support(support_emb: np.ndarray, support_labels: np.ndarray, max_way: int, max_shot: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The prefix graph's input for a support set: (P, C0) sequence (embedding + one-hot label, in the
    `arrange` order, at the last positions) and its valid mask (P,), P = max_way * max_shot."""
    x, labels = arrange(support_emb, support_labels)
    n, positions, dim = len(labels), max_way * max_shot, x.shape[1]
    seq = np.zeros((positions, dim + max_way), np.float32)
    valid = np.zeros(positions, np.float32)
    seq[positions - n:, :dim] = x
    seq[np.arange(positions - n, positions), dim + labels] = 1.0
    valid[positions - n:] = 1.0
    return seq, valid


def check_limits(counts: list[int], max_way: int, max_shot: int) -> None:
    """Refuse a support set the sequence graph cannot read: more classes or more samples per class
    than it was exported for."""
    if len(counts) > max_way:
        raise EdgemetaError(f"this model's sequence head reads at most {max_way} classes, the store would have "
                            f"{len(counts)}; forget a class first, or use a prototype model for more classes")
    if counts and max(counts) > max_shot:
        raise EdgemetaError(f"this model's sequence head reads at most {max_shot} samples per class, a class would have "
                            f"{max(counts)}; forget that class and enroll it again with at most {max_shot} samples")


class SequenceGraphs:
    """The two graphs of one quantisation, loaded; `scores` answers queries after a support set.

    The prefix's features of the last support set are kept, so asking again after the same store
    costs the queries only."""

    def __init__(self, prefix: str | Path, query: str | Path, embedding_dim: int, max_way: int, max_shot: int,
                 threads: int = 1):
        from edgemeta.runtime.interpreter import open_interpreter

        self.dim, self.max_way, self.max_shot = embedding_dim, max_way, max_shot
        self.positions, c0 = max_way * max_shot, embedding_dim + max_way
        (_, self.prefix), (_, self.query) = open_interpreter(prefix, threads), open_interpreter(query, threads)
        p_in = {len(d["shape"]): d for d in self.prefix.get_input_details()}
        q_in = self.query.get_input_details()
        self._x, self._valid = p_in.get(2), p_in.get(1)
        self._xq = next((d for d in q_in if d["shape_signature"][0] == -1), None)
        self._features = next((d for d in q_in if len(d["shape"]) == 2 and d["shape_signature"][0] != -1), None)
        self._qvalid = next((d for d in q_in if len(d["shape"]) == 1), None)
        want = f"prefix ({self.positions}, {c0}) and ({self.positions},), query (n, {c0}), (P, C), ({self.positions},)"
        ok = (None not in (self._x, self._valid, self._xq, self._features, self._qvalid)
              and tuple(self._x["shape"]) == (self.positions, c0) and tuple(self._valid["shape"]) == (self.positions,)
              and int(self._xq["shape"][1]) == c0 and int(self._features["shape"][0]) == self.positions
              and tuple(self._qvalid["shape"]) == (self.positions,))
        if ok:
            out = self.prefix.get_output_details()[0]
            ok = tuple(out["shape"]) == tuple(self._features["shape"])
            ok = ok and int(self.query.get_output_details()[0]["shape"][-1]) == max_way
        if not ok:
            raise EdgemetaError(f"{Path(prefix).name} / {Path(query).name} do not match the model (embedding size {embedding_dim}, "
                                f"at most {max_way} classes x {max_shot} shots: inputs {want}); re-export the model")
        self._batch = int(self._xq["shape"][0])
        self._cached: tuple[str, np.ndarray] | None = None

    def features(self, support_emb: np.ndarray, support_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The prefix's features of a support set (kept for the next call with the same set) and its mask."""
        check_limits(np.bincount(support_labels).tolist() if len(support_labels) else [], self.max_way, self.max_shot)
        seq, valid = pad_support(support_emb, support_labels, self.max_way, self.max_shot)
        key = hashlib.sha256(seq.tobytes()).hexdigest()
        if self._cached is None or self._cached[0] != key:
            self.prefix.set_tensor(self._x["index"], seq)
            self.prefix.set_tensor(self._valid["index"], valid)
            self.prefix.invoke()
            self._cached = (key, self.prefix.get_tensor(self.prefix.get_output_details()[0]["index"]).copy())
        return self._cached[1], valid

    def scores(self, support_emb: np.ndarray, support_labels: np.ndarray, query_emb: np.ndarray, way: int,
               batch: int = 64) -> np.ndarray:
        """Logits (Q, way) of each query embedding after the support set (labels 0..way-1)."""
        if len(support_labels) == 0:
            raise EdgemetaError("a query needs a support set: enroll some classes first")
        if way > self.max_way:
            check_limits([1] * way, self.max_way, self.max_shot)
        features, valid = self.features(support_emb, support_labels)
        query_emb = np.asarray(query_emb, np.float32)
        out = np.empty((len(query_emb), way), np.float32)
        for i in range(0, len(query_emb), batch):
            chunk = query_emb[i:i + batch]
            xq = np.concatenate([chunk, np.zeros((len(chunk), self.max_way), np.float32)], axis=1)
            if len(chunk) != self._batch:
                self.query.resize_tensor_input(self._xq["index"], [len(chunk), xq.shape[1]])
                self.query.allocate_tensors()
                self._batch = len(chunk)
            self.query.set_tensor(self._xq["index"], xq)
            self.query.set_tensor(self._features["index"], features)
            self.query.set_tensor(self._qvalid["index"], valid)
            self.query.invoke()
            out[i:i + len(chunk)] = self.query.get_tensor(self.query.get_output_details()[0]["index"])[:, :way]
        return out


class SequenceHead:
    """A store's classes read by the sequence graphs; the nearest prototype still decides "unknown"
    (the open-set threshold is on prototype distance, as for the linear head)."""

    def __init__(self, protos, graphs: SequenceGraphs, embeddings: np.ndarray, labels: np.ndarray):
        self.protos, self.graphs, self.embeddings, self.labels = protos, graphs, embeddings, labels

    @property
    def names(self) -> list[str]:
        return self.protos.names

    def classify(self, queries: np.ndarray, top_k: int = 1, unknown: str = "unknown") -> list[dict]:
        """As PrototypeHead.classify, with classes ranked by the sequence model's logits."""
        from edgemeta.runtime.head import answers

        logits = self.graphs.scores(self.embeddings, self.labels, queries, len(self.names))
        return answers(self.names, -logits, self.protos.distances(queries), self.protos.threshold, top_k, unknown)
