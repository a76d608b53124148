"""Host cost of the small pieces an eager decode step is made of (issue 14), measured alone on this machine.

    PYTHONPATH=. python benchmarks/bench_host_pieces.py          # CUDA if present, else CPU

An eager step of the bundled model is host-bound (RESULTS.md, issue 14): its time is what the host takes to issue
~300 PyTorch ops and our custom ops. This prints the host µs per call (median of batches, the device queue drained
before each batch) of: one PyTorch op (the unit), the model's rope and RMSNorm in their op-by-op form and in the
fewer-op forms, a trivial custom op registered through ``torch.library.custom_op`` beside one through
``torch.library.Library``, and one Triton launch through ``kernel[grid](...)`` with 16 arguments. It also checks
that the fewer-op forms give the same bits as the op-by-op ones on this device.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from swa_rewrite.models.rope import apply_rope, rope_rotation, rotate

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_host import host_us  # noqa: E402


def timed(fn, device: torch.device) -> float:
    """``bench_host.host_us`` after 20 warm-up calls: median host µs per call over batches of 50."""
    for _ in range(20):
        fn()
    return host_us(fn, 2000, device, batch=50)


@torch.library.custom_op("swa_bench::noop_custom", mutates_args=())
def noop_custom(x: torch.Tensor, y: torch.Tensor, s: float, i: int) -> torch.Tensor:
    return torch.empty_like(x)


_LIB = torch.library.Library("swa_bench", "FRAGMENT")
_LIB.define("noop_lib(Tensor x, Tensor y, float s, int i) -> Tensor")


def _noop_lib(x, y, s, i):
    return torch.empty_like(x)


_LIB.impl("noop_lib", _noop_lib, "CompositeExplicitAutograd")


@triton.jit
def _k16(a, b, c, d, n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, B0: tl.constexpr, B1: tl.constexpr):
    i = tl.program_id(0) * B0 + tl.arange(0, B0)
    tl.store(a + i, tl.load(b + i, mask=i < n0), mask=i < n0)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# {card}, torch {torch.__version__}, triton {triton.__version__}: host µs per call (median)")
    T, H, P, hidden = 32, 128, 64, 7168
    x = torch.randn(T, hidden, device=device, dtype=dtype)
    w = torch.randn(hidden, device=device, dtype=dtype)
    q = torch.randn(T, H, 192, device=device, dtype=dtype)[..., 128:]
    k = torch.randn(T, 576, device=device, dtype=dtype)[:, 512:]
    ang = torch.rand(T, P // 2, device=device) * 100
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    rot = rope_rotation(cos, sin, interleave=True)
    rows = {
        "torch.empty(8)": lambda: torch.empty(8, device=device),
        "x + x (one pointwise op)": lambda: x + x,
        "rope, op by op (q and k)": lambda: (apply_rope(q, cos, sin, True), apply_rope(k, cos, sin, True)),
        "rope, rotate (q and k)": lambda: (rotate(q, rot.heads, rot.index), rotate(k, rot.tokens, rot.index)),
        "rope table, once per step": lambda: rope_rotation(cos, sin, interleave=True),
        "RMSNorm, float32 round trip": lambda: w * F.rms_norm(x.float(), (hidden,), eps=1e-6).to(dtype),
        "RMSNorm, in the model dtype": lambda: w * F.rms_norm(x, (hidden,), eps=1e-6),
        "custom_op (torch.library.custom_op)": lambda: torch.ops.swa_bench.noop_custom(x, w, 1.0, 3),
        "custom op (torch.library.Library)": lambda: torch.ops.swa_bench.noop_lib(x, w, 1.0, 3),
    }
    if device.type == "cuda":
        dst, src = torch.empty(1024, device=device), torch.randn(1024, device=device)
        rows["Triton launch, 16 args"] = lambda: _k16[(4,)](dst, src, dst, src, 1024, 1, 2, 3, 4, 5, 6, 7, 8, 9, 256,
                                                            16)
    print(f"  {'':40s} {'no_grad':>8s} {'inference_mode':>15s}")
    for label, fn in rows.items():
        with torch.no_grad():
            plain = timed(fn, device)
        with torch.inference_mode():
            inference = timed(fn, device)
        print(f"  {label:40s} {plain:8.1f} {inference:15.1f}")
    with torch.no_grad():
        same_rope = [torch.equal(apply_rope(t, cos, sin, il), rotate(t, r.heads if t.dim() == 3 else r.tokens, r.index))
                     for t in (q, k) for il in (True, False) for r in [rope_rotation(cos, sin, il)]]
        same_norm = []
        for dim in (7168, 1536, 512):
            y = torch.randn(T, dim, device=device, dtype=dtype) * 3
            same_norm.append(torch.equal(F.rms_norm(y.float(), (dim,), eps=1e-6).to(dtype),
                                         F.rms_norm(y, (dim,), eps=1e-6)))
    print(f"  same bits: rope {same_rope}, RMSNorm {same_norm}")
    if not all(same_rope + same_norm):
        sys.exit(1)


if __name__ == "__main__":
    main()
