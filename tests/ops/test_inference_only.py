"""The ops have no gradient: with grad mode on their forward runs, only a backward through them fails, clearly."""

import pytest
import torch

from swa_rewrite import ops
from swa_rewrite.runtime import StepBatch, StepItem

R, P, H = 128, 16, 2
D = R + P
PS = 4


def _meta():
    b = StepBatch.build([StepItem([1, 2, 3], 5, [2, 0], True), StepItem([4], 2, [1], False)], PS)
    return dict(block_tables=b.meta.block_tables, cu_seqlens_q=b.meta.cu_seqlens_q, seq_lens_encoder=b.meta.seq_lens_encoder,
                seq_lens_decoder=b.meta.seq_lens_decoder, batch_id_per_token=b.meta.batch_id_per_token)


def _packed_cache():
    cache = torch.zeros(3, PS, ops.fp8_cache_bytes(R, P), dtype=torch.uint8)
    ops.write_fp8_cache(torch.randn(3 * PS, D), cache, torch.arange(3 * PS), rope_dim=P)
    return cache


def _cases():
    """``name -> (call(q), first input)``: each op of the step with a differentiable first input."""
    meta, packed, full = _meta(), _packed_cache(), torch.randn(3, PS, D)
    idx = torch.randint(-1, 3 * PS, (4, 1, 5), dtype=torch.int32)
    E, I, Hd, k = 3, 8, 16, 2
    weights = (torch.randn(E, 2 * I, Hd), torch.randn(E, Hd, I))
    topk_ids, topk_weights = torch.randint(0, E, (4, k)), torch.rand(4, k)
    return {
        "paged_mla_attention": (lambda q: ops.paged_mla_attention(q, full, **meta, scale=0.1, rope_dim=P)[0],
                                torch.randn(4, H, D)),
        "sparse_mla_attention": (lambda q: ops.sparse_mla_attention(q, packed, idx, 0.1, rope_dim=P)[0],
                                 torch.randn(4, H, D)),
        "swa_mla_attention": (lambda q: ops.swa_mla_attention(q, packed, **meta, scale=0.1, window=3,
                                                              rope_dim=P)[0], torch.randn(4, H, D)),
        "moe_experts": (lambda x: torch.ops.swa_rewrite.moe_experts(x, *weights, topk_ids, topk_weights),
                        torch.randn(4, Hd)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_forward_with_grad_mode_on_works_and_backward_says_why_not(name, seed):
    call, x = _cases()[name]
    with torch.no_grad():
        ref = call(x)
    out = call(x.clone().requires_grad_())
    assert out.requires_grad and torch.equal(out.detach(), ref)
    with pytest.raises(NotImplementedError, match=rf"swa_rewrite::{name} has no gradient.*torch.no_grad\(\)"):
        out.sum().backward()


def test_a_graph_with_the_ops_traces_its_backward():
    """AOTAutograd traces the backward when it compiles a step with grad mode on: it must trace (the fake of the
    no-gradient op gives each input's gradient shape), and fail only if it runs."""
    call, q = _cases()["swa_mla_attention"]
    q.requires_grad_()
    fn = torch.compile(lambda q: call(q).sum(), backend="aot_eager", fullgraph=True)
    out = fn(q)
    assert out.requires_grad
    with pytest.raises(NotImplementedError, match="swa_mla_attention has no gradient"):
        out.backward()
