"""Cache specs and cache groups (docs/design.md §12): every face of the model states one ``KVCacheSpec`` per
layer, equal specs share a group, the pass sets each layer's group in the graph, and the engine runs a model
with full and sliding layers with one row of block tables and slots per group."""

import random

import pytest
import torch

import swa_rewrite
from mla_reference import dense_logits
from numerics import FP8_FLIP_TOL, rel_err
from swa_rewrite import Schedule, apply
from swa_rewrite.fp8_format import row_bytes
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.ops.kv_cache_spec import KVCacheSpec, cache_groups, schedule_cache_groups
from swa_rewrite.passes import SwaRewriteOps
from swa_rewrite.runtime import Engine, StepBatch, StepItem, model_cache_groups

TINY = MLAConfig.named("tiny")
R, P = TINY.kv_lora_rank, TINY.qk_rope_head_dim


def groups_in_graph(module):
    """layer -> the set of group arguments of its attention and cache-write nodes."""
    ops, out = SwaRewriteOps(), {}
    for n in module.graph.nodes:
        if ops.role(n) is not None and ops.group(n) is not None:
            out.setdefault(ops.layer_index(n), set()).add(ops.group(n))
    return out


def test_cache_groups_number_full_specs_first_then_in_order_of_first_layer():
    full, slide = KVCacheSpec.full(R, P, torch.bfloat16), KVCacheSpec.sliding(R, P, 16)
    assert cache_groups([full, slide, full, slide]) == (0, 1, 0, 1)
    # Full layers keep group 0 (the original model's), so the layers a rewrite leaves alone do not change.
    assert cache_groups([slide, full, KVCacheSpec.sliding(R, P, 16, sinks=4), slide]) == (1, 0, 2, 1)
    assert cache_groups([]) == ()
    assert slide.bytes_per_token == row_bytes(R, P) and slide.dtype == torch.uint8
    assert full.bytes_per_token == (R + P) * 2
    assert KVCacheSpec.sliding(512, 64, 4096).bytes_per_token == 656    # DeepSeek-V3's packed row
    with pytest.raises(ValueError):
        KVCacheSpec("full", 16, 0, torch.bfloat16, R + P, 2 * (R + P))
    with pytest.raises(ValueError):
        KVCacheSpec("sliding", None, 0, torch.uint8, 10, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_specs_of_original_rewritten_and_backend_agree_with_the_report(dtype):
    model = MLAModel(TINY, seed=1).to(dtype)
    schedule = Schedule.per_layer({0: 16, 2: (8, 2)}, 4)
    swa = apply(model, schedule)
    original, rewritten = model.kv_cache_spec(), swa.kv_cache_spec()
    assert original == (KVCacheSpec.full(R, P, dtype),) * 4
    assert rewritten == (KVCacheSpec.sliding(R, P, 16), KVCacheSpec.full(R, P, dtype),
                         KVCacheSpec.sliding(R, P, 8, sinks=2), KVCacheSpec.full(R, P, dtype))
    report = swa.swa_report
    assert [s.bytes_per_token for s in original] == [r.bytes_per_token(r.cache_before) for r in report.rows]
    assert [s.bytes_per_token for s in rewritten] == [r.bytes_per_token(r.cache_after) for r in report.rows]
    assert sum(s.bytes_per_token for s in rewritten) == report.bytes_per_token(True)
    assert sum(s.bytes_per_token for s in original) == report.bytes_per_token(False)
    # The specs describe what allocate_kv_cache allocates.
    caches = swa.allocate_kv_cache(2, 4, "meta")
    assert [(c.dtype, c.shape[-1]) for c in caches] == [(s.dtype, s.width) for s in rewritten]
    # The compile faces state the same specs.
    assert swa_rewrite.backend(schedule).kv_cache_spec(model) == rewritten
    assert swa_rewrite.SWAPostGradPass(schedule).kv_cache_spec(model) == rewritten
    assert swa_rewrite.compile(model, schedule, inner="eager").kv_cache_spec() == rewritten
    assert model.cache_groups == cache_groups(original) == (0, 0, 0, 0)
    assert swa.cache_groups == cache_groups(rewritten) == schedule_cache_groups(schedule) == (1, 0, 2, 0)


def test_the_pass_sets_each_layers_group_in_place():
    model = MLAModel(TINY, seed=1)
    swa = apply(model, Schedule.from_skip_freq(2, 4, window=16))
    assert swa.cache_groups == (1, 0, 1, 0)
    assert groups_in_graph(swa) == {0: {1}, 1: {0}, 2: {1}, 3: {0}}
    assert len(swa.graph.nodes) == len(swa_rewrite.rewrite.trace(model).forward.graph.nodes)   # no node added
    check = next(n for n in swa.graph.nodes if n.op == "call_function" and "checked_step_metadata" in n.name)
    assert tuple(check.args[2]) == (1, 0, 1, 0)
    # Per-layer windows give more groups; the full layers stay group 0.
    per_layer = apply(model, Schedule.per_layer({1: 8, 2: 16, 3: 8}, 4))
    assert per_layer.cache_groups == (0, 1, 2, 1)
    assert groups_in_graph(per_layer) == {0: {0}, 1: {1}, 2: {2}, 3: {1}}
    # Applying the same schedule again changes nothing; another schedule regroups.
    again = apply(per_layer, Schedule.per_layer({1: 8, 2: 16, 3: 8}, 4))
    assert again.code == per_layer.code
    regrouped = apply(per_layer, Schedule.per_layer({1: 8, 2: 8, 3: 8}, 4))
    assert groups_in_graph(regrouped) == {0: {0}, 1: {1}, 2: {1}, 3: {1}}


def test_step_batch_repeats_the_rows_per_group():
    items = [StepItem([5, 6, 7], 2, [3, 1], True), StepItem([9], 4, [0, 2], False)]
    one, two = StepBatch.build(items, 4, pad_to=6), StepBatch.build(items, 4, pad_to=6, num_groups=2)
    assert one.meta.block_tables.shape[0] == 1 and two.meta.block_tables.shape == (2, 2, 2)
    assert two.meta.slot_mapping.shape == (2, 6)
    for g in range(2):
        assert torch.equal(two.meta.block_tables[g], one.meta.block_tables[0])
        assert torch.equal(two.meta.slot_mapping[g], one.meta.slot_mapping[0])
    with pytest.raises(ValueError):
        StepBatch.build(items, 4, num_groups=0)


class NoSpecs(torch.nn.Module):
    """A model that states no cache specs: the engine runs it with one group."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def allocate_kv_cache(self, *args):
        return self.inner.allocate_kv_cache(*args)

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def one_group(swa):
    """``swa`` with every layer's ops (and its step check) set back to group 0: today's G = 1 model."""
    ops = SwaRewriteOps()
    for n in swa.graph.nodes:
        if ops.role(n) is not None and ops.group(n):
            ops.set_group(n, 0)
        if n.op == "call_function" and "checked_step_metadata" in n.name:
            n.args = (*n.args[:2], (0,) * len(n.args[2]), *n.args[3:])
    swa.recompile()
    return NoSpecs(swa)


@pytest.mark.parametrize("page_size", [1, 16])
def test_a_model_with_full_and_sliding_layers_runs_with_two_groups(page_size, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    W = 16
    swa = apply(model, Schedule.from_skip_freq(2, 4, window=W))
    tokens = [rng.randrange(TINY.vocab_size) for _ in range(45)]
    kw = dict(num_blocks=64, page_size=page_size, max_tokens_per_step=rng.choice([5, 17]))
    engine = Engine(swa, **kw)
    assert engine.cache_groups == (1, 0, 1, 0) and engine.num_groups == 2
    got = engine.logits(tokens)
    baseline_model = one_group(apply(model, Schedule.from_skip_freq(2, 4, window=W)))
    baseline = Engine(baseline_model, **kw)
    assert model_cache_groups(baseline_model) == (0, 0, 0, 0) and baseline.num_groups == 1
    assert torch.equal(got, baseline.logits(tokens))
    ref = dense_logits(model, tokens, windows={0: W, 2: W}, fp8_layers={0, 2})
    assert rel_err(got, ref) <= FP8_FLIP_TOL
    # The window matters (45 tokens > W): the full-attention reference is far away.
    assert rel_err(got, dense_logits(model, tokens, fp8_layers={0, 2})) > 1e-2
    # Generation through the step API agrees too.
    prompt = tokens[:20]
    assert Engine(swa, **kw).generate([prompt], 6) == Engine(baseline_model, **kw).generate([prompt], 6)


def test_per_layer_windows_run_with_three_groups(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.per_layer({0: 8, 1: 16, 2: 8}, 4))
    engine = Engine(swa, num_blocks=64, page_size=4, max_tokens_per_step=7)
    assert engine.cache_groups == (1, 2, 1, 0) and engine.num_groups == 3
    tokens = [rng.randrange(TINY.vocab_size) for _ in range(40)]
    ref = dense_logits(model, tokens, windows={0: 8, 1: 16, 2: 8}, fp8_layers={0, 1, 2})
    assert rel_err(engine.logits(tokens), ref) <= FP8_FLIP_TOL


def test_engine_takes_the_specs_of_a_model_that_states_none():
    model = MLAModel(TINY, seed=3)
    schedule = Schedule.from_skip_freq(2, 4, window=16)
    be = swa_rewrite.backend(schedule, inner="eager")
    compiled = torch.compile(model, backend=be, fullgraph=True)
    engine = Engine(compiled, num_blocks=16, page_size=8, max_tokens_per_step=8,
                    kv_caches=be.allocate_kv_cache(model, 16, 8), kv_cache_spec=be.kv_cache_spec(model))
    assert engine.num_groups == 2
    with pytest.raises(ValueError, match="describe 3 layers"):
        Engine(apply(model, schedule), num_blocks=16, page_size=8, max_tokens_per_step=8,
               kv_cache_spec=be.kv_cache_spec(model)[:3])
