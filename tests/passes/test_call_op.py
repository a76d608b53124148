"""``call_op`` re-targets a node by schema names and fills arguments the new op defaults."""

import pytest
import torch
import torch.fx

import swa_rewrite  # noqa: F401  (registers the ops)
from swa_rewrite.passes.graph_pass import call_op


def _node():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    return graph.call_function(torch.relu, (x,)), x


def test_missing_argument_with_a_default_takes_it():
    node, x = _node()
    op = torch.ops.swa_rewrite.swa_indexer.default
    names = [a.name for a in op._schema.arguments]
    assert names[-1] == "sinks" and op._schema.arguments[-1].has_default_value()
    given = {name: x if i < 5 else 7 for i, name in enumerate(names[:-1])}
    call_op(node, op, given)
    assert node.target is op and node.args[-1] == op._schema.arguments[-1].default_value == 0
    assert node.args[:-1] == tuple(given[n] for n in names[:-1]) and node.kwargs == {}


def test_missing_argument_without_a_default_is_named():
    node, x = _node()
    op = torch.ops.swa_rewrite.swa_indexer.default
    given = {a.name: x for a in op._schema.arguments if a.name not in ("window", "sinks")}
    with pytest.raises(KeyError, match="window"):
        call_op(node, op, given)
