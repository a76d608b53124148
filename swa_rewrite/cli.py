"""The ``swa-rewrite`` command line (also ``python -m swa_rewrite``).

Subcommands: ``demo`` (rewrite the bundled model and generate with both), ``diff`` (graph diff),
``memory`` (KV-cache table, and a plot when asked), ``bench`` (end-to-end throughput on CUDA), ``eval``
(perplexity by context and retrieval, original vs schedules) and ``calibrate`` (rank layers, propose a
schedule; docs/design.md §15). Every subcommand but ``eval`` and ``calibrate`` takes the same model and schedule
options with the same defaults (those two take a checkpoint, the reference model by default, and several
schedules); ``demo``, ``diff``, ``memory``, ``eval`` and ``calibrate`` print their report as one JSON object
with ``--json`` (keys in README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from typing import Optional, Sequence

from .formatting import format_bytes   # imports nothing: `--help` stays fast

# Far beyond any released model (DeepSeek-V3: 61 layers); more would only make tracing crawl.
_MAX_LAYERS = 1024
# One model and one schedule for every subcommand unless told otherwise: the tiny config runs anywhere,
# and a window of 128 slides over the demo's longest prompt while covering its short ones.
DEFAULT_CONFIG = "tiny"
# The demo shows the trained reference model (swa_rewrite/reference): text in, text out.
DEMO_CONFIG = "reference"
DEFAULT_WINDOW = 128
DEFAULT_SKIP_FREQ = 2


class CLIError(Exception):
    """A user-facing error: printed as ``swa-rewrite: error: ...`` with exit code 2."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each option's real default appended to its help (flags and options
    without a default say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in help:
            help += " (default: %(default)s)"
        return help


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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and schedule (the same defaults for every subcommand)")
    g.add_argument("--config", default=DEFAULT_CONFIG, choices=["reference", "tiny", "v3-attn"],
                   help="bundled model: reference (the trained byte-level model of swa_rewrite/reference), or random "
                        "weights of tiny or v3-attn (DeepSeek-V3's attention dims, 4 layers)")
    g.add_argument("--layers", type=_positive, help="override the config's number of layers (61: DeepSeek-V3)")
    g.add_argument("--hf", metavar="DIR", help="load a local Hugging Face DeepSeek-V2/V3 checkpoint instead")
    g.add_argument("--window", type=_positive, default=DEFAULT_WINDOW, help="SWA window W in tokens")
    s = g.add_mutually_exclusive_group()
    # No argparse default: one equal to a given value would hide the clash with --swa-layers.
    s.add_argument("--skip-freq", type=_positive,
                   help=f"window_attn_skip_freq as an int: every n-th layer stays full (default: {DEFAULT_SKIP_FREQ})")
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
    if args.config == "reference":
        from .reference import REFERENCE_CONFIG

        if args.layers:
            raise CLIError("--layers applies to the random configs (tiny, v3-attn); the reference model has "
                           f"{REFERENCE_CONFIG.num_hidden_layers} trained layers")
        return REFERENCE_CONFIG
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
    if args.config == "reference" and _reference_trained():
        from .reference import load_reference_model

        return load_reference_model(dtype=dtype or torch.float32, device=device)
    if args.config == "reference":
        print("swa-rewrite: note: the reference checkpoint is not in this checkout (train it: python -m "
              "swa_rewrite.reference.train); using random weights of its config", file=sys.stderr)
    return MLAModel(config, device=device, dtype=dtype, seed=getattr(args, "seed", 0))


def _reference_trained() -> bool:
    """Whether the trained reference checkpoint is present (a checkout may not carry it yet)."""
    from .reference import CHECKPOINT_DIR

    return (CHECKPOINT_DIR / "model.safetensors").is_file()


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
        parts = ", ".join(f"{what} {format_bytes(n)}" for what, n in needs.items())
        raise CLIError(f"this needs {format_bytes(total)} of {device} memory ({parts}), more than the "
                       f"{format_bytes(available)} available")


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
        return Schedule.from_skip_freq(args.skip_freq or DEFAULT_SKIP_FREQ, num_layers, args.window)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _fmt_tokens(n: float) -> str:
    """``4096`` -> ``4K``, ``131072`` -> ``128K``, ``1048576`` -> ``1M`` (plot ticks); other counts as they are."""
    n = int(round(n))
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


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

    cuda = torch.cuda.is_available() and not args.cpu
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    text = _demo_reads_text(args)
    if args.prompt:
        if not text:
            raise CLIError("--prompt takes text for the byte-level reference model (--config reference, without --hf)")
        from .reference import encode

        args.prompt_lens = [len(encode(t)) for t in args.prompt]
    _check_demo_sizes(args, device, dtype)
    prompts = _demo_text_prompts(args) if text else None
    model = _build_model(args, device=device, dtype=dtype)
    schedule = _schedule(args, model.config.num_hidden_layers)
    swa = apply(model, schedule)
    diff = graph_diff(trace(model).forward, swa)
    rng = random.Random(args.seed)
    if prompts is None:
        prompts = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in args.prompt_lens]
    # The same layers with a window covering every sequence: only the FP8 cache differs from the original.
    longest = max(args.prompt_lens) + args.max_new_tokens
    fp8_only = apply(model, type(schedule)(max(longest, schedule.window), schedule.swa_layers, schedule.num_layers))
    runs = {name: _demo_generate(m, prompts, args, cuda)
            for name, m in (("original", model), ("rewritten", swa), ("fp8-only", fp8_only))}
    summary = _demo_summary(args, model, prompts, runs, device, dtype, text)
    summary["agreement"] = [_agreement(model, prompts, runs[name], runs["original"], w, args)
                            for name, w in (("rewritten", schedule.window),
                                            ("fp8-only", fp8_only.swa_schedule.window))]
    if args.json:
        _print_json({**summary, "report": _report_json(swa.swa_report), "graph_diff": _diff_json(diff)})
        return 0
    print(swa.swa_report.render(args.report_tokens))
    print("\ngraph diff (forward):")
    print(diff.render(compact=True))
    _print_demo(summary, cuda)
    return 0


def _demo_reads_text(args) -> bool:
    """Whether the demo's model is the byte-level reference model (text prompts, text output)."""
    return args.config == "reference" and not args.hf


def _demo_text_prompts(args) -> list[list[int]]:
    """The reference model's prompts as byte tokens: each ``--prompt`` after ``BOS`` (the start of a file), else
    per ``--prompt-lens`` entry a span of that many bytes of a held-out file of the pinned corpus (never seen in
    training), starting where a line's text starts (after its indent); files and spans chosen by ``--seed``."""
    import re

    from .reference import encode
    from .reference.corpus import load_corpus

    if args.prompt:
        return [encode(t) for t in args.prompt]
    rng = random.Random(args.seed)
    texts = load_corpus().texts("heldout")
    prompts = []
    for n in args.prompt_lens:
        fits = [t for t in texts if len(t) >= n]
        if not fits:
            raise CLIError(f"--prompt-lens {n}: no held-out file of the reference corpus has {n} bytes "
                           f"(longest: {max(map(len, texts))}); use --prompt TEXT")
        data = rng.choice(fits)
        # First non-blank byte of each line, with n bytes from there on.
        starts = [m.start(1) for m in re.finditer(rb"^[ \t]*(\S)", data, re.M) if m.start(1) + n <= len(data)]
        start = rng.choice(starts or [0])
        prompts.append(list(data[start:start + n]))
    return prompts


def _engine_kw(args) -> dict:
    return dict(num_blocks=args.num_blocks, page_size=args.page_size, max_tokens_per_step=args.max_tokens_per_step)


def _demo_generate(model, prompts, args, cuda: bool) -> dict:
    """Greedy generation of every prompt, its time, the cache bytes and prompt 0's logits."""
    import torch

    from .runtime import Engine

    # On CUDA, decode steps replay CUDA graphs per batch bucket and overlap the host's next step with the device's
    # current one, as a serving engine runs them.
    graphs = dict(cuda_graphs=True, overlap=True,
                  max_model_len=max(map(len, prompts)) + args.max_new_tokens) if cuda else {}
    engine = Engine(model, **_engine_kw(args), **graphs)
    t0 = time.perf_counter()
    try:
        tokens = engine.generate(prompts, args.max_new_tokens)
    except ValueError as e:           # e.g. a prompt that needs more blocks than --num-blocks
        raise CLIError(f"{e} (see --num-blocks, --page-size, --max-tokens-per-step)") from None
    if cuda:
        torch.cuda.synchronize()
    return dict(tokens=tokens, seconds=time.perf_counter() - t0, stats=engine.stats,
                cache_bytes=sum(c.numel() * c.element_size() for c in engine.kv_caches),
                logits=Engine(model, **_engine_kw(args)).logits(prompts[0]))


def _agreement(model, prompts, run: dict, original: dict, window: int, args) -> dict:
    """How close a rewritten model's generation is to the original's: prompt 0's logits (relative
    difference), generated tokens equal (free-running), and tokens equal to the original's own greedy pick
    on the same prefix (free-running agreement stops counting at the first near-tie that flips)."""
    from .runtime import Engine

    a, b = run["logits"].double(), original["logits"].double()
    equal = sum(x == y for p, q in zip(run["tokens"], original["tokens"]) for x, y in zip(p, q))
    forced = 0
    for p, gen in zip(prompts, run["tokens"]):
        top = Engine(model, **_engine_kw(args)).logits(p + gen)[len(p) - 1:-1].argmax(-1).tolist()
        forced += sum(x == y for x, y in zip(top, gen))
    total = sum(len(g) for g in run["tokens"])
    return dict(window=window, logits_relative_difference=float((a - b).norm() / b.norm()),
                tokens_equal=equal, teacher_forced_equal=forced, tokens=total)


def _demo_summary(args, model, prompts, runs: dict, device: str, dtype, text: bool = False) -> dict:
    cfg, st = model.config, runs["original"]["stats"]
    name = args.hf or args.config
    if text and not _reference_trained():
        name += " (random weights: no checkpoint)"
    if text:
        from .reference import decode
    prompt_rows = [dict(length=len(p), original=o, rewritten=r)
                   for p, o, r in zip(prompts, runs["original"]["tokens"], runs["rewritten"]["tokens"])]
    if text:   # the byte-level reference model: the same tokens as text
        for row, p in zip(prompt_rows, prompts):
            row.update(text=decode(p), original_text=decode(row["original"]), rewritten_text=decode(row["rewritten"]))
    return dict(
        model=dict(name=name, num_layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                   kv_lora_rank=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim, device=device,
                   dtype=str(dtype).replace("torch.", "")),
        runtime=dict(page_size=args.page_size, num_blocks=args.num_blocks,
                     max_tokens_per_step=args.max_tokens_per_step, steps=st.steps,
                     prefill_tokens=st.prefill_tokens, decode_tokens=st.decode_tokens),
        kv_cache_bytes={name: r["cache_bytes"] for name, r in runs.items() if name != "fp8-only"},
        seconds={name: r["seconds"] for name, r in runs.items() if name != "fp8-only"},
        prompts=prompt_rows)


def _print_demo(summary: dict, cuda: bool) -> None:
    m, rt, kv = summary["model"], summary["runtime"], summary["kv_cache_bytes"]
    b0, b1 = kv["original"], kv["rewritten"]
    print(f"\nmodel      {m['name']}: {m['num_layers']} layers, H={m['heads']}, R={m['kv_lora_rank']}, "
          f"P={m['rope_dim']}, on {m['device']} ({m['dtype']})")
    print(f"runtime    page size {rt['page_size']}, {rt['num_blocks']} blocks, {rt['max_tokens_per_step']} tokens "
          f"per step; {rt['steps']} steps, {rt['prefill_tokens']} prefill + {rt['decode_tokens']} decode tokens")
    print(f"kv cache   {format_bytes(b0)} -> {format_bytes(b1)} allocated for {rt['num_blocks'] * rt['page_size']} "
          f"token slots ({100 * (1 - b1 / b0):.1f}% less)")
    print("agreement  with the original: prompt 0 logits (relative difference), generated tokens equal "
          "(free-running), and equal to the original's pick on the same prefix")
    notes = ["(the window changes the model: expected to differ)",
             "(window covers every sequence: FP8 error only)"]
    for a, note in zip(summary["agreement"], notes):
        print(f"  window {a['window']:>5} + FP8 cache: logits {a['logits_relative_difference']:.2e}, tokens "
              f"{a['tokens_equal']}/{a['tokens']}, {a['teacher_forced_equal']}/{a['tokens']} {note}")
    for i, p in enumerate(summary["prompts"]):
        if "text" in p:    # byte tokens: show the prompt's end and the continuations as (escaped) text
            tail = p["text"][-72:]
            print(f"  prompt {i} ({p['length']} bytes) {'...' if len(p['text']) > len(tail) else ''}{tail!r}\n"
                  f"    original  {p['original_text']!r}\n    rewritten {p['rewritten_text']!r}")
            continue
        print(f"  prompt {i} ({p['length']} tokens)\n    original  {' '.join(map(str, p['original']))}\n"
              f"    rewritten {' '.join(map(str, p['rewritten']))}")
    if cuda:
        sec = summary["seconds"]
        print(f"time       original {sec['original'] * 1e3:.1f} ms, rewritten {sec['rewritten'] * 1e3:.1f} ms")


# --------------------------------------------------------------------------------------------- reports
def _print_json(obj: dict) -> None:
    print(json.dumps(obj, indent=2))


def _report_json(report) -> dict:
    """``RewriteReport`` as JSON: the schedule, per-layer rows, totals and the passes' results."""
    def cache(c):
        return {"dtype": str(c[0]).replace("torch.", ""), "width": c[1], "bytes_per_token": c[1] * c[0].itemsize}

    return dict(schedule=report.schedule.to_dict(),
                bytes_per_token=dict(full=report.bytes_per_token(False), rewritten=report.bytes_per_token(True)),
                layers=[dict(layer=r.layer, attention_before=r.kind_before, attention_after=r.kind_after,
                             window=r.window, sinks=r.sinks, cache_before=cache(r.cache_before),
                             cache_after=cache(r.cache_after))
                        for r in report.rows],
                passes=[dict(name=p.name, matched=p.num_matches, skipped=list(p.skipped)) for p in report.passes],
                pass_uuid=report.uuid)


def _diff_json(diff) -> dict:
    """``GraphDiff`` as JSON: the changed layer indices, whether nodes outside any layer changed (e.g. the
    step check's per-layer cache groups), and one entry per layer (``layer`` null for nodes outside any layer)."""
    return dict(changed_layers=[k for k in diff.changed_layers if k is not None],
                outside_layers_changed=None in diff.changed_layers,
                layers=[dataclasses.asdict(d) for _, d in sorted(diff.layers.items(),
                                                                 key=lambda kv: (kv[0] is None, kv[0] or 0))])


# ------------------------------------------------------------------------------------------------- diff
def cmd_diff(args: argparse.Namespace) -> int:
    from .graph_diff import graph_diff
    from .rewrite import apply, trace

    model = _build_model(args, meta=True)
    schedule = _schedule(args, model.config.num_hidden_layers)
    before, after = trace(model), apply(model, schedule)
    forward, allocation = graph_diff(before.forward, after), graph_diff(before.allocation, after._swa_allocation)
    if args.json:
        _print_json(dict(schedule=schedule.to_dict(), forward=_diff_json(forward),
                         cache_allocation=_diff_json(allocation)))
        return 0
    print(f"# {schedule}")
    print("## forward graph")
    print(forward.render(compact=args.compact))
    print("## cache allocation graph")
    print(allocation.render(compact=args.compact))
    return 0


# ----------------------------------------------------------------------------------------------- memory
DEFAULT_BUDGET_GIB = 60.0


def _context_bytes(report, contexts: Sequence[int], page_size: int, *, chunk: int = 1,
                   budget: int = int(DEFAULT_BUDGET_GIB * 2**30)) -> list[dict]:
    """One request's cache at each context, as ``RewriteReport.memory`` gives it (``RequestMemory.to_dict``):
    original, rewritten window-bounded and unbounded bytes, per group and in total, the bytes ratios and the
    requests ``budget`` bytes hold (README.md, "Machine-readable reports")."""
    return [report.memory(ctx, page_size, chunk=chunk, budget=budget).to_dict() for ctx in contexts]


def memory_table(report, contexts: Sequence[int], page_size: int, *, chunk: int = 1,
                 budget: int = int(DEFAULT_BUDGET_GIB * 2**30)) -> str:
    """``RewriteReport.render_memory``: the cache groups, then per context one request's bytes (original, per
    group, rewritten bounded and unbounded), the bytes ratio and the capacity ratio in ``budget`` bytes."""
    return report.render_memory(contexts, page_size, chunk=chunk, budget=budget)


def _windows(report) -> list[int]:
    """The distinct windows of the rewritten model's sliding layers."""
    return sorted({s.window for s in report.kv_cache_spec() if s.window is not None})


def _schedule_words(schedule) -> str:
    """``46 of 61 layers SWA, W = 4K`` (``W = 64, 128`` for per-layer windows; sinks when any)."""
    n_swa, n = len(schedule.swa_layers), schedule.num_layers
    windows = sorted(set(schedule.windows.values()))
    text = f"{n_swa} of {n} layers SWA"
    if windows:
        text += ", W = " + ", ".join(_fmt_tokens(w) for w in windows)
    sinks = sorted(set(schedule.sinks.values()) - {0})
    if sinks:
        text += ", sinks " + ", ".join(map(str, sinks))
    return text


def plot_memory(report, contexts: Sequence[int], page_size: int, path: str, title: str, *, chunk: int = 1) -> None:
    """A PNG of one request's KV-cache bytes against context length: the original model, the rewritten one
    with window-bounded sliding caches, and the rewritten one keeping every position (unbounded); both axes
    log-scaled and labelled, each distinct window marked, the ratios at the longest context in the legend;
    readable for 61-layer schedules (the title names counts, not the layout)."""
    try:
        import matplotlib
    except ImportError:
        raise CLIError("the memory plot needs matplotlib: pip install 'swa-rewrite[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (FuncFormatter below)

    windows = _windows(report)
    # From well below the smallest window (where bounded and unbounded agree) to the longest context: the
    # requested contexts, each window and just past it (where the bounded curve bends), and every power of two
    # in range, for a smooth curve.
    lo = min([min(contexts)] + [max(1, w // 8) for w in windows])
    hi = max([max(contexts)] + windows)
    xs = sorted(set(contexts) | set(windows) | {w + page_size for w in windows if w + page_size <= hi}
                | {1 << k for k in range(hi.bit_length()) if lo <= 1 << k <= hi})
    mems = [report.memory(x, page_size, chunk=chunk) for x in xs]
    last, n = mems[-1], report.schedule.num_layers
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    ax.plot(xs, [m.original_bytes for m in mems], marker="o", markersize=3,
            label=f"original, full attention ({n} layers): {format_bytes(last.original_bytes)} at "
                  f"{_fmt_tokens(last.context)}")
    ax.plot(xs, [m.unbounded_bytes for m in mems], marker="o", markersize=3, linestyle=":",
            label=f"rewritten, every position kept: {format_bytes(last.unbounded_bytes)} "
                  f"({last.unbounded_bytes_ratio:.2f}x less)")
    ax.plot(xs, [m.rewritten_bytes for m in mems], marker="o", markersize=3,
            label=f"rewritten, window-bounded: {format_bytes(last.rewritten_bytes)} "
                  f"({last.bytes_ratio:.2f}x less)")
    for w in windows:
        ax.axvline(w, color="gray", linestyle="--", linewidth=1)
        # Top left is empty: the curves rise to the right and the legend sits bottom right.
        ax.annotate(f" window W = {_fmt_tokens(w)} ", (w, 0.97), xycoords=("data", "axes fraction"),
                    rotation=90, ha="left", va="top", fontsize=9, color="gray")
    ax.set_xlim(lo / 1.25, hi * 1.25)     # the window lines off the frame
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ticker = matplotlib.ticker
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _fmt_tokens(v)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: format_bytes(v)))
    ax.set_xlabel("context length (tokens of one request, log scale)")
    ax.set_ylabel(f"KV cache of one request (log scale; page size {page_size})")
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
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
    name = args.hf or args.config
    budget = int(args.budget * 2**30)
    if args.plot:
        plot_memory(report, args.contexts, args.page_size, args.plot,
                    f"KV cache of one request: {name} ({schedule.num_layers} layers), {_schedule_words(schedule)}",
                    chunk=args.chunk)
    contexts = _context_bytes(report, args.contexts, args.page_size, chunk=args.chunk, budget=budget)
    if args.json:
        _print_json(dict(model=name, page_size=args.page_size, chunk=args.chunk, budget_bytes=budget,
                         report=_report_json(report), contexts=contexts, plot=args.plot))
        return 0
    print(report.render(saved=False))
    print()
    print(memory_table(report, args.contexts, args.page_size, chunk=args.chunk, budget=budget))
    if args.plot:
        print(f"\nwrote {args.plot}")
    return 0


# ------------------------------------------------------------------------------------------------ bench
def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise CLIError("bench needs a CUDA device (none is visible); run it on a GPU machine")
    skeleton = _build_model(args, meta=True, dtype=torch.bfloat16)
    if args.capacity:
        _check_fits("cuda", {"weights": _weight_bytes(skeleton),
                             f"KV caches (--budget {args.budget_gib:g} GiB)": int(args.budget_gib * 2**30)})
        from .bench import run_capacity

        model = _build_model(args, device="cuda", dtype=torch.bfloat16)
        run_capacity(model, _schedule(args, model.config.num_hidden_layers), args)
        return 0
    # The largest context's caches (original model, --batch requests; see bench.py) beside the weights.
    slots = args.batch * -(-(max(args.contexts) + 1) // args.page_size) * args.page_size
    _check_fits("cuda", {"weights": _weight_bytes(skeleton),
                         f"KV caches (--batch {args.batch} x context {max(args.contexts)})":
                         slots * _cache_bytes_per_slot(skeleton)})
    from .bench import run_bench

    model = _build_model(args, device="cuda", dtype=torch.bfloat16)
    run_bench(model, _schedule(args, model.config.num_hidden_layers), args)
    return 0


# ------------------------------------------------------------------------------------------ eval, calibrate
DEFAULT_BUCKETS = "0,256,1024,2048,4096"
_SPEC = r"(skip-freq|skip-freq-list|swa-layers)=([0-9,]+)@([0-9]+)(?:\+([0-9]+))?"
_LAYER_SPEC = r"([0-9]+)@([0-9]+)(?:\+([0-9]+))?"
SCHEDULE_SPEC_HELP = ("skip-freq=N@W[+S] (every N-th layer full, window W, S sink tokens), "
                      "skip-freq-list=1,0,..@W[+S], swa-layers=I,J,..@W[+S], per-layer=I@W[+S],J@W[+S],.., or a "
                      "schedule JSON file "
                      "(Schedule.to_json; what calibrate --out writes)")


def parse_schedule_spec(text: str, num_layers: int):
    """``(name, Schedule)`` of one ``--schedule`` value (``SCHEDULE_SPEC_HELP``); ``CLIError`` naming it."""
    import re

    from .evaluate import schedule_label
    from .schedule import Schedule

    try:
        if os.path.isfile(text) or text.endswith(".json"):
            try:
                with open(text, encoding="utf-8") as f:
                    schedule = Schedule.from_json(f.read())
            except OSError as e:
                raise CLIError(f"--schedule {text}: cannot read the schedule file: {e}") from None
            schedule.check_num_layers(num_layers)
            return f"{os.path.splitext(os.path.basename(text))[0]} {schedule_label(schedule)}", schedule
        if text.startswith("per-layer="):
            layers = {}
            for item in text[len("per-layer="):].split(","):
                m = re.fullmatch(_LAYER_SPEC, item)
                if m is None:
                    raise ValueError(f"per-layer entries are LAYER@WINDOW[+SINKS], got {item!r}")
                layers[int(m[1])] = (int(m[2]), int(m[3] or 0))
            schedule = Schedule.per_layer(layers, num_layers)
            return schedule_label(schedule), schedule
        m = re.fullmatch(_SPEC, text)
        if m is None:
            raise ValueError(f"expected {SCHEDULE_SPEC_HELP}")
        kind, value, window, sinks = m[1], m[2], int(m[3]), int(m[4] or 0)
        if kind == "skip-freq":
            schedule = Schedule.from_skip_freq(int(value), num_layers, window)
        elif kind == "skip-freq-list":
            schedule = Schedule.from_skip_freq(_int_list(value), num_layers, window)
        else:
            schedule = Schedule(window, _int_list(value), num_layers)
        if sinks:
            schedule = Schedule(window, schedule.swa_layers, num_layers, sinks=sinks)
        name = f"skip-freq {value} W{window}" if kind == "skip-freq" else schedule_label(schedule)
        return name + (f" + {sinks} sinks" if sinks and kind == "skip-freq" else ""), schedule
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise CLIError(f"--schedule {text}: {e}") from None


def _reference():
    """The reference-model package (``swa_rewrite.reference``) when this install has it, else None."""
    try:
        from . import reference
    except ImportError:
        return None
    return reference


def _reference_checkpoint() -> Optional[str]:
    """The shipped reference checkpoint's folder, when this checkout has the trained weights."""
    ref = _reference()
    if ref is None or not all(os.path.isfile(os.path.join(ref.CHECKPOINT_DIR, f))
                              for f in ("config.json", "model.safetensors")):
        return None
    return str(ref.CHECKPOINT_DIR)


def _eval_model(args):
    """``(model, name)``: ``--model DIR``, the shipped reference model (``--config reference``, the default), or
    random weights of ``--config``; on CUDA in bfloat16 unless ``--cpu``, else on the CPU in float32."""
    import torch

    from .models import MLAConfig, MLAModel, from_pretrained

    cuda = torch.cuda.is_available() and not args.cpu
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if args.model and args.config:
        raise CLIError("give --model DIR (a checkpoint) or --config NAME, not both")
    if args.layers and (args.model or args.config in (None, "reference")):
        raise CLIError("--layers applies to the random configs (tiny, v3-attn); a checkpoint's layer count comes "
                       "from its config")
    path = args.model or (_reference_checkpoint() if args.config in (None, "reference") else None)
    if path is None:
        name, ref = args.config or "reference", _reference()
        if name == "reference":
            why = ("this install has no reference model package" if ref is None else
                   "the reference checkpoint is not in this checkout (train it: python -m swa_rewrite.reference.train)")
            name = "tiny" if ref is None else name
            print(f"swa-rewrite: note: {why}; using random weights of the {name} config (its numbers say nothing "
                  f"about accuracy)", file=sys.stderr)
        config = ref.REFERENCE_CONFIG if name == "reference" else MLAConfig.named(name)
        if args.layers:
            config = config.replace(num_hidden_layers=args.layers)
        model = MLAModel(config, device=device, dtype=dtype, seed=args.seed)
        return model, f"{name} (random weights, seed {args.seed})"
    try:
        model = from_pretrained(path, dtype=dtype, device=device)
    except OSError as e:
        raise CLIError(f"--model {path}: cannot read the checkpoint: {e}") from None
    except ValueError as e:
        raise CLIError(f"--model {path}: {e}") from None
    return model, ("reference model" if args.model is None else os.path.basename(os.path.normpath(path)))


def _eval_stream(args, model) -> tuple[Optional[list[int]], str]:
    """The held-out token stream and its description: ``--data`` files, else the pinned corpus's held-out
    files (byte tokens; each file after the reference model's BOS when the model has that vocabulary), else
    None (random tokens)."""
    from .evaluate import byte_stream, read_byte_files

    vocab = model.config.vocab_size
    ref = _reference()
    bos = ref.BOS if ref is not None and vocab == ref.VOCAB_SIZE else None
    if args.data:
        if vocab < 256:
            raise CLIError(f"--data is read as bytes; the model's vocabulary has {vocab} tokens (needs >= 256)")
        files = read_byte_files(args.data)
        return byte_stream([b for _, b in files], bos=bos), f"{len(files)} files from --data"
    if ref is not None and vocab >= 256:
        try:
            from .reference.corpus import load_corpus

            texts = load_corpus().texts("heldout")
        except (ImportError, OSError):
            texts = None
        if texts:
            return byte_stream(texts, bos=bos), f"{len(texts)} held-out files of the pinned Python stdlib corpus"
    return None, "random tokens"


def _cut_buckets(buckets: Sequence[int], seq_len: int) -> list[int]:
    return [b for b in buckets if b < seq_len] + [seq_len]


def _retrieval_prefix(seq_len: int) -> int:
    """Filler before a retrieval sample's statement: 64 tokens, less for short sequences."""
    return min(64, seq_len // 16)


def _default_distances(seq_len: int) -> list[int]:
    """Powers of two from 64 and the longest distance a ``seq_len`` sample holds (rounded down to 256)."""
    longest = seq_len - _retrieval_prefix(seq_len) - 32      # the question and the value take 25 tokens
    out = [1 << k for k in range(6, 30) if 1 << k <= longest]
    if longest >= 256:
        out.append(longest // 256 * 256)
    return sorted(set(out))


def _eval_data(args, model, count: int, extra: int = 0):
    """``(sequences, extra_sequences, filler, description)``: ``count`` held-out windows of ``--seq-len`` for
    evaluation and ``extra`` more (disjoint; calibration), evenly spaced over the stream, or random tokens."""
    from .evaluate import random_sequences, token_windows

    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    stream, what = _eval_stream(args, model)
    if stream is None:
        seqs = random_sequences(count + extra, seq_len, model.config.vocab_size, seed=args.seed)
        return seqs[:count], seqs[count:], None, what
    try:
        windows = token_windows(stream, seq_len, count + extra)
    except ValueError as e:
        raise CLIError(f"{what}: {e} (see --seq-len)") from None
    if len(windows) < count + extra:
        raise CLIError(f"{what}: {len(stream)} tokens hold only {len(windows)} sequences of {seq_len}; asked for "
                       f"{count + extra} (see --sequences, --seq-len)")
    picked = set(range(1, count + extra, 2)[:extra]) if extra else set()   # calibration: every other window
    if len(picked) < extra:
        picked |= set(range(0, count + extra, 2)[:extra - len(picked)])
    evals = [w for i, w in enumerate(windows) if i not in picked]
    return evals, [windows[i] for i in sorted(picked)], evals, what


def _retrieval(args, seq_len: int, filler):
    from .evaluate import retrieval_samples

    if args.retrieval_samples <= 0:
        return []
    distances = args.distances or _default_distances(seq_len)
    try:
        samples = retrieval_samples(distances, num_samples=args.retrieval_samples, filler=filler, seed=args.seed,
                                    prefix=_retrieval_prefix(seq_len))
    except ValueError as e:
        raise CLIError(f"--distances: {e}") from None
    too_long = sorted({s.distance for s in samples if len(s.tokens) > seq_len})
    if too_long:
        raise CLIError(f"--distances {too_long}: a sample that long does not fit in --seq-len {seq_len} tokens "
                       f"(filler, statement, distance, question)")
    return samples


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _plot_report(report, path: str, title: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("the plot needs matplotlib: pip install 'swa-rewrite[plot]'") from None
    try:
        report.plot(path, title)
    except OSError as e:
        raise CLIError(f"--plot {path}: cannot write the image: {e}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    model, name = _eval_model(args)
    n = model.config.num_hidden_layers
    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    specs = args.schedule or [f"skip-freq=2@{max(1, seq_len // 4)}", f"skip-freq=2@{max(1, seq_len // 4)}+4"]
    schedules = dict(parse_schedule_spec(s, n) for s in specs)
    if len(schedules) != len(specs):
        raise CLIError(f"--schedule: two specs name the same schedule ({specs})")
    sequences, _, filler, what = _eval_data(args, model, args.sequences)
    report = evaluate(model, sequences, schedules, retrieval=_retrieval(args, seq_len, filler),
                      buckets=_cut_buckets(args.buckets, seq_len), page_size=args.page_size,
                      max_tokens_per_step=args.max_tokens_per_step, name=name, show_progress=not args.no_progress)
    if args.plot:
        _plot_report(report, args.plot, f"{name}: {what}, {len(sequences)} x {seq_len} tokens")
    if args.json:
        _print_json(dict(report.to_dict(), data=what, seq_len=seq_len, plot=args.plot))
        return 0
    print(f"data: {what}, {_count(len(sequences), 'sequence')} of {seq_len} tokens")
    print(report.render())
    if args.plot:
        print(f"\nwrote {args.plot}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import compare_schedules, measure_window_costs, propose_schedule

    model, name = _eval_model(args)
    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    context = args.context or seq_len
    windows = args.windows or sorted({max(1, context // 8), max(1, context // 4), max(1, context // 2)})
    if not 0 < args.saving < 1:
        raise CLIError(f"--saving must be a fraction between 0 and 1, got {args.saving}")
    if args.plot and not args.compare:
        raise CLIError("--plot draws the comparison: add --compare")
    sequences, calib, filler, what = _eval_data(args, model, args.sequences if args.compare else 0,
                                                args.calibration_sequences)
    cal = measure_window_costs(model, calib, windows, args.sinks, max_tokens_per_step=args.max_tokens_per_step,
                               show_progress=not args.no_progress)
    try:
        proposal = propose_schedule(cal, args.saving, context, page_size=args.page_size, metric=args.metric)
    except ValueError as e:
        raise CLIError(f"{e} (see --saving, --windows, --sinks)") from None
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(proposal.schedule.to_json() + "\n")
        except OSError as e:
            raise CLIError(f"--out {args.out}: cannot write the schedule: {e}") from None
    report = None
    if args.compare:
        report = compare_schedules(model, sequences, proposal, windows=windows, sinks=args.compare_sinks,
                                   retrieval=_retrieval(args, seq_len, filler),
                                   buckets=_cut_buckets(args.buckets, seq_len),
                                   max_tokens_per_step=args.max_tokens_per_step, name=name,
                                   show_progress=not args.no_progress)
        if args.plot:
            _plot_report(report, args.plot, f"{name}: calibrated vs skip-frequency schedules at "
                                             f"{100 * args.saving:.0f}% KV saving ({what})")
    if args.json:
        _print_json(dict(model=name, data=what, seq_len=seq_len, calibration=cal.to_dict(),
                         proposal=proposal.to_dict(), schedule_file=args.out,
                         comparison=report.to_dict() if report is not None else None, plot=args.plot))
        return 0
    print(f"data: {what}; calibration on {_count(len(calib), 'sequence')} of {seq_len} tokens")
    print(cal.render(args.metric))
    print()
    print(proposal.render())
    if args.out:
        print(f"wrote {args.out} (swa-rewrite eval --schedule {args.out})")
    if report is not None:
        print()
        print(report.render())
    if args.plot:
        print(f"\nwrote {args.plot}")
    return 0


def _add_eval_args(p: argparse.ArgumentParser, *, calibrate: bool = False) -> None:
    m = p.add_argument_group("model (default: the shipped reference model)")
    m.add_argument("--model", metavar="DIR", help="a Hugging Face DeepSeek-V2/V3 checkpoint folder (from_pretrained)")
    m.add_argument("--config", choices=["reference", "tiny", "v3-attn"],
                   help="reference: the shipped trained model (the default); tiny, v3-attn: random weights")
    m.add_argument("--layers", type=_positive, help="with --config: override its number of layers")
    m.add_argument("--seed", type=_seed, default=0, help="random weights (--config), random data, retrieval keys")
    m.add_argument("--cpu", action="store_true", help="run on the CPU (float32) even if CUDA is available")
    d = p.add_argument_group("data (default: the pinned corpus's held-out files; random tokens without it)")
    d.add_argument("--data", nargs="+", metavar="PATH", help="held-out text files or folders (*.py), read as bytes")
    d.add_argument("--seq-len", type=_positive, default=4096,
                   help="tokens per sequence (at most the model's positions)")
    d.add_argument("--sequences", type=_positive, default=8,
                   help="held-out sequences to evaluate" + (" (with --compare)" if calibrate else ""))
    e = p.add_argument_group("evaluation" + (" (with --compare)" if calibrate else ""))
    e.add_argument("--buckets", type=_int_list, default=DEFAULT_BUCKETS, metavar="N,N,...",
                   help="position buckets of the perplexity table (cut at --seq-len)")
    e.add_argument("--distances", type=_int_list, metavar="N,N,...",
                   help="retrieval distances in tokens (default: 64, 128, ... and the longest --seq-len holds)")
    e.add_argument("--retrieval-samples", type=int, default=8, metavar="N", help="samples per distance (0: none)")
    e.add_argument("--page-size", type=_positive, default=64, help="positions per cache block (engine and memory)")
    e.add_argument("--max-tokens-per-step", type=_positive, default=1024, help="the engine's prefill chunk")
    e.add_argument("--no-progress", action="store_true", help="no progress bar (off anyway when not a TTY)")
    e.add_argument("--plot", metavar="PNG", help="write a plot of perplexity and retrieval to this PNG file")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of text (keys: README.md)")


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="swa-rewrite", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,diff,memory,bench,eval,calibrate}")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description, formatter_class=_HelpFormatter)
        _add_model_args(p)
        return p

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true",
                       help="print the report as one JSON object instead of text (keys: README.md)")

    demo = command("demo", "rewrite the bundled model, generate with it and the original side by side",
                   "Rewrite the trained reference model (or --config tiny / v3-attn with random weights, or --hf "
                   "DIR), run a generation through the rewritten and the original model, and compare them. The "
                   "reference model reads and writes text (bytes): its prompts are spans of held-out files of its "
                   "corpus, or --prompt TEXT; other models get random token prompts.")
    demo.add_argument("--seed", type=_seed, default=0, help="prompt seed, and weights seed of random configs")
    demo.add_argument("--prompt-lens", type=_positive, nargs="+", default=[200, 37, 5],
                      help="prompt lengths (the first is longer than the default window)")
    demo.add_argument("--prompt", action="append", metavar="TEXT",
                      help="a text prompt for the reference model (repeat for several; replaces --prompt-lens)")
    demo.add_argument("--max-new-tokens", type=_positive, default=16, help="tokens generated per prompt")
    demo.add_argument("--page-size", type=_positive, default=16, help="positions per cache block")
    demo.add_argument("--num-blocks", type=_positive, default=256, help="cache blocks per engine")
    demo.add_argument("--max-tokens-per-step", type=_positive, default=32, help="chunked-prefill token budget")
    demo.add_argument("--report-tokens", type=_positive, default=128 * 1024,
                      help="cached tokens for the report's bytes-saved line")
    demo.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    json_flag(demo)
    demo.set_defaults(func=cmd_demo, config=DEMO_CONFIG)

    diff = command("diff", "print the graph diff of the rewrite for a config and schedule",
                   "Trace the model (on the meta device) and print what the rewrite changes, grouped by layer.")
    diff.add_argument("--compact", action="store_true", help="one line per changed layer")
    json_flag(diff)
    diff.set_defaults(func=cmd_diff)

    memory = command("memory", "KV-cache bytes per request, per cache group and context, capacity ratio; plot",
                     "Per-layer cache table for a config and schedule, then one request's KV-cache bytes at each "
                     "context: per cache group and in total, original vs rewritten (sliding groups window-bounded, "
                     "and unbounded: every position kept), and the capacity ratio (requests of that context a "
                     "--budget holds, rewritten over original). With --plot, a PNG of bytes against context "
                     "length (log axes, each window marked).")
    memory.add_argument("--page-size", type=_positive, default=64, help="positions per cache block")
    memory.add_argument("--contexts", type=_int_list, default="4096,32768,131072", metavar="N,N,...",
                        help="context lengths")
    memory.add_argument("--chunk", type=_positive, default=1,
                        help="tokens a request computes per step (1: decode; a prefill chunk holds more blocks)")
    memory.add_argument("--budget", type=_positive_float, default=DEFAULT_BUDGET_GIB, metavar="GiB",
                        help="KV-cache budget for the capacity ratio, in GiB")
    memory.add_argument("--plot", metavar="PNG", default=None, help="write the plot to this PNG file")
    json_flag(memory)
    memory.set_defaults(func=cmd_memory)

    bench = command("bench", "end-to-end decode/prefill throughput on CUDA, original vs rewritten",
                    "Decode and prefill throughput, unrewritten vs rewritten, at several contexts (CUDA only; "
                    "--config v3-attn for DeepSeek-V3's attention dims).")
    bench.add_argument("--contexts", type=_int_list, default="4096,32768,131072", metavar="N,N,...",
                       help="context lengths")
    bench.add_argument("--batch", type=_positive, default=16, help="decode requests per step")
    bench.add_argument("--prefill-tokens", type=_positive, default=2048, help="tokens in the timed prefill chunk")
    bench.add_argument("--page-size", type=_positive, default=64, help="positions per cache block")
    bench.add_argument("--iters", type=_positive, default=20, help="timed decode steps per point")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar (off anyway when not a TTY)")
    bench.add_argument("--capacity", action="store_true",
                       help="instead: the largest batch of context-long requests each model holds in --budget GiB "
                            "of KV cache (window-bounded SWA groups), and its decode throughput at that batch")
    bench.add_argument("--budget", dest="budget_gib", type=float, default=DEFAULT_BUDGET_GIB, metavar="GIB",
                       help="KV-cache budget in GiB for --capacity")
    bench.add_argument("--unbounded", action="store_true",
                       help="with --capacity: also the rewritten model with every position kept")
    bench.set_defaults(func=cmd_bench)

    evaluate = sub.add_parser(
        "eval", help="held-out perplexity by context and key retrieval, original vs each schedule",
        formatter_class=_HelpFormatter,
        description="Run held-out sequences through the paged engine (window-bounded caches) for the original model "
                    "and for each --schedule: perplexity by position bucket, and a retrieval test (a key stated "
                    "early, asked for --distances tokens later), beside each schedule's KV-cache saving. Without "
                    "--schedule: skip-freq 2 with W = --seq-len / 4, without and with 4 sinks.")
    evaluate.add_argument("--schedule", action="append", metavar="SPEC", help=SCHEDULE_SPEC_HELP + "; repeatable")
    _add_eval_args(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    calibrate = sub.add_parser(
        "calibrate", help="rank layers by what a window costs them and propose a schedule for a KV saving",
        formatter_class=_HelpFormatter,
        description="Measure on --calibration-sequences held-out sequences, per layer and candidate window and sink "
                    "count, the attention mass outside the window and the attention output's relative error; "
                    "propose the schedule of least cost that saves --saving of one --context request's KV cache; "
                    "with --compare, evaluate it beside skip-frequency schedules of the nearest memory, without "
                    "and with sinks.")
    calibrate.add_argument("--saving", type=float, default=0.5, help="KV-cache fraction to save (0 to 1)")
    calibrate.add_argument("--context", type=_positive, help="request length of the memory target (default: --seq-len)")
    calibrate.add_argument("--windows", type=_int_list, metavar="W,W,...",
                           help="candidate windows (default: --context / 8, / 4, / 2)")
    calibrate.add_argument("--sinks", type=_int_list, default="0,4", metavar="S,S,...", help="candidate sink counts")
    calibrate.add_argument("--metric", choices=["mass_outside", "output_error"], default="mass_outside",
                           help="what the proposal minimises (summed over the SWA layers)")
    calibrate.add_argument("--calibration-sequences", type=_positive, default=4, metavar="N",
                           help="sequences measured (disjoint from the --compare ones)")
    calibrate.add_argument("--out", metavar="JSON", help="write the proposed schedule here (for eval --schedule)")
    calibrate.add_argument("--compare", action="store_true",
                           help="evaluate the proposal, its sinks variant and the nearest skip-freq schedules")
    calibrate.add_argument("--compare-sinks", type=int, default=4, metavar="S",
                           help="sink tokens of the comparison's sinks variants")
    _add_eval_args(calibrate, calibrate=True)
    calibrate.set_defaults(func=cmd_calibrate)
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
