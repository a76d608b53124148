"""Graph diffs: golden text for the bundled tiny model, and the networkx structural comparison."""

import pathlib

import pytest
import torch

from swa_rewrite import Schedule, apply, graph_diff
from swa_rewrite.graph_diff import isomorphic, to_digraph
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.passes import MLAOpAdapter, Role, default_registry
from swa_rewrite.passes.graph_pass import bound_args, call_op
from swa_rewrite.rewrite import trace

GOLDEN = pathlib.Path(__file__).parent.parent / "golden"
TINY = MLAConfig.named("tiny")
SCHEDULES = {
    "skip-freq-2": Schedule.from_skip_freq(2, 4, window=16),
    "skip-freq-list-0110": Schedule.from_skip_freq([0, 1, 1, 0], 4, window=128),
    "all-layers-w1": Schedule(1, range(4), 4),
    "no-layers": Schedule(64, [], 4),
}


def render(schedule):
    model = MLAModel(TINY, device="meta")
    before, after = trace(model), apply(model, schedule)
    return (f"# {schedule!r}\n## forward graph\n{graph_diff(before.forward, after)}\n"
            f"## cache allocation graph\n{graph_diff(before.allocation, after._swa_allocation)}\n")


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_golden_diff(name, update_golden):
    path = GOLDEN / f"tiny-{name}.diff"
    text = render(SCHEDULES[name])
    if update_golden:
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run pytest with --update-golden to create it"
    assert text == path.read_text(), f"graph diff changed; inspect, then regenerate with --update-golden: {path}"


def test_diff_sections_follow_the_schedule():
    s = SCHEDULES["skip-freq-2"]
    model = MLAModel(TINY)
    d = graph_diff(trace(model).forward, apply(model, s))
    # The full layers keep cache group 0 (the original's), so they are untouched; the sliding layers' ops are
    # re-targeted (group 1), and the step check (outside the layers) gets the per-layer groups.
    assert set(d.changed_layers) == set(s.swa_layers) | {None}
    for layer in s.swa_layers:
        assert len(d.layers[layer].retargeted) == 2 and not d.layers[layer].added and not d.layers[layer].removed
        assert d.layers[layer].same_dataflow      # only the two ops changed; every edge is where it was
    assert all(d.layers[i].isomorphic for i in set(range(4)) - s.swa_layers)
    assert len(d.layers[None].changed_args) == 1 and d.layers[None].same_dataflow


def test_diff_reports_added_and_removed_nodes():
    def f(x):
        return torch.relu(x) + 1

    def g(x):
        return torch.sigmoid(x) + 1

    d = graph_diff(torch.fx.symbolic_trace(f), torch.fx.symbolic_trace(g))
    text = str(d)
    assert "relu" in text and "sigmoid" in text
    assert d.layers[None].added or d.layers[None].retargeted


def test_dataflow_check_sees_a_rewired_graph():
    """Swapping an op keeps the dataflow; re-wiring its inputs does not."""
    model = MLAModel(TINY, device="meta")
    before = trace(model).forward
    after = apply(model, SCHEDULES["skip-freq-2"])
    attn = next(n for n in after.graph.nodes if n.name == "mla_attention_2")
    q_nope, q_pe = attn.args[0], attn.args[1]
    attn.args = (q_pe, q_nope) + tuple(attn.args[2:])          # same ops, different wiring
    d = graph_diff(before, after)
    assert d.layers[0].same_dataflow and not d.layers[2].same_dataflow
    assert "layer 2:" in str(d) and "dataflow changed" in str(d)


def test_isomorphism_sees_structure_not_names():
    a = torch.fx.symbolic_trace(lambda x: torch.relu(x) * 2)
    b = torch.fx.symbolic_trace(lambda x: torch.relu(x) * 2)
    for n in b.graph.nodes:
        if n.op == "call_function":
            n.name = f"renamed_{n.name}"
    c = torch.fx.symbolic_trace(lambda x: torch.relu(x * 2))
    assert isomorphic(to_digraph(a, all_layers=True), to_digraph(b, all_layers=True))
    assert not isomorphic(to_digraph(a, all_layers=True), to_digraph(c, all_layers=True))


def test_diff_of_modules_equals_diff_of_their_traces():
    model = MLAModel(TINY, device="meta")
    rewritten = apply(model, SCHEDULES["skip-freq-2"])
    assert str(graph_diff(model, rewritten)) == str(graph_diff(trace(model).forward, rewritten))
    with pytest.raises(TypeError, match="int"):
        graph_diff(3, rewritten)


def test_diff_is_linear_in_the_graph(monkeypatch):
    """Each node's layer is computed once, and name-preserving layers need no isomorphism search (the
    search made a 488-layer diff take minutes)."""
    import importlib

    gd = importlib.import_module("swa_rewrite.graph_diff")   # the package attribute is the function

    model = MLAModel(TINY.replace(num_hidden_layers=12), device="meta")
    # Layer 0 full: the full layers keep cache group 0 (unchanged, so the isomorphism shortcut runs for them).
    sliding = [1, 2, 4, 5, 7, 8, 10, 11]
    before, after = trace(model).forward, apply(model, Schedule(16, sliding, 12))
    calls = []
    real = gd.node_layer
    monkeypatch.setattr(gd, "node_layer", lambda n, *args: calls.append(n) or real(n, *args))

    def no_search(*args, **kwargs):
        raise AssertionError("VF2 search ran although node names give the isomorphism")

    monkeypatch.setattr(gd, "DiGraphMatcher", no_search)
    d = graph_diff(before, after)
    assert len(calls) == len(before.graph.nodes) + len(after.graph.nodes)
    assert sorted(l for l in d.changed_layers if l is not None) == sliding
    assert all(d.layers[i].isomorphic for i in (0, 3, 6, 9))


def test_name_shortcut_does_not_hide_a_rewiring():
    """Same names and labels but swapped inputs: the shortcut fails and the search decides (not isomorphic)."""
    a = torch.fx.symbolic_trace(lambda x, y: torch.sub(x, torch.relu(y)))
    b = torch.fx.symbolic_trace(lambda x, y: torch.sub(x, torch.relu(y)))
    sub = next(n for n in b.graph.nodes if n.name == "sub")
    sub.args = (sub.args[1], sub.args[0])
    assert not isomorphic(to_digraph(a, all_layers=True), to_digraph(b, all_layers=True))


# --------------------------------------------------------------------------- a foreign op, through its adapter
torch.library.define("swa_rewrite_diff_test::mla", "(Tensor q, Tensor kv, int layer_id) -> Tensor")
torch.library.define("swa_rewrite_diff_test::swa", "(Tensor q, Tensor kv, int window, int layer_id) -> Tensor")


class ForeignAdapter(MLAOpAdapter):
    """Another engine's attention ops, whose layer argument is named ``layer_id`` (not ``layer``)."""

    name = "diff-test-engine"

    def role(self, node):
        name = str(getattr(node.target, "_schema", ""))
        if name.startswith("swa_rewrite_diff_test::mla("):
            return Role.FULL_ATTENTION
        return Role.SWA_ATTENTION if name.startswith("swa_rewrite_diff_test::swa(") else None

    def op_names(self):
        return ["swa_rewrite_diff_test::mla", "swa_rewrite_diff_test::swa"]

    def layer_index(self, node):
        return bound_args(node)["layer_id"]

    def cache(self, node):
        return bound_args(node)["kv"]

    def rope_dim(self, node):
        return 16

    def window(self, node):
        return bound_args(node)["window"]

    def to_swa_attention(self, node, window):
        call_op(node, torch.ops.swa_rewrite_diff_test.swa.default, {**bound_args(node), "window": window})


class ForeignModel(torch.nn.Module):
    def forward(self, q, kv):
        for i in range(3):      # no `layers.<i>` modules: only the op's own argument says the layer
            q = torch.ops.swa_rewrite_diff_test.mla(q, kv, i)
        return q

    def allocate_kv_cache(self, num_blocks, page_size, device=None):
        return [torch.ops.swa_rewrite.allocate_kv_cache(num_blocks, page_size, 128, 16, torch.float32,
                                                        torch.device("cpu"), i) for i in range(3)]


def test_a_foreign_op_diffs_by_the_layer_and_role_its_adapter_gives():
    registry = default_registry()
    registry.register(ForeignAdapter())
    model = ForeignModel()
    before, after = trace(model).forward, apply(model, Schedule(5, [1], 3), registry=registry)
    d = graph_diff(before, after, registry=registry)
    assert d.changed_layers == [1]
    layer = d.layers[1]
    assert len(layer.retargeted) == 1 and "swa_rewrite_diff_test::swa" in layer.retargeted[0]
    assert layer.same_dataflow            # mla → swa is the same role: only a constant (the window) was added
    assert d.layers[0].unchanged and d.layers[2].unchanged and d.layers[None].unchanged
    # Without the adapter the foreign ops are anonymous calls outside any layer.
    assert graph_diff(before, after).changed_layers == [None]
