"""Image preprocessing shared by training, evaluation and the board runtime.

Pure numpy + Pillow, no TensorFlow: the same function must give the same pixels on the host
and on a board, so every place that turns a file (or the bytes of one) into a model input goes
through `decode_image`.

Decoding is bounded before it starts: the file's size is checked before it is read and the
image's header (Pillow opens lazily) before any pixel is decoded, against `ImageLimits` (a board
profile's `max_image_pixels` / `max_image_bytes`, else the defaults below). A JPEG is decoded at
a reduced scale (`Image.draft`) when the model input is much smaller, and the pixel limit applies
to what is decoded. Every failure is one `EdgemetaError` line that names the image.

Conversion keeps what the image shows: 16-bit and 32-bit grayscale are scaled by their bit depth
(not clipped to 255), transparent pixels are composited over the model's paper (white when the
model inverts dark ink on white, black otherwise, so that they become input 0 either way),
palette/CMYK/YCbCr/LAB/HSV images go through RGB, and EXIF orientation is applied.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import re
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgemeta.arrays import load_npy
from edgemeta.audio import AUDIO_SUFFIXES, AudioPreprocess
from edgemeta.errors import EdgemetaError
from edgemeta.pixels import ALPHA, SIXTEEN, to_mode
from edgemeta.schema import Doc, Obj

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
SAMPLE_SUFFIXES = IMAGE_SUFFIXES | AUDIO_SUFFIXES | {".npy"}  # what a folder of samples may hold
# The Pillow formats tried, the ones IMAGE_SUFFIXES name (JPEG includes multi-picture MPO files).
# Anything else (EPS, which runs Ghostscript, PSD, ICO, ...) is refused unread.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")

# Without a board profile. Measured peaks of one decode above the process's own memory, per
# decoded pixel: L 1.2 bytes, RGB 4-5, 16-bit gray 6-7, RGBA 7 (to gray) to 13 (to RGB); a JPEG
# 0.3 per pixel of its full size (decoded at 1/8 scale for a small model input). 24 megapixels
# (a 6000x4000 camera image) thus peak at 30-320 MB; a 13000x13000 PNG bomb (169 MP, 0.5 MB of
# file, 860 MB decoded) is refused. Board profiles set their own (max_image_pixels,
# max_image_bytes); $EDGEMETA_MAX_IMAGE_PIXELS and $EDGEMETA_MAX_IMAGE_BYTES override both.
DEFAULT_MAX_IMAGE_PIXELS = 24_000_000
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20
CHANNELS = (1, 3)
IMAGE_SIZES = (8, 512)  # the smallest and largest square side a model input may have
# Bumped when the same file decodes to other pixels (caches of decoded datasets key on it).
DECODE_VERSION = 2

_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"} | SIXTEEN | ALPHA
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose does)
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class ImageLimits:
    """How much one image may cost to decode.

    max_pixels: width x height as decoded (after a JPEG's reduced-scale decode), checked from
        the header before any pixel is decoded.
    max_bytes: size of the file (or of the bytes received), checked before it is read.
    """

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def __post_init__(self) -> None:
        for key in ("max_pixels", "max_bytes"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EdgemetaError(f"image limit {key} must be a positive integer, got {v!r}")

    @classmethod
    def default(cls) -> ImageLimits:
        """The built-in limits, or $EDGEMETA_MAX_IMAGE_PIXELS / $EDGEMETA_MAX_IMAGE_BYTES."""
        return cls.resolve()

    @classmethod
    def resolve(cls, max_pixels: int | None = None, max_bytes: int | None = None) -> ImageLimits:
        """$EDGEMETA_MAX_IMAGE_PIXELS / $EDGEMETA_MAX_IMAGE_BYTES where set (an operator's override),
        else the values given (a board profile's), else the built-in defaults."""
        values = {"max_pixels": max_pixels or DEFAULT_MAX_IMAGE_PIXELS, "max_bytes": max_bytes or DEFAULT_MAX_IMAGE_BYTES}
        for key, var in (("max_pixels", "EDGEMETA_MAX_IMAGE_PIXELS"), ("max_bytes", "EDGEMETA_MAX_IMAGE_BYTES")):
            text = os.environ.get(var, "").strip()
            if text:
                try:
                    values[key] = int(text)
                except ValueError:
                    raise EdgemetaError(f"${var} must be a positive integer, got {text!r}") from None
                if values[key] < 1:
                    raise EdgemetaError(f"${var} must be a positive integer, got {text!r}")
        return cls(**values)


@dataclass(frozen=True)
class Preprocess:
    """How a raw image becomes a model input.

    image_size: square side the image is resized to (28 for Omniglot, as in the literature).
    channels: 1 (grayscale) or 3 (RGB).
    invert: map dark ink on white paper to 1.0 (Omniglot strokes become the bright, sparse part,
        which suits ReLU networks).
    Stored images are uint8 in [0, 255]; `to_float` maps them to [0, 1] for the network.
    """

    image_size: int = 28
    channels: int = 1
    invert: bool = False

    kind = "image"
    suffixes = IMAGE_SUFFIXES | {".npy"}

    def __post_init__(self) -> None:
        if self.channels not in CHANNELS:
            raise EdgemetaError(f"channels must be 1 or 3, got {self.channels}")
        if not IMAGE_SIZES[0] <= self.image_size <= IMAGE_SIZES[1]:
            raise EdgemetaError(f"image_size must be between {IMAGE_SIZES[0]} and {IMAGE_SIZES[1]}, got {self.image_size}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    @property
    def input_side(self) -> int:
        return self.image_size

    def describe(self) -> str:
        return f"{self.image_size}x{self.image_size} {'grayscale' if self.channels == 1 else 'RGB'} images"

    @property
    def background(self) -> int:
        """What a transparent pixel shows: the paper, white under ink-on-white inversion, else black."""
        return 255 if self.invert else 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, doc: Doc | None = None, where: str = "preprocess") -> Preprocess:
        """From a manifest's (or a model folder's) preprocess section, every key type-checked: `bool()`
        of the string "false" is True, so a hand-edited "invert": "false" must be an error, not an inversion.
        `doc` names the file in the error."""
        section = Obj(doc or Doc("", "fix the model's preprocess section or re-export the model"), d, where)
        return cls(section.get("image_size", int, min=IMAGE_SIZES[0], max=IMAGE_SIZES[1]),
                   section.get("channels", int, choices=CHANNELS), section.get("invert", bool))

    def image(self, img: Image.Image, orientation: int = 1) -> np.ndarray:
        """A Pillow image -> uint8 array of shape (size, size, channels).

        orientation: the file's EXIF orientation (1-8); its transpose is applied to the converted 8-bit
        image, which is cheaper than, and pixel for pixel the same as, ImageOps.exif_transpose first.
        """
        img = to_mode(img, "L" if self.channels == 1 else "RGB", self.background)
        if orientation in _ORIENT:
            img = img.transpose(_ORIENT[orientation])
        if img.size != (self.image_size, self.image_size):
            # LANCZOS on the 8-bit image keeps the anti-aliased stroke edges of the 105 px scans.
            img = img.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS)
        arr = np.asarray(img, dtype=np.uint8)
        if self.invert:
            arr = 255 - arr
        return arr.reshape(self.input_shape)

    def file(self, path: str | Path, data: bytes | None = None, *, limits: ImageLimits | None = None) -> np.ndarray:
        """Decode one image file (or its bytes, named by path) -> uint8 array; see `decode_image`."""
        return decode_image(path if data is None else data, self, name=str(path), limits=limits)


FrontEnd = Preprocess | AudioPreprocess


def read_preprocess(d: dict, doc: Doc | None = None, where: str = "preprocess") -> FrontEnd:
    """A manifest's or model folder's preprocess section -> its front end, by its "kind": "audio"
    (edgemeta/audio.py), or an image (no kind, as every model before audio)."""
    kind = d.get("kind", "image") if isinstance(d, dict) else "image"
    if kind == "audio":
        return AudioPreprocess.from_dict(d, doc, where)
    if kind != "image":
        raise (doc or Doc("", "re-export the model")).error(f"{where}.kind", f"must be \"image\" or \"audio\", got {kind!r}")
    return Preprocess.from_dict(d, doc, where)


def decode_image(source: str | Path | bytes, pre: Preprocess, *, name: str | None = None,
                 limits: ImageLimits | None = None) -> np.ndarray:
    """An image file, or the bytes of one, -> a (size, size, channels) uint8 model input.

    Refuses, with one EdgemetaError line naming the image, its size and the limit: a file over
    ``limits.max_bytes`` (before reading it), an image over ``limits.max_pixels`` (from its
    header, before decoding), and anything that is not a whole image in IMAGE_FORMATS.
    ``limits`` defaults to `ImageLimits.default()`.
    """
    limits = limits or ImageLimits.default()
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "image"
        if len(source) > limits.max_bytes:
            raise _too_many_bytes(name, len(source), limits)
        data = source
    else:
        name = name or str(source)
        data = _read_bounded(Path(source), name, limits)
    size = None
    try:
        with _pillow_quiet(), Image.open(io.BytesIO(data), formats=_formats()) as img:
            if img.mode not in _MODES:
                raise EdgemetaError(f"cannot read image {name}: its pixel format {img.mode} is not supported; "
                                    "convert it to 8-bit grayscale or RGB")
            if img.format in ("JPEG", "MPO") and min(img.size) >= 2 * pre.image_size:
                # decode at 1/2, 1/4 or 1/8 scale, still at least the model's input size
                img.draft("L" if pre.channels == 1 else "RGB", (pre.image_size, pre.image_size))
            size = img.size
            _check_pixels(name, size, limits)
            orientation = _orientation(img)
            img.load()
            return pre.image(img, orientation)
    except EdgemetaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(name, e, limits) from e
    except UnidentifiedImageError as e:
        raise EdgemetaError(f"cannot read image {name}: not an image in a known format ({', '.join(_formats())}); "
                            "remove it or replace it with a valid image") from e
    except MemoryError as e:
        dims = f" ({size[0]}x{size[1]})" if size else ""
        raise EdgemetaError(f"not enough memory to decode image {name}{dims}; resize it, or lower max_image_pixels "
                            f"(now {limits.max_pixels}) so that such images are refused") from e
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise EdgemetaError(f"cannot read image {name}: {_reason(e)}; remove it or replace it with a valid image") from e


@functools.lru_cache(maxsize=1)
def _formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this Pillow reads (a build without WebP has no WEBP opener)."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def _read_bounded(path: Path, name: str, limits: ImageLimits) -> bytes:
    """The file's bytes, refused before reading when its size is over the limit."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode) and st.st_size > limits.max_bytes:
                raise _too_many_bytes(name, st.st_size, limits)
            data = f.read(limits.max_bytes + 1)  # a pipe or device has no size: read one byte past the limit
    except FileNotFoundError:
        raise EdgemetaError(f"image {name} does not exist") from None
    except IsADirectoryError:
        raise EdgemetaError(f"image {name} is a folder, not an image file") from None
    except OSError as e:
        raise EdgemetaError(f"cannot read image {name}: {e.strerror or e}") from None
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(name, None, limits)
    return data


def _check_pixels(name: str, size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise EdgemetaError(f"cannot read image {name}: it is {w}x{h}, no pixels; remove it or replace it with a valid image")
    if w * h > limits.max_pixels:
        f = math.sqrt(limits.max_pixels / (w * h))
        fit = f"{max(1, int(w * f))}x{max(1, int(h * f))}"
        raise EdgemetaError(f"image {name} is {w}x{h} ({_pixels(w * h)}), more than the limit of {_pixels(limits.max_pixels)}; "
                            f"resize it (to {fit} or less) or raise the limit (max_image_pixels in the board profile, "
                            "or $EDGEMETA_MAX_IMAGE_PIXELS)")


def _too_many_bytes(name: str, size: int | None, limits: ImageLimits) -> EdgemetaError:
    what = _bytes(size) if size is not None else "larger than that"
    return EdgemetaError(f"image {name} is {what}, more than the limit of {_bytes(limits.max_bytes)} per image; "
                         "resize or recompress it, or raise the limit (max_image_bytes in the board profile, "
                         "or $EDGEMETA_MAX_IMAGE_BYTES)")


def _bomb(name: str, e: Exception, limits: ImageLimits) -> EdgemetaError:
    """Pillow's own decompression-bomb stop (at 2 x Image.MAX_IMAGE_PIXELS, on opening) as our one line."""
    m = re.search(r"\((\d+) pixels\)", str(e))
    pixels = int(m[1]) if m else None
    declared = f" declares {_pixels(pixels)}," if pixels else ""
    if pixels is not None and pixels <= limits.max_pixels:  # the limit was raised above what Pillow decodes
        return EdgemetaError(f"image {name}{declared} more than Pillow decodes ({_pixels(2 * (Image.MAX_IMAGE_PIXELS or 0))}); "
                             "resize it")
    return EdgemetaError(f"image {name}{declared} more than the limit of {_pixels(limits.max_pixels)}; resize it or raise "
                         "the limit (max_image_pixels in the board profile, or $EDGEMETA_MAX_IMAGE_PIXELS)")


@contextlib.contextmanager
def _pillow_quiet():
    """Pillow's warnings while decoding are noise to a user: over Image.MAX_IMAGE_PIXELS (our own limit,
    checked next, decides; under python -W error the warning would be raised before the size could be
    read), corrupt EXIF (the pixels still decode), palette transparency. (catch_warnings is process-wide.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", module=r"PIL\.")
        yield


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1: upright); a damaged EXIF block counts as upright."""
    try:
        value = img.getexif().get(0x0112, 1)
        return value if isinstance(value, int) else 1
    except Exception:  # EXIF parsing of user files raises anything; the pixels still decode
        return 1


def _pixels(n: int) -> str:
    return f"{n / 1e6:.1f} megapixels" if n >= 100_000 else f"{n} pixels"


def _bytes(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} bytes"


def _reason(e: Exception) -> str:
    """An exception as a short phrase of one line, without Python object addresses."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(e))
    text = " ".join(text.split())[:200]
    return text or type(e).__name__


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images in [0, 255] -> float32 in [0, 1], the network's input range."""
    return images.astype(np.float32) * np.float32(1.0 / 255.0)


def class_folders(root: str | Path) -> list[Path]:
    """The class folders of `enroll --from-folders ROOT`: its sub-folders (hidden ones skipped), sorted;
    an image lying directly in ROOT is refused (which class would it be?)."""
    base = Path(root)
    if not base.is_dir():
        raise EdgemetaError(f"folder {root} does not exist")
    subs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    strays = [f for f in base.iterdir() if f.is_file() and f.suffix.lower() in SAMPLE_SUFFIXES]
    if not subs:
        raise EdgemetaError(f"{root} has no sub-folders; --from-folders wants one folder of samples per class")
    if strays:
        raise EdgemetaError(f"{strays[0]} is a sample directly in {root}; put it in its class's sub-folder")
    return subs


def folder_files(paths: list[str | Path]) -> list[Path]:
    """The paths, each folder among them replaced by its samples (images, .wav or .npy files; sorted,
    hidden files skipped). A folder holding sub-folders or other files is refused: it is not one class's samples."""
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            out.append(p)
            continue
        entries = sorted(e for e in p.iterdir() if not e.name.startswith("."))
        if any(e.is_dir() for e in entries):
            raise EdgemetaError(f"{p} holds folders, not samples; to enroll one class per sub-folder use --from-folders {p}")
        for e in entries:
            if e.suffix.lower() not in SAMPLE_SUFFIXES:
                raise EdgemetaError(f"{e} is not a sample ({', '.join(sorted(SAMPLE_SUFFIXES))}); move it out of {p}")
        if not entries:
            raise EdgemetaError(f"folder {p} holds no samples")
        out += entries
    return out


def load_images(paths: list[str | Path], pre: FrontEnd, *, limits: ImageLimits | None = None) -> tuple[np.ndarray, list[str]]:
    """Samples for the model's front end, or folders of them (`folder_files`) -> (n, H, W, C) uint8 model
    inputs and a name for each (the file, or ``file.npy[i]`` for a stack). An image model takes image files
    (PNG, JPEG, ... through Pillow) and .npy arrays, an audio model .wav files.

    A .npy file holds one uint8 image (H, W) / (H, W, C) or a stack (n, H, W[, C]); it is
    preprocessed like a decoded image file. Every file is held to ``limits`` (see `decode_image`).
    """
    limits = limits or ImageLimits.default()
    out, names = [], []
    for p in folder_files(paths):
        suffix = p.suffix.lower()
        if suffix in SAMPLE_SUFFIXES - pre.suffixes:  # a sample of the other modality
            what = "a sound" if suffix in AUDIO_SUFFIXES else "an image" if suffix in IMAGE_SUFFIXES else "a numpy array"
            raise EdgemetaError(f"{p} is {what}, and this model takes {pre.describe()}; "
                                f"give {', '.join(sorted(pre.suffixes))} files")
        if p.suffix.lower() == ".npy":
            images = _npy_images(p, pre, limits)
            out.extend(images)
            names.extend([str(p)] if len(images) == 1 else [f"{p}[{i}]" for i in range(len(images))])
        else:
            if not p.is_file():
                raise EdgemetaError(f"{'audio' if pre.kind == 'audio' else 'image'} {p} does not exist")
            out.append(pre.file(p, limits=limits))
            names.append(str(p))
    if not out:
        raise EdgemetaError("no images given")
    return np.stack(out), names


def _npy_images(path: Path, pre: Preprocess, limits: ImageLimits) -> list[np.ndarray]:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise EdgemetaError(f"cannot read {path}: {e.strerror or e}") from None
    if size > limits.max_bytes:
        raise _too_many_bytes(str(path), size, limits)
    try:
        arr = load_npy(path, limits.max_bytes)
    except (OSError, ValueError) as e:
        raise EdgemetaError(f"cannot read {path} as a numpy array ({e})") from None
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3, 4):
        raise EdgemetaError(f"{path}: expected uint8 image data of shape (H, W), (H, W, C) or (n, H, W[, C]), "
                            f"got {arr.dtype} {arr.shape}")
    if not arr.size:
        raise EdgemetaError(f"{path} holds no image data")
    stack = arr[None] if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)) else arr
    images = []
    for a in stack:
        a = a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a
        images.append(pre.image(Image.fromarray(a)))
    return images
