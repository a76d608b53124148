"""``torch.ops.swa_rewrite.moe_experts``: the routed experts of a DeepSeek-V2/V3 MoE block as one op.

Its work depends on the routing (which experts receive how many tokens), so keeping it one opaque op with a
fake implementation lets ``torch.fx`` / ``torch.export`` / Dynamo trace a MoE decoder — and the SWA pass
find the attention nodes — without data-dependent control flow, and lets a ``meta``-device model be traced.
The MoE modules live in ``swa_rewrite.models.moe``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .inference_only import register_inference_only


def moe_experts_reference(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                          topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """``sum_k topk_weights[t, k] · expert_{topk_ids[t, k]}(x[t])`` for every token.

    Args:
        x: ``[T, H]`` hidden states.
        gate_up_proj: ``[E, 2I, H]``, expert ``e``'s gate projection in rows ``[0, I)`` and up projection in
            rows ``[I, 2I)``.
        down_proj: ``[E, H, I]``.
        topk_ids: ``[T, k]`` int expert of each (token, choice).
        topk_weights: ``[T, k]`` float32 routing weight of each (token, choice).
    Returns:
        ``[T, H]`` in ``x.dtype``, accumulated in float32.

    (token, choice) pairs are sorted by expert so each expert runs one matmul on its rows. Reading the
    per-expert row counts synchronises with the host once per call (the op's CUDA path,
    ``moe_experts_grouped``, does not).
    """
    T, k = topk_ids.shape
    E = gate_up_proj.shape[0]
    flat_ids = topk_ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)                                 # [T*k] pairs by expert
    counts = torch.bincount(flat_ids, minlength=E).tolist()
    token = order // k
    rows = x.index_select(0, token)                                              # [T*k, H]
    out_rows = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        gate, up = F.linear(rows[start:start + n], gate_up_proj[e]).chunk(2, dim=-1)
        out_rows[start:start + n] = F.linear(F.silu(gate) * up, down_proj[e]).float()
        start += n
    weights = topk_weights.reshape(-1).index_select(0, order).float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token, out_rows * weights[:, None])
    return out.to(x.dtype)


def moe_experts_grouped(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                        topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """``moe_experts_reference`` without reading anything on the host, so a decode step with MoE layers can
    be captured in a CUDA graph: the per-expert row counts stay on the device as the group offsets of two
    grouped matrix products (``torch._grouped_mm``, one group per expert, empty groups allowed)."""
    T, k = topk_ids.shape
    E = gate_up_proj.shape[0]
    flat_ids = topk_ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)                                 # [T*k] pairs by expert
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)                          # end row of each expert
    token = order // k
    rows = x.index_select(0, token)                                              # [T*k, H]
    # Weights as stored ([E, out, in]); the transposed views are the column-major operands grouped GEMMs take.
    gate, up = torch._grouped_mm(rows, gate_up_proj.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
    out_rows = torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(-2, -1), offs=offsets).float()
    weights = topk_weights.reshape(-1).index_select(0, order).float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token, out_rows * weights[:, None])
    return out.to(x.dtype)


def grouped_path_supported(x: torch.Tensor, gate_up_proj: torch.Tensor) -> bool:
    """Whether the op takes ``moe_experts_grouped``: CUDA, bf16 (the grouped GEMM's dtype) and every row
    16-byte aligned (hidden and intermediate sizes multiples of 8), as the grouped GEMM requires."""
    I2, H = gate_up_proj.shape[1:]
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16 and gate_up_proj.dtype == torch.bfloat16
            and hasattr(torch, "_grouped_mm") and H % 8 == 0 and (I2 // 2) % 8 == 0)


def _check_moe_experts(x, gate_up_proj, down_proj, topk_ids, topk_weights) -> None:
    if x.dim() != 2 or gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(f"moe_experts: x must be [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I]; got "
                         f"{tuple(x.shape)}, {tuple(gate_up_proj.shape)}, {tuple(down_proj.shape)}")
    E, two_i, H = gate_up_proj.shape
    if x.shape[1] != H or two_i % 2 or tuple(down_proj.shape) != (E, H, two_i // 2):
        raise ValueError(f"moe_experts: shapes disagree: x {tuple(x.shape)}, gate_up_proj {tuple(gate_up_proj.shape)}, "
                         f"down_proj {tuple(down_proj.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: topk_ids and topk_weights must both be [T={x.shape[0]}, k], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_experts: topk_ids must be int32 or int64, got {topk_ids.dtype}")


@torch.library.custom_op("swa_rewrite::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
    """Routed experts of a MoE block; see ``moe_experts_reference`` (``moe_experts_grouped`` on CUDA)."""
    _check_moe_experts(x, gate_up_proj, down_proj, topk_ids, topk_weights)
    if grouped_path_supported(x, gate_up_proj):
        return moe_experts_grouped(x, gate_up_proj, down_proj, topk_ids, topk_weights)
    return moe_experts_reference(x, gate_up_proj, down_proj, topk_ids, topk_weights)


@moe_experts.register_fake
def _(x, gate_up_proj, down_proj, topk_ids, topk_weights):
    _check_moe_experts(x, gate_up_proj, down_proj, topk_ids, topk_weights)
    return x.new_empty(x.shape)


register_inference_only(moe_experts)
