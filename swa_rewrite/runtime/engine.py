"""A small paged MLA engine: chunked prefill under a token budget, prefix reuse, greedy decoding."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
from typing import Any, Hashable, Optional, Sequence, Union

import torch

from ..ops.cache_write_checks import NonFiniteLatentError
from ..ops.checks import check_int, validated_step
from ..ops.kv_cache_spec import KVCacheSpec, blocks_per_request, cache_groups, num_groups
from ..ops.step_check import check_kv_caches
from .batch import MHAPlan, StepBatch, StepItem, mha_crossover_tokens, token_of_row
from .block_manager import OutOfBlocksError, chain_block_key, prefix_block_keys
from .kv_cache_manager import GroupUsage, KVCacheManager
from .table_mirror import TableMirror

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)             # identity: requests are found in the queues by identity
class _Request:
    rid: int
    tokens: list[int]            # prompt followed by generated tokens
    num_prompt: int
    max_new_tokens: int
    reuse: bool = True           # may map cached prefix blocks (``logits`` computes every position)
    keep_logits: bool = False    # keep the logits of every position run (``logits``)
    max_blocks: list[int] = dataclasses.field(default_factory=list)   # the most it holds per cache group
    tables: list[list[int]] = dataclasses.field(default_factory=list)  # per group: block of each page, or -1
    num_computed: int = 0        # positions whose latents are in the cache
    block_keys: list = dataclasses.field(default_factory=list)  # prefix keys of the full, written blocks
    published: list = dataclasses.field(default_factory=list)   # (group, block, key) it published
    logits: list[torch.Tensor] = dataclasses.field(default_factory=list)
    dropped: bool = False        # aborted, or dropped with a failed step (an in-flight step's tokens are ignored)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def done(self) -> bool:
        return len(self.tokens) - self.num_prompt >= self.max_new_tokens     # (no copy of the generated tokens)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.num_prompt

    @property
    def finished(self) -> bool:
        return self.done and not self.in_prefill


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What one ``Engine.step`` did for one request that ran in it.

    ``request_id``: the id ``add_request`` returned; ``new_token_ids``: the tokens generated this step (empty
    for a prompt chunk that does not end the prompt, one token otherwise); ``finished``: the request has all
    its tokens and its blocks are freed (its id is no longer unfinished).
    """

    request_id: int
    new_token_ids: list[int]
    finished: bool


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    reused_tokens: int = 0       # prompt tokens served from shared prefix blocks
    in_flight_steps: int = 0     # steps left in flight (``overlap``): issued before the previous one's tokens were read


PLACEHOLDER = -1       # a generated token the host has not read yet (overlap): the device feeds the next step


@dataclasses.dataclass(eq=False)
class _InFlight:
    """A step issued without waiting for its tokens (``Engine(overlap=True)``): its greedy tokens on the device
    (the next step's input ids), their copy on the way to the host, and what to do once they arrive."""

    ran: list[_Request]          # the requests that ran, in the step's order (one StepOutput each)
    finished: list[bool]         # per request: it finished in this step (its blocks are already released)
    slots: list[int]             # per request: the index in ``tokens`` of its new token, or -1 for none
    greedy: torch.Tensor         # [B] int64, on the device
    host: torch.Tensor           # its host copy (pinned on CUDA), valid once ``event`` completes
    event: Optional[torch.cuda.Event]
    landed: bool = False         # its tokens were read


class Engine:
    """Greedy generation with a paged latent cache.

    Each step runs every running decode (1 token each) and fills the rest of ``max_tokens_per_step``
    with prompt chunks, so long prompts are prefilled in chunks alongside decodes. Full blocks are shared
    between requests with the same token prefix when ``prefix_caching`` is on.

    Two faces: the step API (``add_request``, ``step``, ``abort``, ``has_unfinished``) lets a caller add and
    abort requests between steps; ``generate`` and ``logits`` run their prompts to completion on it.
    Requests are admitted first come, first served, each only when its whole generation (prompt plus
    ``max_new_tokens``) fits beside what the running requests have reserved, so an admitted request never
    waits for blocks. Model steps run under ``torch.inference_mode()``, as serving engines run them (a custom op
    then skips its Python autograd layer: ~6 µs of host per call on the H200, RESULTS.md issue 14 run 7).

    With ``overlap=True`` the host prepares and issues decode step ``i + 1`` while the device still runs step ``i``
    (the step's greedy tokens stay on the device as the next step's input ids; the host reads them one step later),
    so a decode step costs the longer of the host's and the device's time, not their sum.
    """

    def __init__(self, model: torch.nn.Module, *, num_blocks: Optional[int] = None, page_size: int,
                 max_tokens_per_step: int, prefix_caching: bool = True, device: torch.device | str | None = None,
                 kv_caches: Optional[list[torch.Tensor]] = None, kv_cache_spec: Optional[Sequence] = None,
                 kv_cache_bytes: Optional[int] = None, max_model_len: Optional[int] = None,
                 window_bounded: bool = True, poison_blocks: bool = False, cuda_graphs: bool = False,
                 max_decode_batch: Optional[int] = None, mha_prefill: Union[str, int, None] = "auto",
                 overlap: bool = False):
        """
        Args:
            model: an ``MLAModel``, or what ``swa_rewrite.apply`` / ``swa_rewrite.compile`` return.
            num_blocks: blocks of ``page_size`` positions in each cache group's pool. Give this or
                ``kv_cache_bytes`` (or ``kv_caches``, whose shapes then give it).
            page_size: positions per block.
            max_tokens_per_step: the step's token budget (decodes first, then prompt chunks).
            prefix_caching: share full blocks between requests with the same token prefix.
            device: where steps run (default: the model's).
            kv_caches: caches to use (one per layer, as the model's ``allocate_kv_cache`` makes them; a
                compiled model's come from ``swa_rewrite.backend(...).allocate_kv_cache``); default: allocated.
            kv_cache_spec: the per-layer ``KVCacheSpec``s of a model that does not state them (a model compiled
                with ``torch.compile(model, backend=swa_rewrite.backend(schedule))``: ``backend.kv_cache_spec``).
            kv_cache_bytes, max_model_len: size the pools from a byte budget instead of ``num_blocks``: every
                group holds the same number of requests of ``max_model_len`` positions (sliding groups at their
                bound), all within ``kv_cache_bytes``; longer requests are rejected.
            window_bounded: sliding-window groups hold only their window and sinks (docs/design.md §12); False
                keeps every position, as a full layer does (the unbounded layout, for comparison).
            poison_blocks: fill every block with NaN as it is handed out (for tests: a read of a position the
                step did not write, or of a released block, shows up as NaN).
            cuda_graphs: run decode-only steps (one token per request) as CUDA graphs captured per batch-size
                bucket (``runtime.cuda_graphs.DecodeGraphs``: step inputs in persistent buffers filled in place,
                caches and weights read where they live); prefill and mixed steps run as they are. Graphed steps
                skip the input checks (they never synchronise with the host). Needs ``max_model_len`` (the
                tables' width) unless a full cache group bounds it. Off CUDA the same buffers run eagerly.
            max_decode_batch: the largest graphed decode batch (default ``min(max_tokens_per_step, 256)``);
                larger decode steps run outside graphs.
            mha_prefill: which prompt chunks run MHA-mode prefill (SPEC §13; the rest, and every decode, run MQA
                mode): ``"auto"`` — per chunk and cache group by ``runtime.batch.mha_pays_off``: at DeepSeek's dims
                the rule measured on an H200 (``mha_measured_rule``: chunks of ≥ 128 tokens, ≥ 64 for shards of
                under 64 heads in windows under 512, ≥ 256 after over 4096 cached positions), at other dims a
                FLOP count; an
                int — chunks of at least that many tokens, in every group; ``"off"`` or None — none. A model
                without a ``config`` runs ``"auto"`` as ``"off"``.
            overlap: leave decode-only steps in flight: ``step`` issues the next decode step before it reads the
                previous one's tokens, which the device passes on as the next step's input ids. Its outputs (and
                a finished request's last token) then come from the following ``step`` call, or from one that
                runs nothing (``has_unfinished`` stays true until they are out). ``generate``, whose result comes
                whole, overlaps its decode steps on CUDA whatever this says (the same tokens). Steps that run
                prompt chunks, keep logits (``logits``), or run eagerly with data
                checks on (their deferred checks are read at the step's end) do not overlap: they read their
                tokens, and any step in flight's, before returning.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (an MLAModel, or what swa_rewrite.apply / "
                            f"swa_rewrite.compile return), got {type(model).__name__}")
        page_size = check_int("page_size", page_size, minimum=1)
        self.max_tokens_per_step = check_int("max_tokens_per_step", max_tokens_per_step, minimum=1)
        if num_blocks is not None:
            num_blocks = check_int("num_blocks", num_blocks, minimum=1)
        self.max_model_len = None if max_model_len is None else check_int("max_model_len", max_model_len, minimum=1)
        self.model = model
        self.device = _run_device(model, device)
        self.vocab_size = _vocab_size(model)
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self.window_bounded = bool(window_bounded)
        num_layers = _num_layers(model)
        specs, stated = _layer_specs(model, kv_cache_spec, kv_caches, page_size, num_layers)
        # The model's cache groups (docs/design.md §12): each has its own pool, and each step carries one row of
        # block tables and slots per group. A model that states no specs has one group of full layers.
        self.cache_groups = cache_groups(specs) if stated else (0,) * len(specs)
        self.num_groups = num_groups(self.cache_groups)
        first = {}
        for layer, g in enumerate(self.cache_groups):
            first.setdefault(g, layer)
        self.group_specs = [specs[first[g]] for g in range(self.num_groups)]
        self.mha_plan = _mha_plan(mha_prefill, getattr(model, "config", None), self.group_specs)
        counts = self._pool_sizes(specs, num_blocks, kv_cache_bytes, kv_caches)
        if kv_caches is None:
            kv_caches = self._allocate(model, specs, counts)
        check_kv_caches(kv_caches, num_layers if num_layers is not None else len(specs), device=self.device,
                        blocks=[(counts[g], page_size) for g in self.cache_groups])
        self.kv_caches = kv_caches
        self.cache = KVCacheManager(self.group_specs, counts, page_size, bounded=self.window_bounded,
                                    on_allocate=self._poison if poison_blocks else None)
        self._mirror = TableMirror(self.cache, self.num_groups)      # the running requests' tables, on the host
        # The last decode step's requests, inputs on the host and (eager steps) on the device: the next advances them
        self._last_decode: Optional[tuple[list[_Request], StepBatch, Optional[StepBatch]]] = None
        self.decode_graphs = self._decode_graphs(model, max_decode_batch) if cuda_graphs else None
        self.overlap = bool(overlap)
        self.overlap_runs = self.device.type == "cuda"     # generate's decode steps overlap (see ``overlap``)
        self.stats = EngineStats()
        self._in_flight: Optional[_InFlight] = None
        self._ready: list[StepOutput] = []      # outputs read from a step in flight that no call returned yet
        self._next_id = 0
        self._waiting: list[_Request] = []      # admission order
        self._running: list[_Request] = []      # admission order

    def _pool_sizes(self, specs: Sequence[KVCacheSpec], num_blocks: Optional[int], kv_cache_bytes: Optional[int],
                    kv_caches: Optional[list[torch.Tensor]]) -> list[int]:
        """Blocks in each group's pool: ``num_blocks`` each, or sized from ``kv_cache_bytes``, or the caches'."""
        if num_blocks is not None and kv_cache_bytes is not None:
            raise ValueError("give num_blocks= (blocks per cache group) or kv_cache_bytes= (a byte budget), not both")
        if kv_cache_bytes is not None:
            kv_cache_bytes = check_int("kv_cache_bytes", kv_cache_bytes, minimum=1)
            if self.max_model_len is None:
                raise ValueError("kv_cache_bytes= needs max_model_len=: pools are sized for requests of that length")
            if kv_caches is not None:
                raise ValueError("kv_cache_bytes= sizes caches the engine allocates: do not pass kv_caches= too")
            M, ps = self.max_model_len, self.page_size
            chunk = min(self.max_tokens_per_step, M)
            per_request = [blocks_per_request(s, M, ps, chunk=chunk, bounded=self.window_bounded)
                           for s in self.group_specs]
            block_bytes = [ps * sum(s.bytes_per_token for s, gl in zip(specs, self.cache_groups) if gl == g)
                           for g in range(self.num_groups)]
            request_bytes = sum(b * nb for b, nb in zip(block_bytes, per_request))
            fit = kv_cache_bytes // request_bytes
            if fit < 1:
                raise ValueError(f"kv_cache_bytes={kv_cache_bytes} holds no request of max_model_len={M} "
                                 f"positions: one needs {request_bytes} bytes of cache")
            log.info("cache pools sized for %d requests of %d positions: %s blocks per group", fit, M,
                     [fit * b for b in per_request])
            return [fit * b for b in per_request]
        if num_blocks is not None:
            return [num_blocks] * self.num_groups
        if kv_caches is not None and len(kv_caches) == len(self.cache_groups):
            first = {}
            for layer, g in enumerate(self.cache_groups):
                first.setdefault(g, layer)
            if all(isinstance(kv_caches[first[g]], torch.Tensor) and kv_caches[first[g]].dim() == 3
                   for g in range(self.num_groups)):
                return [int(kv_caches[first[g]].shape[0]) for g in range(self.num_groups)]
        raise TypeError("Engine needs num_blocks= (blocks per cache group) or kv_cache_bytes= with max_model_len=")

    def _allocate(self, model: torch.nn.Module, specs: Sequence[KVCacheSpec], counts: list[int]) -> list[torch.Tensor]:
        """The model's caches; pools of different sizes are allocated per layer from the specs' layouts."""
        if not callable(getattr(model, "allocate_kv_cache", None)):
            raise TypeError(f"{type(model).__name__} has no allocate_kv_cache method: pass kv_caches= "
                            f"(one [num_blocks, page_size, ...] cache per layer)")
        if len(set(counts)) == 1:
            return model.allocate_kv_cache(counts[0], self.page_size, self.device)
        return [torch.empty(counts[g], self.page_size, s.width, dtype=s.dtype, device=self.device)
                for s, g in zip(specs, self.cache_groups)]

    def _decode_graphs(self, model: torch.nn.Module, max_batch: Optional[int]):
        from .cuda_graphs import DecodeGraphs

        ps = self.page_size
        if self.max_model_len is not None:
            max_blocks = -(-self.max_model_len // ps)
        else:
            full = [g.pool.num_blocks for g in self.cache.groups if not g.sliding]
            if not full:
                raise ValueError("cuda_graphs=True needs max_model_len= here: with every group sliding, no pool "
                                 "bounds how many pages a request's table spans")
            max_blocks = max(full)
        if max_batch is None:
            max_batch = min(self.max_tokens_per_step, 256)
        max_batch = check_int("max_decode_batch", max_batch, minimum=1)
        return DecodeGraphs(model, self.kv_caches, num_groups=self.num_groups, page_size=ps, max_blocks=max_blocks,
                            max_batch=max_batch, device=self.device)

    @torch.inference_mode()     # (abort runs it outside a step: caches made under inference mode take it only there)
    def _poison(self, group: int, blocks: list[int]) -> None:
        index = torch.tensor(blocks, device=self.device)
        for cache, g in zip(self.kv_caches, self.cache_groups):
            if g == group:
                cache.index_fill_(0, index, 255 if cache.dtype == torch.uint8 else float("nan"))  # 0xFF: FP8 NaN

    @property
    def num_blocks(self) -> tuple[int, ...]:
        """Blocks in each cache group's pool."""
        return tuple(g.pool.num_blocks for g in self.cache.groups)

    def cache_usage(self) -> list[GroupUsage]:
        """Per cache group: blocks ``in_use`` (held by running requests; a released block that stays cached for
        prefix reuse is not in use), the pool's ``total``, and ``peak_per_request``, the most blocks one request
        has held at once, with the group's ``kind``, ``window`` and ``sinks``."""
        return self.cache.usage()

    # ------------------------------------------------------------------------------------- step API
    def add_request(self, prompt: list[int], max_new_tokens: int) -> int:
        """Queue ``prompt`` (a non-empty sequence of token ids in ``[0, vocab_size)``) for ``max_new_tokens``
        greedy tokens; returns its request id (ids count up from 0 over the engine's life). Nothing runs
        until ``step``; bad input raises here and queues nothing."""
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=0)
        return self._add(self._checked_prompt("prompt", prompt, max_new_tokens), max_new_tokens).rid

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One model call: admit what fits, run every decode then prompt chunks within ``max_tokens_per_step``.

        Returns one ``StepOutput`` per request that ran, in the step's order (decodes first); an empty list
        when nothing is unfinished. Finished requests' blocks are freed before it returns. If the step
        fails, the requests that ran in it are dropped (blocks freed, their prefix-cache entries withdrawn)
        and the exception is re-raised (a ``NonFiniteLatentError`` names the request and position); the
        other requests are untouched and later steps run them.

        With ``overlap=True`` a decode-only step is left in flight: this call returns the outputs of the step
        in flight before it (if any), and the next call returns this step's; a call with nothing left to run
        returns the last ones.
        """
        ready, self._ready = self._ready, []
        self._admit()
        flight, self._in_flight = self._in_flight, None
        if flight is not None and not self._continues():
            # The next step needs the tokens on the host (a prompt chunk, kept logits) or there is none.
            ready += self._land(flight)
            flight = None
        if not self._running:
            if self._waiting:     # cannot happen: a checked prompt fits the whole pool, and nothing holds blocks
                raise OutOfBlocksError(f"request {self._waiting[0].rid} cannot be admitted into an idle engine")
            return ready
        reqs: list[_Request] = []
        try:
            items = self._schedule(reqs)
            return ready + self._step(items, reqs, flight)
        except BaseException as e:
            self._last_decode = None
            # Blocks of the failed step are half written (some layers only) and were never published; what
            # its requests published earlier is withdrawn too, since the cause (e.g. a non-finite weight)
            # may have tainted it.
            for r in reqs:
                self._drop(r)
            if flight is not None and not flight.landed:
                # The step before it ran: what it gave the requests not dropped comes out of the next call.
                self._ready = ready + self._land(flight)
            else:
                self._ready = ready
            ids = [r.rid for r in reqs]
            log.info("engine step failed (%s): dropped its request(s) %s", type(e).__name__, ids)
            e.add_note(f"swa_rewrite Engine: the failed step's requests {ids} were dropped, their blocks freed")
            raise

    def abort(self, request_id: int) -> None:
        """Drop an unfinished request: its blocks are freed and what it published is withdrawn from the prefix
        cache. Aborting a request that already finished (or was aborted, or failed in a step) is a no-op;
        an id ``add_request`` never returned raises ``KeyError`` naming it. With ``overlap``, a request whose
        last outputs no call has returned yet counts as unfinished: they are never returned."""
        request_id = check_int("request_id", request_id)
        ready = [o for o in self._ready if o.request_id != request_id]
        aborted = len(ready) < len(self._ready)          # outputs no call returned yet (overlap): never returned
        self._ready = ready
        in_flight = [] if self._in_flight is None else self._in_flight.ran
        for r in itertools.chain(self._waiting, self._running, in_flight):
            if r.rid == request_id and not r.dropped:
                self._drop(r)
                aborted = True
                break
        if aborted:
            log.debug("request %d aborted", request_id)
            return
        if not 0 <= request_id < self._next_id:
            raise KeyError(f"request id {request_id} is unknown to this engine (ids so far: [0, {self._next_id}))")

    def has_unfinished(self) -> bool:
        """Whether any added request is waiting or running, or a step's outputs are yet to be returned
        (``overlap``)."""
        return bool(self._waiting or self._running or self._in_flight is not None or self._ready)

    # ------------------------------------------------------------------------------------------ whole calls
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt: ``max_new_tokens`` new tokens per prompt.

        ``prompts``: a list of non-empty sequences of token ids in ``[0, vocab_size)`` (Python or numpy ints).
        Runs steps until its prompts finish, so it needs an engine with no unfinished step-API requests.
        If the call fails, every block it took is released and nothing it published stays in the prefix
        cache: the engine is as it was before the call.
        """
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=0)
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of prompts (each a list of token ids), got "
                            f"{type(prompts).__name__}")
        prompts = [self._checked_prompt(f"prompt {i}", p, max_new_tokens) for i, p in enumerate(prompts)]
        reqs = self._run([(p, max_new_tokens, True, False) for p in prompts])
        return [r.generated for r in reqs]

    def logits(self, prompt: list[int]) -> torch.Tensor:
        """Float32 logits ``[len(prompt), vocab]`` of every prompt position, computed through the paged path.

        Every position is computed (no prefix reuse for this prompt); its full blocks are still published.
        Like ``generate``, it needs an engine with no unfinished step-API requests.
        """
        with torch.inference_mode():
            (req,) = self._run([(self._checked_prompt("prompt", prompt, 0), 0, False, True)])
        return torch.cat(req.logits)          # made outside inference mode: an ordinary tensor for the caller

    # ----------------------------------------------------------------------------------------- internals
    def _checked_prompt(self, name: str, prompt: Any, max_new_tokens: int) -> list[int]:
        """``prompt`` as a list of Python ints, after checking its ids and that its generation fits the cache."""
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__") or not hasattr(prompt, "__iter__"):
            raise TypeError(f"{name} must be a sequence of token ids, got {prompt!r} ({type(prompt).__name__})")
        if len(prompt) == 0:
            raise ValueError(f"{name} is empty")
        for j, tok in enumerate(prompt):
            if isinstance(tok, bool) or not isinstance(tok, numbers.Integral):
                raise TypeError(f"{name}: token {j} is {tok!r} ({type(tok).__name__}), expected an integer "
                                f"token id (a Python or numpy int)")
            if tok < 0 or (self.vocab_size is not None and tok >= self.vocab_size):
                raise ValueError(f"{name}: token {j} is {tok}, expected an id in "
                                 f"[0, {self.vocab_size if self.vocab_size is not None else 'vocab_size'})")
        total = len(prompt) + max_new_tokens
        if self.max_model_len is not None and total > self.max_model_len:
            raise ValueError(f"{name} has {len(prompt)} tokens + max_new_tokens={max_new_tokens} = {total} "
                             f"positions, more than max_model_len={self.max_model_len}")
        for g, (need, pool) in enumerate(zip(self._max_blocks(len(prompt), total), self.num_blocks)):
            if need > pool:
                raise ValueError(f"{name} needs {need} blocks of {self.page_size} positions"
                                 + (f" in cache group {g}" if self.num_groups > 1 else "")
                                 + f", the cache has {pool}")
        return [int(tok) for tok in prompt]

    def _max_blocks(self, num_prompt: int, total: int) -> list[int]:
        """The most blocks per group a request of ``num_prompt`` + generated = ``total`` positions holds."""
        return self.cache.max_blocks(total, min(self.max_tokens_per_step, num_prompt))

    def _add(self, prompt: list[int], max_new_tokens: int, *, reuse: bool = True,
             keep_logits: bool = False) -> _Request:
        r = _Request(self._next_id, prompt, len(prompt), max_new_tokens, reuse=reuse, keep_logits=keep_logits)
        r.max_blocks = self._max_blocks(len(prompt), len(prompt) + max_new_tokens)
        r.tables = [[] for _ in range(self.num_groups)]
        self._next_id += 1
        self._waiting.append(r)
        log.debug("request %d added: %d prompt tokens, %d new", r.rid, r.num_prompt, max_new_tokens)
        return r

    def _run(self, calls: list[tuple[list[int], int, bool, bool]]) -> list[_Request]:
        """Add checked ``(prompt, max_new_tokens, reuse, keep_logits)`` requests and step until they finish;
        on any error drop all of them (withdrawing what finished ones published), then re-raise."""
        if self.has_unfinished():
            raise RuntimeError(f"generate/logits run the engine to completion, but it has "
                               f"{len(self._waiting) + len(self._running)} unfinished request(s) from add_request: "
                               f"step or abort them first")
        reqs = [self._add(p, n, reuse=reuse, keep_logits=keep) for p, n, reuse, keep in calls]
        # Its result comes whole, so on CUDA its decode steps overlap (the next issued before the last is read).
        saved, self.overlap = self.overlap, self.overlap or self.overlap_runs
        try:
            while self.has_unfinished():
                self.step()
        except BaseException:
            for r in reqs:
                self._drop(r)
            # Only this call's requests ran: nothing of theirs stays in flight or unreturned (a failure in
            # admission leaves the step in flight in place; a failed step, the outputs it read from it).
            self._in_flight = None
            ids = {r.rid for r in reqs}
            self._ready = [o for o in self._ready if o.request_id not in ids]
            log.debug("engine call failed: released the blocks of its %d request(s)", len(reqs))
            raise
        finally:
            self.overlap = saved
        return reqs

    def _drop(self, r: _Request) -> None:
        """Take ``r`` out of the queues and release it, withdrawing its publications (a no-op when repeated)."""
        r.dropped = True
        for queue in (self._waiting, self._running):
            if r in queue:
                queue.remove(r)
        self._release(r, withdraw=True)

    def _release(self, r: _Request, *, withdraw: bool = False) -> None:
        """Drop ``r``'s references on its blocks (a no-op once released); with ``withdraw`` also take back
        the prefix-cache entries ``r`` published, whose contents are not trusted (blocks other requests
        still hold stay theirs)."""
        if withdraw:
            self.cache.withdraw(r.published)
            r.published = []
        self._mirror.drop(r)
        self.cache.release(r.tables)
        if self._last_decode is not None and r in self._last_decode[0]:
            self._last_decode = None      # (its step cannot be advanced again: keep no released request's inputs)

    def _admit(self) -> None:
        """Admit waiting requests in order while their whole generation fits beside the running ones in every
        cache group."""
        while self._waiting:
            r = self._waiting[0]
            if not self.cache.fits(r.max_blocks, [(o.max_blocks, o.tables) for o in self._running]):
                break
            self._waiting.pop(0)
            if self.prefix_caching and r.reuse:
                # Keep at least the last prompt token to compute: its logits start the generation.
                keys = prefix_block_keys(r.tokens[: r.num_prompt - 1], self.page_size)
                hit, r.tables = self.cache.match_prefix(keys)
                r.block_keys = keys[:hit]
                r.num_computed = hit * self.page_size
                self.stats.reused_tokens += r.num_computed
            self._running.append(r)
            log.debug("request %d admitted (%d prompt tokens from the prefix cache)", r.rid, r.num_computed)

    def _schedule(self, reqs: list[_Request]) -> list[StepItem]:
        """The step's items, decodes first; appends each scheduled request to ``reqs`` as soon as it holds
        blocks for the step (so a failure part-way knows whom to release)."""
        budget = self.max_tokens_per_step
        items = []
        decodes = [r for r in self._running if not r.in_prefill and not r.done]
        prefills = [r for r in self._running if r.in_prefill]
        for r in decodes + prefills:
            if budget == 0:
                break
            n = 1 if not r.in_prefill else min(budget, r.num_prompt - r.num_computed)
            reqs.append(r)
            self.cache.prepare(r.tables, r.num_computed, r.num_computed + n)
            # The live tables (not copies: the step is built before anything changes them again).
            items.append(StepItem(r.tokens[r.num_computed:r.num_computed + n], r.num_computed, r.tables,
                                  r.in_prefill))
            budget -= n
        assert items, "a running request always has work"
        return items

    def _continues(self) -> bool:
        """Whether the next step can take its input ids from the step in flight: every running request decodes
        and none keeps logits."""
        return bool(self._running) and not any(r.in_prefill or r.keep_logits for r in self._running)

    def _step(self, items: list[StepItem], reqs: list[_Request], flight: Optional[_InFlight]) -> list[StepOutput]:
        """Run the model on ``items`` (``flight``: the step in flight, whose greedy tokens are the placeholders
        among the items' input ids); returns the outputs read in this call (``flight``'s, then this step's
        unless it is left in flight)."""
        keep_logits = any(r.keep_logits for r in reqs)
        decode_only = all(len(it.tokens) == 1 and not it.is_prefill for it in items)
        graphs = self.decode_graphs
        # Built on the host (and sent without waiting for the device: a blocking copy would wait for the step in
        # flight, PyTorch synchronising a pageable host-to-device copy); the graph runner sends it to its buffers
        # in one copy.
        batch, last_sent = self._host_batch(items, reqs, decode_only and not keep_logits)
        if graphs is None or keep_logits or not decode_only or not graphs.accepts(batch):
            graphs = None
        ids = None if flight is None else self._input_ids(items, reqs, flight)
        greedy = None
        in_flight = False
        try:
            if graphs is not None:
                logits = graphs.run(batch, input_ids=ids).float()
                in_flight = self.overlap
            else:
                host = batch
                if last_sent is not None:
                    # The last step's inputs on the device, one position on there: only the ids are sent (or
                    # are already there: the step in flight's tokens).
                    if ids is None:
                        ids = host.input_ids.to(self.device, non_blocking=True)
                    batch = last_sent.advanced(ids)
                else:
                    batch = batch.to(self.device, non_blocking=True)
                    if ids is not None:
                        batch = dataclasses.replace(batch, input_ids=ids)
                if self._last_decode is not None:
                    self._last_decode = (*self._last_decode[:2], batch)
                logits_indices = None if keep_logits else batch.last_token_index
                # The model's checks deferred to the step's end (the cache writes' finite-latent flags) are read
                # in the same device-to-host copy as the greedy tokens: one synchronisation per checked step.
                with validated_step() as scope:
                    logits = self.model(batch.input_ids, kv_caches=self.kv_caches, meta=batch.meta,
                                        logits_indices=logits_indices).float()
                    # A step whose checks queued nothing to read at its end may stay in flight.
                    deferred = scope is not None and bool(scope.deferred)
                    in_flight = self.overlap and decode_only and not keep_logits and not deferred
                    if not keep_logits and not in_flight and scope is not None:
                        greedy = scope.read(logits.argmax(-1))
        except NonFiniteLatentError as e:
            raise self._name_token(e, items, reqs) from e
        self.stats.steps += 1
        if in_flight:
            self.stats.in_flight_steps += 1
            tokens = logits.argmax(-1)
            host, event = tokens, None
            if tokens.device.type == "cuda":
                host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                host.copy_(tokens, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
        cu = [0]
        for it in items:
            cu.append(cu[-1] + len(it.tokens))
        if keep_logits:
            # One device-to-host copy: all logits (the greedy tokens come from them).
            logits = logits.cpu()
            greedy = logits[torch.tensor(cu[1:]) - 1].argmax(-1).tolist()
        elif greedy is None and not in_flight:
            greedy = logits.argmax(-1).tolist()
        # The step in flight's tokens are needed before this step's bookkeeping (publishing a full block names
        # its tokens); waiting for them here overlaps this step's device work.
        out = [] if flight is None else self._land(flight)
        slots = []
        for b, (it, r) in enumerate(zip(items, reqs)):
            n = len(it.tokens)
            if it.is_prefill:
                self.stats.prefill_tokens += n
            else:
                self.stats.decode_tokens += n
            if r.keep_logits:
                r.logits.append(logits[cu[b]:cu[b + 1]])
            r.num_computed += n
            slots.append(-1)
            if not r.in_prefill and not r.done:
                slots[-1] = len(r.tokens)
                r.tokens.append(PLACEHOLDER if in_flight else greedy[b])
            if self.prefix_caching:
                self._publish_full_blocks(r)
            self.cache.slide(r.tables, r.num_computed)   # release what left the sliding groups' windows
        finished = [self._finish(r) for r in reqs]
        if in_flight:
            self._in_flight = _InFlight(reqs, finished, slots, tokens, host, event)
            return out
        return out + [StepOutput(r.rid, [] if i < 0 else [r.tokens[i]], f) for r, i, f in zip(reqs, slots, finished)]

    def _host_batch(self, items: list[StepItem], reqs: list[_Request],
                    decode: bool) -> tuple[StepBatch, Optional[StepBatch]]:
        """The step's inputs on the host, and the last step's as sent to the device when this step advances them.
        ``decode`` (one token a request, no kept logits): when the same requests decoded in the last step, none
        starts a page and none of their tables changed since (nothing allocated, nothing slid out: most decode
        steps), the last step's inputs one position on (``StepBatch.advanced``); otherwise built from the items and
        the mirrored tables."""
        last, self._last_decode = self._last_decode, None
        ps = self.page_size
        sent = None
        if (decode and last is not None and last[0] == reqs and all(it.num_cached % ps for it in items)
                and not self.cache.changed([r.tables for r in reqs])):
            batch = last[1].advanced([it.tokens[0] for it in items])
            sent = last[2]
        else:
            width = max([len(t) for r in reqs for t in r.tables] + [1])
            tables = self._mirror.tables(reqs, [r.tables for r in reqs], width)
            batch = StepBatch.build(items, self.page_size, num_groups=self.num_groups, mha=self.mha_plan,
                                    device="cpu", block_tables=tables)
        if decode:
            self._last_decode = (list(reqs), batch, None)     # (the device copy: the eager path adds it)
        return batch, sent

    def _finish(self, r: _Request) -> bool:
        """Release ``r`` if it has all its tokens; returns whether it finished."""
        if not r.finished:
            return False
        self._release(r)
        self._running.remove(r)
        log.debug("request %d finished: %d prompt + %d generated tokens", r.rid, r.num_prompt, len(r.generated))
        return True

    def _input_ids(self, items: list[StepItem], reqs: list[_Request], flight: _InFlight) -> Optional[torch.Tensor]:
        """The step's input ids on the device with the placeholders taken from ``flight``'s greedy tokens
        (None when the step has none: every input is on the host)."""
        row_of = {r: b for b, (r, i) in enumerate(zip(flight.ran, flight.slots)) if i >= 0}
        src, dst, host_ids = [], [], []
        for it, r in zip(items, reqs):
            if it.tokens[0] == PLACEHOLDER:
                assert len(it.tokens) == 1 and r in row_of, "a placeholder token is the step in flight's"
                src.append(row_of[r])
                dst.append(len(host_ids))
            host_ids += it.tokens
        if not src:
            return None
        if dst == src == list(range(len(host_ids))) and len(src) == flight.greedy.shape[0]:
            return flight.greedy            # the same requests in the same order: the tokens as they are
        # One copy that does not wait for the device (ids and the gather's rows), then the gather on the device.
        packed = torch.tensor(host_ids + src + dst, dtype=torch.int64).to(self.device, non_blocking=True)
        ids, n = packed[:len(host_ids)], len(src)
        ids[packed[len(host_ids) + n:]] = flight.greedy[packed[len(host_ids):len(host_ids) + n]]
        return ids

    def _land(self, flight: _InFlight) -> list[StepOutput]:
        """Wait for ``flight``'s tokens, put them in its requests' token lists and return its outputs (none for
        a request dropped since)."""
        flight.landed = True
        if flight.event is not None:
            flight.event.synchronize()
        tokens = flight.host.tolist()
        out = []
        for b, (r, i, f) in enumerate(zip(flight.ran, flight.slots, flight.finished)):
            if i >= 0:
                r.tokens[i] = tokens[b]
            if not r.dropped:
                out.append(StepOutput(r.rid, [] if i < 0 else [tokens[b]], f))
        return out

    def _name_token(self, e: NonFiniteLatentError, items: list[StepItem], reqs: list[_Request]) -> Exception:
        """``e`` (a cache write's row and slot) restated as the request and token position that caused it."""
        located = token_of_row(items, e.row)
        if located is None:
            return e
        b, position = located
        r = reqs[b]
        kind = "prompt" if position < r.num_prompt else "generated"
        return NonFiniteLatentError(
            f"request {r.rid}, token position {position} ({kind} token {r.tokens[position]}): the model produced "
            f"a non-finite latent for it ({e})", row=e.row, slot=e.slot, request=r.rid, position=position)

    def _publish_full_blocks(self, r: _Request) -> None:
        ps = self.page_size
        while (len(r.block_keys) + 1) * ps <= r.num_computed:
            k = len(r.block_keys)
            parent = r.block_keys[-1] if r.block_keys else None
            key = chain_block_key(parent, r.tokens[k * ps:(k + 1) * ps])
            r.published += self.cache.publish(r.tables, k, key, parent)
            r.block_keys.append(key)


def _run_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    """The device steps run on: ``device``, else the model's; a model with weights on meta has no data."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta:
            raise ValueError(f"model {type(model).__name__} has {name} on the meta device (no data): materialise "
                             "it first (e.g. model.to_empty(device=...) and load its weights)")
    if device is None:
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError(f"model {type(model).__name__} has no parameters to take the device from: pass device=")
        return first.device
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("device 'meta' holds no data: an engine needs a real device (e.g. 'cpu' or 'cuda')")
    return device


def _vocab_size(model: torch.nn.Module) -> Optional[int]:
    """Token ids the model embeds: ``model.config.vocab_size``, else its ``embed_tokens`` rows (None if unknown)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and not isinstance(vocab, bool):
        return vocab
    embed = getattr(model, "embed_tokens", None)
    return embed.num_embeddings if isinstance(embed, torch.nn.Embedding) else None


def model_cache_groups(model: torch.nn.Module, num_layers: Optional[int] = None,
                       kv_cache_spec: Optional[Sequence] = None) -> tuple[int, ...]:
    """The cache group of each layer (docs/design.md §12), from ``kv_cache_spec`` if given, else the model's
    ``kv_cache_spec()`` (an ``MLAModel``, an ``SWAModule``, ``swa_rewrite.compile``'s model); one group (every
    layer in group 0) when the model states no specs. ``num_cache_groups`` of it is the ``num_groups`` of
    ``StepBatch.build``."""
    if num_layers is None:
        num_layers = _num_layers(model)
    if kv_cache_spec is None:
        spec = getattr(model, "kv_cache_spec", None)
        if not callable(spec):
            if num_layers is None:
                raise ValueError(f"{type(model).__name__} states neither its cache specs nor its layer count")
            return (0,) * num_layers
        kv_cache_spec = spec()
    groups = cache_groups(kv_cache_spec)
    if num_layers is not None and len(groups) != num_layers:
        raise ValueError(f"the cache specs of {type(model).__name__} describe {len(groups)} layers, but the model "
                         f"has {num_layers} caches")
    return groups


def _mha_plan(mha_prefill, config, group_specs) -> Optional[MHAPlan]:
    """The engine's ``MHAPlan`` from its ``mha_prefill`` argument, or None (every chunk MQA)."""
    if mha_prefill is None or mha_prefill == "off":
        return None
    if mha_prefill == "auto":
        dims = tuple(getattr(config, a, None) for a in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"))
        if not all(isinstance(d, int) for d in dims) or mha_crossover_tokens(*dims) is None:
            return None
        heads = getattr(config, "num_attention_heads", None)
        return MHAPlan.for_groups(group_specs, 1, dims, heads if isinstance(heads, int) else None)
    if isinstance(mha_prefill, int) and not isinstance(mha_prefill, bool):
        return MHAPlan.for_groups(group_specs, check_int("mha_prefill", mha_prefill, minimum=1))
    raise ValueError(f'mha_prefill must be "auto", "off", None or a chunk length >= 1, got {mha_prefill!r}')


def _layer_specs(model: torch.nn.Module, kv_cache_spec: Optional[Sequence], kv_caches: Optional[list[torch.Tensor]],
                 page_size: int, num_layers: Optional[int]) -> tuple[list[KVCacheSpec], bool]:
    """Per-layer ``KVCacheSpec``s: ``kv_cache_spec`` if given, else the model's (and True); a model that states
    none has every layer full, in the layout of the given caches or of its own allocation (and False)."""
    if kv_cache_spec is None and callable(getattr(model, "kv_cache_spec", None)):
        kv_cache_spec = model.kv_cache_spec()
    if kv_cache_spec is not None:
        specs = list(kv_cache_spec)
        for i, s in enumerate(specs):
            if not isinstance(s, KVCacheSpec):
                raise TypeError(f"kv_cache_spec[{i}] must be a KVCacheSpec, got {type(s).__name__}")
        if num_layers is not None and len(specs) != num_layers:
            raise ValueError(f"the cache specs of {type(model).__name__} describe {len(specs)} layers, but the "
                             f"model has {num_layers} caches")
        return specs, True
    if kv_caches is None:
        if not callable(getattr(model, "allocate_kv_cache", None)):
            raise TypeError(f"{type(model).__name__} has no allocate_kv_cache method: pass kv_caches= "
                            f"(one [num_blocks, page_size, ...] cache per layer)")
        layouts = model.allocate_kv_cache(1, page_size, "meta")
    else:
        if not isinstance(kv_caches, (list, tuple)):
            raise TypeError(f"kv_caches must be a list with one cache tensor per layer, got "
                            f"{type(kv_caches).__name__}")
        layouts = kv_caches
    specs = []
    for i, c in enumerate(layouts):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"kv_caches[{i}] must be a tensor, got {type(c).__name__}")
        specs.append(KVCacheSpec.of_layout(c.dtype, c.shape[-1]))
    return specs, False


def num_cache_groups(model: torch.nn.Module, kv_cache_spec: Optional[Sequence] = None) -> int:
    """``G``, the cache groups of ``model`` (``model_cache_groups``): ``StepBatch.build(..., num_groups=G)``."""
    return num_groups(model_cache_groups(model, kv_cache_spec=kv_cache_spec))


def _num_layers(model: torch.nn.Module) -> Optional[int]:
    """``model.config.num_hidden_layers`` (one cache per layer), None if the model does not say."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None
