"""``benchmarks/bench_op_python.py``: the Python host time of our ops' CUDA functions, measured on the CPU (issue 14)."""


def test_bench_op_python_cpu_smoke():
    """``benchmarks/bench_op_python.py``: each op's CUDA function runs on CPU tensors with its launches stubbed,
    and every stub (and the compiled-graph flag, the CPU's decode plans) is undone afterwards."""
    import importlib.util
    import pathlib

    from swa_rewrite.kernels import gluon_mla, paged_mla

    before = (gluon_mla.supports, gluon_mla.launch_kernel, paged_mla.launch)
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_op_python.py"
    spec = importlib.util.spec_from_file_location("bench_op_python", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--calls", "3", "--context", "256", "--batch", "4"])
    assert len(rows) == 18 and all(us > 0 for us in rows.values())      # 6 ops: eager, planned, compiled graph
    assert (gluon_mla.supports, gluon_mla.launch_kernel, paged_mla.launch) == before
    from swa_rewrite.ops import decode_plans

    assert decode_plans._DEVICES == ("cuda",) and decode_plans.plans_made() == 0
    from swa_rewrite.ops.checks import shapes_traced

    assert not shapes_traced()
