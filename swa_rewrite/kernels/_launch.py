"""Relaunching a compiled kernel without the JIT's per-call binding (issue 14: eager decode steps are host-bound).

``kernel[grid](*args, **kwargs)`` binds every argument, computes its specialisation and the cache key, and — for
Gluon kernels with TMA descriptor arguments — derives the descriptors' signature on every call: 17 µs of host
time for a plain 16-argument kernel and ~77 µs for the Gluon decode kernel on the H200's host (RESULTS.md, issue
14), where the decode step issues one per layer. ``run_kernel`` does the first call of each specialisation through the
JIT (which compiles or finds the kernel) and keeps the ``CompiledKernel`` it returns under a key made of what the
JIT specialises on, exactly or more finely: each tensor's dtype and 16-byte alignment, every other argument's
value (ints, floats, bools, constexprs), each descriptor's dtype, alignment, shape, strides, block shape and
layout, and the launch options. Later calls with an equal key go straight to the compiled kernel's launcher — the
launch ``CompiledKernel.__getitem__`` performs, on the current device's current stream (a CUDA-graph capture's
too).

The JIT path is kept whenever this cannot be sure: under the interpreter, with launch hooks installed (profilers),
for a tensor not on a CUDA device or an argument of another kind, or when the JIT returns no compiled kernel. ``SWA_FAST_LAUNCH=0`` turns it off.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton

from . import interpreting

_MAX_ENTRIES = 512
_cache: dict[tuple, Any] = {}
_UNSURE = object()


def enabled() -> bool:
    return os.environ.get("SWA_FAST_LAUNCH", "1").strip() != "0" and not interpreting()


def _spec(arg) -> Any:
    """What the JIT's specialisation of ``arg`` depends on (or more); ``_UNSURE`` for an unknown kind."""
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0) if arg.is_cuda else _UNSURE
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return (type(arg), arg)
    base = getattr(arg, "base", None)
    if isinstance(base, torch.Tensor) and base.is_cuda and hasattr(arg, "block_shape"):   # a host TMA descriptor
        return (type(arg), base.dtype, base.data_ptr() % 16 == 0, tuple(arg.shape), tuple(arg.strides),
                tuple(arg.block_shape), getattr(arg, "layout", None), getattr(arg, "padding", None))
    value = getattr(arg, "value", _UNSURE)                                      # tl.constexpr
    if value is not _UNSURE and isinstance(value, (bool, int, float, str, type(None))):
        return (type(arg), value)
    return _UNSURE


def run_kernel(kernel, grid: tuple, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``; returns what it returns (the compiled kernel on a GPU)."""
    if not enabled():
        return kernel[grid](*args, **kwargs)
    names = kernel.arg_names
    try:
        params = list(args) + [kwargs[n] for n in names[len(args):]]
    except KeyError:                                    # a defaulted parameter: let the JIT bind it
        return kernel[grid](*args, **kwargs)
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names[len(args):]))
    specs = tuple(_spec(a) for a in params)
    if any(s is _UNSURE for s in specs):
        return kernel[grid](*args, **kwargs)
    device = triton.runtime.driver.active.get_current_device()
    key = (kernel, device, options, specs)
    compiled = _cache.get(key)
    knobs = triton.knobs.runtime
    if compiled is None or knobs.launch_enter_hook is not None or knobs.launch_exit_hook is not None:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is not None and hasattr(compiled, "packed_metadata") and hasattr(compiled, "function"):
            if len(_cache) >= _MAX_ENTRIES:
                _cache.clear()
            _cache[key] = compiled
        return compiled
    stream = triton.runtime.driver.active.get_current_stream(device)
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
    compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *params)
    return compiled
