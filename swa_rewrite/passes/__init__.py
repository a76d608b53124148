"""Graph passes of the rewrite, one per file, run in this order (``pipeline.swa_passes`` assembles the list for
``swa_rewrite.apply``, the Dynamo backend and the Inductor post-grad pass):

1. ``FindMLAAttentionPass`` — find each layer's attention, cache writes and cache allocation;
2. ``ReplaceAttentionPass`` — selected layers: attention → fused SWA op, cache write → packed FP8 write;
3. ``PackCacheAllocationPass`` — selected layers: cache allocation → packed ``uint8`` layout.

Each pass returns a ``PassResult``; the ``PassManager`` canonicalises the graphs after every pass.
"""

from .adapters import AdapterRegistry, MLAOpAdapter, Role, SwaRewriteOps, default_registry
from .find_attention import FindMLAAttentionPass, LayerSites
from .graph_pass import PassManager, PassResult, RewriteError, TracedModel, canonicalize
from .pack_cache_allocation import PackCacheAllocationPass
from .pipeline import swa_pass_manager, swa_passes
from .replace_attention import ReplaceAttentionPass

__all__ = ["AdapterRegistry", "FindMLAAttentionPass", "LayerSites", "MLAOpAdapter", "PackCacheAllocationPass",
           "PassManager", "PassResult", "ReplaceAttentionPass", "RewriteError", "Role", "SwaRewriteOps",
           "TracedModel", "canonicalize", "default_registry", "swa_pass_manager", "swa_passes"]
