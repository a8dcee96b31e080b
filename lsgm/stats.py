"""Summary statistics of per-image numbers: mean with standard error, and nats → bits/dim (torch-free)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["bits_per_dim", "mean_and_stderr"]


def bits_per_dim(nats: float | np.ndarray, num_dims: int) -> float | np.ndarray:
    """bits/dim = nats / (ln 2 · D) (docs/algorithm.md §7.1 step 4).

    Args:
        nats: value(s) in nats per image.
        num_dims: D, the number of modelled dimensions (784 for cropped 28×28, 3072 for CIFAR-10).
    """
    if int(num_dims) < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    return nats / (math.log(2.0) * int(num_dims))


def mean_and_stderr(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and standard error ``std(ddof=1)/sqrt(n)`` over images (stderr NaN for a single value)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("values is empty; need at least one image")
    stderr = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), stderr
