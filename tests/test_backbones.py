import numpy as np
import pytest

from edgemeta.backbones import build_backbone
from edgemeta.errors import EdgemetaError

# Ops that full-integer quantisation and the Edge TPU compiler handle (BN folds into the conv).
EDGE_FRIENDLY = {"InputLayer", "Conv2D", "BatchNormalization", "ReLU", "MaxPooling2D", "Add", "Flatten", "GlobalAveragePooling2D"}


@pytest.mark.parametrize("name, shape, dim", [
    ("conv4", (28, 28, 1), 64), ("conv4", (84, 84, 3), 1600), ("conv4-same", (28, 28, 1), 256), ("resnet12", (28, 28, 1), 512)])
def test_backbones_shapes_and_ops(name, shape, dim):
    model = build_backbone(name, shape)
    out = model(np.zeros((2, *shape), np.float32), training=False)
    assert out.shape == (2, dim)
    assert {type(layer).__name__ for layer in model.layers} <= EDGE_FRIENDLY
    assert model.inputs[0].name == "image"


def test_static_batch_for_boards():
    assert build_backbone("conv4", (28, 28, 1), batch_size=1).input_shape == (1, 28, 28, 1)


def test_unknown_backbone():
    with pytest.raises(EdgemetaError, match="unknown backbone"):
        build_backbone("alexnet", (28, 28, 1))


def test_conv4_same_shares_the_weights_of_conv4():
    a, b = build_backbone("conv4", (28, 28, 1)), build_backbone("conv4-same", (28, 28, 1))
    b.set_weights(a.get_weights())  # same variables, so one fine-tunes from the other
    x = np.random.default_rng(0).random((2, 28, 28, 1)).astype(np.float32)
    ea, eb = a(x, training=False).numpy(), b(x, training=False).numpy().reshape(2, 2, 2, 64)
    # the top-left cell of the padded 2x2 map pools the same 2x2 window as the 1x1 map
    assert np.allclose(ea, eb[:, 0, 0], atol=1e-5)
