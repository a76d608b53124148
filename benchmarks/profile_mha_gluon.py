"""Run one MHA prefill block a few times (for ``ncu`` on its attention kernel; issue 18):

    python benchmarks/profile_mha_gluon.py '{"kernel": "gluon"}' 4096 128 128     # config, S, W, H

then e.g. ``ncu --kernel-name regex:gluon_mha --launch-skip 2 --launch-count 1 --set full -o report python …``.
Checks the output against the float64 reference once, so a profiled variant is a correct one."""
import json
import sys

import torch

sys.path[:0] = [".", "tests", "tests/ops"]
from test_mha_prefill import GPU_DIMS, reference_of, run_kernel, setup  # noqa: E402

config, S, W, H = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
s = setup([(0, S)], 64, H, W, 0, packed=True, **GPU_DIMS)
for _ in range(4):
    stats = {}
    out, lse = run_kernel(s, config=config, stats=stats)
torch.cuda.synchronize()
ref_o, _ = reference_of(s)
err = ((out.double() - ref_o).abs().max() / ref_o.abs().max()).item()
print(f"config {config} S={S} W={W} H={H}: kernel {stats.get('kernel')}, max rel err {err:.2e}")
assert err < 5e-3, err
