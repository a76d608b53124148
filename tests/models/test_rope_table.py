"""The rope table stays exact under every dtype and device move (issue 11: a float32 buffer rounded to bf16
by ``.to(dtype)`` put rotary angles radians off at long positions)."""

import math

import pytest
import torch

from swa_rewrite import Schedule, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.models.rope import rope_cos_sin, rope_inv_freq

# v3-attn's yarn rope on the tiny model's other dims.
YARN = MLAConfig.named("tiny").replace(qk_rope_head_dim=64, rope_scaling=dict(MLAConfig.named("v3-attn").rope_scaling),
                                       max_position_embeddings=163840)


def exact_inv_freq(config: MLAConfig) -> torch.Tensor:
    """float64 inverse frequencies from the config alone, rounded once to float32."""
    return rope_inv_freq(config)[0]


def assert_exact(module: torch.nn.Module, config: MLAConfig) -> None:
    table = module.rope_inv_freq_bits.view(torch.float32)
    assert table.dtype == torch.float32
    assert torch.equal(table.cpu(), exact_inv_freq(config)), "rope table is not the config's float32 frequencies"


@pytest.mark.parametrize("move", ["ctor-bf16", "to-bf16", "half", "bf16-then-float", "double"])
def test_model_rope_table_survives_dtype_moves(move):
    if move == "ctor-bf16":
        model = MLAModel(YARN, dtype=torch.bfloat16)
    else:
        model = MLAModel(YARN)
        model = {"to-bf16": lambda m: m.to(torch.bfloat16), "half": lambda m: m.half(),
                 "bf16-then-float": lambda m: m.to(torch.bfloat16).float(),
                 "double": lambda m: m.double()}[move](model)
    assert_exact(model, YARN)
    assert torch.equal(model.rope_inv_freq, exact_inv_freq(YARN))


def test_rewritten_module_rope_table_survives_moves():
    swa = apply(MLAModel(YARN), Schedule(8, [0], YARN.num_hidden_layers))
    assert_exact(swa.to(torch.bfloat16), YARN)
    assert_exact(swa.half(), YARN)


def test_meta_model_to_empty_rebuilds_the_rope_table():
    for module in (MLAModel(YARN, device="meta", dtype=torch.bfloat16),
                   apply(MLAModel(YARN, device="meta"), Schedule(8, [1], YARN.num_hidden_layers))):
        module.to_empty(device="cpu")
        assert_exact(module, YARN)


def test_rotary_angles_at_long_positions_match_float64():
    """cos/sin of a bf16 model at 4K and 128K are those of float64 angles (up to float32 angle rounding)."""
    model = MLAModel(YARN, dtype=torch.bfloat16)
    positions = torch.tensor([4096, 131071])
    cos, sin = rope_cos_sin(model.rope_inv_freq, 1.0, positions, torch.float32)
    freq64 = exact_inv_freq(YARN).double()
    angles = positions.double()[:, None] * freq64[None, :]
    # float32 positions x float32 frequencies: one rounding of the product, |err| <= angle * 2^-23.
    tol = float(angles.abs().max()) * 2.0**-22
    assert (cos.double() - angles.cos()).abs().max() <= tol
    assert (sin.double() - angles.sin()).abs().max() <= tol
    assert tol < 0.05 and not math.isnan(tol)
