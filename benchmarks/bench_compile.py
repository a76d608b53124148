"""torch.compile with the SWA rewrite on the GPU (issue 6): compile time with and without the pass, and the
decode-step latency of the `v3-attn` config eager vs compiled vs compiled + CUDA graphs.

    PYTHONPATH=. python benchmarks/bench_compile.py [--batch 32] [--context 4096] [--window 128]

Prints a table; every time is the median of CUDA-event timings after warm-up. Data checks are off
(SWA_REWRITE_CHECKS=0), as in serving.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("SWA_REWRITE_CHECKS", "0")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import triton  # noqa: E402

import swa_rewrite  # noqa: E402
from swa_rewrite import Schedule, apply  # noqa: E402
from swa_rewrite.models import MLAConfig, MLAModel  # noqa: E402
from swa_rewrite.timing import median_us as cuda_time  # noqa: E402
from swa_rewrite.ops.kv_cache_spec import num_groups, schedule_cache_groups  # noqa: E402
from swa_rewrite.runtime import StepBatch, StepItem  # noqa: E402


def decode_batch(batch: int, context: int, page_size: int, num_groups: int) -> StepBatch:
    blocks = -(-(context + 1) // page_size)
    items = [StepItem([7], context, list(range(b * blocks, (b + 1) * blocks)), False) for b in range(batch)]
    return StepBatch.build(items, page_size, num_groups=num_groups, device="cuda")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--page-size", type=int, default=64)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    cfg = MLAConfig.named("v3-attn")
    model = MLAModel(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    schedule = Schedule.from_skip_freq(2, cfg.num_hidden_layers, args.window)   # layers 0, 2 SWA
    # One step for both models: every cache group's rows are the same (caches are not window-bounded yet),
    # so the original reads group 0 of the rewritten model's groups.
    b = decode_batch(args.batch, args.context, args.page_size, num_groups(schedule_cache_groups(schedule)))
    num_blocks = args.batch * -(-(args.context + 1) // args.page_size)
    rewritten = apply(model, schedule)
    caches_full = model.allocate_kv_cache(num_blocks, args.page_size)
    caches_swa = rewritten.allocate_kv_cache(num_blocks, args.page_size)
    for c in caches_full + caches_swa:
        torch._dynamo.mark_static_address(c)   # lets CUDA graphs capture the in-place cache writes
        c.copy_(torch.randint(0, 100, c.shape, device="cuda", dtype=torch.uint8).view(c.dtype)
                if c.dtype == torch.uint8 else torch.randn_like(c) * 0.1)
    idx = b.last_token_index

    def call(m, caches):
        return lambda: m(b.input_ids, kv_caches=caches, meta=b.meta, logits_indices=idx)

    rows = []

    def compile_and_time(name, make, caches):
        torch._dynamo.reset()
        t0 = time.perf_counter()
        m = make()
        fn = call(m, caches)
        fn()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        pass_s = m.swa_backend.pass_seconds if hasattr(m, "swa_backend") else 0.0
        rows.append((name, compile_s, pass_s, cuda_time(fn)))

    rows.append(("original, eager", 0.0, 0.0, cuda_time(call(model, caches_full))))
    rows.append(("rewritten (apply), eager", 0.0, 0.0, cuda_time(call(rewritten, caches_swa))))
    # Compile each twice, alternating, so one-time start-up cost (Inductor's first import and Triton
    # compiles) does not land on whichever variant happens to go first.
    for _ in range(2):
        compile_and_time("original, torch.compile (inductor)", lambda: torch.compile(model, fullgraph=True),
                         caches_full)
        compile_and_time("swa_rewrite.compile (backend + inductor)",
                         lambda: swa_rewrite.compile(model, schedule, fullgraph=True), caches_swa)
    compile_and_time("swa_rewrite.compile reduce-overhead",
                     lambda: swa_rewrite.compile(model, schedule, fullgraph=True, mode="reduce-overhead"), caches_swa)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; v3-attn "
          f"({cfg.num_hidden_layers} layers, H={cfg.num_attention_heads}), {schedule}; decode step of "
          f"{args.batch} requests at context {args.context}, page {args.page_size}")
    print(f"{'variant':<44} {'compile+1st call (s)':>20} {'of it, the pass (s)':>20} {'decode step (µs)':>17}")
    for name, cs, ps, us in rows:
        print(f"{name:<44} {cs:>20.1f} {ps:>20.3f} {us:>17.1f}")


if __name__ == "__main__":
    main()
