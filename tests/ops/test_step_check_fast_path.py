"""The step check's vectorised pass (``step_check._step_data_ok``) decides exactly what the per-group checks
(``check_batch_data`` and ``_check_slots`` of every group) decide: on random valid steps — groups full or sliding
(window, sinks), window-bounded tables, padding, prefill chunks, empty batches — and on the same steps with one
value changed (a position, a slot, a table entry, a length, a request id). When it passes, nothing is checked
again (so a step it wrongly passed would run unchecked); when it fails, the per-group checks run and raise their
own message."""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from swa_rewrite.ops import step_check
from swa_rewrite.ops.batch_checks import BatchRule, check_batch_data
from swa_rewrite.ops.checks import validated_step
from swa_rewrite.ops.fp8_cache import fp8_cache_bytes
from swa_rewrite.runtime import StepBatch, StepItem

R, P = 128, 16


def _random_step(rng: random.Random):
    """A valid step: ``(host tensors, rules)`` with ``rules {group: BatchRule}`` (one page size)."""
    ps = rng.choice([1, 2, 3, 4, 8])
    G = rng.randint(1, 3)
    windows = [(0, 0) if rng.random() < 0.4 else (rng.randint(1, 12), rng.choice([0, 0, 1, 3])) for _ in range(G)]
    B = rng.choice([0, 1, 2, 3, 5])
    items, next_block = [], [0] * G
    for _ in range(B):
        cached = rng.randint(0, 30)
        prefill = rng.random() < 0.4
        tokens = list(range(rng.randint(1, 7) if prefill else rng.choice([1, 1, 2])))
        end = cached + len(tokens)
        pages = -(-end // ps) + rng.randint(0, 2)
        tables = []
        for g, (window, sinks) in enumerate(windows):
            row = list(range(next_block[g], next_block[g] + pages))
            next_block[g] += pages
            if window and rng.random() < 0.7:            # window-bounded: -1 outside the window and sinks
                lo = max(0, cached - window + 1)
                row = [b if (i * ps + ps > lo and i * ps < end) or i * ps < min(sinks, end) else -1
                       for i, b in enumerate(row)]
            tables.append(row)
        items.append(StepItem(tokens, cached, tables if G > 1 else tables[0], prefill))
    T = sum(len(it.tokens) for it in items)
    b = StepBatch.build(items, ps, pad_to=T + rng.randint(0, 3), num_groups=G,
                        max_blocks=rng.randint(0, 2) + max([0] + [len(t) for it in items
                                                                  for t in (it.block_table if G > 1 else [it.block_table])]))
    m = b.meta
    host = dict(pos=m.positions.clone(), slots=m.slot_mapping.clone(), bt=m.block_tables.long(),
                cu=m.cu_seqlens_q.long(), enc=m.seq_lens_encoder.long(), dec=m.seq_lens_decoder.long(),
                bid=m.batch_id_per_token.long(), ps=ps)
    rules = {g: BatchRule.of(ps, next_block[g] + rng.randint(0, 2), w, s) for g, (w, s) in enumerate(windows)}
    return host, rules


def _release_a_page(host: dict, rng: random.Random) -> None:
    """A table entry that holds a block becomes -1 (released): wrong where an op reads that page."""
    held = (host["bt"] >= 0).nonzero()
    if held.shape[0]:
        host["bt"][tuple(held[rng.randrange(held.shape[0])].tolist())] = -1


def _share_a_block(host: dict, rng: random.Random) -> None:
    """Token ``t2`` writes, through its own table, the block and offset token ``t1`` writes: the tables and slots
    agree, but one slot is written twice."""
    G, T = host["slots"].shape
    n = int(host["cu"][-1])
    pos, bid = host["pos"], host["bid"]
    g, ps = rng.randrange(G), host["ps"]
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b and int(pos[a]) % ps == int(pos[b]) % ps]
    if not pairs:
        return
    t1, t2 = rng.choice(pairs)
    b2, page = int(bid[t2]), int(pos[t2]) // ps
    block = int(host["slots"][g, t1]) // ps
    host["bt"][g, b2, page] = block
    for t in range(n):                                     # every token of b2 on that page follows its table
        if int(bid[t]) == b2 and int(pos[t]) // ps == page:
            host["slots"][g, t] = block * ps + int(pos[t]) % ps


def _mutate(host: dict, rules: dict, rng: random.Random) -> None:
    """Change one value of one tensor (in place): off by one or more, -1, -2, 0, a block id at or past the pool's end,
    or another entry's value."""
    names = [k for k, v in host.items() if isinstance(v, torch.Tensor) and v.numel()]
    t = host[rng.choice(names)].view(-1)
    i = rng.randrange(t.numel())
    v = int(t[i])
    nblk = max(r.num_blocks for r in rules.values())
    t[i] = rng.choice([v + 1, v - 1, v + rng.randint(2, 40), -1, -2, 0, nblk, nblk - 1, int(t[rng.randrange(t.numel())])])


def _per_group_pass(host: dict, rules: dict) -> bool:
    T = host["pos"].shape[0]
    try:
        for g, rule in rules.items():
            check_batch_data(T, host["bt"][g], host["cu"], host["enc"], host["dec"], host["bid"], rule, g)
            step_check._check_slots(host["pos"], host["slots"][g], host["bt"][g], host["cu"], host["dec"],
                                    host["bid"], rule.page_size, g)
    except ValueError:
        return False
    return True


def _fast_pass(host: dict, rules: dict) -> bool:
    return step_check._step_data_ok(host["pos"].shape[0], host["pos"], host["slots"], host["bt"], host["cu"],
                                    host["enc"], host["dec"], host["bid"], rules)


def test_the_vectorised_pass_agrees_with_the_per_group_checks(seed):
    rng = random.Random(seed)
    outcomes = {True: 0, False: 0}
    for _ in range(600):
        host, rules = _random_step(rng)
        assert _per_group_pass(host, rules) and _fast_pass(host, rules)
        fault = rng.choice([_mutate, _mutate, _release_a_page, _share_a_block])
        fault(host, rules, rng) if fault is _mutate else fault(host, rng)
        if rng.random() < 0.3:
            _mutate(host, rules, rng)
        expected = _per_group_pass(host, rules)
        assert _fast_pass(host, rules) == expected, (host, rules)
        outcomes[expected] += 1
    assert min(outcomes.values()) > 30, outcomes          # both outcomes exercised


def test_a_subset_of_the_groups_and_reordered_groups(seed):
    rng = random.Random(seed)
    for _ in range(100):
        host, rules = _random_step(rng)
        if len(rules) < 2:
            continue
        for order in (list(rules)[::-1], list(rules)[1:]):
            sub = {g: rules[g] for g in order}
            assert _fast_pass(host, sub) and _per_group_pass(host, sub)
        host["bt"][list(rules)[0]] = -5                   # a group outside the subset: not read
        assert _fast_pass(host, {g: rules[g] for g in list(rules)[1:]})


def test_different_page_sizes_fall_back_to_the_per_group_checks():
    """The vectorised pass needs one page size; with two it defers, and the per-group checks still raise."""
    items = [StepItem([1, 2], 5, [[0, 1], [0, 1, 2, 3]], True)]
    meta = StepBatch.build(items, 4, num_groups=2).meta
    bad = meta.slot_mapping.clone()
    bad[1, 0] = 3                                         # group 1 (page size 2) writes position 5 at slot 5
    caches = [torch.zeros(4, 4, R + P), torch.zeros(6, 2, fp8_cache_bytes(R, P), dtype=torch.uint8)]
    specs = [("full", None, 0), ("sliding", 4, 0)]
    with validated_step():
        with pytest.raises(ValueError, match=r"slot_mapping\[1\]\[0\] = 3, but position 5 of request 0 is slot 5"):
            step_check.checked_step_metadata(type(meta)(**{**meta.__dict__, "slot_mapping": bad}), caches, (0, 1),
                                             specs)


def test_positions_past_the_tables_are_refused_not_indexed():
    """A request whose positions, lengths and table agree but run past the table's pages (every entry a block):
    the vectorised pass says no — it must not index past the table — and the per-group check names the request."""
    i64 = dict(dtype=torch.long)
    host = dict(pos=torch.tensor([6, 7, 8], **i64), slots=torch.tensor([[6, 7, 8]], **i64),
                bt=torch.tensor([[[0, 1]]], **i64), cu=torch.tensor([0, 3], **i64), enc=torch.tensor([3], **i64),
                dec=torch.tensor([6], **i64), bid=torch.tensor([0, 0, 0], **i64), ps=4)
    rules = {0: BatchRule.of(4, 4)}
    assert not _fast_pass(host, rules)
    with pytest.raises(ValueError, match=r"request 0 reaches position 8 but its block table holds 8 positions"):
        check_batch_data(3, host["bt"][0], host["cu"], host["enc"], host["dec"], host["bid"], rules[0], 0)


class RecordOps(TorchDispatchMode):
    """The names of the torch operations dispatched inside the block (``ops``)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_step_check_runs_no_tensor_operation_on_the_host_copy(monkeypatch):
    """After its one device-to-host copy the step check's fast pass works on NumPy views of the host tensors: a torch
    CPU operation costs ~5 µs of dispatch where NumPy's costs ~1, and one over more than 32K elements (a long
    context's block table) — or ``repeat_interleave`` / ``aminmax`` along a dimension at any size — opens a parallel
    region on the host's threads (~0.1 ms each on a 16-core host). So the only torch operations of a passing step
    check are the copy's own (concatenate, split, views)."""
    results = []
    fast = step_check._step_data_ok
    monkeypatch.setattr(step_check, "_step_data_ok", lambda *a: results.append(fast(*a)) or results[-1])
    items = [StepItem([1], 9, [[0, 1], [2, 3]], False), StepItem([1, 2, 3], 0, [[4], [5]], True)]
    meta = StepBatch.build(items, 8, pad_to=6, num_groups=2).meta
    caches = [torch.zeros(8, 8, R + P), torch.zeros(8, 8, fp8_cache_bytes(R, P), dtype=torch.uint8)]
    with validated_step(), RecordOps() as record:
        step_check.checked_step_metadata(meta, caches, (0, 1), [("full", None, 0), ("sliding", 4, 0)])
    assert results == [True]                               # the fast pass ran and passed the step
    assert "cat" in record.ops                             # the mode saw the copy's ops ...
    assert record.ops <= {"cat", "split_with_sizes", "view", "detach", "alias", "lift_fresh"}, record.ops  # ... only


@pytest.mark.parametrize("words", [False, True])
def test_the_host_copy_gives_every_tensor_back_as_int64(words):
    """``checks.host_int64``: int32 and int64 tensors of odd sizes, in any order (int64 ones after odd int32 ones
    too), non-contiguous (a transposed 2-D one, which ``reshape`` copies, and strided 1-D ones, which it does not)
    and empty ones, come back equal, as int64; ``words=True`` is the path a device takes (int32 words, one copy)."""
    from swa_rewrite.ops.checks import host_int64

    big = 2**40 + 3
    tensors = (torch.tensor([1, -2, 3], dtype=torch.int32), torch.tensor([big, -big, 5]),
               torch.arange(12, dtype=torch.int32).view(3, 4).t(), torch.empty(0, dtype=torch.int64),
               torch.tensor([[-1, 7]], dtype=torch.int64), torch.tensor([2**31 - 1, -2**31], dtype=torch.int32),
               torch.arange(-5, 10)[::2], torch.arange(12).view(3, 4)[:, 1], torch.arange(9, dtype=torch.int32)[::3])
    host = host_int64(tensors, words=words)
    assert len(host) == len(tensors)
    for t, h in zip(tensors, host):
        assert h.dtype == torch.int64 and torch.equal(h, t.reshape(-1).long())


@pytest.mark.parametrize("words", [False, True])
def test_the_host_copy_widens_int32_without_a_torch_operation(words):
    """``checks.host_int64`` widens int32 tensors on the host in NumPy, not with a torch conversion: one over more
    than 32K elements (a 32K-context block table of 32 requests in two cache groups) opens a parallel region on the
    host's threads — 0.3 ms per checked step in the H200's profile. Only the copy's own torch operations run."""
    from swa_rewrite.ops.checks import host_int64

    table = torch.randint(-1, 2**31 - 1, (2, 32, 513), dtype=torch.int32)
    lengths = torch.randint(0, 2**20, (32,), dtype=torch.int32)
    with RecordOps() as record:
        host = host_int64((table, lengths), words=words)
    copy_ops = {"cat", "split_with_sizes", "view", "alias", "detach", "lift_fresh"}
    assert "_to_copy" not in record.ops and record.ops <= copy_ops, record.ops
    assert [h.dtype for h in host] == [torch.int64, torch.int64]
    assert torch.equal(host[0], table.reshape(-1).long()) and torch.equal(host[1], lengths.long())
