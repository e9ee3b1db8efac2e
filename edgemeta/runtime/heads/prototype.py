"""The nearest-prototype head (Prototypical Networks, Snell et al. 2017): a class is the mean of its
enrolled samples' embeddings, a query goes to the nearest one under the manifest's distance.

Manifest section: ``{"kind": "prototype", "distance": ..., "support_shift": 0}`` (``distance`` must be
the manifest's; format-1 manifests have no section and get this head). ``support_shift`` above 0
enrolls each sample as the mean over support views (heads/common.py). A store may adapt a linear head
over the prototypes (proto-MAML: heads/linear.py) with `edgemeta adapt`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.heads import PROTOTYPE, Head, ModelFacts, register
from edgemeta.runtime.heads.common import DISTANCES, prototypes, store_prototypes
from edgemeta.runtime.heads.linear import LinearHeadSpec, describe_adapted, over_prototypes

if TYPE_CHECKING:
    from edgemeta.runtime.heads.common import Classifier
    from edgemeta.runtime.store import EnrollmentStore
    from edgemeta.schema import Obj

# Proto-MAML's rate for prototype models. A step moves the logits by about lr * |x|^2 times the
# support residual (at most 1); |x|^2 is 85-113 on the shipped models, so 0.01 moves them by at most
# about one unit per step, a small step next to their logit gaps. On samples/omniglot (int8, 10 steps)
# 0.01 costs nothing, 0.1 about 0.1 point at 5 and 10 shots, 1.0 from 0.3 to 1.5 points.
DEFAULT_PROTO_LR = 0.01


@register
@dataclass(frozen=True)
class Prototype(Head):
    kind = PROTOTYPE
    adapts = True
    default_rate = DEFAULT_PROTO_LR

    distance: str
    support_shift: int = 0
    method: str | None = None

    @classmethod
    def read(cls, section: Obj | None, facts: ModelFacts) -> Prototype:
        if section is None:
            return cls(facts.distance)
        if section.get("distance", str, default=facts.distance) != facts.distance:
            raise EdgemetaError(f"{facts.path}: head distance {section.raw['distance']!r} disagrees with the manifest's "
                                f"{facts.distance!r}; re-export the model")
        shift = section.get("support_shift", int, default=0, min=0, max=facts.input_side // 4)
        method = section.raw.get("method")
        return cls(facts.distance, shift, method if isinstance(method, str) else None)

    def to_manifest(self) -> dict:
        return ({"kind": self.kind, "distance": self.distance} | ({"method": self.method} if self.method else {})
                | ({"support_shift": self.support_shift} if self.support_shift else {}))

    def linear_head(self, adapt: tuple[int, float | None] | None) -> LinearHeadSpec | None:
        if adapt is None:
            return None
        steps, lr = adapt
        lr = DEFAULT_PROTO_LR if lr is None else lr
        return LinearHeadSpec(init="proto", steps=steps, rates_w=[lr], rates_b=[lr])

    def build(self, store: EnrollmentStore, threshold: float | None) -> Classifier:
        return over_prototypes(store_prototypes(store, self.distance, threshold), store, self.store_linear_head(store))

    def describe(self, store: EnrollmentStore) -> dict:
        spec = self.store_linear_head(store)
        return {"kind": self.kind, "adapt": store.adapt} if spec is None else describe_adapted(spec, store)

    @staticmethod
    def text(d: dict) -> str:
        return "nearest prototype (no adaptation)"

    def scores(self, support: np.ndarray, labels: np.ndarray, queries: np.ndarray, way: int) -> np.ndarray:
        return -DISTANCES[self.distance](queries, prototypes(support, labels, way))

    def description(self) -> str:
        return "nearest prototype"
