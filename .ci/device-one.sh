#!/usr/bin/env bash
# One call on a GPU machine for BENCHMARKS.md (what the "session 3" to "session 5" figures came
# from): the fused kernels' checks, `fmoec bench moe` (fmoec and ops rows, stages), the
# GPT-2-medium-MoE example on one GPU in bf16, replayed as a CUDA graph and op by op
# (tokens/s per step, peak nvidia-smi memory; beside a baseline binary in the same call when
# BASE is set, and with the cast cache when CAST=1),
# with MFU (the planner's FLOPs per token) and the planner's memory beside the measured peak,
# the peers (.ci/device-peers.sh: PyTorch's grouped-mm path and FastMoE, built on spare
# cores meanwhile) with .ci/side-by-side.py, and Nsight Compute kernel durations of the
# end-to-end step (.ci/ncu-summary.py reads them). Needs the CUDA build at $FMOEC (default
# .dev/fmoec); for the peers FastMoE's source at .dev/peers/fastmoe and the dm-tree wheel in
# .whl/ (carry .dev and .whl). STEPS (default "check bench e2e peers profile") picks steps,
# "multi" adds two 2-GPU runs (needs 2 GPUs);
# E2E_STEPS (default 5) steps of 256 x 1024 tokens each end-to-end run (the run is stopped
# after them, so no 15 GB checkpoint is written). Results under $OUT.
set -uo pipefail
R="${OUT:-out-gpu}"; G=/tmp/gpu; rm -rf $G; mkdir -p "$R" $G/bench $G/peers $G/e2e
FMOEC="${FMOEC:-.dev/fmoec}"
steps="${STEPS:-check bench e2e peers profile}"
export NCCL_NVLS_ENABLE=0
. "$(dirname "$0")/cuda-libs.sh"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/device.txt"; date -u | tee -a "$R/device.txt"
has() { [[ " $steps " == *" $1 "* ]]; }
if has peers; then
    (PEERS_BUILD_ONLY=1 OUT=$G/peers taskset -c 4-15 nice -n 19 bash .ci/device-peers.sh > $G/fm-build.txt 2>&1) &
    BUILD=$!
fi
if has check; then
    el "check"
    taskset -c 0-3 "$FMOEC" bench moe --device cuda --check-kernels > $G/check.txt 2>&1
    echo "check exit $?: ok $(grep -c ' ok$' $G/check.txt) failed $(grep -c FAILED $G/check.txt)"
    grep FAILED $G/check.txt | head -5
    cp $G/check.txt "$R/"
fi
if has bench; then
    el "bench"
    taskset -c 0-3 "$FMOEC" bench moe --device cuda --impl fmoec --impl ops --stages --json $G/bench/bench.json \
        > $G/bench/bench.txt 2> $G/bench/bench.progress
    cp $G/bench/bench.txt $G/bench/bench.json "$R/"
fi
python3 - <<'PY'
import re
src = open("examples/gpt2-medium-moe.fmoe").read()
one = re.sub(r"parallel \{.*?\n\}", "parallel {\n    gpus = 1 of h100_sxm\n    tensor = 1\n    pipeline = 1\n    experts = across data\n    micro_batch = 8\n}", src, flags=re.S)
open("/tmp/e2e.fmoe", "w").write(one)
PY
# e2e NAME BINARY [ARGS]: E2E_STEPS steps, then the run is killed; tokens/s per step and peak memory
e2e() {
    local out=/tmp/run-$1; rm -rf $out
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > $G/e2e/$1.mem &
    local smi=$!
    "$2" run "${E2E_FILE:-/tmp/e2e.fmoe}" --device cuda --quiet --out $out "${@:3}" > $G/e2e/$1.log 2>&1 &
    local pid=$!
    for _ in $(seq 1 300); do
        sleep 1
        [ -f $out/metrics.jsonl ] && [ "$(wc -l < $out/metrics.jsonl)" -ge "${E2E_STEPS:-5}" ] && break
        kill -0 $pid 2>/dev/null || break
    done
    kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; kill $smi; wait $smi 2>/dev/null
    if ! cp $out/metrics.jsonl $G/e2e/$1.metrics.jsonl 2>/dev/null; then
        echo "$1: no metrics; the run said:" | tee -a "$R/e2e.txt"
        grep -v '^frame' $G/e2e/$1.log | head -c 1500 | tee -a "$R/e2e.txt"
        return
    fi
    python3 - "$1" <<'PY' | tee -a "$R/e2e.txt"
import json, statistics, sys
n = sys.argv[1]
ms = [json.loads(l) for l in open(f"/tmp/gpu/e2e/{n}.metrics.jsonl")]
mem = max(int(x) for x in open(f"/tmp/gpu/e2e/{n}.mem").read().split())
med = statistics.median(m["tokens_per_s"] for m in ms[1:])
plan = json.load(open("/tmp/e2e-plan.json"))
flops = plan["time"]["model_flops_per_step"] / (plan["global_batch"] * plan["seq_len"])
planned = plan["ranks"][0]["memory_bytes"] / 2**20
print(n, "tokens/s per step:", [round(m["tokens_per_s"]) for m in ms], "median of steps 2+:", round(med),
      f"MFU {100 * med * flops / (plan['world'] * plan['hardware']['bf16_tflops'] * 1e12):.1f}%",
      f"({flops:.4g} FLOPs/token, {plan['hardware']['bf16_tflops']} TFLOP/s);",
      "losses:", [round(m["loss"], 4) for m in ms],
      f"peak nvidia-smi {mem} MiB, planner (--memory-model fmoec) {planned:.0f} MiB ({100 * (planned / mem - 1):+.1f}%)")
PY
}
if has e2e; then
    "$FMOEC" plan /tmp/e2e.fmoe --memory-model fmoec --format json > /tmp/e2e-plan.json
    el "e2e (CUDA graph)"; e2e fmoec "$FMOEC"
    el "e2e op by op"; e2e eager "$FMOEC" --no-cuda-graph
    if [ -n "${BASE:-}" ]; then el "e2e baseline $BASE"; e2e base "$BASE"; fi
    if [ -n "${CAST:-}" ]; then
        el "e2e with the cast cache"; export FMOEC_CAST_CACHE=1; e2e cache "$FMOEC"; unset FMOEC_CAST_CACHE
    fi
    el "e2e again (CUDA graph)"; e2e fmoec2 "$FMOEC"
    grep -h "warning\|error" $G/e2e/*.log | sort | uniq -c | head -5
fi
if has multi; then
    # two GPUs, one process each (NCCL): data 2 with the experts across it, and tensor 2 with
    # sliced experts; the planner's figures are for the 2-GPU layout
    sed 's/gpus = 1 of h100_sxm/gpus = 2 of h100_sxm/' /tmp/e2e.fmoe > /tmp/e2e-2.fmoe
    "$FMOEC" plan /tmp/e2e-2.fmoe --tensor 1 --memory-model fmoec --format json > /tmp/e2e-plan.json
    el "2 GPUs, data 2"; E2E_FILE=/tmp/e2e-2.fmoe e2e data2 "$FMOEC" --gpus 2 --tensor 1
    "$FMOEC" plan /tmp/e2e-2.fmoe --tensor 2 --memory-model fmoec --format json > /tmp/e2e-plan.json
    el "2 GPUs, tensor 2"; E2E_FILE=/tmp/e2e-2.fmoe e2e tensor2 "$FMOEC" --gpus 2 --tensor 2
    grep -h "warning\|error" $G/e2e/data2.log $G/e2e/tensor2.log | sort | uniq -c | head -5
fi
if has peers; then
    el "wait for the FastMoE build"; wait $BUILD; tail -1 $G/fm-build.txt
    el "peers"
    OUT=$G/peers timeout 170 bash .ci/device-peers.sh > $G/peers.log 2>&1
    tail -2 $G/peers.log
    cp $G/peers/peers.json $G/peers/peers.txt "$R/" 2>/dev/null
    [ -f $G/bench/bench.json ] && python3 .ci/side-by-side.py $G/bench/bench.json $G/peers/peers.json > "$R/side-by-side.md" 2>&1
fi
if has profile; then
    # two micro-batches a step; 4000 kernels after the first 2000 cover one micro-batch
    el "kernel durations of the end-to-end step (ncu)"
    sed 's/256 x 1024 tokens/16 x 1024 tokens/' /tmp/e2e.fmoe > /tmp/e2e-small.fmoe
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
    timeout 170 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --log-file $G/ncu-e2e.csv \
        --launch-skip 2000 --launch-count 4000 "$FMOEC" run /tmp/e2e-small.fmoe --device cuda --quiet --stop-after 2 \
        --out /tmp/e2e-prof > $G/ncu-e2e.log 2>&1
    echo "ncu exit $?"
    python3 .ci/ncu-summary.py $G/ncu-e2e.csv | tee "$R/ncu-summary.txt"
    gzip -f $G/ncu-e2e.csv
fi
el "done"
tar czf "$R/gpu.tgz" -C $G .
