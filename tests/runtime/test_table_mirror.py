"""``runtime.table_mirror.TableMirror`` (issue 14): the engine's host copies of its requests' block tables, updated
where ``KVCacheManager`` changed them, always equal the tables converted afresh — over random arrivals, aborts,
prefix reuse and sliding windows (pages released mid-table, sinks kept)."""

import contextlib
import random

import pytest
import torch

from engine_helpers import assert_idle
from swa_rewrite import Schedule, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.ops.checks import checks_disabled
from swa_rewrite.runtime import Engine, StepBatch
from swa_rewrite.runtime import engine as engine_module
from swa_rewrite.runtime.kv_cache_manager import KVCacheManager
from swa_rewrite.runtime.table_mirror import TableMirror

TINY = MLAConfig.named("tiny")


def afresh(tables, width):
    """The reference: every table converted from its list, ``-1`` past its pages."""
    G = len(tables[0]) if tables else 1
    out = torch.full((G, len(tables), width), -1, dtype=torch.int32)
    for b, per_group in enumerate(tables):
        for g, row in enumerate(per_group):
            out[g, b, :len(row)] = torch.tensor(row, dtype=torch.int32)
    return out


def random_arrivals(engine, rng, prefix, *, steps, arrive, abort, new_tokens):
    """``steps`` engine steps with a request arriving at each with probability ``arrive`` (a random prompt, half of
    them after ``prefix``; ``new_tokens`` the range of its generation) and one of them aborted with probability
    ``abort``; then steps until nothing is left."""
    live = []
    for _ in range(steps):
        if rng.random() < arrive:
            prompt = rng.choice([prefix, []]) + [rng.randrange(TINY.vocab_size) for _ in range(rng.randrange(1, 6))]
            live.append(engine.add_request(prompt, rng.randrange(*new_tokens)))
        if live and rng.random() < abort:
            engine.abort(live.pop(rng.randrange(len(live))))
        engine.step()
    while engine.has_unfinished():
        engine.step()


@pytest.mark.parametrize("page_size,budget,overlap", [(1, 3, False), (2, 7, True), (4, 16, True)])
def test_engine_steps_get_the_tables_converted_afresh(page_size, budget, overlap, seed, monkeypatch):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    rewritten = apply(model, Schedule.from_skip_freq(2, TINY.num_hidden_layers, 3))   # windows of 3 positions
    checked = []
    real_build = StepBatch.build

    def build(items, page_size, **kw):
        given = kw.get("block_tables")
        assert given is not None, "the engine passes its mirrored tables"
        G = given.shape[0]
        tables = [it.block_table for it in items]
        want = afresh(tables, given.shape[2])
        assert torch.equal(given, want), (given, want)
        assert given.is_contiguous(), given.stride()     # a group's table a dense view (the ops' plans need it)
        assert all(len(t) <= given.shape[2] for per in tables for t in per)
        checked.append(G)
        built = real_build(items, page_size, **kw)
        assert built.meta.block_tables.is_contiguous()
        return built

    monkeypatch.setattr(engine_module.StepBatch, "build", staticmethod(build))
    engine = Engine(rewritten, num_blocks=48, page_size=page_size, max_tokens_per_step=budget, overlap=overlap)
    prefix = [rng.randrange(TINY.vocab_size) for _ in range(7)]
    random_arrivals(engine, rng, prefix, steps=60, arrive=0.3, abort=0.05, new_tokens=(1, 8))
    assert len(checked) > 20 and set(checked) == {2}
    assert len(engine._mirror) == 0                            # every finished or aborted request's row is freed
    assert_idle(engine)


def test_rows_are_reused_and_grow(seed):
    """Rows come back when their owner leaves; the array grows in rows and pages as needed, old rows intact."""
    model = MLAModel(TINY, seed=seed)
    specs = model.kv_cache_spec()[:1]
    cache = KVCacheManager(specs, [4096], 1)
    mirror = TableMirror(cache, 1)
    owners, tables = [], []
    for k in range(20):                                        # more rows than the first allocation's 8
        t = [[]]
        cache.prepare(t, 0, k + 1)                             # k + 1 pages
        owners.append(object())
        tables.append(t)
    got = mirror.tables(owners, tables, 20)
    assert torch.equal(got, afresh(tables, 20)) and got.is_contiguous()
    cache.prepare(tables[3], 4, 40)                            # grows past the array's pages
    got = mirror.tables(owners[:5], tables[:5], 40)
    assert torch.equal(got, afresh(tables[:5], 40))
    mirror.drop(owners[3])
    cache.release(tables[3])
    fresh = [[]]
    cache.prepare(fresh, 0, 2)
    got = mirror.tables([owners[0], "new"], [tables[0], fresh], 2)   # the freed row, cleared, for a new owner
    assert torch.equal(got, afresh([tables[0], fresh], 2))
    assert len(mirror) == 20


def test_build_checks_given_tables():
    from swa_rewrite.runtime import StepItem

    items = [StepItem([1], 2, [0], False)]
    for bad in (torch.zeros(1, 1, 1, dtype=torch.int64), torch.zeros(2, 1, 1, dtype=torch.int32), [[[0]]]):
        with pytest.raises(ValueError, match="block_tables must be a \\[1, 1, nb\\] int32 host tensor"):
            StepBatch.build(items, 4, block_tables=bad)
    given = torch.zeros(1, 1, 1, dtype=torch.int32)
    got = StepBatch.build(items, 4, block_tables=given, max_blocks=3)
    assert got.meta.block_tables.tolist() == [[[0, -1, -1]]]  # padded to max_blocks with -1


def test_build_makes_given_tables_contiguous():
    """Tables given as a strided view (``[B, G, nb]`` in memory) reach the step contiguous, values unchanged."""
    from swa_rewrite.runtime import StepItem

    items = [StepItem([1], 2, [[b, 4 + b], [8 + b]], False) for b in range(3)]
    dense = torch.full((2, 3, 2), -1, dtype=torch.int32)
    for b, it in enumerate(items):
        for k, row in enumerate(it.block_table):
            dense[k, b, :len(row)] = torch.tensor(row, dtype=torch.int32)
    strided = dense.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    for width in (None, 4):
        got = StepBatch.build(items, 4, num_groups=2, block_tables=strided, max_blocks=width).meta.block_tables
        assert got.is_contiguous()
        assert torch.equal(got[:, :, :2], dense)
        assert (got[:, :, 2:] == -1).all()


def test_a_host_step_packs_into_one_buffer(seed):
    """``batch._packed_to`` (what ``StepBatch.to`` does for a host step going to the GPU): every tensor's values,
    dtype and shape, contiguous, at a 16-byte aligned offset of one buffer, none overlapping — empty ones too."""
    from swa_rewrite.runtime.batch import _packed_to

    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randint(-5, 1 << 30, shape, generator=g, dtype=dtype)
               for shape, dtype in [((7,), torch.int64), ((2, 3, 5), torch.int32), ((2, 0), torch.int32),
                                    ((3,), torch.int32), ((2, 9), torch.int64), ((1,), torch.int32)]]
    tensors.append(tensors[1].transpose(0, 1))                   # a strided one: packed contiguous
    moved = _packed_to(tensors, torch.device("cpu"), False)
    base = moved[0].data_ptr()
    spans = []
    for t, m in zip(tensors, moved):
        assert m.dtype == t.dtype and m.shape == t.shape and m.is_contiguous() and torch.equal(m, t)
        assert (m.data_ptr() - base) % 16 == 0
        assert m.untyped_storage().data_ptr() == moved[0].untyped_storage().data_ptr()   # one buffer
        if m.numel():
            spans.append((m.data_ptr(), m.data_ptr() + m.numel() * m.element_size()))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_a_step_sent_to_another_device_keeps_every_field():
    """``StepBatch.to`` of a host step: the fields of the step as built (the packed path when the device is not the
    CPU: ``meta`` stands for it here; on the GPU the engine's tests run it)."""
    from swa_rewrite.runtime import StepItem

    items = [StepItem([3, 4], 0, [[0], [2]], True), StepItem([5], 6, [[1, 3], [4, 5]], False)]
    batch = StepBatch.build(items, 4, num_groups=2)
    moved = batch.to("meta")
    for name in ("input_ids", "last_token_index"):
        a, b = getattr(batch, name), getattr(moved, name)
        assert b.device.type == "meta" and (a.shape, a.dtype) == (b.shape, b.dtype)
    for f in ("positions", "cu_seqlens_q", "seq_lens_encoder", "seq_lens_decoder", "batch_id_per_token",
              "block_tables", "slot_mapping", "mha_kv_slots", "mha_kv_cu"):
        a, b = getattr(batch.meta, f), getattr(moved.meta, f)
        assert b.device.type == "meta" and (a.shape, a.dtype) == (b.shape, b.dtype) and b.is_contiguous(), f


ADVANCE_CASES = [(1, 3, False, False, True), (4, 16, True, False, False), (4, 16, True, False, True),
                 (4, 9, False, True, True), (8, 64, True, True, False)]


def _every_step_built_afresh(page_size, budget, overlap, graphs, checks, seed, monkeypatch, device):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed, device=device)
    rewritten = apply(model, Schedule.from_skip_freq(2, TINY.num_hidden_layers, 3))
    engine = Engine(rewritten, num_blocks=64, page_size=page_size, max_tokens_per_step=budget, overlap=overlap,
                    cuda_graphs=graphs, max_decode_batch=8 if graphs else None)
    with contextlib.nullcontext() if checks else checks_disabled():
        _drive_checked(engine, page_size, graphs, rng, monkeypatch)
    if overlap and not checks:
        assert engine.stats.in_flight_steps > 5     # eager steps advanced with their ids from the device


@pytest.mark.parametrize("page_size,budget,overlap,graphs,checks", ADVANCE_CASES)
def test_every_engine_step_gets_the_inputs_built_afresh(page_size, budget, overlap, graphs, checks, seed,
                                                        monkeypatch):
    """Decode steps advanced from the last one (``StepBatch.advanced``) and steps built from the mirror: every step's
    host inputs, and an eager step's inputs as the model receives them, equal ``StepBatch.build`` from the items'
    own tables (the oracle), over random arrivals, aborts, prefix reuse and windows of 3 positions (with pages of one
    position none can be advanced); with checks off, overlapped eager steps take their ids from the device."""
    _every_step_built_afresh(page_size, budget, overlap, graphs, checks, seed, monkeypatch, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,budget,overlap,graphs,checks", ADVANCE_CASES)
def test_every_cuda_engine_step_gets_the_inputs_built_afresh(page_size, budget, overlap, graphs, checks, seed,
                                                             monkeypatch):
    """As above on CUDA, where an advanced eager step's inputs are the last step's device tensors one on."""
    _every_step_built_afresh(page_size, budget, overlap, graphs, checks, seed, monkeypatch, "cuda")


def _drive_checked(engine, page_size, graphs, rng, monkeypatch):
    """Random arrivals, aborts and a budget that shifts which requests decode, every step's inputs checked."""
    real, advanced, steps, wanted, sent = engine._host_batch, [], [], [], []
    fields = ("positions", "cu_seqlens_q", "seq_lens_encoder", "seq_lens_decoder", "batch_id_per_token",
              "block_tables", "slot_mapping", "mha_kv_slots", "mha_kv_cu")

    def host_batch(items, reqs, decode):
        last = engine._last_decode
        got, last_sent = real(items, reqs, decode)
        advanced.append(last is not None and got.meta.block_tables is last[1].meta.block_tables)
        sent.append(last_sent is not None)
        want = StepBatch.build(items, page_size, num_groups=engine.num_groups, mha=engine.mha_plan)
        assert torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.last_token_index, want.last_token_index)
        for f in fields:
            a, b = getattr(got.meta, f), getattr(want.meta, f)
            assert a.dtype == b.dtype and torch.equal(a, b), (f, a, b)
        steps.append(decode)
        wanted[:] = [want]
        return got, last_sent

    class Checked(torch.nn.Module):
        """The model, its eager calls' inputs (advanced from the last step's on the device, or sent) checked
        against the oracle's (the ids where the host had them: the step in flight's come from the device)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, kv_caches, meta, logits_indices=None):
            if wanted:           # (graph runs call the model the runner holds: not this wrapper)
                want = wanted[0]
                known = want.input_ids >= 0
                assert torch.equal(input_ids.cpu()[known], want.input_ids[known])
                for f in fields:
                    assert torch.equal(getattr(meta, f).cpu(), getattr(want.meta, f)), f
            return self.inner(input_ids, kv_caches=kv_caches, meta=meta, logits_indices=logits_indices)

    monkeypatch.setattr(engine, "_host_batch", host_batch)
    engine.model = Checked(engine.model)
    prefix = [rng.randrange(TINY.vocab_size) for _ in range(7)]
    for _ in range(2):              # two long generations, never aborted: decode steps in every workload
        engine.add_request([rng.randrange(TINY.vocab_size) for _ in range(4)], 24)
    random_arrivals(engine, rng, prefix, steps=80, arrive=0.15, abort=0.03, new_tokens=(3, 20))
    assert sum(steps) > 20
    # A budget below the decoding requests: a step runs the first of them; when one finishes, the next step runs
    # another set of the same size (not the last step's requests: built, not advanced).
    engine.max_tokens_per_step = 64
    for n in (3, 9, 9):
        engine.add_request([rng.randrange(TINY.vocab_size) for _ in range(3)], n)
    engine.step()                                                  # the three prompts
    engine.max_tokens_per_step = 2
    while engine.has_unfinished():
        engine.step()
    if page_size == 1:
        assert sum(advanced) == 0          # every position starts a page
    else:
        assert sum(advanced) > 5, (sum(steps), sum(advanced))
        assert graphs or sum(sent) > 5     # eager steps advanced on the device
    assert_idle(engine)
    assert engine._last_decode is None          # an idle engine keeps no step's inputs


def test_advanced_is_the_next_decode_step(seed):
    """``StepBatch.advanced``: the next decode step of the same requests on the same pages equals its build; steps
    with padding, several tokens a request or a wrong count of ids are refused."""
    from swa_rewrite.runtime import StepItem

    rng = random.Random(seed)
    tables = [[[rng.randrange(50) for _ in range(3)], [rng.randrange(50) for _ in range(3)]] for _ in range(4)]
    cached = [rng.randrange(0, 3) * 4 + rng.randrange(0, 3) for _ in range(4)]      # never a page's last slot
    step = StepBatch.build([StepItem([1], c, t, False) for c, t in zip(cached, tables)], 4, num_groups=2)
    got = step.advanced([5, 6, 7, 8])
    want = StepBatch.build([StepItem([5 + b], c + 1, t, False) for b, (c, t) in enumerate(zip(cached, tables))], 4,
                           num_groups=2)
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.last_token_index, want.last_token_index)
    for f in ("positions", "cu_seqlens_q", "seq_lens_encoder", "seq_lens_decoder", "batch_id_per_token",
              "block_tables", "slot_mapping", "mha_kv_slots", "mha_kv_cu"):
        assert torch.equal(getattr(got.meta, f), getattr(want.meta, f)), f
    with pytest.raises(ValueError, match="one token a request"):
        step.advanced([5, 6])
    padded = StepBatch.build([StepItem([1], 1, [[0], [1]], False)], 4, num_groups=2, pad_to=2)
    with pytest.raises(ValueError, match="one token a request"):
        padded.advanced([3])
