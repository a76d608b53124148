"""Per-layer windows and sinks reach the graph, the numerics and the report (docs/design.md §4, §12, issue 13)."""

import copy
import dataclasses
import random

import pytest
import torch

import swa_rewrite
from mla_reference import dense_logits
from numerics import FP8_FLIP_TOL, rel_err
from swa_rewrite import Schedule, SWAPostGradPass, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.passes import SwaRewriteOps
from swa_rewrite.runtime import Engine

TINY = MLAConfig.named("tiny")


def swa_nodes(module) -> dict[int, "torch.fx.Node"]:
    ops = SwaRewriteOps()
    return {ops.layer_index(n): n for n in module.graph.nodes
            if n.op == "call_function" and "swa_attention" in str(n.target)}


def swa_windows(module) -> dict[int, int]:
    """layer → window of each ``swa_attention`` node (read through the adapter, not by position)."""
    return {layer: SwaRewriteOps().window(n) for layer, n in swa_nodes(module).items()}


def swa_sinks(module) -> dict[int, int]:
    """layer → the ``sinks`` argument of each ``swa_attention`` node, read by schema name from the node
    (absent: the schema's default 0)."""
    out = {}
    for layer, n in swa_nodes(module).items():
        names = [a.name for a in n.target._schema.arguments]
        out[layer] = {**dict(zip(names, n.args)), **n.kwargs}.get("sinks", 0)
    return out


def poisoned_engine(model, **kw):
    engine = Engine(model, **kw)
    for c in engine.kv_caches:
        c.fill_(255 if c.dtype == torch.uint8 else float("nan"))
    return engine


@pytest.mark.parametrize("page_size", [1, 16, 53])
def test_two_windows_match_the_windowed_reference_per_layer(page_size, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    small, large = rng.choice([2, 3, 5]), rng.choice([11, 17])
    schedule = Schedule.per_layer({1: small, 3: large}, 4)
    swa = apply(model, schedule)
    assert swa_windows(swa) == {1: small, 3: large}
    tokens = [rng.randrange(TINY.vocab_size) for _ in range(41)]
    engine = poisoned_engine(swa, num_blocks=64, page_size=page_size, max_tokens_per_step=rng.choice([1, 6, 17]))
    got = engine.logits(tokens)
    ref = dense_logits(model, tokens, windows={1: small, 3: large}, fp8_layers={1, 3})
    assert rel_err(got, ref) <= FP8_FLIP_TOL
    # Each layer's own window matters: one window for both layers is far away, either way round.
    for w in (small, large):
        assert rel_err(got, dense_logits(model, tokens, windows={1: w, 3: w}, fp8_layers={1, 3})) > 1e-2


def test_a_second_apply_sets_each_layers_new_window_and_skips_the_same_one():
    model = MLAModel(TINY)
    once = apply(model, Schedule(8, [0, 2], 4))
    again = apply(once, Schedule(8, [0, 2], 4, windows={2: 16}))
    assert swa_windows(again) == {0: 8, 2: 16}
    replace = again.swa_report.passes[1]
    assert replace.num_matches == 1 and replace.skipped == ["layer 0: already SWA with window 8"]


def test_report_shows_each_layers_window():
    report = apply(MLAModel(TINY), Schedule.per_layer({0: 64, 2: 128}, 4)).swa_report
    assert [(r.layer, r.window, r.sinks) for r in report.rows] == [(0, 64, 0), (1, None, None), (2, 128, 0),
                                                                    (3, None, None)]
    text = report.render()
    assert "windows=64,128" in text and "sinks" not in text.splitlines()[1]     # no sinks: no sinks column
    rows = {int(line.split()[0]): line.split() for line in text.splitlines()[3:7]}
    assert rows[0][4] == "64" and rows[2][4] == "128" and rows[1][2] == "-"


def test_report_shows_sinks_when_a_layer_has_them():
    report = apply(MLAModel(TINY), Schedule.per_layer({0: (64, 4), 2: 128}, 4)).swa_report
    assert [(r.layer, r.window, r.sinks) for r in report.rows] == [(0, 64, 4), (1, None, None), (2, 128, 0),
                                                                    (3, None, None)]
    lines = report.render().splitlines()
    assert lines[1].split()[:4] == ["layer", "attention", "window", "sinks"]
    rows = {int(line.split()[0]): line.split() for line in lines[3:7]}
    assert rows[0][4:6] == ["64", "4"] and rows[2][4:6] == ["128", "0"] and rows[1][2:4] == ["-", "-"]


def test_sinks_reach_the_op_only_where_a_layer_has_them():
    model = MLAModel(TINY)
    plain = apply(model, Schedule(8, [0, 2], 4))
    sinks = apply(model, Schedule(8, [0, 2], 4, sinks={2: 4}))
    assert swa_sinks(sinks) == {0: 0, 2: 4} and swa_windows(sinks) == {0: 8, 2: 8}
    # Layer 0 reads exactly as without sinks (the defaulted argument is left off); layer 2 gains it.
    p, s = swa_nodes(plain), swa_nodes(sinks)
    args = {k: [str(a) for a in n.args] for k, n in s.items()}
    plain_args = {k: [str(a) for a in n.args] for k, n in p.items()}
    assert args[0] == plain_args[0] and s[0].kwargs == p[0].kwargs == {}
    # Then sinks 4; with them layer 2's cache spec differs from layer 0's, so it has a cache group of its own
    # (the full layers are group 0, the plain sliding ones group 1): the group before the sinks is 2, not 1.
    assert args[2][:-2] == plain_args[2][:-1] and plain_args[2][-1] == "1" and args[2][-2:] == ["2", "4"]
    # A schedule with sinks=0 everywhere is the plain graph, node for node.
    assert apply(model, Schedule(8, [0, 2], 4, sinks=0)).code == plain.code
    detail = [d for d in sinks.swa_report.passes[1].details if "layer 2" in d and "swa_attention" in d]
    assert detail and detail[0].endswith("(window 8, 4 sinks)")


def test_a_second_apply_retargets_changed_sinks_and_skips_the_same_ones():
    model = MLAModel(TINY)
    plain = apply(model, Schedule(8, [0, 2], 4))
    once = apply(model, Schedule(8, [0, 2], 4, sinks={2: 4}))
    same = apply(once, Schedule(8, [0, 2], 4, sinks={2: 4}))
    assert same.code == once.code and same.swa_report.passes[1].num_matches == 0
    assert sorted(same.swa_report.passes[1].skipped) == ["layer 0: already SWA with window 8",
                                                          "layer 2: already SWA with window 8, 4 sinks"]
    more = apply(once, Schedule(8, [0, 2], 4, sinks={0: 1, 2: 2}))
    assert swa_sinks(more) == {0: 1, 2: 2} and more.swa_report.passes[1].num_matches == 2
    assert more.code == apply(model, Schedule(8, [0, 2], 4, sinks={0: 1, 2: 2})).code
    # Sinks taken away: the argument goes, and the graph is the plain one again.
    none = apply(more, Schedule(8, [0, 2], 4))
    assert swa_sinks(none) == {0: 0, 2: 0} and none.code == plain.code
    assert apply(once, Schedule(8, [0, 2], 4, windows={2: 16}, sinks={2: 4})).swa_report.passes[1].num_matches == 1


def _sink_case(rng, seed):
    """Two SWA layers with different windows, one of them with 3 sinks (which one is random)."""
    small, large = rng.choice([2, 3, 5]), rng.choice([7, 11])
    windows = {1: small, 3: large}
    sinks = {rng.choice([1, 3]): 3}
    sinks = {layer: sinks.get(layer, 0) for layer in windows}
    return windows, sinks


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("budget", [3, None])          # chunked prefill, or the whole prompt in one step
def test_sinks_match_the_windowed_sinks_reference_through_the_engine(page_size, budget, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    windows, sinks = _sink_case(rng, seed)
    swa = apply(model, Schedule.per_layer({l: (windows[l], sinks[l]) for l in windows}, 4))
    assert swa_windows(swa) == windows and swa_sinks(swa) == sinks
    tokens = [rng.randrange(TINY.vocab_size) for _ in range(37)]
    engine = poisoned_engine(swa, num_blocks=64, page_size=page_size, max_tokens_per_step=budget or len(tokens))
    got = engine.logits(tokens)
    ref = dense_logits(model, tokens, windows=windows, fp8_layers={1, 3}, sinks=sinks)
    assert rel_err(got, ref) <= FP8_FLIP_TOL                   # (without the sinks: >= 6e-2 over 84 runs)
    # The sinks matter: the same windows without them are far away, except at the positions p < W of the
    # sink layer's window W, whose windows still hold positions 0 … p (the sinks add nothing there).
    no_sinks = dense_logits(model, tokens, windows=windows, fp8_layers={1, 3})
    assert rel_err(got, no_sinks) > 2e-2
    W = windows[next(layer for layer, s in sinks.items() if s)]
    assert rel_err(got[:W], no_sinks[:W]) <= FP8_FLIP_TOL and rel_err(got[W:], no_sinks[W:]) > 2e-2


def test_the_reference_sees_each_position_once_and_only_sinks_and_window():
    """The reference's mask is §12's: with a window covering the sequence, sinks change nothing; with sinks
    covering the sequence, the window is irrelevant (full causal attention); sinks on a full layer are refused."""
    model = MLAModel(TINY, seed=3)
    tokens = list(range(1, 20))
    full = dense_logits(model, tokens)
    assert rel_err(dense_logits(model, tokens, windows={0: 19, 2: 25}, sinks={0: 5, 2: 30}), full) < 1e-12
    assert rel_err(dense_logits(model, tokens, windows={0: 1, 2: 2}, sinks={0: 19, 2: 40}), full) < 1e-12
    assert rel_err(dense_logits(model, tokens, windows={0: 1}, sinks={0: 2}), full) > 1e-3
    with pytest.raises(ValueError, match="without a window"):
        dense_logits(model, tokens, windows={0: 4}, sinks={1: 2})


SINKS = Schedule(8, [0, 2], 4, sinks={2: 4})


@pytest.mark.parametrize("entry", [
    lambda m: apply(m, SINKS),
    lambda m: swa_rewrite.backend(SINKS),
    lambda m: SWAPostGradPass(SINKS),
])
def test_every_entry_point_takes_sinks(entry):
    model = MLAModel(TINY)
    before = copy.deepcopy(model.state_dict())
    entry(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
