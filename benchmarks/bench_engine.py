"""Decode steps as the engine runs them (issue 14): ``runtime.Engine`` with and without CUDA graphs, with and without
overlapped steps, for the original and the rewritten model, with the speed-up the bytes predict beside each.

    PYTHONPATH=. python benchmarks/bench_engine.py                    # v3-attn, 32 requests at 4K and 32K
    PYTHONPATH=. python benchmarks/bench_engine.py --contexts 32768 --batch 64
    PYTHONPATH=. python benchmarks/bench_engine.py --cpu              # CPU smoke path: tiny config, tiny contexts
    PYTHONPATH=. python benchmarks/bench_engine.py --host-only        # the engine's own host time a decode step

``bench_compile.py`` times one model call on fixed inputs; this times what a serving loop adds around it: the
engine's scheduling, its step inputs built on the host and sent to the device, the greedy tokens read back. Each
model gets one engine (data checks off, as in serving) whose requests (``--batch`` random prompts of ``context``
tokens) are prefilled once; each timed run adds the same prompts again (mapped from the prefix cache: one prompt
token each to compute), runs them to their first token and ``--warmup`` decode steps untimed, then times
``--steps`` ``Engine.step`` calls (``step_us``). Modes, on the same engine: ``eager`` (the model called step by
step, tokens read after each step),
``eager-overlap`` (``overlap=True``: the next step issued before the previous step's tokens are read), ``graphs``
(``cuda_graphs=True``: each decode step a CUDA-graph replay) and ``graphs-overlap``. Every time is the median of
``--trials`` trials, the two models alternating. Predicted speed-up: as ``bench_compile.py`` (bytes one decode step
reads: every weight once, each full layer ``ctx + 1`` rows a request, each sliding layer its window).

``--host-only``: the engine's own host time a decode step, nothing else — each model's cache layout (the tiny
config's dims: the engine's work depends on requests, pages and cache groups, not on the layers' widths) behind a
stub model that returns zero logits on the CPU at once; ``--batch`` requests at each context, decoding. The step's
inputs stay on the host: the copy to a GPU (``StepBatch.to``'s packing and send, ~0.1-0.2 ms a step on a CPU) is not
in these times.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import random
import statistics
import sys
import time
from typing import Optional, Sequence

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_compile import add_schedule_args, kv_bytes, models_of, profile_table, weight_bytes  # noqa: E402

from swa_rewrite.ops.checks import checks_disabled  # noqa: E402
from swa_rewrite.runtime import Engine  # noqa: E402

MODES = ("eager", "eager-overlap", "graphs", "graphs-overlap")


def step_us(engine: Engine, graphs, mode: str, prompts: list[list[int]], steps: int, warmup: int,
            device: torch.device, profiler=None) -> float:
    """µs of one decode step of ``engine`` in ``mode``: the prompts added (their prefixes from the prefix cache)
    and run until each has its first token (untimed), ``warmup`` decode steps, then ``steps`` timed ``step`` calls
    from an idle device to the last one's return, the device drained after (with ``overlap`` the last call's step
    is still in flight: its device time is in the next call's, as in a serving loop). ``profiler``: a
    ``cProfile.Profile`` enabled around the timed calls."""
    engine.decode_graphs = graphs if mode.startswith("graphs") else None
    engine.overlap = mode.endswith("overlap")
    rids = {engine.add_request(p, 2 + warmup + steps) for p in prompts}
    started: set[int] = set()
    while started != rids:
        started |= {o.request_id for o in engine.step() if o.new_token_ids}
    for _ in range(warmup):
        engine.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    gc.collect()
    gc.disable()              # a collection over the prompts' token lists would land in one step's time
    try:
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if profiler is not None:
            profiler.disable()
    finally:
        gc.enable()
    while engine.has_unfinished():
        engine.step()
    return elapsed / steps * 1e6


def run(args) -> list[dict]:
    device, cfg, model, _, rewritten = models_of(args)
    models = {"original": model, "rewritten": rewritten}
    weights = weight_bytes(model, args.batch)
    rng = random.Random(0)
    rows = []
    for ctx in args.contexts:
        prompts = [[rng.randrange(cfg.vocab_size) for _ in range(ctx)] for _ in range(args.batch)]
        max_len = ctx + args.steps + args.warmup + 3
        engines, graphs, times = {}, {}, {}
        with checks_disabled():
            for which, m in models.items():
                # Room for the prompts (kept in the prefix cache) and for the generations that map them.
                nb = -(-max_len // args.page_size) * args.batch + args.batch
                e = Engine(m, num_blocks=nb, page_size=args.page_size, max_tokens_per_step=args.chunk,
                           max_model_len=max_len, cuda_graphs=True, max_decode_batch=args.batch)
                print(f"  {which}, context {ctx}: prefill ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                e.generate(prompts, 1)
                print(f"    {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
                engines[which], graphs[which] = e, e.decode_graphs
                for mode in args.modes:                      # warm-up: captures, compiles, plans
                    step_us(e, graphs[which], mode, prompts, 2, 1, device)
            for _ in range(args.trials):
                for mode in args.modes:
                    for which in models:
                        t = step_us(engines[which], graphs[which], mode, prompts, args.steps, args.warmup, device)
                        times.setdefault((which, mode), []).append(t)
            print("    " + "; ".join(f"{w} {m}: " + ", ".join(f"{t:.0f}" for t in ts)
                                     for (w, m), ts in times.items()), file=sys.stderr, flush=True)
            if args.profile:
                for which in models:
                    # (profile_table's rows, under the same inference mode and checks as the timed steps)
                    prof = cProfile.Profile()
                    t = step_us(engines[which], graphs[which], args.profile, prompts, args.steps, args.warmup, device,
                                profiler=prof)
                    for order in ("tottime", "cumtime"):
                        print(f"\n## cProfile: {which}, {args.profile}, context {ctx}, {args.steps} steps "
                              f"({t:.0f} µs a step under the profiler), by {order}\n"
                              + profile_table(prof, order, rows=args.profile_rows), flush=True)
        kv = {w: kv_bytes(m.kv_cache_spec(), ctx, args.batch) for w, m in models.items()}
        for mode in args.modes:
            o, r = (statistics.median(times[(w, mode)]) for w in models)
            rows.append(dict(context=ctx, mode=mode, original_us=o, rewritten_us=r, speedup=o / r,
                             predicted=(weights + kv["original"]) / (weights + kv["rewritten"])))
        engines = graphs = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


class _Stub(torch.nn.Module):
    """``model``'s cache layout and config with no work: zero logits on the CPU (``--host-only``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner, self.config = [model], model.config        # (a list: not a submodule, no parameters of its)
        self.anchor = torch.nn.Parameter(torch.zeros(1))       # the engine's device: the CPU

    def kv_cache_spec(self):
        return self.inner[0].kv_cache_spec()

    def allocate_kv_cache(self, *args, **kwargs):
        return self.inner[0].allocate_kv_cache(*args, **kwargs)

    def forward(self, input_ids, kv_caches=None, meta=None, logits_indices=None):
        rows = input_ids.shape[0] if logits_indices is None else logits_indices.shape[0]
        return torch.zeros(rows, self.config.vocab_size)


def host_run(args) -> list[dict]:
    """``--host-only``: µs of ``Engine.step`` a decode step with stub models (median of ``--trials``)."""
    from swa_rewrite import Schedule, apply
    from swa_rewrite.models import MLAConfig, MLAModel

    cfg = MLAConfig.named("tiny")
    model = MLAModel(cfg, seed=0)
    stubs = {"original": _Stub(model),
             "rewritten": _Stub(apply(model, Schedule.from_skip_freq(args.skip_freq, cfg.num_hidden_layers,
                                                                    args.window)))}
    rng = random.Random(0)
    rows = []
    for ctx in args.contexts:
        prompts = [[rng.randrange(cfg.vocab_size) for _ in range(ctx)] for _ in range(args.batch)]
        max_len = ctx + args.steps + args.warmup + 3
        times = {}
        for which, stub in stubs.items():
            nb = -(-max_len // args.page_size) * args.batch + args.batch
            e = Engine(stub, num_blocks=nb, page_size=args.page_size, max_tokens_per_step=args.chunk,
                       max_model_len=max_len)
            e.generate(prompts, 1)
            times[which] = sorted(step_us(e, None, "eager", prompts, args.steps, args.warmup, torch.device("cpu"))
                                  for _ in range(args.trials))
        o, r = (statistics.median(times[w]) for w in stubs)
        rows.append(dict(context=ctx, original_us=o, rewritten_us=r))
    return rows


def render(rows: list[dict]) -> str:
    if rows and "mode" not in rows[0]:
        return "\n".join(["| context | original: engine host µs / step | rewritten: engine host µs / step |",
                          "|---|---|---|"] + [f"| {r['context']} | {r['original_us']:.0f} | {r['rewritten_us']:.0f} |"
                                              for r in rows])
    lines = ["| context | mode | original (µs / step) | rewritten (µs / step) | speed-up | bytes predict |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['mode']} | {r['original_us']:.0f} | {r['rewritten_us']:.0f} | "
                     f"{r['speedup']:.2f}x | {r['predicted']:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default=None, help="comma-separated prompt tokens per request (default 4096,32768; "
                   "--cpu 24)")
    p.add_argument("--batch", type=int, default=None, help="requests (default 32; --cpu 2)")
    add_schedule_args(p)
    p.add_argument("--chunk", type=int, default=None, help="the engine's max_tokens_per_step (default 8192; --cpu 64)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {','.join(MODES)}")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per trial (default 32; --cpu 4)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps before them")
    p.add_argument("--trials", type=int, default=None, help="timed runs per model and mode (default 3; --cpu 1)")
    p.add_argument("--profile", default=None, choices=MODES,
                   help="also cProfile one run of --steps steps of each model in this mode, per context")
    p.add_argument("--profile-rows", type=int, default=30, help="functions per cProfile table (default 30)")
    p.add_argument("--cpu", action="store_true", help="CPU smoke path: the tiny config at tiny contexts")
    p.add_argument("--host-only", action="store_true", help="the engine's own host time a decode step (stub models, "
                   "no device work; default context 32768)")
    args = p.parse_args(argv)
    if args.host_only and not args.contexts:
        args.contexts = "24" if args.cpu else "32768"
    if not args.cpu and not args.host_only and not torch.cuda.is_available():
        p.error("no CUDA device: pass --cpu for the CPU smoke path")
    args.config = "tiny" if args.cpu else "v3-attn"
    args.contexts = [int(c) for c in (args.contexts or ("24" if args.cpu else "4096,32768")).split(",")]
    args.batch = args.batch or (2 if args.cpu else 32)
    args.window = args.window or (8 if args.cpu else 128)
    args.page_size = args.page_size or (8 if args.cpu else 64)
    args.chunk = args.chunk or (64 if args.cpu else 8192)
    args.steps = (4 if args.cpu else 32) if args.steps is None else args.steps
    args.trials = args.trials or (1 if args.cpu else 3)
    args.modes = args.modes.split(",")
    if set(args.modes) - set(MODES):
        p.error(f"unknown modes {sorted(set(args.modes) - set(MODES))}; known: {', '.join(MODES)}")
    if args.steps < 1 or args.warmup < 0:
        p.error(f"need --steps >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    if args.host_only:
        rows = host_run(args)
        print(f"\nengine host time a decode step, stub models (tiny config's caches), SWA every {args.skip_freq} "
              f"W={args.window}; {args.batch} requests, page {args.page_size}; {args.steps} steps timed after "
              f"{args.warmup}, median of {args.trials}; torch {torch.__version__}\n")
        print(render(rows))
        return rows
    rows = run(args)
    card = torch.cuda.get_device_name() if not args.cpu else "CPU"
    import triton
    print(f"\n{card}, torch {torch.__version__}, triton {triton.__version__}; {args.config}, SWA every "
          f"{args.skip_freq} W={args.window}; {args.batch} requests, page {args.page_size}; {args.steps} decode steps "
          f"timed after {args.warmup}, median of {args.trials}\n")
    print(render(rows))
    return rows


if __name__ == "__main__":
    main()
