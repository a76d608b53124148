"""``launch(kernel, grid, *args, **kwargs)``: ``kernel[grid](*args, **kwargs)`` with less host time per call.

A decode step's host time is most of an eager or uncompiled step on a GPU (issue 14), and Triton 3.6's JIT launch
costs ~25-35 µs of it per kernel (``benchmarks/bench_launch.py``, H200): the binder that works out the arguments'
specialisation (~4-11 µs), then ``JITFunction.run``'s option handling and cache lookups, then the compiled kernel's
launcher object, which for a kernel with TMA descriptor arguments encodes every descriptor's ``CUtensorMap`` again
on every call (~7 µs for three), then the C launcher (~5-8 µs).

Here the binder still runs — the specialisation it computes (dtypes, 16-byte alignment of pointers, integers equal
to 1 or divisible by 16, constexpr values) is what selects the compiled kernel, so a call is never served by a
kernel compiled for other assumptions — and the compiled kernel is then launched through its C launcher directly,
with each descriptor's encoded arguments kept on the side for as long as that descriptor object lives (the Gluon
kernels' descriptors are made once per cache tensor, ``gluon_mla._remembered``). The first call of each
specialisation goes through ``kernel[grid]`` (which compiles), as does every call under the interpreter, with a
launch hook set (profilers), with a kernel needing scratch memory, with a Triton whose internals this was not
written against (``DIRECT_TRITON``) or with ``SWA_REWRITE_DIRECT_LAUNCH=0`` in the environment (read once): those
calls are exactly ``kernel[grid]``.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Optional

import triton

from . import interpreting

# The Triton versions whose JIT internals ``launch`` reads (``JITFunction.device_caches``, the NVIDIA
# ``CudaLauncher`` and its tensor-descriptor wrapper); others take ``kernel[grid]``.
DIRECT_TRITON = ("3.6",)

_ENTRIES: dict = {}        # (kernel, device, specialisation, options, knobs) -> _Entry, or None: not direct
_DESC_ARGS: dict = {}      # (id(descriptor), index) -> (weak reference to it, its launcher arguments)
_MAX = 4096
_STATE: dict = {}          # "ok": whether this Triton has what ``launch`` reads (checked once), "triton": its
                           # knobs and driver modules; "calls"


class _Entry:
    """One compiled kernel, ready to be relaunched: its C launcher, the positions of its descriptor arguments with
    their metadata, and the launcher's fixed arguments."""

    __slots__ = ("compiled", "raw", "descs", "metas", "fixed")

    def __init__(self, compiled, raw, descs, metas, fixed):
        self.compiled, self.raw, self.descs, self.metas, self.fixed = compiled, raw, descs, metas, fixed


def _direct_ok() -> bool:
    ok = _STATE.get("ok")
    if ok is None:
        ok = False
        if (not interpreting() and triton.__version__.startswith(DIRECT_TRITON)
                and os.environ.get("SWA_REWRITE_DIRECT_LAUNCH", "1") != "0"):
            try:
                from triton import knobs
                from triton.backends.nvidia import driver as nv_driver
                from triton.runtime import driver
                ok = (hasattr(knobs.runtime, "launch_enter_hook") and hasattr(nv_driver, "make_tensordesc_arg")
                      and hasattr(nv_driver, "CudaLauncher")
                      and getattr(nv_driver, "_BASE_ARGS_FORMAT", None) == "iiiKKppOOOOOO"
                      and driver.active is not None)
                _STATE["triton"] = (knobs, driver)     # for ``launch``: no import statement on its path
            except Exception:
                ok = False
        _STATE["ok"] = ok
    return ok


def _prepare(compiled) -> Optional[_Entry]:
    """The ``_Entry`` of a compiled kernel, or None when its launcher is not the one this module knows."""
    from triton.backends.nvidia import driver as nv_driver

    run = getattr(compiled, "run", None)
    if type(run) is not nv_driver.CudaLauncher or run.global_scratch_size or run.profile_scratch_size:
        return None
    raw = run.launch
    signature = list(compiled.src.signature.values())
    positions = [i for i, ty in enumerate(signature) if isinstance(ty, str) and ty.startswith("tensordesc")]
    descs, metas = (), ()
    if positions:
        cells = [c.cell_contents for c in (getattr(raw, "__closure__", None) or ())]
        inner = [c for c in cells if type(c).__name__ == "builtin_function_or_method"]
        if len(inner) != 1:
            return None
        raw = inner[0]
        metas = tuple(getattr(compiled.metadata, "tensordesc_meta", None) or ())
        if len(metas) != len(positions) or any(m is None for m in metas):
            return None                    # (descriptors without metadata pass their tensor: not kept here)
        descs = tuple(zip(positions, range(len(positions))))
    elif type(raw).__name__ != "builtin_function_or_method":
        return None
    fixed = (run.launch_cooperative_grid, run.launch_pdl, None, None, compiled.packed_metadata, None, None, None)
    return _Entry(compiled, raw, descs, metas, fixed)


def _desc_args(desc, k: int, meta) -> list:
    """The launcher arguments of descriptor ``desc`` (the ``k``-th of its kernel, ``meta`` its metadata): the encoded
    ``CUtensorMap`` (its address, shape, strides, box and swizzle: all fixed for one descriptor object), its shape and
    strides; made once per descriptor object while it lives (held weakly: a dropped descriptor is not kept)."""
    key = (id(desc), k)
    hit = _DESC_ARGS.get(key)
    if hit is not None and hit[0]() is desc:
        return hit[1]
    from triton.backends.nvidia import driver as nv_driver

    made = nv_driver.make_tensordesc_arg(desc, meta)
    try:
        ref = weakref.ref(desc)
    except TypeError:                      # not weakly referable: encoded per call, as the launcher would
        return made
    if len(_DESC_ARGS) >= _MAX:
        _DESC_ARGS.clear()
    _DESC_ARGS[key] = (ref, made)
    return made


def _hooked(hook) -> bool:
    """Whether a launch hook is set: Triton 3.6 keeps each hook as a ``HookChain`` object (never None), set once
    it has ``calls``; a hook assigned in place of the chain (a plain function) is set too."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(kernel, grid: tuple, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` (module docstring); returns the compiled kernel as that does."""
    if not _direct_ok() or callable(grid):
        return kernel[grid](*args, **kwargs)
    knobs, driver = _STATE["triton"]
    runtime = knobs.runtime
    if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
        return kernel[grid](*args, **kwargs)
    device = driver.active.get_current_device()
    try:
        bound, specialization, options = kernel.device_caches[device][4](*args, **kwargs)
        key = (kernel, device, tuple(specialization), tuple(options.items()), runtime.debug,
               knobs.compilation.instrumentation_mode)
        entry = _ENTRIES.get(key, False)
    except Exception:                      # an argument the binder or a key cannot take: the JIT path says why
        return kernel[grid](*args, **kwargs)
    if entry is False or entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if entry is False:
            if len(_ENTRIES) >= _MAX:
                _ENTRIES.clear()
            _ENTRIES[key] = _prepare(compiled) if compiled is not None else None
        return compiled
    values = list(bound.values())
    if entry.descs:
        final = []
        last = 0
        for position, k in entry.descs:
            final.extend(values[last:position])
            final.extend(_desc_args(values[position], k, entry.metas[k]))
            last = position + 1
        final.extend(values[last:])
        values = final
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
    compiled = entry.compiled
    entry.raw(g0, g1, g2, driver.active.get_current_stream(device), compiled.function, *entry.fixed, *values)
    _STATE["calls"] = _STATE.get("calls", 0) + 1
    return compiled


@contextlib.contextmanager
def jit_launches():
    """Within it every ``launch`` is ``kernel[grid]`` (benchmarks' A/B, debugging); as ``SWA_REWRITE_DIRECT_LAUNCH=0``
    for one block."""
    saved = _STATE.get("ok")
    _STATE["ok"] = False
    try:
        yield
    finally:
        if saved is None:
            _STATE.pop("ok", None)
        else:
            _STATE["ok"] = saved


def direct_calls() -> int:
    """How many launches went through the C launcher directly (tests)."""
    return _STATE.get("calls", 0)
