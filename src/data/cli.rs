//! The command lines of `fmoec data` (Megatron-LM's `tools/preprocess_data.py`, with its
//! option names) and `fmoec tokenizer train` (the `tokenizers` crate's BPE trainer).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use super::preprocess::{InputFormat, Preprocess, Summary};
use super::tokenizer::{Flavour, TextTokenizer, TokenizerSource, GPT2_EOD};
use crate::diag::path_text;

/// `fmoec data`: text or JSON lines into Megatron-LM's indexed dataset (`.bin`/`.idx`).
///
/// Writes `{output-prefix}_{key}_document.bin` and `.idx` for each JSON key, the bytes
/// Megatron-LM's `tools/preprocess_data.py` writes for the same input and tokenizer.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    fmoec data --input corpus.jsonl --tokenizer tokenizer.json --append-eod --output-prefix data/corpus\n  \
    fmoec data --input corpus.jsonl --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \\\n             \
    --append-eod --megatron v2.2 --output-prefix data/corpus")]
pub struct DataArgs {
    /// Input files: JSON lines (`.json`, `.jsonl`, `.ndjson`; one document per line) or
    /// plain text (anything else; the file is one document).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Output path prefix: writes PREFIX_KEY_document.bin and .idx.
    #[arg(long)]
    pub output_prefix: String,
    /// A Hugging Face tokenizer.json.
    #[arg(long, conflicts_with_all = ["vocab_file", "merge_file"], required_unless_present = "vocab_file")]
    pub tokenizer: Option<PathBuf>,
    /// GPT-2's vocab.json (Megatron's GPT2BPETokenizer); needs --merge-file.
    #[arg(long, requires = "merge_file")]
    pub vocab_file: Option<PathBuf>,
    /// GPT-2's merges.txt.
    #[arg(long, requires = "vocab_file")]
    pub merge_file: Option<PathBuf>,
    /// JSON keys to read, each into its own dataset.
    #[arg(long, num_args = 1.., default_value = "text")]
    pub json_keys: Vec<String>,
    /// Append the end-of-document token to every document.
    #[arg(long)]
    pub append_eod: bool,
    /// The end-of-document token [default: the eos_token of a tokenizer_config.json
    /// beside the tokenizer, else <|endoftext|>].
    #[arg(long)]
    pub eod_token: Option<String>,
    /// Which Megatron-LM's script to reproduce byte for byte (they differ on `<|endoftext|>`
    /// inside GPT-2 text and on empty documents).
    #[arg(long, value_enum, default_value_t)]
    pub megatron: Flavour,
    /// How to read the inputs [default: by extension].
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,
    /// Megatron's NLTK sentence splitting (not supported: refused with an explanation).
    #[arg(long, hide = true)]
    pub split_sentences: bool,
    /// With --split-sentences in Megatron (not supported).
    #[arg(long, hide = true)]
    pub keep_newlines: bool,
}

/// The tokenizer named by `--tokenizer` or `--vocab-file`/`--merge-file`.
fn tokenizer_source(
    tokenizer: &Option<PathBuf>,
    vocab: &Option<PathBuf>,
    merges: &Option<PathBuf>,
) -> Result<TokenizerSource> {
    match (tokenizer, vocab, merges) {
        (Some(t), _, _) => Ok(TokenizerSource::Json(t.clone())),
        (None, Some(v), Some(m)) => Ok(TokenizerSource::Gpt2 {
            vocab: v.clone(),
            merges: m.clone(),
        }),
        _ => {
            bail!("name a tokenizer: --tokenizer tokenizer.json, or --vocab-file and --merge-file")
        }
    }
}

fn thread_pool(workers: Option<usize>) -> Result<rayon::ThreadPool> {
    if workers == Some(0) {
        bail!("--workers must be at least 1");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(workers.unwrap_or(0))
        .build()
        .context("cannot start the worker threads")
}

pub fn run_data(args: &DataArgs) -> Result<ExitCode> {
    if args.split_sentences || args.keep_newlines {
        bail!(
            "--split-sentences is not supported: Megatron-LM splits sentences with NLTK's \
             punkt model, which fmoec does not reproduce; split the documents yourself into \
             JSON lists of sentences (Megatron-Core's sentence-split input), which `fmoec data` \
             reads"
        );
    }
    let source = tokenizer_source(&args.tokenizer, &args.vocab_file, &args.merge_file)?;
    if matches!(source, TokenizerSource::Json(_)) && args.megatron == Flavour::V2_2 {
        bail!(
            "Megatron-LM v2.2's script has no Hugging Face tokenizers (only GPT2BPETokenizer \
             and BERT's); use --vocab-file/--merge-file, or --megatron core"
        );
    }
    let tokenizer = TextTokenizer::load(&source, args.megatron)?;
    let eod = end_of_document(args, &tokenizer)?;
    let pool = thread_pool(args.workers)?;
    let job = Preprocess {
        inputs: &args.input,
        format: args.format,
        json_keys: &args.json_keys,
        tokenizer: &tokenizer,
        flavour: args.megatron,
        eod,
        output_prefix: &args.output_prefix,
        overwrite: args.overwrite,
        progress: true,
    };
    crate::errln!(
        "tokenizer {} (vocabulary {}, {} ids), {} worker threads",
        source,
        tokenizer.vocab_size,
        super::indexed::TokenDType::for_vocab(tokenizer.vocab_size).name(),
        pool.current_num_threads()
    );
    let summary = pool.install(|| job.run())?;
    report(&summary);
    Ok(ExitCode::SUCCESS)
}

/// The id `--append-eod` appends: `--eod-token`, else the eos_token of the tokenizer's
/// config, else GPT-2's; `None` without `--append-eod`.
fn end_of_document(args: &DataArgs, tokenizer: &TextTokenizer) -> Result<Option<u32>> {
    if !args.append_eod {
        return Ok(None);
    }
    let name = args
        .eod_token
        .clone()
        .or_else(|| tokenizer.config_eos())
        .unwrap_or_else(|| GPT2_EOD.to_string());
    let id = tokenizer
        .eod(Some(&name))
        .with_context(|| "--append-eod needs one: name it with --eod-token".to_string())?;
    Ok(Some(id))
}

/// What a finished run read (stderr) and wrote (stdout, a line per dataset).
fn report(summary: &Summary) {
    let mb = summary.bytes as f64 / 1e6;
    crate::errln!(
        "{} documents, {:.1} MB in {:.2} s ({:.1} MB/s){}",
        summary.documents,
        mb,
        summary.seconds,
        mb / summary.seconds.max(1e-9),
        if summary.blank_lines > 0 {
            format!("; {} blank lines skipped", summary.blank_lines)
        } else {
            String::new()
        }
    );
    for out in &summary.outputs {
        crate::outln!(
            "{}: {} documents, {} sequences, {} tokens -> {} / {}",
            out.key,
            out.documents,
            out.sequences,
            out.tokens,
            path_text(&out.bin),
            path_text(&out.idx)
        );
    }
}

/// `fmoec tokenizer`: make and inspect tokenizers.
#[derive(Debug, clap::Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (GPT-2's scheme) on a corpus.
    Train(TrainArgs),
}

/// `fmoec tokenizer train`: writes OUT/tokenizer.json, tokenizer_config.json, and GPT-2's
/// vocab.json + merges.txt, for `tokenizer = hf(...)`, `fmoec data` and Megatron-LM.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  fmoec tokenizer train --builtin shakespeare --vocab-size 4096 -o tok/"
)]
pub struct TrainArgs {
    /// Corpus files: JSON lines (the --json-key of each line) or plain text.
    pub files: Vec<PathBuf>,
    /// Train on an embedded corpus (`shakespeare`).
    #[arg(long)]
    pub builtin: Option<String>,
    /// Output folder.
    #[arg(short, long)]
    pub out: PathBuf,
    /// Vocabulary size, special tokens and the 256 byte tokens included.
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    /// Pairs seen fewer times are not merged.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// The key of JSON-lines corpora.
    #[arg(long, default_value = "text")]
    pub json_key: String,
    /// Special tokens, first ids first; the first is the end-of-document (eos) token.
    #[arg(long, num_args = 1.., default_value = GPT2_EOD)]
    pub special_tokens: Vec<String>,
    /// Replace existing files in OUT.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run_tokenizer(cmd: &TokenizerCommand) -> Result<ExitCode> {
    match cmd {
        TokenizerCommand::Train(args) => {
            let written = super::train::train(args)?;
            for p in written {
                crate::outln!("wrote {}", path_text(&p));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
