"""The one timing helper and the one progress bar of the benchmarks and the CLI.

``median_us(fn)`` times ``fn`` the same way everywhere: CUDA events on a CUDA device (the GPU's own clock,
no host round trip inside the timed region), ``time.perf_counter`` on the CPU, warm-up calls first, the
median in microseconds. ``progress(iterable)`` is a ``tqdm`` bar on stderr, off when stderr is not a terminal
(logs, CI, pipes) or when the caller says so.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Iterable, Optional, TypeVar

import torch

T = TypeVar("T")

__all__ = ["median_us", "progress"]


def median_us(fn: Callable[[], object], iters: int = 30, *, warmup: int = 3,
              device: torch.device | str | None = None) -> float:
    """Median microseconds of ``fn()`` over ``iters`` timed calls after ``warmup`` untimed ones.

    ``device``: where ``fn`` runs; CUDA (the default when CUDA is available) is timed with CUDA events and
    synchronised per call, anything else with ``time.perf_counter``. ``ValueError`` for ``iters < 1`` or
    ``warmup < 0``.
    """
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    for _ in range(warmup):
        fn()
    times = _cuda_times(fn, iters) if torch.device(device).type == "cuda" else _wall_times(fn, iters)
    return statistics.median(times)


def _cuda_times(fn: Callable[[], object], iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)      # ms -> µs
    return times


def _wall_times(fn: Callable[[], object], iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return times


def progress(iterable: Iterable[T], *, total: Optional[int] = None, desc: str = "",
             disable: bool = False) -> Iterable[T]:
    """``iterable`` with a ``tqdm`` progress bar on stderr; the bar is off when ``disable`` or when stderr
    is not a terminal, so logs and captured output stay clean. ``bar.set_postfix_str`` names the step."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=disable or not sys.stderr.isatty())
