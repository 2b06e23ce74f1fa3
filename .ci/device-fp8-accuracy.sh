#!/usr/bin/env bash
# FP8 against bf16 from the same seed and data, 300 steps a run (issue 17 item 4): per-step
# losses, tokens/s, peak memory, one PNG. MODEL picks `.ci/fp8-$MODEL-bf16.fmoe` (default
# mixtral-slice: two blocks of Mixtral-8x7B's shapes; gpt2-medium-moe: the GPT-2-medium-MoE
# example in a one-GPU layout with a small batch); each precision of PRECISIONS (default "bf16
# fp8"; also fp8-dense) is that file with its `precision` rewritten. CONFIGS lists
# "lr:warmup:seed" triples written into the file (default "file": as the file has them). FMOEC_ENV
# (e.g. "FMOEC_FP8_EXPERTS=all") is set for the fp8 runs only; CAP_S is the seconds a run may
# take (default 58). Runs are killed once 300 steps are in metrics.jsonl (no checkpoint). Needs
# the CUDA build at $FMOEC (default .dev/fmoec); DEVICE (default cuda) for a dry run on the CPU.
# Results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
R="${OUT:-out-acc}"; mkdir -p "$R"
DEVICE="${DEVICE:-cuda}"
if [ "$DEVICE" != cpu ]; then
    . .ci/cuda-libs.sh
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/device.txt"
fi
date -u | tee -a "$R/device.txt"
F="${FMOEC:-.dev/fmoec}"
MODEL="${MODEL:-mixtral-slice}"
SRC="${MODEL_FILE:-.ci/fp8-$MODEL-bf16.fmoe}"
CONFIGS="${CONFIGS:-file}"
PRECISIONS="${PRECISIONS:-bf16 fp8}"
CAP_S="${CAP_S:-58}"
WANT="${WANT_STEPS:-300}"
T0=$(date +%s)
M=/tmp/acc-models; mkdir -p $M
for cfg in $CONFIGS; do
    rewrite=()
    tag=file
    if [ "$cfg" != file ]; then
        IFS=: read -r lr warm seed <<< "$cfg"
        tag="lr${lr//-/m}-w$warm-s$seed"
        rewrite=(-e "s/lr = [0-9.e-]+/lr = $lr/" -e "s/warmup = [0-9]+/warmup = $warm/"
                 -e "s/seed( +)= [0-9]+/seed\1= $seed/")
    fi
    for p in $PRECISIONS; do
        name="$p-$tag"
        case $p in
            bf16) prec="precision  = bf16" ;;
            fp8) prec="precision  = fp8" ;;
            fp8-dense) prec="precision  = fp8\n    fp8_dense  = true" ;;
            *) echo "unknown precision $p"; continue ;;
        esac
        sed -E "${rewrite[@]}" -e "s/precision( +)= bf16/$prec/" "$SRC" > $M/$name.fmoe
        out=/tmp/acc-$name; rm -rf $out
        if [[ $p == fp8* ]]; then envs="${FMOEC_ENV:-}"; else envs=""; fi
        if [ "$DEVICE" != cpu ]; then
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$R/$name.mem" &
            smi=$!
        fi
        # shellcheck disable=SC2086
        env $envs $F run $M/$name.fmoe --device "$DEVICE" --quiet --out $out > "$R/$name.log" 2>&1 &
        pid=$!
        for _ in $(seq 1 "$CAP_S"); do
            sleep 1
            [ -f $out/metrics.jsonl ] && [ "$(wc -l < $out/metrics.jsonl)" -ge "$WANT" ] && break
            kill -0 $pid 2>/dev/null || break
        done
        kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
        [ "$DEVICE" != cpu ] && { kill $smi; wait $smi 2>/dev/null; }
        echo "[$(( $(date +%s) - T0 )) s] $name: $(wc -l < $out/metrics.jsonl 2>/dev/null) steps"
        grep -iE "error|overflow" "$R/$name.log" | head -3
        cp $out/metrics.jsonl "$R/$name.jsonl" 2>/dev/null
    done
done
python3 - "$R" "$MODEL" "$WANT" <<'PY'
import glob, json, os, statistics, sys
R, model, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs = {}
for f in sorted(glob.glob(f"{R}/*.jsonl")):
    runs[os.path.basename(f)[:-6]] = [json.loads(l) for l in open(f)]
def split(k):  # "fp8-dense-lr1em4-w100-s1234" -> ("fp8-dense", "lr1em4-w100-s1234")
    for p in ["fp8-dense", "fp8", "bf16"]:
        if k.startswith(p + "-"):
            return p, k[len(p) + 1:]
    return k, ""
def last10(ms, n):
    return sum(m["loss"] for m in ms[n - 10:n]) / 10
def window(ms, a, b):
    xs = [m["loss"] for m in ms[a - 1:b]]
    return sum(xs) / len(xs)
def peak(k):
    try:
        return max(int(x) for x in open(f"{R}/{k}.mem").read().split())
    except (OSError, ValueError):
        return None
print("run: steps, median tokens/s of steps 2+, loss step 1, max loss (step), mean of the last 10, peak nvidia-smi MiB")
for k, ms in runs.items():
    if len(ms) < 11:
        print(k, len(ms), "steps"); continue
    print(f"{k}: {len(ms)}, {statistics.median(m['tokens_per_s'] for m in ms[1:]):.0f}, "
          f"{ms[0]['loss']:.4f}, {max(m['loss'] for m in ms):.3f} (step {max(ms, key=lambda m: m['loss'])['step']}), "
          f"{last10(ms, len(ms)):.4f}, {peak(k)}")
def compare(a, b):
    x, y = runs[a], runs[b]
    n = min(len(x), len(y))
    if n < want:
        print(f"{a} vs {b}: only {n} steps"); return
    gaps = [abs(u["loss"] - v["loss"]) / v["loss"] for u, v in zip(x[:n], y[:n])]
    spans = [(s, min(e, n)) for s, e in [(1, 50), (51, 100), (101, 200), (201, n)] if s <= min(e, n)]
    w = [f"{s}-{e} {100 * (window(x, s, e) / window(y, s, e) - 1):+.2f}%" for s, e in spans]
    speed = statistics.median(m["tokens_per_s"] for m in x[1:n]) / statistics.median(m["tokens_per_s"] for m in y[1:n])
    print(f"{a} vs {b}: last 10 {100 * (last10(x, n) / last10(y, n) - 1):+.2f}%, windows {', '.join(w)}, "
          f"largest per-step gap {100 * max(gaps):.2f}% (step {gaps.index(max(gaps)) + 1}), speed {speed:.2f}x")
for k in runs:
    p, tag = split(k)
    if p != "bf16" and f"bf16-{tag}" in runs:
        compare(k, f"bf16-{tag}")
# the same precision and learning rate from other seeds: the run's own spread
for i, a in enumerate(list(runs)):
    for b in list(runs)[i + 1:]:
        (pa, ta), (pb, tb) = split(a), split(b)
        if pa == pb and ta.split("-s")[0] == tb.split("-s")[0] and ta != tb:
            compare(b, a)
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tags = sorted({split(k)[1].split("-s")[0] for k in runs})
    fig, axes = plt.subplots(1, len(tags), figsize=(7 * len(tags), 4.5), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        for k, ms in runs.items():
            if split(k)[1].split("-s")[0] == tag:
                ax.plot([m["step"] for m in ms], [m["loss"] for m in ms], label=k, linewidth=0.8)
        ax.set_xlabel("step"); ax.set_ylabel("training loss (nats/token)")
        ax.set_title(f"{model}, one GPU: bf16 and FP8, same seed and data ({tag})")
        ax.legend(fontsize=7); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(f"{R}/{model}-fp8-vs-bf16.png", dpi=100)
except Exception as e:
    print("no plot:", e)
PY
# the device tool returns at most 8 files: the per-run files go in one archive
tar -czf "$R/$MODEL-runs.tgz" -C "$R" $(cd "$R" && ls ./*.jsonl ./*.log ./*.mem 2>/dev/null) && \
    (cd "$R" && rm -f ./*.jsonl ./*.log ./*.mem)
