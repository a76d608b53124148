"""DeepSeek-V2/V3 mixture of experts (issue 7): routers and routed experts vs float64 per-token references."""

import math

import pytest
import torch
import torch.fx

from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.models.moe import MoE, MoERouter, moe_experts_reference
from swa_rewrite.ops.moe import moe_experts_grouped

H = 32

ROUTERS = {
    "v3-noaux_tc": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                        norm_topk_prob=True, routed_scaling_factor=2.5),
    "v3-noaux_tc-unnormalised": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
                                     norm_topk_prob=False, routed_scaling_factor=1.5),
    "v2-greedy": dict(scoring_func="softmax", topk_method="greedy", routed_scaling_factor=16.0),
    "v2-group_limited": dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=8, topk_group=3),
}


def moe_config(**kw):
    base = dict(hidden_size=H, n_routed_experts=16, num_experts_per_tok=3, moe_intermediate_size=8,
                n_shared_experts=1, first_k_dense_replace=0)
    return MLAConfig.named("tiny").replace(**{**base, **kw})


def route_reference(x, weight, bias, cfg):
    """Per-token DeepSeek routing in float64 with Python sorting. ``None`` for a token whose choice is a
    near-tie (the float32 router may then legitimately pick the other expert)."""
    logits = x.double() @ weight.double().T
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
    E, k, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    out = []
    for s in scores.tolist():
        c = [v + (bias[e].item() if bias is not None else 0.0) for e, v in enumerate(s)]
        allowed = list(range(E))
        if cfg.topk_method != "greedy":
            size = E // G
            group_score = []
            for g in range(G):
                members = sorted(c[g * size:(g + 1) * size], reverse=True)
                group_score.append(sum(members[:2]) if cfg.topk_method == "noaux_tc" else members[0])
            ranked = sorted(range(G), key=lambda g: -group_score[g])
            if abs(group_score[ranked[cfg.topk_group - 1]] - group_score[ranked[min(cfg.topk_group, G - 1)]]) < 1e-5 \
                    and cfg.topk_group < G:
                out.append(None)
                continue
            allowed = [e for g in ranked[:cfg.topk_group] for e in range(g * size, (g + 1) * size)]
        ranked = sorted(allowed, key=lambda e: -c[e])
        if len(ranked) > k and abs(c[ranked[k - 1]] - c[ranked[k]]) < 1e-5:
            out.append(None)
            continue
        chosen = ranked[:k]
        w = [s[e] for e in chosen]
        if cfg.norm_topk_prob:
            w = [v / sum(w) for v in w]
        out.append({e: v * cfg.routed_scaling_factor for e, v in zip(chosen, w)})
    return out


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_router_matches_reference(router, seed):
    cfg = moe_config(**ROUTERS[router])
    gate = MoERouter(cfg)
    with torch.no_grad():
        gate.weight.normal_()
        if gate.e_score_correction_bias is not None:
            gate.e_score_correction_bias.normal_(std=0.3)
    x = torch.randn(64, H)
    weights, ids = gate(x)
    assert weights.dtype == torch.float32 and ids.shape == (64, cfg.num_experts_per_tok)
    ref = route_reference(x, gate.weight, gate.e_score_correction_bias, cfg)
    checked = 0
    for t, want in enumerate(ref):
        if want is None:
            continue
        got = dict(zip(ids[t].tolist(), weights[t].tolist()))
        assert sorted(got) == sorted(want), f"token {t}: experts {sorted(got)} != {sorted(want)}"
        for e in want:
            assert math.isclose(got[e], want[e], rel_tol=1e-5), f"token {t}, expert {e}: {got[e]} != {want[e]}"
        checked += 1
    # Softmax routers put many experts' scores near 0, so near-ties are common: ~3 of 64 tokens on average,
    # up to 9 in 300 seeds (the earlier bound of 56 failed seed 1013953519). Three quarters must be checked.
    assert checked >= 48


def test_noaux_tc_bias_only_steers_the_choice(seed):
    """A large correction bias on one expert makes every token pick it, with its unbiased score as weight."""
    cfg = moe_config(**ROUTERS["v3-noaux_tc-unnormalised"])
    gate = MoERouter(cfg)
    with torch.no_grad():
        gate.weight.normal_()
        gate.e_score_correction_bias.zero_()
        gate.e_score_correction_bias[5] = 10.0
    x = torch.randn(16, H)
    weights, ids = gate(x)
    assert (ids == 5).any(dim=-1).all()
    picked = weights[ids == 5]
    expected = torch.sigmoid(x @ gate.weight[5]) * cfg.routed_scaling_factor
    torch.testing.assert_close(picked, expected, rtol=1e-5, atol=1e-6)


def experts_per_token(x, gate_up, down, ids, weights):
    """float64, one token and one choice at a time."""
    I = down.shape[-1]
    ref = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j].item()
            g, u = gate_up[e, :I].double() @ x[t].double(), gate_up[e, I:].double() @ x[t].double()
            ref[t] += weights[t, j].double() * (down[e].double() @ (torch.nn.functional.silu(g) * u))
    return ref


def random_experts(T, E, I, k, skewed=False):
    x = torch.randn(T, H)
    gate_up, down = torch.randn(E, 2 * I, H) / H**0.5, torch.randn(E, H, I) / I**0.5
    # Expert E-1 never receives a token (an empty group); ``skewed``: most pairs go to expert 0.
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.long)
    if skewed and T:
        ids[:, 0] = 0
        ids[:, 1:] = torch.where(ids[:, 1:] == 0, E - 2, ids[:, 1:])
    return x, gate_up, down, ids, torch.rand(T, k)


@pytest.mark.parametrize("T", [0, 1, 3, 19, 99])
def test_experts_match_per_token_reference(T, seed):
    x, gate_up, down, ids, weights = random_experts(T, 6, 10, 2)
    got = torch.ops.swa_rewrite.moe_experts(x, gate_up, down, ids, weights)
    assert got.shape == (T, H) and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), experts_per_token(x, gate_up, down, ids, weights), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moe_experts_reference(x, gate_up, down, ids.int(), weights), got)


@pytest.mark.parametrize("T", [0, 1, 19, 99])
@pytest.mark.parametrize("skewed", [False, True])
def test_grouped_experts_match_per_token_reference(T, skewed, seed):
    """The CUDA path (grouped GEMMs with device-side offsets), run on CPU."""
    x, gate_up, down, ids, weights = random_experts(T, 6, 16, 3, skewed)
    got = moe_experts_grouped(x, gate_up, down, ids, weights)
    assert got.shape == (T, H) and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), experts_per_token(x, gate_up, down, ids, weights), rtol=1e-5, atol=1e-5)


def test_grouped_experts_read_nothing_on_the_host():
    """On ``meta`` tensors any host read of data (``.tolist()``, ``.item()``, data-dependent shapes) raises:
    the grouped path runs there, the loop with its per-expert counts does not."""
    x, gate_up, down, ids, weights = random_experts(8, 6, 16, 2)
    meta = [t.to("meta") for t in (x.bfloat16(), gate_up.bfloat16(), down.bfloat16(), ids, weights)]
    assert moe_experts_grouped(*meta).shape == (8, H)
    with pytest.raises((NotImplementedError, RuntimeError)):
        moe_experts_reference(*meta)


@pytest.mark.gpu
def test_grouped_experts_capture_in_a_cuda_graph(seed):
    """bf16 on CUDA takes the grouped path; one captured graph replays new routings correctly."""
    x, gate_up, down, ids, weights = (t.cuda() for t in random_experts(64, 8, 32, 2))
    x, gate_up, down = x.bfloat16(), gate_up.bfloat16(), down.bfloat16()
    op = torch.ops.swa_rewrite.moe_experts
    op(x, gate_up, down, ids, weights)                              # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(x, gate_up, down, ids, weights)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        ids.copy_(torch.stack([torch.randperm(8, device="cuda")[:2] for _ in range(64)]))
        weights.copy_(torch.rand_like(weights))
        graph.replay()
        ref = moe_experts_reference(x, gate_up, down, ids, weights)
        assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < 1e-2


def test_experts_op_rejects_bad_shapes():
    x, gu, dn = torch.randn(4, H), torch.randn(3, 8, H), torch.randn(3, H, 4)
    ids, w = torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    with pytest.raises(ValueError, match="shapes disagree"):
        torch.ops.swa_rewrite.moe_experts(x, gu, torch.randn(3, H, 5), ids, w)
    with pytest.raises(ValueError, match="topk_ids and topk_weights"):
        torch.ops.swa_rewrite.moe_experts(x, gu, dn, ids, torch.rand(4, 3))
    with pytest.raises(ValueError, match="int32 or int64"):
        torch.ops.swa_rewrite.moe_experts(x, gu, dn, ids.float(), w)


def test_moe_block_traces_and_runs_on_meta(seed):
    """The routed experts stay one op node, so fx traces the block and a meta-device model runs."""
    cfg = moe_config(**ROUTERS["v3-noaux_tc"])
    model = MLAModel(cfg, seed=seed)
    block = model.layers[0].mlp
    assert isinstance(block, MoE)
    gm = torch.fx.symbolic_trace(block)
    op = torch.ops.swa_rewrite.moe_experts
    assert sum(n.op == "call_function" and n.target in (op, op.default) for n in gm.graph.nodes) == 1
    x = torch.randn(7, H)
    torch.testing.assert_close(gm(x), block(x))
    with torch.device("meta"):
        out = MoE(cfg, 0, None)(torch.empty(5, H))
    assert out.device.type == "meta" and out.shape == (5, H)


def test_router_stays_float32_when_the_model_is_cast(seed):
    model = MLAModel(moe_config(**ROUTERS["v3-noaux_tc"]), seed=seed, dtype=torch.bfloat16)
    block = model.layers[1].mlp
    assert block.gate.weight.dtype == torch.float32
    assert block.gate.e_score_correction_bias.dtype == torch.float32
    assert block.experts.gate_up_proj.dtype == torch.bfloat16
    model.to(torch.float16)
    assert block.gate.weight.dtype == torch.float32 and block.shared_experts.gate_up_proj.weight.dtype == torch.float16
    out = block(torch.randn(9, H, dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_moe_layer_placement():
    cfg = moe_config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2, n_shared_experts=0)
    model = MLAModel(cfg, device="meta")
    assert [isinstance(layer.mlp, MoE) for layer in model.layers] == [False, False, True, False, True, False]
    assert model.layers[2].mlp.shared_experts is None
    assert not any(cfg.replace(n_routed_experts=None).is_moe_layer(i) for i in range(6))
    assert MLAConfig.named("tiny").n_routed_experts is None   # existing configs: no MoE


@pytest.mark.parametrize("bad,match", [
    (dict(n_routed_experts=0), "n_routed_experts"),
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(scoring_func="tanh"), "scoring_func"),
    (dict(topk_method="random"), "topk_method"),
    (dict(topk_method="noaux_tc", n_group=3), "n_group"),
    (dict(topk_method="noaux_tc", n_group=4, topk_group=5), "topk_group"),
    (dict(topk_method="group_limited_greedy", n_group=8, topk_group=1), "exceeds"),
    (dict(topk_method="noaux_tc", n_group=16, topk_group=4, num_experts_per_tok=2), "top-2"),
    (dict(moe_layer_freq=0), "moe_layer_freq"),
])
def test_config_rejects_bad_moe_fields(bad, match):
    with pytest.raises(ValueError, match=match):
        moe_config(**bad)
