"""Stacked projections (``models.fused_weights``): a layer's ``fused_qkv_a_proj`` = [q_a_proj; kv_a_proj_with_mqa] and
an MLP's ``gate_up_proj`` = [gate_proj; up_proj] compute what DeepSeek's separate projections compute, and state
dicts / checkpoints with DeepSeek's names load into them and come back out."""

import pytest
import torch
import torch.nn.functional as F

from swa_rewrite import Schedule, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.models.fused import silu_mul
from swa_rewrite.models.fused_weights import parts_of, split_parts

TINY = MLAConfig.named("tiny")
H = TINY.hidden_size


def moe_tiny():
    return TINY.replace(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=2,
                        first_k_dense_replace=1)


def deepseek_state(model) -> dict:
    """``model``'s state dict with DeepSeek's names, built from the modules' weights by hand (independent of
    ``split_parts``): each stack cut at its documented row."""
    out = {}
    for key, t in model.state_dict().items():
        if key.endswith("self_attn.fused_qkv_a_proj.weight"):
            p = key[:-len("fused_qkv_a_proj.weight")]
            q = model.config.q_lora_rank
            out[p + "q_a_proj.weight"], out[p + "kv_a_proj_with_mqa.weight"] = t[:q].clone(), t[q:].clone()
        elif key.endswith("gate_up_proj.weight"):
            p = key[:-len("gate_up_proj.weight")]
            half = t.shape[0] // 2
            out[p + "gate_proj.weight"], out[p + "up_proj.weight"] = t[:half].clone(), t[half:].clone()
        else:
            out[key] = t.clone()
    return out


@pytest.mark.parametrize("config", [TINY, moe_tiny()], ids=["dense", "moe"])
def test_deepseek_names_load_into_the_stacks(config, seed):
    source = MLAModel(config, seed=seed)
    state = deepseek_state(source)
    assert not any("fused_qkv_a_proj" in k or ".gate_up_proj.weight" in k for k in state)
    target = MLAModel(config, seed=seed + 1)
    result = target.load_state_dict(state)                       # strict: raises on anything missing / unexpected
    assert not result.missing_keys and not result.unexpected_keys
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name
    assert split_parts(target.state_dict(), config).keys() == state.keys()
    for key, t in split_parts(target.state_dict(), config).items():
        assert torch.equal(t, state[key]), key


@pytest.mark.parametrize("config", [TINY, moe_tiny()], ids=["dense", "moe"])
def test_the_rewritten_module_loads_deepseek_names(config, seed):
    """``apply``'s module (plain submodules: fx copies what the graph uses) takes DeepSeek's names too, into a model
    built on the meta device (``to_empty`` / ``load_state_dict(assign=True)``, its docstring's flow)."""
    source = MLAModel(config, seed=seed)
    state = deepseek_state(source)
    schedule = Schedule.from_skip_freq(2, config.num_hidden_layers, 8)
    for assign in (False, True):
        rewritten = apply(MLAModel(config, device="meta" if assign else "cpu", seed=seed + 1), schedule)
        if not assign:
            rewritten.load_state_dict(state)
        else:
            rewritten.load_state_dict(state, assign=True)
        got = rewritten.state_dict()
        for name, want in source.state_dict().items():
            assert torch.equal(got[name], want), (assign, name)


def test_a_partial_set_of_parts_is_reported_not_merged(seed):
    state = deepseek_state(MLAModel(TINY, seed=seed))
    state.pop("layers.1.mlp.up_proj.weight")
    with pytest.raises(RuntimeError, match=r"(?s)Missing.*layers\.1\.mlp\.gate_up_proj\.weight.*Unexpected.*"
                                           r"layers\.1\.mlp\.gate_proj\.weight"):
        MLAModel(TINY, seed=seed).load_state_dict(state)


def test_stacks_compute_the_separate_projections(seed):
    """The layer's q_a / kv_a views and the MLP's output equal DeepSeek's separate projections (float64 reference)."""
    model = MLAModel(TINY, seed=seed).double()
    ds = deepseek_state(model)
    x = torch.randn(5, H, dtype=torch.float64)
    attn = model.layers[0].self_attn
    q_a, kv = attn.a_projections(x)
    torch.testing.assert_close(q_a, x @ ds["layers.0.self_attn.q_a_proj.weight"].T)
    torch.testing.assert_close(kv, x @ ds["layers.0.self_attn.kv_a_proj_with_mqa.weight"].T)
    want = (F.silu(x @ ds["layers.0.mlp.gate_proj.weight"].T) * (x @ ds["layers.0.mlp.up_proj.weight"].T)
            ) @ ds["layers.0.mlp.down_proj.weight"].T
    torch.testing.assert_close(model.layers[0].mlp(x), want)


def test_parts_of_names_each_stack_and_nothing_else():
    assert parts_of("layers.3.self_attn.fused_qkv_a_proj.weight", 100, TINY) == [
        ("layers.3.self_attn.q_a_proj.weight", TINY.q_lora_rank),
        ("layers.3.self_attn.kv_a_proj_with_mqa.weight", 100 - TINY.q_lora_rank)]
    assert parts_of("layers.2.mlp.shared_experts.gate_up_proj.weight", 16, TINY) == [
        ("layers.2.mlp.shared_experts.gate_proj.weight", 8), ("layers.2.mlp.shared_experts.up_proj.weight", 8)]
    for other in ("layers.2.mlp.experts.gate_up_proj", "layers.0.self_attn.q_b_proj.weight", "lm_head.weight",
                  "layers.0.mlp.gate_up_proj.weight_scale_inv"):
        assert parts_of(other, 16, TINY) is None


def test_a_model_without_q_lora_keeps_its_projections(seed):
    cfg = TINY.replace(q_lora_rank=None)
    model = MLAModel(cfg, seed=seed)
    names = set(model.state_dict())
    assert "layers.0.self_attn.q_proj.weight" in names and "layers.0.self_attn.kv_a_proj_with_mqa.weight" in names
    assert not any("fused_qkv_a_proj" in n for n in names)
    q_a, kv = model.layers[0].self_attn.a_projections(torch.randn(3, H))
    assert q_a is None and kv.shape == (3, cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def test_silu_mul_names_an_odd_width():
    with pytest.raises(ValueError, match=r"even width, got shape \(3, 5\)"):
        silu_mul(torch.randn(3, 5))
