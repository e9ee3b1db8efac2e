"""Pillow's image modes brought to the two a model reads (8-bit "L" or "RGB"), keeping what an image shows:
alpha composited over the background, 16/32-bit and float grayscale scaled by their depth."""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN = {"I;16", "I;16B", "I;16L", "I;16N"}
ALPHA = {"RGBA", "RGBa", "LA", "La", "PA"}


def to_mode(img: Image.Image, target: str, background: int) -> Image.Image:
    """Any supported Pillow image -> mode target ("L" or "RGB"), keeping what it shows."""
    mode = img.mode
    if mode in SIXTEEN or mode in ("I", "F"):
        gray = deep_to_l(img)
        return gray if target == "L" else gray.convert("RGB")
    if mode in ALPHA or "transparency" in img.info:
        with_alpha = "LA" if mode in ("LA", "La") else "RGBA"
        if mode != with_alpha:
            img = img.convert(with_alpha)  # palette/key transparency, premultiplied alpha -> straight alpha
        alpha = img.getchannel("A")
        color = img.convert(target)  # drops the alpha
        if alpha.getextrema()[0] == 255:
            return color
        base = Image.new(target, img.size, background if target == "L" else (background,) * 3)
        base.paste(color, mask=alpha)  # color * a + background * (1 - a)
        return base
    if mode == target:
        return img
    if mode == "LAB" and target == "L":
        try:
            return img.convert("RGB").convert("L")
        except ValueError:  # Pillow without LAB -> RGB: its lightness channel
            return img.getchannel("L")
    return img.convert(target)


def deep_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8 bits, scaled by the bit depth (I;16: v / 257, rounded).

    Float images are taken as [0, 1] (the convention of float TIFF/PFM); NaN counts as 0.
    """
    if img.mode == "F":
        a = np.array(img, dtype=np.float32)
        np.nan_to_num(a, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        np.clip(a, 0.0, 1.0, out=a)
        a *= 255.0
        np.rint(a, out=a)
        return Image.fromarray(a.astype(np.uint8), "L")
    bits = bit_depth(img)
    top = (1 << bits) - 1
    a = np.array(img)
    if not (a.dtype.kind == "u" and a.dtype.itemsize == 2 and top == 65535):  # else every uint16 is in range
        np.clip(a, 0, top, out=a)
    if top <= 65535:
        lut = np.rint(np.arange(top + 1, dtype=np.float64) * (255.0 / top)).astype(np.uint8)
        out = lut[a]
    else:
        out = (a >> (bits - 8)).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(out), "L")


def bit_depth(img: Image.Image) -> int:
    """Bits per sample of a 16/32-bit grayscale image: a TIFF says (BitsPerSample); PNG and PNM samples
    are 16-bit whether Pillow opens them as I;16 or as I."""
    limit = 16 if img.mode in SIXTEEN else 31
    if img.format == "TIFF":
        try:
            bits = img.tag_v2.get(258)
            bits = bits[0] if isinstance(bits, tuple) else bits
            if isinstance(bits, int) and 8 <= bits:
                return min(bits, limit)
        except Exception:  # a damaged tag: assume the mode's depth
            pass
    return 16
