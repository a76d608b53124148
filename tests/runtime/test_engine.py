"""The paged runtime: greedy generation, chunked prefill, prefix reuse, block accounting (issue 2)."""

import random

import pytest
import torch

from mla_reference import dense_greedy, dense_logits
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.runtime import BlockManager, Engine, OutOfBlocksError, StepBatch, StepItem


def poison(engine):
    for c in engine.kv_caches:
        c.fill_(float("nan"))
    return engine


@pytest.mark.parametrize("page_size,budget", [(1, 5), (7, 16), (16, 64)])
def test_greedy_generation_matches_dense(page_size, budget, seed):
    rng = random.Random(seed)
    model = MLAModel(MLAConfig.named("tiny"), seed=seed)
    V = model.config.vocab_size
    prompts = [[rng.randrange(V) for _ in range(n)] for n in (13, 1, 29)]
    engine = poison(Engine(model, num_blocks=64, page_size=page_size, max_tokens_per_step=budget))
    got = engine.generate(prompts, max_new_tokens=6)
    assert got == [dense_greedy(model, p, 6) for p in prompts]
    assert [u.in_use for u in engine.cache_usage()] == [0]  # every block came back (cached ones are reusable)
    assert engine.stats.steps > 0 and engine.stats.decode_tokens == 3 * 5


def test_generation_under_inference_mode(seed):
    """Engines usually run under ``torch.inference_mode()``; the checked ops must work there too."""
    rng = random.Random(seed)
    model = MLAModel(MLAConfig.named("tiny"), seed=seed)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in (9, 3)]
    with torch.inference_mode():
        got = poison(Engine(model, num_blocks=16, page_size=4, max_tokens_per_step=8)).generate(prompts, 4)
    assert got == [dense_greedy(model, p, 4) for p in prompts]


def test_prefix_reuse_shares_blocks(seed):
    rng = random.Random(seed)
    model = MLAModel(MLAConfig.named("tiny"), seed=seed)
    V = model.config.vocab_size
    prefix = [rng.randrange(V) for _ in range(24)]
    a, b = prefix + [rng.randrange(V) for _ in range(5)], prefix + [rng.randrange(V) for _ in range(7)]
    engine = poison(Engine(model, num_blocks=32, page_size=8, max_tokens_per_step=10))
    la = engine.logits(a)                                    # computes every position, publishes full blocks
    assert engine.stats.reused_tokens == 0
    torch.testing.assert_close(la.double(), dense_logits(model, a), rtol=1e-4, atol=1e-4)
    assert engine.generate([b], 5) == [dense_greedy(model, b, 5)]
    assert engine.stats.reused_tokens == 24                  # three full blocks of 8 served from the cache
    assert engine.stats.prefill_tokens == len(a) + len(b) - 24


def test_generation_with_shared_prompts_in_one_batch(seed):
    rng = random.Random(seed)
    model = MLAModel(MLAConfig.named("tiny"), seed=seed)
    V = model.config.vocab_size
    prompt = [rng.randrange(V) for _ in range(20)]
    engine = poison(Engine(model, num_blocks=24, page_size=4, max_tokens_per_step=7))
    first = engine.generate([prompt], 4)
    again = engine.generate([prompt, prompt[:9]], 4)
    assert engine.stats.reused_tokens >= 16
    assert again == [first[0], dense_greedy(model, prompt[:9], 4)]


def test_requests_wait_for_blocks(seed):
    """More requests than the cache holds at once: later ones are admitted as earlier ones finish."""
    model = MLAModel(MLAConfig.named("tiny"), seed=seed)
    prompts = [torch.randint(0, 256, (10,)).tolist() for _ in range(4)]
    engine = poison(Engine(model, num_blocks=4, page_size=8, max_tokens_per_step=32, prefix_caching=False))
    assert engine.generate(prompts, 3) == [dense_greedy(model, p, 3) for p in prompts]


def test_engine_rejects_bad_requests():
    engine = Engine(MLAModel(MLAConfig.named("tiny")), num_blocks=2, page_size=4, max_tokens_per_step=8)
    with pytest.raises(ValueError, match="prompt 0 needs 3 blocks"):
        engine.generate([[1] * 9], 1)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], 1)
    with pytest.raises(ValueError, match="max_tokens_per_step"):
        Engine(engine.model, num_blocks=2, page_size=4, max_tokens_per_step=0)


def test_block_manager_refcounts_and_eviction():
    bm = BlockManager(3, page_size=2)
    a = bm.allocate(2)
    bm.register(a[0], "k0")
    assert bm.match_prefix(["k0", "k1"]) == [a[0]] and bm.refcount(a[0]) == 2
    bm.free(a)
    bm.free([a[0]])
    assert bm.num_free == 3                      # a[0] is cached but evictable
    assert bm.match_prefix(["k0"]) == [a[0]]     # ... and still matchable
    bm.free([a[0]])
    assert sorted(bm.allocate(3)) == [0, 1, 2]   # eviction hands the cached block out again
    assert bm.match_prefix(["k0"]) == []         # its key is gone
    with pytest.raises(OutOfBlocksError, match="need 1 blocks, 0 free of 3"):
        bm.allocate(1)
    with pytest.raises(ValueError, match="freed more often"):
        BlockManager(1, 1).free([0])
    with pytest.raises(ValueError, match=r"negative number of blocks \(-1\)"):
        BlockManager(1, 1).allocate(-1)


def test_step_batch_layout():
    items = [StepItem([5], 9, [3, 1], False), StepItem([6, 7, 8], 2, [0], True)]
    b = StepBatch.build(items, 5, pad_to=6, max_blocks=4)
    assert b.meta.cu_seqlens_q.tolist() == [0, 1, 4]
    assert b.meta.seq_lens_encoder.tolist() == [0, 3] and b.meta.seq_lens_decoder.tolist() == [9, 2]
    assert b.meta.batch_id_per_token.tolist() == [0, 1, 1, 1, -1, -1]
    assert b.meta.positions.tolist()[:4] == [9, 2, 3, 4]
    # position 9 of request 0 → block table entry 1 (block 1), offset 4; positions 2..4 → block 0.
    assert b.meta.slot_mapping.tolist() == [[1 * 5 + 4, 2, 3, 4, -1, -1]]          # [G = 1, T]
    assert b.meta.block_tables.tolist() == [[[3, 1, -1, -1], [0, -1, -1, -1]]]      # [G = 1, B, nb]
    with pytest.raises(ValueError, match="request 0 reaches position 10 but has 2 blocks of 5"):
        StepBatch.build([StepItem([1], 10, [0, 1], False)], 5)
    with pytest.raises(ValueError, match="request 1: num_cached must be >= 0, got -2"):
        StepBatch.build([StepItem([1], 0, [0], True), StepItem([1], -2, [1], False)], 5)
