#!/usr/bin/env bash
# Part 4's call on one H100 (BENCHMARKS.md 2026-12-06, issue 17): the kernel checks; the
# bench's S1, S3 and F0 rows (both activations, balanced routing) with `--cuda-graph` (each
# row op by op and replayed as a CUDA graph, in one process) and op by op alone (another
# process); S1 again with --cuda-graph under the column maxima's other ways
# (FMOEC_FP8_MAXIMA_REDUCE=atomic: part 3's atomics; FMOEC_FP8_COLUMN_MAXIMA=0: no fused
# maxima, the plain passes); Nsight Compute kernel durations of S1's fp8 layer. Every step
# has its own time limit, so one that hangs leaves the others' results. Needs the CUDA build
# at $FMOEC (default .dev/fmoec). Results: $OUT/log.txt (the tables) and $OUT/all.tgz.
set -uo pipefail
export PYTHONUNBUFFERED=1
D="$(cd "$(dirname "$0")" && pwd)"
F="$(realpath "${FMOEC:-.dev/fmoec}")"; O="${OUT:-out-graph}"; mkdir -p "$O"
G=/tmp/graph; rm -rf $G; mkdir -p $G
ARGS=(--device cuda --dtype fp8 --iters "${ITERS:-20}" --warmup 3 --routing balanced)
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
{
    # the checks and the op-by-op bench through device-fp8.sh (it sets the library path)
    el "check"
    OUT=$G/checks FMOEC=$F STEPS=check timeout 90 bash "$D/device-fp8.sh" 2>&1 | grep -v "^fp8 .* ok$"
    . "$D/cuda-libs.sh"
    el "bench --cuda-graph (S1, S3, F0)"
    timeout 120 "$F" bench moe "${ARGS[@]}" --shape S1 --shape S3 --shape F0 --cuda-graph \
        --json $G/bench-graph.json > $G/bench-graph.txt 2> $G/bench-graph.progress
    echo "bench --cuda-graph exit $?"; grep -iE "error|warning" $G/bench-graph.progress | head -5
    cat $G/bench-graph.txt
    el "bench op by op (S1, S3, F0)"
    timeout 60 "$F" bench moe "${ARGS[@]}" --shape S1 --shape S3 --shape F0 \
        > $G/bench.txt 2> $G/bench.progress
    echo "bench exit $?"; cat $G/bench.txt
    for v in atomic:FMOEC_FP8_MAXIMA_REDUCE=atomic nomax:FMOEC_FP8_COLUMN_MAXIMA=0; do
        name=${v%%:*}
        el "bench --cuda-graph, S1, $name (${v#*:})"
        env "${v#*:}" timeout 60 "$F" bench moe "${ARGS[@]}" --shape S1 --cuda-graph \
            > $G/bench-$name.txt 2> $G/bench-$name.progress
        echo "bench ($name) exit $?"; cat $G/bench-$name.txt
    done
    el "kernel durations of S1's fp8 layer (ncu)"
    OUT=$G/profile FMOEC=$F STEPS=profile PROFILE_SHAPE=S1 PROFILE_TIMEOUT="${PROFILE_TIMEOUT:-70}" \
        timeout 100 bash "$D/device-fp8.sh" 2>&1 | tail -32
    el "done"
} 2>&1 | tee "$O/log.txt"
tar czf "$O/all.tgz" -C /tmp graph 2>/dev/null; ls -la "$O"
