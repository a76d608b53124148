"""Decode plans (``ops.decode_plans``, issue 14): an op call whose argument signature an earlier call recorded replays
what that call did — no checks, no kernel choice, its launches without Triton's binder — in serving mode only.

On the CPU the cache writes run their Triton kernels in the interpreter (their plans planned for the CPU here); the
attention cores' Gluon path is taken with its two launch functions replaced by the PyTorch references (``_gluon``),
so that the replayed route, not the kernels, is what is tested. On the GPU: the real launches, replayed (every
replay through ``launch.Relaunch``), bit for bit what the calls without plans give, over decode steps with fresh
inputs, metadata and cache contents; a model step; a launch hook (profilers) still sees every launch.

Oracles: the ops without plans (``no_plans``) on the same inputs, and the writes' PyTorch references. Caches are
poisoned (NaN) where nothing is written.
"""

import gc
import sys

import pytest
import torch

from swa_rewrite import fp8_format
from swa_rewrite.kernels import _common, gluon_mla, paged_mla
from swa_rewrite.kernels import launch as launch_mod
from swa_rewrite.ops import decode_plans
from swa_rewrite.ops.attention import paged_mla_attention_reference, swa_mla_attention_reference
from swa_rewrite.ops.checks import checks_disabled
from swa_rewrite.ops.fp8_cache import write_fp8_cache, write_fp8_cache_reference
from swa_rewrite.ops.kv_cache import write_kv_cache, write_kv_cache_reference
from swa_rewrite.ops.mla_attention import mla_attention, swa_attention
from swa_rewrite.ops.registration import cuda_kernel
from swa_rewrite.runtime import StepBatch, StepItem

MLA = sys.modules["swa_rewrite.ops.mla_attention"]
H, N, V, R, P = 4, 16, 16, 128, 16
LOG2E = 1.4426950408889634


@pytest.fixture
def planned(monkeypatch):
    """Plans for CPU tensors too, a fresh plan table, serving mode (checks off)."""
    monkeypatch.setattr(decode_plans, "_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(decode_plans, "_PLANS", {})
    with checks_disabled():
        yield


def decode_step(contexts, ps, device="cpu", shuffle=False):
    """One-token decodes after ``contexts`` cached tokens, request ``b`` on its own blocks (reversed with
    ``shuffle``: other blocks, same shapes)."""
    nb = -(-(max(contexts) + 1) // ps)
    B = len(contexts)
    order = list(range(B))[::-1] if shuffle else list(range(B))
    items = [StepItem([7], c, list(range(order[b] * nb, (order[b] + 1) * nb)), False) for b, c in enumerate(contexts)]
    return StepBatch.build(items, ps, device=device)


# --------------------------------------------------------------------------------------------- cache writes
@pytest.mark.parametrize("packed", [False, True], ids=["bf16", "fp8"])
def test_a_write_replays_its_launch_for_new_tensors_of_its_signature(planned, monkeypatch, seed, packed):
    T, ps, D = 6, 4, R + P
    width = fp8_format.row_bytes(R, P) if packed else D
    op, reference = ((write_fp8_cache, write_fp8_cache_reference) if packed
                     else (write_kv_cache, write_kv_cache_reference))
    fn = cuda_kernel(op)
    checks = []
    name = "_check_fp8_write" if packed else "_check_write"
    mod = sys.modules["swa_rewrite.ops.fp8_cache" if packed else "swa_rewrite.ops.kv_cache"]
    real = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a, **k: checks.append(1) or real(*a, **k))
    dtype = torch.uint8 if packed else torch.bfloat16
    cache = torch.zeros(8, ps, width, dtype=dtype)
    for step in range(4):
        latent = torch.randn(T, D, dtype=torch.bfloat16)
        slots = torch.randperm(8 * ps)[:T].view(1, T)
        slots[0, step % T] = -1                       # a padding token writes nothing
        if packed:
            cache.fill_(0xFF)                         # NaN bytes wherever nothing is written
        else:
            cache.fill_(float("nan"))
        want = cache.clone()
        if packed:
            reference(latent, want, slots[0], P)
            fn(latent, cache, slots, P, 0, 0)
        else:
            reference(latent, want, slots[0])
            fn(latent, cache, slots, 0, 0)
        assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8)), step
        assert len(checks) == 1, "checked once, at the first call of the signature"
        assert decode_plans.plans_made() == 1
    # another signature (T) records its own plan; a bad one still raises (its checks run)
    latent = torch.randn(T + 1, D, dtype=torch.bfloat16)
    slots = torch.arange(T + 1).view(1, -1)
    want = cache.clone()
    (reference(latent, want, slots[0], P) if packed else reference(latent, want, slots[0]))
    (fn(latent, cache, slots, P, 0, 0) if packed else fn(latent, cache, slots, 0, 0))
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))
    assert decode_plans.plans_made() == 2 and len(checks) == 2
    with pytest.raises(ValueError):
        bad = torch.randn(T, D + 2, dtype=torch.bfloat16)
        fn(bad, cache, slots[:, :T], P, 0, 0) if packed else fn(bad, cache, slots[:, :T], 0, 0)
    assert decode_plans.plans_made() == 2


def test_no_plans_in_checked_mode_or_when_switched_off(monkeypatch, seed):
    monkeypatch.setattr(decode_plans, "_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(decode_plans, "_PLANS", {})
    fn = cuda_kernel(write_kv_cache)
    cache = torch.zeros(4, 4, R + P, dtype=torch.bfloat16)
    slots = torch.arange(3).view(1, 3)
    for _ in range(2):
        fn(torch.randn(3, R + P, dtype=torch.bfloat16), cache, slots, 0, 0)      # checks on (the default)
    assert decode_plans.plans_made() == 0
    with checks_disabled(), decode_plans.no_plans():
        for _ in range(2):
            fn(torch.randn(3, R + P, dtype=torch.bfloat16), cache, slots, 0, 0)
    assert decode_plans.plans_made() == 0
    with checks_disabled():
        fn(torch.randn(3, R + P, dtype=torch.bfloat16), cache, slots, 0, 0)
    assert decode_plans.plans_made() == 1
    decode_plans.clear()
    assert decode_plans.plans_made() == 0


# ------------------------------------------------------------------------------------------- attention cores
@pytest.fixture
def gluon(monkeypatch):
    """The Gluon decode path on the CPU: ``supports`` true, one program per SM (so one split), and the two launch
    functions computing the attention with the PyTorch references into the outputs they are given. Yields the list
    of their calls."""
    calls = []

    def fp8(q, cache, bt, cu, dec, bid, qk_scale, window, o_t, l_t, o_strides, l_strides, splits, **kw):
        assert splits == 1
        calls.append("fp8")
        out, lse = swa_mla_attention_reference(q, cache, bt, cu, dec, bid, qk_scale / LOG2E, P, window, 0)
        o_t.copy_(out)
        l_t.copy_(lse)

    def dense(q, cache, bt, cu, dec, bid, qk_scale, o_t, l_t, o_strides, l_strides, splits, *a, **kw):
        assert splits == 1
        calls.append("dense")
        out, lse = paged_mla_attention_reference(q, cache, bt, cu, dec, bid, qk_scale / LOG2E, P)
        o_t.copy_(out)
        l_t.copy_(lse)

    monkeypatch.setattr(gluon_mla, "supports", lambda *a, **k: True)
    monkeypatch.setattr(gluon_mla, "launch_fp8", fp8)
    monkeypatch.setattr(gluon_mla, "launch", dense)
    monkeypatch.setattr(paged_mla, "_sm_count", lambda device: 1)
    monkeypatch.setattr(_common, "_sm_count", lambda device: 1)
    yield calls


def _cache(window, num_blocks, ps, dtype=torch.bfloat16, device="cpu"):
    latent = torch.randn(num_blocks * ps, R + P, dtype=dtype, device=device)
    if window:
        return fp8_format.quantize_rows(latent, P).view(num_blocks, ps, -1)
    return latent.view(num_blocks, ps, R + P)


def _core_call(window, q_nope, q_pe, w, cache, meta, scale):
    fn = cuda_kernel(swa_attention if window else mla_attention)
    args = (q_nope, q_pe, w, cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens_encoder, meta.seq_lens_decoder,
            meta.batch_id_per_token, meta.mha_kv_slots, meta.mha_kv_cu, scale, P)
    return fn(*args, window, 0, 0, 0) if window else fn(*args, 0, 0)


@pytest.mark.parametrize("window", [8, 0], ids=["swa", "full"])
def test_a_core_replays_the_gluon_route_for_new_inputs(planned, gluon, monkeypatch, seed, window):
    """Steps of one signature: the first checks, chooses and records; the others replay — the outputs bit for bit
    those of calls without plans on the same fresh queries, weights, cache contents and metadata values."""
    ps, contexts = 16, [5, 12, 26]        # (+ step: still two pages each, one shape)
    T = len(contexts)
    nb = -(-(max(contexts) + 1) // ps)
    cache = _cache(window, T * nb, ps)
    chosen = []
    monkeypatch.setattr(gluon_mla, "supports", lambda *a, **k: chosen.append(1) or True)    # (asked per route)
    for step in range(4):
        q_nope = torch.randn(T, H, N, dtype=torch.bfloat16)
        q_pe = torch.randn(T, H, P, dtype=torch.bfloat16)
        w = (torch.randn(H * (N + V), R) * R ** -0.5).to(torch.bfloat16)
        cache.copy_(_cache(window, T * nb, ps))
        meta = decode_step([c + step for c in contexts], ps, shuffle=step % 2 == 1).meta
        got = _core_call(window, q_nope, q_pe, w, cache, meta, 0.3)
        with decode_plans.no_plans():
            want = _core_call(window, q_nope, q_pe, w, cache, meta, 0.3)
        assert not torch.isnan(want).any()
        assert torch.equal(got, want), step
        assert decode_plans.plans_made() == 1
    assert len(chosen) == 1 + 4, "the route was chosen at the first call only (and by every call without plans)"
    assert gluon == ["fp8" if window else "dense"] * 8


def test_a_core_plan_is_keyed_by_what_its_route_read(planned, gluon, seed):
    """A change of any one thing the checks or the route read records anew; a bad call still raises."""
    ps = 16
    meta = decode_step([3, 9], ps).meta
    cache = _cache(8, 4, ps)
    q_nope, q_pe = torch.randn(2, H, N, dtype=torch.bfloat16), torch.randn(2, H, P, dtype=torch.bfloat16)
    w = (torch.randn(H * (N + V), R) * R ** -0.5).to(torch.bfloat16)
    fn = cuda_kernel(swa_attention)
    base = [q_nope, q_pe, w, cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens_encoder, meta.seq_lens_decoder,
            meta.batch_id_per_token, meta.mha_kv_slots, meta.mha_kv_cu, 0.3, P, 8, 0, 0, 0]
    fn(*base)
    fn(*base)
    assert decode_plans.plans_made() == 1
    changes = {3: _cache(8, 4, ps),                                   # another cache (same shape)
               11: 0.25,                                              # scale
               13: 9,                                                 # window
               8: meta.batch_id_per_token.to(torch.int64),            # a dtype (int64 ids are taken too)
               }
    made = 1
    for i, value in changes.items():
        args = list(base)
        args[i] = value
        fn(*args)
        made += 1
        assert decode_plans.plans_made() == made, i
    args = list(base)
    args[13] = 0                                                      # window 0: a bad call, checked
    with pytest.raises(ValueError, match="window"):
        fn(*args)
    assert decode_plans.plans_made() == made
    # the same metadata as views at other offsets and strides, and as a second cache group: new keys, and each
    # call's output that of the call without plans
    two = decode_step([3, 9], ps).meta
    tables = torch.stack([torch.full_like(two.block_tables[0], 3), two.block_tables[0]])          # [2, B, nb]
    wide = torch.zeros(len(two.batch_id_per_token) + 1, dtype=two.batch_id_per_token.dtype)
    wide[1:] = two.batch_id_per_token
    variants = [{8: wide[1:]},                                        # an offset view: 4-byte aligned only
                {4: tables, 9: torch.zeros(2, 0, dtype=torch.int32),
                 10: torch.zeros(2, 3, dtype=two.mha_kv_cu.dtype), 15: 1}]          # group 1 of two
    for change in variants:
        args = list(base)
        for i, value in change.items():
            args[i] = value
        for _ in range(2):
            got = fn(*args)
            with decode_plans.no_plans():
                want = fn(*args)
            assert torch.equal(got, want) and not torch.isnan(want).any()
        made += 1
        assert decode_plans.plans_made() == made


def test_no_core_plan_off_the_gluon_route(planned, seed):
    """Without the Gluon kernels (the CPU as it is) the route is the gathered kernel: no plan, the same outputs."""
    ps = 16
    meta = decode_step([3, 9], ps).meta
    cache = _cache(8, 4, ps)
    q_nope, q_pe = torch.randn(2, H, N, dtype=torch.bfloat16), torch.randn(2, H, P, dtype=torch.bfloat16)
    w = (torch.randn(H * (N + V), R) * R ** -0.5).to(torch.bfloat16)
    a = _core_call(8, q_nope, q_pe, w, cache, meta, 0.3)
    b = _core_call(8, q_nope, q_pe, w, cache, meta, 0.3)
    assert decode_plans.plans_made() == 0
    assert torch.equal(a, b) and not torch.isnan(a).any()


# --------------------------------------------------------------------------------------------------- GPU
def _gpu_layers(window, B, ctx, ps=64):
    dev = "cuda"
    Hg, Ng, Vg, Rg, Pg = 128, 128, 128, 512, 64
    nb = -(-(ctx + 1) // ps)
    if window:
        cache = fp8_format.quantize_rows(torch.randn(B * nb * ps, Rg + Pg, device=dev, dtype=torch.bfloat16),
                                         Pg).view(B * nb, ps, -1)
    else:
        cache = torch.randn(B * nb, ps, Rg + Pg, device=dev, dtype=torch.bfloat16)
    return cache, (Hg, Ng, Vg, Rg, Pg)


@pytest.mark.gpu
@pytest.mark.parametrize("window,B,ctx", [(128, 32, 4096), (0, 32, 4096), (0, 4, 300), (128, 128, 1000)])
def test_gpu_core_replays_are_bit_identical_to_calls_without_plans(seed, window, B, ctx):
    """Real launches: from the second call of a signature each of the op's launches is a replay (``Relaunch``); the
    outputs equal the calls without plans bit for bit, steps after steps, with fresh inputs and metadata values."""
    if not launch_mod._direct_ok():
        pytest.skip(f"replays are written for Triton {launch_mod.DIRECT_TRITON}'s launcher")
    decode_plans.clear()
    cache, (Hg, Ng, Vg, Rg, Pg) = _gpu_layers(window, B, ctx)
    fn = cuda_kernel(swa_attention if window else mla_attention)
    replays = launch_mod.replayed_calls()
    with checks_disabled():
        for step in range(4):
            meta = decode_step([ctx - 7 * b for b in range(B)], 64, device="cuda", shuffle=step % 2 == 1).meta
            q_nope = torch.randn(B, Hg, Ng, device="cuda", dtype=torch.bfloat16)
            q_pe = torch.randn(B, Hg, Pg, device="cuda", dtype=torch.bfloat16)
            w = (torch.randn(Hg * (Ng + Vg), Rg, device="cuda") * Rg ** -0.5).to(torch.bfloat16)
            args = (q_nope, q_pe, w, cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens_encoder,
                    meta.seq_lens_decoder, meta.batch_id_per_token, meta.mha_kv_slots, meta.mha_kv_cu, 0.1, Pg)
            extra = (window, 0, 0, 0) if window else (0, 0)
            got = fn(*args, *extra)
            with decode_plans.no_plans():
                want = fn(*args, *extra)
            torch.cuda.synchronize()
            assert not torch.isnan(want).any()
            assert torch.equal(got, want), step
    gluon_route = gluon_mla.supports(q_nope.new_empty(B, Hg, Rg + Pg), cache, Pg, window, window > 0)
    if window and B * 2 >= _common._sm_count(q_nope.device):
        gluon_route = False     # (W = 128 over many tokens takes the gathered kernel: no plan, checked above)
    if gluon_route:
        assert decode_plans.plans_made() == 1
        # (a launch compiled at step 1 leaves that step without a plan: step 2 records it, steps 3-4 replay)
        assert launch_mod.replayed_calls() - replays >= 2, "steps 3-4 replayed their launches"
    else:
        assert decode_plans.plans_made() == 0 and launch_mod.replayed_calls() == replays
    # the plans hold the cache's descriptors weakly: dropped with the cache, as without plans
    kept = [ref for ref, _ in launch_mod._DESC_ARGS.values()]
    del cache, args
    gluon_mla._REMEMBERED.clear()
    gc.collect()
    assert all(ref() is None for ref in kept)


@pytest.mark.gpu
def test_gpu_a_launch_hook_sees_replayed_calls():
    """With a launch hook set (a profiler), a planned call launches through ``kernel[grid]``: the hook sees it."""
    from triton import knobs

    if not launch_mod._direct_ok():
        pytest.skip(f"replays are written for Triton {launch_mod.DIRECT_TRITON}'s launcher")
    decode_plans.clear()
    cache = torch.zeros(16, 64, R + P, dtype=torch.bfloat16, device="cuda")
    slots = torch.arange(8, device="cuda").view(1, 8)
    fn = cuda_kernel(write_kv_cache)
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    with checks_disabled():
        for _ in range(3):
            fn(torch.randn(8, R + P, device="cuda", dtype=torch.bfloat16), cache, slots, 0, 0)
        assert decode_plans.plans_made() == 1
        before = launch_mod.replayed_calls()
        latent = torch.randn(8, R + P, device="cuda", dtype=torch.bfloat16)
        fn(latent, cache, slots, 0, 0)
        assert launch_mod.replayed_calls() == before + 1, "unhooked: the plan's launch is replayed"
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            before = launch_mod.replayed_calls()
            latent = torch.randn(8, R + P, device="cuda", dtype=torch.bfloat16)
            fn(latent, cache, slots, 0, 0)
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
    torch.cuda.synchronize()
    assert len(seen) == 1 and launch_mod.replayed_calls() == before
    assert torch.equal(cache.view(-1, R + P)[:8], latent)


@pytest.mark.gpu
def test_gpu_model_decode_steps_with_plans_equal_those_without(seed):
    """The original and the rewritten model (V3 attention dims, W = 128 on every other layer), eager decode steps in
    serving mode: logits and caches bit for bit those of the same steps without plans, step after step."""
    from swa_rewrite import Schedule, apply
    from swa_rewrite.models import MLAConfig, MLAModel
    from swa_rewrite.runtime import num_cache_groups

    if not launch_mod._direct_ok():
        pytest.skip(f"replays are written for Triton {launch_mod.DIRECT_TRITON}'s launcher")

    cfg = MLAConfig.named("tiny").replace(num_attention_heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
                                          hidden_size=256, q_lora_rank=128)
    model = MLAModel(cfg, seed=seed % 1000, device="cuda", dtype=torch.bfloat16)
    rewritten = apply(model, Schedule.from_skip_freq(2, cfg.num_hidden_layers, 128))
    B, ps, ctx = 8, 64, 300
    nb = -(-(ctx + 8) // ps)
    for m in (model, rewritten):
        decode_plans.clear()
        caches = m.allocate_kv_cache(B * nb, ps, "cuda")
        for c in caches:
            if c.dtype == torch.uint8:
                rows = torch.randn(c.shape[0] * c.shape[1], 576, device="cuda") * 0.5
                c.copy_(fp8_format.quantize_rows(rows, 64).view(c.shape))
            else:
                c.normal_(0, 0.5)
        mirror = [c.clone() for c in caches]
        replays = launch_mod.replayed_calls()
        with torch.inference_mode(), checks_disabled():
            for step in range(4):
                items = [StepItem([int(t)], ctx + step, list(range(b * nb, (b + 1) * nb)), False)
                         for b, t in enumerate(torch.randint(0, cfg.vocab_size, (B,)))]
                batch = StepBatch.build(items, ps, num_groups=num_cache_groups(m), device="cuda")
                got = m(batch.input_ids, kv_caches=caches, meta=batch.meta)
                with decode_plans.no_plans():
                    want = m(batch.input_ids, kv_caches=mirror, meta=batch.meta)
                torch.cuda.synchronize()
                assert torch.equal(got, want), step
                for c, d in zip(caches, mirror):
                    assert torch.equal(c.view(torch.uint8), d.view(torch.uint8)), step
        assert decode_plans.plans_made() == 2 * cfg.num_hidden_layers       # a write and a core a layer
        assert launch_mod.replayed_calls() - replays >= 2 * 2 * cfg.num_hidden_layers     # steps 3-4 at least


@pytest.mark.gpu
def test_gpu_engine_decode_steps_replay_every_core(seed, monkeypatch):
    """The engine's eager decode steps (serving mode), both models: after the first steps of a signature every
    attention core replays its plan — none decides afresh — and the tokens are those of an engine without plans.
    (The engine's mirrored tables were once strided for two cache groups: every core of the rewritten model then
    copied its table and kept no plan, the rewritten engine step slower than the original's.)"""
    from swa_rewrite import Schedule, apply
    from swa_rewrite.models import MLAConfig, MLAModel
    from swa_rewrite.runtime import Engine

    cfg = MLAConfig.named("tiny").replace(num_attention_heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
                                          hidden_size=256, q_lora_rank=128)
    model = MLAModel(cfg, seed=seed % 1000, device="cuda", dtype=torch.bfloat16)
    rewritten = apply(model, Schedule.from_skip_freq(2, cfg.num_hidden_layers, 128))
    g = torch.Generator().manual_seed(seed)
    B, ps, ctx, warm, timed = 8, 64, 300, 3, 4           # positions 300-307: five pages throughout (one signature)
    prompts = [torch.randint(0, cfg.vocab_size, (ctx,), generator=g).tolist() for _ in range(B)]
    calls = {"core": 0, "replay": 0}
    real_core, real_replay = MLA._core, MLA._replay_core

    def core(*a, **k):
        calls["core"] += 1
        return real_core(*a, **k)

    def replay(*a, **k):
        calls["replay"] += 1
        return real_replay(*a, **k)

    monkeypatch.setattr(MLA, "_core", core)
    monkeypatch.setattr(MLA, "_replay_core", replay)

    def run(m):
        engine = Engine(m, num_blocks=B * 6 + 8, page_size=ps, max_tokens_per_step=B * ctx, max_model_len=ctx + 16)
        rids = [engine.add_request(p, 1 + warm + timed) for p in prompts]
        out = {r: [] for r in rids}
        for k in range(1 + warm + timed):
            if k == 1 + warm:
                calls.update(core=0, replay=0)
            for o in engine.step():
                out[o.request_id] += o.new_token_ids
        assert not engine.has_unfinished()
        return [out[r] for r in rids]

    for m in (model, rewritten):
        decode_plans.clear()
        with checks_disabled():
            got = run(m)
            steady = dict(calls)
            with decode_plans.no_plans():
                want = run(m)
        assert steady == {"core": 0, "replay": timed * cfg.num_hidden_layers}, (m is rewritten, steady)
        assert got == want and all(len(t) == 1 + warm + timed for t in got)


# ------------------------------------------------------------------------------------------- launch.Relaunch
class _Knobs:
    class runtime:
        debug = False

    class compilation:
        instrumentation_mode = ""


def test_a_relaunch_passes_new_tensors_and_pins_everything_else(monkeypatch):
    """``launch.Relaunch`` (no direct launches here, so its parts alone): the launcher values are the new call's
    tensors in place, each descriptor's recorded encoding, the recorded constexpr tail; it fits only the same
    kernel, device, grid, keyword arguments, other positional arguments (value and type) and live descriptor."""
    monkeypatch.setattr(launch_mod, "_desc_args", lambda desc, k, meta: [f"enc{k}", 7, 8])

    class Desc:
        pass

    class Compiled:
        function = 99

    class Entry:
        descs = ((1, 0),)
        metas = ("m",)
        raw, compiled, fixed = print, Compiled(), ("fixed",)

    kernel, desc = object(), Desc()
    t0, t1 = torch.zeros(2), torch.zeros(3)
    args = (t0, desc, t1, 5, 2.0, True, None)
    kwargs = {"BLOCK": 16}
    bound = list(args) + [16, "default"]
    rel = launch_mod.Relaunch.make(Entry, kernel, (4, 1, 1), (4,), 0, args, kwargs, bound, _Knobs)
    n0, n1 = torch.ones(2), torch.ones(3)
    new = (n0, desc, n1, 5, 2.0, True, None)
    assert rel.values(new) == (n0, "enc0", 7, 8, n1, 5, 2.0, True, None, 16, "default")
    pinned = launch_mod._pinned
    assert rel.fits(kernel, (4,), 0, new, pinned({"BLOCK": 16}), _Knobs)
    kwargs = pinned(kwargs)
    changed = [(object(), (4,), 0, new, kwargs), (kernel, (5,), 0, new, kwargs), (kernel, (4,), 1, new, kwargs),
               (kernel, (4,), 0, new, pinned({"BLOCK": 32})),
               (kernel, (4,), 0, (n0, Desc(), n1, 5, 2.0, True, None), kwargs),
               (kernel, (4,), 0, (n0, desc, n1, 6, 2.0, True, None), kwargs),
               (kernel, (4,), 0, (n0, desc, n1, 5, 2.0, 1, None), kwargs),                # True -> 1
               (kernel, (4,), 0, (n0, desc, n1, 5, 2, True, None), kwargs),               # 2.0 -> 2
               (kernel, (4,), 0, (n0, desc, n1, 5, 2.0, True, 0), kwargs),
               (kernel, (4,), 0, new[:-1], kwargs)]
    for i, (k, grid, device, a, kw) in enumerate(changed):
        assert not rel.fits(k, grid, device, a, kw, _Knobs), i
    # the binder's view of a tensor: its dtype and 16-byte alignment
    assert rel.tensors_fit(new)
    assert not rel.tensors_fit((n0.double(), desc, n1, 5, 2.0, True, None))
    assert not rel.tensors_fit((torch.zeros(3)[1:], desc, n1, 5, 2.0, True, None))       # 4-byte aligned
    assert not rel.tensors_fit((0, desc, n1, 5, 2.0, True, None))
    assert not rel.fits(kernel, (4,), 0, new, pinned({"BLOCK": torch.tensor(16)}), _Knobs)   # no tensor compared
    assert not rel.fits(kernel, (4,), 0, new, pinned({"BLOCK": True}), _Knobs)
    assert launch_mod.Relaunch.make(Entry, kernel, (4, 1, 1), (4,), 0, args, {"X": t0}, bound, _Knobs) is None
    del desc, new, args
    gc.collect()
    assert not rel.fits(kernel, (4,), 0, (n0, Desc(), n1, 5, 2.0, True, None), kwargs, _Knobs)
    # positional arguments that are not the binder's first values: no relaunch
    assert launch_mod.Relaunch.make(Entry, kernel, (4, 1, 1), (4,), 0, (t0, Desc()), {}, [t1, None], _Knobs) is None
