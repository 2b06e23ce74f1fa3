//! The `fmoec` command line: one subcommand per product verb, each delegating to its
//! phase's `cli` module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fmoec::driver::{self, DiagFormat};

/// fmoec: a compiler for Mixture-of-Experts training.
///
/// Declare a transformer with MoE layers and its GPU placement in a `.fmoe` file; fmoec
/// checks it, plans it, trains it, or emits a Megatron-LM patch for it.
#[derive(Debug, Parser)]
#[command(name = "fmoec", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check model files: every rule of the language and of the planner (on the file's own
    /// `parallel` block), every diagnostic in one pass.
    Check(CheckArgs),
    /// Print the parallel plan: rank grid, groups, expert placement, memory, traffic.
    Plan(fmoec::plan::cli::PlanArgs),
    /// Train the model with the built-in libtorch runtime.
    Run(RunArgs),
    /// Write the Megatron-LM patch, Python module and launch script for the model.
    Emit(fmoec::emit::cli::EmitArgs),
    /// Export a checkpoint for Hugging Face transformers (`fmoec export --hf OUT CHECKPOINT`).
    Export(ExportArgs),
    /// Preprocess text or JSON lines into Megatron-LM's indexed dataset (.bin/.idx).
    Data(fmoec::data::cli::DataArgs),
    /// Tokenizers: `fmoec tokenizer train` makes a byte-level BPE tokenizer from a corpus.
    #[command(subcommand)]
    Tokenizer(fmoec::data::cli::TokenizerCommand),
    /// Benchmarks (`fmoec bench moe`): the MoE layer against baselines, same process.
    #[cfg(feature = "runtime")]
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[cfg(feature = "runtime")]
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Time the MoE layer's expert path (forward, backward) against baselines.
    Moe(fmoec::runtime::bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Model files to check.
    #[arg(required = true)]
    files: Vec<std::path::PathBuf>,
    /// How diagnostics are printed: `human`, or `json` (one array for all the files).
    #[arg(long, value_enum, default_value_t)]
    diagnostics: DiagFormat,
    /// The old name of `--diagnostics` (every subcommand now says `--diagnostics`;
    /// `--format` is the format of a command's own output, as in `plan --format json`).
    #[arg(long, hide = true)]
    format: Option<String>,
}

#[cfg(feature = "runtime")]
use fmoec::runtime::cli::RunArgs;

/// Stand-in arguments for builds without the runtime: accepts anything, explains.
#[cfg(not(feature = "runtime"))]
#[derive(Debug, clap::Args)]
struct RunArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

fn check(args: &CheckArgs) -> ExitCode {
    if let Some(f) = &args.format {
        driver::report_error(
            &format!(
                "`fmoec check --format {f}` is now `--diagnostics {f}`, the name every \
                 subcommand uses (`--format` is the format of a command's own output)"
            ),
            None,
            args.diagnostics,
        );
        return ExitCode::from(2);
    }
    // 1: a file has errors; 2 (wins): a file could not be read at all.
    let mut worst = ExitCode::SUCCESS;
    for file in &args.files {
        let rules = driver::Rules {
            data_files: true,
            ..driver::Rules::AS_WRITTEN
        };
        match driver::load_with(file, args.diagnostics, rules) {
            Ok(_) => {
                if args.diagnostics == DiagFormat::Human {
                    fmoec::errln!("ok: {}", fmoec::diag::path_text(file));
                }
            }
            Err(code) => {
                if worst != ExitCode::from(2) {
                    worst = code;
                }
            }
        }
    }
    worst
}

#[cfg(feature = "runtime")]
fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    fmoec::runtime::cli::run(args)
}

#[cfg(not(feature = "runtime"))]
fn run(_args: &RunArgs) -> anyhow::Result<ExitCode> {
    fmoec::errln!(
        "error: this fmoec was built without the training runtime\n  \
         help: rebuild with the default features (`cargo build --release`), which need \
         libtorch 2.11 (see README.md, \"Training\")"
    );
    Ok(ExitCode::from(2))
}

#[cfg(feature = "runtime")]
use fmoec::hf::cli::ExportArgs;

/// Stand-in arguments for builds without the runtime: accepts anything, explains.
#[cfg(not(feature = "runtime"))]
#[derive(Debug, clap::Args)]
struct ExportArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

#[cfg(feature = "runtime")]
fn export(args: &ExportArgs) -> anyhow::Result<ExitCode> {
    fmoec::hf::cli::run(args)
}

#[cfg(not(feature = "runtime"))]
fn export(_args: &ExportArgs) -> anyhow::Result<ExitCode> {
    fmoec::errln!(
        "error: this fmoec was built without the runtime, which reads checkpoints\n  \
         help: rebuild with the default features (`cargo build --release`)"
    );
    Ok(ExitCode::from(2))
}

/// The `--diagnostics` format of the command (human for those without one).
fn diagnostics_format(command: &Command) -> DiagFormat {
    match command {
        Command::Check(a) => a.diagnostics,
        Command::Plan(a) => a.diagnostics,
        Command::Emit(a) => a.diagnostics,
        #[cfg(feature = "runtime")]
        Command::Run(a) => a.diagnostics,
        _ => DiagFormat::Human,
    }
}

/// Whether the command line asks for `--diagnostics json`, read from the raw arguments
/// (before `--`): clap refuses some command lines before any subcommand's arguments exist.
fn json_diagnostics_asked(args: &[std::ffi::OsString]) -> bool {
    let args: Vec<_> = args.iter().skip(1).take_while(|a| *a != "--").collect();
    args.iter().enumerate().any(|(i, a)| {
        *a == "--diagnostics=json"
            || (*a == "--diagnostics" && args.get(i + 1).is_some_and(|next| *next == "json"))
    })
}

/// clap's refusal of a command line (an unknown flag, a bad value, a missing file): its own
/// text, unless `--diagnostics json` was asked for; then one JSON diagnostic like every
/// other error of the command, so that a tool reading JSON never gets text. Same exit code.
fn refuse_command_line(e: clap::Error, args: &[std::ffi::OsString]) -> ExitCode {
    if !e.use_stderr() || !json_diagnostics_asked(args) {
        e.exit()
    }
    let text = e.render().to_string();
    let mut paragraphs = text.split("\n\n");
    let first = paragraphs.next().unwrap_or_default();
    let message = first
        .trim()
        .trim_start_matches("error:")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    // clap's `tip:` lines (a similar flag, how to pass a value that looks like one)
    let tips: Vec<&str> = paragraphs
        .flat_map(str::lines)
        .filter_map(|l| l.trim().strip_prefix("tip:"))
        .map(str::trim)
        .collect();
    let help = (!tips.is_empty()).then(|| tips.join("; "));
    driver::report_error_with_help(&message, help.as_deref(), DiagFormat::Json);
    driver::finish(DiagFormat::Json);
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return refuse_command_line(e, &args),
    };
    let format = diagnostics_format(&cli.command);
    driver::report_panics(format);
    let result = std::panic::catch_unwind(|| {
        driver::panic_if_asked("main");
        dispatch(&cli.command)
    });
    let code = match result {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            driver::report_error(&format!("{e:#}"), None, format);
            ExitCode::from(1)
        }
        // reported by the hook; 101 as Rust's own exit after a panic
        Err(_) => ExitCode::from(101),
    };
    driver::finish(format);
    code
}

fn dispatch(command: &Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check(a) => Ok(check(a)),
        Command::Plan(a) => fmoec::plan::cli::run(a),
        Command::Run(a) => run(a),
        Command::Emit(a) => fmoec::emit::cli::run(a),
        Command::Export(a) => export(a),
        Command::Data(a) => fmoec::data::cli::run_data(a),
        Command::Tokenizer(c) => fmoec::data::cli::run_tokenizer(c),
        #[cfg(feature = "runtime")]
        Command::Bench(BenchCommand::Moe(a)) => fmoec::runtime::bench::run_cli(a),
    }
}
