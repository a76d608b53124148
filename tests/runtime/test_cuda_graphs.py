"""``runtime.cuda_graphs.DecodeGraphs``: decode steps through persistent, bucket-padded buffers (eagerly on the
CPU, as CUDA graphs on the GPU) give the logits and cache writes of the plain step on the unpadded batch,
padding writes nothing, and a replay copies only the step's inputs (issue 14)."""

import dataclasses
import json
import random

import pytest
import torch

from numerics import rel_err

import swa_rewrite
from swa_rewrite import Schedule, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.runtime import StepBatch, StepItem, num_cache_groups
from swa_rewrite.runtime.cuda_graphs import DecodeGraphs, default_buckets

TINY = MLAConfig.named("tiny")
SCHEDULE = Schedule(8, [0, 2], 4)          # two cache groups: full layers 1, 3; sliding layers 0, 2


def poison(caches):
    """NaN in every byte pattern: float caches NaN, packed FP8 rows 0xFF (NaN latents, scales and rope)."""
    for c in caches:
        c.view(torch.uint8).fill_(255) if c.dtype == torch.uint8 else c.fill_(float("nan"))


def as_bytes(caches):
    return [c.view(torch.uint8).clone() for c in caches]


class Scenario:
    """``num_requests`` prompts prefilled eagerly into poisoned caches, each with its own shuffled blocks; then
    decode steps of random subsets of the requests."""

    def __init__(self, step_model, rng, *, page_size, num_requests=7, max_len=40, device="cpu"):
        self.model, self.rng, self.ps, self.device = step_model, rng, page_size, device
        self.G = num_cache_groups(step_model)
        self.nb = -(-max_len // page_size)
        blocks = list(range(num_requests * self.nb + 3))
        rng.shuffle(blocks)
        self.tables = [blocks[r * self.nb:(r + 1) * self.nb] for r in range(num_requests)]
        self.caches = step_model.allocate_kv_cache(len(blocks), page_size, device)
        poison(self.caches)
        self.lengths = [rng.randint(1, max_len // 2) for _ in range(num_requests)]
        prompts = [[rng.randrange(TINY.vocab_size) for _ in range(n)] for n in self.lengths]
        items = [StepItem(p, 0, t, True) for p, t in zip(prompts, self.tables)]
        with torch.no_grad():
            self.step(self.batch(items), self.caches)

    def batch(self, items, device=None):
        return StepBatch.build(items, self.ps, num_groups=self.G, device=device or self.device)

    def step(self, batch, caches):
        """The plain eager step on the unpadded batch (the reference)."""
        return self.model(batch.input_ids, kv_caches=caches, meta=batch.meta, logits_indices=batch.last_token_index)

    def decode_items(self, size):
        reqs = self.rng.sample(range(len(self.tables)), size)
        items = [StepItem([self.rng.randrange(TINY.vocab_size)], self.lengths[r], self.tables[r], False) for r in reqs]
        for r in reqs:
            self.lengths[r] += 1
        return items


def step_model(kind, seed, device="cpu", dtype=None):
    model = MLAModel(TINY, seed=seed, device=device, dtype=dtype)
    return apply(model, SCHEDULE) if kind == "rewritten" else model


def written(before, after):
    """Slots (rows of ``[num_blocks * page_size]``) whose bytes differ between two byte copies of a cache."""
    return set((before != after).flatten(0, 1).any(-1).nonzero().flatten().tolist())


def slot_rows(cache, slots):
    """The rows of ``slots`` as float32 ``[n, D]`` (packed FP8 rows dequantised)."""
    rows = cache.flatten(0, 1)[torch.tensor(sorted(slots), dtype=torch.long, device=cache.device)]
    if cache.dtype == torch.uint8:
        rows = swa_rewrite.ops.dequantize_fp8_cache(rows, rope_dim=TINY.qk_rope_head_dim)
    return rows.float()


def assert_step_matches(graphs, sc, items, batch=None, *, tol=1e-3):
    """One decode step through ``graphs`` against the plain step on clones of the caches: the same logits, and
    in every layer exactly the step's own slots written (so padding wrote nothing), with the same latents.

    Equal up to ``tol``, not bit for bit: the padded step runs its matmuls on more rows, and neither CPU BLAS
    nor cuBLAS promises a row the same bits for another row count; a last-bit difference of a latent may flip
    an FP8 rounding of the packed row, which later layers and the logits then see (as test_compile allows
    Inductor against eager)."""
    batch = batch if batch is not None else sc.batch(items)
    ref_caches = [c.clone() for c in sc.caches]
    before = as_bytes(sc.caches)
    with torch.no_grad():
        ref = sc.step(sc.batch(items), ref_caches)
        got = graphs.run(batch)
    assert got.shape == ref.shape == (len(items), TINY.vocab_size)
    assert rel_err(got.float(), ref.float()) < tol
    slots = sc.batch(items, device="cpu").meta.slot_mapping
    for layer, (old, new, ref_new) in enumerate(zip(before, as_bytes(sc.caches), as_bytes(ref_caches))):
        mine = set(slots[sc.model.cache_groups[layer]].tolist())
        assert written(old, new) == written(old, ref_new) == mine, layer
        # A packed row may flip FP8 roundings where the latents differ in the last bits (Inductor's fused
        # kernels vs eager: 2.4e-2 measured on the H200 over 4 rows); SPEC §9 bounds the FP8 format's own error
        # at 3e-2, and two roundings of nearly equal latents can differ by up to twice a single one's.
        row_tol = max(tol, 5e-2) if sc.caches[layer].dtype == torch.uint8 else tol
        assert rel_err(slot_rows(sc.caches[layer], mine), slot_rows(ref_caches[layer], mine)) < row_tol, layer
    return got


@pytest.mark.parametrize("kind", ["rewritten", "original"])
@pytest.mark.parametrize("page_size", [1, 8])
def test_padded_buffers_match_the_unpadded_step(kind, page_size, seed):
    """Steps of 1 … 7 requests in buckets 1, 2, 4, 8: every bucket padded, buffers reused across sizes."""
    rng = random.Random(seed)
    sc = Scenario(step_model(kind, seed), rng, page_size=page_size)
    graphs = DecodeGraphs(sc.model, sc.caches, num_groups=sc.G, page_size=page_size, max_blocks=sc.nb,
                          max_batch=8)
    assert graphs.buckets == (1, 2, 4, 8) and not graphs.graphs
    sizes = [3, 1, 7, 2, 5, 4, 6, 3]
    for size in sizes:
        assert_step_matches(graphs, sc, sc.decode_items(size))
    assert (graphs.eager_runs, graphs.captures, graphs.replays) == (len(sizes), 0, 0)
    assert graphs.bytes_copied == sum(graphs.copy_bytes(s) for s in sizes)


def test_a_smaller_step_in_the_same_bucket_leaves_no_stale_rows(seed):
    """4 requests, then 3 in the same bucket: row 3 is padding again (no token, no table, writes nothing)."""
    rng = random.Random(seed)
    sc = Scenario(step_model("rewritten", seed), rng, page_size=4)
    graphs = DecodeGraphs(sc.model, sc.caches, num_groups=sc.G, page_size=4, max_blocks=sc.nb + 3, buckets=[4])
    assert_step_matches(graphs, sc, sc.decode_items(4))
    items = sc.decode_items(3)
    assert_step_matches(graphs, sc, items)
    input_ids, meta, logits_indices = graphs.step_inputs(3)
    real = sc.batch(items).meta
    assert meta.cu_seqlens_q.tolist() == [0, 1, 2, 3, 3]
    assert meta.batch_id_per_token.tolist() == [0, 1, 2, -1]
    assert meta.seq_lens_encoder.tolist() == [0] * 4
    assert meta.seq_lens_decoder.tolist() == real.seq_lens_decoder.tolist() + [0]
    assert (meta.slot_mapping[:, 3] == -1).all() and torch.equal(meta.slot_mapping[:, :3], real.slot_mapping)
    assert (meta.block_tables[:, 3] == -1).all() and (meta.block_tables[:, :3, sc.nb:] == -1).all()
    assert torch.equal(meta.block_tables[:, :3, :sc.nb], real.block_tables)
    assert input_ids[3] == 0 and logits_indices.tolist() == [0, 1, 2, 3]
    assert meta.block_tables.shape == (sc.G, 4, sc.nb + 3)


@pytest.mark.parametrize("made_inside", [True, False])
def test_runs_inside_and_outside_inference_mode(made_inside, seed):
    """A runner made under ``torch.inference_mode`` (an engine step), or whose buffer views are first made there
    (a capture reads ``step_inputs`` inside it), still runs steps called from either mode (a GPU run found
    "Inplace update to inference tensor outside InferenceMode" on the second step)."""
    rng = random.Random(seed)
    sc = Scenario(step_model("rewritten", seed), rng, page_size=4)
    with torch.inference_mode(made_inside):
        graphs = DecodeGraphs(sc.model, sc.caches, num_groups=sc.G, page_size=4, max_blocks=sc.nb, buckets=[4])
    with torch.inference_mode():
        graphs.step_inputs(4)
    assert_step_matches(graphs, sc, sc.decode_items(3))
    with torch.inference_mode():
        assert_step_matches(graphs, sc, sc.decode_items(4))
    assert_step_matches(graphs, sc, sc.decode_items(2))
    assert graphs.eager_runs == 3


def test_step_inputs_are_aligned_views_of_one_buffer_and_copy_bytes_add_up():
    caches = MLAModel(TINY).allocate_kv_cache(4, 16)
    graphs = DecodeGraphs(lambda *a, **k: None, caches, num_groups=3, page_size=16, max_blocks=5, max_batch=48)
    assert graphs.buckets == default_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    buffer, logits_indices = graphs.input_buffers()
    for B in (1, 3, 5, 17, 48):
        b = graphs.bucket_for(B)
        input_ids, meta, li = graphs.step_inputs(B)
        tensors = [input_ids] + [getattr(meta, f) for f in ("positions", "slot_mapping", "cu_seqlens_q",
                                                             "seq_lens_encoder", "seq_lens_decoder",
                                                             "batch_id_per_token", "block_tables",
                                                             "mha_kv_slots", "mha_kv_cu")]
        assert [tuple(t.shape) for t in tensors] == [(b,), (b,), (3, b), (b + 1,), (b,), (b,), (b,), (3, b, 5),
                                                     (3, 0), (3, b + 1)]
        assert all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)
        assert all(t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for t in tensors)
        raw = 8 * b * 2 + 8 * 3 * b + 4 * (b + 1) + 4 * b * 3 + 4 * 3 * b * 5 + 4 * 3 * (b + 1)
        assert graphs.metadata_bytes(B) == raw
        assert raw <= graphs.copy_bytes(B) < raw + 16 * len(tensors)
        assert torch.equal(li, torch.arange(b)) and li.data_ptr() == logits_indices.data_ptr()
    assert graphs.bucket_for(33) == 48
    with pytest.raises(ValueError, match="49 requests exceed the largest bucket, max_batch=48"):
        graphs.bucket_for(49)


def test_rejects_steps_that_are_not_one_token_decodes(seed):
    rng = random.Random(seed)
    sc = Scenario(step_model("rewritten", seed), rng, page_size=8, num_requests=5)
    graphs = DecodeGraphs(sc.model, sc.caches, num_groups=sc.G, page_size=8, max_blocks=sc.nb, max_batch=4)
    table = sc.tables[0]
    cases = [
        (sc.batch([StepItem([1, 2], sc.lengths[0], table, True)]), r"one token per request: this step has 2 tokens for 1"),
        (StepBatch.build([StepItem([1], sc.lengths[0], table, False)], 8, pad_to=2, num_groups=sc.G),
         r"2 tokens for 1 requests"),
        (sc.batch(sc.decode_items(5)), r"5 requests exceed the largest bucket, max_batch=4"),
        (StepBatch.build([StepItem([1], sc.lengths[0], table, False)], 8, num_groups=sc.G + 1),
         rf"{sc.G + 1} cache group\(s\), the runner {sc.G}"),
        (StepBatch.build([StepItem([1], sc.lengths[0], table, False)], 8, max_blocks=sc.nb + 1, num_groups=sc.G),
         rf"{sc.nb + 1} columns, more than the runner's max_blocks={sc.nb}"),
    ]
    for batch, match in cases:
        assert not graphs.accepts(batch)
        with pytest.raises(ValueError, match=match):
            graphs.run(batch)
    # One token per request but not one per request in order (a request with 2, another with none).
    ok = sc.batch([StepItem([1], sc.lengths[1], sc.tables[1], False), StepItem([2], sc.lengths[2], sc.tables[2], False)])
    odd = dataclasses.replace(ok, meta=dataclasses.replace(ok.meta, cu_seqlens_q=torch.tensor([0, 2, 2],
                                                                                            dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"one token per request: cu_seqlens_q is \[0, 2, 2\]"):
        graphs.run(odd)
    with pytest.raises(TypeError, match="expected a swa_rewrite.runtime.StepBatch, got dict"):
        graphs.run({})
    assert graphs.eager_runs == 0


def test_constructor_checks():
    caches = MLAModel(TINY).allocate_kv_cache(4, 16)
    kw = dict(num_groups=1, page_size=16, max_blocks=2)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
        DecodeGraphs(lambda *a, **k: None, caches, max_batch=4, graphs=True, **kw)
    with pytest.raises(TypeError, match="needs max_batch= or buckets="):
        DecodeGraphs(lambda *a, **k: None, caches, **kw)
    with pytest.raises(ValueError, match="strictly increasing"):
        DecodeGraphs(lambda *a, **k: None, caches, buckets=[4, 2], **kw)
    with pytest.raises(ValueError, match="max_batch=8 differs from the largest bucket 4"):
        DecodeGraphs(lambda *a, **k: None, caches, buckets=[1, 4], max_batch=8, **kw)
    with pytest.raises(ValueError, match=r"kv_caches\[0\] has shape \(4, 16, 144\): expected \[num_blocks, page_size=8"):
        DecodeGraphs(lambda *a, **k: None, caches, max_batch=4, num_groups=1, page_size=8, max_blocks=2)
    with pytest.raises(TypeError, match="fn must be callable"):
        DecodeGraphs(None, caches, max_batch=4, **kw)


# ----------------------------------------------------------------------------------------------- GPU
def _gpu_step_fn(kind, seed):
    """(step model to compare against, fn the runner captures)."""
    if kind == "compiled":
        import swa_rewrite

        model = MLAModel(TINY, seed=seed, device="cuda", dtype=torch.bfloat16)
        return apply(model, SCHEDULE), swa_rewrite.compile(model, SCHEDULE, fullgraph=True)
    m = step_model(kind, seed, "cuda", torch.bfloat16)
    return m, m


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rewritten", "original", "compiled"])
def test_graph_replays_match_the_eager_step(kind, seed):
    """Decode steps of changing batch size replay one graph per bucket (captured on first use) with the Triton
    ops; logits agree with the eager unpadded step, the caches gain exactly the step's writes, in place."""
    if kind == "compiled":
        torch._dynamo.reset()
    rng = random.Random(seed)
    ref_model, fn = _gpu_step_fn(kind, seed)
    sc = Scenario(ref_model, rng, page_size=16, num_requests=9, max_len=64, device="cuda")
    ptrs = [c.data_ptr() for c in sc.caches]
    graphs = DecodeGraphs(fn, sc.caches, num_groups=sc.G, page_size=16, max_blocks=sc.nb, max_batch=8)
    assert graphs.graphs
    sizes = [3, 4, 1, 8, 2, 3, 6, 8]
    for i, size in enumerate(sizes):
        items = sc.decode_items(size)
        host = i % 2 == 0          # alternate host-built steps (one staged copy) and device-built ones
        assert_step_matches(graphs, sc, items, sc.batch(items, device="cpu" if host else "cuda"), tol=2e-2)
    assert graphs.captures == len({graphs.bucket_for(s) for s in sizes}) == 4
    assert graphs.replays == len(sizes) and graphs.eager_runs == 0
    assert [c.data_ptr() for c in sc.caches] == ptrs


def _memcpy_bytes(prof, tmp_path, name):
    """``{kind: bytes}`` of the memcpy / memset activities the profiler recorded (kind: "HtoD", "DtoD", ...,
    "memset"), from the Chrome trace's ``bytes`` arguments."""
    path = tmp_path / f"{name}.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text()).get("traceEvents", [])
    out, kernels = {}, 0
    for e in events:
        cat = str(e.get("cat", "")).lower()
        if cat == "kernel":
            kernels += 1
        if cat not in ("gpu_memcpy", "gpu_memset"):
            continue
        kind = "memset" if cat == "gpu_memset" else next(
            (k for k in ("HtoD", "DtoH", "DtoD", "HtoH", "PtoP") if k in str(e.get("name", ""))), "other")
        out[kind] = out.get(kind, 0) + int(e.get("args", {}).get("bytes", 0))
    if not kernels and not out:
        pytest.skip("the profiler recorded no CUDA activity here (CUPTI unavailable?): cannot count copies")
    return out


@pytest.mark.gpu
def test_a_replay_copies_the_step_inputs_only(seed, tmp_path):
    """What a replay copies: a host-built step goes to the device in one copy of ``copy_bytes`` (the bucket's
    input ids and step metadata); a device-built one adds at most that many device-to-device bytes over a
    replay alone. No cache, parameter or buffer of the model is among what is copied: the runner writes only
    its own input buffers, which share no memory with them, and the caches keep their addresses."""
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(seed)
    model = step_model("rewritten", seed, "cuda", torch.bfloat16)
    sc = Scenario(model, rng, page_size=16, num_requests=6, max_len=64, device="cuda")
    graphs = DecodeGraphs(model, sc.caches, num_groups=sc.G, page_size=16, max_blocks=sc.nb, max_batch=8)
    owned = [*sc.caches, *model.parameters(), *model.buffers()]

    def ranges(ts):
        return [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
                for t in ts]
    for a0, a1 in ranges(graphs.input_buffers()):
        assert all(a1 <= b0 or b1 <= a0 for b0, b1 in ranges(owned))

    B = 5
    with torch.no_grad():
        for _ in range(2):                                   # capture, then a plain replay
            graphs.run(sc.batch(sc.decode_items(B), device="cpu"))
        torch.cuda.synchronize()
        host_batch = sc.batch(sc.decode_items(B), device="cpu")
        with profile(activities=[ProfilerActivity.CUDA]) as prof_host:
            graphs.run(host_batch)
            torch.cuda.synchronize()
        dev_batch = sc.batch(sc.decode_items(B), device="cuda")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof_dev:
            graphs.run(dev_batch)
            torch.cuda.synchronize()
    host = _memcpy_bytes(prof_host, tmp_path, "host")
    dev = _memcpy_bytes(prof_dev, tmp_path, "device")
    assert host.get("HtoD", 0) == graphs.copy_bytes(B), host
    assert host.get("DtoH", 0) == 0 and dev.get("HtoD", 0) == 0 and dev.get("DtoH", 0) == 0, (host, dev)
    assert dev.get("DtoD", 0) - host.get("DtoD", 0) <= graphs.metadata_bytes(B), (host, dev)
    assert graphs.captures == 1 and graphs.replays == 4
