"""The reference model: its config (SPEC §14 sizes, HF DeepSeek-V3 form) and, on the shipped checkpoint, the paged
engine's logits equal to the dense causal forward training used (and to the float64 reference)."""

import json

import pytest
import torch

from mla_reference import dense_logits
from swa_rewrite.models import MLAModel, from_pretrained
from swa_rewrite.models.dense import dense_forward
from swa_rewrite.models.hf import config_from_hf
from swa_rewrite.models.saving import config_to_hf
from swa_rewrite.reference import CHECKPOINT_DIR, REFERENCE_CONFIG, VOCAB_SIZE, load_reference_model
from swa_rewrite.reference.corpus import load_corpus
from swa_rewrite.runtime import Engine

SHIPPED = (CHECKPOINT_DIR / "model.safetensors").is_file()
needs_checkpoint = pytest.mark.skipif(not SHIPPED, reason="no trained checkpoint in this checkout yet "
                                                          "(python -m swa_rewrite.reference.train writes it)")


def test_config_is_spec_sized_and_round_trips_through_hf_form():
    c = REFERENCE_CONFIG
    params = sum(p.numel() for p in MLAModel(c, device="meta").parameters())
    assert params <= 8_000_000 and params * 2 <= 16 * 2**20
    assert (c.kv_lora_rank, c.qk_rope_head_dim, c.vocab_size, c.max_position_embeddings) == (128, 64, VOCAB_SIZE, 4096)
    assert 320 <= c.hidden_size <= 384 and c.n_routed_experts is None and VOCAB_SIZE % 64 == 0
    hf = config_to_hf(c, torch.bfloat16)
    assert hf["model_type"] == "deepseek_v3" and hf["first_k_dense_replace"] == c.num_hidden_layers
    assert config_from_hf(hf) == c


def heldout_tokens(n: int) -> list[int]:
    return load_corpus().stream("heldout")[1000:1000 + n].long().tolist()


def assert_engine_matches_dense(model, tokens, rel_dense, rel_float64=None):
    """``Engine.logits`` (paged ops, chunked prefill over several pages) against ``dense_forward`` and, when
    ``rel_float64`` is given, the float64 reference of tests/mla_reference.py."""
    engine = Engine(model, num_blocks=64, page_size=16, max_tokens_per_step=96)
    paged = engine.logits(tokens).double()
    with torch.no_grad():
        dense = dense_forward(model, torch.tensor(tokens)).double()
    assert (paged - dense).norm() / dense.norm() < rel_dense
    if rel_float64 is not None:
        ref = dense_logits(model, tokens)
        assert (paged - ref).norm() / ref.norm() < rel_float64
        assert (dense - ref).norm() / ref.norm() < rel_float64


@needs_checkpoint
def test_shipped_checkpoint_loads_as_spec_says():
    size = (CHECKPOINT_DIR / "model.safetensors").stat().st_size
    assert size <= 16 * 2**20
    cfg = json.loads((CHECKPOINT_DIR / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["dtype"] == "bfloat16"
    model = from_pretrained(CHECKPOINT_DIR)
    assert model.config == REFERENCE_CONFIG and model.lm_head.weight.dtype == torch.bfloat16
    log = json.loads((CHECKPOINT_DIR / "train_log.json").read_text())
    assert log["config"]["hidden_size"] == REFERENCE_CONFIG.hidden_size and log["curves"]


@needs_checkpoint
def test_shipped_checkpoint_paged_engine_equals_dense_forward_float32():
    model = load_reference_model(dtype=torch.float32)
    assert_engine_matches_dense(model, heldout_tokens(300), rel_dense=1e-5, rel_float64=1e-5)


@needs_checkpoint
def test_shipped_checkpoint_paged_engine_equals_dense_forward_bf16():
    model = load_reference_model(dtype=torch.bfloat16)
    assert_engine_matches_dense(model, heldout_tokens(200), rel_dense=1e-2)


@needs_checkpoint
def test_shipped_checkpoint_predicts_held_out_text():
    """Trained, not random: held-out bytes cost far less than the uniform log(256) nats, and late positions
    (more context) cost less than early ones."""
    model = load_reference_model(dtype=torch.float32)
    tokens = torch.tensor(heldout_tokens(1025))
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(dense_forward(model, tokens[:-1]), tokens[1:], reduction="none")
    assert losses.mean() < 2.5
    assert losses[512:].mean() < losses[:128].mean()
