"""The metadata of one engine step (docs/design.md §5, §12): ``StepMetadata``, and
``token_positions`` (each query token's position and request from the per-request metadata).

One structure, built once per step (``swa_rewrite.runtime.StepBatch.build``), passed by the engine to the
model, by the model to its step check, and read field by field where an op needs a tensor: ops keep plain
tensor arguments, since ``torch.library`` schemas take tensors, not dataclasses.

Block tables and slot mappings carry a leading *cache-group* dimension ``G``: layers with equal cache specs
share a group, with its own block pool, tables and slots (docs/design.md §12). Each cache/attention op takes its
group as a constant ``group`` argument beside ``layer`` and reads ``block_tables[group]`` /
``slot_mapping[group]`` (views: no copy, no host synchronisation). Groups come from the layers' cache specs
(``ops.kv_cache_spec``); for now every group's rows are the same (``runtime.StepBatch.build``).

The class is a registered pytree node, so ``torch.fx`` (one placeholder, ``getattr`` per field),
Dynamo (``fullgraph=True``) and ``torch.export`` (positional or keyword) take it as a model input.
This module imports nothing of the package: the checks, the ops and the runtime all sit above it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.utils._pytree as pytree


@dataclasses.dataclass(frozen=True)
class StepMetadata:
    """Where each token of a ragged step sits and which cache slots it reads and writes.

    ``T`` tokens (trailing padding tokens included), ``B`` requests, ``G`` cache groups, ``nb`` block-table
    columns. All tensors on the step's device.

    Attributes:
        positions: ``[T]`` int64, absolute position of each token (``seq_lens_decoder[b] + i`` for token
            ``i`` of request ``b``; anything for padding).
        cu_seqlens_q: ``[B + 1]`` int32, prefix sums of the query tokens per request (starts at 0).
        seq_lens_encoder: ``[B]`` int32, new prefill tokens of each request this step (0 for a decode).
        seq_lens_decoder: ``[B]`` int32, tokens of each request already cached before this step.
        batch_id_per_token: ``[T]`` int32, request of each token, ``-1`` for padding.
        block_tables: ``[G, B, nb]`` int32, ``block_tables[g, b, i]`` is the physical block of group ``g``
            holding positions ``[i*ps, (i+1)*ps)`` of request ``b``; ``-1`` where none (unused or released).
        slot_mapping: ``[G, T]`` int64, cache slot of group ``g`` each token writes
            (``block * ps + pos % ps``), ``-1`` for padding (nothing written).
        mha_kv_slots: ``[G, M]`` int32, the cache rows the step's MHA-mode prefill chunks expand in group ``g``
            (SPEC §13, ``ops.mha_prefill.plan_mha_rows``), ``-1`` past ``mha_kv_cu[g, -1]``; ``M = 0`` when no
            chunk runs MHA (every decode step). Default: none.
        mha_kv_cu: ``[G, B + 1]`` int32, request ``b``'s rows are ``mha_kv_slots[g, cu[b]:cu[b+1]]``; a request
            with none runs MQA mode in that group. Default: zeros.
    """

    positions: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens_encoder: torch.Tensor
    seq_lens_decoder: torch.Tensor
    batch_id_per_token: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    mha_kv_slots: Optional[torch.Tensor] = None
    mha_kv_cu: Optional[torch.Tensor] = None

    def __post_init__(self):
        # No MHA chunk: empty rows, zero offsets (built here so every field is a tensor after construction).
        if self.mha_kv_slots is None or self.mha_kv_cu is None:
            G, B = self.block_tables.shape[0], self.block_tables.shape[1]
            dev = self.block_tables.device
            if self.mha_kv_slots is None:
                object.__setattr__(self, "mha_kv_slots", torch.empty((G, 0), dtype=torch.int32, device=dev))
            if self.mha_kv_cu is None:
                object.__setattr__(self, "mha_kv_cu", torch.zeros((G, B + 1), dtype=torch.int32, device=dev))

    @property
    def has_mha(self) -> bool:
        """Whether some chunk of the step runs MHA-mode prefill (a shape: no host synchronisation)."""
        return self.mha_kv_slots.shape[-1] > 0

    def batch_tensors(self) -> tuple[torch.Tensor, ...]:
        """``(cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token)``: the per-request
        metadata every attention op takes after ``block_tables``."""
        return self.cu_seqlens_q, self.seq_lens_encoder, self.seq_lens_decoder, self.batch_id_per_token

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "StepMetadata":
        """The same metadata on ``device`` (``non_blocking``: host-to-device copies that do not wait for the
        device's queued work, as ``Tensor.to``)."""
        return StepMetadata(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                               for f in dataclasses.fields(self)})


def token_positions(cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                    batch_id_per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute position ``[T]`` (int64) of each query token and its request ``[T]`` (int64, ``-1`` = padding).

    Query token ``i`` of request ``b`` sits at ``seq_lens_decoder[b] + i`` (docs/design.md §5).
    """
    req = batch_id_per_token.long()
    if seq_lens_decoder.numel() == 0:  # no request: every token is padding
        return torch.full_like(req, -1), torch.full_like(req, -1)
    b = req.clamp(min=0)
    tok = torch.arange(req.shape[0], device=req.device)
    pos = seq_lens_decoder.long()[b] + tok - cu_seqlens_q.long()[b]
    return torch.where(req >= 0, pos, -1), req


# The pytree registration is what lets torch.export flatten the structure (and save the program).
pytree.register_dataclass(StepMetadata, serialized_type_name="swa_rewrite.StepMetadata")
