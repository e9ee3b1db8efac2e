"""Meta-SGD.

Li, Zhou, Chen and Li (2017), "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning". MAML
whose inner learning rate is a learned array the shape of each adapted variable: the update
direction and size per parameter, ``theta' = theta - alpha * grad``, with ``alpha`` meta-learned
alongside ``theta``. One inner step in training and at test, as in the paper; ``alpha`` starts
uniform in [0.005, 0.1] (the paper's initialisation).
"""

from __future__ import annotations

import tensorflow as tf

from edgemeta.host.methods.gradient import GradientMethod
from edgemeta.host.methods.params import MetaSGDParams


class MetaSGD(GradientMethod):
    name = "metasgd"
    Params = MetaSGDParams
    adapts_body = True
    per_parameter_rates = True

    def _build_rates(self) -> list:
        p = self.params
        return [tf.Variable(tf.random.uniform(shape, p.rate_init_low, p.rate_init_high), name=f"alpha_{i}")
                for i, shape in enumerate(self._adapted_shapes())]
