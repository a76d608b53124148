"""Load Hugging Face DeepSeek-V2/V3 models and checkpoints into the bundled paged MLA model.

``from_hf(hf_model)`` converts a live ``transformers`` ``DeepseekV3ForCausalLM`` / ``DeepseekV2ForCausalLM``;
``from_pretrained(path)`` reads a checkpoint directory (``config.json`` + ``*.safetensors``, sharded or not)
without importing ``transformers``. Both map every tensor by name and raise ``CheckpointMismatchError``
listing each missing, unexpected or mis-shaped tensor; nothing is silently dropped except the multi-token
prediction layers (``model.layers.{num_hidden_layers + i}``, which the base decoder does not run; logged) and
stale ``rotary_emb.inv_freq`` buffers. An MTP layer is told by its own tensors (``embed_tokens``, ``enorm``,
``hnorm``, ``eh_proj``, ``shared_head``), not by its index alone: a layer past ``num_hidden_layers`` without
them is a decoder layer the config does not cover, and loading fails (transformers writes
``num_nextn_predict_layers: 1`` into every DeepSeek-V3 config, so the index alone would drop a real layer).

Which files are read, as transformers decides: with ``model.safetensors.index.json``, exactly the shards its
``weight_map`` names (other ``*.safetensors`` files are ignored, logged); without it, the folder must hold
exactly one ``*.safetensors`` file. Every shard is opened (its header checked) before any weight is read;
an unreadable or malformed file raises ``ValueError`` naming it, a missing one ``CheckpointNotFoundError``.

What is mapped and how it matches ``transformers`` (the parity tests check each point):

- Attention weights map one to one (``model.`` prefix dropped), but for ``q_a_proj`` and ``kv_a_proj_with_mqa``
  (and an MLP's ``gate_proj`` and ``up_proj``), which fill one stacked weight each (``models.fused_weights``).
  ``attention_bias=True``, ``mlp_bias=True`` and activations other than SiLU are rejected with a ``ValueError``.
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

import contextlib
import json
import logging
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from ..timing import progress
from .config import MLAConfig, yarn_mscale
from .fused_weights import parts_of
from .mla import MLAModel
from .saving import SAVED_KEY, saved_schedule

log = logging.getLogger(__name__)

__all__ = ["CheckpointMismatchError", "CheckpointNotFoundError", "config_from_hf", "config_from_pretrained",
           "from_hf", "from_pretrained", "is_hf_deepseek"]

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


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """A file or folder the checkpoint needs is absent. Both a ``FileNotFoundError`` (what Python code
    expects of a missing file) and a ``ValueError`` (the project's type for bad user input)."""


# Names a dtype may be given by (``torch.<name>`` too), and the dtypes the bundled model runs in.
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}
_MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

# Tensors only DeepSeek-V3's multi-token-prediction layer has (``model.layers.{L}.<part>...``).
_MTP_PARTS = ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head")


# ---------------------------------------------------------------------------------------------- config
def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The model dtype named by ``dtype``: a ``torch.dtype`` or a name such as ``"bfloat16"``, ``"bf16"``,
    ``"fp16"``, ``"float32"``, ``"torch.bfloat16"``. Raises ``TypeError`` for another type and ``ValueError``
    for an unknown name or a dtype the model cannot run in (integers, FP8)."""
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not a known dtype name; expected one of {sorted(_DTYPES)} "
                             f"(optionally prefixed 'torch.') or a torch.dtype")
        return _DTYPES[key]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a dtype name such as 'bfloat16', got {dtype!r} "
                        f"({type(dtype).__name__})")
    if dtype not in _MODEL_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported for model weights; expected one of "
                         f"{', '.join(str(d) for d in _MODEL_DTYPES)}")
    return dtype


def _config_dtype(cfg: Mapping[str, Any]) -> torch.dtype:
    """The checkpoint's own dtype (``dtype`` / ``torch_dtype``), float32 when absent or not a model dtype
    (DeepSeek-V3's FP8 release names ``bfloat16``; an FP8 name would make an unusable model)."""
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if name is None:
        return torch.float32
    try:
        return _resolve_dtype(name)
    except (TypeError, ValueError):
        log.warning("config.json has dtype %r, which is not a model dtype; loading in float32", name)
        return torch.float32


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
    if isinstance(hf_config, Mapping):
        cfg = dict(hf_config)
    elif callable(getattr(hf_config, "to_dict", None)):
        cfg = hf_config.to_dict()
    else:
        raise TypeError(f"expected a transformers config or a config dict, got {type(hf_config).__name__}")
    kind = _generation(cfg)
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, want) != want:
            raise ValueError(f"{key}={cfg[key]!r} is not supported (expected {want!r})")
    dims = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
    missing = [k for k in dims if cfg.get(k) is None]
    if missing:
        raise ValueError(f"config lacks {missing}")
    # A string or float here would fail deep inside the model with an unrelated message.
    for key in dims + ("q_lora_rank",):
        if cfg.get(key) is not None and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool)):
            raise ValueError(f"config {key}={cfg[key]!r} must be an integer")
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
    config = model.config
    available: dict[str, str] = {}
    for name in source.names:
        local = _local_name(name)
        if local.endswith("rotary_emb.inv_freq") or local.endswith(".weight_scale_inv"):
            continue  # recomputed / read with its weight
        available[local] = name
    _drop_mtp_layers(available, config.num_hidden_layers, num_mtp_layers)

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

    targets = model.state_dict(keep_vars=True)
    # A real checkpoint takes minutes to read: a bar on stderr (only on a terminal) shows it moving.
    for key, target in progress(targets.items(), total=len(targets), desc="loading weights"):
        if key == "lm_head.weight" and config.tie_word_embeddings:
            if key in available:    # tied to embed_tokens.weight; a checkpoint may repeat it (shape-checked)
                fetch(key, tuple(target.shape), target.dtype)
            continue
        stacked = _EXPERT_STACK.fullmatch(key)
        if stacked and key not in available:
            _load_expert_stack(stacked[1], stacked[2], target, fetch)
            continue
        parts = parts_of(key, target.shape[0], config)
        if parts and key not in available:          # one weight of DeepSeek's two (models.fused_weights)
            row = 0
            for name, rows in parts:
                t = fetch(name, (rows, *target.shape[1:]), target.dtype)
                if t is not None:
                    target.data[row:row + rows].copy_(t)
                row += rows
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


def _drop_mtp_layers(available: dict[str, str], L: int, num_mtp_layers: int) -> None:
    """Remove the multi-token-prediction layers ``L … L + num_mtp_layers - 1`` from ``available``
    (local name → checkpoint name). A layer ``>= L`` is MTP only if it carries one of ``_MTP_PARTS``;
    one without is a decoder layer ``config.num_hidden_layers`` leaves out: ``CheckpointMismatchError``.
    MTP layers past ``L + num_mtp_layers`` stay, to be reported as unexpected."""
    beyond: dict[int, list[str]] = {}
    for local in available:
        layer = re.match(r"layers\.(\d+)\.", local)
        if layer and int(layer[1]) >= L:
            beyond.setdefault(int(layer[1]), []).append(local)
    is_mtp = {i: any(n.split(".")[2] in _MTP_PARTS for n in names) for i, names in beyond.items()}
    decoder = sorted(i for i, mtp in is_mtp.items() if not mtp)
    if decoder:
        raise CheckpointMismatchError(
            f"the checkpoint has more layers than config.num_hidden_layers={L}: layer(s) {decoder} have no "
            f"multi-token-prediction tensors ({', '.join(_MTP_PARTS)}), so they are decoder layers the config "
            f"does not cover; set num_hidden_layers to the checkpoint's layer count")
    skipped = [local for i in sorted(beyond) if i < L + num_mtp_layers for local in beyond[i]]
    for local in skipped:
        del available[local]
    if skipped:
        log.info("skipped %d tensors of the %d multi-token-prediction layer(s)", len(skipped), num_mtp_layers)


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
def is_hf_deepseek(model: Any) -> bool:
    """Whether ``model`` is a ``transformers``-style DeepSeek-V2/V3 module (``*ForCausalLM`` or its inner
    ``*Model``): not one of ours, with a ``config`` whose ``model_type`` is a DeepSeek one. Decided from the
    config, so remote-code variants (Kimi-K2) count too, and ``transformers`` is never imported."""
    config = getattr(model, "config", None)
    return (isinstance(model, torch.nn.Module) and not isinstance(model, MLAModel)
            and not isinstance(config, MLAConfig) and getattr(config, "model_type", None) in _MODEL_TYPES)


def from_hf(hf_model: torch.nn.Module, *, dtype: torch.dtype | str | None = None,
            device: torch.device | str | None = None) -> MLAModel:
    """The bundled ``MLAModel`` with the weights of a ``transformers`` DeepSeek-V2/V3 causal LM.

    ``dtype`` (a ``torch.dtype`` or a name such as ``"bf16"``) and ``device`` default to those of ``hf_model``'s
    embedding. Weights are copied, not shared.
    Raises ``ValueError`` for unsupported configs and ``CheckpointMismatchError`` for tensors that do not fit.
    """
    config = config_from_hf(hf_model.config)
    if not hasattr(hf_model, "lm_head") and not config.tie_word_embeddings:
        raise TypeError(f"{type(hf_model).__name__} has no lm_head; pass the *ForCausalLM model")
    embed = hf_model.get_input_embeddings().weight
    dtype = _resolve_dtype(dtype) if dtype is not None else embed.dtype
    model = _empty_model(config, dtype, torch.device(device) if device is not None else embed.device)
    state = hf_model.state_dict()
    _load_weights(model, _TensorSource(state, state.__getitem__), _num_mtp_layers(hf_model.config.to_dict()))
    return model.eval()


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> torch.nn.Module:
    """The bundled ``MLAModel`` from a local Hugging Face DeepSeek-V2/V3 checkpoint directory; the rewritten
    ``SWAModule`` when the folder is one ``save_pretrained`` wrote from a rewritten model (its ``config.json``
    carries the schedule under the ``swa_rewrite`` key, see ``models/saving.py``).

    Reads ``config.json`` and the ``*.safetensors`` files: the shards ``model.safetensors.index.json`` names
    when there is one, else the folder's only ``*.safetensors`` file (module docstring). ``dtype`` — a
    ``torch.dtype`` or a name such as ``"bfloat16"`` / ``"bf16"`` — defaults to the config's ``dtype`` /
    ``torch_dtype`` (float32 if absent), ``device`` to CPU. Does not need ``transformers``; needs
    ``safetensors``. Raises ``CheckpointNotFoundError`` for a missing folder or file, ``ValueError`` naming
    the file for one that cannot be read, and ``CheckpointMismatchError`` for tensors that do not fit.
    """
    path = os.fspath(path)
    cfg = _read_config(path)
    config = config_from_hf(cfg)
    schedule = saved_schedule(cfg, os.path.join(path, "config.json"))   # checked before any weight is read
    dtype = _resolve_dtype(dtype) if dtype is not None else _config_dtype(cfg)
    block = _fp8_block_size(cfg)
    num_mtp_layers = _num_mtp_layers(cfg)
    with contextlib.ExitStack() as files:      # every shard handle is closed, whatever happens
        shard_of = _open_shards(path, files)   # all files checked before the model's memory is taken
        model = _empty_model(config, dtype, torch.device(device) if device is not None else torch.device("cpu"))

        def read(name: str) -> torch.Tensor:
            file, handle = shard_of[name]
            try:
                return handle.get_tensor(name)
            except Exception as e:  # safetensors raises its own SafetensorError, not an OSError/ValueError
                raise ValueError(f"{file}: cannot read tensor {name!r}: {e}") from None

        _load_weights(model, _TensorSource(shard_of, read, block), num_mtp_layers)
    model.eval()
    if schedule is None:
        return model
    from ..rewrite import apply   # a folder save_pretrained wrote from a rewritten model: rewrite it again

    log.info("%s carries %s (%s key): returning the rewritten model", path, schedule, SAVED_KEY)
    return apply(model, schedule)


def config_from_pretrained(path: str | os.PathLike) -> MLAConfig:
    """``MLAConfig`` of a checkpoint directory, from its ``config.json`` alone (no weight is read)."""
    return config_from_hf(_read_config(os.fspath(path)))


# ------------------------------------------------------------------------------------------------ files
_INDEX = "model.safetensors.index.json"


def _read_json(file: str, what: str) -> Any:
    """The parsed JSON of ``file``; ``CheckpointNotFoundError`` if absent, ``ValueError`` naming it if not JSON."""
    if not os.path.isfile(file):
        raise CheckpointNotFoundError(f"no {what} at {file!r}")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a valid JSON {what}: {e}") from None


def _read_config(path: str) -> dict[str, Any]:
    """``config.json`` of the checkpoint folder ``path`` as a dict."""
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"checkpoint directory {path!r} does not exist or is not a directory")
    file = os.path.join(path, "config.json")
    cfg = _read_json(file, "config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object of config keys, got a JSON {type(cfg).__name__}")
    return cfg


def _shard_files(path: str) -> tuple[dict[str, str], list[str]]:
    """``(tensor name → shard file, shard files)`` of the checkpoint folder; ``{}`` for the names when the
    folder has no index (the only shard's own keys are the names)."""
    present = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    index = os.path.join(path, _INDEX)
    if not os.path.isfile(index):
        if len(present) != 1:
            problem = "no *.safetensors file" if not present else f"{len(present)} *.safetensors files {present}"
            error = CheckpointNotFoundError if not present else ValueError
            raise error(f"{path}: {problem} and no {_INDEX}; expected exactly one *.safetensors file, or an "
                        f"index naming the shards to read")
        return {}, [os.path.join(path, present[0])]
    weight_map = _read_json(index, _INDEX)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: expected a JSON object with a 'weight_map' object of tensor name -> shard file")
    named = sorted(set(weight_map.values()))
    ignored = sorted(set(present) - set(named))
    if ignored:
        log.info("%s: ignoring %s, which the index does not name", path, ignored)
    missing = [f for f in named if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CheckpointNotFoundError(f"{index} names shard(s) that are not in {path!r}: {missing}")
    return {n: os.path.join(path, f) for n, f in weight_map.items()}, [os.path.join(path, f) for f in named]


def _open_shards(path: str, files: contextlib.ExitStack) -> dict[str, tuple[str, Any]]:
    """Open every shard of the checkpoint (closed with ``files``): tensor name → ``(file, safe_open handle)``.
    Each shard's header is read here, so a corrupt file or an index naming a tensor its shard lacks fails
    before any weight is copied."""
    from safetensors import safe_open

    file_of, shards = _shard_files(path)
    handles = {}
    for file in shards:
        try:
            handles[file] = files.enter_context(safe_open(file, framework="pt", device="cpu"))
        except Exception as e:  # SafetensorError (a bad header, a truncated file) or an OSError
            raise ValueError(f"{file}: not a readable safetensors file: {e}") from None
    if not file_of:                          # no index: the one shard's tensors
        (file,) = shards
        return {name: (file, handles[file]) for name in handles[file].keys()}
    keys = {file: set(h.keys()) for file, h in handles.items()}
    absent = [f"{name} ({os.path.basename(file)})" for name, file in file_of.items() if name not in keys[file]]
    if absent:
        raise ValueError(f"{os.path.join(path, _INDEX)} maps {len(absent)} tensor(s) to shards that do not hold "
                         f"them: {', '.join(absent[:8])}{' ...' if len(absent) > 8 else ''}")
    return {name: (file, handles[file]) for name, file in file_of.items()}


def _fp8_block_size(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` (DeepSeek-V3's FP8 release: ``[128, 128]``)."""
    quant = cfg.get("quantization_config") or {}
    block = quant.get("weight_block_size") if isinstance(quant, dict) else None
    block = (128, 128) if block is None else block
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"config quantization_config.weight_block_size={block!r}: expected two positive integers")
    return tuple(block)


def _num_mtp_layers(cfg: Mapping[str, Any]) -> int:
    value = cfg.get("num_nextn_predict_layers") or cfg.get("num_mtp_layers") or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"config num_nextn_predict_layers={value!r}: expected a non-negative integer")
    return value
