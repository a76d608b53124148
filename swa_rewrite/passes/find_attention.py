"""``FindMLAAttentionPass``: locate every layer's MLA attention, cache writes and cache allocation.

Layers are identified by the layer index each op carries as an explicit argument, cross-checked with
the ``nn_module_stack`` the tracer records (``layers.<i>``) — never by node names or graph order.

Before (forward graph, one layer)::

    cache_3 = getitem(kv_caches, 3)
    write_kv_cache_3 = swa_rewrite.write_kv_cache(latent, cache_3, slot_mapping, 3)
    mla_attention_3 = swa_rewrite.mla_attention(q_nope, q_pe, kv_b_weight, cache_3, ..., 3)

After: unchanged; ``traced.sites[3]`` holds the attention node, its write(s) and its allocation.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import torch.fx

from .adapters import AdapterRegistry, MLAOpAdapter, Role
from .graph_pass import PassResult, RewriteError, TracedModel, layer_from_module_path


@dataclasses.dataclass
class LayerSites:
    """Where one layer's attention lives in the traced graphs; each site is ``(adapter, node)``."""

    layer: int
    attention: Optional[tuple[MLAOpAdapter, torch.fx.Node]] = None
    writes: list[tuple[MLAOpAdapter, torch.fx.Node]] = dataclasses.field(default_factory=list)
    allocation: Optional[tuple[MLAOpAdapter, torch.fx.Node]] = None

    @property
    def attention_role(self) -> Optional[Role]:
        return None if self.attention is None else self.attention[0].role(self.attention[1])

    def rope_dim(self) -> int:
        if self.attention is None:
            raise RewriteError(f"layer {self.layer}: its cache write is in this graph but its attention is not, so "
                               "the rope width of the packed cache is unknown")
        adapter, node = self.attention
        return adapter.rope_dim(node)


class FindMLAAttentionPass:
    """``partial=False`` (``apply``): the graphs are the whole model, every layer is expected complete.
    ``partial=True`` (``torch.compile`` backends): a graph may hold any part of a model, even none of it."""

    name = "find-mla-attention"

    def __init__(self, registry: AdapterRegistry, partial: bool = False):
        self.registry, self.partial = registry, partial

    def _layer(self, adapter: MLAOpAdapter, node: torch.fx.Node, role: Role) -> int:
        layer = adapter.layer_index(node)
        if layer is None:
            raise RewriteError(f"{role.value} node {node.name} ({node.target}) carries no layer index "
                               f"(its layer argument is {node.args[-1] if node.args else None!r}); the rewrite "
                               "identifies layers only by that explicit argument")
        stack_layer = layer_from_module_path(node)
        if stack_layer is not None and stack_layer != layer:
            raise RewriteError(f"{role.value} node {node.name} says layer {layer} but was called from module "
                               f"layers.{stack_layer}")
        return layer

    def __call__(self, traced: TracedModel) -> PassResult:
        result = PassResult(self.name)
        sites: dict[int, LayerSites] = {}
        seen = collections.Counter()
        num_nodes = 0
        for graph in traced.graphs():
            for node in graph.nodes:
                num_nodes += 1
                adapter, role = self.registry.classify(node)
                if role is None:
                    if node.op in ("call_function", "call_method", "call_module"):
                        seen[str(node.target)] += 1
                    continue
                layer = self._layer(adapter, node, role)
                site = sites.setdefault(layer, LayerSites(layer))
                if role in (Role.FULL_ATTENTION, Role.SWA_ATTENTION):
                    if site.attention is not None:
                        raise RewriteError(f"layer {layer} has two attention nodes: {site.attention[1].name} "
                                           f"and {node.name}")
                    site.attention = (adapter, node)
                elif role in (Role.CACHE_WRITE, Role.PACKED_CACHE_WRITE):
                    site.writes.append((adapter, node))
                else:
                    if site.allocation is not None:
                        raise RewriteError(f"layer {layer} has two cache allocations: {site.allocation[1].name} "
                                           f"and {node.name}")
                    site.allocation = (adapter, node)
        if not self.partial:
            if not any(s.attention for s in sites.values()):
                common = ", ".join(f"{t} ×{n}" for t, n in seen.most_common(8)) or "nothing"
                raise RewriteError(f"no MLA attention op found: searched {num_nodes} nodes for "
                                   f"{self.registry.op_names()}; most frequent calls found: {common}")
            for layer, site in sorted(sites.items()):
                if site.attention is None and site.writes:
                    raise RewriteError(f"cache write {site.writes[0][1].name} is for layer {layer}, which has no "
                                       "attention node")
        for layer, site in sorted(sites.items()):
            if site.attention is None:
                continue
            adapter, attn = site.attention
            for w_adapter, w in site.writes:
                cache = w_adapter.cache(w)
                if cache is not None and cache is not adapter.cache(attn):
                    raise RewriteError(f"layer {layer}: cache write {w.name} and attention {attn.name} use "
                                       "different cache tensors")
        for layer, site in sorted(sites.items()):
            role = site.attention_role
            result.details.append(f"layer {layer}: {role.value if role else 'no attention'}, {len(site.writes)} "
                                  f"write(s), allocation {site.allocation[1].name if site.allocation else None}")
        result.num_matches = len(sites)
        traced.sites = sites
        return result
