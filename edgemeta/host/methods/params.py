"""Every method's parameters: the frozen dataclasses a config's [method] table is read into.

They live apart from the methods, which import TensorFlow, so that reading and checking a
configuration (`edgemeta train` on a board without TensorFlow says so only after the config is
read) never imports it. `PARAMS` names them; `methods/__init__.py` names the method classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgemeta.runtime.heads.linear import INITS


@dataclass(frozen=True)
class MethodParams:
    @property
    def limits(self) -> tuple[int, int] | None:
        """The most classes and shots per class the method reads (None: any number)."""
        return None


@dataclass(frozen=True)
class ProtoNetParams(MethodParams):
    teacher: str = ""          # a trained model folder to distil (empty: plain ProtoNet)
    distill: float = 0.5       # weight of the teacher's soft targets; the labels get 1 - distill
    temperature: float = 4.0   # softens both distributions (the distillation term is scaled by its square)
    # the board head's support views: an enrolled sample's embedding is the mean over it and four copies
    # moved by this many pixels (0: none); queries keep one view. The training loss ignores it (its
    # validation episodes enroll this way, as evaluation and the board do).
    support_shift: int = 0

    def __post_init__(self) -> None:
        if self.support_shift < 0:
            raise ValueError("support_shift must be 0 or more pixels")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError("distill must be in [0, 1]")
        if not self.temperature > 0.0:
            raise ValueError("temperature must be above 0")


@dataclass(frozen=True)
class MAMLParams(MethodParams):
    """MAML's, and the base of every gradient-based method's (methods/gradient.py; MAML++'s options)."""

    inner_lr: float = 0.4
    inner_steps: int = 1           # in training
    test_steps: int = 10           # at evaluation (and on the board)
    first_order: bool = False      # FOMAML
    head_init: str = "learned"     # learned (Finn), zero (Kao et al. 2022) or proto (proto-MAML)
    transductive: bool = False     # queries normalised with their own batch's statistics (the papers' code), not the support set's
    multi_step_loss: bool = False
    msl_episodes: int = 0          # anneal the multi-step loss weights to the last step over this many episodes (0: never)
    learn_inner_rates: bool = False
    first_order_episodes: int = 0
    per_step_bn: bool = False      # MAML++ BNWB: batch-norm scale/offset per inner step, meta-learned, not adapted

    def __post_init__(self) -> None:
        if not 0 < self.inner_lr <= 10:
            raise ValueError(f"inner_lr must be in (0, 10], got {self.inner_lr}")
        if not (1 <= self.inner_steps <= 50 and 0 <= self.test_steps <= 200):
            raise ValueError("inner_steps must be in [1, 50] and test_steps in [0, 200]")
        if self.head_init not in INITS:
            raise ValueError(f"head_init must be one of {', '.join(INITS)}, got {self.head_init!r}")
        if self.msl_episodes < 0 or self.first_order_episodes < 0:
            raise ValueError("msl_episodes and first_order_episodes must be >= 0")


@dataclass(frozen=True)
class ANILParams(MAMLParams):
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.per_step_bn:  # the body does not adapt, so there are no inner steps for batch norm to follow
            raise ValueError("per_step_bn needs a method that adapts the body (maml, metasgd), not anil")


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


@dataclass(frozen=True)
class SNAILParams(MethodParams):
    max_way: int = 20     # label channels: the most classes a model can read
    max_shot: int = 5     # samples per class; the board's sequence graph has max_way * max_shot positions
    min_way: int = 5      # with vary: the fewest classes a training episode draws
    vary: bool = True     # draw way and shot per training episode (one model for every setting)
    filters: int = 128    # a dense block's output channels (the paper's TC(T, 128))
    keys: int = 64        # the first attention block's key size; the paper's blocks are (k, k/2), (4k, 2k), (8k, 4k)

    def __post_init__(self):
        if not 2 <= self.max_way <= 1000:
            raise ValueError(f"max_way must be from 2 to 1000, got {self.max_way}")
        if not 1 <= self.max_shot <= 1000:
            raise ValueError(f"max_shot must be from 1 to 1000, got {self.max_shot}")
        if not 2 <= self.min_way <= self.max_way:
            raise ValueError(f"min_way must be from 2 to max_way ({self.max_way}), got {self.min_way}")
        if self.max_way * self.max_shot > 4096:
            raise ValueError(f"max_way * max_shot must be at most 4096 support positions, got {self.max_way * self.max_shot}")
        if not 1 <= self.filters <= 4096 or not 2 <= self.keys <= 4096 or self.keys % 2:
            raise ValueError(f"filters must be from 1 to 4096 and keys an even number from 2 to 4096, "
                             f"got {self.filters} and {self.keys}")

    @property
    def limits(self) -> tuple[int, int]:
        return self.max_way, self.max_shot


PARAMS: dict[str, type[MethodParams]] = {"protonet": ProtoNetParams, "maml": MAMLParams, "anil": ANILParams,
                                         "metasgd": MetaSGDParams, "snail": SNAILParams}
