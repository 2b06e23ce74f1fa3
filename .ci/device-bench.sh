#!/usr/bin/env bash
# GPU measurements for BENCHMARKS.md, run on a CUDA machine from the repository root with
# a CUDA build of fmoec at $FMOEC (default .dev/fmoec): `cargo build --release --features cuda`.
# Writes logs under ${OUT:-out-gpu}. Steps (STEPS, default "check bench tiny e2e"): device
# facts; `check`: the fused kernels against their CPU reference (`fmoec bench moe
# --check-kernels`); `bench`: `fmoec bench moe` (BENCH_ARGS, default `--stages`, e.g. `--shape S3`);
# `tiny`: examples/tiny.fmoe in bf16; `e2e`: GPT-2-medium-MoE on one GPU in bf16 with the GPU's
# peak memory sampled by nvidia-smi, beside the planner's estimate (`--memory-model fmoec`) for the same one-GPU layout
# (E2E_UNFUSED=1 also runs it with the fused kernels off, FMOEC_FUSED=0).
set -uo pipefail
FMOEC="${FMOEC:-.dev/fmoec}"
OUT="${OUT:-out-gpu}"
mkdir -p "$OUT"
. "$(dirname "$0")/cuda-libs.sh"
export NCCL_NVLS_ENABLE=0
steps="${STEPS:-check bench tiny e2e}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"

# Peak of nvidia-smi's memory.used while a command runs (MiB; includes the CUDA context).
with_peak_memory() {
    local log="$1"; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$log.mem" &
    local smi=$!
    "$@"
    local rc=$?
    kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
    echo "peak nvidia-smi memory.used: $(sort -n "$log.mem" | tail -1) MiB" | tee -a "$log"
    return $rc
}

for step in $steps; do
case "$step" in
check)
    "$FMOEC" bench moe --device cuda --check-kernels 2>&1 | tee "$OUT/check.txt"
    ;;
bench)
    # shellcheck disable=SC2086
    "$FMOEC" bench moe --device cuda --iters "${ITERS:-50}" --json "$OUT/bench.json" ${BENCH_ARGS:---stages} \
        2> "$OUT/bench.progress" | tee "$OUT/bench.txt"
    ;;
tiny)
    sed 's/precision  = fp32/precision  = bf16/' examples/tiny.fmoe > /tmp/tiny-bf16.fmoe
    grep -q 'precision  = bf16' /tmp/tiny-bf16.fmoe || { echo "tiny: could not switch to bf16"; exit 1; }
    with_peak_memory "$OUT/tiny.log" "$FMOEC" run /tmp/tiny-bf16.fmoe --device cuda --quiet \
        --out /tmp/run-tiny 2>&1 | tee "$OUT/tiny.log"
    cp /tmp/run-tiny/summary.json "$OUT/tiny-summary.json" 2>/dev/null
    ;;
e2e)
    # the 8-GPU example on one GPU: same model and batch, all experts on the one rank
    python3 - <<'PY'
import re
src = open("examples/gpt2-medium-moe.fmoe").read()
one = re.sub(r"parallel \{.*?\n\}", "parallel {\n    gpus = 1 of h100_sxm\n    tensor = 1\n    pipeline = 1\n    experts = across data\n    micro_batch = 8\n}", src, flags=re.S)
open("/tmp/gpt2-medium-moe-1gpu.fmoe", "w").write(one)
PY
    # the planner's memory for this run, as `fmoec run` keeps it (and Megatron's, for the record)
    "$FMOEC" plan /tmp/gpt2-medium-moe-1gpu.fmoe --memory-model fmoec > "$OUT/e2e-plan.txt" 2>&1
    "$FMOEC" plan /tmp/gpt2-medium-moe-1gpu.fmoe >> "$OUT/e2e-plan.txt" 2>&1
    "$FMOEC" plan /tmp/gpt2-medium-moe-1gpu.fmoe --memory-model fmoec --format json > "$OUT/e2e-plan.json" 2>/dev/null
    with_peak_memory "$OUT/e2e.log" "$FMOEC" run /tmp/gpt2-medium-moe-1gpu.fmoe --device cuda --quiet \
        --stop-after "${E2E_STEPS:-8}" --out /tmp/run-e2e 2>&1 | tee "$OUT/e2e.log"
    cp /tmp/run-e2e/summary.json "$OUT/e2e-summary.json" 2>/dev/null
    cp /tmp/run-e2e/metrics.jsonl "$OUT/e2e-metrics.jsonl" 2>/dev/null
    if [ "${E2E_UNFUSED:-0}" = 1 ]; then
        FMOEC_FUSED=0 with_peak_memory "$OUT/e2e-unfused.log" "$FMOEC" run /tmp/gpt2-medium-moe-1gpu.fmoe \
            --device cuda --quiet --stop-after "${E2E_STEPS:-8}" --out /tmp/run-e2e-unfused 2>&1 | tee "$OUT/e2e-unfused.log"
    fi
    ;;
esac
done
