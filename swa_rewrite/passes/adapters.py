"""The registry of MLA op families the rewrite recognises.

An adapter tells the passes how one engine's ops look in a graph: which node is a full MLA attention,
an SWA attention, a latent-cache write or a cache allocation; the layer index each carries; and how to
turn each into its sliding-window / packed-FP8 counterpart in place. ``SwaRewriteOps`` covers this
package's own ``torch.ops.swa_rewrite.*``. An engine with its own MLA op registers an adapter
(``AdapterRegistry.register``) without touching the passes.
"""

from __future__ import annotations

import enum
from typing import Iterable, Optional

import torch
import torch.fx

from .graph_pass import bound_args, call_op, op_name


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


class MLAOpAdapter:
    """Interface of an adapter; see ``SwaRewriteOps`` for the reference implementation."""

    name: str = "adapter"

    def role(self, node: torch.fx.Node) -> Optional[Role]:
        raise NotImplementedError

    def op_names(self) -> list[str]:
        """Names of the ops this adapter recognises (for error messages)."""
        raise NotImplementedError

    def layer_index(self, node: torch.fx.Node) -> Optional[int]:
        """The layer index the node carries, or None if it carries none."""
        raise NotImplementedError

    def cache(self, node: torch.fx.Node) -> torch.fx.Node:
        """The cache tensor an attention or write node reads/writes."""
        raise NotImplementedError

    def window(self, node: torch.fx.Node) -> int:
        raise NotImplementedError

    def to_swa_attention(self, node: torch.fx.Node, window: int) -> None:
        raise NotImplementedError

    def latent_dtype(self, node: torch.fx.Node) -> Optional[torch.dtype]:
        """The dtype of the latent a cache write node writes, where the graph records it (Dynamo's and
        Inductor's graphs carry example values; a symbolic fx trace does not), else None. Called for the
        writes of selected layers, before ``to_packed_write``; the default knows nothing."""
        return None

    def to_packed_write(self, node: torch.fx.Node, rope_dim: int) -> bool:
        """Make a cache write produce the packed FP8 layout; False if the node was left as it is."""
        raise NotImplementedError

    def rope_dim(self, node: torch.fx.Node) -> int:
        raise NotImplementedError

    def is_packed_allocation(self, node: torch.fx.Node) -> bool:
        raise NotImplementedError

    def to_packed_allocation(self, node: torch.fx.Node) -> None:
        raise NotImplementedError


class SwaRewriteOps(MLAOpAdapter):
    """This package's ops: ``paged_mla_attention`` → ``swa_mla_attention``, ``write_kv_cache`` →
    ``write_fp8_cache``, ``allocate_kv_cache(..., model dtype, ...)`` → ``allocate_kv_cache(..., uint8, ...)``
    (the packed FP8 layout)."""

    name = "swa_rewrite"
    _ROLES = {
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

    def to_swa_attention(self, node, window):
        args = bound_args(node)
        args["window"] = window
        call_op(node, torch.ops.swa_rewrite.swa_mla_attention.default, args)

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
