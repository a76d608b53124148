"""A small paged MLA runtime: block manager, step batches, greedy engine."""

from .batch import StepBatch, StepItem
from .block_manager import BlockManager, OutOfBlocksError
from .engine import Engine, StepOutput, model_cache_groups, num_cache_groups

__all__ = ["BlockManager", "Engine", "OutOfBlocksError", "StepBatch", "StepItem", "StepOutput",
           "model_cache_groups", "num_cache_groups"]
