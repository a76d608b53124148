"""Packed FP8 cache write / dequantise and the SWA indexer on the GPU (issue 3, docs/design.md §10).

Prints effective bandwidth of the Triton kernels beside the measured device copy bandwidth and beside the
PyTorch reference path run on the same GPU. Bytes counted are the fewest the op must move: each input
read once, each output written once (latent bf16 read + packed row written + slot read for the write;
packed row read + bf16 row written for the dequantise; index rows written + metadata read for the
indexer). Every kernel result is checked against the PyTorch reference before it is timed.

    PYTHONPATH=. python3 benchmarks/bench_cache_indexer.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

from swa_rewrite.kernels import fp8_cache as fp8k
from swa_rewrite.kernels import swa_indexer as idxk
from swa_rewrite.ops.fp8_cache import (dequantize_fp8_reference, fp8_cache_bytes, quantize_fp8_reference,
                                       write_fp8_cache_reference)
from swa_rewrite.ops.swa_indexer import swa_indexer_reference
from swa_rewrite.timing import median_us

R, P, PS = 512, 64, 64
DEV = "cuda"  # --cpu-smoke switches to the Triton interpreter on CPU, to check the script itself
D, NBYTES = R + P, fp8_cache_bytes(R, P)


def bench(fn) -> float:
    """Median time in µs through swa_rewrite.timing: on the GPU CUDA events, warm-up first, L2 emptied before
    each timed call (bytes come from device memory); under --cpu-smoke one wall-clock call (the interpreter
    is slow; the script itself is what is checked)."""
    if DEV == "cpu":
        return median_us(fn, iters=1, warmup=0, device="cpu")
    return median_us(fn, iters=100, warmup=10, device=DEV, flush_l2=True)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / us / 1e3   # GB/s, read + write


# ---------------------------------------------------------------------------------------- cache write
def write_case(T: int):
    num_blocks = T // PS + 16
    latent = torch.randn(T, D, device=DEV, dtype=torch.bfloat16) * torch.rand(T, 1, device=DEV) * 10
    # Prefill-like placement: whole pages in shuffled physical order.
    blocks = torch.randperm(num_blocks, device=DEV)
    slots = (blocks[:, None] * PS + torch.arange(PS, device=DEV)).flatten()[:T].contiguous()
    cache = torch.full((num_blocks, PS, NBYTES), 0xFF, dtype=torch.uint8, device=DEV)
    return latent, cache, slots


def run_write(rows: list, sizes: list[int], configs: list[dict], copy_gbs: float) -> None:
    for T in sizes:
        latent, cache, slots = write_case(T)
        nbytes = T * (D * 2 + NBYTES + slots.element_size())
        expected = quantize_fp8_reference(latent, P)
        for cfg in configs:
            cache.fill_(0xFF)
            fp8k.write_fp8_cache(latent, cache, slots, rope_dim=P, **cfg)
            ok = torch.equal(cache.view(-1, NBYTES)[slots], expected)
            us = bench(lambda: fp8k.write_fp8_cache(latent, cache, slots, rope_dim=P, **cfg))
            gbs = nbytes / us / 1e3
            rows.append(dict(op="fp8 cache write", T=T, impl="triton " + _cfg(cfg), us=us, gbs=gbs,
                             pct=100 * gbs / copy_gbs, exact=ok))
        if T <= 262144:
            us = bench(lambda: write_fp8_cache_reference(latent, cache, slots, P))
            rows.append(dict(op="fp8 cache write", T=T, impl="PyTorch reference", us=us, gbs=nbytes / us / 1e3,
                             pct=100 * nbytes / us / 1e3 / copy_gbs, exact=True))
        # Dequantise the rows just written (a gathered-slots read, as the naive attention path does).
        rows_u8 = cache.view(-1, NBYTES)
        out = torch.empty(rows_u8.shape[0], D, dtype=torch.bfloat16, device=DEV)
        fp8k.dequantize_fp8_cache(rows_u8[None], out, rope_dim=P)
        ok = torch.equal(out[slots].view(torch.int16), dequantize_fp8_reference(expected, P).view(torch.int16))
        dbytes = rows_u8.shape[0] * (NBYTES + 2 * D)
        us = bench(lambda: fp8k.dequantize_fp8_cache(rows_u8[None], out, rope_dim=P))
        rows.append(dict(op="fp8 dequantise (whole cache)", T=rows_u8.shape[0], impl="triton", us=us,
                         gbs=dbytes / us / 1e3, pct=100 * dbytes / us / 1e3 / copy_gbs, exact=ok))
        if T <= 262144:
            us = bench(lambda: dequantize_fp8_reference(rows_u8, P))
            rows.append(dict(op="fp8 dequantise (whole cache)", T=rows_u8.shape[0], impl="PyTorch reference",
                             us=us, gbs=dbytes / us / 1e3, pct=100 * dbytes / us / 1e3 / copy_gbs, exact=True))
        del latent, cache, slots, expected, out
        torch.cuda.empty_cache()


def _cfg(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items()) or "default"


# -------------------------------------------------------------------------------------------- indexer
def indexer_case(T: int, W: int, kind: str):
    """Decode: T one-token requests with W..W+2047 cached. Prefill: 2048-token chunks over 0..4095 cached."""
    gen = dict(device=DEV)
    if kind == "decode":
        B, q_len = T, 1
        cached = torch.randint(W, W + 2048, (B,), **gen)
    else:
        B, q_len = T // 2048, 2048
        cached = torch.randint(0, 4096, (B,), **gen)
    max_blocks = int((cached.max() + q_len + PS - 1) // PS)
    tables = torch.randperm(B * max_blocks, **gen).view(B, max_blocks).to(torch.int32)
    cu = torch.arange(B + 1, **gen).to(torch.int32) * q_len
    enc = torch.full((B,), q_len if kind == "prefill" else 0, dtype=torch.int32, **gen)
    bid = torch.arange(B, **gen).to(torch.int32).repeat_interleave(q_len)
    return tables, cu, enc, cached.to(torch.int32), bid


def run_indexer(rows: list, sizes: list[int], windows: list[int], copy_gbs: float) -> None:
    for kind in ("decode", "prefill"):
        for T in sizes:
            for W in windows:
                tables, cu, enc, dec, bid = indexer_case(T, W, kind)
                indices = torch.empty(T, 1, W, dtype=torch.int32, device=DEV)
                num_valid = torch.empty(T, dtype=torch.int32, device=DEV)
                nbytes = T * W * 4 + T * 4 * 2 + tables.numel() * 4
                want = swa_indexer_reference(tables, cu, dec, bid, W, PS)
                for spec in (False, True):
                    indices.fill_(-7)
                    args = (tables, cu, dec, bid, indices, num_valid)
                    idxk.swa_indexer(*args, window=W, page_size=PS, specialize_page_size=spec)
                    ok = torch.equal(indices, want[0]) and torch.equal(num_valid, want[1])
                    us = bench(lambda: idxk.swa_indexer(*args, window=W, page_size=PS, specialize_page_size=spec))
                    rows.append(dict(op=f"swa indexer ({kind})", T=T, W=W,
                                     impl="triton, constexpr ps" if spec else "triton, runtime ps", us=us,
                                     gbs=nbytes / us / 1e3, pct=100 * nbytes / us / 1e3 / copy_gbs, exact=ok))
                if T * W <= 16384 * 4096:
                    us = bench(lambda: swa_indexer_reference(tables, cu, dec, bid, W, PS))
                    rows.append(dict(op=f"swa indexer ({kind})", T=T, W=W, impl="PyTorch reference", us=us,
                                     gbs=nbytes / us / 1e3, pct=100 * nbytes / us / 1e3 / copy_gbs, exact=True))
                del tables, cu, enc, dec, bid, indices, num_valid, want
            torch.cuda.empty_cache()


def table(rows: list) -> str:
    lines = ["| op | T | W | impl | µs | GB/s | % of copy | exact |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['T']} | {r.get('W', '')} | {r['impl']} | {r['us']:.1f} | "
                     f"{r['gbs']:.0f} | {r['pct']:.0f} % | {'yes' if r['exact'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    args = parser.parse_args()
    global DEV
    if args.cpu_smoke:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("needs a CUDA device (or --cpu-smoke)")
        return 1
    torch.manual_seed(0)
    env = dict(card=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)",
               torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
    copy_gbs = copy_bandwidth() if DEV == "cuda" else 1.0
    print(f"{env}  device copy {copy_gbs:.0f} GB/s (read + write)", flush=True)
    rows: list = []
    write_sizes = [256] if args.cpu_smoke else [65536] if args.quick else [65536, 262144, 1048576]
    configs = [dict(), dict(wide_stores=False), dict(block_t=4, num_warps=2), dict(block_t=16, num_warps=4),
               dict(block_t=16, num_warps=8), dict(soft_cvt=True)]
    run_write(rows, write_sizes, configs, copy_gbs)
    print(table(rows), flush=True)
    idx_rows: list = []
    sizes = [2048] if args.cpu_smoke else [4096] if args.quick else [4096, 16384, 65536]
    windows = [128] if args.cpu_smoke else [128, 4096] if args.quick else [128, 512, 1024, 2048, 4096]
    run_indexer(idx_rows, sizes, windows, copy_gbs)
    rows += idx_rows
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_cache_indexer.json"), "w") as f:
        json.dump(dict(env=env, copy_gbs=copy_gbs, rows=rows), f, indent=1)
    with open(os.path.join(args.out, "bench_cache_indexer.md"), "w") as f:
        f.write(f"{env}, device copy {copy_gbs:.0f} GB/s\n\n{table(rows)}\n")
    print(table(idx_rows))
    bad = [r for r in rows if not r["exact"]]
    print(f"{len(rows)} measurements, {len(bad)} inexact; copy {copy_gbs:.0f} GB/s; {env}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
