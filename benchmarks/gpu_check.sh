#!/usr/bin/env bash
# The prepared GPU check (issue 12, goal 4): run it FIRST whenever a session has a CUDA GPU lent.
#
#   bash benchmarks/gpu_check.sh            # on a machine with one CUDA GPU; about 5-7 minutes, < 8
#   bash benchmarks/gpu_check.sh --smoke    # CPU, tiny random CLIP: proves the orchestration only
#
# Steps, in order, each under its own `timeout` and all under one wall-clock budget (default 465 s,
# $PERPEFT_GPU_CHECK_BUDGET_S): a step that fails or times out is recorded and the next one runs; a step
# that no longer fits the budget is recorded as skipped-budget.
#   env              device, driver, versions (benchmarks/gpu/env_check.py)
#   kernel-tests     tests/kernels with PERPEFT_KERNELS=triton, compiled Triton on CUDA tensors (a fresh
#                    TRITON_CACHE_DIR: the count of compiled kernels proves the real compiler ran);
#                    test_compile*.py (offline sm_80/sm_90 builds, no GPU needed) is left to the CPU suite
#   cuda-benchmarks  pytest benchmarks -k cuda --benchmark-enable (encoder, kernels, Arts item tables)
#   embed            per-group item tables, 18,884 items x 8 groups, random ViT-B/32, bf16 (goal < 10 s)
#   train            one Global PEFT and one PerPEFT epoch at Arts scale, random ViT-B/32, bf16; each
#                    stage times 30 s of steps after warm-up and extrapolates the epoch unless it finished
#   sync             training step under torch.cuda.set_sync_debug_mode: the grouped path must not sync
#   nccl-ws1         perpeft-engine train --nproc 1 (torchrun, NCCL, DDP) on the demo, E1 = E2 = 1
#   compile          only if >= 90 s of budget are left: the same run in one process, --compile on
#                    (SASRec compiled on CUDA); its failure or timeout counts like any other step's
#
# Results: $PERPEFT_GPU_CHECK_OUT, else $OUT (the device machine's return folder), else
# benchmarks/results/gpu-check/ — gpu-check.json (every figure with the device name, each step's
# status), gpu-check.md (the same as tables), env.json, steps/*.json, logs/*.log, kernel-tests.xml,
# benchmarks.json. Scratch files (caches, run directories) go to a temporary directory, removed at exit.
#
# Exit status: 0 when every step passed; 1 when any failed, timed out or was skipped for the budget;
# 2 without a CUDA GPU (checked first, before anything expensive).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY="${PYTHON:-python}"
SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then
    SMOKE=1
elif [[ $# -gt 0 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh [--smoke]" >&2
    exit 2
fi

if (( ! SMOKE )); then
    "$PY" -m benchmarks.gpu.env_check --cuda-only || exit 2
fi

START=$(date +%s)
BUDGET_S="${PERPEFT_GPU_CHECK_BUDGET_S:-465}"
REPORT_RESERVE_S=10
MIN_STEP_S=15
RESULTS="${PERPEFT_GPU_CHECK_OUT:-${OUT:-benchmarks/results/gpu-check}}"
if (( SMOKE )); then
    RESULTS="${PERPEFT_GPU_CHECK_OUT:-${TMPDIR:-/tmp}/perpeft-gpu-check-smoke}"
fi
for stale in steps logs status.tsv env.json kernel-tests.xml kernel-tests.cubins benchmarks.json gpu-check.json gpu-check.md; do
    rm -rf "${RESULTS:?}/$stale"
done
mkdir -p "$RESULTS/steps" "$RESULTS/logs" || exit 1
RESULTS="$(cd "$RESULTS" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/perpeft-gpu-check.XXXXXX")" || exit 1
trap 'rm -rf "$WORK"' EXIT
export PERPEFT_CACHE="$WORK/cache" TRITON_CACHE_DIR="$WORK/triton-cache" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
STATUS="$RESULTS/status.tsv"
echo "gpu_check: budget ${BUDGET_S} s; results in $RESULTS; scratch in $WORK"
SMOKE_FLAG=()
(( SMOKE )) && SMOKE_FLAG=(--smoke)

now_ms() { date +%s%3N; }

# run_step NAME LIMIT_S COMMAND...: run under `timeout` (clamped to the budget left), log, record status.
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( START + BUDGET_S - REPORT_RESERVE_S - $(date +%s) ))
    if (( left < MIN_STEP_S )); then
        printf '%s\tskipped-budget\t0\t0\t0\n' "$name" >> "$STATUS"
        echo "== $name: skipped (${left} s of the budget left)"
        return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit} s)"
    local started rc status
    started=$(now_ms)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/logs/$name.log" | grep -v -e '^\s*$' | tail -n 40
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=passed ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" \
        "$(awk -v ms=$(( $(now_ms) - started )) 'BEGIN { printf "%.1f", ms / 1000 }')" "$limit" >> "$STATUS"
    echo "== $name: $status (exit $rc)"
}

skip_step() { printf '%s\tskipped-smoke\t0\t0\t0\n' "$1" >> "$STATUS"; echo "== $1: skipped (smoke run)"; }

run_step env 60 "$PY" -m benchmarks.gpu.env_check --out "$RESULTS/env.json" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
importable() { "$PY" -c "import perpeft.engine, perpeft.kernels, perpeft.cli" 2>/dev/null; }
if ! importable; then
    # Offline, no dependency resolution: torch and the rest must already be installed on the machine.
    run_step install 90 "$PY" -m pip install --no-deps --no-index --no-build-isolation -e .
    if ! importable; then
        # No usable pip/setuptools: the package's layout (perpeft.engine = engine/, ...) by symlinks.
        mkdir -p "$WORK/shim/perpeft" && touch "$WORK/shim/perpeft/__init__.py"
        for part in engine kernels cli; do ln -sfn "$PWD/$part" "$WORK/shim/perpeft/$part"; done
        export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
        importable && echo "== install: perpeft imported from $WORK/shim (symlinks to this checkout)"
    fi
fi

if (( SMOKE )); then
    skip_step kernel-tests
    skip_step cuda-benchmarks
else
    run_step kernel-tests 90 env PERPEFT_KERNELS=triton PERPEFT_KERNEL_TESTS_DEVICE=cuda \
        "$PY" -m pytest tests/kernels -v -p no:cacheprovider --ignore-glob='tests/kernels/test_compile*' \
        --junitxml="$RESULTS/kernel-tests.xml"
    find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l > "$RESULTS/kernel-tests.cubins"
    run_step cuda-benchmarks 80 "$PY" -m pytest benchmarks/test_*.py -k cuda -p no:cacheprovider --benchmark-enable \
        --benchmark-json="$RESULTS/benchmarks.json" --continue-on-collection-errors -q
fi
run_step embed 60 "$PY" -m benchmarks.gpu.embed_check --out "$RESULTS/steps/embed.json" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
run_step train 130 "$PY" -m benchmarks.gpu.train_check --out "$RESULTS/steps/train.json" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
run_step sync 60 "$PY" -m benchmarks.gpu.sync_check --out "$RESULTS/steps/sync.json" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
run_step nccl-ws1 75 "$PY" -m benchmarks.gpu.cli_check --nproc 1 --work "$WORK/nccl" \
    --out "$RESULTS/steps/nccl-ws1.json" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
if (( SMOKE )); then
    skip_step compile
elif (( START + BUDGET_S - REPORT_RESERVE_S - $(date +%s) >= 90 )); then
    run_step compile 90 "$PY" -m benchmarks.gpu.cli_check --nproc 0 --compile on --work "$WORK/compile" \
        --out "$RESULTS/steps/compile.json" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
fi

"$PY" -m benchmarks.gpu.report "$RESULTS" --started "$(date -u -d "@$START" +%Y-%m-%dT%H:%M:%SZ)" \
    --total-s "$(( $(date +%s) - START ))" --budget-s "$BUDGET_S" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
rc=$?
echo "results: $RESULTS/gpu-check.md and gpu-check.json"
exit $rc
