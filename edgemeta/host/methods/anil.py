"""ANIL: Almost No Inner Loop.

Raghu, Raghu, Bengio and Vinyals (2020), "Rapid Learning or Feature Reuse? Towards Understanding
the Effectiveness of MAML", ICLR. MAML whose inner loop adapts only the linear head; the body is
meta-trained through the outer loop alone. The body embeds each episode once, so a training
step costs about what a ProtoNet step costs, and evaluation is exactly the board's path: a
frozen embedding and the numpy head adapted over it (``edgemeta.runtime.heads.linear``).
Hyperparameters are MAML's (the paper keeps them); options such as ``learn_inner_rates`` apply
to the head's two variables.
"""

from __future__ import annotations

import tensorflow as tf

from edgemeta.host.methods.base import TaskEpisode
from edgemeta.host.methods.gradient import GradientMethod
from edgemeta.host.methods.params import ANILParams


class ANIL(GradientMethod):
    name = "anil"
    Params = ANILParams
    adapts_body = False

    def _head_loop(self, emb_s, labels, way: int, steps: int, second_order) -> list:
        """The head's fast weights [w, b] after each inner step over fixed support embeddings."""
        w, b = self._initial_head(emb_s, labels, way)
        return self._adapt_steps([w, b], lambda f: emb_s @ f[0] + f[1], labels, way, steps, second_order)

    def episode_loss(self, episode: TaskEpisode, training: bool):
        n = tf.shape(episode.support)[0]
        # One forward pass over the episode, as ProtoNet's training does.
        emb = self.backbone(tf.concat([episode.support, episode.query], 0), training=training)
        emb_s, emb_q = emb[:n], emb[n:]
        history = self._head_loop(emb_s, episode.support_labels, episode.way, self.params.inner_steps,
                                  self._second_order(episode.progress))
        return self._query_loss(history, lambda f, last: emb_q @ f[0] + f[1], episode.query_labels, episode.progress)
