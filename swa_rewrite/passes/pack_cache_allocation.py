"""``PackCacheAllocationPass``: selected layers' cache allocation → packed FP8 ``uint8`` layout (docs/design.md §5, §6).

Before (allocation graph, layer 3)::

    allocate_kv_cache_3 = swa_rewrite.allocate_kv_cache(num_blocks, page_size, 512, 64, dtype, device, 3)

After (same node, new arguments; ``uint8`` selects the packed layout, 656 bytes per token here)::

    allocate_kv_cache_3 = swa_rewrite.allocate_kv_cache(num_blocks, page_size, 512, 64, torch.uint8, device, 3)
"""

from __future__ import annotations

from .graph_pass import PassResult, RewriteError, SchedulePass, TracedModel


class PackCacheAllocationPass(SchedulePass):
    name = "pack-cache-allocation"

    def __call__(self, traced: TracedModel) -> PassResult:
        self.check_layer_range(traced)
        result = PassResult(self.name)
        for layer in sorted(self.schedule.swa_layers):
            site = traced.sites.get(layer)
            if site is None or site.allocation is None:
                if self.partial:
                    continue
                raise RewriteError(f"layer {layer} is selected but its cache allocation was not found in the "
                                   f"allocation graph (allocations found for layers "
                                   f"{sorted(l for l, s in traced.sites.items() if s.allocation is not None)})")
            adapter, node = site.allocation
            if adapter.is_packed_allocation(node):
                result.skipped.append(f"layer {layer}: cache already packed")
                continue
            adapter.to_packed_allocation(node)
            result.num_matches += 1
            result.details.append(f"layer {layer}: {node.name} -> packed uint8")
        return result
