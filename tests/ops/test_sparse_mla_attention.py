"""Sparse MLA attention over the packed FP8 cache and the fused SWA op (docs/design.md §3, §6, §7, §9; issue 4).

Oracle: a float64 softmax over rows unpacked by this file's own packer/unpacker, written from the byte
layout of docs/design.md §6 (independent of ``ops.fp8_cache``), with slots computed here from the block tables.
Every slot no valid index refers to holds 0xFF bytes (NaN as fp8, float32 and bf16), outputs are NaN
before a kernel runs, inputs are fresh random draws. The Triton kernels run under the interpreter on CPU
(tiny shapes) and on the GPU under ``-m gpu`` (the full grid of issue 4).
"""

import math
import os

import pytest
import torch

from paged_batches import make_batch
from swa_rewrite import ops

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
POISON = 0xFF


def _kernels():
    from swa_rewrite.kernels import sparse_mla

    return sparse_mla


# --------------------------------------------------------------------------------- independent oracle
def row_bytes(R, P):
    return R + 4 * (R // 128) + 2 * P


def pack_rows(latent: torch.Tensor, P: int) -> torch.Tensor:
    """float64 ``[N, R+P]`` → packed uint8 ``[N, bytes]`` per docs/design.md §6 (power-of-two tile scales)."""
    N, D = latent.shape
    R = D - P
    tiles = latent[:, :R].reshape(N, R // 128, 128)
    s = torch.clamp(tiles.abs().amax(-1) / 448.0, min=1e-4)
    s = torch.exp2(torch.ceil(torch.log2(s)))                                   # [N, R/128] exact powers of 2
    q8 = (tiles / s[..., None]).to(torch.float8_e4m3fn).reshape(N, R)
    return torch.cat([q8.view(torch.uint8), s.float().contiguous().view(torch.uint8),
                      latent[:, R:].to(torch.bfloat16).contiguous().view(torch.uint8)], dim=1)


def unpack_rows(packed: torch.Tensor, P: int) -> torch.Tensor:
    """packed uint8 ``[N, bytes]`` → float64 ``[N, R+P]`` holding the bf16 values docs/design.md §6 defines."""
    N, nbytes = packed.shape
    R = (nbytes - 2 * P) * 32 // 33
    lat = packed[:, :R].contiguous().view(torch.float8_e4m3fn).double().reshape(N, R // 128, 128)
    s = packed[:, R:R + R // 32].contiguous().view(torch.float32).double()
    lat = (lat * s[..., None]).reshape(N, R).to(torch.bfloat16).double()
    rope = packed[:, R + R // 32:].contiguous().view(torch.bfloat16).double()
    return torch.cat([lat, rope], dim=1)


def make_cache(num_blocks, ps, R, P, used_slots, device, pad=32):
    """Packed cache ``[NB, ps, bytes]`` (block stride padded by ``pad`` bytes) holding random latents at
    ``used_slots`` and poison elsewhere; returns the cache and float64 keys ``[NB·ps, D]`` (NaN where unused)."""
    nbytes = row_bytes(R, P)
    storage = torch.full((num_blocks, ps * nbytes + pad), POISON, dtype=torch.uint8)
    cache = storage[:, :ps * nbytes].view(num_blocks, ps, nbytes)
    n = num_blocks * ps
    # Per-row magnitudes over several decades, like real latents after the norm plus outliers.
    magnitude = torch.logspace(-1, 1, n, dtype=torch.float64)[torch.randperm(n), None]
    latent = torch.randn(n, R + P, dtype=torch.float64) * magnitude
    packed = pack_rows(latent, P)
    used = torch.unique(torch.as_tensor(used_slots, dtype=torch.long).flatten())
    used = used[used >= 0]
    cache[used // ps, used % ps] = packed[used]
    keys = torch.full((n, R + P), float("nan"), dtype=torch.float64)
    keys[used] = unpack_rows(packed[used], P)
    return cache.to(device), keys.to(device)


def attention_oracle(q, keys, slots, scale, R, chunk=16):
    """float64: ``q [T, H, D]``, ``keys [S, D]``, ``slots [T, K]`` (-1 skipped) → out [T, H, R], lse [T, H]."""
    T, H, _ = q.shape
    outs, lses = [], []
    for t0 in range(0, T, chunk):
        sl = slots[t0:t0 + chunk]
        valid = sl >= 0                                                          # [c, K]
        k = torch.where(valid[..., None], keys[sl.clamp(min=0)], 0.0)            # [c, K, D]
        logits = torch.einsum("chd,ckd->chk", q[t0:t0 + chunk].double(), k) * scale
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        lse = torch.logsumexp(logits, -1)                                        # [c, H]
        empty = ~valid.any(-1)[:, None]
        w = torch.exp(logits - torch.where(empty, 0.0, lse)[..., None])
        outs.append(torch.where(empty[..., None], 0.0, torch.einsum("chk,ckr->chr", w, k[..., :R])))
        lses.append(torch.where(empty, float("inf"), lse))
    return torch.cat(outs), torch.cat(lses)


def assert_matches(out, lse, ref_out, ref_lse, *, rtol=5e-3, atol_lse=1e-3):
    assert not torch.isnan(out).any(), "output has NaN (unwritten element or stray read)"
    assert not torch.isnan(lse).any(), "lse has NaN"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse > 0), empty), "lse = +inf exactly for rows without keys"
    assert torch.all(out[empty] == 0), "rows without keys must give out = 0"
    err = (out.double() - ref_out).norm() / ref_out.norm().clamp_min(1e-300)
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"
    if (~empty).any():
        lse_err = (lse.double() - ref_lse)[~empty].abs().max()
        assert lse_err <= atol_lse, f"lse error {lse_err:.2e} > {atol_lse:.0e}"


def poisoned_outputs(T, H, R, device, dtype=torch.bfloat16):
    return (torch.full((T, H, R), float("nan"), dtype=dtype, device=device),
            torch.full((T, H), float("nan"), dtype=torch.float32, device=device))


def random_indices(T, K, num_slots, device):
    """``[T, 1, K]`` int32 slots with ~20 % ``-1``, a duplicated slot per row and one all ``-1`` row."""
    idx = torch.randint(0, num_slots, (T, K))
    idx[torch.rand(T, K) < 0.2] = -1
    if K > 1:
        idx[:, 1] = idx[:, 0]                                                   # duplicates count twice
    if T > 2:
        idx[1] = -1
    return idx.to(torch.int32)[:, None, :].to(device)


# ----------------------------------------------------------------------------------- sparse kernel
def _run_sparse_kernel(device, T, H, K, ps, R, P, config=None):
    num_blocks = max(2, math.ceil(3 * K / ps) + 1)
    idx = random_indices(T, K, num_blocks * ps, device)
    cache, keys = make_cache(num_blocks, ps, R, P, idx.cpu(), device)
    q = torch.randn(T, H, R + P, device=device).to(torch.bfloat16)
    scale = (R + P) ** -0.5 * 2.0
    out = poisoned_outputs(T, H, R, device)
    if device == "cpu" or config is not None:          # the launcher itself (interpreter, forced splits)
        _kernels().sparse_mla_attention_fwd(q, cache, idx, scale, P, config=config, out=out)
    else:
        out = ops.sparse_mla_attention(q, cache, idx, scale, rope_dim=P)
    ref = attention_oracle(q, keys, idx[:, 0].long(), scale, R)
    assert_matches(*out, *ref)


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.parametrize("T,H,K,ps,R,P", [
    (3, 1, 1, 1, 128, 16),
    (4, 4, 3, 53, 128, 16),
    (3, 16, 37, 5, 128, 16),
    (2, 20, 19, 1, 256, 32),                  # two scale tiles, heads not a power of two
])
def test_sparse_kernel_interpreter(seed, T, H, K, ps, R, P):
    _run_sparse_kernel("cpu", T, H, K, ps, R, P)


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
def test_sparse_kernel_split_keys_interpreter(seed):
    """Keys split across programs and merged by lse (the decode path) give the same function."""
    _run_sparse_kernel("cpu", 3, 4, 50, 7, 128, 16, config={"splits": 3})


@pytest.mark.gpu
@pytest.mark.parametrize("ps", [1, 53, 64])
@pytest.mark.parametrize("H", [1, 4, 16, 128])
@pytest.mark.parametrize("K", [1, 3, 64, 100, 129, 2048])
def test_sparse_op_gpu_grid(seed, K, H, ps):
    _run_sparse_kernel("cuda", 5, H, K, ps, 512, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 300])
def test_sparse_op_gpu_decode_and_waves(seed, T):
    """One token (keys split across programs automatically) and several waves of programs."""
    _run_sparse_kernel("cuda", T, 128, 700, 64, 512, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [2, 5])
def test_sparse_kernel_gpu_forced_splits(seed, splits):
    _run_sparse_kernel("cuda", 3, 64, 700, 16, 512, 64, config={"splits": splits})


# ------------------------------------------------------------------------------------ fused SWA op
def window_slots(meta, pos, bid, window, ps):
    """``[T, W]`` slots of each token's window (oracle side, from the block table), ``-1`` outside."""
    bt = meta["block_tables"].cpu().long()
    p = pos[:, None] - window + 1 + torch.arange(window)[None, :]                 # [T, W] positions
    valid = (p >= 0) & (bid[:, None] >= 0)
    blk = bt[bid.clamp(min=0)[:, None], p.clamp(min=0) // ps]
    return torch.where(valid, blk * ps + p.clamp(min=0) % ps, -1)


def _run_swa(device, requests, window, ps, H=4, R=128, P=16, staged=None, config=None, use_op=False, stats=None):
    meta, pos, bid, num_blocks = make_batch(requests, ps, device)
    written = [int(meta["block_tables"][b, p // ps]) * ps + p % ps
               for b, (d, n) in enumerate(requests) for p in range(d + n)]
    cache, keys = make_cache(num_blocks, ps, R, P, written, device)
    T = pos.shape[0]
    q = torch.randn(T, H, R + P, device=device).to(torch.bfloat16)
    scale = (R + P) ** -0.5 * 2.0
    if use_op:
        out = ops.swa_mla_attention(q, cache, *meta.values(), scale, window=window, rope_dim=P, layer=3)
    else:
        out = poisoned_outputs(T, H, R, device)
        _kernels().swa_attention_fwd(q, cache, meta["block_tables"], meta["cu_seqlens_q"],
                                     meta["seq_lens_decoder"], meta["batch_id_per_token"], scale, P, window,
                                     config=config, staged=staged, out=out, stats=stats)
    ref = attention_oracle(q, keys, window_slots(meta, pos, bid, window, ps).to(device), scale, R)
    assert_matches(*out, *ref)


# Fresh prefill, chunked prefill over cached history, multi-token decode (MTP), plain decodes, first token.
MIXED = [(0, 9), (11, 5), (17, 2), (23, 1), (0, 1)]


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
@pytest.mark.parametrize("window,ps", [(1, 1), (3, 7), (8, 3), (40, 16)])
def test_swa_kernel_interpreter(seed, window, ps, staged):
    _run_swa("cpu", MIXED, window, ps, staged=staged)


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.parametrize("H", [1, 4, 16])
@pytest.mark.parametrize("window,ps", [(1, 1), (8, 3), (40, 16)])
def test_swa_token_tiles_interpreter(seed, H, window, ps):
    """Few heads: the staged path puts 64/H adjacent tokens in one program; tiles cross request borders
    (MIXED's first tiles hold tokens of several requests) and end in padding."""
    _run_swa("cpu", MIXED, window, ps, H=H, staged=True)
    _run_swa("cpu", [(40, 1), (3, 30), (0, 7)], 35, 4, H=H, staged=True, config={"splits": 3})


def test_token_tiles_are_planned_for_few_heads_on_the_staged_path():
    from swa_rewrite.kernels._common import KEYS_INDICES, KEYS_PAGED, KEYS_ROWS, _plan
    cpu = torch.device("cpu")
    assert [_plan(4096, H, 128, cpu, None, KEYS_ROWS)["block_t"] for H in (1, 5, 16, 32, 64, 128)] == [64, 8, 4, 2, 1, 1]
    assert _plan(4096, 16, 128, cpu, None, KEYS_PAGED)["block_t"] == 1
    assert _plan(4096, 16, 128, cpu, None, KEYS_INDICES)["block_t"] == 1
    assert _plan(4096, 16, 128, cpu, {"block_t": 1}, KEYS_ROWS)["block_t"] == 1
    with pytest.raises(ValueError, match="block_t \\* block_h must be >= 16"):
        _plan(4096, 2, 128, cpu, {"block_t": 4}, KEYS_ROWS)


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
def test_swa_kernel_split_window_interpreter(seed):
    _run_swa("cpu", [(40, 1), (3, 1), (0, 1)], 35, 4, staged=False, config={"splits": 2})


@pytest.mark.gpu
@pytest.mark.parametrize("staged", [None, False, True], ids=["auto", "direct", "staged"])
@pytest.mark.parametrize("window", [1, 128, 1000])
@pytest.mark.parametrize("ps", [1, 53, 64])
def test_swa_kernel_gpu(seed, window, ps, staged):
    requests = [(0, 300), (1500, 64), (900, 1), (2047, 3), (5, 1), (0, 1)]
    _run_swa("cuda", requests, window, ps, H=128, R=512, P=64, staged=staged)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [16, 64])
def test_swa_op_gpu_heads(seed, H):
    _run_swa("cuda", [(0, 200), (700, 1), (64, 1)], 256, 64, H=H, R=512, P=64, use_op=True)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [1, 8, 16, 32])
@pytest.mark.parametrize("window", [1, 128, 1000])
def test_swa_token_tiles_gpu(seed, H, window):
    requests = [(0, 300), (1500, 64), (900, 1), (2047, 3), (5, 1), (0, 1)]
    _run_swa("cuda", requests, window, 53, H=H, R=512, P=64, staged=True)
    _run_swa("cuda", requests, window, 64, H=H, R=512, P=64, staged=True, config={"splits": 4})


@pytest.mark.gpu
def test_swa_decode_cuda_graph(seed):
    """The decode step is capturable: one graph replayed on new queries matches the oracle."""
    ps, window, R, P, H = 64, 256, 512, 64, 128
    requests = [(int(d), 1) for d in torch.randint(0, 1500, (8,))]
    meta, pos, bid, num_blocks = make_batch(requests, ps, "cuda", num_pad=0)
    written = [int(meta["block_tables"][b, p // ps]) * ps + p % ps
               for b, (d, n) in enumerate(requests) for p in range(d + n)]
    cache, keys = make_cache(num_blocks, ps, R, P, written, "cuda")
    q = torch.randn(len(requests), H, R + P, device="cuda").to(torch.bfloat16)
    bt, *batch = meta.values()
    args = (cache, bt[None], *batch, 0.1, P, window, 0, 0)                   # one cache group, group 0
    torch.ops.swa_rewrite.swa_mla_attention(q, *args)                        # warm up (compile)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = torch.ops.swa_rewrite.swa_mla_attention(q, *args)
    q.copy_(torch.randn_like(q, dtype=torch.float32).to(torch.bfloat16))
    out.fill_(float("nan"))
    graph.replay()
    ref = attention_oracle(q, keys, window_slots(meta, pos, bid, window, ps).cuda(), 0.1, R)
    assert_matches(out, lse, *ref)


# ---------------------------------------------------------------------------- ops on CPU (references)
def test_sparse_op_reference_matches_oracle(seed):
    T, H, K, ps, R, P = 6, 3, 21, 5, 128, 16
    idx = random_indices(T, K, 40, "cpu")
    cache, keys = make_cache(8, ps, R, P, idx, "cpu")
    q = torch.randn(T, H, R + P).to(torch.bfloat16)
    out = ops.sparse_mla_attention(q, cache, idx, 0.3, rope_dim=P)
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.float32
    assert_matches(*out, *attention_oracle(q, keys, idx[:, 0].long(), 0.3, R))


@pytest.mark.parametrize("window,ps", [(1, 1), (6, 4), (64, 7)])
def test_swa_op_reference_matches_oracle(seed, window, ps):
    _run_swa("cpu", MIXED, window, ps, use_op=True)


def test_swa_op_wide_window_equals_full_attention(seed):
    """With ``W ≥`` every position, SWA over the FP8 cache = full paged attention over its dequantised rows."""
    ps, R, P = 4, 128, 16
    meta, pos, bid, num_blocks = make_batch(MIXED, ps, "cpu")
    written = [int(meta["block_tables"][b, p // ps]) * ps + p % ps
               for b, (d, n) in enumerate(MIXED) for p in range(d + n)]
    cache, keys = make_cache(num_blocks, ps, R, P, written, "cpu")
    q = torch.randn(pos.shape[0], 4, R + P).to(torch.bfloat16)
    swa = ops.swa_mla_attention(q, cache, *meta.values(), 0.25, window=10_000, rope_dim=P)
    dense_cache = keys.nan_to_num(0.0).to(torch.bfloat16).view(num_blocks, ps, R + P)
    full = ops.paged_mla_attention(q, dense_cache, *meta.values(), 0.25, rope_dim=P)
    assert_matches(*swa, full[0].double(), full[1].double().where(torch.isfinite(full[1]), float("inf")))


def test_sparse_op_rejects_bad_inputs():
    q = torch.randn(2, 4, 144).to(torch.bfloat16)
    cache = torch.zeros(3, 4, row_bytes(128, 16), dtype=torch.uint8)
    idx = torch.zeros(2, 1, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="indices\\[1, 0, 2\\] = 12"):
        bad = idx.clone()
        bad[1, 0, 2] = 12
        ops.sparse_mla_attention(q, cache, bad, 0.1, rope_dim=16)
    with pytest.raises(ValueError, match="-2"):
        ops.sparse_mla_attention(q, cache, idx - 2, 0.1, rope_dim=16)
    with pytest.raises(ValueError, match="uint8"):
        ops.sparse_mla_attention(q, cache.view(torch.int8), idx, 0.1, rope_dim=16)
    with pytest.raises(ValueError, match="164"):
        ops.sparse_mla_attention(q, cache[..., :-2], idx, 0.1, rope_dim=16)
    with pytest.raises(ValueError, match="multiple of 128"):
        ops.sparse_mla_attention(q[..., :100], cache, idx, 0.1, rope_dim=16)
    with pytest.raises(ValueError, match="indices must be"):
        ops.sparse_mla_attention(q, cache, idx[:1], 0.1, rope_dim=16)
    with pytest.raises(ValueError, match="int32 or int64"):
        ops.sparse_mla_attention(q, cache, idx.float(), 0.1, rope_dim=16)


def test_swa_op_rejects_bad_window():
    meta, pos, _, num_blocks = make_batch([(0, 3)], 4, "cpu", num_pad=0)
    cache = torch.zeros(num_blocks, 4, row_bytes(128, 16), dtype=torch.uint8)
    q = torch.randn(3, 2, 144).to(torch.bfloat16)
    with pytest.raises(ValueError, match="window"):
        ops.swa_mla_attention(q, cache, *meta.values(), 0.1, window=0, rope_dim=16)


def test_ops_trace_as_single_nodes():
    """Fake impls give the shapes, and both ops stay one node in an fx graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    meta, pos, _, num_blocks = make_batch([(2, 3), (5, 1)], 4, "cpu")
    cache = torch.zeros(num_blocks, 4, row_bytes(128, 16), dtype=torch.uint8)
    q = torch.randn(pos.shape[0], 2, 144).to(torch.bfloat16)
    idx = torch.zeros(pos.shape[0], 1, 7, dtype=torch.int32)

    def f(q, cache, idx, bt, cu, enc, dec, bid):
        a, la = torch.ops.swa_rewrite.sparse_mla_attention(q, cache, idx, 0.1, 16)
        b, lb = torch.ops.swa_rewrite.swa_mla_attention(q, cache, bt[None], cu, enc, dec, bid, 0.1, 16, 5, 0, 0)
        return a + b, la + lb

    with FakeTensorMode(allow_non_fake_inputs=True):
        o, lse = f(q, cache, idx, *meta.values())
    assert o.shape == (pos.shape[0], 2, 128) and o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    gm = torch.fx.experimental.proxy_tensor.make_fx(f)(q, cache, idx, *meta.values())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.swa_rewrite.sparse_mla_attention.default) == 1
    assert targets.count(torch.ops.swa_rewrite.swa_mla_attention.default) == 1


def test_opcheck(seed):
    idx = random_indices(3, 9, 24, "cpu")
    cache, _ = make_cache(6, 4, 128, 16, idx, "cpu")
    q = torch.randn(3, 2, 144).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.swa_rewrite.sparse_mla_attention.default, (q, cache, idx, 0.2, 16),
                          test_utils=("test_schema", "test_faketensor"))
