"""models.dense.dense_forward: the model's own modules over whole sequences, against the float64 reference."""

import pytest
import torch

from mla_reference import dense_logits
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.models.dense import dense_forward

YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1, mscale=1.0,
            mscale_all_dim=1.0)


@pytest.mark.parametrize("config", [
    MLAConfig(),
    MLAConfig(q_lora_rank=None, rope_interleave=False, v_head_dim=24),
    MLAConfig(rope_scaling=YARN, num_attention_heads=3),
], ids=["tiny", "no-q-lora-neox-v24", "yarn-3-heads"])
def test_matches_the_float64_reference(config, seed):
    model = MLAModel(config, seed=seed % 1000)
    tokens = torch.randint(0, config.vocab_size, (3, 77))
    out = dense_forward(model, tokens)
    assert out.shape == (3, 77, config.vocab_size) and out.dtype == torch.float32
    for b in range(3):
        ref = dense_logits(model, tokens[b].tolist())
        assert (out[b].double() - ref).norm() / ref.norm() < 1e-5
    # One sequence alone gives the same logits: nothing crosses sequences.
    torch.testing.assert_close(dense_forward(model, tokens[1]), out[1], rtol=1e-5, atol=1e-5)


def test_padded_values_change_nothing(seed):
    model = MLAModel(MLAConfig(), seed=seed % 1000)
    tokens = torch.randint(0, 256, (2, 40))
    torch.testing.assert_close(dense_forward(model, tokens, pad_values=True),
                               dense_forward(model, tokens, pad_values=False), rtol=1e-5, atol=1e-5)


def test_every_parameter_gets_a_gradient():
    model = MLAModel(MLAConfig(), seed=0)
    tokens = torch.randint(0, 256, (2, 33))
    logits = dense_forward(model, tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_inputs():
    model = MLAModel(MLAConfig(max_position_embeddings=16), seed=0)
    with pytest.raises(ValueError, match="exceed max_position_embeddings=16"):
        dense_forward(model, torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[L\] or \[B, L\]"):
        dense_forward(model, torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="takes an MLAModel"):
        dense_forward(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long))


def test_bf16_autocast_as_training_runs_it(seed):
    """Under bf16 autocast (training on CUDA; CPU autocast here) the rope's float32 output is cast back so
    attention runs in bf16, values padded as for flash attention; logits within bf16 error, gradients flow."""
    model = MLAModel(MLAConfig(), seed=seed % 1000)
    tokens = torch.randint(0, 256, (2, 48))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dense_forward(model, tokens, pad_values=True)
    ref = dense_forward(model, tokens).detach()
    assert out.dtype == torch.bfloat16 and (out.float() - ref).norm() / ref.norm() < 3e-2
    out.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
