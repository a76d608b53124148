"""``Engine(overlap=True)``: decode steps left in flight, the next step fed the previous step's greedy tokens on the
device (issue 14). Every request gets the tokens a synchronous engine (and, for the original model, the dense
reference) gives it, outputs come one call late, and aborts, failures and the step API keep their meaning."""

import random

import pytest
import torch

from engine_helpers import FailingModel, assert_idle, poison
from mla_reference import dense_greedy
from swa_rewrite import Schedule, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.ops.checks import checks_disabled
from swa_rewrite.runtime import Engine, StepOutput
from swa_rewrite.runtime.cuda_graphs import DecodeGraphs

TINY = MLAConfig.named("tiny")
V = TINY.vocab_size



def prompts_of(rng, lengths):
    return [[rng.randrange(V) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("page_size,budget,graphs", [(1, 5, False), (4, 16, True), (7, 16, False), (16, 64, True)])
def test_overlapped_generation_matches_dense(page_size, budget, graphs, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    prompts = prompts_of(rng, (13, 1, 29, 4))
    engine = poison(Engine(model, num_blocks=96, page_size=page_size, max_tokens_per_step=budget, overlap=True,
                           cuda_graphs=graphs, max_model_len=48))
    got = engine.generate(prompts, max_new_tokens=6)
    assert got == [dense_greedy(model, p, 6) for p in prompts]
    # Decode-only steps went in flight (the first decode after the last prompt chunk onwards).
    assert engine.stats.in_flight_steps >= 3, engine.stats
    assert_idle(engine)


@pytest.mark.parametrize("checks", [True, False])
@pytest.mark.parametrize("graphs", [False, True])
def test_rewritten_model_overlapped_matches_synchronous(checks, graphs, seed):
    """The rewritten model (FP8 sliding groups, bounded caches): the same tokens as the synchronous engine. With
    checks on, an eager step's deferred finite-latent checks are read at its end, so no eager step goes in flight;
    graphed steps (which skip the checks) do."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    rewritten = apply(model, Schedule.from_skip_freq(2, TINY.num_hidden_layers, 6))
    prompts = prompts_of(rng, (17, 3, 9))
    kw = dict(num_blocks=64, page_size=4, max_tokens_per_step=12, cuda_graphs=graphs, max_model_len=40)
    want = Engine(rewritten, **kw).generate(prompts, 9)
    engine = poison(Engine(rewritten, overlap=True, **kw))
    if checks:
        got = engine.generate(prompts, 9)
    else:
        with checks_disabled():
            got = engine.generate(prompts, 9)
    assert got == want
    if checks and not graphs:
        assert engine.stats.in_flight_steps == 0
    else:
        assert engine.stats.in_flight_steps >= 6, engine.stats
    assert_idle(engine)


def test_outputs_come_one_call_late_and_a_final_call_returns_the_last(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    prompt = prompts_of(rng, (5,))[0]
    want = dense_greedy(model, prompt, 4)
    engine = poison(Engine(model, num_blocks=16, page_size=4, max_tokens_per_step=8, overlap=True))
    rid = engine.add_request(prompt, 4)
    # The prompt step reads its token at once (a prompt chunk never goes in flight).
    assert engine.step() == [StepOutput(rid, [want[0]], False)]
    assert engine.step() == []                                   # decode 1 in flight
    assert engine.stats.in_flight_steps == 1
    assert engine.step() == [StepOutput(rid, [want[1]], False)]  # decode 2 in flight, decode 1 read
    assert engine.step() == [StepOutput(rid, [want[2]], False)]  # decode 3 (the last) in flight: blocks freed
    assert engine.cache_usage()[0].in_use == 0
    assert engine.has_unfinished()                               # its output is still to come
    assert engine.step() == [StepOutput(rid, [want[3]], True)]
    assert not engine.has_unfinished() and engine.step() == []
    assert_idle(engine)


def test_partial_batches_take_their_tokens_from_the_right_rows(seed):
    """A request finishing, or a new one arriving, changes the step's rows: each decode still gets its own
    previous token (the gather path, not the pass-through)."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    prompts = prompts_of(rng, (6, 2, 9, 3))
    news = [2, 7, 4, 5]
    engine = poison(Engine(model, num_blocks=64, page_size=4, max_tokens_per_step=32, overlap=True))
    got = {}
    rids = [engine.add_request(p, n) for p, n in zip(prompts[:3], news[:3])]
    for i in range(40):
        if i == 3:
            rids.append(engine.add_request(prompts[3], news[3]))   # arrives while the others decode in flight
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        if not engine.has_unfinished():
            break
    assert [got[r] for r in rids] == [dense_greedy(model, p, n) for p, n in zip(prompts, news)]
    assert engine.stats.in_flight_steps >= 4
    assert_idle(engine)


def test_abort_of_a_request_in_flight(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    a, b = prompts_of(rng, (4, 7))
    engine = poison(Engine(model, num_blocks=32, page_size=4, max_tokens_per_step=16, overlap=True))
    ra, rb = engine.add_request(a, 6), engine.add_request(b, 6)
    seen = {ra: [], rb: []}
    for _ in range(3):                                          # prompt step, then two decodes (one in flight)
        for o in engine.step():
            seen[o.request_id] += o.new_token_ids
    engine.abort(ra)                                            # its token in flight is never returned
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == rb
            seen[rb] += o.new_token_ids
    assert seen[rb] == dense_greedy(model, b, 6)
    assert seen[ra] == dense_greedy(model, a, 6)[:len(seen[ra])] and len(seen[ra]) == 2
    assert_idle(engine)


def test_abort_of_a_request_whose_last_token_is_in_flight(seed):
    """A request that finished in the step in flight (blocks already freed) but whose last output no call returned
    counts as unfinished for ``abort``: that output never comes."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    engine = poison(Engine(model, num_blocks=16, page_size=4, max_tokens_per_step=8, overlap=True))
    rid = engine.add_request(prompts_of(rng, (5,))[0], 2)
    assert len(engine.step()) == 1 and engine.step() == []      # the last token is in flight
    assert engine.has_unfinished()
    engine.abort(rid)
    assert engine.step() == [] and not engine.has_unfinished()
    engine.abort(rid)                                           # a no-op now
    assert_idle(engine)


def test_a_failed_step_keeps_the_outputs_of_the_step_in_flight(seed):
    """Request ``a`` finishes in the step in flight; the next step (``b`` alone) fails: ``b`` is dropped, ``a``'s
    last token comes out of the next call, and the engine serves new requests after."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    a, b, c = prompts_of(rng, (3, 5, 4))
    # Calls: 1 the prompts, 2 a decode of both (a's 2nd and last token, in flight), 3 b alone: fails.
    failing = FailingModel(model, fail_at=3)
    engine = poison(Engine(failing, num_blocks=32, page_size=4, max_tokens_per_step=16, overlap=True))
    ra, rb = engine.add_request(a, 2), engine.add_request(b, 5)
    out = engine.step() + engine.step()
    assert [(o.request_id, o.finished) for o in out] == [(ra, False), (rb, False)]
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.step()
    assert engine.step() == [StepOutput(ra, [dense_greedy(model, a, 2)[1]], True)]
    assert not engine.has_unfinished()
    assert engine.generate([c], 3) == [dense_greedy(model, c, 3)]
    assert_idle(engine)


@pytest.mark.parametrize("page_size,budget", [(1, 3), (7, 17)])
def test_soak_random_arrivals_and_aborts(page_size, budget, seed):
    """Random arrivals, aborts and budgets: every finished request gets what a synchronous engine's lone
    ``generate`` gives it, no output comes after a request is aborted or finished, and every block comes back."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    engine = poison(Engine(model, num_blocks=max(2 * -(-16 // page_size), 3), page_size=page_size,
                           max_tokens_per_step=budget, overlap=True))
    reference = Engine(model, num_blocks=64, page_size=page_size, max_tokens_per_step=64)
    prefix = prompts_of(rng, (6,))[0]
    arrivals = [(rng.choice([prefix, []]) + prompts_of(rng, (rng.randrange(1, 5),))[0], rng.randrange(0, 5))
                for _ in range(20)]
    asked, got, finished, aborted = {}, {}, set(), set()
    steps = 0
    while arrivals or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 2])):
            if arrivals:
                prompt, n = arrivals.pop(0)
                rid = engine.add_request(prompt[:12], n)
                asked[rid], got[rid] = (prompt[:12], n), []
        live = [r for r in asked if r not in finished | aborted]
        if live and rng.random() < 0.05:
            rid = rng.choice(live)
            engine.abort(rid)
            aborted.add(rid)
        for o in engine.step():
            assert o.request_id not in finished | aborted
            got[o.request_id] += o.new_token_ids
            if o.finished:
                finished.add(o.request_id)
        steps += 1
        assert steps < 3000
    assert finished | aborted == set(asked)
    for rid in finished:
        prompt, n = asked[rid]
        assert got[rid] == reference.generate([prompt], n)[0], rid
    # A tail of requests arriving together decodes on its own once prefilled (arrivals above may have kept
    # every step mixed with prompt chunks, which never go in flight).
    before = engine.stats.in_flight_steps
    tail = [prompts_of(rng, (rng.randrange(1, 6),))[0] for _ in range(budget)]
    assert engine.generate(tail, 5) == [reference.generate([p], 5)[0] for p in tail]
    assert engine.stats.in_flight_steps > before
    assert_idle(engine)


def test_decode_graphs_take_device_input_ids_and_check_them(seed):
    """``DecodeGraphs.run(batch, input_ids=...)``: the ids given replace the batch's; wrong ones are refused."""
    from swa_rewrite.runtime import StepBatch, StepItem

    model = MLAModel(TINY, seed=seed)
    caches = model.allocate_kv_cache(8, 4)
    for c in caches:
        c.normal_()
    graphs = DecodeGraphs(model, caches, num_groups=1, page_size=4, max_blocks=2, max_batch=2, device="cpu")
    items = [StepItem([5], 3, [0, 1], False), StepItem([9], 2, [2], False)]
    batch = StepBatch.build(items, 4, device="cpu")
    other = StepBatch.build([StepItem([11], 3, [0, 1], False), StepItem([12], 2, [2], False)], 4, device="cpu")
    want = graphs.run(other).clone()
    got = graphs.run(batch, input_ids=torch.tensor([11, 12]))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for bad in (torch.tensor([1]), torch.tensor([1, 2], dtype=torch.int32), [1, 2]):
        with pytest.raises(ValueError, match="input_ids must be a \\[2\\] int64 tensor"):
            graphs.run(batch, input_ids=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_overlapped_cuda_steps_match_and_do_not_wait_for_the_device(graphs, seed):
    """On the GPU, eager (checks off) and graphed: the same tokens as the synchronous engine, and a step left in
    flight returns before its own device work ends: its ``step`` makes no synchronising call (CUDA's sync debug
    mode counts them) but the wait for the step before it."""
    import warnings

    rng = random.Random(seed)
    model = MLAModel(TINY, device="cuda", seed=seed)
    rewritten = apply(model, Schedule.from_skip_freq(2, TINY.num_hidden_layers, 6))
    prompts = prompts_of(rng, (17, 3, 9, 30))
    for m in (model, rewritten):
        kw = dict(num_blocks=96, page_size=4, max_tokens_per_step=64, cuda_graphs=graphs, max_model_len=64)
        with checks_disabled():
            reference = Engine(m, **kw)
            reference.overlap_runs = False                      # synchronous (generate overlaps on CUDA)
            want = reference.generate(prompts, 12)
            assert reference.stats.in_flight_steps == 0
            engine = poison(Engine(m, overlap=True, **kw))
            assert engine.generate(prompts, 12) == want
            assert engine.stats.in_flight_steps >= 10
            for p in prompts:
                engine.add_request(p, 12)
            engine.step()                                       # the prompts
            engine.step()                                       # first decode (captures / compiles: warm)
            engine.step()
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    engine.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            # (The mode's own notice that it is a prototype is not a synchronisation.)
            syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
            assert engine._in_flight is not None and not syncs, syncs
            while engine.has_unfinished():
                engine.step()
            assert_idle(engine)


def test_generate_overlaps_where_the_engine_runs_on_cuda(seed):
    """``generate`` overlaps its decode steps on CUDA (``overlap_runs``, set here for a CPU engine) whatever
    ``overlap`` says, and gives the dense reference's tokens; ``overlap`` itself is left as it was, so the step API
    still returns each step's outputs on time."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    prompts = prompts_of(rng, (11, 2, 7))
    engine = poison(Engine(model, num_blocks=64, page_size=4, max_tokens_per_step=16))
    assert engine.overlap_runs is False and engine.overlap is False           # a CPU engine: no
    engine.overlap_runs = True
    assert engine.generate(prompts, 6) == [dense_greedy(model, p, 6) for p in prompts]
    assert engine.stats.in_flight_steps >= 3 and engine.overlap is False
    steps = engine.stats.in_flight_steps
    rid = engine.add_request(prompts[0], 3)
    assert engine.step()[0].request_id == rid and engine.step()[0].new_token_ids   # on time: nothing in flight
    while engine.has_unfinished():
        engine.step()
    assert engine.stats.in_flight_steps == steps
    assert_idle(engine)


@pytest.mark.parametrize("lengths,fail_at,budget", [((5, 9), 3, 16), ((5, 9), 4, 16), ((5, 9), 6, 16),
                                                    ((5, 20), 7, 16), ((5, 9), 20, 1)])
def test_a_failed_overlapped_generate_leaves_the_engine_as_it_was(lengths, fail_at, budget, seed):
    """A model failure in an overlapped ``generate`` (at a decode step with another in flight, or the one after;
    or, prompts of 5 and 20, the step after the one in flight gave the first request its last token): the call
    raises, nothing stays in flight, held or unreturned, and the engine then generates the reference's tokens."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    prompts = prompts_of(rng, lengths)
    failing = FailingModel(model, fail_at=fail_at)
    engine = poison(Engine(failing, num_blocks=32, page_size=4, max_tokens_per_step=budget))
    engine.overlap_runs = True
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.generate(prompts, 6)
    assert not engine.has_unfinished() and engine.overlap is False
    assert_idle(engine)
    assert engine.generate(prompts, 6) == [dense_greedy(model, p, 6) for p in prompts]
    assert_idle(engine)


def test_a_generate_failing_in_admission_leaves_no_step_in_flight(seed):
    """An exception while ``generate`` admits a request (a step of its other requests in flight): the call raises,
    nothing stays in flight or held, and the next ``generate`` runs."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    prompts = prompts_of(rng, (5, 5, 5))
    engine = poison(Engine(model, num_blocks=6, page_size=4, max_tokens_per_step=16))   # two requests fit at once
    engine.overlap_runs = True
    real, calls = engine.cache.match_prefix, []

    def flaky(keys):
        calls.append(keys)
        if len(calls) == 3:                     # the third request, admitted while the others' decode is in flight
            raise KeyboardInterrupt("injected in admission")
        return real(keys)

    engine.cache.match_prefix = flaky
    with pytest.raises(KeyboardInterrupt, match="injected in admission"):
        engine.generate(prompts, 4)
    assert engine._in_flight is None and not engine.has_unfinished()
    assert_idle(engine)
    engine.cache.match_prefix = real
    assert engine.generate(prompts, 4) == [dense_greedy(model, p, 4) for p in prompts]
    assert_idle(engine)
