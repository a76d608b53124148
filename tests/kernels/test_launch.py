"""``kernels._launch.run_kernel``: a relaunch through the cached compiled kernel is the launch the JIT makes, and
the cache never hands a call a kernel specialised for other arguments (issue 14: the JIT's binding was most of
a decode step's launch cost)."""

import pytest
import torch
import triton
import triton.language as tl

from swa_rewrite.kernels import _launch
from swa_rewrite.kernels._launch import _UNSURE, _spec, run_kernel


def test_spec_keys_on_what_the_jit_specialises():
    a = torch.zeros(64, dtype=torch.float32)
    assert _spec(a) is _UNSURE                           # a CPU tensor: the JIT path (the interpreter, AOT compiles)
    assert _spec(3) != _spec(4) and _spec(1) != _spec(True) and _spec(1.0) != _spec(1)
    assert _spec(tl.constexpr(16)) == _spec(tl.constexpr(16)) != _spec(tl.constexpr(32))
    assert _spec(object()) is _UNSURE and _spec([1, 2]) is _UNSURE
    assert _spec(None) == _spec(None)


@triton.jit
def _shift_kernel(dst, src, n, shift, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + i, tl.load(src + i, mask=i < n) + shift, mask=i < n)


def _run(dst, src, shift):
    n = src.numel()
    return run_kernel(_shift_kernel, (triton.cdiv(n, 128),), dst, src, n, shift, BLOCK=128, num_warps=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fast", ["1", "0"])
def test_relaunches_match_torch_across_alignments_sizes_and_values(fast, monkeypatch, seed):
    monkeypatch.setenv("SWA_FAST_LAUNCH", fast)
    _launch._cache.clear()
    base = torch.randn(4096 + 7, device="cuda")
    out = torch.full_like(base, float("nan"))
    # aligned, then misaligned views (a kernel specialised on 16-byte alignment must not serve them), sizes that
    # change the int specialisation (multiples of 16 or not, 1), and shifts
    for off, n, shift in [(0, 4096, 1), (0, 4096, 2), (1, 4096, 1), (3, 1000, 5), (0, 1, 7), (0, 4096, 1),
                          (1, 4096, 1), (2, 17, 1), (0, 16, 3)]:
        out.fill_(float("nan"))
        src, dst = base[off:off + n], out[off:off + n]
        _run(dst, src, shift)
        torch.testing.assert_close(dst, src + shift, rtol=0, atol=0)
        assert torch.isnan(out[:off]).all() and torch.isnan(out[off + n:]).all()
    if fast == "1":
        assert 0 < len(_launch._cache) < 9          # repeated specialisations were served from the cache


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cached_launch_is_captured_by_a_cuda_graph(seed):
    _launch._cache.clear()
    src = torch.randn(2048, device="cuda")
    dst = torch.full_like(src, float("nan"))
    _run(dst, src, 1)                                   # the JIT launch: compiles, caches
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        _run(dst, src, 1)                               # the cached launch, on the capture stream
    src.copy_(torch.randn_like(src))
    dst.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(dst, src + 1, rtol=0, atol=0)
