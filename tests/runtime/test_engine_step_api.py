"""The engine's step API (issue 12): add_request / step / abort / has_unfinished. Requests arrive and are
aborted between steps; every finished request gets the tokens a lone ``generate`` of its prompt gets, every
block comes back, and a failed step drops only its own requests."""

import random

import pytest

from engine_helpers import FailingModel, assert_idle, poison
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.runtime import Engine, StepOutput

TINY = MLAConfig.named("tiny")
V = TINY.vocab_size





def alone(model, prompt, max_new_tokens, page_size, num_blocks, memo=None):
    """What a fresh engine's ``generate`` gives ``prompt`` on its own (one big step budget)."""
    key = (tuple(prompt), max_new_tokens)
    if memo is not None and key in memo:
        return memo[key]
    engine = Engine(model, num_blocks=num_blocks, page_size=page_size, max_tokens_per_step=64)
    out = engine.generate([prompt], max_new_tokens)[0]
    if memo is not None:
        memo[key] = out
    return out




# ------------------------------------------------------------------------------------------------ soak
@pytest.mark.parametrize("page_size,budget", [(1, 3), (7, 17), (16, 1)])
def test_soak_random_arrivals_and_aborts(page_size, budget, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    max_len = 12 + 4
    num_blocks = max(2 * -(-max_len // page_size), 3)            # a few requests at a time: others wait
    engine = poison(Engine(model, num_blocks=num_blocks, page_size=page_size, max_tokens_per_step=budget))
    prefixes = [[rng.randrange(V) for _ in range(rng.randrange(1, 10))] for _ in range(3)]
    pending = []                                                 # (prompt, max_new_tokens) yet to arrive
    for _ in range(30):
        prompt = rng.choice(prefixes + [[]]) + [rng.randrange(V) for _ in range(rng.randrange(1, 5))]
        pending.append((prompt[:12], rng.randrange(0, 5)))
    asked, got, finished, aborted, memo = {}, {}, set(), set(), {}
    steps = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 2])):                # arrivals between steps
            if pending:
                prompt, n = pending.pop(0)
                rid = engine.add_request(prompt, n)
                assert rid not in asked
                asked[rid], got[rid] = (prompt, n), []
        live = [rid for rid in asked if rid not in finished and rid not in aborted]
        if live and rng.random() < 0.05:
            rid = rng.choice(live)
            engine.abort(rid)
            aborted.add(rid)
        if finished and rng.random() < 0.05:
            engine.abort(rng.choice(sorted(finished)))           # a no-op: it already finished
        outputs = engine.step()
        steps += 1
        assert all(isinstance(o, StepOutput) for o in outputs)
        assert sum(1 for o in outputs if o.request_id in aborted | finished) == 0
        for o in outputs:
            assert len(o.new_token_ids) <= 1
            got[o.request_id] += o.new_token_ids
            if o.finished:
                finished.add(o.request_id)
        assert steps < 5000
    assert finished | aborted == set(asked) and not finished & aborted
    assert len(finished) >= 10, (len(finished), steps)
    for rid in finished:
        prompt, n = asked[rid]
        assert len(got[rid]) == n
        assert got[rid] == alone(model, prompt, n, page_size, num_blocks, memo), f"request {rid}"
    assert_idle(engine)
    with pytest.raises(KeyError, match=rf"request id {len(asked)} is unknown"):
        engine.abort(len(asked))


# -------------------------------------------------------------------------------------- a failed step
def test_a_failed_step_drops_only_its_requests(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    failing = FailingModel(model, fail_at=3)
    kw = dict(num_blocks=8, page_size=4)
    engine = poison(Engine(failing, max_tokens_per_step=4, **kw))
    prompts = [[rng.randrange(V) for _ in range(n)] for n in (10, 10, 6, 9)]
    news = [2, 2, 2, 3]
    ids = [engine.add_request(p, n) for p, n in zip(prompts, news)]
    # Blocks: 3 + 3 + 2 of 8, the fourth request waits. Budget 4: step 1 and 2 run 4 tokens of request 0,
    # step 3 its last 2 and 2 of request 1: that step fails, request 2 (running) and 3 (waiting) survive.
    assert engine.step() == [StepOutput(ids[0], [], False)]
    assert engine.step() == [StepOutput(ids[0], [], False)]
    with pytest.raises(RuntimeError, match="injected failure") as info:
        engine.step()
    assert f"requests {ids[:2]} were dropped" in "\n".join(info.value.__notes__)
    engine.abort(ids[0])                                            # already dropped: a no-op
    got = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    assert got[ids[0]] == got[ids[1]] == []
    for rid, p, n in zip(ids[2:], prompts[2:], news[2:]):
        assert got[rid] == alone(model, p, n, **kw)
    assert_idle(engine)
    # The dropped prompts run again from scratch (nothing they published survived) and match.
    assert engine.generate(prompts[:2], 2) == [alone(model, p, 2, **kw) for p in prompts[:2]]
    assert engine.stats.reused_tokens == 0


# --------------------------------------------------------------------------------------- the API itself
def test_step_outputs_and_finishing(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    engine = Engine(model, num_blocks=16, page_size=4, max_tokens_per_step=32)
    assert engine.step() == [] and not engine.has_unfinished()
    p, q = [rng.randrange(V) for _ in range(5)], [rng.randrange(V) for _ in range(3)]
    a, b = engine.add_request(p, 2), engine.add_request(q, 0)
    assert (a, b) == (0, 1) and engine.has_unfinished()
    first = engine.step()                                  # both prompts in one step; b wants no tokens
    assert [(o.request_id, len(o.new_token_ids), o.finished) for o in first] == [(a, 1, False), (b, 0, True)]
    second = engine.step()
    assert [(o.request_id, o.finished) for o in second] == [(a, True)]
    assert first[0].new_token_ids + second[0].new_token_ids == alone(model, p, 2, 4, 16)
    assert_idle(engine)


def test_abort_frees_and_withdraws(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    engine = Engine(model, num_blocks=8, page_size=4, max_tokens_per_step=8)
    prompt = [rng.randrange(V) for _ in range(17)]
    rid = engine.add_request(prompt, 3)
    engine.step()                                          # 8 tokens: two full blocks published
    assert engine.cache_usage()[0].in_use > 0
    engine.abort(rid)
    assert_idle(engine)
    engine.abort(rid)                                      # twice: a no-op
    assert engine.generate([prompt], 3) == [alone(model, prompt, 3, 4, 8)]
    assert engine.stats.reused_tokens == 0                 # its publications were withdrawn
    waiting = [engine.add_request(prompt, 3) for _ in range(3)]   # 5 blocks each: the later two wait
    engine.step()
    engine.abort(waiting[2])
    engine.abort(waiting[0])
    while engine.has_unfinished():
        outs = engine.step()
        assert all(o.request_id == waiting[1] for o in outs)
    assert_idle(engine)


def test_step_api_rejects_bad_input(seed):
    engine = Engine(MLAModel(TINY, seed=seed), num_blocks=4, page_size=4, max_tokens_per_step=8)
    with pytest.raises(TypeError, match=r"prompt: token 1 is 2\.0 \(float\)"):
        engine.add_request([1, 2.0], 1)
    with pytest.raises(ValueError, match=r"prompt is empty"):
        engine.add_request([], 1)
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 0, got -2"):
        engine.add_request([1], -2)
    with pytest.raises(ValueError, match=r"prompt needs 5 blocks of 4 positions, the cache has 4"):
        engine.add_request([1] * 17, 1)
    assert not engine.has_unfinished()
    with pytest.raises(KeyError, match=r"request id 0 is unknown"):
        engine.abort(0)
    with pytest.raises(TypeError, match=r"request_id must be an integer, got '0' \(str\)"):
        engine.abort("0")
    rid = engine.add_request([1, 2], 1)
    with pytest.raises(RuntimeError, match=r"1 unfinished request\(s\) from add_request"):
        engine.generate([[3]], 1)
    with pytest.raises(RuntimeError, match=r"unfinished request"):
        engine.logits([3])
    engine.abort(rid)
    assert engine.generate([[3]], 1) == [alone(engine.model, [3], 1, 4, 4)]
    assert engine.stats.steps == 1
