{#- Included by every train.sh: the files the model file names as the defaults of DATA_PATH,
    VOCAB_FILE and MERGE_FILE (view.rs's LaunchFiles: absolute paths as shell words). What
    train.sh does without a default is its own. #}
{%- if v.files.any %}
# The files the model file names, as `fmoec run` reads them: a relative path is taken from the
# folder `fmoec emit` ran in and written absolute, since this script runs in the Megatron-LM
# checkout.
{%- endif %}
{%- match v.files.data_path %}
{%- when Some with (file) %}
# The dataset (megatron("prefix")); DATA_PATH overrides it.
DATA_PATH="${DATA_PATH:-}"
[ -n "${DATA_PATH}" ] || DATA_PATH={{ file.word }}
{%- when None %}
{%- endmatch %}
{%- match v.files.vocab_file %}
{%- when Some with (file) %}
# The tokenizer (gpt2(vocab, merges)); VOCAB_FILE and MERGE_FILE override it.
VOCAB_FILE="${VOCAB_FILE:-}"
[ -n "${VOCAB_FILE}" ] || VOCAB_FILE={{ file.word }}
{%- when None %}
{%- endmatch %}
{%- match v.files.merge_file %}
{%- when Some with (file) %}
MERGE_FILE="${MERGE_FILE:-}"
[ -n "${MERGE_FILE}" ] || MERGE_FILE={{ file.word }}
{%- when None %}
{%- endmatch %}
