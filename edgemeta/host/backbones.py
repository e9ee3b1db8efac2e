"""Embedding networks (Keras 3).

Only ops that quantise to full int8 and that the Edge TPU compiler maps: Conv2D (with
BatchNormalization folded in at export), ReLU, MaxPool2D, Add, global average pooling, Flatten.
The input is named ``image`` so exported models have a stable signature.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgemeta.errors import EdgemetaError

# Keras is imported inside the builders, so that the registry (which configuration checks
# read) costs nothing to import.

MODEL_FILE = "model.keras"  # a trained backbone in a model folder (host/modeldir.py)


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


def fused_training_forward(model) -> Callable | None:
    """The training-mode forward pass of a plain chain of Conv2D (no bias), BatchNormalization, ReLU,
    MaxPool2D and Flatten layers (Conv-4) with TensorFlow's fused batch-norm kernel; None for any
    other model (ResNet-12's shortcuts), which then runs as Keras runs it.

    Keras 3's BatchNormalization computes its moments and the normalisation as separate ops, each a
    pass over the whole activation (for a 60-way 5-shot 5-query Omniglot episode, 600 x 28 x 28 x 64
    floats = 120 MB after the first conv), forward and backward: on a CPU those memory-bound passes
    cost more than the convolutions. `tf.compat.v1.nn.fused_batch_norm` does the same arithmetic in
    one kernel each way. The result is the Keras layer's: the batch statistics normalise with the
    biased variance, the moving statistics get Keras's update (the kernel returns the unbiased
    variance, rescaled here to Keras's biased one), from the same variables. Compare
    `model(x, training=True)` in `tests/test_backbones.py`.
    """
    import keras
    import tensorflow as tf

    if any(v.dtype != "float32" for v in model.weights):
        return None
    plan, previous = [], None
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            previous = layer
            continue
        try:  # a chain: each layer reads the one before it
            if previous is None or layer.input is not previous.output:
                return None
        except (AttributeError, ValueError):
            return None
        cfg = layer.get_config()
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.Conv2DTranspose):
            if (layer.use_bias or cfg["activation"] != "linear" or tuple(cfg["strides"]) != (1, 1)
                    or tuple(cfg["dilation_rate"]) != (1, 1) or cfg.get("groups", 1) != 1
                    or cfg["data_format"] != "channels_last"):
                return None
            plan.append(("conv", layer))
        elif isinstance(layer, keras.layers.BatchNormalization):
            if (cfg["axis"] not in (-1, 3, [-1], [3]) or not (cfg["center"] and cfg["scale"]) or cfg.get("renorm")
                    or cfg.get("synchronized")):
                return None
            plan.append(("bn", layer))
        elif isinstance(layer, keras.layers.ReLU):
            if cfg.get("max_value") is not None or cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
                return None
            plan.append(("relu", layer))
        elif isinstance(layer, keras.layers.MaxPooling2D):
            if cfg["data_format"] != "channels_last":
                return None
            plan.append(("pool", layer))
        elif isinstance(layer, keras.layers.Flatten):
            plan.append(("flatten", layer))
        else:
            return None
        previous = layer
    if previous is None or previous.output is not model.outputs[0] or not plan:
        return None

    def forward(x):
        if not model.trainable or not all(layer.trainable for _, layer in plan):
            return model(x, training=True)  # frozen layers: Keras's own rules
        for kind, layer in plan:
            if kind == "conv":
                x = tf.nn.conv2d(x, layer.kernel.value, strides=1, padding=layer.padding.upper())
            elif kind == "bn":
                x, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                    x, layer.gamma.value, layer.beta.value, epsilon=layer.epsilon, data_format="NHWC", is_training=True)
                n = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), variance.dtype)
                mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance * (n - 1.0) / n)
                m = layer.momentum
                layer.moving_mean.assign(layer.moving_mean * m + mean * (1.0 - m))
                layer.moving_variance.assign(layer.moving_variance * m + variance * (1.0 - m))
            elif kind == "relu":
                x = tf.nn.relu(x)
            elif kind == "pool":
                x = tf.nn.max_pool2d(x, layer.pool_size, layer.strides, layer.padding.upper())
            else:
                x = tf.reshape(x, [tf.shape(x)[0], -1])
        return x

    return forward


def load_keras(path: Path):
    """A saved Keras model, with a clear error when the file is damaged."""
    import keras

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a damaged file
        raise EdgemetaError(f"cannot load {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                            "the file is damaged, retrain or restore it") from None
