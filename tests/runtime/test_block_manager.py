"""Block ids and sizes given to the block manager and the step batch are checked before anything changes
(issue 11): a bad id never gives a block two owners."""

import numpy as np
import pytest

from swa_rewrite.runtime import BlockManager, StepBatch, StepItem


def owners_are_consistent(bm):
    """Allocating everything that is free hands out exactly the unheld blocks, each once."""
    held = [b for b in range(bm.num_blocks) if bm.refcount(b) > 0]
    fresh = bm.allocate(bm.num_free)
    return sorted(fresh) == sorted(set(range(bm.num_blocks)) - set(held)) and len(set(fresh)) == len(fresh)


@pytest.mark.parametrize("call,error,message", [
    (lambda bm: bm.free([-3]), ValueError, r"block id -3 is out of range \[0, 4\)"),
    (lambda bm: bm.free([0, 4]), ValueError, r"block id 4 is out of range \[0, 4\)"),
    (lambda bm: bm.free([1.0]), TypeError, r"block id must be an integer, got 1\.0 \(float\)"),
    (lambda bm: bm.free([True]), TypeError, r"block id must be an integer, got True \(bool\)"),
    (lambda bm: bm.free([0, 0]), ValueError, r"block 0 freed more often than allocated \(freed 2 times, held 1"),
    (lambda bm: bm.free([3]), ValueError, r"block 3 freed more often than allocated"),
    (lambda bm: bm.refcount(-1), ValueError, r"block id -1 is out of range"),
    (lambda bm: bm.register(7, "k"), ValueError, r"block id 7 is out of range \[0, 4\)"),
    (lambda bm: bm.register(3, "k"), ValueError, r"block 3 is not allocated"),
    (lambda bm: bm.unregister(-1, "k"), ValueError, r"block id -1 is out of range"),
    (lambda bm: bm.allocate(1.0), TypeError, r"number of blocks to allocate must be an integer, got 1\.0"),
])
def test_bad_block_ids_change_nothing(call, error, message):
    bm = BlockManager(4, page_size=2)
    a = bm.allocate(3)                       # blocks 0, 1, 2; block 3 free
    bm.register(a[1], "k1")
    with pytest.raises(error, match=message):
        call(bm)
    assert [bm.refcount(b) for b in range(4)] == [1, 1, 1, 0]
    assert bm.match_prefix(["k1"]) == [a[1]]
    bm.free([a[1]])
    assert owners_are_consistent(bm)


def test_negative_ids_cannot_give_a_block_two_owners():
    bm = BlockManager(3, page_size=1)
    a = bm.allocate(3)
    with pytest.raises(ValueError):
        bm.free([-3])                        # was block 0 through negative indexing
    assert bm.num_free == 0 and bm.refcount(a[0]) == 1


def test_unregister_withdraws_a_published_block():
    bm = BlockManager(2, page_size=1)
    a = bm.allocate(2)
    assert bm.register(a[0], "k0") and not bm.register(a[1], "k0")      # first writer wins
    bm.free([a[0]])
    bm.unregister(a[0], "other key")                                     # not its key: a no-op
    assert bm.match_prefix(["k0"]) == [a[0]]
    bm.free([a[0]])
    bm.unregister(a[0], "k0")
    assert bm.match_prefix(["k0"]) == [] and bm.num_free == 1
    assert bm.allocate(1) == [a[0]]                                     # free again, not cached


@pytest.mark.parametrize("args,error,message", [
    ((4.0, 2), TypeError, r"num_blocks must be an integer, got 4\.0 \(float\)"),
    ((True, 2), TypeError, r"num_blocks must be an integer, got True \(bool\)"),
    ((4, np.float32(2)), TypeError, r"page_size must be an integer, got .*2\.0.* \(float32\)"),
    ((0, 2), ValueError, r"num_blocks must be >= 1, got 0"),
    ((4, 0), ValueError, r"page_size must be >= 1, got 0"),
])
def test_block_manager_sizes(args, error, message):
    with pytest.raises(error, match=message):
        BlockManager(*args)


def test_numpy_sizes_and_ids_are_accepted():
    bm = BlockManager(np.int64(3), np.int32(2))
    assert (bm.num_blocks, bm.page_size) == (3, 2) and type(bm.num_blocks) is int
    a = bm.allocate(np.int64(2))
    bm.free([np.int64(a[0])])
    assert bm.refcount(np.int32(a[0])) == 0 and bm.num_free == 2


def test_step_batch_page_size_must_be_an_integer():
    items = [StepItem([1, 2], 0, [0], True)]
    with pytest.raises(TypeError, match=r"page_size must be an integer, got 4\.0 \(float\)"):
        StepBatch.build(items, 4.0)
    with pytest.raises(TypeError, match=r"page_size must be an integer, got True \(bool\)"):
        StepBatch.build(items, True)
    with pytest.raises(TypeError, match=r"pad_to must be an integer, got 4\.0"):
        StepBatch.build(items, 4, pad_to=4.0)
    assert StepBatch.build(items, np.int64(4)).meta.slot_mapping.tolist() == [[0, 1]]
