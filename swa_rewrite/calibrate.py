"""Which layers to convert, with what window and sinks (docs/design.md §15): measure what windowing costs each
layer on a few sample sequences, and propose a schedule for a target KV-memory saving.

``measure_window_costs(model, sequences, windows, sinks)`` runs the original model through the paged engine
(``Engine.logits``) and records, per layer, the absorbed queries ``q [T, H, D]`` the attention op receives and
the latents ``[T, D]`` the cache write stores (a ``TorchDispatchMode`` sees the two ``torch.ops.swa_rewrite``
calls: nothing in the model changes, and the same capture works on the CPU references and the CUDA kernels).
From them it recomputes each layer's attention probabilities (float64 on the CPU, float32 on a GPU) and,
for every candidate window ``W`` and sink count ``s`` (docs/design.md §3, §12: position ``p`` keeps
``0 … min(s, p+1)-1`` and ``p-W+1 … p``):

- ``mass_outside``: the attention probability the window drops, ``1 - exp(lse_window - lse_full)``, averaged
  over heads and tokens (and the worst head's average);
- ``output_error``: ``‖o_W - o‖ / ‖o‖`` of the layer's attention output after ``o_proj`` (what the residual
  stream receives), over all tokens — it weighs the dropped mass by how much its values differ.

``propose_schedule(calibration, saving, context)`` picks, per layer, full attention or one ``(W, s)`` option so
that one request of ``context`` positions needs at most ``1 - saving`` of the original's KV-cache bytes
(window-bounded, ``evaluate.kv_cache_bytes``: ``ops.kv_cache_spec.bytes_per_request``) at the least summed cost
— a multiple-choice knapsack solved exactly on bytes rounded up to 1/4096 of the original (so the target holds
for the exact bytes). ``compare_schedules`` evaluates the proposal beside skip-frequency schedules of the
nearest memory, with and without sinks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .ops.mla_attention import absorb_query
from .evaluate import DEFAULT_PAGE_SIZE, EvalReport, RetrievalSample, evaluate, kv_cache_bytes, schedule_label
from .schedule import Schedule

__all__ = ["Calibration", "Proposal", "WindowCost", "compare_schedules", "measure_window_costs",
           "nearest_skip_freq", "propose_schedule"]

METRICS = ("mass_outside", "output_error")
_BYTE_UNITS = 4096            # the knapsack's byte resolution: 1/4096 of the original model's bytes
_SCORE_BUDGET = 1 << 25       # elements of one [H, t, T] probability block


@dataclasses.dataclass(frozen=True)
class WindowCost:
    """What window ``window`` with ``sinks`` sink tokens costs layer ``layer`` on the calibration tokens."""

    layer: int
    window: int
    sinks: int
    mass_outside: float          # mean over heads and tokens of the attention probability outside
    mass_outside_max_head: float  # the largest per-head mean
    output_error: float          # ‖o_W − o‖ / ‖o‖ of the attention output (after o_proj), all tokens

    def metric(self, name: str) -> float:
        if name not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {name!r}")
        return getattr(self, name)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Per-layer window costs measured by ``measure_window_costs``; ``config`` is the model's ``MLAConfig``."""

    config: object
    windows: tuple[int, ...]
    sinks: tuple[int, ...]
    sequences: int
    tokens: int
    costs: tuple[WindowCost, ...]

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def cost(self, layer: int, window: int, sinks: int = 0) -> WindowCost:
        for c in self.costs:
            if (c.layer, c.window, c.sinks) == (layer, window, sinks):
                return c
        raise KeyError(f"no measurement for layer {layer}, window {window}, sinks {sinks} (measured windows "
                       f"{self.windows}, sinks {self.sinks})")

    def ranking(self, window: int, sinks: int = 0, metric: str = "mass_outside") -> list[tuple[int, float]]:
        """``(layer, cost)`` for window ``window`` (and ``sinks``), cheapest layer first."""
        return sorted(((i, self.cost(i, window, sinks).metric(metric)) for i in range(self.num_layers)),
                      key=lambda x: (x[1], x[0]))

    def to_dict(self) -> dict:
        return dict(windows=list(self.windows), sinks=list(self.sinks), sequences=self.sequences, tokens=self.tokens,
                    costs=[dataclasses.asdict(c) for c in self.costs])

    def render(self, metric: str = "mass_outside") -> str:
        """One row per layer, one column per (window, sinks): ``metric`` in percent; each column's rank."""
        opts = [(w, s) for w in self.windows for s in self.sinks]
        head = "layer  " + "  ".join(f"{'W' + str(w) + (f' s{s}' if s else ''):>11}" for w, s in opts)
        lines = [f"calibration: {self.sequences} sequences, {self.tokens} tokens; {metric.replace('_', ' ')} "
                 f"(% ; rank 1 = cheapest layer to window)", head]
        ranks = {opt: {layer: r + 1 for r, (layer, _) in enumerate(self.ranking(*opt, metric))} for opt in opts}
        for i in range(self.num_layers):
            cells = "  ".join(f"{100 * self.cost(i, w, s).metric(metric):>6.2f} ({ranks[w, s][i]:>2})" for w, s in opts)
            lines.append(f"{i:>5}  {cells}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ capture
class _CaptureAttention(TorchDispatchMode):
    """Records, per layer, the absorbed queries of ``mla_attention`` and the latents of ``write_kv_cache``
    (padding rows dropped), in call order — a request's chunks arrive in position order."""

    def __init__(self):
        super().__init__()
        self.q: dict[int, list[torch.Tensor]] = {}
        self.latent: dict[int, list[torch.Tensor]] = {}
        self.scale: dict[int, float] = {}
        self.rope_dim: dict[int, int] = {}
        self.other_attention: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "swa_rewrite":
            a = dict(zip((x.name for x in func._schema.arguments), args), **kwargs)
            op = func._schema.name.split("::")[-1]
            if op in ("mla_attention", "paged_mla_attention"):
                layer = int(a["layer"])
                keep = a["batch_id_per_token"] >= 0
                # The core op takes the un-absorbed query: absorb it as its MQA mode does.
                q = (absorb_query(a["q_nope"], a["q_pe"], a["kv_b_weight"]) if op == "mla_attention" else a["q"])
                self.q.setdefault(layer, []).append(q[keep].detach().clone())
                self.scale[layer], self.rope_dim[layer] = float(a["scale"]), int(a["rope_dim"])
            elif op == "write_kv_cache":
                layer = int(a["layer"])
                keep = a["slot_mapping"][int(a["group"])] >= 0
                self.latent.setdefault(layer, []).append(a["latent"][keep].detach().clone())
            elif "attention" in op:
                self.other_attention.add(op)
        return func(*args, **kwargs)


def _layer_costs(q: torch.Tensor, latent: torch.Tensor, scale: float, rope_dim: int, attn: torch.nn.Module,
                 options: Sequence[tuple[int, int]], acc: torch.dtype) -> dict:
    """Sums over the tokens of one sequence and one layer, per option ``(W, s)``: the outside mass per head
    ``[H]``, ``‖Δo‖²`` and ``‖o‖²`` of the attention output after ``o_proj``.

    ``q [T, H, D]``, ``latent [T, D]`` (``D = R + P``): scores ``q · latent · scale`` (absorbed MLA), values
    ``latent[:, :R]``; outputs un-absorbed with ``kv_b_proj``'s ``W_UV`` and projected by ``o_proj``."""
    T, H, D = q.shape
    R = D - rope_dim
    dev = q.device
    q, k = q.to(acc), latent.to(acc)
    v = k[:, :R]                                                               # [T, R]
    w_kv_b = attn.kv_b_proj.weight.to(acc).view(H, -1, R)
    w_uv = w_kv_b[:, w_kv_b.shape[1] - attn.v_dim:, :]                          # [H, V, R]
    w_o = attn.o_proj.weight.to(acc)                                            # [hidden, H * V]

    def project(o_lat: torch.Tensor) -> torch.Tensor:                           # [t, H, R] -> [t, hidden]
        o = torch.einsum("thr,hvr->thv", o_lat, w_uv)
        return o.reshape(o.shape[0], -1) @ w_o.T

    out = {opt: [torch.zeros(H, dtype=torch.float64), 0.0, 0.0] for opt in options}
    j = torch.arange(T, device=dev)
    step = max(1, _SCORE_BUDGET // max(1, H * T))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        p = j[t0:t1, None]                                                     # [t, 1] query positions
        s = torch.einsum("thd,jd->htj", q[t0:t1], k) * scale                   # [H, t, T]
        s = s.masked_fill(j[None, None, :] > p[None], float("-inf"))
        prob = torch.softmax(s, dim=-1)
        o_full = project(torch.einsum("htj,jr->thr", prob, v))
        ref = float((o_full.double() ** 2).sum())
        for (w, sk) in options:
            keep = (j[None, :] > p - w) | (j[None, :] < torch.clamp(p + 1, max=sk))  # [t, T] (causal via prob)
            kept = prob * keep[None]
            outside = (prob * ~keep[None]).sum(-1)                              # [H, t]
            inside = kept.sum(-1)
            o_w = project(torch.einsum("htj,jr->thr", kept, v) / inside.transpose(0, 1)[..., None])
            acc_ = out[w, sk]
            acc_[0] += outside.sum(-1).double().cpu()
            acc_[1] += float(((o_w - o_full).double() ** 2).sum())
            acc_[2] += ref
    return out


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(model, "layers", None)
    if (getattr(model, "swa_schedule", None) is not None or not isinstance(layers, torch.nn.ModuleList)
            or not all(hasattr(getattr(m, "self_attn", None), "kv_b_proj") for m in layers)):
        raise TypeError(f"calibration measures the original MLAModel (layers[i].self_attn with kv_b_proj and o_proj); "
                        f"got {type(model).__name__} (calibrate before swa_rewrite.apply)")
    return [m.self_attn for m in layers]


@torch.inference_mode()
def measure_window_costs(model: torch.nn.Module, sequences: Sequence[Sequence[int]], windows: Sequence[int],
                         sinks: Sequence[int] = (0,), *, page_size: int = 16, max_tokens_per_step: int = 2048,
                         show_progress: bool = False) -> Calibration:
    """What each candidate window (and sink count) costs each layer of the original ``model`` on ``sequences``
    (module docstring). ``windows``, ``sinks``: candidates (``W >= 1``, ``s >= 0``). ``TypeError`` for a model
    that is not an original ``MLAModel``; ``ValueError`` for empty inputs or bad candidates."""
    from .runtime import Engine
    from .timing import progress

    attn = _attention_modules(model)
    windows, sinks = sorted({int(w) for w in windows}), sorted({int(s) for s in sinks})
    if not windows or min(windows) < 1 or not sinks or min(sinks) < 0:
        raise ValueError(f"windows must be >= 1 and sinks >= 0 (at least one each), got {windows}, {sinks}")
    sequences = [list(s) for s in sequences]
    if not sequences or min(map(len, sequences)) < 1:
        raise ValueError("calibration needs at least one non-empty sequence")
    n = model.config.num_hidden_layers
    options = [(w, s) for w in windows for s in sinks]
    acc = torch.float64 if next(model.parameters()).device.type == "cpu" else torch.float32
    totals = {(i, w, s): [0.0, 0.0, 0.0] for i in range(n) for w, s in options}
    per_head = {(i, w, s): None for i in range(n) for w, s in options}
    engine = Engine(model, num_blocks=-(-max(map(len, sequences)) // page_size) + 1, page_size=page_size,
                    max_tokens_per_step=max_tokens_per_step, prefix_caching=False)
    tokens = 0
    for seq in progress(sequences, desc="calibrate", disable=not show_progress):
        capture = _CaptureAttention()
        with capture:
            engine.logits(seq)
        if capture.other_attention or sorted(capture.q) != list(range(n)):
            raise TypeError(f"calibration measures the original model (every layer full attention); saw "
                            f"{sorted(capture.other_attention) or 'layers ' + str(sorted(capture.q))}")
        tokens += len(seq)
        for i in range(n):
            q, lat = torch.cat(capture.q[i]), torch.cat(capture.latent[i])
            assert q.shape[0] == lat.shape[0] == len(seq), (q.shape, lat.shape, len(seq))
            for (w, s), (outside, d2, o2) in _layer_costs(q, lat, capture.scale[i], capture.rope_dim[i], attn[i],
                                                          options, acc).items():
                t = totals[i, w, s]
                t[0], t[1], t[2] = t[0] + float(outside.sum()), t[1] + d2, t[2] + o2
                per_head[i, w, s] = outside if per_head[i, w, s] is None else per_head[i, w, s] + outside
    H = model.config.num_attention_heads
    costs = tuple(WindowCost(i, w, s, t[0] / (tokens * H), float(per_head[i, w, s].max()) / tokens,
                             math.sqrt(t[1] / t[2]) if t[2] > 0 else 0.0)
                  for (i, w, s), t in totals.items())
    return Calibration(model.config, tuple(windows), tuple(sinks), len(sequences), tokens, costs)


# ------------------------------------------------------------------------------------------------ proposal
@dataclasses.dataclass(frozen=True)
class Proposal:
    """A schedule for a KV-memory target: ``kv_cache_bytes`` of one ``context``-position request (window-bounded,
    pages of ``page_size``) against the original's, the ``saving`` reached (``>= target_saving``), and the summed
    ``cost`` (``metric``) of its choices."""

    schedule: Schedule
    target_saving: float
    saving: float
    kv_cache_bytes: int
    original_kv_cache_bytes: int
    cost: float
    metric: str
    context: int
    page_size: int

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["schedule"] = self.schedule.to_dict()
        d["label"] = schedule_label(self.schedule)
        return d

    def render(self) -> str:
        s = self.schedule
        layers = ", ".join(f"{i}: W {s.window_of(i)}" + (f" + {s.sinks_of(i)} sinks" if s.sinks_of(i) else "")
                           for i in sorted(s.swa_layers)) or "none"
        return (f"proposed schedule for {100 * self.target_saving:.0f}% KV saving at {self.context} tokens "
                f"(page size {self.page_size}): {schedule_label(s)}\n  SWA layers: {layers}\n"
                f"  KV cache of one request {self.kv_cache_bytes} B vs {self.original_kv_cache_bytes} B original "
                f"({100 * self.saving:.1f}% saved); summed {self.metric.replace('_', ' ')} {self.cost:.4f}")


def propose_schedule(calibration: Calibration, saving: float, context: int, *, page_size: int = DEFAULT_PAGE_SIZE,
                     metric: str = "mass_outside", chunk: int = 1,
                     kv_dtype: torch.dtype = torch.bfloat16) -> Proposal:
    """The schedule of least summed ``metric`` whose one request of ``context`` positions takes at most
    ``(1 - saving)`` of the original model's KV-cache bytes (module docstring). ``ValueError`` when
    ``saving`` is outside ``[0, 1)`` or no choice of the measured windows and sinks reaches it."""
    if not 0 <= saving < 1:
        raise ValueError(f"saving must be a fraction in [0, 1), got {saving}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    cfg, n = calibration.config, calibration.num_layers
    original = kv_cache_bytes(cfg, None, context, page_size, dtype=kv_dtype, chunk=chunk)
    budget = (1 - saving) * original

    def layer_bytes(option) -> int:   # one layer's bytes: a one-layer schedule's through the same arithmetic
        one = cfg.replace(num_hidden_layers=1)
        sched = None if option is None else Schedule.per_layer({0: option}, 1)
        return kv_cache_bytes(one, sched, context, page_size, dtype=kv_dtype, chunk=chunk)

    options = [None] + [(w, s) for w in calibration.windows for s in calibration.sinks]
    nbytes = {o: layer_bytes(o) for o in options}
    unit = original / _BYTE_UNITS
    units = {o: math.ceil(nbytes[o] / unit - 1e-9) for o in options}
    cap = math.floor(budget / unit + 1e-9)
    INF = float("inf")
    # best[b]: least cost of the layers so far using at most b units; choice[i][b]: layer i's option there.
    best = torch.zeros(cap + 1, dtype=torch.float64)
    choices = []
    for i in range(n):
        new = torch.full((cap + 1,), INF, dtype=torch.float64)
        pick = torch.zeros(cap + 1, dtype=torch.long)
        for k, o in enumerate(options):
            u = units[o]
            if u > cap:
                continue
            cost = 0.0 if o is None else calibration.cost(i, *o).metric(metric)
            cand = torch.full((cap + 1,), INF, dtype=torch.float64)
            cand[u:] = best[:cap + 1 - u] + cost
            # On a tie the earlier option wins: full attention, then smaller windows... kept by strict <.
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, k), pick)
        best = new
        choices.append(pick)
    if not math.isfinite(float(best[cap])):
        raise ValueError(f"no schedule of windows {list(calibration.windows)} and sinks {list(calibration.sinks)} "
                         f"saves {100 * saving:.1f}% of the KV cache at {context} tokens (page size {page_size}); "
                         f"the most is {100 * (1 - min(nbytes[o] for o in options[1:]) * n / original):.1f}%")
    b, chosen = cap, {}
    for i in reversed(range(n)):
        o = options[int(choices[i][b])]
        if o is not None:
            chosen[i] = o
        b -= units[o]
    schedule = Schedule.per_layer(chosen, n)
    exact = kv_cache_bytes(cfg, schedule, context, page_size, dtype=kv_dtype, chunk=chunk)
    assert exact <= budget + 1e-6, (exact, budget)
    cost = sum(calibration.cost(i, *o).metric(metric) for i, o in chosen.items())
    return Proposal(schedule, saving, 1 - exact / original, exact, original, cost, metric, context, page_size)


def nearest_skip_freq(config, kv_bytes: int, windows: Sequence[int], context: int, *,
                      page_size: int = DEFAULT_PAGE_SIZE, sinks: int = 0, kv_dtype: torch.dtype = torch.bfloat16,
                      chunk: int = 1) -> Schedule:
    """The ``Schedule.from_skip_freq(n, layers, W)`` (``n`` from 2 to layers + 1, ``W`` in ``windows``), with
    ``sinks`` on its SWA layers, whose KV bytes at ``context`` are nearest ``kv_bytes`` (on a tie: the one
    with fewer bytes, then the larger window)."""
    n = config.num_hidden_layers
    best = None
    for freq in range(2, n + 2):
        for w in windows:
            s = Schedule.from_skip_freq(freq, n, w)
            if sinks:
                s = Schedule(w, s.swa_layers, n, sinks=sinks)
            b = kv_cache_bytes(config, s, context, page_size, dtype=kv_dtype, chunk=chunk)
            key = (abs(b - kv_bytes), b, -w)
            if best is None or key < best[0]:
                best = (key, s)
    return best[1]


def _with_sinks(schedule: Schedule, sinks: int) -> Schedule:
    return Schedule.per_layer({i: (schedule.window_of(i), sinks) for i in schedule.swa_layers}, schedule.num_layers)


def compare_schedules(model: torch.nn.Module, sequences: Sequence[Sequence[int]], proposal: Proposal, *,
                      windows: Optional[Sequence[int]] = None, sinks: int = 4,
                      retrieval: Sequence[RetrievalSample] = (), show_progress: bool = False,
                      **evaluate_kw) -> EvalReport:
    """Evaluate (``evaluate.evaluate``) the original model, the ``proposal``'s schedule, the same with every SWA
    layer given ``sinks`` sink tokens (or none, when the proposal has sinks), and the skip-frequency schedule of
    the nearest memory (windows ``windows``, default the proposal's) without and with ``sinks`` sinks."""
    cfg = model.config
    ps, ctx = proposal.page_size, proposal.context
    windows = list(windows or sorted({proposal.schedule.window_of(i) for i in proposal.schedule.swa_layers}) or [ctx])
    cal = proposal.schedule
    has_sinks = any(cal.sinks_of(i) for i in cal.swa_layers)
    rows: list[tuple[str, Schedule]] = [(f"calibrated {schedule_label(cal)}", cal)]
    if cal.swa_layers:
        rows.append((f"calibrated, {'no' if has_sinks else sinks} sinks", _with_sinks(cal, 0 if has_sinks else sinks)))
    skip = nearest_skip_freq(cfg, proposal.kv_cache_bytes, windows, ctx, page_size=ps)
    name = f"skip-freq {_skip_freq_of(skip)} W{skip.window}"
    rows.append((name, skip))
    if sinks and skip.swa_layers:
        rows.append((f"{name} + {sinks} sinks", _with_sinks(skip, sinks)))
    merged: dict[Schedule, str] = {}          # a schedule two rows share is evaluated once, under both names
    for label, schedule in rows:
        merged[schedule] = f"{merged[schedule]} = {label}" if schedule in merged else label
    evaluate_kw.setdefault("page_size", ps)
    evaluate_kw.setdefault("context", ctx)
    return evaluate(model, sequences, {label: s for s, label in merged.items()}, retrieval=retrieval,
                    show_progress=show_progress, **evaluate_kw)


def _skip_freq_of(schedule: Schedule) -> int:
    """The ``n`` of a ``Schedule.from_skip_freq(n, ...)`` schedule's layer set."""
    n = schedule.num_layers
    return next(f for f in range(2, n + 2) if Schedule.from_skip_freq(f, n, 1).swa_layers == schedule.swa_layers)
