"""Training-time augmentation of episode images (TensorFlow; the rest of the data package needs none,
so this module is imported only by the trainer)."""

from __future__ import annotations

import math

import tensorflow as tf


def random_affine(images, seed, shift: float, rotate: float, scale: float):
    """Shift, rotate and scale each image of a batch (N, H, W, C) by its own stateless random draw.

    Edges are extended from the border pixels, which suits both white-background scans and photos."""
    shape = tf.shape(images)
    n, h, w = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 4)

    def draw(i, bound):
        return tf.random.stateless_uniform([n], seeds[i], -bound, bound)

    theta = draw(0, rotate * math.pi / 180)
    s = 1.0 + draw(1, scale)
    tx, ty = draw(2, shift) * w, draw(3, shift) * h
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # The op maps each output pixel to the input pixel it samples: the inverse of rotate-scale-shift about the centre.
    a0, a1 = tf.cos(theta) / s, tf.sin(theta) / s
    b0, b1 = -tf.sin(theta) / s, tf.cos(theta) / s
    a2 = cx - a0 * (cx + tx) - a1 * (cy + ty)
    b2 = cy - b0 * (cx + tx) - b1 * (cy + ty)
    zeros = tf.zeros_like(theta)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="NEAREST")


def spec_masks(images, seed, time_width: int, freq_width: int):
    """SpecAugment-style masks (Park et al., 2019): per sample, one band of up to `time_width` rows (time
    frames) and one of up to `freq_width` columns (mel bins) set to 0, the spectrogram's floor."""
    shape = tf.shape(images)
    n, rows, cols = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 4)

    def band(i, width, size):
        w = tf.random.stateless_uniform([n], seeds[i], 0, width + 1, dtype=tf.int32)
        start = tf.random.stateless_uniform([n], seeds[i + 1], 0, tf.int32.max, dtype=tf.int32) % tf.maximum(size - w + 1, 1)
        pos = tf.range(size)[None, :]
        return (pos >= start[:, None]) & (pos < (start + w)[:, None])  # (n, size)

    keep = tf.ones_like(images[..., :1], dtype=tf.bool)[..., 0]
    if time_width:
        keep &= ~band(0, time_width, rows)[:, :, None]
    if freq_width:
        keep &= ~band(2, freq_width, cols)[:, None, :]
    return images * tf.cast(keep, images.dtype)[..., None]
