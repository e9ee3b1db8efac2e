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


def test_fused_training_forward_is_the_keras_training_pass():
    import tensorflow as tf

    from edgemeta.host.backbones import fused_training_forward

    tf.keras.utils.set_random_seed(3)
    keras_model, fused_model = build_backbone("conv4", (28, 28, 1)), build_backbone("conv4", (28, 28, 1))
    for layer in keras_model.layers:  # BN scale/offset and moving statistics away from their defaults
        if layer.weights and "bn" in layer.name:
            for w in layer.weights:
                w.assign(np.random.default_rng(len(w.path)).uniform(0.5, 1.5, w.shape).astype(np.float32))
    fused_model.set_weights(keras_model.get_weights())
    forward = fused_training_forward(fused_model)
    assert forward is not None and fused_training_forward(build_backbone("resnet12", (28, 28, 1))) is None
    x = tf.constant(np.random.default_rng(0).random((30, 28, 28, 1), np.float32))
    outs, grads = [], []
    for model, fn in ((keras_model, lambda v: keras_model(v, training=True)), (fused_model, forward)):
        with tf.GradientTape() as tape:
            out = fn(x)
            loss = tf.reduce_sum(out * tf.cos(tf.range(out.shape[1], dtype=tf.float32)))
        outs.append(out.numpy())
        grads.append([g.numpy() for g in tape.gradient(loss, model.trainable_variables)])
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for g_fused, g_keras in zip(grads[1], grads[0], strict=True):
        np.testing.assert_allclose(g_fused, g_keras, rtol=1e-3, atol=1e-5 * np.abs(g_keras).max())
    for a, b in zip(fused_model.non_trainable_weights, keras_model.non_trainable_weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)  # the moving statistics' update
