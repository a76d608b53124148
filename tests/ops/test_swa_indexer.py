"""Sliding-window indexer (docs/design.md §3, §5, §7, issue 3): reference op and Triton kernel vs a plain-Python oracle.

Random ragged batches (``hypothesis``): decodes with 1..4 query tokens (multi-token prediction), fresh
prefills, prefill chunks over cached history, trailing padding tokens, shuffled block tables, page sizes
1..256 (53 included) and windows 1..4096.
"""

import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swa_rewrite import ops
from swa_rewrite.ops.swa_indexer import swa_indexer_reference
from swa_rewrite.runtime import StepBatch, StepItem

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
PAGE_SIZES = st.one_of(st.sampled_from([1, 7, 16, 53, 64, 128, 256]), st.integers(1, 256))
WINDOWS = st.one_of(st.sampled_from([1, 2, 128, 4096]), st.integers(1, 4096))


@st.composite
def ragged_batches(draw, max_requests=5):
    """A step as plain Python: ``(requests, window, page_size, pad, index dtype, table columns, seed)``.

    Each request is ``(num_cached, num_query_tokens, is_prefill)``.
    """
    window = draw(WINDOWS)
    page_size = draw(PAGE_SIZES)
    requests = []
    for _ in range(draw(st.integers(1, max_requests))):
        kind = draw(st.sampled_from(["decode", "prefill", "chunk"]))
        # History around the window edge: shorter than, about, and well past the window.
        history = draw(st.one_of(st.integers(0, 8), st.integers(max(0, window - 8), window + 8),
                                 st.integers(0, 2 * window + 300)))
        if kind == "decode":
            requests.append((history + 1, draw(st.integers(1, 4)), False))
        elif kind == "prefill":
            requests.append((0, draw(st.integers(1, 24)), True))
        else:
            requests.append((history + 1, draw(st.integers(1, 24)), True))
    pad = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    extra_cols = draw(st.integers(0, 3))
    return requests, window, page_size, pad, dtype, extra_cols, draw(st.integers(0, 2**31 - 1))


def build(case, device="cpu"):
    """Tensors of a drawn case (shuffled physical blocks) and the plain-Python block tables."""
    requests, window, ps, pad, dtype, extra_cols, seed = case
    rng = random.Random(seed)
    need = [-(-(cached + n) // ps) for cached, n, _ in requests]
    physical = list(range(sum(need) + rng.randint(0, 5)))
    rng.shuffle(physical)
    tables, cu, bids = [], [0], []
    for b, ((cached, n, _), k) in enumerate(zip(requests, need)):
        tables.append(physical[:k])
        physical = physical[k:]
        cu.append(cu[-1] + n)
        bids += [b] * n
    width = max(need) + extra_cols
    table = torch.full((len(requests), width), -1, dtype=dtype)
    for b, row in enumerate(tables):
        table[b, :len(row)] = torch.tensor(row, dtype=dtype)
    bids += [-1] * pad
    t = dict(dtype=dtype, device=device)
    args = dict(block_tables=table.to(device), cu_seqlens_q=torch.tensor(cu, **t),
                seq_lens_encoder=torch.tensor([n if pre else 0 for _, n, pre in requests], **t),
                seq_lens_decoder=torch.tensor([c for c, _, _ in requests], **t),
                batch_id_per_token=torch.tensor(bids, **t))
    return args, tables


def oracle(case, tables):
    """Plain-Python window slots ``[T][W]`` and valid counts ``[T]``."""
    requests, window, ps, pad, *_ = case
    rows, counts = [], []
    for (cached, n, _), table in zip(requests, tables):
        for i in range(n):
            p = cached + i
            row = []
            for k in range(window):
                pos = p - window + 1 + k
                row.append(table[pos // ps] * ps + pos % ps if pos >= 0 else -1)
            rows.append(row)
            counts.append(min(window, p + 1))
    rows += [[-1] * window for _ in range(pad)]
    counts += [0] * pad
    return rows, counts


def assert_matches(indices, num_valid, case, tables):
    rows, counts = oracle(case, tables)
    T, W = len(rows), case[1]
    assert indices.dtype == torch.int32 and indices.shape == (T, 1, W)
    assert num_valid.dtype == torch.int32 and num_valid.shape == (T,)
    got = indices.cpu()[:, 0].tolist()
    for t in range(T):
        if got[t] != rows[t]:
            k = next(k for k in range(W) if got[t][k] != rows[t][k])
            raise AssertionError(f"token {t}, entry {k}: got {got[t][k]}, expected {rows[t][k]} "
                                 f"({sum(a != b for a, b in zip(got[t], rows[t]))} of {W} entries differ)")
    assert num_valid.cpu().tolist() == counts


def _launch(args, window, page_size, specialize=False):
    from swa_rewrite.kernels.swa_indexer import swa_indexer as launch

    T = args["batch_id_per_token"].shape[0]
    device = args["block_tables"].device
    indices = torch.full((T, 1, window), -7, dtype=torch.int32, device=device)   # poison
    num_valid = torch.full((T,), -7, dtype=torch.int32, device=device)
    launch(args["block_tables"], args["cu_seqlens_q"], args["seq_lens_decoder"], args["batch_id_per_token"],
           indices, num_valid, window=window, page_size=page_size, specialize_page_size=specialize)
    return indices, num_valid


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=40, **_SETTINGS)
@given(case=ragged_batches())
def test_reference_op_matches_python_oracle(case):
    args, tables = build(case)
    indices, num_valid = ops.swa_indexer(**args, window=case[1], page_size=case[2], return_num_valid=True)
    assert_matches(indices, num_valid, case, tables)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_matches_python_oracle(device):
    examples = 15 if device == "cpu" else 25

    @settings(max_examples=examples, **_SETTINGS)
    @given(case=ragged_batches(), specialize=st.booleans())
    def check(case, specialize):
        args, tables = build(case, device)
        assert_matches(*_launch(args, case[1], case[2], specialize), case, tables)

    check()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_last_entry_is_the_runtime_slot_of_the_token(device):
    """Cross-check with the runtime: entry ``W-1`` is the token's own slot (its ``slot_mapping``)."""
    ps, W = 53, 300
    items = [StepItem(list(range(40)), 200, [5, 2, 9, 0, 7], True),    # chunk over cached history
             StepItem([1, 2, 3], 97, [4, 8], False),                    # 3-token decode (MTP)
             StepItem(list(range(30)), 0, [1], True)]                    # fresh prefill
    b = StepBatch.build(items, ps, pad_to=80, device=device)
    indices, num_valid = ops.swa_indexer(b.meta.block_tables, *b.meta.batch_tensors(), window=W, page_size=ps,
                                         return_num_valid=True)
    slots = b.meta.slot_mapping[0]                                       # the one cache group's slots
    live = slots >= 0
    assert torch.equal(indices[live, 0, -1].long(), slots[live])
    assert (indices[~live] == -1).all() and (num_valid[~live] == 0).all()
    assert torch.equal(num_valid[live].long(), torch.clamp(b.meta.positions[live] + 1, max=W))


@pytest.mark.gpu
def test_op_on_gpu_equals_reference_on_a_large_step(seed):
    ps, W = 64, 2048
    cached = torch.randint(0, 8192, (64,)).tolist()
    items = []
    physical = torch.randperm(64 * 200).tolist()
    for b, c in enumerate(cached):
        n = 1 if b % 2 else 33
        blocks = -(-(c + n) // ps)
        items.append(StepItem([0] * n, c, physical[:blocks], b % 2 == 0))
        physical = physical[blocks:]
    batch = StepBatch.build(items, ps, pad_to=2048, device="cuda")
    args = (batch.meta.block_tables, batch.meta.cu_seqlens_q, batch.meta.seq_lens_encoder, batch.meta.seq_lens_decoder,
            batch.meta.batch_id_per_token)
    got = ops.swa_indexer(*args, window=W, page_size=ps, return_num_valid=True)
    want = swa_indexer_reference(batch.meta.block_tables[0].cpu(), batch.meta.cu_seqlens_q.cpu(), batch.meta.seq_lens_decoder.cpu(),
                                 batch.meta.batch_id_per_token.cpu(), W, ps)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


def _small_args():
    b = StepBatch.build([StepItem([1, 2, 3], 5, [2, 0], True), StepItem([4], 2, [1], False)], 4, pad_to=6)
    return dict(block_tables=b.meta.block_tables, cu_seqlens_q=b.meta.cu_seqlens_q,
                seq_lens_encoder=b.meta.seq_lens_encoder, seq_lens_decoder=b.meta.seq_lens_decoder,
                batch_id_per_token=b.meta.batch_id_per_token)


@pytest.mark.parametrize("change,kwargs,match", [
    ({}, dict(window=0, page_size=4), "window must be >= 1, got 0"),
    ({}, dict(window=8, page_size=0), "page_size must be >= 1, got 0"),
    ({}, dict(window=8, page_size=3), "block table holds 6 positions"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 5], dtype=torch.int32)), dict(window=8, page_size=4),
     "batch_id_per_token"),
    (dict(block_tables=torch.tensor([[2, -1], [1, -1]], dtype=torch.int32)), dict(window=8, page_size=4),
     r"block_tables\[0, 1\] = -1"),
    (dict(batch_id_per_token=torch.zeros(6)), dict(window=8, page_size=4), "must be int32 or int64"),
])
def test_op_rejects_bad_metadata(change, kwargs, match):
    args = _small_args()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.swa_indexer(**args, **kwargs)


def test_opcheck_and_fake_shapes():
    args = _small_args()
    torch.library.opcheck(torch.ops.swa_rewrite.swa_indexer.default, tuple(args.values()) + (5, 4, 0))
    with torch.device("meta"):
        meta = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in args.items()}
        indices, num_valid = ops.swa_indexer(**meta, window=9, page_size=4, return_num_valid=True)
    assert indices.shape == (6, 1, 9) and indices.dtype == torch.int32
    assert num_valid.shape == (6,) and num_valid.dtype == torch.int32


def test_all_padding_step_with_no_request():
    """A step of padding tokens only (B = 0), as a CUDA-graph engine pads an empty batch."""
    i32 = dict(dtype=torch.int32)
    idx, num_valid = ops.swa_indexer(torch.zeros(0, 3, **i32), torch.zeros(1, **i32), torch.zeros(0, **i32),
                                     torch.zeros(0, **i32), torch.full((5,), -1, **i32), window=7, page_size=16,
                                     return_num_valid=True)
    assert idx.shape == (5, 1, 7) and bool((idx == -1).all())
    assert num_valid.tolist() == [0] * 5


def _peak_rss_growth(fn):
    """``fn()`` and the growth of this process's peak resident memory while it ran, in bytes (Linux: the
    peak is reset through ``/proc/self/clear_refs``), or None where that cannot be measured. Torch's CPU
    allocations are invisible to tracemalloc and torch keeps no CPU allocator statistics."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS:")
    except (OSError, StopIteration):
        return fn(), None
    out = fn()
    return out, status("VmHWM:") - base


def test_huge_window_over_a_short_context_has_bounded_temporaries_and_right_values(seed):
    """W = 2^21 over 3 tokens and 2 blocks of 4: a token's slots lie in a band of at most 8 entries, so the
    reference builds no [T, W] int64 temporaries (it peaked at ~15x its output, and W = 10^7 killed the
    process); the output itself is [T, 1, W] int32 by contract."""
    W, ps = 1 << 21, 4
    b = StepBatch.build([StepItem([1, 2, 3], 2, [3, 1], True)], ps, pad_to=4)
    args = (b.meta.block_tables, b.meta.cu_seqlens_q, b.meta.seq_lens_encoder, b.meta.seq_lens_decoder, b.meta.batch_id_per_token)
    (indices, num_valid), growth = _peak_rss_growth(
        lambda: ops.swa_indexer(*args, window=W, page_size=ps, return_num_valid=True))
    output_bytes = indices.numel() * indices.element_size()
    if growth is not None:
        assert growth < 2 * output_bytes, \
            f"peak grew {growth / 2**20:.0f} MiB for a {output_bytes / 2**20:.0f} MiB output"
    # Positions 2, 3, 4 (2 cached); position q is slot table[q // 4] * 4 + q % 4 with table [3, 1].
    slot = {0: 12, 1: 13, 2: 14, 3: 15, 4: 4}
    for t, p in enumerate([2, 3, 4]):
        tail = indices[t, 0, W - (p + 1):].tolist()
        assert tail == [slot[q] for q in range(p + 1)]
        assert bool((indices[t, 0, :W - (p + 1)] == -1).all())           # positions < 0
    assert bool((indices[3] == -1).all())                                 # padding
    assert num_valid.tolist() == [3, 4, 5, 0]
