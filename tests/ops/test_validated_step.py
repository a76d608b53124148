"""The step's check scope (issues 12, 14): ``checks.validated_step()`` replaces the thread-local memo of validated
metadata. Inside the block, after the step check validated the metadata, an op given those very tensor objects
skips its data checks (and their device-to-host copy); shape checks always run; an op outside the block, in a
nested block of its own, given other tensors (even equal ones), or needing more than was validated checks in full.
"""

import dataclasses

import pytest
import torch

from swa_rewrite import ops
from swa_rewrite.ops import batch_checks, step_check
from swa_rewrite.ops.checks import FLAG_STRIDE, checks_disabled, defer_check, validated_step
from swa_rewrite.ops.step_check import checked_step_metadata
from swa_rewrite.runtime import StepBatch, StepItem

R, P = 128, 16
D = R + P


@pytest.fixture
def data_checks(monkeypatch):
    """Counts the data checks that run (one host copy each): ``[group, ...]``. The step check's vectorised pass
    over all its groups (``step_check._step_data_ok``) counts once for each group it passes; the per-group checks
    it falls back to when it does not, once per group they check."""
    calls = []
    real = batch_checks.check_batch_data
    real_fast = step_check._step_data_ok

    def spy(*args, **kwargs):
        calls.append(args[7] if len(args) > 7 else kwargs.get("group", 0))
        return real(*args, **kwargs)

    def spy_fast(*args):
        passed = real_fast(*args)
        if passed:
            calls.extend(args[-1])                        # the groups of ``rules``
        return passed

    monkeypatch.setattr(batch_checks, "check_batch_data", spy)
    monkeypatch.setattr(step_check, "check_batch_data", spy)
    monkeypatch.setattr(step_check, "_step_data_ok", spy_fast)
    return calls


def _step():
    """Two requests over two cache groups; group 1 window-bounded for a window of 4 (request 0, 10 cached and 3
    new, reads positions 7 … 12: pages 1 to 3)."""
    items = [StepItem([1, 2, 3], 10, [[0, 1, 2, 3], [-1, 3, 4, 5]], True),
             StepItem([4], 2, [[6], [7]], False)]
    return StepBatch.build(items, 4, pad_to=6, num_groups=2)


def _step1():
    """The same requests with one (full) cache group."""
    items = [StepItem([1, 2, 3], 10, [0, 1, 2, 3], True), StepItem([4], 2, [6], False)]
    return StepBatch.build(items, 4, pad_to=6)


def _caches():
    return [torch.zeros(8, 4, D), torch.zeros(8, 4, ops.fp8_cache.fp8_cache_bytes(R, P), dtype=torch.uint8)]


SPECS = [("full", None, 0), ("sliding", 4, 0)]


def _swa(meta, window=4, group=1, sinks=0, **changes):
    args = dict(block_tables=meta.block_tables, cu_seqlens_q=meta.cu_seqlens_q, seq_lens_encoder=meta.seq_lens_encoder,
                seq_lens_decoder=meta.seq_lens_decoder, batch_id_per_token=meta.batch_id_per_token)
    args.update(changes)
    q = torch.randn(meta.positions.shape[0], 2, D)
    return ops.swa_mla_attention(q, _caches()[1], **args, scale=0.1, rope_dim=P, window=window, sinks=sinks,
                                 group=group)


def _dense(meta, group=0):
    q = torch.randn(meta.positions.shape[0], 2, D)
    return ops.paged_mla_attention(q, _caches()[0], meta.block_tables, *meta.batch_tensors(), 0.1, rope_dim=P,
                                   group=group)


def test_ops_outside_a_step_check_in_full_every_time(data_checks):
    meta = _step().meta
    for _ in range(3):
        _swa(meta)
    assert data_checks == [1, 1, 1]


def test_inside_the_step_ops_skip_only_what_the_step_check_validated(data_checks):
    meta = _step().meta
    with validated_step():
        checked_step_metadata(meta, _caches(), (0, 1), SPECS)
        assert sorted(data_checks) == [0, 1]                  # once per group, one host copy for the step
        for _ in range(3):
            _swa(meta)
            _dense(meta)
            ops.swa_indexer(meta.block_tables, *meta.batch_tensors(), window=3, page_size=4, group=1)
        assert sorted(data_checks) == [0, 1]                  # the very tensors: nothing checked again
        _swa(meta, window=5)                                  # reads more than the step validated: checked
    assert sorted(data_checks) == [0, 1, 1]
    _swa(meta)                                                # after the block: nothing remembered
    assert sorted(data_checks) == [0, 1, 1, 1]


def test_equal_tensors_that_are_not_the_validated_objects_are_checked(data_checks):
    meta = _step().meta
    with validated_step():
        checked_step_metadata(meta, _caches(), (0, 1), SPECS)
        data_checks.clear()
        _swa(meta, block_tables=meta.block_tables.clone())
        _swa(meta, seq_lens_decoder=meta.seq_lens_decoder.clone())
        assert data_checks == [1, 1]
        bad = meta.block_tables.clone()
        bad[1, 0, 2] = -1                                     # released, but request 0 reads position 8 there
        with pytest.raises(ValueError, match=r"block_tables\[1\]\[0, 2\] = -1 \(released\), but position 8"):
            _swa(meta, block_tables=bad)
        with pytest.raises(ValueError, match=r"block_tables\[1\]\[0, 2\] = -1"):
            _swa(dataclasses.replace(meta, block_tables=bad))


def test_a_full_group_validation_covers_sliding_ops_but_not_the_reverse(data_checks):
    meta = _step1().meta
    with validated_step():
        checked_step_metadata(meta, _caches()[:1], (0,), [SPECS[0]])
        data_checks.clear()
        _swa(meta, group=0, window=3, sinks=2)
        _dense(meta)
        assert data_checks == []
    meta = _step().meta
    with validated_step():
        checked_step_metadata(meta, _caches(), (0, 1), SPECS)
        data_checks.clear()
        with pytest.raises(ValueError, match=r"block_tables\[1\]\[0, 0\] = -1 is out of range \[0, 8\)"):
            _dense(meta, group=1)                            # the sliding group, read as full: checked, and wrong
        _swa(meta, window=2)                                 # a smaller window: covered
        assert data_checks == [1]


def test_a_nested_block_starts_empty_and_the_outer_one_comes_back(data_checks):
    meta = _step().meta
    with validated_step():
        checked_step_metadata(meta, _caches(), (0, 1), SPECS)
        data_checks.clear()
        with validated_step():
            _swa(meta)
            assert data_checks == [1]
        _swa(meta)
        assert data_checks == [1]


def test_checks_disabled_still_turns_every_data_check_off(data_checks):
    meta = _step().meta
    bad = meta.block_tables.clone()
    bad[1, 0, 2] = -1
    with checks_disabled():
        checked_step_metadata(dataclasses.replace(meta, block_tables=bad), _caches(), (0, 1), SPECS)
        _swa(meta, block_tables=bad)
    with validated_step(), checks_disabled():
        _swa(meta, block_tables=bad)
    assert data_checks == []


def test_the_environment_switch_is_read_when_a_step_opens(data_checks, monkeypatch):
    """``SWA_REWRITE_CHECKS=0`` turns the data checks off for the steps that open after it is set (a step reads
    the environment once, the first time one of its checks asks); unset, the next step checks again."""
    meta = _step().meta
    bad = meta.block_tables.clone()
    bad[1, 0, 2] = -1
    monkeypatch.setenv("SWA_REWRITE_CHECKS", "0")
    with validated_step():
        checked_step_metadata(dataclasses.replace(meta, block_tables=bad), _caches(), (0, 1), SPECS)
        _swa(meta, block_tables=bad)
    assert data_checks == []
    monkeypatch.delenv("SWA_REWRITE_CHECKS")
    with validated_step():
        with pytest.raises(ValueError, match=r"block_tables\[1\]\[0, 2\] = -1"):
            _swa(meta, block_tables=bad)


def test_shape_checks_run_inside_the_block():
    meta = _step().meta
    with validated_step():
        checked_step_metadata(meta, _caches(), (0, 1), SPECS)
        with pytest.raises(ValueError, match="group 2 is out of range for block_tables"):
            _swa(meta, group=2)
        with pytest.raises(ValueError, match="window must be >= 1"):
            _swa(meta, window=0)


def test_non_finite_latents_are_found_at_the_end_of_the_step_and_only_in_written_rows(monkeypatch):
    """Inside a step, the cache writes' finite-latent checks are read together when the block ends (one host copy
    of every write's flag): a non-finite value in a written row raises there, naming that write's row and slot; one
    in a padding row (slot -1) sets the flag but is allowed; a clean step reads the flags once and raises nothing."""
    from swa_rewrite.ops.cache_write_checks import NonFiniteLatentError

    meta = _step().meta                                   # 4 tokens and 2 padding rows; group 1 = the packed cache
    T = meta.positions.shape[0]
    reads = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: reads.append(t.shape) or real_cpu(t, *a, **k))

    def step(poison_row=None, layer=1):
        cache = _caches()[1]
        with validated_step():
            checked_step_metadata(meta, _caches(), (0, 1), SPECS)
            reads.clear()
            for i in range(3):
                latent = torch.randn(T, D)
                if i == layer and poison_row is not None:
                    latent[poison_row, 5] = float("nan") if poison_row % 2 else float("inf")
                ops.write_fp8_cache(latent, cache, meta.slot_mapping, rope_dim=P, group=1)
            assert reads == []                            # nothing read before the block ends

    step()
    assert reads == [(3,)]                                # the three flags, in one copy
    step(poison_row=5)                                    # a padding row: allowed
    slot = int(meta.slot_mapping[1, 2])
    with pytest.raises(NonFiniteLatentError, match=rf"latent row 2 \(slot {slot}\) has non-finite values") as info:
        step(poison_row=2, layer=2)
    assert (info.value.row, info.value.slot) == (2, slot)


def test_the_fp8_write_kernel_sets_the_steps_finite_flag_itself(monkeypatch):
    """The op's Triton path (``fp8_cache.write_fp8_cache_triton``; here under the interpreter) in a checked step: the
    write kernel sets the flag a step's end reads (a slot of the step's one zeroed flag buffer, no reduction of its own) — a NaN or
    ±inf in a written row's latent or rope part raises there, naming that row and slot; one in a padding row (slot -1)
    is not even flagged; a clean step reads the three flags in one copy. Outside a step the rows are checked before
    the write, which then does not happen."""
    from swa_rewrite.ops.cache_write_checks import NonFiniteLatentError
    from swa_rewrite.ops.fp8_cache import write_fp8_cache_triton

    meta = _step().meta                                   # 4 tokens and 2 padding rows; group 1 = the packed cache
    T = meta.positions.shape[0]
    reads, flags = [], []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: reads.append(t.shape) or real_cpu(t, *a, **k))

    def step(poison=None, layer=1):
        cache = _caches()[1]
        with validated_step() as scope:
            checked_step_metadata(meta, _caches(), (0, 1), SPECS)
            reads.clear()
            for i in range(3):
                latent = torch.randn(T, D)
                if i == layer and poison is not None:
                    row, col, value = poison
                    latent[row, col] = value
                write_fp8_cache_triton(latent, cache, meta.slot_mapping, P, 1)
            flags[:] = [int(f.reshape(-1)[0]) for f, *_ in scope.deferred]
            buffers = {id(slot[0]) for _, _, slot in scope.deferred}
            assert len(buffers) == 1                      # slots of the step's one flag buffer (one zeroing) ...
            assert all(f.data_ptr() % 16 == 0 for f, *_ in scope.deferred)  # ... each 16-byte aligned
            assert reads == []                            # nothing read before the block ends
        return cache

    step()
    assert reads == [(3 * FLAG_STRIDE,)] and flags == [0, 0, 0]   # the three flags: the buffer's prefix, one copy
    step(poison=(5, 3, float("nan")))                     # a padding row: not flagged
    assert flags == [0, 0, 0]
    slot = int(meta.slot_mapping[1, 2])
    for col, value in ((7, float("nan")), (R + 2, float("inf")), (0, float("-inf"))):   # latent, rope, latent
        with pytest.raises(NonFiniteLatentError, match=rf"latent row 2 \(slot {slot}\) has non-finite values"):
            step(poison=(2, col, value), layer=2)
        assert flags == [0, 0, 1]
    cache = _caches()[1]
    before = cache.clone()
    latent = torch.randn(T, D)
    latent[1, 4] = float("nan")
    with pytest.raises(NonFiniteLatentError, match=r"latent row 1 "):
        write_fp8_cache_triton(latent, cache, meta.slot_mapping, P, 1)
    assert torch.equal(cache.view(torch.uint8), before.view(torch.uint8))    # checked before the write, nothing written


def test_nested_blocks_pass_deferred_checks_out_and_read_them_with_values(monkeypatch):
    """An inner block's deferred checks go to the enclosing block; ``StepScope.read`` copies them with the values
    asked for (one host copy), runs a failed check's action first, and leaves nothing for the block's end."""
    reads = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: reads.append(t.shape) or real_cpu(t, *a, **k))
    ran = []
    with validated_step() as outer:
        with validated_step():
            defer_check(torch.tensor(0.0), lambda: ran.append("clean"))
            defer_check(torch.tensor(float("nan")), lambda: ran.append("nan"))
        assert reads == [] and ran == []                  # the inner block read nothing
        values = torch.tensor([7, 3, 11])
        assert outer.read(values) == [7, 3, 11]
        assert reads == [(5,)] and ran == ["nan"]          # three values and two flags, one copy
    assert reads == [(5,)]                                  # nothing left for the outer block's end
    with pytest.raises(KeyError, match="boom"):
        with validated_step() as outer:
            with validated_step():
                defer_check(torch.tensor(1.0), lambda: (_ for _ in ()).throw(KeyError("boom")))
            outer.read(torch.tensor([1.5]))
    with validated_step() as outer:                         # no deferred check: the values alone
        assert outer.read(torch.tensor([2.5, -1.0])) == [2.5, -1.0]


def test_an_engine_step_reads_its_tokens_and_deferred_checks_in_one_copy(monkeypatch, seed):
    """A checked eager engine step of the rewritten model copies to the host twice: the step check's metadata
    words, then the greedy tokens together with every FP8 write's finite-latent flag (not a third copy)."""
    from swa_rewrite import Schedule, apply
    from swa_rewrite.models import MLAConfig, MLAModel
    from swa_rewrite.runtime import Engine

    tiny = MLAConfig.named("tiny")
    swa = apply(MLAModel(tiny, seed=seed), Schedule(4, [0, 2], tiny.num_layers))
    engine = Engine(swa, num_blocks=16, page_size=4, max_tokens_per_step=8)
    engine.add_request([1, 2, 3], 2)
    engine.add_request([4, 5], 2)
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(t.shape) or real_cpu(t, *a, **k))
    engine.step()
    monkeypatch.setattr(torch.Tensor, "cpu", real_cpu)
    assert len(copies) == 2, copies
    assert copies[1] == (2 + 2,)                            # two requests' tokens and the two FP8 writes' flags


def test_a_model_step_copies_the_metadata_to_the_host_once(data_checks, monkeypatch, seed):
    """An eager step of the original and of a rewritten model: one data check per cache group (the step check's,
    one host copy), none in the layers' attention ops."""
    from swa_rewrite import Schedule, apply
    from swa_rewrite.models import MLAConfig, MLAModel
    from swa_rewrite.runtime import num_cache_groups

    tiny = MLAConfig.named("tiny")
    model = MLAModel(tiny, seed=seed)
    copies = []
    real_cpu = torch.Tensor.cpu
    for m in (model, apply(model, Schedule(4, [0, 2], tiny.num_layers))):
        G = num_cache_groups(m)
        b = StepBatch.build([StepItem([1, 2, 3, 4, 5], 6, [0, 1, 2, 3], True), StepItem([7], 9, [4, 5, 6], False)],
                            4, pad_to=8, num_groups=G)
        caches = m.allocate_kv_cache(12, 4)
        for c in caches:
            c.zero_()
        data_checks.clear()
        monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(t.shape) or real_cpu(t, *a, **k))
        with torch.no_grad():
            m(b.input_ids, kv_caches=caches, meta=b.meta)
        monkeypatch.setattr(torch.Tensor, "cpu", real_cpu)
        assert sorted(data_checks) == list(range(G)), type(m).__name__
        metadata_copies = [s for s in copies if len(s) == 1 and s[0] > b.input_ids.shape[0]]
        assert len(metadata_copies) == 1, (type(m).__name__, copies)
        copies.clear()


@pytest.mark.gpu
def test_an_eager_engine_step_on_cuda_copies_to_the_host_twice(seed, tmp_path):
    """A checked eager engine step of the rewritten model on CUDA makes two device-to-host copies (the profiler's
    memcpy records): the step check's metadata words, and the greedy tokens read together with the deferred
    finite-latent flags — where it made three."""
    import json

    from torch.profiler import ProfilerActivity, profile

    from swa_rewrite import Schedule, apply
    from swa_rewrite.models import MLAConfig, MLAModel
    from swa_rewrite.runtime import Engine

    tiny = MLAConfig.named("tiny")
    swa = apply(MLAModel(tiny, device="cuda", dtype=torch.bfloat16, seed=seed), Schedule(4, [0, 2], tiny.num_layers))
    engine = Engine(swa, num_blocks=16, page_size=4, max_tokens_per_step=8)
    engine.generate([[1, 2, 3]], 1)                                    # warm-up (Triton compiles)
    engine.add_request([1, 2, 3], 2)
    engine.add_request([4, 5], 2)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    path = tmp_path / "step.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text()).get("traceEvents", [])
    copies = [e for e in events if str(e.get("cat", "")).lower() == "gpu_memcpy"]
    if not copies:
        pytest.skip("the profiler recorded no CUDA copy here (CUPTI unavailable?): cannot count them")
    assert sum("DtoH" in str(e.get("name", "")) for e in copies) == 2, [e.get("name") for e in copies]


@pytest.mark.gpu
def test_an_eager_step_on_cuda_synchronises_twice(seed):
    """With checks on, an eager step of the rewritten model reads the device twice: the step check's one metadata
    copy, and one read of every cache write's deferred finite-latent flag at the step's end — not once per op."""
    import warnings

    from swa_rewrite import Schedule, apply
    from swa_rewrite.models import MLAConfig, MLAModel
    from swa_rewrite.runtime import num_cache_groups

    tiny = MLAConfig.named("tiny")
    model = MLAModel(tiny, device="cuda", dtype=torch.bfloat16, seed=seed)
    counts = {}
    for m in (model, apply(model, Schedule(4, [0, 2], tiny.num_layers))):
        G = num_cache_groups(m)
        b = StepBatch.build([StepItem([1, 2, 3, 4, 5], 6, [0, 1, 2, 3], True), StepItem([7], 9, [4, 5, 6], False)],
                            4, pad_to=8, num_groups=G, device="cuda")
        caches = m.allocate_kv_cache(12, 4)
        for c in caches:
            c.zero_()
        with torch.no_grad():
            m(b.input_ids, kv_caches=caches, meta=b.meta)                # warm-up (Triton compiles)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    m(b.input_ids, kv_caches=caches, meta=b.meta)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        counts[type(m).__name__] = sum("synchroniz" in str(w.message) for w in caught)
    assert all(n <= 2 for n in counts.values()), counts


def test_flag_slots_and_loose_flags_are_read_in_one_copy_and_acted_on_in_queued_order(monkeypatch):
    """``checks.deferred_flag`` hands out slots of one zeroed buffer per step (a new buffer after ``FLAG_SLOTS``);
    the step's end reads every slot and every loose ``defer_check`` flag in one copy, with ``StepScope.read``'s
    values too, and runs the actions of the set ones in the order they were queued, the first to raise stopping
    the rest. Nested blocks pass their slots out like their loose flags."""
    from swa_rewrite.ops.checks import FLAG_SLOTS, deferred_flag

    reads = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: reads.append(t.numel()) or real_cpu(t, *a, **k))
    assert deferred_flag("cpu", lambda: None) is None           # outside a step: nothing deferred
    n = FLAG_SLOTS + 3
    ran = []
    with validated_step() as scope:
        with validated_step():
            flags = [deferred_flag("cpu", lambda i=i: ran.append(i)) for i in range(n)]
        defer_check(torch.tensor(float("nan")), lambda: ran.append("loose nan"))
        flags.append(deferred_flag("cpu", lambda: ran.append("last")))
        defer_check(torch.tensor(0.0), lambda: ran.append("loose clean"))
        assert all(int(f.item()) == 0 and f.numel() == 1 and f.dtype == torch.int32 for f in flags)
        assert len({f.data_ptr() for f in flags}) == n + 1 and all(f.data_ptr() % 16 == 0 for f in flags)
        for i in (2, FLAG_SLOTS + 1, n):                       # set by "kernels": a first-buffer, a second-buffer
            flags[i].fill_(1)                                   # and the outer block's slot
        reads.clear()
        assert scope.read(torch.tensor([5, 6])) == [5, 6]
    assert reads == [2 + n + 3] and ran == [2, FLAG_SLOTS + 1, "loose nan", "last"]
    reads.clear()
    ran.clear()
    with pytest.raises(KeyError, match="boom"):                 # the first set flag's action raises: no other runs
        with validated_step():
            first = deferred_flag("cpu", lambda: (_ for _ in ()).throw(KeyError("boom")))
            second = deferred_flag("cpu", lambda: ran.append("second"))
            first.fill_(7)
            second.fill_(1)
    assert ran == [] and reads == [2 * 4]                        # the buffer's used prefix, copied as it is
