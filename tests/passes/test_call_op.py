"""``call_op`` re-targets a node by schema names; trailing arguments the op defaults stay off the node."""

import pytest
import torch
import torch.fx

import swa_rewrite  # noqa: F401  (registers the ops)
from swa_rewrite.passes.graph_pass import call_op


def _node():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    return graph.call_function(torch.relu, (x,)), x


def test_missing_trailing_default_is_left_to_the_schema():
    node, x = _node()
    op = torch.ops.swa_rewrite.swa_indexer.default
    names = [a.name for a in op._schema.arguments]
    assert names[-1] == "sinks" and op._schema.arguments[-1].has_default_value()
    given = {name: x if i < 5 else 7 for i, name in enumerate(names[:-1])}
    call_op(node, op, given)
    # The node reads as before the op gained `sinks`: the schema supplies its default (0) at run time.
    assert node.target is op and node.args == tuple(given[n] for n in names[:-1]) and node.kwargs == {}
    given["sinks"] = 3
    call_op(node, op, given)
    assert node.args[-1] == 3 and len(node.args) == len(names)


def test_missing_argument_without_a_default_is_named():
    node, x = _node()
    op = torch.ops.swa_rewrite.swa_indexer.default
    given = {a.name: x for a in op._schema.arguments if a.name not in ("window", "sinks")}
    with pytest.raises(KeyError, match="window"):
        call_op(node, op, given)
