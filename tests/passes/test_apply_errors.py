"""``apply`` on models it cannot rewrite: a clear error up front, never a failure at every step (issue 11)."""

import pytest
import torch
import torch.fx

from swa_rewrite import RewriteError, Schedule, apply
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.runtime import Engine

TINY = MLAConfig.named("tiny")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_float64_model_with_sliding_layers_is_a_type_error_naming_the_dtype(device):
    """Was: apply accepted it and every step failed in the packed write (latent must be bfloat16, ...)."""
    model = MLAModel(TINY, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match=r"layer 1 .*bfloat16, float16 or float32 .* model's dtype is torch.float64"):
        apply(model, Schedule(8, [1, 3], 4))


def test_float64_model_keeping_every_layer_full_still_runs():
    model = MLAModel(TINY, dtype=torch.float64)
    out = apply(model, Schedule(8, [], 4))
    prompts = [[3, 1, 4, 1, 5]]
    got = Engine(out, num_blocks=8, page_size=4, max_tokens_per_step=8).generate(prompts, 3)
    assert got == Engine(model, num_blocks=8, page_size=4, max_tokens_per_step=8).generate(prompts, 3)


class _Wrapped(torch.nn.Module):
    """An MLA model behind a forward fx cannot trace (``kind`` says how)."""

    def __init__(self, kind):
        super().__init__()
        self.inner, self.kind = MLAModel(TINY), kind

    def allocate_kv_cache(self, num_blocks, page_size, device=None):
        if self.kind == "allocation":
            return self.inner.allocate_kv_cache(num_blocks, page_size, device, "extra")
        return self.inner.allocate_kv_cache(num_blocks, page_size, device)

    def forward(self, input_ids, kv_caches, meta):
        if self.kind == "control-flow" and input_ids.sum() > 0:     # data-dependent branch
            return None
        if self.kind == "proxy-as-int":
            for _ in range(input_ids.shape[0]):                     # a traced size used as a Python int
                pass
        return self.inner(input_ids, kv_caches, meta)


@pytest.mark.parametrize("kind,original", [("control-flow", torch.fx.proxy.TraceError),
                                           ("proxy-as-int", TypeError),
                                           ("allocation", TypeError)])
def test_untraceable_model_is_a_rewrite_error_stating_the_contract(kind, original):
    with pytest.raises(RewriteError) as info:
        apply(_Wrapped(kind), Schedule(8, [1], 4))
    message = str(info.value)
    assert message.startswith(f"torch.fx could not trace _Wrapped ({original.__name__}: ")
    for part in ("forward takes the step (input_ids, kv_caches, meta: StepMetadata",
                 "torch.ops.swa_rewrite.mla_attention with each layer's index as an explicit argument",
                 "allocate_kv_cache(num_blocks, page_size, device=None) returns one",
                 "swa_rewrite.models.MLAModel", "backend=swa_rewrite.backend(schedule)"):
        assert part in message
    assert isinstance(info.value.__cause__, original)                 # chained, for the full story


def test_a_traceable_wrapper_still_applies():
    out = apply(_Wrapped("fine"), Schedule(8, [1], 4))
    assert [c.dtype for c in out.allocate_kv_cache(2, 4)] == [torch.float32, torch.uint8, torch.float32,
                                                               torch.float32]
