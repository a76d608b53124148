"""Calibration (docs/design.md §15): the outside-window attention mass and output error of each layer, checked
against a brute-force float64 softmax over the dense (MHA-form) attention scores of an independent
recomputation; the proposal's memory target checked through the rewrite's own memory report, its optimality
by enumerating every schedule; the skip-frequency match by enumeration."""

import itertools
import random

import pytest
import torch

from mla_reference import _rms, _rope, inv_freq_and_mag, softmax_scale
from swa_rewrite import Schedule
from swa_rewrite.calibrate import (Calibration, WindowCost, compare_schedules, measure_window_costs,
                                   nearest_skip_freq, propose_schedule)
from swa_rewrite.evaluate import kv_cache_bytes, random_sequences
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.models.fused_weights import split_parts
from swa_rewrite.rewrite import apply


@pytest.fixture(scope="module")
def model():
    return MLAModel(MLAConfig.named("tiny").replace(num_hidden_layers=3), seed=77)


def brute_force_costs(model, tokens, options):
    """``{(layer, W, s): (outside mass per head [H] summed over tokens, ‖Δo‖², ‖o‖²)}``, float64: the
    original model's dense forward (per-head keys and values from ``kv_b_proj``), each layer's full softmax,
    and for each option the mass on causal positions the window does not keep and the attention output (after
    ``o_proj``) of the softmax restricted to what it keeps."""
    cfg = model.config
    sd = {k: v.detach().double() for k, v in split_parts(model.state_dict(), model.config).items()}
    H, N, P, V, R = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                     cfg.kv_lora_rank)
    L, eps = len(tokens), cfg.rms_norm_eps
    pos = torch.arange(L)
    inv_freq, mag = inv_freq_and_mag(cfg)
    x = sd["embed_tokens.weight"][torch.tensor(tokens)]
    out = {}
    for i in range(cfg.num_hidden_layers):
        p, a = f"layers.{i}.", f"layers.{i}.self_attn."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        q = _rms(h @ sd[a + "q_a_proj.weight"].T, sd[a + "q_a_layernorm.weight"], eps) @ sd[a + "q_b_proj.weight"].T
        q = q.view(L, H, N + P)
        ckv = h @ sd[a + "kv_a_proj_with_mqa.weight"].T
        c, k_pe = _rms(ckv[:, :R], sd[a + "kv_a_layernorm.weight"], eps), _rope(ckv[:, R:], pos, inv_freq, mag, True)
        kv = (c @ sd[a + "kv_b_proj.weight"].T).view(L, H, N + V)
        qq = torch.cat([q[..., :N], _rope(q[..., N:], pos, inv_freq, mag, True)], -1)
        kk = torch.cat([kv[..., :N], k_pe[:, None, :].expand(L, H, P)], -1)
        v = kv[..., N:]
        s = torch.einsum("ihd,jhd->hij", qq, kk) * softmax_scale(cfg)
        causal = pos[None, :] <= pos[:, None]
        full = s.masked_fill(~causal, float("-inf")).softmax(-1)                    # [H, L, L]

        def attend(prob):
            return torch.einsum("hij,jhv->ihv", prob, v).reshape(L, H * V) @ sd[a + "o_proj.weight"].T

        o = attend(full)
        for w, sinks in options:
            keep = causal & ((pos[None, :] > pos[:, None] - w) | (pos[None, :] < sinks))
            outside = torch.where(keep, 0.0, full).sum(-1).sum(-1)                 # [H]
            o_w = attend(s.masked_fill(~keep, float("-inf")).softmax(-1))
            out[i, w, sinks] = (outside, float(((o_w - o) ** 2).sum()), float((o ** 2).sum()))
        x = x + o
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        g = h @ sd[m + "gate_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * (h @ sd[m + "up_proj.weight"].T)) @ sd[m + "down_proj.weight"].T
    return out


def test_window_costs_match_a_brute_force_float64_softmax(model, seed):
    seqs = random_sequences(2, 37, 256, seed=seed)
    windows, sinks = [5, 16, 64], [0, 3]
    # Chunked prefill (8 tokens a step) and pages of 4: the capture concatenates a request's chunks.
    cal = measure_window_costs(model, seqs, windows, sinks, page_size=4, max_tokens_per_step=8)
    options = [(w, s) for w in windows for s in sinks]
    ref = [brute_force_costs(model, s, options) for s in seqs]
    H, tokens = model.config.num_attention_heads, 2 * 37
    assert cal.tokens == tokens and cal.sequences == 2 and len(cal.costs) == 3 * len(options)
    for i in range(3):
        for w, s in options:
            outside = sum(r[i, w, s][0] for r in ref)                                 # [H]
            c = cal.cost(i, w, s)
            assert c.mass_outside == pytest.approx(outside.sum().item() / (tokens * H), rel=1e-4, abs=1e-7)
            assert c.mass_outside_max_head == pytest.approx(outside.max().item() / tokens, rel=1e-4, abs=1e-7)
            err = (sum(r[i, w, s][1] for r in ref) / sum(r[i, w, s][2] for r in ref)) ** 0.5
            assert c.output_error == pytest.approx(err, rel=1e-3, abs=1e-6)
        # A window covering every position drops nothing; more sinks never drop more.
        assert cal.cost(i, 64, 0).mass_outside == 0 and cal.cost(i, 64, 0).output_error == pytest.approx(0, abs=1e-6)
        assert cal.cost(i, 5, 3).mass_outside <= cal.cost(i, 5, 0).mass_outside
        ranking = cal.ranking(5)
        assert [c for _, c in ranking] == sorted(c for _, c in ranking) and sorted(l for l, _ in ranking) == [0, 1, 2]
    assert "layer" in cal.render() and "W5 s3" in cal.render("output_error")


def synthetic(num_layers, windows, sinks, seed):
    rng = random.Random(seed)
    cfg = MLAConfig.named("tiny").replace(num_hidden_layers=num_layers)
    costs = tuple(WindowCost(i, w, s, rng.random(), rng.random(), rng.random())
                  for i in range(num_layers) for w in windows for s in sinks)
    return Calibration(cfg, tuple(windows), tuple(sinks), 1, 1, costs)


@pytest.mark.parametrize("saving", [0.1, 0.3, 0.45, 0.6])
def test_proposal_meets_its_memory_target_at_least_cost(saving, seed):
    windows, sinks, n, context, ps = (16, 64, 200), (0, 4), 4, 512, 16
    cal = synthetic(n, windows, sinks, seed)
    prop = propose_schedule(cal, saving, context, page_size=ps, metric="output_error")
    # The target, through the rewrite's own memory report of a bf16 model rewritten with the proposal.
    meta = MLAModel(cal.config, device="meta", dtype=torch.bfloat16)
    memory = apply(meta, prop.schedule).swa_report.memory(context, ps)
    assert prop.kv_cache_bytes == memory.rewritten_bytes and prop.original_kv_cache_bytes == memory.original_bytes
    assert memory.rewritten_bytes <= (1 - saving) * memory.original_bytes
    assert prop.saving == pytest.approx(1 - memory.rewritten_bytes / memory.original_bytes) and prop.saving >= saving
    # Least summed cost: every assignment of full / (W, s) to the layers that meets the target costs as much or more.
    options = [None] + [(w, s) for w in windows for s in sinks]
    best = min(sum(cal.cost(i, *o).output_error for i, o in enumerate(pick) if o is not None)
               for pick in itertools.product(options, repeat=n)
               if kv_cache_bytes(cal.config, Schedule.per_layer({i: o for i, o in enumerate(pick) if o}, n),
                                 context, ps) <= (1 - saving) * memory.original_bytes)
    assert prop.cost == pytest.approx(best)
    assert prop.cost == pytest.approx(sum(cal.cost(i, prop.schedule.window_of(i), prop.schedule.sinks_of(i))
                                          .output_error for i in prop.schedule.swa_layers))
    d = prop.to_dict()
    assert Schedule.from_dict(d["schedule"]) == prop.schedule
    assert {"target_saving", "saving", "kv_cache_bytes", "original_kv_cache_bytes", "cost", "metric", "context",
            "page_size", "label"} <= set(d)


def test_proposal_errors():
    cal = synthetic(2, (64,), (0,), 0)
    # W 64 at 4096 tokens, pages of 64: 2 blocks of 164-byte rows against 4096 rows of 288 bytes: 98.2% at most.
    assert propose_schedule(cal, 0.98, 4096).saving == pytest.approx(1 - 128 * 164 / (4096 * 288))
    with pytest.raises(ValueError, match="saves 99.0%.*the most is 98.2%"):
        propose_schedule(cal, 0.99, 4096)
    with pytest.raises(ValueError, match="fraction"):
        propose_schedule(cal, 1.5, 4096)
    with pytest.raises(ValueError, match="metric"):
        propose_schedule(cal, 0.1, 4096, metric="loss")
    assert propose_schedule(cal, 0.0, 4096).schedule.swa_layers == frozenset()   # nothing to save: nothing slides


def test_nearest_skip_freq_by_enumeration():
    cfg = MLAConfig.named("tiny").replace(num_hidden_layers=6)
    for target in (100_000, 400_000, 900_000):
        got = nearest_skip_freq(cfg, target, [64, 256], 2048, page_size=64)
        cands = [Schedule.from_skip_freq(f, 6, w) for f in range(2, 8) for w in (64, 256)]
        assert abs(kv_cache_bytes(cfg, got, 2048, 64) - target) == min(
            abs(kv_cache_bytes(cfg, c, 2048, 64) - target) for c in cands)
    with_sinks = nearest_skip_freq(cfg, 400_000, [64], 2048, sinks=4)
    assert {with_sinks.sinks_of(i) for i in with_sinks.swa_layers} == {4}


def test_calibration_takes_the_original_model(model):
    with pytest.raises(TypeError, match="original"):
        measure_window_costs(apply(model, Schedule.from_skip_freq(2, 3, 8)), [[1, 2, 3]], [4])
    with pytest.raises(ValueError, match="windows"):
        measure_window_costs(model, [[1, 2, 3]], [])


def test_compare_schedules_rows(model):
    seqs = random_sequences(1, 40, 256)
    cal = measure_window_costs(model, seqs, [8, 16], [0, 2], page_size=8)
    prop = propose_schedule(cal, 0.3, 40, page_size=8)
    report = compare_schedules(model, seqs, prop, sinks=2, buckets=(0, 20, 40))
    names = [v.name for v in report.variants]
    assert names[0] == "original" and names[1].startswith("calibrated ")
    assert any("skip-freq" in n for n in names) and any("2 sinks" in n or "no sinks" in n for n in names)
    schedules = [v.schedule for v in report.variants[1:]]
    assert len(set(schedules)) == len(schedules) and schedules[0] == prop.schedule   # shared ones merged
    assert report.context == 40 and report.page_size == 8
