"""``@register_cuda(op)``: a ``torch.library.custom_op``'s CUDA kernel, registered with the dispatcher directly.

``op.register_kernel("cuda")`` puts two Python layers between the dispatcher and the kernel: one checks that the
outputs alias no input, the other picks between the kernel and the op's default; each call also builds a closure.
Together they cost ~2-3 µs of host per call on a fast CPU and more on a GPU host's (issue 14: a decode step's eight
op calls are host time an uncompiled-graph step waits for). The ops' outputs are fresh tensors or None, so the
aliasing check can never fire, and no kernel is ever disabled. The kernel keeps the one layer that matters: it runs
with Dynamo disabled (``torch._disable_dynamo``, which imports Dynamo on its first call), so a step Dynamo runs
eagerly never traces into a launch.
"""

from __future__ import annotations

from typing import Callable

import torch

_KERNELS: dict[str, Callable] = {}


def register_cuda(op) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` becomes ``op``'s CUDA kernel (``op`` a ``torch.library.custom_op``); returns ``fn``."""
    qualname = op._qualname

    def register(fn: Callable) -> Callable:
        if qualname in _KERNELS:
            raise RuntimeError(f"{qualname} already has a CUDA kernel ({_KERNELS[qualname].__qualname__})")
        torch.library.impl(qualname, "CUDA", torch._disable_dynamo(fn))
        _KERNELS[qualname] = fn
        return fn

    return register


def cuda_kernel(op) -> Callable:
    """The function ``register_cuda`` registered for ``op`` (benchmarks call it without the dispatcher)."""
    return _KERNELS[op._qualname]
