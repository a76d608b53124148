"""The packed FP8 row (docs/design.md §6): the one definition of its layout, constants and (de)quantisation.

One token's row of the packed latent cache, byte-compatible with FlashMLA's "FP8 with scale" cache::

    bytes [0, R)                      R x float8_e4m3fn   latent[:R] / scale of its 128-wide tile
    bytes [R, R + 4*R/128)            R/128 x float32     tile scales, powers of two
    bytes [R + 4*R/128, end)          P x bfloat16        latent[R:] (rope part), unquantised

Tile scale ``s = max(amax / E4M3_MAX, SCALE_FLOOR)`` in float32, rounded up to a power of two;
``q = e4m3fn(x / s)`` with round-to-nearest-even. Dequantisation ``q * s`` is exact in bf16.

``ops/`` (checks, references, allocation) and ``kernels/`` (launchers pass the offsets as constexprs; JIT
code derives its constants from here) both import this module. It imports nothing of the package, so it
sits below both; it does no argument checking beyond what the arithmetic needs (the ops report bad
arguments in their own terms).
"""

from __future__ import annotations

from typing import Optional

import torch

TILE = 128            # latent dims per float32 scale
E4M3_MAX = 448.0      # largest finite float8_e4m3fn
SCALE_FLOOR = 1e-4    # smallest tile scale (before rounding up to a power of two)
SCALE_BYTES = 4       # one float32 scale
ROPE_BYTES = 2        # one bfloat16 rope value
LATENT_OFFSET = 0     # the e4m3 latent starts the row


def num_tiles(R: int) -> int:
    """Scale tiles (float32 scales) of a row with latent rank ``R``."""
    return R // TILE


def scale_offset(R: int) -> int:
    """Byte offset of the first tile scale."""
    return LATENT_OFFSET + R


def rope_offset(R: int) -> int:
    """Byte offset of the first rope value."""
    return scale_offset(R) + SCALE_BYTES * num_tiles(R)


def row_bytes(R: int, P: int) -> int:
    """Bytes of one packed row: ``R + 4*R/128 + 2*P`` (656 for DeepSeek-V3's ``R=512, P=64``)."""
    return rope_offset(R) + ROPE_BYTES * P


def row_dims(nbytes: int, *, latent_dim: Optional[int] = None,
             rope_dim: Optional[int] = None) -> Optional[tuple[int, int]]:
    """``(R, P)`` of a packed row of ``nbytes`` bytes, given the latent width ``latent_dim = R + P`` or the
    rope width ``rope_dim = P`` (exactly one); None when no row with ``R`` a positive multiple of ``TILE``
    has that many bytes. The inverse of ``row_bytes``:
    ``nbytes = R + R/32 + 2P`` gives ``R = 32 (2D - nbytes) / 31`` or ``R = 32 (nbytes - 2P) / 33``."""
    if (latent_dim is None) == (rope_dim is None):
        raise TypeError("row_dims takes exactly one of latent_dim and rope_dim")
    if latent_dim is not None:
        num, den = 32 * (2 * latent_dim - nbytes), 31
    else:
        num, den = 32 * (nbytes - ROPE_BYTES * rope_dim), 33
    # ``//`` and ``%``, not divmod: under torch.compile ``nbytes`` may be a SymInt.
    R, rem = num // den, num % den
    P = latent_dim - R if latent_dim is not None else rope_dim
    if rem or R < TILE or R % TILE or row_bytes(R, P) != nbytes:
        return None
    return R, P


def tile_scales(x: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales ``[..., n]`` of float32 tiles ``x [..., n, TILE]``."""
    amax = x.abs().amax(dim=-1)
    s = torch.maximum(amax / E4M3_MAX, torch.tensor(SCALE_FLOOR, dtype=torch.float32, device=x.device))
    mant, exp = torch.frexp(s)                                  # s = mant * 2^exp, mant in [0.5, 1)
    return torch.ldexp(torch.ones_like(s), torch.where(mant == 0.5, exp - 1, exp))   # 2^ceil(log2 s)


def quantize_rows(latent: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Pack ``latent [T, R+P]`` (any float dtype; ``R`` a multiple of ``TILE``) into ``uint8 [T, row_bytes]``."""
    T, D = latent.shape
    R = D - rope_dim
    x = latent[:, :R].float().reshape(T, num_tiles(R), TILE)
    scale = tile_scales(x)                                                      # [T, R/128]
    q = (x / scale[..., None]).to(torch.float8_e4m3fn)                          # exact quotient, RNE cast
    rope = latent[:, R:].to(torch.bfloat16).contiguous()
    packed = torch.cat([q.reshape(T, R).view(torch.uint8), scale.contiguous().view(torch.uint8),
                        rope.view(torch.uint8)], dim=1)
    assert packed.shape == (T, row_bytes(R, rope_dim))
    return packed


def dequantize_rows(packed: torch.Tensor, R: int, rope_dim: int) -> torch.Tensor:
    """Unpack ``uint8 [..., row_bytes(R, rope_dim)]`` rows into ``bf16 [..., R + rope_dim]``."""
    lead, nbytes = packed.shape[:-1], packed.shape[-1]
    nt = num_tiles(R)
    rows = packed.reshape(-1, nbytes)
    q = rows[:, LATENT_OFFSET:LATENT_OFFSET + R].contiguous().view(torch.float8_e4m3fn).float()
    scale = rows[:, scale_offset(R):rope_offset(R)].contiguous().view(torch.float32)    # [N, R/128]
    latent = (q.reshape(-1, nt, TILE) * scale[..., None]).reshape(-1, R).to(torch.bfloat16)
    rope = rows[:, rope_offset(R):].contiguous().view(torch.bfloat16)
    return torch.cat([latent, rope], dim=1).reshape(*lead, R + rope_dim)
