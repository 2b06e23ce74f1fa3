//! `fmoec emit`: command-line arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::driver::{self, DiagFormat};

#[derive(Debug, clap::Args)]
pub struct EmitArgs {
    /// The model file.
    pub file: PathBuf,
    /// Megatron-LM release to target.
    #[arg(long, value_name = "VERSION")]
    pub megatron: String,
    /// Output folder.
    #[arg(short, long, default_value = "out")]
    pub output: PathBuf,
    /// How diagnostics are printed.
    #[arg(long, value_enum, default_value_t)]
    pub diagnostics: DiagFormat,
}

pub fn run(args: &EmitArgs) -> anyhow::Result<ExitCode> {
    let _loaded = match driver::load(&args.file, args.diagnostics) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    anyhow::bail!("`fmoec emit` is not implemented yet")
}
