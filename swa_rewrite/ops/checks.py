"""The checks switch and the generic argument checks every op, the model and the runtime share.

Shape and dtype checks cost nothing and always run (they also run at trace time in the fake
implementations). Data checks — slot ranges, block-table bounds — read tensor values, which
synchronises with the device, so they run only in *checked mode*: eager execution outside CUDA-graph
capture, outside Dynamo tracing and outside ``checks_disabled()`` blocks (``swa_rewrite.compile`` runs its
compiled steps in one), unless ``SWA_REWRITE_CHECKS=0`` is set in the environment.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import threading
from typing import Any, Optional

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)

_state = threading.local()


@contextlib.contextmanager
def checks_disabled():
    """Turn data checks off in this thread for the block (e.g. around a compiled step)."""
    previous = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = previous


def checks_enabled() -> bool:
    """Whether data-dependent input checks run now (see module docstring)."""
    if getattr(_state, "disabled", False) or os.environ.get("SWA_REWRITE_CHECKS", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def fail(message: str) -> None:
    raise ValueError(message)


def check_int(name: str, value: Any, *, minimum: Optional[int] = None) -> int:
    """``value`` as a Python ``int``: ints and numpy integers pass; bools, floats and anything else raise
    ``TypeError``, values below ``minimum`` ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        fail(f"{name} must be >= {minimum}, got {value}")
    return value


def check_index(name: str, t: torch.Tensor, dim: int) -> None:
    if t.dtype not in _INDEX_DTYPES:
        fail(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != dim:
        fail(f"{name} must have {dim} dimension(s), got shape {tuple(t.shape)}")


def check_group(name: str, t: torch.Tensor, group: int) -> None:
    """``group`` indexes the leading cache-group dimension of ``t`` (``block_tables`` or ``slot_mapping``)."""
    if not 0 <= group < t.shape[0]:
        fail(f"group {group} is out of range for {name} of {t.shape[0]} cache group(s), shape {tuple(t.shape)}")
