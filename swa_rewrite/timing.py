"""The one timing helper and the one progress bar of the benchmarks and the CLI.

``median_us(fn)`` times ``fn`` the same way everywhere: CUDA events on a CUDA device (the GPU's own clock,
no host round trip inside the timed region), ``time.perf_counter`` on the CPU, warm-up calls first, the
median in microseconds; ``flush_l2=True`` empties the GPU's L2 cache before each timed call (bandwidth
benchmarks). ``graph_replay_us(fn)`` captures ``fn`` once in a CUDA graph and times replays of it the same
way (launch overhead out of the picture, as a serving engine replays decode steps). Importing this module
needs no GPU; only the CUDA paths do. ``progress(iterable)`` is a ``tqdm`` bar on stderr, off when stderr is
not a terminal (logs, CI, pipes) or when the caller says so.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Iterable, Optional, TypeVar

import torch

T = TypeVar("T")

__all__ = ["graph_replay_us", "median_us", "progress"]

_L2_FLUSH_BYTES = 256 << 20   # larger than any current GPU's L2 (H100/H200: 50 MB), as triton.testing uses


def median_us(fn: Callable[[], object], iters: int = 30, *, warmup: int = 3,
              device: torch.device | str | None = None, flush_l2: bool = False) -> float:
    """Median microseconds of ``fn()`` over ``iters`` timed calls after ``warmup`` untimed ones.

    ``device``: where ``fn`` runs; CUDA (the default when CUDA is available) is timed with CUDA events and
    synchronised after the warm-up and per call, anything else with ``time.perf_counter``. ``flush_l2``
    (CUDA only, ignored elsewhere): overwrite a 256 MiB buffer before each timed call, outside the timed
    region, so ``fn`` reads its inputs from device memory rather than L2. ``ValueError`` for ``iters < 1``
    or ``warmup < 0``.
    """
    _check_counts(iters, warmup)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        return statistics.median(_wall_times(fn, iters))
    torch.cuda.synchronize(device)
    flush = None
    if flush_l2:
        scratch = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        flush = scratch.zero_
    return statistics.median(_cuda_times(fn, iters, flush))


def graph_replay_us(fn: Callable[[], object], iters: int = 20, *, warmup: int = 1) -> float:
    """Median microseconds of one replay of a CUDA graph that captures one call of ``fn``.

    ``warmup`` eager calls first (Triton compiles, allocators settle), then one more on a side stream (what
    capture requires), the capture, one untimed replay, and ``iters`` replays timed with CUDA events, each
    synchronised. ``fn`` must be capturable: no host synchronisation, no new allocations it relies on after
    the capture. To time several calls as one graph (e.g. rotating input sets, so L2 holds none of the next
    set), pass one ``fn`` that makes them all and divide by their count. ``RuntimeError`` without CUDA;
    ``ValueError`` for ``iters < 1`` or ``warmup < 0``.
    """
    _check_counts(iters, warmup)
    if not torch.cuda.is_available():
        raise RuntimeError("graph_replay_us needs a CUDA device (CUDA graphs); use median_us on the CPU")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return statistics.median(_cuda_times(graph.replay, iters))


def _check_counts(iters: int, warmup: int) -> None:
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")


def _cuda_times(fn: Callable[[], object], iters: int,
                flush: Optional[Callable[[], object]] = None) -> list[float]:
    times = []
    for _ in range(iters):
        if flush is not None:
            flush()
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
