"""The reference model: its configuration, the shipped checkpoint, and loading it.

A DeepSeek-V3-style MLA decoder small enough to ship (SPEC §14): 6 layers, hidden 384, 6 heads with
``qk_nope 64 | rope 64`` and ``v 64``, ``q_lora_rank 192``, ``kv_lora_rank R = 128``, dense SiLU MLPs of
width 640, byte vocabulary (``tokens.VOCAB_SIZE``), 4096 positions: 7.91M parameters, one bf16 safetensors
file of 15.1 MiB. ``reference.train`` trains it on the pinned corpus (``reference.corpus``); the checkpoint it
wrote ships in ``checkpoint/`` (``config.json`` in Hugging Face DeepSeek-V3 form, ``model.safetensors``,
``train_log.json`` with the loss curves), loaded by ``models.from_pretrained`` like any DeepSeek checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ..models.config import MLAConfig
from .tokens import VOCAB_SIZE

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"

REFERENCE_CONFIG = MLAConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=384,
    intermediate_size=640,
    num_hidden_layers=6,
    num_attention_heads=6,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
    rope_theta=10000.0,
    max_position_embeddings=4096,
)

__all__ = ["CHECKPOINT_DIR", "REFERENCE_CONFIG", "load_reference_model"]


def load_reference_model(*, dtype: torch.dtype | str = torch.float32, device: torch.device | str | None = None,
                         path: Optional[str | os.PathLike] = None) -> torch.nn.Module:
    """The trained reference ``MLAModel`` from ``path`` (default: the shipped ``checkpoint/``), in ``dtype``
    (float32 by default: the checkpoint's bf16 weights widen exactly) on ``device`` (default CPU), eval mode."""
    from ..models.hf import from_pretrained

    return from_pretrained(path if path is not None else CHECKPOINT_DIR, dtype=dtype, device=device)
