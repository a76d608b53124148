"""The Python host time of our ops' CUDA implementations, measured on the CPU with every kernel launch stubbed
(issue 14): the part of a decode step's host time that is our own code, which a GPU step's timing mixes with the
launches, cuBLAS and the host's noise, measurable here without device time.

    PYTHONPATH=. python benchmarks/bench_op_python.py                 # 32 decodes at 4K, V3 attention shapes
    PYTHONPATH=. python benchmarks/bench_op_python.py --cprofile 2000 # and where it goes, by own time

Each op's registered CUDA function (``torch.library`` kernel for "cuda": what a GPU step runs below the dispatcher)
is called with CPU tensors of the GPU step's shapes (bf16 queries, packed FP8 / bf16 caches, the step metadata of
``--batch`` one-token decodes at ``--context``), checks off as in serving, with: the Gluon kernels taken as
supported on a 132-SM device, every Triton launch (``kernels.launch``) a no-op, and the two matrix products
(absorb / un-absorb) replaced by empty outputs of their shapes (their CPU arithmetic would swamp the rest). So a
row is the Python and the small tensor operations (views, empties, checks) of one call, with decode plans off
(``ops.decode_plans.no_plans``); the "planned" column the eager call replaying its signature's decode plan, as every
call after a signature's first does in serving; the last column the call without plans inside
``checks.compiled_graph`` (an op in an Inductor graph of ``swa_rewrite.backend``: no shape checks). Under
``torch.inference_mode()``, as a serving step. The CPU's host is ~2-3× faster per operation than the lent H200's:
compare rows of one run, and between commits.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_compile import cprofiled, decode_batch, profile_table  # noqa: E402

from swa_rewrite.ops import decode_plans  # noqa: E402
from swa_rewrite.ops.checks import checks_disabled, compiled_graph  # noqa: E402
from swa_rewrite.ops.registration import cuda_kernel  # noqa: E402

_MODULES = {name: importlib.import_module(f"swa_rewrite.{name}") for name in (
    "kernels._common", "kernels.gluon_mla", "kernels.paged_mla", "kernels.fp8_cache", "kernels.kv_cache", "ops.mla_attention",
    "ops.attention", "ops.fp8_cache", "ops.kv_cache")}


@contextlib.contextmanager
def stubbed_launches(R: int, P: int, V: int):
    """The CUDA paths on CPU tensors: Gluon supported (132 SMs), launches no-ops, absorb / un-absorb empty."""
    m = _MODULES
    patches = [
        (m["kernels.gluon_mla"], "supports", lambda *a, **k: True),
        (m["kernels.gluon_mla"], "launch_kernel", lambda *a, **k: None),
        (m["kernels.paged_mla"], "launch", lambda *a, **k: None),
        (m["kernels.paged_mla"], "_sm_count", lambda device: 132),
        (m["kernels._common"], "_sm_count", lambda device: 132),          # the launch plans (splits) as on an H200
        (m["kernels.fp8_cache"], "launch", lambda *a, **k: None),
        (m["kernels.kv_cache"], "launch", lambda *a, **k: None),
        (m["ops.mla_attention"], "absorb_query", lambda qn, qp, w: qn.new_empty(qn.shape[0], qn.shape[1], R + P)),
        (m["ops.mla_attention"], "unabsorb_output", lambda o, w, n: o.new_empty(o.shape[0], o.shape[1], V)),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


@contextlib.contextmanager
def planned_on_cpu():
    """Decode plans (``ops.decode_plans``) for these CPU tensors, as a GPU step has them after its first call."""
    saved = decode_plans._DEVICES
    decode_plans._DEVICES = saved + ("cpu",)
    try:
        yield
    finally:
        decode_plans._DEVICES = saved
        decode_plans.clear()


def op_calls(batch: int, context: int, window: int = 128, page_size: int = 64) -> dict:
    """One call of each op's CUDA function, on CPU tensors of a decode step's shapes (V3: H = 128, R = 512)."""
    T, H, N, P, R, V = batch, 128, 128, 64, 512, 128
    nb = -(-(context + 1) // page_size)
    m = decode_batch(batch, context, page_size, 2, "cpu").meta
    q_nope = torch.randn(T, H, N, dtype=torch.bfloat16)
    q_pe = torch.randn(T, H, P, dtype=torch.bfloat16)
    w = torch.randn(H * (N + V), R, dtype=torch.bfloat16)
    fp8 = torch.zeros(batch * nb, page_size, 656, dtype=torch.uint8)
    bf16 = torch.zeros(batch * nb, page_size, R + P, dtype=torch.bfloat16)
    latent = torch.randn(T, R + P, dtype=torch.bfloat16)
    meta = (m.block_tables, m.cu_seqlens_q, m.seq_lens_encoder, m.seq_lens_decoder, m.batch_id_per_token,
            m.mha_kv_slots, m.mha_kv_cu)
    cuda = {name: cuda_kernel(getattr(_MODULES[f"ops.{mod}"], name)) for mod, name in (
        ("mla_attention", "swa_attention"), ("mla_attention", "mla_attention"), ("attention", "swa_mla_attention"),
        ("attention", "paged_mla_attention"), ("fp8_cache", "write_fp8_cache"), ("kv_cache", "write_kv_cache"))}
    q_abs = torch.randn(T, H, R + P, dtype=torch.bfloat16)
    mqa_meta = meta[:5]
    return {
        "swa_attention (a sliding layer's core)":
            lambda: cuda["swa_attention"](q_nope, q_pe, w, fp8, *meta, 0.07, P, window, 0, 0, 0),
        "mla_attention (a full layer's core)": lambda: cuda["mla_attention"](q_nope, q_pe, w, bf16, *meta, 0.07, P, 1, 1),
        # What a decode step's Inductor graph calls instead (compile.decompose_mqa_cores): the MQA op alone.
        "swa_mla_attention (its MQA op)":
            lambda: cuda["swa_mla_attention"](q_abs, fp8, *mqa_meta, 0.07, P, window, 0, 0, 0),
        "paged_mla_attention (its MQA op)": lambda: cuda["paged_mla_attention"](q_abs, bf16, *mqa_meta, 0.07, P, 1, 1),
        "write_fp8_cache": lambda: cuda["write_fp8_cache"](latent, fp8, m.slot_mapping, P, 0, 0),
        "write_kv_cache": lambda: cuda["write_kv_cache"](latent, bf16, m.slot_mapping, 1, 1),
    }


def host_us(fn, calls: int, trials: int = 5) -> float:
    """Best of ``trials`` means over ``calls`` calls, µs."""
    for _ in range(min(calls, 50)):
        fn()
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=2000, help="calls per trial")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N", help="also profile N calls of each op")
    args = ap.parse_args(argv)
    results = {}
    with torch.inference_mode(), checks_disabled(), stubbed_launches(512, 64, 128):
        calls = op_calls(args.batch, args.context)
        print(f"# CPU, torch {torch.__version__}; CUDA functions of the ops, launches stubbed; {args.batch} decodes at "
              f"{args.context}, W = 128; host µs per call, best of 5 means of {args.calls}")
        print(f"  {'':42s} {'eager':>7s} {'eager, planned':>15s} {'in a compiled graph':>20s}")
        for name, fn in calls.items():
            with decode_plans.no_plans():
                results[name] = host_us(fn, args.calls)
                with compiled_graph():          # as inside swa_rewrite.backend's Inductor graphs: shapes traced
                    results[name + ", compiled graph"] = host_us(fn, args.calls)
            with planned_on_cpu():
                results[name + ", planned"] = host_us(fn, args.calls)
            print(f"  {name:42s} {results[name]:7.1f} {results[name + ', planned']:15.1f} "
                  f"{results[name + ', compiled graph']:20.1f}")
        for name, fn in calls.items() if args.cprofile else ():
            for label, scope in (("eager", decode_plans.no_plans), ("eager, planned", planned_on_cpu)):
                with scope():
                    fn()
                    print(f"\n## cProfile: {name}, {label}, {args.cprofile} calls, by own time")
                    print(profile_table(cprofiled(fn, args.cprofile), rows=16, width=170))
    return results


if __name__ == "__main__":
    main()
