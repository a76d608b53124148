"""``apply``: graph-level checks, errors, extensibility (issue 5)."""

import random
import time

import pytest
import torch
import torch.fx

import swa_rewrite
from swa_rewrite import RewriteError, Schedule, apply
from swa_rewrite.graph_diff import isomorphic, node_layer, to_digraph
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.passes import MLAOpAdapter, Role, default_registry
from swa_rewrite.rewrite import trace

TINY = MLAConfig.named("tiny")


def ops_by_layer(gm, name):
    """layer → count of ``swa_rewrite::<name>`` nodes in the graph."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(getattr(n.target, "_schema", n.target)).startswith(f"swa_rewrite::{name}("):
            out[node_layer(n)] = out.get(node_layer(n), 0) + 1
    return out


def random_schedule(num_layers=TINY.num_hidden_layers, window=None):
    layers = [i for i in range(num_layers) if random.random() < 0.5]
    return Schedule(window or random.choice([1, 16, 128]), layers, num_layers)


@pytest.mark.parametrize("trial", range(4))
def test_op_counts_and_layers_follow_the_schedule(trial):
    model = MLAModel(TINY, seed=trial)
    s = random_schedule()
    out = apply(model, s)
    assert ops_by_layer(out, "swa_attention") == {i: 1 for i in s.swa_layers}
    assert ops_by_layer(out, "write_fp8_cache") == {i: 1 for i in s.swa_layers}
    full = set(range(4)) - s.swa_layers
    assert ops_by_layer(out, "mla_attention") == {i: 1 for i in full}
    assert ops_by_layer(out, "write_kv_cache") == {i: 1 for i in full}
    swa_nodes = [n for n in out.graph.nodes if "swa_attention" in str(n.target)]
    assert all(n.args[-3] == s.window for n in swa_nodes)        # (..., window, layer, group)
    # Untouched layers are structurally identical before and after.
    before = trace(model).forward
    for layer in full:
        assert isomorphic(to_digraph(before, layer), to_digraph(out, layer))
    for layer in s.swa_layers:
        assert not isomorphic(to_digraph(before, layer), to_digraph(out, layer))


def test_cache_allocation_is_packed_only_for_selected_layers():
    model = MLAModel(TINY)
    s = Schedule(64, [0, 3], 4)
    caches = apply(model, s).allocate_kv_cache(num_blocks=5, page_size=7)
    R, P = TINY.kv_lora_rank, TINY.qk_rope_head_dim
    for i, c in enumerate(caches):
        if i in s.swa_layers:
            assert c.dtype == torch.uint8 and c.shape == (5, 7, R + 4 * R // 128 + 2 * P)
        else:
            assert c.dtype == torch.float32 and c.shape == (5, 7, R + P)
    report = apply(model, s).swa_report
    text = str(report)
    assert "SWA" in text and "uint8[" in text and "GiB saved" in text
    per_token_before = 4 * (R + P) * 4
    per_token_after = 2 * (R + P) * 4 + 2 * (R + 4 * R // 128 + 2 * P)
    assert report.bytes_per_token(after=False) == per_token_before
    assert report.bytes_per_token(after=True) == per_token_after
    assert report.bytes_saved(1000) == 1000 * (per_token_before - per_token_after)


def test_v3_dims_report_656_bytes_per_token():
    model = MLAModel(MLAConfig.named("v3-attn"), device="meta", dtype=torch.bfloat16)
    out = apply(model, Schedule.from_skip_freq(2, 4, 128))
    rows = out.swa_report.rows
    assert [r.cache_after for r in rows if r.layer in (0, 2)] == [(torch.uint8, 656)] * 2
    assert [r.cache_after for r in rows if r.layer in (1, 3)] == [(torch.bfloat16, 576)] * 2
    assert "1152 -> 656" in str(out.swa_report)


def test_drop_in_shares_parameters_retraces_and_reloads():
    model = MLAModel(TINY)
    out = apply(model, random_schedule())
    for name, p in model.named_parameters():
        assert out.get_parameter(name) is p, name
    assert set(out.state_dict()) == set(model.state_dict())
    other = MLAModel(TINY, seed=7)
    out.load_state_dict(other.state_dict())          # loads into the shared parameters
    assert torch.equal(model.lm_head.weight, other.lm_head.weight)
    MLAModel(TINY, seed=9).load_state_dict(out.state_dict())
    retraced = torch.fx.symbolic_trace(out)
    assert ops_by_layer(retraced, "swa_attention") == ops_by_layer(out, "swa_attention")


def _step_logits(model, seed):
    from swa_rewrite.runtime import StepBatch, StepItem, num_cache_groups
    rng = random.Random(seed)
    b = StepBatch.build([StepItem([rng.randrange(256) for _ in range(9)], 0, [1, 0], True)], 8,
                        num_groups=num_cache_groups(model))
    caches = model.allocate_kv_cache(4, 8)
    for c in caches:
        c.zero_()
    with torch.no_grad():
        return model(b.input_ids, kv_caches=caches, meta=b.meta)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_rewritten_module_copies_and_saves_whole(how, seed):
    import copy
    import io
    swa = apply(MLAModel(TINY, seed=seed), Schedule(4, [0, 2], 4))
    if how == "deepcopy":
        other = copy.deepcopy(swa)
    else:
        buf = io.BytesIO()
        torch.save(swa, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    assert isinstance(other, swa_rewrite.rewrite.SWAModule) and type(other).__name__ == "SWAModule"
    assert other.swa_schedule == swa.swa_schedule
    assert str(other.swa_report) == str(swa.swa_report) and other.config == swa.config
    assert [(c.dtype, c.shape) for c in other.allocate_kv_cache(3, 8)] == \
        [(c.dtype, c.shape) for c in swa.allocate_kv_cache(3, 8)]
    assert all(a is not b for a, b in zip(other.parameters(), swa.parameters()))
    assert torch.equal(_step_logits(other, seed), _step_logits(swa, seed))
    assert ops_by_layer(apply(other, swa.swa_schedule), "swa_attention") == ops_by_layer(swa, "swa_attention")


def test_allocation_follows_the_modules_current_weights(seed):
    """The meta-device workflow: rewrite on meta, then materialise; caches follow the live weights."""
    schedule = Schedule(4, [1], 4)
    swa = apply(MLAModel(TINY, device="meta", dtype=torch.bfloat16), schedule)
    assert {c.device.type for c in swa.allocate_kv_cache(2, 8)} == {"meta"}
    swa.load_state_dict(MLAModel(TINY, seed=seed).state_dict(), assign=True)      # float32 on the CPU
    caches = swa.allocate_kv_cache(2, 8)
    assert [(c.device.type, c.dtype) for c in caches] == [("cpu", torch.float32), ("cpu", torch.uint8),
                                                           ("cpu", torch.float32), ("cpu", torch.float32)]
    other = apply(MLAModel(TINY, device="meta"), schedule).to_empty(device="cpu")
    assert {c.device.type for c in other.allocate_kv_cache(2, 8)} == {"cpu"}


def test_apply_is_idempotent():
    model = MLAModel(TINY)
    s = random_schedule()
    once = apply(model, s)
    twice = apply(once, s)
    assert twice.code == once.code
    assert twice.swa_report.passes[1].num_matches == 0 and twice.swa_report.passes[2].num_matches == 0
    assert twice.allocate_kv_cache(2, 3)[0].dtype == once.allocate_kv_cache(2, 3)[0].dtype
    # A wider window on the same layers only changes the window argument.
    wider = apply(once, Schedule(s.window + 1, s.swa_layers, 4))
    assert all(n.args[-3] == s.window + 1 for n in wider.graph.nodes if "swa_attention" in str(n.target))
    if s.swa_layers:
        with pytest.raises(RewriteError, match="already a sliding-window layer"):
            apply(once, Schedule(s.window, [], 4))


def test_empty_schedule_changes_nothing():
    model = MLAModel(TINY)
    out = apply(model, Schedule(8, [], 4))
    assert out.code == trace(model).forward.code
    assert str(swa_rewrite.graph_diff(trace(model).forward, out)).startswith("unchanged layers 0-3")


def test_61_layer_v3_definition_on_meta_rewrites_in_about_a_second():
    """DeepSeek-V3 itself: 61 layers, 3 dense then 58 MoE (256 routed + 1 shared expert), 671B parameters."""
    cfg = MLAConfig.named("v3-attn").replace(
        num_hidden_layers=61, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        moe_intermediate_size=2048, first_k_dense_replace=3, n_group=8, topk_group=4, topk_method="noaux_tc",
        scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
    model = MLAModel(cfg, device="meta", dtype=torch.bfloat16)
    assert 670e9 < sum(p.numel() for p in model.parameters()) < 672e9
    t0 = time.perf_counter()
    out = apply(model, Schedule.from_skip_freq(4, 61, 4096))
    seconds = time.perf_counter() - t0
    assert len(ops_by_layer(out, "swa_attention")) == 46
    assert seconds < 10, f"apply took {seconds:.1f} s"   # about 1 s on an idle CI core; generous bound


# ----------------------------------------------------------------------------------------------- errors
class NoAttention(torch.nn.Module):
    def forward(self, x, *args):
        return torch.zeros_like(x)


def test_error_when_no_mla_attention_is_found():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).relu()

        def allocate_kv_cache(self, num_blocks, page_size, device=None):
            return []

    with pytest.raises(RewriteError, match=r"no MLA attention op found: searched \d+ nodes .*swa_rewrite::paged_mla_attention.*relu"):
        apply(Plain(), Schedule(8, [0], 1))


def test_error_when_a_selected_layer_has_no_attention():
    model = MLAModel(TINY)
    model.layers[2].self_attn = NoAttention()
    with pytest.raises(RewriteError, match=r"selects layer\(s\) \[2\].*found for layers \[0, 1, 3\]"):
        apply(model, Schedule(8, [1, 2], 4))
    apply(model, Schedule(8, [1, 3], 4))  # the layers that have attention are fine


def test_error_on_layer_count_mismatch():
    with pytest.raises(RewriteError, match="schedule is for 6 layers, the model has 4"):
        apply(MLAModel(TINY), Schedule(8, [1], 6))


def test_error_when_ops_carry_no_layer_index():
    model = MLAModel(TINY)
    for layer in model.layers:
        layer.self_attn.layer_idx = -1
    with pytest.raises(RewriteError, match="carries no layer index"):
        apply(model, Schedule(8, [1], 4))


def test_error_when_layer_argument_contradicts_module_path():
    model = MLAModel(TINY)
    model.layers[1].self_attn.layer_idx = 3
    with pytest.raises(RewriteError, match="says layer 3 but was called from module layers.1"):
        apply(model, Schedule(8, [1], 4))


# --------------------------------------------------------------------------------------- extensibility
torch.library.define("swa_rewrite_test::engine_mla", "(Tensor q, Tensor kv, int layer_id) -> Tensor")


@torch.library.impl("swa_rewrite_test::engine_mla", "CompositeExplicitAutograd")
def _engine_mla(q, kv, layer_id):
    return q * 2


@torch.library.register_fake("swa_rewrite_test::engine_mla")
def _(q, kv, layer_id):
    return torch.empty_like(q)


class EngineAdapter(MLAOpAdapter):
    """An engine whose attention op knows nothing of windows: the adapter swaps in our fused op."""

    name = "test-engine"

    def role(self, node):
        if node.op == "call_function" and "engine_mla" in str(node.target):
            return Role.FULL_ATTENTION
        return None

    def op_names(self):
        return ["swa_rewrite_test::engine_mla"]

    def layer_index(self, node):
        return node.args[2]

    def cache(self, node):
        return node.args[1]

    def rope_dim(self, node):
        return 16

    def to_swa_attention(self, node, window):
        node.target = torch.ops.aten.mul.Tensor    # stand-in "SWA kernel" so the test can see the swap
        node.args = (node.args[0], float(window))


def test_registry_accepts_an_engine_adapter():
    class EngineModel(torch.nn.Module):
        def forward(self, q, kv):
            for i in range(3):
                q = torch.ops.swa_rewrite_test.engine_mla(q, kv, i)
            return q

        def allocate_kv_cache(self, num_blocks, page_size, device=None):
            return [torch.ops.swa_rewrite.allocate_kv_cache(num_blocks, page_size, 128, 16, torch.float32,
                                                            torch.device("cpu"), i) for i in range(3)]

    registry = default_registry()
    with pytest.raises(RewriteError, match="no MLA attention op found"):
        apply(EngineModel(), Schedule(5, [1], 3), registry=registry)
    registry.register(EngineAdapter())
    out = apply(EngineModel(), Schedule(5, [1], 3), registry=registry)
    q, kv = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(out(q, kv), q * 2 * 5 * 2)        # layers 0, 2 engine op; layer 1 swapped
    assert [c.dtype for c in out.allocate_kv_cache(2, 2)] == [torch.float32, torch.uint8, torch.float32]
    assert out.allocate_kv_cache(2, 2)[1].shape == (2, 2, 128 + 4 + 32)


def test_apply_rejects_non_schedules():
    with pytest.raises(TypeError, match="schedule must be a swa_rewrite.Schedule"):
        apply(MLAModel(TINY), {"window": 3})


def test_canonicalize_keeps_cache_writes_whatever_the_purity_check_says(monkeypatch):
    """torch 2.11's dead-code elimination treated unresolved op packets as pure and dropped the cache
    writes of Dynamo graphs; ops with a mutable schema must survive even a purity check that says no."""
    from swa_rewrite.passes import canonicalize

    def f(latent, cache, slots):
        torch.ops.swa_rewrite.write_kv_cache(latent, cache, slots, 0)   # result unused
        return latent * 2

    gm = torch.fx.symbolic_trace(f)
    assert isinstance(next(n for n in gm.graph.nodes if "write" in str(n.target)).target, torch._ops.OpOverloadPacket)
    monkeypatch.setattr(torch.fx.Node, "is_impure", lambda self, *a, **k: self.op in ("placeholder", "output"))
    canonicalize(gm)
    writes = [n for n in gm.graph.nodes if "write_kv_cache" in str(n.target)]
    assert len(writes) == 1 and writes[0].target is torch.ops.swa_rewrite.write_kv_cache.default
