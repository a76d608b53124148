"""MHA-mode vs MQA-mode sliding-window prefill (issue 18, SPEC §10, §13), beside FlashMLA's sparse prefill.

    PYTHONPATH=. python benchmarks/bench_mha_prefill.py --quick      # the issue's three shapes, H = 128, 64, 16
    PYTHONPATH=. python benchmarks/bench_mha_prefill.py              # + the sweep chunk × W × H and the rule
    (FlashMLA: carry `.whl` and install it as benchmarks/gpu_session.sh does; skipped cleanly when absent.)

Per case (H heads, window W, chunk length C, B requests of C tokens each with ``hist`` positions cached before the
chunk; page 64, packed FP8 cache, DeepSeek-V3 dims R=512, P=64, N=V=128, bf16, no sinks):

- ``MHA`` — our whole MHA block, ``kernels.mha_window.mha_swa_prefill_fwd``: gather + dequantise the rows
  (``plan_mha_rows``: ``C + min(hist, W-1)`` per request), expansion GEMM (cuBLAS), window flash attention; the best
  of the attention-kernel configs (``--configs``), with its parts timed alone beside it (gather | GEMM | attention);
- ``MQA op`` — today's ``ops.swa_mla_attention`` (staged prefill kernel) on ``q_abs``, alone; ``MQA block`` — what
  the core op runs: absorb BMM (``q_nope @ W_UK``, ``ops.mla_attention.absorb_query``) + that op + un-absorb
  BMM (``o_lat @ W_UVᵀ``, ``unabsorb_output``);
- ``FlashMLA`` — ``flash_mla_sparse_fwd(q_abs [T,H,576], kv [rows,1,576] bf16, idx [T,1,K], scale)`` over the same
  dequantised rows (its kernel alone, as RESULTS.md compares); H < 64 runs padded to 64 heads (engines pad shards);
- ratios ``MHA / FlashMLA`` (SPEC §10 goal: ≤ 0.6 at W ≥ 1024, ≤ 0.9 at W = 128, H = 128) and
  ``MHA / MQA block``;
  ``err``: ‖MHA − MQA block‖ / ‖MQA block‖ on the same inputs (both bf16).

FLOPs (docs/design.md §10): attention ``2·H·attended·(N+P+V)`` (MQA: ``·(D+R)``), expansion
``2·rows·R·H·(N+V)``;
MQA's BMMs ``4·T·H·N·R``. Prediction before measuring: per query and head MHA pays ``2·R·(N+V) = 262K`` FLOPs of
expansion per *row* (``C + W - 1`` rows per chunk) plus ``640·W``; MQA pays the same 262K per *query* in its BMMs plus
``2176·W``. At equal efficiency MHA wins once ``C ≳ 262144·(W-1) / (1536·W) ≈ 171`` tokens, for any W.

The sweep ends with **the rule**: for each (H, W), the shortest chunk length at which MHA beats the MQA block (and the
MQA op alone). Times (``--timing``): ``graph`` (the default) — medians of CUDA-graph replays
(``swa_rewrite.timing.graph_replay_us``, checks off), the device time of each path, as the decode benchmarks time
theirs; ``events`` — medians of CUDA-event timings of eager calls (``median_us``), which also count the host's
launch time wherever the device waits for it: our block is several Python launches, FlashMLA's one, so short
paths (the gather alone: ~40 µs whatever its rows) measure the host. Full rows to ``$OUT/bench_mha_prefill.jsonl``.
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
from swa_rewrite.kernels import mha_window  # noqa: E402
from swa_rewrite.ops.mha_prefill import plan_mha_rows  # noqa: E402
from swa_rewrite.ops.mla_attention import absorb_query, unabsorb_output  # noqa: E402
from swa_rewrite.ops.checks import checks_disabled  # noqa: E402
from swa_rewrite.timing import graph_replay_us, median_us  # noqa: E402

R, P, N, V = 512, 64, 128, 128
D = R + P
ROW = 656
PS = 64
SCALE = (N + P) ** -0.5
ISSUE_SHAPES = [(4096, 128), (4096, 2048), (16384, 1024)]          # fresh sequences (S, W), as RESULTS.md
CONFIGS = {   # attention-kernel configs (kernels.mha_window.DEFAULT_CONFIG is "base")
    "base": dict(kernel="triton", block_m=64, block_n=64, num_warps=4, num_stages=2),
    "s3": dict(kernel="triton", block_m=64, block_n=64, num_warps=4, num_stages=3),
    "n32s3": dict(kernel="triton", block_m=64, block_n=32, num_warps=4, num_stages=3),
    "n128": dict(kernel="triton", block_m=64, block_n=128, num_warps=4, num_stages=2),
    "m128w8": dict(kernel="triton", block_m=128, block_n=64, num_warps=8, num_stages=2),       # spills (sm_90 report)
    "m128n32w8": dict(kernel="triton", block_m=128, block_n=32, num_warps=8, num_stages=3),    # spills (sm_90 report)
    "ptr": dict(kernel="triton", block_m=64, block_n=64, num_warps=4, num_stages=2, tma=False),  # pointer loads, no TMA
    # Persistent plain Triton: a few programs per SM loop over (head, query tile) items, one masked key loop each.
    "pers2": dict(kernel="triton", block_m=64, block_n=64, num_warps=4, num_stages=2, persistent=2),
    "pers2s1": dict(kernel="triton", block_m=64, block_n=64, num_warps=4, num_stages=1, persistent=2),
    # Gluon (kernels/gluon_mha.py): persistent, warp-specialised, 128-row items over two warpgroups.
    "gluon": dict(kernel="gluon"),
    "gluon-v0": dict(kernel="gluon", prefetch=False, tma_out=False),   # as measured in session 9 (less its math)
    "gluon-nopf": dict(kernel="gluon", prefetch=False),
    "gluon-notma": dict(kernel="gluon", tma_out=False),
    "gluon-n2q1": dict(kernel="gluon", nbuf=2, qbuf=1),
    "gluon-n128": dict(kernel="gluon", block_n=128, nbuf=2, qbuf=1),   # 92 B spilled (sm_90 report)
    "gluon-n4q1": dict(kernel="gluon", nbuf=4, qbuf=1),                # a deeper key ring, one query slot
    "auto": dict(kernel="auto"),                                       # the library's default rule
}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: --smoke only (Triton interpreter)

try:
    import flash_mla
except Exception:  # noqa: BLE001  (absent wheel or failed load: skip the peer cleanly)
    flash_mla = None


# ------------------------------------------------------------------------------------------ inputs
def random_packed_cache(num_blocks):
    """Valid packed rows: random finite e4m3 codes, power-of-two scales, random bf16 rope."""
    cache = torch.empty(num_blocks, PS, ROW, dtype=torch.uint8, device=DEVICE)
    n = num_blocks * PS
    flat = cache.view(n, ROW)
    code = torch.randint(0, 0x7F, (n, R), dtype=torch.uint8, device=DEVICE)           # 0x7F would be NaN
    flat[:, :R] = code | (torch.randint(0, 2, (n, R), dtype=torch.uint8, device=DEVICE) << 7)
    scales = torch.exp2(torch.randint(-9, -5, (n, R // 128), device=DEVICE).float())
    flat[:, R:R + 16] = scales.view(torch.uint8)
    flat[:, R + 16:] = torch.randn(n, P, device=DEVICE).to(torch.bfloat16).view(torch.uint8)
    return cache


def make_case(H, W, C, B, hist):
    """B requests of C new tokens over ``hist`` cached positions each, shuffled pages of one shared cache."""
    per = triton.cdiv(hist + C, PS)
    cache = random_packed_cache(B * per)
    bt = torch.randperm(B * per, dtype=torch.int32).view(B, per)
    cu = torch.arange(B + 1, dtype=torch.int32) * C
    dec = torch.full((B,), hist, dtype=torch.int32)
    kv_slots, kv_cu = plan_mha_rows(bt, cu, dec, window=W, page_size=PS)
    T = B * C
    meta = dict(block_tables=bt, cu_seqlens_q=cu, seq_lens_encoder=torch.full((B,), C, dtype=torch.int32),
                seq_lens_decoder=dec, batch_id_per_token=torch.repeat_interleave(torch.arange(B), C).to(torch.int32))
    meta = {k: v.to(DEVICE) for k, v in meta.items()}
    g = torch.Generator(device=DEVICE).manual_seed(H * 7919 + W * 31 + C)
    q_nope = torch.randn(T, H, N, device=DEVICE, generator=g).to(torch.bfloat16)
    q_pe = torch.randn(T, H, P, device=DEVICE, generator=g).to(torch.bfloat16)
    w = (torch.randn(H * (N + V), R, device=DEVICE, generator=g) * R ** -0.5).to(torch.bfloat16)
    return dict(H=H, W=W, C=C, B=B, hist=hist, T=T, cache=cache, meta=meta, kv_slots=kv_slots.to(DEVICE),
                kv_cu=kv_cu.to(DEVICE), q_nope=q_nope, q_pe=q_pe, w=w)


def attended(C, hist, W):
    """Keys attended by one request's chunk: Σ_{p = hist}^{hist + C - 1} min(W, p + 1) (SPEC §3)."""
    lo, hi = hist, hist + C - 1
    cut = min(hi, W - 1)                                   # positions p < W attend to p + 1 keys
    total = (cut + 1) * (cut + 2) // 2 - lo * (lo + 1) // 2 if lo <= cut else 0
    return total + max(0, hi - max(lo, W) + 1) * W         # the rest to W keys


# --------------------------------------------------------------------------------------- the paths
def mha_call(s, config, out, stats=None):
    m = s["meta"]
    return lambda: mha_window.mha_swa_prefill_fwd(
        s["q_nope"], s["q_pe"], s["w"], s["cache"], s["kv_slots"], s["kv_cu"], m["cu_seqlens_q"],
        m["seq_lens_decoder"], m["batch_id_per_token"], SCALE, s["W"], 0, out=out, config=config, stats=stats)


def mha_parts(s, config):
    """Callables for the three parts alone, on buffers prepared once. The GEMM and the attention run on one head
    group of the op's size (``head_group``); their times are scaled by ``H / group`` (returned as ``scale``)."""
    m, H, M = s["meta"], s["H"], s["kv_slots"].shape[0]
    hg = mha_window.head_group(M, H, N + V, 2)
    latent = torch.empty(M, D, dtype=torch.bfloat16, device=DEVICE)
    mha_window.gather_latent_rows(s["cache"], s["kv_slots"], latent, rope_dim=P)
    kv = torch.empty(M, hg * (N + V), dtype=torch.bfloat16, device=DEVICE)
    wt = s["w"][:hg * (N + V)].t()
    torch.mm(latent[:, :R], wt, out=kv)
    o = torch.empty(s["T"], H, V, dtype=torch.bfloat16, device=DEVICE)
    lse = torch.empty(s["T"], H, device=DEVICE)
    bm = mha_window.attention_config(config, s["q_nope"], s["q_pe"], V, s["W"])["block_m"]
    tile_cu, tile_b = mha_window.tile_plan(m["cu_seqlens_q"], s["kv_cu"], bm, -(-s["T"] // bm) + s["B"])
    gather = lambda: mha_window.gather_latent_rows(s["cache"], s["kv_slots"], latent, rope_dim=P)  # noqa: E731
    gemm = lambda: torch.mm(latent[:, :R], wt, out=kv)  # noqa: E731
    stats = {}

    def attention():
        mha_window.mha_window_attention(s["q_nope"][:, :hg], s["q_pe"][:, :hg], kv.view(M, hg, N + V), latent[:, R:],
                                        s["kv_cu"], m["cu_seqlens_q"], m["seq_lens_decoder"], SCALE, s["W"], 0,
                                        o[:, :hg], lse[:, :hg], tile_cu=tile_cu, tile_b=tile_b, config=config,
                                        stats=stats)
    return gather, gemm, attention, stats, latent, H / hg


def mqa_calls(s):
    """The MQA op alone on a precomputed ``q_abs``, and the block the core op runs: ``absorb_query`` + the op +
    ``unabsorb_output`` (the library's own BMMs)."""
    m = s["meta"]
    q_abs = absorb_query(s["q_nope"], s["q_pe"], s["w"])
    op = lambda: ops.swa_mla_attention(q_abs, s["cache"], *m.values(), SCALE, window=s["W"], rope_dim=P)  # noqa

    def block():
        qa = absorb_query(s["q_nope"], s["q_pe"], s["w"])
        o_lat, _ = ops.swa_mla_attention(qa, s["cache"], *m.values(), SCALE, window=s["W"], rope_dim=P)
        return unabsorb_output(o_lat, s["w"], N)
    return op, block, q_abs


def flashmla_call(s, q_abs, latent):
    """FlashMLA's sparse prefill over the dequantised rows (the MHA gather's workspace, [rows, 576] bf16)."""
    H, W, T = s["H"], s["W"], s["T"]
    m = s["meta"]
    b = m["batch_id_per_token"].long()
    cu, dec, kv_cu = m["cu_seqlens_q"].long(), m["seq_lens_decoder"].long(), s["kv_cu"].long()
    p = dec[b] + torch.arange(T, device=DEVICE) - cu[b]
    a = (dec[b] - W + 1).clamp(min=0)
    K = triton.cdiv(W, 128) * 128
    x = p[:, None] - W + 1 + torch.arange(K, device=DEVICE)[None, :]
    ok = (x >= a[:, None]) & (x <= p[:, None])
    idx = torch.where(ok, kv_cu[b][:, None] + x - a[:, None], -1).to(torch.int32)[:, None, :]
    heads = H if H in (64, 128) else (64 if H < 64 else 128)
    q = q_abs if heads == H else torch.cat([q_abs, q_abs.new_zeros(T, heads - H, D)], 1)
    kv3 = latent[:, None, :].contiguous()
    return (lambda: flash_mla.flash_mla_sparse_fwd(q, kv3, idx, SCALE)), heads


# ------------------------------------------------------------------------------------------ timing
TIMING = "graph"      # --timing


def timed(fn, reps):
    try:
        if DEVICE == "cuda" and TIMING == "graph":
            try:
                with checks_disabled():               # data checks read back: not capturable
                    return graph_replay_us(fn, iters=reps, warmup=2)
            except Exception as e:  # noqa: BLE001  (a path that cannot be captured is timed eagerly, and says so)
                print(f"    [events] not capturable ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                      file=sys.stderr)
                torch.cuda.synchronize()
        return median_us(fn, iters=reps, warmup=2 if DEVICE == "cuda" else 0, device=DEVICE)
    except Exception as e:  # noqa: BLE001  (a path that does not support a shape reports n/a)
        print(f"    [skip] {type(e).__name__}: {str(e).splitlines()[0][:160]}", file=sys.stderr)
        return float("nan")


def rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def resource_line(compiled):
    if not compiled or compiled[-1] is None:          # the interpreter compiles nothing
        return "n/a"
    k = compiled[-1]
    return f"regs={k.n_regs} spills={k.n_spills} shared={getattr(k.metadata, 'shared', '?')}"


def run_case(H, W, C, B, hist, configs, reps, log):
    s = make_case(H, W, C, B, hist)
    T, M = s["T"], s["kv_slots"].shape[0]
    out = (torch.empty(T, H, V, dtype=torch.bfloat16, device=DEVICE), torch.empty(T, H, device=DEVICE))
    best = (float("nan"), None)
    by_config = {}
    expected = mqa_calls(s)[1]()                      # the MQA block's output: every config is checked against it
    for name in configs:
        stats = {}
        t = timed(mha_call(s, CONFIGS[name], out, stats), reps)
        if not math.isnan(t):                         # a fresh, poisoned run of the config: a wrong kernel never wins
            out[0].fill_(float("nan"))
            mha_call(s, CONFIGS[name], out)()
            e = rel_err(out[0], expected)
            if not e <= 2e-2:
                print(f"    [wrong] {name}: relative error {e:.3g} against the MQA block", file=sys.stderr)
                t = float("nan")
        by_config[name] = t
        if name not in RESOURCES and stats.get("attention"):
            RESOURCES[name] = (resource_line(stats["attention"]) + f" tma={stats.get('tma')}"
                               + f" kernel={stats.get('kernel', 'triton')}")
        if not math.isnan(t) and (best[1] is None or t < best[0]):
            best = (t, name)
    cfg = CONFIGS.get(best[1]) if best[1] else None
    gather, gemm, attention, stats, latent, groups = mha_parts(s, cfg)
    t_gather, t_gemm, t_attn = timed(gather, reps), groups * timed(gemm, reps), groups * timed(attention, reps)
    op, block, q_abs = mqa_calls(s)
    t_op, t_block = timed(op, reps), timed(block, reps)
    mha_call(s, cfg, out)()
    err = rel_err(out[0], block())
    t_fm, fm_heads = float("nan"), H
    if flash_mla is not None:
        try:
            fm, fm_heads = flashmla_call(s, q_abs, latent)
            t_fm = timed(fm, reps)
        except Exception as e:  # noqa: BLE001
            print(f"    [skip FlashMLA] {type(e).__name__}: {str(e).splitlines()[0][:160]}", file=sys.stderr)
    att = B * attended(C, hist, W)
    row = dict(H=H, W=W, C=C, B=B, hist=hist, T=T, rows=M, mha=best[0], config=best[1], gather=t_gather,
               gemm=t_gemm, attention=t_attn, by_config=by_config, mqa_op=t_op, mqa_block=t_block, flashmla=t_fm, flashmla_heads=fm_heads,
               err=err, attended=att, attn_tflops=2 * H * att * (N + P + V) / t_attn / 1e6,
               gemm_tflops=2 * M * R * H * (N + V) / t_gemm / 1e6, resources=resource_line(stats.get("attention")))
    log.write(json.dumps(row) + "\n")
    log.flush()
    del s, out, latent, q_abs
    torch.cuda.empty_cache()
    return row


RESOURCES = {}   # attention-kernel config → the compiler's report (registers, spills, shared memory)


def ratio(a, b):
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else float("nan")


HEADER = (f"{'H':>3} {'W':>5} {'C':>6} {'B':>4} {'hist':>5} | {'MHA µs':>8} {'cfg':>6} | {'gather':>7} {'GEMM':>7} "
          f"{'attn':>8} {'TF/s':>4} | {'MQA op':>8} {'MQA blk':>8} | {'FlashMLA':>8} | {'/FM':>5} {'/MQA':>5} | err")


def print_row(r):
    fm = f"{r['flashmla']:8.1f}" + ("*" if r["flashmla_heads"] != r["H"] else " ")
    print(f"{r['H']:>3} {r['W']:>5} {r['C']:>6} {r['B']:>4} {r['hist']:>5} | {r['mha']:8.1f} {str(r['config']):>6} | "
          f"{r['gather']:7.1f} {r['gemm']:7.1f} {r['attention']:8.1f} {r['attn_tflops']:4.0f} | {r['mqa_op']:8.1f} "
          f"{r['mqa_block']:8.1f} | {fm}| {ratio(r['mha'], r['flashmla']):5.2f} "
          f"{ratio(r['mha'], r['mqa_block']):5.2f} | "
          f"{r['err']:.1e}", flush=True)


def print_rule(rows):
    print("\n## The rule: shortest chunk C (of the sweep) from which MHA beats MQA at every longer C"
          " (block = BMMs + op; op = the MQA op alone)")
    print(f"{'H':>3} {'W':>5} | {'vs MQA block':>12} | {'vs MQA op':>10} | MHA/MQA-block by C")
    for H in sorted({r["H"] for r in rows}, reverse=True):
        for W in sorted({r["W"] for r in rows if r["H"] == H}):
            rs = sorted((r for r in rows if r["H"] == H and r["W"] == W), key=lambda r: r["C"])

            def first(key):
                win = [r["mha"] < r[key] for r in rs]
                for i in range(len(rs)):
                    if all(win[i:]):
                        return str(rs[i]["C"])
                return "never"
            by_c = " ".join(f"{r['C']}:{ratio(r['mha'], r['mqa_block']):.2f}" for r in rs)
            print(f"{H:>3} {W:>5} | {first('mqa_block'):>12} | {first('mqa_op'):>10} | {by_c}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="128,64,16")
    ap.add_argument("--windows", default="128,512,1024,2048,4096")
    ap.add_argument("--chunks", default="64,128,256,512,1024,4096,16384")
    ap.add_argument("--step-tokens", type=int, default=8192,
                    help="sweep: B = max(1, step_tokens // C) requests per step")
    ap.add_argument("--history", default="window", choices=["window", "fresh"],
                    help="sweep: positions cached before each chunk (window: W, a full window; fresh: 0)")
    ap.add_argument("--configs", default="base,s3,n32s3,n128,m128w8,ptr",
                    help=f"attention configs tried on the issue shapes (best reported): {','.join(CONFIGS)}")
    ap.add_argument("--sweep-configs", default="base", help="attention configs tried in the sweep")
    ap.add_argument("--skip-issue", action="store_true", help="only the sweep")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="only the issue's three fresh shapes")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    ap.add_argument("--smoke", action="store_true", help="one tiny case, runs on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--timing", choices=["graph", "events"], default="graph",
                    help="CUDA-graph replays (device time, the default) or CUDA events around eager calls")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    global TIMING
    TIMING = args.timing
    if args.smoke:
        with open(os.path.join(args.out, "bench_mha_prefill.jsonl"), "w") as log:
            print(HEADER)
            print_row(run_case(2, 16, 32, 2, 16, ["base", "pers2", "gluon"], 1, log))
        return
    heads = [int(h) for h in args.heads.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    sweep_configs = [c for c in args.sweep_configs.split(",") if c]
    props = torch.cuda.get_device_properties(0)   # the real runs need the GPU
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"timing {TIMING}, "
          f"FlashMLA {'present' if flash_mla is not None else 'absent'}; "
          f"EXPAND_BYTES {mha_window.EXPAND_BYTES >> 20} MiB")
    rows = []
    with open(os.path.join(args.out, "bench_mha_prefill.jsonl"), "w") as log:
        if not args.skip_issue:
            print("\n## Issue 18 shapes: one fresh sequence of S tokens (µs; /FM = MHA ÷ FlashMLA, "
                  "/MQA = MHA ÷ MQA block; * FlashMLA run padded to 64 heads)")
            print(HEADER)
            rows_issue = []
            for H in heads:
                for S, W in ISSUE_SHAPES:
                    rows_issue.append(run_case(H, W, S, 1, 0, configs, args.reps, log))
                    print_row(rows_issue[-1])
            print("\n## Whole MHA block per attention config, same run (µs)")
            names = list(configs)
            print(f"{'H':>3} {'W':>5} {'S':>6} | " + " ".join(f"{n:>8}" for n in names))
            for r in rows_issue:
                print(f"{r['H']:>3} {r['W']:>5} {r['C']:>6} | " + " ".join(f"{r['by_config'][n]:8.1f}" for n in names))
            print("\n## Attention kernel, compiler's report per config (DeepSeek dims)")
            for name, line in RESOURCES.items():
                print(f"{name:>10}: {CONFIGS[name]} {line}")
        if args.quick:
            return
        print(f"\n## Sweep: B = max(1, {args.step_tokens} // C) requests of C tokens, history "
              f"{'W' if args.history == 'window' else '0'} (µs)")
        print(HEADER)
        for H in heads:
            for W in [int(w) for w in args.windows.split(",")]:
                for C in [int(c) for c in args.chunks.split(",")]:
                    B = max(1, args.step_tokens // C)
                    r = run_case(H, W, C, B, W if args.history == "window" else 0, sweep_configs, args.reps, log)
                    rows.append(r)
                    print_row(r)
        print_rule(rows)


if __name__ == "__main__":
    main()
