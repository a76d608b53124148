"""Projections that read one input, held as one weight: a layer's ``fused_qkv_a_proj`` (DeepSeek's ``q_a_proj`` and
``kv_a_proj_with_mqa``, stacked in that order) and an MLP's ``gate_up_proj`` (``gate_proj`` then ``up_proj``).

One GEMM where DeepSeek's checkpoints have two: one launch and one weight read fewer per pair, which an eager decode
step pays for in host time (issue 14; serving engines stack them the same way). Each output element is the same dot
product, but the GEMM library may pick another kernel for the wider output and round differently (on the H200 at
decode sizes the gate / up stack gave the same bits, the q_a / kv_a stack did not: benchmarks/RESULTS.md, issue 14
run 16). Checkpoints keep DeepSeek's names: ``models.from_pretrained`` / ``from_hf`` fill a stack from its parts,
``save_pretrained`` writes the parts, and ``load_state_dict`` of the model, its layers and the rewritten module takes
a state dict with the parts too (``merge_parts``; the parts are copied into the stack, also under ``assign=True``).
``_PART_NAMES`` is the one table of which stacked weight holds which parts.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from .config import MLAConfig

__all__ = ["merge_parts", "parts_of", "split_parts"]

_STACKED = re.compile(r"(?P<prefix>(?:.*\.)?)(?P<name>fused_qkv_a_proj|gate_up_proj)\.weight")
_PART_NAMES = {"fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"), "gate_up_proj": ("gate_proj", "up_proj")}


def parts_of(key: str, rows: int, config: MLAConfig) -> Optional[list[tuple[str, int]]]:
    """``[(part key, rows), ...]`` of the stacked weight ``key`` with ``rows`` rows (in stacking order), or None
    for a key that is not a stacked weight. (The routed experts' ``mlp.experts.gate_up_proj`` is a stack of another
    kind: ``models.hf``.)"""
    m = _STACKED.fullmatch(key)
    if m is None:
        return None
    first = rows // 2 if m["name"] == "gate_up_proj" else config.q_lora_rank
    names = [m["prefix"] + part + ".weight" for part in _PART_NAMES[m["name"]]]
    return [(names[0], first), (names[1], rows - first)]


def split_parts(state: dict, config: MLAConfig) -> dict:
    """``state`` with every stacked weight replaced by its parts (row views of it), order otherwise kept."""
    out = {}
    for key, t in state.items():
        parts = parts_of(key, t.shape[0], config) if isinstance(t, torch.Tensor) else None
        if parts is None:
            out[key] = t
            continue
        row = 0
        for name, rows in parts:
            out[name] = t[row:row + rows]
            row += rows
    return out


def merge_parts(module: torch.nn.Module, state: dict, prefix: str) -> None:
    """In place, for each stacked weight of ``module`` (its parameters, nested ones included) whose key under
    ``prefix`` ``state`` lacks: where ``state`` has every one of its parts, replace them by their stack (the
    ``load_state_dict`` of ``MLAModel``'s modules and of the rewritten module calls it, so a state dict with DeepSeek's
    names loads). A partial set of parts is left as it is, for ``load_state_dict`` to report."""
    for name, _ in module.named_parameters(prefix=prefix.rstrip(".")):
        m = _STACKED.fullmatch(name)
        if m is None or name in state:
            continue
        names = [m["prefix"] + part + ".weight" for part in _PART_NAMES[m["name"]]]
        if all(n in state for n in names):
            state[name] = torch.cat([state.pop(n) for n in names], dim=0)
