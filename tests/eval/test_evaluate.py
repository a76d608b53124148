"""Evaluation (docs/design.md §15): perplexity by position and retrieval, through the paged engine, checked
against NLLs and log-probabilities computed by hand from the independent float64 dense model
(``tests/mla_reference.py``, windows, sinks and the FP8 round trip of the rewritten layers included)."""

import json
import math

import pytest
import torch

from mla_reference import dense_logits
from swa_rewrite import Schedule
from swa_rewrite.evaluate import (EvalReport, byte_stream, evaluate, kv_cache_bytes, random_sequences,
                                  retrieval_samples, schedule_label, token_windows)
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.rewrite import apply


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MLAModel(MLAConfig.named("tiny").replace(num_hidden_layers=3), seed=1234)


def hand_nll(model, tokens, windows=None, sinks=None):
    """``[L-1]`` float64 NLLs of ``tokens`` from the dense reference's logits, by hand."""
    fp8 = tuple(windows or ())
    logits = dense_logits(model, tokens, windows, fp8_layers=fp8, sinks=sinks)
    return torch.tensor([-(logits[p].log_softmax(-1)[tokens[p + 1]]).item() for p in range(len(tokens) - 1)],
                        dtype=torch.float64)


def test_perplexity_by_bucket_matches_a_hand_computation(model, seed):
    seqs = random_sequences(2, 41, 256, seed=seed)
    schedule = Schedule.per_layer({0: (8, 2), 2: 12}, 3)
    report = evaluate(model, seqs, {"swa": schedule}, buckets=(0, 10, 40), page_size=4, max_tokens_per_step=16)
    assert [v.name for v in report.variants] == ["original", "swa"]
    for variant, windows, sinks in ((report.variants[0], None, None),
                                    (report.variants[1], {0: 8, 2: 12}, {0: 2})):
        nll = torch.stack([hand_nll(model, s, windows, sinks) for s in seqs])       # [2, 40]
        for bucket, (lo, hi) in zip(variant.buckets, ((0, 10), (10, 40))):
            assert bucket.tokens == 2 * (hi - lo)
            assert bucket.nll == pytest.approx(nll[:, lo:hi].mean().item(), abs=2e-4)
            assert bucket.perplexity == pytest.approx(math.exp(nll[:, lo:hi].mean().item()), rel=3e-4)
        assert variant.nll == pytest.approx(nll.mean().item(), abs=2e-4)
    # Positions past the last boundary are not counted; a bucket without tokens reads NaN (null in JSON).
    short = evaluate(model, seqs[:1], buckets=(0, 20, 100), page_size=4)
    assert [b.tokens for b in short.original.buckets] == [20, 20]
    empty = evaluate(model, [seqs[0][:5]], buckets=(0, 4, 8))
    assert empty.original.buckets[1].tokens == 0 and math.isnan(empty.original.buckets[1].nll)
    assert empty.to_dict()["variants"][0]["buckets"][1]["nll"] is None


def test_retrieval_samples_state_the_key_distance_tokens_before_the_question(seed):
    filler = [list(range(97, 123)) * 10]
    samples = retrieval_samples([40, 90], num_samples=3, filler=filler, seed=seed, prefix=16)
    assert [s.distance for s in samples] == [40] * 3 + [90] * 3
    for s in samples:
        value = s.tokens[s.answer_start:s.answer_end]
        assert s.answer_end == len(s.tokens) and len(value) == 8
        stated = s.answer_start - s.distance
        assert s.tokens[stated:stated + 8] == value                      # the same value, distance earlier
        head = bytes(s.tokens[s.answer_start - 18:s.answer_start]).split(b"\n")[-1]
        assert head.startswith(b"passkey_") and head.endswith(b' = "')
        assert bytes(s.tokens[stated - len(head):stated]) == head         # under the same name
        assert len(s.tokens) == 16 + s.distance + len(b"\n" + head) + 8   # prefix, distance, query
    assert retrieval_samples([40], seed=seed) == retrieval_samples([40], seed=seed)   # deterministic per seed
    with pytest.raises(ValueError, match="shorter than the statement"):
        retrieval_samples([10])


def test_retrieval_scores_match_a_hand_computation(model, seed):
    samples = retrieval_samples([30, 60], num_samples=2, seed=seed, prefix=8)
    schedule = Schedule.from_skip_freq(2, 3, 40)        # layers 0 and 2 slide
    report = evaluate(model, [samples[0].tokens[:20]], [schedule], retrieval=samples, page_size=8)
    for variant, windows in ((report.variants[0], None), (report.variants[1], {0: 40, 2: 40})):
        for point, d in zip(variant.retrieval, (30, 60)):
            lps, tops = [], []
            for s in (x for x in samples if x.distance == d):
                logits = dense_logits(model, list(s.tokens), windows, fp8_layers=tuple(windows or ()))
                lp = logits[s.answer_start - 1:s.answer_end - 1].log_softmax(-1)
                target = torch.tensor(s.tokens[s.answer_start:s.answer_end])
                lps.append(lp.gather(1, target[:, None]).mean().item())
                tops.append((lp.argmax(-1) == target).double())
            assert point.samples == 2
            assert point.logprob == pytest.approx(sum(lps) / 2, abs=2e-4)
            assert point.byte_accuracy == pytest.approx(torch.cat(tops).mean().item())
            assert point.exact == pytest.approx(sum(float(t.all()) for t in tops) / 2)
            assert point.layers_beyond_window == (0 if windows is None else 2 * (d > 40))


def test_kv_cache_bytes_is_the_rewrite_reports_memory():
    meta = MLAModel(MLAConfig.named("tiny").replace(num_hidden_layers=5), device="meta", dtype=torch.bfloat16)
    for schedule in (Schedule.from_skip_freq(2, 5, 64), Schedule.per_layer({0: (32, 4), 3: 100, 4: (64, 1)}, 5)):
        for context, ps in ((50, 16), (1000, 16), (4096, 64)):
            memory = apply(meta, schedule).swa_report.memory(context, ps)
            assert kv_cache_bytes(meta.config, schedule, context, ps) == memory.rewritten_bytes
            assert kv_cache_bytes(meta.config, None, context, ps) == memory.original_bytes
    # By hand: tiny rows are 288 bytes (bf16, R + P = 144), a packed row 164; 64 positions of one full layer:
    assert kv_cache_bytes(MLAConfig.named("tiny").replace(num_hidden_layers=1), None, 64, 16) == 64 * 288


def test_token_windows_and_byte_stream():
    assert byte_stream([b"ab", b"c"]) == [97, 98, 10, 99]
    assert byte_stream([b"ab", b"c"], bos=256) == [256, 97, 98, 256, 99]
    stream = list(range(100))
    assert token_windows(stream, 10, 3) == [list(range(0, 10)), list(range(45, 55)), list(range(90, 100))]
    assert len(token_windows(stream, 40, 9)) == 2                  # not overlapping: as many as fit
    with pytest.raises(ValueError, match="fewer than one sequence"):
        token_windows(stream, 101, 1)


def test_report_json_table_and_plot(model, tmp_path):
    seqs = random_sequences(1, 24, 256)
    report = evaluate(model, seqs, {"a": Schedule.from_skip_freq(2, 3, 8)},
                      retrieval=retrieval_samples([30], num_samples=1, prefix=4), buckets=(0, 8, 24), page_size=4,
                      name="tiny")
    d = json.loads(json.dumps(report.to_dict()))
    assert set(d) == {"model", "context", "page_size", "sequences", "variants"}
    assert d["context"] == 24 and d["sequences"] == 1
    v = d["variants"][1]
    assert set(v) == {"name", "schedule", "kv_cache_bytes", "kv_saving", "tokens", "nll", "perplexity", "delta_nll",
                      "buckets", "retrieval", "seconds"}
    assert v["schedule"] == Schedule.from_skip_freq(2, 3, 8).to_dict() and d["variants"][0]["schedule"] is None
    assert set(v["buckets"][0]) == {"start", "end", "tokens", "nll", "perplexity"}
    assert set(v["retrieval"][0]) == {"distance", "samples", "logprob", "exact", "byte_accuracy",
                                      "layers_beyond_window"}
    assert v["kv_saving"] == pytest.approx(1 - v["kv_cache_bytes"] / d["variants"][0]["kv_cache_bytes"])
    text = report.render()
    assert "perplexity by position" in text and "retrieval" in text and "a " in text
    pytest.importorskip("matplotlib")
    report.plot(str(tmp_path / "eval.png"))
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input(model):
    seqs = [[1, 2, 3]]
    with pytest.raises(ValueError, match="at least one sequence"):
        evaluate(model, [])
    with pytest.raises(ValueError, match="buckets"):
        evaluate(model, seqs, buckets=(0, 0))
    with pytest.raises(ValueError, match="for 4 layers"):
        evaluate(model, seqs, [Schedule.from_skip_freq(2, 4, 8)])
    with pytest.raises(TypeError, match="Schedule"):
        evaluate(model, seqs, {"x": "skip-freq=2"})
    with pytest.raises(ValueError, match="distinct"):
        evaluate(model, seqs, {"original": Schedule.from_skip_freq(2, 3, 8)})


def test_schedule_label():
    assert schedule_label(None) == "original"
    assert schedule_label(Schedule.from_skip_freq(2, 6, 512)) == "SWA 0,2,4 W512"
    assert schedule_label(Schedule(1024, [0, 1, 2, 4], 6, sinks=4)) == "SWA 0-2,4 W1K s4"
    assert schedule_label(Schedule.per_layer({0: 256, 1: (512, 4)}, 3)) == "SWA 0:W256,1:W512 s0/4"
    assert isinstance(EvalReport, type)
