"""The MLA core ops the model calls (SPEC §13, ``ops.mla_attention``): ``mla_attention`` (full layers) and
``swa_attention`` (sliding-window layers) take the un-absorbed query and ``kv_b_proj``'s weight and return
``o [T, H, V]``, running MHA mode for the requests the step metadata gives rows and MQA mode for the rest.

Oracle: ``test_mha_prefill.oracle`` — float64, from SPEC §3/§12, on rows unpacked by the tests' own unpacker,
expanded with the un-absorbed weight (MHA and MQA mode are the same mathematics, so one oracle serves every token).
Unused cache slots are poisoned. ``mha_crossover_tokens`` is held to a FLOP count written here.
"""

import pytest
import torch

from swa_rewrite import ops
from swa_rewrite.ops.checks import checks_disabled
from swa_rewrite.ops.mla_attention import absorb_query, mha_tokens, unabsorb_output
from swa_rewrite.runtime.batch import MHAPlan, StepBatch, StepItem, mha_crossover_tokens
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
