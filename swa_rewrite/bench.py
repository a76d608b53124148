"""End-to-end decode and prefill throughput, original vs rewritten (``swa-rewrite bench``, CUDA only).

The caches are filled with random latents instead of prefilling 128K-token prompts: what is timed is one
engine step at a given context, through the model and the same ops the runtime uses. Decode steps run as
``Engine(cuda_graphs=True)`` runs them: each step's inputs, built on the host, are copied into the persistent
buffers of ``runtime.cuda_graphs.DecodeGraphs`` and its CUDA graph is replayed (the ops never synchronise with
the host); the timed step includes that copy.
"""

from __future__ import annotations

from typing import Callable

import torch

from .models import MLAModel
from .ops.checks import checks_disabled
from .ops.kv_cache_spec import KVCacheSpec, blocks_per_request, cache_groups, sink_blocks
from .rewrite import apply
from .runtime import MHAPlan, StepBatch, StepItem, num_cache_groups
from .runtime.cuda_graphs import DecodeGraphs
from .schedule import Schedule
from .timing import median_us, progress


def _decode_runner(m: torch.nn.Module, caches: list[torch.Tensor], batch: StepBatch, page_size: int,
                   num_groups: int, device) -> Callable[[], object]:
    """One decode step of ``batch`` (built on the host) as the engine runs it with ``cuda_graphs=True``: the
    step's inputs copied into ``DecodeGraphs``' buffers, then its CUDA graph replayed (eagerly off CUDA). The
    first call captures, with the attention backend selected then."""
    graphs = DecodeGraphs(m, caches, num_groups=num_groups, page_size=page_size,
                          max_blocks=batch.meta.block_tables.shape[2], buckets=[batch.input_ids.shape[0]],
                          device=device)
    step = lambda: graphs.run(batch)  # noqa: E731
    step()
    return step


def _fill(caches: list[torch.Tensor], latent_dim: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write random latents into every slot, through the cache write op of each cache's format."""
    device = caches[0].device if caches else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    for layer, c in enumerate(caches):
        num_slots = c.shape[0] * c.shape[1]
        for start in range(0, num_slots, 1 << 18):
            slots = torch.arange(start, min(num_slots, start + (1 << 18)), device=device)
            latent = torch.randn(slots.numel(), latent_dim, generator=g, device=device).to(dtype)
            torch.ops.swa_rewrite.write_kv_cache(latent, c, slots[None], layer, 0)


def run_bench(model: MLAModel, schedule: Schedule, args) -> None:
    """Time ``model`` (on CUDA, bf16) and its rewrite by ``schedule``; ``args`` carries the sizes of
    ``swa-rewrite bench`` (``contexts``, ``batch``, ``prefill_tokens``, ``page_size``, ``iters``,
    ``no_progress``). The CLI builds the model and the schedule: this module never imports the CLI."""
    with checks_disabled(), torch.inference_mode():   # serving mode: no host round trips for input checks
        _run_bench(model, schedule, args)


def _backends() -> list[str]:
    """The attention backends this machine runs: ours always; FlashMLA's when it imports on a Hopper GPU."""
    from .ops.flashmla_backend import flash_mla_module

    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    return ["triton"] + (["flashmla"] if hopper and flash_mla_module() is not None else [])


def _run_bench(model: MLAModel, schedule: Schedule, args) -> None:
    from .ops.flashmla_backend import attention_backend, reset_stats, stats

    cfg = model.config
    swa = apply(model, schedule)
    report = swa.swa_report
    ps, B = args.page_size, args.batch
    L, W = cfg.num_hidden_layers, schedule.window
    n_swa = len(schedule.swa_layers)
    backends = _backends()
    print(report.render(max(args.contexts)))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; decode: {B} requests x 1 token, "
          f"CUDA graph; prefill: one chunk of {args.prefill_tokens} tokens ending at the context; attention "
          f"backends: {', '.join(backends)} (FlashMLA: decode only, its dense decode needs page 64 — prefill and "
          f"other pages run our kernels)")
    rows = []
    bar = progress(args.contexts, desc="bench", disable=getattr(args, "no_progress", False))
    for ctx in bar:
        blocks = -(-(ctx + 1) // ps)
        num_blocks = B * blocks
        result = {}
        for name, m in (("original", model), ("rewritten", swa)):
            caches = m.allocate_kv_cache(num_blocks, ps)
            _fill(caches, cfg.latent_dim)
            allocated = sum(c.numel() * c.element_size() for c in caches)
            G = num_cache_groups(m)   # the rewritten model has a full and a sliding cache group
            dec = StepBatch.build([StepItem([1], ctx, list(range(b * blocks, (b + 1) * blocks)), False)
                                   for b in range(B)], ps, num_groups=G, device="cpu")
            T = min(args.prefill_tokens, ctx)
            chunk = [StepItem([1] * T, ctx - T, list(range(blocks)), True)]
            pre = StepBatch.build(chunk, ps, num_groups=G, device="cuda")
            # The same chunk in MHA mode (SPEC §13: its rows expanded per head; a full layer causal).
            pre_mha = StepBatch.build(chunk, ps, num_groups=G, mha=MHAPlan.for_model(m, 1), device="cuda")
            for backend in backends:
                bar.set_postfix_str(f"context {ctx}: {name}, {backend}")
                reset_stats()
                with attention_backend(backend):
                    # Captures this backend's kernels; each timed step copies its inputs in and replays.
                    decode_us = median_us(_decode_runner(m, caches, dec, ps, G, "cuda"), args.iters)
                    last = pre.last_token_index
                    prefill_us = median_us(lambda: m(pre.input_ids, kv_caches=caches, meta=pre.meta,
                                                     logits_indices=last), max(3, args.iters // 4))
                    mha_us = median_us(lambda: m(pre_mha.input_ids, kv_caches=caches, meta=pre_mha.meta,
                                                 logits_indices=last), max(3, args.iters // 4))
                ran = sorted(k for k, v in stats.items() if v) if backend != "triton" else []
                result[(name, backend)] = (decode_us, prefill_us, mha_us, T, allocated / (num_blocks * ps), ran)
            caches = None  # free this context's caches before the next allocation
            torch.cuda.empty_cache()
        rows.append((ctx, result))
    # Expected decode speed-up from bytes: weights are read once per step, each full layer reads B·ctx
    # cache rows of D model-dtype values, each SWA layer B·min(W, ctx) packed rows.
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bpt_full = cfg.latent_dim * 2
    bpt_swa = report.rows[next(iter(schedule.swa_layers))].cache_after[1] if n_swa else 0
    base = "flashmla" if "flashmla" in backends else "triton"
    print(f"\nspeed-ups are against the original model with {'FlashMLA' if base == 'flashmla' else 'our'} "
          f"dense decode{' (the baseline users run)' if base == 'flashmla' else ''}; prefill baseline: the original "
          f"with our dense MQA-mode prefill (FlashMLA has none); MHA: the same chunk in MHA mode (SPEC §13, full layers "
          f"causal MHA too), against the same baseline")
    print(f"{'context':>8} {'model':>10} {'backend':>9} {'decode tok/s':>13} {'speed-up':>9} {'bytes predict':>14} "
          f"{'prefill tok/s':>14} {'speed-up':>9} {'MHA tok/s':>10} {'speed-up':>9} {'cache B/token':>14}  FlashMLA ran")
    for ctx, r in rows:
        d_base, p_base = r[("original", base)][0], r[("original", "triton")][1]
        full_bytes = weights + L * B * ctx * bpt_full
        swa_bytes = weights + (L - n_swa) * B * ctx * bpt_full + n_swa * B * min(W, ctx) * bpt_swa
        for (name, backend), (d, p, pm, T, c, ran) in r.items():
            expected = 1.0 if name == "original" else full_bytes / swa_bytes
            print(f"{ctx:>8} {name:>10} {backend:>9} {B / d * 1e6:>13.0f} {d_base / d:>8.2f}x {expected:>13.2f}x "
                  f"{T / p * 1e6:>14.0f} {p_base / p:>8.2f}x {T / pm * 1e6:>10.0f} {p_base / pm:>8.2f}x "
                  f"{c:>14.0f}  {', '.join(ran) or '-'}")
    print(f"report: {report.bytes_per_token(False)} -> {report.bytes_per_token(True)} bytes/token "
          f"(weights {weights / 2**30:.2f} GiB read per step)")


# ------------------------------------------------------------------------------------------------ capacity
def capacity_plan(specs: list[KVCacheSpec], context: int, page_size: int, budget: int, *, bounded: bool = True):
    """How many requests at ``context`` (``context`` cached positions and one decode token) a cache of
    ``budget`` bytes holds for a model whose layers have ``specs``: ``(requests, blocks per request per group,
    pool blocks per group, cache groups of the layers)``. Every group's pool holds the same requests, sliding
    groups at their decode bound (docs/design.md §12)."""
    groups = cache_groups(specs)
    first = {}
    for layer, g in enumerate(groups):
        first.setdefault(g, layer)
    per_request = [blocks_per_request(specs[first[g]], context + 1, page_size, chunk=1, bounded=bounded)
                   for g in range(len(first))]
    request_bytes = sum(per_request[g] * page_size * s.bytes_per_token for s, g in zip(specs, groups))
    fit = budget // request_bytes
    return fit, per_request, [fit * b for b in per_request], groups


def capacity_tables(specs: list[KVCacheSpec], groups, per_request: list[int], requests: int, context: int,
                    page_size: int, bounded: bool = True) -> list[list[list[int]]]:
    """Each request's block table per group for a decode at position ``context``: request ``r`` owns blocks
    ``r·n … (r+1)·n - 1`` of a group holding ``n`` per request; a bounded sliding group maps only the sink pages
    and the window's, the others are ``-1``."""
    first = {}
    for layer, g in enumerate(groups):
        first.setdefault(g, layer)
    pages = -(-(context + 1) // page_size)
    needed = []
    for g, n in enumerate(per_request):
        spec = specs[first[g]]
        if spec.kind == "sliding" and bounded:
            lo = max(0, context - spec.window + 1) // page_size
            keep = sorted(set(range(min(sink_blocks(spec, page_size), pages))) | set(range(lo, pages)))
        else:
            keep = list(range(pages))
        assert len(keep) <= n, (g, len(keep), n)
        needed.append(keep)
    out = []
    for r in range(requests):
        row = []
        for g, keep in enumerate(needed):
            table = [-1] * pages
            for j, p in enumerate(keep):
                table[p] = r * per_request[g] + j
            row.append(table)
        out.append(row)
    return out


def run_capacity(model: MLAModel, schedule: Schedule, args, device: str = "cuda") -> list[dict]:
    """The largest batch of ``args.contexts``-long requests the original and the rewritten model hold in a
    KV budget of ``args.budget_gib`` GiB (caches allocated for real, filled with random latents, tables
    synthetic), and the decode step of each at that batch (a CUDA graph on CUDA). Returns one dict per
    (context, model) and prints a table."""
    with checks_disabled(), torch.inference_mode():
        return _run_capacity(model, schedule, args, device)


def _run_capacity(model: MLAModel, schedule: Schedule, args, device: str) -> list[dict]:
    swa = apply(model, schedule)
    ps, budget = args.page_size, int(args.budget_gib * 2**30)
    cuda = torch.device(device).type == "cuda"
    variants = [("original", model, True), ("rewritten", swa, True)]
    if getattr(args, "unbounded", False):
        variants.append(("rewritten, unbounded", swa, False))
    rows = []
    bar = progress(args.contexts, desc="capacity", disable=getattr(args, "no_progress", False))
    for ctx in bar:
        for name, m, bounded in variants:
            bar.set_postfix_str(f"context {ctx}: {name}")
            specs = list(m.kv_cache_spec())
            fit, per_request, counts, groups = capacity_plan(specs, ctx, ps, budget, bounded=bounded)
            if fit < 1:
                rows.append(dict(context=ctx, model=name, requests=0))
                continue
            before = torch.cuda.memory_allocated() if cuda else 0
            caches = [torch.empty(counts[g], ps, s.width, dtype=s.dtype, device=device) for s, g in zip(specs, groups)]
            allocated = (torch.cuda.memory_allocated() - before) if cuda else sum(c.nbytes for c in caches)
            _fill(caches, model.config.latent_dim, model.lm_head.weight.dtype)
            tables = capacity_tables(specs, groups, per_request, fit, ctx, ps, bounded)
            dec = StepBatch.build([StepItem([1], ctx, t, False) for t in tables], ps, num_groups=len(per_request),
                                  device="cpu")
            decode_us = median_us(_decode_runner(m, caches, dec, ps, len(per_request), device), args.iters)
            rows.append(dict(context=ctx, model=name, requests=fit, allocated_bytes=allocated,
                             blocks_per_request=per_request, decode_us=decode_us,
                             tokens_per_s=fit / decode_us * 1e6))
            caches = dec = None
            if cuda:
                torch.cuda.empty_cache()
    print(capacity_table(rows, args.budget_gib))
    return rows


def capacity_table(rows: list[dict], budget_gib: float) -> str:
    """Markdown table of ``run_capacity``'s rows, each model beside the original at the same context."""
    out = [f"KV budget {budget_gib:g} GiB; decode: every request 1 token at the context",
           "| context | model | requests | allocated GiB | capacity vs original | decode step (µs) | tokens/s | "
           "throughput vs original |", "|---|---|---|---|---|---|---|---|"]
    base = {r["context"]: r for r in rows if r["model"] == "original"}
    for r in rows:
        o = base.get(r["context"])
        if not r["requests"]:
            out.append(f"| {r['context']} | {r['model']} | 0 | - | - | - | - | - |")
            continue
        cap = r["requests"] / o["requests"] if o and o["requests"] else float("nan")
        thr = r["tokens_per_s"] / o["tokens_per_s"] if o and o["requests"] else float("nan")
        out.append(f"| {r['context']} | {r['model']} | {r['requests']} | {r['allocated_bytes'] / 2**30:.2f} | "
                   f"{cap:.2f}x | {r['decode_us']:.0f} | {r['tokens_per_s']:.0f} | {thr:.2f}x |")
    return "\n".join(out)
