"""``kernels.launch.launch``: ``kernel[grid](...)`` through the compiled kernel's C launcher once a specialisation
has been compiled (issue 14). On the CPU (the interpreter) it is ``kernel[grid]``; on the GPU every relaunch must
give what the JIT path gives, a new specialisation (here: a misaligned pointer) must not reuse another one's kernel,
a launch hook (profilers) must see every launch, and remembered descriptor encodings must not outlive their
descriptors."""

import gc

import pytest
import torch

from swa_rewrite.kernels import launch as launch_mod
from swa_rewrite.kernels.kv_cache import write_kv_cache


def _poisoned_cache(num_blocks, ps, D, device):
    return torch.full((num_blocks, ps, D), float("nan"), dtype=torch.bfloat16, device=device)


def _expected(cache, latent, slots):
    out = cache.clone().view(-1, cache.shape[-1])
    live = slots >= 0
    out[slots[live].long()] = latent[live].to(out.dtype)
    return out.view_as(cache)


def test_off_cuda_it_is_the_jit_launch():
    """Under the interpreter (the CPU) every call is ``kernel[grid]``: nothing goes direct."""
    before = launch_mod.direct_calls()
    latent = torch.randn(5, 48)
    cache = torch.full((4, 4, 48), float("nan"))
    slots = torch.tensor([3, -1, 0, 9, 14])
    want = _expected(cache, latent, slots)
    for _ in range(2):
        write_kv_cache(latent, cache, slots, block_d=16)
    torch.testing.assert_close(cache, want, rtol=0, atol=0, equal_nan=True)
    assert launch_mod.direct_calls() == before and not launch_mod._direct_ok()


@pytest.mark.gpu
def test_relaunches_go_direct_and_write_what_the_jit_path_writes():
    if not launch_mod._direct_ok():
        pytest.skip(f"the direct launch is written for Triton {launch_mod.DIRECT_TRITON}")
    dev = "cuda"
    D = 576
    slots = torch.randperm(64, device=dev)[:24].to(torch.int64)
    slots[5] = -1
    before = launch_mod.direct_calls()
    for i in range(3):
        latent = torch.randn(24, D, device=dev, dtype=torch.bfloat16)
        cache = _poisoned_cache(8, 8, D, dev)
        want = _expected(cache, latent, slots)
        write_kv_cache(latent, cache, slots)
        torch.cuda.synchronize()
        assert torch.equal(cache.view(torch.int16), want.view(torch.int16)), i
    assert launch_mod.direct_calls() - before in (2, 3)       # the first call compiled here (2), or earlier (3)

    # A pointer that is not 16-byte aligned is another specialisation: the JIT compiles it (not a direct call
    # of the aligned kernel), then it goes direct too.
    base = torch.randn(25 * D + 1, device=dev, dtype=torch.bfloat16)
    latent = base[1:1 + 24 * D].view(24, D)                  # 2-byte offset
    assert latent.data_ptr() % 16
    n = launch_mod.direct_calls()
    for i in range(2):
        cache = _poisoned_cache(8, 8, D, dev)
        want = _expected(cache, latent, slots)
        write_kv_cache(latent, cache, slots)
        torch.cuda.synchronize()
        assert torch.equal(cache.view(torch.int16), want.view(torch.int16)), i
    assert launch_mod.direct_calls() - n == 1


def test_a_hook_counts_as_set_only_when_it_has_calls():
    """Triton keeps its launch hooks as ``HookChain`` objects that are never None: an empty chain is unset (else
    no launch ever went direct, session 13), a chain with a call or a plain function assigned instead is set."""
    from triton import knobs

    chain = type(knobs.runtime.launch_enter_hook)()
    assert not launch_mod._hooked(None) and not launch_mod._hooked(chain)
    chain.add(print)
    assert launch_mod._hooked(chain) and launch_mod._hooked(lambda metadata: None)


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["chain", "assigned"])
def test_a_launch_hook_sees_every_launch(how):
    if not launch_mod._direct_ok():
        pytest.skip(f"the direct launch is written for Triton {launch_mod.DIRECT_TRITON}")
    from triton import knobs

    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    latent = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    cache = _poisoned_cache(2, 4, 64, "cuda")
    slots = torch.arange(4, device="cuda")
    write_kv_cache(latent, cache, slots)                      # compiled before the hook
    write_kv_cache(latent, cache, slots)
    original = knobs.runtime.launch_enter_hook
    if how == "chain":
        original.add(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
    try:
        n = launch_mod.direct_calls()
        for _ in range(3):
            write_kv_cache(latent, cache, slots)
        assert len(seen) == 3 and launch_mod.direct_calls() == n
    finally:
        if how == "chain":
            original.remove(hook)
        else:
            knobs.runtime.launch_enter_hook = original
    n = launch_mod.direct_calls()
    write_kv_cache(latent, cache, slots)
    assert launch_mod.direct_calls() == n + 1 and len(seen) == 3   # unhooked again: direct


@pytest.mark.gpu
def test_gluon_relaunches_are_bit_identical_and_do_not_keep_dropped_descriptors():
    """The FP8 window kernel (three TMA descriptors) relaunched directly gives the JIT launch's bits; the encoded
    descriptors are kept per descriptor object, weakly: a dropped cache's descriptors leave nothing alive."""
    from swa_rewrite.kernels import gluon_mla
    from swa_rewrite.kernels._common import split_targets

    if not launch_mod._direct_ok():
        pytest.skip(f"the direct launch is written for Triton {launch_mod.DIRECT_TRITON}")
    dev = "cuda"
    T, H, R, P, ps, ctx = 8, 128, 512, 64, 64, 1000
    nb = -(-(ctx + 1) // ps)
    q = torch.randn(T, H, R + P, device=dev, dtype=torch.bfloat16)
    cache = torch.randint(0, 120, (T * nb, ps, 656), dtype=torch.uint8, device=dev)
    if not gluon_mla.supports(q, cache, P, 128, True):
        pytest.skip("no Gluon FP8 kernel on this device")
    bt = torch.arange(T * nb, dtype=torch.int32, device=dev).view(T, nb)
    cu = torch.arange(T + 1, dtype=torch.int32, device=dev)
    dec = torch.full((T,), ctx, dtype=torch.int32, device=dev)
    bid = torch.arange(T, dtype=torch.int32, device=dev)
    outs = []
    n = launch_mod.direct_calls()
    for _ in range(3):
        out = (torch.full((T, H, R), float("nan"), dtype=q.dtype, device=dev),
               torch.full((T, H), float("nan"), device=dev))
        o_t, l_t, o_s, l_s = split_targets(*out, 1)
        gluon_mla.launch_fp8(q, cache, bt, cu, dec, bid, 0.07, 128, o_t, l_t, o_s, l_s, 1)
        torch.cuda.synchronize()
        outs.append(out)
    assert launch_mod.direct_calls() - n >= 2
    assert not torch.isnan(outs[0][0]).any()
    for out in outs[1:]:
        assert torch.equal(out[0].view(torch.int16), outs[0][0].view(torch.int16))
        assert torch.equal(out[1], outs[0][1])
    kept = [ref for ref, _ in launch_mod._DESC_ARGS.values()]
    assert any(ref() is not None for ref in kept)
    del cache, outs
    gluon_mla._REMEMBERED.clear()
    gc.collect()
    assert all(ref() is None for ref in kept)


@pytest.mark.gpu
def test_within_jit_launches_nothing_goes_direct():
    if not launch_mod._direct_ok():
        pytest.skip(f"the direct launch is written for Triton {launch_mod.DIRECT_TRITON}")
    latent = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    cache = _poisoned_cache(2, 4, 64, "cuda")
    slots = torch.arange(4, device="cuda")
    for _ in range(2):
        write_kv_cache(latent, cache, slots)
    n = launch_mod.direct_calls()
    with launch_mod.jit_launches():
        write_kv_cache(latent, cache, slots)
        assert launch_mod.direct_calls() == n
    write_kv_cache(latent, cache, slots)
    assert launch_mod.direct_calls() == n + 1 and launch_mod._direct_ok()
