"""A dense causal forward of ``MLAModel``: the same modules and weights, whole sequences, no paged cache.

The paged ops have no autograd (docs/design.md §13), so training runs the model's own modules through this
function instead. Attention runs in MLA's MHA form (design §2): per-head keys ``[k_nope | rope(k_pe)]`` and
values from ``kv_b_proj`` of the normalised latent, causal attention through
``scaled_dot_product_attention`` with the model's softmax scale. That is the absorbed form the paged model
computes (``q_nope · (W_UK c) = (q_nope W_UK) · c``), evaluated in a different order: in float32 the two
agree to rounding, and ``tests/reference`` holds the paged engine's logits to this function's on the
shipped reference checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mla import MLAAttention, MLAModel
from .rope import apply_rope, rope_cos_sin

__all__ = ["dense_forward"]


def _attention(attn: MLAAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, B: int, L: int,
               pad_values: bool) -> torch.Tensor:
    """``x [B*L, hidden]`` → ``[B*L, hidden]``: causal MLA over each of the ``B`` sequences."""
    T = x.shape[0]
    H, N, P, V, R = attn.num_heads, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank
    q_a, kv = attn.a_projections(x)
    q = attn.q_proj(x) if q_a is None else attn.q_b_proj(attn.q_a_layernorm(q_a))
    q_nope, q_pe = q.view(T, H, N + P).split([N, P], dim=-1)
    c_kv, k_pe = kv.split([R, P], dim=-1)
    c_kv = attn.kv_a_layernorm(c_kv)                                            # [T, R], the cached latent
    interleave = attn.config.rope_interleave
    q_pe = apply_rope(q_pe, cos, sin, interleave)                               # [T, H, P]
    k_pe = apply_rope(k_pe, cos, sin, interleave)                               # [T, P]
    k_nope, v = attn.kv_b_proj(c_kv).view(T, H, N + V).split([N, V], dim=-1)   # [T, H, N], [T, H, V]
    dtype = v.dtype      # under autocast the projections' dtype; rope may have promoted q_pe / k_pe
    q = torch.cat([q_nope.to(dtype), q_pe.to(dtype)], dim=-1)                   # [T, H, N+P]
    k = torch.cat([k_nope, k_pe.to(dtype)[:, None, :].expand(T, H, P)], dim=-1)  # [T, H, N+P]
    if pad_values and V < N + P:
        # Flash attention wants one head dim for q, k and v: zero columns leave the output unchanged.
        v = F.pad(v, (0, N + P - V))
    q, k, v = (t.reshape(B, L, H, -1).transpose(1, 2) for t in (q, k, v))     # [B, H, L, *]
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.softmax_scale)  # [B, H, L, V(+pad)]
    o = o[..., :V].transpose(1, 2).reshape(T, H * V)
    return attn.o_proj(o)


def dense_forward(model: MLAModel, input_ids: torch.Tensor, *, pad_values: bool | None = None) -> torch.Tensor:
    """Logits of every position of every sequence, causal attention over each sequence from its position 0.

    Args:
        model: an ``MLAModel`` (not a rewritten one: this forward knows full attention only).
        input_ids: ``[B, L]`` (or ``[L]``) int64 token ids; sequence ``b``'s token ``t`` sits at position ``t``.
        pad_values: pad values to the query/key head dim so flash attention applies (default: on CUDA).
    Returns:
        ``[B, L, vocab]`` (or ``[L, vocab]``) logits: the model dtype, or autocast's. Differentiable.
    """
    if not isinstance(model, MLAModel):
        raise TypeError(f"dense_forward takes an MLAModel, got {type(model).__name__}")
    squeeze = input_ids.dim() == 1
    ids = input_ids[None] if squeeze else input_ids
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [L] or [B, L], got shape {tuple(input_ids.shape)}")
    B, L = ids.shape
    if L > model.config.max_position_embeddings:
        raise ValueError(f"sequences of {L} tokens exceed max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    if pad_values is None:
        pad_values = ids.device.type == "cuda"
    positions = torch.arange(L, device=ids.device)
    inv_freq = model.rope_inv_freq_bits.view(torch.float32)
    cos, sin = rope_cos_sin(inv_freq, model.rope_magnitude, positions, model.lm_head.weight.dtype)  # [L, P/2]
    cos, sin = (t.repeat(B, 1) for t in (cos, sin))                             # [B*L, P/2]
    x = model.embed_tokens(ids.reshape(B * L))                                  # [B*L, hidden]
    for layer in model.layers:
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, B, L, pad_values)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = model.lm_head(model.norm(x)).view(B, L, -1)
    return logits[0] if squeeze else logits
