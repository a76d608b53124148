"""Every Triton kernel compiles for Hopper (sm_90) — checked ahead of time on the CPU, so CI catches type
and layout errors that the interpreter lets through (e.g. an fp16 × bf16 dot)."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).with_name("hopper_compile.py")
KERNELS = ("_write_kv_cache_kernel", "_write_fp8_cache_kernel", "_dequantize_fp8_cache_kernel", "_swa_indexer_kernel",
           "_mla_attention_fwd_kernel", "_combine_splits_kernel", "_stage_windows_kernel",
           "_paged_tiles_fwd_kernel", "_gluon_decode_kernel")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the GPU tests compile and run every kernel")
def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[2]), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    compiled = [line for line in out.stdout.splitlines() if line.startswith("compiled ")]
    for name in KERNELS:
        assert any(name in line for line in compiled), f"{name} was never compiled:\n{out.stdout}"
    assert any("BLOCK_H=16" in line for line in compiled)   # the small-head variant too
