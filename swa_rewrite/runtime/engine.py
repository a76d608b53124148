"""A small paged MLA engine: chunked prefill under a token budget, prefix reuse, greedy decoding."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import torch

from .batch import StepBatch, StepItem
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
        if max_tokens_per_step < 1:
            raise ValueError(f"max_tokens_per_step must be >= 1, got {max_tokens_per_step}")
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.page_size, self.max_tokens_per_step = page_size, max_tokens_per_step
        self.prefix_caching = prefix_caching
        self.blocks = BlockManager(num_blocks, page_size)
        # Caches come from the model unless given (e.g. a compiled model: swa_rewrite.backend(...).allocate_kv_cache).
        self.kv_caches = (model.allocate_kv_cache(num_blocks, page_size, self.device) if kv_caches is None
                          else kv_caches)
        for i, c in enumerate(self.kv_caches):
            if c.shape[:2] != (num_blocks, page_size):
                raise ValueError(f"kv_caches[{i}] has shape {tuple(c.shape)}, expected [{num_blocks}, {page_size}, ...]")
        self.stats = EngineStats()

    # ------------------------------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt: ``max_new_tokens`` new tokens per prompt."""
        reqs = self._run(prompts, max_new_tokens, keep_logits=False)
        return [r.generated for r in reqs]

    @torch.no_grad()
    def logits(self, prompt: list[int]) -> torch.Tensor:
        """Float32 logits ``[len(prompt), vocab]`` of every prompt position, computed through the paged path.

        Every position is computed (no prefix reuse for this prompt); its full blocks are still published.
        """
        (req,) = self._run([prompt], 0, keep_logits=True)
        return torch.cat(req.logits)

    # ----------------------------------------------------------------------------------------- internals
    def _blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.page_size)

    def _run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, keep_logits: bool) -> list[_Request]:
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        waiting = []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            need = self._blocks_for(len(p) + max_new_tokens)
            if need > self.blocks.num_blocks:
                raise ValueError(f"prompt {i} needs {need} blocks of {self.page_size} positions, the cache has "
                                 f"{self.blocks.num_blocks}")
            waiting.append(_Request(i, list(p), len(p), max_new_tokens))
        all_reqs, running = list(waiting), []
        while waiting or running:
            self._admit(waiting, running, reuse=not keep_logits)
            items, reqs = self._schedule(running)
            if not items:
                raise OutOfBlocksError("no request can make progress")  # cannot happen with reservations
            self._step(items, reqs, keep_logits)
            for r in [r for r in running if r.done and not r.in_prefill]:
                self.blocks.free(r.blocks)
                r.blocks = []
                running.remove(r)
        return all_reqs

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
        logits = self.model(batch.input_ids, kv_caches=self.kv_caches, logits_indices=logits_indices,
                            **batch.model_inputs()).float()
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

    def _publish_full_blocks(self, r: _Request) -> None:
        ps = self.page_size
        while (len(r.block_keys) + 1) * ps <= r.num_computed:
            k = len(r.block_keys)
            key = chain_block_key(r.block_keys[-1] if r.block_keys else None, r.tokens[k * ps:(k + 1) * ps])
            self.blocks.register(r.blocks[k], key)
            r.block_keys.append(key)
