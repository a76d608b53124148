"""Engine test helpers shared by the runtime tests: poisoned caches, an idle-engine check and a model that fails on
cue."""

import torch


def poison(engine):
    """Fill every cache of ``engine`` with NaN (0xFF in a uint8 FP8 cache: an FP8 NaN), so a read of a slot no step
    wrote shows up; returns ``engine``."""
    for c in engine.kv_caches:
        c.fill_(255 if c.dtype == torch.uint8 else float("nan"))
    return engine


def assert_idle(engine):
    """No request is left and no block of any cache group is held by anyone (published ones may stay cached:
    they count as free)."""
    assert not engine.has_unfinished()
    for usage, group in zip(engine.cache_usage(), engine.cache.groups):
        bm = group.pool
        assert usage.in_use == 0, usage
        assert bm.num_free == bm.num_blocks == usage.total
        assert all(bm.refcount(b) == 0 for b in range(bm.num_blocks))


class FailingModel(torch.nn.Module):
    """``model``, raising ``RuntimeError("injected failure")`` on its ``fail_at``-th call (counted from 1)."""

    def __init__(self, model, fail_at):
        super().__init__()
        self.model, self.config, self.fail_at, self.calls = model, model.config, fail_at, 0

    def allocate_kv_cache(self, *args, **kwargs):
        return self.model.allocate_kv_cache(*args, **kwargs)

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        return self.model(*args, **kwargs)
