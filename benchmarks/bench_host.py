"""Where an eager decode step's host time goes (issue 14): each ``swa_rewrite`` op a step calls, replayed alone.

    PYTHONPATH=. python benchmarks/bench_host.py                  # v3-attn, 32 requests at 4K, W=128 on 2 of 4 layers
    PYTHONPATH=. python benchmarks/bench_host.py --cpu            # CPU smoke path (tiny config, reference kernels)

An eager step is host-bound when the host takes longer to issue its launches than the device to run them; then the
step's time is the host's. This records every ``swa_rewrite`` op call of one step of each model (a
``TorchDispatchMode`` sees them with their real arguments), replays each call ``--iters`` times without
synchronising and reports the host µs per call (``perf_counter`` around the calls; the device queue is drained
before each batch of calls so a full queue never blocks a launch), with checks off and on, beside the whole step's
host time. The rest of a step (linear layers, norms, rope: PyTorch's own ops) is the step minus the ops.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_compile import cprofiled, decode_batch, fill_random, profile_table  # noqa: E402

from swa_rewrite import Schedule, apply  # noqa: E402
from swa_rewrite.models import MLAConfig, MLAModel  # noqa: E402
from swa_rewrite.ops.checks import checks_disabled, validated_step  # noqa: E402
from swa_rewrite.ops.registration import cuda_kernel  # noqa: E402
from swa_rewrite.runtime import num_cache_groups  # noqa: E402


class Recorder(TorchDispatchMode):
    """Records the ``swa_rewrite`` ops dispatched, with their arguments (outer calls only: an op that calls
    another one inside its kernel is recorded once)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "swa_rewrite":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def host_us(fn, iters: int, device: torch.device, batch: int = 20) -> float:
    """Median over batches of the host µs per call of ``fn`` (``batch`` calls between synchronisations)."""
    times = []
    for _ in range(max(1, iters // batch)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        times.append((time.perf_counter() - t0) / batch * 1e6)
    times.sort()
    return times[len(times) // 2]


def breakdown(calls, iters: int, device: torch.device) -> None:
    """Host µs of the pieces of the first full and the first sliding attention call: the custom-op dispatch, the
    shape checks, the absorb and un-absorb BMMs, the MQA-mode attention (Triton launches and their set-up)."""
    import importlib

    core = importlib.import_module("swa_rewrite.ops.mla_attention")      # (ops.mla_attention is the wrapper)
    from swa_rewrite.ops.attention import paged_mqa_cuda, swa_mqa_cuda

    seen = set()
    for func, a, kw in calls:
        name = str(func).split(".")[1]
        if name in ("write_kv_cache", "write_fp8_cache") and name not in seen and device.type == "cuda":
            seen.add(name)
            write_pieces(name, func, a, kw, iters, device)
        if name not in ("mla_attention", "swa_attention") or name in seen:
            continue
        seen.add(name)
        (q_nope, q_pe, w, cache, bt, cu, enc, dec, bid, rows, rows_cu, scale, rope_dim) = a[:13]
        window = a[13] if name == "swa_attention" else 0
        sinks = (a[16] if len(a) > 16 else kw.get("sinks", 0)) if name == "swa_attention" else 0
        group = a[15] if name == "swa_attention" else a[14]
        q_abs = core.absorb_query(q_nope, q_pe, w)
        o_lat = torch.empty(q_abs.shape[:2] + (w.shape[1],), dtype=q_abs.dtype, device=device)
        op = getattr(core, name)
        pieces = {
            "whole op": lambda: func(*a, **kw),
            "its CUDA function called directly": lambda: cuda_kernel(op)(*a, **kw),
            "shape checks (_check_core)": lambda: core._check_core(q_nope, q_pe, w, cache, bt, cu, enc, dec, bid,
                                                                   rows, rows_cu, scale, rope_dim, group,
                                                                   window or None, sinks),
            "absorb_query": lambda: core.absorb_query(q_nope, q_pe, w),
            "MQA attention (Triton)": (
                (lambda: swa_mqa_cuda(q_abs, cache, bt[group], cu, dec, bid, scale, rope_dim, window, sinks)) if window
                else (lambda: paged_mqa_cuda(q_abs, cache, bt[group], cu, dec, bid, scale, rope_dim))),
            "unabsorb_output": lambda: core.unabsorb_output(o_lat, w, q_nope.shape[-1]),
            "torch.empty x1": lambda: torch.empty(8, device=device),
        }
        pieces.update(triton_pieces(q_abs, cache, bt[group], cu, dec, bid, scale, rope_dim, window))
        print(f"    {name}: pieces (host µs per call)")
        for label, fn in pieces.items():
            print(f"      {label:40s} {host_us(fn, iters, device):8.1f}")


def write_pieces(name, func, a, kw, iters: int, device: torch.device) -> None:
    """Host µs of a cache write's pieces: the whole op, its checks, the kernel launch alone."""
    from swa_rewrite.kernels import fp8_cache as fp8_kernels
    from swa_rewrite.kernels import kv_cache as kv_kernels
    from swa_rewrite.ops import fp8_cache as fp8_ops
    from swa_rewrite.ops import kv_cache as kv_ops

    latent, cache, slots = a[:3]
    if name == "write_fp8_cache":
        rope_dim, group = a[3], a[5]
        pieces = {"checks": lambda: fp8_ops._check_fp8_write(latent, cache, slots, rope_dim, group),
                  "kernel launch": lambda: fp8_kernels.write_fp8_cache(latent, cache, slots[group], rope_dim=rope_dim)}
    else:
        group = a[4]
        pieces = {"checks": lambda: kv_ops._check_write(latent, cache, slots, group),
                  "kernel launch": lambda: kv_kernels.write_kv_cache(latent, cache, slots[group])}
    print(f"    {name}: pieces (host µs per call)")
    for label, fn in {"whole op": lambda: func(*a, **kw), **pieces}.items():
        print(f"      {label:40s} {host_us(fn, iters, device):8.1f}")


def swa_split_sweep(device: torch.device, context: int = 4096, window: int = 128, H: int = 128) -> None:
    """Device µs (CUDA-graph replays) and host µs of the SWA decode attention with its window split across programs
    (the rule before session 12: whenever SMs are idle) and unsplit, by batch size: where ``SWA_SPLIT_BELOW``
    should sit."""
    from swa_rewrite.kernels.sparse_mla import swa_attention_fwd
    from swa_rewrite.timing import graph_replay_us

    print(f"\n## SWA decode attention, W = {window}, H = {H}, context {context}: split (old rule) vs unsplit")
    print(f"  {'tokens':>6s} {'device split':>13s} {'device unsplit':>15s} {'host split':>11s} {'host unsplit':>13s}")
    for T in (4, 8, 16, 24, 32, 48):
        ps = 64
        b = decode_batch(T, context, ps, 1, device)
        cache = torch.randint(0, 100, (T * b.meta.block_tables.shape[2], ps, 656), dtype=torch.uint8, device=device)
        q = torch.randn(T, H, 576, device=device, dtype=torch.bfloat16)
        m = b.meta
        row = []
        for split_below in (1.0, 0.0):
            fn = (lambda sb=split_below: swa_attention_fwd(q, cache, m.block_tables[0], m.cu_seqlens_q,
                                                           m.seq_lens_decoder, m.batch_id_per_token, 0.07, 64, window,
                                                           config=dict(split_below=sb), staged=False))
            row.append((graph_replay_us(fn, 50), host_us(fn, 200, device)))
        print(f"  {T:6d} {row[0][0]:13.1f} {row[1][0]:15.1f} {row[0][1]:11.1f} {row[1][1]:13.1f}")


def profile_step(which: str, step, n: int, device: torch.device, top: int = 45) -> None:
    """``n`` steps under cProfile (checks off): the functions with the most own time, then every
    ``swa_rewrite`` op of the step replayed ``n`` times alone under its own profile."""
    def run(fn, label):
        with checks_disabled():
            for _ in range(3):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            prof = cprofiled(fn, n)
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"\n## cProfile, {which}: {label}, {n} calls (own and cumulative seconds for all calls)")
        print(profile_table(prof, rows=top))

    run(step, "whole step")
    rec = Recorder()
    with checks_disabled(), rec:
        step()
    seen = set()
    for func, a, kw in rec.calls:
        if str(func) in seen:
            continue
        seen.add(str(func))

        def call(func=func, a=a, kw=kw):
            with validated_step():
                return func(*a, **kw)
        run(call, str(func))


def triton_pieces(q, cache, bt, cu, dec, bid, scale, rope_dim, window):
    """The steps of the Gluon decode path (``paged_tiles_fwd`` → ``_gluon_fwd``), each alone."""
    from swa_rewrite.kernels import gluon_mla, paged_mla
    from swa_rewrite.kernels._common import KEYS_PAGED, _plan, split_targets

    fp8 = window > 0
    if not gluon_mla.supports(q, cache, rope_dim, window, fp8):
        return {}
    T, H, D = q.shape
    R = D - rope_dim
    cfg = dict(paged_mla.PAGED_DECODE_CONFIG, min_tiles_per_split=1) if fp8 else dict(paged_mla.PAGED_DECODE_CONFIG)
    plan = _plan(T, H, min(window + 63, bt.shape[1] * cache.shape[1]) if fp8 else bt.shape[1] * cache.shape[1],
                 q.device, cfg, KEYS_PAGED)
    out = (torch.empty((T, H, R), dtype=q.dtype, device=q.device), torch.empty((T, H), device=q.device))
    o_t, l_t, o_s, l_s = split_targets(*out, plan["splits"])
    meta = (q, cache, bt, cu, dec, bid, scale)
    launch = ((lambda: gluon_mla.launch_fp8(*meta, window, o_t, l_t, o_s, l_s, plan["splits"])) if fp8 else
              (lambda: gluon_mla.launch(*meta, o_t, l_t, o_s, l_s, plan["splits"], True)))
    descs = gluon_mla.fp8_descriptors(cache, R, rope_dim) if fp8 else gluon_mla.descriptors(cache, R, rope_dim)
    prebuilt = ((lambda: gluon_mla.launch_fp8(*meta, window, o_t, l_t, o_s, l_s, plan["splits"], descs=descs)) if fp8
                else (lambda: gluon_mla.launch(*meta, o_t, l_t, o_s, l_s, plan["splits"], True, descs=descs)))
    extra = {}
    if fp8:
        from swa_rewrite.kernels.sparse_mla import swa_attention_fwd
        from swa_rewrite.timing import graph_replay_us

        def swa(splits):
            return lambda: swa_attention_fwd(q, cache, bt, cu, dec, bid, scale, rope_dim, window,
                                             config=None if splits is None else dict(splits=splits))
        for splits in (None, 1, 2):
            label = "default" if splits is None else f"splits {splits}"
            extra[f"  SWA MQA, {label}"] = swa(splits)
            print(f"      device µs of the SWA MQA attention, {label}: {graph_replay_us(swa(splits), 50):.1f}")
    return {
        f"  gluon_mla.supports": lambda: gluon_mla.supports(q, cache, rope_dim, window, fp8),
        f"  _plan (splits {plan['splits']})": lambda: _plan(T, H, 4096, q.device, cfg, KEYS_PAGED),
        "  outputs + split partials (4 empty)": lambda: (torch.empty((T, H, R), dtype=q.dtype, device=q.device),
                                                         torch.empty((T, H), device=q.device),
                                                         split_targets(*out, plan["splits"])),
        "  TMA descriptors": (lambda: gluon_mla.fp8_descriptors(cache, R, rope_dim)) if fp8 else
                             (lambda: gluon_mla.descriptors(cache, R, rope_dim)),
        "  Gluon kernel launch (descriptors incl.)": launch,
        "  Gluon kernel launch, descriptors prebuilt": prebuilt,
        "  split combine launch": lambda: paged_mla._combine(o_t, l_t, *out, o_s, l_s, plan["splits"]),
        **extra,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--inference-mode", action="store_true", help="steps under torch.inference_mode(), not no_grad")
    ap.add_argument("--swa-splits", action="store_true", help="only: the SWA decode attention split vs unsplit, "
                    "device and host µs by batch size (CUDA)")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="instead: N eager steps of each model (checks off) under cProfile, then each op alone; "
                         "prints the functions with the most own time")
    args = ap.parse_args(argv)
    if args.cpu:
        args.context, args.batch, args.window, args.iters = 40, 2, 8, 40
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    if args.swa_splits:
        with torch.no_grad():
            swa_split_sweep(device)
        return
    cfg = MLAConfig.named("tiny" if device.type == "cpu" else "v3-attn")
    model = MLAModel(cfg, device=device, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16, seed=0)
    rewritten = apply(model, Schedule.from_skip_freq(2, cfg.num_hidden_layers, args.window))
    ps = 8 if device.type == "cpu" else 64
    nb = -(-(args.context + 1) // ps)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# {card}, torch {torch.__version__}; {cfg.name if hasattr(cfg, 'name') else ''} decode step of "
          f"{args.batch} requests at {args.context}, W={args.window} on layers 0, 2; host µs per call (median)")
    grad_mode = torch.inference_mode if args.inference_mode else torch.no_grad
    print(f"# under torch.{grad_mode.__name__}()")
    with grad_mode():
        for which, m in (("original", model), ("rewritten", rewritten)):
            caches = m.allocate_kv_cache(args.batch * nb, ps, device)
            fill_random(caches)
            b = decode_batch(args.batch, args.context, ps, num_cache_groups(m), device)

            def step():
                return m(b.input_ids, kv_caches=caches, meta=b.meta, logits_indices=b.last_token_index)

            if args.cprofile:
                profile_step(which, step, args.cprofile, device)
                caches = None
                continue
            for label, ctx in (("checks off", checks_disabled), ("checks on", contextlib.nullcontext)):
                with ctx():
                    for _ in range(3):
                        step()
                    rec = Recorder()
                    with rec:
                        step()
                    whole = host_us(step, args.iters // 4 or 1, device, batch=5)
                    alone = " (ops below replayed alone: each runs its own data checks)" if label == "checks on" else ""
                    print(f"\n## {which}, {label}: whole step {whole:.0f} µs host{alone}")
                    total = 0.0
                    for func, a, kw in rec.calls:
                        def call(func=func, a=a, kw=kw):
                            # A scope as a model step opens, but without the step check: with checks on, each
                            # op replayed alone runs its own data checks (a model step validates once instead),
                            # so its checks-on time is an upper bound of what it costs inside a step.
                            with validated_step():
                                return func(*a, **kw)
                        us = host_us(call, args.iters, device)
                        total += us
                        print(f"  {str(func):45s} {us:8.1f}")
                    print(f"  {'sum of the ops':45s} {total:8.1f}  (the rest of the step: {whole - total:.0f})")
                    if label == "checks off" and device.type == "cuda":
                        breakdown(rec.calls, args.iters, device)
            caches = None
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
