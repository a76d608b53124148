"""Checks of the plain (non-tensor) arguments of the public op functions and of ``Schedule``.

The ``torch.library`` dispatcher turns ``True`` into ``1`` before an op sees it and rejects a float ``int``
argument with a ``RuntimeError``; the Python faces check first, so a bool or a float is a ``TypeError``
naming the value, and NumPy integers (from a config array, say) are plain ints.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def int_argument(value: Any, name: str) -> int:
    """``value`` as an ``int``: Python and NumPy integers pass; bools, floats and anything else are a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def finite_scale(scale: Any) -> float:
    """The softmax ``scale`` of an attention op: a finite real number (a NaN would poison every output)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)
