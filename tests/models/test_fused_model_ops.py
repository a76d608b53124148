"""The model's one-launch norm and rope / latent kernels (``kernels.model_ops``, issue 14) compute what the op-by-op
forms compute, and the model takes them exactly where ``models.fused`` says: eager inference on CUDA, never when
traced, recorded for autograd or switched off. CPU runs the kernels in Triton's interpreter."""

import pytest
import torch
import torch.nn.functional as F

from numerics import rel_err
from swa_rewrite.kernels import model_ops
from swa_rewrite.models import MLAConfig, MLAModel, fused
from swa_rewrite.models.rope import apply_rope, rope_cos_sin, rope_inv_freq, rope_rotation
from swa_rewrite import Schedule, apply
from swa_rewrite.fp8_format import quantize_rows
from swa_rewrite.runtime import StepBatch, StepItem, num_cache_groups

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
HALF = (torch.bfloat16, torch.float16)
# (a normalised value one unit off becomes up to two units of the weighted one, which can sit a binade lower)
_NORM_ULPS = {torch.bfloat16: 2.0, torch.float16: 2.0, torch.float32: 4.0}


def _skip_without(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _ulps(got, want):
    """Per element, how many units of ``want``'s dtype in the last place ``got`` is from ``want`` (both finite)."""
    spacing = torch.finfo(want.dtype).eps * want.double().abs().clamp_min(torch.finfo(want.dtype).tiny)
    return ((got.double() - want.double()).abs() / spacing)


def _truncating(device, dtype) -> bool:
    """Triton's interpreter (Triton 3.9) converts float32 to bf16 by truncation, not to nearest as the GPU does:
    each rounding there can be one unit off, so CPU bf16 compares to two units (two roundings), the GPU bit for bit."""
    return device == "cpu" and dtype == torch.bfloat16


def _assert_rounded_as(got, want, device, scale):
    """Bit for bit; where the interpreter truncates (``_truncating``), to two units of ``scale`` (the magnitude of
    the terms rounded: a rotation's products, a sum's operands), which a wrong element or pair misses by far."""
    if _truncating(device, want.dtype):
        err = (got.double() - want.double()).abs().max().item()
        assert err <= 2 * torch.finfo(want.dtype).eps * scale, f"{err} from the op-by-op form (scale {scale})"
    else:
        assert torch.equal(got, want), f"differs at {(got != want).nonzero()[:4].tolist()}"


def _nan(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _assert_norm_close(got, x64, weight, dtype):
    """``got`` against the float64 formula (``x64`` the normalised input in float64), to the dtype's rounding."""
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 1536, 7168])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_kernel(device, dtype, D, residual, seed):
    _skip_without(device)
    g = torch.Generator().manual_seed(seed)
    T = 5 if device == "cpu" else 67
    wide = (torch.randn(T, D + 24, generator=g) * 3).to(dtype).to(device)
    x = wide[:, 7:7 + D]                                         # rows strided as a slice of a wider output
    r = (torch.randn(T, D, generator=g) * 3).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype).to(device)
    out = tuple(_nan((T, D), dtype, device) for _ in range(1 + residual))
    got = model_ops.rms_norm(x, w, 1e-6, r if residual else None, out=out)
    y = got[0] if residual else got
    assert y.data_ptr() == out[0].data_ptr() and not y.isnan().any()
    h = x
    if residual:
        _assert_rounded_as(got[1], x + r, device, 2 * max(x.abs().max(), r.abs().max()).item())         # the op-by-op sum, bit for bit on the GPU
        h = got[1]
    _assert_norm_close(y, h.double(), w, dtype)
    # the op-by-op form: the same up to the float32 sum's order (one unit of a half dtype, rarely; a few float32
    # units, which the two roundings after the sum carry)
    want = w * F.rms_norm(h, (D,), eps=1e-6).to(dtype)
    ulps = _ulps(y, want)
    assert ulps.max() <= _NORM_ULPS[dtype] + _truncating(device, dtype), f"{ulps.max().item()} ulps from op by op"
    if dtype in HALF and not _truncating(device, dtype):    # (a row's float32 rstd moves all its float32 values)
        assert (ulps > 0).float().mean() < 0.02


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("H,R,P", [(1, 32, 16), (5, 64, 16), (128, 512, 64)])
def test_mla_rope_latent_kernel(device, dtype, interleave, H, R, P, seed):
    _skip_without(device)
    g = torch.Generator().manual_seed(seed)
    T, N = (3 if device == "cpu" else 41), 16
    angles = torch.rand(T, P // 2, generator=g, dtype=torch.float64) * 1e4
    cos, sin = (angles.cos() * 1.1).to(dtype).to(device), (angles.sin() * 1.1).to(dtype).to(device)
    rope = rope_rotation(cos, sin, interleave)
    q = (torch.randn(T, H, N + P, generator=g) * 4).to(dtype).to(device)
    q_pe = q[..., N:]                                           # a strided slice, as the model passes it
    kv = (torch.randn(T, R + P, generator=g) * 4).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(R, generator=g)).to(dtype).to(device)
    out = (_nan((T, H, P), dtype, device), _nan((T, R + P), dtype, device))
    q_rot, latent = model_ops.mla_rope_latent(q_pe, kv, rope.tokens, rope.index, w, 1e-6, out=out)
    assert q_rot.data_ptr() == out[0].data_ptr() and latent.data_ptr() == out[1].data_ptr()
    # rotations: apply_rope's bits (the independent op-by-op form)
    scale = 2.2 * max(q_pe.abs().max(), kv.abs().max()).item()       # |x_a·c| + |x_b·s| <= 2 · 1.1 · max |x|
    _assert_rounded_as(q_rot, apply_rope(q_pe, cos, sin, interleave), device, scale)
    _assert_rounded_as(latent[:, R:], apply_rope(kv[:, R:], cos, sin, interleave), device, scale)
    # the kv norm: the float64 formula to the dtype's rounding, and the op-by-op form to a unit of it
    _assert_norm_close(latent[:, :R], kv[:, :R].double(), w, dtype)
    want = w * F.rms_norm(kv[:, :R], (R,), eps=1e-6).to(dtype)
    assert _ulps(latent[:, :R], want).max() <= _NORM_ULPS[dtype] + _truncating(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N", [48, 1536, 18432])
def test_silu_mul_kernel(device, dtype, N, seed):
    """The MLP's ``F.silu(gate) * up`` in one launch: PyTorch's bits on the GPU (``expf``, a correctly rounded division,
    two roundings); in the interpreter (numpy's ``exp``, truncation to bf16) to two units of the dtype."""
    _skip_without(device)
    g = torch.Generator().manual_seed(seed)
    T = 3 if device == "cpu" else 37
    wide = (torch.randn(T, 2 * N + 8, generator=g) * 4).to(dtype).to(device)
    gate_up = wide[:, 8:]                                    # [gate | up], strided rows: a slice of a wider output
    gate, up = gate_up[:, :N], gate_up[:, N:]
    gate[0, :4] = torch.tensor([0.0, -30.0, 30.0, -100.0], dtype=dtype)    # zero, saturating, underflowing exp
    out = _nan((T, N), dtype, device)
    got = model_ops.silu_mul(gate_up, out=out)
    assert got.data_ptr() == out.data_ptr() and not got.isnan().any()
    want = F.silu(gate) * up
    if device == "cpu":
        s = gate.double() * torch.sigmoid(gate.double())
        ref = s.to(dtype).double() * up.double()
        tol = 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * 1e-3)
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * 1e-3)
    else:
        assert torch.equal(got, want), f"differs at {(got != want).nonzero()[:4].tolist()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("interleave", [True, False])
def test_step_rope_table_kernel(device, dtype, interleave, seed):
    """The step's rope table in one launch: ``rope_rotation(*rope_cos_sin(...))`` — the angles' cosines and sines
    (CUDA's, as PyTorch's) times a yarn magnitude, rounded — bit for bit on the GPU, at positions up to 160K."""
    _skip_without(device)
    g = torch.Generator().manual_seed(seed)
    cfg = MLAConfig.named("v3-attn")
    inv_freq, magnitude = rope_inv_freq(cfg)
    positions = torch.randint(0, 163840, (37,), generator=g)
    positions[:3] = torch.tensor([0, 1, 163839])
    positions, inv_freq = positions.to(device), inv_freq.to(device)
    want = rope_rotation(*rope_cos_sin(inv_freq, magnitude, positions, dtype), interleave)
    out = _nan(want.tokens.shape, dtype, device)
    table = model_ops.rope_table(positions.int() if device == "cpu" else positions, inv_freq, magnitude, dtype,
                                 out=out)
    assert table.data_ptr() == out.data_ptr() and not table.isnan().any()
    if device == "cpu":          # numpy's float32 cos / sin in the interpreter, and its truncation to bf16
        torch.testing.assert_close(table.double(), want.tokens.double(), rtol=0, atol=4 * torch.finfo(dtype).eps)
    else:
        assert torch.equal(table, want.tokens), f"differs at {(table != want.tokens).nonzero()[:4].tolist()}"
    # the whole RopeRotation, as the model takes it (index made once per device and layout, then reused)
    monkeypatch_devices = fused._DEVICES
    try:
        fused._DEVICES = ("cuda", "cpu")
        with torch.no_grad():
            rope = fused.step_rope(inv_freq, magnitude, positions, dtype, interleave)
            again = fused.step_rope(inv_freq, magnitude, positions, dtype, interleave)
    finally:
        fused._DEVICES = monkeypatch_devices
    assert torch.equal(rope.index, want.index) and again.index is rope.index
    assert rope.heads.shape == want.heads.shape and rope.heads.data_ptr() == rope.tokens.data_ptr()


def _step(model, T=3, page_size=4, context=6, device="cpu"):
    nb = -(-(context + T) // page_size)
    items = [StepItem([5, 9, 2][:T], context, list(range(nb)), True)]
    batch = StepBatch.build(items, page_size, num_groups=num_cache_groups(model), device=device)
    caches = model.allocate_kv_cache(nb + 1, page_size, device)
    P = model.config.qk_rope_head_dim
    for c in caches:   # the cached context: random latents (packed FP8 rows in the rewritten model's sliding layers)
        if c.dtype == torch.uint8:
            rows = torch.randn(c.shape[0] * c.shape[1], model.config.kv_lora_rank + P, device=device) * 0.5
            c.copy_(quantize_rows(rows, P).view(c.shape))
        else:
            c.normal_(0, 0.5)
    return lambda: model(batch.input_ids, kv_caches=caches, meta=batch.meta)


class _Spy:
    """Counts the calls of ``kernels.model_ops``' launchers."""

    def __init__(self, monkeypatch):
        self.calls = {"rms_norm": 0, "mla_rope_latent": 0, "rope_table": 0, "silu_mul": 0}
        for name in self.calls:
            real = getattr(model_ops, name)

            def spy(*a, _real=real, _name=name, **k):
                self.calls[_name] += 1
                return _real(*a, **k)
            monkeypatch.setattr(model_ops, name, spy)


def _cpu_kernels(monkeypatch):
    """The one-launch forms on CPU tensors (Triton's interpreter), as on CUDA."""
    monkeypatch.setattr(fused, "_DEVICES", ("cuda", "cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rewrite", [False, True])
def test_model_takes_the_kernels_in_eager_inference_and_matches_op_by_op(monkeypatch, dtype, rewrite, seed):
    """A tiny model's step under no_grad, and the rewritten model's: each layer's norms (the input and post-attention
    ones with the residual adds before them), its rope / latent and its MLP's activation go through the kernels, and
    the logits are the op-by-op forms' (float32: to its rounding; bf16 in the interpreter, which truncates every
    rounding, the FP8 caches amplifying it: to a few %, norm-wise: a wrong wire is off by ~100 %)."""
    _cpu_kernels(monkeypatch)
    spy = _Spy(monkeypatch)
    model = MLAModel(MLAConfig.named("tiny"), seed=seed % 1000, dtype=dtype)
    L = model.config.num_hidden_layers
    if rewrite:
        model = apply(model, Schedule.from_skip_freq(2, L, 4))
    torch.manual_seed(seed)
    step = _step(model)
    torch.manual_seed(seed)
    step_ref = _step(model)
    with torch.no_grad():
        got = step()
        launched = {"rms_norm": 3 * L + 1, "mla_rope_latent": L, "rope_table": 1, "silu_mul": L}
        assert spy.calls == launched
        with fused.op_by_op():
            want = step_ref()
        assert spy.calls == launched, "op_by_op() must not launch them"
    err = rel_err(got, want)
    assert err < (1e-5 if dtype == torch.float32 else 6e-2 if rewrite else 3e-2), err  # bf16: max 3.5 / 2.2 % (16 seeds)


def test_kernels_are_not_taken_for_autograd_tracing_or_autocast(monkeypatch, seed):
    _cpu_kernels(monkeypatch)
    spy = _Spy(monkeypatch)
    model = MLAModel(MLAConfig.named("tiny"), seed=seed % 1000)
    x = torch.randn(4, model.config.hidden_size)
    norm = model.layers[0].input_layernorm
    norm(x)                                                     # grad on and a weight that requires it
    assert spy.calls["rms_norm"] == 0
    inv_freq, positions = model.rope_inv_freq, torch.arange(5)
    fused.step_rope(inv_freq, 1.0, positions, torch.float32, True)   # grad mode on: the op-by-op form
    assert spy.calls["rope_table"] == 0
    with torch.no_grad():
        fused.step_rope(inv_freq, 1.0, positions, torch.float32, True)
        assert spy.calls["rope_table"] == 1
    with torch.no_grad():
        norm(x)
        assert spy.calls["rms_norm"] == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            norm(x)
        norm(x.double())                                        # a dtype the kernels do not take
        norm(x[:, ::2].repeat(1, 2))                            # (a copy: unit stride, taken)
        assert spy.calls["rms_norm"] == 2
        compiled = torch.compile(lambda t: norm(t), backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), norm(x))
        assert spy.calls["rms_norm"] == 3, "the compiled call must trace the op-by-op form"
        # make_fx on real tensors (no compiler flag, plain tensors: its dispatch mode is what tells)
        from torch.fx.experimental.proxy_tensor import make_fx
        graph = make_fx(lambda t: norm(t))(x)
        assert spy.calls["rms_norm"] == 3
        assert any(k in str(n.target) for n in graph.graph.nodes for k in ("rms_norm", "rsqrt")), graph.code
        with torch.utils.flop_counter.FlopCounterMode(display=False):
            norm(x)
        assert spy.calls["rms_norm"] == 3, "a dispatch mode sees the op-by-op form"
        # forward-mode AD and torch.func transforms carry plain-looking tensors: the op-by-op form keeps tangents
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(norm(fwAD.make_dual(x, torch.ones_like(x)))).tangent
        assert tangent is not None and spy.calls["rms_norm"] == 3
        torch.testing.assert_close(torch.func.vmap(norm)(x[None]), norm(x)[None])
        assert spy.calls["rms_norm"] == 4, "vmap takes the op-by-op form (the direct call after it the kernel)"
        # shapes the kernel would read past: the op-by-op form, which raises
        with pytest.raises(RuntimeError):
            fused.rms_norm(x, norm.weight[:-1], 1e-6)
        assert spy.calls["rms_norm"] == 4
        # op_by_op() is per thread
        import threading
        with fused.op_by_op():
            def in_thread():
                with torch.no_grad():                           # (grad mode is per thread too)
                    norm(x)
            other = threading.Thread(target=in_thread)
            other.start()
            other.join()
            norm(x)
        assert spy.calls["rms_norm"] == 5, "another thread keeps the kernels while this one is op by op"
        # a rope width the kernel's one power-of-two block cannot span: the op-by-op form, the same values
        cos, sin = torch.rand(4, 12), torch.rand(4, 12)
        rope = rope_rotation(cos, sin, True)
        q_pe, kv, w = torch.randn(4, 3, 24), torch.randn(4, 32 + 24), torch.rand(32) + 0.5
        q_rot, latent = fused.mla_rope_latent(q_pe, kv, rope.tokens, rope.heads, rope.index, w, 1e-6)
        assert spy.calls["mla_rope_latent"] == 0
        assert torch.equal(q_rot, apply_rope(q_pe, cos, sin, True))
        assert torch.equal(latent[:, 32:], apply_rope(kv[:, 32:], cos, sin, True))
    # the rewritten module calls the same leaves: its fx graph has them as calls, not traced through
    rewritten = apply(model, Schedule.from_skip_freq(2, model.config.num_hidden_layers, 4))
    targets = {getattr(n.target, "__name__", None) for n in rewritten.graph.nodes if n.op == "call_function"}
    assert {"rms_norm", "mla_rope_latent"} <= targets


@pytest.mark.gpu
def test_cuda_model_step_takes_the_kernels_and_matches_op_by_op(monkeypatch, seed):
    """The V3 attention dims (H = 128, R = 512, P = 64) in bf16 on the GPU: the eager step launches the kernels
    and its logits match the op-by-op step's to bf16 rounding; the rewritten model takes them too."""
    spy = _Spy(monkeypatch)
    cfg = MLAConfig.named("tiny").replace(num_attention_heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
                                          hidden_size=256, q_lora_rank=128)
    model = MLAModel(cfg, seed=seed % 1000, device="cuda", dtype=torch.bfloat16)
    rewritten = apply(model, Schedule.from_skip_freq(2, cfg.num_hidden_layers, 4))
    L = cfg.num_hidden_layers
    for m in (model, rewritten):
        torch.manual_seed(seed)
        step = _step(m, device="cuda")
        torch.manual_seed(seed)
        step_ref = _step(m, device="cuda")
        before = dict(spy.calls)
        with torch.inference_mode():
            got = step()
            with fused.op_by_op():
                want = step_ref()
        assert spy.calls["mla_rope_latent"] - before["mla_rope_latent"] == L
        assert spy.calls["rope_table"] - before["rope_table"] == 1
        assert spy.calls["rms_norm"] - before["rms_norm"] == 3 * L + 1
        assert spy.calls["silu_mul"] - before["silu_mul"] == L
        assert rel_err(got, want) < 1e-2
