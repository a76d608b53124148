"""Projections that read one input, held as one weight: a layer's ``fused_qkv_a_proj`` (DeepSeek's ``q_a_proj`` and
``kv_a_proj_with_mqa``, stacked in that order) and an MLP's ``gate_up_proj`` (``gate_proj`` then ``up_proj``).

One GEMM where DeepSeek's checkpoints have two: one launch and one weight read fewer per pair, which an eager decode
step pays for in host time (issue 14; serving engines stack them the same way). The gate / up stack gives the same
bits as the two GEMMs; the q_a / kv_a stack may round differently where the GEMM library picks another kernel for
the wider output. Checkpoints keep DeepSeek's names: ``models.from_pretrained`` / ``from_hf`` fill a stack from its
parts, ``save_pretrained`` writes the parts, and the modules' ``load_state_dict`` takes a state dict with the parts
too (``merge_parts``). ``parts_of`` is the one table of which stacked weight holds which parts.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from .config import MLAConfig

__all__ = ["merge_parts", "parts_of", "split_parts"]

_STACKED = re.compile(r"(?P<prefix>(?:.*\.)?)(?P<name>fused_qkv_a_proj|gate_up_proj)\.weight")


def parts_of(key: str, rows: int, config: MLAConfig) -> Optional[list[tuple[str, int]]]:
    """``[(part key, rows), ...]`` of the stacked weight ``key`` with ``rows`` rows (in stacking order), or None
    for a key that is not a stacked weight. (The routed experts' ``mlp.experts.gate_up_proj`` is a stack of another
    kind: ``models.hf``.)"""
    m = _STACKED.fullmatch(key)
    if m is None:
        return None
    p = m["prefix"]
    if m["name"] == "gate_up_proj":
        return [(p + "gate_proj.weight", rows // 2), (p + "up_proj.weight", rows - rows // 2)]
    q = config.q_lora_rank
    return [(p + "q_a_proj.weight", q), (p + "kv_a_proj_with_mqa.weight", rows - q)]


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


def merge_parts(state: dict, prefix: str, stacked: str, parts: tuple[str, ...]) -> None:
    """In place: where ``state`` has every part ``prefix + part + ".weight"`` and not ``prefix + stacked + ".weight"``,
    replace the parts by their stack (a ``load_state_dict`` pre-hook's work)."""
    key = prefix + stacked + ".weight"
    names = [prefix + part + ".weight" for part in parts]
    if key in state or not all(n in state for n in names):
        return
    state[key] = torch.cat([state.pop(n) for n in names], dim=0)
