"""Train the reference model on the pinned corpus: ``python -m swa_rewrite.reference.train``.

What it does, in order: verify and load the corpus (``reference.corpus``: training files only, held-out files
for evaluation), build ``MLAModel(REFERENCE_CONFIG)`` with a training init, then for ``--steps`` steps (or
until ``--time-limit-s``) sample ``--batch`` windows of ``--seq-len + 1`` tokens at random offsets of the
training stream, write key-value statements and their repeats into ``--retrieval-fraction`` of them
(``add_key_values``: the skill the evaluation's retrieval test asks for), run ``models.dense.dense_forward`` (the model's own modules, causal SDPA; the paged ops have
no autograd) under bf16 autocast on CUDA, and take an AdamW step on a warmup + cosine learning rate. Every
``--eval-every`` steps it prints the training loss and the held-out loss, overall and by position bucket
(``0-128``, ``128-512``, ``512-2048``, ``2048-4096`` within the window): a model that uses long context has
lower loss at late positions. At the end it writes ``config.json`` + ``model.safetensors`` (bf16, Hugging Face
DeepSeek-V3 form, ``models.save_pretrained``) and ``train_log.json`` (arguments, curves, final per-bucket and
per-position held-out loss) into ``--out``.

Determinism: the init, the data order and the held-out windows depend on ``--seed`` alone (CPU generators),
so a run is repeatable on any machine; on CUDA some backward kernels (embedding, attention) accumulate with
atomics, so the bits of the trained weights may differ from run to run. With ``--time-limit-s`` the schedule
runs on ``max(step / steps, elapsed / time_limit)``: the cosine ends when either runs out, so a run cut short
by time still ends annealed (and depends on the machine's speed).

On one H200: ``python -m swa_rewrite.reference.train --time-limit-s 400 --out DIR`` (eager, bf16 autocast,
flash attention through SDPA). Measured (H200, torch 2.11): 1.05M tokens/s, so the default 1400 steps of
32 x 4096 tokens (183M tokens, about 20 passes over the 9.2M training tokens) take 180 s, 19 GiB peak;
slower, the time limit ends the schedule early. The windows are 4096 long so that every position the model serves
(``max_position_embeddings``) was trained.

``--smoke`` is a few tiny CPU steps (tests use it); ``--compile`` compiles the forward with ``torch.compile``
(a minute of compiling on CPU; not timed on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..models.config import MLAConfig
from ..models.dense import dense_forward
from ..models.mla import MLAModel
from .corpus import MANIFEST, load_corpus
from .model import CHECKPOINT_DIR, REFERENCE_CONFIG

# Position buckets of the logged losses: [0, 128), [128, 512), [512, 2048), [2048, 4096), cut at the window.
BUCKET_EDGES = (0, 128, 512, 2048, 4096)


@dataclasses.dataclass
class TrainArgs:
    """Every setting of a run (also written to ``train_log.json``)."""

    out: str = str(CHECKPOINT_DIR)
    steps: int = 1400
    batch: int = 32
    seq_len: int = 4096
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 80
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_windows: int = 64
    final_eval_windows: int = 192
    retrieval_fraction: float = 0.25
    time_limit_s: Optional[float] = None
    compile: bool = False
    device: Optional[str] = None
    smoke: bool = False


def bucket_edges(seq_len: int) -> list[int]:
    """``BUCKET_EDGES`` cut at ``seq_len`` (which ends the last bucket)."""
    return [e for e in BUCKET_EDGES if e < seq_len] + [seq_len]


def bucket_names(seq_len: int) -> list[str]:
    edges = bucket_edges(seq_len)
    return [f"{a}-{b}" for a, b in zip(edges, edges[1:])]


def bucket_means(per_position: torch.Tensor) -> list[float]:
    """Means of ``per_position [L]`` (a loss per position) over each bucket of ``bucket_edges(L)``."""
    edges = bucket_edges(per_position.shape[0])
    return [per_position[a:b].mean().item() for a, b in zip(edges, edges[1:])]


@torch.no_grad()
def init_weights(model: MLAModel, seed: int) -> None:
    """Training init, from ``seed`` on the CPU (the same weights on every device): linear weights and
    embeddings ``N(0, 0.02)``, the residual branches' output projections (``o_proj``, ``down_proj``)
    ``N(0, 0.02 / sqrt(2 * layers))``, norms 1."""
    g = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.config.num_hidden_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        p.copy_(torch.randn(p.shape, generator=g) * std)


def lr_at(args: TrainArgs, step: int, progress: float) -> float:
    """Learning rate at ``step`` (linear warmup) and ``progress`` in [0, 1] (cosine to ``min_lr_ratio``)."""
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    cosine = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warm * cosine


def sample_batch(stream: torch.Tensor, gen: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
    """``[batch, seq_len + 1]`` int64 windows of ``stream`` (on its device) at offsets drawn from ``gen``."""
    starts = torch.randint(0, stream.shape[0] - seq_len, (batch,), generator=gen)
    idx = starts.to(stream.device)[:, None] + torch.arange(seq_len + 1, device=stream.device)
    return stream[idx].long()


# Key-value pairs written into a fraction of the training windows (``--retrieval-fraction``): a statement
# ``\n<name> = "<value>"\n`` and, later in the window, the same statement again. Python source repeats
# identifiers but almost never an unpredictable string, so without these a model this small learns to use long
# context for statistics only and cannot look a random value up; the evaluation's retrieval test (fresh keys,
# values and filler, held-out code) asks for exactly that skill.
KEY_WORDS = ("key", "passkey", "token", "secret", "value", "id", "code", "tag")
VALUE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def _key_value_statement(gen: torch.Generator) -> list[int]:
    """Bytes of one ``\n<word>_<4 letters> = "<6-10 chars>"\n`` statement drawn from ``gen``."""
    def pick(chars: str, n: int) -> str:
        return "".join(chars[i] for i in torch.randint(0, len(chars), (n,), generator=gen).tolist())

    word = KEY_WORDS[int(torch.randint(0, len(KEY_WORDS), (1,), generator=gen))]
    length = int(torch.randint(6, 11, (1,), generator=gen))
    name = f"{word}_{pick('abcdefghijklmnopqrstuvwxyz', 4)}"
    return list(f'\n{name} = "{pick(VALUE_CHARS, length)}"\n'.encode())


def add_key_values(windows: torch.Tensor, gen: torch.Generator, fraction: float) -> torch.Tensor:
    """Overwrite, in about ``fraction`` of ``windows [B, L]`` (chosen by ``gen``), one to three key-value
    statements and their repeats at log-uniform distances from 32 tokens to the window's length (see
    ``KEY_WORDS``). The windows keep their length; everything else is untouched. In place; returns them."""
    B, L = windows.shape
    chosen = (torch.rand(B, generator=gen) < fraction).nonzero().flatten().tolist()
    for b in chosen:
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            stmt = _key_value_statement(gen)
            n = len(stmt)
            if L < 2 * n + 32:
                break
            log_d = math.log(32) + float(torch.rand(1, generator=gen)) * (math.log(L - n) - math.log(32))
            distance = max(n, min(L - n, int(math.exp(log_d))))      # start of statement to start of repeat
            first = int(torch.randint(0, L - n - distance + 1, (1,), generator=gen))
            values = torch.tensor(stmt, dtype=windows.dtype)
            windows[b, first:first + n] = values.to(windows.device)
            windows[b, first + distance:first + distance + n] = values.to(windows.device)
    return windows


def heldout_windows(stream: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """``[count', seq_len + 1]`` windows of the held-out stream at evenly spaced offsets (not overlapping
    when the stream is long enough, fewer than ``count`` when it is too short for that)."""
    n = stream.shape[0] - seq_len - 1
    count = max(1, min(count, n // (seq_len + 1) + 1))
    starts = torch.linspace(0, n, count).long()
    idx = starts.to(stream.device)[:, None] + torch.arange(seq_len + 1, device=stream.device)
    return stream[idx].long()


def _position_losses(forward: Callable, model: MLAModel, windows: torch.Tensor, autocast: bool) -> torch.Tensor:
    """``[B, L]`` float32 next-token losses of ``windows [B, L+1]``."""
    x, y = windows[:, :-1], windows[:, 1:]
    with torch.autocast(windows.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = forward(model, x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)


@torch.no_grad()
def evaluate(forward: Callable, model: MLAModel, windows: torch.Tensor, batch: int, autocast: bool) -> torch.Tensor:
    """Mean held-out loss at each position ``[L]`` (float32, CPU) over ``windows [n, L+1]``."""
    was_training = model.training
    model.eval()
    total = torch.zeros(windows.shape[1] - 1, device=windows.device)
    for i in range(0, windows.shape[0], batch):
        total += _position_losses(forward, model, windows[i:i + batch], autocast).sum(0)
    model.train(was_training)
    return (total / windows.shape[0]).cpu()


def _optimizer(model: MLAModel, args: TrainArgs, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def _fmt_buckets(names: Sequence[str], values: Sequence[float]) -> str:
    return " ".join(f"{n}:{v:.3f}" for n, v in zip(names, values))


def train(args: TrainArgs, log: Callable[[str], None] = print, config: MLAConfig = REFERENCE_CONFIG,
          t_start: Optional[float] = None) -> dict:
    """Run one training run (module docstring); returns what ``train_log.json`` holds."""
    t_start = time.perf_counter() if t_start is None else t_start
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = device.type == "cuda"
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max_position_embeddings={config.max_position_embeddings}")
    torch.manual_seed(args.seed)
    corpus = load_corpus()
    train_stream = corpus.stream("train").to(device)
    held_stream = corpus.stream("heldout").to(device)
    log(f"corpus: {len(corpus.paths('train'))} training files ({train_stream.numel()} tokens), "
        f"{len(corpus.paths('heldout'))} held-out files ({held_stream.numel()} tokens)")

    model = MLAModel(config, device="cpu")
    init_weights(model, args.seed)
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"H={config.num_attention_heads}, R={config.kv_lora_rank}, P={config.qk_rope_head_dim}; on {device}"
        f"{' (bf16 autocast)' if autocast else ''}")
    forward = torch.compile(dense_forward, dynamic=False) if args.compile else dense_forward
    opt = _optimizer(model, args, device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    eval_windows = heldout_windows(held_stream, args.eval_windows, args.seq_len)
    names = bucket_names(args.seq_len)
    eval_batch = max(1, min(args.batch, eval_windows.shape[0]))
    curves: list[dict] = []
    tokens_per_step = args.batch * args.seq_len
    # Leave room for the final evaluation and the save within the time limit.
    deadline = None if args.time_limit_s is None else args.time_limit_s - 5.0
    log(f"training: {args.steps} steps of {args.batch} x {args.seq_len} tokens, lr {args.lr:g} (warmup "
        f"{args.warmup}, cosine to {args.min_lr_ratio:g}x), seed {args.seed}"
        + (f", time limit {args.time_limit_s:g} s" if args.time_limit_s else ""))

    step, t_train, tokens_at_log, t_log = 0, time.perf_counter(), 0, time.perf_counter()
    train_sum = torch.zeros(args.seq_len, device=device)
    train_count = 0
    stopped_by = "steps"
    while step < args.steps:
        elapsed = time.perf_counter() - t_start
        if deadline is not None and elapsed >= deadline:
            stopped_by = "time"
            break
        progress = step / args.steps
        if deadline is not None:
            progress = max(progress, elapsed / deadline)
        lr = lr_at(args, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        windows = sample_batch(train_stream, gen, args.batch, args.seq_len)
        if args.retrieval_fraction > 0:
            add_key_values(windows, gen, args.retrieval_fraction)
        losses = _position_losses(forward, model, windows, autocast)
        loss = losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_sum += losses.detach().mean(0)
        train_count += 1
        step += 1
        if step % args.eval_every == 0 or step == args.steps or step == 1:
            now = time.perf_counter()
            train_pos = (train_sum / train_count).cpu()
            held_pos = evaluate(forward, model, eval_windows, eval_batch, autocast)
            tok_s = (step * tokens_per_step - tokens_at_log) / max(now - t_log, 1e-9)
            row = dict(step=step, lr=lr, elapsed_s=round(time.perf_counter() - t_start, 2),
                       tokens=step * tokens_per_step, train_loss=train_pos.mean().item(),
                       train_buckets=bucket_means(train_pos), heldout_loss=held_pos.mean().item(),
                       heldout_buckets=bucket_means(held_pos), tokens_per_s=round(tok_s))
            curves.append(row)
            speed = f"{tok_s / 1e6:.2f}M" if tok_s >= 1e5 else f"{tok_s:.0f}"
            log(f"step {step:5d}/{args.steps}  lr {lr:.2e}  train {row['train_loss']:.3f}  held-out "
                f"{row['heldout_loss']:.3f} [{_fmt_buckets(names, row['heldout_buckets'])}]  "
                f"{speed} tok/s  {row['elapsed_s']:.0f} s")
            train_sum.zero_()
            train_count = 0
            tokens_at_log, t_log = step * tokens_per_step, time.perf_counter()
    train_s = time.perf_counter() - t_train

    final_windows = heldout_windows(held_stream, args.final_eval_windows, args.seq_len)
    held_pos = evaluate(forward, model, final_windows, eval_batch, autocast)
    final = dict(windows=final_windows.shape[0], loss=held_pos.mean().item(),
                 buckets=dict(zip(names, bucket_means(held_pos))),
                 per_position=_binned(held_pos, 64))
    log(f"final held-out loss {final['loss']:.3f} over {final['windows']} windows of {args.seq_len}: "
        f"{_fmt_buckets(names, final['buckets'].values())} (nats/byte)")
    summary = dict(args=dataclasses.asdict(args), config=dataclasses.asdict(config), parameters=params,
                   steps_done=step, stopped_by=stopped_by, tokens_seen=step * tokens_per_step,
                   train_seconds=round(train_s, 1), corpus_manifest=os.path.basename(MANIFEST),
                   corpus_manifest_sha256=_sha256_file(MANIFEST), torch=torch.__version__,
                   python=platform.python_version(),
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   peak_memory_gib=(round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
                                    if device.type == "cuda" else None),
                   curves=curves, final_heldout=final)
    _save(model, args.out, summary)
    log(f"wrote {args.out}: config.json, model.safetensors (bf16), train_log.json; "
        f"{step} steps in {train_s:.0f} s, {time.perf_counter() - t_start:.0f} s in all"
        + (f"; peak GPU memory {summary['peak_memory_gib']} GiB" if summary["peak_memory_gib"] else ""))
    return summary


def _binned(per_position: torch.Tensor, bins: int) -> dict:
    """Per-position losses averaged over ``bins`` equal spans: ``{"starts": [...], "loss": [...]}``."""
    L = per_position.shape[0]
    edges = torch.linspace(0, L, bins + 1).long().tolist()
    pairs = [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
    return dict(starts=[a for a, _ in pairs], loss=[round(per_position[a:b].mean().item(), 4) for a, b in pairs])


def _sha256_file(path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _save(model: MLAModel, out: str, summary: dict) -> None:
    from ..models.saving import save_pretrained

    model = model.eval().to(device="cpu", dtype=torch.bfloat16)
    save_pretrained(model, out)
    with open(os.path.join(out, "train_log.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")


SMOKE = dict(steps=6, batch=2, seq_len=160, eval_every=3, eval_windows=2, final_eval_windows=2, warmup=2,
             device="cpu")


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainArgs:
    d = TrainArgs()
    p = argparse.ArgumentParser(prog="python -m swa_rewrite.reference.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=d.out, help="checkpoint folder to write (default: the shipped one)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="windows per step (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per window (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (default %(default)s)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient norm clip (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="init and data-order seed (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between logs (default %(default)s)")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows,
                   help="held-out windows per periodic evaluation (default %(default)s)")
    p.add_argument("--final-eval-windows", type=int, default=d.final_eval_windows,
                   help="held-out windows of the final evaluation (default %(default)s)")
    p.add_argument("--retrieval-fraction", type=float, default=d.retrieval_fraction,
                   help="fraction of training windows given key-value statements and their repeats, so the model "
                        "learns to look a value up (default %(default)s; 0: plain corpus)")
    p.add_argument("--time-limit-s", type=float, default=d.time_limit_s,
                   help="wall-clock limit of the whole run, start to checkpoint written: the cosine schedule "
                        "follows whichever of steps and time runs out first")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (longer start, faster steps)")
    p.add_argument("--device", default=d.device, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--smoke", action="store_true",
                   help=f"a few tiny CPU steps, for tests ({', '.join(f'{k}={v}' for k, v in SMOKE.items())})")
    ns = p.parse_args(argv)
    args = TrainArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs)})
    if args.smoke:   # smoke sizes, except where an option was given explicitly
        given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
        explicit = {a.dest for a in p._actions if given & set(a.option_strings)}
        args = dataclasses.replace(args, **{k: v for k, v in SMOKE.items() if k not in explicit})
    if not 0 <= args.retrieval_fraction <= 1:
        p.error(f"--retrieval-fraction must be in [0, 1], got {args.retrieval_fraction}")
    for name in ("steps", "batch", "seq_len", "eval_every", "eval_windows", "final_eval_windows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    t_start = time.perf_counter()
    train(parse_args(argv), log=lambda line: print(line, flush=True), t_start=t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
