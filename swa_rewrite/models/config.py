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
    ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim`` and
    optionally ``attention_factor`` (the cos/sin magnitude, overriding DeepSeek's mscale ratio; the HF loader
    sets it to what transformers computes).

    Mixture of experts (DeepSeek-V2/V3): ``n_routed_experts=None`` (the default) means every layer has a
    dense MLP. Otherwise layer ``i`` is a MoE layer iff ``i >= first_k_dense_replace`` and
    ``i % moe_layer_freq == 0``; its block has ``n_routed_experts`` routed experts of width
    ``moe_intermediate_size`` of which each token uses ``num_experts_per_tok``, plus ``n_shared_experts``
    experts fused into one MLP of width ``n_shared_experts * moe_intermediate_size`` that every token uses.
    Routing: ``scoring_func`` ``"softmax"`` (V2) or ``"sigmoid"`` (V3) turns router logits into scores;
    ``topk_method`` ``"greedy"`` takes the top-k scores, ``"group_limited_greedy"`` (V2) first keeps the
    ``topk_group`` of ``n_group`` expert groups with the highest max score, ``"noaux_tc"`` (V3) adds the
    learned ``e_score_correction_bias`` to the scores for choosing only and keeps the groups with the
    highest sum of their top-2 biased scores. The chosen (unbiased) scores are normalised to sum to 1 when
    ``norm_topk_prob``, then multiplied by ``routed_scaling_factor``.
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
    # Mixture of experts (DeepSeek-V2/V3 naming); the defaults mean no MoE layer.
    n_routed_experts: Optional[int] = None
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

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
        if self.n_routed_experts is not None:
            self._check_moe()

    def _check_moe(self) -> None:
        E, k = self.n_routed_experts, self.num_experts_per_tok
        if E < 1:
            raise ValueError(f"MLAConfig.n_routed_experts must be None or >= 1, got {E}")
        if not 1 <= k <= E:
            raise ValueError(f"MLAConfig.num_experts_per_tok must be in [1, n_routed_experts={E}], got {k}")
        if self.moe_intermediate_size < 1:
            raise ValueError(f"MLAConfig.moe_intermediate_size must be >= 1 with experts, got {self.moe_intermediate_size}")
        if self.n_shared_experts < 0 or self.first_k_dense_replace < 0 or self.moe_layer_freq < 1:
            raise ValueError(f"MLAConfig: n_shared_experts >= 0, first_k_dense_replace >= 0 and moe_layer_freq >= 1 "
                             f"expected, got {self.n_shared_experts}, {self.first_k_dense_replace}, {self.moe_layer_freq}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"MLAConfig.scoring_func must be 'softmax' or 'sigmoid', got {self.scoring_func!r}")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"MLAConfig.topk_method must be 'greedy', 'group_limited_greedy' or 'noaux_tc', "
                             f"got {self.topk_method!r}")
        if self.topk_method != "greedy":
            G = self.n_group
            if G < 1 or E % G:
                raise ValueError(f"MLAConfig.n_group must divide n_routed_experts={E}, got {G}")
            if not 1 <= self.topk_group <= G:
                raise ValueError(f"MLAConfig.topk_group must be in [1, n_group={G}], got {self.topk_group}")
            if k > self.topk_group * (E // G):
                raise ValueError(f"MLAConfig.num_experts_per_tok={k} exceeds the {self.topk_group * (E // G)} "
                                 f"experts of the topk_group={self.topk_group} groups kept")
            if self.topk_method == "noaux_tc" and E // G < 2:
                raise ValueError(f"MLAConfig: noaux_tc scores each group by its top-2 experts, so groups need >= 2 "
                                 f"experts; got n_routed_experts={E}, n_group={G}")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has a mixture-of-experts block instead of the dense MLP."""
        return (self.n_routed_experts is not None and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    # Shorthands of docs/design.md §2.
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
