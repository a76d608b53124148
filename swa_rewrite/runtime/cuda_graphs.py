"""CUDA-graph decode per batch-size bucket (docs/design.md §5): ``DecodeGraphs``.

Serving engines run decode steps — one token per request — as CUDA graphs captured once per batch-size
bucket, with the step's inputs in persistent buffers that each step overwrites in place; prefill and mixed
steps run outside graphs. ``DecodeGraphs`` is that runner for any model step ``fn`` called as
``fn(input_ids, kv_caches=..., meta=..., logits_indices=...)``: an ``MLAModel``, the rewritten ``SWAModule``,
what ``swa_rewrite.compile`` returns (Inductor, default mode: the graph here replaces reduce-overhead's), or
any function with that call.

- **Buckets.** A step of ``B`` requests runs in the smallest bucket ``b >= B`` (default buckets: powers of two
  up to ``max_batch``, and ``max_batch``). Rows ``B … b-1`` are padding requests: no query token
  (``cu_seqlens_q`` stays at ``B``), nothing cached, block-table rows ``-1``; tokens ``B … b-1`` are padding
  tokens (``batch_id_per_token = -1``, ``slot_mapping = -1``: they write nothing, their logits are dropped).
  The step metadata keeps the conventions of ``StepBatch.build`` and passes the model's eager checks.
- **Buffers.** One device byte buffer holds every step input of a bucket packed back to back, each field
  16-byte aligned: ``input_ids [b]``, ``positions [b]``, ``slot_mapping [G, b]`` (int64), ``cu_seqlens_q
  [b + 1]``, ``seq_lens_encoder [b]``, ``seq_lens_decoder [b]``, ``batch_id_per_token [b]``, ``block_tables
  [G, b, max_blocks]`` (int32). Every bucket's views start at the buffer's first byte (one bucket runs at a
  time); ``logits_indices`` is a constant ``arange`` (a decode's last token of request ``i`` is row ``i``).
  A step whose tensors are on the host is packed into a pinned staging copy of that layout and goes to the
  device in **one** copy of ``copy_bytes(B)`` bytes; a step already on the device is copied field by field
  (same bytes). Caches, parameters and buffers of the model are never copied: the graph reads and writes
  them at the addresses it was captured with.
- **Capture.** Lazily, on a bucket's first step: ``warmup`` eager calls on a side stream (Triton compiles,
  Dynamo/Inductor compiles, allocator warm-up), then the capture into a memory pool all buckets share, all
  under ``ops.checks.checks_disabled()`` and ``torch.inference_mode()``. A warm-up call writes the step's own
  latents to the step's own slots, which the replay writes again: nothing else in the caches changes.
- ``graphs=False`` runs the same buffers eagerly (checks as the caller has them): the padding and buffer
  logic without a GPU.

Returned logits ``[B, vocab]`` are a view of the graph's output (or the eager call's): valid until the next
``run``. Counters: ``captures``, ``replays``, ``eager_runs``, ``bytes_copied``.

The engine hook this is written for (``Engine(..., cuda_graphs=True)``)::

    # Engine.__init__: one runner over the engine's caches; max_blocks: table columns of the longest request
    self.decode_graphs = DecodeGraphs(model, self.kv_caches, num_groups=self.num_groups,
                                      page_size=self.page_size, max_blocks=-(-max_model_len // self.page_size),
                                      max_batch=max_decode_batch, device=self.device) if cuda_graphs else None
    # Engine._step: decode-only steps replay a graph, anything else runs as today
    batch = StepBatch.build(items, self.page_size, num_groups=self.num_groups, device=self.device)
    if self.decode_graphs is not None and self.decode_graphs.accepts(batch):
        logits = self.decode_graphs.run(batch).float()          # rows = requests, as logits_indices gives
    else:
        logits = self.model(batch.input_ids, kv_caches=self.kv_caches, meta=batch.meta,
                            logits_indices=logits_indices).float()

(building the batch with ``device="cpu"`` when ``accepts`` holds saves the per-field host-to-device copies
of ``StepBatch.build``: the runner then sends the whole step in one pinned copy.)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from ..ops.checks import check_int, checks_disabled
from ..ops.step_metadata import StepMetadata
from .batch import StepBatch

__all__ = ["DecodeGraphs", "default_buckets"]

_ALIGN = 16          # bytes: Triton specialises pointers on 16-byte alignment, Inductor assumes it

# (field, dtype, value of padding entries); cu_seqlens_q pads with B (no query token), block_tables with -1.
_FIELDS: tuple[tuple[str, torch.dtype, Optional[int]], ...] = (
    ("input_ids", torch.int64, 0),
    ("positions", torch.int64, 0),
    ("slot_mapping", torch.int64, -1),
    ("cu_seqlens_q", torch.int32, None),
    ("seq_lens_encoder", torch.int32, 0),
    ("seq_lens_decoder", torch.int32, 0),
    ("batch_id_per_token", torch.int32, -1),
    ("block_tables", torch.int32, -1),
    ("mha_kv_slots", torch.int32, -1),         # [G, 0]: a decode step has no MHA-mode prefill rows
    ("mha_kv_cu", torch.int32, 0),
)


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """``1, 2, 4, …`` up to ``max_batch``, and ``max_batch`` itself."""
    max_batch = check_int("max_batch", max_batch, minimum=1)
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return tuple(out + [max_batch])


def _field_shape(name: str, b: int, G: int, nb: int) -> tuple[int, ...]:
    if name == "slot_mapping":
        return (G, b)
    if name == "block_tables":
        return (G, b, nb)
    if name == "cu_seqlens_q":
        return (b + 1,)
    if name == "mha_kv_slots":
        return (G, 0)
    if name == "mha_kv_cu":
        return (G, b + 1)
    return (b,)


def _layout(b: int, G: int, nb: int) -> tuple[dict[str, tuple[int, torch.dtype, tuple[int, ...]]], int]:
    """``{field: (byte offset, dtype, shape)}`` of bucket ``b`` and the bytes it spans."""
    out, offset = {}, 0
    for name, dtype, _ in _FIELDS:
        shape = _field_shape(name, b, G, nb)
        out[name] = (offset, dtype, shape)
        offset += -(-(dtype.itemsize * math.prod(shape)) // _ALIGN) * _ALIGN
    return out, offset


def _views(buffer: torch.Tensor, layout: dict) -> dict[str, torch.Tensor]:
    """The fields of ``layout`` as typed views of the byte ``buffer``."""
    return {name: buffer[offset:offset + dtype.itemsize * math.prod(shape)].view(dtype).view(shape)
            for name, (offset, dtype, shape) in layout.items()}


def _source(batch: StepBatch, name: str) -> torch.Tensor:
    return batch.input_ids if name == "input_ids" else getattr(batch.meta, name)


def _fill(views: dict[str, torch.Tensor], batch: StepBatch, B: int) -> None:
    """Write the ``B``-request decode ``batch`` into one bucket's ``views`` in place, padding the rest."""
    for name, _, pad in _FIELDS:
        v, src = views[name], _source(batch, name)
        if name == "cu_seqlens_q":
            v[:B + 1].copy_(src)
            v[B + 1:].fill_(B)
        elif name == "slot_mapping":
            v[:, :B].copy_(src)
            v[:, B:].fill_(pad)
        elif name == "block_tables":
            w = src.shape[2]
            v[:, :B, :w].copy_(src)
            v[:, :B, w:].fill_(pad)
            v[:, B:].fill_(pad)
        elif name in ("mha_kv_slots", "mha_kv_cu"):
            v.fill_(pad)                       # no rows (``rejection`` refuses a step with MHA rows)
        else:
            v[:B].copy_(src)
            v[B:].fill_(pad)


class DecodeGraphs:
    """Decode steps of ``fn`` as CUDA graphs, one per batch-size bucket (see the module docstring).

    Args:
        fn: the model step, called ``fn(input_ids [b] int64, kv_caches=kv_caches, meta=StepMetadata,
            logits_indices=[b] int64)`` and returning logits ``[b, vocab]``.
        kv_caches: the caches ``fn`` reads and writes, one per layer; the graphs capture their addresses, so
            they must stay the same tensors for the runner's life.
        num_groups: the model's cache groups ``G`` (the leading dimension of the step's tables and slots).
        page_size: positions per block (every cache's second dimension).
        max_blocks: block-table columns ``nb`` of the buffers: a step's tables may be narrower (padded with
            ``-1``), not wider. The attention kernels plan for ``max_blocks * page_size`` positions.
        max_batch: the most requests of one step (the largest bucket), unless ``buckets`` gives them.
        buckets: increasing batch sizes to capture (default ``default_buckets(max_batch)``).
        device: where the buffers and graphs live (default: the first cache's device).
        graphs: capture and replay CUDA graphs (default: on a CUDA device); False runs the buffers eagerly.
        warmup: eager calls on a side stream before each capture.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], kv_caches: Sequence[torch.Tensor], *, num_groups: int,
                 page_size: int, max_blocks: int, max_batch: Optional[int] = None,
                 buckets: Optional[Sequence[int]] = None, device: torch.device | str | None = None,
                 graphs: Optional[bool] = None, warmup: int = 1):
        if not callable(fn):
            raise TypeError(f"fn must be callable (a model step), got {type(fn).__name__}")
        if not isinstance(kv_caches, (list, tuple)) or not all(isinstance(c, torch.Tensor) for c in kv_caches):
            raise TypeError("kv_caches must be a list with one cache tensor per layer")
        self.num_groups = check_int("num_groups", num_groups, minimum=1)
        self.page_size = check_int("page_size", page_size, minimum=1)
        self.max_blocks = check_int("max_blocks", max_blocks, minimum=1)
        self.warmup = check_int("warmup", warmup, minimum=0)
        self.buckets = self._check_buckets(buckets, max_batch)
        self.max_batch = self.buckets[-1]
        if device is None:
            if not kv_caches:
                raise ValueError("pass device= when there are no caches to take it from")
            device = kv_caches[0].device
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        for i, c in enumerate(kv_caches):
            if c.device != device:
                raise ValueError(f"kv_caches[{i}] is on {c.device}, the runner's device is {device}")
            if c.dim() < 2 or c.shape[1] != self.page_size:
                raise ValueError(f"kv_caches[{i}] has shape {tuple(c.shape)}: expected [num_blocks, "
                                 f"page_size={self.page_size}, ...]")
        self.graphs = device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}: pass graphs=False to run the "
                             "buffers eagerly")
        self.fn, self.kv_caches = fn, list(kv_caches)

        self._layouts = {b: _layout(b, self.num_groups, self.max_blocks) for b in self.buckets}
        span = max(n for _, n in self._layouts.values())
        self._buffer = torch.zeros(span, dtype=torch.uint8, device=device)
        self._logits_indices = torch.arange(self.max_batch, dtype=torch.int64, device=device)
        # Host steps are packed here, then sent in one copy; pinned so the copy is asynchronous.
        self._staging = (torch.zeros(span, dtype=torch.uint8, pin_memory=True) if device.type == "cuda" else None)
        self._staging_free: Optional[torch.cuda.Event] = None     # the last copy out of the staging buffer
        self._views: dict[int, dict[str, torch.Tensor]] = {}
        self._staging_views: dict[int, dict[str, torch.Tensor]] = {}
        self._inputs: dict[int, tuple[torch.Tensor, StepMetadata, torch.Tensor]] = {}
        self._graphs: dict[int, Any] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._pool = None
        self.captures = 0
        self.replays = 0
        self.eager_runs = 0
        self.bytes_copied = 0

    @staticmethod
    def _check_buckets(buckets: Optional[Sequence[int]], max_batch: Optional[int]) -> tuple[int, ...]:
        if buckets is None:
            if max_batch is None:
                raise TypeError("DecodeGraphs needs max_batch= or buckets=")
            return default_buckets(max_batch)
        out = tuple(check_int("buckets entry", b, minimum=1) for b in buckets)
        if not out or any(a >= b for a, b in zip(out, out[1:])):
            raise ValueError(f"buckets must be a non-empty, strictly increasing list of batch sizes, got {list(buckets)}")
        if max_batch is not None and check_int("max_batch", max_batch, minimum=1) != out[-1]:
            raise ValueError(f"max_batch={max_batch} differs from the largest bucket {out[-1]}")
        return out

    # ------------------------------------------------------------------------------------------ queries
    def bucket_for(self, batch_size: int) -> int:
        """The bucket a step of ``batch_size`` requests runs in: the smallest ``>= batch_size``."""
        batch_size = check_int("batch_size", batch_size, minimum=1)
        for b in self.buckets:
            if b >= batch_size:
                return b
        raise ValueError(f"{batch_size} requests exceed the largest bucket, max_batch={self.max_batch}")

    def copy_bytes(self, batch_size: int) -> int:
        """Bytes of step inputs one ``run`` of ``batch_size`` requests writes into the buffers (its bucket's
        ``input_ids`` and ``StepMetadata``, each field padded to 16 bytes): a host step's one copy."""
        return self._layouts[self.bucket_for(batch_size)][1]

    def metadata_bytes(self, batch_size: int) -> int:
        """Bytes of the bucket's ``input_ids`` and ``StepMetadata`` tensors themselves (no alignment padding)."""
        return sum(v.numel() * v.element_size() for v in self._bucket_views(self.bucket_for(batch_size)).values())

    def step_inputs(self, batch_size: int) -> tuple[torch.Tensor, StepMetadata, torch.Tensor]:
        """``(input_ids, meta, logits_indices)``: the persistent views ``fn`` is called with for the bucket of
        ``batch_size`` requests (what a graph reads)."""
        bucket = self.bucket_for(batch_size)
        if bucket not in self._inputs:
            views = self._bucket_views(bucket)
            meta = StepMetadata(**{name: v for name, v in views.items() if name != "input_ids"})
            self._inputs[bucket] = (views["input_ids"], meta, self._logits_indices[:bucket])
        return self._inputs[bucket]

    def input_buffers(self) -> list[torch.Tensor]:
        """The device tensors a ``run`` writes before a replay (everything else a graph reads it reads in place)."""
        return [self._buffer, self._logits_indices]

    def rejection(self, batch: StepBatch) -> Optional[str]:
        """Why ``run`` would refuse ``batch`` (from shapes and devices only: no host synchronisation), or None."""
        if not isinstance(batch, StepBatch):
            return f"expected a swa_rewrite.runtime.StepBatch, got {type(batch).__name__}"
        meta = batch.meta
        B, T = meta.seq_lens_decoder.shape[0], batch.input_ids.shape[0]
        if B == 0:
            return "the step has no requests"
        if T != B:
            return (f"a CUDA-graph decode step runs one token per request: this step has {T} tokens for {B} "
                    "requests (prefill chunks, multi-token decodes and padded steps run outside the graphs)")
        if B > self.max_batch:
            return f"{B} requests exceed the largest bucket, max_batch={self.max_batch}"
        G, _, nb = meta.block_tables.shape
        if G != self.num_groups:
            return f"the step's block tables have {G} cache group(s), the runner {self.num_groups}"
        if nb > self.max_blocks:
            return (f"the step's block tables have {nb} columns, more than the runner's max_blocks="
                    f"{self.max_blocks}")
        if meta.slot_mapping.shape != (G, T):
            return f"slot_mapping {tuple(meta.slot_mapping.shape)} must be [G={G}, T={T}]"
        if meta.has_mha:
            return "the step has MHA-mode prefill rows: prefill runs outside the graphs"
        devices = {t.device for t in (batch.input_ids, *(getattr(meta, n) for n, _, _ in _FIELDS[1:]))}
        if len(devices) != 1 or next(iter(devices)) not in (self.device, torch.device("cpu")):
            return f"the step's tensors are on {sorted(map(str, devices))}: expected all on {self.device} or the CPU"
        return None

    def accepts(self, batch: StepBatch) -> bool:
        """Whether ``run`` takes ``batch`` (``rejection(batch) is None``)."""
        return self.rejection(batch) is None

    # ---------------------------------------------------------------------------------------------- run
    def run(self, batch: StepBatch, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, vocab]`` of the ``B``-request decode step ``batch`` (one token per request), through
        its bucket's graph (captured on the bucket's first step) or, with ``graphs=False``, eagerly.

        ``input_ids``: the step's ``[B]`` int64 token ids on the device, used instead of ``batch.input_ids`` (an
        engine overlapping its steps passes the previous step's greedy tokens, which the host has not read).
        The step's latents are written to its slots in ``kv_caches``; padding writes nothing. The result is a
        view valid until the next ``run``. ``ValueError`` for a step that is not a one-token-per-request
        decode the buffers can hold (``rejection``) or ``input_ids`` of another shape, dtype or device;
        ``TypeError`` for anything but a ``StepBatch``.
        """
        reason = self.rejection(batch)
        if reason is not None:
            raise (TypeError if not isinstance(batch, StepBatch) else ValueError)(reason)
        B = batch.input_ids.shape[0]
        if input_ids is not None and (not isinstance(input_ids, torch.Tensor) or input_ids.shape != (B,)
                                      or input_ids.dtype != torch.int64 or input_ids.device != self.device):
            raise ValueError(f"input_ids must be a [{B}] int64 tensor on {self.device}, got "
                             + (f"{tuple(input_ids.shape)} {input_ids.dtype} on {input_ids.device}"
                                if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__))
        bucket = self.bucket_for(B)
        # Under inference mode throughout: the buffers' views may first be made inside it (a capture, an engine
        # step), and inference-mode views take in-place writes only inside it.
        with torch.inference_mode():
            return self._run(batch, B, bucket, input_ids)

    def _run(self, batch: StepBatch, B: int, bucket: int, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if batch.input_ids.device.type == "cpu":
            cu = batch.meta.cu_seqlens_q
            if not torch.equal(cu.long(), torch.arange(B + 1)):
                raise ValueError(f"a CUDA-graph decode step runs one token per request: cu_seqlens_q is "
                                 f"{cu.tolist()}")
            self._fill_from_host(batch, bucket)
        else:
            _fill(self._bucket_views(bucket), batch, B)
        if input_ids is not None:
            self._bucket_views(bucket)["input_ids"][:B].copy_(input_ids)
        self.bytes_copied += self._layouts[bucket][1]
        if not self.graphs:
            out = self._call(bucket)
            self.eager_runs += 1
            return out[:B]
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = self._capture(bucket)
        graph.replay()
        self.replays += 1
        return self._outputs[bucket][:B]

    # -------------------------------------------------------------------------------------------- inside
    def _bucket_views(self, bucket: int) -> dict[str, torch.Tensor]:
        if bucket not in self._views:
            self._views[bucket] = _views(self._buffer, self._layouts[bucket][0])
        return self._views[bucket]

    def _fill_from_host(self, batch: StepBatch, bucket: int) -> None:
        """Pack a host step into the staging buffer and send it in one copy (on a CPU device: in place)."""
        if self._staging is None:
            _fill(self._bucket_views(bucket), batch, batch.input_ids.shape[0])
            return
        if self._staging_free is not None:
            self._staging_free.synchronize()          # the previous step's copy has left the staging buffer
        if bucket not in self._staging_views:
            self._staging_views[bucket] = _views(self._staging, self._layouts[bucket][0])
        _fill(self._staging_views[bucket], batch, batch.input_ids.shape[0])
        n = self._layouts[bucket][1]
        self._buffer[:n].copy_(self._staging[:n], non_blocking=True)
        self._staging_free = torch.cuda.Event()
        self._staging_free.record()

    def _call(self, bucket: int) -> torch.Tensor:
        input_ids, meta, logits_indices = self.step_inputs(bucket)
        return self.fn(input_ids, kv_caches=self.kv_caches, meta=meta, logits_indices=logits_indices)

    def _capture(self, bucket: int):
        """Warm up and capture the graph of ``bucket`` (its buffers hold the current step)."""
        with torch.cuda.device(self.device), torch.inference_mode(), checks_disabled():
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._call(bucket)
            current.wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool):
                    out = self._call(bucket)
            except Exception as e:
                raise RuntimeError(f"capturing the decode step of bucket {bucket} as a CUDA graph failed: the "
                                   f"step must not synchronise with the host or allocate outside the "
                                   f"graph's pool ({type(e).__name__}: {e})") from e
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"fn must return the logits tensor, got {type(out).__name__}")
        self._graphs[bucket], self._outputs[bucket] = graph, out
        self.captures += 1
        return graph

    def __repr__(self) -> str:
        return (f"DecodeGraphs(buckets={list(self.buckets)}, num_groups={self.num_groups}, max_blocks="
                f"{self.max_blocks}, device={self.device}, graphs={self.graphs}, captured={sorted(self._graphs)}, "
                f"replays={self.replays})")
