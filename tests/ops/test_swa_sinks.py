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

from swa_rewrite import ops

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
