#!/usr/bin/env bash
# One call on a Hopper GPU for BENCHMARKS.md (issue 17): where the experts' weight gradients
# take FP8 operands and where the layer's bf16 ones (`plan::cost::fp8_weight_gradient`). The
# kernel checks; the FP8 layers at 128, 1024 and 4096 rows an expert (F0, S1-T512, S1-T4096,
# S3; S1 in round 2) with the planner's choice (auto) and with every weight gradient on FP8
# operands (all, FMOEC_FP8_WEIGHT_GRADS=all), alternating processes, ROUNDS times (default 2);
# GPT-2-medium-MoE at micro-batch 32 (.ci/fp8-gpt2-medium-moe-bf16.fmoe, 256 x 1024 tokens a
# step) in bf16 and with its experts forced into FP8, weight gradients as planned and on FP8;
# then (unless ACCURACY=0) 300 steps of the small-batch GPT-2-medium-MoE in bf16 and fp8
# (.ci/device-fp8-accuracy.sh, experts forced). Needs the CUDA build at $FMOEC (default
# .dev/fmoec). Results under $OUT (default out-wgrad): layers.txt, e2e.txt, accuracy.txt and
# the accuracy PNG, few files (the device tool brings back only a handful).
set -uo pipefail
cd "$(dirname "$0")/.."
R="${OUT:-out-wgrad}"; mkdir -p "$R"
F="${FMOEC:-.dev/fmoec}"
. .ci/cuda-libs.sh
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader | tee "$R/layers.txt"
date -u | tee -a "$R/layers.txt"
el check
"$F" bench moe --device cuda --check-kernels > /tmp/wgrad-check.txt 2>&1
echo "check exit $?: $(grep -c " ok" /tmp/wgrad-check.txt) ok, $(grep -ciE "fail" /tmp/wgrad-check.txt) failing" | tee -a "$R/layers.txt"
grep -E "FAIL|experts grad w vs f64" /tmp/wgrad-check.txt | tee -a "$R/layers.txt"
el layers
for r in $(seq 1 "${ROUNDS:-2}"); do
  for mode in auto all; do
    shapes="--shape F0 --shape S1-T512 --shape S1-T4096 --shape S3"; [ "$r" = 2 ] && shapes="$shapes --shape S1"
    wg=; [ $mode = all ] && wg=all
    FMOEC_FP8_WEIGHT_GRADS=$wg timeout 150 "$F" bench moe --device cuda --dtype fp8 --iters 30 --warmup 3 $shapes \
      --routing balanced --impl fmoec --impl fmoec-fp8 --impl ops > /tmp/wgrad-$mode.txt 2>/tmp/wgrad-$mode.err
    echo "== $mode, round $r (exit $?) $(date -u +%T)" | tee -a "$R/layers.txt"
    tail -2 /tmp/wgrad-$mode.err >> "$R/layers.txt"
    grep -E "^(F0|S3|S1)|weight gradients on" /tmp/wgrad-$mode.txt >> "$R/layers.txt"
    # shape, activation, fp8 ms, x ops, x fmoec bf16
    grep -E "^(F0|S3|S1)" /tmp/wgrad-$mode.txt | grep fmoec-fp8 | awk '{print "  ", $1, $2, $7, $14, $15}'
  done
done
el e2e
M=/tmp/wgrad-models; mkdir -p $M
python3 - "$M" <<'PY'
import sys
m = sys.argv[1]
src = open(".ci/fp8-gpt2-medium-moe-bf16.fmoe").read()
one = src.replace("micro_batch = 8", "micro_batch = 32").replace("batch      = 16 x 1024 tokens", "batch      = 256 x 1024 tokens")
assert one != src
open(f"{m}/gpt2-m32-bf16.fmoe", "w").write(one)
open(f"{m}/gpt2-m32-fp8.fmoe", "w").write(one.replace("precision  = bf16", "precision  = fp8"))
PY
# e2e NAME FILE [ENV=VALUE...]: one process, 6 metrics lines, then killed
e2e() {
    local name=$1 file=$2; shift 2
    local out=/tmp/wgrad-run-$name; rm -rf $out
    env "$@" "$F" run "$file" --device cuda --quiet --out $out > /tmp/wgrad-$name.log 2>&1 &
    local pid=$!
    for _ in $(seq 1 45); do
        sleep 1
        [ -f $out/metrics.jsonl ] && [ "$(wc -l < $out/metrics.jsonl)" -ge 6 ] && break
        kill -0 $pid 2>/dev/null || break
    done
    kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
    python3 - "$name" "$out" <<'PY' | tee -a "$R/e2e.txt"
import json, statistics, sys
n, out = sys.argv[1], sys.argv[2]
try:
    ms = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
except OSError:
    print(n, "no metrics"); sys.exit()
med = statistics.median(m["tokens_per_s"] for m in ms[1:]) if len(ms) > 1 else 0
print(f"{n}: {len(ms)} steps, tokens/s median of 2+: {med:,.0f}; losses {[round(m['loss'], 4) for m in ms[:3]]}")
PY
    grep -E "note: precision" /tmp/wgrad-$name.log | cut -c1-240 | tee -a "$R/e2e.txt"
}
e2e gpt2-bf16 $M/gpt2-m32-bf16.fmoe
e2e gpt2-fp8 $M/gpt2-m32-fp8.fmoe FMOEC_FP8_EXPERTS=all
e2e gpt2-fp8-wgrad-fp8 $M/gpt2-m32-fp8.fmoe FMOEC_FP8_EXPERTS=all FMOEC_FP8_WEIGHT_GRADS=all
if [ "${ACCURACY:-1}" = 1 ]; then
    el accuracy
    OUT=/tmp/wgrad-acc FMOEC="$F" MODEL=gpt2-medium-moe FMOEC_ENV="FMOEC_FP8_EXPERTS=all" \
        timeout 200 bash .ci/device-fp8-accuracy.sh > /tmp/wgrad-acc.log 2>&1
    echo "accuracy exit $?"
    tail -15 /tmp/wgrad-acc.log | tee "$R/accuracy.txt"
    cp /tmp/wgrad-acc/*.png "$R/" 2>/dev/null
fi
el done
