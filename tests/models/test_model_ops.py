"""The model's few-op forms of rope and RMSNorm (issue 14: an eager step is host-bound, so the model issues fewer
ops) give the same bits as the op-by-op forms they replaced, on the CPU and the GPU, in every dtype."""

import pytest
import torch
import torch.nn.functional as F

from swa_rewrite.models.mla import RMSNorm
from swa_rewrite.models.rope import apply_rope, rope_rotation, rotate

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _skip_without(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _cos_sin(T, P, dtype, device, g):
    angles = torch.rand(T, P // 2, generator=g, dtype=torch.float64) * 1e4
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleave", [True, False])
def test_rotate_is_apply_rope_bit_for_bit(device, dtype, interleave, seed):
    _skip_without(device)
    g = torch.Generator().manual_seed(seed)
    T, H, N, P = 37, 5, 16, 64
    cos, sin = _cos_sin(T, P, dtype, device, g)
    rope = rope_rotation(cos, sin, interleave)
    q = (torch.randn(T, H, N + P, generator=g) * 4).to(dtype).to(device)[..., N:]     # a strided slice, as in the model
    k = (torch.randn(T, 576, generator=g) * 4).to(dtype).to(device)[:, 512:]
    for x, table in ((q, rope.heads), (k, rope.tokens)):
        want = apply_rope(x, cos, sin, interleave)
        got = rotate(x, table, rope.index)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), f"rotate differs from apply_rope at {(got != want).nonzero()[:4].tolist()}"


@pytest.mark.parametrize("interleave", [True, False])
def test_rotate_rotates_each_pair_by_its_angle(interleave, seed):
    """Independent oracle: each rotation pair (x_a, x_b) times e^{iθ} in float64 complex arithmetic."""
    g = torch.Generator().manual_seed(seed)
    T, P = 11, 16
    theta = torch.rand(T, P // 2, generator=g, dtype=torch.float64) * 50
    x = torch.randn(T, P, generator=g, dtype=torch.float64)
    rope = rope_rotation(theta.cos(), theta.sin(), interleave)
    got = rotate(x, rope.tokens, rope.index)
    a, b = (x[:, 0::2], x[:, 1::2]) if interleave else (x[:, :P // 2], x[:, P // 2:])
    z = torch.complex(a, b) * torch.polar(torch.ones_like(theta), theta)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [7168, 1536, 512, 64])
def test_rms_norm_matches_the_float32_round_trip(device, dtype, dim, seed):
    """``RMSNorm`` gives DeepSeek's reference bits: normalise in float32, round to the input dtype, weight."""
    _skip_without(device)
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(dim, 1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=g))
    x = (torch.randn(33, dim, generator=g) * 3).to(dtype).to(device)
    want = norm.weight * F.rms_norm(x.float(), (dim,), eps=1e-6).to(dtype)
    got = norm(x)
    assert got.dtype == dtype
    assert torch.equal(got, want)
    # and the float64 formula, to the dtype's rounding
    ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)) * norm.weight.double()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
