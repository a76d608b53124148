"""Compile every Triton kernel for Hopper (sm_90) without a GPU: run the launchers on CPU tensors with the
kernels' ``run`` replaced by an ahead-of-time ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``.

Run as a script (``TRITON_INTERPRET`` must be unset, so the kernels are real ``JITFunction``s); prints one
line per compiled kernel variant and exits non-zero if any fails. ``test_hopper_compile.py`` runs it.
``--resources`` adds each variant's registers, spill bytes and shared memory (``ptxas -v`` on the PTX,
Triton's own report): the compiler's resource report, without a GPU.
"""

import contextlib
import io
import os
import re
import sys
import traceback

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET for an AOT compile"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

try:
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402
except ImportError:  # pragma: no cover
    TensorDescriptor = None
try:  # Gluon kernels (issue 17): their own AST source and descriptors with a shared-memory layout
    from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor  # noqa: E402
except ImportError:  # pragma: no cover
    GluonASTSource = GluonDescriptor = None

_PTR = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8",
        torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
compiled, failures = [], []
RESOURCES = "--resources" in sys.argv
if RESOURCES:
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"     # a cache hit would skip ptxas and its log


def _type(value):
    if GluonDescriptor is not None and isinstance(value, GluonDescriptor):
        return (f"tensordesc<{_PTR[value.base.dtype]}[{','.join(str(b) for b in value.block_shape)}],"
                f"{value.layout!r}>")
    if TensorDescriptor is not None and isinstance(value, TensorDescriptor):
        return f"tensordesc<{_PTR[value.base.dtype]}[{','.join(str(b) for b in value.block_shape)}]>"
    if isinstance(value, torch.Tensor):
        return "*" + _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type {value!r}")


def aot_run(self, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    bound.update({k: v for k, v in options.items() if k in self.arg_names})   # e.g. a Gluon kernel's num_warps
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(self.arg_names):
        value = bound[name] if name in bound else self.params[i].default
        if i in self.constexprs:
            signature[name], constexprs[(i,)] = "constexpr", value
        else:
            signature[name] = _type(value)
            # The JIT's own specialisation: 16-divisible pointers and integers (vector widths depend on it).
            if ((isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0)
                    or (isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0)):
                attrs[(i,)] = [["tt.divisibility", 16]]
    shown = [f"{self.arg_names[i]}={v}" for (i,), v in constexprs.items() if v is not None and v is not False]
    label = f"{self.fn.__name__}({', '.join(shown)})"
    try:
        log = io.StringIO()
        with contextlib.redirect_stdout(log):        # Triton prints its ptxas -v log when asked to
            source = GluonASTSource if getattr(self, "is_gluon", lambda: False)() else ASTSource
            kernel = triton.compile(source(self, signature, constexprs=constexprs, attrs=attrs),
                                    target=GPUTarget("cuda", 90, 32), options=options)
        assert "cubin" in kernel.asm, "no cubin"
        if os.environ.get("HOPPER_PTX_DIR"):          # keep the PTX (e.g. to read a kernel's setmaxnreg split)
            with open(os.path.join(os.environ["HOPPER_PTX_DIR"], f"{len(compiled):03d}-{self.fn.__name__}.ptx"),
                      "w") as f:
                f.write(kernel.asm["ptx"])
        compiled.append(label + (" " + resources(log.getvalue(), kernel) if RESOURCES else ""))
    except Exception:
        failures.append((label, traceback.format_exc(limit=3)))


def resources(report: str, kernel) -> str:
    """``regs=… spill_stores=… spill_loads=… smem=…`` from the ``ptxas -v`` log Triton printed."""
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return (f"regs={regs.group(1) if regs else '?'} spill_stores={spills.group(1) if spills else '?'} "
            f"spill_loads={spills.group(2) if spills else '?'} smem={kernel.metadata.shared}")


JITFunction.run = aot_run


def main():
    from swa_rewrite.kernels import fp8_cache, gathered_mla, kv_cache, paged_mla, sparse_mla, swa_indexer
    from swa_rewrite.ops.fp8_cache import fp8_cache_bytes
    from swa_rewrite.runtime import StepBatch, StepItem

    R, P, H, ps = 512, 64, 128, 64
    D, nbytes = R + P, fp8_cache_bytes(R, P)
    decode = StepBatch.build([StepItem([1], 300, [0, 1, 2, 3, 4, 5], False),
                              StepItem([2], 90, [6, 7], False)], ps)
    prefill = StepBatch.build([StepItem(list(range(40)), 100, [0, 1, 2], True)], ps)
    packed = torch.zeros(8, ps, nbytes, dtype=torch.uint8)
    bf16 = torch.zeros(8, ps, D, dtype=torch.bfloat16)

    kv_cache.write_kv_cache(torch.zeros(4, D, dtype=torch.bfloat16), bf16, torch.arange(4))
    fp8_cache.write_fp8_cache(torch.zeros(4, D, dtype=torch.bfloat16), packed, torch.arange(4), rope_dim=P)
    fp8_cache.write_fp8_cache(torch.zeros(4, D, dtype=torch.bfloat16), packed, torch.arange(4), rope_dim=P,
                              finite_flag=torch.zeros(1, dtype=torch.int32))      # checked: the kernel's own flag
    fp8_cache.dequantize_fp8_cache(packed, torch.empty(8 * ps, D, dtype=torch.bfloat16),
                                   rope_dim=P)
    for b in (decode, prefill):
        m = b.meta                                                           # StepMetadata, one cache group
        T = m.batch_id_per_token.shape[0]
        swa_indexer.swa_indexer(m.block_tables[0], m.cu_seqlens_q, m.seq_lens_decoder, m.batch_id_per_token,
                                torch.empty(T, 1, 128, dtype=torch.int32), torch.empty(T, dtype=torch.int32),
                                window=128, page_size=ps)
        swa_indexer.swa_indexer(m.block_tables[0], m.cu_seqlens_q, m.seq_lens_decoder, m.batch_id_per_token,
                                torch.empty(T, 1, 132, dtype=torch.int32), torch.empty(T, dtype=torch.int32),
                                window=128, page_size=ps, sinks=4)             # attention sinks (issue 13)
        q = torch.zeros(T, H, D, dtype=torch.bfloat16)
        meta = (m.block_tables[0], m.cu_seqlens_q, m.seq_lens_decoder, m.batch_id_per_token, 0.1, P)
        gathered_mla.paged_attention_fwd(q, bf16, *meta, window=0, fp8=False)  # dense paged, gathered (issue 4)
        paged_mla.paged_mla_attention_fwd(q, bf16, *meta)                     # dense default: page tiles, TMA
        for cfg in ({"kernel": "tiles", "tma": False},                       # other page-tile variants (issue 17)
                    {"kernel": "tiles", "tma": True, "chunk": 64, "block_n": 32, "num_stages": 4, "dedup": True}):
            paged_mla.paged_mla_attention_fwd(q, bf16, *meta, config=cfg)
        sparse_mla.swa_attention_fwd(q, packed, *meta, 512, staged=False)     # SWA default, W >= 512: page tiles
        sparse_mla.swa_attention_fwd(q, packed, *meta, 128, staged=False,   # FP8 page tiles, bf16 dequantisation
                                     config={"kernel": "tiles", "tma": True, "bf16_dequant": True})
        sparse_mla.swa_attention_fwd(q, packed, *meta, 128, staged=False)     # SWA, walking the block table
        sparse_mla.swa_attention_fwd(q, packed, *meta, 128, staged=True)      # SWA, staged window union
        sparse_mla.sparse_mla_attention_fwd(q, packed, torch.zeros(T, 1, 128, dtype=torch.int32), 0.1, P)
    # A tensor-parallel shard with few heads takes smaller head blocks and fewer warps (decode), or tiles of
    # adjacent tokens (staged prefill).
    for b in (decode, prefill):
        m = b.meta
        for heads in (16, 1):
            qh = torch.zeros(m.batch_id_per_token.shape[0], heads, D, dtype=torch.bfloat16)
            sparse_mla.swa_attention_fwd(qh, packed, m.block_tables[0], m.cu_seqlens_q, m.seq_lens_decoder,
                                         m.batch_id_per_token, 0.1, P, 128, staged=b is prefill)
    from swa_rewrite.kernels import mha_window     # MHA-mode prefill (issue 18): gather, GEMM, window attention
    m = prefill.meta
    T, N, V = m.batch_id_per_token.shape[0], 128, 128
    slots, rows_cu = torch.arange(100 + 40, dtype=torch.int32), torch.tensor([0, 140], dtype=torch.int32)
    for cfg in ({}, {"tma": False}, {"persistent": 2}, {"persistent": 3, "num_stages": 1}):
        mha_window.mha_swa_prefill_fwd(torch.zeros(T, H, N, dtype=torch.bfloat16),
                                       torch.zeros(T, H, P, dtype=torch.bfloat16),
                                       torch.zeros(H * (N + V), R, dtype=torch.bfloat16), packed, slots, rows_cu,
                                       m.cu_seqlens_q, m.seq_lens_decoder, m.batch_id_per_token, 0.1, 128,
                                       config=cfg)
    from swa_rewrite.kernels import gluon_mha
    if gluon_mha.AVAILABLE:           # the Gluon MHA window kernel (issue 18), its default and smaller rings
        M = 140
        kv = torch.zeros(M, H, N + V, dtype=torch.bfloat16)
        latent = torch.zeros(M, R + P, dtype=torch.bfloat16)
        q = torch.zeros(T, H, N + P, dtype=torch.bfloat16)
        tile_cu = torch.tensor([0, 1], dtype=torch.int32)
        for nbuf, qbuf, block_n, sinks, fast in ((3, 2, 64, 0, True), (3, 2, 64, 4, True), (3, 2, 64, 0, False),
                                                 (2, 1, 64, 0, True), (2, 1, 128, 0, True), (4, 1, 64, 0, True)):
            gluon_mha.launch(q[..., :N], q[..., N:], kv, latent[:, R:], rows_cu, m.cu_seqlens_q, m.seq_lens_decoder,
                             0.1, 128, sinks, torch.empty(T, H, V, dtype=torch.bfloat16), torch.empty(T, H), tile_cu,
                             torch.zeros(2, dtype=torch.int32), nbuf=nbuf, qbuf=qbuf, block_n=block_n,
                             prefetch=fast, tma_out=fast)
    from swa_rewrite.kernels import gluon_mla
    from swa_rewrite.kernels._common import split_targets
    if gluon_mla.AVAILABLE:           # the Gluon dense decode kernel (issue 17): both pipelines, whole and split
        m = decode.meta
        T = m.batch_id_per_token.shape[0]
        q = torch.zeros(T, H, D, dtype=torch.bfloat16)
        out = (torch.empty(T, H, R, dtype=torch.bfloat16), torch.empty(T, H, dtype=torch.float32))
        for splits in (1, 2):
            o_t, l_t, o_strides, l_strides = split_targets(*out, splits)
            for ws in (False, True):
                gluon_mla.launch(q, bf16, m.block_tables[0], m.cu_seqlens_q, m.seq_lens_decoder,
                                 m.batch_id_per_token, 0.1, o_t, l_t, o_strides, l_strides, splits, ws)
            gluon_mla.launch(q, bf16, m.block_tables[0], m.cu_seqlens_q, m.seq_lens_decoder, m.batch_id_per_token,
                             0.1, o_t, l_t, o_strides, l_strides, splits, True, pipeline=True)
            gluon_mla.launch(q, bf16, m.block_tables[0], m.cu_seqlens_q, m.seq_lens_decoder, m.batch_id_per_token,
                             0.1, o_t, l_t, o_strides, l_strides, splits, True, pingpong=True)
            gluon_mla.launch(q, bf16, m.block_tables[0], m.cu_seqlens_q, m.seq_lens_decoder, m.batch_id_per_token,
                             0.1, o_t, l_t, o_strides, l_strides, splits, True, pingpong="overlap")
            gluon_mla.launch_fp8(q, packed, m.block_tables[0], m.cu_seqlens_q, m.seq_lens_decoder,
                                 m.batch_id_per_token, 0.1, 128, o_t, l_t, o_strides, l_strides, splits)
    for label in compiled:
        print("compiled", label[:160] if not RESOURCES else label)
    for label, tb in failures:
        print("FAILED", label[:160], "\n", tb)
    return 1 if failures or not compiled else 0


if __name__ == "__main__":
    sys.exit(main())
