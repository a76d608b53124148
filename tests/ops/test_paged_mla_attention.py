"""Dense paged MLA attention over the model-dtype cache: the Triton kernel of the full layers (issue 4).

Oracle: float64 causal softmax over the positions ``0 … p`` of each token's request, slots computed here
from the block table. Unwritten cache slots hold NaN, outputs are NaN before the kernel runs. The kernel
runs under the Triton interpreter on CPU (tiny shapes) and on the GPU under ``-m gpu``.
"""

import os

import pytest
import torch

from paged_batches import make_batch as make_paged_batch
from swa_rewrite import ops

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def make_batch(requests, ps, device, num_pad=2):
    """``(block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token)`` as a tuple,
    per-token positions/requests and the number of blocks (see ``paged_batches.make_batch``)."""
    meta, pos, bid, num_blocks = make_paged_batch(requests, ps, device, num_pad=num_pad, extra_blocks=2)
    return tuple(meta.values()), pos, bid, num_blocks


def make_cache(requests, bt, num_blocks, ps, D, device):
    """bf16 cache with random rows at every written position, NaN elsewhere."""
    cache = torch.full((num_blocks, ps, D), float("nan"), dtype=torch.bfloat16)
    for b, (d, n) in enumerate(requests):
        for p in range(d + n):
            cache[int(bt[b, p // ps]), p % ps] = torch.randn(D).to(torch.bfloat16)
    return cache.to(device)


def causal_oracle(q, cache, bt, pos, bid, scale, R):
    T, H, _ = q.shape
    ps = cache.shape[1]
    out = torch.zeros(T, H, R, dtype=torch.float64, device=q.device)
    lse = torch.full((T, H), float("inf"), dtype=torch.float64, device=q.device)
    for t in range(T):
        if bid[t] < 0:
            continue
        p = torch.arange(int(pos[t]) + 1, device=q.device)
        slots = bt[bid[t]].long()[p // ps] * ps + p % ps
        k = cache.view(-1, cache.shape[-1])[slots].double()
        s = q[t].double() @ k.T * scale
        lse[t] = torch.logsumexp(s, -1)
        out[t] = torch.softmax(s, -1) @ k[:, :R]
    return out, lse


def assert_matches(out, lse, ref_out, ref_lse):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten output or stray read"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse > 0), empty)
    assert torch.all(out[empty] == 0)
    err = (out.double() - ref_out).norm() / ref_out.norm()
    assert err <= 5e-3, f"relative error {err:.2e}"
    assert (lse.double() - ref_lse)[~empty].abs().max() <= 1e-3


def _run(device, requests, ps, H, R, P, config=None, use_op=False):
    meta, pos, bid, num_blocks = make_batch(requests, ps, device)
    cache = make_cache(requests, meta[0].cpu(), num_blocks, ps, R + P, device)
    T = pos.shape[0]
    q = torch.randn(T, H, R + P, device=device).to(torch.bfloat16)
    scale = (R + P) ** -0.5 * 2.0
    if use_op:
        out = ops.paged_mla_attention(q, cache, *meta, scale, rope_dim=P)
    else:
        from swa_rewrite.kernels.paged_mla import paged_mla_attention_fwd

        out = (torch.full((T, H, R), float("nan"), dtype=torch.bfloat16, device=device),
               torch.full((T, H), float("nan"), device=device))
        bt, cu, _, dec, bid_t = meta
        paged_mla_attention_fwd(q, cache, bt, cu, dec, bid_t, scale, P, config=config, out=out)
    assert_matches(*out, *causal_oracle(q, cache, meta[0], pos, bid, scale, R))


MIXED = [(0, 7), (9, 4), (13, 1), (0, 1)]


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.parametrize("ps,H,P", [(1, 1, 16), (5, 4, 16), (16, 18, 8)])
def test_paged_kernel_interpreter(seed, ps, H, P):
    _run("cpu", MIXED, ps, H, 32, P)


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
def test_paged_kernel_split_context_interpreter(seed):
    _run("cpu", [(40, 1), (2, 1)], 3, 4, 32, 16, config={"splits": 3})


@pytest.mark.gpu
@pytest.mark.parametrize("ps", [1, 53, 64])
@pytest.mark.parametrize("H", [1, 16, 128])
def test_paged_op_gpu(seed, ps, H):
    _run("cuda", [(0, 300), (1500, 64), (900, 1), (2047, 3), (5, 1)], ps, H, 512, 64, use_op=True)


@pytest.mark.gpu
def test_paged_decode_cuda_graph(seed):
    ps, R, P, H = 64, 512, 64, 128
    requests = [(int(d), 1) for d in torch.randint(0, 3000, (4,))]
    meta, pos, bid, num_blocks = make_batch(requests, ps, "cuda", num_pad=0)
    cache = make_cache(requests, meta[0].cpu(), num_blocks, ps, R + P, "cuda")
    q = torch.randn(len(requests), H, R + P, device="cuda").to(torch.bfloat16)
    # The raw op, as the model calls it: one cache group of block_tables [G = 1, B, nb], group 0.
    args = (q, cache, meta[0][None], *meta[1:], 0.1, P, 0, 0)
    torch.ops.swa_rewrite.paged_mla_attention(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = torch.ops.swa_rewrite.paged_mla_attention(*args)
    q.copy_(torch.randn(q.shape, device="cuda").to(torch.bfloat16))
    out.fill_(float("nan"))
    graph.replay()
    assert_matches(out, lse, *causal_oracle(q, cache, meta[0], pos, bid, 0.1, R))
