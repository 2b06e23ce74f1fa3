#!/usr/bin/env bash
# One call on a GPU for BENCHMARKS.md (issue 17's MFU target): GPT-2-medium-MoE
# (examples/gpt2-medium-moe.fmoe in the one-GPU layout of .ci/fp8-gpt2-medium-moe-bf16.fmoe,
# with the example's batch of 256 x 1024 tokens a step) at each micro-batch of MICRO_BATCHES
# (default "8 16 32"), in bf16, from the build at $FMOEC (default .dev/fmoec), and from the
# build at $BASELINE where given, each run in its own process, ROUNDS times (default 2)
# alternated; then each "NAME:VAR=VALUE,..." of VARIANTS (e.g. the fusions' switches
# "nonorm:FMOEC_FUSED_NORM=0 nolinear:FMOEC_FUSED_LINEAR=0") at the last micro-batch, and
# (unless FP8=0) fp8 with every expert in FP8 at it; with FP8_DENSE=1 also fp8 as planned (the experts that pay)
# and fp8 with the dense matmuls too (`--precision fp8-dense`, every expert). Each run stops after STEPS metrics lines (default 4);
# tokens/s is the median of the lines after the first (the first holds the CUDA graph's
# capture); MFU is the model's FLOPs per token (`fmoec plan --format json`'s
# model_flops_per_step over the step's tokens) times tokens/s over the GPU's bf16 peak. Peak memory
# is nvidia-smi's, sampled every 100 ms. With TRACE=1 the last bf16 run is traced
# (`--trace`, one step), and with FP8_DENSE=1 the fp8-dense run too. Results under $OUT (default out-gpu).
set -uo pipefail
R="${OUT:-out-gpu}"; mkdir -p "$R"
FMOEC="${FMOEC:-.dev/fmoec}"; BASELINE="${BASELINE:-}"
. "$(dirname "$0")/cuda-libs.sh"
M=/tmp/mfu; rm -rf $M; mkdir -p $M
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/device.txt"
date -u | tee -a "$R/device.txt"
MBS="${MICRO_BATCHES:-8 16 32}"
for mb in $MBS; do
    sed -e "s/micro_batch = 8/micro_batch = $mb/" -e "s/batch      = 16 x 1024 tokens/batch      = 256 x 1024 tokens/" \
        "$(dirname "$0")/fp8-gpt2-medium-moe-bf16.fmoe" > $M/m$mb-bf16.fmoe
    sed "s/precision  = bf16/precision  = fp8/" $M/m$mb-bf16.fmoe > $M/m$mb-fp8.fmoe
    grep -q "micro_batch = $mb" $M/m$mb-bf16.fmoe || { echo "could not set micro_batch $mb"; exit 1; }
done
"$FMOEC" plan $M/m${MBS##* }-bf16.fmoe --memory-model fmoec --format json > $M/plan.json || exit 1
# run NAME BIN FILE [ENV=VALUE...]: one process, STEPS metrics lines, then killed
run() {
    local name=$1 bin=$2 file=$3; shift 3
    local out=$M/run-$name; rm -rf "$out"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > $M/$name.mem &
    local smi=$!
    env "$@" "$bin" run "$file" --device cuda --quiet --out "$out" ${EXTRA:-} > $M/$name.log 2>&1 &
    local pid=$!
    for _ in $(seq 1 60); do
        sleep 1
        [ -f "$out/metrics.jsonl" ] && [ "$(wc -l < "$out/metrics.jsonl")" -ge "${STEPS:-4}" ] && break
        kill -0 $pid 2>/dev/null || break
    done
    kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; kill $smi; wait $smi 2>/dev/null
    python3 - "$name" "$M" <<'PY' | tee -a "$R/mfu.txt"
import json, statistics, sys
n, m = sys.argv[1], sys.argv[2]
try:
    ms = [json.loads(l) for l in open(f"{m}/run-{n}/metrics.jsonl")]
except OSError:
    print(f"{n}: no metrics:", open(f"{m}/{n}.log").read()[-400:].replace("\n", " | ")); sys.exit()
mem = max(int(x) for x in open(f"{m}/{n}.mem").read().split())
tps = statistics.median(x["tokens_per_s"] for x in ms[1:]) if len(ms) > 1 else 0
plan = json.load(open(f"{m}/plan.json"))
flops = plan["time"]["model_flops_per_step"] / (plan["global_batch"] * plan["seq_len"])
mfu = tps * flops / (plan["hardware"]["bf16_tflops"] * 1e12)
print(f"{n}: tokens/s {[round(x['tokens_per_s']) for x in ms]} median {tps:,.0f}  MFU {100 * mfu:.1f}%  "
      f"losses {[round(x['loss'], 4) for x in ms]}  peak {mem} MiB")
PY
}
last=${MBS##* }
for r in $(seq 1 "${ROUNDS:-2}"); do
    for mb in $MBS; do
        [ -n "$BASELINE" ] && run baseline-m$mb-$r "$BASELINE" $M/m$mb-bf16.fmoe
        run new-m$mb-$r "$FMOEC" $M/m$mb-bf16.fmoe
    done
    for v in ${VARIANTS:-}; do
        envs=${v#*:}
        # shellcheck disable=SC2086
        run "${v%%:*}-m$last-$r" "$FMOEC" $M/m$last-bf16.fmoe ${envs//,/ }
    done
done
[ "${FP8:-1}" = 1 ] && run new-m$last-fp8-all-experts "$FMOEC" $M/m$last-fp8.fmoe FMOEC_FP8_EXPERTS=all
if [ "${FP8_DENSE:-0}" = 1 ]; then
    run new-m$last-fp8-as-planned "$FMOEC" $M/m$last-fp8.fmoe
    EXTRA="--precision fp8-dense" run new-m$last-fp8-dense "$FMOEC" $M/m$last-fp8.fmoe FMOEC_FP8_EXPERTS=all
fi
# trace NAME FILE [EXTRA ARGS] [ENV=VALUE...]: one traced step, its summary in trace-summary.txt
trace() {
    local name=$1 file=$2 extra=$3; shift 3
    STEPS=3 EXTRA="--trace $R/trace-$name.json --trace-steps 1 $extra" run trace-$name "$FMOEC" "$file" "$@"
    { echo "== $name"; grep -A45 "^trace" $M/trace-$name.log | head -48; } | tee -a "$R/trace-summary.txt"
}
if [ "${TRACE:-0}" = 1 ]; then
    trace m$last-bf16 $M/m$last-bf16.fmoe ""
    [ "${FP8_DENSE:-0}" = 1 ] && trace m$last-fp8-dense $M/m$last-fp8.fmoe "--precision fp8-dense" FMOEC_FP8_EXPERTS=all
    gzip -f "$R"/*.json
fi
