"""``FindMLAAttentionPass``: locate every layer's MLA attention, cache writes and cache allocation.

Layers are identified by the layer index each op carries as an explicit argument, cross-checked with
the ``nn_module_stack`` the tracer records (``layers.<i>``) — never by node names or graph order.

Before (forward graph, one layer)::

    cache_3 = getitem(kv_caches, 3)
    write_kv_cache_3 = swa_rewrite.write_kv_cache(latent, cache_3, slot_mapping, 3)
    paged_mla_attention_3 = swa_rewrite.paged_mla_attention(q_abs, cache_3, ..., 3)

After: unchanged; ``traced.sites[3]`` holds the attention node, its write(s) and its allocation.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Optional

import torch.fx

from .adapters import AdapterRegistry, MLAOpAdapter, Role
from .graph_pass import PassResult, RewriteError, TracedModel

_LAYER_IN_PATH = re.compile(r"layers(?:\.|\[|_)(\d+)")


def layer_from_module_stack(node: torch.fx.Node) -> Optional[int]:
    """The ``layers.<i>`` index of the innermost module that called ``node``, if the tracer recorded one."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, value in reversed(list(stack.items())):
        path = value[0] if isinstance(value, tuple) else key
        m = _LAYER_IN_PATH.findall(str(path))
        if m:
            return int(m[-1])
    return None


@dataclasses.dataclass
class LayerSites:
    """Where one layer's attention lives in the traced graphs."""

    layer: int
    adapter: MLAOpAdapter
    attention: torch.fx.Node
    writes: list[torch.fx.Node] = dataclasses.field(default_factory=list)
    allocation: Optional[torch.fx.Node] = None
    allocation_adapter: Optional[MLAOpAdapter] = None


class FindMLAAttentionPass:
    name = "find-mla-attention"

    def __init__(self, registry: AdapterRegistry):
        self.registry = registry

    def _layer(self, adapter: MLAOpAdapter, node: torch.fx.Node, role: Role) -> int:
        layer = adapter.layer_index(node)
        if layer is None:
            raise RewriteError(f"{role.value} node {node.name} ({node.target}) carries no layer index "
                               f"(its layer argument is {node.args[-1] if node.args else None!r}); the rewrite "
                               "identifies layers only by that explicit argument")
        stack_layer = layer_from_module_stack(node)
        if stack_layer is not None and stack_layer != layer:
            raise RewriteError(f"{role.value} node {node.name} says layer {layer} but was called from module "
                               f"layers.{stack_layer}")
        return layer

    def __call__(self, traced: TracedModel) -> PassResult:
        result = PassResult(self.name)
        sites: dict[int, LayerSites] = {}
        writes: dict[int, list] = collections.defaultdict(list)
        seen = collections.Counter()
        for node in traced.forward.graph.nodes:
            adapter, role = self.registry.classify(node)
            if role is None:
                if node.op in ("call_function", "call_method", "call_module"):
                    seen[str(node.target)] += 1
                continue
            layer = self._layer(adapter, node, role)
            if role in (Role.FULL_ATTENTION, Role.SWA_ATTENTION):
                if layer in sites:
                    raise RewriteError(f"layer {layer} has two attention nodes: {sites[layer].attention.name} "
                                       f"and {node.name}")
                sites[layer] = LayerSites(layer, adapter, node)
            elif role in (Role.CACHE_WRITE, Role.PACKED_CACHE_WRITE):
                writes[layer].append((adapter, node))
        if not sites:
            common = ", ".join(f"{t} ×{n}" for t, n in seen.most_common(8)) or "nothing"
            raise RewriteError(f"no MLA attention op found: searched {len(traced.forward.graph.nodes)} nodes of the "
                               f"forward graph for {self.registry.op_names()}; most frequent calls found: {common}")
        for layer, found in sorted(writes.items()):
            if layer not in sites:
                raise RewriteError(f"cache write {found[0][1].name} is for layer {layer}, which has no attention node")
            site = sites[layer]
            for adapter, node in found:
                if adapter.cache(node) is not site.adapter.cache(site.attention):
                    raise RewriteError(f"layer {layer}: cache write {node.name} and attention {site.attention.name} "
                                       "use different cache tensors")
                site.writes.append(node)
        for node in traced.allocation.graph.nodes:
            adapter, role = self.registry.classify(node)
            if role is not Role.ALLOCATION:
                continue
            layer = adapter.layer_index(node)
            if layer is None:
                raise RewriteError(f"cache allocation {node.name} carries no layer index")
            if layer in sites:
                if sites[layer].allocation is not None:
                    raise RewriteError(f"layer {layer} has two cache allocations")
                sites[layer].allocation, sites[layer].allocation_adapter = node, adapter
        for layer, site in sorted(sites.items()):
            role = site.adapter.role(site.attention)
            result.details.append(f"layer {layer}: {role.value} {site.attention.name}, {len(site.writes)} write(s), "
                                  f"allocation {site.allocation.name if site.allocation is not None else None}")
        result.num_matches = len(sites)
        traced.sites = sites
        return result
