"""The rewritten model computes sliding-window attention over packed FP8 caches (CPU, reference ops)."""

import random

import pytest
import torch

from mla_reference import dense_greedy, dense_logits
from numerics import FP8_FLIP_TOL, assert_greedy_agrees, rel_err
from swa_rewrite import Schedule, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.runtime import Engine

TINY = MLAConfig.named("tiny")


def poisoned_engine(model, **kw):
    engine = Engine(model, **kw)
    for c in engine.kv_caches:
        # 0xFF bytes decode as NaN in every field of the packed layout (e4m3fn, float32 scale, bf16 rope).
        c.fill_(255 if c.dtype == torch.uint8 else float("nan"))
    return engine


def test_full_window_differs_from_the_original_by_fp8_error_only(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.from_skip_freq(2, 4, window=4096))
    tokens = [rng.randrange(TINY.vocab_size) for _ in range(40)]
    kw = dict(num_blocks=16, page_size=16, max_tokens_per_step=16)
    base, ours = poisoned_engine(model, **kw).logits(tokens), poisoned_engine(swa, **kw).logits(tokens)
    fp8_reference = dense_logits(model, tokens, fp8_layers={0, 2})
    assert rel_err(ours, fp8_reference) <= FP8_FLIP_TOL  # the rewrite changes exactly what the FP8 cache does
    # docs/design.md §9 puts FP8-only error at <= 3e-2. On random tiny models the FP8 format alone (float64 reference,
    # no code of ours) gives ~2.2e-2 on average and up to 3.4e-2 (a few % of seeds pass 3e-2), so the bound
    # asserted is the format's own error as the reference measures it, plus the flip tolerance above; the 5e-2
    # catches a broken format.
    fp8_only = rel_err(fp8_reference, dense_logits(model, tokens))
    assert fp8_only <= 5e-2 and rel_err(ours, base) <= fp8_only + FP8_FLIP_TOL
    # Greedy tokens: every token the rewritten model picks is the original model's argmax on the same
    # prefix, unless the original's own top choice leads by less than the FP8 logit deviation (a near tie).
    for n in (9, 23):
        prompt = [rng.randrange(TINY.vocab_size) for _ in range(n)]
        (generated,) = poisoned_engine(swa, **kw).generate([prompt], 8)
        seq = prompt + generated
        orig = poisoned_engine(model, **kw).logits(seq)[n - 1:-1]          # [8, vocab], teacher-forced
        rewritten = poisoned_engine(swa, **kw).logits(seq)[n - 1:-1]
        deviation = (orig - rewritten).abs().max(dim=-1).values
        for i, tok in enumerate(generated):
            lead = orig[i].max() - orig[i, tok]
            assert tok == int(orig[i].argmax()) or lead <= 2 * deviation[i], (i, float(lead), float(deviation[i]))


@pytest.mark.parametrize("page_size", [1, 16, 53])
def test_small_window_matches_windowed_reference_through_chunked_prefill(page_size, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    W = rng.choice([3, 8, 13])
    layers = {1, 2} if page_size != 16 else {0, 1, 2, 3}
    swa = apply(model, Schedule(W, layers, 4))
    tokens = [rng.randrange(TINY.vocab_size) for _ in range(47)]
    engine = poisoned_engine(swa, num_blocks=64, page_size=page_size, max_tokens_per_step=rng.choice([1, 5, 17]))
    ref = dense_logits(model, tokens, windows={i: W for i in layers}, fp8_layers=layers)
    got = engine.logits(tokens)
    # Heavy-tailed: the engine's float32 latents and the reference's float64 ones can round to neighbouring FP8
    # values (3 mantissa bits) at a boundary, and with every layer sliding the flips compound. Over 40 seeds (page
    # 16, all four layers): median 4e-7, 95th percentile 2.2e-3, largest 6.9e-3 — while full attention on those
    # layers is at least 0.45 away. (2e-3 failed about one run in twenty.)
    tolerance = 2e-2 if len(layers) == 4 else FP8_FLIP_TOL
    assert rel_err(got, ref) <= tolerance
    # The window matters: the same model with full attention on those layers is far away.
    assert rel_err(got, dense_logits(model, tokens, fp8_layers=layers)) > 5 * tolerance


@pytest.mark.parametrize("page_size", [1, 16, 53])
def test_generation_with_prefix_reuse_and_mixed_batches(page_size, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    W, layers = 6, {0, 3}
    swa = apply(model, Schedule(W, layers, 4))
    V = TINY.vocab_size
    shared = [rng.randrange(V) for _ in range(2 * page_size if page_size < 16 else 18)]
    prompts = [shared + [rng.randrange(V) for _ in range(n)] for n in (3, 11)] + [[rng.randrange(V) for _ in range(5)]]
    engine = poisoned_engine(swa, num_blocks=48, page_size=page_size, max_tokens_per_step=7)
    first = engine.generate(prompts[:1], 5)          # caches the shared prefix
    rest = engine.generate(prompts[1:], 5)           # reuses it, decodes beside prefill chunks
    if page_size < 18:
        assert engine.stats.reused_tokens >= page_size
    windows = {i: W for i in layers}
    # Tokens may part only at a near-tie of the reference (FP8 and summation order move logits by ~1e-3).
    for prompt, ours in zip(prompts, first + rest):
        theirs = dense_greedy(model, prompt, 5, windows, layers)
        assert_greedy_agrees(
            ours, theirs, prompt,
            lambda seq: poisoned_engine(swa, num_blocks=48, page_size=page_size, max_tokens_per_step=7).logits(seq),
            lambda seq: dense_logits(model, seq, windows=windows, fp8_layers=layers), FP8_FLIP_TOL)
