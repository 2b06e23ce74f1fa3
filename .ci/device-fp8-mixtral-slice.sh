#!/usr/bin/env bash
# Mixtral-shaped one-GPU slice, bf16 against fp8 from the same seed and data, 300 steps each
# (issue 17 item 4), at lr 1e-4 with 100 warm-up steps since part 3 (3e-4 with 30 spiked in
# both precisions: BENCHMARKS.md). The runs are killed once 300 steps are in metrics.jsonl
# (no 35 GB checkpoint).
set -uo pipefail
cd "$(dirname "$0")/.."
R="${OUT:-out-mx}"; mkdir -p "$R"
. .ci/cuda-libs.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/device.txt"
date -u | tee -a "$R/device.txt"
F="${FMOEC:-.dev/fmoec}"
T0=$(date +%s)
for p in bf16 fp8; do
    out=/tmp/mx-$p; rm -rf $out
    $F plan .ci/fp8-mixtral-slice-$p.fmoe --memory-model fmoec > "$R/plan-$p.txt" 2>&1
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$R/$p.mem" &
    smi=$!
    $F run .ci/fp8-mixtral-slice-$p.fmoe --device cuda --quiet --out $out > "$R/$p.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 210); do
        sleep 1
        [ -f $out/metrics.jsonl ] && [ "$(wc -l < $out/metrics.jsonl)" -ge 300 ] && break
        kill -0 $pid 2>/dev/null || break
    done
    kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; kill $smi; wait $smi 2>/dev/null
    echo "[$(( $(date +%s) - T0 )) s] $p: $(wc -l < $out/metrics.jsonl 2>/dev/null) steps"
    grep -iE "note|warning|error|device" "$R/$p.log" | head -5
    cp $out/metrics.jsonl "$R/$p.metrics.jsonl" 2>/dev/null
done
python3 - "$R" <<'PY'
import json, statistics, sys
R = sys.argv[1]
runs = {}
for p in ["bf16", "fp8"]:
    try:
        runs[p] = [json.loads(l) for l in open(f"{R}/{p}.metrics.jsonl")]
    except OSError:
        print(p, "no metrics")
for p, ms in runs.items():
    mem = max(int(x) for x in open(f"{R}/{p}.mem").read().split())
    print(f"{p}: {len(ms)} steps, median tokens/s of steps 2+ {statistics.median(m['tokens_per_s'] for m in ms[1:]):.0f}, "
          f"loss step 1 {ms[0]['loss']:.4f}, step {len(ms)} {ms[-1]['loss']:.4f}, peak nvidia-smi {mem} MiB")
if len(runs) == 2:
    b, f = runs["bf16"], runs["fp8"]
    n = min(len(b), len(f))
    gaps = [abs(x["loss"] - y["loss"]) / y["loss"] for x, y in zip(f[:n], b[:n])]
    last = lambda xs: sum(x["loss"] for x in xs[n - 10:n]) / 10
    print(f"fp8 against bf16 over {n} steps: mean of the last 10 losses {last(f):.4f} vs {last(b):.4f} "
          f"({100 * (last(f) / last(b) - 1):+.2f}%), largest per-step gap {100 * max(gaps):.2f}% "
          f"(step {gaps.index(max(gaps)) + 1}), speed {statistics.median(m['tokens_per_s'] for m in f[1:n]) / statistics.median(m['tokens_per_s'] for m in b[1:n]):.2f}x")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p, ms in runs.items():
        ax.plot([m["step"] for m in ms], [m["loss"] for m in ms], label=p, linewidth=1)
    ax.set_xlabel("step"); ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Mixtral-shaped slice (2 blocks, 8 experts of 14336) on one H100: bf16 and fp8")
    ax.legend(); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(f"{R}/mixtral-slice-fp8-vs-bf16.png", dpi=110)
PY
