"""A small paged MLA runtime: block manager, step batches, greedy engine."""

from .batch import MHAPlan, StepBatch, StepItem, mha_crossover_tokens, mha_measured_rule, mha_pays_off
from .block_manager import BlockManager, OutOfBlocksError
from .engine import Engine, StepOutput, model_cache_groups, num_cache_groups

__all__ = ["BlockManager", "Engine", "MHAPlan", "OutOfBlocksError", "StepBatch", "StepItem", "StepOutput",
           "mha_crossover_tokens", "mha_measured_rule", "mha_pays_off", "model_cache_groups", "num_cache_groups"]
