#!/usr/bin/env bash
# The prepared GPU check (issues 12 and 24): run it FIRST whenever a session has a CUDA GPU lent.
#
#   bash benchmarks/gpu_check.sh            # CUDA: at most its budget, 330 s by default (5.5 min)
#   bash benchmarks/gpu_check.sh --smoke    # CPU, tiny random CLIP: proves the orchestration only
#
# Budget: every step within $PERPEFT_GPU_CHECK_BUDGET_S seconds of wall clock (default 330: with a machine's
# start of a few minutes the check fits a 15-minute device allowance with room to run it again), 10 s of
# them kept for the report. Give the device call a timeout of the budget plus about 30 s. Each step runs
# under its own `timeout`. Its planned limit (below, for the default budget; scaled with another) is what it
# may count on: the limits add up to the budget less the report's 10 s. A step that ends early leaves its
# unused seconds to the next ones: a step may take whatever the planned limits of the steps after it do not
# need, up to twice its own (the last, "the rest", takes all that is left); a step with under 15 s for it
# is skipped (skipped-budget). The plan, most valuable first:
#   env               15  device, driver, versions (benchmarks/gpu/env_check.py)
#   kernel-tests      45  tests/kernels with PERPEFT_KERNELS=triton, compiled Triton on CUDA tensors (a fresh
#                         TRITON_CACHE_DIR: the count of compiled kernels proves the real compiler ran);
#                         test_compile*.py (offline sm_80/sm_90 builds, no GPU needed) is left to the CPU suite
#   compile           90  perpeft-engine train in one process on the demo, E1 = E2 = 1, --compile on (SASRec
#                         compiled with inductor, from a cold cache)
#   sync              30  the engine's train_epoch (progress on) under torch.cuda.set_sync_debug_mode, for LoRA,
#                         (IA)3 and IISAN PerPEFT (C = 8) batches, mixed-group LoRA batches, Frozen MM and
#                         w/o MM: a sync inside a training step fails the step (benchmarks/gpu/sync_check.py)
#   nccl-ws2          40  perpeft-engine train --nproc 2 (torchrun, NCCL, DDP) on the demo, E1 = E2 = 1, with
#                         two GPUs or more; with one it is nccl-ws1 (--nproc 1: world size 1, so every
#                         collective returns early, and the report says the collectives were not exercised)
#   train             40  one Global PEFT and one PerPEFT epoch at Arts scale, random ViT-B/32, bf16; each stage
#                         times 5 s of steps after warm-up and extrapolates the epoch unless it finished
#   embed             30  per-group item tables, 18,884 items x 8 groups, random ViT-B/32, bf16 (goal < 10 s)
#   encoder-compile   30  a grouped-encoder LoRA training step (64 items, C = 8 mixed, bf16, CLIP of ViT-B/32's
#                         widths with 2 layers per tower) eager, then torch.compile'd whole (inductor, fullgraph,
#                         its own cold cache): first-step compile time, ms per step each way, graphs compiled
#                         (benchmarks/gpu/encoder_compile_check.py); last before the rest, so it gets the slack
#   cuda-benchmarks rest  pytest benchmarks/test_*.py with CUDA tests, -k cuda --benchmark-enable: the time left
#
# Nothing is written only at the end. Each step's output streams to logs/NAME.log as it comes (and to this
# console, each line prefixed [NAME]); the Python steps save steps/NAME.json after every figure (written
# atomically, `complete` false until the step ends); the kernel tests and the benchmarks write one JSON line
# per finished test (kernel-tests.jsonl, benchmarks.jsonl: benchmarks/gpu/pytest_lines.py); on its limit's
# SIGTERM every Python process of a step prints its threads' stacks into the log before it ends. The report
# (gpu-check.json, gpu-check.md: benchmarks/gpu/report.py) is rebuilt from whatever is there after every
# step, every 15 s while one runs, and when this script is stopped (SIGTERM, SIGINT, SIGHUP: the running step
# is stopped and recorded as timeout with its partial figures), so the folder is always consistent. The
# plan (step, planned limit) is printed first and kept in plan.tsv and gpu-check.json.
#
# Results: $PERPEFT_GPU_CHECK_OUT, else $OUT (the device machine's return folder), else
# benchmarks/results/gpu-check/: gpu-check.json (the plan, every figure with the device name, each step's
# status), gpu-check.md (the same as tables), plan.tsv, status.tsv, env.json, steps/*.json, logs/*.log,
# kernel-tests.jsonl, kernel-tests.xml, kernel-tests.cubins, benchmarks.jsonl, benchmarks.json. Scratch
# files (caches, run directories) go to a temporary directory, removed at exit.
#
# Exit status: 0 when every step passed; 1 when any failed, timed out or was skipped for the budget, or when
# the script was stopped; 2 without a CUDA GPU (checked first, before anything expensive).
#
# Sourced (`source benchmarks/gpu_check.sh --smoke`), it sets up and defines its functions without running
# the check (tests/benchmarks_gpu drive plan_step, run_step and write_report that way).
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

GPUS=0
if (( ! SMOKE )); then
    GPUS="$("$PY" -m benchmarks.gpu.env_check --cuda-only | tail -n 1)" || exit 2
    [[ $GPUS =~ ^[0-9]+$ ]] || GPUS=1
fi

START=$(date +%s)
BUDGET_S="${PERPEFT_GPU_CHECK_BUDGET_S:-330}"
if ! [[ $BUDGET_S =~ ^[0-9]+$ ]]; then
    echo "gpu_check: PERPEFT_GPU_CHECK_BUDGET_S must be whole seconds, not '$BUDGET_S'" >&2
    exit 2
fi
REPORT_RESERVE_S=10
BASE_STEPS_S=320 # the planned limits below add up to this: the default budget less the report's reserve
MIN_STEP_S=15
KILL_AFTER_S=5 # after its limit's SIGTERM a step has this long before SIGKILL
REFRESH_S=15   # the report is rebuilt this often while a step runs
SLACK_FACTOR=2 # a planned step takes at most this many times its planned limit from the time left
RESULTS="${PERPEFT_GPU_CHECK_OUT:-${OUT:-benchmarks/results/gpu-check}}"
if (( SMOKE )); then
    RESULTS="${PERPEFT_GPU_CHECK_OUT:-${TMPDIR:-/tmp}/perpeft-gpu-check-smoke}"
fi
for stale in steps logs plan.tsv status.tsv env.json kernel-tests.xml kernel-tests.jsonl kernel-tests.cubins \
    benchmarks.json benchmarks.jsonl gpu-check.json gpu-check.md; do
    rm -rf "${RESULTS:?}/$stale"
done
mkdir -p "$RESULTS/steps" "$RESULTS/logs" || exit 1
RESULTS="$(cd "$RESULTS" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/perpeft-gpu-check.XXXXXX")" || exit 1
export PERPEFT_CACHE="$WORK/cache" TRITON_CACHE_DIR="$WORK/triton-cache" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
STATUS="$RESULTS/status.tsv"
SMOKE_FLAG=()
(( SMOKE )) && SMOKE_FLAG=(--smoke)
NPROC=1
(( GPUS >= 2 )) && NPROC=2
NCCL_STEP="nccl-ws$NPROC"

ORDER=()          # the plan's steps, in order
declare -A PLANNED=() # step -> planned limit (s); 0: whatever time is left
declare -A BEGUN=()   # steps started, run or skipped
CURRENT_STEP="" STEP_PID="" STEP_LIMIT=0 STEP_START=0 STEP_START_MS=0 REFRESH_PID=""

now_ms() { date +%s%3N; }

# scaled S: a planned limit for the default budget, scaled to this one.
scaled() {
    local seconds=$(( $1 * (BUDGET_S - REPORT_RESERVE_S) / BASE_STEPS_S ))
    echo $(( seconds > 0 ? seconds : 0 ))
}

# plan_step NAME LIMIT_S: add a step to the plan (LIMIT_S 0: it gets whatever time is left).
plan_step() { ORDER+=("$1"); PLANNED[$1]=$2; }

# write_plan: plan.tsv, and the plan on the console.
write_plan() {
    local name line="gpu_check: plan (budget ${BUDGET_S} s, ${REPORT_RESERVE_S} s of it for the report):"
    : > "$RESULTS/plan.tsv"
    for name in "${ORDER[@]}"; do
        printf '%s\t%s\n' "$name" "${PLANNED[$name]}" >> "$RESULTS/plan.tsv"
        if (( PLANNED[$name] > 0 )); then line+=" $name ${PLANNED[$name]} s,"; else line+=" $name (the rest),"; fi
    done
    echo "${line%,}"
}

# still_planned NAME: the planned seconds of the steps not begun yet, NAME's own left out.
still_planned() {
    local name total=0
    for name in "${ORDER[@]}"; do
        [[ $name == "$1" || -n ${BEGUN[$name]+x} ]] && continue
        total=$(( total + PLANNED[$name] ))
    done
    echo "$total"
}

# record NAME STATUS RC SECONDS LIMIT: a status row (the report reads the last row of each step).
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${STEP_START:-$(date +%s)}" >> "$STATUS"; }

# write_report [report options]: rebuild gpu-check.json and gpu-check.md from what is there now.
write_report() {
    "$PY" -m benchmarks.gpu.report "$RESULTS" --start-unix "$START" --budget-s "$BUDGET_S" \
        ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"} "$@"
}

# console NAME: a step's output on the console, each line prefixed [NAME] (unless it is already), blank
# lines dropped, a progress bar's redrawn line shown in its last state.
console() {
    local tag="[$1]"
    sed -u -e 's/.*\r//' -e '/^[[:space:]]*$/d' -e "/^\\[$1\\]/!s/^/$tag /"
}

# wait_for PID SECONDS: wait at most SECONDS for PID (not necessarily a child) to end.
wait_for() {
    local deadline=$(( $(now_ms) + $2 * 1000 ))
    while kill -0 "$1" 2>/dev/null && (( $(now_ms) < deadline )); do sleep 0.1; done
}

after_step() {
    if [[ $1 == kernel-tests ]]; then
        find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l > "$RESULTS/kernel-tests.cubins"
    fi
}

# run_step NAME COMMAND...: run under `timeout` with the step's limit (see the header), its output streamed
# to logs/NAME.log and the console; record its status and rebuild the report.
run_step() {
    local name=$1
    shift
    BEGUN[$name]=1
    local planned=${PLANNED[$name]:-0}
    local left=$(( START + BUDGET_S - REPORT_RESERVE_S - $(date +%s) ))
    local limit=$(( left - $(still_planned "$name") ))
    (( planned > 0 && limit > SLACK_FACTOR * planned )) && limit=$(( SLACK_FACTOR * planned ))
    (( limit < planned )) && limit=$planned
    (( limit > left )) && limit=$left
    STEP_START=$(date +%s)
    if (( limit < MIN_STEP_S )); then
        record "$name" skipped-budget 0 0 0
        echo "== $name: skipped (${limit} s for it, ${left} s of the budget left)"
        write_report --quiet
        return
    fi
    echo "== $name (limit ${limit} s, planned ${planned} s)"
    local log="$RESULTS/logs/$name.log" out tee_pid rc
    record "$name" running -1 0 "$limit"
    # The log and the console survive a SIGTERM to this script's process group: they end when the step does.
    exec {out}> >(trap '' TERM INT HUP; tee -a "$log" | console "$name")
    tee_pid=$!
    STEP_START_MS=$(now_ms) STEP_LIMIT=$limit CURRENT_STEP=$name
    timeout --kill-after="$KILL_AFTER_S" "$limit" "$@" >&"$out" 2>&1 &
    STEP_PID=$!
    wait "$STEP_PID"
    rc=$?
    exec {out}>&-
    wait_for "$tee_pid" 2
    end_step "$name" "$rc"
}

# end_step NAME RC [STATUS]: record how a step ended and rebuild the report.
end_step() {
    local status=${3:-}
    if [[ -z $status ]]; then
        case $2 in
            0) status=passed ;;
            124 | 137) status=timeout ;;
            *) status=failed ;;
        esac
    fi
    local seconds
    seconds=$(awk -v ms=$(( $(now_ms) - STEP_START_MS )) 'BEGIN { printf "%.1f", ms / 1000 }')
    record "$1" "$status" "$2" "$seconds" "$STEP_LIMIT"
    CURRENT_STEP="" STEP_PID=""
    after_step "$1"
    echo "== $1: $status (exit $2, ${seconds} s)"
    write_report --quiet
}

# skip_step NAME: a GPU-only step of a smoke run.
skip_step() {
    BEGUN[$1]=1
    STEP_START=$(date +%s)
    record "$1" skipped-smoke 0 0 0
    echo "== $1: skipped (smoke run)"
}

# start_refresher: one process that rewrites the report every REFRESH_S seconds (it ends on SIGTERM, or by
# itself once this script is gone); stop_refresher ends it before the final report.
start_refresher() {
    ( exec "$PY" -m benchmarks.gpu.report "$RESULTS" --start-unix "$START" --budget-s "$BUDGET_S" \
        ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"} --every "$REFRESH_S" ) > /dev/null 2>&1 &
    REFRESH_PID=$!
}

stop_refresher() {
    if [[ -n $REFRESH_PID ]]; then
        kill "$REFRESH_PID" 2>/dev/null
        wait "$REFRESH_PID" 2>/dev/null
        REFRESH_PID=""
    fi
}

# on_signal NAME: this script was told to stop (the device call's timeout, Ctrl-C): record the running step
# as timed out, with whatever it measured, stop it, and leave a final report.
on_signal() {
    trap '' TERM INT HUP
    echo "gpu_check: stopped by SIG$1" >&2
    stop_refresher
    if [[ -n $CURRENT_STEP ]]; then
        local name=$CURRENT_STEP pid=$STEP_PID
        end_step "$name" 143 timeout
        kill -TERM "$pid" 2>/dev/null # timeout passes it on to the step's processes
        wait_for "$pid" $(( KILL_AFTER_S + 1 ))
        after_step "$name"
    fi
    write_report --final --interrupted "SIG$1"
    echo "results: $RESULTS/gpu-check.md and gpu-check.json"
    exit 1
}

cleanup() {
    stop_refresher
    rm -rf "$WORK"
}

trap cleanup EXIT
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

main() {
    echo "gpu_check: budget ${BUDGET_S} s; results in $RESULTS; scratch in $WORK"
    plan_step env "$(scaled 15)"
    plan_step kernel-tests "$(scaled 45)"
    plan_step compile "$(scaled 90)"
    plan_step sync "$(scaled 30)"
    plan_step "$NCCL_STEP" "$(scaled 40)"
    plan_step train "$(scaled 40)"
    plan_step embed "$(scaled 30)"
    plan_step encoder-compile "$(scaled 30)"
    plan_step cuda-benchmarks 0
    write_plan
    write_report --quiet
    start_refresher

    run_step env "$PY" -m benchmarks.gpu.env_check --out "$RESULTS/env.json" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
    importable() { "$PY" -c "import perpeft.engine, perpeft.kernels, perpeft.cli" 2>/dev/null; }
    if ! importable; then
        # Offline, no dependency resolution: torch and the rest must already be installed on the machine.
        PLANNED[install]=60 # not in the plan: it takes its time from the later steps
        run_step install "$PY" -m pip install --no-deps --no-index --no-build-isolation -e .
        if ! importable; then
            # No usable pip/setuptools: the package's layout (perpeft.engine = engine/, ...) by symlinks.
            mkdir -p "$WORK/shim/perpeft" && touch "$WORK/shim/perpeft/__init__.py"
            for part in engine kernels cli; do ln -sfn "$PWD/$part" "$WORK/shim/perpeft/$part"; done
            export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
            importable && echo "== install: perpeft imported from $WORK/shim (symlinks to this checkout)"
        fi
    fi

    local lines=(-p no:cacheprovider -p benchmarks.gpu.pytest_lines)
    if (( SMOKE )); then
        # Interpreted Triton, one test: proves the JSON lines, the XML and their report.
        run_step kernel-tests "$PY" -m pytest tests/kernels/test_specialization.py -v -k keys_tell_layers_apart \
            "${lines[@]}" --lines-out="$RESULTS/kernel-tests.jsonl" --junitxml="$RESULTS/kernel-tests.xml"
        skip_step compile
    else
        run_step kernel-tests env PERPEFT_KERNELS=triton PERPEFT_KERNEL_TESTS_DEVICE=cuda \
            "$PY" -m pytest tests/kernels -v --ignore-glob='tests/kernels/test_compile*' \
            "${lines[@]}" --lines-out="$RESULTS/kernel-tests.jsonl" --junitxml="$RESULTS/kernel-tests.xml"
        run_step compile "$PY" -m benchmarks.gpu.cli_check --nproc 0 --compile on --work "$WORK/compile" \
            --name compile --out "$RESULTS/steps/compile.json"
    fi
    run_step sync "$PY" -m benchmarks.gpu.sync_check --out "$RESULTS/steps/sync.json" \
        ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
    run_step "$NCCL_STEP" "$PY" -m benchmarks.gpu.cli_check --nproc "$NPROC" --work "$WORK/nccl" \
        --name "$NCCL_STEP" --out "$RESULTS/steps/$NCCL_STEP.json" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
    run_step train "$PY" -m benchmarks.gpu.train_check --stage-seconds 5 --out "$RESULTS/steps/train.json" \
        ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
    run_step embed "$PY" -m benchmarks.gpu.embed_check --second-pass-below 6 --out "$RESULTS/steps/embed.json" \
        ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
    run_step encoder-compile env TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-encoder" \
        "$PY" -m benchmarks.gpu.encoder_compile_check --out "$RESULTS/steps/encoder-compile.json" \
        ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"}
    local benches=()
    mapfile -t benches < <(grep -l -E 'def test_[A-Za-z0-9_]*cuda' benchmarks/test_*.py)
    if (( ${#benches[@]} )); then
        # Without CUDA (smoke) the CUDA benchmarks skip themselves: that proves their JSON lines and report.
        run_step cuda-benchmarks "$PY" -m pytest "${benches[@]}" -k cuda -q --benchmark-enable \
            "${lines[@]}" --lines-out="$RESULTS/benchmarks.jsonl" --benchmark-json="$RESULTS/benchmarks.json"
    else
        run_step cuda-benchmarks bash -c 'echo "no benchmarks/test_*.py defines a test_*cuda*" >&2; exit 1'
    fi

    stop_refresher
    write_report --final
    local rc=$?
    echo "results: $RESULTS/gpu-check.md and gpu-check.json"
    return $rc
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main
    exit $?
fi
