"""Window-bounded block tables (docs/design.md §12, issue 13): in a sliding cache group a request's row holds blocks
only for the pages its sink positions and its window ``[max(0, n - W + 1), n + C)`` cover; every other entry is
``-1`` (released).

Every attention path must read only those pages: the CPU references (fused op, indexer), the indexer kernel, the
gathered, page-tile and staged SWA kernels, the sinks path (indexer + sparse kernel) and the dense kernel. The
tests build random ragged steps (fresh prefills, chunks over cached history, multi-token decodes, decodes,
padding), give the ops the bounded table, and poison everything nothing may read: the blocks of released pages
(0xFF bytes, NaN in fp8, fp32 and bf16), the rows past a request's last position, one block before the cache and
one after it (where an address formed from ``-1``, or one past the pool, lands), and the outputs. Results must
be finite and match the float64 oracle computed through the *unbounded* table (every page a block), within the
tolerances of ``test_sparse_mla_attention``; the CPU op must equal the same op on the unbounded table exactly.
Kernels run under the Triton interpreter on CPU (tiny shapes) and on the GPU under ``-m gpu``.

The checks: a ``-1`` a token reads (window, sinks) is an error naming request, column and position; ``-1`` or a
block elsewhere is accepted; any other value is not.
"""

import math
import os
import random

import pytest
import torch

from test_sparse_mla_attention import assert_matches, attention_oracle, pack_rows, unpack_rows
from swa_rewrite import ops
from swa_rewrite.ops.attention import swa_sinks_attention_fwd
from swa_rewrite.ops.swa_indexer import launch_swa_indexer, swa_indexer_reference

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
POISON = 0xFF
I32 = dict(dtype=torch.int32)


def read_positions(d, n, window, sinks):
    """Positions a request with ``d`` cached and ``n`` new tokens reads (every one up to its end when ``window`` is
    None): its sinks ``0 … min(s, d+n)-1`` and ``max(0, d-W+1) … d+n-1``. Written independently of
    ``ops.batch_checks``."""
    end = d + n
    if window is None:
        return set(range(end))
    return set(range(min(sinks, end))) | set(range(max(0, d - window + 1), end))


class Step:
    """A ragged step over a pool of ``num_blocks`` blocks with two block tables per request: ``full`` (every page
    a block, the unbounded table) and ``bounded`` (``-1`` where the request reads nothing), stacked as the step's
    ``block_tables [2, B, nb]`` (group 0 full, group 1 bounded)."""

    def __init__(self, requests, ps, window, sinks, device, num_pad=2, rng=None):
        rng = rng or random.Random(0)
        self.requests, self.ps, self.window, self.sinks = requests, ps, window, sinks
        B = len(requests)
        pages = [math.ceil((d + n) / ps) for d, n in requests]
        nb = max(pages + [0]) + 1                               # one column past every request's end
        self.num_blocks = sum(pages) + 3                        # a few blocks nobody holds
        ids = list(range(self.num_blocks))
        rng.shuffle(ids)
        full = torch.full((B, nb), -1, **I32)
        bounded = torch.full((B, nb), -1, **I32)
        used = 0
        for b, (d, n) in enumerate(requests):
            full[b, :pages[b]] = torch.tensor(ids[used:used + pages[b]], **I32)
            used += pages[b]
            for i in {p // ps for p in read_positions(d, n, window, sinks)}:
                bounded[b, i] = full[b, i]
        self.full, self.bounded = full, bounded
        q_lens = [n for _, n in requests]
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        self.pos = torch.tensor([p for d, n in requests for p in range(d, d + n)] + [-1] * num_pad)
        self.bid = torch.tensor([b for b, n in enumerate(q_lens) for _ in range(n)] + [-1] * num_pad)
        self.batch = tuple(t.to(device) for t in (
            torch.tensor(cu, **I32), torch.tensor([n if d == 0 or n > 1 else 0 for d, n in requests], **I32),
            torch.tensor([d for d, _ in requests], **I32), self.bid.to(torch.int32)))
        self.tables = torch.stack([full, bounded]).to(device)   # [G = 2, B, nb]
        self.device = device

    @property
    def T(self):
        return self.pos.shape[0]

    def live_slots(self):
        """Slots holding data: every position a request wrote, in the blocks its bounded table still holds."""
        out = []
        for b, (d, n) in enumerate(self.requests):
            for p in range(d + n):
                blk = int(self.bounded[b, p // self.ps])
                if blk >= 0:
                    out.append(blk * self.ps + p % self.ps)
        return out

    def read_slots(self):
        """``[T, K]`` slots (``-1`` padded) each token attends through the *unbounded* table: sinks below its
        window, then the window (SPEC §3, §12)."""
        rows = []
        for t in range(self.T):
            b, p = int(self.bid[t]), int(self.pos[t])
            if b < 0:
                rows.append([])
                continue
            lo = max(0, p - self.window + 1) if self.window is not None else 0
            positions = list(range(min(self.sinks, lo))) + list(range(lo, p + 1))
            rows.append([int(self.full[b, q // self.ps]) * self.ps + q % self.ps for q in positions])
        K = max(1, max(len(r) for r in rows))
        return torch.tensor([r + [-1] * (K - len(r)) for r in rows], dtype=torch.long)


def poisoned_cache(num_blocks, ps, width, dtype, live_slots, rows, device, pad=32):
    """A cache ``[num_blocks, ps, width]`` inside poisoned storage (one block before it, one after, ``pad``
    bytes of block stride): ``rows [num_blocks·ps, width]`` at ``live_slots``, poison everywhere else."""
    es = torch.empty(0, dtype=dtype).element_size()
    stride = ps * width + pad // es
    fill = POISON if dtype == torch.uint8 else float("nan")
    storage = torch.full(((num_blocks + 2) * stride,), fill, dtype=dtype)
    shape, strides = (num_blocks, ps, width), (stride, width, 1)
    cache = storage.as_strided(shape, strides, stride)                  # block -1 and block num_blocks: poison
    live = torch.tensor(sorted(set(live_slots)), dtype=torch.long)
    if live.numel():
        cache[live // ps, live % ps] = rows[live]
    return storage.to(device).as_strided(shape, strides, stride)


def fp8_step(step, R, P, device):
    """The packed FP8 cache of ``step`` and its float64 keys (NaN where poisoned)."""
    n = step.num_blocks * step.ps
    magnitude = torch.logspace(-1, 1, n, dtype=torch.float64)[torch.randperm(n), None]
    latent = torch.randn(n, R + P, dtype=torch.float64) * magnitude
    packed = pack_rows(latent, P)
    live = step.live_slots()
    cache = poisoned_cache(step.num_blocks, step.ps, packed.shape[1], torch.uint8, live, packed, device)
    keys = torch.full((n, R + P), float("nan"), dtype=torch.float64)
    keys[live] = unpack_rows(packed[live], P)
    return cache, keys.to(device)


def nan_outputs(T, H, R, device):
    return (torch.full((T, H, R), float("nan"), dtype=torch.bfloat16, device=device),
            torch.full((T, H), float("nan"), dtype=torch.float32, device=device))


def random_requests(rng, window, sinks, ps, count=6):
    """A ragged mix: a fresh prefill, a chunk over history that is longer than the window, a multi-token decode,
    plain decodes deep into their windows and at the first token."""
    far = max(window, sinks, 2 * ps) + rng.randrange(1, 3 * ps + 8)
    kinds = [(0, rng.randrange(2, 9)), (far + rng.randrange(0, ps + 3), rng.randrange(2, 7)),
             (far + rng.randrange(0, 9), 3), (far + rng.randrange(0, 2 * ps + 5), 1),
             (rng.randrange(0, 5), 1), (0, 1)]
    rng.shuffle(kinds)
    return kinds[:count]


# Sampled from {page sizes 1, 7, 16, 64} × {windows 1, 5, 64, 200} × {sinks 0, 3}: every value of each axis
# appears with several of the others (the full product under the interpreter would take minutes).
CASES = [(1, 1, 0), (1, 5, 3), (1, 200, 0), (7, 1, 3), (7, 5, 0), (7, 64, 3), (7, 200, 0), (16, 5, 0),
         (16, 64, 3), (16, 200, 0), (16, 1, 0), (64, 64, 0), (64, 200, 3), (64, 5, 3), (64, 1, 0)]
CASE_IDS = [f"ps{ps}-w{w}-s{s}" for ps, w, s in CASES]


def _fused_swa(step, q, cache, scale, P, device, *, kernel=None, staged=None, config=None, group=1):
    """The fused op's path for ``step`` on table ``group``: the CPU reference through the op on CPU, else the
    Triton launchers (the op's CUDA path: sinks → indexer + sparse kernel; no sinks → gathered / page tiles /
    staged)."""
    bt = step.tables[group]
    cu, enc, dec, bid = step.batch
    W, s = step.window, step.sinks
    if kernel is None:
        return ops.swa_mla_attention(q, cache, step.tables, cu, enc, dec, bid, scale, window=W, sinks=s,
                                     rope_dim=P, group=group)
    out = nan_outputs(step.T, q.shape[1], q.shape[2] - P, device)
    if s > 0:
        return swa_sinks_attention_fwd(q, cache, bt, cu, dec, bid, scale, P, W, s, out=out)
    from swa_rewrite.kernels.sparse_mla import swa_attention_fwd

    return swa_attention_fwd(q, cache, bt.contiguous(), cu, dec, bid, scale, P, W, config=config, staged=staged,
                             out=out)


def run_swa_case(device, ps, window, sinks, seed, *, H=2, R=128, P=16, kernel=None, staged=None, config=None):
    rng = random.Random(seed)
    step = Step(random_requests(rng, window, sinks, ps), ps, window, sinks, device, rng=rng)
    assert (step.bounded == -1).sum() > (step.full == -1).sum() or window >= 64, "nothing released: weak test"
    cache, keys = fp8_step(step, R, P, device)
    q = torch.randn(step.T, H, R + P, device=device).to(torch.bfloat16)
    scale = (R + P) ** -0.5 * 2.0
    got = _fused_swa(step, q, cache, scale, P, device, kernel=kernel, staged=staged, config=config)
    assert torch.isfinite(got[0]).all(), "non-finite output: a poisoned (released or unwritten) row was read"
    ref = attention_oracle(q, keys, step.read_slots().to(device), scale, R)
    assert_matches(*got, *ref)
    return step, cache, q, scale, got


# ------------------------------------------------------------------------------------------ CPU references
@pytest.mark.parametrize("ps,window,sinks", CASES, ids=CASE_IDS)
def test_cpu_op_reads_only_the_window(ps, window, sinks, seed):
    """The fused op on CPU (checked mode: the window-aware checks accept the bounded table) matches the oracle,
    and equals the same op on the unbounded table exactly."""
    step, cache, q, scale, got = run_swa_case("cpu", ps, window, sinks, seed)
    unbounded = _fused_swa(step, q, cache, scale, 16, "cpu", group=0)
    assert torch.equal(got[0], unbounded[0]) and torch.equal(got[1], unbounded[1])


@pytest.mark.parametrize("ps,window,sinks", CASES, ids=CASE_IDS)
def test_indexer_reference_gives_the_unbounded_slots(ps, window, sinks, seed):
    step = Step(random_requests(random.Random(seed), window, sinks, ps), ps, window, sinks, "cpu")
    cu, enc, dec, bid = step.batch
    got = ops.swa_indexer(step.tables, cu, enc, dec, bid, window=window, page_size=ps, sinks=sinks, group=1,
                          return_num_valid=True)
    want = swa_indexer_reference(step.full, cu, dec, bid, window, ps, sinks)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_interpreter
@pytest.mark.parametrize("ps,window,sinks", CASES, ids=CASE_IDS)
def test_indexer_kernel_gives_the_unbounded_slots_interpreter(ps, window, sinks, seed):
    step = Step(random_requests(random.Random(seed), window, sinks, ps), ps, window, sinks, "cpu")
    cu, _, dec, bid = step.batch
    idx = torch.full((step.T, 1, sinks + window), -7, **I32)
    num_valid = torch.full((step.T,), -7, **I32)
    launch_swa_indexer(step.tables[1], cu, dec, bid, idx, num_valid, window=window, page_size=ps, sinks=sinks)
    want = swa_indexer_reference(step.full, cu, dec, bid, window, ps, sinks)
    assert torch.equal(idx, want[0]) and torch.equal(num_valid, want[1])


# ------------------------------------------------------------------------------------ kernels, interpreter
def _kernel_variants(ps, sinks):
    """(id, kwargs of run_swa_case) of the fused op's Triton paths for this page size."""
    if sinks:
        return [("indexer+sparse", dict(kernel="sinks"))]
    variants = [("gathered", dict(kernel="direct", staged=False, config=dict(kernel="generic"))),
                ("gathered-split", dict(kernel="direct", staged=False, config=dict(kernel="generic", splits=3))),
                ("staged", dict(kernel="direct", staged=True, config=dict(block_t=1))),
                ("staged-token-tiles", dict(kernel="direct", staged=True, config=dict(splits=2)))]   # few heads
    if ps % 16 == 0:           # 16-key tiles (the interpreter's, and forced on the GPU) fit in a page
        tiles = dict(kernel="tiles", tma=False, block_n=16)
        variants += [("page-tiles", dict(kernel="direct", staged=False, config=tiles)),
                     ("page-tiles-chunk-split", dict(kernel="direct", staged=False,
                                                     config=dict(tiles, chunk=2, splits=2)))]
    return variants


@needs_interpreter
@pytest.mark.parametrize("ps,window,sinks", CASES, ids=CASE_IDS)
def test_swa_kernels_read_only_the_window_interpreter(ps, window, sinks, seed):
    for name, kwargs in _kernel_variants(ps, sinks):
        try:
            run_swa_case("cpu", ps, window, sinks, seed, **kwargs)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


def _dense_case(device, ps, seed, *, H=2, R=32, P=16, config=None):
    """The dense kernel over a full group: every page to each request's end a block, the column past it ``-1``,
    unwritten rows and unheld blocks NaN, poison around the pool."""
    from swa_rewrite.kernels.paged_mla import paged_mla_attention_fwd

    rng = random.Random(seed)
    step = Step(random_requests(rng, 5, 0, ps), ps, None, 0, device, rng=rng)
    D = R + P
    n = step.num_blocks * ps
    rows = torch.randn(n, D).to(torch.bfloat16)
    cache = poisoned_cache(step.num_blocks, ps, D, torch.bfloat16, step.live_slots(), rows, device)
    keys = torch.full((n, D), float("nan"), dtype=torch.float64)
    keys[step.live_slots()] = rows[step.live_slots()].double()
    q = torch.randn(step.T, H, D, device=device).to(torch.bfloat16)
    out = nan_outputs(step.T, H, R, device)
    cu, _, dec, bid = step.batch
    paged_mla_attention_fwd(q, cache, step.tables[0], cu, dec, bid, 0.2, P, config=config, out=out)
    assert torch.isfinite(out[0]).all()
    assert_matches(*out, *attention_oracle(q, keys.to(device), step.read_slots().to(device), 0.2, R))


@needs_interpreter
@pytest.mark.parametrize("ps", [1, 7, 16, 64])
def test_dense_kernel_reads_only_the_request_interpreter(ps, seed):
    _dense_case("cpu", ps, seed)
    if ps % 16 == 0:
        _dense_case("cpu", ps, seed, config=dict(kernel="tiles", tma=False, chunk=2, splits=2))


# ------------------------------------------------------------------------------------------------- GPU
GPU_CASES = [(ps, w, s) for ps in (1, 7, 16, 64) for w in (1, 5, 64, 200) for s in (0, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("ps,window,sinks", GPU_CASES, ids=[f"ps{ps}-w{w}-s{s}" for ps, w, s in GPU_CASES])
@pytest.mark.parametrize("H", [16, 128])
def test_swa_op_reads_only_the_window_gpu(ps, window, sinks, H, seed):
    """The op as the model calls it (its CUDA dispatch picks the kernel), DeepSeek-V3 row sizes."""
    run_swa_case("cuda", ps, window, sinks, seed, H=H, R=512, P=64)


@pytest.mark.gpu
@pytest.mark.parametrize("ps,window,sinks", GPU_CASES, ids=[f"ps{ps}-w{w}-s{s}" for ps, w, s in GPU_CASES])
def test_swa_kernels_read_only_the_window_gpu(ps, window, sinks, seed):
    for name, kwargs in _kernel_variants(ps, sinks) + ([("page-tiles-tma", dict(
            kernel="direct", staged=False, config=dict(kernel="tiles", tma=True, block_n=16)))] if ps % 16 == 0
            and not sinks else []):
        try:
            run_swa_case("cuda", ps, window, sinks, seed, H=16, R=512, P=64, **kwargs)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


@pytest.mark.gpu
@pytest.mark.parametrize("ps", [1, 7, 16, 64])
def test_dense_kernel_reads_only_the_request_gpu(ps, seed):
    _dense_case("cuda", ps, seed, H=128, R=512, P=64)
    if ps % 16 == 0:
        _dense_case("cuda", ps, seed, H=128, R=512, P=64, config=dict(kernel="tiles", tma=True, block_n=16))


@pytest.mark.gpu
@pytest.mark.parametrize("ps,window,sinks", [(64, 200, 0), (7, 64, 3)])
def test_swa_indexer_kernel_gives_the_unbounded_slots_gpu(ps, window, sinks, seed):
    step = Step(random_requests(random.Random(seed), window, sinks, ps), ps, window, sinks, "cuda")
    cu, enc, dec, bid = step.batch
    got = ops.swa_indexer(step.tables, cu, enc, dec, bid, window=window, page_size=ps, sinks=sinks, group=1,
                          return_num_valid=True)
    want = swa_indexer_reference(step.full, *(t.cpu() for t in (cu, dec, bid)), window, ps, sinks)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


# ------------------------------------------------------------------------------------------------ checks
def _small(window=4, sinks=0, ps=4):
    """Request 0: 9 cached + 3 new (pages 0-2), request 1: 6 cached + 1 new (pages 0-1), two padding tokens."""
    return Step([(9, 3), (6, 1)], ps, window, sinks, "cpu", rng=random.Random(3))


def _swa(step, tables, window=None, sinks=None, group=1):
    cu, enc, dec, bid = step.batch
    q = torch.randn(step.T, 2, 144)
    cache = torch.zeros(step.num_blocks, step.ps, 164, dtype=torch.uint8)
    return ops.swa_mla_attention(q, cache, tables, cu, enc, dec, bid, 0.1, rope_dim=16, group=group,
                                 window=step.window if window is None else window,
                                 sinks=step.sinks if sinks is None else sinks)


def _indexer(step, tables, window=None, sinks=None):
    cu, enc, dec, bid = step.batch
    return ops.swa_indexer(tables, cu, enc, dec, bid, window=step.window if window is None else window,
                           page_size=step.ps, sinks=step.sinks if sinks is None else sinks, group=1)


def test_released_entries_outside_the_window_are_accepted():
    step = _small(window=2)                  # request 0 reads positions 8 … 11, request 1 positions 5 … 6
    assert step.bounded.tolist() == [[-1, -1, int(step.full[0, 2]), -1], [-1, int(step.full[1, 1]), -1, -1]]
    _swa(step, step.tables)
    _indexer(step, step.tables)


@pytest.mark.parametrize("op", [_swa, _indexer], ids=["attention", "indexer"])
def test_a_released_entry_inside_the_window_is_rejected(op):
    step = _small(window=5)                 # request 0 reads positions 5 … 11: pages 1 and 2
    tables = step.tables.clone()
    tables[1, 0, 1] = -1
    with pytest.raises(ValueError, match=r"block_tables\[1\]\[0, 1\] = -1 \(released\), but position 5 of request 0 "
                                         r"lies in its window: with 9 positions cached and 3 in this step it reads "
                                         r"positions 5 … 11 \(window 5, page size 4\)"):
        op(step, tables)


def test_a_released_sink_page_is_rejected_only_with_sinks():
    step = _small(window=2, sinks=2)         # request 1 (6 cached, 1 new) reads sinks 0, 1 and positions 5 … 6
    assert int(step.tables[1, 1, 0]) >= 0
    tables = step.tables.clone()
    tables[1, 1, 0] = -1
    with pytest.raises(ValueError, match=r"block_tables\[1\]\[1, 0\] = -1 \(released\), but position 0 of request 1 "
                                         r"lies among its sinks: with 6 positions cached and 1 in this step it reads "
                                         r"positions 5 … 6 and its sink positions 0 … 1 \(window 2, 2 sinks"):
        _swa(step, tables)
    _swa(step, tables, sinks=0)              # without sinks page 0 is not read
    with pytest.raises(ValueError, match=r"block_tables\[1\]\[1, 0\] = -1"):
        _indexer(step, tables)


@pytest.mark.parametrize("value", [-2, 10**6])
def test_entries_no_token_reads_are_still_block_ids_or_minus_one(value):
    step = _small()
    tables = step.tables.clone()
    tables[1, 0, 0] = value
    with pytest.raises(ValueError, match=rf"block_tables\[1\]\[0, 0\] = {value} is out of range \[-1, "):
        _swa(step, tables)


def test_full_attention_keeps_the_full_rule():
    """The dense op reads every page up to the request's end: a bounded table is an error for it."""
    step = _small()
    cu, enc, dec, bid = step.batch
    q = torch.randn(step.T, 2, 48)
    cache = torch.zeros(step.num_blocks, step.ps, 48)
    ops.paged_mla_attention(q, cache, step.tables, cu, enc, dec, bid, 0.1, rope_dim=16, group=0)
    with pytest.raises(ValueError, match=r"block_tables\[1\]\[0, 0\] = -1 is out of range \[0, \d+\): position 0 of "
                                         r"request 0 is in that page, and full attention reads every page"):
        ops.paged_mla_attention(q, cache, step.tables, cu, enc, dec, bid, 0.1, rope_dim=16, group=1)


def test_a_request_with_no_token_needs_the_pages_before_its_end_in_its_window():
    """``[max(0, n - W + 1), n + C)`` with ``C = 0``: the staged kernel reads those rows for every request."""
    bt = torch.tensor([[[-1, 3, -1]]], **I32)
    meta = (torch.tensor([0, 0], **I32), torch.tensor([0], **I32), torch.tensor([7], **I32), torch.full((2,), -1, **I32))
    ops.swa_indexer(bt, *meta, window=4, page_size=4)                    # positions 4 … 6: page 1
    with pytest.raises(ValueError, match=r"block_tables\[0, 0\] = -1 \(released\), but position 3 of request 0 "
                                         r"lies in its window: with 7 positions cached and 0 in this step"):
        ops.swa_indexer(bt, *meta, window=5, page_size=4)                # positions 3 … 6: page 0 too
