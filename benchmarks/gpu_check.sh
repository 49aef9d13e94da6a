#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (issue 14 item 7), in under 10 minutes in all:
#
#   1. nvidia-smi, torch / CUDA / cuDNN versions;
#   2. the test suite's GPU-marked tests (`pytest -m gpu tests`: CUDA results equal the CPU ones);
#   3. examples/configs/cifar10.yaml at paper width (ResNet-9, 64-128-256-512) on --trainer.accelerator=gpu,
#      reduced for a bounded time: CIFAR_TRAIN images for CIFAR_EPOCHS epochs, CIFAR_SCORED LOO/test
#      instances, 2 further-training seeds of 1 epoch, LiSSA depth 100 (sizes below, all overridable);
#   4. benchmarks/per_sample_grads.py, influence.py and further_training.py (they have no device option:
#      they measure the CPU side of the machine; influence.py without its LiSSA rows, which alone take
#      minutes, and the further-training one with 20 LOO runs).
#
# Usage (from anywhere; it works in the repository root):
#
#     bash benchmarks/gpu_check.sh              # OUT=gpu_check_out by default
#     OUT=/tmp/check PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#     bash benchmarks/gpu_check.sh --allow-cpu  # no GPU: every step on the CPU at tiny size (smoke test)
#
# Installs nothing beyond the project: without PYTHON it uses .venv/bin/python, made by the Makefile's
# `make .venv/.installed` (the project's pinned dependencies) when missing; that set-up is not counted
# in the time budget. Every output (logs, the CIFAR-10 report and its figures, TensorBoard runs, the
# benchmark tables, summary.md) goes to $OUT. Each step runs under `timeout`; a failing or timed-out
# step is recorded and the later steps still run.
#
# Exit status: 0 all steps passed; 1 the GPU tests failed (or did not run); 2 the GPU tests passed but
# another step failed or timed out; 3 no CUDA device (without --allow-cpu); 64 bad arguments.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

ALLOW_CPU=0
for arg in "$@"; do
    case "$arg" in
        --allow-cpu) ALLOW_CPU=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (try --help)" >&2; exit 64 ;;
    esac
done

cd "$(dirname "$0")/.."
# -- 0. a GPU at all? (seconds, before any set-up or output) ---------------------------------------------
if [[ $ALLOW_CPU -eq 0 ]] && ! command -v nvidia-smi >/dev/null 2>&1 && [[ ! -e /dev/nvidia0 ]]; then
    echo "gpu_check.sh: NO CUDA: no nvidia-smi and no /dev/nvidia0, so this machine has no NVIDIA GPU. Run it on a" >&2
    echo "machine with one, or pass --allow-cpu for a tiny CPU smoke test of the same pipeline." >&2
    exit 3
fi

OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
: >"$LOG"
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# -- the project's environment -------------------------------------------------------------------------
if [[ -z "${PYTHON:-}" ]]; then
    if [[ ! -f .venv/.installed ]]; then
        log "creating .venv with the project's pinned dependencies (make .venv/.installed)"
        make .venv/.installed >>"$LOG" 2>&1
    fi
    PYTHON=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's lightning_fimoda, whatever the venv
log "python: $PYTHON; output folder: $OUT"

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
    if [[ $ALLOW_CPU -eq 0 ]]; then
        log "NO CUDA: torch.cuda.is_available() is False for $PYTHON (a CPU-only torch build, or no driver)."
        log "Pass --allow-cpu for a tiny CPU smoke test of the same pipeline."
        exit 3
    fi
    DEVICE=cpu
else
    DEVICE=cuda
fi
log "device: $DEVICE"

# -- step runner: per-step timeout within the total budget, wall time, status --------------------------
START=$SECONDS
SUMMARY=()
declare -A STATUS=()
step() {  # step NAME LIMIT_SECONDS COMMAND...: output in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_LIMIT - (SECONDS - START)))
    if ((left < 15)); then
        STATUS[$name]=skipped
        SUMMARY+=("| $name | skipped: no time left | 0 |")
        log "$name: skipped, no time left of the ${TOTAL_LIMIT}s budget"
        return 0
    fi
    ((limit > left)) && limit=$left
    local cmd="$*"
    log "$name: start (limit ${limit}s): ${cmd%%$'\n'*}"
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    local took=$((SECONDS - t0)) state
    case $rc in
        0) state=ok ;;
        124|137) state="TIMED OUT after ${limit}s" ;;
        *) state="FAILED (exit $rc)" ;;
    esac
    STATUS[$name]=$state
    SUMMARY+=("| $name | $state | $took |")
    log "$name: $state in ${took}s (log: $OUT/$name.log)"
    if [[ $rc -ne 0 ]]; then tail -n 15 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG"; fi
    return 0
}

# -- sizes and per-step limits (seconds) ----------------------------------------------------------
declare -A LIMIT
if [[ $DEVICE == cuda ]]; then
    ACCEL=gpu
    TOTAL_LIMIT=${TOTAL_LIMIT:-570}  # seconds for steps 1-4 together (setting up .venv is not counted)
    LIMIT=([tests]=150 [cifar10]=210 [psg]=60 [influence]=90 [further]=45)
    CIFAR_TRAIN=${CIFAR_TRAIN:-2000} CIFAR_TEST=${CIFAR_TEST:-200} CIFAR_EPOCHS=${CIFAR_EPOCHS:-4}
    CIFAR_SCORED=${CIFAR_SCORED:-10} CIFAR_WORKERS=${CIFAR_WORKERS:-4} CIFAR_WIDTH=${CIFAR_WIDTH:-"[64, 128, 256, 512]"}
    LISSA="{name: lissa, depth: 100, repeat: 1, batch_size: 256}"
    TRAK="{name: trak, proj_dim: 2048}"
    PSG_ARGS=(--n 927 --repeats 3)
    INF_ARGS=(--sequential-tests 4 --only grad_dot grad_cos datainf cg arnoldi ekfac kfac diagonal trak)
    FT_ARGS=(--loo 20 --naive-runs 3 --repeats 2)
else
    ACCEL=cpu
    TOTAL_LIMIT=${TOTAL_LIMIT:-900}  # a slow shared CPU: the smoke test is not held to 10 minutes
    LIMIT=([tests]=200 [cifar10]=240 [psg]=150 [influence]=200 [further]=120)
    CIFAR_TRAIN=${CIFAR_TRAIN:-64} CIFAR_TEST=${CIFAR_TEST:-16} CIFAR_EPOCHS=${CIFAR_EPOCHS:-1}
    CIFAR_SCORED=${CIFAR_SCORED:-4} CIFAR_WORKERS=${CIFAR_WORKERS:-0} CIFAR_WIDTH=${CIFAR_WIDTH:-"[8, 8, 16, 16]"}
    LISSA="{name: lissa, depth: 5, repeat: 1, batch_size: 16}"
    TRAK="{name: trak, proj_dim: 64}"
    PSG_ARGS=(--n 64 --repeats 1)
    INF_ARGS=(--n-train 100 --n-test 10 --sequential-tests 2 --only grad_dot datainf cg ekfac)
    FT_ARGS=(--loo 4 --naive-runs 2 --repeats 1 --epochs 1)
fi
if [[ -z "${CIFAR_DIR:-}" ]]; then
    if [[ -f ../shared/data/cifar10_subset.npz ]]; then CIFAR_DIR=../shared/data; else CIFAR_DIR=data; fi
fi
DOWNLOAD=false
[[ -f "$CIFAR_DIR/cifar10_subset.npz" ]] || DOWNLOAD=true

# -- 1. environment ---------------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
    step nvidia_smi 20 nvidia-smi
else
    log "nvidia_smi: not available (CPU smoke test)"
fi
step versions 60 "$PYTHON" -c "
import platform, torch, lightning, lightning_fimoda
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA build', torch.version.cuda,
      '| cuDNN', torch.backends.cudnn.version(), '| lightning', lightning.__version__)
print('lightning_fimoda from', lightning_fimoda.__file__)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f'cuda:{i}', p.name, f'{p.total_memory / 2**30:.1f} GiB', f'sm_{p.major}{p.minor}')
"
[[ -f "$OUT/versions.log" ]] && sed 's/^/    /' "$OUT/versions.log" | tee -a "$LOG"

# -- 2. GPU-marked tests ----------------------------------------------------------------------------------
TEST_ENV=()
[[ $DEVICE == cpu ]] && TEST_ENV=(env FIMODA_TEST_DEVICE=cpu)   # the same tests, CPU against CPU
step gpu_tests "${LIMIT[tests]}" "${TEST_ENV[@]}" "$PYTHON" -m pytest -m gpu tests -q -p no:cacheprovider -rs \
    --junitxml="$OUT/gpu_tests.xml"
GPU_TESTS_OK=0
if [[ ${STATUS[gpu_tests]} == ok ]] && grep -q " passed" "$OUT/gpu_tests.log"; then GPU_TESTS_OK=1; fi

# -- 3. CIFAR-10 at paper width, bounded ----------------------------------------------------------------
step cifar10 "${LIMIT[cifar10]}" "$PYTHON" -m lightning_fimoda.cli run examples/configs/cifar10.yaml \
    --trainer.accelerator="$ACCEL" --trainer.max_epochs="$CIFAR_EPOCHS" \
    --trainer.logger.init_args.save_dir="$OUT/runs" \
    --model.init_args.channels="$CIFAR_WIDTH" \
    --data.init_args.data_dir="$CIFAR_DIR" --data.init_args.download="$DOWNLOAD" \
    --data.init_args.max_train="$CIFAR_TRAIN" --data.init_args.max_test="$CIFAR_TEST" \
    --data.init_args.num_workers="$CIFAR_WORKERS" \
    --fimoda.estimators="[grad_dot, grad_cos, $LISSA, $TRAK, ekfac, datainf]" \
    --fimoda.num_train="$CIFAR_SCORED" --fimoda.num_test="$CIFAR_SCORED" \
    --fimoda.output_dir="$OUT/cifar10" \
    --fimoda.gold.seeds=2 --fimoda.gold.epochs=1 --fimoda.gold.run_dir="$OUT/cifar10_gold"

# -- 4. benchmarks (CPU code paths: none of the three has a device option) ------------------------------
step bench_per_sample_grads "${LIMIT[psg]}" "$PYTHON" benchmarks/per_sample_grads.py "${PSG_ARGS[@]}"
step bench_influence "${LIMIT[influence]}" "$PYTHON" benchmarks/influence.py "${INF_ARGS[@]}"
step bench_further_training "${LIMIT[further]}" "$PYTHON" benchmarks/further_training.py "${FT_ARGS[@]}"

# -- summary -----------------------------------------------------------------------------------------------
{
    echo "# gpu_check on $DEVICE ($(date -u +%Y-%m-%dT%H:%MZ)), $((SECONDS - START)) s of ${TOTAL_LIMIT} s"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
} >"$OUT/summary.md"
cat "$OUT/summary.md" | tee -a "$LOG"

if [[ $GPU_TESTS_OK -ne 1 ]]; then
    log "GPU TESTS FAILED or did not run: see $OUT/gpu_tests.log"
    exit 1
fi
for name in "${!STATUS[@]}"; do
    if [[ ${STATUS[$name]} != ok ]]; then
        log "some steps did not pass (see summary.md); the GPU tests passed"
        exit 2
    fi
done
log "all steps passed; outputs in $OUT"
