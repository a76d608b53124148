"""``MLAOpAdapter``: the documented extension point (an ABC) the passes and ``graph_diff`` go through."""

import inspect

import pytest

from swa_rewrite.passes import MLAOpAdapter, Role, SwaRewriteOps


def test_an_adapter_must_say_role_layer_and_op_names():
    class Incomplete(MLAOpAdapter):
        def role(self, node):
            return None

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
    assert MLAOpAdapter.__abstractmethods__ == {"role", "layer_index", "op_names"}


def test_role_specific_methods_name_themselves_when_missing():
    class AttentionOnly(MLAOpAdapter):
        def role(self, node):
            return Role.FULL_ATTENTION

        def layer_index(self, node):
            return 0

        def op_names(self):
            return ["engine::mla"]

    adapter = AttentionOnly()
    assert adapter.latent_dtype(None) is None       # optional: "not known"
    for method in ("cache", "rope_dim", "window", "is_packed_allocation", "to_packed_allocation"):
        with pytest.raises(NotImplementedError, match=f"AttentionOnly.{method}"):
            getattr(adapter, method)(None)
    with pytest.raises(NotImplementedError, match="AttentionOnly.to_swa_attention"):
        adapter.to_swa_attention(None, 8)
    with pytest.raises(NotImplementedError, match="AttentionOnly.to_packed_write"):
        adapter.to_packed_write(None, 64)


def test_every_method_documents_what_it_returns_and_when_it_is_called():
    for name, method in inspect.getmembers(MLAOpAdapter, inspect.isfunction):
        if not name.startswith("_"):
            doc = inspect.getdoc(method) or ""
            assert "Called" in doc, name
    SwaRewriteOps()      # the reference implementation implements the whole interface
