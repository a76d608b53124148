"""Hugging Face DeepSeek-V2/V3 models load into the paged runtime and match ``transformers`` (issue 7).

Every test builds a tiny random ``transformers`` model (eager attention, eager experts, float32), re-draws
its weights at a scale where attention, routing and every logit matter, and compares our stack against it:
logits through the paged engine with chunked prefill, greedy generation, checkpoint round trips, and —
after ``swa_rewrite.apply`` — FP8-only differences and a windowed ``transformers`` reference (a custom
attention function registered through its attention interface).
"""

import json
import math
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import swa_rewrite  # noqa: E402
from numerics import assert_greedy_agrees, rel_err
from swa_rewrite.models import CheckpointMismatchError, from_hf, from_pretrained  # noqa: E402
from swa_rewrite.models.hf import config_from_hf  # noqa: E402
from swa_rewrite.models.moe import MoE  # noqa: E402
from swa_rewrite.runtime import StepBatch, StepItem, num_cache_groups  # noqa: E402
from swa_rewrite.runtime import Engine  # noqa: E402

V = 96          # vocab
PROMPT = 40     # > original_max_position_embeddings of the yarn variants (yarn interpolates); + 16 new < 64

_YARN_V3 = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8)
# Only mscale_all_dim set: transformers' cos/sin magnitude is mscale(factor), DeepSeek's formula would differ.
_YARN_ALL_DIM_ONLY = dict(rope_type="yarn", rope_theta=5000.0, factor=8.0, original_max_position_embeddings=8,
                          mscale_all_dim=1.0)
_YARN_V2 = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)

VARIANTS = {
    # V3 as released: q LoRA, interleaved rope, yarn, sigmoid router with correction bias, normalised weights.
    "v3": ("v3", dict(q_lora_rank=24, rope_interleave=True, rope_parameters=_YARN_V3, norm_topk_prob=True)),
    "v3-noqlora-neox": ("v3", dict(q_lora_rank=None, rope_interleave=False, norm_topk_prob=False,
                                   routed_scaling_factor=1.0, n_group=1, topk_group=1)),
    "v3-yarn-alldim-tied": ("v3", dict(q_lora_rank=16, rope_parameters=_YARN_ALL_DIM_ONLY, tie_word_embeddings=True,
                                       first_k_dense_replace=0)),
    # V2-Lite-like: no q LoRA, softmax greedy router, yarn with mscale = mscale_all_dim.
    "v2-greedy": ("v2", dict(q_lora_rank=None, topk_method="greedy", rope_parameters=_YARN_V2,
                             routed_scaling_factor=16.0)),
    "v2-group-limited": ("v2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2)),
}


def hf_config(kind, **over):
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=64, n_routed_experts=8,
                  num_experts_per_tok=3, first_k_dense_replace=1, eos_token_id=None, bos_token_id=None,
                  attn_implementation="eager", experts_implementation="eager")
    if kind == "v3":
        common.update(n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5)
        return transformers.DeepseekV3Config(**{**common, **over})
    common.update(n_shared_experts=2)
    return transformers.DeepseekV2Config(**{**common, **over})


@torch.no_grad()
def randomize(hf_model, seed):
    """Weights at unit scale (transformers' 0.02-std init makes attention uniform and routing near-tied)."""
    g = torch.Generator().manual_seed(seed)
    tensors = list(hf_model.named_parameters()) + [(n, b) for n, b in hf_model.named_buffers()
                                                   if n.endswith("e_score_correction_bias")]
    for name, t in tensors:
        if "norm" in name:
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
        elif name.endswith("e_score_correction_bias"):
            t.copy_(0.2 * torch.randn(t.shape, generator=g))
        elif "embed_tokens" in name:
            t.copy_(torch.randn(t.shape, generator=g))
        else:
            t.copy_(torch.randn(t.shape, generator=g) * t.shape[-1] ** -0.5)
    return hf_model


def hf_model(variant, seed, **over):
    kind, kw = VARIANTS[variant]
    cls = transformers.DeepseekV3ForCausalLM if kind == "v3" else transformers.DeepseekV2ForCausalLM
    return randomize(cls(hf_config(kind, **{**kw, **over})).eval(), seed)


@torch.no_grad()
def hf_logits(model, tokens):
    return model(torch.tensor([tokens])).logits[0].float()


@torch.no_grad()
def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def poisoned_engine(model, rng, page_size=None, budget=None, mha_prefill="auto"):
    """An engine with a random page size and token budget (chunked prefill), caches poisoned with NaN."""
    page_size = page_size or rng.choice([1, 7, 16])
    engine = Engine(model, num_blocks=-(-3 * (PROMPT + 20) // page_size) + 3, page_size=page_size,
                    max_tokens_per_step=budget or rng.choice([3, 5, 11]), mha_prefill=mha_prefill)
    for c in engine.kv_caches:
        c.fill_(float("nan") if c.is_floating_point() else 0xFF)  # 0xFF as e4m3fn is NaN
    return engine


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_paged_logits_match_transformers(variant, seed):
    rng = random.Random(seed)
    hf = hf_model(variant, seed)
    ours = from_hf(hf)
    assert ours.config.rope_interleave == hf.config.to_dict().get("rope_interleave", True)
    assert sum(isinstance(layer.mlp, MoE) for layer in ours.layers) == \
        hf.config.num_hidden_layers - hf.config.first_k_dense_replace
    tokens = [rng.randrange(V) for _ in range(PROMPT)]
    got = poisoned_engine(ours, rng).logits(tokens)
    ref = hf_logits(hf, tokens)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generation_matches_transformers(variant, seed):
    """16 greedy tokens for three prompts in one engine run (chunked prefill beside decodes)."""
    rng = random.Random(seed)
    hf = hf_model(variant, seed)
    prompts = [[rng.randrange(V) for _ in range(n)] for n in (PROMPT, 1, 13)]
    ours = from_hf(hf)
    got = poisoned_engine(ours, rng, budget=rng.choice([4, 6])).generate(prompts, 16)
    for prompt, tokens in zip(prompts, got):
        assert_greedy_agrees(tokens, hf_greedy(hf, prompt, 16), prompt,
                             lambda p: poisoned_engine(ours, rng).logits(p), lambda p: hf_logits(hf, p), 1e-4)


# ------------------------------------------------------------------------------------------- checkpoints
def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("variant,shard", [("v3", None), ("v2-group-limited", "30KB"), ("v3-yarn-alldim-tied", "30KB")])
def test_from_pretrained_equals_from_hf(variant, shard, tmp_path, seed):
    hf = hf_model(variant, seed)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") == bool(shard)
    loaded, direct = from_pretrained(tmp_path), from_hf(hf)
    assert loaded.config == direct.config
    assert state_equal(loaded, direct)
    assert loaded.config.tie_word_embeddings == (loaded.lm_head.weight is loaded.embed_tokens.weight)
    rng = random.Random(seed)
    tokens = [rng.randrange(V) for _ in range(17)]
    assert rel_err(poisoned_engine(loaded, rng).logits(tokens), hf_logits(hf, tokens)) <= 1e-4


def test_from_pretrained_dtype_and_device(tmp_path, seed):
    hf = hf_model("v3", seed)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    block = model.layers[1].mlp
    assert model.lm_head.weight.dtype == block.experts.down_proj.dtype == torch.bfloat16
    assert block.gate.weight.dtype == block.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(block.gate.e_score_correction_bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)
    assert from_pretrained(tmp_path).lm_head.weight.dtype == torch.float32   # the config's dtype
    assert from_hf(hf, dtype="bf16").lm_head.weight.dtype == torch.bfloat16    # dtype names, as from_pretrained
    with pytest.raises(ValueError, match="dtype='bf17' is not a known dtype name"):
        from_hf(hf, dtype="bf17")


def _rewrite_checkpoint(path, edit):
    file = path / "model.safetensors"
    tensors = safetensors_torch.load_file(file)
    edit(tensors)
    safetensors_torch.save_file(tensors, file, metadata={"format": "pt"})


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage,match", [
    (lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"),
     r"missing \(1\): layers\.2\.mlp\.experts\.5\.up_proj"),
    (lambda t: t.pop("model.layers.0.self_attn.kv_b_proj.weight"),
     r"missing \(1\): layers\.0\.self_attn\.kv_b_proj"),
    (lambda t: t.update({"model.layers.1.mlp.experts.8.gate_proj.weight": torch.zeros(24, 64)}),
     r"unexpected \(1\): model\.layers\.1\.mlp\.experts\.8\.gate_proj"),
    (lambda t: t.update({"model.layers.1.self_attn.o_proj.bias": torch.zeros(64)}), r"unexpected \(1\).*o_proj\.bias"),
    (lambda t: t.update({"model.norm.weight": torch.ones(65)}), r"mis-shaped \(1\): model\.norm\.weight: \(65,\)"),
    (lambda t: t.update({"model.layers.2.mlp.gate.weight": torch.zeros(8, 63)}),
     r"mis-shaped \(1\).*mlp\.gate\.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight":
                         t["model.layers.0.self_attn.kv_b_proj.weight"].to(torch.float8_e4m3fn)}),
     r"kv_b_proj\.weight is stored in torch\.float8_e4m3fn but the checkpoint has no .*weight_scale_inv"),
    (lambda t: t.update({"model.layers.0.self_attn.xx_proj.weight_scale_inv": torch.ones(1, 1)}),
     r"unexpected \(1\): model\.layers\.0\.self_attn\.xx_proj\.weight_scale_inv"),
])
def test_checkpoint_mismatch_is_named(damage, match, tmp_path, seed):
    hf_model("v3", seed).save_pretrained(tmp_path)
    _rewrite_checkpoint(tmp_path, damage)
    with pytest.raises(CheckpointMismatchError, match=match):
        from_pretrained(tmp_path)


def test_multi_token_prediction_layers_are_skipped(tmp_path, seed):
    """DeepSeek-V3 checkpoints carry the MTP module as layer ``num_hidden_layers``; the decoder skips it."""
    hf = hf_model("v3", seed)
    hf.save_pretrained(tmp_path)
    mtp = {"model.layers.3.eh_proj.weight": torch.randn(64, 128),
           "model.layers.3.self_attn.kv_b_proj.weight": torch.randn(128, 32)}
    _rewrite_checkpoint(tmp_path, lambda t: t.update(mtp))
    _edit_config(tmp_path, num_nextn_predict_layers=1)
    assert state_equal(from_pretrained(tmp_path), from_hf(hf))
    _edit_config(tmp_path, num_nextn_predict_layers=0)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(2\)"):
        from_pretrained(tmp_path)


def _quantize_blockwise(w, block):
    """DeepSeek-V3's FP8 release format: e4m3 weights and one float32 ``scale_inv`` per block."""
    rows, cols = w.shape
    b0, b1 = block
    scale = torch.empty(math.ceil(rows / b0), math.ceil(cols / b1))
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_block_fp8_checkpoint_is_dequantized(tmp_path, seed):
    hf = hf_model("v3", seed)
    hf.save_pretrained(tmp_path)
    block = (16, 16)   # 24-wide q_a_proj / 8-wide router rows leave partial blocks
    expected = {}

    def quantize(tensors):
        for name in [n for n in tensors if n.endswith("proj.weight") and "embed" not in n]:
            q, s = _quantize_blockwise(tensors[name], block)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            deq = torch.empty(q.shape)
            for i in range(s.shape[0]):
                for j in range(s.shape[1]):
                    tile = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
                    deq[tile] = q[tile].float() * s[i, j]
            expected[name] = deq

    _rewrite_checkpoint(tmp_path, quantize)
    _edit_config(tmp_path, quantization_config=dict(quant_method="fp8", fmt="e4m3", weight_block_size=list(block)))
    model = from_pretrained(tmp_path)
    state, want = model.state_dict(), {k[len("model."):]: v for k, v in expected.items()}
    assert torch.equal(state["layers.0.self_attn.kv_b_proj.weight"], want["layers.0.self_attn.kv_b_proj.weight"])
    assert torch.equal(state["layers.2.mlp.experts.down_proj"][3], want["layers.2.mlp.experts.3.down_proj.weight"])
    up = state["layers.1.mlp.experts.gate_up_proj"][7, 24:]   # [gate; up] of expert 7
    assert torch.equal(up, want["layers.1.mlp.experts.7.up_proj.weight"])
    original = hf.model.layers[0].self_attn.q_a_proj.weight
    q_a = state["layers.0.self_attn.fused_qkv_a_proj.weight"][:original.shape[0]]     # [q_a; kv_a]
    assert rel_err(q_a, original) < 0.05   # e4m3 keeps ~3 bits
    kv_a = state["layers.0.self_attn.fused_qkv_a_proj.weight"][original.shape[0]:]
    assert torch.equal(kv_a, hf.model.layers[0].self_attn.kv_a_proj_with_mqa.weight)   # (not quantized here)
    assert not any(k.endswith("scale_inv") for k in state)


# ---------------------------------------------------------------------------------------------- configs
def _v3_dict(**changes):
    cfg = hf_config("v3", **VARIANTS["v3"][1]).to_dict()
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "not a DeepSeek-V2/V3 config"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)), "rope type 'linear'"),
    (dict(rope_parameters={**_YARN_V3, "truncate": False}), "truncate"),
    (dict(kv_lora_rank=None), "config lacks"),
])
def test_unsupported_configs_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(_v3_dict(**changes))


def test_old_style_config_keys():
    """Released checkpoints spell rope as ``rope_theta`` + ``rope_scaling`` with ``type``; Kimi-K2 as its own
    model_type; V3 ignores scoring_func/topk_method (transformers always routes sigmoid + noaux_tc)."""
    new = config_from_hf(_v3_dict())
    rope_scaling = {("type" if k == "rope_type" else k): v for k, v in _YARN_V3.items() if k != "rope_theta"}
    old = _v3_dict(model_type="kimi_k2", rope_theta=10000.0, scoring_func="sigmoid", topk_method="noaux_tc",
                   rope_scaling=rope_scaling)
    del old["rope_parameters"]
    assert config_from_hf(old) == new
    assert new.topk_method == "noaux_tc" and new.scoring_func == "sigmoid"
    no_factor = config_from_hf(_v3_dict(rope_parameters={**_YARN_V3, "factor": None}))
    assert no_factor.rope_scaling["factor"] == 64 / _YARN_V3["original_max_position_embeddings"]  # max_pos / original


# ----------------------------------------------------------------------------- after swa_rewrite.apply
WINDOWED = "swa_rewrite_test_windowed"


def windowed_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention that applies ``config.sliding_window`` on layers whose ``config.layer_types`` entry is
    ``"sliding_attention"`` (docs/design.md §3: a query at position p sees p-W+1 … p). One unpadded sequence: the
    queries are the last ``Lq`` of the ``Lk`` keys (transformers' sliding cache keeps exactly the window).
    On modules flagged ``fp8_rope_reference`` the keys' rope part is rounded to bf16, as the packed cache
    stores it."""
    assert query.shape[0] == 1, "reference supports one unpadded sequence"
    Lq, Lk = query.shape[2], key.shape[2]
    q_pos = torch.arange(Lk - Lq, Lk)[:, None]
    k_pos = torch.arange(Lk)[None, :]
    masked = k_pos > q_pos
    layer_types = module.config.layer_types
    if layer_types is not None and layer_types[module.layer_idx] == "sliding_attention":
        masked |= q_pos - k_pos >= module.config.sliding_window
    if getattr(module, "fp8_rope_reference", False):
        N = module.qk_nope_head_dim
        key = torch.cat([key[..., :N], key[..., N:].to(torch.bfloat16).to(key.dtype)], dim=-1)
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    probs = scores.masked_fill(masked, float("-inf")).softmax(dim=-1)
    return (probs @ value.float()).to(query.dtype).transpose(1, 2).contiguous(), probs


transformers.AttentionInterface.register(WINDOWED, windowed_eager_attention)


def fp8_roundtrip(x):
    """docs/design.md §6 on the latent ``[..., R]``: per 128-wide tile, scale ``max(amax/448, 1e-4)`` rounded up to a
    power of two, e4m3 with round-to-nearest-even, dequantised (exactly representable in bf16)."""
    tiles = x.float().reshape(*x.shape[:-1], -1, 128)
    s = (tiles.abs().amax(dim=-1, keepdim=True) / 448.0).clamp(min=1e-4)
    s = torch.exp2(torch.ceil(torch.log2(s)))
    return ((tiles / s).to(torch.float8_e4m3fn).float() * s).reshape(x.shape).to(x.dtype)


def make_swa_reference(hf):
    """``hf`` as the reference of the rewritten model: windowed attention on its sliding layers, whose
    latents go through the packed FP8 cache format (``kv_a_layernorm`` output quantised, rope part bf16)."""
    hf.set_attn_implementation(WINDOWED)
    for i, kind in enumerate(hf.config.layer_types):
        if kind == "sliding_attention":
            attn = hf.model.layers[i].self_attn
            attn.kv_a_layernorm.register_forward_hook(lambda mod, args, out: fp8_roundtrip(out))
            attn.fp8_rope_reference = True
    return hf


_apply_missing = not callable(getattr(swa_rewrite, "apply", None))
needs_apply = pytest.mark.skipif(_apply_missing, reason="swa_rewrite.apply (issue 5) is not available")


def test_windowed_reference_is_a_window(seed):
    """The reference itself: with W ≥ the sequence it is plain eager attention; a small W changes exactly
    the positions ≥ W; the FP8 rounding changes the logits by FP8-sized amounts."""
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    hf = hf_model("v3", seed, kv_lora_rank=128, layer_types=types, sliding_window=PROMPT)
    tokens = torch.randint(0, V, (PROMPT,)).tolist()
    full = hf_logits(hf, tokens)
    hf.set_attn_implementation(WINDOWED)
    torch.testing.assert_close(hf_logits(hf, tokens), full, rtol=1e-5, atol=1e-5)
    hf.config.sliding_window = 6
    windowed = hf_logits(hf, tokens)
    torch.testing.assert_close(windowed[:6], full[:6], rtol=1e-5, atol=1e-5)
    assert ((windowed[6:] - full[6:]).abs().amax(dim=-1) > 1e-3).all()
    x = torch.randn(5, 256) * torch.rand(5, 1) * 100
    assert 1e-3 < rel_err(fp8_roundtrip(x), x) < 0.05 and torch.equal(fp8_roundtrip(fp8_roundtrip(x)), fp8_roundtrip(x))


def one_step_logits(model, tokens, caches_out=None):
    """Logits of ``tokens`` as one prefill step (no chunks) over NaN-poisoned caches, page size 16 (token ``t`` in
    slot ``t``); the caches, written, are appended to ``caches_out`` when given."""
    b = StepBatch.build([StepItem(tokens, 0, list(range(-(-len(tokens) // 16))), True)], 16,
                        num_groups=num_cache_groups(model))
    caches = model.allocate_kv_cache(-(-len(tokens) // 16), 16)
    for c in caches:
        c.fill_(float("nan") if c.is_floating_point() else 0xFF)
    if caches_out is not None:
        caches_out.extend(caches)
    with torch.no_grad():
        return model(b.input_ids, kv_caches=caches, meta=b.meta).float()


def logits_given_our_latents(reference, caches, tokens):
    """``reference``'s logits (``make_swa_reference``) with each sliding layer's FP8-rounded latents replaced by the
    ones our one step cached (``one_step_logits``' ``caches``). First asserts that ours are the reference's rounding
    up to what float32 noise can do: at most 2 % of the elements differ (on the other side of an e4m3 boundary) and
    the latents as a whole are within 1e-2 of the reference's (an error in the latents' computation moves nearly all
    of them)."""
    from swa_rewrite import fp8_format

    cfg = reference.config
    R, P, T = cfg.kv_lora_rank, cfg.qk_rope_head_dim, len(tokens)
    hooks = []

    def swap(mod, args, out, ours):
        rounded = out.reshape(T, R).float()
        differ = (rounded != ours).float().mean()
        assert differ <= 0.02, f"{differ:.3%} of the latents differ from the reference's rounding"
        assert rel_err(ours, rounded) <= 1e-2
        return ours.reshape(out.shape).to(out.dtype)

    for i, kind in enumerate(cfg.layer_types):
        if kind == "sliding_attention":
            rows = caches[i].reshape(-1, caches[i].shape[-1])[:T]
            ours = fp8_format.dequantize_rows(rows, R, P)[:, :R].float()
            attn = reference.model.layers[i].self_attn
            hooks.append(attn.kv_a_layernorm.register_forward_hook(
                lambda mod, args, out, ours=ours: swap(mod, args, out, ours)))
    try:
        return hf_logits(reference, tokens)
    finally:
        for h in hooks:
            h.remove()


def check_rewritten_against(hf, reference, tokens, rng, mha_prefill="auto"):
    """``swa_rewrite.apply`` with the schedule of ``hf.config`` vs ``reference``: logits in one step and through
    the paged engine (chunked prefill), and 16 greedy tokens. Returns the one-step and the reference's logits.

    One step computes every latent as transformers does, so the FP8 rounding of the reference explains our
    logits up to float32 noise — a latent element that noise tips across an e4m3 boundary moves them, heavy-tailed:
    150 seeds of the full-window test gave a median of 6e-7 and a maximum of 1.2e-3, seed 1733661989 3.4e-3, so
    the one-step bound is 1e-2. Chunks change the float32 summation order, so elements cross boundaries, and these random
    unit-scale models amplify one crossing in an early token to ~1e-2 of the logits (seen in 2 of 500
    seeds): the engine is held to docs/design.md §9's FP8 envelope, 3e-2, against the one-step logits, and greedy
    tokens may part where the reference's top two are closer than that envelope."""
    schedule = swa_rewrite.Schedule.from_hf_config(hf.config)
    model = swa_rewrite.apply(from_hf(hf), schedule)
    ref = hf_logits(reference, tokens)
    caches = []
    single = one_step_logits(model, tokens, caches)
    if rel_err(single, ref) > 1e-2:
        # A few latent elements on the other side of an e4m3 boundary, amplified by a peaked attention. Seed
        # 2876080319, v3: layer 1's float32 noise (4e-7 of its latents) comes out of its attention 1000x larger,
        # moves 23 of layer 2's 5120 latent codes, and one token's logits move 22 % while the others stay within
        # 0.2 %. Judge against the reference given our codes, once they are shown to be its rounding up to such
        # elements.
        ref = logits_given_our_latents(reference, caches, tokens)
    assert rel_err(single, ref) <= 1e-2
    got = poisoned_engine(model, rng, mha_prefill=mha_prefill).logits(tokens)
    assert rel_err(got, single) <= 3e-2
    ours = poisoned_engine(model, rng, mha_prefill=mha_prefill).generate([tokens], 16)[0]
    theirs = hf_greedy(reference, tokens, 16)
    if ours != theirs:
        i = next(j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        prefix = tokens + theirs[:i]
        ref_i = hf_logits(reference, prefix)[-1]
        caches = []
        mine = one_step_logits(model, prefix, caches)[-1]
        if rel_err(mine, ref_i) > 1e-2 and any(k == "sliding_attention" for k in reference.config.layer_types):
            ref_i = logits_given_our_latents(reference, caches, prefix)[-1]     # as for the prompt, above
        envelope = 3e-2 * ref_i.norm().item() / ref_i.numel() ** 0.5     # docs/design.md §9's bound, per logit (RMS)
        err = rel_err(mine, ref_i)
        if err > 1e-2:
            # An MoE router of the reference at a tie for its last expert: float32 noise picks either side, and
            # the two sides' logits differ by far more than the FP8 envelope (seed 3405431138, v2-greedy: third
            # and fourth router scores 0.122980 / 0.122975, logits 0.6 apart). Nothing to compare there.
            gap = router_tie_gap(reference, prefix)
            assert gap < 1e-3, f"token {i}: one-step logits {err:.3g} from the reference, router gap {gap:.3g}"
            return single, ref
        margin = (ref_i[theirs[i]] - ref_i[ours[i]]).item()
        assert margin <= envelope, f"token {i}: ours {ours[i]} vs reference {theirs[i]}, margin {margin:.4g}"
    return single, ref


@torch.no_grad()
def router_tie_gap(model, tokens):
    """The smallest relative gap, over the MoE layers of an HF DeepSeek model, between the last token's
    lowest chosen expert score and the highest unchosen one (the scores the router ranks: softmax for V2,
    sigmoid + correction bias for V3, before group limits)."""
    gaps, hooks = [], []

    def record(gate, args, out):
        logits, k = out[0][-1], gate.top_k
        bias = getattr(gate, "e_score_correction_bias", None)
        scores = logits.sigmoid() + bias if bias is not None else logits.softmax(-1)
        top = scores.sort(descending=True).values
        gaps.append(((top[k - 1] - top[k]) / top[k - 1].abs()).item())

    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            hooks.append(gate.register_forward_hook(record))
    try:
        hf_logits(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    return min(gaps, default=float("inf"))


@needs_apply
@pytest.mark.parametrize("variant", ["v3", "v2-greedy"])
def test_apply_with_full_window_differs_only_by_fp8(variant, seed):
    """``W`` ≥ every sequence on every layer: the rewritten model equals transformers with the latents rounded
    through the packed FP8 format — the only difference the rewrite may make (docs/design.md §9)."""
    rng = random.Random(seed)
    L = 3
    over = dict(kv_lora_rank=128, layer_types=["sliding_attention"] * L, sliding_window=PROMPT + 16)  # R % 128 == 0
    hf = hf_model(variant, seed, **over)
    tokens = [rng.randrange(V) for _ in range(PROMPT)]
    plain = hf_logits(hf, tokens)
    got, ref = check_rewritten_against(hf, make_swa_reference(hf_model(variant, seed, **over)), tokens, rng)
    assert rel_err(got, ref) < 0.2 * rel_err(got, plain)   # the FP8 cache is in use and the reference explains it


@needs_apply
@pytest.mark.parametrize("mha_prefill", ["auto", 1])
@pytest.mark.parametrize("variant", ["v3", "v2-group-limited"])
def test_apply_with_small_window_matches_windowed_transformers(variant, mha_prefill, seed):
    """Sliding layers from the HF config's ``layer_types`` + ``sliding_window`` (the schedule comes from the
    config), vs transformers running the windowed attention function on the same layers — with the engine's
    default MHA-mode selection and with every prompt chunk in MHA mode (SPEC §13)."""
    rng = random.Random(seed)
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    over = dict(kv_lora_rank=128, layer_types=types, sliding_window=rng.choice([3, 7, 12]))
    hf = hf_model(variant, seed, **over)
    schedule = swa_rewrite.Schedule.from_hf_config(hf.config)
    assert sorted(schedule.swa_layers) == [0, 2] and schedule.window == over["sliding_window"]
    tokens = [rng.randrange(V) for _ in range(PROMPT)]
    check_rewritten_against(hf, make_swa_reference(hf_model(variant, seed, **over)), tokens, rng, mha_prefill)


def test_tied_checkpoint_repeating_a_mis_shaped_lm_head_is_rejected(tmp_path, seed):
    hf_model("v3-yarn-alldim-tied", seed).save_pretrained(tmp_path)
    _rewrite_checkpoint(tmp_path, lambda t: t.update({"lm_head.weight": torch.zeros(7, 3)}))
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped \(1\): lm_head\.weight: \(7, 3\)"):
        from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------- apply(hf_model)
@pytest.mark.parametrize("variant", ["v3", "v2-greedy"])
def test_apply_converts_a_transformers_model(variant, seed, caplog):
    """``apply(hf_model, schedule)`` converts with ``from_hf`` first (logged) and equals rewriting the
    converted model; the inner ``*Model`` (no lm_head) is refused with a TypeError naming the class."""
    hf = hf_model(variant, seed, kv_lora_rank=128)   # the packed FP8 cache takes R % 128 == 0
    schedule = swa_rewrite.Schedule(window=5, swa_layers=[0, 2], num_layers=3)
    with caplog.at_level("INFO", logger="swa_rewrite.rewrite"):
        swa = swa_rewrite.apply(hf, schedule)
    assert isinstance(swa, swa_rewrite.SWAModule) and swa.swa_schedule == schedule
    assert any("converting" in r.getMessage() and type(hf).__name__ in r.getMessage() for r in caplog.records)
    tokens = [random.Random(seed).randrange(V) for _ in range(PROMPT)]
    expected = one_step_logits(swa_rewrite.apply(from_hf(hf), schedule), tokens)
    torch.testing.assert_close(one_step_logits(swa, tokens), expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match=f"{type(hf.model).__name__} has no lm_head"):
        swa_rewrite.apply(hf.model, schedule)
