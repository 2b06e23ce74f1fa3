#!/usr/bin/env bash
# Megatron-LM core_v0.19.0's own pretrain_gpt.py trains folders that `fmoec emit --megatron
# core_v0.19` wrote, on one GPU with mock data: the fmoec layer through --spec (examples/tiny.fmoe
# in bf16) and Megatron-Core's own MoE (a Mixtral-shaped model shrunk to one GPU, .ci/mcore-
# mixtral-small.fmoe). Optionally first a folder emitted by an older build (BEFORE=dir).
#
# Two steps, because the GPU machine has no Rust and no network:
#   here:    [FMOEC_CUDA=target/release/fmoec] bash .ci/device-mcore.sh prep \
#                /path/to/Megatron-LM-at-core_v0.19.0 [fmoec binary that emits]
#            (copies the tree's pretrain_gpt.py, gpt_builders.py, model_provider.py and megatron/
#            into .int/mlm, emits the two folders into .int/out, downloads packaging and psutil
#            wheels into .int/wheels; .int must be ignored by git: it holds Megatron's code)
#   device:  bash .ci/device-mcore.sh        (the `run` tool with carry [".int"]; logs in $OUT;
#            RUNS picks among "tiny-bf16 mixtral-small fmoec", default all)
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
INT="$ROOT/.int"
if [ "${1:-}" = prep ]; then
    TREE="${2:?the Megatron-LM checkout at tag core_v0.19.0}"
    FMOEC="${3:-$ROOT/target/debug/fmoec}"
    mkdir -p "$INT/mlm" "$INT/out" "$INT/models" "$INT/wheels"
    cp "$TREE"/pretrain_gpt.py "$TREE"/gpt_builders.py "$TREE"/model_provider.py "$INT/mlm/"
    rm -rf "$INT/mlm/megatron" && cp -r "$TREE/megatron" "$INT/mlm/"
    find "$INT/mlm" -name __pycache__ -prune -exec rm -rf {} +
    sed -e 's/precision  = fp32/precision  = bf16/' -e 's#^use std.gates.gshard#&\nuse std.hardware.h100_sxm#' \
        "$ROOT/examples/tiny.fmoe" > "$INT/models/tiny-bf16.fmoe"
    printf '\nparallel {\n    gpus = 1 of h100_sxm\n}\n' >> "$INT/models/tiny-bf16.fmoe"
    cp "$ROOT/.ci/mcore-mixtral-small.fmoe" "$INT/models/mixtral-small.fmoe"
    for m in tiny-bf16 mixtral-small; do
        rm -rf "$INT/out/$m"
        "$FMOEC" emit --megatron core_v0.19 "$INT/models/$m.fmoe" -o "$INT/out/$m" || exit 1
    done
    # the same model for `fmoec run` (FMOEC_CUDA=path of a `--features cuda` build): its own data
    sed -e 's#megatron("data/pile_text_document")#builtin("tiny-shakespeare")#' \
        "$INT/models/mixtral-small.fmoe" > "$INT/models/mixtral-small-run.fmoe"
    if [ -n "${FMOEC_CUDA:-}" ]; then cp "$FMOEC_CUDA" "$INT/fmoec" || exit 1; fi
    python3 -m pip download -q --no-deps -d "$INT/wheels" packaging psutil || exit 1
    du -sh "$INT"
    exit 0
fi
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
RUNS="${RUNS:-tiny-bf16 mixtral-small fmoec}"
want() { [[ " $RUNS " == *" $1 "* ]]; }
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 --version
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
SITE="$INT/site"
mkdir -p "$SITE"
missing=$(python3 -c 'import importlib.util as u; print(" ".join(m for m in ["packaging", "psutil", "numpy"] if u.find_spec(m) is None))')
echo "missing python modules: ${missing:-none}"
for m in $missing; do
    python3 -m pip install -q --no-index --find-links "$INT/wheels" --target "$SITE" "$m" || echo "could not install $m"
done
# megatron.training imports typing.override (Python 3.12)
cat > "$SITE/sitecustomize.py" <<'PY'
import typing
if not hasattr(typing, 'override'):
    typing.override = lambda f: f
PY
python3 -c 'import importlib.util as u; print({m: u.find_spec(m) is not None for m in ["transformer_engine", "apex", "fused_weight_gradient_mlp_cuda", "scaled_masked_softmax_cuda", "flash_attn"]})'
export PYTHONPATH="$INT/mlm:$SITE" PYTHON=python3 PRETRAIN="$INT/mlm/pretrain_gpt.py" MOCK_DATA=1 NNODES=1 NPROC_PER_NODE=1
export PYTHONDONTWRITEBYTECODE=1 PYTHONWARNINGS=ignore
run() {  # name folder seconds args...
    local name=$1 dir=$2 secs=$3; shift 3
    local work="$OUT/work-$name"; mkdir -p "$work"; cd "$work" || return
    local t0; t0=$(date +%s)
    MASTER_PORT=$((29500 + RANDOM % 1000)) timeout "$secs" bash "$dir/train.sh" "$@" > "$OUT/mcore-$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s"
    grep -E "iteration +[0-9]+/" "$OUT/mcore-$name.log" | sed -n '1p;2p;5p;10p;$p' | cut -c1-400
    grep -m2 -E "memory \(MB\)|max allocated" "$OUT/mcore-$name.log" | cut -c1-300
    grep -m3 -E "Error|error:|Traceback" "$OUT/mcore-$name.log" | cut -c1-300
    cd "$INT" && rm -rf "$work"
}
COMMON=(--log-interval 1 --eval-iters 0 --eval-interval 100000 --save-interval 100000 --save "" --load "")
if [ -n "${BEFORE:-}" ]; then
    run before "$BEFORE" 90 --train-iters 3 "${COMMON[@]}"
fi
want tiny-bf16 && run tiny-bf16 "$INT/out/tiny-bf16" 150 --train-iters 40 "${COMMON[@]}"
want mixtral-small && run mixtral-small "$INT/out/mixtral-small" 200 --train-iters 30 "${COMMON[@]}"
# The same Mixtral-shaped model (8 x 1024 tokens a step, bf16) in `fmoec run`, same GPU and call.
if want fmoec && [ -x "$INT/fmoec" ]; then
    . "$ROOT/.ci/cuda-libs.sh"
    for p in bf16 fp8; do
        t0=$(date +%s)
        timeout 200 "$INT/fmoec" run "$INT/models/mixtral-small-run.fmoe" --device cuda --steps 30 \
            --precision "$p" --out "$OUT/fmoec-$p" --log-interval 0 > "$OUT/fmoec-$p.log" 2>&1
        echo "== fmoec run $p: exit $? after $(( $(date +%s) - t0 )) s"
        grep -E "^step (1|2|10|30) of|^steps|^loss|^device|note" "$OUT/fmoec-$p.log" | cut -c1-300
    done
fi
date -u
