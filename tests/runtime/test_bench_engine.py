"""``benchmarks/bench_engine.py --cpu``: both models through the engine in its four decode modes, each row with a
step time and the byte arithmetic of the predicted speed-up (tiny: full rows 144 float32 = 576 B, packed 164 B)."""

import importlib.util
import pathlib
import sys

import pytest

from swa_rewrite.models import MLAConfig, MLAModel


def _bench(name):
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_engine_cpu_smoke(capsys):
    bench = _bench("bench_engine")
    rows = bench.main(["--cpu", "--contexts", "16", "--steps", "2", "--warmup", "1", "--profile", "eager",
                       "--profile-rows", "3"])
    out = capsys.readouterr().out
    for which in ("original", "rewritten"):                   # cProfile of each model's eager engine steps
        assert f"## cProfile: {which}, eager, context 16, 2 steps" in out
        by_cumulative = out.split(f"## cProfile: {which}, eager")[2]             # the second table: by cumtime
        assert "by cumtime" in by_cumulative.splitlines()[0] and "engine.py" in by_cumulative
    assert [(r["context"], r["mode"]) for r in rows] == [(16, m) for m in bench.MODES]
    assert "| context | mode | original (µs / step) |" in out and "| 16 | graphs-overlap |" in out
    assert all(r["original_us"] > 0 and r["rewritten_us"] > 0 for r in rows)
    # B = 2 requests, 17 positions read per full layer, min(W = 8, 17) per sliding layer (layers 0 and 2).
    original, rewritten = 4 * 2 * 17 * 576, 2 * 2 * 17 * 576 + 2 * 2 * 8 * 164
    weights = _bench("bench_compile").weight_bytes(MLAModel(MLAConfig.named("tiny")), 2)
    assert rows[0]["predicted"] == pytest.approx((weights + original) / (weights + rewritten))


def test_bench_engine_refuses_bad_arguments():
    bench = _bench("bench_engine")
    for argv in (["--cpu", "--modes", "eager,fast"], ["--cpu", "--steps", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_bench_engine_host_only_smoke(capsys):
    """``--host-only``: the engine's own host time a decode step with stub models, both cache layouts."""
    bench = _bench("bench_engine")
    rows = bench.main(["--host-only", "--cpu", "--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert [r["context"] for r in rows] == [24] and all(r["original_us"] > 0 and r["rewritten_us"] > 0 for r in rows)
    assert "| context | original: engine host µs / step | rewritten: engine host µs / step |" in out
    assert "| 24 |" in out
