#!/usr/bin/env bash
# Multi-GPU checks of `fmoec run --gpus N` (issue #7), from the repository root on a machine with
# 4 GPUs (2 are enough for STEPS="equiv2"), with a CUDA build of fmoec at $FMOEC (default
# .dev/fmoec): `cargo build --release --features cuda`. Logs and metrics go under ${OUT:-out-multi};
# the comparisons are printed at the end of each step.
#   equiv    examples/tiny.fmoe (fp32, micro_batch 4): --gpus 1, 2 and 4 on the same global batch,
#            per-step loss / grad norm / routing compared with the 1-GPU run (metrics.jsonl)
#   resume   the same run saved on 4 GPUs after 4 steps, resumed on 2 GPUs to step 8, compared
#            with the uninterrupted 1-GPU run
#   tp       tensor parallelism: examples/tiny.fmoe (fp32, micro_batch 4) on --gpus 4 --tensor 2
#            (tensor 2 x data 2, experts across data), whole and sliced experts, compared with the
#            1-GPU run like equiv; then the sliced run saved on tensor 2 x data 2 after 4 steps and
#            resumed on --gpus 1 (tensor 1) to step 8, compared the same way
#   scale    examples/gpt2-medium-moe.fmoe in bf16 on 1, 2 and 4 GPUs with --tensor 1 (experts
#            across data), and on 4 GPUs also with the file's planned layout (tensor 2 x data 2,
#            experts across data, sliced: `fmoec plan examples/gpt2-medium-moe.fmoe --world 4`);
#            tokens/s of the steps after the first two, and the scaling ratios (SCALE_GPUS="1 2" on
#            a 2-GPU machine, where the tensor-2 run uses 2 GPUs; each run ends with a ~15 GB
#            checkpoint, deleted)
set -uo pipefail
FMOEC="${FMOEC:-.dev/fmoec}"
OUT="${OUT:-out-multi}"
STEPS="${STEPS:-equiv resume tp scale}"
SCALE_STEPS="${SCALE_STEPS:-8}"
SCALE_GPUS="${SCALE_GPUS:-1 2 4}"
mkdir -p "$OUT"
. "$(dirname "$0")/cuda-libs.sh"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"

# tiny.fmoe with micro-batches of 4 sequences (batch 16: 4 micro-batches, splittable over 1, 2, 4)
sed 's/^train {/parallel {\n    gpus = 1\n    micro_batch = 4\n}\n\ntrain {/' examples/tiny.fmoe > /tmp/tiny-mb4.fmoe
grep -q 'micro_batch = 4' /tmp/tiny-mb4.fmoe || { echo "could not write /tmp/tiny-mb4.fmoe"; exit 1; }
# the same with expert slicing (each tensor rank holds half of every expert's hidden columns)
sed 's/^    micro_batch = 4$/    micro_batch = 4\n    expert_slicing = true/' /tmp/tiny-mb4.fmoe > /tmp/tiny-mb4-sliced.fmoe
grep -q 'expert_slicing = true' /tmp/tiny-mb4-sliced.fmoe || { echo "could not write /tmp/tiny-mb4-sliced.fmoe"; exit 1; }

compare() { # compare.py REFERENCE OTHER... : per-step relative differences of loss and grad norm
python3 - "$@" <<'PY'
import json, sys
def load(d):
    return [json.loads(l) for l in open(d + "/metrics.jsonl")]
ref = load(sys.argv[1])
for other in sys.argv[2:]:
    got = load(other)
    worst = {"loss": 0.0, "grad_norm": 0.0, "balance_loss": 0.0}
    routing_same = True
    for a, b in zip(ref, got):
        assert a["step"] == b["step"], (a["step"], b["step"])
        for k in worst:
            worst[k] = max(worst[k], abs(a[k] - b[k]) / max(abs(a[k]), 1e-12))
        routing_same &= all(x["tokens_per_expert"] == y["tokens_per_expert"] for x, y in zip(a["moe"], b["moe"]))
    print(f"{other} vs {sys.argv[1]}: {len(got)}/{len(ref)} steps; max rel diff loss {worst['loss']:.2e}, "
          f"grad norm {worst['grad_norm']:.2e}, balance {worst['balance_loss']:.2e}; routing identical: {routing_same}")
    print("   losses:", " ".join(f"{m['loss']:.5f}" for m in got))
print(f"{sys.argv[1]} losses:", " ".join(f"{m['loss']:.5f}" for m in ref))
PY
}

for step in $STEPS; do
case "$step" in
equiv|equiv2)
    gpus="1 2 4"; [ "$step" = equiv2 ] && gpus="1 2"
    for n in $gpus; do
        rm -rf "/tmp/multi-eq$n"
        "$FMOEC" run /tmp/tiny-mb4.fmoe --gpus "$n" --quiet --stop-after 8 --out "/tmp/multi-eq$n" \
            > "$OUT/equiv-gpus$n.log" 2>&1; echo "equiv --gpus $n: exit $?" | tee -a "$OUT/equiv.txt"
        cp "/tmp/multi-eq$n/metrics.jsonl" "$OUT/equiv-gpus$n.metrics.jsonl" 2>/dev/null
    done
    others=""; for n in $gpus; do [ "$n" != 1 ] && others="$others /tmp/multi-eq$n"; done
    compare /tmp/multi-eq1 $others | tee -a "$OUT/equiv.txt"
    ;;
resume)
    [ -f /tmp/multi-eq1/metrics.jsonl ] || "$FMOEC" run /tmp/tiny-mb4.fmoe --gpus 1 --quiet \
        --stop-after 8 --out /tmp/multi-eq1 > "$OUT/resume-gpus1.log" 2>&1
    rm -rf /tmp/multi-r4
    "$FMOEC" run /tmp/tiny-mb4.fmoe --gpus 4 --quiet --stop-after 4 --out /tmp/multi-r4 \
        > "$OUT/resume-save4.log" 2>&1; echo "save on 4: exit $?" | tee "$OUT/resume.txt"
    cp /tmp/multi-r4/checkpoints/step-00000004/manifest.json "$OUT/resume-manifest.json" 2>/dev/null
    "$FMOEC" run /tmp/tiny-mb4.fmoe --gpus 2 --quiet --stop-after 8 --out /tmp/multi-r4 --resume \
        > "$OUT/resume-load2.log" 2>&1; echo "resume on 2: exit $?" | tee -a "$OUT/resume.txt"
    compare /tmp/multi-eq1 /tmp/multi-r4 | tee -a "$OUT/resume.txt"
    ;;
tp)
    [ -f /tmp/multi-eq1/metrics.jsonl ] || { rm -rf /tmp/multi-eq1; "$FMOEC" run /tmp/tiny-mb4.fmoe \
        --gpus 1 --quiet --stop-after 8 --out /tmp/multi-eq1 > "$OUT/tp-gpus1.log" 2>&1; }
    for variant in whole sliced; do
        file=/tmp/tiny-mb4.fmoe; [ "$variant" = sliced ] && file=/tmp/tiny-mb4-sliced.fmoe
        rm -rf "/tmp/multi-tp-$variant"
        "$FMOEC" plan "$file" --world 4 --tensor 2 --memory-model fmoec > "$OUT/tp-plan-$variant.txt" 2>&1
        "$FMOEC" run "$file" --gpus 4 --tensor 2 --quiet --stop-after 8 --out "/tmp/multi-tp-$variant" \
            > "$OUT/tp-$variant.log" 2>&1; echo "tp --gpus 4 --tensor 2 ($variant experts): exit $?" | tee -a "$OUT/tp.txt"
        cp "/tmp/multi-tp-$variant/metrics.jsonl" "$OUT/tp-$variant.metrics.jsonl" 2>/dev/null
    done
    # the sliced run's reference is the same model (expert_slicing only changes the layout)
    compare /tmp/multi-eq1 /tmp/multi-tp-whole /tmp/multi-tp-sliced | tee -a "$OUT/tp.txt"
    rm -rf /tmp/multi-tpr
    "$FMOEC" run /tmp/tiny-mb4-sliced.fmoe --gpus 4 --tensor 2 --quiet --stop-after 4 --out /tmp/multi-tpr \
        > "$OUT/tp-save.log" 2>&1; echo "save on tensor 2 x data 2: exit $?" | tee -a "$OUT/tp.txt"
    cp /tmp/multi-tpr/checkpoints/step-00000004/manifest.json "$OUT/tp-manifest.json" 2>/dev/null
    "$FMOEC" run /tmp/tiny-mb4-sliced.fmoe --gpus 1 --quiet --stop-after 8 --out /tmp/multi-tpr --resume \
        > "$OUT/tp-load1.log" 2>&1; echo "resume on 1 GPU (tensor 1): exit $?" | tee -a "$OUT/tp.txt"
    compare /tmp/multi-eq1 /tmp/multi-tpr | tee -a "$OUT/tp.txt"
    ;;
scale)
    # runs: "GPUS TENSOR"; tensor 1 everywhere, and the planned tensor 2 on the largest world
    runs=""; largest=1
    for n in $SCALE_GPUS; do runs="$runs $n:1"; [ "$n" -gt "$largest" ] && largest=$n; done
    [ "$largest" -ge 2 ] && runs="$runs $largest:2"
    for run in $runs; do
        n=${run%%:*}; t=${run##*:}; tag="gpus$n"; [ "$t" != 1 ] && tag="gpus$n-tensor$t"
        rm -rf "/tmp/multi-s$tag"
        "$FMOEC" plan examples/gpt2-medium-moe.fmoe --world "$n" --tensor "$t" --memory-model fmoec > "$OUT/scale-plan-$tag.txt" 2>&1
        "$FMOEC" run examples/gpt2-medium-moe.fmoe --gpus "$n" --tensor "$t" --precision bf16 --quiet \
            --stop-after "$SCALE_STEPS" --out "/tmp/multi-s$tag" > "$OUT/scale-$tag.log" 2>&1
        echo "scale --gpus $n --tensor $t: exit $?" | tee -a "$OUT/scale.txt"
        cp "/tmp/multi-s$tag/metrics.jsonl" "$OUT/scale-$tag.metrics.jsonl" 2>/dev/null
        rm -rf "/tmp/multi-s$tag/checkpoints"
    done
    python3 - "$OUT" $runs <<'PY' | tee -a "$OUT/scale.txt"
import json, statistics, sys, os
out = sys.argv[1]
base = None
for run in sys.argv[2:]:
    n, t = (int(x) for x in run.split(":"))
    tag = f"gpus{n}" if t == 1 else f"gpus{n}-tensor{t}"
    what = f"{n} GPU(s), tensor {t} x data {n // t}"
    p = f"{out}/scale-{tag}.metrics.jsonl"
    if not os.path.exists(p):
        print(f"{what}: no metrics"); continue
    m = [json.loads(l) for l in open(p)]
    tps = [x["tokens_per_s"] for x in m[2:]] or [x["tokens_per_s"] for x in m]
    med = statistics.median(tps)
    base = base or (med if n == 1 else None)
    ratio = f", {med / base:.2f}x of 1 GPU" if base else ""
    print(f"{what}: median {med:,.0f} tokens/s over {len(tps)} steps{ratio}; losses "
          + " ".join(f"{x['loss']:.3f}" for x in m))
PY
    ;;
esac
done
