"""``ReplaceAttentionPass``: selected layers' attention → fused SWA op, their cache writes → packed FP8.

Each selected layer gets its own window and sink count, ``schedule.window_of(layer)`` and
``schedule.sinks_of(layer)`` (docs/design.md §4, §12); the op's ``sinks`` argument is set only for a layer
with sinks, so graphs without them read as before. An SWA layer whose window or sinks changed is re-targeted.

Before (layer 3 selected, window 128)::

    write_kv_cache_3 = swa_rewrite.write_kv_cache(latent, cache_3, slot_mapping, 3)
    mla_attention_3 = swa_rewrite.mla_attention(q_nope, q_pe, kv_b_weight, cache_3, <metadata>, scale, 64, 3)

After (same node names, re-targeted in place; nothing else in the graph changes)::

    write_kv_cache_3 = swa_rewrite.write_fp8_cache(latent, cache_3, slot_mapping, 64, 3)
    mla_attention_3 = swa_rewrite.swa_attention(q_nope, q_pe, kv_b_weight, cache_3, <metadata>, scale, 64, 128, 3)

(``<metadata>``: the step's block tables, per-request metadata and MHA rows. Graphs of the MQA-form ops,
``paged_mla_attention`` → ``swa_mla_attention`` on ``q_abs``, rewrite the same way.)

(A layer with 4 sink tokens also gets the op's trailing ``sinks`` argument: ``..., 4)``.)

Every layer's attention and cache writes also get their cache group (the trailing ``group`` argument, set in place
like the window; ``ops.kv_cache_spec.schedule_cache_groups``: layers with equal cache specs share a group,
numbered in order of their first layer), full layers included: with full and sliding layers the model has two
groups or more. The model's once-per-step check (``checked_step_metadata``, a graph leaf in an fx trace) gets the
same per-layer groups and each layer's cache key (``ops.step_check.schedule_spec_keys``: kind, window, sinks), so
it checks a sliding group's block tables for the pages its windows read (window-bounded caches release the rest).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.fp8_cache import LATENT_DTYPES
from ..ops.kv_cache_spec import schedule_cache_groups
from ..ops.step_check import checked_step_metadata, schedule_spec_keys
from .adapters import Role
from .graph_pass import PassResult, RewriteError, SchedulePass, TracedModel


def check_packable_dtype(layer: int, dtype: Optional[torch.dtype]) -> None:
    """A selected layer's latents (the model dtype) must be a dtype the packed FP8 write quantises; ``None``
    (not known in this graph) passes. A TypeError, not a RewriteError: the model's dtype is the user's to
    change, and no graph could make a float64 model's sliding-window layers run."""
    if dtype is not None and dtype not in LATENT_DTYPES:
        names = [str(d).replace("torch.", "") for d in LATENT_DTYPES]
        supported = ", ".join(names[:-1]) + " or " + names[-1]
        raise TypeError(f"layer {layer} is selected for a sliding-window layer, whose packed FP8 cache takes "
                        f"{supported} latents, but the model's dtype is {dtype}: cast the model first "
                        "(e.g. model.to(torch.bfloat16)) or keep the layer full")


def _window_and_sinks(adapter, node) -> tuple[int, int]:
    return adapter.window(node), adapter.sinks(node)


class ReplaceAttentionPass(SchedulePass):
    name = "replace-attention"

    def __call__(self, traced: TracedModel) -> PassResult:
        self.check_layer_range(traced)
        result = PassResult(self.name)
        sites = traced.sites
        for layer, site in sorted(sites.items()):
            role = site.attention_role
            if not self.schedule.is_swa(layer):
                if role is Role.SWA_ATTENTION:
                    raise RewriteError(f"layer {layer} is already a sliding-window layer but the schedule keeps it "
                                       "full; turning an SWA layer (packed FP8 cache) back into full attention is "
                                       "not supported: apply the schedule to the original model")
                continue
            W, S = self.schedule.window_of(layer), self.schedule.sinks_of(layer)
            shape = f"window {W}" + (f", {S} sinks" if S else "")
            if role is Role.SWA_ATTENTION and _window_and_sinks(*site.attention) == (W, S):
                result.skipped.append(f"layer {layer}: already SWA with {shape}")
            elif role is not None:
                adapter, node = site.attention
                if S:
                    adapter.to_swa_attention(node, W, S)
                else:       # an adapter whose op takes no sinks may not take the parameter
                    adapter.to_swa_attention(node, W)
                result.num_matches += 1
                result.details.append(f"layer {layer}: {node.name} -> {node.target} ({shape})")
            for adapter, node in site.writes:
                check_packable_dtype(layer, adapter.latent_dtype(node))
                if adapter.role(node) is Role.CACHE_WRITE:
                    if adapter.to_packed_write(node, site.rope_dim()):
                        result.details.append(f"layer {layer}: {node.name} -> packed FP8 write")
                    else:
                        result.skipped.append(f"layer {layer}: {node.name} kept (writes the packed layout into "
                                              "a packed cache)")
        self._set_groups(traced, result)
        missing = sorted(l for l in self.schedule.swa_layers if l not in sites or sites[l].attention is None)
        if missing and not self.partial:
            raise RewriteError(f"the schedule selects layer(s) {missing}, but the graph has no MLA attention node for "
                               f"them; attention nodes were found for layers "
                               f"{sorted(l for l, s in sites.items() if s.attention is not None)}")
        return result

    def _set_groups(self, traced: TracedModel, result: PassResult) -> None:
        """Each layer's attention and writes take the group of its cache spec; the step check takes the groups and
        each layer's cache key."""
        groups = schedule_cache_groups(self.schedule)
        keys = schedule_spec_keys(self.schedule)
        for layer, site in sorted(traced.sites.items()):
            if not 0 <= layer < len(groups):
                continue
            for adapter, node in ([site.attention] if site.attention is not None else []) + list(site.writes):
                have = adapter.group(node)
                if have is not None and have != groups[layer]:
                    adapter.set_group(node, groups[layer])
                    result.details.append(f"layer {layer}: {node.name} -> cache group {groups[layer]}")
        for node in (traced.forward.graph.nodes if traced.forward is not None else ()):
            if node.op == "call_function" and node.target is checked_step_metadata and len(node.args) >= 3 \
                    and isinstance(node.args[2], (tuple, list)) and len(node.args[2]) == len(groups) \
                    and (tuple(node.args[2]) != groups or len(node.args) < 4 or node.args[3] is None
                         or tuple(map(tuple, node.args[3])) != keys):
                node.args = (*node.args[:2], groups, keys, *node.args[4:])
