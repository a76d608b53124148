"""The checks switch and the generic argument checks every op, the model and the runtime share.

Shape and dtype checks cost little and run on every eager call (they also run at trace time in the fake
implementations); inside an Inductor-compiled graph of ``swa_rewrite.backend`` they ran when it was traced and
Dynamo's guards hold them, so the ops skip them there (``compiled_graph``). The attention cores, whose shape checks
were ~40 % of an eager decode call's own Python, run them once per argument signature — every tensor's shape,
dtype and device and every scalar with its type, all those checks read — and skip them for a later call of a
signature that passed (``mla_attention._SIGNATURES``). Data checks — slot ranges,
block-table bounds — read tensor values, which synchronises with the device, so they run only in *checked mode*:
eager execution outside CUDA-graph capture, outside Dynamo tracing and outside ``checks_disabled()`` blocks
(``swa_rewrite.compile`` runs its compiled steps in one), unless ``SWA_REWRITE_CHECKS=0`` is set in the environment
(inside a model step, the environment and CUDA-graph capture are read once, the first time an op of the step asks).

A model step validates its metadata once, for every cache group and window (``step_check.checked_step_metadata``),
and runs its layers inside a ``validated_step()`` block. Within that block an op's batch check skips the data
checks — and with them their device-to-host copy — when the metadata tensors it is given are the very objects
(``is``) the step validated, for a rule at least as strict as its own (``batch_checks.check_batch``); shape and
dtype checks still run. Outside the block, or with any other tensor, an op checks in full: nothing is
remembered from one step to the next. (Within the block the validated tensors are trusted not to change: a model
step reads its metadata, it never writes it.)
"""

from __future__ import annotations

import contextlib
import numbers
import os
import threading
from typing import Any, Optional

import numpy as np
import torch

from .._threads import thread_value

_INDEX_DTYPES = (torch.int32, torch.int64)

_state = threading.local()


def checks_disabled():
    """Turn data checks off in this thread for the block (e.g. around a compiled step)."""
    return thread_value(_state, "disabled", True)


class compiled_graph:
    """``with compiled_graph(): <a call of an Inductor-compiled graph>`` (``compile.SWABackend`` wraps each graph it
    compiles in one): the ops run inside a graph whose fake implementations checked every shape, dtype and device
    of their arguments when AOTAutograd traced it, and Dynamo's guards — its shape environment's included —
    re-establish those facts before every call, so the ops skip repeating those checks (``shapes_traced``).
    Data checks are unchanged (``checks_enabled``). A class, not a generator context manager: entered on every
    call of the graph."""

    __slots__ = ("_previous",)

    def __enter__(self) -> "compiled_graph":
        self._previous = getattr(_state, "compiled", False)
        _state.compiled = True
        return self

    def __exit__(self, *exc) -> bool:
        _state.compiled = self._previous
        return False


def shapes_traced() -> bool:
    """Whether the ops run inside a ``compiled_graph`` block, whose trace checked their shapes (see there)."""
    return getattr(_state, "compiled", False)


class StepScope:
    """What the step check validated inside one ``validated_step`` block: ``entries``, one
    ``(tensors, group, rule)`` per cache group, ``tensors`` the metadata tensor objects it read and ``rule``
    what it required of them (``batch_checks.BatchRule``)."""

    __slots__ = ("entries", "deferred", "environment_allows", "_rules", "_previous", "_flags")

    def __init__(self):
        self.entries: list = []
        self._rules: dict = {}         # (group, id of each tensor) -> rules: the entries, for validated_entries
        self.deferred: list = []       # (device flag, action, slot): checks of data the step computes, run at its end
        self._flags = None             # the step's flag buffer and how many slots of it are handed out (flag_slot)
        # What ``checks_enabled`` reads beyond this thread's switch — the environment variable and CUDA-graph
        # capture — read once for the step, when first asked: neither changes inside one model call, and every op
        # of the step asks.
        self.environment_allows: Optional[bool] = None
        self._previous = None

    def __enter__(self) -> "StepScope":
        self._previous = getattr(_state, "scope", None)
        _state.scope = self
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        outer = self._previous
        _state.scope = outer
        self._previous = None
        deferred, self.deferred = self.deferred, []
        if exc_type is None and deferred:
            if isinstance(outer, StepScope):      # an enclosing block reads them with its own (e.g. the engine's)
                outer.deferred.extend(deferred)
            else:
                _run_deferred(deferred)
        return False

    def flag_slot(self, device: torch.device) -> tuple[torch.Tensor, tuple]:
        """A zeroed one-element int32 flag on ``device`` for a kernel of this step to set, and its place in the
        step's flag buffer: the buffer is allocated and zeroed once per step (one launch for up to ``FLAG_SLOTS``
        flags, where a tensor per flag was a zeroing launch each, and a cast each at the read), and read at the end
        in one copy of its used prefix. Slots lie ``FLAG_STRIDE`` int32 apart: 16 bytes, so each is as aligned as a
        fresh tensor (Triton specialises its kernels on pointer alignment)."""
        buf, used = self._flags if self._flags is not None else (None, FLAG_SLOTS)
        if used >= FLAG_SLOTS or buf.device != device:
            buf, used = torch.zeros(FLAG_SLOTS * FLAG_STRIDE, dtype=torch.int32, device=device), 0
        self._flags = (buf, used + 1)
        return buf[used * FLAG_STRIDE:used * FLAG_STRIDE + 1], (buf, used)

    def read(self, values: torch.Tensor) -> list:
        """``values.tolist()`` (1-D, integer or floating point) in one device-to-host copy together with every
        deferred check queued in this block so far, whose failing actions run (and raise) first: the engine reads
        its sampled tokens and the step's checks in one synchronisation."""
        deferred, self.deferred = self.deferred, []
        return _run_deferred(deferred, values)


FLAG_STRIDE = 4      # int32 words per slot of a step's flag buffer (16 bytes: StepScope.flag_slot)
FLAG_SLOTS = 64      # slots per buffer (a step with more flags takes another buffer)


def _run_deferred(deferred: list, values: Optional[torch.Tensor] = None) -> list:
    """One device-to-host copy of the deferred checks' flags (and of ``values``); the first failed check raises.
    Returns ``values`` as a list."""
    if not deferred:
        return [] if values is None else values.cpu().tolist()
    buffers: dict = {}                                       # id -> (buffer, slots used), in order of first use
    for _, _, slot in deferred:
        if slot is not None:
            buf, i = slot
            buffers[id(buf)] = (buf, max(i + 1, buffers.get(id(buf), (buf, 0))[1]))
    loose = [flag for flag, _, slot in deferred if slot is None]
    if values is None and not loose and len(buffers) == 1:
        # The usual checked step: its flags are slots of one buffer; its used prefix is copied as it is (no kernel).
        (buf, used), = buffers.values()
        host = buf[:used * FLAG_STRIDE].cpu()[::FLAG_STRIDE].tolist()
        flags_host = [host[slot[1]] for _, _, slot in deferred]
        values_host = []
    else:
        parts, start = [], {}
        for key, (buf, used) in buffers.items():
            start[key] = sum(p.numel() for p in parts)
            parts.append(buf[:used * FLAG_STRIDE:FLAG_STRIDE].float())
        n_slots = sum(p.numel() for p in parts)
        if loose:
            parts.append(torch.stack([flag.reshape(()).float() for flag in loose]))
        flags = torch.cat(parts) if len(parts) > 1 else parts[0]
        order, k = [], n_slots
        for _, _, slot in deferred:                          # each deferred check's place in ``flags``
            if slot is None:
                order.append(k)
                k += 1
            else:
                order.append(start[id(slot[0])] + slot[1])
        n = 0 if values is None else values.numel()
        if values is not None:
            kind = torch.float64 if values.is_floating_point() else torch.int64
            failed = ((flags != 0) | torch.isnan(flags)).to(kind)       # a flag is set: nonzero or NaN
            both = torch.cat([values.reshape(-1).to(kind), failed.to(values.device)]).cpu().tolist()
            values_host, flat = both[:n], both[n:]
        else:
            values_host, flat = [], flags.cpu().tolist()
        flags_host = [flat[i] for i in order]
    for failed, (_, action, _) in zip(flags_host, deferred):
        if failed:                                           # nonzero, or NaN (a float flag)
            action()
    return values_host


def validated_step():
    """A lexical scope for one model step: ``with validated_step(): meta = checked_step_metadata(...); <layers>``.

    The step check inside records what it validated (``note_validated``); ops in the block whose metadata are
    those very tensor objects skip the data checks that would repeat it (``validated_entries``). Blocks nest
    (the innermost one counts) and forget everything when they end, but for their deferred checks
    (``defer_check``), which pass to the enclosing block: the outermost one reads them, at its end or with
    ``StepScope.read``. Inside Dynamo tracing (where no data check
    runs) it is a no-op ``nullcontext``, so a compiled forward keeps one graph."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return StepScope()


def note_validated(tensors: tuple, group: int, rule: Any) -> None:
    """Record, in the innermost open ``validated_step`` block (none: nothing), that ``tensors`` passed the data
    checks of ``rule`` for cache group ``group``."""
    scope = getattr(_state, "scope", None)
    if scope is not None:
        # The entry keeps the tensors alive while the scope lasts, so their ids name them (no reuse) until it ends.
        scope.entries.append((tensors, group, rule))
        scope._rules.setdefault((group, *map(id, tensors)), []).append(rule)


def defer_check(flag: torch.Tensor, action) -> bool:
    """Inside a ``validated_step`` block, queue a check of data the step itself computes (e.g. a cache write's
    latents): ``flag`` (a one-element device tensor, bool or floating point: nonzero or NaN when the check may have
    failed) is read once, with every other queued flag, when the block ends, and ``action()`` runs for each one
    set, in order, until one raises (an action that finds nothing wrong returns). Returns False outside a block
    (the caller checks now). A step that fails a deferred check has already written its own slots, which the
    caller (the engine) drops with the step's requests; no other slot is touched."""
    scope = getattr(_state, "scope", None)
    if scope is None:
        return False
    scope.deferred.append((flag, action, None))
    return True


def deferred_flag(device: torch.device, action) -> Optional[torch.Tensor]:
    """Inside a ``validated_step`` block, a zeroed one-element int32 flag on ``device`` for a kernel to set (to
    nonzero) when its check fails, read with the step's other deferred checks (``defer_check``; ``action`` runs if
    it is set): a slot of the step's one flag buffer (``StepScope.flag_slot``). None outside a block."""
    scope = getattr(_state, "scope", None)
    if scope is None:
        return None
    flag, slot = scope.flag_slot(torch.device(device))
    scope.deferred.append((flag, action, slot))
    return flag


def validated_entries(tensors: tuple, group: int) -> list:
    """The rules the innermost open ``validated_step`` block validated for cache group ``group`` on exactly these
    tensor objects (compared with ``is``: equal content in other tensors does not count); empty outside a block."""
    scope = getattr(_state, "scope", None)
    if scope is None:
        return []
    return scope._rules.get((group, *map(id, tensors)), [])


def checks_enabled() -> bool:
    """Whether data-dependent input checks run now (see module docstring)."""
    if torch.compiler.is_compiling() or getattr(_state, "disabled", False):
        return False
    scope = getattr(_state, "scope", None)
    if scope is None:
        return _environment_allows()
    if scope.environment_allows is None:
        scope.environment_allows = _environment_allows()
    return scope.environment_allows


def _environment_allows() -> bool:
    """Not ``SWA_REWRITE_CHECKS=0``, and no CUDA-graph capture on the current stream (none can run before CUDA is
    initialised: asking then would cost a device query on every call)."""
    if os.environ.get("SWA_REWRITE_CHECKS", "1") == "0":
        return False
    return not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def host_int64(tensors: tuple, *, words: Optional[bool] = None) -> list:
    """Host int64 copies of integer ``tensors`` (int32 / int64, any shape, each flattened), read back in one
    device-to-host copy.

    On a device (``words``: default, any device but the CPU) the tensors travel as int32 words — an int64 tensor
    is two of them, viewed, not converted — so the device runs one concatenation and one copy instead of a
    conversion per int32 tensor (the host converts those after the copy); on the CPU one ``cat`` converts them."""
    flat = [t.reshape(-1) for t in tensors]
    if words is None:
        words = bool(flat) and flat[0].device.type != "cpu"
    if not words:
        return list(_int64(torch.cat(flat).cpu()).split([t.numel() for t in flat])) if flat else []
    # int64 tensors first: each starts at an even word, so the host can view its words as int64 again.
    order = sorted(range(len(flat)), key=lambda i: flat[i].dtype != torch.int64)
    pieces = [flat[i].contiguous().view(torch.int32) for i in order]     # (a strided 1-D tensor stays strided)
    host = torch.cat(pieces).cpu().split([w.numel() for w in pieces])
    out: list = [None] * len(flat)
    for i, h in zip(order, host):
        out[i] = h.view(torch.int64) if flat[i].dtype == torch.int64 else _int64(h)
    return out


def _int64(h: torch.Tensor) -> torch.Tensor:
    """Host integer tensor ``h`` as int64, widened in NumPy: torch's conversion of more than 32K elements (a long
    context's block tables) opens a parallel region on the host's threads, 50-300 µs on a busy 16-core host (the
    H200's profile of a checked 32K step: 0.3 ms per step in ``Tensor.long``); NumPy's runs on one thread, ~10 µs."""
    return h if h.dtype == torch.int64 else torch.from_numpy(h.numpy().astype(np.int64))


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
