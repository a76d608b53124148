"""A model step's positions and slots are checked against its block tables before any cache write: a
wrong slot raises a ValueError naming it and leaves every cache (every request's data) untouched."""

import dataclasses
import random

import pytest
import torch

from swa_rewrite import Schedule, apply, ops
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.ops.checks import checks_disabled
from swa_rewrite.runtime import StepBatch, StepItem, num_cache_groups

TINY = MLAConfig.named("tiny")
PAGE = 4


def raw(t):
    """The bytes of ``t`` (NaN poison compares equal to itself)."""
    return t.contiguous().view(torch.uint8).clone()


def two_requests(rng, model=None):
    """A chunk over cached history for request 0, a decode for request 1, two padding tokens (as many cache
    groups as ``model`` has: a rewritten model with full and sliding layers has two)."""
    blocks = rng.sample(range(12), 8)
    items = [StepItem([rng.randrange(256) for _ in range(5)], 6, blocks[:4], True),
             StepItem([rng.randrange(256)], 9, blocks[4:], False)]
    return StepBatch.build(items, PAGE, pad_to=8, num_groups=num_cache_groups(model) if model is not None else 1)


def filled(model, rewritten, value):
    caches = (rewritten or model).allocate_kv_cache(12, PAGE)
    for c in caches:
        c.fill_(255 if value != value and c.dtype == torch.uint8 else value)    # 0xFF: an FP8 NaN
    return caches


def corrupt(batch, which):
    """A copy of ``batch.meta`` with one inconsistency, and the error it must raise."""
    meta = batch.meta
    slots, positions = meta.slot_mapping.clone(), meta.positions.clone()
    if which == "slot of another request":
        other = int(meta.block_tables[0, 1, 0]) * PAGE           # request 1's first slot, for request 0's token 2
        slots[0, 2] = other
        error = r"slot_mapping\[2\] = \d+, but position 8 of request 0 is slot \d+ of its block table"
    elif which == "slot off by one":
        slots[0, 5] += 1
        error = r"slot_mapping\[5\] = \d+, but position 9 of request 1"
    elif which == "padding that writes":
        slots[0, 7] = 3
        error = r"slot_mapping\[7\] = 3 for a padding token"
    elif which == "wrong position":
        positions[0] = 5
        error = r"positions\[0\] = 5, .* expected 6"
    else:
        raise AssertionError(which)
    return dataclasses.replace(meta, slot_mapping=slots, positions=positions), error


CORRUPTIONS = ["slot of another request", "slot off by one", "padding that writes", "wrong position"]


@pytest.mark.parametrize("rewritten", [False, True], ids=["original", "rewritten"])
@pytest.mark.parametrize("which", CORRUPTIONS)
def test_bad_step_is_rejected_before_any_write(which, rewritten, seed):
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule(4, [0, 2], TINY.num_layers)) if rewritten else None
    batch = two_requests(random.Random(seed), swa or model)
    caches = filled(model, swa, float("nan"))
    before = [raw(c) for c in caches]
    meta, message = corrupt(batch, which)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        (swa or model)(batch.input_ids, kv_caches=caches, meta=meta)
    assert all(torch.equal(raw(c), b) for c, b in zip(caches, before))


def test_consistent_step_passes_and_checks_can_be_turned_off(seed):
    model = MLAModel(TINY, seed=seed)
    batch = two_requests(random.Random(seed))
    with torch.no_grad():
        logits = model(batch.input_ids, kv_caches=filled(model, None, 0.0), meta=batch.meta)
        assert logits.shape == (8, TINY.vocab_size) and torch.isfinite(logits[:6]).all()
        meta, _ = corrupt(batch, "slot off by one")
        with checks_disabled():    # compiled steps and CUDA graphs run unchecked: the caller owns the metadata
            model(batch.input_ids, kv_caches=filled(model, None, 0.0), meta=meta)


def bad_cache_list(caches, which):
    """``caches`` (4 layers, 12 blocks each) spoilt as ``which`` says, and the error that names it."""
    if which == "two layers share one cache":
        return caches[:2] + [caches[0], caches[3]], r"kv_caches\[0\] and kv_caches\[2\] share memory"
    if which == "a layer missing":
        return caches[:3], r"kv_caches holds 3 caches, expected one per layer: 4"
    if which == "a cache too many":
        return caches + [caches[0].clone()], r"kv_caches holds 5 caches, expected one per layer: 4"
    if which == "a layer with fewer blocks":
        return caches[:3] + [caches[3][:10]], r"kv_caches\[3\] has shape \(10, 4, \d+\), expected \[12, 4, \.\.\.\]"
    raise AssertionError(which)


@pytest.mark.parametrize("rewritten", [False, True], ids=["original", "rewritten"])
@pytest.mark.parametrize("which", ["two layers share one cache", "a layer missing", "a cache too many",
                                   "a layer with fewer blocks"])
def test_bad_cache_list_is_rejected_before_any_write(which, rewritten, seed):
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule(4, [0, 2], TINY.num_layers)) if rewritten else None
    batch = two_requests(random.Random(seed), swa or model)
    caches, message = bad_cache_list(filled(model, swa, float("nan")), which)
    before = [raw(c) for c in caches]
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        (swa or model)(batch.input_ids, kv_caches=caches, meta=batch.meta)
    assert all(torch.equal(raw(c), b) for c, b in zip(caches, before))


def test_cache_count_is_checked_even_with_checks_off(seed):
    """The count is static (no tensor read): it is checked in compiled and captured steps too."""
    model = MLAModel(TINY, seed=seed)
    batch = two_requests(random.Random(seed))
    caches = filled(model, None, 0.0)
    with torch.no_grad(), checks_disabled(), pytest.raises(ValueError, match="kv_caches holds 3 caches"):
        model(batch.input_ids, kv_caches=caches[:3], meta=batch.meta)


# --------------------------------------------------------------------- window-bounded sliding groups (§12)
W = 4
BOUNDED = Schedule(W, [0, 2], TINY.num_layers)          # group 0: layers 1, 3 (full); group 1: layers 0, 2 (W = 4)


def bounded_step(rng, bounded=True):
    """Request 0: 13 cached + 5 new (positions 10 … 17 read: pages 2-4, pages 0-1 released); request 1: 9 cached +
    1 new (positions 6 … 9: pages 1-2, page 0 released); two padding tokens. Group 0's tables hold every page, group
    1's only the read ones (``bounded``) or every page too. Returns the batch and the released blocks of group 1."""
    blocks = rng.sample(range(16), 8)
    rows = [blocks[:5], blocks[5:]]
    released = {0: [0, 1], 1: [0]}
    sliding = [[-1 if i in released[b] else blk for i, blk in enumerate(row)] for b, row in enumerate(rows)]
    items = [StepItem([rng.randrange(256) for _ in range(5)], 13, [rows[0], sliding[0] if bounded else rows[0]], True),
             StepItem([rng.randrange(256)], 9, [rows[1], sliding[1] if bounded else rows[1]], False)]
    return StepBatch.build(items, PAGE, pad_to=8, num_groups=2), [rows[b][i] for b in released for i in released[b]]


def history_caches(swa, released, seed):
    """Caches of 16 blocks holding random latents in every slot, except the released blocks of the sliding layers:
    poisoned (0xFF, NaN), so that reading one makes the logits NaN."""
    gen = torch.Generator().manual_seed(seed)
    caches = swa.allocate_kv_cache(16, PAGE)
    D = TINY.kv_lora_rank + TINY.qk_rope_head_dim
    slots = torch.arange(16 * PAGE)
    for layer, c in enumerate(caches):
        latent = torch.randn(16 * PAGE, D, generator=gen)
        if c.dtype == torch.uint8:
            ops.write_fp8_cache(latent, c, slots, rope_dim=TINY.qk_rope_head_dim)
            c[released] = 255
        else:
            c.copy_(latent.view(c.shape).to(c.dtype))
    return caches


def test_bounded_and_unbounded_tables_give_identical_logits(seed):
    """The rewritten model reads only its windows: with the sliding group's released entries -1 and their blocks
    NaN, the step (checked mode: the window-aware check accepts it) equals the one on unbounded tables."""
    swa = apply(MLAModel(TINY, seed=seed), BOUNDED)
    assert swa.cache_groups == (1, 0, 1, 0)
    bounded, released = bounded_step(random.Random(seed))
    unbounded, _ = bounded_step(random.Random(seed), bounded=False)
    assert (bounded.meta.block_tables[1] == -1).sum() > (unbounded.meta.block_tables[1] == -1).sum()
    caches_b, caches_u = history_caches(swa, released, seed), history_caches(swa, released, seed)
    with torch.no_grad():
        logits_b = swa(bounded.input_ids, kv_caches=caches_b, meta=bounded.meta)
        logits_u = swa(unbounded.input_ids, kv_caches=caches_u, meta=unbounded.meta)
    assert torch.isfinite(logits_b[:6]).all()
    assert torch.equal(logits_b, logits_u)
    assert all(torch.equal(raw(a), raw(b)) for a, b in zip(caches_b, caches_u))


def corrupt_bounded(batch, which):
    """A copy of the bounded step's metadata with one error in the sliding group (1), and the message."""
    meta = batch.meta
    slots, tables = meta.slot_mapping.clone(), meta.block_tables.clone()
    if which == "slot into a released block":
        released = int(meta.block_tables[0, 0, 0])                 # group 0's id of request 0's page 0: in group
        slots[1, 0] = released * PAGE + 1                          # 1 that page is released
        error = r"slot_mapping\[1\]\[0\] = \d+, but position 13 of request 0 is slot \d+ of its block table"
    elif which == "slot into another request's block":
        slots[1, 5] = int(meta.block_tables[1, 0, 2]) * PAGE + 1   # request 1's token into request 0's page 2
        error = (r"slot_mapping\[1\]\[5\] = \d+, but position 9 of request 1 is slot \d+ of its block table "
                 r"\(page size 4\) \(block \d+ is page 2 of request 0\)")
    elif which == "released page in the window":
        tables[1, 0, 3] = -1                                       # positions 12-15: read (and 13-15 written)
        error = (r"block_tables\[1\]\[0, 3\] = -1 \(released\), but position 12 of request 0 lies in its window: "
                 r"with 13 positions cached and 5 in this step it reads positions 10 … 17 \(window 4, page size 4\)")
    elif which == "bad id outside the window":
        tables[1, 1, 0] = 99
        error = r"block_tables\[1\]\[1, 0\] = 99 is out of range \[-1, 16\)"
    else:
        raise AssertionError(which)
    return dataclasses.replace(meta, slot_mapping=slots, block_tables=tables), error


@pytest.mark.parametrize("which", ["slot into a released block", "slot into another request's block",
                                   "released page in the window", "bad id outside the window"])
def test_bad_bounded_step_is_rejected_before_any_write(which, seed):
    swa = apply(MLAModel(TINY, seed=seed), BOUNDED)
    batch, released = bounded_step(random.Random(seed))
    caches = history_caches(swa, released, seed)
    before = [raw(c) for c in caches]
    meta, message = corrupt_bounded(batch, which)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        swa(batch.input_ids, kv_caches=caches, meta=meta)
    assert all(torch.equal(raw(c), b) for c, b in zip(caches, before))


def test_the_step_check_reads_each_groups_window_from_the_specs(seed):
    """``checked_step_metadata(meta, caches, groups, specs)``: without specs every group is checked as full; a
    group's rule is what all its layers read (full if any is); specs are ``KVCacheSpec``s or their keys."""
    from swa_rewrite.ops import KVCacheSpec
    from swa_rewrite.ops.step_check import checked_step_metadata, schedule_spec_keys, spec_key

    swa = apply(MLAModel(TINY, seed=seed), BOUNDED)
    batch, released = bounded_step(random.Random(seed))
    caches = history_caches(swa, released, seed)
    groups, specs = swa.cache_groups, swa.kv_cache_spec()
    keys = schedule_spec_keys(BOUNDED)
    assert keys == tuple(spec_key(s) for s in specs) == (("sliding", 4, 0), ("full", None, 0)) * 2
    check = next(n for n in swa.graph.nodes if n.op == "call_function" and "checked_step_metadata" in n.name)
    assert tuple(check.args[2]) == groups and tuple(map(tuple, check.args[3])) == keys
    assert checked_step_metadata(batch.meta, caches, groups, specs) is batch.meta
    checked_step_metadata(batch.meta, caches, groups, keys)
    with pytest.raises(ValueError, match=r"block_tables\[1\]\[0, 0\] = -1 is out of range \[0, 16\): position 0"):
        checked_step_metadata(batch.meta, caches, groups)
    with pytest.raises(ValueError, match=r"block_tables\[1\]\[0, 0\] = -1 is out of range"):
        checked_step_metadata(batch.meta, caches, groups, [keys[0], keys[1], ("full",), keys[3]])
    with pytest.raises(ValueError, match=r"block_tables\[1\]\[0, 1\] = -1 \(released\), but position 6 of request 0 "
                                         r"lies in its window.*\(window 8, page size 4\)"):
        checked_step_metadata(batch.meta, caches, groups, [("sliding", 8, 0)] + list(keys[1:]))
    with pytest.raises(TypeError, match="a layer's cache spec must be a KVCacheSpec or a key"):
        checked_step_metadata(batch.meta, caches, groups, [("sliding", 0, 0)] + list(keys[1:]))
    with pytest.raises(ValueError, match="3 cache specs for 4 layers"):
        checked_step_metadata(batch.meta, caches, groups, keys[:3])
    assert spec_key(KVCacheSpec.sliding(128, 16, 8, sinks=2)) == ("sliding", 8, 2)
