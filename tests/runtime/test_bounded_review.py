"""Review of the window-bounded cache groups (docs/design.md §12): edge cases of admission, prefix hits in sliding
groups, chain withdrawal, failures and the decode-graph path. Each test states an invariant the engine keeps."""

import random

import torch

from engine_helpers import assert_idle
from swa_rewrite import Schedule, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.ops.kv_cache_spec import blocks_per_request
from swa_rewrite.runtime import Engine

TINY = MLAConfig.named("tiny")
V = TINY.vocab_size


class Flaky(torch.nn.Module):
    """``model``, failing on the calls listed in ``fail_at`` (counted from 1)."""

    def __init__(self, model, fail_at):
        super().__init__()
        self.model, self.config, self.fail_at, self.calls = model, model.config, set(fail_at), 0

    def allocate_kv_cache(self, *args, **kwargs):
        return self.model.allocate_kv_cache(*args, **kwargs)

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_at:
            raise RuntimeError("injected failure")
        return self.model(*args, **kwargs)


def assert_chains_consistent(engine):
    """Every key the manager tracks is cached in some pool, and every cached key is tracked (no stale keys)."""
    cache = engine.cache
    cached = set()
    for g in cache.groups:
        cached |= set(g.pool._block_of)
    assert set(cache._parent) == cached
    for key, parent in cache._parent.items():
        if parent is not None:
            assert parent in cache._parent and key in cache._children[parent]


def test_prompt_only_requests_hit_shared_window_pages(seed):
    """max_new_tokens=0 requests whose prefix hit takes sliding-group pages another running request shares:
    every position computed is finite (no poisoned read), and nothing stays in use."""
    rng = random.Random(seed)
    swa = apply(MLAModel(TINY, seed=seed), Schedule.per_layer({0: (5, 2), 1: 3, 2: (5, 2)}, TINY.num_layers))
    for ps in (1, 4):
        engine = Engine(swa, num_blocks=40, page_size=ps, max_tokens_per_step=5, poison_blocks=True)
        base = [rng.randrange(V) for _ in range(21)]
        engine.generate([base], 0)
        rids = [engine.add_request(base[:n], 0) for n in (21, 17, 9)] + [engine.add_request(base, 3)]
        reqs = list(engine._waiting)
        for r in reqs:
            r.keep_logits = True
        while engine.has_unfinished():
            engine.step()
        assert engine.stats.reused_tokens > 0
        for r in reqs:
            assert torch.isfinite(torch.cat(r.logits)).all(), r.rid
        assert len(rids) == 4
        assert_idle(engine)
        assert_chains_consistent(engine)


def test_tight_byte_budget_never_runs_out_of_blocks(seed):
    """Pools sized for two requests of max_model_len: many requests sharing prefixes, arriving and being aborted,
    all run without OutOfBlocksError; the peak per request stays within the bound."""
    rng = random.Random(seed)
    swa = apply(MLAModel(TINY, seed=seed), Schedule.per_layer({0: 3, 1: (4, 1), 3: 3}, TINY.num_layers))
    ps, M, budget = 2, 24, 5
    probe = Engine(swa, num_blocks=1, page_size=ps, max_tokens_per_step=budget)
    per_request = [blocks_per_request(s, M, ps, chunk=budget) for s in probe.group_specs]
    one = sum(n * ps * sum(s.bytes_per_token for s, gl in zip(swa.kv_cache_spec(), probe.cache_groups) if gl == g)
              for g, n in enumerate(per_request))
    engine = Engine(swa, kv_cache_bytes=2 * one, max_model_len=M, page_size=ps, max_tokens_per_step=budget,
                    poison_blocks=True)
    assert list(engine.num_blocks) == [2 * n for n in per_request]
    base = [rng.randrange(V) for _ in range(M)]
    live = []
    for _ in range(60):
        x = rng.random()
        if x < 0.35:
            n = rng.randrange(0, 6)
            L = rng.randrange(1, M - n + 1)
            cut = rng.randrange(0, L + 1)
            live.append(engine.add_request(base[:cut] + [rng.randrange(V) for _ in range(L - cut)], n))
        elif x < 0.45 and live:
            engine.abort(rng.choice(live))
        else:
            engine.step()
    while engine.has_unfinished():
        engine.step()
    assert_idle(engine)
    assert_chains_consistent(engine)
    for usage, bound in zip(engine.cache_usage(), per_request):
        assert 0 < usage.peak_per_request <= bound


def test_failed_steps_leave_no_block_in_use_and_no_stale_key(seed):
    """Steps fail part-way through a run of requests sharing prefixes (through both faces): the failed steps'
    requests are dropped, their publications withdrawn, no block stays in use and no key is stale."""
    rng = random.Random(seed)
    swa = apply(MLAModel(TINY, seed=seed), Schedule.per_layer({0: 4, 2: (4, 1)}, TINY.num_layers))
    engine = Engine(Flaky(swa, fail_at={3, 7, 8, 15}), kv_cache_spec=swa.kv_cache_spec(), num_blocks=20,
                    page_size=2, max_tokens_per_step=4, poison_blocks=True)
    base = [rng.randrange(V) for _ in range(16)]
    failures = 0
    for _ in range(6):
        try:
            engine.generate([base[:rng.randrange(1, 17)] for _ in range(3)], rng.randrange(0, 4))
        except RuntimeError as e:
            assert "injected" in str(e)
            failures += 1
        assert_idle(engine)
        assert_chains_consistent(engine)
    for _ in range(4):
        engine.add_request(base[:rng.randrange(1, 17)], rng.randrange(0, 4))
    while engine.has_unfinished():
        try:
            engine.step()
        except RuntimeError as e:
            assert "injected" in str(e)
            failures += 1
    assert failures >= 2
    assert_idle(engine)
    assert_chains_consistent(engine)


def test_decode_graph_path_matches_plain_engine_with_mixed_steps_and_aborts(seed):
    """cuda_graphs=True (eager buffers off CUDA) gives the plain engine's tokens when decode-only steps
    alternate with mixed steps, prefix hits and aborts."""
    rng = random.Random(seed)
    swa = apply(MLAModel(TINY, seed=seed), Schedule.per_layer({0: 3, 2: (3, 1)}, TINY.num_layers))
    base = [rng.randrange(V) for _ in range(12)]
    script = [(base[:rng.randrange(1, 13)] + [rng.randrange(V) for _ in range(rng.randrange(0, 3))],
               rng.randrange(0, 5) if i < 3 else 6) for i in range(5)]
    outs = []
    for graphs in (False, True):
        engine = Engine(swa, num_blocks=30, page_size=2, max_tokens_per_step=4, poison_blocks=True,
                        cuda_graphs=graphs, max_model_len=20)
        got = {}
        rids = []
        for i, (p, n) in enumerate(script):
            rids.append(engine.add_request(p, n))
            for o in engine.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if i == 2:
                engine.abort(rids[1])
        while engine.has_unfinished():
            for o in engine.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert_idle(engine)
        if graphs:
            assert engine.decode_graphs.eager_runs > 0
        outs.append(got)
    assert outs[0] == outs[1]
