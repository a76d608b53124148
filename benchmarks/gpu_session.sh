#!/usr/bin/env bash
# Everything that needs the GPU machine, logs under $OUT (default ./gpu-out). Steps (comma-separated):
#
#   tests       the whole GPU suite (`pytest -m gpu`) — over 6 minutes on an H200: prefer the halves below
#   tests-ops   GPU tests under tests/ops but the attention kernels' files
#   tests-ops2  the attention kernels' files (MHA prefill, MLA core, paged and sparse MLA)
#   tests-rest  every other GPU test
#   new         the GPU tests written without a GPU (FlashMLA backend, MHA prefill, the step's sync count,
#               CUDA-graph decode): run these first in a session
#   train       train the reference model (issue 15; ~3.5 min), checkpoint + log tarred into $OUT/reference.tgz
#   compile     bench_compile.py: both models eager / eager+checks / eager+graphs / Inductor / Inductor + graphs
#   e2e         `swa-rewrite bench` (original and rewritten, our kernels and FlashMLA's) at 4K/32K/128K
#   capacity    `swa-rewrite bench --capacity` (60 GiB KV budget, 32K and 128K)
#   mha         bench_mha_prefill.py --quick (issue 18)
#   host        bench_host.py: host µs of each op an eager decode step calls, checks off and on (issue 14)
#   host-pieces bench_host_pieces.py: host µs of one op, rope and RMSNorm forms, custom-op registrations, a launch
#   host-modes  the model-op GPU tests, host-pieces, then bench_host.py under no_grad and under inference_mode
#   host-profile  bench_host.py --cprofile: the Python functions with the most own host time, per step and per op
#   attention   bench_attention.py (issue 17)
#   gluon       the Gluon kernels' GPU tests (the ping-pong variant and the default choice first: never run yet),
#               then their variants beside FlashMLA (issue 17)
#   mha-gluon   the persistent MHA window kernels' GPU tests (Gluon and Triton: never run yet), then
#               bench_mha_prefill.py --quick with them beside the default configs and FlashMLA (issue 18)
#   verify      every GPU test of code not yet run on a GPU (the ping-pong decode, the persistent MHA kernels,
#               the engine's one-copy step), in one call (~4 min); then gluon-bench and mha-bench:
#   gluon-bench / mha-bench   the two benchmarks of `gluon` / `mha-gluon` alone
#   mha-sweep   bench_mha_prefill.py's whole sweep (H × W × C, the default kernel rule) for the MHA / MQA rule
#   mha-tests   every GPU test of the MHA prefill and the core op (after a change of their defaults)
#   host-verify the GPU tests of session 12's host-path changes not yet run (the FP8 write's kernel-set finite
#               flag, compile, FlashMLA backend, sinks, indexer, bounded tables, validated step), then bench_host.py
#               and its split sweep (issue 14)
#   checks      bench_checks_gpu.py at 32K and 4K (checked mode's cost per eager step, the finite flags' share) and
#               bench_launch.py (a Triton launch's host time, layer by layer) (issue 14)
#   mha-rule    the MHA prefill GPU tests, then the issue shapes (Triton / Gluon / the default rule beside FlashMLA)
#               and a sweep over W = 128 … 1024 at two chunk lengths for the default's window threshold (issue 18)
#   dispatch    the ops' GPU tests through the dispatcher (every op's CUDA kernel registered directly, session 16:
#               cache writes, FP8, indexer, the cores, paged and SWA MQA ops, compile, CUDA graphs; ~4 min), then
#               bench_compile.py every mode (issue 14)
#   launch      kernels.launch's direct relaunch: its GPU tests and those of every kernel it launches (cache writes,
#               CUDA graphs, the checked step, the Gluon decode tiles), bench_launch.py, bench_checks_gpu.py at 32K
#               (with the kernel[grid] A/B row) (issue 14)
#   cppwrap     the backend's C++-wrapper default on CUDA (session 17): the compile and CUDA-graph runtime GPU tests
#               (~4 min with the C++ compiles), then bench_compile.py every mode, the Python wrapper beside it (issue 14)
#   fused       the model's one-launch norm / rope / latent kernels (session 18): their GPU tests, then bench_compile.py
#               eager beside eager-op-by-op (best of 5) (issue 14)
#   plans       the ops' decode plans, the residual folded into the next norm and the one-launch silu_mul (session 19):
#               their GPU tests and those of the code they touch, then bench_compile.py eager beside eager-no-plans and
#               eager-op-by-op (best of 5) (issue 14)
#   engine      the engine's GPU tests, bench_engine.py (decode steps as the engine runs them: eager / overlap / graphs,
#               both models) at 4K and 32K, at 4K with a cProfile of each model's eager engine steps, and the engine's
#               own host time a step (--host-only, stub models) at 32K and 128K (issue 14)
#   stacked     the stacked projections (session 22: q_a / kv_a and gate / up as one GEMM each): the GPU tests of the
#               model ops, the models and the decode plans, then bench_compile.py eager and eager + graphs (issue 14)
#
# Usage on the device (repo root, carry `.whl` for FlashMLA), calls of under 10 minutes each, e.g.:
#     bash benchmarks/gpu_session.sh new
#     bash benchmarks/gpu_session.sh train
# Each step has its own time limit, so one slow step cannot starve the next. The device returns at most 8 files
# from $OUT: a run that writes more (a checkpoint, plots) should tar them into one.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
STEPS=${1:-tests,compile}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    python3 -c "import flash_mla" 2>/dev/null && echo "FlashMLA: present" || echo "FlashMLA: absent"
    date -u
} | tee "$OUT/machine.txt"

run() {   # run NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc"
    tail -n 25 "$OUT/$name.log"
}

has() { [[ ",$STEPS," == *",$1,"* ]]; }
has tests && run gpu-tests 560 python3 -m pytest -q -ra -m gpu --durations=10 -p no:cacheprovider tests
# (tests/ops in two steps: the whole directory ran past 560 s in session 11.)
has tests-ops && run gpu-tests-ops 560 python3 -m pytest -q -ra -m gpu -p no:cacheprovider \
    $(ls tests/ops/test_*.py | grep -v -e test_mha_prefill -e test_mla_core -e test_paged_mla -e test_sparse_mla)
has tests-ops2 && run gpu-tests-ops2 560 python3 -m pytest -q -ra -m gpu -p no:cacheprovider \
    tests/ops/test_mha_prefill.py tests/ops/test_mla_core.py tests/ops/test_paged_mla_attention.py \
    tests/ops/test_paged_mla_tiles.py tests/ops/test_sparse_mla_attention.py
has tests-rest && run gpu-tests-rest 400 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/cli \
    tests/kernels tests/models tests/passes tests/runtime tests/reference tests/eval tests/test_compile.py \
    tests/test_timing.py tests/test_fp8_format.py tests/test_schedule.py
has new && run gpu-tests-new 560 python3 -m pytest -q -rs -m gpu -p no:cacheprovider \
    tests/ops/test_flashmla_backend.py tests/ops/test_mha_prefill.py tests/ops/test_mla_core.py tests/ops/test_validated_step.py \
    tests/runtime/test_cuda_graphs.py tests/runtime/test_bounded_cache.py tests/test_compile.py
has train && run train 300 env PYTHONUNBUFFERED=1 python3 -m swa_rewrite.reference.train --time-limit-s 260 \
    --out /tmp/reference && tar czf "$OUT/reference.tgz" -C /tmp reference
has compile && run bench-compile 560 python3 benchmarks/bench_compile.py --modes eager,eager+checks,eager+graphs,inductor,inductor+graphs --profile
has e2e && run bench-e2e 560 python3 -m swa_rewrite bench --config v3-attn --no-progress
has capacity && run bench-capacity 300 python3 -m swa_rewrite bench --capacity --config v3-attn --skip-freq 4 \
    --window 4096 --contexts 32768,131072 --budget 60 --unbounded --no-progress
has mha && run bench-mha 560 env OUT="$OUT" python3 benchmarks/bench_mha_prefill.py --quick
has host && run bench-host 300 python3 benchmarks/bench_host.py
has host-pieces && run host-pieces 120 python3 benchmarks/bench_host_pieces.py
has host-modes && run model-ops-tests 120 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/models/test_model_ops.py
has host-modes && run host-pieces 120 python3 benchmarks/bench_host_pieces.py
has host-modes && run bench-host 200 python3 benchmarks/bench_host.py
has host-modes && run bench-host-inference 200 python3 benchmarks/bench_host.py --inference-mode
has host-profile && run host-profile 300 python3 benchmarks/bench_host.py --cprofile 100
has attention && run bench-attention 570 env OUT="$OUT" python3 benchmarks/bench_attention.py --variants base,untiled
has gluon && run gluon-tests 200 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/ops/test_paged_mla_tiles.py \
    -k "gluon or default_on_hopper"
has gluon && run bench-gluon 300 env OUT="$OUT" python3 benchmarks/bench_attention.py --skip-tables \
    --dense-variants gluon-ws,gluon-pp,gluon-pp-overlap --dense-heads 128,64 --swa-variants generic,gluon --swa-heads 128
has mha-gluon && run mha-gluon-tests 150 python3 -m pytest -q -ra -m gpu -p no:cacheprovider \
    tests/ops/test_mha_prefill.py -k "persistent or gluon"
has mha-gluon && run bench-mha-gluon 420 env OUT="$OUT" python3 benchmarks/bench_mha_prefill.py --quick \
    --configs base,ptr,pers2,pers2s1,gluon,gluon-n2q1,gluon-n128
# (Three runs, each with its own limit: a kernel that hangs costs its own run, not the others'.)
has verify && run verify-sync 90 python3 -m pytest -q -ra -m gpu -p no:cacheprovider \
    tests/ops/test_validated_step.py -k "synchronises or copies_to_the_host"
has verify && run verify-mha 150 python3 -m pytest -q -ra -m gpu -p no:cacheprovider \
    tests/ops/test_mha_prefill.py -k "persistent or gluon"
has verify && run verify-decode 150 python3 -m pytest -q -ra -m gpu -p no:cacheprovider \
    tests/ops/test_paged_mla_tiles.py -k "gluon or default_on_hopper"
has gluon-bench && run bench-gluon 300 env OUT="$OUT" python3 benchmarks/bench_attention.py --skip-tables \
    --dense-variants gluon-ws,gluon-pp,gluon-pp-overlap --dense-heads 128,64 --swa-variants generic,gluon --swa-heads 128
has mha-bench && run bench-mha-gluon 450 env OUT="$OUT" python3 benchmarks/bench_mha_prefill.py --quick \
    --configs base,ptr,pers2,pers2s1,gluon,gluon-n2q1,gluon-n128
has mha-rule && run mha-rule-tests 200 python3 -m pytest -q -ra -m gpu -p no:cacheprovider \
    tests/ops/test_mha_prefill.py -k "gluon or default or persistent or configs or poison"
has mha-rule && run bench-mha-rule 330 env OUT="$OUT" python3 benchmarks/bench_mha_prefill.py --quick \
    --configs base,gluon,gluon-n4q1,auto
has mha-rule && mv "$OUT/bench_mha_prefill.jsonl" "$OUT/bench_mha_issue.jsonl" 2>/dev/null
has mha-rule && run bench-mha-sweep 300 env OUT="$OUT" python3 benchmarks/bench_mha_prefill.py --skip-issue \
    --heads 128,64,16 --windows 128,256,512,1024 --chunks 512,4096 --sweep-configs base,gluon --reps 3
has mha-sweep && run bench-mha-full-sweep 580 env OUT="$OUT" python3 benchmarks/bench_mha_prefill.py --skip-issue \
    --sweep-configs auto --reps 3
has mha-tests && run mha-tests 560 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/ops/test_mha_prefill.py \
    tests/ops/test_mla_core.py
has host-verify && run host-verify-tests 420 python3 -m pytest -q -ra -m gpu -p no:cacheprovider \
    tests/ops/test_fp8_cache.py tests/test_compile.py tests/ops/test_flashmla_backend.py tests/ops/test_swa_sinks.py \
    tests/ops/test_swa_indexer.py tests/ops/test_bounded_tables.py tests/ops/test_no_host_sync.py tests/ops/test_validated_step.py
has host-verify && run bench-host 120 python3 benchmarks/bench_host.py
has host-verify && run bench-host-splits 60 python3 benchmarks/bench_host.py --swa-splits
has checks && run bench-checks-32k 150 python3 benchmarks/bench_checks_gpu.py --context 32768
has checks && run bench-checks-4k 150 python3 benchmarks/bench_checks_gpu.py --context 4096
has checks && run bench-launch 90 python3 benchmarks/bench_launch.py
has dispatch && run dispatch-tests 330 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/ops/test_kv_cache.py \
    tests/ops/test_fp8_cache.py tests/ops/test_swa_indexer.py tests/ops/test_mla_core.py tests/ops/test_paged_mla_attention.py \
    tests/ops/test_validated_step.py tests/ops/test_inference_only.py tests/test_compile.py tests/runtime/test_cuda_graphs.py
has dispatch && run bench-compile 250 python3 benchmarks/bench_compile.py --modes eager,eager+checks,eager+graphs,inductor,inductor+graphs
has cppwrap && run cppwrap-tests 300 python3 -m pytest -q -ra -m gpu --durations=8 -p no:cacheprovider \
    tests/test_compile.py tests/runtime/test_cuda_graphs.py
has cppwrap && run bench-compile 290 python3 benchmarks/bench_compile.py \
    --modes eager,eager+checks,eager+graphs,inductor,inductor-py,inductor+graphs
has fused && run fused-tests 120 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/models/test_fused_model_ops.py \
    tests/models/test_model_ops.py
has fused && run bench-compile-fused 250 python3 benchmarks/bench_compile.py --modes eager,eager-op-by-op --trials 5
has plans && run plans-tests 330 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/ops/test_decode_plans.py \
    tests/kernels/test_launch.py tests/models/test_fused_model_ops.py tests/models/test_model_ops.py \
    tests/ops/test_mla_core.py tests/ops/test_validated_step.py tests/ops/test_no_host_sync.py tests/runtime/test_cuda_graphs.py
has plans && run bench-compile-plans 260 python3 benchmarks/bench_compile.py --modes eager,eager-no-plans,eager-op-by-op \
    --trials 5
has launch && run launch-tests 300 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/kernels/test_launch.py \
    tests/ops/test_kv_cache.py tests/ops/test_fp8_cache.py tests/runtime/test_cuda_graphs.py tests/ops/test_validated_step.py
has launch && run launch-tiles 330 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/ops/test_paged_mla_tiles.py \
    -k "gluon or default_on_hopper or remembered or split"
has launch && run bench-launch 90 python3 benchmarks/bench_launch.py
has launch && run bench-checks-32k 200 python3 benchmarks/bench_checks_gpu.py --context 32768
has engine && run engine-tests 300 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/runtime \
    tests/ops/test_decode_plans.py tests/ops/test_validated_step.py
has engine && run bench-engine 330 python3 benchmarks/bench_engine.py
has engine && run bench-engine-profile 200 python3 benchmarks/bench_engine.py --contexts 4096 --modes eager,graphs \
    --trials 1 --profile eager --profile-rows 40
has engine && run bench-engine-host 120 python3 benchmarks/bench_engine.py --host-only --contexts 32768,131072
has stacked && run stacked-tests 240 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/models \
    tests/ops/test_decode_plans.py
has stacked && run bench-compile-stacked 200 python3 benchmarks/bench_compile.py --modes eager,eager+graphs --trials 3
exit 0
