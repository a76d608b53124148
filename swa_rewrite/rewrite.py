"""``apply(model, schedule)``: trace, run the pass pipeline, return a drop-in rewritten module (docs/design.md §8).

Tracing uses ``torch.fx.symbolic_trace``, not ``torch.export``: it needs no example inputs and no fake
tensor propagation, so it works on a ``meta``-device model and traces a 61-layer DeepSeek-V3 definition
in well under a second; it records ``nn_module_stack`` for the layer cross-check; and our ops stay one
``call_function`` node each (``torch.export`` would functionalise the in-place cache writes into
``auto_functionalized`` wrappers). The result is itself an ``fx.GraphModule`` that ``torch.export`` and
``torch.compile`` accept (issue 6).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Optional

import torch
import torch.fx

from .formatting import format_bytes
from .models.fused_weights import merge_parts
from .models.hf import from_hf, is_hf_deepseek
from .models.rope import reset_rope_buffer
from .passes import AdapterRegistry, PassManager, PassResult, RewriteError, Role, TracedModel, swa_passes
from .passes.graph_pass import eliminate_dead_code
from .ops.checks import validated_step
from .ops.kv_cache_spec import KVCacheSpec, blocks_per_request, bytes_per_request, cache_groups, group_specs
from .passes.replace_attention import check_packable_dtype
from .schedule import Schedule

log = logging.getLogger(__name__)

DEFAULT_REPORT_TOKENS = 128 * 1024
# The memory report's defaults (docs/design.md §12, "Report"): 64-position pages, one token per step (decode),
# and a 60 GiB KV-cache budget for the capacity ratio.
DEFAULT_PAGE_SIZE = 64
DEFAULT_BUDGET_BYTES = 60 * 2**30


# SWAModule state beyond the forward graph (kept in __dict__: none of it is a submodule or a parameter).
_SWA_STATE = ("_swa_allocation", "_swa_allocation_inputs", "swa_schedule", "swa_report", "config")


class SWAModule(torch.fx.GraphModule):
    """The rewritten model: a drop-in replacement with the same ``forward`` signature and shared parameters.

    ``allocate_kv_cache(num_blocks, page_size, device=None)`` runs the rewritten allocation graph (packed
    ``uint8`` caches for SWA layers) on this module's current weights, so it follows ``to()``,
    ``to_empty()`` and ``load_state_dict(..., assign=True)``. ``swa_schedule`` and ``swa_report`` describe
    the rewrite. The module deep-copies and pickles (``torch.save``) with all of it.
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Its submodules are plain modules (fx copies only what the graph uses): a state dict with DeepSeek's
        # names for the stacked projections is merged here, for every layer at once.
        merge_parts(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def allocate_kv_cache(self, num_blocks: int, page_size: int,
                          device: torch.device | str | None = None) -> list[torch.Tensor]:
        return self._swa_allocation(*_fetch_attrs(self, self._swa_allocation_inputs), num_blocks, page_size, device)

    @property
    def num_layers(self) -> int:
        return self.swa_schedule.num_layers

    def kv_cache_spec(self) -> tuple[KVCacheSpec, ...]:
        """One ``KVCacheSpec`` per layer (docs/design.md §12): the schedule's sliding layers with their window
        and sinks over the packed ``uint8`` row, the others full in the model dtype; the layouts are those
        ``allocate_kv_cache`` allocates now (so they follow ``to(dtype)``)."""
        return layer_specs(self.swa_schedule, _allocation_layout(self._swa_allocation, self._swa_allocation_inputs,
                                                                 self))

    @property
    def cache_groups(self) -> tuple[int, ...]:
        """The cache group of each layer (``ops.kv_cache_spec.cache_groups`` of ``kv_cache_spec()``): the row
        of the step's block tables and slot mappings its ops read; the pass set it in the graph."""
        return cache_groups(self.kv_cache_spec())

    def __call__(self, *args, **kwargs):
        # The step's scope (ops.checks.validated_step), as MLAModel.forward opens it: the traced forward cannot
        # hold the ``with`` block, but its step check validates the metadata once and the layers' ops, given
        # those very tensors, skip repeating it. Under Dynamo a no-op.
        with validated_step():
            return super().__call__(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # As MLAModel does: the rope table is rebuilt from the config after any move (to_empty included).
        module = super()._apply(fn, recurse)
        config = self.__dict__.get("config")
        if config is not None:
            reset_rope_buffer(self, config)
        return module

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)      # keeps the class, not attributes the graph does not use
        copied.__class__.__name__ = type(self).__name__
        for name in _SWA_STATE:
            if name in self.__dict__:
                copied.__dict__[name] = copy.deepcopy(self.__dict__[name], memo)
        return copied

    def __reduce__(self):
        state = {name: self.__dict__[name] for name in _SWA_STATE if name in self.__dict__}
        return _rebuild_swa_module, (super().__reduce__(), state)


def _rebuild_swa_module(graph_module_reduce, state) -> SWAModule:
    """Unpickle: GraphModule's own reconstruction (code and tensors), then the SWAModule class and state."""
    rebuild, args = graph_module_reduce[:2]
    plain = rebuild(*args)
    module = _graph_module(plain, plain.graph, "SWAModule", SWAModule)
    module.__dict__.update(state)
    return module


def _fetch_attrs(root: torch.nn.Module, targets: list[str]) -> list:
    out = []
    for target in targets:
        obj = root
        for part in target.split("."):
            obj = getattr(obj, part)
        out.append(obj)
    return out


class _AllocateCaches(torch.nn.Module):
    """Makes ``model.allocate_kv_cache`` traceable as a ``forward``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, num_blocks: int, page_size: int, target_device=None):
        # Not named `device`: generated code spells device constants `device(...)`.
        return self.model.allocate_kv_cache(num_blocks, page_size, target_device)


def _graph_module(root: torch.nn.Module, graph: torch.fx.Graph, name: str,
                  cls: type = torch.fx.GraphModule) -> torch.fx.GraphModule:
    gm = cls(root, graph, class_name=name)
    # GraphModule registers every tensor attribute it copies as a persistent buffer; keep non-persistent
    # buffers of the original (e.g. rope frequencies) out of the state dict, so state dicts stay compatible.
    for mod_name, mod in root.named_modules():
        for buf in getattr(mod, "_non_persistent_buffers_set", ()):
            fqn = f"{mod_name}.{buf}" if mod_name else buf
            owner_name, _, leaf = fqn.rpartition(".")
            try:
                owner = gm.get_submodule(owner_name)
            except AttributeError:
                continue
            if leaf in owner._buffers:
                owner._non_persistent_buffers_set.add(leaf)
    return gm


class _Tracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` that finds a parameter's name in a dict instead of scanning every parameter of
    the model on each access (that scan made tracing a 61-layer MoE model take seconds).

    Buffers are traced as ``get_attr`` nodes (not frozen into constants), so a computation on a buffer
    (the rope table's ``bits.view(float32)``) stays in the graph and follows the buffer through moves.
    """

    proxy_buffer_attributes = True

    def trace(self, root, concrete_args=None):
        self._param_names = {id(p): n for n, p in root.named_parameters()} if isinstance(root, torch.nn.Module) else {}
        return super().trace(root, concrete_args)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        name = self._param_names.get(id(attr_val)) if isinstance(attr_val, torch.nn.Parameter) else None
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


def _traced_graph(root: torch.nn.Module) -> torch.fx.Graph:
    graph = _Tracer().trace(root)
    graph.owning_module = root
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None    # a string annotation (postponed evaluation) breaks pickling the module's code
    eliminate_dead_code(graph)  # canonical from the start, so before/after graphs compare node for node
    return graph


def _allocation_without_attributes(graph: torch.fx.Graph) -> tuple[torch.fx.GraphModule, list[str]]:
    """The traced allocation with each attribute read (the model weight whose dtype and device the caches
    take) turned into a leading input: a parameter-free module, run against the live model's attributes."""
    first = next(iter(graph.nodes))
    targets = []
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        with graph.inserting_before(first):
            placeholder = graph.placeholder(node.name + "_input")
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
        targets.append(node.target.removeprefix("model."))    # relative to the model, not _AllocateCaches
    graph.owning_module = None
    return _graph_module(torch.nn.Module(), graph, "AllocateKVCache"), targets


def trace(model: torch.nn.Module) -> TracedModel:
    """Trace ``model.forward`` and ``model.allocate_kv_cache`` into two canonical ``GraphModule``s."""
    if not hasattr(model, "allocate_kv_cache"):
        raise RewriteError(f"{type(model).__name__} has no allocate_kv_cache(num_blocks, page_size, device): the "
                           "rewrite needs the cache allocation to change the selected layers' cache layout")
    forward = _graph_module(model, _traced_graph(model), "SWAModule", SWAModule)
    allocation, inputs = _allocation_without_attributes(_traced_graph(_AllocateCaches(model)))
    return TracedModel(forward, allocation, allocation_inputs=inputs)


@dataclasses.dataclass
class LayerRow:
    layer: int
    kind_before: str
    kind_after: str
    window: Optional[int]
    cache_before: tuple[torch.dtype, int]   # (dtype, entries per token)
    cache_after: tuple[torch.dtype, int]
    sinks: Optional[int] = None             # sink tokens of an SWA layer (None: a full layer)

    @staticmethod
    def bytes_per_token(cache: tuple[torch.dtype, int]) -> int:
        dtype, width = cache
        return width * dtype.itemsize


@dataclasses.dataclass(frozen=True)
class GroupMemory:
    """One cache group's share of one request's KV cache (``RewriteReport.memory``).

    ``blocks`` / ``bytes`` are what the request holds at most with window-bounded caches (docs/design.md §12,
    "Bounded": a sliding layer keeps its sink blocks and ``ceil((W - 1 + C) / ps) + 1`` blocks); the
    ``unbounded_`` ones keep every position (``Engine(window_bounded=False)``). ``blocks`` are one layer's,
    ``bytes`` all layers of the group."""

    group: int
    kind: str                   # "full" or "sliding"
    window: Optional[int]       # None for a full group
    sinks: int
    layers: tuple[int, ...]
    bytes_per_token: int        # one layer's row
    blocks: int
    bytes: int
    unbounded_blocks: int
    unbounded_bytes: int

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}


@dataclasses.dataclass(frozen=True)
class RequestMemory:
    """The KV cache of one request of ``context`` positions, original vs rewritten (``RewriteReport.memory``),
    and how many such requests a ``budget`` of bytes holds: ``budget // bytes`` (each group sized for the same
    number of requests, docs/design.md §12 "Sizing"). Ratios are original over rewritten; a capacity ratio is
    None when not one original request fits the budget."""

    context: int
    page_size: int
    chunk: int
    budget: int
    original_bytes: int
    groups: tuple[GroupMemory, ...]

    @property
    def rewritten_bytes(self) -> int:
        """Bytes of the rewritten model's caches, sliding groups window-bounded."""
        return sum(g.bytes for g in self.groups)

    @property
    def unbounded_bytes(self) -> int:
        """Bytes of the rewritten model's caches when every position is kept (today's layout)."""
        return sum(g.unbounded_bytes for g in self.groups)

    def requests(self, nbytes: int) -> int:
        return self.budget // nbytes if nbytes else 0

    @property
    def bytes_ratio(self) -> float:
        return self.original_bytes / self.rewritten_bytes

    @property
    def unbounded_bytes_ratio(self) -> float:
        return self.original_bytes / self.unbounded_bytes

    def _capacity(self, nbytes: int) -> Optional[float]:
        base = self.requests(self.original_bytes)
        return self.requests(nbytes) / base if base else None

    @property
    def capacity_ratio(self) -> Optional[float]:
        return self._capacity(self.rewritten_bytes)

    @property
    def unbounded_capacity_ratio(self) -> Optional[float]:
        return self._capacity(self.unbounded_bytes)

    def to_dict(self) -> dict:
        """The JSON of ``swa-rewrite memory --json``'s ``contexts`` entries (README.md)."""
        return dict(context=self.context, original_bytes=self.original_bytes, rewritten_bytes=self.rewritten_bytes,
                    unbounded_bytes=self.unbounded_bytes, saved_bytes=self.original_bytes - self.rewritten_bytes,
                    bytes_ratio=self.bytes_ratio, unbounded_bytes_ratio=self.unbounded_bytes_ratio,
                    requests=dict(original=self.requests(self.original_bytes),
                                  rewritten=self.requests(self.rewritten_bytes),
                                  unbounded=self.requests(self.unbounded_bytes)),
                    capacity_ratio=self.capacity_ratio, unbounded_capacity_ratio=self.unbounded_capacity_ratio,
                    groups=[g.to_dict() for g in self.groups])


def _fmt_layers(layers, limit: int = 36) -> str:
    """Layer indices as runs (``0-2,4-6,8``), cut to about ``limit`` characters with ``...`` and the last run
    (a 61-layer schedule stays on one line)."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs]
    text = ",".join(parts)
    if len(text) <= limit:
        return text
    kept: list[str] = []
    for part in parts[:-1]:
        if len(",".join(kept + [part, "...", parts[-1]])) > limit and kept:
            break
        kept.append(part)
    return ",".join(kept + ["...", parts[-1]])


def _fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


@dataclasses.dataclass
class RewriteReport:
    """What ``apply`` did: a per-layer table, the pass results, trace and rewrite time; and what one request's
    KV cache takes per cache group, original vs rewritten (``memory``, ``render_memory``)."""

    schedule: Schedule
    rows: list[LayerRow]
    passes: list[PassResult]
    seconds: float
    uuid: str

    def bytes_per_token(self, after: bool = True) -> int:
        return sum(LayerRow.bytes_per_token(r.cache_after if after else r.cache_before) for r in self.rows)

    def bytes_saved(self, num_tokens: int) -> int:
        return (self.bytes_per_token(False) - self.bytes_per_token(True)) * num_tokens

    def kv_cache_spec(self, after: bool = True) -> tuple[KVCacheSpec, ...]:
        """One ``KVCacheSpec`` per layer: of the rewritten model (``after``; sliding layers with their window
        and sinks, as ``SWAModule.kv_cache_spec()`` states them), or of the model before the rewrite, every
        layer full in its cache layout (every position kept)."""
        if after:
            return layer_specs(self.schedule, [r.cache_after for r in self.rows])
        return tuple(KVCacheSpec.of_layout(*r.cache_before) for r in self.rows)

    def memory(self, num_tokens: int, page_size: int = DEFAULT_PAGE_SIZE, *, chunk: int = 1,
               budget: int = DEFAULT_BUDGET_BYTES) -> RequestMemory:
        """One request of ``num_tokens`` positions: its cache bytes per group of the rewritten model (window-
        bounded and unbounded), the original model's, and the capacity in ``budget`` bytes; pages of
        ``page_size`` positions, ``chunk`` tokens per step (1: decode). The arithmetic is
        ``ops.kv_cache_spec.bytes_per_request`` (docs/design.md §12)."""
        if num_tokens < 1 or page_size < 1 or chunk < 1 or budget < 0:
            raise ValueError(f"memory needs num_tokens, page_size and chunk >= 1 and budget >= 0, got "
                             f"{num_tokens}, {page_size}, {chunk}, {budget}")
        specs = self.kv_cache_spec(after=True)
        kw = dict(chunk=chunk)
        bounded = bytes_per_request(specs, num_tokens, page_size, bounded=True, **kw)
        unbounded = bytes_per_request(specs, num_tokens, page_size, bounded=False, **kw)
        groups = cache_groups(specs)
        out = []
        for g, (spec, _) in enumerate(group_specs(specs)):
            out.append(GroupMemory(
                group=g, kind=spec.kind, window=spec.window, sinks=spec.sinks,
                layers=tuple(r.layer for r, k in zip(self.rows, groups) if k == g),
                bytes_per_token=spec.bytes_per_token,
                blocks=blocks_per_request(spec, num_tokens, page_size, bounded=True, **kw), bytes=bounded[g],
                unbounded_blocks=blocks_per_request(spec, num_tokens, page_size, bounded=False, **kw),
                unbounded_bytes=unbounded[g]))
        original = sum(bytes_per_request(self.kv_cache_spec(after=False), num_tokens, page_size, bounded=False, **kw))
        return RequestMemory(num_tokens, page_size, chunk, budget, original, tuple(out))

    def render_memory(self, contexts=(4096, 32768, DEFAULT_REPORT_TOKENS), page_size: int = DEFAULT_PAGE_SIZE, *,
                      chunk: int = 1, budget: int = DEFAULT_BUDGET_BYTES) -> str:
        """The rewritten model's cache groups, then one row per context: one request's cache bytes, original,
        per group and in total (window-bounded), unbounded, the bytes ratio and the capacity in ``budget``
        (requests original / rewritten, unbounded in parentheses). A few lines for any layer count."""
        mems = [self.memory(c, page_size, chunk=chunk, budget=budget) for c in contexts]
        groups = mems[0].groups
        lines = [f"KV cache of one request: page size {page_size}, C = {chunk} token{'s' if chunk > 1 else ''} per "
                 f"step{' (decode)' if chunk == 1 else ''}, budget {format_bytes(budget)}",
                 f"  bounded: a sliding group holds its sink blocks + ceil((W - 1 + C) / {page_size}) + 1 blocks; "
                 "unbounded: every position",
                 "cache groups of the rewritten model:",
                 f"  {'group':>5}  {'kind':<7} {'window':>7} {'sinks':>5} {'layers':>6} {'bytes/token':>11}  which"]
        for g in groups:
            lines.append(f"  {g.group:>5}  {g.kind:<7} {g.window if g.window is not None else '-':>7} "
                         f"{g.sinks if g.window is not None else '-':>5} {len(g.layers):>6} {g.bytes_per_token:>11}  "
                         f"{_fmt_layers(g.layers)}")
        orig = self.kv_cache_spec(after=False)
        lines.append(f"  original model: {len(orig)} layers, every position kept, "
                     f"{sum(s.bytes_per_token for s in orig)} bytes/token in all")
        gcols = "".join(f" {f'group {g.group}':>10}" for g in groups)
        budget_head = f"requests in {format_bytes(budget)}"
        head = (f"{'context':>9} {'original':>10}{gcols} {'rewritten':>10} {'unbounded':>10}  "
                f"{'bytes ratio':>14}  {budget_head:>22}  {'capacity ratio':>14}")
        lines += ["", head]
        for m in mems:
            req = [m.requests(m.original_bytes), m.requests(m.rewritten_bytes), m.requests(m.unbounded_bytes)]
            lines.append(f"{m.context:>9} {format_bytes(m.original_bytes):>10}"
                         + "".join(f" {format_bytes(g.bytes):>10}" for g in m.groups)
                         + f" {format_bytes(m.rewritten_bytes):>10} {format_bytes(m.unbounded_bytes):>10}  "
                         f"{f'{_fmt_ratio(m.bytes_ratio)} ({_fmt_ratio(m.unbounded_bytes_ratio)})':>14}  "
                         f"{f'{req[0]} / {req[1]} ({req[2]})':>22}  "
                         f"{f'{_fmt_ratio(m.capacity_ratio)} ({_fmt_ratio(m.unbounded_capacity_ratio)})':>14}")
        lines.append("ratios: original / rewritten, window-bounded (unbounded in parentheses); requests: original / "
                     "rewritten (unbounded)")
        return "\n".join(lines)

    def render(self, num_tokens: int = DEFAULT_REPORT_TOKENS, *, saved: bool = True) -> str:
        """The per-layer table (each SWA layer's own window; a ``sinks`` column when any layer has sinks),
        totals (with the bytes saved at ``num_tokens`` cached tokens of every layer unless not ``saved``;
        ``render_memory`` has the window-bounded numbers) and the passes' results."""
        with_sinks = any(r.sinks for r in self.rows)
        sinks_head = f" {'sinks':>5}" if with_sinks else ""
        head = (f"{'layer':>5}  {'attention':<16} {'window':>6}{sinks_head}  {'cache before':<18} {'cache after':<18} "
                f"{'bytes/token':>14}")
        lines = [f"swa-rewrite: {self.schedule}", head, "-" * len(head)]
        for r in self.rows:
            kind = r.kind_before if r.kind_before == r.kind_after else f"{r.kind_before} -> {r.kind_after}"
            before, after = (f"{str(d).replace('torch.', '')}[{w}]" for d, w in (r.cache_before, r.cache_after))
            b0, b1 = LayerRow.bytes_per_token(r.cache_before), LayerRow.bytes_per_token(r.cache_after)
            sinks = f" {r.sinks if r.sinks is not None else '-':>5}" if with_sinks else ""
            lines.append(f"{r.layer:>5}  {kind:<16} {r.window if r.window else '-':>6}{sinks}  {before:<18} {after:<18} "
                         f"{f'{b0} -> {b1}' if b0 != b1 else b0:>14}")
        b0, b1 = self.bytes_per_token(False), self.bytes_per_token(True)
        lines.append("-" * len(head))
        total = f"all layers: {b0} -> {b1} bytes/token ({100 * (1 - b1 / b0):.1f}% less)"
        if saved:
            total += f"; {self.bytes_saved(num_tokens) / 2**30:.3f} GiB saved at {num_tokens} cached tokens"
        lines.append(total)
        lines.append("passes: " + "; ".join(str(p) for p in self.passes) + f" ({self.seconds * 1e3:.0f} ms)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _allocation_layout(allocation: torch.fx.GraphModule, inputs: list[str],
                       model: torch.nn.Module) -> list[tuple[torch.dtype, int]]:
    """``(dtype, entries per token)`` of each layer's cache, from the allocation graph run on ``meta``."""
    caches = allocation(*_fetch_attrs(model, inputs), 1, 1, "meta")
    return [(c.dtype, c.shape[-1]) for c in caches]


def _cache_layout(traced: TracedModel, model: torch.nn.Module) -> list[tuple[torch.dtype, int]]:
    return _allocation_layout(traced.allocation, traced.allocation_inputs, model)


def layer_specs(schedule: Schedule, layout: list[tuple[torch.dtype, int]]) -> tuple[KVCacheSpec, ...]:
    """The ``KVCacheSpec`` of each layer of a model rewritten with ``schedule`` whose caches have ``layout``
    (``(dtype, entries per token)`` per layer)."""
    return tuple(KVCacheSpec.of_layout(dtype, width, schedule.window_of(i) if schedule.is_swa(i) else None,
                                       schedule.sinks_of(i) if schedule.is_swa(i) else 0)
                 for i, (dtype, width) in enumerate(layout))


def _kind(site) -> str:
    return "SWA" if site.attention_role is Role.SWA_ATTENTION else "full"


_TRACE_CONTRACT = (
    "apply traces model.forward and model.allocate_kv_cache with torch.fx (symbolically: no example inputs), "
    "so both must be fx-traceable: no Python control flow on tensor values or shapes that vary per step. "
    "forward takes the step (input_ids, kv_caches, meta: StepMetadata, ...) and calls "
    "torch.ops.swa_rewrite.write_kv_cache "
    "and torch.ops.swa_rewrite.mla_attention with each layer's index as an explicit argument; "
    "allocate_kv_cache(num_blocks, page_size, device=None) returns one "
    "torch.ops.swa_rewrite.allocate_kv_cache(...) per layer. swa_rewrite.models.MLAModel is the reference "
    "(docs/design.md §8). A model fx cannot trace can still be rewritten at compile time: "
    "torch.compile(model, backend=swa_rewrite.backend(schedule))")


def _trace_or_explain(model: torch.nn.Module) -> TracedModel:
    """``trace(model)``; an fx failure (``TraceError``, or a ``Proxy`` used as a value) becomes a RewriteError
    stating the contract a traceable model meets, chained to the original error."""
    try:
        return trace(model)
    except RewriteError:
        raise
    except Exception as e:  # noqa: BLE001 - tracing runs arbitrary model code: any failure is untraceable code
        raise RewriteError(f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}). "
                           f"{_TRACE_CONTRACT}") from e


def apply(model: torch.nn.Module, schedule: Schedule, *,
          registry: Optional[AdapterRegistry] = None) -> SWAModule:
    """Rewrite the layers ``schedule`` selects into sliding-window layers with packed FP8 caches.

    Returns an ``SWAModule`` sharing ``model``'s parameters; ``result.swa_report`` prints the per-layer
    table. A ``transformers`` DeepSeek-V2/V3 model is converted with ``models.from_hf`` first (weights
    copied into the bundled paged model; logged). Works on ``meta``-device models. Applying the same
    schedule again changes nothing. Raises
    ``RewriteError`` (a ``ValueError``) when fx cannot trace the model, the model has no MLA attention, a
    selected layer has none, the schedule is for another layer count, or the ops carry no layer index;
    ``TypeError`` for a non-``Schedule`` or a selected layer whose dtype the packed FP8 cache does not take
    (float64: the supported model dtypes are bfloat16, float16 and float32). Each SWA layer gets its own
    window and sink tokens (``schedule.window_of(layer)``, ``schedule.sinks_of(layer)``, docs/design.md §12).
    """
    if is_hf_deepseek(model):   # a transformers DeepSeek-V2/V3: convert to the bundled paged model first
        log.info("swa_rewrite.apply: converting %s to the bundled MLAModel (models.from_hf)", type(model).__name__)
        model = from_hf(model)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a swa_rewrite.Schedule, got {type(schedule).__name__}")
    t0 = time.perf_counter()
    if isinstance(model, SWAModule):
        traced = TracedModel(_graph_module(model, copy.deepcopy(model.graph), "SWAModule", SWAModule),
                             copy.deepcopy(model._swa_allocation),
                             allocation_inputs=list(model._swa_allocation_inputs))
        config = getattr(model, "config", None)
    else:
        traced = _trace_or_explain(model)
        config = getattr(model, "config", None)
    layout_before = _cache_layout(traced, model)
    passes = swa_passes(schedule, registry)
    find, *rewrite = passes      # the schedule is checked against what `find` found before anything changes
    results = [find(traced)]
    num_layers = getattr(config, "num_hidden_layers", None) or len(layout_before)
    if schedule.num_layers != num_layers:
        raise RewriteError(f"the schedule is for {schedule.num_layers} layers, the model has {num_layers}")
    for layer in sorted(schedule.swa_layers):   # fx records no dtypes: the model's caches tell the latent dtype
        if layer < len(layout_before) and layout_before[layer][0] != torch.uint8:
            check_packable_dtype(layer, layout_before[layer][0])
    kinds_before = {layer: _kind(site) for layer, site in traced.sites.items()}
    results += PassManager(rewrite)(traced)
    layout_after = _cache_layout(traced, model)
    rows = [LayerRow(layer, kinds_before[layer], _kind(site),
                     schedule.window_of(layer) if schedule.is_swa(layer) else None,
                     layout_before[layer], layout_after[layer],
                     schedule.sinks_of(layer) if schedule.is_swa(layer) else None)
            for layer, site in sorted(traced.sites.items())]
    out = traced.forward
    out.__dict__["_swa_allocation"] = traced.allocation  # parameter-free; not a submodule
    out.__dict__["_swa_allocation_inputs"] = traced.allocation_inputs
    out.config = config
    out.swa_schedule = schedule
    out.swa_report = RewriteReport(schedule, rows, results, time.perf_counter() - t0,
                                   PassManager(passes).uuid())
    log.info("swa_rewrite.apply: %s", "; ".join(str(r) for r in results))
    return out
