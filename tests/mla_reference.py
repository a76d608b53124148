"""An independent dense MLA decoder in float64: full sequence, no paging, no absorption.

It reads the weights of an ``MLAModel`` by name and recomputes everything the way the DeepSeek-V3 paper
writes it: per-head keys ``[k_nope | k_pe]`` and values from ``kv_b_proj``, rope as a complex rotation
of adjacent pairs (interleaved) or of the two halves (NeoX), yarn frequencies from their definition.
Optional per-layer windows give the sliding-window reference (docs/design.md §3), optional per-layer sink
counts the sliding window with attention sinks (§12: position p sees 0 … min(s, p+1)-1 and p-W+1 … p).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from swa_rewrite.models.fused_weights import split_parts


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _yarn_m(factor, m):
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def inv_freq_and_mag(cfg):
    P, base = cfg.qk_rope_head_dim, cfg.rope_theta
    f = [base ** (-2 * i / P) for i in range(P // 2)]
    rs = cfg.rope_scaling
    if rs is None:
        return torch.tensor(f, dtype=torch.float64), 1.0
    factor, L0 = rs["factor"], rs["original_max_position_embeddings"]

    def dim_for(rot):  # the rotary dim index whose wavelength fits `rot` turns into L0
        return P * math.log(L0 / (rot * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(dim_for(rs.get("beta_fast", 32))), 0)
    hi = min(math.ceil(dim_for(rs.get("beta_slow", 1))), P - 1)
    if lo == hi:
        hi += 0.001
    out = []
    for i, fi in enumerate(f):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)   # 0 → extrapolate (keep), 1 → interpolate
        out.append(fi * (1 - ramp) + (fi / factor) * ramp)
    mag = _yarn_m(factor, rs.get("mscale", 1)) / _yarn_m(factor, rs.get("mscale_all_dim", 0))
    return torch.tensor(out, dtype=torch.float64), mag


def _rope(x, pos, inv_freq, mag, interleave):
    """x [L, ..., P] float64 → rotated (interleaved output stays interleaved: dot products don't care)."""
    ang = pos[:, None].double() * inv_freq[None, :]                       # [L, P/2]
    rot = torch.polar(torch.full_like(ang, mag), ang)                     # mag·e^{iθ}
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (ang.shape[1],)
    rot = rot.view(shape)
    if interleave:
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(z * rot).flatten(-2)
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:]) * rot
    return torch.cat([z.real, z.imag], dim=-1)


def fp8_round_trip(latent: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """What the packed FP8 cache gives back for ``latent [L, R+P]`` (docs/design.md §6), computed independently:
    per 128-wide tile a power-of-two scale ``2^ceil(log2(max(amax/448, 1e-4)))``, e4m3 round-to-nearest-even
    of ``x / scale``; the rope part through bf16."""
    R = latent.shape[-1] - rope_dim
    tiles = latent[:, :R].float().reshape(latent.shape[0], R // 128, 128)
    amax = tiles.abs().amax(-1, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(torch.clamp(amax / 448.0, min=1e-4))))
    q = (tiles / scale).to(torch.float8_e4m3fn).float() * scale
    rope = latent[:, R:].to(torch.bfloat16).double()
    return torch.cat([q.reshape(latent.shape[0], R).double(), rope], -1)


def softmax_scale(cfg):
    s = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.get("mscale_all_dim", 0):
        s *= _yarn_m(rs["factor"], rs["mscale_all_dim"]) ** 2
    return s


@torch.no_grad()
def dense_logits(model, tokens, windows: Optional[Mapping[int, int]] = None, fp8_layers=(),
                 sinks: Optional[Mapping[int, int]] = None) -> torch.Tensor:
    """Float64 logits ``[L, vocab]`` of ``tokens`` (list of ints).

    ``windows[layer] = W`` makes that layer SWA; ``sinks[layer] = s`` (an SWA layer's, default 0) also lets
    every query see the first ``s`` positions (those up to itself); layers in ``fp8_layers`` see their
    latents ``[c | k_pe]`` through the packed FP8 cache's round trip (so a rewritten model can be checked to
    float precision).
    """
    if sinks and any(s and (not windows or layer not in windows) for layer, s in sinks.items()):
        raise ValueError(f"sinks {dict(sinks)} are given for a layer without a window ({dict(windows or {})})")
    cfg = model.config
    sd = {k: v.detach().double().cpu() for k, v in split_parts(model.state_dict(), model.config).items()}
    H, N, P, V, R = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                     cfg.kv_lora_rank)
    eps = cfg.rms_norm_eps
    L = len(tokens)
    pos = torch.arange(L)
    inv_freq, mag = inv_freq_and_mag(cfg)
    scale = softmax_scale(cfg)
    x = sd["embed_tokens.weight"][torch.tensor(tokens)]
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        a = p + "self_attn."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        if cfg.q_lora_rank is None:
            q = h @ sd[a + "q_proj.weight"].T
        else:
            q = _rms(h @ sd[a + "q_a_proj.weight"].T, sd[a + "q_a_layernorm.weight"], eps) @ sd[a + "q_b_proj.weight"].T
        q = q.view(L, H, N + P)
        ckv = h @ sd[a + "kv_a_proj_with_mqa.weight"].T
        c, k_pe = ckv[:, :R], ckv[:, R:]
        q_pe = _rope(q[..., N:], pos, inv_freq, mag, cfg.rope_interleave)
        k_pe = _rope(k_pe, pos, inv_freq, mag, cfg.rope_interleave)
        c = _rms(c, sd[a + "kv_a_layernorm.weight"], eps)
        if i in fp8_layers:
            c, k_pe = fp8_round_trip(torch.cat([c, k_pe], -1), P).split([R, P], -1)
        kv = (c @ sd[a + "kv_b_proj.weight"].T).view(L, H, N + V)
        k_nope, v = kv[..., :N], kv[..., N:]
        qq = torch.cat([q[..., :N], q_pe], -1)                                  # [L, H, N+P]
        kk = torch.cat([k_nope, k_pe[:, None, :].expand(L, H, P)], -1)          # [L, H, N+P]
        s = torch.einsum("ihd,jhd->hij", qq, kk) * scale
        allowed = pos[None, :] <= pos[:, None]
        if windows and i in windows:
            in_window = pos[None, :] > pos[:, None] - windows[i]
            sink = pos[None, :] < (sinks or {}).get(i, 0)
            allowed &= in_window | sink
        s = s.masked_fill(~allowed, float("-inf"))
        o = torch.einsum("hij,jhv->ihv", s.softmax(-1), v).reshape(L, H * V)
        x = x + o @ sd[a + "o_proj.weight"].T
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        g = h @ sd[m + "gate_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * (h @ sd[m + "up_proj.weight"].T)) @ sd[m + "down_proj.weight"].T
    x = _rms(x, sd["norm.weight"], eps)
    return x @ sd["lm_head.weight"].T


def dense_greedy(model, prompt, max_new_tokens, windows=None, fp8_layers=(), sinks=None) -> list[int]:
    seq = list(prompt)
    for _ in range(max_new_tokens):
        seq.append(int(dense_logits(model, seq, windows, fp8_layers, sinks)[-1].argmax()))
    return seq[len(prompt):]
