//! `fmoec run`: command-line arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::driver::{self, DiagFormat};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The model file.
    pub file: PathBuf,
    /// How diagnostics are printed.
    #[arg(long, value_enum, default_value_t)]
    pub diagnostics: DiagFormat,
}

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let _loaded = match driver::load(&args.file, args.diagnostics) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    anyhow::bail!("`fmoec run` is not implemented yet")
}
