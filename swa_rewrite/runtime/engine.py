"""A small paged MLA engine: chunked prefill under a token budget, prefix reuse, greedy decoding."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
from typing import Any, Hashable, Optional

import torch

from ..ops.validation import NonFiniteLatentError, check_int, check_kv_caches
from .batch import StepBatch, StepItem, token_of_slot
from .block_manager import BlockManager, OutOfBlocksError, chain_block_key, prefix_block_keys

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Request:
    rid: int
    tokens: list[int]            # prompt followed by generated tokens
    num_prompt: int
    max_new_tokens: int
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
    """

    def __init__(self, model: torch.nn.Module, *, num_blocks: int, page_size: int, max_tokens_per_step: int,
                 prefix_caching: bool = True, device: torch.device | str | None = None,
                 kv_caches: Optional[list[torch.Tensor]] = None):
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
        self.stats = EngineStats()

    # ------------------------------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt: ``max_new_tokens`` new tokens per prompt.

        ``prompts``: a list of non-empty sequences of token ids in ``[0, vocab_size)`` (Python or numpy ints).
        If the call fails, every block it took is released and nothing it published stays in the prefix
        cache: the engine is as it was before the call.
        """
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=0)
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of prompts (each a list of token ids), got "
                            f"{type(prompts).__name__}")
        prompts = [self._checked_prompt(f"prompt {i}", p, max_new_tokens) for i, p in enumerate(prompts)]
        reqs = self._run(prompts, max_new_tokens, keep_logits=False)
        return [r.generated for r in reqs]

    @torch.no_grad()
    def logits(self, prompt: list[int]) -> torch.Tensor:
        """Float32 logits ``[len(prompt), vocab]`` of every prompt position, computed through the paged path.

        Every position is computed (no prefix reuse for this prompt); its full blocks are still published.
        """
        (req,) = self._run([self._checked_prompt("prompt", prompt, 0)], 0, keep_logits=True)
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

    def _run(self, prompts: list[list[int]], max_new_tokens: int, keep_logits: bool) -> list[_Request]:
        """Run checked ``prompts`` to completion; on any error release everything the call took, then re-raise."""
        all_reqs = [_Request(i, p, len(p), max_new_tokens) for i, p in enumerate(prompts)]
        waiting, running = list(all_reqs), []
        try:
            while waiting or running:
                self._admit(waiting, running, reuse=not keep_logits)
                items, reqs = self._schedule(running)
                if not items:
                    raise OutOfBlocksError("no request can make progress")  # cannot happen with reservations
                self._step(items, reqs, keep_logits)
                for r in [r for r in running if r.done and not r.in_prefill]:
                    self._release(r)
                    running.remove(r)
        except BaseException:
            # Whatever failed (a non-finite latent, a model error, an interrupt), the call's blocks come back.
            # Blocks of the failed step are half written (some layers only) and were never published; the
            # call's earlier publications are withdrawn too, since the cause (e.g. a non-finite weight) may
            # have tainted them: the prefix cache is left as it was before the call.
            for r in all_reqs:
                self._release(r, withdraw=True)
            log.debug("engine call failed: released the blocks of its %d request(s)", len(all_reqs))
            raise
        return all_reqs

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

    def _reserved(self, running: list[_Request]) -> int:
        return sum(self._blocks_for(r.num_prompt + r.max_new_tokens) - len(r.blocks) for r in running)

    def _admit(self, waiting: list[_Request], running: list[_Request], reuse: bool) -> None:
        """Admit waiting requests in order while their whole generation fits beside the running ones."""
        while waiting:
            r = waiting[0]
            need = self._blocks_for(r.num_prompt + r.max_new_tokens)
            if self.blocks.num_free - self._reserved(running) < need:
                break
            waiting.pop(0)
            if self.prefix_caching and reuse:
                # Keep at least the last prompt token to compute: its logits start the generation.
                keys = prefix_block_keys(r.tokens[: r.num_prompt - 1], self.page_size)
                r.blocks = self.blocks.match_prefix(keys)
                r.block_keys = keys[: len(r.blocks)]
                r.num_computed = len(r.blocks) * self.page_size
                self.stats.reused_tokens += r.num_computed
            running.append(r)

    def _schedule(self, running: list[_Request]) -> tuple[list[StepItem], list[_Request]]:
        budget = self.max_tokens_per_step
        items, reqs = [], []
        decodes = [r for r in running if not r.in_prefill and not r.done]
        prefills = [r for r in running if r.in_prefill]
        for r in decodes + prefills:
            if budget == 0:
                break
            n = 1 if not r.in_prefill else min(budget, r.num_prompt - r.num_computed)
            missing = self._blocks_for(r.num_computed + n) - len(r.blocks)
            if missing > 0:
                r.blocks += self.blocks.allocate(missing)
            items.append(StepItem(r.tokens[r.num_computed:r.num_computed + n], r.num_computed, r.blocks,
                                  r.in_prefill))
            reqs.append(r)
            budget -= n
        return items, reqs

    def _step(self, items: list[StepItem], reqs: list[_Request], keep_logits: bool) -> None:
        batch = StepBatch.build(items, self.page_size, device=self.device)
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
        for b, (it, r) in enumerate(zip(items, reqs)):
            n = len(it.tokens)
            if it.is_prefill:
                self.stats.prefill_tokens += n
            else:
                self.stats.decode_tokens += n
            if keep_logits:
                r.logits.append(logits[cu[b]:cu[b + 1]])
            r.num_computed += n
            if not r.in_prefill and not r.done:
                r.tokens.append(greedy[b])
            if self.prefix_caching:
                self._publish_full_blocks(r)

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


def _num_layers(model: torch.nn.Module) -> Optional[int]:
    """``model.config.num_hidden_layers`` (one cache per layer), None if the model does not say."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None
