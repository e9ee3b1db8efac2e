"""The heads a model classifies with: one file per kind behind one protocol (`Head`), and their registry.

A model's manifest names its head in its ``head`` section, ``{"kind": ..., ...}`` (format 1 has no
section: the nearest prototype). Each kind is a `Head` subclass in a module of its own:

    prototype.py   the nearest prototype (ProtoNets), optionally enrolled with support views
    linear.py      a linear softmax head adapted on the support set (MAML, ANIL, Meta-SGD)
    sequence.py    a model-based head (SNAIL): two TFLite graphs that read the support set

and the kind says, for itself, everything the rest of edgemeta asks of a head (`Head` lists it): how
its manifest section is read and checked, which files beside the manifest a variant needs (what a
bundle carries), how export writes its section and files, how it is built from an enrollment store and
classifies with its "unknown" decision, and how it describes itself. Nothing outside this package
switches on a kind string: a new kind is one file and one registration,

>>> @register                                                 # doctest: +SKIP
... class Audio(Head):
...     kind = "audio"
...     ...

(the built-in kinds are registered by the table below and imported when a manifest first names one:
reading a prototype model never imports the sequence head). `common.py` holds what every kind
shares: distances, prototypes, support views, ranked answers and the nearest-prototype "unknown"
decision; `open_set.py` a store's own open-set threshold. numpy and the interpreter only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from edgemeta.errors import EdgemetaError

if TYPE_CHECKING:  # numpy too: the CLI reads PROTOTYPE from here without it
    import numpy as np

    from edgemeta.runtime.heads.common import Classifier
    from edgemeta.runtime.heads.linear import LinearHeadSpec
    from edgemeta.runtime.manifest import Variant
    from edgemeta.runtime.store import EnrollmentStore
    from edgemeta.schema import Obj

# The head of a manifest without a head section (format 1), the one every kind's "unknown" test uses,
# and the board head export may choose instead of a method's own.
PROTOTYPE = "prototype"
# Built-in kinds: the module that registers each, imported on first use.
_BUILTIN = {PROTOTYPE: "edgemeta.runtime.heads.prototype", "linear": "edgemeta.runtime.heads.linear",
            "sequence": "edgemeta.runtime.heads.sequence"}
_KINDS: dict[str, type[Head]] = {}

# (support embeddings, their labels 0..way-1, query embeddings, way) -> (queries, way) scores, higher better
ScoreFn = Callable[["np.ndarray", "np.ndarray", "np.ndarray", int], "np.ndarray"]


class ModelFacts(NamedTuple):
    """What a head section is read against: the rest of its manifest."""

    path: Path          # the manifest file: messages name it, a head's files lie beside it
    distance: str       # the manifest's prototype distance
    embedding_dim: int
    input_side: int     # the shorter side of the model input (an image's side, a spectrogram's mels or frames)


class ExportContext(NamedTuple):
    """What export offers a head that writes files of its own (`Head.write`)."""

    sample: Callable[[int], tuple[np.ndarray, np.ndarray]]  # (embeddings, labels) of up to n seeded training classes
    convert: Callable  # (tf.function, quantization, representative, owner) -> .tflite bytes
    seed: int
    log: Callable[[str], None]


class Head(ABC):
    """A model's head, as its manifest says (`read`) or as a method hands it to export (`to_manifest`).

    Subclasses are frozen dataclasses with at least ``distance``. The board asks a head: `files` /
    `graphs` / `reduced` (what a variant needs, what a bundle carries), `load` (its graphs for a
    variant), `adapt_setting` / `linear_head` / `check_adaptable` (a store's head adaptation),
    `check_store`, `build` (the classifier of a store, with the "unknown" test) and `describe` /
    `text`. Export asks: `to_manifest`, `write`, `scores` / `variant_scores` (what evaluation
    measures), `description`, and `chosen_on_validation`."""

    kind: ClassVar[str]
    # export measures this head against the nearest prototype on validation episodes and keeps the better
    chosen_on_validation: ClassVar[bool] = False
    # a store may adapt a linear head over this one (`edgemeta adapt`)
    adapts: ClassVar[bool] = False
    # a store's adaptation without a rate: this rate (None: the model's own learned rates)
    default_rate: ClassVar[float | None] = None
    distance: str           # the nearest-prototype distance: the open-set test's, in every kind
    support_shift: int = 0  # support views: enrolled samples are embedded as the mean over moves of this many pixels
    method: str | None = None  # the meta-learning method it came from (informational)
    linear: LinearHeadSpec | None = None  # the model's own linear head: the linear kind's, None in the others

    # --- the manifest ----------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def read(cls, section: Obj | None, facts: ModelFacts) -> Head:
        """The head of a manifest's checked ``head`` section (None: a format-1 manifest); a bad one is one
        EdgemetaError line naming the file and the key. Files it names are checked here or by `files`."""

    @abstractmethod
    def to_manifest(self) -> dict:
        """The manifest's ``head`` section (JSON), but for what `write` adds."""

    def write(self, out: Path, ctx: ExportContext) -> dict:
        """Write the head's own files into the export folder `out`; returns the section keys naming them."""
        return {}

    def files(self, folder: Path, variant: Variant, verify: bool = True) -> list[Path]:
        """The files beside the manifest in `folder` the head needs with `variant` (checked against their
        checksums with `verify`): what a bundle of that variant carries besides the variant's own file."""
        return []

    def graphs(self, folder: Path, variant: Variant, verify: bool = True) -> list[Path]:
        """Those of `files` that run on the board's interpreter (a bundle checks their ops)."""
        return []

    def reduced(self, section: dict, variant: Variant) -> dict:
        """The manifest's head section for a bundle that carries `variant` only."""
        return section

    # --- the board -------------------------------------------------------------------------------

    def load(self, folder: Path, variant: Variant, dim: int, threads: int = 1, verify: bool = True) -> Head:
        """The head with what it runs on the board for `variant` loaded (graphs); a runtime loads it once."""
        return self

    def check_adaptable(self, model: str) -> None:
        """Refuse a store's head adaptation where this head does not adapt (`adapts`)."""
        if not self.adapts:
            raise EdgemetaError(f"model {model}'s {self.kind} head does not adapt on the board: {adaptation_is_for()}")

    def adapt_setting(self, steps: int, lr: float | None) -> tuple[int, float | None]:
        """A store's (checked) adaptation setting with this head's default rate written out."""
        return steps, self.default_rate if lr is None else lr

    def linear_head(self, adapt: tuple[int, float | None] | None) -> LinearHeadSpec | None:
        """The linear head a store is classified with under its adaptation setting (steps, rate: checked and
        adaptable), or without one (None): None where the store is classified by the head itself."""
        return None

    def store_linear_head(self, store: EnrollmentStore) -> LinearHeadSpec | None:
        """`linear_head` of a store's adaptation setting (checked again: it came from a file)."""
        from edgemeta.runtime.heads.common import check_adapt

        adapt = store.adapt
        return self.linear_head(check_adapt(adapt.get("steps"), adapt.get("lr")) if adapt else None)

    def check_store(self, store: EnrollmentStore) -> None:
        """Refuse, before anything is written, a store this head cannot read."""
        return None

    @abstractmethod
    def build(self, store: EnrollmentStore, threshold: float | None) -> Classifier:
        """The classifier of a store (`classify(queries, top_k, unknown)`), answering "unknown" where the
        nearest prototype is farther than `threshold` (None: never)."""

    @abstractmethod
    def describe(self, store: EnrollmentStore) -> dict:
        """What a store is classified with, JSON-ready, with "kind" (`text` reads it back)."""

    @staticmethod
    def text(d: dict) -> str:
        """`describe`'s dict for people, one line (the dict may come from a board over the wire)."""
        return f"{d.get('kind')} head"

    # --- what evaluation measures ----------------------------------------------------------------

    def scores(self, support: np.ndarray, labels: np.ndarray, queries: np.ndarray, way: int) -> np.ndarray:
        """The head as a function of an episode's embeddings: scores (queries, way), higher is better."""
        raise EdgemetaError(f"a {self.kind} head has no numpy scores of its own; evaluate it through its graphs")

    def variant_scores(self, folder: Path, quantization: str, dim: int, threads: int = 1) -> tuple[ScoreFn, str] | None:
        """(scores, what they are) where a variant's board head is not the host method's numpy head (a
        sequence head's graphs of that quantisation); None: the numpy head is the board's."""
        return None

    @abstractmethod
    def description(self) -> str:
        """One line on the board's head, for the export report."""


def register(cls: type[Head]) -> type[Head]:
    """Register a Head subclass under its `kind` (a class decorator); a kind string is registered once."""
    name = getattr(cls, "kind", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}.kind must be a non-empty string")
    if _KINDS.get(name, cls) is not cls:
        raise ValueError(f"head kind {name!r} is registered already ({_KINDS[name].__name__})")
    _KINDS[name] = cls
    return cls


def kinds() -> list[str]:
    """Every kind this edgemeta knows: the built-in ones, then those registered since."""
    return [*_BUILTIN, *(k for k in _KINDS if k not in _BUILTIN)]


def kind(name: Any) -> type[Head] | None:
    """The Head subclass of a kind string (its module imported on first use), or None for an unknown one."""
    if not isinstance(name, str):
        return None
    if name not in _KINDS and name in _BUILTIN:
        import_module(_BUILTIN[name])
    return _KINDS.get(name)


def kind_of(section: Obj | dict) -> type[Head]:
    """The Head subclass a manifest's head section names; an unknown kind is one EdgemetaError line."""
    raw = section if isinstance(section, dict) else section.raw
    where = "" if isinstance(section, dict) else section.doc.name
    cls = kind(raw.get("kind"))
    if cls is None:
        raise EdgemetaError(f"{where + ': ' if where else ''}unknown head kind {raw.get('kind')!r} (this edgemeta knows "
                            f"{', '.join(kinds())}); upgrade edgemeta or re-export the model")
    return cls


def read(section: Obj | None, facts: ModelFacts) -> Head:
    """The head of a manifest's ``head`` section, read by its kind (None, format 1: the nearest prototype)."""
    return (kind(PROTOTYPE) if section is None else kind_of(section)).read(section, facts)


def adaptation_is_for() -> str:
    """The end of a refusal to adapt: which kinds do."""
    return f"head adaptation is for {' and '.join(k for k in kinds() if kind(k).adapts)} heads"


def describe_text(d: dict) -> str:
    """A store's head description (`Head.describe`) for people, by the kind it names."""
    cls = kind(d.get("kind")) if isinstance(d, dict) else None
    return (cls or Head).text(d)
