//! `fmoec tokenizer train`: a byte-level BPE tokenizer (GPT-2's scheme: byte-level
//! pre-tokenizer with GPT-2's pattern, no prefix space, byte-level decoder) trained by the
//! `tokenizers` crate, written as `tokenizer.json` + `tokenizer_config.json` (what
//! transformers' `AutoTokenizer` and Megatron-Core's `HuggingFaceTokenizer` read) and as
//! GPT-2's `vocab.json` + `merges.txt` (what Megatron-LM v2.2's `GPT2BPETokenizer` reads).
//! Knows nothing about datasets or models.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Model, Tokenizer};

use super::cli::TrainArgs;
use super::preprocess::InputFormat;
use crate::diag::path_text;

/// The documents of the corpus, in order.
fn corpus(args: &TrainArgs) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    if let Some(name) = &args.builtin {
        let bytes = super::corpus::builtin_text(name)?;
        docs.push(String::from_utf8(bytes).context("the embedded corpus is not UTF-8")?);
    }
    for path in &args.files {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read `{}` as UTF-8 text", path_text(path)))?;
        match InputFormat::of(path) {
            InputFormat::Text => docs.push(text),
            InputFormat::Jsonl => {
                for (i, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(line).with_context(|| {
                        format!("{}:{}: not a JSON object", path_text(path), i + 1)
                    })?;
                    match v.get(&args.json_key) {
                        Some(serde_json::Value::String(s)) => docs.push(s.clone()),
                        _ => bail!(
                            "{}:{}: no string under the key `{}`",
                            path_text(path),
                            i + 1,
                            args.json_key
                        ),
                    }
                }
            }
        }
    }
    if docs.is_empty() {
        bail!("no corpus: name files, or --builtin shakespeare");
    }
    Ok(docs)
}

/// The files `train` writes into its output folder.
pub const TRAINED_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
];

/// Trains and writes the tokenizer; returns the files written.
pub fn train(args: &TrainArgs) -> Result<Vec<PathBuf>> {
    let targets = check_args(args)?;
    let docs = corpus(args)?;
    let tokenizer = train_bpe(args, &docs)?;
    write_files(args, &tokenizer)?;
    Ok(targets)
}

/// Refuses what cannot be trained or would overwrite files unasked; returns the files
/// training will write.
fn check_args(args: &TrainArgs) -> Result<Vec<PathBuf>> {
    if args.special_tokens.is_empty() {
        bail!("name at least one special token (the end-of-document token)");
    }
    let floor = ByteLevel::alphabet().len() + args.special_tokens.len();
    if args.vocab_size < floor {
        bail!(
            "--vocab-size {} is below the {} byte tokens and {} special tokens it must hold",
            args.vocab_size,
            ByteLevel::alphabet().len(),
            args.special_tokens.len()
        );
    }
    let targets: Vec<PathBuf> = TRAINED_FILES.iter().map(|f| args.out.join(f)).collect();
    if !args.overwrite {
        if let Some(p) = targets.iter().find(|p| p.exists()) {
            bail!("`{}` exists; pass --overwrite to replace it", path_text(p));
        }
    }
    Ok(targets)
}

/// The special tokens of `--special-tokens`, in order.
fn special_tokens(args: &TrainArgs) -> Vec<AddedToken> {
    args.special_tokens
        .iter()
        .map(|t| AddedToken::from(t.clone(), true))
        .collect()
}

/// A byte-level BPE tokenizer (GPT-2's scheme) trained on `docs`, with a spinner meanwhile.
fn train_bpe(args: &TrainArgs, docs: &[String]) -> Result<Tokenizer> {
    let special = special_tokens(args);
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(args.vocab_size)
            .min_frequency(args.min_frequency)
            .show_progress(false)
            .special_tokens(special.clone())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, true, true)));
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!(
        "training BPE on {} documents ({} bytes)",
        docs.len(),
        docs.iter().map(String::len).sum::<usize>()
    ));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let trained = tokenizer.train(&mut trainer, docs.iter());
    spinner.finish_and_clear();
    trained.map_err(|e| anyhow::anyhow!("training failed: {e}"))?;
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}

/// Writes [`TRAINED_FILES`] into `--out`: `tokenizer.json` and its config, and GPT-2's
/// files through the model's own writer (in a hidden folder, then moved into place).
fn write_files(args: &TrainArgs, tokenizer: &Tokenizer) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create `{}`", path_text(&args.out)))?;
    let json = tokenizer
        .to_string(true)
        .map_err(|e| anyhow::anyhow!("cannot serialize the tokenizer: {e}"))?;
    let staging = tempfile_dir(&args.out)?;
    let saved = tokenizer
        .get_model()
        .save(&staging, None)
        .map_err(|e| anyhow::anyhow!("cannot write vocab.json/merges.txt: {e}"));
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = args.out.join(name);
        crate::driver::write_atomic(&p, bytes)
            .with_context(|| format!("cannot write `{}`", path_text(&p)))
    };
    let result = (|| -> Result<()> {
        saved?;
        write("tokenizer.json", json.as_bytes())?;
        write(
            "tokenizer_config.json",
            format!("{}\n", serde_json::to_string_pretty(&config(args))?).as_bytes(),
        )?;
        for name in ["vocab.json", "merges.txt"] {
            let bytes = std::fs::read(staging.join(name))
                .with_context(|| format!("cannot read the trainer's `{name}`"))?;
            write(name, &bytes)?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// `tokenizer_config.json`: the first special token is every role's token.
fn config(args: &TrainArgs) -> serde_json::Value {
    let eos = &args.special_tokens[0];
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": eos,
        "model_max_length": 1_000_000_000_000_000_000u64,
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
    })
}

/// A fresh hidden folder inside `out` for the model's own writer.
fn tempfile_dir(out: &std::path::Path) -> Result<PathBuf> {
    let dir = out.join(format!(".fmoec-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create `{}`", path_text(&dir)))?;
    Ok(dir)
}
