"""Save a (rewritten) model as a Hugging Face DeepSeek-V2/V3 checkpoint folder that keeps its schedule.

``save_pretrained(model, path)`` writes ``model.safetensors`` with the weights under their DeepSeek names
(``model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight``, one tensor per routed expert), so tools that read
DeepSeek checkpoints read them, and a ``config.json`` that ``transformers`` and ``models.from_pretrained``
both understand. A rewritten model (``SWAModule``) adds its schedule under a key of its own::

    "swa_rewrite": {"version": 1, "schedule": {"window": 128, "swa_layers": [0, 2], "num_layers": 4}}

plus ``layer_types`` / ``sliding_window``, the Hugging Face spelling of the same schedule, for tools that
know sliding windows. ``models.from_pretrained(path)`` reads the ``swa_rewrite`` key and returns the
rewritten module; the key is the source of truth. A schedule with per-layer windows or sinks is carried there
whole (``"windows"`` / ``"sinks"``, see ``Schedule.to_dict``); ``layer_types`` still says which layers slide,
but ``sliding_window`` is written only when every sliding layer has the same window and no sinks, since
Hugging Face has no spelling for more. Nothing is pickled: no ``weights_only=False`` anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Optional

import torch

from ..schedule import Schedule
from .config import MLAConfig
from .fused_weights import split_parts

log = logging.getLogger(__name__)

__all__ = ["SAVED_KEY", "SAVED_VERSION", "config_to_hf", "hf_schedule_keys", "save_pretrained", "saved_schedule"]

# The config.json key that carries what swa_rewrite adds to the checkpoint, and its format version.
SAVED_KEY = "swa_rewrite"
SAVED_VERSION = 1

_EXPERT_STACK = re.compile(r"(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")


def config_to_hf(config: MLAConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSeek ``config.json`` dict of ``config`` (the inverse of ``models.hf.config_from_hf``).

    A V3 (``deepseek_v3``) config, or V2 for softmax-routed experts. ``ValueError`` for a routing that
    neither generation expresses (sigmoid scores without ``noaux_tc``, softmax with ``norm_topk_prob`` or
    ``noaux_tc``, softmax experts with non-interleaved rope).
    """
    kind = "v3"
    cfg: dict[str, Any] = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
        qk_head_dim=config.qk_nope_head_dim + config.qk_rope_head_dim, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
        rope_theta=config.rope_theta, rope_interleave=config.rope_interleave, hidden_act="silu",
        attention_bias=False, num_nextn_predict_layers=0)   # no MTP layer is saved
    if config.rope_scaling is not None:
        cfg["rope_scaling"] = {"type": "yarn", **{k: v for k, v in config.rope_scaling.items() if k != "type"}}
    if config.n_routed_experts is None:
        # Dense everywhere: transformers builds MoE blocks only from layer first_k_dense_replace on.
        cfg.update(n_routed_experts=None, first_k_dense_replace=config.num_hidden_layers)
    else:
        kind = _moe_generation(config)
        cfg.update(n_routed_experts=config.n_routed_experts, n_shared_experts=config.n_shared_experts,
                   num_experts_per_tok=config.num_experts_per_tok,
                   moe_intermediate_size=config.moe_intermediate_size,
                   first_k_dense_replace=config.first_k_dense_replace, moe_layer_freq=config.moe_layer_freq,
                   n_group=config.n_group, topk_group=config.topk_group, topk_method=config.topk_method,
                   scoring_func=config.scoring_func, norm_topk_prob=config.norm_topk_prob,
                   routed_scaling_factor=config.routed_scaling_factor)
    name = {"v3": ("deepseek_v3", "DeepseekV3ForCausalLM"), "v2": ("deepseek_v2", "DeepseekV2ForCausalLM")}[kind]
    dtype_name = str(dtype).replace("torch.", "")
    return {"model_type": name[0], "architectures": [name[1]], **cfg, "dtype": dtype_name, "torch_dtype": dtype_name}


def _moe_generation(config: MLAConfig) -> str:
    """``"v3"`` (sigmoid + noaux_tc) or ``"v2"`` (softmax, greedy or group-limited, no normalisation)."""
    if config.scoring_func == "sigmoid" and config.topk_method == "noaux_tc":
        return "v3"
    if config.scoring_func == "softmax" and config.topk_method != "noaux_tc" and not config.norm_topk_prob:
        if not config.rope_interleave:
            raise ValueError("a softmax-routed MoE model saves as DeepSeek-V2, whose rope is interleaved; "
                             "this config has rope_interleave=False")
        return "v2"
    raise ValueError(f"MoE routing scoring_func={config.scoring_func!r}, topk_method={config.topk_method!r}, "
                     f"norm_topk_prob={config.norm_topk_prob} is neither DeepSeek-V3's (sigmoid, noaux_tc) nor "
                     f"DeepSeek-V2's (softmax, greedy or group_limited_greedy, norm_topk_prob=False)")


def _hf_state_dict(model: torch.nn.Module, config: MLAConfig) -> dict[str, torch.Tensor]:
    """``model``'s weights under DeepSeek checkpoint names: ``model.`` prefix, one tensor per routed expert
    (``[E, 2I, H]`` gate/up and ``[E, H, I]`` down stacks split), stacked projections as their parts
    (``models.fused_weights``), no tied ``lm_head``. Contiguous CPU tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, t in split_parts(model.state_dict(), config).items():       # DeepSeek's q_a / kv_a, gate / up
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue                 # tied: transformers saves embed_tokens only
        t = t.detach().cpu()
        stacked = _EXPERT_STACK.fullmatch(key)
        if stacked and stacked[2] == "gate_up_proj":
            I = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"model.{stacked[1]}.{e}.gate_proj.weight"] = t[e, :I].contiguous()
                out[f"model.{stacked[1]}.{e}.up_proj.weight"] = t[e, I:].contiguous()
        elif stacked:
            for e in range(t.shape[0]):
                out[f"model.{stacked[1]}.{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[key if key.startswith("lm_head.") else f"model.{key}"] = t.contiguous()
    return out


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (an ``MLAModel`` or the ``SWAModule`` that ``apply`` made of one) to the folder ``path``
    as ``config.json`` + ``model.safetensors`` (module docstring); the folder is created if needed.

    ``models.from_pretrained(path)`` gives back the same model, rewritten with the same schedule.
    ``TypeError`` for a model without an ``MLAConfig`` (``model.config``), ``ValueError`` for weights on the
    meta device or a config no DeepSeek generation expresses; needs ``safetensors``.
    """
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(config, MLAConfig):
        raise TypeError(f"save_pretrained takes an MLAModel or the module swa_rewrite.apply returns for one "
                        f"(with an MLAConfig as .config), got {type(model).__name__}")
    first = next(model.parameters())
    if first.is_meta:
        raise ValueError("the model's weights are on the meta device: there is nothing to save")
    cfg = config_to_hf(config, first.dtype)
    schedule: Optional[Schedule] = getattr(model, "swa_schedule", None)
    if schedule is not None:
        cfg[SAVED_KEY] = {"version": SAVED_VERSION, "schedule": schedule.to_dict()}
        cfg.update(hf_schedule_keys(schedule))
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_file(_hf_state_dict(model, config), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    log.info("saved %s to %s%s", type(model).__name__, path, f" with {schedule}" if schedule else "")


def hf_schedule_keys(schedule: Schedule) -> dict[str, Any]:
    """The Hugging Face spelling of ``schedule``: ``layer_types``, and ``sliding_window`` only when every SWA
    layer has the same window and no sinks (``schedule.uniform``); per-layer windows and sinks have no HF
    spelling and live under ``SAVED_KEY`` alone."""
    keys: dict[str, Any] = {"layer_types": schedule.layer_types()}
    if schedule.uniform:
        keys["sliding_window"] = schedule.window
    return keys


def saved_schedule(cfg: dict[str, Any], file: str = "config.json") -> Optional[Schedule]:
    """The schedule a ``config.json`` dict carries under ``SAVED_KEY``, or None when it has none.
    ``ValueError`` naming ``file`` for a malformed entry or a format version newer than this library's."""
    entry = cfg.get(SAVED_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict) or "schedule" not in entry:
        raise ValueError(f"{file}: {SAVED_KEY!r} must be an object with 'version' and 'schedule', got {entry!r}")
    version = entry.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SAVED_VERSION:
        raise ValueError(f"{file}: {SAVED_KEY}.version={version!r} is not supported; this swa_rewrite reads "
                         f"versions 1 to {SAVED_VERSION} (a newer swa_rewrite wrote it?)")
    try:
        return Schedule.from_dict(entry["schedule"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {SAVED_KEY}.schedule: {e}") from None
