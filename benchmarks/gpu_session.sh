#!/usr/bin/env bash
# Everything that needs the GPU machine, in one call, logs under $OUT (default ./gpu-out):
#
#   1. the GPU tests (`pytest -m gpu`, every file), with the durations of the slowest;
#   2. the compile benchmark (issue 6): compile time with/without the pass, decode step eager / Inductor /
#      Inductor + CUDA graphs;
#   3. the attention benchmark (issue 4): the variant table (incl. `untiled`, the few-heads prefill kernel
#      before token tiles) and the docs/design.md §10 tables beside FlashMLA when its wheel travelled in `.whl/`.
#
# Usage on the device (repo root, carry `.whl` for FlashMLA), two calls of under 10 minutes each:
#     bash benchmarks/gpu_session.sh tests,compile
#     bash benchmarks/gpu_session.sh attention
# Each step has its own time limit, so one slow step cannot starve the next.
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

[[ $STEPS == *tests* ]] && run gpu-tests 330 python3 -m pytest -q -ra -m gpu --durations=10 -p no:cacheprovider tests
[[ $STEPS == *compile* ]] && run bench-compile 230 python3 benchmarks/bench_compile.py
[[ $STEPS == *attention* ]] && run bench-attention 570 env OUT="$OUT" python3 benchmarks/bench_attention.py \
    --variants base,untiled
exit 0
