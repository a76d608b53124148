"""What a conversion costs in accuracy (docs/design.md §15): held-out perplexity by context length and a key
retrieval test, for the original model and for each schedule, through the paged engine users run.

``evaluate(model, sequences, schedules, retrieval=retrieval_samples(...))`` runs every sequence through
``Engine.logits`` — the original model, then ``swa_rewrite.apply(model, schedule)`` for each schedule with
window-bounded caches — and returns an ``EvalReport``: per model variant, the negative log-likelihood of the
next token averaged over position buckets (``0–256``, ``256–1K``, ...: how far into its sequence a token is,
i.e. how much context it had), the retrieval scores by distance, and one request's KV-cache bytes at the
evaluated context (``ops.kv_cache_spec.bytes_per_request``). ``render()`` prints a table, ``to_dict()`` the JSON
of ``swa-rewrite eval --json``, ``plot(path)`` a PNG.

The retrieval test is for byte-level models (token = byte): a sample states ``\\npasskey_qzwx = "k3v9x0ab"\\n``
after a little filler, then more filler, then asks ``\\npasskey_qzwx = "`` again; the score is the model's
log-probability of the eight value bytes and whether each is its top choice (teacher-forced, so all eight
top-1 is what greedy decoding would write). The value is random, so only a model that reads the statement
``distance`` positions back can do better than chance (``log(1/36)`` per byte). Filler is held-out text when
given (code for a code model), random printable bytes otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import string
import time
from typing import Iterable, Mapping, Optional, Sequence

import torch

from .ops.kv_cache_spec import KVCacheSpec, bytes_per_request
from .schedule import Schedule

__all__ = ["DEFAULT_BUCKETS", "Bucket", "EvalReport", "RetrievalPoint", "RetrievalSample", "VariantResult",
           "byte_stream", "evaluate", "kv_cache_bytes", "random_sequences", "read_byte_files",
           "retrieval_samples", "schedule_label", "token_windows"]

# Position buckets of the perplexity table: [start, end) token positions (the context a prediction had).
DEFAULT_BUCKETS = (0, 256, 1024, 2048, 4096)
DEFAULT_PAGE_SIZE = 64                 # the memory report's page size (rewrite.DEFAULT_PAGE_SIZE)
VALUE_ALPHABET = string.ascii_lowercase + string.digits
FILLER_ALPHABET = (string.ascii_letters + string.digits + " .,:;()[]=+-_'\"\n").encode()


# ----------------------------------------------------------------------------------------------- memory
def kv_cache_bytes(config, schedule: Optional[Schedule], context: int, page_size: int = DEFAULT_PAGE_SIZE, *,
                   dtype: torch.dtype = torch.bfloat16, chunk: int = 1) -> int:
    """Cache bytes one request of ``context`` positions holds at most in a model of ``config`` (an
    ``MLAConfig``) rewritten with ``schedule`` (None: the original model), sliding groups window-bounded: the
    per-layer ``KVCacheSpec``s (full layers ``R + P`` entries of ``dtype``, the serving dtype; sliding layers
    the packed FP8 row) through ``ops.kv_cache_spec.bytes_per_request``."""
    R, P = config.kv_lora_rank, config.qk_rope_head_dim
    specs = [KVCacheSpec.sliding(R, P, schedule.window_of(i), schedule.sinks_of(i))
             if schedule is not None and schedule.is_swa(i) else KVCacheSpec.full(R, P, dtype)
             for i in range(config.num_hidden_layers)]
    return sum(bytes_per_request(specs, context, page_size, chunk=chunk))


# ------------------------------------------------------------------------------------------------- data
def read_byte_files(paths: Iterable[str | os.PathLike], *, suffix: str = ".py") -> list[tuple[str, bytes]]:
    """``(path, bytes)`` of each file in ``paths``; a folder contributes its files ending in ``suffix``,
    recursively, in sorted order. ``FileNotFoundError`` for a path that does not exist, ``ValueError`` when
    nothing is found."""
    out = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if name.endswith(suffix):
                        full = os.path.join(root, name)
                        with open(full, "rb") as f:
                            out.append((full, f.read()))
        else:
            with open(path, "rb") as f:
                out.append((path, f.read()))
    if not out:
        raise ValueError(f"no files found in {list(map(os.fspath, paths))} (folders are searched for *{suffix})")
    return out


def byte_stream(texts: Iterable[bytes], *, bos: Optional[int] = None) -> list[int]:
    """One token stream of byte-level ``texts`` (token = byte): each text preceded by the token ``bos`` (the
    reference model's start of a file, ``reference.tokens.BOS``), or, without one, joined by a newline."""
    out: list[int] = []
    for i, text in enumerate(texts):
        if bos is not None:
            out.append(bos)
        elif i:
            out.append(ord("\n"))
        out.extend(text)
    return out


def token_windows(stream: Sequence[int], length: int, count: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens of ``stream`` at evenly spaced offsets, first and last included
    (not overlapping when the stream is long enough; fewer windows when it is too short for that).
    ``ValueError`` when the stream is shorter than one window."""
    if length < 2 or count < 1:
        raise ValueError(f"token_windows needs length >= 2 and count >= 1, got {length}, {count}")
    n = len(stream) - length
    if n < 0:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than one sequence of {length}")
    count = max(1, min(count, n // length + 1))
    starts = [round(i * n / (count - 1)) if count > 1 else 0 for i in range(count)]
    return [[int(t) for t in stream[s:s + length]] for s in starts]


def random_sequences(count: int, length: int, vocab_size: int, *, seed: int = 0) -> list[list[int]]:
    """``count`` uniformly random token sequences of ``length`` (for models with random weights)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (count, length), generator=g).tolist()


# -------------------------------------------------------------------------------------------- retrieval
@dataclasses.dataclass(frozen=True)
class RetrievalSample:
    """One retrieval prompt: ``tokens`` end with the value's bytes at ``[answer_start, answer_end)``; the same
    value was stated ``distance`` positions before ``answer_start``."""

    tokens: tuple[int, ...]
    answer_start: int
    answer_end: int
    distance: int


def _filler_stream(filler: Optional[Sequence[Sequence[int]]], rng: random.Random, n: int) -> list[int]:
    """``n`` filler tokens: consecutive held-out tokens from a random start (wrapping), or random printable
    bytes."""
    if not filler:
        return [rng.choice(FILLER_ALPHABET) for _ in range(n)]
    stream = [t for seq in filler for t in seq]
    start = rng.randrange(len(stream))
    return [stream[(start + i) % len(stream)] for i in range(n)]


def retrieval_samples(distances: Sequence[int], *, num_samples: int = 8,
                      filler: Optional[Sequence[Sequence[int]]] = None, seed: int = 0, prefix: int = 64,
                      value_length: int = 8) -> list[RetrievalSample]:
    """``num_samples`` samples per distance (module docstring). ``prefix``: filler tokens before the statement
    (so it is not among the first tokens, which sinks keep); the distance is from the statement's value to
    the query's. Byte-level: the key, value and (random) filler are ASCII. ``ValueError`` for a distance too
    short to hold the statement."""
    rng = random.Random(seed)
    out = []
    for distance in distances:
        for _ in range(num_samples):
            name = "passkey_" + "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
            value = "".join(rng.choice(VALUE_ALPHABET) for _ in range(value_length))
            head = f'\n{name} = "'.encode()
            statement = head + f'{value}"\n'.encode()
            gap = distance - len(statement)       # filler between the statement and the query
            if gap < 0:
                raise ValueError(f"retrieval distance {distance} is shorter than the statement "
                                 f"({len(statement)} bytes)")
            fill = _filler_stream(filler, rng, prefix + gap)
            tokens = fill[:prefix] + list(statement) + fill[prefix:] + list(head) + list(value.encode())
            end = len(tokens)
            out.append(RetrievalSample(tuple(tokens), end - value_length, end, distance))
    return out


# -------------------------------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class Bucket:
    """Next-token NLL (nats, mean over ``tokens`` predictions) at positions ``[start, end)``."""

    start: int
    end: int
    tokens: int
    nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.tokens else float("nan")

    def to_dict(self) -> dict:
        return dict(start=self.start, end=self.end, tokens=self.tokens, nll=_num(self.nll),
                    perplexity=_num(self.perplexity))


@dataclasses.dataclass(frozen=True)
class RetrievalPoint:
    """Retrieval at one distance: the answer's mean log-probability per byte (nats), the fraction of samples
    whose every answer byte is the model's top choice (``exact``), the fraction of answer bytes that are
    (``byte_accuracy``), and how many SWA layers cannot see the statement (window ``W < distance``)."""

    distance: int
    samples: int
    logprob: float
    exact: float
    byte_accuracy: float
    layers_beyond_window: int

    def to_dict(self) -> dict:
        return dict(distance=self.distance, samples=self.samples, logprob=_num(self.logprob), exact=self.exact,
                    byte_accuracy=self.byte_accuracy, layers_beyond_window=self.layers_beyond_window)


@dataclasses.dataclass(frozen=True)
class VariantResult:
    """One model variant: the original (``schedule`` None) or the model rewritten with ``schedule``."""

    name: str
    schedule: Optional[Schedule]
    kv_cache_bytes: int
    buckets: tuple[Bucket, ...]
    retrieval: tuple[RetrievalPoint, ...]
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(b.tokens for b in self.buckets)

    @property
    def nll(self) -> float:
        """Mean NLL over every prediction (all buckets, token-weighted)."""
        return sum(b.nll * b.tokens for b in self.buckets if b.tokens) / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """What ``evaluate`` measured (module docstring); ``variants[0]`` is the original model."""

    model: str
    context: int
    page_size: int
    sequences: int
    variants: tuple[VariantResult, ...]

    @property
    def original(self) -> VariantResult:
        return self.variants[0]

    def saving(self, variant: VariantResult) -> float:
        """The fraction of the original's KV-cache bytes (one request of ``context``) ``variant`` saves."""
        return 1 - variant.kv_cache_bytes / self.original.kv_cache_bytes

    def to_dict(self) -> dict:
        """JSON keys: README.md, "Accuracy of a conversion"."""
        return dict(
            model=self.model, context=self.context, page_size=self.page_size, sequences=self.sequences,
            variants=[dict(name=v.name, schedule=v.schedule.to_dict() if v.schedule is not None else None,
                           kv_cache_bytes=v.kv_cache_bytes, kv_saving=self.saving(v), tokens=v.tokens,
                           nll=_num(v.nll), perplexity=_num(v.perplexity), delta_nll=_num(v.nll - self.original.nll),
                           buckets=[b.to_dict() for b in v.buckets],
                           retrieval=[r.to_dict() for r in v.retrieval], seconds=v.seconds)
                      for v in self.variants])

    def render(self) -> str:
        """Two tables: perplexity per position bucket (and overall, with its change from the original) beside
        the KV memory saved; retrieval exact-match accuracy and answer log-probability per distance."""
        name_w = max(12, max(len(v.name) for v in self.variants))
        lines = [f"{self.model}: {self.sequences} held-out sequence{'s' if self.sequences != 1 else ''}; KV cache "
                 f"of one {self.context}-token request "
                 f"(page size {self.page_size}, window-bounded)"]
        buckets = [(b.start, b.end) for b in self.original.buckets]
        head = f"{'':{name_w}}  {'KV saved':>8}  " + "  ".join(f"{_span(s, e):>9}" for s, e in buckets)
        lines += ["", "perplexity by position (tokens of context a prediction had)",
                  head + f"  {'all':>7}  {'Δ nll':>7}"]
        for v in self.variants:
            cells = "  ".join(f"{_fmt(b.perplexity, 3):>9}" for b in v.buckets)
            lines.append(f"{v.name:{name_w}}  {100 * self.saving(v):>7.1f}%  {cells}  {_fmt(v.perplexity, 3):>7}  "
                         f"{v.nll - self.original.nll:>+7.4f}")
        if self.original.retrieval:
            dists = [r.distance for r in self.original.retrieval]
            lines += ["", f"retrieval: exact match (every value byte top-1) / answer log-prob per "
                          f"byte (nats; chance {math.log(1 / len(VALUE_ALPHABET)):.2f}) by distance; "
                          f"* = the statement is beyond some SWA layer's window",
                      f"{'':{name_w}}  " + "  ".join(f"{d:>13}" for d in dists)]
            for v in self.variants:
                cells = "  ".join(f"{'*' if r.layers_beyond_window else ' '}{100 * r.exact:4.0f}% {r.logprob:6.2f}"
                                  for r in v.retrieval)
                lines.append(f"{v.name:{name_w}}  {cells}")
        return "\n".join(lines)

    def plot(self, path: str, title: Optional[str] = None) -> None:
        """A PNG: perplexity and its change from the original's by position bucket; retrieval exact match and
        answer log-probability against distance (log axis, each schedule's windows marked); one line per variant
        (KV saved in the legend).
        Needs matplotlib (``pip install 'swa-rewrite[plot]'``)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        retrieval = bool(self.original.retrieval)
        fig, grid = plt.subplots(2 if retrieval else 1, 2, figsize=(14, 10 if retrieval else 5), dpi=100,
                                 squeeze=False)
        axes = list(grid.flat)
        labels = [_span(b.start, b.end) for b in self.original.buckets]
        x = range(len(labels))
        for v in self.variants:
            style = dict(marker="o", markersize=4, linestyle="-" if v.schedule is None else "--")
            legend = f"{v.name} ({100 * self.saving(v):.0f}% KV saved)" if v.schedule is not None else v.name
            axes[0].plot(x, [b.perplexity for b in v.buckets], label=legend, **style)
            axes[1].plot(x, [b.nll - o.nll for b, o in zip(v.buckets, self.original.buckets)], **style)
            if retrieval:
                d = [r.distance for r in v.retrieval]
                axes[2].plot(d, [100 * r.exact for r in v.retrieval], **style)
                axes[3].plot(d, [r.logprob for r in v.retrieval], **style)
        for ax, ylabel, ttl in ((axes[0], "perplexity (per token)", "held-out perplexity by context"),
                                (axes[1], "NLL - original's NLL (nats per token)",
                                 "what the conversion costs, by context")):
            ax.set_xticks(x, labels)
            ax.set_xlabel("position in the sequence (tokens of context)")
            ax.set_ylabel(ylabel)
            ax.set_title(ttl)
        axes[0].legend(fontsize=8)
        if retrieval:
            windows = sorted({v.schedule.window_of(i) for v in self.variants if v.schedule is not None
                              for i in v.schedule.swa_layers})
            for ax, ylabel, ttl in ((axes[2], "exact match (%)", "retrieval: all value bytes top-1"),
                                    (axes[3], "log-prob per value byte (nats)", "retrieval: answer log-probability")):
                for w in windows:
                    ax.axvline(w, color="gray", linestyle=":", linewidth=1)
                    ax.annotate(f" W={w}", (w, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                                ha="left", va="top", fontsize=8, color="gray")
                ax.set_xscale("log", base=2)
                ax.set_xlabel("distance from the statement to the question (tokens)")
                ax.set_ylabel(ylabel)
                ax.set_title(ttl)
            chance = math.log(1 / len(VALUE_ALPHABET))
            axes[3].axhline(chance, color="black", linewidth=0.8, linestyle="-.")
            axes[3].annotate("chance", (1.0, chance), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                             fontsize=8)
            axes[2].set_ylim(-3, 103)
        for ax in axes:
            ax.grid(True, alpha=0.3)
        fig.suptitle(title or f"{self.model}: accuracy of SWA conversions", fontsize=11)
        fig.tight_layout()
        try:
            fig.savefig(path, format="png")
        finally:
            plt.close(fig)


def _num(x: float) -> Optional[float]:
    """JSON has no NaN: a bucket without tokens reads null."""
    return None if x is None or math.isnan(x) else x


def _fmt(x: float, digits: int) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}g}" if x >= 1000 else f"{x:.{digits}f}"


def _span(start: int, end: int) -> str:
    def k(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)
    return f"{k(start)}-{k(end)}"


def schedule_label(schedule: Optional[Schedule]) -> str:
    """A short name: ``original``; ``SWA 0-2,4 W512``; ``SWA 0,1 W256/1K s4`` (per-layer windows listed as
    ``layer:W`` when they differ)."""
    if schedule is None:
        return "original"
    layers = sorted(schedule.swa_layers)
    if not layers:
        return "no SWA layer"
    windows = {schedule.window_of(i) for i in layers}
    sinks = {schedule.sinks_of(i) for i in layers}
    if len(windows) == 1:
        text = f"SWA {_ranges(layers)} W{_k(windows.pop())}"
    else:
        text = "SWA " + ",".join(f"{i}:W{_k(schedule.window_of(i))}" for i in layers)
    if sinks != {0}:
        text += " s" + "/".join(map(str, sorted(sinks)))
    return text


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _ranges(layers: Sequence[int]) -> str:
    out, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            out.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(out)


# ------------------------------------------------------------------------------------------------ evaluate
def _engine(model: torch.nn.Module, longest: int, page_size: int, max_tokens_per_step: int):
    from .runtime import Engine

    # Every group gets room for the longest sequence; sliding groups use only their window of it.
    return Engine(model, num_blocks=-(-longest // page_size) + 1, page_size=page_size,
                  max_tokens_per_step=max_tokens_per_step, prefix_caching=False)


def _nll(logits: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """``[L - 1]`` float64 NLL of ``tokens[p + 1]`` under ``logits[p]`` (``logits [L, vocab]``)."""
    lp = torch.log_softmax(logits[:-1].double(), dim=-1)
    target = torch.as_tensor(tokens[1:], dtype=torch.long, device=lp.device)
    return -lp.gather(1, target[:, None])[:, 0]


def _score_answer(logits: torch.Tensor, sample: RetrievalSample) -> tuple[float, int, int]:
    """(sum of the answer bytes' log-probs, answer bytes that are top-1, their count) of one sample."""
    s, e = sample.answer_start, sample.answer_end
    lp = torch.log_softmax(logits[s - 1:e - 1].double(), dim=-1)                   # [n, vocab]
    target = torch.as_tensor(sample.tokens[s:e], dtype=torch.long, device=lp.device)
    return float(lp.gather(1, target[:, None]).sum()), int((lp.argmax(-1) == target).sum()), e - s


def _variants(schedules) -> list[tuple[str, Optional[Schedule]]]:
    if isinstance(schedules, Schedule):
        schedules = [schedules]
    items = list(schedules.items()) if isinstance(schedules, Mapping) else [(schedule_label(s), s) for s in schedules]
    for name, s in items:
        if not isinstance(s, Schedule):
            raise TypeError(f"schedule {name!r}: expected a swa_rewrite.Schedule, got {type(s).__name__}")
    names = [n for n, _ in items]
    if len(set(names)) != len(names) or "original" in names:
        raise ValueError(f"schedule names must be distinct and not 'original', got {names} (pass a mapping "
                         f"{{name: schedule}} to name them)")
    return [("original", None)] + items


@torch.inference_mode()
def evaluate(model: torch.nn.Module, sequences: Sequence[Sequence[int]],
             schedules: Mapping[str, Schedule] | Sequence[Schedule] = (), *,
             retrieval: Sequence[RetrievalSample] = (), buckets: Sequence[int] = DEFAULT_BUCKETS,
             context: Optional[int] = None, page_size: int = DEFAULT_PAGE_SIZE, max_tokens_per_step: int = 1024,
             kv_dtype: torch.dtype = torch.bfloat16, name: str = "model",
             show_progress: bool = False) -> EvalReport:
    """Perplexity by position and retrieval, original vs each schedule, through the paged engine.

    Args:
        model: an ``MLAModel`` (e.g. ``from_pretrained(dir)``) on the device and in the dtype to evaluate in;
            each schedule is applied to it with ``swa_rewrite.apply`` (weights shared).
        sequences: held-out token sequences (``[L_i]`` token ids each; for a byte-level model
            ``token_windows(byte_stream(texts), L, n)``).
        schedules: ``{name: Schedule}``, or schedules named by ``schedule_label``.
        retrieval: samples from ``retrieval_samples`` (none: no retrieval test).
        buckets: increasing position boundaries; bucket ``k`` averages the predictions made at positions
            ``[buckets[k], buckets[k+1])`` (a prediction at position ``p`` had ``p + 1`` tokens of context).
            Positions past the last boundary are not counted.
        context: the request length for the KV-memory column (default: the longest sequence).
        page_size, max_tokens_per_step: the engine's (results do not depend on them); ``page_size`` is also the
            memory arithmetic's.
        kv_dtype: the dtype the full layers' caches are counted in (the serving dtype; the model's own dtype
            may be float32 on a CPU).
        name: the model's name in the report.
        show_progress: a progress bar per variant on stderr (when it is a terminal).
    Returns:
        An ``EvalReport``. ``ValueError`` for empty or too-short sequences, bad buckets, a schedule for
        another layer count; ``TypeError`` for a non-``Schedule``.
    """
    from .rewrite import apply
    from .timing import progress

    sequences = [list(s) for s in sequences]
    if not sequences or min(len(s) for s in sequences) < 2:
        raise ValueError("evaluate needs at least one sequence, each of at least 2 tokens")
    buckets = [int(b) for b in buckets]
    if len(buckets) < 2 or any(b >= c for b, c in zip(buckets, buckets[1:])) or buckets[0] < 0:
        raise ValueError(f"buckets must be at least two increasing positions >= 0, got {buckets}")
    variants = _variants(schedules)
    config = model.config
    for vname, s in variants[1:]:
        if s.num_layers != config.num_hidden_layers:
            raise ValueError(f"schedule {vname!r} is for {s.num_layers} layers, the model has "
                             f"{config.num_hidden_layers}")
    longest = max([len(s) for s in sequences] + [len(r.tokens) for r in retrieval])
    context = context or max(len(s) for s in sequences)
    results = []
    for vname, schedule in variants:
        engine = _engine(model if schedule is None else apply(model, schedule), longest, page_size,
                         max_tokens_per_step)
        items = [("text", s) for s in sequences] + [("retrieval", r) for r in retrieval]
        bar = progress(items, total=len(items), desc=f"evaluate {vname}", disable=not show_progress)
        results.append(_evaluate_variant(engine, vname, schedule, bar, buckets,
                                         kv_cache_bytes(config, schedule, context, page_size, dtype=kv_dtype)))
    return EvalReport(name, context, page_size, len(sequences), tuple(results))


def _evaluate_variant(engine, name: str, schedule: Optional[Schedule], items, buckets: Sequence[int],
                      nbytes: int) -> VariantResult:
    """One variant's ``VariantResult`` from its engine's logits of ``items`` (``("text", tokens)`` or
    ``("retrieval", RetrievalSample)``)."""
    t0 = time.perf_counter()
    spans = list(zip(buckets, buckets[1:]))
    nll_sum, count = [0.0] * len(spans), [0] * len(spans)
    found: dict[int, list] = {}       # distance -> [samples, log-prob sum, top-1 bytes, bytes, exact samples]
    for kind, item in items:
        if kind == "text":
            nll = _nll(engine.logits(item), item).cpu()
            for k, (lo, hi) in enumerate(spans):
                nll_sum[k] += float(nll[lo:hi].sum())
                count[k] += nll[lo:hi].numel()
        else:
            lp, top, n = _score_answer(engine.logits(list(item.tokens)), item)
            acc = found.setdefault(item.distance, [0, 0.0, 0, 0, 0])
            for i, x in enumerate((1, lp, top, n, top == n)):
                acc[i] += x
    points = tuple(
        RetrievalPoint(d, samples, lp / nb, exact / samples, top / nb,
                       0 if schedule is None else sum(schedule.window_of(i) < d for i in schedule.swa_layers))
        for d, (samples, lp, top, nb, exact) in sorted(found.items()))
    return VariantResult(name, schedule, nbytes,
                         tuple(Bucket(lo, hi, n, s / n if n else float("nan"))
                               for (lo, hi), s, n in zip(spans, nll_sum, count)),
                         points, time.perf_counter() - t0)
