"""SNAIL: a Simple Neural AttentIve meta-Learner, the model-based family.

Mishra, Rohaninejad, Chen and Abbeel (2018), "A Simple Neural Attentive Meta-Learner", ICLR.
The task is read as a sequence: each support image's embedding with its one-hot label, then the
query's embedding with zeros for its label; the network answers at the query's position. It
stacks the paper's Omniglot blocks over the Conv-4 embedding:

    attention(64, 32), TC(128), attention(256, 128), TC(128), attention(512, 256), 1x1 conv to N

A TC block is ceil(log2 T) dense blocks (T = N*K + 1) with dilations 1, 2, 4, ...: a kernel-2
causal convolution with a gated activation (tanh * sigmoid), its output concatenated to its input.
An attention block is causal soft attention (key size, value size), concatenated the same way.

Because the support prefix is causal and every block concatenates, the prefix's last feature
tensor holds every block's input at every support position. So many queries share one pass over
the support: each query is the next position after the same prefix (`query` below), which is the
same answer as running one sequence per query, at the cost of one position each.

One model serves every setting up to `max_way` classes of `max_shot` samples: with `vary`, each
training episode draws its way from `min_way`..way and its shot from 1..shot, and the support order
is shuffled per episode, so the model learns neither a length nor an order. On the board the
sequence graphs take exactly `max_way * max_shot` support positions, padded on the left with zeroed
positions that attention never reads (runtime/heads/sequence.py), which gives the unpadded answer.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from edgemeta.errors import EdgemetaError
from edgemeta.host.methods.base import Method, TaskEpisode
from edgemeta.host.methods.losses import accuracy, cross_entropy
from edgemeta.host.methods.params import SNAILParams
from edgemeta.runtime.heads.sequence import Sequence, SequenceSpec, arrange, pad_support

__all__ = ["SNAIL", "SNAILParams", "layout"]

TRAIN_MASK = -1e9  # the attention logit of a position a query may not read, in training (exact)


def layout(p: SNAILParams) -> list[tuple[str, int, int]]:
    """The blocks in order: ("attention", key size, value size) or ("dense", dilation, filters)."""
    dense = [("dense", 2**i, p.filters) for i in range(math.ceil(math.log2(p.max_way * p.max_shot + 1)))]
    k = p.keys
    return [("attention", k, k // 2), *dense, ("attention", 4 * k, 2 * k), *dense, ("attention", 8 * k, 4 * k)]


def added(block: tuple[str, int, int]) -> int:
    """Channels a block concatenates to its input."""
    return block[2]


def _gated(x, earlier, w: dict, width: int):
    """A dense block's new channels: the kernel-2 causal convolution of a position and its earlier one,
    through the gated activation tanh * sigmoid."""
    h = tf.matmul(x, w["wc"]) + tf.matmul(earlier, w["wp"]) + w["b"]
    return tf.tanh(h[:, :width]) * tf.sigmoid(h[:, width:])


def _masked(logits, readable, mask: float, record):
    """Attention logits with `mask` where `readable` is 0; `record` (a list, or None) gets the smallest
    readable logit."""
    if record is not None:
        record.append(tf.reduce_min(tf.where(readable > 0, logits, tf.reduce_max(logits))))
    return logits * readable + (1.0 - readable) * mask


class SNAIL(Method):
    name = "snail"
    family = "model"
    Params = SNAILParams
    distance = "squared_euclidean"  # the open-set test (nearest prototype) on the board

    def __init__(self, params: SNAILParams | None = None):
        super().__init__(params)
        self.blocks = layout(self.params)

    def build(self, backbone, way: int) -> None:
        if way > self.params.max_way:
            raise EdgemetaError(f"[train] way {way} is more than snail's [method] max_way {self.params.max_way}")
        self.backbone = backbone
        self.dim = int(backbone.output_shape[-1])
        init, zeros = keras.initializers.GlorotUniform(seed=0), keras.initializers.Zeros()

        def var(name, shape, initializer):
            return tf.Variable(initializer(shape), name=name, dtype=tf.float32)

        self.weights, c = [], self.input_channels
        for i, (kind, a, b) in enumerate(self.blocks):
            if kind == "dense":
                w = {"wc": var(f"b{i}_wc", (c, 2 * b), init), "wp": var(f"b{i}_wp", (c, 2 * b), init),
                     "b": var(f"b{i}_b", (2 * b,), zeros)}
            else:
                w = {f"w{n}": var(f"b{i}_w{n}", (c, a if n != "v" else b), init) for n in "qkv"}
                w |= {f"b{n}": var(f"b{i}_b{n}", (a if n != "v" else b,), zeros) for n in "qkv"}
            self.weights.append(w)
            c += added((kind, a, b))
        self.out_w, self.out_b = var("out_w", (c, self.params.max_way), init), var("out_b", (self.params.max_way,), zeros)
        self._tf_logits = None

    @property
    def input_channels(self) -> int:
        return self.dim + self.params.max_way

    @property
    def feature_channels(self) -> int:
        return self.input_channels + sum(added(b) for b in self.blocks)

    @property
    def attention_blocks(self) -> int:
        return sum(kind == "attention" for kind, _, _ in self.blocks)

    @property
    def variables(self) -> list:
        return [v for w in self.weights for v in w.values()] + [self.out_w, self.out_b]

    # --- the sequence model (TensorFlow), the same code in training and in the exported graphs ---

    def prefix(self, x, valid, masks, record=None):
        """Support sequence (P, C0) -> features (P, C): every block's output concatenated to its input.
        `valid` (P,): 1 for a support position, 0 for padding (zeroed at every block, never attended);
        `masks`: the logit of a position attention may not read, one per attention block; `record`: a
        list that gets each attention block's smallest readable logit (to choose the board's masks)."""
        n = tf.shape(x)[0]
        keep = valid[:, None]
        readable = tf.linalg.band_part(tf.ones([n, n]), -1, 0) * valid[None, :]  # causal, and not padding
        x, a = x * keep, 0
        for (kind, d, width), w in zip(self.blocks, self.weights, strict=True):
            if kind == "dense":
                new = _gated(x, tf.pad(x, [[d, 0], [0, 0]])[:n], w, width)  # and position t - d (zero before the start)
            else:
                q, k, v = (tf.matmul(x, w[f"w{c}"]) + w[f"b{c}"] for c in "qkv")
                logits = _masked(tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(d)), readable, masks[a], record)
                new = tf.matmul(tf.nn.softmax(logits, axis=-1), v)
                a += 1
            x = tf.concat([x, new], axis=1) * keep
        return x

    def query(self, xq, features, valid, masks, record=None):
        """Query inputs (Q, C0), each the next position after the support prefix whose `features`
        (P, C) `prefix` computed -> logits (Q, max_way)."""
        n, c, a = tf.shape(features)[0], self.input_channels, 0
        for (kind, d, width), w in zip(self.blocks, self.weights, strict=True):
            f = features[:, :c]  # the support's input to this block
            if kind == "dense":
                new = _gated(xq, tf.pad(f, [[d, 0], [0, 0]])[n:n + 1], w, width)  # support position n - d (zero before the start)
            else:
                q = tf.matmul(xq, w["wq"]) + w["bq"]
                k, v = tf.matmul(f, w["wk"]) + w["bk"], tf.matmul(f, w["wv"]) + w["bv"]
                own_k, own_v = tf.matmul(xq, w["wk"]) + w["bk"], tf.matmul(xq, w["wv"]) + w["bv"]
                scale = 1.0 / math.sqrt(d)
                logits = _masked(tf.matmul(q, k, transpose_b=True) * scale, valid[None, :], masks[a], record)
                own = tf.reduce_sum(q * own_k, axis=1, keepdims=True) * scale
                weights = tf.nn.softmax(tf.concat([logits, own], axis=1), axis=-1)
                new = tf.matmul(weights[:, :-1], v) + weights[:, -1:] * own_v
                a += 1
            xq, c = tf.concat([xq, new], axis=1), c + width
        return tf.matmul(xq, self.out_w) + self.out_b

    def sequence_logits(self, support_emb, support_labels, query_emb):
        """TensorFlow: logits (Q, max_way) of queries after a support sequence in the given order."""
        x = tf.concat([support_emb, tf.one_hot(support_labels, self.params.max_way, dtype=support_emb.dtype)], axis=1)
        xq = tf.concat([query_emb, tf.zeros([tf.shape(query_emb)[0], self.params.max_way], query_emb.dtype)], axis=1)
        valid = tf.ones([tf.shape(x)[0]])
        masks = [TRAIN_MASK] * self.attention_blocks
        return self.query(xq, self.prefix(x, valid, masks), valid, masks)

    @staticmethod
    def _seed(progress):
        return tf.stack([tf.constant(7, tf.int64), tf.cast(progress, tf.int64)])

    def draw(self, way: int, shot: int, progress):
        """The way and shot an episode of `way` x `shot` trains with: with vary, a seeded draw from its
        index (way from min_way..way, shot from 1..shot), else the whole episode."""
        if not self.params.vary:
            return tf.constant(way), tf.constant(shot)
        seed = self._seed(progress)
        return (tf.random.stateless_uniform([], seed, min(self.params.min_way, way), way + 1, dtype=tf.int32),
                tf.random.stateless_uniform([], seed + 1, 1, shot + 1, dtype=tf.int32))

    def episode_loss(self, episode: TaskEpisode, training: bool):
        way = episode.way
        shot = episode.support.shape[0] // way
        queries = episode.query.shape[0] // way
        seed = self._seed(episode.progress)
        n, k = self.draw(way, shot, episode.progress)
        image = episode.support.shape[1:]
        support = tf.reshape(tf.reshape(episode.support, [way, shot, *image])[:n, :k], [-1, *image])
        labels = tf.reshape(tf.tile(tf.range(n)[:, None], [1, k]), [-1])
        order = tf.argsort(tf.random.stateless_uniform([n * k], seed + 2))  # no order to learn
        support, labels = tf.gather(support, order), tf.gather(labels, order)
        query = tf.reshape(tf.reshape(episode.query, [way, queries, *image])[:n], [-1, *image])
        query_labels = tf.reshape(tf.tile(tf.range(n)[:, None], [1, queries]), [-1])
        emb = self.backbone(tf.concat([support, query], axis=0), training=training)
        logits = self.sequence_logits(emb[:n * k], labels, emb[n * k:])[:, :n]
        return cross_entropy(logits, query_labels), accuracy(logits, query_labels)

    def classify(self, support_emb: np.ndarray, support_labels: np.ndarray, query_emb: np.ndarray, way: int) -> np.ndarray:
        """The host's float path: the support in the board's fixed order, then the queries (TensorFlow)."""
        if self._tf_logits is None:
            self._tf_logits = tf.function(self.sequence_logits, reduce_retracing=True)
        x, labels = arrange(support_emb, support_labels)
        logits = self._tf_logits(tf.constant(x, tf.float32), tf.constant(labels, tf.int32), tf.constant(query_emb, tf.float32))
        return logits.numpy()[:, :way]

    def board_head(self) -> Sequence:
        """The sequence head; export writes its graphs with `board_graphs`."""
        p = self.params
        return Sequence(self.distance, SequenceSpec(self.name, p.max_way, p.max_shot, {}), make_graphs=self.board_graphs)

    def head_arrays(self) -> dict[str, np.ndarray]:
        return {v.name.split(":")[0]: v.numpy() for v in self.variables}

    def load_head(self, arrays: dict[str, np.ndarray]) -> None:
        for v in self.variables:
            v.assign(arrays[v.name.split(":")[0]])

    def board_functions(self, masks: list[float]):
        """The board's two graphs as tf.functions of fixed shapes (max_way * max_shot support positions):
        prefix(x, valid) -> features, and query(xq, features, valid) -> logits for any number of queries."""
        n, c0, c = self.params.max_way * self.params.max_shot, self.input_channels, self.feature_channels

        @tf.function(input_signature=[tf.TensorSpec([n, c0], tf.float32, name="x"), tf.TensorSpec([n], tf.float32, name="valid")])
        def prefix(x, valid):
            return self.prefix(x, valid, masks)

        @tf.function(input_signature=[tf.TensorSpec([None, c0], tf.float32, name="xq"),
                                      tf.TensorSpec([n, c], tf.float32, name="features"),
                                      tf.TensorSpec([n], tf.float32, name="valid")])
        def query(xq, features, valid):
            return self.query(xq, features, valid, masks)

        return prefix, query

    def calibration_sequences(self, embeddings: np.ndarray, labels: np.ndarray, episodes: int = 64, seed: int = 0):
        """Seeded support sets and queries from (training) embeddings, padded as the board pads them:
        [(x, valid, xq)], of every way from min_way to max_way and every shot up to max_shot."""
        rng, p = np.random.default_rng(seed), self.params
        by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
        by_class = [ix for ix in by_class if len(ix) > 1]
        out = []
        for _ in range(episodes):
            n = int(rng.integers(min(p.min_way, len(by_class)), min(p.max_way, len(by_class)) + 1))
            k = int(rng.integers(1, p.max_shot + 1))
            support, support_labels, queries = [], [], []
            for label, c in enumerate(rng.choice(len(by_class), n, replace=False)):
                pick = rng.choice(by_class[c], min(k + 1, len(by_class[c])), replace=False)
                support += list(pick[:-1])
                support_labels += [label] * (len(pick) - 1)
                queries.append(pick[-1])
            x, valid = pad_support(embeddings[support], np.asarray(support_labels), p.max_way, p.max_shot)
            xq = np.concatenate([embeddings[queries], np.zeros((len(queries), p.max_way), np.float32)], axis=1)
            out.append((x, valid, xq))
        return out

    def board_graphs(self, embeddings: np.ndarray, labels: np.ndarray, convert, episodes: int = 64,
                     seed: int = 0) -> tuple[dict[str, dict[str, bytes]], list[float]]:
        """The board's sequence graphs, {quantisation: {"prefix": bytes, "query": bytes}} for float32 and
        int8, and the attention masks they use. `convert(fn, quantisation, representative, owner)` makes
        .tflite bytes (host/export.py). A position attention may not read gets, instead of -infinity
        (which would leave int8 no resolution for the logits that count), a logit 12 below the
        smallest readable one seen on these sequences: e^-12 of weight, within int8's range."""
        sequences = self.calibration_sequences(embeddings, labels, episodes, seed)
        record: list = []
        train_masks = [TRAIN_MASK] * self.attention_blocks
        for x, valid, xq in sequences:
            features = self.prefix(tf.constant(x), tf.constant(valid), train_masks, record)
            self.query(tf.constant(xq), features, tf.constant(valid), train_masks, record)
        lows = np.array([float(r) for r in record]).reshape(len(sequences), 2, self.attention_blocks).min(axis=(0, 1))
        masks = [float(low) - 12.0 for low in lows]
        prefix, query = self.board_functions(masks)
        owner = tf.Module()
        owner.variables_ = self.variables
        features = [prefix(x, valid).numpy() for x, valid, _ in sequences]
        graphs = {}
        for quant in ("float32", "int8"):
            graphs[quant] = {
                "prefix": convert(prefix, quant, lambda: ({"x": x, "valid": valid} for x, valid, _ in sequences), owner),
                "query": convert(query, quant, lambda: ({"xq": xq, "features": f, "valid": valid}
                                                        for (_, valid, xq), f in zip(sequences, features, strict=True)), owner)}
        return graphs, masks
