#!/usr/bin/env bash
# The peers of `fmoec bench moe` on a CUDA machine, for BENCHMARKS.md: PyTorch's grouped-mm
# path and FastMoE itself, timed by .ci/device-peers.py with the same shapes and routings.
# FastMoE is built here from a checkout at $FASTMOE_SRC (default .dev/peers/fastmoe: a copy
# of github.com/laekov/fastmoe, fetched by the developer and never committed), without
# NCCL (one GPU). Its Python dependency dm-tree comes as a wheel in .whl/ when the machine
# has none. Logs and JSON under ${OUT:-out-gpu}. PEERS_BUILD_ONLY=1 builds FastMoE and stops
# (to build on the CPUs while the GPUs do other work); a build already in /tmp is reused.
set -uo pipefail
OUT="${OUT:-out-gpu}"
mkdir -p "$OUT"
SRC="${FASTMOE_SRC:-.dev/peers/fastmoe}"
args=()
if ! python3 -c 'import tree' 2>/dev/null && ls .whl/dm_tree-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/dm_tree-*.whl &&
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ls /tmp/fastmoe-build/fmoe_cuda*.so >/dev/null 2>&1; then
    echo "FastMoE: reusing the build in /tmp/fastmoe-build"
    args+=(--fastmoe /tmp/fastmoe-build)
elif [ -d "$SRC" ]; then
    rm -rf /tmp/fastmoe-build && cp -r "$SRC" /tmp/fastmoe-build
    start=$(date +%s)
    if (cd /tmp/fastmoe-build && USE_NCCL=0 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS="$(nproc)" \
        python3 setup.py build_ext --inplace) > "$OUT/fastmoe-build.log" 2>&1; then
        echo "FastMoE built in $(( $(date +%s) - start )) s"
        args+=(--fastmoe /tmp/fastmoe-build)
    else
        echo "FastMoE did not build (tail of $OUT/fastmoe-build.log):"
        tail -20 "$OUT/fastmoe-build.log"
    fi
fi
[ "${PEERS_BUILD_ONLY:-0}" = 1 ] && exit 0
PYTHONUNBUFFERED=1 python3 .ci/device-peers.py "${args[@]}" --iters "${ITERS:-50}" \
    --json "$OUT/peers.json" "$@" 2>&1 | tee "$OUT/peers.txt"
