"""A small paged MLA engine: chunked prefill under a token budget, prefix reuse, greedy decoding."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
from typing import Any, Hashable, Optional, Sequence

import torch

from ..ops.cache_write_checks import NonFiniteLatentError
from ..ops.checks import check_int
from ..ops.kv_cache_spec import cache_groups, num_groups
from ..ops.step_check import check_kv_caches
from .batch import StepBatch, StepItem, token_of_slot
from .block_manager import BlockManager, OutOfBlocksError, chain_block_key, prefix_block_keys

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)             # identity: requests are found in the queues by identity
class _Request:
    rid: int
    tokens: list[int]            # prompt followed by generated tokens
    num_prompt: int
    max_new_tokens: int
    reuse: bool = True           # may map cached prefix blocks (``logits`` computes every position)
    keep_logits: bool = False    # keep the logits of every position run (``logits``)
    blocks: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0        # positions whose latents are in the cache
    block_keys: list = dataclasses.field(default_factory=list)  # prefix keys of the full, written blocks
    published: list[tuple[int, Hashable]] = dataclasses.field(default_factory=list)  # (block, key) it published
    logits: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_new_tokens

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


class Engine:
    """Greedy generation with a paged latent cache.

    Each step runs every running decode (1 token each) and fills the rest of ``max_tokens_per_step``
    with prompt chunks, so long prompts are prefilled in chunks alongside decodes. Full blocks are shared
    between requests with the same token prefix when ``prefix_caching`` is on.

    Two faces: the step API (``add_request``, ``step``, ``abort``, ``has_unfinished``) lets a caller add and
    abort requests between steps; ``generate`` and ``logits`` run their prompts to completion on it.
    Requests are admitted first come, first served, each only when its whole generation (prompt plus
    ``max_new_tokens``) fits beside what the running requests have reserved, so an admitted request never
    waits for blocks.
    """

    def __init__(self, model: torch.nn.Module, *, num_blocks: int, page_size: int, max_tokens_per_step: int,
                 prefix_caching: bool = True, device: torch.device | str | None = None,
                 kv_caches: Optional[list[torch.Tensor]] = None, kv_cache_spec: Optional[Sequence] = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (an MLAModel, or what swa_rewrite.apply / "
                            f"swa_rewrite.compile return), got {type(model).__name__}")
        num_blocks = check_int("num_blocks", num_blocks, minimum=1)
        page_size = check_int("page_size", page_size, minimum=1)
        self.max_tokens_per_step = check_int("max_tokens_per_step", max_tokens_per_step, minimum=1)
        self.model = model
        self.device = _run_device(model, device)
        self.vocab_size = _vocab_size(model)
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self.blocks = BlockManager(num_blocks, page_size)
        # Caches come from the model unless given (e.g. a compiled model: swa_rewrite.backend(...).allocate_kv_cache).
        if kv_caches is None:
            if not callable(getattr(model, "allocate_kv_cache", None)):
                raise TypeError(f"{type(model).__name__} has no allocate_kv_cache method: pass kv_caches= "
                                f"(one [num_blocks, page_size, ...] cache per layer)")
            kv_caches = model.allocate_kv_cache(num_blocks, page_size, self.device)
        check_kv_caches(kv_caches, _num_layers(model), blocks=(num_blocks, page_size), device=self.device)
        self.kv_caches = kv_caches
        # The model's cache groups (docs/design.md §12): each step carries one row of block tables and slots
        # per group. Every group gets the same rows for now (its caches unbounded, of num_blocks each).
        # A model that does not state its specs (torch.compile(model, backend=swa_rewrite.backend(schedule))) takes
        # them as kv_cache_spec= (the backend's: backend.kv_cache_spec(model)), as it takes its caches.
        self.cache_groups = model_cache_groups(model, len(kv_caches), kv_cache_spec)
        self.num_groups = num_groups(self.cache_groups)
        self.stats = EngineStats()
        self._next_id = 0
        self._waiting: list[_Request] = []      # admission order
        self._running: list[_Request] = []      # admission order

    # ------------------------------------------------------------------------------------- step API
    def add_request(self, prompt: list[int], max_new_tokens: int) -> int:
        """Queue ``prompt`` (a non-empty sequence of token ids in ``[0, vocab_size)``) for ``max_new_tokens``
        greedy tokens; returns its request id (ids count up from 0 over the engine's life). Nothing runs
        until ``step``; bad input raises here and queues nothing."""
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=0)
        return self._add(self._checked_prompt("prompt", prompt, max_new_tokens), max_new_tokens).rid

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """One model call: admit what fits, run every decode then prompt chunks within ``max_tokens_per_step``.

        Returns one ``StepOutput`` per request that ran, in the step's order (decodes first); an empty list
        when nothing is unfinished. Finished requests' blocks are freed before it returns. If the step
        fails, the requests that ran in it are dropped (blocks freed, their prefix-cache entries withdrawn)
        and the exception is re-raised (a ``NonFiniteLatentError`` names the request and position); the
        other requests are untouched and later steps run them.
        """
        self._admit()
        if not self._running:
            if self._waiting:     # cannot happen: a checked prompt fits the whole pool, and nothing holds blocks
                raise OutOfBlocksError(f"request {self._waiting[0].rid} cannot be admitted into an idle engine")
            return []
        reqs: list[_Request] = []
        try:
            items = self._schedule(reqs)
            new_tokens = self._step(items, reqs)
        except BaseException as e:
            # Blocks of the failed step are half written (some layers only) and were never published; what
            # its requests published earlier is withdrawn too, since the cause (e.g. a non-finite weight)
            # may have tainted it.
            for r in reqs:
                self._drop(r)
            ids = [r.rid for r in reqs]
            log.info("engine step failed (%s): dropped its request(s) %s", type(e).__name__, ids)
            e.add_note(f"swa_rewrite Engine: the failed step's requests {ids} were dropped, their blocks freed")
            raise
        out = []
        for r, tokens in zip(reqs, new_tokens):
            finished = r.finished
            if finished:
                self._release(r)
                self._running.remove(r)
                log.debug("request %d finished: %d prompt + %d generated tokens", r.rid, r.num_prompt,
                          len(r.generated))
            out.append(StepOutput(r.rid, tokens, finished))
        return out

    def abort(self, request_id: int) -> None:
        """Drop an unfinished request: its blocks are freed and what it published is withdrawn from the prefix
        cache. Aborting a request that already finished (or was aborted, or failed in a step) is a no-op;
        an id ``add_request`` never returned raises ``KeyError`` naming it."""
        request_id = check_int("request_id", request_id)
        for queue in (self._waiting, self._running):
            for r in queue:
                if r.rid == request_id:
                    self._drop(r)
                    log.debug("request %d aborted", request_id)
                    return
        if not 0 <= request_id < self._next_id:
            raise KeyError(f"request id {request_id} is unknown to this engine (ids so far: [0, {self._next_id}))")

    def has_unfinished(self) -> bool:
        """Whether any added request is waiting or running."""
        return bool(self._waiting or self._running)

    # ------------------------------------------------------------------------------------------ whole calls
    @torch.no_grad()
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

    @torch.no_grad()
    def logits(self, prompt: list[int]) -> torch.Tensor:
        """Float32 logits ``[len(prompt), vocab]`` of every prompt position, computed through the paged path.

        Every position is computed (no prefix reuse for this prompt); its full blocks are still published.
        Like ``generate``, it needs an engine with no unfinished step-API requests.
        """
        (req,) = self._run([(self._checked_prompt("prompt", prompt, 0), 0, False, True)])
        return torch.cat(req.logits)

    # ----------------------------------------------------------------------------------------- internals
    def _blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.page_size)

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
        need = self._blocks_for(len(prompt) + max_new_tokens)
        if need > self.blocks.num_blocks:
            raise ValueError(f"{name} needs {need} blocks of {self.page_size} positions, the cache has "
                             f"{self.blocks.num_blocks}")
        return [int(tok) for tok in prompt]

    def _add(self, prompt: list[int], max_new_tokens: int, *, reuse: bool = True,
             keep_logits: bool = False) -> _Request:
        r = _Request(self._next_id, prompt, len(prompt), max_new_tokens, reuse=reuse, keep_logits=keep_logits)
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
        try:
            while self.has_unfinished():
                self.step()
        except BaseException:
            for r in reqs:
                self._drop(r)
            log.debug("engine call failed: released the blocks of its %d request(s)", len(reqs))
            raise
        return reqs

    def _drop(self, r: _Request) -> None:
        """Take ``r`` out of the queues and release it, withdrawing its publications (a no-op when repeated)."""
        for queue in (self._waiting, self._running):
            if r in queue:
                queue.remove(r)
        self._release(r, withdraw=True)

    def _release(self, r: _Request, *, withdraw: bool = False) -> None:
        """Drop ``r``'s references on its blocks (a no-op once released); with ``withdraw`` also take back
        the prefix-cache entries ``r`` published, whose contents are not trusted (blocks other requests
        still hold stay theirs)."""
        if withdraw:
            for block, key in r.published:
                self.blocks.unregister(block, key)
            r.published = []
        blocks, r.blocks = r.blocks, []
        self.blocks.free(blocks)

    def _reserved(self) -> int:
        return sum(self._blocks_for(r.num_prompt + r.max_new_tokens) - len(r.blocks) for r in self._running)

    def _admit(self) -> None:
        """Admit waiting requests in order while their whole generation fits beside the running ones."""
        while self._waiting:
            r = self._waiting[0]
            need = self._blocks_for(r.num_prompt + r.max_new_tokens)
            if self.blocks.num_free - self._reserved() < need:
                break
            self._waiting.pop(0)
            if self.prefix_caching and r.reuse:
                # Keep at least the last prompt token to compute: its logits start the generation.
                keys = prefix_block_keys(r.tokens[: r.num_prompt - 1], self.page_size)
                r.blocks = self.blocks.match_prefix(keys)
                r.block_keys = keys[: len(r.blocks)]
                r.num_computed = len(r.blocks) * self.page_size
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
            missing = self._blocks_for(r.num_computed + n) - len(r.blocks)
            if missing > 0:
                r.blocks += self.blocks.allocate(missing)
            items.append(StepItem(r.tokens[r.num_computed:r.num_computed + n], r.num_computed, r.blocks,
                                  r.in_prefill))
            budget -= n
        assert items, "a running request always has work"
        return items

    def _step(self, items: list[StepItem], reqs: list[_Request]) -> list[list[int]]:
        """Run the model on ``items``; returns the new tokens of each request."""
        batch = StepBatch.build(items, self.page_size, num_groups=self.num_groups, device=self.device)
        keep_logits = any(r.keep_logits for r in reqs)
        logits_indices = None if keep_logits else batch.last_token_index
        try:
            logits = self.model(batch.input_ids, kv_caches=self.kv_caches, meta=batch.meta,
                                logits_indices=logits_indices).float()
        except NonFiniteLatentError as e:
            raise self._name_token(e, items, reqs) from e
        self.stats.steps += 1
        cu = [0]
        for it in items:
            cu.append(cu[-1] + len(it.tokens))
        # One device-to-host copy per step: the greedy token of every request (and all logits if kept).
        if keep_logits:
            logits = logits.cpu()
            greedy = logits[torch.tensor(cu[1:]) - 1].argmax(-1).tolist()
        else:
            greedy = logits.argmax(-1).tolist()
        new_tokens = []
        for b, (it, r) in enumerate(zip(items, reqs)):
            n = len(it.tokens)
            if it.is_prefill:
                self.stats.prefill_tokens += n
            else:
                self.stats.decode_tokens += n
            if r.keep_logits:
                r.logits.append(logits[cu[b]:cu[b + 1]])
            r.num_computed += n
            new = []
            if not r.in_prefill and not r.done:
                new.append(greedy[b])
                r.tokens.append(greedy[b])
            new_tokens.append(new)
            if self.prefix_caching:
                self._publish_full_blocks(r)
        return new_tokens

    def _name_token(self, e: NonFiniteLatentError, items: list[StepItem], reqs: list[_Request]) -> Exception:
        """``e`` (a cache write's row and slot) restated as the request and token position that caused it."""
        located = token_of_slot(items, e.slot, self.page_size)
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
            key = chain_block_key(r.block_keys[-1] if r.block_keys else None, r.tokens[k * ps:(k + 1) * ps])
            if self.blocks.register(r.blocks[k], key):
                r.published.append((r.blocks[k], key))
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


def num_cache_groups(model: torch.nn.Module, kv_cache_spec: Optional[Sequence] = None) -> int:
    """``G``, the cache groups of ``model`` (``model_cache_groups``): ``StepBatch.build(..., num_groups=G)``."""
    return num_groups(model_cache_groups(model, kv_cache_spec=kv_cache_spec))


def _num_layers(model: torch.nn.Module) -> Optional[int]:
    """``model.config.num_hidden_layers`` (one cache per layer), None if the model does not say."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None
