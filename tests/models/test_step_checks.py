"""A model step's positions and slots are checked against its block tables before any cache write: a
wrong slot raises a ValueError naming it and leaves every cache (every request's data) untouched."""

import dataclasses
import random

import pytest
import torch

from swa_rewrite import Schedule, apply
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
