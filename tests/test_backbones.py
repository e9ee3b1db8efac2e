import numpy as np
import pytest

from edgemeta.errors import EdgemetaError
from edgemeta.host.backbones import build_backbone

# Ops that full-integer quantisation and the Edge TPU compiler handle (BN folds into the conv).
EDGE_FRIENDLY = {"InputLayer", "Conv2D", "BatchNormalization", "ReLU", "MaxPooling2D", "Add", "Flatten", "GlobalAveragePooling2D"}


@pytest.mark.parametrize("name, shape, dim", [("conv4", (28, 28, 1), 64), ("conv4", (84, 84, 3), 1600), ("resnet12", (28, 28, 1), 512)])
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
