"""docs/design.md §10 attention benchmark: our Triton kernels beside FlashMLA and the naive PyTorch path.

    PYTHONPATH=. python benchmarks/bench_attention.py                 # design-doc tables (docs/design.md §10), H = 128, 64, 16
    PYTHONPATH=. python benchmarks/bench_attention.py --variants      # also kernel configs + resource report
    PYTHONPATH=. python benchmarks/bench_attention.py --skip-tables --dense-variants all --prewarm 8 \
        --swa-variants all --swa-heads 128,64                         # decode kernel variants (issue 17)

Decode (one query token per request, window full, page 64): ours = ``swa_mla_attention`` (the fused op:
walks the window through the block table) and ``sparse_mla_attention`` (explicit indices, FlashMLA's
interface); FlashMLA = ``flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices=…)``; naive = gather +
dequantise + SDPA in PyTorch. Prefill (one fresh sequence of ``S`` tokens): ours = ``swa_mla_attention``
(staged path), FlashMLA = ``flash_mla_sparse_fwd`` over bf16 kv with the window's indices.

Counting (docs/design.md §10): FLOPs = 2·H·(attended tokens)·(D + R). Bytes = q + out (bf16) + lse + the cache rows
read: for decode every attended row once (656 B, as FlashMLA's tests count sparse decode); for prefill each
distinct row once. Decode times are CUDA-graph replays over 4 rotating input sets (so L2 holds none of the
next set); ``eager`` columns time the same calls launched from Python. Medians of 20 (graph) / 10 runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import triton

os.environ.setdefault("SWA_REWRITE_CHECKS", "0")   # data checks synchronise; the serving path runs without

from swa_rewrite import ops  # noqa: E402
from swa_rewrite.kernels import gathered_mla, paged_mla, sparse_mla  # noqa: E402
from swa_rewrite.ops.fp8_cache import dequantize_fp8_reference  # noqa: E402
from swa_rewrite.timing import graph_replay_us, median_us  # noqa: E402

R, P, D = 512, 64, 576
ROW = 656
PS = 64
DECODE = [(128, 128), (128, 512), (128, 2048), (64, 4096), (8, 128), (1, 128)]
PREFILL = [(4096, 128), (4096, 2048), (16384, 1024)]
SCALE = (128 + 64) ** -0.5

try:
    import flash_mla
except Exception:  # noqa: BLE001  (absent wheel or failed load: skip the peer cleanly)
    flash_mla = None


# ------------------------------------------------------------------------------------------ timing
# Both timers go through swa_rewrite.timing; these only make one call of the input sets' calls and report
# µs per call.
def _each(fns):
    def run():
        for f in fns:
            f()
    return run


def time_graph(fns, reps=20):
    """Median µs per call of ``fns`` (one call per input set) replayed as one CUDA graph."""
    return graph_replay_us(_each(fns), iters=reps) / len(fns)


def time_eager(fns, reps=10):
    """Median µs per call of ``fns`` launched from Python (CUDA events, one warm-up round)."""
    return median_us(_each(fns), iters=reps, warmup=1, device="cuda") / len(fns)


def try_time(timer, fns, **kw):
    try:
        return timer(fns, **kw)
    except Exception as e:  # noqa: BLE001  (a peer that does not support a shape reports n/a)
        print(f"    [skip] {type(e).__name__}: {str(e).splitlines()[0][:140]}", file=sys.stderr)
        return float("nan")


# ------------------------------------------------------------------------------------------ inputs
def random_packed_cache(num_blocks, device="cuda"):
    """Valid packed rows: random finite e4m3 codes, power-of-two scales, random bf16 rope."""
    cache = torch.empty(num_blocks, PS, ROW, dtype=torch.uint8, device=device)
    n = num_blocks * PS
    flat = cache.view(n, ROW)
    code = torch.randint(0, 0x7F, (n, R), dtype=torch.uint8, device=device)          # 0x7F would be NaN
    flat[:, :R] = code | (torch.randint(0, 2, (n, R), dtype=torch.uint8, device=device) << 7)
    scales = torch.exp2(torch.randint(-9, -5, (n, R // 128), device=device).float())
    flat[:, R:R + 16] = scales.view(torch.uint8)
    flat[:, R + 16:] = torch.randn(n, P, device=device).to(torch.bfloat16).view(torch.uint8)
    return cache


def decode_sets(B, W, H, num_sets=4):
    """``num_sets`` decode batches of ``B`` requests whose windows are full, over one shared cache."""
    g = torch.Generator().manual_seed(B * 7919 + W)
    lens = [torch.randint(W - 1, W + 700, (B,), generator=g) for _ in range(num_sets)]
    blocks = [((L + 1 + PS - 1) // PS) for L in lens]
    total = int(sum(int(b.sum()) for b in blocks))
    cache = random_packed_cache(total)
    perm = torch.randperm(total, generator=g)
    sets, used = [], 0
    for L, nb in zip(lens, blocks):
        bt = torch.full((B, int(nb.max())), -1, dtype=torch.int32)
        for b in range(B):
            bt[b, :int(nb[b])] = perm[used:used + int(nb[b])].to(torch.int32)
            used += int(nb[b])
        dec = L.to(torch.int32)
        meta = dict(block_tables=bt, cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32),
                    seq_lens_encoder=torch.zeros(B, dtype=torch.int32), seq_lens_decoder=dec,
                    batch_id_per_token=torch.arange(B, dtype=torch.int32))
        meta = {k: v.cuda() for k, v in meta.items()}
        idx = ops.swa_indexer(*meta.values(), window=W, page_size=PS)            # [B, 1, W]
        q = torch.randn(B, H, D, device="cuda").to(torch.bfloat16)
        sets.append(dict(q=q, meta=meta, idx=idx))
    return cache, sets


def prefill_set(S, W, H):
    nb = (S + PS - 1) // PS
    cache = random_packed_cache(nb)
    bt = torch.randperm(nb, dtype=torch.int32)[None].cuda()
    meta = dict(block_tables=bt, cu_seqlens_q=torch.tensor([0, S], dtype=torch.int32, device="cuda"),
                seq_lens_encoder=torch.tensor([S], dtype=torch.int32, device="cuda"),
                seq_lens_decoder=torch.zeros(1, dtype=torch.int32, device="cuda"),
                batch_id_per_token=torch.zeros(S, dtype=torch.int32, device="cuda"))
    q = torch.randn(S, H, D, device="cuda").to(torch.bfloat16)
    return cache, dict(q=q, meta=meta)


# --------------------------------------------------------------------------------------- the paths
def ours_swa(cache, s, W, config=None, staged=None, stats=None):
    m = s["meta"]
    if config is None and staged is None and stats is None:
        return lambda: ops.swa_mla_attention(s["q"], cache, *m.values(), SCALE, window=W, rope_dim=P)
    return lambda: sparse_mla.swa_attention_fwd(s["q"], cache, m["block_tables"], m["cu_seqlens_q"],
                                                m["seq_lens_decoder"], m["batch_id_per_token"], SCALE, P, W,
                                                config=config, staged=staged, stats=stats)


def ours_sparse(cache, s, config=None, stats=None):
    if config is None and stats is None:
        return lambda: ops.sparse_mla_attention(s["q"], cache, s["idx"], SCALE, rope_dim=P)
    return lambda: sparse_mla.sparse_mla_attention_fwd(s["q"], cache, s["idx"], SCALE, P, config=config,
                                                       stats=stats)


def flashmla_decode(cache, s):
    meta = flash_mla.get_mla_metadata()[0]
    q4 = s["q"][:, None]                                                       # [B, 1, H, D]
    c4 = cache.view(cache.shape[0], PS, 1, ROW)
    return lambda: flash_mla.flash_mla_with_kvcache(q4, c4, None, None, R, meta, softmax_scale=SCALE,
                                                    is_fp8_kvcache=True, indices=s["idx"])


def naive_decode(cache, s):
    """Gather + dequantise + SDPA, all PyTorch (the path a model without these kernels would take)."""
    def run():
        idx = s["idx"][:, 0].long()                                           # [B, W]
        rows = cache.view(-1, ROW)[idx.clamp(min=0)]                          # [B, W, 656]
        kv = dequantize_fp8_reference(rows, P)                                # [B, W, 576] bf16
        mask = (idx >= 0)[:, None, None, :]                                   # [B, 1, 1, W]
        # MQA: the H heads share one key set, so they are the query rows of one SDPA "head".
        q = s["q"][:, None]                                                   # [B, 1, H, D]
        k = kv[:, None]                                                       # [B, 1, W, D]
        return torch.nn.functional.scaled_dot_product_attention(q, k, k[..., :R], attn_mask=mask, scale=SCALE)
    return run


def flashmla_prefill(cache, s, W):
    S = s["q"].shape[0]
    bt = s["meta"]["block_tables"][0].long()
    pos = torch.arange(S, device="cuda")
    kv = ops.dequantize_fp8_cache(cache.view(-1, ROW)[bt[pos // PS] * PS + pos % PS], rope_dim=P)  # [S, D]
    K = (W + 127) // 128 * 128
    k = pos[:, None] - W + 1 + torch.arange(K, device="cuda")[None, :]
    idx = torch.where((k >= 0) & (k <= pos[:, None]), k, -1).to(torch.int32)[:, None, :]
    kv3 = kv[:, None, :].contiguous()
    return lambda: flash_mla.flash_mla_sparse_fwd(s["q"], kv3, idx, SCALE)


def ours_dense_paged(cache_bf16, s):
    m = s["meta"]
    return lambda: ops.paged_mla_attention(s["q"], cache_bf16, *m.values(), SCALE, rope_dim=P)


# ------------------------------------------------------------------------------------------ report
def decode_counts(B, W, H):
    flops = 2 * H * B * W * (D + R)
    nbytes = B * H * D * 2 + B * W * ROW + B * H * R * 2 + B * H * 4
    return flops, nbytes


def prefill_counts(S, W, H):
    attended = S * (S + 1) // 2 if S <= W else W * (W + 1) // 2 + (S - W) * W
    flops = 2 * H * attended * (D + R)
    nbytes = S * H * D * 2 + S * ROW + S * H * R * 2 + S * H * 4
    return flops, nbytes


def fmt(us, flops, nbytes):
    if not math.isfinite(us):
        return "      n/a                 "
    return f"{us:9.1f} {flops / us / 1e6:6.0f} {nbytes / us / 1e3:6.0f}"


def rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def resource_line(name, compiled):
    if compiled is None:
        return f"{name}: (no compiled kernel)"
    md = compiled.metadata
    shared = getattr(md, "shared", None)
    return (f"{name}: regs={compiled.n_regs} spills={compiled.n_spills} shared={shared} "
            f"warps={getattr(md, 'num_warps', '?')} stages={getattr(md, 'num_stages', '?')}")


# Kernel configs compared in the variants section and, with --table-variants, in the tables. (The
# hand-pipelined `prefetch` loop and the token-major grid of run 3 are in git history, commit 1ea1d34.)
VARIANTS = {
    "base": dict(block_n=64, num_stages=2),
    "s1": dict(block_n=64, num_stages=1),
    "n32": dict(block_n=32, num_stages=2),
    "n32s3": dict(block_n=32, num_stages=3),
    "untiled": dict(block_n=64, num_stages=2, block_t=1),   # staged prefill, few heads: one token per program
}


def best_of(make, timer, names, **kw):
    """(µs, name) of the fastest of the default config and the named VARIANTS for one shape."""
    best = (timer(make(None), **kw), "default")
    for name in names:
        t = try_time(timer, make(VARIANTS[name]), **kw)
        if t < best[0]:
            best = (t, name)
    return best


def bench_decode(heads, log, rows_out, names=()):
    print("\n## Decode (µs | TFLOP/s | GB/s); ratio = ours / FlashMLA, both CUDA-graph replays")
    print(f"{'H':>3} {'B':>4} {'W':>5} | {'ours swa (graph)':>24} {'config':>8} | {'ours swa eager':>9} | "
          f"{'ours indices (graph)':>24} | {'FlashMLA (graph)':>24} | {'FlashMLA eager':>9} | "
          f"{'naive eager':>11} | ratio  | err vs FlashMLA")
    for H in heads:
        for B, W in DECODE:
            cache, sets = decode_sets(B, W, H)
            flops, nbytes = decode_counts(B, W, H)
            swa = [ours_swa(cache, s, W) for s in sets]
            t_swa, cfg_name = best_of(lambda c: [ours_swa(cache, s, W, config=c, staged=False) for s in sets],
                                      time_graph, names)
            t_swa_e = time_eager(swa)
            t_idx = time_graph([ours_sparse(cache, s) for s in sets])
            t_fm = t_fm_e = float("nan")
            err = float("nan")
            if flash_mla is not None:
                fm = [flashmla_decode(cache, s) for s in sets]
                t_fm = try_time(time_graph, fm)
                t_fm_e = try_time(time_eager, fm)
                if math.isfinite(t_fm):
                    err = rel_err(swa[0]()[0], fm[0]()[0][:, 0])
            t_nv = try_time(time_eager, [naive_decode(cache, s) for s in sets[:2]], reps=3)
            ratio = t_swa / t_fm if math.isfinite(t_fm) else float("nan")
            row = dict(kind="decode", H=H, B=B, W=W, ours_graph=t_swa, config=cfg_name, ours_eager=t_swa_e,
                       ours_indices=t_idx, flashmla_graph=t_fm, flashmla_eager=t_fm_e, naive=t_nv, ratio=ratio,
                       err=err, flops=flops, bytes=nbytes)
            rows_out.append(row)
            log.write(json.dumps(row) + "\n")
            print(f"{H:>3} {B:>4} {W:>5} | {fmt(t_swa, flops, nbytes)} {cfg_name:>8} | {t_swa_e:9.1f} | "
                  f"{fmt(t_idx, flops, nbytes)} | {fmt(t_fm, flops, nbytes)} | {t_fm_e:9.1f} | {t_nv:11.1f} | "
                  f"{ratio:5.2f} | {err:.1e}", flush=True)
            del cache, sets
            torch.cuda.empty_cache()


def bench_prefill(heads, log, rows_out, direct=True, names=()):
    print("\n## SWA prefill, one sequence (µs | TFLOP/s | GB/s); ratio = ours staged / FlashMLA")
    print(f"{'H':>3} {'S':>6} {'W':>5} | {'ours staged':>24} {'config':>8} | {'ours direct (fp8 in regs)':>24} | "
          f"{'FlashMLA sparse prefill':>24} | ratio  | err vs FlashMLA")
    for H in heads:
        for S, W in PREFILL:
            cache, s = prefill_set(S, W, H)
            flops, nbytes = prefill_counts(S, W, H)
            staged = ours_swa(cache, s, W)
            t_st, cfg_name = best_of(lambda c: [ours_swa(cache, s, W, config=c, staged=True)], time_eager, names,
                                     reps=5)
            t_dir = time_eager([ours_swa(cache, s, W, staged=False)], reps=3) if direct else float("nan")
            t_fm, err = float("nan"), float("nan")
            if flash_mla is not None:
                try:
                    fm = flashmla_prefill(cache, s, W)
                    t_fm = try_time(time_eager, [fm], reps=5)
                    if math.isfinite(t_fm):
                        err = rel_err(staged()[0], fm()[0])
                except Exception as e:  # noqa: BLE001
                    print(f"    [skip FlashMLA] {type(e).__name__}: {e}", file=sys.stderr)
            ratio = t_st / t_fm if math.isfinite(t_fm) else float("nan")
            row = dict(kind="prefill", H=H, S=S, W=W, ours_staged=t_st, config=cfg_name, ours_direct=t_dir,
                       flashmla=t_fm, ratio=ratio, err=err, flops=flops, bytes=nbytes)
            rows_out.append(row)
            log.write(json.dumps(row) + "\n")
            print(f"{H:>3} {S:>6} {W:>5} | {fmt(t_st, flops, nbytes)} {cfg_name:>8} | {fmt(t_dir, flops, nbytes)} | "
                  f"{fmt(t_fm, flops, nbytes)} | {ratio:5.2f} | {err:.1e}", flush=True)
            del cache, s
            torch.cuda.empty_cache()


def bench_variants(log, names):
    """Kernel configs on representative shapes, with the compiler's resource report for each."""
    print("\n## Variants (µs; decode = graph replays, prefill = eager)")
    cfgs = {n: VARIANTS[n] for n in names}

    def run(label, make, timer, **kw):
        for name, cfg in cfgs.items():
            stats = {}
            try:
                make(cfg, stats)[0]()
                t = timer(make(cfg, None), **kw)
            except Exception as e:  # noqa: BLE001
                print(f"  {label} {name}: failed {type(e).__name__}: {str(e)[:160]}")
                continue
            line = resource_line("attn", stats.get("attention"))
            print(f"  {label:<26} {name:<13} splits={stats['plan']['splits']:<3}: {t:8.1f} µs  [{line}]", flush=True)
            log.write(json.dumps(dict(kind="variant", label=label, name=name, cfg=cfg, us=t, res=line)) + "\n")

    for B, W in [(128, 128), (128, 2048), (8, 2048)]:
        cache, sets = decode_sets(B, W, 128)
        run(f"swa decode B={B} W={W}",
            lambda cfg, st: [ours_swa(cache, s, W, config=cfg, staged=False, stats=st) for s in sets], time_graph)
        if B == 128 and W == 128:
            run(f"indices decode B={B} W={W}",
                lambda cfg, st: [ours_sparse(cache, s, config=cfg, stats=st) for s in sets], time_graph)
        if W == 128:
            dense = ops.dequantize_fp8_cache(cache, rope_dim=P)
            run(f"dense decode B={B} ctx~{W + 350}",
                lambda cfg, st: [lambda s=s: gathered_mla.paged_attention_fwd(
                    s["q"], dense, s["meta"]["block_tables"], s["meta"]["cu_seqlens_q"],
                    s["meta"]["seq_lens_decoder"], s["meta"]["batch_id_per_token"], SCALE, P, window=0, fp8=False, config=cfg,
                    stats=st) for s in sets], time_graph)
            del dense
        del cache, sets
    for H, S, W in [(128, 4096, 128), (128, 4096, 2048), (16, 4096, 128), (16, 4096, 2048), (16, 16384, 1024)]:
        cache, s = prefill_set(S, W, H)
        run(f"prefill H={H} S={S} W={W}",
            lambda cfg, st: [ours_swa(cache, s, W, config=cfg, staged=True, stats=st)], time_eager, reps=3)
        del cache, s
    torch.cuda.empty_cache()


def bench_dequant_cost(log):
    """The same windowed decode over the bf16 cache (no dequantisation) beside the FP8 one."""
    print("\n## FP8 (dequantise in registers) vs bf16 cache, same gather, decode H=128 (graph µs)")
    for B, W in [(128, 128), (128, 2048)]:
        cache, sets = decode_sets(B, W, 128)
        dense = ops.dequantize_fp8_cache(cache, rope_dim=P)                       # [NB, 64, 576] bf16
        fp8 = time_graph([ours_swa(cache, s, W, staged=False) for s in sets])
        bf16 = time_graph([lambda s=s: gathered_mla.paged_attention_fwd(
            s["q"], dense, s["meta"]["block_tables"], s["meta"]["cu_seqlens_q"], s["meta"]["seq_lens_decoder"],
            s["meta"]["batch_id_per_token"], SCALE, P, window=W, fp8=False) for s in sets])
        print(f"  B={B:>3} W={W:>4}: fp8 {fp8:8.1f}  bf16 {bf16:8.1f}  ratio {fp8 / bf16:.2f}", flush=True)
        log.write(json.dumps(dict(kind="dequant-cost", B=B, W=W, fp8=fp8, bf16=bf16)) + "\n")
        del cache, sets, dense
    torch.cuda.empty_cache()


def bench_dense(log):
    """Full-attention (unrewritten) layers: our Triton paged kernel over the bf16 cache vs FlashMLA dense."""
    print("\n## Dense paged decode over the bf16 cache, H=128 (graph µs | TFLOP/s | GB/s)")
    for B, ctx in [(128, 1024), (128, 4096), (8, 4096)]:
        cache8, sets = decode_sets(B, ctx, 128)
        cache = ops.dequantize_fp8_cache(cache8, rope_dim=P)
        del cache8
        flops = 2 * 128 * B * ctx * (D + R)
        ours = [ours_dense_paged(cache, s) for s in sets]
        t_ours = time_graph(ours)
        t_fm = float("nan")
        if flash_mla is not None:
            def fm_call(s):
                meta = flash_mla.get_mla_metadata()[0]
                lens = s["meta"]["seq_lens_decoder"] + 1
                c4 = cache.view(cache.shape[0], PS, 1, D)
                return lambda: flash_mla.flash_mla_with_kvcache(s["q"][:, None], c4, s["meta"]["block_tables"], lens,
                                                                R, meta, softmax_scale=SCALE, causal=True)
            t_fm = try_time(time_graph, [fm_call(s) for s in sets])
        ctx_mean = float(sum((s["meta"]["seq_lens_decoder"] + 1).float().mean() for s in sets) / len(sets))
        flops = 2 * 128 * B * ctx_mean * (D + R)
        nbytes = B * ctx_mean * D * 2 + B * 128 * (D + R) * 2
        print(f"  B={B:>3} ctx≈{ctx_mean:6.0f}: ours {fmt(t_ours, flops, nbytes)} | FlashMLA {fmt(t_fm, flops, nbytes)}"
              f" | ratio {t_ours / t_fm:.2f}", flush=True)
        log.write(json.dumps(dict(kind="dense-decode", B=B, ctx=ctx_mean, ours=t_ours, flashmla=t_fm)) + "\n")
        del cache, sets
    torch.cuda.empty_cache()


# Dense decode kernel settings compared by --dense-variants (keys of kernels.paged_mla.PAGED_DECODE_CONFIG;
# reasons and outcomes in NOTES-attention.md, issue 17). "generic" is the issue-4 gathered kernel.
DENSE_VARIANTS = {
    "generic": dict(kernel="generic"),
    "ids": dict(kernel="tiles", tma=False),
    "tma": dict(kernel="tiles", tma=True),
    "tma-chunk": dict(kernel="tiles", tma=True, chunk=64),
    "n32s3-tma-chunk": dict(kernel="tiles", tma=True, chunk=64, block_n=32, num_stages=3),
    "n32s4-tma-chunk": dict(kernel="tiles", tma=True, chunk=64, block_n=32, num_stages=4),
    "n32s4-chunk": dict(kernel="tiles", chunk=64, block_n=32, num_stages=4, tma=False),
    # 64-key tiles with dedup need ~232 KB of shared memory on sm_90 (local report): not offered.
    "n32s3-tma-chunk-dedup": dict(kernel="tiles", tma=True, chunk=64, block_n=32, num_stages=3, dedup=True),
    "n32s4-tma-chunk-dedup": dict(kernel="tiles", tma=True, chunk=64, block_n=32, num_stages=4, dedup=True),
    # persistent grids: 1 or 2 programs per SM looping over (token, head block, split) items (issue 17)
    "tma-persistent1": dict(kernel="tiles", tma=True, persistent=1),
    "tma-persistent2": dict(kernel="tiles", tma=True, persistent=2),
    # Gluon (kernels/gluon_mla.py): S computed once, O split across the warpgroups, a TMA ring; loads issued
    # by the compute warps or by a producer warp (warp-specialised)
    "gluon": dict(kernel="gluon", warp_specialize=False),
    "gluon-ws": dict(kernel="gluon", warp_specialize=True),
    "gluon-ws-pipe": dict(kernel="gluon", warp_specialize=True, pipeline=True),
    "gluon-ws-s1": dict(kernel="gluon", warp_specialize=True, min_tiles_per_split=1),
    # FlashMLA's schedule: two compute warpgroups own alternate tiles' S (64-wide), exchange P and (m, l)
    "gluon-pp": dict(kernel="gluon", pingpong=True),
    "gluon-pp-overlap": dict(kernel="gluon", pingpong="overlap"),   # + the other's P·V beside the own softmax
}
DENSE_SHAPES = [(128, 1024), (128, 4096), (8, 4096)]
# SWA decode (FP8 cache) settings compared by --swa-variants (keys of kernels.paged_mla.SWA_DECODE_CONFIG).
SWA_VARIANTS = {
    "generic": dict(kernel="generic"),
    "ids": dict(kernel="tiles", tma=False),
    "tma": dict(kernel="tiles", tma=True),
    "bf16": dict(kernel="tiles", bf16_dequant=True, tma=False),
    "tma-bf16": dict(kernel="tiles", tma=True, bf16_dequant=True),
    "n32-tma-bf16": dict(kernel="tiles", tma=True, bf16_dequant=True, block_n=32),
    "tma-persistent1": dict(kernel="tiles", tma=True, persistent=1),
    # Gluon (kernels/gluon_mla.py): a producer warp stages FP8 rows by TMA, the compute warps dequantise them
    "gluon": dict(kernel="gluon"),
    "gluon-s1": dict(kernel="gluon", min_tiles_per_split=1),     # more splits for few tokens
}


def dense_call(cache, s, config=None, stats=None):
    m = s["meta"]
    return lambda: paged_mla.paged_mla_attention_fwd(s["q"], cache, m["block_tables"], m["cu_seqlens_q"],
                                                     m["seq_lens_decoder"], m["batch_id_per_token"], SCALE, P,
                                                     config=config, stats=stats)


def flashmla_dense(cache, s):
    meta = flash_mla.get_mla_metadata()[0]
    lens = s["meta"]["seq_lens_decoder"] + 1
    c4 = cache.view(cache.shape[0], PS, 1, D)
    return lambda: flash_mla.flash_mla_with_kvcache(s["q"][:, None], c4, s["meta"]["block_tables"], lens, R, meta,
                                                    softmax_scale=SCALE, causal=True)


def dense_inputs(B, ctx, H):
    cache8, sets = decode_sets(B, ctx, H)
    cache = ops.dequantize_fp8_cache(cache8, rope_dim=P)                     # [NB, 64, 576] bf16
    del cache8
    ctx_mean = float(sum((s["meta"]["seq_lens_decoder"] + 1).float().mean() for s in sets) / len(sets))
    return cache, sets, ctx_mean


def warm_swa(names, heads):
    """Compile (first launch of) each named SWA variant on every decode shape: a pre-warm worker."""
    for H in heads:
        for B, W in DECODE:
            cache, sets = decode_sets(B, W, H)
            for name in names:
                try:
                    for s in sets:
                        ours_swa(cache, s, W, config=SWA_VARIANTS[name], staged=False)()
                except Exception as e:  # noqa: BLE001
                    print(f"  [warm {name}] {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            torch.cuda.synchronize()
            del cache, sets
            torch.cuda.empty_cache()


def bench_swa_variants(log, names, heads):
    """SWA decode over the packed FP8 cache: each kernel variant beside FlashMLA's sparse FP8 decode on the
    same windows (graph replays), with the compiler's resource report and the error against FlashMLA."""
    print("\n## SWA decode variants, FP8 cache (graph µs | TFLOP/s | GB/s); ratio = variant / FlashMLA")
    for H in heads:
        for B, W in DECODE:
            cache, sets = decode_sets(B, W, H)
            flops, nbytes = decode_counts(B, W, H)
            t_fm, ref = float("nan"), None
            if flash_mla is not None and H in (64, 128):
                fm = [flashmla_decode(cache, s) for s in sets]
                t_fm = try_time(time_graph, fm)
                if math.isfinite(t_fm):
                    ref = fm[0]()[0][:, 0]
            elif flash_mla is not None and H < 64:      # a shard: FlashMLA pads the heads to 64
                cache64, sets64 = decode_sets(B, W, 64)
                t_fm = try_time(time_graph, [flashmla_decode(cache64, s) for s in sets64])
                del cache64, sets64
            print(f"  H={H} B={B} W={W}: FlashMLA {fmt(t_fm, flops, nbytes)}", flush=True)
            for name in names:
                stats = {}
                try:
                    o = ours_swa(cache, sets[0], W, config=SWA_VARIANTS[name], staged=False, stats=stats)()[0]
                    if ref is None:
                        ref = o.clone()
                    err = rel_err(o, ref)
                    t = time_graph([ours_swa(cache, s, W, config=SWA_VARIANTS[name], staged=False) for s in sets])
                except Exception as e:  # noqa: BLE001
                    print(f"    {name:<16} failed {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                line = resource_line("attn", stats.get("attention"))
                ratio = t / t_fm if math.isfinite(t_fm) else float("nan")
                print(f"    {name:<16} {fmt(t, flops, nbytes)} ratio {ratio:5.2f} err {err:.1e} "
                      f"splits={stats['plan']['splits']} [{line}]", flush=True)
                log.write(json.dumps(dict(kind="swa-variant", H=H, B=B, W=W, name=name, cfg=SWA_VARIANTS[name],
                                          us=t, flashmla=t_fm, err=err, res=line)) + "\n")
            del cache, sets
            torch.cuda.empty_cache()


def warm_dense(names, heads):
    """Compile (first launch of) each named variant on every benchmarked shape: a pre-warm worker."""
    for H in heads:
        for B, ctx in DENSE_SHAPES:
            cache, sets, _ = dense_inputs(B, ctx, H)
            for name in names:
                try:
                    for s in sets:
                        dense_call(cache, s, DENSE_VARIANTS[name])()
                except Exception as e:  # noqa: BLE001
                    print(f"  [warm {name}] {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            torch.cuda.synchronize()
            del cache, sets
            torch.cuda.empty_cache()


def prewarm(names, heads, workers):
    """Triton compiles on first launch, one kernel at a time; compile the variants in ``workers`` processes
    first (the on-disk Triton cache is shared), so the timed process finds them compiled."""
    import subprocess

    groups = [names[i::workers] for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, __file__, "--warm-dense", ",".join(g), "--heads",
                               ",".join(map(str, heads))]) for g in groups if g]
    for proc in procs:
        proc.wait()


def bench_dense_variants(log, names, heads):
    """Dense paged decode over the bf16 cache: each kernel variant beside FlashMLA's dense decode, graph
    replays, with the compiler's resource report and the error against FlashMLA (or the generic kernel)."""
    print("\n## Dense paged decode variants (graph µs | TFLOP/s | GB/s); ratio = variant / FlashMLA")
    for H in heads:
        for B, ctx in DENSE_SHAPES:
            cache, sets, ctx_mean = dense_inputs(B, ctx, H)
            flops = 2 * H * B * ctx_mean * (D + R)
            nbytes = B * ctx_mean * D * 2 + B * H * (D + R) * 2
            t_fm, ref = float("nan"), None
            if flash_mla is not None and H in (64, 128):
                fm = [flashmla_dense(cache, s) for s in sets]
                t_fm = try_time(time_graph, fm)
                if math.isfinite(t_fm):
                    ref = fm[0]()[0][:, 0]
            elif flash_mla is not None and H < 64:      # a shard: FlashMLA pads the heads to 64 (issue 17's peer)
                cache64, sets64, _ = dense_inputs(B, ctx, 64)
                t_fm = try_time(time_graph, [flashmla_dense(cache64, s) for s in sets64])
                del cache64, sets64
            print(f"  H={H} B={B} ctx≈{ctx_mean:.0f}: FlashMLA {fmt(t_fm, flops, nbytes)}", flush=True)
            for name in names:
                stats = {}
                try:
                    o = dense_call(cache, sets[0], DENSE_VARIANTS[name], stats)()[0]
                    if ref is None:
                        ref = o.clone()
                    err = rel_err(o, ref)
                    t = time_graph([dense_call(cache, s, DENSE_VARIANTS[name]) for s in sets])
                except Exception as e:  # noqa: BLE001
                    print(f"    {name:<24} failed {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                line = resource_line("attn", stats.get("attention"))
                ratio = t / t_fm if math.isfinite(t_fm) else float("nan")
                print(f"    {name:<24} {fmt(t, flops, nbytes)} ratio {ratio:5.2f} err {err:.1e} "
                      f"splits={stats['plan']['splits']} [{line}]", flush=True)
                log.write(json.dumps(dict(kind="dense-variant", H=H, B=B, ctx=ctx_mean, name=name,
                                          cfg=DENSE_VARIANTS[name], us=t, flashmla=t_fm, err=err, res=line)) + "\n")
            del cache, sets
            torch.cuda.empty_cache()


def bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = time_eager([lambda: y.copy_(x)], reps=5)
    return 2 * x.numel() / t / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="128,64,16")
    ap.add_argument("--variants", default="", help="comma-separated names from VARIANTS (or 'all')")
    ap.add_argument("--skip-tables", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true", help="decode tables only")
    ap.add_argument("--no-direct-prefill", action="store_true")
    ap.add_argument("--extras", action="store_true", help="dequantisation cost and dense (full-layer) decode")
    ap.add_argument("--table-variants", default="", help="VARIANTS also timed in the tables (best one reported)")
    ap.add_argument("--dense-variants", default="", help="comma-separated names from DENSE_VARIANTS (or 'all')")
    ap.add_argument("--dense-heads", default="128", help="head counts for --dense-variants")
    ap.add_argument("--prewarm", type=int, default=0, help="compile the dense variants in N processes first")
    ap.add_argument("--swa-variants", default="", help="comma-separated names from SWA_VARIANTS (or 'all')")
    ap.add_argument("--swa-heads", default="128", help="head counts for --swa-variants")
    ap.add_argument("--warm-dense", default="", help=argparse.SUPPRESS)
    ap.add_argument("--warm-swa", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    heads = [int(h) for h in args.heads.split(",")]
    if args.warm_dense:
        warm_dense(args.warm_dense.split(","), heads)
        return
    if args.warm_swa:
        warm_swa(args.warm_swa.split(","), heads)
        return
    swa_names = (list(SWA_VARIANTS) if args.swa_variants == "all"
                 else [n for n in args.swa_variants.split(",") if n])
    swa_heads = [int(h) for h in args.swa_heads.split(",")]
    dense_names = (list(DENSE_VARIANTS) if args.dense_variants == "all"
                   else [n for n in args.dense_variants.split(",") if n])
    dense_heads = [int(h) for h in args.dense_heads.split(",")]
    if dense_names and args.prewarm:
        prewarm(dense_names, dense_heads, args.prewarm)
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"FlashMLA {'present' if flash_mla is not None else 'absent'}; D2D copy {bandwidth():.0f} GB/s")
    rows = []
    with open(os.path.join(args.out, "bench_attention.jsonl"), "w") as log:
        if dense_names:
            bench_dense_variants(log, dense_names, dense_heads)
        if swa_names:
            bench_swa_variants(log, swa_names, swa_heads)
        if args.variants:
            bench_variants(log, list(VARIANTS) if args.variants == "all" else args.variants.split(","))
        if args.extras:
            bench_dequant_cost(log)
            bench_dense(log)
        if not args.skip_tables:
            names = [n for n in args.table_variants.split(",") if n]
            bench_decode(heads, log, rows, names)
            if not args.skip_prefill:
                bench_prefill(heads, log, rows, direct=not args.no_direct_prefill, names=names)


if __name__ == "__main__":
    main()
