"""The ``swa-rewrite`` command line (also ``python -m swa_rewrite``).

Subcommands: ``demo`` (rewrite the bundled model and generate with both), ``diff`` (graph diff),
``memory`` (KV-cache table and plot), ``bench`` (end-to-end throughput on CUDA).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Optional, Sequence

# Far beyond any released model (DeepSeek-V3: 61 layers); more would only make tracing crawl.
_MAX_LAYERS = 1024


class CLIError(Exception):
    """A user-facing error: printed as ``swa-rewrite: error: ...`` with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block), exit code 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -2**63 <= value < 2**63:        # what torch's generators take
        raise argparse.ArgumentTypeError(f"must be a 64-bit integer, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser, default_window: int) -> None:
    g = p.add_argument_group("model and schedule")
    g.add_argument("--config", default="tiny", choices=["tiny", "v3-attn"], help="bundled model config (default tiny)")
    g.add_argument("--layers", type=_positive, help="override the config's number of layers")
    g.add_argument("--hf", metavar="DIR", help="load a local Hugging Face DeepSeek-V2/V3 checkpoint instead")
    g.add_argument("--window", type=_positive, default=default_window, help=f"SWA window W (default {default_window})")
    s = g.add_mutually_exclusive_group()
    s.add_argument("--skip-freq", type=_positive, default=None,
                   help="window_attn_skip_freq as an int: every n-th layer stays full (default 2)")
    s.add_argument("--swa-layers", type=_int_list, metavar="I,J,...", help="explicit SWA layer indices")
    s.add_argument("--skip-freq-list", type=_int_list, metavar="1,0,...",
                   help="window_attn_skip_freq as a list: 1 = SWA layer, 0 = full")


def _config(args):
    """The ``MLAConfig`` of ``--hf DIR`` (its config.json alone) or of ``--config`` / ``--layers``."""
    from .models import MLAConfig

    if getattr(args, "hf", None):
        from .models.hf import config_from_pretrained

        if getattr(args, "layers", None):
            raise CLIError("--layers applies to --config models; a checkpoint's layer count comes from its config")
        config = _read_checkpoint(args.hf, config_from_pretrained)
        if config.num_hidden_layers > _MAX_LAYERS:
            raise CLIError(f"--hf {args.hf}: config.json has num_hidden_layers={config.num_hidden_layers}; "
                           f"at most {_MAX_LAYERS} layers are supported")
        return config
    if args.layers and args.layers > _MAX_LAYERS:
        raise CLIError(f"--layers {args.layers}: at most {_MAX_LAYERS} layers are supported")
    config = MLAConfig.named(args.config)
    return config.replace(num_hidden_layers=args.layers) if args.layers else config


def _read_checkpoint(path: str, read, **kw):
    """``read(path, **kw)``, its errors (missing or unreadable files, unsupported configs, tensors that do not
    match) turned into ``CLIError`` naming ``--hf``."""
    try:
        return read(path, **kw)
    except OSError as e:            # missing files and folders (CheckpointNotFoundError is one too)
        raise CLIError(f"--hf {path}: cannot read the checkpoint: {e}") from None
    except ValueError as e:
        raise CLIError(f"--hf {path}: {e}") from None


def _build_model(args, *, device: str = "cpu", dtype=None, meta: bool = False):
    """The model of ``--config`` / ``--hf``: on the meta device (config only, no weights read) when ``meta``."""
    import torch

    from .models import MLAModel, from_pretrained

    config = _config(args)
    if meta:   # graph and memory questions need the config only: no weights are read
        return MLAModel(config, device="meta", dtype=dtype)
    if getattr(args, "hf", None):
        return _read_checkpoint(args.hf, from_pretrained, dtype=dtype or torch.float32, device=device)
    return MLAModel(config, device=device, dtype=dtype, seed=getattr(args, "seed", 0))


def _available_bytes(device) -> Optional[int]:
    """Free memory of ``device`` in bytes (CUDA: free device memory; CPU: the kernel's MemAvailable, else
    physical memory), or None where the platform does not say."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            continue
    return None


def _check_fits(device, needs: dict[str, int]) -> None:
    """Refuse, before anything is allocated, sizes whose bytes (``needs``: what → bytes) exceed ``device``'s
    free memory: an absurd ``--num-blocks`` would otherwise fail deep in the allocator, or get the process
    killed when the pages are touched."""
    total, available = sum(needs.values()), _available_bytes(device)
    if available is not None and total > available:
        parts = ", ".join(f"{what} {_fmt_bytes(n)}" for what, n in needs.items())
        raise CLIError(f"this needs {_fmt_bytes(total)} of {device} memory ({parts}), more than the "
                       f"{_fmt_bytes(available)} available")


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _cache_bytes_per_slot(model) -> int:
    """Bytes one token slot takes in the unrewritten model's caches, all layers (model on any device)."""
    return sum(c.numel() * c.element_size() for c in model.allocate_kv_cache(1, 1, device="meta"))


def _schedule(args, num_layers: int):
    from .schedule import Schedule

    try:
        if args.swa_layers is not None:
            return Schedule(args.window, args.swa_layers, num_layers)
        if args.skip_freq_list is not None:
            return Schedule.from_skip_freq(args.skip_freq_list, num_layers, args.window)
        return Schedule.from_skip_freq(args.skip_freq or 2, num_layers, args.window)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


# ------------------------------------------------------------------------------------------------- demo
def _check_demo_sizes(args: argparse.Namespace, device: str, dtype) -> None:
    """Before any weight, cache or prompt is allocated: every prompt's generation fits in the cache, and
    the weights plus caches fit in ``device``'s memory."""
    nb, ps = args.num_blocks, args.page_size
    for i, n in enumerate(args.prompt_lens):
        need = -(-(n + args.max_new_tokens) // ps)
        if need > nb:
            raise CLIError(f"prompt {i} needs {need} blocks of {ps} positions, the cache has {nb} "
                           f"(see --num-blocks, --page-size, --prompt-lens, --max-new-tokens)")
    skeleton = _build_model(args, meta=True, dtype=dtype)
    # Two engines' caches are alive at once (one generating, one scoring prompt 0); the unrewritten
    # model's cache is the largest of the three models'.
    _check_fits(device, {"weights": _weight_bytes(skeleton),
                         f"KV caches (2 engines x --num-blocks {nb} x --page-size {ps})":
                         2 * nb * ps * _cache_bytes_per_slot(skeleton)})


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .graph_diff import graph_diff
    from .rewrite import apply, trace
    from .runtime import Engine

    cuda = torch.cuda.is_available() and not args.cpu
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    _check_demo_sizes(args, device, dtype)
    model = _build_model(args, device=device, dtype=dtype)
    cfg = model.config
    schedule = _schedule(args, cfg.num_hidden_layers)
    swa = apply(model, schedule)
    print(swa.swa_report.render(args.report_tokens))
    print("\ngraph diff (forward):")
    print(graph_diff(trace(model).forward, swa).render(compact=True))

    rng = random.Random(args.seed)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in args.prompt_lens]
    kw = dict(num_blocks=args.num_blocks, page_size=args.page_size, max_tokens_per_step=args.max_tokens_per_step)
    # The same layers with a window covering every sequence: only the FP8 cache differs from the original.
    longest = max(args.prompt_lens) + args.max_new_tokens
    fp8_only = apply(model, type(schedule)(max(longest, schedule.window), schedule.swa_layers, schedule.num_layers))
    results = {}
    for name, m in (("original", model), ("rewritten", swa), ("fp8-only", fp8_only)):
        engine = Engine(m, **kw)
        t0 = time.perf_counter()
        try:
            tokens = engine.generate(prompts, args.max_new_tokens)
        except ValueError as e:           # e.g. a prompt that needs more blocks than --num-blocks
            raise CLIError(f"{e} (see --num-blocks, --page-size, --max-tokens-per-step)") from None
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        cache_bytes = sum(c.numel() * c.element_size() for c in engine.kv_caches)
        logits = Engine(m, **kw).logits(prompts[0])
        results[name] = (tokens, seconds, cache_bytes, logits, engine.stats)

    (t0, s0, b0, l0, st), (t1, s1, b1, l1, _) = results["original"], results["rewritten"]
    t2, _, _, l2, _ = results["fp8-only"]
    print(f"\nmodel      {args.hf or args.config}: {cfg.num_hidden_layers} layers, H={cfg.num_attention_heads}, "
          f"R={cfg.kv_lora_rank}, P={cfg.qk_rope_head_dim}, on {device} ({str(dtype).replace('torch.', '')})")
    print(f"runtime    page size {args.page_size}, {args.num_blocks} blocks, {args.max_tokens_per_step} tokens "
          f"per step; {st.steps} steps, {st.prefill_tokens} prefill + {st.decode_tokens} decode tokens")
    print(f"kv cache   {_fmt_bytes(b0)} -> {_fmt_bytes(b1)} allocated for {args.num_blocks * args.page_size} "
          f"token slots ({100 * (1 - b1 / b0):.1f}% less)")

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    def agree(x, y):
        return f"{sum(a == b for p, q in zip(x, y) for a, b in zip(p, q))}/{sum(len(p) for p in x)}"

    def teacher_forced(tokens):
        """How many generated tokens are the original model's own greedy choice on the same prefix
        (free-running agreement stops counting at the first near-tie that flips)."""
        hits = 0
        for p, gen in zip(prompts, tokens):
            top = Engine(model, **kw).logits(p + gen)[len(p) - 1:-1].argmax(-1).tolist()
            hits += sum(a == b for a, b in zip(top, gen))
        return f"{hits}/{sum(len(g) for g in tokens)}"

    print("agreement  with the original: prompt 0 logits (relative difference), generated tokens equal "
          "(free-running), and equal to the original's pick on the same prefix")
    print(f"  window {schedule.window:>5} + FP8 cache: logits {rel(l1, l0):.2e}, tokens {agree(t1, t0)}, "
          f"{teacher_forced(t1)} (the window changes the model: expected to differ)")
    print(f"  window {fp8_only.swa_schedule.window:>5} + FP8 cache: logits {rel(l2, l0):.2e}, tokens "
          f"{agree(t2, t0)}, {teacher_forced(t2)} (window covers every sequence: FP8 error only)")
    for i, (a, b) in enumerate(zip(t0, t1)):
        print(f"  prompt {i} ({len(prompts[i])} tokens)\n    original  {' '.join(map(str, a))}\n"
              f"    rewritten {' '.join(map(str, b))}")
    if cuda:
        print(f"time       original {s0 * 1e3:.1f} ms, rewritten {s1 * 1e3:.1f} ms")
    return 0


# ------------------------------------------------------------------------------------------------- diff
def cmd_diff(args: argparse.Namespace) -> int:
    from .graph_diff import graph_diff
    from .rewrite import apply, trace

    model = _build_model(args, meta=True)
    schedule = _schedule(args, model.config.num_hidden_layers)
    before, after = trace(model), apply(model, schedule)
    print(f"# {schedule}")
    print("## forward graph")
    print(graph_diff(before.forward, after).render(compact=args.compact))
    print("## cache allocation graph")
    print(graph_diff(before.allocation, after._swa_allocation).render(compact=args.compact))
    return 0


# ----------------------------------------------------------------------------------------------- memory
def memory_table(report, contexts: Sequence[int], page_size: int) -> str:
    lines = [f"{'context':>9} {'full cache':>12} {'rewritten':>12} {'saved':>12} {'ratio':>7}"]
    for ctx in contexts:
        slots = -(-ctx // page_size) * page_size
        b0, b1 = report.bytes_per_token(after=False) * slots, report.bytes_per_token(after=True) * slots
        lines.append(f"{ctx:>9} {_fmt_bytes(b0):>12} {_fmt_bytes(b1):>12} {_fmt_bytes(b0 - b1):>12} {b1 / b0:>7.3f}")
    return "\n".join(lines)


def plot_memory(report, contexts: Sequence[int], page_size: int, path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise CLIError("the memory plot needs matplotlib: pip install 'swa-rewrite[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The requested contexts plus every power of two in their range, for a smooth curve.
    lo, hi = min(contexts), max(contexts)
    xs = sorted(set(contexts) | {1 << k for k in range(hi.bit_length()) if lo <= 1 << k <= hi})
    slots = [-(-c // page_size) * page_size for c in xs]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    ax.plot(xs, [report.bytes_per_token(False) * s / 2**30 for s in slots], marker="o", label="full attention (bf16)")
    ax.plot(xs, [report.bytes_per_token(True) * s / 2**30 for s in slots], marker="o",
            label=f"rewritten ({len(report.schedule.swa_layers)} SWA layers, packed FP8)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens, one request)")
    ax.set_ylabel("KV-cache bytes (GiB)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as e:
        raise CLIError(f"--plot {path}: cannot write the image: {e}") from None
    finally:
        plt.close(fig)


def cmd_memory(args: argparse.Namespace) -> int:
    import torch

    from .rewrite import apply

    model = _build_model(args, meta=True, dtype=torch.bfloat16)
    schedule = _schedule(args, model.config.num_hidden_layers)
    report = apply(model, schedule).swa_report
    print(report.render(max(args.contexts)))
    print(f"\npage size {args.page_size}; bytes for one request's cache at each context length:")
    print(memory_table(report, args.contexts, args.page_size))
    if args.plot:
        plot_memory(report, args.contexts, args.page_size, args.plot,
                    f"KV cache, {args.hf or args.config}: {schedule}")
        print(f"\nwrote {args.plot}")
    return 0


# ------------------------------------------------------------------------------------------------ bench
def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise CLIError("bench needs a CUDA device (none is visible); run it on a GPU machine")
    # The largest context's caches (original model, --batch requests; see bench.py) beside the weights.
    skeleton = _build_model(args, meta=True, dtype=torch.bfloat16)
    slots = args.batch * -(-(max(args.contexts) + 1) // args.page_size) * args.page_size
    _check_fits("cuda", {"weights": _weight_bytes(skeleton),
                         f"KV caches (--batch {args.batch} x context {max(args.contexts)})":
                         slots * _cache_bytes_per_slot(skeleton)})
    from .bench import run_bench

    run_bench(args)
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="swa-rewrite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,diff,memory,bench}")

    demo = sub.add_parser("demo", help="rewrite the bundled model, generate with it and the original side by side",
                          description="Rewrite the bundled tiny model (or --hf DIR), run a generation through the "
                                      "rewritten and the original model, and compare them.")
    _add_model_args(demo, default_window=16)
    demo.add_argument("--seed", type=_seed, default=0, help="weights and prompt seed")
    demo.add_argument("--prompt-lens", type=_positive, nargs="+", default=[37, 5, 64], help="prompt lengths")
    demo.add_argument("--max-new-tokens", type=_positive, default=16)
    demo.add_argument("--page-size", type=_positive, default=16)
    demo.add_argument("--num-blocks", type=_positive, default=256)
    demo.add_argument("--max-tokens-per-step", type=_positive, default=32, help="chunked-prefill token budget")
    demo.add_argument("--report-tokens", type=_positive, default=128 * 1024,
                      help="cached tokens for the report's bytes-saved line")
    demo.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    demo.set_defaults(func=cmd_demo)

    diff = sub.add_parser("diff", help="print the graph diff of the rewrite for a config and schedule",
                          description="Trace the model (on the meta device) and print what the rewrite changes, "
                                      "grouped by layer.")
    _add_model_args(diff, default_window=128)
    diff.add_argument("--compact", action="store_true", help="one line per changed layer")
    diff.set_defaults(func=cmd_diff)

    memory = sub.add_parser("memory", help="KV-cache bytes per layer and per context length, with a PNG plot",
                            description="Per-layer cache table and totals for a config and schedule, and a PNG plot "
                                        "of KV-cache bytes against context length (full vs rewritten).")
    _add_model_args(memory, default_window=4096)
    memory.set_defaults(config="v3-attn")
    memory.add_argument("--page-size", type=_positive, default=64)
    memory.add_argument("--contexts", type=_int_list, default=[4096, 32768, 131072],
                        metavar="N,N,...", help="context lengths (default 4096,32768,131072)")
    memory.add_argument("--plot", metavar="PNG", default="kv-cache.png", help="where to write the plot ('' = none)")
    memory.set_defaults(func=cmd_memory)

    bench = sub.add_parser("bench", help="end-to-end decode/prefill throughput on CUDA, original vs rewritten",
                           description="Decode and prefill throughput of the v3-attn config, unrewritten vs "
                                       "rewritten, at several contexts (CUDA only).")
    _add_model_args(bench, default_window=128)
    bench.set_defaults(config="v3-attn")
    bench.add_argument("--contexts", type=_int_list, default=[4096, 32768, 131072], metavar="N,N,...")
    bench.add_argument("--batch", type=_positive, default=16, help="decode requests per step")
    bench.add_argument("--prefill-tokens", type=_positive, default=2048, help="tokens in the timed prefill chunk")
    bench.add_argument("--page-size", type=_positive, default=64)
    bench.add_argument("--iters", type=_positive, default=20)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code: 0, or 2 after one ``swa-rewrite: error: ...`` line on
    stderr (bad arguments exit through ``SystemExit(2)`` with the same one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "contexts", None) is not None and (not args.contexts or min(args.contexts) < 1):
        parser.error(f"--contexts must be positive integers, got {args.contexts}")
    try:
        return args.func(args)
    except CLIError as e:
        message = str(e)
    # The library's answers to bad input (ValueError/TypeError, RewriteError, OSError for files) reach the
    # user as they are; bugs (AssertionError, RuntimeError) keep their traceback.
    except (ValueError, TypeError, OSError) as e:
        message = str(e)
    except Exception as e:
        if not _out_of_memory(e):
            raise
        message = f"out of memory: {e} (try smaller sizes)"
    print(f"swa-rewrite: error: {_one_line(message)}", file=sys.stderr)
    return 2


def _out_of_memory(e: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, torch's (CUDA) OutOfMemoryError, or the CPU allocator's
    RuntimeError, which has no type of its own."""
    torch = sys.modules.get("torch")
    return (isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError))
            or "can't allocate memory" in str(e))


if __name__ == "__main__":
    sys.exit(main())
