"""MHA-mode prefill through the whole model and engine (SPEC §13): ``Engine(mha_prefill=)`` selects prompt chunks,
``StepBatch.build`` plans their rows per cache group, the model's core ops run them in MHA mode — and the logits
stay those of the float64 windowed reference (``mla_reference.dense_logits``, FP8 round trip on the sliding
layers) and of the same engine in MQA mode, through chunked prefill, prefix reuse, sinks, per-layer windows,
full layers, bounded and unbounded caches. A spy on the model's ops proves MHA mode ran."""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mla_reference import dense_logits
from numerics import rel_err
from swa_rewrite import Schedule, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.runtime import Engine

TINY = MLAConfig()
FP8_ENVELOPE = 3e-2        # docs/design.md §9: what FP8 rounding flips may move logits by (see the first test)


class RowCounter(TorchDispatchMode):
    """Counts the core op calls that carried MHA rows in their own cache group, per op name."""

    def __init__(self):
        super().__init__()
        self.with_rows: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in ("swa_rewrite::mla_attention", "swa_rewrite::swa_attention"):
            self.calls[name] = self.calls.get(name, 0) + 1
            a = dict(zip((x.name for x in func._schema.arguments), args), **(kwargs or {}))
            if int(a["mha_kv_cu"][int(a["group"])][-1]) > 0:
                self.with_rows[name] = self.with_rows.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("schedule,windows,sinks", [
    (Schedule.from_skip_freq(2, 4, window=8), {0: 8, 2: 8}, {}),
    (Schedule.per_layer({0: 5, 1: (12, 3), 3: (9, 2)}, 4), {0: 5, 1: 12, 3: 9}, {1: 3, 3: 2}),
])
@pytest.mark.parametrize("page_size,budget", [(1, 7), (4, 64), (16, 23)])
def test_mha_prefill_matches_the_windowed_reference_and_mqa_mode(schedule, windows, sinks, page_size, budget, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, schedule)
    tokens = [rng.randrange(TINY.vocab_size) for _ in range(rng.randrange(40, 70))]
    kw = dict(num_blocks=96, page_size=page_size, max_tokens_per_step=budget)
    spy = RowCounter()
    with spy:
        got = Engine(swa, mha_prefill=1, **kw).logits(tokens)
    assert spy.with_rows.get("swa_rewrite::swa_attention", 0) > 0, "MHA mode never ran in a sliding layer"
    assert spy.with_rows.get("swa_rewrite::mla_attention", 0) > 0, "MHA mode never ran in a full layer"
    mqa = Engine(swa, mha_prefill="off", **kw).logits(tokens)
    # Float32, but the sliding layers' latents go through FP8 (3 mantissa bits): a float32 difference in one layer
    # can tip a latent across an e4m3 boundary in the next, and the error is heavy-tailed — over 180 runs of this
    # test's cases: median 5e-7, 95th percentile 1.5e-4, largest 8e-4, and one CI run saw 3.9e-3. So both are held
    # to docs/design.md §9's FP8 envelope, 3e-2, and full attention must lie 5x further (measured ≥ 0.47).
    assert rel_err(got, mqa) <= FP8_ENVELOPE
    ref = dense_logits(model, tokens, windows=windows, fp8_layers=set(windows), sinks=sinks or None)
    assert rel_err(got, ref) <= FP8_ENVELOPE
    assert rel_err(got, dense_logits(model, tokens, fp8_layers=set(windows))) > 5 * FP8_ENVELOPE   # the window matters


def test_prefix_reuse_and_generation_through_mha(seed):
    """A second prompt sharing a prefix prefills only its tail (MHA rows reach back into reused pages); greedy
    generation agrees with MQA mode."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.per_layer({0: (6, 2), 2: (6, 2)}, 4))
    shared = [rng.randrange(TINY.vocab_size) for _ in range(32)]
    prompts = [shared + [rng.randrange(TINY.vocab_size) for _ in range(n)] for n in (9, 21)]
    kw = dict(num_blocks=64, page_size=4, max_tokens_per_step=16)
    mha = Engine(swa, mha_prefill=2, **kw)
    for prompt in prompts:                       # one after the other: the second reuses the first's pages
        (generated,) = mha.generate([prompt], 5)
        # Each token is MQA mode's pick on the same prefix, unless MQA's top two are within the FP8 envelope.
        seq = prompt + generated
        ref = Engine(swa, mha_prefill="off", **kw).logits(seq)[len(prompt) - 1:-1]
        for i, tok in enumerate(generated):
            lead = float(ref[i].max() - ref[i, tok])
            assert tok == int(ref[i].argmax()) or lead <= FP8_ENVELOPE * float(ref[i].norm()) / ref[i].numel() ** 0.5
    assert mha.stats.reused_tokens > 0


@pytest.mark.parametrize("bounded", [True, False])
def test_bounded_and_unbounded_caches_agree_under_mha(bounded, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.from_skip_freq(2, 4, window=5))
    tokens = [rng.randrange(TINY.vocab_size) for _ in range(50)]
    kw = dict(num_blocks=64, page_size=4, max_tokens_per_step=11, mha_prefill=3, poison_blocks=True)
    got = Engine(swa, window_bounded=bounded, **kw).logits(tokens)
    ref = dense_logits(model, tokens, windows={0: 5, 2: 5}, fp8_layers={0, 2})
    assert not torch.isnan(got).any() and rel_err(got, ref) <= FP8_ENVELOPE


def test_auto_selects_by_the_flop_count_and_off_runs_none(seed):
    """``"auto"``: per chunk and group where MHA mode counts fewer FLOPs — for the tiny config (R = 128,
    N = V = 16) never in a window of 8 (a pair saves less than a row costs), in a full layer from a fresh
    prompt of 36 tokens (pairs C(C+1)/2 · 224 > rows C · 4096)."""
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule.from_skip_freq(2, 4, window=8))
    kw = dict(num_blocks=32, page_size=4, max_tokens_per_step=64)
    auto = Engine(swa, **kw)
    assert auto.cache_groups == (1, 0, 1, 0) and auto.mha_plan.groups == ((0, 0), (8, 0))   # group 0: full
    assert auto.mha_plan.dims == (TINY.kv_lora_rank, TINY.qk_nope_head_dim, TINY.v_head_dim)
    assert Engine(swa, mha_prefill="off", **kw).mha_plan is None
    for length, full_rows in ((35, 0), (36, 2)):           # two full layers carry rows from 36 tokens on
        spy = RowCounter()
        with spy:
            Engine(swa, **kw).logits(list(range(length)))
        assert spy.with_rows.get("swa_rewrite::mla_attention", 0) == full_rows
        assert spy.with_rows.get("swa_rewrite::swa_attention", 0) == 0
    with pytest.raises(ValueError, match="mha_prefill"):
        Engine(swa, mha_prefill="sometimes", **kw)
    with pytest.raises(ValueError, match="mha_prefill"):
        Engine(swa, mha_prefill=0, **kw)
