"""Per-layer windows reach the graph, the numerics and the report; sinks are refused until the op takes them
(docs/design.md §4, issue 13)."""

import copy
import dataclasses
import random

import pytest
import torch

import swa_rewrite
from mla_reference import dense_logits
from numerics import rel_err
from swa_rewrite import Schedule, SWAPostGradPass, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.passes import SwaRewriteOps
from swa_rewrite.runtime import Engine

TINY = MLAConfig.named("tiny")


def swa_windows(module) -> dict[int, int]:
    """layer → window of each ``swa_mla_attention`` node (read through the adapter, not by position)."""
    ops = SwaRewriteOps()
    return {ops.layer_index(n): ops.window(n) for n in module.graph.nodes
            if n.op == "call_function" and "swa_mla_attention" in str(n.target)}


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
    assert rel_err(got, ref) <= 2e-3
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
    # apply refuses sinks today, so the rows are given by hand: the table is what apply will print.
    report = apply(MLAModel(TINY), Schedule.per_layer({0: 64, 2: 128}, 4)).swa_report
    report = dataclasses.replace(report, schedule=Schedule.per_layer({0: (64, 4), 2: 128}, 4),
                                 rows=[dataclasses.replace(r, sinks=4) if r.layer == 0 else r for r in report.rows])
    lines = report.render().splitlines()
    assert lines[1].split()[:4] == ["layer", "attention", "window", "sinks"]
    rows = {int(line.split()[0]): line.split() for line in lines[3:7]}
    assert rows[0][4:6] == ["64", "4"] and rows[2][4:6] == ["128", "0"] and rows[1][2:4] == ["-", "-"]


SINKS = Schedule(8, [0, 2], 4, sinks={2: 4})


@pytest.mark.parametrize("entry", [
    lambda m: apply(m, SINKS),
    lambda m: swa_rewrite.backend(SINKS),
    lambda m: SWAPostGradPass(SINKS),
    lambda m: swa_rewrite.compile(m, SINKS),
    lambda m: swa_rewrite.passes.ReplaceAttentionPass(SINKS)(swa_rewrite.rewrite.trace(m)),
])
def test_sinks_are_refused_until_the_op_takes_them(entry):
    model = MLAModel(TINY)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NotImplementedError, match=r"layer\(s\) \[2\] sink tokens \(sinks=\{2: 4\}\).*does not "
                                                  r"take sinks yet"):
        entry(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    apply(model, Schedule(8, [0, 2], 4, sinks=0))            # zero sinks is the plain window
