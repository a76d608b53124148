"""The registry of MLA op families the rewrite recognises.

An adapter tells the passes how one engine's ops look in a graph: which node is a full MLA attention,
an SWA attention, a latent-cache write or a cache allocation; the layer index each carries; and how to
turn each into its sliding-window / packed-FP8 counterpart in place. ``SwaRewriteOps`` covers this
package's own ``torch.ops.swa_rewrite.*``. An engine with its own MLA op registers an adapter
(``AdapterRegistry.register``) without touching the passes.
"""

from __future__ import annotations

import abc
import enum
from typing import Iterable, Optional

import torch
import torch.fx

from .graph_pass import _overload, bound_args, call_op, op_name


def functionalized_op(node: torch.fx.Node) -> Optional[torch._ops.OpOverload]:
    """The mutating op wrapped by an ``auto_functionalized`` (v1 or v2) node, as post-grad graphs show
    in-place ops, else None."""
    hop = getattr(torch.ops.higher_order, "auto_functionalized", None)
    hop2 = getattr(torch.ops.higher_order, "auto_functionalized_v2", None)
    if node.op == "call_function" and node.target in (hop, hop2) and node.args:
        return node.args[0]
    return None


def _arguments(node: torch.fx.Node) -> dict:
    return dict(node.kwargs) if functionalized_op(node) is not None else bound_args(node)


class Role(enum.Enum):
    FULL_ATTENTION = "full attention"
    SWA_ATTENTION = "SWA attention"
    CACHE_WRITE = "cache write"
    PACKED_CACHE_WRITE = "packed cache write"
    ALLOCATION = "cache allocation"


class MLAOpAdapter(abc.ABC):
    """How one engine's MLA ops look in a graph, and how to turn them into the sliding-window / packed-FP8
    ones in place. ``SwaRewriteOps`` is the reference implementation; register others with
    ``AdapterRegistry.register``.

    Every adapter implements the three abstract methods: ``role`` (which node is what), ``layer_index`` and
    ``op_names``; ``graph_diff`` needs no more. The other methods are called only for nodes to which this
    adapter's ``role`` gave the role they name, so an adapter implements those of the roles it recognises
    (one that only recognises attention needs ``cache``, ``rope_dim``, ``window`` and ``to_swa_attention``, and
    ``sinks`` if its SWA op takes sink tokens); the defaults raise ``NotImplementedError`` naming the method.
    A method that edits a node re-targets it in place (``graph_pass.call_op``): the node keeps its name, so
    graphs before and after diff node for node.
    """

    name: str = "adapter"

    @abc.abstractmethod
    def role(self, node: torch.fx.Node) -> Optional[Role]:
        """The ``Role`` of ``node`` if it is one of this adapter's ops, else None (the node is not ours).

        Called for every node of every graph by ``FindMLAAttentionPass`` (through
        ``AdapterRegistry.classify``: the first adapter returning a role owns the node), again by
        ``ReplaceAttentionPass`` for the attention and cache writes of each layer, and by ``graph_diff``.
        Must be cheap and side-effect free; post-grad graphs show in-place writes as ``auto_functionalized``
        nodes (see ``functionalized_op``)."""

    @abc.abstractmethod
    def op_names(self) -> list[str]:
        """The ``"namespace::name"`` of every op this adapter recognises. Called only to word the
        ``RewriteError`` raised when no MLA attention is found."""

    @abc.abstractmethod
    def layer_index(self, node: torch.fx.Node) -> Optional[int]:
        """The layer index ``node`` carries as an explicit argument (an ``int`` ≥ 0), or None if it carries
        none (then ``FindMLAAttentionPass`` raises a ``RewriteError``: layers are never guessed from graph
        order). Called for every node ``role`` recognises, by ``FindMLAAttentionPass`` and ``graph_diff``."""

    def cache(self, node: torch.fx.Node) -> Optional[torch.fx.Node]:
        """The cache tensor (a graph node) an attention or cache-write node reads or writes, or None where the
        graph does not say (then no check is made). Called by ``FindMLAAttentionPass`` for each layer's
        attention and writes, to check that both use the same cache."""
        raise NotImplementedError(f"{type(self).__name__}.cache: required by an adapter that recognises "
                                  "attention or cache writes")

    def rope_dim(self, node: torch.fx.Node) -> int:
        """The rope width ``P`` of an attention node (``FULL_ATTENTION`` or ``SWA_ATTENTION``), which fixes the
        packed row layout (docs/design.md §6). Called by ``ReplaceAttentionPass`` before it packs the
        layer's cache writes."""
        raise NotImplementedError(f"{type(self).__name__}.rope_dim: required by an adapter that recognises "
                                  "attention")

    def window(self, node: torch.fx.Node) -> int:
        """The window ``W`` of an ``SWA_ATTENTION`` node. Called by ``ReplaceAttentionPass`` for selected
        layers that are already sliding-window layers (same window: skipped, e.g. on a second ``apply``)."""
        raise NotImplementedError(f"{type(self).__name__}.window: required by an adapter that recognises "
                                  "SWA attention")

    def sinks(self, node: torch.fx.Node) -> int:
        """The number of sink tokens of an ``SWA_ATTENTION`` node (docs/design.md §12), 0 for a plain window.
        Called by ``ReplaceAttentionPass`` with ``window`` for selected layers that are already sliding-window
        layers (same window and sinks: skipped). The default returns 0: an adapter whose SWA op takes no
        sinks need not implement it."""
        return 0

    def to_swa_attention(self, node: torch.fx.Node, window: int, sinks: int = 0) -> None:
        """Re-target an attention node of a selected layer, in place, to sliding-window attention with
        ``window`` and ``sinks`` sink tokens (positions ``0 … sinks-1`` stay visible, docs/design.md §12) over
        the packed FP8 cache; returns nothing. Called by ``ReplaceAttentionPass`` for ``FULL_ATTENTION``
        nodes and for ``SWA_ATTENTION`` nodes with another window or sink count; ``sinks`` is passed only
        when the layer has sinks (> 0), so an adapter whose op takes none may leave the parameter out."""
        raise NotImplementedError(f"{type(self).__name__}.to_swa_attention: required by an adapter that "
                                  "recognises attention")

    def group(self, node: torch.fx.Node) -> Optional[int]:
        """The cache group (docs/design.md §12) an attention or cache-write node carries as a constant argument,
        or None where its op takes none. Called by ``ReplaceAttentionPass`` for every layer's attention and
        writes, before ``set_group``; the default: no group argument."""
        return None

    def set_group(self, node: torch.fx.Node, group: int) -> None:
        """Set the cache group of an attention or cache-write node, in place (the node keeps its name and op),
        as the window is set. Called by ``ReplaceAttentionPass`` only where ``group`` returned another int, so
        an adapter whose ops take no group need not implement it."""
        raise NotImplementedError(f"{type(self).__name__}.set_group: required by an adapter whose group() "
                                  "returns a group")

    def latent_dtype(self, node: torch.fx.Node) -> Optional[torch.dtype]:
        """The dtype of the latent a cache write node writes, where the graph records it (Dynamo's and
        Inductor's graphs carry example values; a symbolic fx trace does not), else None. Called for the
        writes of selected layers, before ``to_packed_write``; the default knows nothing."""
        return None

    def to_packed_write(self, node: torch.fx.Node, rope_dim: int) -> bool:
        """Make a ``CACHE_WRITE`` node of a selected layer write the packed FP8 layout (rope width
        ``rope_dim``), in place. Returns True if the node was changed, False if it was left as it is (it
        already writes the packed layout into a packed cache; reported as skipped). Called by
        ``ReplaceAttentionPass``."""
        raise NotImplementedError(f"{type(self).__name__}.to_packed_write: required by an adapter that "
                                  "recognises cache writes")

    def is_packed_allocation(self, node: torch.fx.Node) -> bool:
        """Whether an ``ALLOCATION`` node already allocates the packed ``uint8`` layout. Called by
        ``PackCacheAllocationPass`` for selected layers, before ``to_packed_allocation``."""
        raise NotImplementedError(f"{type(self).__name__}.is_packed_allocation: required by an adapter that "
                                  "recognises cache allocations")

    def to_packed_allocation(self, node: torch.fx.Node) -> None:
        """Make an ``ALLOCATION`` node of a selected layer allocate the packed ``uint8`` layout, in place;
        returns nothing. Called by ``PackCacheAllocationPass`` when ``is_packed_allocation`` is False."""
        raise NotImplementedError(f"{type(self).__name__}.to_packed_allocation: required by an adapter that "
                                  "recognises cache allocations")


class SwaRewriteOps(MLAOpAdapter):
    """This package's ops: the MLA core ``mla_attention`` → ``swa_attention`` (what the model calls, SPEC §13;
    graphs of the MQA-form ops from before the boundary moved still rewrite, ``paged_mla_attention`` →
    ``swa_mla_attention``), ``write_kv_cache`` → ``write_fp8_cache``, ``allocate_kv_cache(..., model dtype, ...)``
    → ``allocate_kv_cache(..., uint8, ...)`` (the packed FP8 layout)."""

    name = "swa_rewrite"
    # A full op and the sliding-window op it becomes.
    _SWA_OF = {"swa_rewrite::mla_attention": "swa_attention", "swa_rewrite::swa_attention": "swa_attention",
               "swa_rewrite::paged_mla_attention": "swa_mla_attention",
               "swa_rewrite::swa_mla_attention": "swa_mla_attention"}
    _ROLES = {
        "swa_rewrite::mla_attention": Role.FULL_ATTENTION,
        "swa_rewrite::swa_attention": Role.SWA_ATTENTION,
        "swa_rewrite::paged_mla_attention": Role.FULL_ATTENTION,
        "swa_rewrite::swa_mla_attention": Role.SWA_ATTENTION,
        "swa_rewrite::write_kv_cache": Role.CACHE_WRITE,
        "swa_rewrite::write_fp8_cache": Role.PACKED_CACHE_WRITE,
        "swa_rewrite::allocate_kv_cache": Role.ALLOCATION,
    }

    def role(self, node):
        if node.op != "call_function":
            return None
        inner = functionalized_op(node)
        if inner is not None:
            role = self._ROLES.get(op_name(inner))
            return role if role in (Role.CACHE_WRITE, Role.PACKED_CACHE_WRITE) else None
        return self._ROLES.get(op_name(node.target))

    def op_names(self):
        return sorted(self._ROLES)

    def layer_index(self, node):
        layer = _arguments(node).get("layer")
        return layer if isinstance(layer, int) and layer >= 0 else None

    def cache(self, node):
        # A functionalised write (v2) names its cache through `_all_bases`; no identity check then.
        return _arguments(node).get("cache")

    def window(self, node):
        return bound_args(node)["window"]

    def rope_dim(self, node):
        return bound_args(node)["rope_dim"]

    def latent_dtype(self, node):
        latent = _arguments(node).get("latent")
        value = latent.meta.get("val", latent.meta.get("example_value")) if isinstance(latent, torch.fx.Node) else None
        return value.dtype if isinstance(value, torch.Tensor) else None

    def group(self, node):
        group = _arguments(node).get("group")
        return group if isinstance(group, int) else None

    def set_group(self, node, group):
        if functionalized_op(node) is not None:
            node.update_kwarg("group", group)    # the wrapped op's arguments are the wrapper's kwargs
            return
        args = bound_args(node)
        args["group"] = group
        call_op(node, _overload(node.target), args)

    def sinks(self, node):
        return bound_args(node).get("sinks", 0)    # left off the node: the schema's default, 0

    def to_swa_attention(self, node, window, sinks=0):
        args = bound_args(node)
        args["window"] = window
        # Set only when > 0, so a graph without sinks reads as before the op took them (call_op leaves the
        # defaulted trailing argument off); an SWA node losing its sinks drops the argument.
        args.pop("sinks", None)
        if sinks:
            args["sinks"] = sinks
        target = getattr(torch.ops.swa_rewrite, self._SWA_OF[op_name(node.target)]).default
        call_op(node, target, args)

    def to_packed_write(self, node, rope_dim):
        if functionalized_op(node) is not None:
            # Inside auto_functionalized the wrapped op cannot be swapped safely (Inductor's decomposition
            # of the wrapper keys on it). No need: write_kv_cache writes the packed layout into a uint8
            # cache, so the write is already right once the allocation is packed.
            return False
        args = bound_args(node)
        args["rope_dim"] = rope_dim
        call_op(node, torch.ops.swa_rewrite.write_fp8_cache.default, args)
        return True

    def is_packed_allocation(self, node):
        return bound_args(node)["dtype"] == torch.uint8

    def to_packed_allocation(self, node):
        args = bound_args(node)
        args["dtype"] = torch.uint8
        call_op(node, torch.ops.swa_rewrite.allocate_kv_cache.default, args)


class AdapterRegistry:
    """An ordered set of adapters; the first whose ``role`` recognises a node handles it."""

    def __init__(self, adapters: Iterable[MLAOpAdapter] = ()):
        self._adapters = list(adapters)

    def register(self, adapter: MLAOpAdapter) -> None:
        self._adapters.append(adapter)

    def __iter__(self):
        return iter(self._adapters)

    def classify(self, node: torch.fx.Node) -> tuple[Optional[MLAOpAdapter], Optional[Role]]:
        for adapter in self._adapters:
            role = adapter.role(node)
            if role is not None:
                return adapter, role
        return None, None

    def op_names(self) -> list[str]:
        return [n for a in self._adapters for n in a.op_names()]


def default_registry() -> AdapterRegistry:
    """A fresh registry holding this package's ops."""
    return AdapterRegistry([SwaRewriteOps()])
