"""The one timing helper and the one progress bar of the benchmarks and the CLI.

``median_us(fn)`` times ``fn`` the same way everywhere: CUDA events on a CUDA device (the GPU's own clock,
no host round trip inside the timed region), ``time.perf_counter`` on the CPU, warm-up calls first, the
median in microseconds; ``flush_l2=True`` empties the GPU's L2 cache before each timed call (bandwidth
benchmarks). ``graph_replay_us(fn)`` captures ``fn`` once in a CUDA graph and times replays of it the same
way (launch overhead out of the picture, as a serving engine replays decode steps). ``paired_us(fns)`` times
several callables interleaved call by call, and ``paired_ratio`` compares two of them round by round: a ratio
that the host's drift does not move (host-paced steps). Importing this module
needs no GPU; only the CUDA paths do. ``progress(iterable)`` is a ``tqdm`` bar on stderr, off when stderr is
not a terminal (logs, CI, pipes) or when the caller says so.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Iterable, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")

__all__ = ["graph_replay_us", "median_us", "paired_ratio", "paired_us", "progress"]

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


def paired_us(fns: Sequence[Callable[[], object]], iters: int = 30, *, warmup: int = 3,
              device: torch.device | str | None = None) -> list[list[float]]:
    """Microseconds of every timed call of each of ``fns``, the callables interleaved call by call: round ``i``
    calls each once, in turn (the order rotating from round to round), so neighbouring calls of different callables
    see the same machine. Where the host paces the calls (an eager step) its speed drifts by tens of percent within
    seconds; the ratio of two callables' calls from one round (``paired_ratio``) does not drift with it, as medians
    of separate runs do. Each callable gets ``warmup`` untimed calls first; timed as ``median_us`` (CUDA events and a
    synchronisation per call on CUDA, ``perf_counter`` elsewhere). Returns one list of ``iters`` times per callable.
    ``ValueError`` for ``iters < 1``, ``warmup < 0`` or no callables."""
    _check_counts(iters, warmup)
    if not fns:
        raise ValueError("paired_us needs at least one callable")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(device).type == "cuda"
    for fn in fns:
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    n = len(fns)
    for i in range(iters):
        for k in range(n):
            j = (i + k) % n
            times[j].extend(_cuda_times(fns[j], 1) if cuda else _wall_times(fns[j], 1))
    return times


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over rounds of ``a[i] / b[i]`` (two callables' times from ``paired_us``): how many times longer
    ``a`` took than ``b`` on the same machine state."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    return statistics.median(x / y for x, y in zip(a, b))


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
