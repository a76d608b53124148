"""Rotary position embedding of DeepSeek-V2/V3, plain and yarn-scaled, interleaved and NeoX layouts."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import MLAConfig, yarn_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_inv_freq(config: MLAConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[P/2]`` (float32) and the cos/sin magnitude factor for ``config``."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    freq_extra = 1.0 / base**exponent
    rs = config.rope_scaling
    if rs is None:
        return freq_extra.float(), 1.0
    factor = rs["factor"]
    freq_inter = freq_extra / factor
    low = math.floor(_yarn_correction_dim(rs.get("beta_fast", 32), dim, base, rs["original_max_position_embeddings"]))
    high = math.ceil(_yarn_correction_dim(rs.get("beta_slow", 1), dim, base, rs["original_max_position_embeddings"]))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = freq_inter * (1 - extrapolate) + freq_extra * extrapolate
    if rs.get("attention_factor") is not None:
        # An explicit magnitude: transformers' yarn reads it first, and infers it differently from DeepSeek
        # when only one of mscale / mscale_all_dim is set, so the HF loader stores the value it computes.
        magnitude = float(rs["attention_factor"])
    else:  # DeepSeek's formula
        magnitude = yarn_mscale(factor, rs.get("mscale", 1)) / yarn_mscale(factor, rs.get("mscale_all_dim", 0))
    return inv_freq.float(), magnitude


def rope_inv_freq_bits(config: MLAConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The float32 inverse frequencies of ``config`` stored as their ``int32`` bit patterns ``[P/2]``.

    Models keep the rope table in this form because ``Module.to(dtype)``, ``.half()`` and friends cast
    every floating-point buffer: a float32 table moved to bf16 and back keeps the rounding, which puts
    rotary angles off by radians at long positions. Integer buffers are left alone by dtype moves; read
    the table back with ``bits.view(torch.float32)``.
    """
    return rope_inv_freq(config)[0].view(torch.int32).to(device)


def reset_rope_buffer(module: torch.nn.Module, config: MLAConfig) -> None:
    """Recompute ``module.rope_inv_freq_bits`` from ``config`` on the buffer's device.

    Called after every ``Module._apply`` (``to``, ``cuda``, ``to_empty``...): ``to_empty`` from ``meta``
    leaves buffers undefined. A no-op for modules without the buffer and on ``meta``.
    """
    bits = module._buffers.get("rope_inv_freq_bits")
    if bits is not None and bits.device.type != "meta":
        module._buffers["rope_inv_freq_bits"] = rope_inv_freq_bits(config, bits.device)


def rope_cos_sin(inv_freq: torch.Tensor, magnitude: float, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [T, P/2]`` in ``dtype`` for integer ``positions [T]``."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return (angles.cos() * magnitude).to(dtype), (angles.sin() * magnitude).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate ``x [T, ..., P]`` by ``cos, sin [T, P/2]``.

    ``interleave=True`` reads rotation pairs as ``(x[2i], x[2i+1])`` (DeepSeek's checkpoint layout) and,
    like transformers, writes the result de-interleaved: ``[rotated evens | rotated odds]``.
    ``interleave=False`` is the NeoX layout: pairs are ``(x[i], x[i + P/2])``, written in place.
    """
    half = x.shape[-1] // 2
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., :half], x[..., half:]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    c, s = cos.view(shape), sin.view(shape)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class RopeRotation(NamedTuple):
    """``apply_rope`` of one step as a table: ``rotate(x, table, index)`` is ``[x[index[:P]] | x[index[P:]]]``
    times ``[cos | cos]`` and ``[-sin | sin]``, summed — one gather, one product and one sum where
    ``apply_rope`` issues eleven ops (an eager step is host-bound: RESULTS.md, issue 14)."""

    tokens: torch.Tensor   # [T, 2, P] for k_pe [T, P]: row 0 the cosines, row 1 the signed sines
    heads: torch.Tensor    # [T, 1, 2, P] (a view) for q_pe [T, H, P]
    index: torch.Tensor    # [2P] int64: the output's source column, then its rotation partner


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> RopeRotation:
    """The step's ``RopeRotation`` from ``cos, sin [T, P/2]`` (``rope_cos_sin``), for either layout."""
    P = 2 * cos.shape[-1]
    table = torch.cat([cos, cos, -sin, sin], dim=-1).unflatten(-1, (2, P))          # [T, 2, P]
    return RopeRotation(table, table.unsqueeze(1), rope_index(P, interleave, cos.device))


def rope_index(P: int, interleave: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """A ``RopeRotation``'s ``index [2P]`` (int64): each output's source column, then its rotation partner."""
    half = P // 2
    i = torch.arange(P, device=device)
    if interleave:   # output i < P/2 reads x[2i] (partner x[2i + 1]); output P/2 + i reads x[2i + 1] (x[2i])
        source = i.view(half, 2).t().reshape(P)
        partner = torch.bitwise_xor(source, 1)
    else:            # NeoX: output i reads x[i], its partner x[(i + P/2) mod P]
        source, partner = i, torch.remainder(i + half, P)
    return torch.cat([source, partner])


def rotate(x: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``apply_rope(x, cos, sin, interleave)``, bit for bit, with a ``RopeRotation``'s ``index`` and the table
    that broadcasts against ``x`` (``tokens`` for ``[T, P]``, ``heads`` for ``[T, H, P]``): each output is
    ``x_a·c ± x_b·s`` rounded per product and once for the sum, as the op-by-op form rounds it."""
    pairs = x.index_select(-1, index).unflatten(-1, (2, -1))                       # [..., 2, P]
    return (pairs * table).sum(-2)
