"""MHA-mode sliding-window prefill (SPEC §13, issue 18): the ``swa_rewrite::mha_swa_prefill`` op, its fake, its
PyTorch reference, its checks, and ``plan_mha_rows``, which builds the rows the op expands.

Prefill is compute-bound: MQA mode (``attention.swa_mla_attention`` on ``q_abs``) pays ``2·(D + R)`` FLOPs per
head and key, MHA mode ``2·(N + P) + 2·V``. The op takes the un-absorbed query (``q_nope [T, H, N]``,
``q_pe [T, H, P]`` with rope applied), the ``kv_b_proj`` weight ``[H·(N + V), R]``, the layer's cache (packed
FP8 for a sliding layer; model dtype for a full layer with ``window=0``) and the step metadata, reads the rows
each chunk needs back from the cache (dequantised: one semantics with the FP8-aware reference and the MQA path),
expands them into per-head ``k_nope``, ``v`` (``latent[:R] @ W_UKᵀ``, ``latent[:R] @ W_UVᵀ``) with ``k_pe`` the
shared rope part ``latent[R:]``, and attends: ``o [T, H, V]`` (what the model's un-absorption
``o_lat @ W_UVᵀ`` gives in MQA mode) and ``lse [T, H]`` float32, natural log.

**Rows to expand (``kv_slots [M]``, ``kv_cu [B + 1]``)** are step metadata, built on the host by
``plan_mha_rows`` (the engine's metadata builder decides which requests run MHA: the others get no rows).
Request ``b`` (``n`` positions cached, ``C`` tokens in the step) owns rows ``[kv_cu[b], kv_cu[b+1])``: its sink
positions below its first window, ``0 … min(s, a) - 1`` with ``a = max(0, n - W + 1)``, then positions
``a … n + C - 1`` — each position once, **at most ``C + W - 1 + s`` rows**, so a step expands
``M ≤ Σ_b (C_b + W - 1 + s)`` rows (``kernels.mha_window`` documents the layout and the K/V workspace bound:
one head group of at most ``EXPAND_BYTES``). ``M`` is a shape, so nothing on the device is read to size anything.

Semantics (SPEC §3, §12): the token at position ``p`` attends to ``0 … min(s, p+1) - 1`` and
``max(0, p - W + 1) … p`` of its request; ``window=0`` is full causal attention (a full layer's MHA prefill).
Tokens not computed here — padding (``batch_id_per_token = -1``) and requests without rows — give ``o = 0``,
``lse = +inf``, as the MQA ops give padding.

Checked mode (``checks.checks_enabled``): shapes and dtypes always; ``check_batch`` with the layer's window and
sinks; and the rows themselves: ``kv_cu`` starts at 0, does not decrease and ends at most at ``M`` (rows past
its end are ``-1``: the step metadata pads every cache group's rows to one count), and each request with rows
holds exactly the slots ``plan_mha_rows`` gives it. The rows are addresses, so that check runs before the op reads
through them (one device flag read back); a model step's check (``step_check.checked_step_metadata``) validates
every group's rows in its one copy and records them (``mha_rows_validated``), so the layers' ops given those very
tensors (and the same window and sinks) skip it and a checked model step does not synchronise once per layer.
With checks off the rows must be what ``plan_mha_rows`` makes, as all step metadata must be what
``StepBatch.build`` makes: the gather then reads zeros for a slot past the cache, but the attention kernel does
not bound a malformed ``kv_cu``.
"""

from __future__ import annotations

import torch

from .. import fp8_format
from .attention import _check_scale
from .batch_checks import check_batch
from .checks import check_index, checks_enabled, fail, validated_entries
from .fp8_cache import dequantize_fp8_reference
from .inference_only import register_inference_only
from .registration import register_cuda

def mha_rows_validated(window: int, sinks: int) -> tuple:
    """What the step check records for a group's MHA rows (``checks.note_validated``) when it validated them for
    ``window`` (0: full) and ``sinks``: an op given those very tensors skips its rows check only for the same
    window and sinks (rows right for one window are wrong for another)."""
    return ("mha rows", int(window or 0), int(sinks) if window else 0)

# Bound the reference's per-token gather ([tokens, keys, H, N + V]) to about this many elements.
_GATHER_BUDGET = 1 << 24
# window = 0 (full causal) as a window: longer than any context (kernels.mha_window.FULL_WINDOW).
FULL_WINDOW = 1 << 30


def _effective_window(window: int) -> int:
    return FULL_WINDOW if window == 0 else min(window, FULL_WINDOW)


# ---------------------------------------------------------------------------------------------- rows
def plan_mha_rows(block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor, *,
                  window: int, page_size: int, sinks: int = 0,
                  mha: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows an MHA prefill expands: ``(kv_slots int32 [M], kv_cu int32 [B + 1])`` (module docstring).

    ``block_tables [B, nb]`` (one cache group's), ``cu_seqlens_q [B + 1]``, ``seq_lens_decoder [B]``; ``window``
    (0: full causal), ``sinks``, ``page_size``; ``mha [B]`` bool: the requests that run MHA (default: every
    request with tokens). Request ``b``'s rows are the slots of positions ``0 … min(s, a) - 1`` then
    ``a … n + C - 1`` (``a = max(0, n - W + 1)``). A host-side builder: ``M`` depends on the data, so on a
    device this reads it back (the engine calls it with its host copies)."""
    W = _effective_window(window)
    s = sinks if window else 0
    dev = block_tables.device
    cu = cu_seqlens_q.to(dev).long()
    dec = seq_lens_decoder.to(dev).long()
    B = dec.shape[0]
    q_lens = cu[1:] - cu[:-1]
    a = (dec - W + 1).clamp(min=0)
    ns = a.clamp(max=s)
    n = ns + dec + q_lens - a
    take = q_lens > 0 if mha is None else (mha.to(dev).bool() & (q_lens > 0))
    n = torch.where(take, n, 0)
    kv_cu = torch.nn.functional.pad(torch.cumsum(n, 0), (1, 0))
    M = int(kv_cu[-1]) if B else 0
    req, pos = _row_positions(kv_cu, dec, W, s, M)
    bt = block_tables.long()
    blk = bt[req, pos // page_size] if M else torch.zeros(0, dtype=torch.long, device=dev)
    slots = torch.where(blk >= 0, blk * page_size + pos % page_size, -1)
    return slots.to(torch.int32), kv_cu.to(torch.int32)


def _row_positions(kv_cu: torch.Tensor, dec: torch.Tensor, W: int, s: int, M: int):
    """Request ``[M]`` and position ``[M]`` (int64) of each workspace row under ``kv_cu`` (device ops only)."""
    dev = kv_cu.device
    rows = torch.arange(M, device=dev)
    if M == 0 or dec.shape[0] == 0:
        z = torch.zeros(M, dtype=torch.long, device=dev)
        return z, z
    kv_cu = kv_cu.long()
    req = torch.searchsorted(kv_cu[1:], rows, right=True).clamp(max=dec.shape[0] - 1)
    j = rows - kv_cu[req]
    a = (dec.long() - W + 1).clamp(min=0)[req]
    ns = a.clamp(max=s)
    return req, torch.where(j < ns, j, a + j - ns)


# ------------------------------------------------------------------------------------- reference
def _cache_rows(cache: torch.Tensor, slots: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Rows at ``slots [M]`` of a packed FP8 (dequantised, bf16 values) or model-dtype cache; ``-1`` → zeros, and
    so is a slot past the cache (as the kernel's gather: unchecked rows never index outside it)."""
    ps = cache.shape[1]
    valid = (slots >= 0) & (slots < cache.shape[0] * ps)
    sl = torch.where(valid, slots.long(), 0)
    rows = cache[sl // ps, sl % ps]
    if cache.dtype == torch.uint8:
        rows = dequantize_fp8_reference(rows, rope_dim)
    return torch.where(valid[:, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def mha_swa_prefill_reference(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor,
                              cache: torch.Tensor, kv_slots: torch.Tensor, kv_cu: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                              batch_id_per_token: torch.Tensor, scale: float, window: int,
                              sinks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MHA-mode attention of the step's tokens over the expanded rows ``kv_slots`` / ``kv_cu`` (module
    docstring) → ``o [T, H, V]`` (q dtype), ``lse [T, H]`` float32. Computes in float64 for float64 queries,
    else float32; K/V are not rounded to the query dtype. No host reads (shapes only)."""
    T, H, N = q_nope.shape
    P = q_pe.shape[-1]
    R = kv_b_weight.shape[1]
    V = kv_b_weight.shape[0] // H - N
    M = kv_slots.shape[0]
    B = kv_cu.shape[0] - 1
    W = _effective_window(window)
    s = sinks if window else 0
    acc = torch.float64 if q_nope.dtype == torch.float64 else torch.float32
    dev = q_nope.device
    o = torch.zeros((T, H, V), dtype=acc, device=dev)
    lse = torch.full((T, H), float("inf"), dtype=torch.float32, device=dev)
    if T == 0 or B == 0 or M == 0 or H == 0:
        return o.to(q_nope.dtype), lse
    latent = _cache_rows(cache, kv_slots, P).to(acc)                            # [M, R + P]
    kv = (latent[:, :R] @ kv_b_weight.to(acc).t()).view(M, H, N + V)            # [M, H, N + V]
    k_pe = latent[:, R:]                                                        # [M, P]

    kv_cu = kv_cu.to(dev).long()
    dec = seq_lens_decoder.to(dev).long()
    cu = cu_seqlens_q.to(dev).long()
    bid = batch_id_per_token.to(dev).long()
    b = bid.clamp(min=0, max=B - 1)
    base, rows_b = kv_cu[b], kv_cu[b + 1] - kv_cu[b]
    covered = (bid >= 0) & (rows_b > 0)                                         # [T]
    p = dec[b] + torch.arange(T, device=dev) - cu[b]                            # [T] positions
    a = (dec[b] - W + 1).clamp(min=0)
    ns = a.clamp(max=s)
    lo = (p - W + 1).clamp(min=0)                                               # first window position
    # Candidate keys per token: s sink entries (positions 0 … s-1), then the window's last min(W, M) positions.
    Wc = min(W, M)
    k = torch.arange(s + Wc, device=dev)
    x = torch.where(k[None, :] < s, k[None, :], p[:, None] - Wc + 1 + (k[None, :] - s))      # [T, K] positions
    valid = torch.where(k[None, :] < s, x < torch.minimum(lo, torch.full_like(lo, s))[:, None], x >= lo[:, None])
    valid &= covered[:, None]
    row = torch.where(x < ns[:, None], base[:, None] + x, base[:, None] + ns[:, None] + x - a[:, None])
    valid &= (row >= base[:, None]) & (row < (base + rows_b)[:, None])
    row = torch.where(valid, row, 0).clamp(max=M - 1)

    K = s + Wc
    step = max(1, _GATHER_BUDGET // max(1, K * H * (N + V)))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        r, ok = row[t0:t1], valid[t0:t1]
        kk = kv[r]                                                              # [t, K, H, N + V]
        logits = (torch.einsum("thn,tkhn->thk", q_nope[t0:t1].to(acc), kk[..., :N])
                  + torch.einsum("thp,tkp->thk", q_pe[t0:t1].to(acc), k_pe[r])) * scale
        logits = logits.masked_fill(~ok[:, None, :], float("-inf"))
        ls = torch.logsumexp(logits, dim=-1)                                    # [t, H]
        empty = ~ok.any(dim=-1)[:, None]
        w = torch.exp(logits - torch.where(empty, 0.0, ls)[..., None])
        o[t0:t1] = torch.where(empty[..., None], 0.0, torch.einsum("thk,tkhv->thv", w, kk[..., N:]))
        lse[t0:t1] = torch.where(empty, float("inf"), ls).float()
    return o.to(q_nope.dtype), lse


# ------------------------------------------------------------------------------------------ checks
def _dims(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor, cache: torch.Tensor):
    """``(H, N, P, R, V)`` after the shape, dtype and device checks of the tensors."""
    for name, t in (("q_nope", q_nope), ("q_pe", q_pe)):
        if t.dim() != 3:
            fail(f"{name} must be [T, H, dims], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            fail(f"{name} must be a floating-point tensor, got {t.dtype}")
    T, H, N = q_nope.shape
    if q_pe.shape[:2] != (T, H) or q_pe.dtype != q_nope.dtype:
        fail(f"q_pe must be [T={T}, H={H}, P] of q_nope's dtype {q_nope.dtype}, got {tuple(q_pe.shape)} "
             f"{q_pe.dtype}")
    P = q_pe.shape[-1]
    if N < 1 or P < 1:
        fail(f"q_nope and q_pe need at least one dimension each, got N={N}, P={P}")
    if kv_b_weight.dim() != 2 or kv_b_weight.dtype != q_nope.dtype:
        fail(f"kv_b_weight must be the kv_b_proj weight [H*(N+V), R] of q's dtype {q_nope.dtype}, got "
             f"{tuple(kv_b_weight.shape)} {kv_b_weight.dtype}")
    rows, R = kv_b_weight.shape
    if H == 0 or rows % H or rows // H <= N:
        fail(f"kv_b_weight has {rows} rows: expected H*(N+V) with H={H}, N={N} and V >= 1")
    V = rows // H - N
    if cache.dtype == torch.uint8:
        if R % fp8_format.TILE or R < fp8_format.TILE or P % 2:
            fail(f"a packed FP8 cache needs R a multiple of {fp8_format.TILE} and P even, got R={R}, P={P}")
        width = fp8_format.row_bytes(R, P)
    else:
        if cache.dtype != q_nope.dtype:
            fail(f"cache must be the packed FP8 cache (uint8) or the model-dtype cache ({q_nope.dtype}), got "
                 f"{cache.dtype}")
        width = R + P
    if cache.dim() != 3 or cache.shape[-1] != width:
        fail(f"cache must be [num_blocks, page_size, {width}] for R={R}, P={P}, got shape {tuple(cache.shape)}")
    device = q_nope.device
    if q_pe.device != device or kv_b_weight.device != device or cache.device != device:
        devices = {t.device for t in (q_nope, q_pe, kv_b_weight, cache)}
        fail(f"q_nope, q_pe, kv_b_weight and cache must be on one device, got {sorted(map(str, devices))}")
    return H, N, P, R, V


def _check_mha_prefill(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder,
                       seq_lens_decoder, batch_id_per_token, kv_slots, kv_cu, scale, window, group, sinks,
                       data=True):
    _dims(q_nope, q_pe, kv_b_weight, cache)
    _check_scale(scale)
    if window < 0:
        fail(f"window must be >= 1 (or 0: full causal attention), got {window}")
    if sinks < 0:
        fail(f"sinks must be >= 0, got {sinks}")
    check_batch(q_nope.shape[0], block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, cache.shape[1], cache.shape[0], group, window=window or None,
                sinks=sinks, data=data)
    check_index("kv_slots", kv_slots, 1)
    check_index("kv_cu", kv_cu, 1)
    B = block_tables.shape[1]
    if kv_cu.shape[0] != B + 1:
        fail(f"kv_cu has {kv_cu.shape[0]} entries, expected batch size + 1 = {B + 1}")
    if {kv_slots.device, kv_cu.device, block_tables.device} != {q_nope.device}:
        fail("kv_slots, kv_cu and the step's metadata must be on q's device")
    if (data and checks_enabled() and q_nope.device.type != "meta"
            and mha_rows_validated(window, sinks) not in validated_entries((kv_slots, kv_cu), group)):
        _check_rows(block_tables[group], cu_seqlens_q, seq_lens_decoder, kv_slots, kv_cu, cache.shape[1],
                    window, sinks)


def _row_errors(bt, cu, dec, kv_slots, kv_cu, ps, window, sinks):
    """Device tensors: ``bad_cu`` (scalar bool: ``kv_cu`` malformed or its requests' row counts wrong) and
    ``bad_rows [M]`` (rows whose slot is not the one their position's page gives)."""
    W = _effective_window(window)
    s = sinks if window else 0
    M = kv_slots.shape[0]
    kc = kv_cu.long()
    dec = dec.long()
    q_lens = (cu[1:] - cu[:-1]).long()
    a = (dec - W + 1).clamp(min=0)
    n = a.clamp(max=s) + dec + q_lens - a
    rows = kc[1:] - kc[:-1]
    bad_cu = (kc[0] != 0) | (kc[-1] > M) | (rows < 0).any() | ((rows != 0) & (rows != n)).any()
    req, pos = _row_positions(kc, dec, W, s, M)
    if M and bt.shape[0]:
        # (A malformed kv_cu can give positions outside 0 … nb·ps - 1: clamped to index, then marked wrong.)
        blk = bt.long()[req, (pos // ps).clamp(min=0, max=bt.shape[1] - 1)]
        expect = torch.where((blk >= 0) & (pos >= 0) & (pos // ps < bt.shape[1]), blk * ps + pos.clamp(min=0) % ps, -2)
        # Rows past kv_cu[-1] belong to no request (a step's groups share one row count): -1.
        expect = torch.where(torch.arange(M, device=kc.device) >= kc[-1], -1, expect)
        bad_rows = expect != kv_slots.long()
    else:
        bad_rows = torch.zeros(M, dtype=torch.bool, device=kv_slots.device)
    return bad_cu, bad_rows, req, pos, n


def _check_rows(bt, cu, dec, kv_slots, kv_cu, ps, window, sinks) -> None:
    """Raise for rows that are not ``plan_mha_rows``'s. Now, not deferred: the rows are addresses the op reads
    through (a deferred check would run after the reads)."""
    bad_cu, bad_rows, req, pos, n = _row_errors(bt, cu, dec, kv_slots, kv_cu, ps, window, sinks)

    def report():
        if bool(bad_cu):
            fail(f"kv_cu must start at 0, not decrease, end at most at len(kv_slots) = {kv_slots.shape[0]} (rows "
                 "past its end -1), and give each "
                 f"request either no rows or exactly the rows its chunk needs (plan_mha_rows: {n.tolist()}); "
                 f"got {kv_cu.tolist()}")
        m = int(bad_rows.nonzero()[0, 0])
        if m >= int(kv_cu[-1]):
            fail(f"kv_slots[{m}] = {int(kv_slots[m])}, but rows past kv_cu[-1] = {int(kv_cu[-1])} belong to no "
                 "request and must be -1")
        fail(f"kv_slots[{m}] = {int(kv_slots[m])}, but row {m} is position {int(pos[m])} of request {int(req[m])}, "
             f"whose block table gives slot {int(bt.long()[req[m], pos[m] // ps]) * ps + int(pos[m]) % ps} "
             "(rows: plan_mha_rows)")

    if bool(bad_cu | bad_rows.any()):
        report()


# ---------------------------------------------------------------------------------------------- op
@torch.library.custom_op("swa_rewrite::mha_swa_prefill", mutates_args=())
def mha_swa_prefill_op(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor, cache: torch.Tensor,
                       block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                       seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, kv_slots: torch.Tensor,
                       kv_cu: torch.Tensor, scale: float, window: int, layer: int, group: int,
                       sinks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MHA-mode sliding-window prefill → ``o [T, H, V]`` (q dtype), ``lse [T, H]`` float32 (module docstring).

    ``block_tables [G, B, nb]``: the layer reads row ``group``; ``kv_slots``, ``kv_cu`` from ``plan_mha_rows``
    on that group's table."""
    _check_mha_prefill(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder,
                       seq_lens_decoder, batch_id_per_token, kv_slots, kv_cu, scale, window, group, sinks)
    return mha_swa_prefill_reference(q_nope, q_pe, kv_b_weight, cache, kv_slots, kv_cu, cu_seqlens_q,
                                     seq_lens_decoder, batch_id_per_token, scale, window, sinks)


@mha_swa_prefill_op.register_fake
def _(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
      batch_id_per_token, kv_slots, kv_cu, scale, window, layer, group, sinks=0):
    _check_mha_prefill(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder,
                       seq_lens_decoder, batch_id_per_token, kv_slots, kv_cu, scale, window, group, sinks,
                       data=False)
    T, H, N = q_nope.shape
    V = kv_b_weight.shape[0] // H - N
    return q_nope.new_empty(T, H, V), q_nope.new_empty(T, H, dtype=torch.float32)


def triton_supported(q_nope: torch.Tensor, cache: torch.Tensor) -> bool:
    """The Triton path takes bf16 / fp16 queries and caches whose rows are contiguous (packed rows 4-byte
    aligned, for the float32 scale loads); anything else takes the reference."""
    if q_nope.dtype not in (torch.bfloat16, torch.float16) or cache.stride(-1) != 1:
        return False
    if cache.dtype != torch.uint8:
        return True
    return cache.data_ptr() % 4 == 0 and all(cache.stride(d) % 4 == 0 for d in range(cache.dim() - 1))


@register_cuda(mha_swa_prefill_op)
def _(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
      batch_id_per_token, kv_slots, kv_cu, scale, window, layer, group, sinks=0):
    _check_mha_prefill(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder,
                       seq_lens_decoder, batch_id_per_token, kv_slots, kv_cu, scale, window, group, sinks)
    return mha_prefill_cuda(q_nope, q_pe, kv_b_weight, cache, kv_slots, kv_cu, cu_seqlens_q, seq_lens_decoder,
                            batch_id_per_token, scale, window, sinks)


def mha_prefill_cuda(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor, cache: torch.Tensor,
                     kv_slots: torch.Tensor, kv_cu: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, scale: float, window: int,
                     sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's CUDA path, inputs already checked: the Triton kernel, or the reference for what it does not
    take. ``kv_slots [M]`` / ``kv_cu [B + 1]`` of one group."""
    if not triton_supported(q_nope, cache):
        return mha_swa_prefill_reference(q_nope, q_pe, kv_b_weight, cache, kv_slots, kv_cu, cu_seqlens_q,
                                         seq_lens_decoder, batch_id_per_token, scale, window, sinks)
    from ..kernels.mha_window import mha_swa_prefill_fwd

    return mha_swa_prefill_fwd(q_nope, q_pe, kv_b_weight.contiguous(), cache, kv_slots.contiguous(),
                               kv_cu.contiguous(), cu_seqlens_q.contiguous(), seq_lens_decoder.contiguous(),
                               batch_id_per_token.contiguous(), scale, _effective_window(window),
                               sinks if window else 0)


register_inference_only(mha_swa_prefill_op)


# ------------------------------------------------------------------------------------- Python face
def mha_swa_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor, cache: torch.Tensor,
                    block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                    seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, kv_slots: torch.Tensor,
                    kv_cu: torch.Tensor, scale: float, *, window: int, sinks: int = 0, layer: int = -1,
                    group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.swa_rewrite.mha_swa_prefill`` taking one group's ``block_tables [B, nb]`` too (then
    ``group`` must be 0). Returns ``o [T, H, V]``, ``lse [T, H]`` (module docstring)."""
    from .attention import finite_scale
    from .checks import check_int

    if isinstance(block_tables, torch.Tensor) and block_tables.dim() == 2:
        block_tables = block_tables.unsqueeze(0)
    return torch.ops.swa_rewrite.mha_swa_prefill(
        q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
        batch_id_per_token, kv_slots, kv_cu, finite_scale(scale), check_int("window", window, minimum=0),
        check_int("layer", layer), check_int("group", group), check_int("sinks", sinks, minimum=0))
