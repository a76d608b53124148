"""Pass infrastructure: the traced model a pass works on, pass results, canonicalisation, the manager.

A pass is an object with a ``name`` and ``__call__(traced) -> PassResult`` that edits
``traced.forward`` / ``traced.allocation`` in place. The manager runs passes in order, canonicalises
both graphs after each one (dead code, lint) as TensorRT-LLM AutoDeploy does, and regenerates their
code once at the end (a recompile of a 61-layer graph costs ~0.1 s, so not after every pass).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import re
import sys
from typing import Any, Optional, Protocol, Sequence

import torch
import torch.fx


class RewriteError(ValueError):
    """The rewrite cannot proceed: the message says what was searched and what was found."""


@dataclasses.dataclass
class TracedModel:
    """The two graphs of a model the passes rewrite.

    ``forward``: the model's step (tokens, metadata, caches → logits). ``allocation``: its
    ``allocate_kv_cache(num_blocks, page_size, device)``, returning one cache per layer. Either may be
    absent when a compiler hands us one graph at a time.
    ``sites`` is filled by ``FindMLAAttentionPass``: layer index → ``LayerSites``.
    """

    forward: Optional[torch.fx.GraphModule]
    allocation: Optional[torch.fx.GraphModule] = None
    sites: dict[int, Any] = dataclasses.field(default_factory=dict)
    # The allocation graph holds no parameters: its leading inputs are these attributes of the model
    # (e.g. ``lm_head.weight``, whose dtype and device the caches take), read at call time.
    allocation_inputs: list[str] = dataclasses.field(default_factory=list)

    def graphs(self) -> list[torch.fx.Graph]:
        return [gm.graph for gm in (self.forward, self.allocation) if gm is not None]

    def modules(self) -> list[torch.fx.GraphModule]:
        return [gm for gm in (self.forward, self.allocation) if gm is not None]


@dataclasses.dataclass
class PassResult:
    """What one pass did: ``num_matches`` sites changed, ``skipped`` sites left alone (with why)."""

    name: str
    num_matches: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)
    details: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.name}: {self.num_matches} matched"
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        return text


class GraphPass(Protocol):
    name: str

    def __call__(self, traced: TracedModel) -> PassResult: ...


class SchedulePass:
    """Base of the passes driven by a schedule. ``partial=True``: the graphs may hold any part of the model
    (a compiler's graph), so layers the schedule selects may be absent without error."""

    name = "schedule-pass"

    def __init__(self, schedule: Any, partial: bool = False):
        self.schedule, self.partial = schedule, partial

    def config_key(self) -> dict:
        return {"schedule": self.schedule.to_dict(), "partial": self.partial}

    def check_layer_range(self, traced: TracedModel) -> None:
        """A graph layer the schedule cannot index means the schedule is for another model. Partial graphs
        (a compiler's) may lack layers, so this is the one layer-count check that holds for any graph."""
        beyond = sorted(layer for layer in traced.sites if layer >= self.schedule.num_layers)
        if beyond:
            raise RewriteError(f"the schedule is for {self.schedule.num_layers} layers, but the graph holds layer(s) "
                               f"{beyond}: build the schedule for the model's layer count")


def resolve_overloads(graph: torch.fx.Graph) -> torch.fx.Graph:
    """``torch.ops.ns.op`` (a packet) → ``torch.ops.ns.op.default``, so each op has one spelling in the
    graph and its schema is visible (an in-place cache write must never look dead)."""
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverloadPacket):
            if node.target.overloads() == ["default"]:
                node.target = node.target.default
    return graph


def _is_impure(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.is_impure() or (node.op == "call_function" and schema is not None and schema.is_mutable)


def eliminate_dead_code(graph: torch.fx.Graph) -> None:
    """Drop dead nodes. Nodes calling ops with a mutable schema (cache writes) are never dead, whatever this
    torch version's purity check says (torch 2.11's dropped unresolved packets). The graph needs an owning
    module (the purity check looks modules up there)."""
    resolve_overloads(graph)
    try:
        graph.eliminate_dead_code(is_impure_node=_is_impure)
    except TypeError:  # older torch: no custom purity check, rely on the resolved schemas
        graph.eliminate_dead_code()


def canonicalize(gm: torch.fx.GraphModule) -> None:
    """Drop dead nodes (see ``eliminate_dead_code``) and lint."""
    eliminate_dead_code(gm.graph)
    gm.graph.lint()


class PassManager:
    """Runs ``passes`` in order, canonicalising after each; ``uuid()`` hashes the passes' code and config."""

    def __init__(self, passes: Sequence[GraphPass]):
        self.passes = list(passes)

    def __call__(self, traced: TracedModel) -> list[PassResult]:
        results = []
        for p in self.passes:
            results.append(p(traced))
            for gm in traced.modules():
                canonicalize(gm)
        for gm in traced.modules():
            gm.recompile()
        return results

    def uuid(self) -> str:
        """Changes when a pass's code (its classes, the adapters it uses) or its configuration changes."""
        h = hashlib.sha256()
        modules: dict[str, None] = {}
        for p in self.passes:
            classes = [c for c in type(p).__mro__ if c.__module__.startswith("swa_rewrite")]
            classes += [type(a) for a in getattr(p, "registry", ())]
            for cls in classes:
                h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
                modules[cls.__module__] = None
                try:
                    h.update(inspect.getsource(cls).encode())
                except (OSError, TypeError):  # defined interactively: its name has to do
                    pass
            for adapter in getattr(p, "registry", ()):   # two adapters of one class may differ in their settings
                h.update(repr(sorted(vars(adapter).items(), key=lambda kv: kv[0])).encode())
            config = getattr(p, "config_key", None)
            if config is not None:
                h.update(repr(config()).encode())
        for name in modules:  # whole modules, so helper functions (call_op, canonicalize, ...) count too
            try:
                h.update(inspect.getsource(sys.modules[name]).encode())
            except (OSError, TypeError, KeyError):
                pass
        return h.hexdigest()


def op_name(target: Any) -> Optional[str]:
    """``"namespace::name"`` of an op overload or packet, else None."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def bound_args(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name (positional and keyword merged)."""
    names = [a.name for a in _overload(node.target)._schema.arguments]
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def call_op(node: torch.fx.Node, op: torch._ops.OpOverload, arguments: dict[str, Any]) -> None:
    """Re-target ``node`` in place to ``op`` with ``arguments`` by schema name (the node keeps its name).

    Trailing arguments left out of ``arguments`` keep their schema defaults (a newer op's ``sinks=0``) and are
    left off the node, so graphs read as they did before the op gained them."""
    schema = list(op._schema.arguments)
    while schema and schema[-1].name not in arguments and schema[-1].has_default_value():
        schema.pop()
    eager = node.meta.get("eager_input_vals")
    if eager is not None:
        # Inductor lowers stride-sensitive ops from the recorded example inputs: keep them in step.
        old = dict(zip([a.name for a in _overload(node.target)._schema.arguments], eager[0]))
        old.update(eager[1])
        # Tensors keep their recorded example values; constants (a new window, say) take the new value.
        node.meta["eager_input_vals"] = (tuple(old.get(a.name) if isinstance(arguments[a.name], torch.fx.Node)
                                               else arguments[a.name] for a in schema), {})
    node.target = op
    node.args = tuple(arguments[a.name] for a in schema)
    node.kwargs = {}


# A layer's module path: `layers.3` (named_modules), `layers[3]` (Dynamo's sources), `layers_3` (node names).
LAYER_IN_PATH = re.compile(r"layers(?:\.|\[|_)(\d+)")


def layer_from_module_path(node: torch.fx.Node) -> Optional[int]:
    """The ``layers.<i>`` index of the innermost module that holds ``node``: the target of a ``call_module`` /
    ``get_attr`` node, else the ``nn_module_stack`` the tracer recorded; None if neither names a layer."""
    paths = [str(node.target)] if node.op in ("call_module", "get_attr") else []
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        paths.append(str(value[0] if isinstance(value, tuple) else key))
    for path in reversed(paths):
        m = LAYER_IN_PATH.findall(path)
        if m:
            return int(m[-1])
    return None


def _overload(target: Any) -> torch._ops.OpOverload:
    return target.default if isinstance(target, torch._ops.OpOverloadPacket) else target
