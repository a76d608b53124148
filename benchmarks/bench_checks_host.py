"""Host cost of the input checks in an eager step, on the CPU: the original model and the rewritten one
(``swa_rewrite.apply`` with ``--skip-freq`` / ``--window``), checks on (the eager default) and off
(``checks_disabled``), and where the checked step's extra host time goes.

    PYTHONPATH=. python benchmarks/bench_checks_host.py                    # tiny config, decode step of 32
    PYTHONPATH=. python benchmarks/bench_checks_host.py --step prefill     # chunked-prefill + decode mix
    PYTHONPATH=. python benchmarks/bench_checks_host.py --cprofile 25      # + cProfile of the checked step

On the CPU the kernels are the PyTorch references, but the checks are the same Python and the same host-side
tensor work that runs beside the CUDA kernels: "on minus off" is the checks' host overhead per step. The
per-check table times each check entry point (wrapped where the ops look it up) inside checked steps; the
step check (``checked_step_metadata``, once per step) is timed standalone with the model's own groups and specs.
``D2H copies`` counts ``Tensor.cpu()`` calls per checked step: on CUDA each is a device-to-host copy that
synchronises (the GPU test ``tests/ops/test_validated_step.py::test_an_eager_step_on_cuda_synchronises_twice``
counts the synchronisations themselves). Times are the best of ``--trials`` medians of ``--iters`` steps, the
checks-on and checks-off runs alternating (a drift of the machine lands on both).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_compile import cprofiled, profile_table  # noqa: E402

from swa_rewrite import Schedule, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.ops.checks import checks_disabled, validated_step
from swa_rewrite.ops.step_check import FULL_KEY, checked_step_metadata, schedule_spec_keys
from swa_rewrite.runtime import StepBatch, StepItem, num_cache_groups

# The per-op check entry points: (module, attribute) the ops call through a module-global lookup. (Modules by
# name: ``swa_rewrite.ops`` re-exports functions named like some of its modules.)
OP_CHECKS = tuple((importlib.import_module(f"swa_rewrite.ops.{m}"), f) for m, f in
                  (("mla_attention", "_check_core"), ("fp8_cache", "_check_fp8_write"), ("kv_cache", "_check_write")))
checks = importlib.import_module("swa_rewrite.ops.checks")


def _stub_attention(q, *args, **kwargs):
    T, H, D = q.shape
    P = args[6]
    return q.new_zeros(T, H, D - P), q.new_zeros(T, H, dtype=torch.float32)


# The PyTorch references the ops run on the CPU, by (module, attribute), and what replaces them with
# ``--kernels stub``: zeros of the right shape (an attention), nothing (a cache write) — the cost of an
# asynchronous kernel launch rather than of the computation, as on a GPU.
STUBS = (("mla_attention", "paged_mla_attention_reference", _stub_attention),
         ("mla_attention", "swa_mla_attention_reference", _stub_attention),
         ("fp8_cache", "write_fp8_cache_reference", lambda *args: None),
         ("kv_cache", "write_kv_cache_reference", lambda *args: None))


@contextlib.contextmanager
def stubbed_kernels(enabled: bool):
    saved = []
    try:
        if enabled:
            for module, name, stub in STUBS:
                module = importlib.import_module(f"swa_rewrite.ops.{module}")
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, stub)
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def step_batch(kind: str, batch: int, context: int, page_size: int, num_groups: int) -> StepBatch:
    """``decode``: ``batch`` one-token decodes with ``context`` cached each; ``prefill``: the same decodes plus
    two prefill chunks (a fresh prompt of ``context`` tokens and a second chunk of ``context // 2`` after
    ``context`` cached). Request ``b`` owns its own blocks; every group gets the same table."""
    nb = -(-(2 * context + 1) // page_size)
    items = [StepItem([7], context, list(range(b * nb, (b + 1) * nb)), False) for b in range(batch)]
    if kind == "prefill":
        items.append(StepItem(list(range(context)), 0, list(range(batch * nb, (batch + 1) * nb)), True))
        items.append(StepItem(list(range(context // 2)), context, list(range((batch + 1) * nb, (batch + 2) * nb)),
                              True))
    return StepBatch.build(items, page_size, num_groups=num_groups)


def median_step_us(fn: Callable[[], object], iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


@contextlib.contextmanager
def timed_checks(totals: dict):
    """Wrap the op check entry points (``OP_CHECKS``) and ``StepScope.__exit__`` (the deferred checks' one
    read) so each call adds its seconds and a count to ``totals[name]``."""
    def timer(name, fn):
        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = totals.setdefault(name, [0.0, 0])
                entry[0] += time.perf_counter() - t0
                entry[1] += 1
        return wrapped

    saved = [(module, name, getattr(module, name)) for module, name in OP_CHECKS]
    saved.append((checks.StepScope, "__exit__", checks.StepScope.__exit__))
    try:
        for module, name, fn in saved:
            label = "StepScope.__exit__ (deferred checks)" if name == "__exit__" else f"{module.__name__}.{name}"
            setattr(module, name, timer(label, fn))
        yield totals
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


@contextlib.contextmanager
def counted_copies(counter: list):
    real = torch.Tensor.cpu

    def cpu(self, *args, **kwargs):
        counter[0] += 1
        return real(self, *args, **kwargs)

    torch.Tensor.cpu = cpu
    try:
        yield counter
    finally:
        torch.Tensor.cpu = real


def measure(which: str, model: torch.nn.Module, groups: tuple, keys: tuple, args) -> dict:
    G = num_cache_groups(model)
    b = step_batch(args.step, args.batch, args.context, args.page_size, G)
    nb = b.meta.block_tables.shape[2]
    caches = model.allocate_kv_cache((args.batch + 2) * nb, args.page_size)
    for c in caches:
        if c.dtype == torch.uint8:
            c.random_(0, 100)
        else:
            c.normal_(0, 0.1)
    idx = b.last_token_index

    def step():
        return model(b.input_ids, kv_caches=caches, meta=b.meta, logits_indices=idx)

    def step_off():
        with checks_disabled():
            return step()

    def step_check():
        with validated_step():
            checked_step_metadata(b.meta, caches, groups, keys)

    for fn in (step, step_off, step_check):
        for _ in range(args.warmup):
            fn()
    on, off, sc = [], [], []
    for t in range(args.trials):
        pair = ((step, on), (step_off, off)) if t % 2 == 0 else ((step_off, off), (step, on))
        for fn, out in pair:
            out.append(median_step_us(fn, args.iters))
        sc.append(median_step_us(step_check, args.iters))
    totals: dict = {}
    totals_off: dict = {}
    for _ in range(max(1, args.trials // 2)):
        with timed_checks(totals):
            for _ in range(args.iters):
                step()
        with timed_checks(totals_off):
            for _ in range(args.iters):
                step_off()
    runs = max(1, args.trials // 2) * args.iters
    copies = [0]
    with counted_copies(copies):
        step()
    result = dict(which=which, on=min(on), off=min(off), step_check=min(sc), copies=copies[0], tokens=b.input_ids.shape[0],
                  per_check={k: (v[0] / runs * 1e6, v[1] / runs, totals_off.get(k, (0.0, 0))[0] / runs * 1e6)
                             for k, v in totals.items()})
    if args.cprofile:
        result["cprofile"] = profile_table(cprofiled(step, args.iters), rows=args.cprofile, width=180)
    return result


def render(results: Sequence[dict], layers: int) -> str:
    lines = ["| model | checks off (µs/step) | checks on (µs/step) | on − off (µs/step) | per layer (µs) | "
             "step check alone (µs) | D2H copies/step |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        d = r["on"] - r["off"]
        lines.append(f"| {r['which']} | {r['off']:.0f} | {r['on']:.0f} | {d:.0f} | {d / layers:.0f} | "
                     f"{r['step_check']:.0f} | {r['copies']} |")
    lines += ["", "| model | check | calls/step | checks on: µs/step | µs/call | checks off (shapes only): µs/step |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for name, (us, calls, off) in sorted(r["per_check"].items()):
            lines.append(f"| {r['which']} | `{name}` | {calls:.0f} | {us:.0f} | {us / max(calls, 1):.1f} | {off:.0f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="MLAConfig.named(...) (default tiny)")
    p.add_argument("--step", choices=("decode", "prefill"), default="decode")
    p.add_argument("--batch", type=int, default=32, help="decode requests per step (default 32)")
    p.add_argument("--context", type=int, default=40, help="cached tokens per decode request (default 40)")
    p.add_argument("--page-size", type=int, default=8)
    p.add_argument("--window", type=int, default=8, help="the SWA layers' window (default 8)")
    p.add_argument("--skip-freq", type=int, default=2, help="window_attn_skip_freq: layer i is SWA iff (i+1) %% n")
    p.add_argument("--iters", type=int, default=100, help="steps per median (default 100)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--trials", type=int, default=5, help="medians per mode, alternating; the best is reported")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: less noise)")
    p.add_argument("--kernels", choices=("stub", "reference"), default="stub",
                   help="stub (default): the attention and cache-write references return zeros / write nothing, so a "
                        "step costs what its Python and small ops cost, as a GPU step's host side does; reference: run "
                        "them (the CPU step then takes milliseconds more, and its noise hides the checks)")
    p.add_argument("--cprofile", type=int, default=0, metavar="N", help="print cProfile's top N functions (own "
                   "time) of the checked step")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = MLAConfig.named(args.config)
    L = cfg.num_hidden_layers
    model = MLAModel(cfg, dtype=torch.float32, seed=0)
    schedule = Schedule.from_skip_freq(args.skip_freq, L, args.window)
    rewritten = apply(model, schedule)
    results = []
    with torch.no_grad(), stubbed_kernels(args.kernels == "stub"):
        results.append(measure("original", model, model.cache_groups, (FULL_KEY,) * L, args))
        results.append(measure("rewritten", rewritten, rewritten.cache_groups, schedule_spec_keys(schedule), args))
    print(f"CPU, torch {torch.__version__}, {args.threads} thread(s); {args.config} ({L} layers, "
          f"H={cfg.num_attention_heads}), SWA layers {sorted(schedule.swa_layers)} W={args.window}; {args.step} step "
          f"of {results[0]['tokens']} tokens ({args.batch} decodes, context {args.context}, page {args.page_size}); "
          f"best of {args.trials} medians of {args.iters} steps; kernels: {args.kernels}\n")
    print(render(results, L))
    for r in results:
        if "cprofile" in r:
            print(f"\n## cProfile, {r['which']}, checks on, {args.iters} steps, by own time\n{r['cprofile']}")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
