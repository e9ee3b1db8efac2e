"""Meta-learning algorithms, one per file, over the `Method` base (`methods/base.py`).

An algorithm does not own the backbone: it is given one and says how an episode becomes a
loss (training) and how a support set becomes a classifier (evaluation, the board).

    metric:        protonet
    optimization:  maml (first_order = true: FOMAML; MAML++ options), anil, metasgd, over the
                   gradient-based engine (gradient.py)
    model:         snail

A method's module imports TensorFlow at its top and is imported only when the method is chosen
(`method_class`); the parameters (params.py) are read without it, so checking a configuration
never imports TensorFlow.
"""

from __future__ import annotations

from importlib import import_module

from edgemeta.errors import EdgemetaError
from edgemeta.host.methods.base import Method, TaskEpisode, make_params
from edgemeta.host.methods.params import PARAMS

# name -> (module under edgemeta.host.methods, class)
METHODS: dict[str, tuple[str, str]] = {"protonet": ("protonet", "ProtoNet"), "maml": ("maml", "MAML"),
                                       "anil": ("anil", "ANIL"), "metasgd": ("metasgd", "MetaSGD"),
                                       "snail": ("snail", "SNAIL")}

__all__ = ["METHODS", "Method", "TaskEpisode", "get_method", "method_class", "method_params", "restore_method"]


def _known(name: str) -> None:
    if name not in METHODS:
        raise EdgemetaError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")


def method_class(name: str) -> type[Method]:
    """The class of method `name`, its module imported now (TensorFlow with it)."""
    _known(name)
    module, cls = METHODS[name]
    return getattr(import_module(f"{__name__}.{module}"), cls)


def method_params(name: str, values: dict | None = None):
    """The frozen Params of method `name` from a config's [method] table (without its `name` key)."""
    _known(name)
    return make_params(PARAMS[name], name, dict(values or {}))


def get_method(name: str, params: dict | None = None) -> Method:
    """A method by name with its parameters (a dict as in the config, or defaults)."""
    return method_class(name)(method_params(name, params))


def restore_method(name: str, params: dict | None, backbone=None, arrays: dict | None = None, way: int = 5) -> Method:
    """A trained method: built over `backbone` (when given) for the way its learned `arrays` (what
    ``head_arrays`` returned, e.g. a model folder's method.npz) were trained with, and those restored."""
    method = get_method(name, params)
    if backbone is not None:
        arrays = arrays or {}
        method.build(backbone, arrays["w0"].shape[1] if "w0" in arrays else way)
        if arrays:
            method.load_head(arrays)
    return method
