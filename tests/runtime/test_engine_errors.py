"""The engine after bad input or a failed call (issue 11): every bad argument is rejected before anything is
scheduled, with an error naming it; a call that fails mid-generation gives back every block it took and
withdraws what it published, so the engine stays exactly as usable as before."""

import random

import numpy as np
import pytest
import torch

from mla_reference import dense_greedy
from swa_rewrite import Schedule, apply
from engine_helpers import FailingModel, assert_idle, poison
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.ops.cache_write_checks import NonFiniteLatentError
from swa_rewrite.runtime import Engine

TINY = MLAConfig.named("tiny")
V = TINY.vocab_size







# ------------------------------------------------------------------------------------- a failed call
def test_a_call_failing_on_its_third_step_leaves_the_engine_as_it_was(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    failing = FailingModel(model, fail_at=3)
    kw = dict(num_blocks=8, page_size=4, max_tokens_per_step=6)
    engine = poison(Engine(failing, **kw))
    prompts = [[rng.randrange(V) for _ in range(13)], [rng.randrange(V) for _ in range(5)]]
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.generate(prompts, 4)
    assert failing.calls == 3 and engine.stats.steps == 2      # two steps ran, published blocks 0..2 of prompt 0
    assert_idle(engine)
    # The whole pool (8 blocks of 4 = 28 + 4 positions), starting with the failed prompt: computed afresh,
    # since what the failed call published is withdrawn.
    whole = prompts[0] + [rng.randrange(V) for _ in range(15)]
    got = engine.generate([whole], 4)
    assert engine.stats.reused_tokens == 0
    assert got == Engine(model, **kw).generate([whole], 4) == [dense_greedy(model, whole, 4)]
    assert_idle(engine)


def test_a_failure_in_logits_releases_its_blocks(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    engine = poison(Engine(FailingModel(model, fail_at=2), num_blocks=4, page_size=4, max_tokens_per_step=5))
    prompt = [rng.randrange(V) for _ in range(16)]
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.logits(prompt)
    assert_idle(engine)
    torch.testing.assert_close(engine.logits(prompt), Engine(model, num_blocks=4, page_size=4,
                                                             max_tokens_per_step=5).logits(prompt))


def test_a_non_finite_latent_names_its_request_and_position_and_leaves_the_engine_usable(seed):
    """A NaN weight for one call: the checked FP8 write rejects the latent; the error says which request
    and token position produced it, and the next call (weights repaired) runs on the whole pool."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule(8, [1, 3], TINY.num_layers))   # layer 0 full: it writes the NaN before layer 1 fails
    bad = rng.randrange(V)
    ids = [t for t in range(V) if t != bad]
    prompts = [[rng.choice(ids) for _ in range(11)], [rng.choice(ids) for _ in range(9)]]
    position = rng.randrange(1, 9)
    prompts[1][position] = bad
    kw = dict(num_blocks=10, page_size=4, max_tokens_per_step=7)
    engine = poison(Engine(swa, **kw))
    row = model.embed_tokens.weight[bad].clone()
    with torch.no_grad():
        model.embed_tokens.weight[bad] = float("nan")
    try:
        with pytest.raises(NonFiniteLatentError, match=rf"request 1, token position {position} \(prompt token "
                                                       rf"{bad}\).*non-finite") as info:
            engine.generate(prompts, 3)
    finally:
        with torch.no_grad():
            model.embed_tokens.weight[bad] = row
    assert (info.value.request, info.value.position) == (1, position)
    assert isinstance(info.value, ValueError)
    assert_idle(engine)
    whole = [rng.randrange(V) for _ in range(37)]                # 40 positions: all 10 blocks
    assert engine.generate([whole], 3) == Engine(swa, **kw).generate([whole], 3)
    assert engine.generate(prompts, 3) == Engine(swa, **kw).generate(prompts, 3)


# ----------------------------------------------------------------------------- prompts and arguments
BAD_CALLS = [
    (lambda e: e.generate("abc", 1), TypeError, r"prompts must be a list of prompts .* got str"),
    (lambda e: e.generate([1, 2], 1), TypeError, r"prompt 0 must be a sequence of token ids, got 1 \(int\)"),
    (lambda e: e.generate([[1], [3, 2.0]], 1), TypeError, r"prompt 1: token 1 is 2\.0 \(float\), expected an integer"),
    (lambda e: e.generate([[1, True]], 1), TypeError, r"prompt 0: token 1 is True \(bool\)"),
    (lambda e: e.generate([[1], torch.tensor([1, 2])], 1), TypeError, r"prompt 1: token 0 is tensor\(1\) \(Tensor\)"),
    (lambda e: e.generate([[1], [3, V]], 1), ValueError, rf"prompt 1: token 1 is {V}, expected an id in \[0, {V}\)"),
    (lambda e: e.generate([[4, -1]], 1), ValueError, rf"prompt 0: token 1 is -1, expected an id in \[0, {V}\)"),
    (lambda e: e.generate([[1], []], 1), ValueError, r"prompt 1 is empty"),
    (lambda e: e.generate([[1]], 2.0), TypeError, r"max_new_tokens must be an integer, got 2\.0 \(float\)"),
    (lambda e: e.generate([[1]], True), TypeError, r"max_new_tokens must be an integer, got True \(bool\)"),
    (lambda e: e.generate([[1]], -1), ValueError, r"max_new_tokens must be >= 0, got -1"),
    (lambda e: e.logits([5, 300]), ValueError, rf"prompt: token 1 is 300, expected an id in \[0, {V}\)"),
    (lambda e: e.logits(7), TypeError, r"prompt must be a sequence of token ids, got 7 \(int\)"),
]


@pytest.mark.parametrize("call,error,message", BAD_CALLS)
def test_bad_prompts_are_rejected_before_anything_is_scheduled(call, error, message, seed):
    engine = Engine(MLAModel(TINY, seed=seed), num_blocks=4, page_size=4, max_tokens_per_step=8)
    with pytest.raises(error, match=message):
        call(engine)
    assert engine.stats.steps == 0
    assert_idle(engine)


def test_numpy_ids_and_counts_are_accepted(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    prompts = [[rng.randrange(V) for _ in range(n)] for n in (6, 3)]
    kw = dict(num_blocks=np.int64(8), page_size=np.int32(4), max_tokens_per_step=np.int16(8))
    got = Engine(model, **kw).generate([np.array(prompts[0]), [np.int32(t) for t in prompts[1]]], np.int64(3))
    assert got == [dense_greedy(model, p, 3) for p in prompts]
    assert all(type(t) is int for g in got for t in g)


@pytest.mark.parametrize("name,value,error,message", [
    ("num_blocks", 8.0, TypeError, r"num_blocks must be an integer, got 8\.0 \(float\)"),
    ("num_blocks", 0, ValueError, r"num_blocks must be >= 1, got 0"),
    ("page_size", True, TypeError, r"page_size must be an integer, got True \(bool\)"),
    ("max_tokens_per_step", 4.5, TypeError, r"max_tokens_per_step must be an integer, got 4\.5"),
    ("max_tokens_per_step", np.bool_(True), TypeError, r"max_tokens_per_step must be an integer, got"),
])
def test_engine_sizes_must_be_integers(name, value, error, message):
    kw = dict(num_blocks=8, page_size=4, max_tokens_per_step=8)
    kw[name] = value
    with pytest.raises(error, match=message):
        Engine(MLAModel(TINY), **kw)


# ----------------------------------------------------------------------------------------- the model
def test_engine_needs_a_model_with_data():
    kw = dict(num_blocks=4, page_size=4, max_tokens_per_step=8)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module .* got str"):
        Engine("tiny", **kw)
    with pytest.raises(TypeError, match=r"Linear has no allocate_kv_cache method: pass kv_caches="):
        Engine(torch.nn.Linear(2, 2), **kw)
    with pytest.raises(ValueError, match=r"model MLAModel has embed_tokens.weight on the meta device"):
        Engine(MLAModel(TINY, device="meta"), **kw)
    with pytest.raises(ValueError, match=r"device 'meta' holds no data"):
        Engine(MLAModel(TINY), device="meta", **kw)


# -------------------------------------------------------------------------------------- the caches
def test_engine_rejects_caches_that_share_memory_or_miss_layers(seed):
    model = MLAModel(TINY, seed=seed)
    kw = dict(num_blocks=4, page_size=4, max_tokens_per_step=8)
    caches = model.allocate_kv_cache(4, 4)
    n = caches[0].numel()
    buffer = torch.empty(2 * n)
    shifted = [buffer[:n].view(caches[0].shape), buffer[100:n + 100].view(caches[0].shape)]   # overlap partly
    for bad, message in [
        (caches[:2] + [caches[0], caches[3]], r"kv_caches\[0\] and kv_caches\[2\] share memory"),
        (caches[:3] + [caches[1][:, :]], r"kv_caches\[1\] and kv_caches\[3\] share memory"),
        (shifted + caches[2:], r"kv_caches\[0\] and kv_caches\[1\] share memory"),
        (caches[:3], r"kv_caches holds 3 caches, expected one per layer: 4"),
        (caches + [caches[0].clone()], r"kv_caches holds 5 caches, expected one per layer: 4"),
        (caches[:3] + [caches[3][:2]], r"kv_caches\[3\] has shape \(2, 4, 144\), expected \[4, 4, \.\.\.\]"),
        (caches[:3] + [caches[3].to("meta")], r"kv_caches\[3\] is on meta, expected cpu"),
    ]:
        with pytest.raises(ValueError, match=message):
            Engine(model, kv_caches=bad, **kw)
    with pytest.raises(TypeError, match=r"kv_caches\[2\] must be a tensor, got NoneType"):
        Engine(model, kv_caches=caches[:2] + [None, caches[3]], **kw)


def test_disjoint_caches_carved_from_one_buffer_are_fine(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    D = TINY.kv_lora_rank + TINY.qk_rope_head_dim
    pool = torch.full((4, 6, 4, D), float("nan"))
    caches = list(pool.unbind(0))
    prompt = [rng.randrange(V) for _ in range(9)]
    engine = Engine(model, num_blocks=6, page_size=4, max_tokens_per_step=8, kv_caches=caches)
    assert engine.generate([prompt], 3) == [dense_greedy(model, prompt, 3)]
