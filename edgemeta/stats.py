"""The few-shot protocol's summary of per-episode figures, shared by the host's evaluation and the board's demo."""

from __future__ import annotations

import math

import numpy as np


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and 95% confidence half-width (normal approximation) of per-episode values."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))
