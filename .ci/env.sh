# Sourced by the other .ci scripts: makes libtorch 2.11 available to cargo and to the
# built binary. libtorch comes from PyPI's torch==2.11.0, installed once into a virtualenv
# outside the clone (FMOEC_VENV, default ~/.cache/fmoec/venv) and reused afterwards.

FMOEC_VENV="${FMOEC_VENV:-$HOME/.cache/fmoec/venv}"
FMOEC_TORCH_VERSION="2.11.0"

fmoec_ensure_venv() {
    if [ -x "$FMOEC_VENV/bin/python" ] &&
        "$FMOEC_VENV/bin/python" -c "import torch, numpy, pytest, transformers, psutil, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$FMOEC_TORCH_VERSION' else 1)" 2>/dev/null; then
        return 0
    fi
    # transformers: tests/runtime/data.rs loads `fmoec export --hf` folders with it (about 60 MB more)
    # psutil: Megatron-Core's dist_checkpointing refuses to save without it (tests/megatron_core)
    echo "setting up libtorch: torch==$FMOEC_TORCH_VERSION (and transformers) into $FMOEC_VENV (about 2 minutes, 4.7 GB; once)" >&2
    mkdir -p "$(dirname "$FMOEC_VENV")"
    [ -x "$FMOEC_VENV/bin/python" ] || python3 -m venv "$FMOEC_VENV" || return 1
    "$FMOEC_VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
        "torch==$FMOEC_TORCH_VERSION" numpy pytest "transformers==5.25.0" psutil || return 1
}

fmoec_export_env() {
    export LIBTORCH_USE_PYTORCH=1
    export PATH="$FMOEC_VENV/bin:$PATH"
    local torch_lib
    torch_lib="$("$FMOEC_VENV/bin/python" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" || return 1
    # torch's CUDA libraries (libnvrtc: the fused kernels' source is compiled in a test)
    local cuda_lib="$torch_lib/../../nvidia/cu13/lib"
    if [ -d "$cuda_lib" ]; then torch_lib="$torch_lib:$(cd "$cuda_lib" && pwd)"; fi
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export FMOEC_PYTHON="$FMOEC_VENV/bin/python"
}

# Megatron-Core for the core_v0.19 target's tests: PyPI's megatron-core 0.19.0 wheel (the code of
# tag core_v0.19.0; 2.4 MB) unzipped beside the venv's torch, not installed (it asks for Python
# 3.12; megatron.core and megatron.training run on the venv's 3.11, see tests/megatron_core).
# Exports FMOEC_MEGATRON_CORE_PKG, which tests/compiler/emit_python.rs and emit_megatron.rs read.
FMOEC_MEGATRON_CORE_VERSION="0.19.0"

fmoec_megatron_core() {
    local dir="${FMOEC_MEGATRON_CORE_DIR:-$HOME/.cache/fmoec/megatron-core-$FMOEC_MEGATRON_CORE_VERSION}"
    if [ ! -f "$dir/megatron/core/__init__.py" ]; then
        echo "fetching megatron-core==$FMOEC_MEGATRON_CORE_VERSION (the wheel, unzipped into $dir)" >&2
        local wheels
        wheels="$(mktemp -d)" || return 1
        "$FMOEC_VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: --python-version 3.12 -d "$wheels" \
            "megatron-core==$FMOEC_MEGATRON_CORE_VERSION" || return 1
        rm -rf "$dir.partial" && mkdir -p "$dir.partial" &&
            "$FMOEC_VENV/bin/python" -m zipfile -e "$wheels"/megatron_core-*.whl "$dir.partial" &&
            rm -rf "$dir" && mv "$dir.partial" "$dir" || return 1
        rm -rf "$wheels"
    fi
    export FMOEC_MEGATRON_CORE_PKG="$dir"
}
