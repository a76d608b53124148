"""The page-tile dense decode kernel (``kernels.paged_mla._paged_tiles_fwd_kernel``, issue 17) and each of
its variants: per-tile block-id loads or ids read ahead (``chunk``), pointer or TMA tile loads (``tma``),
scores through a per-SM scratch slot (``dedup``), split contexts.

Oracle and inputs as in ``test_paged_mla_attention.py`` (float64 causal softmax; unwritten cache slots NaN,
so a tile that reads past a request's last position fails; outputs NaN before the kernel runs). The
kernel runs under the Triton interpreter on CPU (tiny shapes) and on the GPU under ``-m gpu``.
"""

import os

import pytest
import torch

from test_paged_mla_attention import assert_matches, causal_oracle, make_batch, make_cache

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

VARIANTS = {
    "ids": dict(kernel="tiles", tma=False),
    "chunk": dict(kernel="tiles", chunk=4, tma=False),
    "tma": dict(kernel="tiles", tma=True),
    "tma-chunk": dict(kernel="tiles", tma=True, chunk=64),
    "dedup": dict(kernel="tiles", dedup=True, tma=False),
    "tma-chunk-dedup": dict(kernel="tiles", tma=True, chunk=64, dedup=True),
    "persistent": dict(kernel="tiles", tma=False, persistent=1),
    "tma-persistent": dict(kernel="tiles", tma=True, persistent=2),
}
# On sm_90 a 64-key tile with ``dedup`` needs more than the 227 KB of shared memory (local report), so the
# GPU runs dedup with 32-key tiles only.
GPU_VARIANTS = {
    **{k: v for k, v in VARIANTS.items() if not v.get("dedup")},
    "n32s4-tma-chunk": dict(kernel="tiles", tma=True, chunk=64, block_n=32, num_stages=4),
    "n32s4-tma-chunk-dedup": dict(kernel="tiles", tma=True, chunk=64, block_n=32, num_stages=4, dedup=True),
    "n32s3-tma-chunk-dedup": dict(kernel="tiles", tma=True, chunk=64, block_n=32, num_stages=3, dedup=True),
    "n32s4-chunk": dict(kernel="tiles", chunk=64, block_n=32, num_stages=4, tma=False),
    "tma-persistent1": dict(kernel="tiles", tma=True, persistent=1),
    # The Gluon kernel (kernels/gluon_mla.py): compute warps issuing the loads, or a producer warp
    "gluon": dict(kernel="gluon", warp_specialize=False),
    "gluon-ws": dict(kernel="gluon", warp_specialize=True),
    "gluon-ws-pipe": dict(kernel="gluon", warp_specialize=True, pipeline=True),
    "gluon-pp": dict(kernel="gluon", warp_specialize=True, pingpong=True),   # FlashMLA schedule (slower: RESULTS)
    "gluon-pp-overlap": dict(kernel="gluon", warp_specialize=True, pingpong="overlap"),
}


def _run(device, requests, ps, H, R, P, config, num_pad=2, check_plan=True):
    from swa_rewrite.kernels.paged_mla import paged_mla_attention_fwd

    meta, pos, bid, num_blocks = make_batch(requests, ps, device, num_pad=num_pad)
    cache = make_cache(requests, meta[0].cpu(), num_blocks, ps, R + P, device)
    T = pos.shape[0]
    q = torch.randn(T, H, R + P, device=device).to(torch.bfloat16)
    scale = (R + P) ** -0.5 * 2.0
    out = (torch.full((T, H, R), float("nan"), dtype=torch.bfloat16, device=device),
           torch.full((T, H), float("nan"), device=device))
    bt, cu, _, dec, bid_t = meta
    stats = {}
    paged_mla_attention_fwd(q, cache, bt, cu, dec, bid_t, scale, P, config=config, out=out, stats=stats)
    if check_plan and config.get("kernel") == "gluon":
        # Written for 64-aligned pages on a Hopper GPU (fewer than 64 heads padded); the page-tile kernel elsewhere.
        gluon = device == "cuda" and ps % 64 == 0 and R == 512 and P == 64
        assert stats["plan"]["kernel"] == ("gluon" if gluon else "tiles")
        if gluon:
            assert stats["plan"]["warp_specialize"] == bool(config.get("warp_specialize"))
            assert stats["plan"]["pingpong"] == bool(config.get("pingpong"))
    elif check_plan:
        plan = stats["plan"]
        assert plan["kernel"] == "tiles"
        assert plan["tma"] == bool(config.get("tma"))
        assert plan["dedup"] == (bool(config.get("dedup")) and (H > 32 or device == "cpu"))
        if config.get("persistent") and device == "cpu":       # (the interpreter counts 8 SMs)
            assert plan["programs"] == min(plan["items"], 8 * config["persistent"])
            assert plan["programs"] < plan["items"] or requests is not MIXED     # MIXED: programs loop
    assert_matches(*out, *causal_oracle(q, cache, meta[0], pos, bid, scale, R))


MIXED = [(0, 7), (40, 4), (13, 1), (0, 1), (70, 1), (31, 2)]


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("ps,H,P", [(16, 4, 16), (32, 18, 8)])
def test_tiles_interpreter(seed, variant, ps, H, P):
    _run("cpu", MIXED, ps, H, 32, P, VARIANTS[variant])


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.parametrize("variant", ["ids", "tma-chunk-dedup", "persistent", "tma-persistent"])
def test_tiles_split_context_interpreter(seed, variant):
    _run("cpu", [(90, 1), (2, 1), (33, 1)], 16, 4, 32, 16, dict(VARIANTS[variant], splits=3))


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
def test_tiles_chunk_boundaries_interpreter(seed):
    """More tiles than one chunk of read-ahead block ids holds (chunk = 2 tiles of 16 keys)."""
    _run("cpu", [(100, 1), (64, 2), (17, 1)], 16, 2, 32, 16, dict(kernel="tiles", chunk=2, tma=False))


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.parametrize("ws", [False, True])
def test_gluon_request_takes_the_page_tile_kernel_on_cpu(seed, ws):
    """Gluon has no interpreter: asked for on CPU, the launcher runs the page-tile kernel (checked by _run)."""
    _run("cpu", MIXED, 16, 4, 32, 16, dict(kernel="gluon", warp_specialize=ws))


def test_page_size_not_a_tile_multiple_takes_the_generic_kernel():
    from swa_rewrite.kernels import paged_mla

    assert paged_mla.PAGED_DECODE_CONFIG["kernel"] in ("gluon", "tiles", "generic")
    if INTERPRETING:
        stats = {}
        meta, pos, bid, nb = make_batch([(5, 1)], 5, "cpu")
        cache = make_cache([(5, 1)], meta[0], nb, 5, 48, "cpu")
        q = torch.randn(pos.shape[0], 2, 48).to(torch.bfloat16)
        bt, cu, _, dec, bid_t = meta
        paged_mla.paged_mla_attention_fwd(q, cache, bt, cu, dec, bid_t, 0.1, 16, stats=stats)
        assert stats["plan"].get("kernel") != "tiles"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
@pytest.mark.parametrize("ps", [64, 128])
def test_tiles_gpu(seed, variant, ps):
    _run("cuda", [(0, 300), (1500, 64), (900, 1), (2047, 3), (5, 1), (4000, 1)], ps, 128, 512, 64,
         GPU_VARIANTS[variant])


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["ids", "n32s3-tma-chunk-dedup", "n32s4-tma-chunk-dedup", "gluon", "gluon-ws",
                                     "gluon-ws-pipe", "gluon-pp",
                                     "gluon-pp-overlap"])
@pytest.mark.parametrize("H", [16, 64, 128])
def test_tiles_gpu_heads_and_splits(seed, variant, H):
    """Few heads (a shard) and a decode batch small enough that the context is split across programs."""
    _run("cuda", [(3000, 1), (17, 1), (640, 1)], 64, H, 512, 64, GPU_VARIANTS[variant], num_pad=1)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["n32s3-tma-chunk-dedup", "n32s4-tma-chunk-dedup", "gluon", "gluon-ws",
                                     "gluon-ws-pipe", "gluon-pp",
                                     "gluon-pp-overlap"])
def test_tiles_gpu_many_programs(seed, variant):
    """Several waves of programs sharing the per-SM score slots (a race there gives a moving error)."""
    requests = [(int(d), 1) for d in torch.randint(0, 2500, (300,))]
    _run("cuda", requests, 64, 128, 512, 64, GPU_VARIANTS[variant], num_pad=0)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["tma-chunk", "n32s4-tma-chunk-dedup", "gluon", "gluon-ws", "gluon-ws-pipe",
                                     "gluon-pp", "gluon-pp-overlap"])
def test_tiles_gpu_cuda_graph(seed, variant):
    """TMA descriptors and the scratch buffer are captured with the graph; replays see new queries."""
    from swa_rewrite.kernels.paged_mla import paged_mla_attention_fwd

    ps, R, P, H = 64, 512, 64, 128
    requests = [(int(d), 1) for d in torch.randint(0, 3000, (6,))]
    meta, pos, bid, num_blocks = make_batch(requests, ps, "cuda", num_pad=0)
    cache = make_cache(requests, meta[0].cpu(), num_blocks, ps, R + P, "cuda")
    q = torch.randn(len(requests), H, R + P, device="cuda").to(torch.bfloat16)
    bt, cu, _, dec, bid_t = meta
    cfg = GPU_VARIANTS[variant]
    paged_mla_attention_fwd(q, cache, bt, cu, dec, bid_t, 0.1, P, config=cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = paged_mla_attention_fwd(q, cache, bt, cu, dec, bid_t, 0.1, P, config=cfg)
    q.copy_(torch.randn(q.shape, device="cuda").to(torch.bfloat16))
    out.fill_(float("nan"))
    graph.replay()
    assert_matches(out, lse, *causal_oracle(q, cache, meta[0], pos, bid, 0.1, R))


# ------------------------------------------------------------------ sliding window over the FP8 cache
SWA_VARIANTS = {
    "ids": dict(kernel="tiles", tma=False),
    "tma": dict(kernel="tiles", tma=True),
    "tma-chunk": dict(kernel="tiles", tma=True, chunk=4),
    "dedup": dict(kernel="tiles", dedup=True, tma=False),
    "tma-bf16": dict(kernel="tiles", tma=True, bf16_dequant=True),
    "bf16": dict(kernel="tiles", bf16_dequant=True, tma=False),
    "tma-persistent": dict(kernel="tiles", tma=True, persistent=1),
}


def _run_swa_tiles(device, requests, window, ps, H, R, P, config):
    from test_sparse_mla_attention import _run_swa

    stats = {}
    _run_swa(device, requests, window, ps, H=H, R=R, P=P, staged=False, config=config, stats=stats)
    if config.get("kernel") == "gluon":
        # Written for 64-aligned pages, R = 512, P = 64 on a Hopper GPU (heads padded to 64); "auto" elsewhere.
        gluon = device == "cuda" and ps % 64 == 0 and R == 512 and P == 64
        assert (stats["plan"].get("kernel") == "gluon") == gluon


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
def test_swa_gluon_request_takes_the_plain_kernels_on_cpu(seed):
    _run_swa_tiles("cpu", [(0, 9), (11, 5), (43, 1)], 21, 16, 4, 128, 16, dict(kernel="gluon"))


@pytest.mark.gpu
@pytest.mark.parametrize("window", [1, 64, 128, 200, 1000])
@pytest.mark.parametrize("ps", [64, 128])
def test_swa_gluon_gpu(seed, window, ps):
    """The Gluon FP8 kernel: windows inside one tile, tile-aligned and not, prefill chunks and decodes; unwritten
    slots are NaN, so a partial tile that is not zeroed fails."""
    requests = [(0, 300), (1500, 64), (900, 1), (2047, 3), (5, 1), (0, 1)]
    _run_swa_tiles("cuda", requests, window, ps, 128, 512, 64, dict(kernel="gluon"))


@pytest.mark.gpu
@pytest.mark.parametrize("H", [16, 64, 128])
@pytest.mark.parametrize("window", [128, 2048])
def test_swa_gluon_gpu_heads_and_splits(seed, H, window):
    """Few tokens: the window is split across programs; H = 16 pads the 64-row head block."""
    _run_swa_tiles("cuda", [(3000, 1), (17, 1), (640, 1)], window, 64, H, 512, 64, dict(kernel="gluon"))


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.parametrize("variant", list(SWA_VARIANTS))
@pytest.mark.parametrize("window", [1, 16, 21, 40])
def test_swa_tiles_interpreter(seed, variant, window):
    """Windows aligned and not aligned to the tile, shorter and longer than one tile, split across programs."""
    requests = [(0, 9), (11, 5), (17, 2), (43, 1), (0, 1), (70, 1)]
    _run_swa_tiles("cpu", requests, window, 16, 4, 128, 16, SWA_VARIANTS[variant])
    _run_swa_tiles("cpu", [(90, 1), (33, 1)], window, 32, 2, 128, 16, dict(SWA_VARIANTS[variant], splits=3))


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.parametrize("variant", ["tma", "tma-chunk", "tma-bf16"])
def test_swa_tiles_tma_interpreter(seed, variant):
    """R = 512, P = 64: the sizes where the FP8 rows take TMA descriptors (latent bytes, scales, rope)."""
    _run_swa_tiles("cpu", [(40, 1), (5, 2), (70, 1)], 37, 16, 2, 512, 64, SWA_VARIANTS[variant])


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["ids", "tma", "tma-bf16", "bf16", "n32s4-tma-chunk", "n32s3-tma-bf16",
                                     "tma-persistent"])
@pytest.mark.parametrize("window", [1, 128, 1000])
@pytest.mark.parametrize("ps", [64, 128])
def test_swa_tiles_gpu(seed, variant, window, ps):
    cfg = dict(SWA_VARIANTS.get(variant) or GPU_VARIANTS.get(variant) or
               dict(kernel="tiles", tma=True, bf16_dequant=True, block_n=32, num_stages=3))
    requests = [(0, 300), (1500, 64), (900, 1), (2047, 3), (5, 1), (0, 1)]
    _run_swa_tiles("cuda", requests, window, ps, 128, 512, 64, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [16, 64])
def test_swa_tiles_gpu_heads_and_splits(seed, H):
    _run_swa_tiles("cuda", [(3000, 1), (17, 1), (640, 1)], 2048, 64, H, 512, 64, dict(kernel="tiles", tma=True))


@pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.parametrize("window,H,kernel", [(512, 64, "tiles"), (2048, 128, "tiles"), (128, 64, None),
                                             (511, 64, None), (1024, 32, None)])
def test_swa_default_picks_page_tiles_for_long_windows_and_64_head_blocks(window, H, kernel):
    """The SWA decode default ("auto"): page tiles from W = 512 with 64-head blocks, else the gathered
    kernel (whose plan has no "kernel" entry)."""
    from test_sparse_mla_attention import make_cache as make_fp8_cache

    from swa_rewrite.kernels import sparse_mla

    requests = [(20, 1), (3, 1)]
    meta, pos, bid, nb = make_batch(requests, 16, "cpu")
    written = [int(meta[0][b, p // 16]) * 16 + p % 16 for b, (d, n) in enumerate(requests) for p in range(d + n)]
    cache, _ = make_fp8_cache(nb, 16, 128, 16, written, "cpu")
    q = torch.randn(pos.shape[0], H, 144).to(torch.bfloat16)
    bt, cu, _, dec, bid_t = meta
    stats = {}
    sparse_mla.swa_attention_fwd(q, cache, bt, cu, dec, bid_t, 0.1, 16, window, staged=False, stats=stats)
    assert stats["plan"].get("kernel") == kernel


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,window,H,kernel", [(3, 128, 128, "gluon"), (200, 128, 128, None),
                                                   (200, 512, 128, "gluon"), (200, 128, 16, "gluon")])
def test_swa_default_on_hopper(seed, tokens, window, H, kernel):
    """The SWA decode default on a Hopper GPU: the Gluon FP8 kernel for long windows, for short ones when the
    tokens are few (then with one-tile splits) and for a 16-head shard; the gathered kernel for short windows
    over many tokens with 64-head blocks."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are written for Hopper")
    from test_sparse_mla_attention import _run_swa

    stats = {}
    requests = [(int(d), 1) for d in torch.randint(300, 3000, (tokens,))]
    _run_swa("cuda", requests, window, 64, H=H, R=512, P=64, staged=False, stats=stats)
    assert stats["plan"].get("kernel") == kernel
    if kernel == "gluon" and tokens == 3:
        assert stats["plan"]["splits"] > 1


def test_gluon_descriptors_remembered_per_cache_tensor_without_holding_it():
    """``gluon_mla._remembered`` (issue 14): one cache tensor's descriptors are built once and reused; another
    tensor, or the same one viewed at another layout, gets its own; a remembered descriptor keeps no reference to
    its cache (the cache's memory is freed when the caller drops it) and a new tensor is never given a dead one's."""
    import gc
    import weakref

    from swa_rewrite.kernels import gluon_mla

    if not gluon_mla.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    gluon_mla._REMEMBERED.clear()
    for kind, build, dtype, width in (("dense", gluon_mla.descriptors, torch.bfloat16, 576),
                                      ("fp8", gluon_mla.fp8_descriptors, torch.uint8, 656)):
        cache = torch.zeros(3, 64, width, dtype=dtype)
        first = gluon_mla._remembered(kind, cache, 512, 64, build)
        assert gluon_mla._remembered(kind, cache, 512, 64, build) is first
        fresh = build(cache, 512, 64)
        assert [d.base.data_ptr() for d in first] == [d.base.data_ptr() for d in fresh]
        assert [(list(d.shape), list(d.strides), list(d.block_shape)) for d in first] == \
            [(list(d.shape), list(d.strides), list(d.block_shape)) for d in fresh]
        other = torch.zeros_like(cache)
        assert gluon_mla._remembered(kind, other, 512, 64, build)[0].base.data_ptr() == other.data_ptr()
        ref = weakref.ref(cache)
        del cache, fresh, first
        gc.collect()
        assert ref() is None, "a remembered descriptor kept its cache alive"
        for _ in range(4):       # new tensors (one may reuse the dead one's id and address) get their own
            new = torch.zeros(3, 64, width, dtype=dtype)
            assert gluon_mla._remembered(kind, new, 512, 64, build)[0].base.data_ptr() == new.data_ptr()


@pytest.mark.parametrize("tokens,splits", [(1, 3), (8, 3), (16, 3), (32, 1), (64, 1)])
def test_swa_split_rule(monkeypatch, tokens, splits):
    """The Gluon FP8 kernel's plan (``_plan`` with ``split_below``): a W = 128 window (3 tiles of 64) is split
    across programs only when its items (tokens × 2 head blocks) fill under a quarter of the SMs; the dense
    kernel keeps splitting whenever SMs are idle (132 SMs, as an H100 SXM / H200)."""
    import swa_rewrite.kernels._common as common
    from swa_rewrite.kernels.paged_mla import SWA_SPLIT_BELOW

    monkeypatch.setattr(common, "_sm_count", lambda device: 132)
    monkeypatch.setattr(common, "interpreting", lambda: False)     # the interpreter shrinks tiles to 16 keys
    cpu = torch.device("cpu")
    swa = dict(block_n=64, min_tiles_per_split=1, split_below=SWA_SPLIT_BELOW)
    assert common._plan(tokens, 128, 128 + 63, cpu, swa, common.KEYS_PAGED)["splits"] == splits
    dense = common._plan(tokens, 128, 4096, cpu, dict(block_n=64), common.KEYS_PAGED)["splits"]
    assert dense == (min(132 // (2 * tokens), 4096 // 64 // 2) if 2 * tokens < 132 else 1)
