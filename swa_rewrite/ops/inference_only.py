"""Autograd for the inference-only ops: a forward under grad mode works, a backward through them fails clearly.

The paged ops have no gradient (docs/design.md §13: training runs a dense forward). Without an autograd formula a
compiled step called outside ``torch.no_grad()`` fails while AOTAutograd traces its joint graph, deep in a
Dynamo/Inductor traceback. So each op gets a backward that is traceable — it returns
``torch.ops.swa_rewrite.no_gradient``, whose fake gives a gradient of the right shape — and raises only when a
backward actually runs. Inference under grad mode then works eagerly and compiled (the compiled forward saves
what a backward would need: ``torch.no_grad()`` / ``torch.inference_mode()`` stays the efficient way).
"""

from __future__ import annotations

from typing import Sequence

import torch


@torch.library.custom_op("swa_rewrite::no_gradient", mutates_args=())
def no_gradient(grad: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, op: str) -> torch.Tensor:
    """The gradient of an input of the inference-only ``op`` (``shape``, ``dtype``): raises, since there is none.

    ``grad`` (any tensor of the backward) only gives the device and a data dependence that keeps this node
    inside the backward graph.
    """
    raise NotImplementedError(
        f"{op} has no gradient: the paged cache and attention ops of swa_rewrite are inference-only. Run model "
        "steps under torch.no_grad() or torch.inference_mode(), or train through a dense forward (docs/design.md §13)")


@no_gradient.register_fake
def _(grad, shape, dtype, op):
    return grad.new_empty(shape, dtype=dtype)


def register_inference_only(op) -> None:
    """Give the ``torch.library.custom_op`` ``op`` a backward that raises when it runs (see module docstring)."""
    name = op._qualname if hasattr(op, "_qualname") else str(op)

    def setup_context(ctx, inputs, output):
        ctx.input_meta = [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None for t in inputs]

    def backward(ctx, *grads):
        anchor = next(g for g in grads if isinstance(g, torch.Tensor))
        return tuple(torch.ops.swa_rewrite.no_gradient(anchor, meta[0], meta[1], name)
                     if meta is not None and needed else None
                     for meta, needed in zip(ctx.input_meta, ctx.needs_input_grad))

    op.register_autograd(backward, setup_context=setup_context)
