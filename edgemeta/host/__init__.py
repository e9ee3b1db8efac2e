"""Host side: meta-training, evaluation and export (TensorFlow). Nothing on the board imports this package."""
