"""Prototypical Networks.

Snell, Swersky and Zemel (2017), "Prototypical Networks for Few-shot Learning", NeurIPS.
Each class is represented by the mean of its support embeddings (its prototype); a query is
classified by a softmax over negative squared Euclidean distances to the prototypes. Training
episodes use more classes than test episodes (e.g. 60-way for Omniglot), which the paper found
to help.
"""

from __future__ import annotations

import numpy as np

from edgemeta.runtime.head import prototypes, squared_euclidean


class ProtoNet:
    name = "protonet"
    distance = "squared_euclidean"

    def episode_loss(self, backbone, support, support_labels, query, query_labels, way: int, training: bool):
        import tensorflow as tf

        n_support = tf.shape(support)[0]
        # One forward pass over support and query together, as in the reference implementation,
        # so batch-norm statistics are computed over the whole episode.
        emb = backbone(tf.concat([support, query], axis=0), training=training)
        emb_s, emb_q = emb[:n_support], emb[n_support:]
        onehot = tf.one_hot(support_labels, way, dtype=emb.dtype)
        protos = tf.matmul(onehot, emb_s, transpose_a=True) / tf.reduce_sum(onehot, axis=0)[:, None]
        dist = (tf.reduce_sum(emb_q**2, axis=1, keepdims=True) + tf.reduce_sum(protos**2, axis=1)[None, :]
                - 2.0 * tf.matmul(emb_q, protos, transpose_b=True))
        logits = -dist
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=query_labels, logits=logits))
        acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), query_labels), tf.float32))
        return loss, acc

    def classify(self, support_emb: np.ndarray, support_labels: np.ndarray, query_emb: np.ndarray, way: int) -> np.ndarray:
        return -squared_euclidean(query_emb, prototypes(support_emb, support_labels, way))
