"""End-to-end decode and prefill throughput, original vs rewritten (``swa-rewrite bench``, CUDA only).

The caches are filled with random latents instead of prefilling 128K-token prompts: what is timed is one
engine step at a given context, through the model and the same ops the runtime uses. Decode steps are
captured in a CUDA graph (the ops never synchronise with the host), as a serving engine would run them.
"""

from __future__ import annotations

from typing import Callable

import torch

from .models import MLAModel
from .ops.checks import checks_disabled
from .rewrite import apply
from .runtime import StepBatch, StepItem, num_cache_groups
from .schedule import Schedule
from .timing import median_us, progress


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _fill(caches: list[torch.Tensor], latent_dim: int) -> None:
    """Write random latents into every slot, through the cache write op of each cache's format."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for layer, c in enumerate(caches):
        num_slots = c.shape[0] * c.shape[1]
        for start in range(0, num_slots, 1 << 18):
            slots = torch.arange(start, min(num_slots, start + (1 << 18)), device="cuda")
            latent = torch.randn(slots.numel(), latent_dim, generator=g, device="cuda").to(torch.bfloat16)
            torch.ops.swa_rewrite.write_kv_cache(latent, c, slots, layer)


def run_bench(model: MLAModel, schedule: Schedule, args) -> None:
    """Time ``model`` (on CUDA, bf16) and its rewrite by ``schedule``; ``args`` carries the sizes of
    ``swa-rewrite bench`` (``contexts``, ``batch``, ``prefill_tokens``, ``page_size``, ``iters``,
    ``no_progress``). The CLI builds the model and the schedule: this module never imports the CLI."""
    with checks_disabled(), torch.no_grad():   # serving mode: no host round trips for input checks
        _run_bench(model, schedule, args)


def _run_bench(model: MLAModel, schedule: Schedule, args) -> None:
    cfg = model.config
    swa = apply(model, schedule)
    report = swa.swa_report
    ps, B = args.page_size, args.batch
    L, W = cfg.num_hidden_layers, schedule.window
    n_swa = len(schedule.swa_layers)
    print(report.render(max(args.contexts)))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; decode: {B} requests x 1 token, "
          f"CUDA graph; prefill: one chunk of {args.prefill_tokens} tokens ending at the context")
    rows = []
    bar = progress(args.contexts, desc="bench", disable=getattr(args, "no_progress", False))
    for ctx in bar:
        blocks = -(-(ctx + 1) // ps)
        num_blocks = B * blocks
        result = {}
        for name, m in (("original", model), ("rewritten", swa)):
            bar.set_postfix_str(f"context {ctx}: {name}")
            caches = m.allocate_kv_cache(num_blocks, ps)
            _fill(caches, cfg.latent_dim)
            allocated = sum(c.numel() * c.element_size() for c in caches)
            G = num_cache_groups(m)   # the rewritten model has a full and a sliding cache group
            dec = StepBatch.build([StepItem([1], ctx, list(range(b * blocks, (b + 1) * blocks)), False)
                                   for b in range(B)], ps, num_groups=G, device="cuda")
            step = lambda: m(dec.input_ids, kv_caches=caches, meta=dec.meta,  # noqa: E731
                             logits_indices=dec.last_token_index)
            decode_us = median_us(_graphed(step), args.iters)
            T = min(args.prefill_tokens, ctx)
            pre = StepBatch.build([StepItem([1] * T, ctx - T, list(range(blocks)), True)], ps, num_groups=G,
                                  device="cuda")
            last = pre.last_token_index
            prefill_us = median_us(lambda: m(pre.input_ids, kv_caches=caches, meta=pre.meta, logits_indices=last),
                                   max(3, args.iters // 4))
            result[name] = (decode_us, prefill_us, T, allocated / (num_blocks * ps))
            caches = None  # free this context's caches before the next allocation
            torch.cuda.empty_cache()
        rows.append((ctx, result))
    # Expected decode speed-up from bytes: weights are read once per step, each full layer reads B·ctx
    # cache rows of D model-dtype values, each SWA layer B·min(W, ctx) packed rows.
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bpt_full = cfg.latent_dim * 2
    bpt_swa = report.rows[next(iter(schedule.swa_layers))].cache_after[1] if n_swa else 0
    print(f"\n{'context':>8} {'decode tok/s orig':>18} {'rewritten':>10} {'speed-up':>9} {'expected':>9} "
          f"{'prefill tok/s orig':>19} {'rewritten':>10} {'speed-up':>9} {'cache B/token orig':>19} {'rewritten':>10}")
    for ctx, r in rows:
        (d0, p0, T, c0), (d1, p1, _, c1) = r["original"], r["rewritten"]
        full_bytes = weights + L * B * ctx * bpt_full
        swa_bytes = weights + (L - n_swa) * B * ctx * bpt_full + n_swa * B * min(W, ctx) * bpt_swa
        print(f"{ctx:>8} {B / d0 * 1e6:>18.0f} {B / d1 * 1e6:>10.0f} {d0 / d1:>8.2f}x {full_bytes / swa_bytes:>8.2f}x "
              f"{T / p0 * 1e6:>19.0f} {T / p1 * 1e6:>10.0f} {p0 / p1:>8.2f}x {c0:>19.0f} {c1:>10.0f}")
    print(f"report: {report.bytes_per_token(False)} -> {report.bytes_per_token(True)} bytes/token "
          f"(weights {weights / 2**30:.2f} GiB read per step)")
