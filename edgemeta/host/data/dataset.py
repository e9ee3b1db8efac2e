"""Omniglot (official zips or extracted folders) and generic folder-per-class datasets."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from edgemeta.audio import AUDIO_SUFFIXES
from edgemeta.errors import EdgemetaError
from edgemeta.host.data.cache import cached_arrays, fingerprint
from edgemeta.preprocess import DECODE_VERSION, IMAGE_SUFFIXES, FrontEnd, Preprocess

OMNIGLOT_PARTS = ("images_background", "images_evaluation")
OMNIGLOT_ENV = "EDGEMETA_OMNIGLOT"
# Background alphabets held back from training in the `lake` split to choose hyperparameters
# and checkpoints on: every sixth alphabet in sorted order, fixed so every run uses the same.
LAKE_VAL_ALPHABETS = ("Alphabet_of_the_Magi", "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Futurama",
                      "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Mkhedruli_(Georgian)")
SPLITS = ("train", "val", "test")


@dataclass
class FewShotSplit:
    """Images of one split: ``images[i]`` (H, W, C) uint8 belongs to class ``labels[i]``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    _index: list[np.ndarray] | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_indices(self) -> list[np.ndarray]:
        """For each class, the indices of its images (computed once)."""
        if self._index is None:
            order = np.argsort(self.labels, kind="stable")
            counts = np.bincount(self.labels, minlength=self.num_classes)
            self._index = np.split(order, np.cumsum(counts)[:-1])
        return self._index

    def min_class_size(self) -> int:
        return min(len(ix) for ix in self.class_indices())

    def class_groups(self) -> list[np.ndarray] | None:
        """Classes grouped by the part of their name before the first '/' (an Omniglot character's
        alphabet: 'Alphabet/characterNN/rot000'), as arrays of class indices; None when the class names
        carry no group (a folder dataset)."""
        if not all("/" in n for n in self.class_names):
            return None
        groups: dict[str, list[int]] = {}
        for c, n in enumerate(self.class_names):
            groups.setdefault(n.split("/", 1)[0], []).append(c)
        return [np.array(v) for v in groups.values()]


def merge_splits(name: str, *parts: FewShotSplit) -> FewShotSplit:
    """One split holding the classes of all `parts` (e.g. train + val), relabelled consecutively."""
    offsets = np.cumsum([0] + [p.num_classes for p in parts[:-1]])
    return FewShotSplit(name, np.concatenate([p.images for p in parts]),
                        np.concatenate([p.labels + o for p, o in zip(parts, offsets, strict=True)]),
                        [c for p in parts for c in p.class_names])


@dataclass(frozen=True)
class DatasetSpec:
    """Which data to load.

    kind: "omniglot" or "folder".
    root: the folder holding images_background.zip / images_evaluation.zip (or those folders
        extracted) for Omniglot, or a folder with one sub-folder of images per class.
        Empty for Omniglot means $EDGEMETA_OMNIGLOT.
    split: Omniglot split, "vinyals" or "lake".
    rotations: add 90/180/270 degree rotations of the training characters as new classes
        (the `lake` split; the `vinyals` split lists its rotations in its split files).
    fractions: train/val/test fractions of the classes of a folder dataset, split with `seed`.
    """

    kind: str = "omniglot"
    root: str = ""
    split: str = "vinyals"
    rotations: bool = True
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("omniglot", "folder"):
            raise EdgemetaError(f"unknown dataset kind {self.kind!r}; use 'omniglot' or 'folder'")
        if self.kind == "omniglot" and self.split not in ("vinyals", "lake"):
            raise EdgemetaError(f"unknown Omniglot split {self.split!r}; use 'vinyals' or 'lake'")
        if len(self.fractions) != 3 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-6:
            raise EdgemetaError(f"fractions must be three non-negative numbers adding up to 1, got {self.fractions}")


def load_dataset(spec: DatasetSpec, pre: FrontEnd, splits: tuple[str, ...] = SPLITS) -> dict[str, FewShotSplit]:
    """Load the requested splits of a dataset, decoding through the cache."""
    if spec.kind == "omniglot":
        return _omniglot(spec, pre, splits)
    return _folder(spec, pre, splits)


# --- Omniglot -----------------------------------------------------------------------------


def omniglot_root(root: str) -> Path:
    """The Omniglot folder from the argument or $EDGEMETA_OMNIGLOT, checked."""
    root = root or os.environ.get(OMNIGLOT_ENV, "")
    if not root:
        raise EdgemetaError(f"no Omniglot location: pass --data DIR or set {OMNIGLOT_ENV} to the folder "
                            "holding images_background.zip and images_evaluation.zip")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise EdgemetaError(f"Omniglot folder {path} does not exist")
    for part in OMNIGLOT_PARTS:
        if not (path / f"{part}.zip").is_file() and not (path / part).is_dir():
            raise EdgemetaError(f"{path} has neither {part}.zip nor a {part}/ folder; download the official "
                                "Omniglot zips (github.com/brendenlake/omniglot, python/) into it")
    return path


def _omniglot_members(path: Path, part: str) -> list[tuple[str, str, str]]:
    """(alphabet, character, member-name) of every PNG of one Omniglot part, sorted."""
    out = []
    zpath = path / f"{part}.zip"
    if zpath.is_file():
        try:
            with zipfile.ZipFile(zpath) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise EdgemetaError(f"{zpath} is not a readable zip ({e}); download it again") from None
    else:
        names = [p.relative_to(path).as_posix() for p in (path / part).rglob("*.png")]
    for name in names:
        bits = name.split("/")
        if len(bits) == 4 and bits[0] == part and bits[3].endswith(".png"):
            out.append((bits[1], bits[2], name))
    if not out:
        raise EdgemetaError(f"no Omniglot images found in {zpath if zpath.is_file() else path / part}; "
                            f"expected {part}/<Alphabet>/<characterNN>/*.png inside")
    return sorted(out)


def _decode_omniglot(path: Path, pre: Preprocess) -> dict[str, np.ndarray]:
    images, names, drawn = [], [], []
    for part in OMNIGLOT_PARTS:
        members = _omniglot_members(path, part)
        zpath = path / f"{part}.zip"
        z = zipfile.ZipFile(zpath) if zpath.is_file() else None
        try:
            chars: dict[str, list[np.ndarray]] = {}
            for alphabet, character, name in members:
                try:
                    data = z.read(name) if z else None
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    raise EdgemetaError(f"{zpath} is damaged ({name}: {e}); download it again") from None
                chars.setdefault(f"{alphabet}/{character}", []).append(pre.file(path / name, data))
        finally:
            if z:
                z.close()
        for char, imgs in chars.items():
            if len(imgs) != 20:
                raise EdgemetaError(f"Omniglot character {char} has {len(imgs)} images instead of 20; "
                                    "the data is incomplete, download it again")
            images.append(np.stack(imgs))
            names.append(char)
            drawn.append(part == "images_background")
    return {"images": np.stack(images), "names": np.array(names), "background": np.array(drawn)}


def load_omniglot(root: str, pre: Preprocess) -> tuple[np.ndarray, list[str], np.ndarray]:
    """All 1623 characters: images (1623, 20, H, W, C) uint8, 'Alphabet/characterNN' names,
    and whether each comes from the background set."""
    path = omniglot_root(root)
    sources = [path / f"{p}.zip" if (path / f"{p}.zip").is_file() else path / p for p in OMNIGLOT_PARTS]
    key = fingerprint(sources, {"kind": "omniglot", "pre": pre.to_dict()})
    arrays = cached_arrays("omniglot", key, lambda: _decode_omniglot(path, pre))
    return arrays["images"], [str(n) for n in arrays["names"]], arrays["background"]


def _vinyals_lines(split: str) -> list[str]:
    text = resources.files("edgemeta.host.data").joinpath(f"splits/vinyals/{split}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _rotated_split(name: str, chars: np.ndarray, char_names: list[str], entries: list[tuple[int, int]]) -> FewShotSplit:
    """A split whose classes are (character index, quarter turns) pairs."""
    per_class = chars.shape[1]
    images = np.empty((len(entries) * per_class, *chars.shape[2:]), dtype=np.uint8)
    class_names = []
    for c, (i, k) in enumerate(entries):
        images[c * per_class:(c + 1) * per_class] = np.rot90(chars[i], k=k, axes=(1, 2))
        class_names.append(f"{char_names[i]}/rot{90 * k:03d}")
    labels = np.repeat(np.arange(len(entries), dtype=np.int32), per_class)
    return FewShotSplit(name, images, labels, class_names)


def _omniglot(spec: DatasetSpec, pre: Preprocess, splits: tuple[str, ...]) -> dict[str, FewShotSplit]:
    chars, names, background = load_omniglot(spec.root, pre)
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for split in splits:
        if spec.split == "vinyals":
            entries = []
            for line in _vinyals_lines(split):
                char, rot = line.rsplit("/", 1)
                entries.append((index[char], int(rot[3:]) // 90))
        else:
            alphabet = [n.split("/")[0] for n in names]
            if split == "test":
                chosen = [i for i in range(len(names)) if not background[i]]
            else:
                held = (alphabet[i] in LAKE_VAL_ALPHABETS for i in range(len(names)))
                chosen = [i for i, h in enumerate(held) if background[i] and h == (split == "val")]
            turns = range(4) if spec.rotations and split == "train" else range(1)
            entries = [(i, k) for i in chosen for k in turns]
        out[split] = _rotated_split(split, chars, names, entries)
    return out


# --- Folder per class ---------------------------------------------------------------------


def _folder_files(root: Path, suffixes: set[str] = IMAGE_SUFFIXES) -> dict[str, list[Path]]:
    """Class name -> its sample files (`suffixes`: the front end's, images or .wav), sorted."""
    if not root.is_dir():
        raise EdgemetaError(f"dataset folder {root} does not exist")
    what = "audio file" if suffixes == AUDIO_SUFFIXES else "image"
    classes: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.iterdir() if f.is_file() and not f.name.startswith("."))
        for f in files:
            if f.suffix.lower() not in suffixes:
                raise EdgemetaError(f"{f} is not an {what} ({', '.join(sorted(suffixes))}); "
                                    "move it out of the dataset folder")
        if files:
            classes[sub.name] = files
    if not classes:
        raise EdgemetaError(f"no {what}s found in {root}; expected one sub-folder of {what}s per class")
    return classes


def _suffixes(pre: FrontEnd) -> set[str]:
    return AUDIO_SUFFIXES if pre.kind == "audio" else IMAGE_SUFFIXES


def load_folder(root: str, pre: FrontEnd) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every sample under root/<class>/: model inputs (N, H, W, C) uint8, labels (N,), class names."""
    classes = _folder_files(Path(root).expanduser(), _suffixes(pre))
    files = [f for fs in classes.values() for f in fs]

    def build() -> dict[str, np.ndarray]:
        images = np.stack([pre.file(f) for f in files])
        labels = np.repeat(np.arange(len(classes), dtype=np.int32), [len(fs) for fs in classes.values()])
        return {"images": images, "labels": labels, "names": np.array(list(classes))}

    # decode: the same files decode to other pixels since 16-bit/transparent images are converted properly
    key = fingerprint(files, {"kind": "folder", "root": str(Path(root).resolve()), "pre": pre.to_dict(), "decode": DECODE_VERSION})
    arrays = cached_arrays("folder", key, build)
    return arrays["images"], arrays["labels"], [str(n) for n in arrays["names"]]


def _folder(spec: DatasetSpec, pre: FrontEnd, splits: tuple[str, ...]) -> dict[str, FewShotSplit]:
    images, labels, names = load_folder(spec.root, pre)
    order = np.random.default_rng(spec.seed).permutation(len(names))
    n_train = round(spec.fractions[0] * len(names))
    n_val = round(spec.fractions[1] * len(names))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    out = {}
    for split in splits:
        chosen = np.sort(parts[split])
        if len(chosen) == 0:
            raise EdgemetaError(f"the {split} split of {spec.root} has no classes ({len(names)} classes, "
                                f"fractions {spec.fractions}); add classes or change the fractions")
        mask = np.isin(labels, chosen)
        remap = np.full(len(names), -1, dtype=np.int32)
        remap[chosen] = np.arange(len(chosen), dtype=np.int32)
        out[split] = FewShotSplit(split, images[mask], remap[labels[mask]], [names[i] for i in chosen])
    return out
