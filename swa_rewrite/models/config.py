"""Model dimensions of a DeepSeek-V2/V3-style MLA decoder."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """All dimensions of the bundled MLA decoder.

    Names follow Hugging Face's ``DeepseekV3Config`` so a checkpoint's config maps one to one.
    ``rope_scaling`` is ``None`` or a yarn dict with keys ``factor``,
    ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: Optional[int] = 32
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 16
    v_head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    rope_scaling: Optional[dict[str, Any]] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MLAConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig.qk_rope_head_dim must be even and >= 2, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"MLAConfig.q_lora_rank must be None or >= 1, got {self.q_lora_rank}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "yarn"))
            if kind != "yarn":
                raise ValueError(f"MLAConfig.rope_scaling: only yarn is supported, got {kind!r}")
            # A dict field on a frozen dataclass would be mutable and unhashable: freeze a copy.
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))

    # Shorthands of SPEC §2.
    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def latent_dim(self) -> int:
        """``D = R + P``: width of one latent cache entry."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``(N + P)^-0.5``, times yarn ``mscale(factor, mscale_all_dim)^2`` when rope scaling is on."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.rope_scaling is not None:
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = yarn_mscale(self.rope_scaling["factor"], mscale_all_dim)
                scale = scale * m * m
        return scale

    def replace(self, **changes: Any) -> "MLAConfig":
        return dataclasses.replace(self, **changes)

    @staticmethod
    def named(name: str) -> "MLAConfig":
        """``"tiny"`` (CPU tests) or ``"v3-attn"`` (DeepSeek-V3 attention dims, 4 layers, GPU benchmarks)."""
        if name not in _NAMED:
            raise ValueError(f"unknown config name {name!r}; known: {sorted(_NAMED)}")
        return _NAMED[name]


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """DeepSeek's yarn attention-magnitude correction ``0.1·mscale·ln(factor) + 1`` (1 for factor ≤ 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


_NAMED = {
    "tiny": MLAConfig(),
    "v3-attn": MLAConfig(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        num_hidden_layers=4,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_scaling={
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        max_position_embeddings=163840,
    ),
}
