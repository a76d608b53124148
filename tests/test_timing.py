"""``swa_rewrite.timing``: the one timing helper and progress bar (issue 12)."""

import io
import time

import pytest

import torch

from swa_rewrite import timing
from swa_rewrite.timing import graph_replay_us, median_us, paired_ratio, paired_us, progress


def test_median_us_times_warmup_then_iters_on_cpu():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    us = median_us(fn, iters=5, warmup=2, device="cpu")
    assert len(calls) == 7
    assert 1500 < us < 200_000           # ~2 ms in µs, loose for a busy machine


def test_paired_us_interleaves_the_callables_call_by_call_with_a_rotating_order():
    calls = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    times = paired_us(fns, iters=3, warmup=1, device="cpu")
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")   # warm-ups, then three rounds
    assert [len(t) for t in times] == [3, 3, 3] and all(x >= 0 for t in times for x in t)


def test_the_paired_ratio_holds_while_the_host_drifts(monkeypatch):
    """A host whose speed halves over the run (each call 2 % slower than the one before) and two steps of which
    ``a`` costs twice ``b``: the ratio of neighbouring calls stays 2 (within the one-call drift), where the ratio
    of medians taken one after the other does not."""
    state = {"speed": 1.0}

    def fake_wall_times(fn, iters):
        out = []
        for _ in range(iters):
            out.append(fn() * state["speed"])
            state["speed"] *= 1.02
        return out

    monkeypatch.setattr(timing, "_wall_times", fake_wall_times)
    a, b = (lambda: 200.0), (lambda: 100.0)
    ta, tb = paired_us([a, b], iters=40, warmup=0, device="cpu")
    assert paired_ratio(ta, tb) == pytest.approx(2.0, rel=0.03)
    state["speed"] = 1.0
    separate_a, separate_b = median_us(a, iters=40, warmup=0, device="cpu"), median_us(b, iters=40, warmup=0,
                                                                                       device="cpu")
    assert separate_a / separate_b < 1.4                     # the drift between the two runs hides most of it


@pytest.mark.parametrize("args, match", [(([],), "needs at least one callable"),
                                         (([lambda: None], 0), "iters must be an integer >= 1, got 0")])
def test_paired_us_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        paired_us(*args, device="cpu")
    with pytest.raises(ValueError, match="equally long, non-empty"):
        paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.parametrize("kw, match", [(dict(iters=0), "iters must be an integer >= 1, got 0"),
                                       (dict(warmup=-1), "warmup must be an integer >= 0, got -1")])
def test_median_us_rejects_bad_counts(kw, match):
    with pytest.raises(ValueError, match=match):
        median_us(lambda: None, device="cpu", **kw)


def test_median_us_flush_l2_is_ignored_off_cuda():
    calls = []
    median_us(lambda: calls.append(1), iters=4, warmup=1, device="cpu", flush_l2=True)
    assert len(calls) == 5


@pytest.mark.parametrize("kw, match", [(dict(iters=0), "iters must be an integer >= 1, got 0"),
                                       (dict(warmup=-1), "warmup must be an integer >= 0, got -1")])
def test_graph_replay_us_rejects_bad_counts(kw, match):
    with pytest.raises(ValueError, match=match):
        graph_replay_us(lambda: None, **kw)


def test_graph_replay_us_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    with pytest.raises(RuntimeError, match="graph_replay_us needs a CUDA device"):
        graph_replay_us(lambda: calls.append(1))
    assert calls == []


@pytest.mark.gpu
def test_graph_replay_us_replays_one_capture():
    x = torch.randn(1 << 20, device="cuda")
    y = torch.empty_like(x)
    calls = []

    def fn():
        calls.append(1)
        torch.mul(x, 2.0, out=y)

    us = graph_replay_us(fn, iters=7, warmup=2)
    assert len(calls) == 2 + 2             # warm-up, side-stream warm-up, capture; replays call nothing
    assert 0 < us < 1e6
    assert torch.equal(y, x * 2)


@pytest.mark.gpu
def test_median_us_flushes_l2_outside_the_timed_region():
    x = torch.randn(1 << 20, device="cuda")
    calls = []

    def fn():
        calls.append(1)
        x.add_(1.0)

    us = median_us(fn, iters=5, warmup=1, device="cuda", flush_l2=True)
    assert len(calls) == 6
    assert 0 < us < 1e6


def test_progress_is_silent_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr("sys.stderr", io.StringIO())     # not a TTY
    assert list(progress(range(4), desc="x")) == [0, 1, 2, 3]
    assert __import__("sys").stderr.getvalue() == ""


def test_progress_draws_on_a_terminal_unless_disabled(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for disable, drawn in ((False, True), (True, False)):
        err = Terminal()
        monkeypatch.setattr("sys.stderr", err)
        assert list(progress(range(3), desc="steps", disable=disable)) == [0, 1, 2]
        assert ("steps" in err.getvalue()) == drawn

