#!/usr/bin/env bash
# FasterMoE on 4 GPUs (issue 18, item 3): the smart schedule and dynamic shadowing against plain
# expert parallelism, in one call, from the repository root on a machine with 4 GPUs, with CUDA
# builds at $DEV (default .dev): `cargo build --release --features cuda --bin fmoec --bin
# fmoec-collective-check`, copied there. Logs go under ${OUT:-out-fastermoe}.
#   checks   fmoec-collective-check --gpus 4: every collective over NCCL, the expert exchange
#            against the single-rank run, plain and in 4 chunks (the side stream and its split
#            communicator) with expert 0 replicated (broadcast, ncclReduce of its gradient)
#   layer    the MoE layer alone (exchange and experts, forward and backward), every rank its
#            own tokens, the bench's shapes (S1, F0) and `skewed` routing (the busiest expert
#            3x the mean): plain, chunks(2), chunks(4), shadowing, shadowing + chunks(4); the
#            target is shadowing + chunks(4) at least 1.3x plain (the slowest rank's medians)
#   train    examples/tiny.fmoe (fp32, micro_batch 4) on --gpus 4 with and without
#            `smart_schedule = chunks(4)` and `shadowing = dynamic`: per-step loss, grad norm and
#            routing compared (metrics.jsonl), and the shadowed experts per step
#   medium   examples/gpt2-medium-moe.fmoe in bf16 on --gpus 4 --tensor 1 with and without the
#            options (`smart_schedule = auto`, `shadowing = dynamic`): tokens/s of the steps
#            after the first two
set -uo pipefail
DEV="${DEV:-.dev}"
OUT="${OUT:-out-fastermoe}"
STEPS="${STEPS:-checks layer train medium}"
SHAPES="${SHAPES:-S1,F0}"
MEDIUM_STEPS="${MEDIUM_STEPS:-8}"
mkdir -p "$OUT"
. "$(dirname "$0")/cuda-libs.sh"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"

# a file's `parallel` block with FasterMoE's options (or without), before its `train` block
with_options() { # FILE GPUS CHUNKS(or "") OUTFILE [extra parallel lines]
    local file=$1 gpus=$2 chunks=$3 out=$4 extra=${5:-}
    local opts=""
    if [ -n "$chunks" ]; then
        opts="\n    smart_schedule = $chunks\n    shadowing = dynamic"
    fi
    if grep -q '^parallel {' "$file"; then
        sed "s/^parallel {/parallel {$opts/" "$file" > "$out"
    else
        sed "s/^train {/parallel {\n    gpus = $gpus$extra$opts\n}\n\ntrain {/" "$file" > "$out"
    fi
}

compare() { # REFERENCE OTHER: per-step relative differences, routing, shadowed experts
python3 - "$@" <<'PY'
import json, sys
def load(d):
    return [json.loads(l) for l in open(d + "/metrics.jsonl")]
ref, got = load(sys.argv[1]), load(sys.argv[2])
worst = {"loss": 0.0, "grad_norm": 0.0, "balance_loss": 0.0}
routing_same = True
for a, b in zip(ref, got):
    for k in worst:
        worst[k] = max(worst[k], abs(a[k] - b[k]) / max(abs(a[k]), 1e-12))
    routing_same &= all(x["tokens_per_expert"] == y["tokens_per_expert"] for x, y in zip(a["moe"], b["moe"]))
print(f"{sys.argv[2]} vs {sys.argv[1]}: {len(got)}/{len(ref)} steps; max rel diff loss {worst['loss']:.2e}, "
      f"grad norm {worst['grad_norm']:.2e}, balance {worst['balance_loss']:.2e}; routing identical: {routing_same}")
print("   shadowed experts per exchange, per step and layer:",
      [[l.get("shadowed_experts") for l in m["moe"]] for m in got])
PY
}

tokens_per_s() { # DIR: median tokens/s of the steps after the first two
python3 - "$1" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")][2:]
print(f"{statistics.median(r['tokens_per_s'] for r in rows):.0f}" if rows else "n/a")
PY
}

for step in $STEPS; do
case "$step" in
checks)
    echo "== checks: fmoec-collective-check --gpus 4 --no-bench"
    "$DEV/fmoec-collective-check" --gpus 4 --no-bench 2>&1 | tee "$OUT/checks.log" | grep -E "FAIL|PASS expert|ALL PASS|NCCL"
    ;;
layer)
    echo "== layer: fmoec-collective-check --gpus 4 --no-bench --bench-moe $SHAPES (skewed routing)"
    "$DEV/fmoec-collective-check" --gpus 4 --no-bench --bench-moe "$SHAPES" --moe-routing skewed 2>&1 \
        | tee "$OUT/layer.log" | grep -E "FAIL|BENCH moe"
    ;;
train)
    echo "== train: examples/tiny.fmoe on 4 GPUs, plain and with chunks(4) + shadowing = dynamic"
    with_options examples/tiny.fmoe 4 "" /tmp/tiny-fm-plain.fmoe "\n    micro_batch = 4"
    with_options examples/tiny.fmoe 4 "chunks(4)" /tmp/tiny-fm.fmoe "\n    micro_batch = 4"
    for v in plain fm; do
        f=/tmp/tiny-fm.fmoe; [ "$v" = plain ] && f=/tmp/tiny-fm-plain.fmoe
        rm -rf "$OUT/train-$v"
        "$DEV/fmoec" run "$f" --gpus 4 --steps 8 --out "$OUT/train-$v" > "$OUT/train-$v.log" 2>&1 \
            || { echo "train $v failed:"; tail -20 "$OUT/train-$v.log"; }
    done
    compare "$OUT/train-plain" "$OUT/train-fm"
    ;;
medium)
    echo "== medium: examples/gpt2-medium-moe.fmoe bf16 on --gpus 4 --tensor 1, plain and with auto + dynamic"
    with_options examples/gpt2-medium-moe.fmoe 4 "" /tmp/medium-plain.fmoe
    with_options examples/gpt2-medium-moe.fmoe 4 "auto" /tmp/medium-fm.fmoe
    "$DEV/fmoec" plan /tmp/medium-fm.fmoe --world 4 --tensor 1 --memory-model fmoec | sed -n '/expert exchange/,$p'
    for v in plain fm; do
        rm -rf "$OUT/medium-$v"
        "$DEV/fmoec" run "/tmp/medium-$v.fmoe" --gpus 4 --tensor 1 --precision bf16 \
            --stop-after "$MEDIUM_STEPS" --out "$OUT/medium-$v" > "$OUT/medium-$v.log" 2>&1 \
            || { echo "medium $v failed:"; tail -20 "$OUT/medium-$v.log"; }
        echo "medium $v: $(tokens_per_s "$OUT/medium-$v") tokens/s"
        rm -rf "$OUT/medium-$v/checkpoints"
    done
    compare "$OUT/medium-plain" "$OUT/medium-fm"
    ;;
*) echo "unknown step $step"; exit 2 ;;
esac
done
