#!/usr/bin/env bash
# Benchmark of `fmoec data` against Megatron-LM's tools/preprocess_data.py (v2.2 and
# core_v0.19.0), one run, same machine, same corpus and tokenizer; the outputs are also
# compared byte for byte. Developer tool: needs the Megatron trees and Python environments
# that tests/data_golden/megatron_check.sh describes.
#
#   MLM22=/tmp/mlm22 MLMCORE=/tmp/mlmcore PY22=... PYCORE=... FMOEC=target/release/fmoec \
#     bash .ci/bench-data.sh [MEGABYTES] [WORKERS]
#
# The corpus: the embedded Shakespeare cut into documents of about 3 kB (paragraph runs), with
# every tenth document given lines of other scripts and emoji, repeated to MEGABYTES (default
# 32) of JSON lines. The tokenizer: `fmoec tokenizer train --builtin shakespeare --vocab-size
# 16384`. Megatron runs with --workers WORKERS (default: the core count), fmoec with as many
# threads.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MLM22:?}" "${MLMCORE:?}" "${PY22:?}" "${PYCORE:?}" "${FMOEC:?}"
FMOEC="$(cd "$(dirname "$FMOEC")" && pwd)/$(basename "$FMOEC")"
mb="${1:-32}"
workers="${2:-$(nproc)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 - "$work/corpus.jsonl" "$mb" <<'EOF'
import gzip, json, sys
out, mb = sys.argv[1], int(sys.argv[2])
text = gzip.open("data/shakespeare.txt.gz", "rt", encoding="utf-8").read()
paras = [p for p in text.split("\n\n") if p.strip()]
extra = "Ελληνικά русский 中文字符 日本語のテキスト हिन्दी 👍🏽 🤖 naïve café Straße 4,567.89 it's"
docs, cur = [], []
for p in paras:
    cur.append(p)
    if sum(map(len, cur)) > 3000:
        docs.append("\n\n".join(cur))
        cur = []
with open(out, "w", encoding="utf-8") as f:
    written, i = 0, 0
    while written < mb * 1_000_000:
        d = docs[i % len(docs)]
        if i % 10 == 0:
            d = d + "\n" + extra
        line = json.dumps({"text": d}, ensure_ascii=False) + "\n"
        f.write(line)
        written += len(line.encode("utf-8"))
        i += 1
print(f"corpus: {i} documents, {written / 1e6:.1f} MB")
EOF
"$FMOEC" tokenizer train --builtin shakespeare --vocab-size 16384 -o "$work/tok" >/dev/null
mkdir -p "$work/run/gpt2" "$work/out"
echo '{"model_type": "gpt2"}' > "$work/run/gpt2/config.json"
tok=(--vocab-file "$work/tok/vocab.json" --merge-file "$work/tok/merges.txt")

timed() {
  local name="$1"; shift
  local start end
  start=$(date +%s.%N)
  "$@" >"$work/out/$name.log" 2>&1 || { echo "$name failed:"; tail -20 "$work/out/$name.log"; exit 1; }
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.2f}')"
}

echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), workers $workers, $(date -u +%F)"
t22=$(cd "$MLM22" && timed megatron-v2.2 "$PY22" tools/preprocess_data.py --input "$work/corpus.jsonl" \
  --output-prefix "$work/out/m22" --tokenizer-type GPT2BPETokenizer "${tok[@]}" --dataset-impl mmap \
  --workers "$workers" --append-eod --log-interval 1000000)
f22=$(timed fmoec-v2.2 "$FMOEC" data --megatron v2.2 --input "$work/corpus.jsonl" \
  --output-prefix "$work/out/f22" "${tok[@]}" --append-eod --workers "$workers")
tcore=$(cd "$work/run" && HF_HUB_OFFLINE=1 timed megatron-core "$PYCORE" "$MLMCORE/tools/preprocess_data.py" \
  --input "$work/corpus.jsonl" --output-prefix "$work/out/mc" --tokenizer-type GPT2BPETokenizer \
  "${tok[@]}" --workers "$workers" --append-eod --log-interval 1000000)
fcore=$(timed fmoec-core "$FMOEC" data --input "$work/corpus.jsonl" --output-prefix "$work/out/fc" \
  "${tok[@]}" --append-eod --workers "$workers")
for pair in "m22 f22" "mc fc"; do
  set -- $pair
  for ext in bin idx; do
    cmp -s "$work/out/$1_text_document.$ext" "$work/out/$2_text_document.$ext" \
      && echo "same bytes: $1 / $2 .$ext" || { echo "DIFFERENT: $1 / $2 .$ext"; exit 1; }
  done
done
python3 - "$t22" "$f22" "$tcore" "$fcore" <<'EOF'
import sys
t22, f22, tc, fc = map(float, sys.argv[1:])
print(f"Megatron v2.2 script    {t22:8.2f} s   fmoec data --megatron v2.2  {f22:7.2f} s   {t22 / f22:5.1f}x")
print(f"Megatron-Core script    {tc:8.2f} s   fmoec data                 {fc:7.2f} s   {tc / fc:5.1f}x")
EOF
