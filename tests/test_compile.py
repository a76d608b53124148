"""torch.compile / torch.export integration (issue 6), in the style of vLLM's compile tests."""

import contextlib
import copy
import dataclasses
import importlib.util
import io
import json
import pathlib
import random
import re
import unittest.mock

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from numerics import rel_err
from torch._dynamo.utils import counters

import swa_rewrite
from swa_rewrite import RewriteError, Schedule, SWAPostGradPass, apply
from swa_rewrite.graph_diff import node_layer
from swa_rewrite.passes.graph_pass import op_name
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.ops import StepMetadata
from swa_rewrite.runtime import Engine, MHAPlan, StepBatch, StepItem, num_cache_groups

TINY = MLAConfig.named("tiny")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class Capture:
    """A backend that keeps a copy of every graph it is given and runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs, **kwargs):
        self.graphs.append(copy.deepcopy(gm.graph))
        return gm.forward


def assert_fp8_caches_close(a, b, kv_lora_rank):
    """Two dequantised packed caches ``[.., R+P]`` that hold the same latents up to float32 last-bit noise:
    every element is within one e4m3 step of the other at its tile's scale (a rounding flip, or a tile
    whose power-of-two scale flipped), the rope part within one bf16 step, and flips are rare."""
    a, b = a.double().flatten(0, -2), b.double().flatten(0, -2)
    R = kv_lora_rank
    tile_amax = b[:, :R].abs().unflatten(-1, (R // 128, 128)).amax(-1, keepdim=True)
    bound_c = 2.0**-3 * torch.maximum(a[:, :R].abs(), b[:, :R].abs()) + 2.0**-8 * tile_amax.expand(-1, -1, 128).flatten(1)
    # Rope values near zero come from cancellation (x cos - y sin): a last-bit difference of the float32
    # inputs is large relative to such a result, so the bound has a floor at float32 noise of the row.
    rope_row_amax = torch.maximum(a[:, R:].abs(), b[:, R:].abs()).amax(-1, keepdim=True)
    bound_rope = 2.0**-7 * torch.maximum(a[:, R:].abs(), b[:, R:].abs()) + 2.0**-20 * rope_row_amax
    diff = (a - b).abs()
    assert (diff[:, :R] <= bound_c).all() and (diff[:, R:] <= bound_rope).all()
    assert (diff > 0).double().mean().item() < 0.02


def assert_compiled_step_close(got, ref, caches, ref_caches, schedule):
    """A compiled step against the eager rewritten one. The packed caches agree up to FP8 rounding flips where
    Inductor's float32 latents differ in the last bit from eager ones. A flip in an earlier sliding layer moves
    every later layer's input a little (CI seed 4271326256: one flip in layer 0, layer 2's cache then 1.8e-3
    apart, its rope beyond one bf16 step), and the output with them (CI seed 664593420: 1.4e-3): after a flip,
    later caches and the output agree to 1e-2, before it to FP8 rounding and 1e-3 (a wrong rewrite is O(1))."""
    flipped = False
    for i in schedule.swa_layers:
        a, b = (swa_rewrite.ops.dequantize_fp8_cache(c[i], rope_dim=TINY.qk_rope_head_dim) for c in (caches, ref_caches))
        if flipped:
            assert rel_err(a, b) < 1e-2, f"layer {i}"
        else:
            assert_fp8_caches_close(a, b, TINY.kv_lora_rank)
        flipped = flipped or bool((a != b).any())
    assert rel_err(got, ref) < (1e-2 if flipped else 1e-3)


def op_count(graph, name):
    """layer → number of ``swa_rewrite::<name>`` calls in ``graph``."""
    out = {}
    for n in graph.nodes:
        if n.op == "call_function" and op_name(n.target) == f"swa_rewrite::{name}":
            out[node_layer(n)] = out.get(node_layer(n), 0) + 1
    return out


# A step for any schedule of the tiny model: every group's rows are the same for now (StepBatch.build), so as
# many groups as layers serves every schedule's groups, whatever the model or compiled graph in between.
ALL_GROUPS = TINY.num_hidden_layers


def step(model, caches, items, page_size):
    b = StepBatch.build(items, page_size, num_groups=ALL_GROUPS, device=caches[0].device)
    return model(b.input_ids, kv_caches=caches, meta=b.meta)


def packed_caches(model, schedule, num_blocks=8, page_size=16):
    caches = apply(model, schedule).allocate_kv_cache(num_blocks, page_size)
    for c in caches:
        c.zero_()
    return caches


def random_items(rng, page_size):
    return [StepItem([rng.randrange(256) for _ in range(rng.randint(1, 12))], 0, [b], True) for b in range(3)]


@pytest.mark.parametrize("layers", [[0, 2], [1], [0, 1, 2, 3], []])
def test_backend_rewrites_the_dynamo_graph(layers, seed):
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(8, layers, 4)
    items = random_items(random.Random(seed), 16)
    before, after = Capture(), Capture()
    with torch.no_grad():
        step(torch.compile(model, backend=before, fullgraph=True), packed_caches(model, schedule), items, 16)
        torch._dynamo.reset()
        be = swa_rewrite.backend(schedule, inner=after)
        step(torch.compile(model, backend=be, fullgraph=True), packed_caches(model, schedule), items, 16)
    (g0,), (g1,) = before.graphs, after.graphs
    assert op_count(g0, "mla_attention") == {i: 1 for i in range(4)}
    assert op_count(g0, "swa_attention") == {}
    assert op_count(g1, "swa_attention") == {i: 1 for i in layers}
    assert op_count(g1, "write_fp8_cache") == {i: 1 for i in layers}
    assert op_count(g1, "mla_attention") == {i: 1 for i in range(4) if i not in layers}
    assert be.results[-1][1].num_matches == len(layers)


def test_plain_torch_compile_with_the_backend_runs_the_runtime(seed):
    """torch.compile(model, backend=swa_rewrite.backend(s)) + the backend's cache allocation, in the engine."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(6, [0, 3], 4)
    be = swa_rewrite.backend(schedule, inner="eager")
    compiled = torch.compile(model, backend=be, fullgraph=True)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (11, 4)]
    caches = be.allocate_kv_cache(model, 32, 8)
    assert [c.dtype for c in caches] == [torch.uint8, torch.float32, torch.float32, torch.uint8]
    got = Engine(compiled, num_blocks=32, page_size=8, max_tokens_per_step=8, kv_caches=caches,
                 kv_cache_spec=be.kv_cache_spec(model)).generate(prompts, 6)
    ref = Engine(apply(model, schedule), num_blocks=32, page_size=8, max_tokens_per_step=8).generate(prompts, 6)
    assert got == ref
    # The model's own allocation gives full-format caches: the first step says where packed ones come from.
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"must come from the rewritten allocation.*allocate_kv_cache"):
        Engine(torch.compile(model, backend=swa_rewrite.backend(schedule, inner="eager")), num_blocks=32,
               page_size=8, max_tokens_per_step=8).generate(prompts, 1)


def test_backend_with_sinks_runs_like_apply(seed):
    """A schedule with sink tokens through the backend: the Dynamo graph's SWA nodes carry each layer's sinks
    (none where a layer has 0) and the engine generates what the applied model generates."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule.per_layer({0: (3, 2), 3: 4}, 4)
    capture = Capture()
    be = swa_rewrite.backend(schedule, inner=capture)
    compiled = torch.compile(model, backend=be, fullgraph=True)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (13, 6)]
    kw = dict(num_blocks=32, page_size=rng.choice([1, 8]), max_tokens_per_step=5)
    got = Engine(compiled, kv_caches=be.allocate_kv_cache(model, 32, kw["page_size"]),
                 kv_cache_spec=be.kv_cache_spec(model), **kw).generate(prompts, 5)
    assert got == Engine(apply(model, schedule), **kw).generate(prompts, 5)
    ops = swa_rewrite.passes.SwaRewriteOps()
    num_args = len(torch.ops.swa_rewrite.swa_attention.default._schema.arguments)
    assert capture.graphs
    for g in capture.graphs:
        nodes = [n for n in g.nodes if n.op == "call_function" and op_name(n.target) == "swa_rewrite::swa_attention"]
        assert {ops.layer_index(n): (ops.window(n), ops.sinks(n)) for n in nodes} == {0: (3, 2), 3: (4, 0)}
        assert [len(n.args) for n in nodes] == [num_args, num_args - 1]      # layer 3: sinks left off


def test_uuid_is_stable_and_follows_the_schedule():
    s = Schedule(8, [0, 2], 4)
    a, b = SWAPostGradPass(s).uuid(), SWAPostGradPass(Schedule.from_json(s.to_json())).uuid()
    assert a == b and len(a) == 64
    assert SWAPostGradPass(Schedule(9, [0, 2], 4)).uuid() != a
    assert SWAPostGradPass(Schedule(8, [0], 4)).uuid() != a
    assert SWAPostGradPass(Schedule(8, [0, 2], 4, sinks={2: 4})).uuid() != a          # sinks count too
    assert swa_rewrite.backend(s).uuid() == a

    class OtherAdapter(swa_rewrite.passes.SwaRewriteOps):    # new adapter code → new uuid
        pass
    registry = swa_rewrite.passes.default_registry()
    registry.register(OtherAdapter())
    assert SWAPostGradPass(s, registry).uuid() != a

    class Configurable(swa_rewrite.passes.SwaRewriteOps):   # same code, other settings → new uuid
        def __init__(self, prefix):
            self.prefix = prefix

    def uuid_with(prefix):
        registry = swa_rewrite.passes.default_registry()
        registry.register(Configurable(prefix))
        return SWAPostGradPass(s, registry).uuid()
    assert uuid_with("vllm") == uuid_with("vllm") != uuid_with("sglang")


def test_generation_recompiles_at_most_twice_fullgraph(seed):
    """50 steps of changing batch composition: prefill chunks, decodes, requests joining and leaving."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(8, [1, 3], 4)
    compiled = swa_rewrite.compile(model, schedule, fullgraph=True, inner="eager")
    engine = Engine(compiled, num_blocks=64, page_size=8, max_tokens_per_step=9)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (17, 3, 9, 1)]
    got = engine.generate(prompts, 12)
    assert engine.stats.steps >= 15
    got += engine.generate([[rng.randrange(256) for _ in range(5)]], 35)   # a lone decode stream: T = 1
    assert engine.stats.steps >= 50
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])    # first compile + at most 2
    eager = Engine(apply(model, schedule), num_blocks=64, page_size=8, max_tokens_per_step=9)
    assert got[:4] == eager.generate(prompts, 12)


@pytest.mark.slow
def test_inductor_compiled_matches_eager_and_reference(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(6, [0, 3], 4)
    compiled = swa_rewrite.compile(model, schedule, fullgraph=True)      # Inductor's CPU backend
    items = random_items(rng, 16)
    caches, ref_caches = packed_caches(model, schedule), packed_caches(model, schedule)
    with torch.no_grad():
        got = step(compiled, caches, items, 16)
        ref = step(apply(model, schedule), ref_caches, items, 16)
    assert_compiled_step_close(got, ref, caches, ref_caches, schedule)
    assert compiled.swa_backend.results[-1][1].num_matches == 2


@pytest.mark.slow
def test_compiled_graph_skips_shape_checks_keeps_data_checks(seed):
    """Inside an Inductor graph of the backend the ops skip the shape checks its trace ran (checks.compiled_graph):
    an eager step's core ops check their dimensions, the compiled (decode-form) step's MQA ops check nothing of the
    kind. The data checks still run there in checked mode: an out-of-range block id raises."""
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(8, [0, 2], 4)
    compiled = torch.compile(model, backend=swa_rewrite.backend(schedule), fullgraph=True)
    items = random_items(random.Random(seed), 16)
    core = importlib.import_module("swa_rewrite.ops.mla_attention")
    att = importlib.import_module("swa_rewrite.ops.attention")
    calls = {"_dims": 0, "_check_scale": 0}        # shape checks of the core ops and of the MQA ops (not traced by
    dims, scale = core._dims, att._check_scale      # Dynamo: their fake implementations run them at trace time)

    def counted(name, fn):
        def call(*a):
            calls[name] += 1
            return fn(*a)
        return call
    with unittest.mock.patch.object(core, "_dims", counted("_dims", dims)), \
            unittest.mock.patch.object(core, "_SIGNATURES", {}), \
            unittest.mock.patch.object(att, "_check_scale", counted("_check_scale", scale)), torch.no_grad():
        ref = step(apply(model, schedule), packed_caches(model, schedule), items, 16)
        # eager: every core op's argument signature once (the sliding layers share one, the full layers another)
        assert calls["_dims"] == 2
        step(compiled, packed_caches(model, schedule), items, 16)        # compiles: the fake implementations check
        traced = dict(calls)
        got = step(compiled, packed_caches(model, schedule), items, 16)
        assert calls == traced                                           # the compiled graph's ops do not
    assert rel_err(got, ref) < 1e-2
    assert not swa_rewrite.ops.checks.shapes_traced()                     # only inside the graph's call
    b = StepBatch.build(items, 16, num_groups=ALL_GROUPS)
    b.meta.block_tables[:, 0, 0] = 10_000
    with torch.no_grad(), pytest.raises(ValueError, match="out of range"):
        compiled(b.input_ids, kv_caches=packed_caches(model, schedule), meta=b.meta)


@pytest.mark.parametrize("entry", ["backend", "compile"])
def test_inductor_decomposes_mqa_cores_keeps_mha_steps_fused(entry, seed):
    """Inductor graphs of the backend run a step without MHA rows (``M = 0``: decodes, MQA-mode chunks) as absorb
    BMM → the MQA op (``swa_mla_attention`` / ``paged_mla_attention``) → un-absorb BMM, the core op decomposed
    (``compile.decompose_mqa_cores``); a step with MHA rows keeps the fused core. Each agrees with the eager
    rewritten step, caches too. Decodes after an MHA step still run decomposed: through ``swa_rewrite.compile``
    (dynamic sizes keep ``M`` symbolic) they have their own entry (a GPU benchmark found none decomposed)."""
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(8, [0, 2], 4)
    swa = apply(model, schedule)
    G = num_cache_groups(swa)
    compiled = (torch.compile(model, backend=swa_rewrite.backend(schedule), fullgraph=True) if entry == "backend"
                else swa_rewrite.compile(model, schedule, fullgraph=True))
    rng = random.Random(seed)
    tables = [[b] for b in range(3)]
    prompts = [[rng.randrange(256) for _ in range(rng.randint(4, 12))] for _ in tables]
    mha = StepBatch.build([StepItem(p, 0, t, True) for p, t in zip(prompts, tables)], 16, num_groups=G,
                          mha=MHAPlan.for_model(swa, min_tokens=4))

    def decode(n):
        return StepBatch.build([StepItem([rng.randrange(256)], len(p) + n, t, False) for p, t in zip(prompts, tables)],
                               16, num_groups=G)
    steps = [("decode", decode(0), False), ("mha", mha, True), ("decode", decode(1), False)]
    att = importlib.import_module("swa_rewrite.ops.attention")
    core = importlib.import_module("swa_rewrite.ops.mla_attention")
    counted = {(att, "_check_swa_attention"): 0, (att, "_check_paged_attention"): 0, (core, "_check_core"): 0}

    def counting(key):
        real = getattr(*key)

        def call(*a, **k):
            counted[key] += 1
            return real(*a, **k)
        return call

    caches, ref_caches = packed_caches(model, schedule), packed_caches(model, schedule)
    for name, b, fused in steps:
        assert b.meta.has_mha == fused
        with torch.no_grad():
            ref = swa(b.input_ids, kv_caches=ref_caches, meta=b.meta)
            compiled(b.input_ids, kv_caches=[c.clone() for c in caches], meta=b.meta)      # compiles this shape
            with contextlib.ExitStack() as stack:
                for key in counted:
                    counted[key] = 0
                    stack.enter_context(unittest.mock.patch.object(*key, counting(key)))
                got = compiled(b.input_ids, kv_caches=caches, meta=b.meta)
        runs = {key[1]: n for key, n in counted.items()}
        if fused:
            assert runs == {"_check_swa_attention": 0, "_check_paged_attention": 0, "_check_core": 4}, name
        else:
            assert runs == {"_check_swa_attention": 2, "_check_paged_attention": 2, "_check_core": 0}, name
        assert_compiled_step_close(got, ref, caches, ref_caches, schedule)


def test_mqa_step_entries_are_per_model_and_refuse_mha_rows(seed):
    """Each ``swa_rewrite.compile`` model has its own MQA-step entry (a code object of its own name: its own Dynamo
    cache, recompile budget and automatic-dynamic history), and its graphs keep ``M = 0`` a constant: a step with MHA
    rows handed to it directly fails to compile rather than run every core in MQA mode."""
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(8, [0, 2], 4)
    swa = apply(model, schedule)
    a, b = (swa_rewrite.compile(model, schedule, fullgraph=True) for _ in range(2))
    fa, fb = (m._compiled_mqa._torchdynamo_orig_callable for m in (a, b))
    assert fa.__code__ is not fb.__code__ and fa.__code__.co_name != fb.__code__.co_name
    rng = random.Random(seed)
    prompt = [rng.randrange(256) for _ in range(10)]
    mha = StepBatch.build([StepItem(prompt, 0, [0], True)], 16, num_groups=num_cache_groups(swa),
                          mha=MHAPlan.for_model(swa, min_tokens=4))
    assert mha.meta.has_mha
    with torch.no_grad(), pytest.raises(Exception, match="reached the MQA-step entry"):
        b._compiled_mqa(mha.input_ids, kv_caches=packed_caches(model, schedule), meta=mha.meta)


@contextlib.contextmanager
def compile_fx_spy():
    """Within it Inductor's ``compile_fx`` runs as before, and the config patches of each outermost call go to the
    list it yields (``compile_fx`` calls itself again inside its patches; those calls are not the backend's)."""
    import torch._inductor.compile_fx as compile_fx_module

    real, seen, depth = compile_fx_module.compile_fx, [], [0]

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        if not depth[0]:
            seen.append(dict(config_patches or {}))
        depth[0] += 1
        try:
            return real(gm, example_inputs, config_patches=config_patches, **kwargs)
        finally:
            depth[0] -= 1

    with unittest.mock.patch.object(compile_fx_module, "compile_fx", spy):
        yield seen


def test_inductor_defaults_add_the_cpp_wrapper_for_cuda_graphs_only():
    """The backend's Inductor defaults (``compile.inductor_defaults``): the C++ wrapper for a graph with CUDA inputs,
    nothing for a CPU graph, and never over what the caller chose or with Inductor's CUDA graphs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from swa_rewrite.compile import inductor_defaults

    with FakeTensorMode():
        cuda_inputs = [torch.empty(4, 8, device="cuda"), 3, torch.empty(2, dtype=torch.int32)]
        cpu_inputs = [torch.empty(4, 8), 3]
    given = {"max_autotune": False}
    assert inductor_defaults(given, cuda_inputs) == {"max_autotune": False, "cpp_wrapper": True}
    assert given == {"max_autotune": False}                                  # not changed in place
    assert inductor_defaults({}, cpu_inputs) == {}
    assert inductor_defaults({"cpp_wrapper": False}, cuda_inputs) == {"cpp_wrapper": False}
    assert inductor_defaults({"triton.cudagraphs": True}, cuda_inputs) == {"triton.cudagraphs": True}


def test_backend_passes_inductor_its_defaults_and_the_callers_options(seed):
    """What the backend hands Inductor's ``compile_fx`` for a CPU model: the caller's options as given (no C++
    wrapper on the CPU), through both entries of ``swa_rewrite.compile`` (a step with MHA rows, then decodes)."""
    model, schedule = MLAModel(TINY, seed=seed), Schedule(8, [0, 2], 4)
    compiled = swa_rewrite.compile(model, schedule, fullgraph=True, options={"max_autotune": False})
    swa = apply(model, schedule)
    rng = random.Random(seed)
    caches = packed_caches(model, schedule)
    prefill = StepBatch.build([StepItem([rng.randrange(256) for _ in range(10)], 0, [b], True) for b in range(3)],
                              16, num_groups=num_cache_groups(swa), mha=MHAPlan.for_model(swa, min_tokens=4))
    decode = StepBatch.build([StepItem([5], 10, [b], False) for b in range(3)], 16, num_groups=num_cache_groups(swa))
    assert prefill.meta.has_mha and not decode.meta.has_mha
    with compile_fx_spy() as seen, torch.no_grad():
        for b in (prefill, decode):
            compiled(b.input_ids, kv_caches=caches, meta=b.meta)
    assert len(seen) >= 2 and all(p == {"max_autotune": False} for p in seen), seen


def test_inductor_post_grad_pass(seed):
    """The same rewrite installed as Inductor's custom post-grad pass on a plain torch.compile."""
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(8, [0, 2], 4)
    items = random_items(random.Random(seed), 16)
    swa_pass = SWAPostGradPass(schedule)
    ref_caches, caches = packed_caches(model, schedule), packed_caches(model, schedule)
    with torch.no_grad():
        ref = step(apply(model, schedule), ref_caches, items, 16)
        # No FX-graph cache: a hit (same graph, same pass uuid) would skip the pass we want to watch.
        with torch._inductor.config.patch(post_grad_custom_post_pass=swa_pass, fx_graph_cache=False):
            got = step(torch.compile(model, fullgraph=True), caches, items, 16)
    assert swa_pass.results[-1][1].num_matches == 2
    assert_compiled_step_close(got, ref, caches, ref_caches, schedule)


def test_export_keeps_the_swa_op_and_round_trips(seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(8, [0, 2], 4)
    swa = apply(model, schedule)
    b = StepBatch.build(random_items(rng, 16), 16, num_groups=ALL_GROUPS)
    caches = packed_caches(model, schedule)
    ep = torch.export.export(swa, (b.input_ids, caches, b.meta))
    assert op_count(ep.graph, "swa_attention") == {0: 1, 2: 1}
    assert op_count(ep.graph, "mla_attention") == {1: 1, 3: 1}
    buf = io.BytesIO()
    torch.export.save(ep, buf)                      # the StepMetadata input spec serialises too
    buf.seek(0)
    loaded = torch.export.load(buf)
    c1, c2 = [c.clone() for c in caches], [c.clone() for c in caches]
    with torch.no_grad():
        out1 = swa(b.input_ids, c1, b.meta)
        out2 = loaded.module()(b.input_ids, c2, b.meta)
    assert torch.equal(out1, out2)
    assert all(torch.equal(x, y) for x, y in zip(c1, c2))


def test_export_takes_keyword_arguments(seed):
    """The engine calls ``model(input_ids, kv_caches=..., meta=..., logits_indices=...)``: export takes the
    same call, the StepMetadata flattened as a pytree (keyword inputs once failed inside the step check)."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule(8, [1], 4))
    b = StepBatch.build(random_items(rng, 16), 16, num_groups=ALL_GROUPS)
    caches = packed_caches(model, Schedule(8, [1], 4))
    kwargs = dict(kv_caches=caches, meta=b.meta, logits_indices=b.last_token_index)
    ep = torch.export.export(swa, (b.input_ids,), kwargs)
    assert op_count(ep.graph, "swa_attention") == {1: 1}
    c1, c2 = [c.clone() for c in caches], [c.clone() for c in caches]
    with torch.no_grad():
        got = ep.module()(b.input_ids, kv_caches=c1, meta=b.meta, logits_indices=b.last_token_index)
        ref = swa(b.input_ids, kv_caches=c2, meta=b.meta, logits_indices=b.last_token_index)
    assert got.shape == (b.last_token_index.shape[0], TINY.vocab_size)
    torch.testing.assert_close(got, ref)
    assert all(torch.equal(x, y) for x, y in zip(c1, c2))


def test_export_takes_keyword_arguments_only(seed):
    """``torch.export.export(swa, args=(), kwargs=dict(input_ids=..., kv_caches=..., meta=...))`` (issue 14): every
    input by keyword, with and without ``logits_indices``; the program runs equal to eager, writes equal."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(8, [1], 4)
    swa = apply(model, schedule)
    b = StepBatch.build(random_items(rng, 16), 16, num_groups=ALL_GROUPS)
    caches = packed_caches(model, schedule)
    for extra in ({}, {"logits_indices": b.last_token_index}):
        kwargs = dict(input_ids=b.input_ids, kv_caches=caches, meta=b.meta, **extra)
        ep = torch.export.export(swa, args=(), kwargs=kwargs)
        assert op_count(ep.graph, "swa_attention") == {1: 1}
        c1, c2 = [c.clone() for c in caches], [c.clone() for c in caches]
        with torch.no_grad():
            got = ep.module()(**dict(kwargs, kv_caches=c1))
            ref = swa(**dict(kwargs, kv_caches=c2))
        assert got.shape == (b.input_ids.shape[0] if not extra else b.last_token_index.shape[0], TINY.vocab_size)
        torch.testing.assert_close(got, ref)
        assert all(torch.equal(x, y) for x, y in zip(c1, c2))


# torch.export's non-strict path runs an fx.GraphModule (the rewritten SWAModule is one) as
# ``fx.Interpreter(mod).run(*args, *kwargs.values())`` (torch/export/_trace.py, _aot_export_non_strict): keyword
# arguments bind to forward's parameters in the order the caller wrote them, not by name. In forward's order they
# work (the tests above); in another order the first node (the step check) sees the wrong values, or, where shapes
# happen to fit (input_ids and logits_indices of a decode), the program silently swaps them. Strict export
# (Dynamo) binds by name. An upstream limitation for every GraphModule: nothing in the rewrite can reorder them.
@pytest.mark.parametrize("strict", [
    True,
    pytest.param(False, marks=pytest.mark.xfail(reason="torch.export non-strict binds a GraphModule's keyword "
                                                       "arguments by position (upstream)", strict=False)),
])
def test_export_keyword_arguments_in_another_order(strict, seed):
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(8, [1], 4)
    swa = apply(model, schedule)
    b = StepBatch.build(random_items(rng, 16), 16, num_groups=ALL_GROUPS)
    caches = packed_caches(model, schedule)
    kwargs = dict(logits_indices=b.last_token_index, meta=b.meta, kv_caches=caches, input_ids=b.input_ids)
    ep = torch.export.export(swa, args=(), kwargs=kwargs, strict=strict)
    c1, c2 = [c.clone() for c in caches], [c.clone() for c in caches]
    with torch.no_grad():
        got = ep.module()(**dict(kwargs, kv_caches=c1))
        ref = swa(**dict(kwargs, kv_caches=c2))
    torch.testing.assert_close(got, ref)
    assert all(torch.equal(x, y) for x, y in zip(c1, c2))


def _bench_compile():
    """``benchmarks/bench_compile.py`` as a module."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compile.py"
    spec = importlib.util.spec_from_file_location("bench_compile", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_compile_cpu_smoke(capsys):
    """``benchmarks/bench_compile.py --cpu``: both models, eager (checks off and on) and through ``DecodeGraphs``'s buffers, with the
    byte arithmetic of the predicted speed-up (tiny: full rows 144 float32 = 576 B, packed rows 164 B)."""
    bench = _bench_compile()
    rows = bench.main(["--cpu", "--contexts", "16", "--iters", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert [(r["context"], r["mode"]) for r in rows] == [(16, "eager"), (16, "eager+checks"), (16, "eager-overlap"),
                                                         (16, "eager+graphs")]
    assert "| context | mode | original (µs) | rewritten (µs) |" in out and "| 16 | eager+graphs |" in out
    # B = 2 requests, 17 positions read per full layer, min(W = 8, 17) per sliding layer (layers 0 and 2).
    original, rewritten = 4 * 2 * 17 * 576, 2 * 2 * 17 * 576 + 2 * 2 * 8 * 164
    assert rows[0]["kv_ratio"] == pytest.approx(original / rewritten)
    weights = bench.weight_bytes(MLAModel(TINY), 2)
    assert rows[0]["predicted"] == pytest.approx((weights + original) / (weights + rewritten))
    assert all(r["original_us"] > 0 and r["rewritten_us"] > 0 and r["paired_speedup"] > 0 for r in rows)
    assert "| speed-up | paired speed-up |" in out
    # The host's time to issue a step beside the step's time (host-bound when at or above it).
    assert all(r["original_host_us"] > 0 and r["rewritten_host_us"] > 0 for r in rows)
    assert "host µs to issue (orig / rewr)" in out


def test_bench_compile_layers_sets_the_depth(capsys):
    """``--layers 2``: a two-layer model of the config (layer 0 sliding, layer 1 full), its bytes in the prediction."""
    bench = _bench_compile()
    rows = bench.main(["--cpu", "--contexts", "16", "--iters", "1", "--warmup", "0", "--layers", "2", "--modes",
                       "eager"])
    assert "tiny (2 layers" in capsys.readouterr().out
    original, rewritten = 2 * 2 * 17 * 576, 1 * 2 * 17 * 576 + 1 * 2 * 8 * 164
    assert rows[0]["kv_ratio"] == pytest.approx(original / rewritten)
    with pytest.raises(SystemExit):
        bench.parse_args(["--cpu", "--layers", "0"])


def test_bench_compile_device_timeline():
    """``bench_compile.device_timeline``: busy time as the union of device activities (overlaps counted once), idle
    gaps between them (host events ignored), the longest gaps with their neighbours, idle by the activity after it."""
    bench = _bench_compile()
    events = [dict(cat="kernel", name="a", ts=0, dur=10), dict(cat="kernel", name="b", ts=5, dur=10),   # overlap
              dict(cat="gpu_memcpy", name="copy", ts=40, dur=5), dict(cat="kernel", name="b", ts=47, dur=3),
              dict(cat="kernel", name="attn", ts=100, dur=20), dict(cat="cpu_op", name="host", ts=0, dur=500)]

    class Prof:
        def export_chrome_trace(self, path):
            pathlib.Path(path).write_text(json.dumps({"traceEvents": events}))

    text = bench.device_timeline(Prof(), steps=1)
    # busy: [0, 15) + [40, 45) + [47, 50) + [100, 120) = 43; idle: 25 + 2 + 50 = 77; span 120.
    assert "5 kernels and copies per step; per step busy 43 us, idle between them 77 us (span 120 us)" in text
    assert "idle gaps over 2 us per step: 2" in text
    lines = text.splitlines()
    assert "50.0 us  after 'b'  before 'attn'" in lines[1] and "25.0 us  after 'b'  before 'copy'" in lines[2]
    by_next = lines[lines.index("   idle per step by the activity that ended it (us, count):") + 1:]
    assert by_next[0].split() == ["50.0", "us", "1.0", "'attn'"] and by_next[1].split()[:1] == ["25.0"]


def test_backend_rejects_non_schedules():
    with pytest.raises(TypeError, match="schedule must be a swa_rewrite.Schedule"):
        swa_rewrite.backend([1, 0, 1])


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager(seed):
    """mode="reduce-overhead" (Inductor's CUDA-graph trees): decode steps replay a CUDA graph with the Triton ops;
    logits and cache writes equal eager ones (bf16, so compared in norm: greedy tokens of a random model can flip
    on ties).

    What a replay copies: cudagraph trees copy every non-static tensor input into the graph's own input buffers
    before each replay (``CUDAGraphNode._copy_inputs_and_remove_from_src``, watched here). The caches (addresses
    marked static by ``allocate_kv_cache``), parameters and buffers are static: none of them is copied, and what
    is copied per replay is at most the step's token ids and metadata. (Inductor's counter
    ``cudagraph_recorded_non_static_inputs`` is not 0 and cannot be while step shapes are dynamic: it also counts
    the symbolic sizes of the step, which are not tensors and are not copied.)"""
    from torch._inductor import cudagraph_trees

    node_type = getattr(cudagraph_trees, "CUDAGraphNode", None)
    copy_inputs = getattr(node_type, "_copy_inputs_and_remove_from_src", None)
    if copy_inputs is None:
        pytest.skip("this torch's cudagraph trees have no CUDAGraphNode._copy_inputs_and_remove_from_src to watch")
    copied = []                                              # per replay: the tensors copied into the graph

    def watch(self, dsts, srcs):
        copied.append([srcs[i] for i in self.non_static_input_idx if isinstance(srcs[i], torch.Tensor)])
        return copy_inputs(self, dsts, srcs)

    rng = random.Random(seed)
    model = MLAModel(TINY, device="cuda", dtype=torch.bfloat16, seed=seed)
    schedule = Schedule(8, [0, 2], 4)
    compiled = swa_rewrite.compile(model, schedule, fullgraph=True, mode="reduce-overhead")
    eager = apply(model, schedule)
    caches = compiled.allocate_kv_cache(16, 16, "cuda")
    owned = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
             for t in [*caches, *model.parameters(), *model.buffers()]]
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (13, 30, 5, 21)]
    tables = [[4 * b + i for i in range(4)] for b in range(4)]
    replays = 0
    with torch.no_grad(), unittest.mock.patch.object(node_type, "_copy_inputs_and_remove_from_src", watch):
        step(eager, caches, [StepItem(p, 0, t, True) for p, t in zip(prompts, tables)], 16)   # prefill
        for i in range(8):                                                                      # decodes
            items = [StepItem([rng.randrange(256)], len(p) + i, t, False) for p, t in zip(prompts, tables)]
            ref_caches = [c.clone() for c in caches]
            ref = step(eager, ref_caches, items, 16)
            b = StepBatch.build(items, 16, num_groups=ALL_GROUPS, device="cuda")
            step_bytes = sum(t.numel() * t.element_size() for t in
                             [b.input_ids, *(getattr(b.meta, f.name) for f in dataclasses.fields(StepMetadata))])
            n = len(copied)
            got = compiled(b.input_ids, kv_caches=caches, meta=b.meta)
            for tensors in copied[n:]:
                replays += 1
                assert sum(t.numel() * t.element_size() for t in tensors) <= step_bytes, (i, tensors)
                for t in tensors:
                    start, end = t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes()
                    assert all(end <= p or p + size <= start for p, size in owned), \
                        f"a replay copied a cache, parameter or buffer: {tuple(t.shape)} {t.dtype}"
            assert rel_err(got, ref) < 2e-2, i
            for layer, (x, y) in enumerate(zip(caches, ref_caches)):
                if x.dtype == torch.uint8:   # the packed writes happened, and wrote the same latents
                    x, y = (swa_rewrite.ops.dequantize_fp8_cache(c, rope_dim=16) for c in (x, y))
                assert rel_err(x.float().nan_to_num(), y.float().nan_to_num()) < 2e-2, (i, layer)
    assert replays >= 3, (replays, dict(counters["inductor"]))   # warm-up, recording, then replays
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])


@pytest.mark.gpu
def test_compiled_cuda_step_uses_the_cpp_wrapper_and_matches_eager(seed):
    """On CUDA the backend compiles with Inductor's C++ wrapper by default (``compile.inductor_defaults``) and
    ``options={"cpp_wrapper": False}`` keeps the Python one. The two launch the same kernels in the same order, so
    their steps (a prefill with MHA rows, then decodes through the MQA entry) give the same bits, logits and cache
    writes; both are eager's up to bf16 and FP8 rounding (Inductor's fusions round the latents differently, and a
    flipped FP8 element moves later layers: ~2e-2 in norm here, where a wrong rewrite is O(1))."""
    rng = random.Random(seed)
    model = MLAModel(TINY, device="cuda", dtype=torch.bfloat16, seed=seed)
    schedule = Schedule(8, [0, 2], 4)
    eager = apply(model, schedule)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (13, 30, 5)]
    tables = [[4 * b + i for i in range(4)] for b in range(3)]
    groups = num_cache_groups(eager)
    batches = [StepBatch.build([StepItem(p, 0, t, True) for p, t in zip(prompts, tables)], 16, num_groups=groups,
                               device="cuda", mha=MHAPlan.for_model(eager, min_tokens=4))]       # MHA rows
    batches += [StepBatch.build([StepItem([rng.randrange(256)], len(p) + i, t, False) for p, t in zip(prompts, tables)],
                                16, num_groups=groups, device="cuda") for i in range(3)]
    assert batches[0].meta.has_mha and not batches[1].meta.has_mha
    initial = eager.allocate_kv_cache(16, 16, "cuda")
    ref_caches = [c.clone() for c in initial]
    with torch.no_grad():
        refs = [eager(b.input_ids, kv_caches=ref_caches, meta=b.meta) for b in batches]
    runs = {}
    for options, wrapper in (({}, True), ({"cpp_wrapper": False}, False)):
        torch._dynamo.reset()
        compiled = swa_rewrite.compile(model, schedule, fullgraph=True, options=options)
        caches = [c.clone() for c in initial]
        with compile_fx_spy() as seen, torch.no_grad():
            outs = [compiled(b.input_ids, kv_caches=caches, meta=b.meta) for b in batches]
        assert len(seen) >= 2 and all(p.get("cpp_wrapper", False) is wrapper for p in seen), (options, seen)
        for i, (got, ref) in enumerate(zip(outs, refs)):
            assert rel_err(got, ref) < 5e-2, (options, i)
        for layer, (x, y) in enumerate(zip(caches, ref_caches)):
            if x.dtype == torch.uint8:
                x, y = (swa_rewrite.ops.dequantize_fp8_cache(c, rope_dim=16) for c in (x, y))
            assert rel_err(x.float().nan_to_num(), y.float().nan_to_num()) < 5e-2, (options, layer)
        runs[wrapper] = outs, caches
    (cpp_outs, cpp_caches), (py_outs, py_caches) = runs[True], runs[False]
    for i, (a, b) in enumerate(zip(cpp_outs, py_outs)):
        assert torch.equal(a, b), (i, (a.float() - b.float()).abs().max().item())
    for layer, (a, b) in enumerate(zip(cpp_caches, py_caches)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), layer      # bytes: NaN slots compare equal


def test_export_with_dynamic_step_shapes(seed):
    """One exported program serves every step shape: tokens, requests and block-table width are dynamic."""
    rng = random.Random(seed)
    model = MLAModel(TINY, seed=seed)
    swa = apply(model, Schedule(8, [0, 2], 4))

    def inputs(items, max_blocks):
        b = StepBatch.build(items, 16, max_blocks=max_blocks, num_groups=ALL_GROUPS)
        return (b.input_ids, packed_caches(model, Schedule(8, [0, 2], 4)), b.meta)

    T, B, NB = (torch.export.Dim(n, min=2, max=4096) for n in ("T", "B", "NB"))
    # A pytree node's dynamic shapes are a list, one entry per field (StepMetadata's field order).
    meta_shapes = dict(positions={0: T}, cu_seqlens_q={0: B + 1}, seq_lens_encoder={0: B}, seq_lens_decoder={0: B},
                       batch_id_per_token={0: T}, block_tables={1: B, 2: NB}, slot_mapping={1: T},
                       mha_kv_slots=None, mha_kv_cu={1: B + 1})      # no MHA rows in these steps: M = 0
    shapes = ({0: T}, [None] * 4, [meta_shapes[f.name] for f in dataclasses.fields(StepMetadata)])
    example = inputs([StepItem([1, 2, 3, 4, 5], 0, [0], True), StepItem([7, 8], 3, [1], True)], 2)
    ep = torch.export.export(swa, example, dynamic_shapes=shapes)
    other = inputs([StepItem([rng.randrange(256) for _ in range(9)], 0, [0], True),
                    StepItem([rng.randrange(256)], 20, [1, 2], False),
                    StepItem([rng.randrange(256) for _ in range(4)], 0, [3, 4, 5], True)], 3)
    caches = [c.clone() for c in other[1]]
    with torch.no_grad():
        got = ep.module()(*other)
        ref = swa(other[0], caches, other[2])
    assert got.shape == (14, TINY.vocab_size)
    torch.testing.assert_close(got, ref)
    assert all(torch.equal(a, b) for a, b in zip(other[1], caches))


def test_the_rewritten_module_compiles_too(seed):
    """torch.compile of the result of apply(): Dynamo traces the rewritten graph module, fullgraph."""
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(5, [1, 2], 4)
    swa = apply(model, schedule)
    items = random_items(random.Random(seed), 16)
    capture = Capture()
    with torch.no_grad():
        got = step(torch.compile(swa, backend=capture, fullgraph=True), packed_caches(model, schedule), items, 16)
        ref = step(swa, packed_caches(model, schedule), items, 16)
    torch.testing.assert_close(got, ref)
    assert op_count(capture.graphs[0], "swa_attention") == {1: 1, 2: 1}


# ------------------------------------------------------------------------------- outside torch.no_grad()
def _grad_mode_step(compiled, model, schedule, items):
    """One step of ``compiled`` with grad mode on (parameters require grad) against the eager no-grad one."""
    caches, ref_caches = packed_caches(model, schedule), packed_caches(model, schedule)
    got = step(compiled, caches, items, 16)
    with torch.no_grad():
        ref = step(apply(model, schedule), ref_caches, items, 16)
    assert_compiled_step_close(got.detach(), ref, caches, ref_caches, schedule)
    return got


def _assert_backward_names_the_op(out):
    """Inference works with grad mode on; only an actual backward fails, naming the op and the fix."""
    with pytest.raises(NotImplementedError, match=r"swa_rewrite::\w+_attention has no gradient.*torch.no_grad"):
        out.float().sum().backward()


@pytest.mark.slow
def test_backend_compiled_step_runs_outside_no_grad(seed):
    """Was: AOTAutograd traced a backward of ops with no autograd formula, so the first step died in a
    Dynamo/Inductor traceback."""
    model = MLAModel(TINY, seed=seed)
    assert all(p.requires_grad for p in model.parameters())
    schedule = Schedule(8, [0, 2], 4)
    items = random_items(random.Random(seed), 16)
    compiled = torch.compile(model, backend=swa_rewrite.backend(schedule), fullgraph=True)
    got = _grad_mode_step(compiled, model, schedule, items)
    _assert_backward_names_the_op(got)


@pytest.mark.slow
def test_post_grad_pass_compiled_step_runs_outside_no_grad(seed):
    model = MLAModel(TINY, seed=seed)
    schedule = Schedule(8, [1, 3], 4)
    items = random_items(random.Random(seed), 16)
    swa_pass = SWAPostGradPass(schedule)
    with torch._inductor.config.patch(post_grad_custom_post_pass=swa_pass, fx_graph_cache=False):
        got = _grad_mode_step(torch.compile(model, fullgraph=True), model, schedule, items)
    assert swa_pass.results[0][1].num_matches == 2         # the forward graph's attention nodes were rewritten
    _assert_backward_names_the_op(got)


# ------------------------------------------------------------------ schedules and models the pass rejects
def _backend_failure(compiled, model, items, caches=None):
    """The exception of a first step that Dynamo's backend call failed; Dynamo wraps what a backend raises."""
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info, torch.no_grad():
        step(compiled, caches or packed_caches(model, Schedule(8, [], 4)), items, 16)
    return info.value.inner_exception


@pytest.mark.parametrize("schedule", [Schedule(8, [0, 5], 6), Schedule(8, [0], 2), Schedule(8, [], 5)])
def test_backend_rejects_a_schedule_for_another_layer_count_as_apply_does(schedule, seed):
    """Was: the backend rewrote the layers the model has and silently ignored the others."""
    model = MLAModel(TINY, seed=seed)
    items = random_items(random.Random(seed), 16)
    message = f"the schedule is for {schedule.num_layers} layers, the model has 4"
    with pytest.raises(RewriteError, match=message):
        apply(model, schedule)
    error = _backend_failure(torch.compile(model, backend=swa_rewrite.backend(schedule, inner="eager")), model, items)
    assert isinstance(error, RewriteError) and str(error) == message
    torch._dynamo.reset()
    with pytest.raises(RewriteError, match=message):           # swa_rewrite.compile: at once, unwrapped
        swa_rewrite.compile(model, schedule, inner="eager")


def test_any_graph_holding_a_layer_the_schedule_cannot_index_is_rejected(seed):
    """Where the module is unknown (a compiled function, the post-grad pass on a captured graph), a layer index
    past the schedule's layer count still shows the schedule is for another model."""
    model = MLAModel(TINY, seed=seed)
    items = random_items(random.Random(seed), 16)
    schedule = Schedule(8, [0], 2)

    def run(*args, **kwargs):
        return model(*args, **kwargs)
    error = _backend_failure(torch.compile(run, backend=swa_rewrite.backend(schedule, inner="eager")), model, items)
    assert isinstance(error, RewriteError)
    assert "the schedule is for 2 layers, but the graph holds layer(s) [2, 3]" in str(error)
    torch._dynamo.reset()
    capture = Capture()
    with torch.no_grad():
        step(torch.compile(model, backend=capture, fullgraph=True), packed_caches(model, Schedule(8, [], 4)), items, 16)
    with pytest.raises(RewriteError, match=r"graph holds layer\(s\) \[2, 3\]"):
        SWAPostGradPass(schedule)(capture.graphs[0])
    with pytest.raises(TypeError, match="schedule must be a swa_rewrite.Schedule"):
        SWAPostGradPass({"window": 8})


def test_backend_rejects_a_float64_model_with_sliding_layers_as_apply_does(seed):
    """Was: compiled, then every step failed in the packed write."""
    model = MLAModel(TINY, dtype=torch.float64, seed=seed)
    schedule = Schedule(8, [1], 4)
    items = random_items(random.Random(seed), 16)
    match = r"layer 1 .*bfloat16, float16 or float32 .* model's dtype is torch.float64"
    with pytest.raises(TypeError, match=match):
        apply(model, schedule)
    error = _backend_failure(torch.compile(model, backend=swa_rewrite.backend(schedule, inner="eager")), model, items)
    assert isinstance(error, TypeError) and re.search(match, str(error))
    torch._dynamo.reset()
    with pytest.raises(TypeError, match=match), torch.no_grad():
        step(swa_rewrite.compile(model, schedule, inner="eager"), packed_caches(model, Schedule(8, [], 4)), items, 16)


def test_post_grad_pass_rejects_a_schedule_for_another_layer_count(seed):
    model = MLAModel(TINY, seed=seed)
    items = random_items(random.Random(seed), 16)
    swa_pass = SWAPostGradPass(Schedule(8, [0, 5], 6))
    # Inductor wraps what a post-grad pass raises (InductorError, itself wrapped by Dynamo in some versions).
    with torch._inductor.config.patch(post_grad_custom_post_pass=swa_pass, fx_graph_cache=False), \
            pytest.raises(Exception) as info, torch.no_grad():
        step(torch.compile(model, fullgraph=True), packed_caches(model, Schedule(8, [], 4)), items, 16)
    error = info.value
    while not isinstance(error, RewriteError) and getattr(error, "inner_exception", None) is not None:
        error = error.inner_exception
    assert isinstance(error, RewriteError) and str(error) == "the schedule is for 6 layers, the model has 4"
    assert swa_pass.results == []                               # nothing was rewritten


def test_import_does_not_import_inductor_or_dynamo():
    """Inductor takes seconds to import: ``import swa_rewrite`` leaves it (and Dynamo) to the first backend."""
    import subprocess
    import sys

    code = ("import sys, swa_rewrite; "
            "print(sorted(m for m in ('torch._inductor', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_post_grad_pass_is_an_inductor_custom_graph_pass():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    assert isinstance(SWAPostGradPass(Schedule(8, [0], 4)), CustomGraphPass)


def test_post_grad_pass_warns_when_the_graph_has_no_mla_attention(caplog):
    """The schedule selects layers but the graph holds none of our ops: usually a model not built with them."""
    plain = torch.fx.symbolic_trace(lambda x: torch.relu(x) * 2)
    with caplog.at_level("WARNING", logger="swa_rewrite.compile"):
        SWAPostGradPass(Schedule(8, [0, 2], 4))(plain.graph)
    [record] = [r for r in caplog.records if r.name == "swa_rewrite.compile"]
    assert record.levelname == "WARNING"
    assert "selects layers [0, 2]" in record.message and "no MLA attention op" in record.message
    assert "swa_rewrite::paged_mla_attention" in record.message
    caplog.clear()
    with caplog.at_level("WARNING", logger="swa_rewrite.compile"):
        SWAPostGradPass(Schedule(8, [], 4))(plain.graph)                              # nothing selected
        swa_pass = SWAPostGradPass(Schedule(8, [0, 2], 4))
        swa_pass(swa_rewrite.rewrite.trace(MLAModel(TINY)).forward.graph)             # attention found
    assert not [r for r in caplog.records if r.name == "swa_rewrite.compile"]
    assert swa_pass.results[-1][1].num_matches == 2
