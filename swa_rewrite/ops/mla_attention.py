"""The MLA core ops the model calls, one per layer (SPEC §13): ``swa_rewrite::mla_attention`` (a full layer, the
model-dtype cache) and ``swa_rewrite::swa_attention`` (a sliding-window layer, the packed FP8 cache, ``window``
and ``sinks``).

Each takes the un-absorbed query — ``q_nope [T, H, N]`` and ``q_pe [T, H, P]`` (rope applied) — the layer's
``kv_b_proj`` weight ``[H·(N + V), R]``, its cache and the step metadata, and returns ``o [T, H, V]`` in the
query dtype: what ``o_proj`` takes. The cache write stays its own node before it (Inductor wraps mutating ops in
``auto_functionalized``, so these ops only read). Inside, per request of the step:

- **MQA mode** (decode tokens and short chunks; the requests without rows in ``mha_kv_cu[group]``): absorb
  ``W_UK`` into the query, attend over the latent cache with the MQA ops' kernels
  (``attention.paged_mqa_cuda`` / ``swa_mqa_cuda``, FlashMLA when selected), un-absorb with ``W_UV``: exactly
  the model's computation before the boundary moved, so its outputs are bit for bit what they were.
- **MHA mode** (prefill chunks the step metadata gives rows): the rows ``mha_kv_slots[group]`` are read back from
  the cache (dequantised FP8 rows for a sliding layer: one semantics with the MQA path and the FP8-aware
  reference), expanded into per-head ``k_nope``, ``v`` and attended with 192 / 128 dims
  (``ops.mha_prefill``; ``window = 0`` for a full layer: causal).

The engine's metadata builder decides which chunks run MHA (``runtime.batch.MHAPlan``) — the op reads nothing
back: requests in MHA mode become padding (``batch_id_per_token = -1``) for the MQA kernels, which skip them,
and a ``where`` on the token mask merges the two outputs; with no rows (``M = 0``, a shape) the MHA half is not
traced at all. ``lse`` is not returned: nothing after the core needs it (the MQA and MHA ops still return it).

Checks (``checks.checks_enabled``): the shapes, dtypes and devices of every tensor, ``check_batch`` with the
layer's window and sinks, and — when the step has MHA rows — that each request's rows are those
``plan_mha_rows`` gives it, before any read through them; in a model step the step check has validated them once
for every layer of the same window and sinks (``mha_prefill.mha_rows_validated``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention import (_unpacked, finite_scale, paged_mla_attention_reference, paged_mqa_cuda,
                        swa_mla_attention_reference, swa_mqa_cuda)
from . import decode_plans
from .batch_checks import check_batch
from .checks import check_index, checks_enabled, fail, shapes_traced, validated_entries
from .inference_only import register_inference_only
from .registration import register_cuda
from .mha_prefill import _check_rows, _dims, mha_prefill_cuda, mha_rows_validated, mha_swa_prefill_reference

__all__ = ["absorb_query", "mha_tokens", "unabsorb_output"]


# ------------------------------------------------------------------------------------------------- pieces
def absorb_query(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor) -> torch.Tensor:
    """``q_abs [T, H, R + P]``: ``W_UK`` absorbed into ``q_nope`` (one BMM in the query dtype), ``q_pe`` after.
    The BMM writes straight into ``q_abs``'s first ``R`` columns (a strided output cuBLAS takes as it is: no
    transpose or concatenation copy of the ``[T, H, R]`` product; H200: the absorb + un-absorb of 4096 tokens ×
    128 heads fell from ~1420 to ~390 µs)."""
    T, H, N = q_nope.shape
    R, P = kv_b_weight.shape[1], q_pe.shape[-1]
    if _differentiable(q_nope, q_pe, kv_b_weight):      # bmm(out=) does not record a graph
        return _absorbed(q_nope, q_pe, kv_b_weight.view(H, -1, R)[:, :N, :])
    D = R + P
    q_abs = q_nope.new_empty(T, H, D)
    # [H, T, R] view of q_abs; W_UK [H, N, R] (each one view: issued per layer and step)
    torch.bmm(q_nope.transpose(0, 1), _weight_view(kv_b_weight, H, N, R, False),
              out=q_abs.as_strided((H, T, R), (D, H * D, 1)))
    q_abs[:, :, R:].copy_(q_pe)
    return q_abs


def _weight_view(kv_b_weight: torch.Tensor, H: int, N: int, R: int, value: bool) -> torch.Tensor:
    """``W_UK [H, N, R]`` (``value``: ``W_UVᵀ [H, R, V]``) of ``kv_b_weight [H·(N + V), R]``, one view."""
    rows = kv_b_weight.shape[0] // H                                              # N + V
    if kv_b_weight.stride() != (R, 1) or kv_b_weight.shape[0] % H:     # (the view says what is wrong)
        w = kv_b_weight.view(H, rows, R)
        return w[:, N:, :].transpose(1, 2) if value else w[:, :N, :]
    offset = kv_b_weight.storage_offset()
    if value:
        return kv_b_weight.as_strided((H, R, rows - N), (rows * R, 1, R), offset + N * R)
    return kv_b_weight.as_strided((H, N, R), (rows * R, R, 1), offset)


def unabsorb_output(o_lat: torch.Tensor, kv_b_weight: torch.Tensor, N: int) -> torch.Tensor:
    """``o [T, H, V]`` (contiguous) from the latent output ``o_lat [T, H, R]`` with ``W_UV`` (one BMM, written
    straight into ``o`` through its ``[H, T, V]`` view, as ``absorb_query``)."""
    T, H, R = o_lat.shape[0], o_lat.shape[1], kv_b_weight.shape[1]
    if _differentiable(o_lat, kv_b_weight):
        return _unabsorbed(o_lat, kv_b_weight.view(H, -1, R)[:, N:, :])
    w_uv_t = _weight_view(kv_b_weight, H, N, R, True)                             # [H, R, V]
    o = o_lat.new_empty(T, H, w_uv_t.shape[2])
    torch.bmm(o_lat.transpose(0, 1), w_uv_t, out=o.transpose(0, 1))
    return o


def _absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """``absorb_query`` as plain operations (autograd records them; a trace sees a BMM and a cat)."""
    return torch.cat([torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1), q_pe], dim=-1)


def _unabsorbed(o_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """``unabsorb_output`` as plain operations."""
    return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1).contiguous()


def _differentiable(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def mha_tokens(kv_cu: torch.Tensor, batch_id_per_token: torch.Tensor) -> torch.Tensor:
    """``[T]`` bool: the tokens whose request has rows in ``kv_cu [B + 1]`` (runs MHA mode); device ops only."""
    B = kv_cu.shape[0] - 1
    if B < 1:
        return torch.zeros_like(batch_id_per_token, dtype=torch.bool)
    has_rows = kv_cu[1:] > kv_cu[:-1]
    bid = batch_id_per_token.long()
    return (bid >= 0) & has_rows[bid.clamp(min=0, max=B - 1)]


def _core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token,
          mha_kv_slots, mha_kv_cu, scale, window: int, sinks: int, group: int, cuda: bool,
          seen: Optional[dict] = None) -> torch.Tensor:
    """Both modes (module docstring) of layer group ``group`` (``window = 0``: a full layer), through the CUDA
    paths (``cuda``: Triton kernels, FlashMLA when selected) or the PyTorch references. Inputs already checked.
    ``seen``: filled with the absorbed query and the group's table view (a decode plan's recording)."""
    N, P = q_nope.shape[-1], q_pe.shape[-1]
    bt = block_tables[group]                                  # a view: no copy, no sync
    cu, dec = cu_seqlens_q, seq_lens_decoder
    bid = batch_id_per_token
    selected = None
    if mha_kv_slots.shape[-1] > 0:        # (the rows' views only then: a select is a dispatched op, every layer)
        rows, rows_cu = mha_kv_slots[group], mha_kv_cu[group]
        selected = mha_tokens(rows_cu, batch_id_per_token)
        bid = torch.where(selected, -1, batch_id_per_token).to(batch_id_per_token.dtype)
    q_abs = absorb_query(q_nope, q_pe, kv_b_weight)
    if seen is not None:
        seen.update(q_abs=q_abs, bt=bt, bid=bid)
    if cuda:
        o_lat, _ = (swa_mqa_cuda(q_abs, cache, bt, cu, dec, bid, scale, P, window, sinks) if window
                    else paged_mqa_cuda(q_abs, cache, bt, cu, dec, bid, scale, P))
    elif window:
        o_lat, _ = swa_mla_attention_reference(q_abs, cache, bt, cu, dec, bid, scale, P, window, sinks)
    else:
        o_lat, _ = paged_mla_attention_reference(q_abs, _unpacked(cache, q_abs, P), bt, cu, dec, bid, scale, P)
    o = unabsorb_output(o_lat, kv_b_weight, N)        # contiguous, as the fake's output is (Inductor checks strides)
    if selected is None:
        return o
    mha = mha_prefill_cuda if cuda else mha_swa_prefill_reference
    o_mha, _ = mha(q_nope, q_pe, kv_b_weight, cache, rows, rows_cu, cu, dec, batch_id_per_token, scale, window,
                   sinks)
    return torch.where(selected[:, None, None], o_mha.to(o.dtype), o)


# ------------------------------------------------------------------------------------------------- checks
# The argument signatures (every tensor's shape, dtype and device, every scalar with its type) whose shape checks
# passed in an eager call: a later call of one of them skips those checks, which read nothing else (issue 14: they
# were ~40 % of an eager decode call's own Python). Data checks are never remembered (``checks`` docstring).
_SIGNATURES: dict = {}
_SIGNATURES_MAX = 1024


def _check_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, group, window, sinks, data=True):
    """Every check of the op's arguments (``data``: the data checks too, in checked mode); returns ``(N, V)``. Inside
    a compiled graph (``checks.shapes_traced``) only the data checks run: its trace checked the rest; so in an eager
    call whose argument signature an earlier one passed (``_SIGNATURES``)."""
    signature = None
    traced = data and shapes_traced()
    if data and not traced:
        signature = (q_nope.shape, q_nope.dtype, q_nope.device, q_pe.shape, q_pe.dtype, q_pe.device,
                     kv_b_weight.shape, kv_b_weight.dtype, kv_b_weight.device, cache.shape, cache.dtype, cache.device,
                     block_tables.shape, block_tables.dtype, block_tables.device, cu_seqlens_q.shape,
                     cu_seqlens_q.dtype, cu_seqlens_q.device, seq_lens_encoder.shape, seq_lens_encoder.dtype,
                     seq_lens_encoder.device, seq_lens_decoder.shape, seq_lens_decoder.dtype, seq_lens_decoder.device,
                     batch_id_per_token.shape, batch_id_per_token.dtype, batch_id_per_token.device,
                     mha_kv_slots.shape, mha_kv_slots.dtype, mha_kv_slots.device, mha_kv_cu.shape, mha_kv_cu.dtype,
                     mha_kv_cu.device, type(scale), scale, type(rope_dim), rope_dim, type(group), group,
                     type(window), window, type(sinks), sinks)
        traced = signature in _SIGNATURES
    if traced:
        N = q_nope.shape[-1]
        V = kv_b_weight.shape[0] // q_nope.shape[1] - N
    else:
        H, N, P, R, V = _dims(q_nope, q_pe, kv_b_weight, cache)
        if rope_dim != P:
            fail(f"rope_dim = {rope_dim} differs from q_pe's last dimension {P}")
        if window is not None and cache.dtype != torch.uint8:
            fail(f"a sliding-window layer reads the packed FP8 cache (uint8), got {cache.dtype}")
        if window is not None and window < 1:
            fail(f"window must be >= 1, got {window}")
        if sinks < 0:
            fail(f"sinks must be >= 0, got {sinks}")
        finite_scale(scale)
    check_batch(q_nope.shape[0], block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, cache.shape[1], cache.shape[0], group, window=window, sinks=sinks, data=data,
                shapes=not traced)
    if not traced:
        check_index("mha_kv_slots", mha_kv_slots, 2)
        check_index("mha_kv_cu", mha_kv_cu, 2)
        G, B = block_tables.shape[0], block_tables.shape[1]
        if mha_kv_slots.shape[0] != G or mha_kv_cu.shape != (G, B + 1):
            fail(f"mha_kv_slots must be [G={G}, M] and mha_kv_cu [G={G}, B + 1 = {B + 1}], got "
                 f"{tuple(mha_kv_slots.shape)} and {tuple(mha_kv_cu.shape)}")
        if mha_kv_slots.device != q_nope.device or mha_kv_cu.device != q_nope.device:
            fail(f"mha_kv_slots and mha_kv_cu must be on q's device {q_nope.device}")
    if (data and mha_kv_slots.shape[1] and q_nope.device.type != "meta" and checks_enabled()
            and mha_rows_validated(window or 0, sinks) not in validated_entries((mha_kv_slots, mha_kv_cu), group)):
        _check_rows(block_tables[group], cu_seqlens_q, seq_lens_decoder, mha_kv_slots[group], mha_kv_cu[group],
                    cache.shape[1], window or 0, sinks if window else 0)
    if signature is not None and not traced:
        if len(_SIGNATURES) >= _SIGNATURES_MAX:
            _SIGNATURES.clear()
        _SIGNATURES[signature] = None
    return N, V


# ------------------------------------------------------------------------------------------------ full op
@torch.library.custom_op("swa_rewrite::mla_attention", mutates_args=())
def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor, cache: torch.Tensor,
                  block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                  seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, mha_kv_slots: torch.Tensor,
                  mha_kv_cu: torch.Tensor, scale: float, rope_dim: int, layer: int, group: int) -> torch.Tensor:
    """A full layer's MLA attention core → ``o [T, H, V]`` (module docstring). ``block_tables [G, B, nb]``,
    ``mha_kv_slots [G, M]``, ``mha_kv_cu [G, B + 1]``: the layer reads row ``group``."""
    _check_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, group, None, 0)
    return _core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token,
                 mha_kv_slots, mha_kv_cu, scale, 0, 0, group, cuda=False)


def _fake_out(q_nope, kv_b_weight):
    T, H, N = q_nope.shape
    return q_nope.new_empty(T, H, kv_b_weight.shape[0] // H - N)


@mla_attention.register_fake
def _(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
      batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, layer, group):
    _check_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, group, None, 0, data=False)
    return _fake_out(q_nope, kv_b_weight)


@register_cuda(mla_attention)
def _(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
      batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, layer, group):
    return _cuda_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder,
                      seq_lens_decoder, batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, group, None, 0)


# ------------------------------------------------------------------------------------------------- SWA op
@torch.library.custom_op("swa_rewrite::swa_attention", mutates_args=())
def swa_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor, cache: torch.Tensor,
                  block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                  seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, mha_kv_slots: torch.Tensor,
                  mha_kv_cu: torch.Tensor, scale: float, rope_dim: int, window: int, layer: int, group: int,
                  sinks: int = 0) -> torch.Tensor:
    """A sliding-window layer's MLA attention core over the packed FP8 cache → ``o [T, H, V]`` (module
    docstring): token ``p`` attends to ``max(0, p - W + 1) … p`` and the first ``sinks`` positions."""
    _check_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, group, window, sinks)
    return _core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token,
                 mha_kv_slots, mha_kv_cu, scale, window, sinks, group, cuda=False)


@swa_attention.register_fake
def _(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
      batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, window, layer, group, sinks=0):
    _check_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, group, window, sinks, data=False)
    return _fake_out(q_nope, kv_b_weight)


@register_cuda(swa_attention)
def _(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
      batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, window, layer, group, sinks=0):
    return _cuda_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder,
                      seq_lens_decoder, batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, group, window,
                      sinks)


def _cuda_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
               batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, group, window, sinks) -> torch.Tensor:
    """The cores' CUDA function (``window`` None: a full layer): a decode plan's replay where this argument signature
    recorded one (``ops.decode_plans``), else the checks and ``_core``, recording a plan where it can."""
    tensors = (q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
               batch_id_per_token, mha_kv_slots, mha_kv_cu)
    key = decode_plans.core_key(tensors, cache, (scale, rope_dim, group, window, sinks))
    plan = decode_plans.lookup(key)
    if plan is not None:
        return _replay_core(plan, q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                            batch_id_per_token, scale, group)
    _check_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, group, window, sinks)
    if key is None or mha_kv_slots.shape[-1] > 0:
        return _core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                     batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, window or 0, sinks, group, cuda=True)
    from ..kernels import paged_mla

    seen: dict = {}
    with decode_plans.recording() as launches, paged_mla.gluon_calls() as calls:
        o = _core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token,
                  mha_kv_slots, mha_kv_cu, scale, window or 0, sinks, group, cuda=True, seen=seen)
    # A plan only where the call went straight to the Gluon path with the very tensors a replay passes it.
    if len(calls) == 1 and decode_plans.complete(launches):
        q, c, bt, cu, dec, bid, call_scale, (out_t, lse_t), tiles_plan, call_window, config = calls[0]
        T, H = q_nope.shape[0], q_nope.shape[1]
        R = kv_b_weight.shape[1]
        if (q is seen["q_abs"] and c is cache and bt is seen["bt"] and cu is cu_seqlens_q and dec is seq_lens_decoder
                and bid is seen["bid"] and bid is batch_id_per_token and call_scale == scale
                and out_t.shape == (T, H, R) and out_t.dtype == q.dtype and out_t.is_contiguous()
                and lse_t.shape == (T, H) and lse_t.dtype == torch.float32 and lse_t.is_contiguous()):
            decode_plans.store(key, decode_plans.Plan(launches, (paged_mla.gluon_fwd, tiles_plan, call_window,
                                                                 config, R)))
    return o


def _replay_core(plan, q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                 batch_id_per_token, scale, group) -> torch.Tensor:
    """What a recorded core call did (``_cuda_core``): absorb, the Gluon path with the recorded route and launches,
    un-absorb."""
    gluon_fwd, tiles_plan, window, config, R = plan.route
    q_abs = absorb_query(q_nope, q_pe, kv_b_weight)
    T, H = q_abs.shape[0], q_abs.shape[1]
    out = (torch.empty((T, H, R), dtype=q_abs.dtype, device=q_abs.device),
           torch.empty((T, H), dtype=torch.float32, device=q_abs.device))
    o_lat, _ = decode_plans.replayed(plan, gluon_fwd, q_abs, cache, block_tables[group], cu_seqlens_q,
                                     seq_lens_decoder, batch_id_per_token, scale, out, tiles_plan, window, config,
                                     None)
    return unabsorb_output(o_lat, kv_b_weight, q_nope.shape[-1])


for _op in (mla_attention, swa_attention):
    register_inference_only(_op)


# ------------------------------------------------------------------------------- decomposed, for Inductor
def _mqa_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
              batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, window, layer, group, sinks):
    """The core op of a step without MHA rows as graph operations: the absorb BMM, the MQA op the core calls
    (``swa_mla_attention`` with a window, else ``paged_mla_attention``), the un-absorb BMM — the same kernels on the
    same values. For tracing (``compile.decompose_mqa_cores``); the op's shape checks run here, at trace time."""
    _check_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, group, window, sinks, data=False)
    H, N, R = q_nope.shape[1], q_nope.shape[-1], kv_b_weight.shape[1]
    w = kv_b_weight.view(H, -1, R)                                                 # [H, N + V, R]
    q_abs = _absorbed(q_nope, q_pe, w[:, :N, :])           # (plain operations: Inductor traces them)
    meta = (cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token, scale,
            rope_dim)
    if window is None:
        o_lat, _ = torch.ops.swa_rewrite.paged_mla_attention(q_abs, *meta, layer, group)
    else:
        o_lat, _ = torch.ops.swa_rewrite.swa_mla_attention(q_abs, *meta, window, layer, group, sinks)
    return _unabsorbed(o_lat, w[:, N:, :])


def mla_attention_mqa(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder,
                      seq_lens_decoder, batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, layer, group):
    """``mla_attention`` of a step without MHA rows, decomposed (``_mqa_core``)."""
    return _mqa_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                     batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, None, layer, group, 0)


def swa_attention_mqa(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder,
                      seq_lens_decoder, batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, window, layer,
                      group, sinks=0):
    """``swa_attention`` of a step without MHA rows, decomposed (``_mqa_core``)."""
    return _mqa_core(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                     batch_id_per_token, mha_kv_slots, mha_kv_cu, scale, rope_dim, window, layer, group, sinks)


DECOMPOSED = {"swa_rewrite::mla_attention": mla_attention_mqa, "swa_rewrite::swa_attention": swa_attention_mqa}
"""The core ops and their decomposed forms for steps without MHA rows (``compile.decompose_mqa_cores``)."""
