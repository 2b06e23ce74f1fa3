//! `fmoec plan`: command-line arguments and output.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::driver::{self, DiagFormat};

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The model file.
    pub file: PathBuf,
    /// How diagnostics are printed.
    #[arg(long, value_enum, default_value_t)]
    pub diagnostics: DiagFormat,
}

pub fn run(args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let _loaded = match driver::load(&args.file, args.diagnostics) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    anyhow::bail!("`fmoec plan` is not implemented yet")
}
