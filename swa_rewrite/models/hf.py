"""Load Hugging Face DeepSeek-V2/V3 models and checkpoints into the bundled paged MLA model.

``from_hf(hf_model)`` converts a live ``transformers`` ``DeepseekV3ForCausalLM`` / ``DeepseekV2ForCausalLM``;
``from_pretrained(path)`` reads a checkpoint directory (``config.json`` + ``*.safetensors``, sharded or not)
without importing ``transformers``. Both map every tensor by name and raise ``CheckpointMismatchError``
listing each missing, unexpected or mis-shaped tensor; nothing is silently dropped except the multi-token
prediction layers (``model.layers.{num_hidden_layers + i}``, which the base decoder does not run; logged) and
stale ``rotary_emb.inv_freq`` buffers.

What is mapped and how it matches ``transformers`` (the parity tests check each point):

- Attention weights map one to one (``model.`` prefix dropped). ``attention_bias=True``, ``mlp_bias=True``
  and activations other than SiLU are rejected with a ``ValueError``.
- Rope: V3's ``rope_interleave`` is kept. transformers' interleaved rope writes its output de-interleaved
  (``[rotated evens | rotated odds]``), and so does ``models/rope.py``; V2 rotates the same adjacent pairs
  as complex numbers and writes them back interleaved. Queries and keys share the layout, so attention
  scores — the only thing the latent layout feeds — are identical; V2 loads with ``rope_interleave=True``.
- Yarn: ``factor`` (default ``max_position_embeddings / original_max_position_embeddings``), ``beta_*``
  and ``mscale_all_dim`` (softmax scale ``·mscale²``) as in DeepSeek. The cos/sin magnitude is stored as
  an explicit ``attention_factor`` computed the way transformers does: its own value when given, DeepSeek's
  ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are set (every released checkpoint),
  else ``mscale(factor)`` — DeepSeek's code would use ``mscale`` alone in that last case.
- MoE: V3 routes with sigmoid scores, ``e_score_correction_bias`` and group-limited top-k (``noaux_tc``);
  V2 with softmax scores and ``topk_method`` ``greedy`` / ``group_limited_greedy``. transformers' V2 router
  never normalises the top-k weights (DeepSeek-V2's code does when ``norm_topk_prob``, instead of scaling);
  released V2 checkpoints have ``norm_topk_prob=false``, and a config with ``true`` loads the transformers
  way, with a warning. Experts stored one tensor each (``mlp.experts.{e}.gate_proj.weight``: checkpoints,
  transformers 4) or stacked (``mlp.experts.gate_up_proj``: transformers 5 in memory) both load.
- Block-wise FP8 weights (``weight`` float8 + ``weight_scale_inv``, as in DeepSeek-V3's release) are
  dequantized on load: ``w = fp8 · scale_inv[i // b0, j // b1]`` with ``b = weight_block_size``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from .config import MLAConfig, yarn_mscale
from .mla import MLAModel

log = logging.getLogger(__name__)

__all__ = ["CheckpointMismatchError", "config_from_hf", "from_hf", "from_pretrained"]

# model_type → DeepSeek generation. Kimi-K2 ships the DeepSeek-V3 architecture under its own name.
_MODEL_TYPES = {"deepseek_v3": "v3", "kimi_k2": "v3", "deepseek_v2": "v2"}
_ARCHITECTURES = {"DeepseekV3ForCausalLM": "v3", "DeepseekV2ForCausalLM": "v2"}

# transformers' class defaults for the MoE keys, used when a config dict omits one.
_MOE_DEFAULTS = {
    "v3": dict(n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048,
               first_k_dense_replace=3, n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5),
    "v2": dict(n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=None, moe_intermediate_size=1407,
               first_k_dense_replace=0, n_group=None, topk_group=None, norm_topk_prob=False,
               routed_scaling_factor=1.0, topk_method="greedy"),
}


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model its config describes (names and shapes listed)."""


# ---------------------------------------------------------------------------------------------- config
def _generation(cfg: Mapping[str, Any]) -> str:
    kind = _MODEL_TYPES.get(cfg.get("model_type", ""))
    if kind is None:
        kinds = {_ARCHITECTURES[a] for a in cfg.get("architectures") or () if a in _ARCHITECTURES}
        kind = kinds.pop() if len(kinds) == 1 else None
    if kind is None:
        raise ValueError(f"not a DeepSeek-V2/V3 config: model_type={cfg.get('model_type')!r}, "
                         f"architectures={cfg.get('architectures')!r}; expected model_type in {sorted(_MODEL_TYPES)}")
    return kind


def _rope_from_hf(cfg: Mapping[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    """``rope_theta`` and the ``MLAConfig.rope_scaling`` dict from transformers 5 ``rope_parameters`` or the
    ``rope_theta`` + ``rope_scaling`` keys of older configs."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "yarn":
        raise ValueError(f"rope type {kind!r} is not supported (DeepSeek-V2/V3 use 'default' or 'yarn')")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported (expected 1.0)")
    if params.get("truncate", True) is False:
        raise ValueError("yarn with truncate=False is not supported (DeepSeek rounds the correction range)")
    max_pos = cfg["max_position_embeddings"]
    original = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or max_pos
    factor = float(params.get("factor") or max_pos / original)
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    scaling = dict(type="yarn", factor=factor, original_max_position_embeddings=int(original),
                   beta_fast=params.get("beta_fast") or 32, beta_slow=params.get("beta_slow") or 1,
                   mscale=mscale if mscale is not None else 1.0, mscale_all_dim=mscale_all_dim or 0.0,
                   attention_factor=float(attention_factor))
    return theta, scaling


def _moe_from_hf(cfg: Mapping[str, Any], kind: str) -> dict[str, Any]:
    get = lambda key: cfg.get(key, _MOE_DEFAULTS[kind].get(key))  # noqa: E731
    if not get("n_routed_experts"):
        return {}
    if kind == "v3":
        # transformers' V3 router is always sigmoid + noaux_tc, whatever the config says.
        for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if cfg.get(key, want) != want:
                log.warning("DeepSeek-V3 config has %s=%r; loading with %r as transformers does", key, cfg[key], want)
        scoring, method, norm = "sigmoid", "noaux_tc", bool(get("norm_topk_prob"))
    else:
        if cfg.get("scoring_func", "softmax") != "softmax":
            raise ValueError(f"DeepSeek-V2 scoring_func={cfg['scoring_func']!r} is not supported (expected 'softmax')")
        scoring, method = "softmax", get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"DeepSeek-V2 topk_method={method!r} is not supported "
                             f"(expected 'greedy' or 'group_limited_greedy')")
        norm = False
        if get("norm_topk_prob"):
            log.warning("DeepSeek-V2 config has norm_topk_prob=true; transformers ignores it (no normalisation, "
                        "scaling by routed_scaling_factor) and so does this loader")
    if get("num_experts_per_tok") is None:
        raise ValueError("config has n_routed_experts but no num_experts_per_tok")
    return dict(n_routed_experts=int(get("n_routed_experts")), n_shared_experts=int(get("n_shared_experts") or 0),
                num_experts_per_tok=int(get("num_experts_per_tok")),
                moe_intermediate_size=int(get("moe_intermediate_size")),
                first_k_dense_replace=int(get("first_k_dense_replace") or 0),
                moe_layer_freq=int(cfg.get("moe_layer_freq") or 1), n_group=int(get("n_group") or 1),
                topk_group=int(get("topk_group") or 1), topk_method=method, scoring_func=scoring,
                norm_topk_prob=norm, routed_scaling_factor=float(get("routed_scaling_factor")))


def config_from_hf(hf_config: Any) -> MLAConfig:
    """``MLAConfig`` of a DeepSeek-V2/V3 config: a ``transformers`` config object or a ``config.json`` dict.

    Raises ``ValueError`` for another architecture or a variant the bundled model does not implement
    (attention or MLP biases, non-SiLU activations, rope types other than default/yarn).
    """
    cfg = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    kind = _generation(cfg)
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, want) != want:
            raise ValueError(f"{key}={cfg[key]!r} is not supported (expected {want!r})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                           "v_head_dim", "max_position_embeddings") if cfg.get(k) is None]
    if missing:
        raise ValueError(f"config lacks {missing}")
    theta, rope_scaling = _rope_from_hf(cfg)
    return MLAConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"], rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        # V2 has no such key: it rotates adjacent pairs, which is the interleaved layout (module docstring).
        rope_interleave=bool(cfg.get("rope_interleave", True)) if kind == "v3" else True,
        rope_scaling=rope_scaling, max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), **_moe_from_hf(cfg, kind))


# --------------------------------------------------------------------------------------------- weights
class _TensorSource:
    """Named tensors of a checkpoint, read on demand (``get``), with block-wise FP8 dequantisation."""

    def __init__(self, names: Iterable[str], read: Callable[[str], torch.Tensor],
                 fp8_block: tuple[int, int] = (128, 128)):
        self.names = list(names)
        self._read, self._fp8_block = read, fp8_block
        self._scales = {n[: -len("_scale_inv")] for n in self.names if n.endswith(".weight_scale_inv")}

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        t = self._read(name)
        if name in self._scales:
            t = self._dequantize(name, t)
        elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointMismatchError(f"{name} is stored in {t.dtype} but the checkpoint has no "
                                          f"{name}_scale_inv to dequantise it with")
        return t.to(dtype)

    def orphan_scales(self) -> list[str]:
        """``*.weight_scale_inv`` tensors whose weight is not in the checkpoint."""
        names = set(self.names)
        return sorted(n + "_scale_inv" for n in self._scales if n not in names)

    def _dequantize(self, name: str, w: torch.Tensor) -> torch.Tensor:
        s = self._read(name + "_scale_inv").float()
        b0, b1 = self._fp8_block
        rows, cols = w.shape
        if tuple(s.shape) != (math.ceil(rows / b0), math.ceil(cols / b1)):
            raise CheckpointMismatchError(f"{name}_scale_inv has shape {tuple(s.shape)}, expected "
                                          f"{(math.ceil(rows / b0), math.ceil(cols / b1))} for a {tuple(w.shape)} "
                                          f"weight in {b0}x{b1} blocks")
        s = s.repeat_interleave(b0, dim=0)[:rows].repeat_interleave(b1, dim=1)[:, :cols]
        return w.float() * s


def _local_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


_EXPERT_STACK = re.compile(r"(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")


@torch.no_grad()
def _load_weights(model: MLAModel, source: _TensorSource, num_mtp_layers: int) -> None:
    """Copy every tensor of ``source`` into ``model`` (shapes checked, dtypes converted)."""
    config, L = model.config, model.config.num_hidden_layers
    available: dict[str, str] = {}
    skipped_mtp = 0
    for name in source.names:
        local = _local_name(name)
        layer = re.match(r"layers\.(\d+)\.", local)
        if local.endswith("rotary_emb.inv_freq") or local.endswith(".weight_scale_inv"):
            continue  # recomputed / read with its weight
        if layer and L <= int(layer[1]) < L + num_mtp_layers:
            skipped_mtp += 1
            continue
        available[local] = name
    if skipped_mtp:
        log.info("skipped %d tensors of the %d multi-token-prediction layer(s)", skipped_mtp, num_mtp_layers)

    used: set[str] = set()
    missing: list[str] = []
    misshaped: list[str] = []

    def fetch(local: str, shape: tuple[int, ...], dtype: torch.dtype) -> Optional[torch.Tensor]:
        if local not in available:
            missing.append(local)
            return None
        used.add(local)
        t = source.get(available[local], dtype)
        if tuple(t.shape) != shape:
            misshaped.append(f"{available[local]}: {tuple(t.shape)}, expected {shape}")
            return None
        return t

    for key, target in model.state_dict(keep_vars=True).items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            if key in available:    # tied to embed_tokens.weight; a checkpoint may repeat it (shape-checked)
                fetch(key, tuple(target.shape), target.dtype)
            continue
        stacked = _EXPERT_STACK.fullmatch(key)
        if stacked and key not in available:
            _load_expert_stack(stacked[1], stacked[2], target, fetch)
            continue
        t = fetch(key, tuple(target.shape), target.dtype)
        if t is not None:
            target.data.copy_(t)

    unexpected = sorted(available[k] for k in set(available) - used) + source.orphan_scales()
    if missing or unexpected or misshaped:
        parts = [f"{title} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                 for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                 if items]
        raise CheckpointMismatchError("checkpoint does not match the config's model; " + "; ".join(parts))


def _load_expert_stack(prefix: str, which: str, target: torch.Tensor, fetch) -> None:
    """Fill a stacked ``[E, 2I, H]`` / ``[E, H, I]`` expert tensor from one tensor per expert."""
    E = target.shape[0]
    if which == "gate_up_proj":
        I = target.shape[1] // 2
        for e in range(E):
            for half, proj in enumerate(("gate_proj", "up_proj")):
                t = fetch(f"{prefix}.{e}.{proj}.weight", (I, target.shape[2]), target.dtype)
                if t is not None:
                    target.data[e, half * I:(half + 1) * I].copy_(t)
    else:
        for e in range(E):
            t = fetch(f"{prefix}.{e}.down_proj.weight", tuple(target.shape[1:]), target.dtype)
            if t is not None:
                target.data[e].copy_(t)


def _empty_model(config: MLAConfig, dtype: torch.dtype, device: torch.device) -> MLAModel:
    """An ``MLAModel`` with uninitialised weights on ``device`` (no random init of weights about to be loaded)."""
    model = MLAModel(config, device="meta", dtype=dtype)
    model.to_empty(device=device)  # MLAModel recomputes its rope table after any move
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


# ---------------------------------------------------------------------------------------------- public
def from_hf(hf_model: torch.nn.Module, *, dtype: Optional[torch.dtype] = None,
            device: torch.device | str | None = None) -> MLAModel:
    """The bundled ``MLAModel`` with the weights of a ``transformers`` DeepSeek-V2/V3 causal LM.

    ``dtype`` and ``device`` default to those of ``hf_model``'s embedding. Weights are copied, not shared.
    Raises ``ValueError`` for unsupported configs and ``CheckpointMismatchError`` for tensors that do not fit.
    """
    config = config_from_hf(hf_model.config)
    if not hasattr(hf_model, "lm_head") and not config.tie_word_embeddings:
        raise TypeError(f"{type(hf_model).__name__} has no lm_head; pass the *ForCausalLM model")
    embed = hf_model.get_input_embeddings().weight
    model = _empty_model(config, dtype or embed.dtype, torch.device(device) if device is not None else embed.device)
    state = hf_model.state_dict()
    _load_weights(model, _TensorSource(state, state.__getitem__), _num_mtp_layers(hf_model.config.to_dict()))
    return model.eval()


def from_pretrained(path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None,
                    device: torch.device | str | None = None) -> MLAModel:
    """The bundled ``MLAModel`` from a local Hugging Face DeepSeek-V2/V3 checkpoint directory.

    Reads ``config.json`` and the ``*.safetensors`` files (``model.safetensors.index.json`` when sharded).
    ``dtype`` defaults to the config's ``dtype`` / ``torch_dtype`` (float32 if absent), ``device`` to CPU.
    Does not need ``transformers``; needs ``safetensors``.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {path!r}")
    with open(config_path) as f:
        cfg = json.load(f)
    config = config_from_hf(cfg)

    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            file_of = {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path!r}")
        file_of = {}
        for file in files:
            with safe_open(os.path.join(path, file), framework="pt") as f:
                file_of.update((name, os.path.join(path, file)) for name in f.keys())

    handles: dict[str, Any] = {}

    def read(name: str) -> torch.Tensor:
        file = file_of[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="pt", device="cpu")
        return handles[file].get_tensor(name)

    quant = cfg.get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size") or (128, 128))
    if dtype is None:
        name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        dtype = getattr(torch, name) if isinstance(getattr(torch, name, None), torch.dtype) else torch.float32
    model = _empty_model(config, dtype, torch.device(device) if device is not None else torch.device("cpu"))
    _load_weights(model, _TensorSource(file_of, read, block), _num_mtp_layers(cfg))
    return model.eval()


def _num_mtp_layers(cfg: Mapping[str, Any]) -> int:
    return int(cfg.get("num_nextn_predict_layers") or cfg.get("num_mtp_layers") or 0)
