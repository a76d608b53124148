"""The bundled DeepSeek-V3-style decoder, running MLA in absorbed form against a paged latent cache.

One forward call processes one engine step: a ragged batch of ``T`` tokens described by one
``StepMetadata`` (docs/design.md §5). Every attention layer writes this step's latents ``[c_kv_norm | rope(k_pe)]`` into its cache and
then attends from the cache, so decode, fresh prefill, chunked prefill and prefix reuse are one path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx
from torch import nn

from .. import ops  # noqa: F401  (registers the torch.ops.swa_rewrite.* ops this model calls)
from ..ops.step_metadata import StepMetadata
from ..ops.kv_cache_spec import KVCacheSpec
from ..ops.checks import validated_step
from ..ops.step_check import FULL_KEY, checked_step_metadata
from .config import MLAConfig
from .fused import mla_rope_latent, silu_mul, step_rope
from .fused import rms_norm as fused_rms_norm
from .fused_weights import merge_parts
from .moe import MoE
from .rope import RopeRotation, reset_rope_buffer, rope_inv_freq, rope_inv_freq_bits


def select_rows(x: torch.Tensor, indices: Optional[torch.Tensor]) -> torch.Tensor:
    """``x[indices]`` along dim 0, or ``x`` when ``indices`` is None (a graph leaf, so traces keep the branch)."""
    return x if indices is None else x.index_select(0, indices)


def cache_device(device: Optional[torch.device | str], like: torch.Tensor) -> torch.device:
    """``device`` as a ``torch.device``, defaulting to the device of ``like`` (a graph leaf for the same reason)."""
    return torch.device(device) if device is not None else like.device


torch.fx.wrap("select_rows")
torch.fx.wrap("cache_device")
# Graph leaves: one launch each in eager CUDA steps, their op-by-op forms when traced (models/fused.py), in the
# original module and the rewritten one alike.
torch.fx.wrap("fused_rms_norm")
torch.fx.wrap("mla_rope_latent")
torch.fx.wrap("step_rope")
torch.fx.wrap("silu_mul")
# A graph leaf: the rewritten module keeps checking its inputs at run time (Dynamo traces through it).
torch.fx.wrap("checked_step_metadata")


def cache_group(config: MLAConfig, layer_idx: int) -> int:
    """The cache group of layer ``layer_idx`` (docs/design.md §12: layers with equal cache specs share one). The
    bundled model's layers all have one spec (``MLAModel.kv_cache_spec``), so one group; the rewrite sets each
    layer's group from its own specs (``ops.kv_cache_spec.schedule_cache_groups``)."""
    return 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """``weight · rms_norm(x)``: x · rsqrt(mean(x²) + eps) in float32, rounded to x's dtype, then the weight
        (as DeepSeek's reference). With ``residual``, of ``h = x + residual``, returning ``(normed, h)``: the
        decoder's residual add and the norm after it in one launch in eager CUDA steps (``models.fused``)."""
        return fused_rms_norm(x, self.weight, self.eps, residual)


class MLAAttention(nn.Module):
    """Multi-head latent attention of layer ``layer_idx`` (weights named as in DeepSeek-V3 checkpoints, but for
    ``fused_qkv_a_proj``: their ``q_a_proj`` and ``kv_a_proj_with_mqa`` stacked, ``models.fused_weights``)."""

    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.num_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        q_dim = self.num_heads * (self.nope_dim + self.rope_dim)
        kv_a = c.kv_lora_rank + self.rope_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, q_dim, bias=False)
            self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, kv_a, bias=False)
        else:
            # DeepSeek's q_a_proj and kv_a_proj_with_mqa read the same input: one GEMM (``fused_weights``)
            self.fused_qkv_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank + kv_a, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, c.hidden_size, bias=False)
        self.softmax_scale = c.softmax_scale
        self.cache_group = cache_group(c, layer_idx)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        merge_parts(self, state_dict, prefix)       # DeepSeek's q_a_proj / kv_a_proj_with_mqa load into their stack
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def a_projections(self, x: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """``(q_a, kv)``: DeepSeek's ``q_a_proj(x) [T, q_lora_rank]`` (None without a q LoRA) and
        ``kv_a_proj_with_mqa(x) [T, R + P]``, views of one GEMM's output where the layer has a q LoRA."""
        if self.config.q_lora_rank is None:
            return None, self.kv_a_proj_with_mqa(x)
        widths = [self.config.q_lora_rank, self.kv_lora_rank + self.rope_dim]
        parts = self.fused_qkv_a_proj(x).split_with_sizes(widths, -1)
        return parts[0], parts[1]

    def forward(self, x: torch.Tensor, rope: RopeRotation, cache: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """``x [T, hidden]`` → ``[T, hidden]``; writes this step's latents into ``cache`` (the rows
        ``meta.slot_mapping[self.cache_group]``), then attends from it."""
        T = x.shape[0]
        H, N, P, R = self.num_heads, self.nope_dim, self.rope_dim, self.kv_lora_rank
        q_a, kv = self.a_projections(x)
        q = self.q_proj(x) if q_a is None else self.q_b_proj(self.q_a_layernorm(q_a))
        q = q.view(T, H, N + P).split_with_sizes([N, P], -1)          # (a native method: no Python frame)
        q_nope, q_pe = q[0], q[1]
        # q_pe rotated [T, H, P] and the latent [T, D] = [kv_a_layernorm(c_kv) | rotate(k_pe)]: apply_rope's bits
        # (one launch in eager CUDA steps: models/fused.py).
        rotated = mla_rope_latent(q_pe, kv, rope.tokens, rope.heads, rope.index,
                                  self.kv_a_layernorm.weight, self.kv_a_layernorm.eps)
        q_pe, latent = rotated[0], rotated[1]

        # The layer and its cache group are constant arguments: the pass finds layers by the first and
        # sets the second in place, as it does the window (docs/design.md §8, §12). The attention core takes
        # the un-absorbed query and kv_b_proj's weight: it absorbs W_UK / W_UV itself (MQA mode: decode, short
        # chunks) or expands the chunk's cache rows into per-head keys and values (MHA mode: prefill chunks
        # the step metadata gives rows; SPEC §13).
        torch.ops.swa_rewrite.write_kv_cache(latent, cache, meta.slot_mapping, self.layer_idx, self.cache_group)
        o = torch.ops.swa_rewrite.mla_attention(
            q_nope, q_pe, self.kv_b_proj.weight, cache, meta.block_tables, meta.cu_seqlens_q,
            meta.seq_lens_encoder, meta.seq_lens_decoder, meta.batch_id_per_token, meta.mha_kv_slots,
            meta.mha_kv_cu, self.softmax_scale, P, self.layer_idx, self.cache_group)      # [T, H, V]
        return self.o_proj(o.reshape(T, H * self.v_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        # DeepSeek's gate_proj and up_proj, stacked [gate; up]: one GEMM (``fused_weights``)
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        merge_parts(self, state_dict, prefix)       # DeepSeek's gate_proj / up_proj load into their stack
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.silu(gate) * up of [gate | up] (one launch in eager CUDA steps: models/fused.py)
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):  # DeepSeek-V2/V3 MoE; its shared experts are one wider MLP
            width = config.n_shared_experts * config.moe_intermediate_size
            self.mlp = MoE(config, layer_idx, MLP(config.hidden_size, width) if width else None)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, rope: RopeRotation, cache: torch.Tensor, meta: StepMetadata,
                residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp_out, h)``: this layer's MLP output and the residual stream before it; the layer's output is their
        sum, which the next layer's input norm (or the model's final norm) adds with its norm, in one launch in eager
        CUDA steps (``models.fused``). ``x``: the previous layer's ``mlp_out`` and ``residual`` its ``h`` (the
        embedding and None for the first layer)."""
        if residual is None:
            h, normed = x, self.input_layernorm(x)
        else:
            normed, h = self.input_layernorm(x, residual)
        normed, h = self.post_attention_layernorm(self.self_attn(normed, rope, cache, meta), h)
        return self.mlp(normed), h


class MLAModel(nn.Module):
    """DeepSeek-V2/V3-style decoder (dense MLP or MoE per layer, see ``MLAConfig``) over a paged latent cache.

    ``forward`` processes one engine step; see its docstring. ``allocate_kv_cache`` builds the per-layer
    caches through ``torch.ops.swa_rewrite.allocate_kv_cache`` so graph passes can rewrite it.
    """

    def __init__(self, config: MLAConfig, *, device: torch.device | str | None = None,
                 dtype: Optional[torch.dtype] = None, seed: int = 0):
        super().__init__()
        self.config = config
        with torch.device(device if device is not None else "cpu"):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_magnitude = rope_inv_freq(config)[1]
        # float32 bits in an int32 buffer: exact under any dtype move (see ``rope_inv_freq_bits``).
        self.register_buffer("rope_inv_freq_bits", rope_inv_freq_bits(config, self.lm_head.weight.device),
                             persistent=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters(seed)
        if dtype is not None:
            self.to(dtype)

    @property
    def rope_inv_freq(self) -> torch.Tensor:
        """``[P/2]`` float32 inverse rope frequencies (a view of the int32 bits buffer)."""
        return self.rope_inv_freq_bits.view(torch.float32)

    def _apply(self, fn, recurse=True):
        # Recompute the rope table after any move: ``to_empty`` (meta -> device) leaves buffers undefined.
        module = super()._apply(fn, recurse)
        reset_rope_buffer(self, self.config)
        return module

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Deterministic init from ``seed``: linears ``N(0, 1/fan_in)``, embeddings ``N(0, 1)``, norms ``1 ± 0.1``."""
        device = self.lm_head.weight.device
        if device.type == "meta":
            return
        g = torch.Generator(device=device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, device=device))
            elif name == "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g, device=device))
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * p.shape[-1] ** -0.5)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def cache_groups(self) -> tuple[int, ...]:
        """The cache group of each layer: the row of the step's block tables and slots it uses (one group:
        every layer has the same spec, ``kv_cache_spec``)."""
        return tuple(cache_group(self.config, i) for i in range(self.num_layers))

    def kv_cache_spec(self) -> tuple[KVCacheSpec, ...]:
        """One ``KVCacheSpec`` per layer (docs/design.md §12): every layer full, ``R + P`` entries of the model
        dtype per token, as ``allocate_kv_cache`` allocates them."""
        dtype = self.lm_head.weight.dtype
        spec = KVCacheSpec.full(self.config.kv_lora_rank, self.config.qk_rope_head_dim, dtype)
        return (spec,) * self.num_layers

    def allocate_kv_cache(self, num_blocks: int, page_size: int,
                          device: torch.device | str | None = None) -> list[torch.Tensor]:
        """One latent cache ``[num_blocks, page_size, R + P]`` of the model dtype per layer."""
        device = cache_device(device, self.lm_head.weight)
        dtype = self.lm_head.weight.dtype
        R, P = self.config.kv_lora_rank, self.config.qk_rope_head_dim
        return [torch.ops.swa_rewrite.allocate_kv_cache(num_blocks, page_size, R, P, dtype, device, i)
                for i in range(self.num_layers)]

    def forward(self, input_ids: torch.Tensor, kv_caches: list[torch.Tensor], meta: StepMetadata,
                logits_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run one step.

        Args:
            input_ids: ``[T]`` int64 tokens of the step, requests concatenated.
            kv_caches: one cache per layer, as returned by ``allocate_kv_cache``; written in place.
            meta: the step's ``StepMetadata`` (positions, per-request metadata, ``block_tables [G, B, nb]``,
                ``slot_mapping [G, T]``; see ``swa_rewrite.runtime.StepBatch.build``).
            logits_indices: optional ``[n]`` token rows to compute logits for (default: all).
        Returns:
            logits ``[T or n, vocab]`` in the model dtype.
        """
        # Checked mode: the whole step is validated here, once, per cache group and window (every layer of this
        # model is full; the rewrite gives the check its sliding layers' windows), before any layer writes its
        # cache. The layers run in the step's scope, where ops given these very metadata tensors skip repeating
        # the data checks (ops.checks.validated_step; a no-op when traced, the rewritten module opens its own).
        with validated_step():
            meta = checked_step_metadata(meta, kv_caches, self.cache_groups, (FULL_KEY,) * self.num_layers)
            # Not the property: fx would freeze its value as a float constant, which dtype moves round again.
            inv_freq = self.rope_inv_freq_bits.view(torch.float32)
            # once per step, for every layer (one launch in eager CUDA inference: models/fused.py)
            rope = step_rope(inv_freq, self.rope_magnitude, meta.positions, self.lm_head.weight.dtype,
                             self.config.rope_interleave)
            x = self.embed_tokens(input_ids)
            residual = None
            for i, layer in enumerate(self.layers):
                # each layer's residual add is the next norm's (DecoderLayer.forward)
                x, residual = layer(x, rope, kv_caches[i], meta, residual)
            x = self.norm(x) if residual is None else self.norm(x, residual)[0]
            return self.lm_head(select_rows(x, logits_indices))
