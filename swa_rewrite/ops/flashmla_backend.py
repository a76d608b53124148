"""FlashMLA as an optional backend of the decode attention ops (docs/design.md §7, "FlashMLA backend"; issue 16).

**The switch.** One setting, default ``"triton"`` (our kernels everywhere), read by the ops each time they run —
not when a graph is traced — so eager calls, ``torch.compile`` graphs and CUDA graphs captured afterwards all
follow it. In order of precedence:

- ``with attention_backend("flashmla"): ...`` — this thread, for the block;
- ``set_attention_backend("flashmla")`` — the process (``None`` goes back to the environment);
- the environment variable ``SWA_REWRITE_ATTENTION_BACKEND=flashmla`` (read on every op call);
- ``"triton"``.

An unknown name is a ``ValueError`` naming it. A CUDA graph keeps the kernels it captured: capture again after
switching.

**What runs where** with ``"flashmla"`` selected. The CUDA implementations of two ops ask this module first:

- ``swa_mla_attention`` (SWA layers, packed FP8 cache): our indexer writes each token's window (and sinks) slots,
  ``-1`` padded to a multiple of 64, and FlashMLA's sparse FP8 decode (``flash_mla_with_kvcache(...,
  is_fp8_kvcache=True, indices=...)``) attends to them, every token a FlashMLA request of one query; heads are
  zero-padded to 64 (``H <= 64``) or 128 and the padding cut off the outputs.
- ``paged_mla_attention`` (full layers, bf16 cache, page size 64): every token becomes a FlashMLA request of one
  query over ``p + 1`` keys through its request's block-table row (``kernels.flashmla.decode_rows``), padding
  tokens over 0 keys; FlashMLA's dense decode attends.

FlashMLA runs only if ``flash_mla`` imports, the device is Hopper (sm_90), ``q`` is bf16, ``R = 512`` and
``P = 64``, the step is decode-shaped (``T <= 4 B``: one query token per request, up to 3 more for multi-token
prediction; a prefill is not), and for the sparse path ``H <= 128``, for the dense one ``H <= 128`` and page
size 64. Anything else returns ``None`` and the op runs our Triton kernels as before; the reason is logged once
per kind at debug level and counted (``stats``, ``last_fallback``).

Outputs keep the ops' contract: ``out [T, H, R]`` contiguous in q's dtype, ``lse [T, H]`` float32 natural log
(FlashMLA's lse is natural log too — its kernels store ``log(L) + max / log2(e)`` — ``[b, H, s_q]``, which for
``s_q = 1`` is ``[T, H]``), ``out = 0``, ``lse = +inf`` for a token with nothing to attend (FlashMLA's own rule
for a query with no valid index or zero keys).

**CUDA graphs.** Both paths launch only device work. FlashMLA's tile-scheduler metadata: for the sparse decode
it depends only on the shapes (every token attends to ``K`` entries), so one ``FlashMLASchedMeta`` per
``(device, T, heads, K, page size)`` is built by the first call *outside* capture and reused by every later call
— eager or captured — for that shape (DecodeGraphs' warm-up call is that first call). A shape seen first inside a
capture runs Triton for that capture (fallback ``capture-metadata``): a first test of metadata built inside a
capture saw NaN rows on replay (H200, 2026-11-28), though that test also read a position its cache never wrote, so
the cause was not isolated — the backend does not build it there either way. For the dense decode the metadata depends on
the key counts, which change every step, so every call builds it (FlashMLA's scheduling kernel runs as the first
kernel of the call, inside a captured graph too, reading the step's ``seqlens``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections import Counter
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from .swa_indexer import launch_swa_indexer, swa_indexer_reference

__all__ = ["attention_backend", "set_attention_backend", "get_attention_backend", "ENV_VAR", "BACKENDS",
           "stats", "last_fallback", "reset_stats", "flash_mla_module", "swa_decode", "dense_decode"]

log = logging.getLogger(__name__)

ENV_VAR = "SWA_REWRITE_ATTENTION_BACKEND"
BACKENDS = ("triton", "flashmla")

LATENT_RANK, ROPE_DIM = 512, 64        # FlashMLA's V3 layout: d_qk = 576, d_v = 512, 656-byte FP8 rows
MAX_HEADS = 128                        # sparse decode takes 64 or 128 (we pad up); dense is tested up to 128
DENSE_PAGE_SIZE = 64                   # FlashMLA's dense decode: "page_block_size must be 64"
TOPK_MULTIPLE = 64                     # sparse decode: topk % 64 == 0
MAX_TOKENS_PER_REQUEST = 4             # decode-shaped step: T <= 4 B (one token per request, MTP up to 1 + 3)
MAX_TOKENS = 8192                      # FlashMLA's scheduler keeps 3 ints per request in shared memory
MAX_CACHED_METADATA = 4096             # sparse metadata objects kept; beyond, calls build their own


# ------------------------------------------------------------------------------------------------ switch
_thread = threading.local()
_process_backend: Optional[str] = None
_env_parsed: tuple[Optional[str], str] = (None, "triton")


def _normalise(name: Any, where: str = "") -> str:
    if not isinstance(name, str):
        raise TypeError(f"attention backend must be a string, one of {BACKENDS}, got {name!r}{where}")
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}{where}; choose one of {', '.join(map(repr, BACKENDS))}")
    return key


def _env_backend() -> str:
    global _env_parsed
    raw = os.environ.get(ENV_VAR, "")
    if raw != _env_parsed[0]:
        _env_parsed = (raw, _normalise(raw, f" (environment variable {ENV_VAR})") if raw.strip() else "triton")
    return _env_parsed[1]


def get_attention_backend() -> str:
    """The backend the decode attention ops use now: this thread's ``attention_backend`` block, else
    ``set_attention_backend``'s, else ``$SWA_REWRITE_ATTENTION_BACKEND``, else ``"triton"``."""
    override = getattr(_thread, "backend", None)
    if override is not None:
        return override
    if _process_backend is not None:
        return _process_backend
    return _env_backend()


def set_attention_backend(name: Optional[str]) -> Optional[str]:
    """Select the decode attention backend for the process: ``"triton"`` (default) or ``"flashmla"``; ``None``
    returns to the environment variable. Returns the previous process setting (``None`` if there was none)."""
    global _process_backend
    previous = _process_backend
    _process_backend = None if name is None else _normalise(name)
    return previous


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[str]:
    """Select the decode attention backend (``"triton"`` or ``"flashmla"``) in this thread for the block."""
    key = _normalise(name)
    previous = getattr(_thread, "backend", None)
    _thread.backend = key
    try:
        yield key
    finally:
        _thread.backend = previous


# ----------------------------------------------------------------------------------- availability, decisions
_UNSET = object()
_module: Any = _UNSET
_import_error = ""
_capabilities: dict[int, tuple[int, int]] = {}


def flash_mla_module() -> Any:
    """The ``flash_mla`` module, or ``None`` when it does not import (tried once per process)."""
    global _module, _import_error
    if _module is _UNSET:
        try:
            import flash_mla  # noqa: PLC0415
            _module = flash_mla
        except Exception as e:  # noqa: BLE001  (absent wheel, a .so built for another torch or CUDA, ...)
            _module, _import_error = None, f"{type(e).__name__}: {e}"
    return _module


def _capability(device: torch.device) -> Optional[tuple[int, int]]:
    """``(major, minor)`` of a CUDA device (cached per device), ``None`` for any other device."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capabilities.get(index)
    if cap is None:
        cap = _capabilities[index] = tuple(torch.cuda.get_device_capability(index))
    return cap


@dataclasses.dataclass(frozen=True)
class Fallback:
    """Why an op did not run FlashMLA: ``code`` (stable, for tests and counters) and a sentence."""
    code: str
    message: str


def padded_heads(heads: int) -> int:
    """Heads FlashMLA's sparse decode runs for ``heads`` query heads: 64 or 128 (``heads <= 128``)."""
    return 64 if heads <= 64 else 128


def padded_topk(k: int) -> int:
    """``k`` rounded up to FlashMLA's sparse top-k granule (64); ``-1`` entries fill the rest."""
    return max(TOPK_MULTIPLE, -(-k // TOPK_MULTIPLE) * TOPK_MULTIPLE)


def unsupported(kind: str, *, flash_mla_error: Optional[str], capability: Optional[tuple[int, int]],
                dtype: torch.dtype, heads: int, latent_dim: int, rope_dim: int, tokens: int, requests: int,
                page_size: int) -> Optional[Fallback]:
    """Whether FlashMLA can run a decode-attention call, from plain facts about it (no tensors, no device):
    ``None`` if it can, else the ``Fallback``. ``kind``: ``"swa"`` (sparse FP8 decode) or ``"dense"``."""
    if kind not in ("swa", "dense"):
        raise ValueError(f"kind must be 'swa' or 'dense', got {kind!r}")
    if flash_mla_error is not None:
        return Fallback("unavailable", f"flash_mla does not import ({flash_mla_error})")
    if capability is None:
        return Fallback("not-cuda", "not a CUDA device")
    if capability[0] != 9:
        return Fallback("not-hopper", f"the GPU is sm_{capability[0]}{capability[1]}; FlashMLA's decode kernels "
                                      f"need Hopper (sm_90)")
    if dtype != torch.bfloat16:
        return Fallback("dtype", f"q is {dtype}; FlashMLA takes bfloat16")
    R = latent_dim - rope_dim
    if (R, rope_dim) != (LATENT_RANK, ROPE_DIM):
        return Fallback("dims", f"R = {R}, P = {rope_dim}; FlashMLA takes R = {LATENT_RANK}, P = {ROPE_DIM}")
    if not 1 <= heads <= MAX_HEADS:
        how = "zero-padded to 64 or 128" if kind == "swa" else "as many as FlashMLA's dense decode is tested with"
        return Fallback("heads", f"{heads} heads; the FlashMLA backend takes 1 … {MAX_HEADS} ({how})")
    if kind == "dense" and page_size != DENSE_PAGE_SIZE:
        return Fallback("page-size", f"page size {page_size}; FlashMLA's dense decode needs {DENSE_PAGE_SIZE}")
    if tokens == 0 or requests == 0:
        return Fallback("empty", f"an empty step ({tokens} tokens, {requests} requests)")
    if tokens > MAX_TOKENS_PER_REQUEST * requests:
        return Fallback("prefill", f"a prefill-shaped step ({tokens} tokens for {requests} requests, more than "
                                   f"{MAX_TOKENS_PER_REQUEST} per request); FlashMLA runs decode steps")
    if tokens > MAX_TOKENS:
        return Fallback("tokens", f"{tokens} tokens in one step; the FlashMLA backend takes at most {MAX_TOKENS}")
    return None


def _layout_fallback(kind: str, cache: torch.Tensor) -> Optional[Fallback]:
    """FlashMLA reads rows with 16-byte vector loads / TMA: contiguous rows, 16-byte aligned base and block
    stride (a padded block stride is fine)."""
    es = cache.element_size()
    rows_ok = cache.stride(-1) == 1 and cache.stride(1) == cache.shape[-1]
    if not (rows_ok and cache.data_ptr() % 16 == 0 and cache.stride(0) * es % 16 == 0):
        return Fallback("layout", f"cache strides {tuple(cache.stride())} (rows must be contiguous, the base and "
                                  f"block stride 16-byte aligned)")
    return None


# ------------------------------------------------------------------------------------------- debug hooks
stats: Counter = Counter()            # "swa:flashmla", "swa:triton", "dense:flashmla", "dense:triton"
_last: dict[str, Optional[Fallback]] = {}
_logged: set = set()
_lock = threading.Lock()


def _record(kind: str, fallback: Optional[Fallback]) -> None:
    with _lock:
        stats[f"{kind}:{'flashmla' if fallback is None else 'triton'}"] += 1
        _last[kind] = fallback
        if fallback is not None and (kind, fallback.code) not in _logged:
            _logged.add((kind, fallback.code))
            log.debug("swa_rewrite: %s attention runs Triton, not FlashMLA: %s", kind, fallback.message)


def last_fallback(kind: str) -> Optional[Fallback]:
    """Why the latest ``kind`` (``"swa"`` / ``"dense"``) call with the FlashMLA backend selected ran Triton
    (``None``: it ran FlashMLA, or there was none). Counted per call made, not per CUDA-graph replay."""
    return _last.get(kind)


def reset_stats() -> None:
    """Clear ``stats`` and ``last_fallback`` (the debug log still says each reason once per process)."""
    with _lock:
        stats.clear()
        _last.clear()


# ------------------------------------------------------------------------------------- scheduling metadata
_sparse_metadata: dict[tuple, Any] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _sparse_key(q: torch.Tensor, cache: torch.Tensor, topk: int) -> tuple:
    """The sparse metadata's cache key of a call: device, tokens, padded heads, padded top-k, page size."""
    return (q.device.type, q.device.index, q.shape[0], padded_heads(q.shape[1]), padded_topk(topk), cache.shape[1])


def _sparse_meta(fm: Any, device: torch.device, key: tuple) -> tuple[Any, bool]:
    """(metadata object, whether to cache it after the call): the cached one for ``key``, else a fresh one."""
    meta = _sparse_metadata.get(key)
    if meta is not None:
        return meta, False
    keep = not _capturing(device) and len(_sparse_metadata) < MAX_CACHED_METADATA
    if not keep and ("capture-metadata", key) not in _logged:
        _logged.add(("capture-metadata", key))
        log.debug("swa_rewrite: FlashMLA sparse metadata for %s built %s (not cached)", key,
                  "inside a CUDA-graph capture" if _capturing(device) else "past the cache's limit")
    return fm.get_mla_metadata()[0], keep


# ------------------------------------------------------------------------------------------------- paths
def sparse_decode(fm: Any, q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's sparse FP8 decode of ``q [T, H, 576]`` (bf16, ``H <= 128``) over the packed ``cache [NB, ps,
    656]`` (or ``[NB, ps, 1, 656]``) at ``indices int32 [T, 1, K]`` (``-1`` skipped) → ``out [T, H, 512]``,
    ``lse [T, H]``. Pads heads to 64 / 128 and ``K`` to a multiple of 64; each token is a request of one query."""
    T, H, D = q.shape
    Hp, K = padded_heads(H), indices.shape[-1]
    Kp = padded_topk(K)
    indices = indices.reshape(T, 1, K).to(torch.int32)
    if Kp != K:
        indices = F.pad(indices, (0, Kp - K), value=-1)
    q = q.contiguous() if Hp == H else F.pad(q, (0, 0, 0, Hp - H))
    kv = cache if cache.dim() == 4 else cache.unsqueeze(2)                   # [NB, ps, 1, 656]
    key = _sparse_key(q, kv, K)
    meta, keep = _sparse_meta(fm, q.device, key)
    out, lse = fm.flash_mla_with_kvcache(q.unsqueeze(1), kv, None, None, LATENT_RANK, meta, softmax_scale=scale,
                                         is_fp8_kvcache=True, indices=indices.contiguous())
    if keep:
        _sparse_metadata[key] = meta
    out, lse = out.reshape(T, Hp, -1), lse.reshape(T, Hp)
    if Hp != H:
        out, lse = out[:, :H], lse[:, :H]
    return out.contiguous(), lse.float().contiguous()


def swa_decode(fm: Any, q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
               cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor,
               scale: float, window: int, sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused SWA op on FlashMLA: our indexer (window + sinks slots of each token, ``-1`` outside; one group's
    ``block_tables [B, nb]``, window-bounded or not) feeding ``sparse_decode``."""
    from .attention import _reachable  # noqa: PLC0415  (attention imports this module)

    window, sinks = _reachable(window, sinks, block_tables, cache)
    if q.device.type == "cuda":
        T = q.shape[0]
        indices = torch.empty(T, 1, sinks + window, dtype=torch.int32, device=q.device)
        num_valid = torch.empty(T, dtype=torch.int32, device=q.device)
        launch_swa_indexer(block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, indices, num_valid,
                           window=window, page_size=cache.shape[1], sinks=sinks)
    else:   # a stand-in flash_mla in the CPU tests
        indices, _ = swa_indexer_reference(block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token,
                                           window, cache.shape[1], sinks)
    return sparse_decode(fm, q, cache, indices, scale)


def decode_rows_reference(block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                          batch_id_per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of ``kernels.flashmla.decode_rows``: ``(seqlens int32 [T], rows int32 [T, nb])``."""
    req = batch_id_per_token.long()
    live = req >= 0
    r = req.clamp(min=0)
    t = torch.arange(req.shape[0], device=req.device)
    n = seq_lens_decoder.long()[r] + t - cu_seqlens_q.long()[r] + 1
    rows = torch.where(live[:, None], block_tables.long()[r], 0)
    return torch.where(live, n, 0).to(torch.int32), rows.to(torch.int32)


def dense_decode(fm: Any, q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                 cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's dense decode of ``q [T, H, 576]`` over the bf16 paged ``cache [NB, 64, 576]`` through one
    group's ``block_tables [B, nb]`` (``B >= 1``): token ``t`` at position ``p`` of request ``r`` is a FlashMLA
    request of one query over ``p + 1`` keys through table row ``r``; a padding token over 0 keys."""
    T, H, _ = q.shape
    if q.device.type == "cuda":
        from ..kernels.flashmla import decode_rows  # noqa: PLC0415

        seqlens, rows = decode_rows(block_tables, cu_seqlens_q.contiguous(), seq_lens_decoder.contiguous(),
                                    batch_id_per_token.contiguous())
    else:   # a stand-in flash_mla in the CPU tests
        seqlens, rows = decode_rows_reference(block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token)
    meta = fm.get_mla_metadata()[0]     # fresh: the split plan follows this step's key counts
    out, lse = fm.flash_mla_with_kvcache(q.contiguous().unsqueeze(1), cache.unsqueeze(2), rows, seqlens,
                                         LATENT_RANK, meta, softmax_scale=scale, causal=False)
    return out.reshape(T, H, -1).contiguous(), lse.reshape(T, H).float().contiguous()


# ---------------------------------------------------------------------------------------- the ops' hooks
def _fallback(kind: str, q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
              rope_dim: int) -> Optional[Fallback]:
    fm = flash_mla_module()
    # A table without columns holds no position: only padding tokens can come with it (FlashMLA takes none).
    requests = block_tables.shape[0] if block_tables.shape[1] > 0 else 0
    found = unsupported(kind, flash_mla_error=None if fm is not None else _import_error,
                        capability=_capability(q.device), dtype=q.dtype, heads=q.shape[1], latent_dim=q.shape[2],
                        rope_dim=rope_dim, tokens=q.shape[0], requests=requests, page_size=cache.shape[1])
    return found or _layout_fallback(kind, cache)


def try_swa_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, scale: float, rope_dim: int,
                   window: int, sinks: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``swa_mla_attention``'s hook: ``(out, lse)`` from FlashMLA when it is selected and can run this call,
    else ``None`` (the op runs Triton). One group's ``block_tables [B, nb]``; checked metadata."""
    if get_attention_backend() != "flashmla":
        return None
    fallback = _fallback("swa", q, cache, block_tables, rope_dim)
    if fallback is None and _capturing(q.device):
        from .attention import _reachable  # noqa: PLC0415  (attention imports this module)

        w, s = _reachable(window, sinks, block_tables, cache)
        if _sparse_key(q, cache, s + w) not in _sparse_metadata:
            fallback = Fallback("capture-metadata", "FlashMLA's sparse scheduling metadata of this shape was not "
                                "built before the CUDA-graph capture (run one eager step of the shape first, as "
                                "DecodeGraphs' warm-up does)")
    _record("swa", fallback)
    if fallback is not None:
        return None
    return swa_decode(flash_mla_module(), q, cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                      batch_id_per_token, scale, window, sinks)


def try_dense_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, scale: float,
                     rope_dim: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``paged_mla_attention``'s hook, as ``try_swa_decode`` (model-dtype cache ``[NB, ps, D]``)."""
    if get_attention_backend() != "flashmla":
        return None
    fallback = _fallback("dense", q, cache, block_tables, rope_dim)
    if fallback is None and cache.dtype != q.dtype:
        fallback = Fallback("dtype", f"cache is {cache.dtype}, q {q.dtype}")
    _record("dense", fallback)
    if fallback is not None:
        return None
    return dense_decode(flash_mla_module(), q, cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                        batch_id_per_token, scale)
