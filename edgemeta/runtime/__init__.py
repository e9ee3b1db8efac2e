"""The board side: numpy and a TFLite interpreter only, never TensorFlow or Keras."""
