"""Decode-step latency of the original and the rewritten model, timed the same ways (issue 14), with the
speed-up the bytes predict beside each measured one, and the host's time to issue each step (a step that takes no
longer than that ran at the host's pace: host-bound).

    PYTHONPATH=. python benchmarks/bench_compile.py                       # v3-attn, 4K / 32K / 128K, batch 32
    PYTHONPATH=. python benchmarks/bench_compile.py --quick               # smoke run: 4K, batch 8, few iterations
    PYTHONPATH=. python benchmarks/bench_compile.py --batch 64 --contexts 32768,131072 --modes inductor,inductor+graphs
    PYTHONPATH=. python benchmarks/bench_compile.py --cpu                 # CPU smoke path: tiny config, tiny contexts

Modes, each run on both models (original: ``MLAModel``; rewritten: ``swa_rewrite.apply`` for eager,
``swa_rewrite.compile`` for Inductor, both with the schedule ``--skip-freq`` / ``--window``):

- ``eager``: the step as Python launches it;
- ``eager-op-by-op``: ``eager`` with the model's small ops in their op-by-op forms (``models.fused.op_by_op``: the
  norms, rope and latent as separate PyTorch ops instead of one Triton launch each), the A/B of those launches;
- ``eager-no-plans``: ``eager`` with our ops deciding every call afresh (``ops.decode_plans.no_plans``: checks,
  kernel choice, launch plan and Triton's binder on every call), the A/B of the decode plans;
- ``eager-overlap``: ``eager`` steps issued back to back, ``OVERLAP_STEPS`` per timed call (the time reported per
  step), each fed the previous step's greedy tokens on the device with no synchronisation between steps: the
  host issues step ``i + 1`` while the device runs step ``i``, as an engine that overlaps its scheduling with the
  device does (``runtime.Engine(overlap=True)``); a step then takes the longer of the host's and the device's time
  instead of their sum less what overlaps within it;
- ``eager+graphs``: the eager step as a CUDA graph, ``runtime.cuda_graphs.DecodeGraphs`` (the step's inputs
  packed on the host and sent in one copy, then a replay);
- ``inductor``: ``swa_rewrite.compile(model, schedule, fullgraph=True)``; the original through the same call with
  a schedule that selects no layer (``torch.compile`` through the backend, which rewrites nothing: the same
  Dynamo/Inductor settings for both, dynamic step dimensions included; on CUDA the backend's default
  ``cpp_wrapper``: the graph's launches issued from compiled C++, ``compile.inductor_defaults``);
- ``inductor-py``: the same with Inductor's Python wrapper (``options={"cpp_wrapper": False}``);
- ``reduce-overhead``: the same with ``mode="reduce-overhead"`` (Inductor's CUDA-graph trees);
- ``inductor+graphs``: the Inductor step inside ``DecodeGraphs``.

Caches are allocated once per model for the longest context (``--batch`` requests of it) and shared by all
contexts. The two models' steps are timed interleaved call by call (``swa_rewrite.timing.paired_us``: CUDA events
on the GPU, a synchronisation per call) after warm-up; every time is the best of ``--trials`` per-trial medians
(which go to stderr), and the "paired" speed-up the median over every round of the original's call time over the
rewritten's in the same round: eager steps are host-bound and the host's speed drifts by tens of percent within
seconds, which moves separate medians but not the ratio of neighbouring calls. With data
checks off (``checks_disabled``), as in serving. One decode step: ``--batch`` requests of one token each,
``context`` tokens cached, page ``--page-size``; caches hold random bytes (what is timed does not depend on
their values). Predicted speed-up = bytes the original's step reads / bytes the rewritten's reads: every
weight once (the embedding only its ``B`` rows), each full layer ``B·(ctx+1)`` cache rows of ``R+P`` model-dtype
values (1152 B for V3), each sliding layer ``B·min(W + sinks, ctx+1)`` packed rows (656 B); the KV-only ratio
leaves the weights out. On the CPU (``--cpu``) the graph modes run the same buffers eagerly (no CUDA graphs).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch

import swa_rewrite
from swa_rewrite import Schedule, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.models.fused import op_by_op
from swa_rewrite.ops.checks import checks_disabled
from swa_rewrite.ops.decode_plans import no_plans
from swa_rewrite.ops.kv_cache_spec import FULL
from swa_rewrite.runtime import StepBatch, StepItem, num_cache_groups
from swa_rewrite.runtime.cuda_graphs import DecodeGraphs
from swa_rewrite.timing import paired_us

MODES = ("eager", "eager+checks", "eager-op-by-op", "eager-no-plans", "eager-overlap", "eager+graphs", "inductor",
         "inductor-py", "reduce-overhead", "inductor+graphs")
CPU_MODES = ("eager", "eager+checks", "eager-overlap", "eager+graphs")
EAGER_MODES = ("eager", "eager+checks", "eager-op-by-op", "eager-no-plans", "eager-overlap", "eager+graphs")
OVERLAP_STEPS = 8         # eager-overlap: steps per timed call


def decode_batch(batch: int, context: int, page_size: int, num_groups: int, device) -> StepBatch:
    """``batch`` one-token decodes with ``context`` tokens cached each, request ``b`` on blocks
    ``b·nb … (b+1)·nb - 1`` (every group the same table)."""
    nb = -(-(context + 1) // page_size)
    items = [StepItem([7], context, list(range(b * nb, (b + 1) * nb)), False) for b in range(batch)]
    return StepBatch.build(items, page_size, num_groups=num_groups, device=device)


def weight_bytes(model: torch.nn.Module, batch: int) -> int:
    """Bytes of weights one decode step reads: every parameter once, the input embedding only its ``batch``
    rows (unless it is tied to the output head, which reads it whole)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = getattr(getattr(model, "embed_tokens", None), "weight", None)
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    if embed is not None and embed is not head:
        total -= embed.numel() * embed.element_size() - batch * embed.shape[1] * embed.element_size()
    return total


def kv_bytes(specs: Sequence, context: int, batch: int) -> int:
    """Cache bytes one decode step reads: each full layer ``ctx + 1`` rows per request, each sliding layer
    ``min(W + sinks, ctx + 1)``."""
    rows = [context + 1 if s.kind == FULL else min(s.window + s.sinks, context + 1) for s in specs]
    return sum(batch * n * s.bytes_per_token for n, s in zip(rows, specs))


def fill_random(caches: list[torch.Tensor]) -> None:
    """Finite random contents (packed rows: bytes below 100, finite as FP8, float32 scales and bf16 rope)."""
    for c in caches:
        if c.dtype == torch.uint8:
            c.random_(0, 100)
        else:
            c.normal_(0, 0.1)


def _compile_kwargs(mode: str) -> dict:
    """``swa_rewrite.compile``'s keyword arguments for a compiled ``mode`` (besides ``fullgraph``)."""
    if mode == "reduce-overhead":
        return dict(mode="reduce-overhead")
    if mode == "inductor-py":
        return dict(options={"cpp_wrapper": False})
    return {}


def build(mode: str, which: str, model: MLAModel, rewritten: torch.nn.Module, schedule: Schedule,
          caches: list[torch.Tensor], b: StepBatch, host_b: StepBatch, groups: int,
          device: torch.device) -> tuple[Callable[[], object], float]:
    """One decode step of ``which`` ("original" / "rewritten") in ``mode``, and the seconds its setup took
    (compile, capture and the first call)."""
    t0 = time.perf_counter()
    if mode in EAGER_MODES:
        step = model if which == "original" else rewritten
    else:
        # Both through swa_rewrite.compile, so both get the same Dynamo/Inductor settings (dynamic step
        # dimensions, checks off); the original's schedule selects no layer, so its graph is not rewritten.
        empty = Schedule(schedule.window, [], schedule.num_layers)
        step = swa_rewrite.compile(model, schedule if which == "rewritten" else empty, fullgraph=True,
                                   **_compile_kwargs(mode))
    if mode.endswith("+graphs"):
        graphs = DecodeGraphs(step, caches, num_groups=groups, page_size=caches[0].shape[1],
                              max_blocks=b.meta.block_tables.shape[2], buckets=[b.input_ids.shape[0]], device=device,
                              graphs=device.type == "cuda")
        fn: Callable[[], object] = lambda: graphs.run(host_b)  # noqa: E731
    elif mode == "eager-overlap":
        idx = b.last_token_index

        def fn():
            # Back to back, each step fed the previous step's greedy tokens where they are (the device): nothing
            # waits for the device between steps, so the host issues step i + 1 while the device runs step i.
            ids = b.input_ids
            for _ in range(OVERLAP_STEPS):
                ids = step(ids, kv_caches=caches, meta=b.meta, logits_indices=idx).argmax(-1)
            return ids
    else:
        idx = b.last_token_index
        fn = lambda: step(b.input_ids, kv_caches=caches, meta=b.meta, logits_indices=idx)  # noqa: E731
    if mode != "eager+checks":
        # Serving mode: no input checks (no host round trips); "eager+checks" is a plain eager call, checks on
        # as a user's eager model has them by default.
        plain = fn
        scope = {"eager-op-by-op": op_by_op, "eager-no-plans": no_plans}.get(mode, contextlib.nullcontext)

        def fn():
            with checks_disabled(), scope():
                return plain()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return fn, time.perf_counter() - t0


def models_of(args) -> tuple[torch.device, MLAConfig, MLAModel, Schedule, torch.nn.Module]:
    """``(device, config, original, schedule, rewritten)`` of a benchmark's arguments (``--cpu``: float32 on the
    CPU, else bf16 on CUDA; the model's weights from seed 0)."""
    device = torch.device("cpu" if args.cpu else "cuda")
    cfg = config_of(args)
    dtype = torch.float32 if args.cpu else torch.bfloat16
    model = MLAModel(cfg, device=device, dtype=dtype, seed=0)
    schedule = Schedule.from_skip_freq(args.skip_freq, cfg.num_hidden_layers, args.window)
    return device, cfg, model, schedule, apply(model, schedule)


def run(args) -> list[dict]:
    device, cfg, model, schedule, rewritten = models_of(args)
    specs = {"original": model.kv_cache_spec(), "rewritten": rewritten.kv_cache_spec()}
    groups = {"original": num_cache_groups(model), "rewritten": num_cache_groups(rewritten)}
    weights = weight_bytes(model, args.batch)
    # One set of caches per model, sized for the longest context, serves every context: the compiled graphs
    # then differ between contexts only in the (dynamic) step dimensions, so Inductor's caches serve them.
    max_nb = -(-(max(args.contexts) + 1) // args.page_size)
    # Both models' caches live together, so each (context, mode) times the two models alternately, trial by
    # trial: a drift of the machine (an eager step is host-bound) lands on both, not on whichever ran second.
    caches_of = {}
    for which, eager_model in (("original", model), ("rewritten", rewritten)):
        caches_of[which] = eager_model.allocate_kv_cache(args.batch * max_nb, args.page_size, device)
        fill_random(caches_of[which])
        for c in caches_of[which]:
            torch._dynamo.mark_static_address(c)        # reduce-overhead captures the in-place writes
    result = {}
    for ctx in args.contexts:
        steps = {w: (decode_batch(args.batch, ctx, args.page_size, groups[w], device),
                     decode_batch(args.batch, ctx, args.page_size, groups[w], "cpu")) for w in caches_of}
        for mode in args.modes:
            torch._dynamo.reset()
            built = {}
            for which in caches_of:
                print(f"  {which}, context {ctx}, {mode} ...", file=sys.stderr, flush=True)
                built[which] = build(mode, which, model, rewritten, schedule, caches_of[which], *steps[which],
                                     groups[which], device)
            # The two models' steps interleaved call by call (paired_us): each trial's median per model (the best
            # trial reported), and the median of the per-round ratios over every trial — the speed-up of neighbouring
            # calls, which the host's drift between and within trials (tens of percent in host-bound modes) does
            # not move.
            names = list(built)
            trials = {w: [] for w in names}
            ratios = []
            per_call = OVERLAP_STEPS if mode == "eager-overlap" else 1
            for _ in range(args.trials):
                times = paired_us([built[w][0] for w in names], args.iters, warmup=args.warmup, device=device)
                times = [[t / per_call for t in ts] for ts in times]
                for w, ts in zip(names, times):
                    trials[w].append(statistics.median(ts))
                ratios.extend(a / b for a, b in zip(*times))
            paired = statistics.median(ratios)
            host = {w: host_issue_us(built[w][0], device) / per_call for w in built}
            for which, (_, setup_s) in built.items():
                result[(which, ctx, mode)] = (min(trials[which]), setup_s, host[which], paired)
            print("    medians (us): " + "; ".join(f"{w} " + ", ".join(f"{x:.0f}" for x in v) for w, v in trials.items()),
                  file=sys.stderr, flush=True)
            built = None
        steps = None
        gc.collect()
    caches_of = None
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows = []
    for ctx in args.contexts:
        kv = {w: kv_bytes(specs[w], ctx, args.batch) for w in specs}
        for mode in args.modes:
            (t0, s0, h0, paired), (t1, s1, h1, _) = result[("original", ctx, mode)], result[("rewritten", ctx, mode)]
            rows.append(dict(context=ctx, mode=mode, original_us=t0, rewritten_us=t1, speedup=t0 / t1,
                             paired_speedup=paired,
                             original_host_us=h0, rewritten_host_us=h1,
                             predicted=(weights + kv["original"]) / (weights + kv["rewritten"]),
                             kv_ratio=kv["original"] / kv["rewritten"], original_setup_s=s0, rewritten_setup_s=s1))
    return rows


def host_issue_us(fn: Callable[[], object], device: torch.device, calls: int = 5, trials: int = 3) -> float:
    """Host µs to issue one call of ``fn`` without waiting for the device (best of ``trials``, each ``calls``
    un-synchronised calls after a sync). A step whose host time is at or above its measured time ran at the host's
    pace: its device would have run it faster."""
    best = float("inf")
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return best


def profile(args) -> None:
    """The torch profiler's view of one decode step of each model in each of ``--profile-modes`` (eager: checks
    off, as served, and on, a user's default; inductor: checks off), and the host's time to issue a step
    (``perf_counter`` around 5 un-synchronised calls, after a sync) beside the time to finish it: a step whose
    host time exceeds its device time is host-bound, and that host time is what the mode measures."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = torch.device("cpu" if args.cpu else "cuda")
    cfg = config_of(args)
    model = MLAModel(cfg, device=device, dtype=torch.float32 if args.cpu else torch.bfloat16, seed=0)
    schedule = Schedule.from_skip_freq(args.skip_freq, cfg.num_hidden_layers, args.window)
    rewritten = apply(model, schedule)
    ctx = args.contexts[0]
    nb = -(-(ctx + 1) // args.page_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for mode in args.profile_modes:
        for which, m in (("original", model), ("rewritten", rewritten)):
            caches = m.allocate_kv_cache(args.batch * nb, args.page_size, device)
            fill_random(caches)
            b = decode_batch(args.batch, ctx, args.page_size, num_cache_groups(m), device)
            step = m
            if mode.startswith("inductor"):
                torch._dynamo.reset()
                empty = Schedule(schedule.window, [], schedule.num_layers)
                step = swa_rewrite.compile(model, schedule if which == "rewritten" else empty, fullgraph=True,
                                           **_compile_kwargs(mode))
            call = lambda: step(b.input_ids, kv_caches=caches, meta=b.meta, logits_indices=b.last_token_index)  # noqa: E731
            for checks in ((False, True) if mode == "eager" else (False,)):
                with (contextlib.nullcontext() if checks else checks_disabled()):
                    for _ in range(3):
                        call()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(5):
                        call()
                    host_us = (time.perf_counter() - t0) / 5 * 1e6
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    wall_us = (time.perf_counter() - t0) / 5 * 1e6
                    with torch_profile(activities=activities) as prof:
                        for _ in range(5):
                            call()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
                label = f"{mode}, checks {'on' if checks else 'off'}"
                print(f"\n## profile: {which}, {label}, context {ctx}, batch {args.batch}, 5 steps; host time to "
                      f"issue a step {host_us:.0f} us, to finish it {wall_us:.0f} us")
                print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=24, max_name_column_width=60))
                if device.type == "cuda":
                    print(device_timeline(prof, steps=5))
                python_profile(call, label=f"{which}, {label}", checks=checks)
            caches = b = step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()


def device_timeline(prof, steps: int, gaps: int = 12) -> str:
    """Where a profiled run's device waited: its kernels and copies per step, the time they kept the device busy,
    the time it sat idle between the first and the last, and the longest idle gaps with the activity before and
    after each (an idle gap is host time the device did not hide)."""
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    acts = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), str(e.get("name", "")))
                  for e in events if str(e.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not acts:
        return "## device timeline: the profiler recorded no device activity"
    busy, idle, end, found = 0.0, 0.0, acts[0][0], []
    for i, (t0, t1, name) in enumerate(acts):
        if t0 > end:
            idle += t0 - end
            found.append((t0 - end, acts[i - 1][2] if i else "", name))
        busy += max(0.0, t1 - max(t0, end))
        end = max(end, t1)
    lines = [f"## device timeline: {len(acts) / steps:.0f} kernels and copies per step; per step busy "
             f"{busy / steps:.0f} us, idle between them {idle / steps:.0f} us (span {(end - acts[0][0]) / steps:.0f} "
             f"us); idle gaps over 2 us per step: {sum(1 for g in found if g[0] > 2) / steps:.0f}, longest:"]
    for gap, before, after in sorted(found, reverse=True)[:gaps]:
        lines.append(f"   {gap:8.1f} us  after {before[:70]!r}  before {after[:70]!r}")
    by_next: dict[str, list[float]] = {}
    for gap, _, after in found:
        by_next.setdefault(after[:70], []).append(gap)
    lines.append("   idle per step by the activity that ended it (us, count):")
    for name, gs in sorted(by_next.items(), key=lambda kv: -sum(kv[1]))[:gaps]:
        lines.append(f"   {sum(gs) / steps:8.1f} us  {len(gs) / steps:5.1f}  {name!r}")
    return "\n".join(lines)


def cprofiled(fn: Callable[[], object], calls: int):
    """``calls`` calls of ``fn`` under cProfile; returns the profile (``profile_table``)."""
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    return prof


def profile_table(prof, order: str = "tottime", rows: int = 28, width: int = 200) -> str:
    """The ``rows`` functions of ``prof`` with the most ``order`` time (``tottime``: own, ``cumtime``: with callees),
    cProfile's table without its preamble, lines cut at ``width``."""
    import io
    import pstats

    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(rows)
    return "\n".join(line[:width] for line in buf.getvalue().splitlines()[4:] if line.strip())


def python_profile(call, label: str, steps: int = 10, checks: bool = False) -> None:
    """cProfile's view of ``steps`` un-synchronised eager steps (``checks``: in checked mode): the Python functions
    where the host's time goes (own time, then cumulative), library and project code alike."""
    with (contextlib.nullcontext() if checks else checks_disabled()):
        prof = cprofiled(call, steps)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    for order in ("tottime", "cumtime"):
        print(f"\n## cProfile: {label}, {steps} steps, by {order}")
        print(profile_table(prof, order))


def render(rows: list[dict]) -> str:
    """The markdown table of ``rows`` (one per context and mode)."""
    lines = ["| context | mode | original (µs) | rewritten (µs) | speed-up | paired speed-up | "
             "bytes predict (weights + KV) | KV bytes ratio | host µs to issue (orig / rewr) | setup s (orig / rewr) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['mode']} | {r['original_us']:.1f} | {r['rewritten_us']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['paired_speedup']:.2f}x | {r['predicted']:.2f}x | {r['kv_ratio']:.2f}x | "
                     f"{r['original_host_us']:.0f} / {r['rewritten_host_us']:.0f} | "
                     f"{r['original_setup_s']:.1f} / {r['rewritten_setup_s']:.1f} |")
    return "\n".join(lines)


def config_of(args) -> MLAConfig:
    """The benchmark's model config: ``args.config``, ``--layers`` deep where given."""
    cfg = MLAConfig.named(args.config)
    return cfg.replace(num_hidden_layers=args.layers) if getattr(args, "layers", None) else cfg


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    """``--window``, ``--skip-freq`` and ``--page-size`` (the benchmarks' schedule and cache layout)."""
    p.add_argument("--window", type=int, default=None, help="the SWA layers' window (default 128; --cpu 8)")
    p.add_argument("--skip-freq", type=int, default=2, help="window_attn_skip_freq: layer i is SWA iff (i+1) %% n")
    p.add_argument("--page-size", type=int, default=None, help="positions per block (default 64; --cpu 8)")


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default=None, help="comma-separated cached tokens per request "
                   "(default 4096,32768,131072; --quick 4096; --cpu 24,40)")
    p.add_argument("--batch", type=int, default=None, help="requests per decode step (default 32; --quick 8; --cpu 2)")
    add_schedule_args(p)
    p.add_argument("--modes", default=None, help=f"comma-separated, of {','.join(MODES)} (default all; --cpu "
                   f"{','.join(CPU_MODES)})")
    p.add_argument("--iters", type=int, default=None, help="timed calls per median (default 20; --quick 5)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--trials", type=int, default=None,
                   help="medians per model and mode, the models alternating; the best is reported (default 3; "
                        "--quick, --cpu 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: one small context, batch 8, 5 iterations")
    p.add_argument("--cpu", action="store_true", help="CPU smoke path: the tiny config at tiny contexts")
    p.add_argument("--layers", type=int, default=None,
                   help="the model's depth (default the config's: v3-attn 4, tiny 4): a step's start, where the host "
                        "issues layer 0 while the device has little to do, weighs less in a deeper model")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of each model at the first context in each of --profile-modes: top "
                        "ops by device time, host-side time and device-to-host copies")
    p.add_argument("--profile-modes", default="eager",
                   help="comma-separated, of eager,inductor,inductor-py (default eager)")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: pass --cpu for the CPU smoke path")
    args.config = "tiny" if args.cpu else "v3-attn"
    contexts = args.contexts or ("24,40" if args.cpu else "4096" if args.quick else "4096,32768,131072")
    args.contexts = [int(c) for c in contexts.split(",")]
    args.batch = args.batch or (2 if args.cpu else 8 if args.quick else 32)
    args.window = args.window or (8 if args.cpu else 128)
    args.page_size = args.page_size or (8 if args.cpu else 64)
    args.iters = args.iters or (3 if args.cpu else 5 if args.quick else 20)
    args.trials = args.trials or (1 if args.cpu or args.quick else 3)
    if args.trials < 1:
        p.error(f"--trials must be >= 1, got {args.trials}")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    args.profile_modes = args.profile_modes.split(",")
    if set(args.profile_modes) - {"eager", "inductor", "inductor-py"}:
        p.error(f"--profile-modes takes eager, inductor and inductor-py, got {args.profile_modes}")
    args.modes = (args.modes or ",".join(CPU_MODES if args.cpu else MODES)).split(",")
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        p.error(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    with torch.inference_mode():      # as serving engines run a model step (custom ops skip their autograd layer)
        rows = run(args)
        if args.profile:
            profile(args)
    cfg = config_of(args)
    card = torch.cuda.get_device_name() if not args.cpu else "CPU"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = "-"
    schedule = Schedule.from_skip_freq(args.skip_freq, cfg.num_hidden_layers, args.window)
    print(f"\n{card}, torch {torch.__version__}, triton {triton_version}; {args.config} ({cfg.num_hidden_layers} "
          f"layers, H={cfg.num_attention_heads}), SWA layers {sorted(schedule.swa_layers)} W={args.window}; decode "
          f"step of {args.batch} requests, page {args.page_size}; median of {args.iters} after {args.warmup} warm-up, "
          f"best of {args.trials} trial(s) with the two models alternating"
          f"{'; graph modes run eagerly on the CPU' if args.cpu else ''}\n")
    print(render(rows))
    return rows


if __name__ == "__main__":
    main()
