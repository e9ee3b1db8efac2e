"""Meta-SGD.

Li, Zhou, Chen and Li (2017), "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning". MAML
whose inner learning rate is a learned array the shape of each adapted variable: the update
direction and size per parameter, ``theta' = theta - alpha * grad``, with ``alpha`` meta-learned
alongside ``theta``. One inner step in training and at test, as in the paper; ``alpha`` starts
uniform in [0.005, 0.1] (the paper's initialisation).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgemeta.host.methods.maml import MAML, MAMLParams


@dataclass(frozen=True)
class MetaSGDParams(MAMLParams):
    inner_steps: int = 1
    test_steps: int = 1
    rate_init_low: float = 0.005
    rate_init_high: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.rate_init_low <= self.rate_init_high:
            raise ValueError("rate_init_low must be in [0, rate_init_high]")


class MetaSGD(MAML):
    name = "metasgd"
    Params = MetaSGDParams
    per_parameter_rates = True

    def _build_rates(self) -> list:
        import tensorflow as tf

        p = self.params
        return [tf.Variable(tf.random.uniform(shape, p.rate_init_low, p.rate_init_high), name=f"alpha_{i}")
                for i, shape in enumerate(self._adapted_shapes())]
