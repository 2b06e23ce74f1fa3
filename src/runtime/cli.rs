//! `fmoec run`: command-line arguments, and the edge between them and [`super::train`].

use std::path::PathBuf;
use std::process::ExitCode;

use crate::check::Precision;
use crate::driver::{self, DiagFormat};
use crate::runtime::train::{self, RunOptions, SampleOptions};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The model file (with a `train` block).
    pub file: PathBuf,
    /// How diagnostics are printed.
    #[arg(long, value_enum, default_value_t)]
    pub diagnostics: DiagFormat,
    /// Where to run: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Total training steps (the schedule's length); default: the file's `steps`.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Stop with a checkpoint after this many completed steps, keeping the schedule of `--steps`.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Continue from a checkpoint: a `step-*` directory, or (without a value) the latest one in
    /// the run's checkpoint folder.
    #[arg(long, num_args = 0..=1, value_name = "DIR")]
    pub resume: Option<Option<PathBuf>>,
    /// Output folder for metrics.jsonl, summary.json, plot.png and checkpoints/ (default:
    /// `runs/<model name>`, with checkpoints in the train block's `checkpoint` dir if it names one).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Generate text after PROMPT from the latest checkpoint (or `--resume DIR`) instead of training.
    #[arg(long, value_name = "PROMPT")]
    pub sample: Option<String>,
    /// Bytes to generate with `--sample`.
    #[arg(long, default_value_t = 400)]
    pub sample_tokens: usize,
    /// Sampling temperature (0 picks the most likely byte).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample among the k most likely bytes.
    #[arg(long, default_value_t = 40)]
    pub top_k: i64,
    /// Seed for `--sample`.
    #[arg(long, default_value_t = 0)]
    pub sample_seed: u64,
    /// Override the train block's precision (`fp32`, or `bf16` compute with fp32 master weights).
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `--precision` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    Fp32,
    Bf16,
}

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let loaded = match driver::load(&args.file, args.diagnostics) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let mut checked = loaded.checked.clone();
    if let (Some(p), Some(train)) = (args.precision, checked.train.as_mut()) {
        train.precision = match p {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Bf16 => Precision::Bf16,
        };
    }
    let checked = &checked;
    let device = super::parse_device(&args.device)?;
    // `--out` puts everything under one folder; without it, checkpoints go where the train
    // block's `checkpoint = every(n, dir = ...)` says, the rest to `runs/<model>`.
    let declared_dir = checked
        .train
        .as_ref()
        .and_then(|t| t.checkpoint.as_ref())
        .map(|c| PathBuf::from(&c.dir));
    let (out, checkpoints) = match (&args.out, declared_dir) {
        (Some(out), _) => (out.clone(), out.join("checkpoints")),
        (None, Some(dir)) => (PathBuf::from("runs").join(&checked.model.name), dir),
        (None, None) => {
            let out = PathBuf::from("runs").join(&checked.model.name);
            let ckpt = out.join("checkpoints");
            (out, ckpt)
        }
    };
    let resume = args
        .resume
        .as_ref()
        .map(|p| p.clone().unwrap_or_else(|| checkpoints.clone()));

    if let Some(prompt) = &args.sample {
        let text = train::sample(
            checked,
            &SampleOptions {
                device,
                checkpoint: resume.unwrap_or(checkpoints),
                prompt: prompt.clone(),
                tokens: args.sample_tokens,
                temperature: args.temperature,
                top_k: args.top_k,
                seed: args.sample_seed,
            },
        )?;
        println!("{prompt}{text}");
        return Ok(ExitCode::SUCCESS);
    }

    let summary = train::train(
        checked,
        &RunOptions {
            device,
            steps: args.steps,
            stop_after: args.stop_after,
            out,
            checkpoints,
            resume,
            progress: !args.quiet,
            print_summary: true,
        },
    )?;
    Ok(if summary.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}
