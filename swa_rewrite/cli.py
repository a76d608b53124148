"""The ``swa-rewrite`` command line (also ``python -m swa_rewrite``)."""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Optional, Sequence


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .models import MLAConfig, MLAModel
    from .runtime import Engine

    config = MLAConfig.named(args.config)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = MLAModel(config, device=device, dtype=dtype, seed=args.seed)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(n)] for n in args.prompt_lens]
    engine = Engine(model, num_blocks=args.num_blocks, page_size=args.page_size,
                    max_tokens_per_step=args.max_tokens_per_step)
    t0 = time.perf_counter()
    outputs = engine.generate(prompts, args.max_new_tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    s = engine.stats
    print(f"model     {args.config}: {config.num_hidden_layers} layers, H={config.num_attention_heads}, "
          f"R={config.kv_lora_rank}, P={config.qk_rope_head_dim} on {device} ({dtype})")
    print(f"runtime   page size {args.page_size}, {args.num_blocks} blocks, "
          f"{args.max_tokens_per_step} tokens per step (chunked prefill)")
    for p, out in zip(prompts, outputs):
        print(f"prompt    {len(p):4d} tokens -> {' '.join(map(str, out))}")
    print(f"steps     {s.steps}  prefill tokens {s.prefill_tokens}  decode tokens {s.decode_tokens}  "
          f"reused prefix tokens {s.reused_tokens}")
    print(f"time      {dt * 1e3:.1f} ms  ({(s.prefill_tokens + s.decode_tokens) / dt:.0f} tokens/s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swa-rewrite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate with the bundled model through the paged runtime")
    demo.add_argument("--config", default="tiny", choices=["tiny", "v3-attn"], help="bundled model config")
    demo.add_argument("--seed", type=int, default=0, help="weights and prompt seed")
    demo.add_argument("--prompt-lens", type=_positive, nargs="+", default=[37, 5, 64], help="prompt lengths")
    demo.add_argument("--max-new-tokens", type=_positive, default=16)
    demo.add_argument("--page-size", type=_positive, default=16)
    demo.add_argument("--num-blocks", type=_positive, default=256)
    demo.add_argument("--max-tokens-per-step", type=_positive, default=32)
    demo.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
