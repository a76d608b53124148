"""The MLA core ops the model calls (SPEC §13, ``ops.mla_attention``): ``mla_attention`` (full layers) and
``swa_attention`` (sliding-window layers) take the un-absorbed query and ``kv_b_proj``'s weight and return
``o [T, H, V]``, running MHA mode for the requests the step metadata gives rows and MQA mode for the rest.

Oracle: ``test_mha_prefill.oracle`` — float64, from SPEC §3/§12, on rows unpacked by the tests' own unpacker,
expanded with the un-absorbed weight (MHA and MQA mode are the same mathematics, so one oracle serves every token).
Unused cache slots are poisoned. ``mha_crossover_tokens`` is held to a FLOP count written here.
"""

import sys

import pytest
import torch

from swa_rewrite import ops
from swa_rewrite.ops.checks import checks_disabled
from swa_rewrite.ops.mla_attention import absorb_query, mha_tokens, unabsorb_output
from swa_rewrite.runtime.batch import (MEASURED_DIMS, MHAPlan, StepBatch, StepItem, mha_attended_pairs,
                                       mha_crossover_tokens, mha_expanded_rows, mha_measured_rule, mha_pays_off)
from test_mha_prefill import attended
from test_mha_prefill import MIXED, reference_of, setup

def core(s, rows=True, pad_rows=0, **kw):
    """The core op on setup ``s`` (one cache group): ``swa_attention`` for a window, else ``mla_attention``."""
    m = s["meta"]
    kv_slots, kv_cu = s["kv_slots"], s["kv_cu"]
    if pad_rows:
        kv_slots = torch.cat([kv_slots, torch.full((pad_rows,), -1, dtype=kv_slots.dtype)])
    extra = dict(mha_kv_slots=kv_slots, mha_kv_cu=kv_cu) if rows else {}
    args = (s["q_nope"], s["q_pe"], s["w"], s["cache"], m["block_tables"], m["cu_seqlens_q"], m["seq_lens_encoder"],
            m["seq_lens_decoder"], m["batch_id_per_token"], s["scale"])
    if s["window"]:
        return ops.swa_attention(*args, window=s["window"], sinks=s["sinks"], **extra, **kw)
    return ops.mla_attention(*args, **extra, **kw)


def assert_matches_oracle(o, s, rtol=1e-5):
    ref, _ = reference_of({**s, "mha": None})                      # every request, either mode: one semantics
    o = o.double()
    assert not torch.isnan(o).any()
    assert o.shape == ref.shape
    pad = s["meta"]["batch_id_per_token"] < 0
    assert torch.all(o[pad] == 0), "padding tokens give 0"
    err = (o - ref).norm() / ref.norm()
    assert err <= rtol, f"relative error {err:.2e}"


MODES = [None, [True] * 5, [True, False, True, False, False], [False, True, False, True, True]]


@pytest.mark.parametrize("mha", MODES, ids=["no-rows", "all-mha", "mixed-a", "mixed-b"])
@pytest.mark.parametrize("window,sinks", [(1, 0), (7, 0), (16, 3), (0, 0)])
@pytest.mark.parametrize("ps", [1, 16])
def test_core_matches_the_oracle_in_both_modes(seed, mha, window, sinks, ps):
    s = setup(MIXED, ps, 4, window, sinks, packed=window != 0, mha=[bool(x) for x in mha] if mha else mha)
    if mha is None:          # no request selected: the step has no rows at all
        s = {**s, "kv_slots": s["kv_slots"][:0], "kv_cu": torch.zeros_like(s["kv_cu"])}
    assert_matches_oracle(core(s), s)


@pytest.mark.parametrize("window,sinks", [(7, 0), (16, 3), (0, 0)])
def test_rows_padded_past_kv_cu_change_nothing(seed, window, sinks):
    """A step's groups share one row count: rows past ``kv_cu[-1]`` are -1 and read by no token."""
    s = setup(MIXED, 4, 2, window, sinks, packed=window != 0, mha=[True, False, True, True, False])
    padded, plain = core(s, pad_rows=5), core(s)
    assert not torch.isnan(padded).any()
    # (The full layer's reference gathers min(W, M) candidates per token, so M moves its float32 sums slightly.)
    torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window,sinks", [(7, 2), (0, 0)])
def test_without_rows_it_is_the_mqa_computation_bit_for_bit(seed, window, sinks):
    """No rows: absorb, the MQA-form op, un-absorb — what the model computed before the boundary moved."""
    s = setup(MIXED, 8, 3, window, sinks, packed=window != 0)
    m = s["meta"]
    q_abs = absorb_query(s["q_nope"], s["q_pe"], s["w"])
    args = (q_abs, s["cache"], m["block_tables"], m["cu_seqlens_q"], m["seq_lens_encoder"], m["seq_lens_decoder"],
            m["batch_id_per_token"], s["scale"])
    P = s["q_pe"].shape[-1]
    if window:
        o_lat, _ = ops.swa_mla_attention(*args, window=window, sinks=sinks, rope_dim=P)
    else:
        o_lat, _ = ops.paged_mla_attention(*args, rope_dim=P)
    assert torch.equal(core(s, rows=False), unabsorb_output(o_lat, s["w"], s["q_nope"].shape[-1]))


def test_mha_tokens_follow_the_requests_with_rows():
    kv_cu = torch.tensor([0, 5, 5, 9, 9], dtype=torch.int32)
    bid = torch.tensor([0, 0, 1, 2, 2, 3, -1, -1], dtype=torch.int32)
    assert mha_tokens(kv_cu, bid).tolist() == [True, True, False, True, True, False, False, False]
    assert not mha_tokens(torch.zeros(1, dtype=torch.int32), torch.full((3,), -1, dtype=torch.int32)).any()


@pytest.mark.parametrize("window", [5, 0])
def test_fake_and_opcheck(seed, window):
    s = setup([(0, 6), (9, 2)], 4, 2, window, 0, packed=window != 0, mha=[True, False])
    m = s["meta"]
    rows, cu = s["kv_slots"][None], s["kv_cu"][None]
    common = (s["q_nope"], s["q_pe"], s["w"], s["cache"], m["block_tables"][None], m["cu_seqlens_q"],
              m["seq_lens_encoder"], m["seq_lens_decoder"], m["batch_id_per_token"], rows, cu, s["scale"], 16)
    if window:
        op, args = torch.ops.swa_rewrite.swa_attention.default, common + (window, 3, 0, 0)
    else:
        op, args = torch.ops.swa_rewrite.mla_attention.default, common + (3, 0)
    torch.library.opcheck(op, args)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert fake.shape == (s["q_nope"].shape[0], 2, 16) and fake.dtype == s["q_nope"].dtype


def test_checks_name_the_bad_input(seed):
    s = setup([(0, 6), (9, 2)], 4, 2, 5, 0, mha=[True, False])
    with pytest.raises(ValueError, match="mha_kv_cu"):
        core({**s, "kv_cu": s["kv_cu"][:-1]})
    bad = s["kv_slots"].clone()
    bad[2] = bad[3]
    with pytest.raises(ValueError, match=r"kv_slots\[2\]"):
        core({**s, "kv_slots": bad})
    with pytest.raises(ValueError, match="rows past kv_cu"):
        core({**s, "kv_slots": torch.cat([s["kv_slots"], s["kv_slots"][:1]])})
    with checks_disabled():                                            # data checks off: shapes still checked
        core({**s, "kv_slots": bad})
        with pytest.raises(ValueError, match="mha_kv_cu"):
            core({**s, "kv_cu": s["kv_cu"][:-1]})
    m = s["meta"]
    with pytest.raises(ValueError, match="rope_dim"):
        torch.ops.swa_rewrite.swa_attention(s["q_nope"], s["q_pe"], s["w"], s["cache"], m["block_tables"][None],
                                            m["cu_seqlens_q"], m["seq_lens_encoder"], m["seq_lens_decoder"],
                                            m["batch_id_per_token"], s["kv_slots"][None], s["kv_cu"][None],
                                            s["scale"], 8, 5, 0, 0)


@pytest.mark.parametrize("window", [5, 0])
def test_shape_checks_run_once_per_argument_signature(seed, monkeypatch, window):
    """An eager call whose argument signature (every tensor's shape, dtype and device, every scalar and its type) an
    earlier call passed skips the shape checks (issue 14: ~40 % of a decode call's own Python); a call that changes
    any one of them is checked again, and a bad one still raises."""
    module = sys.modules["swa_rewrite.ops.mla_attention"]
    monkeypatch.setattr(module, "_SIGNATURES", {})
    checked = []
    real = module._dims
    monkeypatch.setattr(module, "_dims", lambda *a: checked.append(1) or real(*a))
    s = setup([(0, 6), (9, 2)], 4, 2, window, 0, mha=[True, False])
    m = s["meta"]
    with checks_disabled():
        want = core(s)
        assert len(checked) == 1
        got = core(s)
        assert len(checked) == 1, "the same signature again: its shape checks are not repeated"
        assert torch.equal(got, want)
        core({**s, "q_nope": s["q_nope"].clone()})               # new tensors of the same signature
        assert len(checked) == 1
        bad = [({**s, "w": s["w"].double()}, ValueError, "kv_b_weight"),
               ({**s, "cache": s["cache"][..., :-1]}, ValueError, "cache"),
               ({**s, "meta": {**m, "batch_id_per_token": m["batch_id_per_token"][:-1]}}, ValueError,
                "batch_id_per_token"),
               ({**s, "meta": {**m, "block_tables": m["block_tables"].float()}}, ValueError, "block_tables"),
               ({**s, "kv_cu": s["kv_cu"][:-1]}, ValueError, "mha_kv_cu")]
        for args, error, match in bad:
            before = len(checked)
            with pytest.raises(error, match=match):
                core(args)
            assert len(checked) == before + 1, f"{match}: a changed signature is checked again"

        # the op's scalars, through the dispatcher (the Python wrapper checks some of them itself)
        def direct(scale=s["scale"], rope_dim=16, group=0, sinks=0):
            tensors = (s["q_nope"], s["q_pe"], s["w"], s["cache"], m["block_tables"][None], m["cu_seqlens_q"],
                       m["seq_lens_encoder"], m["seq_lens_decoder"], m["batch_id_per_token"], s["kv_slots"][None],
                       s["kv_cu"][None])
            if window:
                return torch.ops.swa_rewrite.swa_attention(*tensors, scale, rope_dim, window, 0, group, sinks)
            return torch.ops.swa_rewrite.mla_attention(*tensors, scale, rope_dim, 0, group)

        direct()
        before = len(checked)
        direct()
        assert len(checked) == before
        scalars = [(dict(scale=float("nan")), "scale"), (dict(rope_dim=8), "rope_dim"), (dict(group=1), "group 1")]
        if window:
            scalars.append((dict(sinks=-1), "sinks"))
        for kw, match in scalars:
            before = len(checked)
            with pytest.raises(ValueError, match=match):
                direct(**kw)
            assert len(checked) == before + 1, f"{match}: a changed signature is checked again"
        before = len(checked)
        direct()
        core(s)
        assert len(checked) == before, "the failed calls were not remembered; the good ones still are"


def test_step_batch_plans_each_groups_rows_and_pads_them():
    """``StepBatch.build(mha=)``: the selected prompt chunks' rows per group (its own window and sinks), padded
    with -1 to one count; decodes and short chunks get none; no selected chunk → ``M = 0``."""
    ps = 4
    items = [StepItem([5, 6, 7], 10, list(range(0, 4)), True),             # a chunk of 3 after 10 cached
             StepItem([1], 20, list(range(4, 10)), False),                  # a decode
             StepItem([1, 2], 0, list(range(10, 11)), True)]                # a chunk too short for the plan
    plan = MHAPlan(groups=((0, 0), (5, 2)), min_tokens=3)
    meta = StepBatch.build(items, ps, num_groups=2, mha=plan).meta
    # Request 0's table maps position p to slot p. Full group: positions 0..12. Sliding group (W = 5, 2 sinks):
    # the sinks 0, 1, then from 10 - 5 + 1 = 6 to 12.
    assert meta.has_mha and meta.mha_kv_cu.tolist() == [[0, 13, 13, 13], [0, 9, 9, 9]]
    assert meta.mha_kv_slots.tolist() == [list(range(13)), [0, 1, 6, 7, 8, 9, 10, 11, 12, -1, -1, -1, -1]]
    assert StepBatch.build(items[1:], ps, num_groups=2, mha=plan).meta.mha_kv_slots.shape == (2, 0)
    assert not StepBatch.build(items, ps, num_groups=2).meta.has_mha


@pytest.mark.parametrize("R,N,V,P", [(512, 128, 128, 64), (128, 64, 64, 64), (64, 16, 16, 16), (64, 64, 64, 8)])
def test_mha_crossover_is_where_mha_does_fewer_flops(R, N, V, P):
    def flops(C, W):
        mqa = C * W * 2 * (2 * R + P) + C * 2 * R * (N + V)            # scores + PV on the latent, absorb + un-absorb
        mha = C * W * 2 * (N + P + V) + (C + W) * 2 * R * (N + V)      # 192/128-dim attention, expanding C + W rows
        return mqa, mha

    got = mha_crossover_tokens(R, N, V)
    for W in (1, 128, 4096, 10 ** 6):
        first = next((C for C in range(1, 5000) if flops(C, W)[1] < flops(C, W)[0]), None)
        assert got == first, (W, got, first)


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("mha", [None, [True] * 7, [True, False, True, False, True, False, True]],
                         ids=["no-rows", "all-mha", "mixed"])
@pytest.mark.parametrize("window,sinks", [(128, 0), (300, 4), (0, 0)])
@pytest.mark.parametrize("H", [16, 128])
def test_core_gpu_bf16_matches_the_oracle(seed, mha, window, sinks, H):
    """DeepSeek-V3 dims in bf16 on the GPU, through the CUDA paths (Triton MQA kernels, the MHA kernel): SPEC §9's
    5e-3 from the float64 oracle, in both modes and mixed."""
    from test_mha_prefill import GPU_DIMS, GPU_REQUESTS

    s = setup(GPU_REQUESTS, 64, H, window, sinks, packed=window != 0, mha=mha, **GPU_DIMS)
    if mha is None:
        s = {**s, "kv_slots": s["kv_slots"][:0], "kv_cu": torch.zeros_like(s["kv_cu"])}
    assert_matches_oracle(core(s), s, rtol=5e-3)


# ------------------------------------------------------------------------- rows are addresses (review)
def _mha_model_step(seed):
    from swa_rewrite import Schedule, apply
    from swa_rewrite.models import MLAConfig, MLAModel
    from swa_rewrite.runtime import num_cache_groups

    model = apply(MLAModel(MLAConfig(), seed=seed), Schedule.per_layer({0: (5, 2), 2: 5}, 4))
    G = num_cache_groups(model)
    plan = MHAPlan.for_model(model, 1)
    items = [StepItem(list(range(1, 12)), 6, list(range(0, 5)), True), StepItem([3], 9, list(range(5, 9)), False)]
    batch = StepBatch.build(items, 4, num_groups=G, mha=plan)
    caches = model.allocate_kv_cache(12, 4)
    for c in caches:
        c.zero_()
    return model, batch, caches


@pytest.mark.parametrize("field,value", [("mha_kv_slots", 10 ** 6), ("mha_kv_slots", 3), ("mha_kv_cu", -50)])
def test_a_model_step_refuses_bad_rows_before_any_read_or_write(seed, field, value):
    """Bad MHA rows in a model step: the step check names them (ValueError) before a layer reads through them or
    writes its cache — not an IndexError from a read, and no cache changes."""
    import dataclasses

    model, batch, caches = _mha_model_step(seed)
    rows = getattr(batch.meta, field).clone()
    g = 1 if field == "mha_kv_slots" else 0
    rows[g, 1] = value
    meta = dataclasses.replace(batch.meta, **{field: rows})
    before = [c.clone() for c in caches]
    with pytest.raises(ValueError, match="mha_kv_slots / mha_kv_cu"):
        model(batch.input_ids, kv_caches=caches, meta=meta)
    assert all(torch.equal(a, b) for a, b in zip(before, caches))
    model(batch.input_ids, kv_caches=caches, meta=batch.meta)       # the engine state is fine: a good step runs


def test_the_step_check_validates_rows_once_for_every_layer(seed, monkeypatch):
    """Inside a model step the core ops do not re-check the rows the step check validated (no read per layer)."""
    import sys

    core_module = sys.modules["swa_rewrite.ops.mla_attention"]    # (the package's function shadows the name)
    model, batch, caches = _mha_model_step(seed)

    def recheck(*a, **k):
        raise AssertionError("a layer re-checked rows")

    monkeypatch.setattr(core_module, "_check_rows", recheck)
    model(batch.input_ids, kv_caches=caches, meta=batch.meta)
    s = setup([(0, 6), (9, 2)], 4, 2, 5, 0, mha=[True, False])    # a direct call, rows nobody validated: checked
    with pytest.raises(AssertionError, match="re-checked"):
        core(s)


def test_unchecked_rows_past_the_cache_read_zeros_not_memory(seed):
    """With checks off nothing is validated, but a slot past the cache is never dereferenced (zeros)."""
    from swa_rewrite.ops.mha_prefill import _cache_rows

    s = setup([(0, 6), (9, 2)], 4, 2, 5, 0, mha=[True, False])
    n = s["cache"].shape[0] * s["cache"].shape[1]
    rows = _cache_rows(s["cache"], torch.tensor([0, n, n + 7, -1]), 16)
    assert torch.all(rows[1:] == 0)                                  # (row 0 may be an unused, poisoned slot)
    bad = s["kv_slots"].clone()
    bad[0] = n + 100
    with checks_disabled():
        assert not torch.isnan(core({**s, "kv_slots": bad})).any()


@pytest.mark.parametrize("window,sinks", [(1, 0), (5, 0), (8, 3), (64, 4), (0, 0)])
def test_pairs_and_rows_count_what_the_oracle_and_the_planner_see(window, sinks):
    """``mha_attended_pairs`` = Σ over the chunk of the positions ``test_mha_prefill.attended`` lists;
    ``mha_expanded_rows`` = the rows ``plan_mha_rows`` plans for the request."""
    from swa_rewrite.ops.mha_prefill import plan_mha_rows

    for cached, chunk in [(0, 1), (0, 17), (3, 9), (40, 5), (200, 33), (7, 64)]:
        assert mha_attended_pairs(chunk, cached, window, sinks) == sum(
            len(attended(p, window, sinks)) for p in range(cached, cached + chunk))
        nb = (cached + chunk) // 4 + 1
        slots, kv_cu = plan_mha_rows(torch.arange(nb, dtype=torch.int32)[None], torch.tensor([0, chunk]),
                                     torch.tensor([cached]), window=window, sinks=sinks, page_size=4)
        assert mha_expanded_rows(chunk, cached, window, sinks) == int(kv_cu[-1]) == slots.shape[0]


@pytest.mark.parametrize("R,N,V,P", [(512, 128, 128, 64), (128, 16, 16, 16), (128, 64, 64, 64)])
def test_mha_pays_off_exactly_where_it_counts_fewer_flops(R, N, V, P):
    """Per head, as the core op runs them: MQA — 2(2R+P) per pair + the absorb / un-absorb BMMs 2R(N+V) per
    query; MHA — 2(N+P+V) per pair + 2R(N+V) per expanded row + the same BMMs (run on every token)."""
    def flops(chunk, cached, window, sinks):
        pairs = sum(len(attended(p, window, sinks)) for p in range(cached, cached + chunk))
        a = 0 if window == 0 else max(0, cached - window + 1)
        rows = (min(sinks, a) if window else 0) + cached + chunk - a
        bmm = chunk * 2 * R * (N + V)
        return pairs * 2 * (2 * R + P) + bmm, pairs * 2 * (N + P + V) + rows * 2 * R * (N + V) + bmm

    rng = __import__("random").Random(0)
    for _ in range(300):
        chunk, cached = rng.choice([1, 7, 64, 150, 171, 172, 300, 700]), rng.choice([0, 5, 100, 1000, 3000])
        window, sinks = rng.choice([(0, 0), (64, 0), (128, 4), (171, 0), (512, 4), (1024, 0), (4096, 4)])
        mqa, mha = flops(chunk, cached, window, sinks)
        assert mha_pays_off(chunk, cached, window, sinks, R, N, V) == (mha < mqa), (chunk, cached, window, sinks)
    assert not any(mha_pays_off(4096, c, 128, 0, 512, 128, 128) for c in (0, 10 ** 5))   # a short window: never


def test_the_plan_selects_per_group_by_the_flop_count():
    plan = MHAPlan(groups=((0, 0), (128, 0), (4096, 4)), dims=(512, 128, 128))
    long = StepItem([1] * 2048, 0, list(range(33)), True)
    assert [plan.selects(long, g) for g in range(3)] == [True, False, True]
    short = StepItem([1] * 100, 5000, list(range(81)), True)
    assert [plan.selects(short, g) for g in range(3)] == [False, False, False]
    assert not plan.selects(StepItem([1], 10, [0], False), 0)


@pytest.mark.parametrize("T", [0, 1, 7])
def test_absorb_and_unabsorb_equal_the_plain_bmms_and_keep_gradients(T, seed):
    """The BMMs write into strided views of their outputs; the values are the plain transposed BMMs' (q_nope and
    q_pe as the model passes them: slices of one q), and with gradients on they fall back to differentiable ops."""
    H, N, P, R, V = 3, 8, 4, 16, 8
    q = torch.randn(T, H, N + P, dtype=torch.float64)
    q_nope, q_pe = q[..., :N], q[..., N:]
    w = torch.randn(H * (N + V), R, dtype=torch.float64)
    w_uk, w_uv = w.view(H, N + V, R)[:, :N], w.view(H, N + V, R)[:, N:]
    want = torch.cat([torch.einsum("thn,hnr->thr", q_nope, w_uk), q_pe], dim=-1)
    assert torch.allclose(absorb_query(q_nope, q_pe, w), want, rtol=1e-12, atol=1e-12)
    o_lat = torch.randn(T, H, R, dtype=torch.float64)[:, :, :]
    got = unabsorb_output(o_lat, w, N)
    assert got.is_contiguous() and torch.allclose(got, torch.einsum("thr,hvr->thv", o_lat, w_uv), rtol=1e-12,
                                                   atol=1e-12)
    wg = w.clone().requires_grad_(True)
    (absorb_query(q_nope, q_pe, wg).sum() + unabsorb_output(o_lat, wg, N).sum()).backward()
    assert wg.grad is not None and wg.grad.shape == w.shape


def test_the_measured_rule_picks_the_faster_mode_of_the_recorded_sweep():
    """Every case of the recorded GPU sweep (``benchmarks/mha_sweep_h200.jsonl``: MHA block vs the MQA op, which
    is what the core op saves by choosing MHA) where one mode was more than 10 % faster: the rule picks that one
    (near-ties may go either way). And the sweep covers each branch of the rule."""
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "mha_sweep_h200.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) >= 100
    decided = 0
    for r in rows:
        ratio = r["mha"] / r["mqa_op"]
        if abs(ratio - 1) > 0.1:
            decided += 1
            assert mha_measured_rule(r["C"], r["hist"], r["W"], r["H"]) == (ratio < 1), r
    assert decided >= 90
    outcomes = {(r["C"] >= 128, r["W"] < 512, r["H"] >= 64, mha_measured_rule(r["C"], r["hist"], r["W"], r["H"]))
                for r in rows}
    assert {(False, False, True, False), (False, True, True, False), (False, True, False, True),
            (True, False, True, True), (True, True, True, True), (True, True, False, True)} <= outcomes
    assert not mha_measured_rule(32, 0, 128, 16) and not mha_measured_rule(200, 5000, 0, 128)


def test_the_plan_uses_the_measured_rule_at_deepseek_dims_with_heads():
    assert MEASURED_DIMS == (512, 128, 128)
    plan = MHAPlan(groups=((0, 0), (128, 0), (4096, 4)), dims=(512, 128, 128), heads=128)
    assert [plan.selects(StepItem([1] * 2048, 0, list(range(33)), True), g) for g in range(3)] == [True] * 3
    assert [plan.selects(StepItem([1] * 200, 0, list(range(4)), True), g) for g in range(3)] == [True] * 3
    assert [plan.selects(StepItem([1] * 200, 6000, list(range(97)), True), g) for g in range(3)] == [False, True,
                                                                                                     True]
    assert not any(plan.selects(StepItem([1] * 100, 0, list(range(2)), True), g) for g in range(3))
    shard = MHAPlan(groups=((128, 0), (0, 0)), dims=(512, 128, 128), heads=16)
    assert [shard.selects(StepItem([1] * 100, 0, list(range(2)), True), g) for g in range(2)] == [True, False]
    other = MHAPlan(groups=((128, 0),), dims=(256, 64, 64), heads=128)       # other dims: the FLOP count
    item = StepItem([1] * 4096, 0, list(range(65)), True)
    assert other.selects(item, 0) == mha_pays_off(4096, 0, 128, 0, 256, 64, 64)


def test_rows_validated_for_one_window_are_checked_again_for_another(seed):
    """The step check's mark carries the window and sinks it validated: an op of another window re-checks (rows
    planned for a full layer are wrong for a window of 5) instead of running silently wrong."""
    from swa_rewrite.ops.checks import note_validated, validated_step
    from swa_rewrite.ops.mha_prefill import mha_rows_validated, plan_mha_rows

    s = setup(MIXED, 4, 2, 5, 2, mha=[True] * 5)
    m = s["meta"]
    full_rows = plan_mha_rows(m["block_tables"], m["cu_seqlens_q"], m["seq_lens_decoder"], window=0, page_size=4)
    rows, cu = full_rows[0][None], full_rows[1][None]
    bt = m["block_tables"][None]
    args = (s["q_nope"], s["q_pe"], s["w"], s["cache"], bt, m["cu_seqlens_q"], m["seq_lens_encoder"],
            m["seq_lens_decoder"], m["batch_id_per_token"])
    with validated_step():
        note_validated((rows, cu), 0, mha_rows_validated(0, 0))
        with pytest.raises(ValueError, match="kv_cu|kv_slots"):
            ops.swa_attention(*args, s["scale"], window=5, sinks=2, mha_kv_slots=rows, mha_kv_cu=cu)
    good_rows, good_cu = s["kv_slots"][None], s["kv_cu"][None]
    with validated_step():                                  # the same window and sinks: trusted, no re-check
        note_validated((good_rows, good_cu), 0, mha_rows_validated(5, 2))
        ops.swa_attention(*args, s["scale"], window=5, sinks=2, mha_kv_slots=good_rows, mha_kv_cu=good_cu)


@pytest.mark.parametrize("cu0", [10 ** 6, -3, 7])
def test_a_malformed_kv_cu_is_a_value_error_not_an_index_error(seed, cu0):
    s = setup(MIXED, 4, 2, 5, 2, mha=[True] * 5)
    cu = s["kv_cu"].clone()
    cu[0] = cu0
    with pytest.raises(ValueError, match="kv_cu"):
        core({**s, "kv_cu": cu})
