#!/usr/bin/env bash
# One device call on a 4-GPU machine for BENCHMARKS.md (what the 2026-11-28 figures of the
# "four H200" sections came from): tensor parallelism over NCCL (.ci/device-multi.sh step tp),
# examples/gpt2-medium-moe.fmoe on 4 GPUs in its planned layout (tensor 2 x data 2), then on
# GPU 0 the fused kernels' checks, `fmoec bench moe` (fmoec and ops rows) and its peers
# (.ci/device-peers.sh: PyTorch's grouped-mm path and FastMoE, built on the CPUs meanwhile).
# Needs the CUDA build at .dev/fmoec, FastMoE's source at .dev/peers/fastmoe and the dm-tree
# wheel in .whl/ (carry .dev and .whl). Returns text, JSON and two tarballs under $OUT.
set -uo pipefail
R="$OUT"; G=/tmp/gpu; mkdir -p $G/multi $G/bench $G/peers
export NCCL_NVLS_ENABLE=0
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
(PEERS_BUILD_ONLY=1 OUT=$G/peers bash .ci/device-peers.sh > $G/fm-build.txt 2>&1) &
BUILD=$!
el "tp"
OUT=$G/multi FMOEC=.dev/fmoec STEPS=tp timeout 120 bash .ci/device-multi.sh > $G/multi.log 2>&1
pkill -f '.dev/fmoec run' ; sleep 1
cat $G/multi/tp.txt; cp $G/multi/tp.txt $R/
el "gpt2-medium-moe planned layout on 4 GPUs"
. "$(dirname "$0")/cuda-libs.sh"
.dev/fmoec plan examples/gpt2-medium-moe.fmoe --world 4 --memory-model fmoec > $G/multi/t2-plan.txt 2>&1
timeout 120 .dev/fmoec run examples/gpt2-medium-moe.fmoe --gpus 4 --precision bf16 --quiet --stop-after 6 \
    --out /tmp/s4t2 > $G/multi/t2.log 2>&1; echo "exit $?"; tail -8 $G/multi/t2.log
pkill -f '.dev/fmoec run' ; sleep 1
cp /tmp/s4t2/metrics.jsonl $G/multi/t2.metrics.jsonl 2>/dev/null
python3 - <<'PY'
import json, statistics
ms = [json.loads(l) for l in open("/tmp/gpu/multi/t2.metrics.jsonl")]
print("tensor2 x data2 tokens/s per step:", [round(m["tokens_per_s"]) for m in ms],
      "median of steps 3+:", round(statistics.median(m["tokens_per_s"] for m in ms[2:])),
      "losses:", [round(m["loss"], 3) for m in ms])
PY
rm -rf /tmp/s4t2; tar czf $R/multi.tgz -C $G multi
el "bench (GPU 0)"
export CUDA_VISIBLE_DEVICES=0
OUT=$G/bench FMOEC=.dev/fmoec STEPS="check bench" BENCH_ARGS="--impl fmoec --impl ops" timeout 200 \
    bash .ci/device-bench.sh > $G/bench.log 2>&1
tail -3 $G/bench/check.txt; cp $G/bench/bench.txt $G/bench/bench.json $R/ 2>/dev/null; tail -5 $G/bench/bench.txt
el "wait for the FastMoE build"
wait $BUILD; tail -3 $G/fm-build.txt
el "peers (GPU 0)"
OUT=$G/peers timeout 170 bash .ci/device-peers.sh > $G/peers.log 2>&1
tail -5 $G/peers.log
el "done"
cp $G/peers/peers.json $G/peers/peers.txt $R/ 2>/dev/null
python3 .ci/side-by-side.py $G/bench/bench.json $G/peers/peers.json | tee $R/side-by-side.md
tar czf $R/gpu.tgz -C $G .
