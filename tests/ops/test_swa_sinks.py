"""Attention sinks in the SWA indexer and the fused SWA op (SPEC §12, docs/design.md §12; issue 13).

A layer with window ``W`` and ``s`` sinks: the token at position ``p`` attends to positions
``0 … min(s, p+1)-1`` and ``max(0, p-W+1) … p``, each once. Oracles: the indexer row written out in plain
Python from that sentence; the fused op against a float64 softmax over exactly those positions' slots on
the dequantised cache (``test_sparse_mla_attention``'s own packer/unpacker), unused cache rows NaN,
kernel outputs NaN before the kernels run. Ragged steps: fresh prefill, chunked prefill over cached
history, decode, multi-token decode, positions below, at and past ``s`` and ``W``, trailing padding.
"""

import os
import random

import pytest
import torch

from paged_batches import make_batch
from swa_rewrite import ops
from swa_rewrite.ops.attention import swa_sinks_attention_fwd
from test_sparse_mla_attention import assert_matches, attention_oracle, make_cache, poisoned_outputs, row_bytes

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
PAGE_SIZES = [1, 7, 16, 64]
WINDOWS = [1, 5, 64]
SINKS = [0, 1, 4, 100]


def requests_for(window, sinks):
    """``[(cached, new_tokens), …]`` around the edges that matter: tokens below ``s`` (``s > p + 1``),
    inside ``W``, and far enough past ``W + s`` that every sink lies below the window."""
    edge = window + sinks
    return [(0, 9),                      # fresh prefill from position 0
            (max(0, edge - 3), 6),         # chunk over cached history, crossing p = W + s
            (2, 1),                      # early decode (p = 2)
            (edge + 37, 3),              # multi-token decode far past the window and the sinks
            (max(0, window - 2), 1),     # decode at the window edge
            (sinks + 1, 2)]              # just past the sinks


def build(requests, ps, pad, seed, dtype=torch.int32, extra_cols=2, device="cpu"):
    """Step tensors (shuffled physical blocks, ``-1`` past each request's blocks) and plain-Python tables."""
    rng = random.Random(seed)
    need = [-(-(cached + n) // ps) for cached, n in requests]
    physical = list(range(sum(need) + 3))
    rng.shuffle(physical)
    tables, cu, bids = [], [0], []
    for b, ((cached, n), k) in enumerate(zip(requests, need)):
        tables.append(physical[:k])
        physical = physical[k:]
        cu.append(cu[-1] + n)
        bids += [b] * n
    table = torch.full((len(requests), max(need) + extra_cols), -1, dtype=dtype)
    for b, row in enumerate(tables):
        table[b, :len(row)] = torch.tensor(row, dtype=dtype)
    bids += [-1] * pad
    t = dict(dtype=dtype, device=device)
    args = dict(block_tables=table.to(device), cu_seqlens_q=torch.tensor(cu, **t),
                seq_lens_encoder=torch.tensor([n if n > 1 or c == 0 else 0 for c, n in requests], **t),
                seq_lens_decoder=torch.tensor([c for c, _ in requests], **t),
                batch_id_per_token=torch.tensor(bids, **t))
    return args, tables


def oracle_rows(requests, tables, window, sinks, ps, pad):
    """Plain Python: each token's ``s + W`` entries and its number of attended positions."""
    rows, counts = [], []
    for (cached, n), table in zip(requests, tables):
        def slot(q):
            return table[q // ps] * ps + q % ps
        for i in range(n):
            p = cached + i
            low = max(0, p - window + 1)                           # first position of the window
            head = [slot(j) if j <= p and j < low else -1 for j in range(sinks)]
            tail = [slot(p - window + 1 + k) if p - window + 1 + k >= 0 else -1 for k in range(window)]
            rows.append(head + tail)
            counts.append(len(set(range(min(sinks, p + 1))) | set(range(low, p + 1))))
    rows += [[-1] * (sinks + window)] * pad
    counts += [0] * pad
    return rows, counts


def check_rows(indices, num_valid, rows, counts):
    T, width = len(rows), len(rows[0])
    assert indices.dtype == torch.int32 and indices.shape == (T, 1, width)
    got = indices.cpu()[:, 0].tolist()
    for t in range(T):
        if got[t] != rows[t]:
            k = next(k for k in range(width) if got[t][k] != rows[t][k])
            raise AssertionError(f"token {t}, entry {k}: got {got[t][k]}, expected {rows[t][k]}")
    assert num_valid.cpu().tolist() == counts


def _case(window, sinks, ps, seed, device="cpu", dtype=torch.int32):
    requests = requests_for(window, sinks)
    pad = 2
    args, tables = build(requests, ps, pad, seed, dtype=dtype, device=device)
    return args, oracle_rows(requests, tables, window, sinks, ps, pad)


# ----------------------------------------------------------------------------------------- indexer
@pytest.mark.parametrize("sinks", SINKS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_indexer_reference_op_matches_oracle(seed, ps, window, sinks):
    args, (rows, counts) = _case(window, sinks, ps, seed, dtype=random.Random(seed).choice([torch.int32, torch.int64]))
    indices, num_valid = ops.swa_indexer(**args, window=window, page_size=ps, sinks=sinks, return_num_valid=True)
    check_rows(indices, num_valid, rows, counts)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("specialize", [True, False])
@pytest.mark.parametrize("sinks", SINKS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_indexer_kernel_matches_oracle(seed, device, specialize, ps, window, sinks):
    from swa_rewrite.kernels.swa_indexer import swa_indexer as launch

    args, (rows, counts) = _case(window, sinks, ps, seed, device=device)
    T = args["batch_id_per_token"].shape[0]
    indices = torch.full((T, 1, sinks + window), -7, dtype=torch.int32, device=device)    # poison
    num_valid = torch.full((T,), -7, dtype=torch.int32, device=device)
    # Small tiles so a row spans several programs and sink / window columns share one.
    launch(args["block_tables"], args["cu_seqlens_q"], args["seq_lens_decoder"], args["batch_id_per_token"],
           indices, num_valid, window=window, page_size=ps, sinks=sinks, specialize_page_size=specialize,
           tile_elems=64)
    check_rows(indices, num_valid, rows, counts)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_indexer_op_with_sinks_keeps_the_window_entries(seed, device):
    """Entries ``s …`` are exactly today's (``sinks = 0``) row; ``sinks = 0`` is the default."""
    args, _ = _case(5, 4, 7, seed, device=device)
    plain = ops.swa_indexer(**args, window=5, page_size=7, return_num_valid=True)
    zero = ops.swa_indexer(**args, window=5, page_size=7, sinks=0, return_num_valid=True)
    with_sinks = ops.swa_indexer(**args, window=5, page_size=7, sinks=4)
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])
    assert torch.equal(with_sinks[:, :, 4:], plain[0])
    # Positional schema without sinks (graphs recorded before sinks) still runs, as sinks = 0.
    grouped = {k: (v[None] if k == "block_tables" else v) for k, v in args.items()}
    old = torch.ops.swa_rewrite.swa_indexer(*grouped.values(), 5, 7, 0)
    assert torch.equal(old[0], plain[0])


def test_indexer_sinks_past_the_block_tables_stay_bounded_and_right():
    """``s = 10^6`` over a 12-position table: only the reachable sink columns are computed."""
    requests = [(0, 5), (6, 2)]
    args, tables = build(requests, 4, 1, 1)
    s = 1_000_000
    indices, num_valid = ops.swa_indexer(**args, window=3, page_size=4, sinks=s, return_num_valid=True)
    assert indices.shape == (8, 1, s + 3)
    assert bool((indices[:, 0, 64:s] == -1).all())
    small_rows, small_counts = oracle_rows(requests, tables, 3, 64, 4, 1)
    check_rows(torch.cat([indices[:, :, :64], indices[:, :, s:]], dim=2), num_valid, small_rows, small_counts)


def test_indexer_rejects_bad_sinks():
    args, _ = _case(5, 0, 4, 0)
    with pytest.raises(ValueError, match="sinks must be >= 0, got -1"):
        ops.swa_indexer(**args, window=5, page_size=4, sinks=-1)
    with pytest.raises(TypeError, match="sinks must be an integer"):
        ops.swa_indexer(**args, window=5, page_size=4, sinks=2.0)
    with pytest.raises(TypeError, match="sinks must be an integer"):
        ops.swa_indexer(**args, window=5, page_size=4, sinks=True)


def test_indexer_opcheck_and_fake_shapes():
    args, _ = _case(5, 3, 4, 0)
    grouped = tuple(v[None] if k == "block_tables" else v for k, v in args.items())
    torch.library.opcheck(torch.ops.swa_rewrite.swa_indexer.default, grouped + (5, 4, 0, 3))
    with torch.device("meta"):
        meta = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in args.items()}
        indices, num_valid = ops.swa_indexer(**meta, window=9, page_size=4, sinks=3, return_num_valid=True)
    T = args["batch_id_per_token"].shape[0]
    assert indices.shape == (T, 1, 12) and indices.dtype == torch.int32 and num_valid.shape == (T,)


# ---------------------------------------------------------------------------------------- fused op
def allowed_slots(meta, pos, bid, window, sinks, ps):
    """``[T, K]`` slots of exactly the positions each token may see (``-1`` padded), from the block table."""
    bt = meta["block_tables"].cpu().long()
    rows = []
    for p, b in zip(pos.tolist(), bid.tolist()):
        if b < 0:
            rows.append([])
            continue
        seen = sorted(set(range(min(sinks, p + 1))) | set(range(max(0, p - window + 1), p + 1)))
        rows.append([int(bt[b, q // ps]) * ps + q % ps for q in seen])
    K = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [-1] * (K - len(r)) for r in rows], dtype=torch.long)


def _fused_case(window, sinks, ps, device, H=4, R=128, P=16):
    requests = requests_for(window, sinks)
    meta, pos, bid, num_blocks = make_batch(requests, ps, device)
    written = [int(meta["block_tables"][b, p // ps]) * ps + p % ps
               for b, (d, n) in enumerate(requests) for p in range(d + n)]
    cache, keys = make_cache(num_blocks, ps, R, P, written, device)           # NaN rows where unwritten
    q = torch.randn(pos.shape[0], H, R + P, device=device).to(torch.bfloat16)
    scale = (R + P) ** -0.5 * 2.0
    ref = attention_oracle(q, keys, allowed_slots(meta, pos, bid, window, sinks, ps).to(device), scale, R)
    return meta, cache, q, scale, ref


@pytest.mark.parametrize("sinks", SINKS)
@pytest.mark.parametrize("window,ps", [(1, 1), (5, 7), (64, 16), (5, 64)])
def test_fused_reference_op_matches_dense_oracle(seed, window, ps, sinks):
    meta, cache, q, scale, ref = _fused_case(window, sinks, ps, "cpu")
    out = ops.swa_mla_attention(q, cache, *meta.values(), scale, window=window, sinks=sinks, rope_dim=16)
    assert_matches(*out, *ref)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("sinks", [1, 4, 100])
@pytest.mark.parametrize("window,ps", [(1, 1), (5, 7), (64, 16)])
def test_fused_sinks_kernel_path_matches_dense_oracle(seed, device, window, ps, sinks):
    """The op's CUDA path for ``s > 0`` (indexer kernel → sparse kernel), run on poisoned outputs."""
    meta, cache, q, scale, ref = _fused_case(window, sinks, ps, device)
    out = poisoned_outputs(q.shape[0], q.shape[1], 128, device)
    swa_sinks_attention_fwd(q, cache, meta["block_tables"], meta["cu_seqlens_q"], meta["seq_lens_decoder"],
                            meta["batch_id_per_token"], scale, 16, window, sinks, out=out)
    assert_matches(*out, *ref)


@pytest.mark.gpu
@pytest.mark.parametrize("sinks", [0, 4, 100])
@pytest.mark.parametrize("window,ps", [(1, 1), (128, 64), (1000, 53)])
def test_fused_op_gpu_matches_dense_oracle(seed, window, ps, sinks):
    meta, cache, q, scale, ref = _fused_case(window, sinks, ps, "cuda", H=128, R=512, P=64)
    out = ops.swa_mla_attention(q, cache, *meta.values(), scale, window=window, sinks=sinks, rope_dim=64)
    assert_matches(*out, *ref)


@pytest.mark.gpu
def test_fused_op_with_sinks_decode_cuda_graph(seed):
    """The sinks path is capturable: one graph replayed on new queries matches the oracle."""
    ps, window, sinks, R, P, H = 64, 256, 4, 512, 64, 128
    requests = [(int(d), 1) for d in torch.randint(0, 1500, (8,))]
    meta, pos, bid, num_blocks = make_batch(requests, ps, "cuda", num_pad=0)
    written = [int(meta["block_tables"][b, p // ps]) * ps + p % ps
               for b, (d, n) in enumerate(requests) for p in range(d + n)]
    cache, keys = make_cache(num_blocks, ps, R, P, written, "cuda")
    q = torch.randn(len(requests), H, R + P, device="cuda").to(torch.bfloat16)
    bt, *batch = meta.values()
    args = (cache, bt[None], *batch, 0.1, P, window, 0, 0, sinks)
    torch.ops.swa_rewrite.swa_mla_attention(q, *args)                        # warm up (compile)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = torch.ops.swa_rewrite.swa_mla_attention(q, *args)
    q.copy_(torch.randn_like(q, dtype=torch.float32).to(torch.bfloat16))
    out.fill_(float("nan"))
    graph.replay()
    ref = attention_oracle(q, keys, allowed_slots(meta, pos, bid, window, sinks, ps).cuda(), 0.1, R)
    assert_matches(out, lse, *ref)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_op_without_sinks_is_unchanged_bit_for_bit(seed, device):
    """``sinks = 0`` (explicit, default, or a positional call of the old schema) gives today's output."""
    meta, cache, q, scale, _ = _fused_case(5, 0, 7, device)
    bt, *batch = meta.values()
    old = torch.ops.swa_rewrite.swa_mla_attention(q, cache, bt[None], *batch, scale, 16, 5, -1, 0)
    default = ops.swa_mla_attention(q, cache, *meta.values(), scale, window=5, rope_dim=16)
    zero = ops.swa_mla_attention(q, cache, *meta.values(), scale, window=5, sinks=0, rope_dim=16)
    for got in (default, zero):
        assert torch.equal(got[0], old[0]) and torch.equal(got[1], old[1])


def test_fused_op_rejects_bad_sinks_and_traces_with_them():
    from torch._subclasses.fake_tensor import FakeTensorMode

    meta, pos, _, num_blocks = make_batch([(2, 3), (5, 1)], 4, "cpu")
    cache = torch.zeros(num_blocks, 4, row_bytes(128, 16), dtype=torch.uint8)
    q = torch.randn(pos.shape[0], 2, 144).to(torch.bfloat16)
    with pytest.raises(ValueError, match="sinks must be >= 0, got -2"):
        ops.swa_mla_attention(q, cache, *meta.values(), 0.1, window=3, sinks=-2, rope_dim=16)
    with pytest.raises(TypeError, match="sinks must be an integer"):
        ops.swa_mla_attention(q, cache, *meta.values(), 0.1, window=3, sinks=1.5, rope_dim=16)

    def f(q, cache, bt, cu, enc, dec, bid):
        return torch.ops.swa_rewrite.swa_mla_attention(q, cache, bt[None], cu, enc, dec, bid, 0.1, 16, 5, 0, 0, 4)

    with FakeTensorMode(allow_non_fake_inputs=True):
        o, lse = f(q, cache, *meta.values())
    assert o.shape == (pos.shape[0], 2, 128) and lse.shape == (pos.shape[0], 2)
    gm = torch.fx.experimental.proxy_tensor.make_fx(f)(q, cache, *meta.values())
    nodes = [n for n in gm.graph.nodes if n.target == torch.ops.swa_rewrite.swa_mla_attention.default]
    assert len(nodes) == 1 and nodes[0].args[-1] == 4
