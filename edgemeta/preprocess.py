"""Image preprocessing shared by training, evaluation and (later) the board runtime.

Pure numpy + Pillow, no TensorFlow: the same function must give the same pixels on the host
and on a board, so every place that turns a file into a model input goes through here.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgemeta.errors import EdgemetaError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


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

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise EdgemetaError(f"channels must be 1 or 3, got {self.channels}")
        if not 8 <= self.image_size <= 512:
            raise EdgemetaError(f"image_size must be between 8 and 512, got {self.image_size}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(int(d["image_size"]), int(d["channels"]), bool(d["invert"]))

    def image(self, img: Image.Image) -> np.ndarray:
        """A Pillow image -> uint8 array of shape (size, size, channels)."""
        img = img.convert("L" if self.channels == 1 else "RGB")
        if img.size != (self.image_size, self.image_size):
            # LANCZOS on the 8-bit image keeps the anti-aliased stroke edges of the 105 px scans.
            img = img.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS)
        arr = np.asarray(img, dtype=np.uint8)
        if self.invert:
            arr = 255 - arr
        return arr.reshape(self.input_shape)

    def file(self, path: str | Path, data: bytes | None = None) -> np.ndarray:
        """Decode one image file (or its bytes) -> uint8 array; a clear error when it is not one."""
        try:
            with Image.open(io.BytesIO(data) if data is not None else path) as img:
                return self.image(img)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise EdgemetaError(f"cannot read image {path}: {e}; remove it or replace it with a valid image") from None


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images in [0, 255] -> float32 in [0, 1], the network's input range."""
    return images.astype(np.float32) * np.float32(1.0 / 255.0)


def load_images(paths: list[str | Path], pre: Preprocess) -> tuple[np.ndarray, list[str]]:
    """Image files (PNG, JPEG, ... through Pillow) or .npy arrays -> (n, H, W, C) uint8 model
    inputs and a name for each (the file, or ``file.npy[i]`` for a stack).

    A .npy file holds one uint8 image (H, W) / (H, W, C) or a stack (n, H, W[, C]); it is
    preprocessed like a decoded image file.
    """
    out, names = [], []
    for p in paths:
        p = Path(p)
        if p.suffix.lower() == ".npy":
            images = _npy_images(p, pre)
            out.extend(images)
            names.extend([str(p)] if len(images) == 1 else [f"{p}[{i}]" for i in range(len(images))])
        else:
            if not p.is_file():
                raise EdgemetaError(f"image {p} does not exist")
            out.append(pre.file(p))
            names.append(str(p))
    if not out:
        raise EdgemetaError("no images given")
    return np.stack(out), names


def _npy_images(path: Path, pre: Preprocess) -> list[np.ndarray]:
    try:
        arr = np.load(path, allow_pickle=False)
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
