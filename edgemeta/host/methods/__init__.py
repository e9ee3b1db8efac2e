"""Meta-learning algorithms, one per file, behind the `Method` protocol (`methods/base.py`).

An algorithm does not own the backbone: it is given one and says how an episode becomes a
loss (training) and how a support set becomes a classifier (evaluation, the board).

    metric:        protonet
    optimization:  maml (first_order = true: FOMAML; MAML++ options), anil, metasgd
    model:         snail
"""

from __future__ import annotations

from edgemeta.errors import EdgemetaError
from edgemeta.host.methods.anil import ANIL
from edgemeta.host.methods.base import Method, TaskEpisode, make_params
from edgemeta.host.methods.maml import MAML
from edgemeta.host.methods.metasgd import MetaSGD
from edgemeta.host.methods.protonet import ProtoNet
from edgemeta.host.methods.snail import SNAIL

METHODS: dict[str, type] = {m.name: m for m in (ProtoNet, MAML, ANIL, MetaSGD, SNAIL)}

__all__ = ["METHODS", "Method", "TaskEpisode", "get_method", "method_params"]


def method_class(name: str) -> type:
    if name not in METHODS:
        raise EdgemetaError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def method_params(name: str, values: dict | None = None):
    """The frozen Params of method `name` from a config's [method] table (without its `name` key)."""
    cls = method_class(name)
    return make_params(cls.Params, name, dict(values or {}))


def get_method(name: str, params: dict | None = None) -> Method:
    """A method by name with its parameters (a dict as in the config, or defaults)."""
    return method_class(name)(method_params(name, params))
