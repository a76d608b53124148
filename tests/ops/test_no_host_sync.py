"""With checks off (as inside compiled or CUDA-graph-captured steps), no op reads a tensor value on the host:
every ``.item()``, ``.tolist()``, ``bool(tensor)``, ``.cpu()`` or ``.numpy()`` would be a device
synchronisation on CUDA. Checked on the CPU paths by making those calls raise."""

import pytest
import torch

from swa_rewrite.ops.fp8_cache import fp8_cache_bytes
from swa_rewrite.ops.checks import checks_disabled
from swa_rewrite.runtime import StepBatch, StepItem

R, P, H = 128, 16, 4
D = R + P


@pytest.fixture
def no_host_reads(monkeypatch):
    def forbidden(name):
        def fail(self, *a, **k):
            raise AssertionError(f"host read: Tensor.{name}")
        return fail

    def enable():
        for name in ("item", "tolist", "__bool__", "cpu", "numpy", "__int__", "__float__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    return enable


def test_every_op_runs_without_reading_tensors_on_the_host(no_host_reads):
    b = StepBatch.build([StepItem(list(range(9)), 4, [2, 0], True), StepItem([3], 13, [1, 3], False)], 8,
                        pad_to=12)
    meta = (b.meta.block_tables, *b.meta.batch_tensors())
    T = b.input_ids.shape[0]
    latent, q = torch.randn(T, D), torch.randn(T, H, D)
    bf16_cache = torch.zeros(4, 8, D)
    packed = torch.zeros(4, 8, fp8_cache_bytes(R, P), dtype=torch.uint8)
    ops = torch.ops.swa_rewrite
    no_host_reads()
    with checks_disabled():
        ops.write_kv_cache(latent, bf16_cache, b.meta.slot_mapping, 0, 0)
        ops.write_kv_cache(latent, packed, b.meta.slot_mapping, 0, 0)         # packed layout through the same op
        ops.write_fp8_cache(latent, packed, b.meta.slot_mapping, P, 0, 0)
        ops.paged_mla_attention(q, bf16_cache, *meta, 0.1, P, 0, 0)
        idx, _ = ops.swa_indexer(*meta, 8, 8, 0)
        ops.sparse_mla_attention(q, packed, idx, 0.1, P)
        ops.swa_mla_attention(q, packed, *meta, 0.1, P, 8, 0, 0)
        ops.dequantize_fp8_cache(packed, P)
