#!/usr/bin/env bash
# One call on a Hopper GPU for BENCHMARKS.md (issue 17, precision = fp8): the kernel checks
# (FP8 quantisations bit for bit against the CPU reference, the FP8 ops against the
# emulation and f64), `fmoec bench moe --dtype fp8` (fmoec-fp8 beside fmoec and ops in bf16),
# examples/tiny.fmoe in bf16 and fp8 from the same seed (per-step losses, one PNG), and the
# GPT-2-medium-MoE example on one GPU in bf16 and fp8 (tokens/s, MFU over the bf16 peak,
# losses, peak nvidia-smi memory beside the planner's estimate). Needs the CUDA build at
# $FMOEC (default .dev/fmoec). STEPS (default "check bench tiny e2e") picks steps, and
# more: `precise` (the bench's fp8 rows again with FMOEC_FP8_FAST_ACCUM=0), `variants` (the
# bench again for each of VARIANTS="NAME:VAR=VALUE,..." and the binary at BASELINE) and `profile`
# (Nsight Compute kernel durations, or PROFILE_METRICS, of the fp8 layer at PROFILE_SHAPE,
# default F0), and
# `alternate` (the fmoec and fmoec-fp8 rows of ALT_SHAPE, default S1, from the binary at
# BASELINE and from $FMOEC in turn, ALT_ROUNDS times (default 2), each in its own process, and
# after each of $FMOEC's also each of ALT_VARIANTS="NAME:VAR=VALUE,..."; then each of
# ALT_ONCE (default "S3 F0") once per binary; nvidia-smi's SM clock, power and throttle
# reasons sampled during each process); with BASELINE, `tiny` also runs the baseline's fp8
# and compares its per-step losses with $FMOEC's bit for bit;
# TINY_FILE (examples/tiny.fmoe), TINY_STEPS (300), TINY_PRECISIONS (bf16 fp8 fp8-dense),
# E2E_STEPS (6), E2E_LONG (25: the bf16 and fp8 runs whose losses are compared), ITERS (20;
# `alternate` 30), BENCH_ARGS (default: S1, S3, F0, balanced routing). Results under $OUT.
set -uo pipefail
R="${OUT:-out-gpu}"; G=/tmp/fp8; rm -rf $G; mkdir -p "$R" $G/e2e $G/tiny
FMOEC="${FMOEC:-.dev/fmoec}"
steps="${STEPS:-check bench tiny e2e}"
export NCCL_NVLS_ENABLE=0
. "$(dirname "$0")/cuda-libs.sh"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/device.txt"
date -u | tee -a "$R/device.txt"
has() { [[ " $steps " == *" $1 "* ]]; }

if has check; then
    el "check"
    "$FMOEC" bench moe --device cuda --check-kernels > $G/check.txt 2>&1
    echo "check exit $?: ok $(grep -c ' ok$' $G/check.txt) failed $(grep -c FAILED $G/check.txt)"
    grep -E "FAILED|skipped|error" $G/check.txt | head -20
    grep "^fp8" $G/check.txt | head -60
    cp $G/check.txt "$R/"
fi

if has bench; then
    el "bench"
    # shellcheck disable=SC2086
    "$FMOEC" bench moe --device cuda --dtype fp8 --iters "${ITERS:-20}" --warmup 3 \
        ${BENCH_ARGS:---shape S1 --shape S3 --shape F0 --routing balanced} \
        --json $G/bench.json > $G/bench.txt 2> $G/bench.progress
    echo "bench exit $?"; tail -3 $G/bench.progress
    cat $G/bench.txt
    cp $G/bench.txt $G/bench.json "$R/" 2>/dev/null
fi

if has variants; then
    # the bench's rows again for each "NAME:VAR=VALUE[,VAR=VALUE]" of VARIANTS (the code's
    # switches, e.g. FMOEC_FP8_COLUMN_MAXIMA=0), and with the build at $BASELINE (another
    # commit's binary) if given: every table of one call, for choices made by measurement
    for v in ${BASELINE:+baseline:} ${VARIANTS:-}; do
        name=${v%%:*}; envs=${v#*:}; bin="$FMOEC"
        [ "$name" = baseline ] && bin="$BASELINE"
        el "bench, variant $name (${envs:-no switches})"
        # shellcheck disable=SC2086
        env ${envs//,/ } "$bin" bench moe --device cuda --dtype fp8 --iters "${ITERS:-20}" --warmup 3 \
            ${BENCH_ARGS:---shape S1 --shape S3 --shape F0 --routing balanced} \
            > $G/bench-$name.txt 2> $G/bench-$name.progress
        echo "bench ($name) exit $?"
        grep -E "fmoec-fp8|^S1 .* fmoec  " $G/bench-$name.txt
    done
fi

# alt NAME BIN SHAPE [VAR=VALUE...]: one bench process of the fmoec and fmoec-fp8 rows of SHAPE,
# with nvidia-smi sampled every 50 ms meanwhile (busy samples: over 300 W)
alt() {
    local name=$1 bin=$2 shape=$3; shift 3
    el "bench $shape, $name ${*:-}"
    nvidia-smi --query-gpu=clocks.sm,power.draw,clocks_event_reasons.active --format=csv,noheader,nounits \
        -lms 50 > $G/alt-$name.smi 2>/dev/null &
    local smi=$!
    env "$@" timeout 90 "$bin" bench moe --device cuda --dtype fp8 --impl fmoec --impl fmoec-fp8 \
        --shape "$shape" --routing balanced --iters "${ITERS:-30}" --warmup 3 \
        > $G/alt-$name.txt 2> $G/alt-$name.progress
    echo "bench ($name) exit $?"
    kill $smi; wait $smi 2>/dev/null
    grep -E "^ *$shape" $G/alt-$name.txt
    python3 - $G/alt-$name.smi <<'PY'
import statistics, sys
rows = []
for l in open(sys.argv[1]):
    p = [x.strip() for x in l.split(",")]
    try:
        rows.append((float(p[0]), float(p[1]), p[2]))
    except (ValueError, IndexError):
        pass
busy = [r for r in rows if r[1] > 300]
if busy:
    print(f"  nvidia-smi: {len(busy)} busy samples of {len(rows)}: SM clock median "
          f"{statistics.median(r[0] for r in busy):.0f} MHz (min {min(r[0] for r in busy):.0f}), "
          f"power median {statistics.median(r[1] for r in busy):.0f} W, throttle reasons "
          f"{sorted(set(r[2] for r in busy))}")
PY
}

if has alternate; then
    shape=${ALT_SHAPE:-S1}
    for round in $(seq 1 "${ALT_ROUNDS:-2}"); do
        [ -n "${BASELINE:-}" ] && alt base-$shape-$round "$BASELINE" $shape
        alt new-$shape-$round "$FMOEC" $shape
        for v in ${ALT_VARIANTS:-}; do
            envs=${v#*:}
            # shellcheck disable=SC2086
            alt ${v%%:*}-$shape-$round "$FMOEC" $shape ${envs//,/ }
        done
    done
    for once in ${ALT_ONCE:-S3 F0}; do
        [ -n "${BASELINE:-}" ] && alt base-$once "$BASELINE" $once
        alt new-$once "$FMOEC" $once
    done
fi

if has precise; then
    el "bench, precise accumulation"
    # shellcheck disable=SC2086
    FMOEC_FP8_FAST_ACCUM=0 "$FMOEC" bench moe --device cuda --dtype fp8 --iters "${ITERS:-20}" --warmup 3 \
        ${BENCH_ARGS:---shape S1 --shape S3 --shape F0 --routing balanced} \
        --json $G/bench-precise.json > $G/bench-precise.txt 2> $G/bench-precise.progress
    echo "bench (precise) exit $?"; tail -3 $G/bench-precise.progress
    cat $G/bench-precise.txt
    cp $G/bench-precise.txt "$R/" 2>/dev/null
fi

if has profile; then
    # PROFILE_METRICS (default gpu__time_duration.sum; e.g. with
    # sm__throughput.avg.pct_of_peak_sustained_elapsed and
    # dram__throughput.avg.pct_of_peak_sustained_elapsed: what bounds each pass),
    # PROFILE_KERNELS (an ncu kernel-name regex, e.g. fp8_), PROFILE_ITERS (3), PROFILE_BIN
    # (default $FMOEC; PROFILE_NAME names the output); the shape's GELU and SwiGLU rows
    el "kernel metrics of the fp8 layer (ncu) ${PROFILE_NAME:-}"
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
    pname=ncu-fp8${PROFILE_NAME:+-$PROFILE_NAME}
    # shellcheck disable=SC2086
    timeout "${PROFILE_TIMEOUT:-150}" "$NCU" --clock-control none \
        --metrics "${PROFILE_METRICS:-gpu__time_duration.sum}" \
        ${PROFILE_KERNELS:+--kernel-name regex:$PROFILE_KERNELS} --csv \
        --log-file $G/$pname.csv "${PROFILE_BIN:-$FMOEC}" bench moe --device cuda --dtype fp8 --impl fmoec-fp8 \
        --shape "${PROFILE_SHAPE:-F0}" --routing balanced \
        --iters "${PROFILE_ITERS:-3}" --warmup 1 > $G/$pname.log 2>&1
    echo "ncu exit $?"
    python3 - $G/$pname.csv <<'PY' | tee "$R/$pname.txt"
import collections, csv, sys
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
vals = collections.defaultdict(lambda: collections.defaultdict(list))
for r in csv.DictReader(rows):
    name = r["Kernel Name"].split("(")[0][:48]
    m = r["Metric Name"]
    v = float(r["Metric Value"].replace(",", ""))
    if m == "gpu__time_duration.sum":
        v *= scale.get(r["Metric Unit"], 1.0)
    vals[name][m].append(v)
metrics = sorted({m for k in vals.values() for m in k}, key=lambda m: m != "gpu__time_duration.sum")
short = {"gpu__time_duration.sum": "us each (n)", "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM %",
         "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM %"}
print("kernel".ljust(48), " ".join(short.get(m, m)[:14].rjust(14) for m in metrics))
order = sorted(vals, key=lambda k: -sum(vals[k].get("gpu__time_duration.sum", [0])))
for k in order:
    cells = []
    for m in metrics:
        xs = vals[k].get(m, [])
        if not xs:
            cells.append("-".rjust(14))
        elif m == "gpu__time_duration.sum":
            cells.append(f"{sum(xs) / len(xs):9.1f} ({len(xs)})".rjust(14))
        else:
            cells.append(f"{min(xs):.0f}-{max(xs):.0f}".rjust(14))
    print(k.ljust(48), " ".join(cells))
PY
    gzip -f $G/$pname.csv
fi

if has tiny; then
    # the same seed and data in bf16 and in fp8 (the tiny experts are too narrow for FP8 to
    # pay, so FMOEC_FP8_EXPERTS=all forces it, to see its accuracy), and fp8 with the dense
    # matmuls too
    for p in ${TINY_PRECISIONS:-bf16 fp8 fp8-dense}; do
        el "tiny $p"
        rm -rf /tmp/tiny-$p
        FMOEC_FP8_EXPERTS=all "$FMOEC" run "${TINY_FILE:-examples/tiny.fmoe}" --device cuda --precision $p --quiet \
            --steps "${TINY_STEPS:-300}" --out /tmp/tiny-$p > $G/tiny/$p.log 2>&1
        echo "tiny $p exit $?"; grep -iE "error|warning|note" $G/tiny/$p.log | head -3
        cp /tmp/tiny-$p/metrics.jsonl $G/tiny/$p.metrics.jsonl 2>/dev/null
        cp /tmp/tiny-$p/summary.json $G/tiny/$p.summary.json 2>/dev/null
    done
    if [ -n "${BASELINE:-}" ]; then
        # the baseline binary's fp8 run from the same seed: its losses against this build's
        el "tiny fp8, baseline"
        rm -rf /tmp/tiny-base-fp8
        FMOEC_FP8_EXPERTS=all "$BASELINE" run "${TINY_FILE:-examples/tiny.fmoe}" --device cuda --precision fp8 --quiet \
            --steps "${TINY_STEPS:-300}" --out /tmp/tiny-base-fp8 > $G/tiny/base-fp8.log 2>&1
        echo "tiny fp8 (baseline) exit $?"
        cp /tmp/tiny-base-fp8/metrics.jsonl $G/tiny/base-fp8.metrics.jsonl 2>/dev/null
        python3 - <<'PY'
import json
try:
    new = [json.loads(l) for l in open("/tmp/fp8/tiny/fp8.metrics.jsonl")]
    base = [json.loads(l) for l in open("/tmp/fp8/tiny/base-fp8.metrics.jsonl")]
except OSError as e:
    print("tiny fp8 against the baseline: no metrics", e)
else:
    n = min(len(new), len(base))
    same = sum(a["loss"] == b["loss"] for a, b in zip(new[:n], base[:n]))
    first = next((a["step"] for a, b in zip(new[:n], base[:n]) if a["loss"] != b["loss"]), None)
    big = max((abs(a["loss"] - b["loss"]) for a, b in zip(new[:n], base[:n])), default=0.0)
    print(f"tiny fp8 against the baseline: {n} steps ({len(new)} and {len(base)}), {same} losses "
          f"bit-identical, first differing step {first}, largest difference {big:.3g}; last "
          f"{new[n-1]['loss']:.6f} and {base[n-1]['loss']:.6f}")
PY
    fi
    python3 - "$R" <<'PY'
import json, sys
out = sys.argv[1]
runs = {}
for p in ["bf16", "fp8", "fp8-dense"]:
    try:
        runs[p] = [json.loads(l) for l in open(f"/tmp/fp8/tiny/{p}.metrics.jsonl")]
    except OSError:
        print("tiny", p, "no metrics")
if "bf16" in runs:
    b = runs["bf16"]
    for p, ms in runs.items():
        n = min(len(ms), len(b))
        last = lambda xs: sum(x["loss"] for x in xs[n - 10:n]) / 10
        gaps = [abs(m["loss"] - c["loss"]) / c["loss"] for m, c in zip(ms[:n], b[:n])]
        ev = [(m["step"], round(m["eval_loss"], 4)) for m in ms if "eval_loss" in m]
        print(f"tiny {p}: {n} steps, loss step 1 {ms[0]['loss']:.4f}, last {ms[n-1]['loss']:.4f}, "
              f"mean of last 10 {last(ms):.4f} (bf16 {last(b):.4f}, gap {100 * (last(ms) / last(b) - 1):+.2f}%), "
              f"max per-step gap {100 * max(gaps):.2f}%, eval {ev}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p, ms in runs.items():
        ax.plot([m["step"] for m in ms], [m["loss"] for m in ms], label=p, linewidth=1)
    ax.set_xlabel("step"); ax.set_ylabel("training loss (nats/token)")
    ax.set_title("examples/tiny.fmoe on one GPU: bf16 and fp8, same seed and data")
    ax.legend(); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(f"{out}/tiny-fp8-vs-bf16.png", dpi=110)
PY
fi

# e2e NAME FILE [ARGS]: STEPS steps of the GPT-2-medium-MoE example on one GPU, then the
# run is killed (no 15 GB checkpoint); tokens/s per step and peak memory
e2e() {
    local name=$1 file=$2 nsteps=$3; shift 3
    local out=/tmp/run-$name; rm -rf $out
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > $G/e2e/$name.mem &
    local smi=$!
    "$FMOEC" run "$file" --device cuda --quiet --out $out "$@" > $G/e2e/$name.log 2>&1 &
    local pid=$!
    for _ in $(seq 1 400); do
        sleep 1
        [ -f $out/metrics.jsonl ] && [ "$(wc -l < $out/metrics.jsonl)" -ge "$nsteps" ] && break
        kill -0 $pid 2>/dev/null || break
    done
    kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; kill $smi; wait $smi 2>/dev/null
    grep -E "note|warning|error" $G/e2e/$name.log | head -3
    if ! cp $out/metrics.jsonl $G/e2e/$name.metrics.jsonl 2>/dev/null; then
        echo "$name: no metrics; the run said:"; grep -v '^frame' $G/e2e/$name.log | head -c 1500
        return
    fi
    python3 - "$name" "$file" <<'PY' | tee -a "$R/e2e.txt"
import json, statistics, sys
n, f = sys.argv[1], sys.argv[2]
ms = [json.loads(l) for l in open(f"/tmp/fp8/e2e/{n}.metrics.jsonl")]
mem = max(int(x) for x in open(f"/tmp/fp8/e2e/{n}.mem").read().split())
med = statistics.median(m["tokens_per_s"] for m in ms[1:])
plan = json.load(open(f + ".plan.json"))
flops = plan["time"]["model_flops_per_step"] / (plan["global_batch"] * plan["seq_len"])
planned = plan["ranks"][0]["memory_bytes"] / 2**20
print(n, "tokens/s per step:", [round(m["tokens_per_s"]) for m in ms], "median of steps 2+:", round(med),
      f"MFU {100 * med * flops / (plan['world'] * plan['hardware']['bf16_tflops'] * 1e12):.1f}%",
      f"(planner: {plan['time']['tokens_per_s']:.0f} tokens/s);",
      "losses:", [round(m["loss"], 4) for m in ms],
      f"peak nvidia-smi {mem} MiB, planner (--memory-model fmoec) {planned:.0f} MiB ({100 * (planned / mem - 1):+.1f}%)")
PY
}

if has e2e; then
    python3 - <<'PY'
import re
src = open("examples/gpt2-medium-moe.fmoe").read()
one = re.sub(r"parallel \{.*?\n\}", "parallel {\n    gpus = 1 of h100_sxm\n    tensor = 1\n    pipeline = 1\n    experts = across data\n    micro_batch = 8\n}", src, flags=re.S)
open("/tmp/e2e-bf16.fmoe", "w").write(one)
open("/tmp/e2e-fp8.fmoe", "w").write(one.replace("precision  = bf16", "precision  = fp8"))
open("/tmp/e2e-fp8-dense.fmoe", "w").write(one.replace("precision  = bf16", "precision  = fp8\n    fp8_dense  = true"))
PY
    for p in bf16 fp8 fp8-dense; do
        "$FMOEC" plan /tmp/e2e-$p.fmoe --memory-model fmoec --format json > /tmp/e2e-$p.fmoe.plan.json 2> $G/e2e/plan-$p.err
        "$FMOEC" plan /tmp/e2e-$p.fmoe --memory-model fmoec > $G/e2e/plan-$p.txt 2>&1
    done
    el "e2e bf16"; e2e bf16 /tmp/e2e-bf16.fmoe "${E2E_LONG:-25}"
    el "e2e fp8 (experts where the planner says FP8 pays)"; e2e fp8 /tmp/e2e-fp8.fmoe "${E2E_STEPS:-6}"
    el "e2e fp8, all experts"; FMOEC_FP8_EXPERTS=all e2e fp8-all /tmp/e2e-fp8.fmoe "${E2E_STEPS:-6}"
    el "e2e fp8 dense, all experts"; FMOEC_FP8_EXPERTS=all e2e fp8-dense-all /tmp/e2e-fp8-dense.fmoe "${E2E_LONG:-25}"
    el "e2e fp8 dense (experts where FP8 pays)"; e2e fp8-dense /tmp/e2e-fp8-dense.fmoe "${E2E_STEPS:-6}"
fi
el "done"
tar czf "$R/fp8.tgz" -C $G . 2>/dev/null
