#!/usr/bin/env bash
# Part 3's call C on an H100 (BENCHMARKS.md 2026-12-06, issue 17): the kernel checks, the
# bench under each switch of the fused column maxima (`.ci/device-fp8.sh` STEPS=variants),
# Nsight Compute kernel durations of S1 without fused maxima, and the Mixtral-shaped slice
# at lr 1e-4 (one seed, bf16 and fp8). Needs the CUDA build at $FMOEC (default .dev/fmoec,
# made absolute here); everything comes back as $OUT/maxima.tgz with two logs beside it.
set -uo pipefail
export PYTHONUNBUFFERED=1
D="$(cd "$(dirname "$0")" && pwd)"
F="$(realpath "${FMOEC:-.dev/fmoec}")"; O="${OUT:-out-maxima}"; mkdir -p "$O"
rm -rf /tmp/o1 /tmp/o2 /tmp/o3
OUT=/tmp/o1 FMOEC=$F STEPS="check variants" \
    VARIANTS="${VARIANTS:-default: nomax:FMOEC_FP8_COLUMN_MAXIMA=0 t512:FMOEC_FP8_MAXIMA_THREADS=512 t128:FMOEC_FP8_MAXIMA_THREADS=128}" \
    bash "$D/device-fp8.sh" 2>&1 | tee "$O/c1.log" | grep -v "^fp8 .* ok$"
cp -r /tmp/fp8 /tmp/o1/g
OUT=/tmp/o2 FMOEC=$F STEPS=profile PROFILE_SHAPE=S1 FMOEC_FP8_COLUMN_MAXIMA=0 \
    bash "$D/device-fp8.sh" > "$O/c2.log" 2>&1
cat /tmp/o2/ncu-fp8.txt
OUT=/tmp/o3 FMOEC=$F CONFIGS="1e-4:100:1234" bash "$D/device-fp8-accuracy.sh" 2>&1 | tail -6
tar czf "$O/maxima.tgz" /tmp/o1 /tmp/o2 /tmp/o3 2>/dev/null; ls -la "$O"
