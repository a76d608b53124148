"""The ops' CUDA kernels are registered with the dispatcher directly (``ops.registration``), not through
``custom_op.register_kernel`` and its per-call Python layers (issue 14)."""

import importlib

import pytest
import torch

import swa_rewrite.ops  # noqa: F401  (registers the ops)
from swa_rewrite.ops.registration import cuda_kernel, register_cuda

# Every op with a CUDA kernel, by module.
CUDA_OPS = {
    "attention": ["paged_mla_attention", "sparse_mla_attention", "swa_mla_attention"],
    "mla_attention": ["mla_attention", "swa_attention"],
    "mha_prefill": ["mha_swa_prefill_op"],
    "fp8_cache": ["write_fp8_cache", "dequantize_fp8_cache"],
    "swa_indexer": ["swa_indexer"],
    "kv_cache": ["write_kv_cache"],
}
OPS = [(mod, name) for mod, names in CUDA_OPS.items() for name in names]


@pytest.mark.parametrize("mod,name", OPS)
def test_cuda_kernel_is_registered_directly(mod, name):
    op = getattr(importlib.import_module(f"swa_rewrite.ops.{mod}"), name)
    fn = cuda_kernel(op)
    assert callable(fn) and fn.__module__ == f"swa_rewrite.ops.{mod}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op._qualname, "CUDA")
    # custom_op's own per-device layer was never installed: no "cuda" entry in its backend table.
    assert "cuda" not in op._backend_fns, op._backend_fns


def test_every_cuda_kernel_of_the_namespace_is_listed():
    """An op given a CUDA kernel later (through either API) must be added to CUDA_OPS, so this file checks it."""
    listed = {getattr(importlib.import_module(f"swa_rewrite.ops.{m}"), n)._qualname for m, n in OPS}
    ns = [f"swa_rewrite::{name}" for name in dir(torch.ops.swa_rewrite) if not name.startswith("_")]
    with_cuda = {q for q in ns if hasattr(getattr(torch.ops.swa_rewrite, q.split("::")[1]), "default")
                 and torch._C._dispatch_has_kernel_for_dispatch_key(q, "CUDA")}
    assert with_cuda == listed


def test_a_second_cuda_kernel_for_an_op_is_refused():
    op = importlib.import_module("swa_rewrite.ops.kv_cache").write_kv_cache
    with pytest.raises(RuntimeError, match="already has a CUDA kernel"):
        register_cuda(op)(lambda *a: None)
    assert cuda_kernel(op).__module__ == "swa_rewrite.ops.kv_cache"
