"""ANIL: Almost No Inner Loop.

Raghu, Raghu, Bengio and Vinyals (2020), "Rapid Learning or Feature Reuse? Towards Understanding
the Effectiveness of MAML", ICLR. MAML whose inner loop adapts only the linear head; the body is
meta-trained through the outer loop alone. The body embeds each episode once, so a training
step costs about what a ProtoNet step costs, and evaluation is exactly the board's path: a
frozen embedding and the numpy head adapted over it (``edgemeta.runtime.linear_head``).
Hyperparameters are MAML's (the paper keeps them); options such as ``learn_inner_rates`` apply
to the head's two variables.
"""

from __future__ import annotations

from edgemeta.methods.base import TaskEpisode, accuracy, cross_entropy
from edgemeta.methods.maml import MAML, MAMLParams, _order


class ANIL(MAML):
    name = "anil"
    Params = MAMLParams
    adapts_body = False

    def _head_loop(self, emb_s, labels, way: int, steps: int, second_order):
        import tensorflow as tf

        w, b = self._initial_head(emb_s, labels, way)
        history = [[w, b]]
        for k in range(steps):
            with tf.GradientTape() as tape:
                tape.watch([w, b])
                loss = cross_entropy(emb_s @ w + b, labels)
            gw, gb = _order(tape.gradient(loss, [w, b]), second_order)
            w, b = w - self._rate(0, k, way) * gw, b - self._rate(1, k, way) * gb
            history.append([w, b])
        return history

    def episode_loss(self, episode: TaskEpisode, training: bool):
        import tensorflow as tf

        p = self.params
        n = tf.shape(episode.support)[0]
        # One forward pass over the episode, as ProtoNet's training does.
        emb = self.backbone(tf.concat([episode.support, episode.query], 0), training=training)
        emb_s, emb_q = emb[:n], emb[n:]
        history = self._head_loop(emb_s, episode.support_labels, episode.way, p.inner_steps, self._second_order(episode.progress))
        weights = self._step_weights(episode.progress)
        ks = range(1, p.inner_steps + 1) if p.multi_step_loss else [p.inner_steps]
        losses = []
        for k in ks:
            w, b = history[k]
            losses.append(weights[k - 1] * cross_entropy(emb_q @ w + b, episode.query_labels))
        return tf.add_n(losses), accuracy(emb_q @ w + b, episode.query_labels)
