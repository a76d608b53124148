"""The model's small ops, one launch each in eager CUDA steps (issue 14), their op-by-op forms elsewhere.

An eager decode step is host-bound (benchmarks/RESULTS.md, issue 14): the host issues ~60 ops a layer and the
device waits. ``rms_norm`` (with the residual add before it), ``mla_rope_latent`` (the kv norm, both rotations and
the latent's concatenation), ``silu_mul`` (the MLP's activation and product) and ``step_rope`` (the step's rope
table) take one Triton launch each
(``kernels.model_ops``) when

* the tensors are plain CUDA tensors of one half or float32 dtype in the layouts the kernels take,
* nothing records them for autograd (inference: ``no_grad`` / ``inference_mode``, or tensors without grad;
  ``step_rope``: grad mode off),
* nothing watches or transforms PyTorch's ops (``_traced``: ``torch.compile`` and ``torch.export`` see the op-by-op
  forms, which Inductor fuses itself; so do ``make_fx``, dispatch and function modes, ``torch.jit.trace``,
  forward-mode AD and ``torch.func`` transforms; fake or functional tensors and fx proxies are not plain tensors),
  autocast is off, and the shapes are the ones the kernels read (anything else takes the op-by-op form, which raises
  where it should),
* ``SWA_REWRITE_FUSED_MODEL_OPS`` is not ``0`` in the environment (read once; ``op_by_op()`` for one block, per
  thread);

and run their op-by-op forms otherwise (CPU, training, tracing). Both forms compute the same values in the same
order and roundings (``kernels.model_ops``); the norms' float32 sums are reduced in another order.

The functions are graph leaves of ``torch.fx`` (``models.mla`` wraps them): the rewritten module calls them as
the original does, so both take the same path.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._threads import thread_value
from .rope import RopeRotation, rope_cos_sin, rope_index, rope_rotation, rotate

_STATE = {"on": os.environ.get("SWA_REWRITE_FUSED_MODEL_OPS", "1") != "0"}
_LOCAL = threading.local()     # op_by_op() blocks, per thread
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DEVICES = ("cuda",)       # (tests add "cpu" to run the kernels in Triton's interpreter)
_PLAIN = (torch.Tensor, nn.Parameter)
_INDEX: dict = {}          # (P, interleave, device) -> a RopeRotation's index


def _eager(*tensors: torch.Tensor) -> bool:
    """Whether ``tensors`` may take a one-launch form, dtypes and shapes aside (module docstring)."""
    first = tensors[0]
    cuda = first.is_cuda        # (cheaper than .device: every norm, rope and activation of a step asks)
    if (not _STATE["on"] or getattr(_LOCAL, "op_by_op", False) or not (cuda or first.device.type in _DEVICES)
            or (cuda and "cuda" not in _DEVICES) or _traced()):
        return False
    grad, device = torch.is_grad_enabled(), first.get_device()
    for t in tensors:
        if (type(t) not in _PLAIN or t.stride(-1) != 1 or (grad and t.requires_grad)
                or t.get_device() != device):
            return False
    return not torch.is_autocast_enabled("cuda" if cuda else first.device.type)


def _traced() -> bool:
    """Whether anything watches or transforms PyTorch's ops: a compiler or export, ``make_fx`` or another dispatch /
    function mode (profilers and FLOP counters included), ``torch.jit.trace``, forward-mode AD, ``torch.func``
    transforms (``vmap``, ``grad``, ``jvp``) — none of them sees a Triton launch."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._len_torch_function_stack() > 0 or torch.jit.is_tracing()
            or torch.autograd.forward_ad._current_level >= 0
            or torch._C._functorch.peek_interpreter_stack() is not None)


def _fused(*tensors: torch.Tensor) -> bool:
    """Whether ``tensors`` (the first one's dtype for all) take the one-launch forms (module docstring)."""
    dtype = tensors[0].dtype
    return dtype in _DTYPES and all(t.dtype == dtype for t in tensors) and _eager(*tensors)


def op_by_op():
    """Within it the model's small ops take their op-by-op forms, in this thread (A/B benchmarks, tests)."""
    return thread_value(_LOCAL, "op_by_op", True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """``weight · rms_norm(x)`` (float32 normalisation rounded to ``x``'s dtype, then the weight product), as
    DeepSeek's reference; with ``residual``, of ``h = x + residual`` and returns ``(normed, h)``."""
    if x.dim() == 2 and weight.dim() == 1 and weight.shape[0] == x.shape[1] and (
            _fused(x, weight) if residual is None else (residual.shape == x.shape and _fused(x, weight, residual))):
        from ..kernels import model_ops
        return model_ops.rms_norm(x, weight, eps, residual)
    h = x if residual is None else x + residual
    # F.rms_norm computes in float32 for half inputs and rounds once: the same bits as the float32 round trip
    # (tests/models/test_model_ops.py). `.to` keeps the dtype under autocast, which may run the norm in float32.
    y = weight * F.rms_norm(h, (weight.shape[0],), eps=eps).to(h.dtype)
    return y if residual is None else (y, h)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The MLP's activation ``F.silu(gate) * up`` of ``gate_up [T, 2N]`` = ``[gate | up]`` → ``[T, N]``."""
    if gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0 and _fused(gate_up):
        from ..kernels import model_ops
        return model_ops.silu_mul(gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul takes [gate | up] of an even width, got shape {tuple(gate_up.shape)}")
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def step_rope(inv_freq: torch.Tensor, magnitude: float, positions: torch.Tensor, dtype: torch.dtype,
              interleave: bool) -> RopeRotation:
    """The step's ``RopeRotation`` for ``positions [T]``: ``rope_rotation(*rope_cos_sin(...), interleave)``, as one
    launch without grad mode (the table; its ``index`` depends on ``P`` and the layout only, made once per device
    outside CUDA-graph capture, where its first making would be recorded but not run)."""
    P = 2 * inv_freq.shape[-1]
    if (not torch.is_grad_enabled() and positions.dim() == 1 and inv_freq.dim() == 1 and dtype in _DTYPES
            and inv_freq.dtype == torch.float32 and positions.dtype in (torch.int32, torch.int64)
            and _eager(positions, inv_freq)):
        key = (P, bool(interleave), positions.device)
        index = _INDEX.get(key)
        if index is None and not (positions.is_cuda and torch.cuda.is_current_stream_capturing()):
            with torch.inference_mode(False):     # an ordinary tensor: usable in any later step
                index = _INDEX.setdefault(key, rope_index(P, interleave, positions.device))
        if index is not None:
            from ..kernels import model_ops
            table = model_ops.rope_table(positions, inv_freq, magnitude, dtype)
            return RopeRotation(table, table.unsqueeze(1), index)
    return rope_rotation(*rope_cos_sin(inv_freq, magnitude, positions, dtype), interleave)


def mla_rope_latent(q_pe: torch.Tensor, kv: torch.Tensor, tokens: torch.Tensor, heads: torch.Tensor,
                    index: torch.Tensor, weight: torch.Tensor, eps: float):
    """One MLA layer's rope and latent: ``(rotate(q_pe), [rms_norm(kv[:, :R]) | rotate(kv[:, R:])])`` for
    ``q_pe [T, H, P]``, ``kv [T, R + P]`` (``kv_a_proj_with_mqa``'s output), the step's ``RopeRotation``
    (``tokens``, ``heads``, ``index``) and the kv norm's ``weight [R]``."""
    P = q_pe.shape[-1]
    R = kv.shape[-1] - P
    T = q_pe.shape[0]
    if (q_pe.dim() == 3 and kv.dim() == 2 and kv.shape[0] == T and R > 0 and P & (P - 1) == 0
            and tokens.shape == (T, 2, P) and weight.shape == (R,) and index.shape == (2 * P,)
            and index.stride(0) == 1 and index.get_device() == q_pe.get_device()
            and _fused(q_pe, kv, tokens, weight)):                # (the kernel spans P in one power-of-two block)
        from ..kernels import model_ops
        return model_ops.mla_rope_latent(q_pe, kv, tokens, index, weight, eps)
    c_kv, k_pe = kv.split([R, P], dim=-1)
    c_kv = rms_norm(c_kv, weight, eps)
    return rotate(q_pe, heads, index), torch.cat([c_kv, rotate(k_pe, tokens, index)], dim=-1)
