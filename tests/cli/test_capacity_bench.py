"""``swa-rewrite bench --capacity`` (issue 13): the batch each model holds in a KV budget, run on CPU at tiny
sizes (the GPU run is recorded in benchmarks/RESULTS.md)."""

import types

import torch

from swa_rewrite import Schedule, apply
from swa_rewrite.bench import capacity_plan, capacity_tables, run_capacity
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.runtime import StepBatch, StepItem

TINY = MLAConfig.named("tiny")


def cdiv(a, b):
    return -(-a // b)


def test_capacity_run_on_cpu(seed):
    model = MLAModel(TINY, seed=seed)
    ps, ctx, W = 4, 40, 8
    schedule = Schedule.from_skip_freq(2, TINY.num_layers, window=W)        # layers 0, 2 sliding
    D = TINY.kv_lora_rank + TINY.qk_rope_head_dim
    full_row = D * 4                                                         # float32 model
    packed_row = TINY.kv_lora_rank + 4 * TINY.kv_lora_rank // 128 + 2 * TINY.qk_rope_head_dim
    pages = cdiv(ctx + 1, ps)
    window_pages = cdiv(W - 1 + 1, ps) + 1
    orig_request = 4 * pages * ps * full_row
    swa_request = 2 * pages * ps * full_row + 2 * window_pages * ps * packed_row
    budget = 5 * orig_request + 7
    args = types.SimpleNamespace(contexts=[ctx], page_size=ps, budget_gib=budget / 2**30, iters=2,
                                 no_progress=True, unbounded=True)
    rows = run_capacity(model, schedule, args, device="cpu")
    by = {r["model"]: r for r in rows}
    assert by["original"]["requests"] == 5
    assert by["rewritten"]["requests"] == budget // swa_request > 5
    assert by["rewritten"]["allocated_bytes"] == by["rewritten"]["requests"] * swa_request
    assert by["original"]["allocated_bytes"] == 5 * orig_request
    assert by["rewritten, unbounded"]["requests"] == budget // (2 * pages * ps * (full_row + packed_row))
    assert all(r["decode_us"] > 0 for r in rows)


def test_capacity_tables_decode_like_full_tables(seed):
    """The synthetic bounded tables give the decode of tables that map every page (same cache rows)."""
    model = MLAModel(TINY, seed=seed)
    ps, ctx, W = 4, 21, 6
    swa = apply(model, Schedule.per_layer({0: (W, 2), 2: W}, TINY.num_layers))
    specs = list(swa.kv_cache_spec())
    fit, per_request, counts, groups = capacity_plan(specs, ctx, ps, 10**6, bounded=True)
    bounded = capacity_tables(specs, groups, per_request, 2, ctx, ps, True)
    # Unbounded: every page its own block; copy each bounded block's rows into the same pages there.
    pages = cdiv(ctx + 1, ps)
    caches_u = swa.allocate_kv_cache(2 * pages, ps)
    for c in caches_u:
        if c.dtype == torch.uint8:
            c.copy_(torch.randint(0, 0x70, c.shape, dtype=torch.uint8))   # finite FP8 bytes, small scales
            c[..., TINY.kv_lora_rank:TINY.kv_lora_rank + 4 * TINY.kv_lora_rank // 128] = 0
            c.view(-1, c.shape[-1])[:, TINY.kv_lora_rank + 3::4] = 0x3C     # float32 scales near 2^-7
        else:
            c.normal_()
    caches_b = [torch.full((counts[g], ps, c.shape[-1]), 255 if c.dtype == torch.uint8 else float("nan"),
                           dtype=c.dtype) for c, g in zip(caches_u, groups)]
    for r in range(2):
        for layer, g in enumerate(groups):
            for p, b in enumerate(bounded[r][g]):
                if b >= 0:
                    caches_b[layer][b] = caches_u[layer][r * pages + p]
    unbounded = [[list(range(r * pages, (r + 1) * pages))] * len(per_request) for r in range(2)]
    G = len(per_request)
    ids = torch.tensor([3, 5])
    got = swa(ids, caches_b, StepBatch.build([StepItem([3], ctx, bounded[0], False),
                                              StepItem([5], ctx, bounded[1], False)], ps, num_groups=G).meta)
    caches_b2 = caches_b
    want = swa(ids, caches_u, StepBatch.build([StepItem([3], ctx, unbounded[0], False),
                                               StepItem([5], ctx, unbounded[1], False)], ps, num_groups=G).meta)
    assert torch.isfinite(got).all() and torch.equal(got, want)
    del caches_b2
