"""Packed FP8 latent cache (docs/design.md §6, issue 3): byte layout, references, Triton kernels, op contracts.

Oracle chain: an independent float64 decoder/encoder written from the byte layout of docs/design.md §6 checks
``quantize_fp8_reference``; the Triton kernels (the interpreter on CPU, the GPU under ``-m gpu``) must then
match the reference bit for bit.
"""

import math
import os

import pytest
import torch

from swa_rewrite import ops
from swa_rewrite.ops.fp8_cache import dequantize_fp8_reference, fp8_cache_bytes, quantize_fp8_reference

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
POISON = 0xFF  # NaN as fp8, float32 and bf16 alike


def _kernels():
    from swa_rewrite.kernels import fp8_cache

    return fp8_cache


def random_latent(T, R, P, dtype=torch.float32, device="cpu"):
    """Finite latents with per-row magnitudes over the dtype's range, all-zero tiles, -0.0, mixed-scale tiles."""
    lo, hi, spike = (-5, 1.5, 1e2) if dtype == torch.float16 else (-30, 25, 1e8)
    x = torch.randn(T, R + P, dtype=torch.float64) * torch.logspace(lo, hi, T, dtype=torch.float64)[:, None]
    x = x[torch.randperm(T)]
    if T > 2:
        x[0, :128] = 0.0                                       # a tile of zeros
        x[1, :128] = -0.0
        x[2, 5] *= spike                                       # one huge element: the rest go subnormal/zero
    if T > 3:
        x[3, R:] = 0.0                                         # rope of zeros
    return x.to(dtype).to(device)


def poisoned_cache(num_blocks, ps, nbytes, pad=0, device="cpu"):
    """``[num_blocks, ps, nbytes]`` uint8 of poison, with ``pad`` poisoned bytes between blocks."""
    storage = torch.full((num_blocks, ps * nbytes + pad), POISON, dtype=torch.uint8, device=device)
    return storage, storage[:, :ps * nbytes].view(num_blocks, ps, nbytes)


# --------------------------------------------------------------------------------- independent oracle
_E4M3 = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()  # codes 0..126, ascending


def e4m3_round_oracle(y: torch.Tensor) -> torch.Tensor:
    """float64 ``y`` (|y| <= 448) -> e4m3fn byte, nearest code, ties to the even code (by table search)."""
    a = y.abs()
    hi = torch.searchsorted(_E4M3, a).clamp(max=126)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - _E4M3[lo], _E4M3[hi] - a
    code = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    return (code | torch.signbit(y).long() << 7).to(torch.uint8)


def decode_by_hand(row: torch.Tensor, R: int, P: int):
    """Read one packed row at the docs/design.md §6 offsets: (fp8 latent as float64, float32 scales, bf16 rope)."""
    nt = R // 128
    q = row[:R].view(torch.float8_e4m3fn).double()
    scales = row[R:R + 4 * nt].clone().view(torch.float32)
    rope = row[R + 4 * nt:R + 4 * nt + 2 * P].clone().view(torch.bfloat16)
    assert row.numel() == R + 4 * nt + 2 * P
    return q, scales, rope


def expected_tile(x32: torch.Tensor):
    """Scale and fp8 bytes of one 128-wide float32 tile, computed from the format's text (docs/design.md §6) in float64/Python."""
    amax = float(x32.abs().max())
    s = max(float(torch.tensor(amax, dtype=torch.float32) / 448.0), float(torch.tensor(1e-4, dtype=torch.float32)))
    scale = 2.0 ** math.ceil(math.log2(s))
    return scale, e4m3_round_oracle(x32.double() / scale)


# ------------------------------------------------------------------------------------ reference tests
def test_bytes_per_token_formula():
    for R, P in [(128, 0), (512, 64), (384, 2), (1024, 128)]:
        assert fp8_cache_bytes(R, P) == R + (R // 128) * 4 + 2 * P
    assert fp8_cache_bytes(512, 64) == 512 + 16 + 128          # docs/design.md §5: DeepSeek-V3's row
    for R, P in [(100, 64), (0, 64), (512, 3), (512, -2)]:
        with pytest.raises(ValueError, match="kv_lora_rank|rope_dim"):
            fp8_cache_bytes(R, P)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,P", [(512, 64), (256, 6)])
def test_reference_bytes_match_the_spec_layout(seed, dtype, R, P):
    T = 23
    x = random_latent(T, R, P, dtype)
    packed = quantize_fp8_reference(x, P)
    assert packed.dtype == torch.uint8 and packed.shape == (T, fp8_cache_bytes(R, P))
    for t in range(T):
        q, scales, rope = decode_by_hand(packed[t], R, P)
        assert torch.equal(rope, x[t, R:].to(torch.bfloat16))
        for i in range(R // 128):
            tile = x[t, 128 * i:128 * (i + 1)].float()
            scale, code = expected_tile(tile)
            assert float(scales[i]) == scale, (t, i)
            assert torch.equal(packed[t, 128 * i:128 * (i + 1)], code), (t, i)
            assert torch.isfinite(q[128 * i:128 * (i + 1)]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_error_within_e4m3_bound_per_tile(seed, dtype):
    R, P, T = 384, 64, 31
    x = random_latent(T, R, P, dtype)
    packed = quantize_fp8_reference(x, P)
    out = dequantize_fp8_reference(packed, P)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    scales = packed[:, R:R + 4 * (R // 128)].contiguous().view(torch.float32).double()   # [T, R/128]
    s = scales.repeat_interleave(128, dim=1)
    xd, od = x[:, :R].double(), out[:, :R].double()
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value; subnormal steps are 2^-9 * s.
    bound = torch.maximum(xd.abs() * 2.0**-4, s * 2.0**-10)
    assert ((od - xd).abs() <= bound).all()
    assert torch.equal(out[:, R:], x[:, R:].to(torch.bfloat16))
    # The scale is the smallest power of two that covers the tile and the 1e-4 floor.
    amax = x[:, :R].float().abs().reshape(T, -1, 128).amax(-1).double()
    assert (amax <= 448 * scales * (1 + 2.0**-23)).all() and (scales >= 1e-4).all()
    assert ((scales / 2 < torch.clamp(amax / 448, min=1e-4)) | (scales == 2.0**-13)).all()


def test_dequantize_reference_accepts_any_leading_shape(seed):
    R, P = 256, 8
    packed = quantize_fp8_reference(random_latent(12, R, P), P)
    flat = dequantize_fp8_reference(packed, P)
    assert torch.equal(dequantize_fp8_reference(packed.view(3, 4, 1, -1), P), flat.view(3, 4, 1, -1))
    with pytest.raises(ValueError, match="not a packed FP8 row"):
        dequantize_fp8_reference(packed[:, :-2], P)


# ------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype,R,P,ps,T,pad", [
    (torch.bfloat16, 512, 64, 7, 19, 40),
    (torch.bfloat16, 512, 64, 7, 19, 41),        # odd block stride: byte-wise scale/rope stores
    (torch.float32, 256, 64, 1, 3, 0),
    (torch.float16, 128, 6, 53, 17, 3),
    (torch.bfloat16, 384, 2, 16, 1, 12),
])
def test_write_kernel_bytes_equal_reference(seed, device, dtype, R, P, ps, T, pad):
    nbytes = fp8_cache_bytes(R, P)
    num_blocks = T // ps + 3
    storage, cache = poisoned_cache(num_blocks, ps, nbytes, pad=pad, device=device)
    x = random_latent(T, R, P, dtype, device)
    slots = torch.randperm(num_blocks * ps, device=device)[:T]
    if T > 4:
        slots[[1, 4]] = -1
    _kernels().write_fp8_cache(x, cache, slots, rope_dim=P)
    keep = slots >= 0
    expected = quantize_fp8_reference(x[keep].cpu(), P)
    got = cache.cpu().reshape(-1, nbytes)[slots[keep].cpu()]
    mismatch = (got != expected).nonzero()
    assert mismatch.numel() == 0, f"{len(mismatch)} bytes differ, first (row, byte) {mismatch[:5].tolist()}"
    written = torch.zeros(num_blocks * ps, dtype=torch.bool)
    written[slots[keep].cpu()] = True
    assert (cache.cpu().reshape(-1, nbytes)[~written] == POISON).all()
    assert (storage.cpu()[:, ps * nbytes:] == POISON).all()   # bytes between blocks


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_write_kernel_with_a_strided_slot_view(seed, device):
    """``slot_mapping`` may be a view with a stride (e.g. a column of a metadata matrix)."""
    R, P, ps, T = 128, 16, 4, 6
    nbytes = fp8_cache_bytes(R, P)
    _, cache = poisoned_cache(4, ps, nbytes, device=device)
    both = torch.randperm(16, device=device)[:2 * T].view(T, 2)
    slots = both[:, 0]
    assert not slots.is_contiguous()
    x = random_latent(T, R, P, device=device)
    _kernels().write_fp8_cache(x, cache, slots, rope_dim=P)
    assert torch.equal(cache.cpu().reshape(-1, nbytes)[slots.cpu()], quantize_fp8_reference(x.cpu(), P))
    unwritten = torch.ones(16, dtype=torch.bool)
    unwritten[slots.cpu()] = False
    assert (cache.cpu().reshape(-1, nbytes)[unwritten] == POISON).all()


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_soft_and_hardware_conversions_agree_with_reference(seed, device):
    """Both float32 -> fp8/bf16 paths of the kernel (integer rounding, ``cvt`` on GPU) are bit-exact."""
    R, P, T = 256, 64, 64
    x = random_latent(T, R, P, torch.float32, device)
    # bf16 rounding ties: low 16 bits exactly 0x8000, with both parities of bit 16.
    bits = x[:, R:].contiguous().view(torch.int32)
    x[:, R:] = ((bits & ~0xFFFF) | 0x8000).view(torch.float32)
    expected = quantize_fp8_reference(x.cpu(), P)
    for soft in ([True] if device == "cpu" else [True, False]):
        for wide in (True, False):
            _, cache = poisoned_cache(T, 1, fp8_cache_bytes(R, P), device=device)
            _kernels().write_fp8_cache(x, cache, torch.arange(T, device=device), rope_dim=P, soft_cvt=soft,
                                       wide_stores=wide)
            assert torch.equal(cache.cpu()[:, 0], expected), (soft, wide)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_every_e4m3_rounding_boundary(device):
    """Tiles whose scale is 1: every midpoint between adjacent e4m3 codes, and just either side of it."""
    mids = ((_E4M3[1:] + _E4M3[:-1]) / 2).float()              # 126 midpoints, exact in float32
    vals = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), _E4M3.float()])
    vals = torch.cat([vals, -vals])
    pad = (-len(vals)) % 128
    vals = torch.cat([vals, torch.zeros(pad)]).view(-1, 128)
    vals[:, 0] = 448.0                                          # amax 448 -> scale exactly 1
    x = torch.cat([vals, torch.zeros(vals.shape[0], 2)], dim=1).to(device)
    _, cache = poisoned_cache(x.shape[0], 1, fp8_cache_bytes(128, 2), device=device)
    _kernels().write_fp8_cache(x, cache, torch.arange(x.shape[0], device=device), rope_dim=2)
    got = cache.cpu()[:, 0]
    assert torch.equal(got, quantize_fp8_reference(x.cpu(), 2))
    assert torch.equal(got[:, :128], e4m3_round_oracle(vals.double()))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_dequantize_kernel_equals_reference_on_views(seed, device):
    R, P, ps, num_blocks = 256, 64, 5, 4
    nbytes = fp8_cache_bytes(R, P)
    _, cache = poisoned_cache(num_blocks, ps, nbytes, pad=24, device=device)
    x = random_latent(num_blocks * ps, R, P, torch.bfloat16, device)
    _kernels().write_fp8_cache(x, cache, torch.arange(num_blocks * ps, device=device), rope_dim=P)
    expected = dequantize_fp8_reference(cache.cpu(), P).view(-1, R + P)
    out = torch.full((num_blocks * ps, R + P), float("nan"), dtype=torch.bfloat16, device=device)
    _kernels().dequantize_fp8_cache(cache, out, rope_dim=P)
    assert torch.equal(out.cpu().view(torch.int16), expected.view(torch.int16))
    rows = cache.view(-1, nbytes) if cache.is_contiguous() else cache[1:3].reshape(-1, nbytes)
    out = torch.full((rows.shape[0], R + P), float("nan"), dtype=torch.bfloat16, device=device)
    _kernels().dequantize_fp8_cache(rows[None], out, rope_dim=P)
    assert torch.equal(out.cpu().view(torch.int16), dequantize_fp8_reference(rows.cpu(), P).view(torch.int16))


# ------------------------------------------------------------------------------------------------ op
def _op_case(device, T=9, R=256, P=64, ps=4, dtype=torch.bfloat16):
    nbytes = fp8_cache_bytes(R, P)
    num_blocks = T // ps + 2
    _, cache = poisoned_cache(num_blocks, ps, nbytes, pad=8, device=device)
    x = random_latent(T, R, P, dtype, device)
    slots = torch.randperm(num_blocks * ps, device=device)[:T]
    slots[T // 2] = -1
    return x, cache, slots


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_op_writes_reference_bytes_and_round_trips(seed, device):
    x, cache, slots = _op_case(device)
    ops.write_fp8_cache(x, cache, slots, rope_dim=64, layer=3)
    keep = (slots >= 0).cpu()
    flat = cache.cpu().reshape(-1, cache.shape[-1])
    assert torch.equal(flat[slots.cpu()[keep]], quantize_fp8_reference(x.cpu()[keep], 64))
    deq = ops.dequantize_fp8_cache(cache, rope_dim=64)
    assert deq.shape == (*cache.shape[:2], x.shape[1]) and deq.dtype == torch.bfloat16
    # Exact, NaN == NaN: poisoned slots decode to NaN, whose payload the GPU does not keep.
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(deq.cpu(), dequantize_fp8_reference(cache.cpu(), 64), **exact)
    as4d = ops.dequantize_fp8_cache(cache.unsqueeze(2), rope_dim=64)
    torch.testing.assert_close(as4d.cpu(), deq.cpu().unsqueeze(2), **exact)
    assert torch.isfinite(deq.cpu().reshape(-1, x.shape[1])[slots.cpu()[keep]]).all()
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[slots.cpu()[keep]] = False
    assert (flat[untouched] == POISON).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_checked_mode_rejects_non_finite_latents_and_bad_slots(seed, device):
    for bad in (float("nan"), float("inf"), -float("inf")):
        x, cache, slots = _op_case(device)
        x[2, 100] = bad
        with pytest.raises(ValueError, match="latent row 2 .* non-finite"):
            ops.write_fp8_cache(x, cache, slots)
        assert (cache == POISON).all()
    x, cache, slots = _op_case(device)
    x[slots.tolist().index(-1), 0] = float("nan")          # a padding row may hold anything
    ops.write_fp8_cache(x, cache, slots)
    x, cache, slots = _op_case(device)
    slots[0] = cache.shape[0] * cache.shape[1]
    with pytest.raises(ValueError, match=r"slot_mapping\[0\] = .* out of range"):
        ops.write_fp8_cache(x, cache, slots)
    assert (cache == POISON).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy, inside the interpreter, on NaN rows
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_unchecked_non_finite_latent_touches_only_its_own_row(seed, device, monkeypatch):
    monkeypatch.setenv("SWA_REWRITE_CHECKS", "0")
    x, _, slots = _op_case(device, T=12)
    x[0, :] = float("nan")
    x[1, 3] = float("inf")
    for write in (lambda c: _kernels().write_fp8_cache(x, c, slots, rope_dim=64),
                  lambda c: ops.write_fp8_cache(x, c, slots, rope_dim=64)):
        _, cache, _ = _op_case(device, T=12)
        write(cache)
        keep = (slots >= 0).cpu()
        keep[:2] = False
        flat = cache.cpu().reshape(-1, cache.shape[-1])
        assert torch.equal(flat[slots.cpu()[keep]], quantize_fp8_reference(x.cpu()[keep], 64))
        untouched = torch.ones(flat.shape[0], dtype=torch.bool)
        untouched[slots.cpu()[slots.cpu() >= 0]] = False
        assert (flat[untouched] == POISON).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(latent=torch.randn(3, 320)), "rows are 656 wide, expected 392"),
    # The op sees the latent width and rope_dim, so the error is in those terms (not kv_lora_rank), and says
    # which rope_dim the cache's rows would fit.
    (dict(latent=torch.randn(3, 300)), r"latent is 300 wide with rope_dim=64, which leaves R = 236 .* multiple of 128"),
    (dict(rope_dim=0), r"latent is 576 wide with rope_dim=0, .*656-byte rows fit this latent with rope_dim=64"),
    (dict(rope_dim=62), r"latent is 576 wide with rope_dim=62, .*rope_dim=64"),
    (dict(latent=torch.randn(3, 576, dtype=torch.float64)), "bfloat16, float16 or float32"),
    (dict(latent=torch.randn(3, 576), rope_dim=63), "rope_dim must be even"),
    (dict(cache=torch.full((2, 4, 656), -1, dtype=torch.int8)), "must be uint8"),
    (dict(slot_mapping=torch.tensor([0, 1])), "2 entries for 3 latent rows"),
    (dict(slot_mapping=torch.tensor([0, 5, 5])), "same slot twice"),
])
def test_op_rejects_bad_input(kwargs, match):
    args = dict(latent=torch.randn(3, 576), cache=torch.full((2, 4, 656), POISON, dtype=torch.uint8),
                slot_mapping=torch.tensor([0, 5, 6]), rope_dim=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ops.write_fp8_cache(args.pop("latent"), args.pop("cache"), args.pop("slot_mapping"), **args)


def test_opcheck_and_fake_shapes(seed):
    x, cache, slots = _op_case("cpu", T=5, R=128, P=8, ps=2)
    torch.library.opcheck(torch.ops.swa_rewrite.write_fp8_cache.default, (x, cache, slots[None], 8, 0, 0))
    packed = quantize_fp8_reference(x, 8).view(5, 1, -1)      # no poison: NaN != NaN would fail the check
    torch.library.opcheck(torch.ops.swa_rewrite.dequantize_fp8_cache.default, (packed, 8))
    with torch.device("meta"):
        out = ops.dequantize_fp8_cache(torch.empty(7, 3, 1, 656, dtype=torch.uint8), rope_dim=64)
    assert out.shape == (7, 3, 1, 576) and out.dtype == torch.bfloat16


@pytest.mark.gpu
def test_kernel_addresses_past_int32_range(seed):
    """Slots past 2^31 / 656 (~3.27M) need int64 byte offsets."""
    R, P, ps = 512, 64, 64
    nbytes = fp8_cache_bytes(R, P)
    num_blocks = (2**31 // nbytes) // ps + 64
    cache = torch.full((num_blocks, ps, nbytes), POISON, dtype=torch.uint8, device="cuda")
    total = num_blocks * ps
    slots = torch.tensor([0, total // 2, 2**31 // nbytes + 1, total - 1, total - 2], device="cuda")
    x = random_latent(len(slots), R, P, torch.bfloat16, "cuda")
    ops.write_fp8_cache(x, cache, slots, rope_dim=P)
    flat = cache.view(-1, nbytes)
    assert torch.equal(flat[slots].cpu(), quantize_fp8_reference(x.cpu(), P))
    assert torch.equal(ops.dequantize_fp8_cache(flat[slots], rope_dim=P).cpu(),
                       dequantize_fp8_reference(flat[slots].cpu(), P))
    assert (flat[1:1000] == POISON).all() and (flat[total - 1000:total - 2] == POISON).all()
