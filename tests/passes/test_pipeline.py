"""``passes.swa_passes``: the one pass list behind ``apply``, the Dynamo backend and the Inductor pass."""

import swa_rewrite
from swa_rewrite import Schedule, SWAPostGradPass, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.passes import (FindMLAAttentionPass, PackCacheAllocationPass, PassManager, ReplaceAttentionPass,
                                SwaRewriteOps, default_registry, swa_pass_manager, swa_passes)

TINY = MLAConfig.named("tiny")


def test_the_pipeline_runs_find_replace_pack_in_that_order():
    s = Schedule(8, [1], 4)
    passes = swa_passes(s)
    assert [type(p) for p in passes] == [FindMLAAttentionPass, ReplaceAttentionPass, PackCacheAllocationPass]
    assert [p.partial for p in passes] == [False] * 3
    assert [p.partial for p in swa_pass_manager(s, partial=True).passes] == [True] * 3
    assert [type(a) for a in passes[0].registry] == [SwaRewriteOps]


def test_every_entry_point_hashes_the_same_pipeline():
    s = Schedule(8, [1, 3], 4)
    registry = default_registry()
    compiled = swa_pass_manager(s, registry, partial=True).uuid()
    assert SWAPostGradPass(s, registry).uuid() == swa_rewrite.backend(s, registry=registry).uuid() == compiled
    report = apply(MLAModel(TINY), s, registry=registry).swa_report
    assert report.uuid == PassManager(swa_passes(s, registry)).uuid()
    assert [r.name for r in report.passes] == [p.name for p in swa_passes(s)]
