"""Structural diff of two fx graphs, grouped by layer (docs/design.md §8).

Nodes are matched by name: the rewrite re-targets nodes in place, so a node that keeps its name but
calls another op is *re-targeted*, one that keeps its op but not its arguments has *changed arguments*,
and names present on one side only are *added* / *removed*. Each layer's subgraph is also compared with
``networkx`` (as ``DiGraph``s labelled by op and target) to show that untouched layers are structurally
identical, not merely equal by name.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Optional, Union

import networkx as nx
import torch
import torch.fx
from networkx.algorithms.isomorphism import DiGraphMatcher

from .passes.adapters import AdapterRegistry, Role, default_registry
from .passes.graph_pass import LAYER_IN_PATH, layer_from_module_path, op_name

GraphLike = Union[torch.fx.Graph, torch.fx.GraphModule]


def node_layer(node: torch.fx.Node, registry: Optional[AdapterRegistry] = None) -> Optional[int]:
    """The layer a node belongs to: the layer index an MLA op carries (asked of the adapter of ``registry``,
    default this package's ops, that recognises the node), else the module path it came from."""
    adapter, role = (registry or default_registry()).classify(node)
    if role is not None:
        layer = adapter.layer_index(node)
        if layer is not None:
            return layer
    return layer_from_module_path(node)


def _label(node: torch.fx.Node) -> str:
    name = op_name(node.target)
    if name is not None:
        return f"{node.op}:{name}"
    if node.op == "get_attr" or node.op == "call_module":
        # Layer-relative path, so layer 3's q_b_proj and layer 5's compare equal.
        return f"{node.op}:{LAYER_IN_PATH.sub('layers.#', str(node.target))}"
    return f"{node.op}:{getattr(node.target, '__name__', node.target)}"


def _arg_repr(a) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg_repr(x) for x in a) + "]"
    return repr(a)


def _call_repr(node: torch.fx.Node) -> str:
    args = [_arg_repr(a) for a in node.args] + [f"{k}={_arg_repr(v)}" for k, v in node.kwargs.items()]
    return f"{_label(node).split(':', 1)[1]}({', '.join(args)})"


# The rewrite's op pairs: the same role in the dataflow, whichever of the two a node calls.
_ROLE_LABEL = {Role.FULL_ATTENTION: "MLA attention", Role.SWA_ATTENTION: "MLA attention",
               Role.CACHE_WRITE: "cache write", Role.PACKED_CACHE_WRITE: "cache write",
               Role.ALLOCATION: "cache allocation"}


def role_label(node: torch.fx.Node, registry: Optional[AdapterRegistry] = None) -> str:
    """``_label`` with each MLA op (as the adapters of ``registry`` classify it) replaced by its role, to compare
    dataflow across the rewrite."""
    _, role = (registry or default_registry()).classify(node)
    return _ROLE_LABEL[role] if role is not None else _label(node)


def nodes_by_layer(graph: GraphLike,
                   registry: Optional[AdapterRegistry] = None) -> dict[Optional[int], list[torch.fx.Node]]:
    """The graph's nodes grouped by ``node_layer`` (``None``: outside layers), in graph order; one pass."""
    graph = graph.graph if isinstance(graph, torch.fx.GraphModule) else graph
    registry = registry or default_registry()
    groups: dict[Optional[int], list[torch.fx.Node]] = collections.defaultdict(list)
    for n in graph.nodes:
        groups[node_layer(n, registry)].append(n)
    return groups


def to_digraph(graph: GraphLike, layer: Optional[int] = None, all_layers: bool = False,
               label: Callable[[torch.fx.Node], str] = None, *,
               nodes: Optional[list[torch.fx.Node]] = None) -> nx.DiGraph:
    """The graph (or one layer's nodes, when ``layer`` is given) as a ``DiGraph`` whose nodes are labelled
    by op and target (or by ``label``). ``nodes`` (one group of ``nodes_by_layer``) skips the layer scan."""
    graph = graph.graph if isinstance(graph, torch.fx.GraphModule) else graph
    label = label or _label
    if nodes is None:
        nodes = [n for n in graph.nodes if all_layers or node_layer(n) == layer]
    keep = set(nodes)
    g = nx.DiGraph()
    for n in nodes:
        g.add_node(n.name, label=label(n))
    for n in nodes:
        # Edges carry the argument positions they feed, so swapping two inputs is a structural change.
        positions: dict[torch.fx.Node, list[int]] = collections.defaultdict(list)
        counter = iter(range(1 << 30))

        def visit(a):
            if isinstance(a, torch.fx.Node):
                positions[a].append(next(counter))
            return a

        torch.fx.node.map_aggregate((n.args, n.kwargs), visit)
        for inp, pos in positions.items():
            if inp in keep:
                g.add_edge(inp.name, n.name, args=tuple(pos))
    return g


def isomorphic(a: nx.DiGraph, b: nx.DiGraph) -> bool:
    """Whether ``a`` and ``b`` are isomorphic, node labels and edge argument positions included."""
    if a.number_of_nodes() != b.number_of_nodes() or a.number_of_edges() != b.number_of_edges():
        return False
    if collections.Counter(nx.get_node_attributes(a, "label").values()) != \
            collections.Counter(nx.get_node_attributes(b, "label").values()):
        return False
    if _same_by_name(a, b):
        return True   # the identity on node names is an isomorphism: no search needed
    return DiGraphMatcher(a, b, node_match=lambda x, y: x["label"] == y["label"],
                          edge_match=lambda x, y: x.get("args") == y.get("args")).is_isomorphic()


def _same_by_name(a: nx.DiGraph, b: nx.DiGraph) -> bool:
    """Linear check that mapping each node to the node of the same name preserves labels and edges.

    The rewrite keeps node names, so this witness almost always exists; VF2 (quadratic state set-up per
    layer, 4.6 s on a 61-layer graph) only runs when it does not.
    """
    if a.nodes.keys() != b.nodes.keys():
        return False
    if any(a.nodes[n].get("label") != b.nodes[n].get("label") for n in a.nodes):
        return False
    return all(b.has_edge(u, v) and b.edges[u, v].get("args") == data.get("args") for u, v, data in a.edges(data=True))


@dataclasses.dataclass
class LayerDiff:
    layer: Optional[int]
    added: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    retargeted: list[str] = dataclasses.field(default_factory=list)
    changed_args: list[str] = dataclasses.field(default_factory=list)
    num_nodes: int = 0
    isomorphic: bool = True          # unchanged layers: same graph, node for node
    same_dataflow: bool = True       # changed layers: same graph once rewritten ops count by their role

    @property
    def unchanged(self) -> bool:
        return not (self.added or self.removed or self.retargeted or self.changed_args)


@dataclasses.dataclass
class GraphDiff:
    """Per-layer differences between two graphs; ``str()`` renders the text form."""

    layers: dict[Optional[int], LayerDiff]

    @property
    def changed_layers(self) -> list[Optional[int]]:
        return [k for k, d in self.layers.items() if not d.unchanged]

    def render(self, compact: bool = False) -> str:
        out = []
        same = [k for k, d in self.layers.items() if d.unchanged and k is not None]
        for key in sorted(self.layers, key=lambda k: (k is None, k if k is not None else 0)):
            d = self.layers[key]
            if d.unchanged:
                continue
            title = "outside layers" if key is None else f"layer {key}"
            flow = ("same dataflow, ops swapped in place" if d.same_dataflow else "dataflow changed")
            out.append(f"{title}: {len(d.retargeted)} re-targeted, {len(d.changed_args)} with new arguments, "
                       f"{len(d.added)} added, {len(d.removed)} removed; {flow}")
            if not compact:
                out += [f"  ~ {x}" for x in d.retargeted] + [f"  * {x}" for x in d.changed_args]
                out += [f"  + {x}" for x in d.added] + [f"  - {x}" for x in d.removed]
        if same:
            iso = all(self.layers[k].isomorphic for k in same)
            out.append(f"unchanged layers {_ranges(same)}: "
                       + ("structurally identical (networkx isomorphism)" if iso else "NOT isomorphic"))
        if None in self.layers and self.layers[None].unchanged:
            out.append(f"outside layers: unchanged ({self.layers[None].num_nodes} nodes)")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


def _ranges(values: list[int]) -> str:
    values = sorted(values)
    parts, start = [], values[0]
    for prev, cur in zip(values, values[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(parts)


def graph_diff(before: GraphLike | torch.nn.Module, after: GraphLike | torch.nn.Module, *,
               registry: Optional[AdapterRegistry] = None) -> GraphDiff:
    """Compare two graphs (e.g. a traced model and its rewrite) node by node, grouped by layer.

    Either side may be a plain module (e.g. the original model): it is traced as ``apply`` traces it.
    ``registry`` (default: this package's ops) tells which nodes are MLA ops, their layer and their role, as
    it does for ``apply``: pass the registry the rewrite used. Linear in the graph size: every node's layer
    is computed once.
    """
    registry = registry or default_registry()
    gb, ga = _as_graph(before), _as_graph(after)
    groups_b, groups_a = nodes_by_layer(gb, registry), nodes_by_layer(ga, registry)
    nb, na = {n.name: n for n in gb.nodes}, {n.name: n for n in ga.nodes}
    layers: dict[Optional[int], LayerDiff] = {}

    def entry(layer):
        return layers.setdefault(layer, LayerDiff(layer))

    for key, group in groups_b.items():
        d = entry(key)
        d.num_nodes += len(group)
        for n in group:
            m = na.get(n.name)
            if m is None:
                d.removed.append(f"{n.name} = {_call_repr(n)}")
            elif _label(m) != _label(n):
                d.retargeted.append(f"{n.name}: {_label(n).split(':', 1)[1]} -> {_call_repr(m)}")
            elif _call_repr(m) != _call_repr(n):
                d.changed_args.append(f"{n.name}: {_call_repr(n)} -> {_call_repr(m)}")
    for key, group in groups_a.items():
        for m in group:
            if m.name not in nb:
                entry(key).added.append(f"{m.name} = {_call_repr(m)}")
    for key, d in layers.items():
        if key is not None and d.unchanged:
            d.isomorphic = isomorphic(to_digraph(gb, nodes=groups_b.get(key, [])),
                                      to_digraph(ga, nodes=groups_a.get(key, [])))
        elif not d.unchanged:
            by_role = functools.partial(role_label, registry=registry)
            d.same_dataflow = isomorphic(to_digraph(gb, label=by_role, nodes=groups_b.get(key, [])),
                                         to_digraph(ga, label=by_role, nodes=groups_a.get(key, [])))
    return GraphDiff(layers)


def _as_graph(x: GraphLike | torch.nn.Module) -> torch.fx.Graph:
    if isinstance(x, torch.fx.Graph):
        return x
    if isinstance(x, torch.fx.GraphModule):
        return x.graph
    if isinstance(x, torch.nn.Module):
        from .rewrite import trace  # the public layer; imported here so graph_diff stays importable alone
        return trace(x).forward.graph
    raise TypeError(f"graph_diff compares fx graphs, GraphModules or nn.Modules, got {type(x).__name__}")
