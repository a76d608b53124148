"""What checked mode and Triton's launch path cost an eager decode step on the GPU, piece by piece (issue 14): each
model's step with checks off, on, and on without each of its parts, and with checks off through ``kernel[grid]``
instead of ``kernels.launch``'s direct relaunch, timed alternately in one run.

    PYTHONPATH=. python benchmarks/bench_checks_gpu.py --context 32768

Variants (each a whole eager step, ``--batch`` one-token decodes at ``--context``, v3-attn, W on layers 0 and 2):

- ``off``: ``checks_disabled()``, as served;
- ``on``: the default (the step check with its one device-to-host copy, the FP8 writes' finite flags read at the
  step's end: a second copy);
- ``on, finite flags set but not read``: checked, the FP8 write kernels set their zeroed flags, nothing reads them
  (the end-of-step copy's share of the flags' cost);
- ``on, no finite flags``: checked, but the FP8 writes do not check their latents (no flag, no end-of-step copy);
- ``off, kernel[grid] launches``: unchecked, every Triton kernel launched through the JIT (``launch.jit_launches``),
  against ``off``: what the direct relaunch saves.

Times: median of ``--iters`` steps (CUDA events around each step), best of ``--trials`` rounds, the two models
interleaved call by call (``timing.paired_us``); "paired speed-up": the median over every round of the original's
step time over the rewritten's in the same round, which the host's drift does not move. The host varies between
calls: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_compile import decode_batch, fill_random  # noqa: E402

from swa_rewrite import Schedule, apply  # noqa: E402
from swa_rewrite.kernels import launch  # noqa: E402
from swa_rewrite.models import MLAConfig, MLAModel  # noqa: E402
from swa_rewrite.ops import fp8_cache  # noqa: E402
from swa_rewrite.ops.checks import checks_disabled  # noqa: E402
from swa_rewrite.runtime import num_cache_groups  # noqa: E402
from swa_rewrite.timing import paired_us  # noqa: E402


@contextlib.contextmanager
def finite_flags_from(make):
    """FP8 writes whose finite-latent flag is ``make(latent)`` instead of checked mode's (queued for the step's end)."""
    saved = fp8_cache.deferred_finite_flag
    fp8_cache.deferred_finite_flag = lambda latent, *a, **k: make(latent)
    try:
        yield
    finally:
        fp8_cache.deferred_finite_flag = saved


def no_finite_flags():
    """FP8 writes without the finite-latent check (no flag, nothing deferred)."""
    return finite_flags_from(lambda latent: None)


def unread_finite_flags():
    """FP8 writes whose kernels set a zeroed flag, as checked mode's, that nothing reads (no end-of-step copy)."""
    return finite_flags_from(lambda latent: torch.zeros(1, dtype=torch.int32, device=latent.device))


VARIANTS = {
    "off": checks_disabled,
    "on": contextlib.nullcontext,
    "on, finite flags set but not read": unread_finite_flags,
    "on, no finite flags": no_finite_flags,
    "off, kernel[grid] launches": lambda: _both(checks_disabled(), launch.jit_launches()),
}


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_checks_gpu.py needs CUDA")
    assert hasattr(fp8_cache, "deferred_finite_flag")
    dev = torch.device("cuda")
    cfg = MLAConfig.named("v3-attn")
    model = MLAModel(cfg, device=dev, dtype=torch.bfloat16, seed=0)
    rewritten = apply(model, Schedule.from_skip_freq(2, cfg.num_hidden_layers, args.window))
    ps = 64
    nb = -(-(args.context + 1) // ps)
    steps = {}
    for which, m in (("original", model), ("rewritten", rewritten)):
        caches = m.allocate_kv_cache(args.batch * nb, ps, dev)
        fill_random(caches)
        b = decode_batch(args.batch, args.context, ps, num_cache_groups(m), dev)
        steps[which] = (lambda m=m, c=caches, b=b: m(b.input_ids, kv_caches=c, meta=b.meta,
                                                    logits_indices=b.last_token_index))
    best, ratios = {}, {label: [] for label in VARIANTS}
    names = list(steps)
    with torch.inference_mode():
        for _ in range(args.trials):
            for label, ctx in VARIANTS.items():
                with ctx():     # the two models interleaved call by call: their ratio does not drift with the host
                    times = paired_us([steps[w] for w in names], args.iters, warmup=3)
                for which, ts in zip(names, times):
                    best[which, label] = min(best.get((which, label), float("inf")), statistics.median(ts))
                ratios[label].extend(a / b for a, b in zip(*times))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; eager decode step, {args.batch} requests at "
          f"{args.context}, W={args.window} on layers 0, 2; µs, best of {args.trials} medians of {args.iters}")
    print(f"direct relaunches: {launch.direct_calls()}")
    print("| variant | original | rewritten | speed-up | paired speed-up |\n|---|---|---|---|---|")
    for label in VARIANTS:
        o, r = best["original", label], best["rewritten", label]
        print(f"| {label} | {o:.1f} | {r:.1f} | {o / r:.2f}x | {statistics.median(ratios[label]):.2f}x |")


if __name__ == "__main__":
    main()
