"""Training configuration, read from TOML.

Every section and key is checked: a typo is an error naming the key, not a silent default.
Example (``models/omniglot-vinyals-conv4/config.toml``)::

    [data]
    kind = "omniglot"
    split = "vinyals"

    [model]
    backbone = "conv4"

    [method]
    name = "protonet"    # or maml, anil, metasgd; the method's own keys follow (see edgemeta/host/methods/)

    [train]
    way = 60
    shot = 5
    query = 5
    episodes = 20000
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgemeta.audio import AudioPreprocess
from edgemeta.errors import EdgemetaError
from edgemeta.host.data import DatasetSpec
from edgemeta.preprocess import FrontEnd, Preprocess
from edgemeta.schema import table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LR_SCHEDULES = ("step", "cosine", "constant")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "conv4"
    input: str = "image"  # or "audio": wav files through the [audio] front end (edgemeta/audio.py)
    image_size: int = 28
    channels: int = 1
    invert: bool = True  # Omniglot: dark strokes on white -> bright strokes on black

    def __post_init__(self) -> None:
        from edgemeta.host.backbones import BACKBONES

        if self.backbone not in BACKBONES:
            raise EdgemetaError(f"unknown backbone {self.backbone!r} in [model]; choose one of: {', '.join(BACKBONES)}")
        if self.input not in ("image", "audio"):
            raise EdgemetaError(f"[model] input must be 'image' or 'audio', not {self.input!r}")


@dataclass(frozen=True)
class TrainConfig:
    way: int = 60
    shot: int = 5
    query: int = 5
    episodes: int = 20000          # stop after this many training episodes
    max_minutes: float = 0.0       # and/or after this much wall time of this run (a resumed run gets it anew; 0: no limit)
    # A checkpoint at least this often (wall time), besides the one at each validation, so a killed run
    # resumes from at most this far back (0: at validations only). 2 min: a ResNet-12 checkpoint (8 M
    # parameters with Adam's moments, 96 MB) takes 0.3 s to write on a 2-core host, 0.25% of the time.
    checkpoint_minutes: float = 2.0
    meta_batch: int = 1            # episodes (tasks) averaged per optimizer step, split across the replicas (MAML: 32);
                                   # each replica takes at least one, so a step is max(meta_batch, replicas) rounded up
    # Tasks of a meta-batch computed at once. Each holds its own inner-loop activations, so memory grows
    # with this, not with meta_batch: 1 (default) bounds a step to one task's memory (20-way 5-shot 5-step
    # MAML, 4 tasks: 1.4 GB above the loaded process, against 2.6 GB at 10 and the same time); more can
    # be faster for small tasks on many cores (BENCHMARKS.md, "Peak memory of one meta-gradient").
    parallel_tasks: int = 1
    learning_rate: float = 1e-3
    lr_schedule: str = "step"      # step (below), cosine (to 0 over `episodes`, MAML++) or constant
    lr_decay_every: int = 2000     # episodes between learning-rate steps (Snell et al.: halve every 2000)
    lr_decay_rate: float = 0.5
    seed: int = 0
    devices: list[str] = field(default_factory=list)  # empty: all GPUs, else the CPU (a cluster's workers: always so)
    # Start from these weights (a model folder or a .keras file, relative to the working directory)
    # instead of a random initialisation, e.g. to fine-tune a model with another shot or augmentation.
    init_from: str = ""
    # "trainval" trains on the validation classes too (the final-model protocol of Snell et al., once the
    # recipe has been chosen on val): validation then measures seen classes, so the last weights are kept.
    classes: str = "train"
    # Random affine augmentation of training episodes, one draw per image (0: off): the largest shift as a
    # fraction of the image side, rotation in degrees and relative scale change.
    augment_shift: float = 0.0
    augment_rotate: float = 0.0
    augment_scale: float = 0.0
    # SpecAugment-style masks (Park et al., 2019) for spectrogram inputs, one of each per sample (0: off):
    # the widest band of input rows (time frames) and of input columns (mel bins) set to the floor.
    augment_time_mask: int = 0
    augment_freq_mask: int = 0

    def __post_init__(self) -> None:
        if (self.episodes < 1 or self.lr_decay_every < 1 or self.learning_rate <= 0 or self.meta_batch < 1
                or self.parallel_tasks < 1):
            raise EdgemetaError("[train] episodes, meta_batch, parallel_tasks, lr_decay_every and learning_rate must be positive")
        for key in ("max_minutes", "checkpoint_minutes"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise EdgemetaError(f"[train] {key} must be a finite number of minutes, at least 0 (0: "
                                    f"{'no limit' if key == 'max_minutes' else 'at validations only'}), not {value!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise EdgemetaError(f"[train] lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}")
        if self.classes not in ("train", "trainval"):
            raise EdgemetaError(f"[train] classes must be 'train' or 'trainval', not {self.classes!r}")
        if not (0 <= self.augment_shift < 0.5 and 0 <= self.augment_rotate <= 180 and 0 <= self.augment_scale < 1):
            raise EdgemetaError("[train] augment_shift must be in [0, 0.5), augment_rotate in [0, 180] degrees, augment_scale in [0, 1)")
        if not (0 <= self.augment_time_mask <= 64 and 0 <= self.augment_freq_mask <= 64):
            raise EdgemetaError("[train] augment_time_mask and augment_freq_mask must be between 0 (off) and 64")

    @property
    def augments(self) -> bool:
        return bool(self.augment_shift or self.augment_rotate or self.augment_scale)

    @property
    def masks(self) -> bool:
        return bool(self.augment_time_mask or self.augment_freq_mask)


@dataclass(frozen=True)
class ValidationConfig:
    every: int = 500               # episodes between validations
    episodes: int = 500            # seeded validation episodes, the same ones every time
    way: int = 20
    shot: int = 1
    query: int = 15
    patience: int = 0              # stop after this many validations without improvement (0: never)
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.every < 1 or self.episodes < 1:
            raise EdgemetaError("[validation] every and episodes must be at least 1")


@dataclass(frozen=True)
class MethodConfig:
    """The [method] table: the algorithm's name and its own keys (checked against its Params)."""

    name: str = "protonet"
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from edgemeta.host.methods import method_params

        resolved = method_params(self.name, self.params)  # raises on an unknown method, key, type or range
        # every key written out, so a config equals its own dump whatever defaults it left unsaid
        object.__setattr__(self, "params", dataclasses.asdict(resolved))

    @property
    def resolved(self):
        from edgemeta.host.methods import method_params

        return method_params(self.name, self.params)

    def to_dict(self) -> dict:
        return {"name": self.name, **self.params}


@dataclass(frozen=True)
class Config:
    data: DatasetSpec = field(default_factory=DatasetSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    audio: AudioPreprocess = field(default_factory=AudioPreprocess)  # read when [model] input = "audio"
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # "section.key" of every key the file set: defaults may shrink to fit a small dataset, given values never
    given: frozenset = field(default=frozenset(), compare=False)

    @property
    def preprocess(self) -> FrontEnd:
        """How a sample file becomes the model's input."""
        if self.model.input == "audio":
            return self.audio
        return Preprocess(self.model.image_size, self.model.channels, self.model.invert)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("given")
        if self.model.input != "audio":
            d.pop("audio")
        d["method"] = self.method.to_dict()
        return d


def fit_to_splits(cfg: Config, train_classes: int, train_min_images: int, val_classes: int,
                  val_min_images: int) -> tuple[Config, list[str]]:
    """The configuration with its episode defaults ([train] and [validation] way, shot, query) shrunk to
    what a small dataset's splits hold, and one line per change; a value the file set that does not fit is
    an error naming its key."""
    notes: list[str] = []

    def fit(section: str, values, classes: int, images: int, split: str):
        way, shot, query = values.way, values.shot, values.query
        given = {k for k in ("way", "shot", "query") if f"{section}.{k}" in cfg.given}
        if way > classes and "way" not in given and classes >= 2:
            way = classes
        if shot + query > images and images >= 2:
            if "shot" not in given and "query" in given:
                shot = max(1, images - query)
            elif "shot" not in given:
                shot = min(shot, max(1, images // 2))
            if "query" not in given:
                query = max(1, images - shot)
        if way > classes:
            raise EdgemetaError(f"[{section}] way = {way} needs {way} classes but the {split} split has {classes}; lower "
                                f"[{section}] way or give the {split} split more classes ([data] fractions)")
        if shot + query > images:
            raise EdgemetaError(f"[{section}] shot = {shot} and query = {query} need {shot + query} images per class but the "
                                f"{split} split's smallest class has {images}; lower [{section}] shot or query")
        if (way, shot, query) != (values.way, values.shot, values.query):
            notes.append(f"[{section}] {way}-way {shot}-shot {query}-query instead of the default "
                         f"{values.way}-way {values.shot}-shot {values.query}-query: the {split} split has {classes} classes, "
                         f"the smallest with {images} images (set [{section}] way, shot and query to choose)")
        return dataclasses.replace(values, way=way, shot=shot, query=query)

    train = fit("train", cfg.train, train_classes, train_min_images, "train")
    validation = fit("validation", cfg.validation, val_classes, val_min_images, "val")
    return dataclasses.replace(cfg, train=train, validation=validation), notes


def training_data(cfg: Config) -> tuple[Config, dict, object, list[str]]:
    """Load the splits a training needs and fit the configuration to them (`fit_to_splits`), without
    TensorFlow, so that data and size errors come before its slow import: (config, splits, the split
    trained on, notes)."""
    from edgemeta.host.data import EpisodeSampler, load_dataset, merge_splits

    splits = load_dataset(cfg.data, cfg.preprocess, ("train", "val"))
    train_split = merge_splits("trainval", splits["train"], splits["val"]) if cfg.train.classes == "trainval" else splits["train"]
    cfg, notes = fit_to_splits(cfg, train_split.num_classes, train_split.min_class_size(), splits["val"].num_classes,
                               splits["val"].min_class_size())
    EpisodeSampler(train_split, cfg.train.way, cfg.train.shot, cfg.train.query)  # what is left to refuse, refused now
    EpisodeSampler(splits["val"], cfg.validation.way, cfg.validation.shot, cfg.validation.query)
    limits = cfg.method.resolved.limits  # a head that reads a bounded support set (SNAIL)
    for section, values in (("train", cfg.train), ("validation", cfg.validation)):
        if limits and (values.way > limits[0] or values.shot > limits[1]):
            raise EdgemetaError(f"[{section}] {values.way}-way {values.shot}-shot is more than the [method] max_way "
                                f"{limits[0]} x max_shot {limits[1]} that {cfg.method.name} reads; raise those or lower [{section}]")
    return cfg, splits, train_split, notes


_SECTIONS = {"data": DatasetSpec, "model": ModelConfig, "audio": AudioPreprocess, "method": MethodConfig,
             "train": TrainConfig, "validation": ValidationConfig}


def _method_section(raw: dict) -> MethodConfig:
    """[method] name = ... plus the method's keys; `[model] algorithm` is the older spelling of the name."""
    values = dict(raw.get("method", {}))
    legacy = raw.get("model", {}).get("algorithm")
    name = values.pop("name", legacy or "protonet")
    if legacy is not None and legacy != name:
        raise EdgemetaError(f"[model] algorithm = {legacy!r} and [method] name = {name!r} disagree; keep [method] name only")
    if not isinstance(name, str):
        raise EdgemetaError(f"[method] name must be a string, got {name!r}")
    return MethodConfig(name, values)


def _section(name: str, cls, values: dict):
    return table(cls, values, f"[{name}]")


def config_from_dict(raw: dict) -> Config:
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise EdgemetaError(f"unknown section [{unknown[0]}]; known sections: {', '.join(_SECTIONS)}")
    model = {k: v for k, v in raw.get("model", {}).items() if k != "algorithm"}
    sections = {name: _section(name, cls, model if name == "model" else raw.get(name, {}))
                for name, cls in _SECTIONS.items() if name != "method"}
    given = frozenset(f"{name}.{key}" for name, table in raw.items() if isinstance(table, dict) for key in table)
    if "audio" in raw and sections["model"].input != "audio":
        raise EdgemetaError('an [audio] section goes with [model] input = "audio"')
    return Config(method=_method_section(raw), given=given, **sections)


def load_config(path: str | Path) -> Config:
    """Read and check a TOML training configuration."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EdgemetaError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise EdgemetaError(f"config file {path} is not valid TOML: {e}") from None
    return config_from_dict(raw)


def dump_toml(cfg: Config) -> str:
    """The resolved configuration as TOML (flat sections of scalars and lists only)."""
    import tomli_w  # the host extra's: a board without it still reads configs, to say what it lacks

    return tomli_w.dumps(cfg.to_dict())
