"""Embedding networks (Keras 3).

Only ops that quantise to full int8 and that the Edge TPU compiler maps: Conv2D (with
BatchNormalization folded in at export), ReLU, MaxPool2D, Add, global average pooling, Flatten.
The input is named ``image`` so exported models have a stable signature.
"""

from __future__ import annotations

from collections.abc import Callable

from edgemeta.errors import EdgemetaError

# Keras is imported inside the builders, so that the registry (which configuration checks
# read) costs nothing to import.


def _conv_bn(x, filters: int, name: str, relu: bool = True):
    from keras import layers

    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    # momentum 0.9 (PyTorch's 0.1): running statistics keep up with a fast-moving backbone
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def conv4(input_shape: tuple[int, int, int], width: int = 64, batch_size: int | None = None):
    """Conv-4 of Snell et al. (2017), "Prototypical Networks for Few-shot Learning":
    4 x [conv 3x3 (width), batch norm, ReLU, max-pool 2x2], flattened.
    A 28x28 Omniglot image gives a 64-d embedding, an 84x84 image 1600-d."""
    import keras
    from keras import layers

    inp = keras.Input(input_shape, batch_size=batch_size, name="image")
    x = inp
    for i in range(4):
        x = _conv_bn(x, width, f"block{i + 1}")
        x = layers.MaxPool2D(2, name=f"block{i + 1}_pool")(x)
    return keras.Model(inp, layers.Flatten(name="embedding")(x), name="conv4")


def resnet12(input_shape: tuple[int, int, int], widths: tuple[int, ...] = (64, 128, 256, 512),
             batch_size: int | None = None):
    """ResNet-12 (Oreshkin et al., 2018, TADAM; Lee et al., 2019, MetaOptNet): four residual
    blocks of three 3x3 conv-BN layers with a 1x1 conv-BN shortcut, each followed by a 2x2
    max-pool, then global average pooling. ReLU instead of leaky ReLU, for the Edge TPU."""
    import keras
    from keras import layers

    inp = keras.Input(input_shape, batch_size=batch_size, name="image")
    x = inp
    for i, w in enumerate(widths):
        name = f"res{i + 1}"
        shortcut = layers.Conv2D(w, 1, use_bias=False, name=f"{name}_short_conv")(x)
        shortcut = layers.BatchNormalization(momentum=0.9, name=f"{name}_short_bn")(shortcut)
        x = _conv_bn(x, w, f"{name}_a")
        x = _conv_bn(x, w, f"{name}_b")
        x = _conv_bn(x, w, f"{name}_c", relu=False)
        x = layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([x, shortcut]))
        x = layers.MaxPool2D(2, padding="same", name=f"{name}_pool")(x)
    return keras.Model(inp, layers.GlobalAveragePooling2D(name="embedding")(x), name="resnet12")


BACKBONES: dict[str, Callable] = {"conv4": conv4, "resnet12": resnet12}


def build_backbone(name: str, input_shape: tuple[int, int, int], batch_size: int | None = None, **kwargs):
    """Build a backbone by name, e.g. ``build_backbone("conv4", (28, 28, 1))``."""
    if name not in BACKBONES:
        raise EdgemetaError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name](input_shape, batch_size=batch_size, **kwargs)
