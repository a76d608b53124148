"""Window-bounded sliding cache groups (issue 13, docs/design.md §12): a bounded engine holds only each sliding
group's window and sinks, gives exactly what the unbounded layout gives, releases blocks as windows slide,
sizes its pools from a byte budget, and reuses prefixes under the cross-group rules."""

import random

import pytest
import torch

from engine_helpers import assert_idle
from numerics import assert_greedy_agrees
from swa_rewrite import Schedule, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.ops.kv_cache_spec import KVCacheSpec, blocks_per_request
from swa_rewrite.runtime import Engine, StepBatch, StepItem

TINY = MLAConfig.named("tiny")
V = TINY.vocab_size


def cdiv(a, b):
    return -(-a // b)


def engines(swa, **kw):
    """A bounded and an unbounded engine on ``swa``, both handing out NaN-filled blocks."""
    kw.setdefault("num_blocks", 96)
    return (Engine(swa, window_bounded=True, poison_blocks=True, **kw),
            Engine(swa, window_bounded=False, poison_blocks=True, **kw))


def held(engine):
    """Blocks each running request holds in each group, counted from its tables."""
    return {r.rid: [sum(b >= 0 for b in t) for t in r.tables] for r in engine._running}


def window_bound(spec, page_size, chunk):
    """Blocks a request may hold in a sliding group running ``chunk`` tokens (design §12), by hand."""
    return cdiv(spec.sinks, page_size) + cdiv(spec.window - 1 + chunk, page_size) + 1


# Sampled cross product of issue 13's settings: (page size, step budget, schedule of the tiny model's 4 layers).
CASES = [
    (1, 3, {0: 5, 2: 5}),
    (7, 17, {0: 5, 1: 64, 2: 5}),
    (16, 1, {0: (5, 3), 2: (5, 3)}),
    (64, 17, {0: 200, 2: 1}),
    (7, 3, {0: (1, 2), 1: 5, 3: (64, 1)}),
    (16, 17, {1: 1, 3: 5}),
    (1, 17, {0: (200, 3), 1: 5}),
]


@pytest.mark.parametrize("page_size,budget,layers", CASES)
def test_bounded_equals_unbounded_logits_and_tokens(page_size, budget, layers, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.per_layer(layers, TINY.num_layers))
    bounded, unbounded = engines(swa, page_size=page_size, max_tokens_per_step=budget)
    # Small step budgets take a step per 1-3 tokens: shorter prompts keep CI fast (windows still slide).
    tokens = [rng.randrange(V) for _ in range(rng.randrange(14, 20) if budget < 5 else rng.randrange(30, 60))]
    got = bounded.logits(tokens)
    assert torch.isfinite(got).all()
    assert torch.equal(got, unbounded.logits(tokens))
    # Mixed batches with shared prefixes (prefix reuse from the logits call's published blocks).
    prompts = [tokens[:rng.randrange(1, len(tokens))] + [rng.randrange(V) for _ in range(rng.randrange(0, 9))]
               for _ in range(3)]
    assert bounded.generate(prompts, 4) == unbounded.generate(prompts, 4)
    assert bounded.stats.reused_tokens == unbounded.stats.reused_tokens
    assert_idle(bounded)
    assert_idle(unbounded)


@pytest.mark.parametrize("page_size,budget,layers", CASES[:4])
def test_the_bound_holds_after_every_step_and_blocks_are_released(page_size, budget, layers, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.per_layer(layers, TINY.num_layers))
    engine = Engine(swa, num_blocks=96, page_size=page_size, max_tokens_per_step=budget, poison_blocks=True)
    specs = engine.group_specs
    sliding = [g for g, s in enumerate(specs) if s.kind == "sliding"]
    short = budget < 5
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(12, 18) if short else rng.randrange(20, 50))]
               for _ in range(3)]
    for p in prompts:
        engine.add_request(p, rng.randrange(4, 8) if short else rng.randrange(5, 20))
    max_in_use = [0] * len(specs)
    while engine.has_unfinished():
        engine.step()
        for r in engine._running:
            n = r.num_computed
            for g in range(len(specs)):
                pages = [p for p, b in enumerate(r.tables[g]) if b >= 0]
                if g in sliding:
                    W, s = specs[g].window, specs[g].sinks
                    # After the step only the sinks and the next token's window [n - W + 1, n) are held.
                    want = sorted(set(range(cdiv(min(s, n), page_size)))
                                  | set(range(max(0, n - W + 1) // page_size, cdiv(n, page_size))))
                    assert pages == want, (g, n, pages, want)
                else:
                    assert pages == list(range(cdiv(n, page_size)))
        for u in engine.cache_usage():
            max_in_use[u.group] = max(max_in_use[u.group], u.in_use)
    for u in engine.cache_usage():
        assert u.in_use == 0 and u.total == 96
        if u.group in sliding:
            assert u.kind == "sliding" and u.window == specs[u.group].window and u.sinks == specs[u.group].sinks
            assert u.peak_per_request <= window_bound(specs[u.group], page_size, budget)
        else:
            assert u.kind == "full" and u.window is None
    # The sliding groups held less than the full group whenever the context outgrew the window.
    full = next(u.group for u in engine.cache_usage() if u.kind == "full")
    if any(specs[g].window + specs[g].sinks + 2 * page_size + budget < 20 for g in sliding):
        assert min(max_in_use[g] for g in sliding) < max_in_use[full]
    assert_idle(engine)


def test_memory_scales_with_the_window_not_the_context(seed):
    """A long request in a sliding group holds a constant number of blocks while the full group grows."""
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.from_skip_freq(2, TINY.num_layers, window=8))
    engine = Engine(swa, num_blocks=64, page_size=4, max_tokens_per_step=4)
    rid = engine.add_request([random.Random(seed).randrange(V) for _ in range(8)], 100)
    usage = []
    while engine.has_unfinished():
        engine.step()
        usage.append([u.in_use for u in engine.cache_usage()])
    full, sliding = zip(*[(u[0], u[1]) for u in usage[:-1]])
    assert full[-1] == cdiv(107, 4)                      # every page of 107 computed positions
    assert max(sliding) <= cdiv(8 - 1 + 4, 4) + 1 and sliding[-1] == sliding[len(sliding) // 2]
    assert engine.cache_usage()[1].peak_per_request <= 4
    del rid


def test_step_batch_carries_each_groups_rows():
    items = [StepItem([5, 6], 6, [[3, 1, 4], [-1, 7, 2]], True), StepItem([9], 2, [[0], [8]], False)]
    b = StepBatch.build(items, 4, num_groups=2, pad_to=4)
    assert b.meta.block_tables.tolist() == [[[3, 1, 4], [0, -1, -1]], [[-1, 7, 2], [8, -1, -1]]]
    assert b.meta.slot_mapping.tolist() == [[1 * 4 + 2, 1 * 4 + 3, 2, -1], [7 * 4 + 2, 7 * 4 + 3, 8 * 4 + 2, -1]]
    with pytest.raises(ValueError, match=r"writes position 2, but its page 0 in cache group 1 is released"):
        StepBatch.build([StepItem([1], 2, [[0], [-1]], False)], 4, num_groups=2)
    with pytest.raises(ValueError, match="gives 3 block tables, expected one per cache group: 2"):
        StepBatch.build([StepItem([1], 2, [[0], [1], [2]], False)], 4, num_groups=2)


def test_multi_token_decode_reads_only_the_window(seed):
    """Model level: MTP-style steps of several decode tokens on bounded tables (every page outside a sliding
    layer's window and sinks released, its blocks NaN) give the logits of unbounded tables."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.per_layer({0: (6, 2), 2: 6}, TINY.num_layers))
    groups, ps = swa.cache_groups, 4
    G = max(groups) + 1
    caches_u = swa.allocate_kv_cache(40, ps)
    for c in caches_u:
        c.fill_(255 if c.dtype == torch.uint8 else float("nan"))
    n0, k = 21, 3                                          # 21 cached positions, then 3 tokens per step
    tokens = [rng.randrange(V) for _ in range(n0 + 2 * k)]
    table = list(range(cdiv(n0 + 2 * k, ps)))
    swa(torch.tensor(tokens[:n0]), caches_u,
        StepBatch.build([StepItem(tokens[:n0], 0, table, True)], ps, num_groups=G).meta)
    specs = [s for s in swa.kv_cache_spec()]
    group_spec = {g: s for g, s in zip(groups, specs)}
    for step in range(2):
        n = n0 + step * k
        caches_b = [c.clone() for c in caches_u]
        rows = []
        for g in range(G):
            s = group_spec[g]
            if s.kind == "sliding":
                keep = set(range(cdiv(s.sinks, ps))) | set(range(max(0, n - s.window + 1) // ps, cdiv(n + k, ps)))
                rows.append([b if p in keep else -1 for p, b in enumerate(table)])
                gone = [b for p, b in enumerate(table) if p not in keep]
                for c, lg in zip(caches_b, groups):
                    if lg == g:
                        c[gone] = 255 if c.dtype == torch.uint8 else float("nan")
            else:
                rows.append(table)
        ids = torch.tensor(tokens[n:n + k])
        ids = torch.cat([ids, torch.zeros(2, dtype=ids.dtype)])               # two padding tokens
        got = swa(ids, caches_b, StepBatch.build([StepItem(tokens[n:n + k], n, rows, False)], ps, num_groups=G,
                                                 pad_to=k + 2).meta)[:k]
        want = swa(ids, caches_u, StepBatch.build([StepItem(tokens[n:n + k], n, table, False)], ps, num_groups=G,
                                                  pad_to=k + 2).meta)[:k]
        assert torch.isfinite(got).all() and torch.equal(got, want)


# ------------------------------------------------------------------------------------- sizing, admission
def test_a_byte_budget_sizes_every_group_for_the_same_requests(seed):
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.per_layer({0: 8, 2: (8, 2)}, TINY.num_layers))
    ps, M, budget, fit = 4, 64, 16, 3
    per_block = {}
    for spec, g in zip(swa.kv_cache_spec(), swa.cache_groups):
        per_block[g] = per_block.get(g, 0) + spec.bytes_per_token * ps
    specs = {g: s for s, g in zip(swa.kv_cache_spec(), swa.cache_groups)}
    need = {g: (cdiv(M, ps) if s.kind == "full" else cdiv(s.sinks, ps) + cdiv(s.window - 1 + budget, ps) + 1)
            for g, s in specs.items()}
    request_bytes = sum(per_block[g] * need[g] for g in specs)
    engine = Engine(swa, kv_cache_bytes=fit * request_bytes + request_bytes - 1, max_model_len=M, page_size=ps,
                    max_tokens_per_step=budget)
    assert engine.num_blocks == tuple(fit * need[g] for g in range(len(specs)))
    allocated = sum(c.numel() * c.element_size() for c in engine.kv_caches)
    assert allocated == fit * request_bytes
    # The pools hold `fit` requests of M positions at once, not one more.
    rng = random.Random(seed)
    for _ in range(fit + 1):
        engine.add_request([rng.randrange(V) for _ in range(M - 8)], 8)
    engine.step()
    assert len(engine._running) == fit and len(engine._waiting) == 1
    with pytest.raises(ValueError, match="more than max_model_len=64"):
        engine.add_request([1] * 60, 5)
    while engine.has_unfinished():
        engine.step()
    assert_idle(engine)
    # The original model in the same budget holds fewer such requests: the capacity ratio from allocated bytes.
    orig = Engine(model, kv_cache_bytes=fit * request_bytes, max_model_len=M, page_size=ps, max_tokens_per_step=budget)
    orig_request = sum(c.numel() * c.element_size() for c in orig.kv_caches) // (orig.num_blocks[0] // cdiv(M, ps))
    assert orig_request == TINY.num_hidden_layers * M * (TINY.kv_lora_rank + TINY.qk_rope_head_dim) * 4
    assert orig.num_blocks[0] // cdiv(M, ps) < fit


def test_sizing_errors(seed):
    model = MLAModel(TINY, seed=seed)
    kw = dict(page_size=4, max_tokens_per_step=8)
    with pytest.raises(ValueError, match="needs max_model_len="):
        Engine(model, kv_cache_bytes=10**6, **kw)
    with pytest.raises(ValueError, match="not both"):
        Engine(model, kv_cache_bytes=10**6, num_blocks=4, max_model_len=16, **kw)
    with pytest.raises(ValueError, match="holds no request of max_model_len=4096"):
        Engine(model, kv_cache_bytes=1000, max_model_len=4096, **kw)
    with pytest.raises(TypeError, match="num_blocks= .*or kv_cache_bytes="):
        Engine(model, **kw)


def test_admission_counts_every_group(seed):
    """A pool of 4 blocks in each group: the sliding group fits many windows, the full group only one long
    request; the second waits for the first."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.from_skip_freq(2, TINY.num_layers, window=4))
    engine = Engine(swa, num_blocks=4, page_size=4, max_tokens_per_step=4, poison_blocks=True)
    a = engine.add_request([rng.randrange(V) for _ in range(10)], 6)
    b = engine.add_request([rng.randrange(V) for _ in range(10)], 6)
    engine.step()
    assert [r.rid for r in engine._running] == [a] and [r.rid for r in engine._waiting] == [b]
    with pytest.raises(ValueError, match="needs 5 blocks of 4 positions in cache group 0, the cache has 4"):
        engine.add_request([1] * 17, 2)
    while engine.has_unfinished():
        engine.step()
    assert_idle(engine)


# ------------------------------------------------------------------------------------------ prefix reuse
def test_a_prefix_hit_needs_the_window_in_every_sliding_group(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    ps, W = 4, 6
    swa = apply(model, Schedule.per_layer({0: W, 2: (W, 2)}, TINY.num_layers))
    prompt = [rng.randrange(V) for _ in range(30)]
    bounded, unbounded = engines(swa, page_size=ps, max_tokens_per_step=8, num_blocks=64)
    first = bounded.generate([prompt], 2)
    assert first == unbounded.generate([prompt], 2)
    # The same prompt again: 29 positions are reusable, 7 full pages; all of them are still cached.
    again = bounded.generate([prompt], 2)
    assert again == first and bounded.stats.reused_tokens == 7 * ps
    # Evict page 5 of the chain from one sliding group: every later page goes in every group, so the hit
    # is the largest h <= 5 pages whose window pages are still cached there.
    keys = [k for k in bounded.cache._parent]
    group = bounded.cache.groups[1]
    from swa_rewrite.runtime.block_manager import prefix_block_keys
    chain = prefix_block_keys(prompt[:29], ps)
    block = group.pool.lookup(chain[5])
    assert block is not None and group.pool.refcount(block) == 0
    group.pool.withdraw_key(chain[5])
    bounded.cache._evicted(chain[5])
    for g in bounded.cache.groups:
        assert all(g.pool.lookup(k) is None for k in chain[6:])
    assert bounded.cache.groups[0].pool.lookup(chain[5]) is not None   # the full group keeps page 5 itself
    before = bounded.stats.reused_tokens
    assert bounded.generate([prompt], 2) == first
    # h = 5 pages needs pages [h*4 - 5, h*4) = pages 3, 4 (and sink page 0) in both sliding groups: cached.
    assert bounded.stats.reused_tokens - before == 5 * ps
    assert_idle(bounded)
    del keys


def test_eviction_by_allocation_withdraws_the_later_chain(seed):
    """A small sliding pool reuses released, cached blocks of an earlier request; the later pages of that
    request's chain leave every group, and a repeat of its prompt gets the shorter hit (and the same tokens)."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.from_skip_freq(2, TINY.num_layers, window=4))
    engine = Engine(swa, num_blocks=12, page_size=4, max_tokens_per_step=8, poison_blocks=True)
    prompt = [rng.randrange(V) for _ in range(40)]
    first = engine.generate([prompt], 2)
    other = engine.generate([[rng.randrange(V) for _ in range(40)]], 2)      # evicts the first's old pages
    del other
    for g in engine.cache.groups:
        for key in list(engine.cache._parent):
            parent = engine.cache._parent[key]
            if parent is not None:
                # A published page's parent is published in some group: no orphans.
                assert any(x.pool.lookup(parent) is not None for x in engine.cache.groups)
    assert engine.generate([prompt], 2) == first
    assert_idle(engine)


# ------------------------------------------------------------------------------------------------- soak
@pytest.mark.parametrize("page_size,budget", [(1, 3), (7, 17)])
def test_soak_bounded_engine_with_arrivals_finishes_and_aborts(page_size, budget, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.per_layer({0: 5, 1: (3, 2), 2: 5}, TINY.num_layers))
    max_len = 24
    engine = Engine(swa, num_blocks=3 * cdiv(max_len, page_size), page_size=page_size,
                    max_tokens_per_step=budget, poison_blocks=True)
    reference = Engine(swa, num_blocks=cdiv(max_len, page_size), page_size=page_size, max_tokens_per_step=64,
                       window_bounded=False, prefix_caching=False)
    prefixes = [[rng.randrange(V) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    pending = []
    for _ in range(24):
        prompt = rng.choice(prefixes + [[]]) + [rng.randrange(V) for _ in range(rng.randrange(1, 6))]
        pending.append((prompt[:18], rng.randrange(0, 6)))
    asked, got, kept, finished, aborted = {}, {}, {}, set(), set()
    steps = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.choice([0, 1, 2])):
            if pending:
                prompt, n = pending.pop(0)
                rid = engine.add_request(prompt, n)
                asked[rid], got[rid] = (prompt, n), []
                kept[rid] = engine._waiting[-1]      # keeps the logits its tokens were chosen from
                kept[rid].keep_logits = True
        live = [rid for rid in asked if rid not in finished and rid not in aborted]
        if live and rng.random() < 0.06:
            rid = rng.choice(live)
            engine.abort(rid)
            aborted.add(rid)
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
            if o.finished:
                finished.add(o.request_id)
        for u, spec in zip(engine.cache_usage(), engine.group_specs):
            if spec.kind == "sliding":
                assert u.peak_per_request <= window_bound(spec, page_size, budget)
        steps += 1
        assert steps < 3000
    assert finished | aborted == set(asked)
    for rid in finished:
        prompt, n = asked[rid]
        # The chunks a request runs in depend on the traffic, and the latents a chunk computes differ from one
        # computed alone by float rounding: an FP8 latent can round to its neighbour, which moves the logits by
        # ~1e-2. So tokens may part from the reference's only at a near-tie of its logits, and the logits the
        # engine chose from must stay within 2 % of the reference's (a wrong or stale block is far beyond).
        chosen = torch.cat(kept[rid].logits)[-n:] if n else None     # row j chose token j
        assert_greedy_agrees(got[rid], reference.generate([prompt], n)[0], prompt,
                             lambda prefix: chosen[len(prefix) - len(prompt)][None], reference.logits, tol=2e-2)
    assert_idle(engine)


def test_blocks_per_request_by_hand():
    s = KVCacheSpec.sliding(512, 64, window=4096, sinks=4)
    assert blocks_per_request(s, 131072, 64) == 1 + 64 + 1
    assert blocks_per_request(s, 100, 64) == 2
    assert blocks_per_request(s, 131072, 64, bounded=False) == 2048
    assert blocks_per_request(KVCacheSpec.full(512, 64, torch.bfloat16), 131072, 64) == 2048
    assert blocks_per_request(s, 131072, 64, chunk=512) == 1 + cdiv(4095 + 512, 64) + 1


# ------------------------------------------------------------------------------------- graphed decode
def test_engine_with_decode_graphs_gives_the_tokens_of_the_plain_engine(seed):
    """``cuda_graphs=True`` runs decode-only steps through the bucketed runner (eagerly off CUDA: the same
    persistent buffers and padding) on the bounded tables; tokens equal the plain engine's."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.per_layer({0: 5, 2: (5, 2)}, TINY.num_layers))
    kw = dict(num_blocks=64, page_size=4, max_tokens_per_step=16)
    graphed = Engine(swa, cuda_graphs=True, max_model_len=64, max_decode_batch=4, **kw)
    plain = Engine(swa, **kw)
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(3, 20))] for _ in range(6)]
    assert graphed.generate(prompts, 10) == plain.generate(prompts, 10)
    runner = graphed.decode_graphs
    assert runner.eager_runs + runner.replays > 0                 # decode steps went through the runner
    assert_idle(graphed)
    with pytest.raises(ValueError, match="needs max_model_len="):
        Engine(apply(model, Schedule.per_layer({i: 8 for i in range(TINY.num_layers)}, TINY.num_layers)),
               cuda_graphs=True, **kw)


# ----------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("layers,page_size", [
    ({0: 128, 1: 512, 2: 128}, 64),          # gathered (W = 128) and page-tile (W = 512) decode kernels
    ({0: (128, 4), 2: (600, 3)}, 16),       # sinks: the indexer + sparse kernel; a window that is no tile multiple
])
def test_bounded_equals_unbounded_on_cuda(layers, page_size, seed):
    """DeepSeek-V3 attention dims (H = 128) on the GPU kernels: window-bounded tables (released entries -1, blocks
    NaN as handed out) give the logits and tokens of the unbounded layout, through chunked prefill and decode."""
    rng = random.Random(seed)
    cfg = MLAConfig.named("v3-attn")
    model = MLAModel(cfg, device="cuda", dtype=torch.bfloat16, seed=seed)
    swa = apply(model, Schedule.per_layer(layers, cfg.num_hidden_layers))
    kw = dict(num_blocks=-(-2600 // page_size) * 3, page_size=page_size, max_tokens_per_step=512)
    bounded, unbounded = engines(swa, **kw)
    tokens = [rng.randrange(cfg.vocab_size) for _ in range(1500)]
    got = bounded.logits(tokens)
    assert torch.isfinite(got).all()
    assert torch.equal(got, unbounded.logits(tokens))
    prompts = [tokens[:rng.randrange(700, 1400)] + [rng.randrange(cfg.vocab_size) for _ in range(9)]
               for _ in range(3)]
    assert bounded.generate(prompts, 24) == unbounded.generate(prompts, 24)
    for u, spec in zip(bounded.cache_usage(), bounded.group_specs):
        if spec.kind == "sliding":
            assert u.peak_per_request <= window_bound(spec, page_size, 512)
    assert_idle(bounded)


def test_a_hit_is_backed_by_a_cached_page_in_every_group(seed):
    """Every layer sliding with W = 1 and no sinks: the next token reads no cached page, yet a prefix hit still
    needs the hit's last page cached in every group — no hit for a prompt nothing was computed for."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.per_layer({i: 1 for i in range(TINY.num_layers)}, TINY.num_layers))
    engine = Engine(swa, num_blocks=32, page_size=4, max_tokens_per_step=8, poison_blocks=True)
    prompt = [rng.randrange(V) for _ in range(13)]
    engine.generate([prompt], 1)
    assert engine.stats.reused_tokens == 0
    engine.generate([prompt], 1)
    assert engine.stats.reused_tokens == 12                   # the same prompt: 3 cached pages
    fresh = [rng.randrange(V) for _ in range(13)]
    before = engine.stats.reused_tokens
    engine.generate([fresh], 1)
    assert engine.stats.reused_tokens == before               # never computed: no hit
    assert_idle(engine)


@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_manager_holds_exactly_the_window_over_random_chunks(page_size, seed):
    """``KVCacheManager.prepare`` / ``slide`` directly (their one-token and already-slid fast paths included): after
    every step each request holds, per group, exactly the pages the formula gives; the pool's count is the tables'
    sum; a released table leaves nothing behind, and a new table (its id possibly reused) slides from scratch."""
    from swa_rewrite.runtime.kv_cache_manager import RELEASED, KVCacheManager

    rng = random.Random(seed)
    specs = [KVCacheSpec.full(8, 4, torch.float32), KVCacheSpec.sliding(8, 4, rng.randrange(2, 9), 0),
             KVCacheSpec.sliding(8, 4, rng.randrange(2, 9), rng.randrange(1, 4))]
    cache = KVCacheManager(specs, [400] * 3, page_size)
    for round_ in range(3):
        reqs = [{"tables": [[], [], []], "n": 0} for _ in range(rng.randrange(1, 4))]
        for _ in range(40):
            r = rng.choice(reqs)
            step = 1 if rng.random() < 0.7 else rng.randrange(2, 6)           # decodes mostly, chunks sometimes
            cache.prepare(r["tables"], r["n"], r["n"] + step)
            r["n"] += step
            cache.slide(r["tables"], r["n"])
            for q in reqs:
                n = q["n"]
                for g, spec in enumerate(specs):
                    pages = [p for p, b in enumerate(q["tables"][g]) if b != RELEASED]
                    if spec.kind == "sliding":
                        want = sorted(set(range(cdiv(min(spec.sinks, n), page_size)))
                                      | set(range(max(0, n - spec.window + 1) // page_size, cdiv(n, page_size))))
                    else:
                        want = list(range(cdiv(n, page_size)))
                    assert pages == want, (round_, g, n, pages, want)
            for g, u in enumerate(cache.usage()):
                assert u.in_use == sum(sum(b != RELEASED for b in q["tables"][g]) for q in reqs)
        for q in reqs:
            cache.release(q["tables"])
        assert all(u.in_use == 0 for u in cache.usage()) and not cache._slid and not cache._changed
