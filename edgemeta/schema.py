"""Typed reading of the documents edgemeta trusts: manifests, store metadata and their arrays, and (`table`)
the flat tables of training configurations and method parameters.

Every value the runtime takes from a manifest.json, a head.npz or a store.npz comes out through a
getter here that checks its type, shape and range, so a damaged or hand-edited file is refused as
it is read, with one line that names the file and the field and says what to do:

    models/x/manifest.json: preprocess.invert must be a boolean, got "false"; re-export the model

The standard library and numpy only (this runs on the board). JSON is taken as Python's json gives
it: a bool is never an integer here, an integer is a number, and NaN / Infinity (which json.loads
accepts) are never numbers.

>>> doc = Doc("manifest.json", "re-export the model")
>>> Obj(doc, {"image_size": 28}).get("image_size", int, min=8)
28
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from typing import Any

import numpy as np

from edgemeta.errors import EdgemetaError

MAX_EMBEDDING_DIM = 65536  # far above any board model's: a manifest or store saying more is damaged
# The largest magnitude of an embedding or head value: squared distances and logits of larger ones lose
# all float32 precision or overflow to inf (and answers become NaN), so a file holding one is damaged.
MAX_ABS_VALUE = 1e6
REQUIRED: Any = object()  # the default of a getter: the key must be there
_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object",
          list: "a list"}
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_ARRAY_KINDS = {"float": ("f",), "int": ("i", "u"), "str": ("U",), "uint8": ("u",)}


def show(value: Any, limit: int = 60) -> str:
    """A value as it would be written in JSON, cut short: what a message quotes after "got"."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Doc:
    """One document being read: its name (the file, as the user gave it) and what fixes a bad one."""

    def __init__(self, name: str, fix: str):
        self.name, self.fix = name, fix

    def error(self, field: str, problem: str) -> EdgemetaError:
        where = f"{self.name}: " if self.name else ""
        return EdgemetaError(f"{where}{field} {problem}; {self.fix}")


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


class Obj:
    """A JSON object inside a document, at `where` (a dotted path, "" for the top), read key by key."""

    def __init__(self, doc: Doc, value: Any, where: str = ""):
        if not isinstance(value, dict):
            raise doc.error(where or "the document", f"must be an object, got {show(value)}")
        self.doc, self.raw, self.where = doc, value, where

    def path(self, key: str) -> str:
        """The dotted path of `key`; a key that is not a plain name (a variant's, from the file) is quoted,
        so that a message stays one readable line."""
        key = key if _PLAIN_KEY.fullmatch(key) else show(key)
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type, *, default: Any = REQUIRED, nullable: bool = False, min: float | None = None,
            max: float | None = None, choices: tuple | None = None) -> Any:
        """The value at `key`, of `kind` (bool, int, float, str, dict or list) and within min/max/choices.
        A missing key gives `default` (REQUIRED: an error); with `nullable`, null is allowed and gives None.
        A float comes back as a float (JSON's 2 is a number too)."""
        if key not in self.raw:
            if default is REQUIRED:
                raise self.doc.error(self.path(key), "is missing")
            return default
        value = self.raw[key]
        if value is None and nullable:
            return None
        if choices is not None and not (value in choices and _is(value, kind)):
            raise self.doc.error(self.path(key), f"must be one of {', '.join(map(show, choices))}, got {show(value)}")
        want = _KINDS[kind] + (" or null" if nullable else "")
        if not _is(value, kind):
            finite = " (finite)" if kind is float and isinstance(value, float) else ""
            raise self.doc.error(self.path(key), f"must be {want}{finite}, got {show(value)}")
        if kind is str and not value:
            raise self.doc.error(self.path(key), "must not be empty")
        if (min is not None and value < min) or (max is not None and value > max):
            span = (f"from {min} to {max}" if min is not None and max is not None
                    else f"at least {min}" if min is not None else f"at most {max}")
            raise self.doc.error(self.path(key), f"must be {_KINDS[kind]} {span}, got {show(value)}")
        return float(value) if kind is float else value

    def obj(self, key: str, *, default: Any = REQUIRED) -> Obj | None:
        """The object at `key` (a missing key gives `default`, e.g. None for an optional section)."""
        if key not in self.raw:
            if default is REQUIRED:
                raise self.doc.error(self.path(key), "is missing")
            return default
        return Obj(self.doc, self.raw[key], self.path(key))

    def file_name(self, key: str) -> str:
        """A file name beside the document: never a path (a manifest names its files, it cannot point elsewhere)."""
        name = self.get(key, str)
        if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            raise self.doc.error(self.path(key), f"must be a file name beside the manifest, got {show(name)}")
        return name


def array(doc: Doc, name: str, a: Any, kind: str, shape: tuple[int | None, ...], *, finite: bool = False) -> np.ndarray:
    """`a` as a numpy array of `kind` ("float", "int", "str" or "uint8") and `shape` (None: any length
    on that axis); with `finite`, NaN, infinities and values beyond ±MAX_ABS_VALUE are refused.
    Returned as given, not converted."""
    if not isinstance(a, np.ndarray):
        raise doc.error(name, "is missing")
    ok_kind = a.dtype.kind in _ARRAY_KINDS[kind] and (kind != "uint8" or a.dtype.itemsize == 1)
    ok_shape = a.ndim == len(shape) and all(want is None or got == want for got, want in zip(a.shape, shape, strict=True))
    if not (ok_kind and ok_shape):
        dims = ", ".join("n" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "")
        article = "an" if kind == "int" else "a"
        raise doc.error(name, f"must be {article} {kind} array of shape ({dims}), got {a.dtype} {a.shape}")
    if finite and not np.isfinite(a).all():
        raise doc.error(name, "must be finite, got NaN or infinity")
    biggest = float(np.abs(a).max()) if finite and a.size else 0.0  # float: a float16 array cannot hold the limit
    if biggest > MAX_ABS_VALUE:
        raise doc.error(name, f"must hold values within ±{MAX_ABS_VALUE:g}, got {biggest:g}")
    return a


def table(cls: type, values: Any, where: str) -> Any:
    """The dataclass `cls` from a flat table (a TOML section, a method's keys), `where` naming it in messages
    ("[train]", "[method] for maml"). Unknown keys are refused with the known ones listed; each value must be
    of its field's type as this module reads JSON (a bool is never a number, an integer is a number): bool,
    int, float, str, a list of strings or a tuple of numbers. Ranges, and whether a float must be finite, are
    the dataclass's own checks (its __post_init__); a ValueError or TypeError there is one line too."""
    if not isinstance(values, dict):
        raise EdgemetaError(f"{where} must be a table of keys, got {show(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise EdgemetaError(f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(fields) or '(none)'}")
    hints = typing.get_type_hints(cls)
    typed = {key: _table_value(hints[key], key, value, where) for key, value in values.items()}
    try:
        return cls(**typed)
    except (TypeError, ValueError) as e:
        raise EdgemetaError(f"{where}: {e}") from None


def _table_value(hint: Any, key: str, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (bool, int, float, str):
        if hint is float:  # NaN and infinities are floats here: whether the field takes them is its own check
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = _is(value, hint)
        if not ok:
            raise EdgemetaError(f"{key} in {where} must be {_KINDS[hint]}, got {show(value)}")
        return float(value) if hint is float else value
    if origin is list and args == (str,):
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise EdgemetaError(f"{key} in {where} must be a list of strings, got {show(value)}")
        return list(value)
    if origin is tuple:
        fixed = args and args[-1] is not Ellipsis
        if not (isinstance(value, (list, tuple)) and all(_is(v, float) for v in value)
                and (not fixed or len(value) == len(args))):
            size = f"{len(args)} " if fixed else ""
            raise EdgemetaError(f"{key} in {where} must be a list of {size}finite numbers, got {show(value)}")
        return tuple(float(v) for v in value)
    raise TypeError(f"schema.table cannot read a field of type {hint!r} ({key} in {where})")  # a bug, not the user's
