#!/usr/bin/env bash
# Developer check (not run by CI, which has no Megatron-LM tree): runs Megatron-LM's own
# tools/preprocess_data.py (v2.2 and core_v0.19.0) and `fmoec data` on the same inputs and
# tokenizers, and compares the .bin/.idx files byte for byte. With --bless it then copies
# Megatron's outputs into expected/ (the golden files tests/runtime/data.rs compares against).
#
#   MLM22=/tmp/mlm22 MLMCORE=/tmp/mlmcore PY22=... PYCORE=... FMOEC=target/release/fmoec \
#     bash tests/data_golden/megatron_check.sh [--bless]
#
# MLM22 / MLMCORE: checkouts of Megatron-LM 8aa4619f (v2.2) and core_v0.19.0. PY22: a Python
# with torch, numpy<1.24 (v2.2 uses np.float), regex, six and nltk (v2.2 imports it even
# without sentence splitting). PYCORE: a Python with torch, numpy, transformers, nltk, and
# typing.override (Megatron-Core's training package wants Python 3.12; on 3.11 a
# sitecustomize.py can set it from typing_extensions). Megatron-Core's GPT2BPETokenizer loads
# transformers' "gpt2" tokenizer class by name; offline, the script runs in a folder holding
# gpt2/config.json = {"model_type": "gpt2"} (which picks GPT2TokenizerFast; the vocabulary
# and merges are the files passed).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${MLM22:?checkout of Megatron-LM v2.2}" "${MLMCORE:?checkout of Megatron-LM core_v0.19.0}"
: "${PY22:?python for v2.2}" "${PYCORE:?python for Megatron-Core}" "${FMOEC:?fmoec binary}"
FMOEC="$(cd "$(dirname "$FMOEC")" && pwd)/$(basename "$FMOEC")"
bless=0
[ "${1:-}" = "--bless" ] && bless=1

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 "$here/make_corpus.py" "$work" --pad-vocab "$here/tok"
mkdir -p "$work/run/gpt2"
echo '{"model_type": "gpt2"}' > "$work/run/gpt2/config.json"
tok="$here/tok"
gpt2=(--vocab-file "$tok/vocab.json" --merge-file "$tok/merges.txt")
gpt2_wide=(--vocab-file "$work/vocab-65500.json" --merge-file "$tok/merges.txt")

# name | megatron | input | tokenizer flags (as both tools spell them) | extra flags
cases=(
  "v22-gpt2|v2.2|corpus.jsonl|gpt2|--append-eod --json-keys text title"
  "v22-gpt2-edge|v2.2|edge.jsonl|gpt2|"
  "v22-gpt2-int32|v2.2|corpus.jsonl|gpt2_wide|--append-eod"
  "core-gpt2|core|corpus.jsonl|gpt2|--append-eod --json-keys text title"
  "core-gpt2-edge|core|edge.jsonl|gpt2|--append-eod"
  "core-gpt2-sentences|core|sentences.jsonl|gpt2|--append-eod"
  "core-hf|core|corpus.jsonl|hf|--append-eod"
)

fail=0
for case in "${cases[@]}"; do
  IFS='|' read -r name flavour input tokname extra <<<"$case"
  case "$tokname" in
    gpt2) mtok=(--tokenizer-type GPT2BPETokenizer "${gpt2[@]}"); ftok=("${gpt2[@]}") ;;
    gpt2_wide) mtok=(--tokenizer-type GPT2BPETokenizer "${gpt2_wide[@]}"); ftok=("${gpt2_wide[@]}") ;;
    hf) mtok=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$tok"); ftok=(--tokenizer "$tok/tokenizer.json") ;;
  esac
  # shellcheck disable=SC2206
  extra_args=($extra)
  mkdir -p "$work/megatron/$name" "$work/fmoec/$name"
  if [ "$flavour" = "v2.2" ]; then
    (cd "$MLM22" && "$PY22" tools/preprocess_data.py --input "$work/$input" \
      --output-prefix "$work/megatron/$name/out" "${mtok[@]}" --dataset-impl mmap \
      --workers 2 "${extra_args[@]}" >"$work/megatron/$name/log" 2>&1)
  else
    (cd "$work/run" && HF_HUB_OFFLINE=1 "$PYCORE" "$MLMCORE/tools/preprocess_data.py" \
      --input "$work/$input" --output-prefix "$work/megatron/$name/out" "${mtok[@]}" \
      --workers 2 "${extra_args[@]}" >"$work/megatron/$name/log" 2>&1)
  fi
  "$FMOEC" data --megatron "$flavour" --input "$work/$input" \
    --output-prefix "$work/fmoec/$name/out" "${ftok[@]}" "${extra_args[@]}" \
    >"$work/fmoec/$name/log" 2>&1
  for f in "$work/megatron/$name"/*.bin "$work/megatron/$name"/*.idx; do
    base="$(basename "$f")"
    if cmp -s "$f" "$work/fmoec/$name/$base"; then
      echo "same      $name/$base ($(stat -c %s "$f") bytes)"
    else
      echo "DIFFERENT $name/$base"
      fail=1
    fi
  done
  if [ "$bless" = 1 ]; then
    mkdir -p "$here/expected/$name"
    cp "$work/megatron/$name"/*.bin "$work/megatron/$name"/*.idx "$here/expected/$name/"
  fi
done
exit "$fail"
