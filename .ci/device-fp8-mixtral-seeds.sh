#!/usr/bin/env bash
# Is the Mixtral-shaped slice's fp8 loss gap FP8, or the run's own noise? (issue 17 item 4)
# bf16 and fp8 from two seeds each, at call 7's learning rate (3e-4, 30 warm-up steps, where
# both spike) and at the committed one (1e-4, 100 warm-up steps), 300 steps a run, killed
# after step 300 (no checkpoint). The model files are `.ci/fp8-mixtral-slice-{bf16,fp8}.fmoe` with `seed`, `lr`
# and `warmup` rewritten. CONFIGS (default below) lists "lr:warmup:seed" triples; CAP_S the
# seconds a run may take (default 58). FMOEC_ENV (e.g. "FMOEC_FP8_GRAD=bf16") is set for the
# fp8 runs only. Needs the CUDA build at $FMOEC (default .dev/fmoec); results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
R="${OUT:-out-mx}"; mkdir -p "$R"
. .ci/cuda-libs.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/device.txt"
date -u | tee -a "$R/device.txt"
F="${FMOEC:-.dev/fmoec}"
CONFIGS="${CONFIGS:-3e-4:30:1234 3e-4:30:777 1e-4:100:1234 1e-4:100:777}"
PRECISIONS="${PRECISIONS:-bf16 fp8}"
CAP_S="${CAP_S:-58}"
T0=$(date +%s)
M=/tmp/mx-models; mkdir -p $M
for cfg in $CONFIGS; do
    IFS=: read -r lr warm seed <<< "$cfg"
    for p in $PRECISIONS; do
        name="$p-lr${lr//-/m}-w$warm-s$seed"
        sed -E -e "s/lr = [0-9.e-]+/lr = $lr/" -e "s/warmup = [0-9]+/warmup = $warm/" \
            -e "s/seed( +)= [0-9]+/seed\1= $seed/" .ci/fp8-mixtral-slice-$p.fmoe > $M/$name.fmoe
        out=/tmp/mx-$name; rm -rf $out
        if [ "$p" = fp8 ]; then envs="${FMOEC_ENV:-}"; else envs=""; fi
        # shellcheck disable=SC2086
        env $envs $F run $M/$name.fmoe --device cuda --quiet --out $out > "$R/$name.log" 2>&1 &
        pid=$!
        for _ in $(seq 1 "$CAP_S"); do
            sleep 1
            [ -f $out/metrics.jsonl ] && [ "$(wc -l < $out/metrics.jsonl)" -ge 300 ] && break
            kill -0 $pid 2>/dev/null || break
        done
        kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
        echo "[$(( $(date +%s) - T0 )) s] $name: $(wc -l < $out/metrics.jsonl 2>/dev/null) steps"
        grep -iE "error|overflow" "$R/$name.log" | head -3
        cp $out/metrics.jsonl "$R/$name.jsonl" 2>/dev/null
    done
done
python3 - "$R" <<'PY'
import glob, json, os, statistics, sys
R = sys.argv[1]
runs = {}
for f in sorted(glob.glob(f"{R}/*.jsonl")):
    runs[os.path.basename(f)[:-6]] = [json.loads(l) for l in open(f)]
def last10(ms, n):
    return sum(m["loss"] for m in ms[n - 10:n]) / 10
def window(ms, a, b):
    xs = [m["loss"] for m in ms[a - 1:b]]
    return sum(xs) / len(xs)
print("run: steps, median tokens/s of steps 2+, loss step 1, max loss, mean of steps 291-300")
for k, ms in runs.items():
    if len(ms) < 11:
        print(k, len(ms), "steps"); continue
    print(f"{k}: {len(ms)}, {statistics.median(m['tokens_per_s'] for m in ms[1:]):.0f}, "
          f"{ms[0]['loss']:.4f}, {max(m['loss'] for m in ms):.3f} (step {max(ms, key=lambda m: m['loss'])['step']}), "
          f"{last10(ms, len(ms)):.4f}")
def compare(a, b):
    if a not in runs or b not in runs:
        return
    x, y = runs[a], runs[b]
    n = min(len(x), len(y))
    if n < 300:
        print(f"{a} vs {b}: only {n} steps"); return
    w = [f"{100 * (window(x, s, e) / window(y, s, e) - 1):+.2f}%" for s, e in [(1, 50), (51, 100), (101, 200), (201, 300)]]
    print(f"{a} vs {b}: last 10 {100 * (last10(x, n) / last10(y, n) - 1):+.2f}%, windows 1-50/51-100/101-200/201-300 {' '.join(w)}")
names = list(runs)
for k in names:
    if k.startswith("fp8-"):
        compare(k, "bf16-" + k[4:])
for p in ["bf16", "fp8"]:
    ks = [k for k in names if k.startswith(p + "-")]
    for i, a in enumerate(ks):
        for b in ks[i + 1:]:
            if a.split("-s")[0] == b.split("-s")[0]:
                compare(b, a)
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lrs = sorted({k.split("-")[1] for k in names})
    fig, axes = plt.subplots(1, len(lrs), figsize=(7 * len(lrs), 4.5), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for k, ms in runs.items():
            if k.split("-")[1] == lr:
                ax.plot([m["step"] for m in ms], [m["loss"] for m in ms], label=k, linewidth=0.8)
        ax.set_xlabel("step"); ax.set_ylabel("training loss"); ax.set_ylim(1.5, 4.0)
        ax.set_title(f"Mixtral-shaped slice, one H100, {lr}"); ax.legend(fontsize=7); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(f"{R}/mixtral-slice-seeds.png", dpi=100)
except Exception as e:
    print("no plot:", e)
PY
# the device tool returns at most 8 files: the per-run files go in one archive
tar -czf "$R/mixtral-seeds-runs.tgz" -C "$R" $(cd "$R" && ls ./*.jsonl ./*.log 2>/dev/null) && \
    (cd "$R" && rm -f ./*.jsonl ./*.log)
