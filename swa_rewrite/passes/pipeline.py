"""The rewrite's pass pipeline, assembled in one place (docs/design.md §8).

``apply`` (fx), the Dynamo backend and the Inductor post-grad pass all take their passes, and their
``uuid()``, from ``swa_passes`` / ``swa_pass_manager``, so the three entry points cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Optional

from .adapters import AdapterRegistry, default_registry
from .find_attention import FindMLAAttentionPass
from .graph_pass import GraphPass, PassManager
from .pack_cache_allocation import PackCacheAllocationPass
from .replace_attention import ReplaceAttentionPass


def swa_passes(schedule: Any, registry: Optional[AdapterRegistry] = None, *,
               partial: bool = False) -> list[GraphPass]:
    """The rewrite's passes, in the order they run: find → replace attention → pack cache allocation.

    ``schedule`` is a ``swa_rewrite.Schedule``; ``registry`` the op adapters (default: this package's ops).
    ``partial=False`` (``apply``): the graphs are the whole model. ``partial=True`` (compiler backends): a
    graph may hold any part of the model, so selected layers may be absent without error.
    """
    registry = registry or default_registry()
    return [FindMLAAttentionPass(registry, partial=partial),
            ReplaceAttentionPass(schedule, partial=partial),
            PackCacheAllocationPass(schedule, partial=partial)]


def swa_pass_manager(schedule: Any, registry: Optional[AdapterRegistry] = None, *,
                     partial: bool = False) -> PassManager:
    """A ``PassManager`` over ``swa_passes(schedule, registry, partial=partial)``."""
    return PassManager(swa_passes(schedule, registry, partial=partial))
