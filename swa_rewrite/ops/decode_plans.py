"""Decode plans: an op call on CUDA whose argument signature an earlier call recorded does what that call did
without deciding it again (issue 14).

An eager decode step calls the same ops with the same shapes step after step; what their CUDA functions decide from
those shapes — the shape checks, the backend and kernel, the launch plan, each launch's specialisation in Triton's
binder — comes out the same every time, and was a large part of a step's host time (benchmarks/RESULTS.md, issue
14). So, in serving mode (``checks.checks_enabled()`` false: no data checks to run), an op records what a call did
under a key of everything those decisions read, and a later call with an equal key replays it:

- the cache writes (``write_kv_cache``, ``write_fp8_cache``): the kernel launch, without the checks;
- the attention cores (``mla_attention``, ``swa_attention``) of a step without MHA rows, on the path of the Gluon
  decode kernels (Hopper): the absorb, the attention kernel and its split combine as recorded (the kernels' function
  ``paged_mla.gluon_fwd`` called directly, its launches replayed: ``kernels.launch.replay_begin``), the un-absorb —
  without the checks, the backend and kernel choice and the launch plan. Other paths (FlashMLA, the gathered or
  page-tile kernels, sinks, MHA rows) are not planned: they run as before.

The key holds every tensor argument's shape, strides, dtype and device, the 16-byte alignment of those the kernels
read in place, the cache's identity and every scalar argument (with its type); cores are planned under the Triton
attention backend only; a plan holds no tensor. The kernels' module-level tunables (``kernels.paged_mla``'s
``PAGED_DECODE_CONFIG``, ``SWA_DECODE_CONFIG`` and thresholds, ``kernels._common.DEFAULT_CONFIG``) are read when a
signature is planned: after changing one, ``clear()``. A recorded core call is checked before it becomes a plan: the
Gluon function ran once, on the very tensors the replay passes (``is``). A replayed launch falls back to the ordinary
launch where anything it pins differs (``launch.Relaunch.fits``), so a stale launch costs speed, never correctness.
``SWA_REWRITE_DECODE_PLANS=0`` (read once) or ``no_plans()`` (this thread, a block) turn plans off; ``clear()``
forgets them all.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional

import torch

from .._threads import thread_value
from .checks import checks_enabled
from .flashmla_backend import get_attention_backend

__all__ = ["clear", "no_plans", "plans_made"]

_PLANS: dict = {}
_MAX = 1024
_DEVICES = ("cuda",)       # the device types planned (tests add "cpu": the Triton interpreter's launches)
_local = threading.local()
_ENV: list = []
_LAUNCH: list = []         # kernels.launch, imported on first use (importing the ops does not import Triton)


def _launch_module():
    if not _LAUNCH:
        from ..kernels import launch

        _LAUNCH.append(launch)
    return _LAUNCH[0]


def _enabled() -> bool:
    if not _ENV:
        _ENV.append(os.environ.get("SWA_REWRITE_DECODE_PLANS", "1") != "0")
    return _ENV[0] and not getattr(_local, "off", False)


def no_plans():
    """Within it (this thread) the ops neither record nor replay plans: every call decides afresh (A/B, debugging)."""
    return thread_value(_local, "off", True)


def clear() -> None:
    """Forget every plan (the next call of each signature records again)."""
    _PLANS.clear()


def plans_made() -> int:
    """How many plans are held (tests)."""
    return len(_PLANS)


class Plan:
    """What a recorded call did: its launches (``launch.Relaunch``, None where one cannot be replayed) and, for an
    attention core, the Gluon function's route (its plan, window, config)."""

    __slots__ = ("launches", "route")

    def __init__(self, launches: list, route: Optional[tuple] = None):
        self.launches, self.route = launches, route


def _tensor_key(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16


def lookup(key: Optional[tuple]) -> Optional[Plan]:
    return _PLANS.get(key) if key is not None else None


def write_key(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, *scalars) -> Optional[tuple]:
    """A cache write's key (None: no plan for this call — checked mode, plans off, not CUDA)."""
    if latent.device.type not in _DEVICES or not _enabled() or checks_enabled():
        return None
    return (_tensor_key(latent), _tensor_key(cache), id(cache), _tensor_key(slot_mapping),
            *((type(s), s) for s in scalars))


def core_key(tensors: tuple, cache: torch.Tensor, scalars: tuple) -> Optional[tuple]:
    """An attention core's key (as ``write_key``): ``tensors`` every tensor argument, ``scalars`` every other one.
    None under the FlashMLA backend too: its route depends on more than shapes (whether a CUDA-graph capture is on,
    its scheduling metadata built) and it counts its fallbacks per call."""
    if (cache.device.type not in _DEVICES or not _enabled() or checks_enabled()
            or get_attention_backend() != "triton"):
        return None
    return (*map(_tensor_key, tensors), id(cache), *((type(s), s) for s in scalars))


def store(key: tuple, plan: Plan) -> None:
    if len(_PLANS) >= _MAX:
        _PLANS.clear()
    _PLANS[key] = plan


def complete(launches: list) -> bool:
    """Whether recorded launches make a plan: all replayable, or none can be (no direct launches here: the plan still
    saves the decisions); a launch compiled in the recorded call (None) records again next time."""
    return all(r is not None for r in launches) or not _launch_module()._direct_ok()


def recording():
    """``kernels.launch.recording()``: the launches of a block, recorded."""
    return _launch_module().recording()


def recorded(key: Optional[tuple], fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, its launches recorded as ``key``'s plan (a cache write's: ``fn`` is the launch)."""
    if key is None:
        return fn(*args, **kwargs)
    with recording() as launches:
        out = fn(*args, **kwargs)
    if complete(launches):
        store(key, Plan(launches))
    return out


def replayed(plan: Plan, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``plan``'s launches replayed."""
    launch = _launch_module()
    saved = launch.replay_begin(plan.launches)
    try:
        return fn(*args, **kwargs)
    finally:
        launch.replay_end(saved)
