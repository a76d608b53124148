"""The one definition of the packed FP8 row (swa_rewrite.fp8_format, docs/design.md §6): offsets, sizes,
the inverse, and the exactness of quantise / dequantise for power-of-two scales. The byte-exact behaviour
against an independent oracle is in tests/ops/test_fp8_cache.py."""

import pytest
import torch

from swa_rewrite import fp8_format as f


def test_deepseek_v3_row():
    R, P = 512, 64
    assert (f.TILE, f.E4M3_MAX, f.SCALE_FLOOR) == (128, 448.0, 1e-4)
    assert f.LATENT_OFFSET == 0 and f.scale_offset(R) == 512 and f.rope_offset(R) == 512 + 16
    assert f.num_tiles(R) == 4 and f.row_bytes(R, P) == 656


@pytest.mark.parametrize("R,P", [(128, 2), (128, 64), (256, 32), (512, 64), (1024, 128), (512, 0)])
def test_inverse_round_trips(R, P):
    n = f.row_bytes(R, P)
    assert f.row_dims(n, rope_dim=P) == (R, P)
    assert f.row_dims(n, latent_dim=R + P) == (R, P)


def test_inverse_rejects_non_rows():
    assert f.row_dims(655, rope_dim=64) is None               # not R + R/32 + 2P
    assert f.row_dims(2 * 64, rope_dim=64) is None            # R = 0
    assert f.row_dims(656, latent_dim=575) is None
    with pytest.raises(TypeError):
        f.row_dims(656)


@pytest.mark.parametrize("R,P", [(128, 2), (512, 64)])
def test_quantize_dequantize_exact_for_power_of_two_scales(R, P):
    g = torch.Generator().manual_seed(0)
    T = 6
    # Values exactly representable as e4m3 times a power-of-two tile scale (the tile amax is 448·s).
    codes = torch.randint(0, 127, (T, R), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = torch.where(torch.rand(T, R, generator=g) < 0.5, -codes, codes)
    codes.view(T, -1, f.TILE)[:, :, 0] = 448.0
    scales = 2.0 ** torch.randint(-10, 10, (T, R // f.TILE, 1), generator=g).float()
    latent = (codes.view(T, -1, f.TILE) * scales).reshape(T, R)
    rope = torch.randn(T, P, generator=g).to(torch.bfloat16).float()
    x = torch.cat([latent, rope], dim=1)
    packed = f.quantize_rows(x, P)
    assert packed.dtype == torch.uint8 and packed.shape == (T, f.row_bytes(R, P))
    stored = packed[:, f.scale_offset(R):f.rope_offset(R)].contiguous().view(torch.float32)
    assert torch.equal(stored, scales[..., 0])
    back = f.dequantize_rows(packed.view(2, T // 2, -1), R, P)
    assert back.dtype == torch.bfloat16 and torch.equal(back.reshape(T, -1).float(), x)
