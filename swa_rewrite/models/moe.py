"""DeepSeek-V2/V3 mixture of experts: a top-k router, routed SwiGLU experts, always-on shared experts.

Parameter names and layouts follow ``transformers`` 5 (``mlp.gate.weight``,
``mlp.gate.e_score_correction_bias``, ``mlp.experts.gate_up_proj [E, 2I, H]``,
``mlp.experts.down_proj [E, H, I]``, ``mlp.shared_experts.*``, whose ``gate_proj`` and ``up_proj`` are one stacked
``gate_up_proj``: ``models.fused_weights``), so a loaded model's state dict maps one to one but for that stack;
checkpoints that store one tensor per expert are stacked by the loader (``models/hf.py``).

The routed-expert computation is one custom op, ``torch.ops.swa_rewrite.moe_experts`` (``ops/moe.py``),
so the decoder traces without data-dependent control flow. The router is plain static-shape PyTorch and
traces as is.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from ..ops.moe import moe_experts_reference  # noqa: F401  (re-exported; importing registers the op)
from .config import MLAConfig


# ------------------------------------------------------------------------------------------------- modules
class MoERouter(nn.Module):
    """Top-k expert choice of DeepSeek-V2 (softmax; greedy or group-limited) and V3 (sigmoid, noaux_tc).

    ``weight [E, H]`` and ``e_score_correction_bias [E]`` (``noaux_tc`` only) stay float32 whatever the model
    dtype, as in DeepSeek and transformers: routing is a discrete choice that low precision would change.
    """

    def __init__(self, config: MLAConfig):
        super().__init__()
        c = config
        self.num_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.scoring_func, self.topk_method = c.scoring_func, c.topk_method
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size, dtype=torch.float32))
        if c.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        # Let .to(device) / .to_empty() through but undo any float dtype cast (see class docstring).
        super()._apply(fn, recurse)
        self.weight.data = self.weight.data.float()
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` → ``topk_weights [T, k]`` float32, ``topk_ids [T, k]`` int64 (order unspecified)."""
        logits = F.linear(x.float(), self.weight)                                    # [T, E]
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.topk_method != "greedy":
            G = self.n_group
            grouped = choice.view(-1, G, self.num_experts // G)                      # [T, G, E/G]
            if self.topk_method == "noaux_tc":
                group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)             # [T, G]
            else:
                group_score = grouped.amax(dim=-1)
            keep_group = group_score.topk(self.topk_group, dim=-1).indices            # [T, topk_group]
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, keep_group, True)
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(choice.shape)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        topk_ids = choice.topk(self.top_k, dim=-1).indices                            # [T, k]
        topk_weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weights * self.routed_scaling_factor, topk_ids


class MoEExperts(nn.Module):
    """``n_routed_experts`` SwiGLU experts stored as stacked tensors (transformers 5 layout)."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))                  # [gate; up] per expert
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return torch.ops.swa_rewrite.moe_experts(x, self.gate_up_proj, self.down_proj, topk_ids, topk_weights)


class MoE(nn.Module):
    """MoE block of layer ``layer_idx``: routed experts plus ``shared_experts`` (one MLP, or ``None``).

    The shared experts are passed in (the decoder's own MLP class, ``n_shared_experts * moe_intermediate_size``
    wide) so this module does not depend on the decoder's definition.
    """

    def __init__(self, config: MLAConfig, layer_idx: int, shared_experts: Optional[nn.Module] = None):
        super().__init__()
        if not config.is_moe_layer(layer_idx):
            raise ValueError(f"layer {layer_idx} is not a MoE layer of this config")
        self.layer_idx = layer_idx
        self.gate = MoERouter(config)
        self.experts = MoEExperts(config)
        self.shared_experts = shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` → ``[T, H]``."""
        topk_weights, topk_ids = self.gate(x)
        out = self.experts(x, topk_ids, topk_weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
