"""Where a Triton launch's host time goes (issue 14): the Gluon FP8 window kernel, the cache write and the split
combine launched through ``JITFunction.__getitem__`` and through each layer below it, beside PyTorch ops for the
host's speed.

    PYTHONPATH=. python benchmarks/bench_launch.py          # CUDA only (the interpreter has no launcher)

Layers of a launch (Triton 3.6): ``kernel[grid](*args)`` → ``JITFunction.run``: the binder (the arguments'
specialisation), the cache key, the compiled kernel's ``run`` (``CudaLauncher``: for a kernel with TMA descriptor
arguments a Python wrapper builds each ``CUtensorMap`` per call) → the C launcher. Each row times one layer down with
what the layers above computed held fixed; host µs per call, median of batches of un-synchronised calls.
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_host  # noqa: E402


def host_us(fn, iters: int = 400) -> float:
    return bench_host.host_us(fn, iters, torch.device("cuda"))


def layers(name: str, jit_fn, grid, args: tuple, kwargs: dict) -> dict:
    """The host µs of ``jit_fn[grid](*args, **kwargs)`` and of each layer below it."""
    from triton.runtime import driver

    grid = tuple(grid) + (1,) * (3 - len(grid))
    compiled = jit_fn[grid](*args, **kwargs)
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    binder = jit_fn.device_caches[device][4]
    bound, _, _ = binder(*args, **kwargs)
    values = tuple(bound.values())
    run = compiled.run
    from swa_rewrite.kernels.launch import launch

    launch(jit_fn, grid, *args, **kwargs)
    rows = {
        "kernel[grid](...)": lambda: jit_fn[grid](*args, **kwargs),
        "swa_rewrite.kernels.launch.launch(...)": lambda: launch(jit_fn, grid, *args, **kwargs),
        "  device + stream query": lambda: driver.active.get_current_stream(driver.active.get_current_device()),
        "  binder (specialisation)": lambda: binder(*args, **kwargs),
        "  compiled.run (launcher object)": lambda: run(grid[0], grid[1], grid[2], stream, compiled.function,
                                                        compiled.packed_metadata, None, None, None, *values),
    }
    raw = None
    inner = getattr(run, "launch", None)
    for cell in getattr(inner, "__closure__", None) or ():
        if type(cell.cell_contents).__name__ == "builtin_function_or_method":
            raw = cell.cell_contents
    if raw is not None and not run.global_scratch_size:   # descriptors: the C launcher, CUtensorMaps made once
        from triton.backends.nvidia import driver as nv

        sig = compiled.src.signature
        metas = getattr(compiled.metadata, "tensordesc_meta", None) or []
        final, k = [], 0
        for i, (key, ty) in enumerate(sig.items()):
            if isinstance(ty, str) and ty.startswith("tensordesc"):
                final.extend(nv.make_tensordesc_arg(values[i], metas[k] if metas else None))
                k += 1
            else:
                final.append(values[i])
        final = tuple(final)
        rows["  C launcher, tensor maps made once"] = lambda: raw(
            grid[0], grid[1], grid[2], stream, compiled.function, run.launch_cooperative_grid, run.launch_pdl,
            None, None, compiled.packed_metadata, None, None, None, *final)
    elif inner is not None and raw is None:
        rows["  C launcher"] = lambda: inner(grid[0], grid[1], grid[2], stream, compiled.function,
                                             run.launch_cooperative_grid, run.launch_pdl, None, None,
                                             compiled.packed_metadata, None, None, None, *values)
    out = {}
    for label, fn in rows.items():
        try:
            out[label] = host_us(fn)
        except Exception as e:  # a layer this Triton does not have: say so, time the others
            out[label] = f"{type(e).__name__}: {str(e)[:80]}"
    print(f"\n## {name}: {len(args)} arguments")
    for label, v in out.items():
        print(f"  {label:40s} {v:8.1f}" if isinstance(v, float) else f"  {label:40s} {v}")
    return out


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_launch.py needs CUDA")
    import triton

    from swa_rewrite.kernels import gluon_mla, paged_mla
    from swa_rewrite.kernels._common import split_targets
    from swa_rewrite.kernels.kv_cache import _write_kv_cache_kernel

    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    x = torch.zeros(64, device=dev)
    a = torch.randn(64, 64, device=dev, dtype=torch.bfloat16)
    print("## PyTorch ops, host µs per call")
    for label, fn in {"torch.empty(8)": lambda: torch.empty(8, device=dev), "x.add_(1)": lambda: x.add_(1),
                      "torch.mm 64x64 bf16": lambda: torch.mm(a, a),
                      "F.rms_norm [32, 7168]": (lambda t=torch.randn(32, 7168, device=dev, dtype=torch.bfloat16):
                                                torch.nn.functional.rms_norm(t, (7168,)))}.items():
        print(f"  {label:40s} {host_us(fn):8.1f}")

    T, H, R, P, ps, ctx = 32, 128, 512, 64, 64, 4096
    nb = -(-(ctx + 1) // ps)
    cu = torch.arange(T + 1, dtype=torch.int32, device=dev)
    dec = torch.full((T,), ctx, dtype=torch.int32, device=dev)
    bid = torch.arange(T, dtype=torch.int32, device=dev)
    bt = torch.arange(T * nb, dtype=torch.int32, device=dev).view(T, nb)
    q = torch.randn(T, H, R + P, device=dev, dtype=torch.bfloat16)
    if gluon_mla.supports(q, torch.empty(1, ps, 656, dtype=torch.uint8, device=dev), P, 128, True):
        cache8 = torch.randint(0, 100, (T * nb, ps, 656), dtype=torch.uint8, device=dev)
        out = (torch.empty(T, H, R, dtype=q.dtype, device=dev), torch.empty(T, H, device=dev))
        o_t, l_t, o_s, l_s = split_targets(*out, 1)
        descs = gluon_mla._remembered("fp8", cache8, R, P, gluon_mla.fp8_descriptors)
        args = (q, *descs, bt, cu, dec, bid, o_t, l_t, 0.07, H, 128, ps, 1, q.stride(0), q.stride(1), bt.stride(0),
                *o_s, *l_s)
        kw = dict(R=R, P=P, BLOCK_H=gluon_mla.BLOCK_H, BLOCK_N=gluon_mla.BLOCK_N, NBUF=2, PARTIAL=False, num_warps=8,
                  maxnreg=168)
        whole = host_us(lambda: gluon_mla.launch_fp8(q, cache8, bt, cu, dec, bid, 0.07, 128, o_t, l_t, o_s, l_s, 1))
        print(f"\n  gluon_mla.launch_fp8 (whole wrapper): {whole:.1f}")
        layers("Gluon FP8 window kernel (3 TMA descriptors)", gluon_mla._gluon_swa_fp8_kernel,
               (T * triton.cdiv(H, gluon_mla.BLOCK_H), 1), args, kw)
        o_t2, l_t2, o_s2, l_s2 = split_targets(*out, 2)
        layers("split combine", paged_mla._combine_splits_kernel, (T, triton.cdiv(H, 16)),
               (o_t2, l_t2, out[0], out[1], H, 2, *o_s2, *l_s2, out[0].stride(0), out[0].stride(1), out[1].stride(0)),
               dict(R=R, BLOCK_R=512, BLOCK_H=16, INTERPRET=False, num_warps=4))
    cache = torch.empty(T * nb, ps, R + P, dtype=torch.bfloat16, device=dev)
    lat = torch.randn(T, R + P, dtype=torch.bfloat16, device=dev)
    slots = torch.arange(T, dtype=torch.int64, device=dev) * ps
    layers("cache write (write_kv_cache)", _write_kv_cache_kernel, (triton.cdiv(T, 8),),
           (lat, cache, slots, T, R + P, ps, lat.stride(0), cache.stride(0), cache.stride(1)),
           dict(BLOCK_T=8, BLOCK_D=128, num_warps=4))

if __name__ == "__main__":
    main()
