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

Every direct launch is also kept as a ``Relaunch`` among its kernel's latest few; a later launch of that kernel that
one of them fits in full — ``Relaunch.fits`` and the tensors' dtypes and 16-byte alignment (``tensors_fit``): all
the binder specialises on — is issued through it, without the binder (the model's norms, rope and activation launch
this way from their second step).

Replay (``recording`` / ``replaying``, issue 14): an op that decides its kernels from its arguments' shapes once
(``ops.decode_plans``) records the launches of a call and replays them on later calls of the same shapes, each
launch then skipping the binder too: a recorded launch (``Relaunch``) is reused when the same kernel is launched
with the same grid, the same keyword arguments, the same other positional arguments (value and type) and the same
descriptor objects, on the same device — the tensors are the new call's; the op's plan key pins their dtypes and
16-byte alignment, the rest of what the binder would specialise on. Anything else takes the ordinary path.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Optional

import torch
import triton

from .._threads import thread_value
from . import interpreting

# The Triton versions whose JIT internals ``launch`` reads (``JITFunction.device_caches``, the NVIDIA
# ``CudaLauncher`` and its tensor-descriptor wrapper); others take ``kernel[grid]``.
DIRECT_TRITON = ("3.6",)

_ENTRIES: dict = {}        # (kernel, device, specialisation, options, knobs) -> _Entry, or None: not direct
_DESC_ARGS: dict = {}      # (id(descriptor), index) -> (weak reference to it, its launcher arguments)
_MAX = 4096
_STATE: dict = {}          # "ok": whether this Triton has what ``launch`` reads (checked once), "triton": its
                           # knobs and driver modules; "calls", "replays"
_LOCAL = threading.local()  # .record: the list ``recording`` fills; .replay: the Relaunches ``replaying`` hands out
_RECENT: dict = {}         # kernel -> its latest Relaunches, newest first (``launch`` tries them before the binder)
_RECENT_MAX = 8


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
    record = getattr(_LOCAL, "record", None)
    if not _direct_ok() or callable(grid):
        return _jit(record, kernel, grid, args, kwargs)
    knobs, driver = _STATE["triton"]
    runtime = knobs.runtime
    if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
        return _jit(record, kernel, grid, args, kwargs)
    device = driver.active.get_current_device()
    replay = getattr(_LOCAL, "replay", None)
    if replay:
        relaunch = replay.pop()
        if relaunch is not None and relaunch.fits(kernel, grid, device, args, _pinned(kwargs), knobs):
            return relaunch.issue(driver, device, args, record, "replays")
    recent = _RECENT.get(kernel)
    pinned = _pinned(kwargs) if recent else None
    for relaunch in recent or ():
        if relaunch.fits(kernel, grid, device, args, pinned, knobs) and relaunch.tensors_fit(args):
            return relaunch.issue(driver, device, args, record, "calls")
    try:
        bound, specialization, options = kernel.device_caches[device][4](*args, **kwargs)
        key = (kernel, device, tuple(specialization), tuple(options.items()), runtime.debug,
               knobs.compilation.instrumentation_mode)
        entry = _ENTRIES.get(key, False)
    except Exception:                      # an argument the binder or a key cannot take: the JIT path says why
        return _jit(record, kernel, grid, args, kwargs)
    if entry is False or entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if entry is False:
            if len(_ENTRIES) >= _MAX:
                _ENTRIES.clear()
            _ENTRIES[key] = _prepare(compiled) if compiled is not None else None
        if record is not None:
            record.append(None)            # (compiled here, or not direct: a plan records again, or launches so)
        return compiled
    bound_values = list(bound.values())
    values = bound_values
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
    relaunch = Relaunch.make(entry, kernel, (g0, g1, g2), tuple(grid), device, args, kwargs, bound_values, knobs)
    if relaunch is not None:
        recent = _RECENT.setdefault(kernel, [])
        recent.insert(0, relaunch)
        del recent[_RECENT_MAX:]
    if record is not None:
        record.append(relaunch)
    return compiled


def _jit(record, kernel, grid, args, kwargs):
    """``kernel[grid]``; a launch ``recording`` sees as one it cannot replay."""
    if record is not None:
        record.append(None)
    return kernel[grid](*args, **kwargs)


def _pinned(kwargs: dict) -> tuple:
    """``kwargs`` as ``(name, type, value)`` triples: compared as a tuple, a type differs before any value is compared
    (a tensor's ``==`` is never asked; ``True``, ``1`` and ``1.0`` specialise differently)."""
    return tuple((k, type(v), v) for k, v in kwargs.items())


class Relaunch:
    """One launch recorded by ``launch`` (``recording``), to be issued again through the compiled kernel's C launcher
    with a later call's positional arguments and without the binder (``launch`` checks ``fits`` first)."""

    __slots__ = ("kernel", "grid", "grid3", "device", "kwargs", "scalars", "scalar_values", "tensors", "descs",
                 "pieces", "tail", "raw", "function", "fixed", "compiled", "debug", "instrumentation")

    @classmethod
    def make(cls, entry, kernel, grid3, grid, device, args, kwargs, bound_values, knobs) -> Optional["Relaunch"]:
        """The Relaunch of a direct launch, or None where its positional arguments are not the binder's first values
        or a descriptor is passed by keyword."""
        n = len(args)
        if len(bound_values) < n or any(a is not b for a, b in zip(args, bound_values)):
            return None
        if any(position >= n for position, _ in entry.descs):
            return None
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return None
        try:      # held weakly: a plan must not keep a dropped cache's descriptors (their encodings are kept here)
            descs = tuple((position, weakref.ref(args[position])) for position, _ in entry.descs)
        except TypeError:
            return None
        self = cls()
        self.kernel, self.grid, self.grid3, self.device = kernel, grid, grid3, device
        self.kwargs = _pinned(kwargs)
        # Every positional argument but the tensors and descriptors is pinned, with its type (True, 1 and 1.0
        # specialise differently).
        desc_positions = {position for position, _ in entry.descs}
        self.scalars = tuple(i for i, a in enumerate(args)
                             if i not in desc_positions and not isinstance(a, torch.Tensor))
        self.scalar_values = tuple((type(args[i]), args[i]) for i in self.scalars)
        # what the binder specialises a tensor on: its dtype and whether its address is 16-byte aligned
        self.tensors = tuple((i, a.dtype, a.data_ptr() % 16 == 0) for i, a in enumerate(args)
                             if isinstance(a, torch.Tensor))
        self.descs = descs
        # The launcher's values: args[lo:hi] then a descriptor's encoded arguments, piece by piece, then the
        # keyword and default values (constexprs and what the key pins).
        pieces, last = [], 0
        for position, k in entry.descs:
            pieces.append((last, position, tuple(_desc_args(args[position], k, entry.metas[k]))))
            last = position + 1
        pieces.append((last, n, ()))
        self.pieces = tuple(pieces)
        self.tail = tuple(bound_values[n:])
        self.raw, self.function, self.fixed, self.compiled = entry.raw, entry.compiled.function, entry.fixed, \
            entry.compiled
        self.debug, self.instrumentation = knobs.runtime.debug, knobs.compilation.instrumentation_mode
        return self

    def fits(self, kernel, grid, device, args, pinned_kwargs, knobs) -> bool:
        """Whether a launch of ``kernel[grid](*args, **kwargs)`` on ``device`` (``pinned_kwargs``: ``_pinned(kwargs)``)
        is this one's with new tensors."""
        return (kernel is self.kernel and device == self.device and tuple(grid) == self.grid
                and len(args) == self.pieces[-1][1] and pinned_kwargs == self.kwargs
                and tuple((type(args[i]), args[i]) for i in self.scalars) == self.scalar_values
                and all(args[position] is desc() for position, desc in self.descs)
                and knobs.runtime.debug == self.debug
                and knobs.compilation.instrumentation_mode == self.instrumentation)

    def tensors_fit(self, args: tuple) -> bool:
        """Whether ``args``' tensors specialise as the recorded ones (dtype, 16-byte alignment): with ``fits``, the
        binder's whole specialisation, so the call is the recorded kernel's."""
        for i, dtype, aligned in self.tensors:
            t = args[i]
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or (t.data_ptr() % 16 == 0) != aligned:
                return False
        return True

    def issue(self, driver, device, args: tuple, record: Optional[list], counter: str):
        """Launch it with ``args``' tensors on ``device``'s current stream (counted as ``counter``, appended to an
        open ``record``); returns the compiled kernel, as ``launch`` does."""
        self.raw(*self.grid3, driver.active.get_current_stream(device), self.function, *self.fixed,
                 *self.values(args))
        _STATE[counter] = _STATE.get(counter, 0) + 1
        if record is not None:
            record.append(self)
        return self.compiled

    def values(self, args: tuple) -> tuple:
        out: tuple = ()
        for lo, hi, encoded in self.pieces:
            out += args[lo:hi] + encoded
        return out + self.tail


def recording():
    """Within it each ``launch`` appends its ``Relaunch`` (None: a launch that cannot be replayed) to the list it
    yields (this thread's launches)."""
    return thread_value(_LOCAL, "record", [])


def replay_begin(launches: list) -> object:
    """Hand ``launches`` (in order) to this thread's next ``launch`` calls, each taking one; returns what
    ``replay_end`` restores (a function pair, not a context manager: it is on a decode call's host path)."""
    saved = getattr(_LOCAL, "replay", None)
    _LOCAL.replay = launches[::-1]
    return saved


def replay_end(saved: object) -> None:
    _LOCAL.replay = saved


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
    """How many launches went through the C launcher directly (tests), replays included."""
    return _STATE.get("calls", 0) + _STATE.get("replays", 0)


def replayed_calls() -> int:
    """How many launches were replays of a recorded launch (tests)."""
    return _STATE.get("replays", 0)
