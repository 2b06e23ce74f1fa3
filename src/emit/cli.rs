//! `fmoec emit`: command-line arguments, and writing the emitted files.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::check;
use crate::driver::{self, DiagFormat};

use super::{EmitError, EmitOptions, Runtime};

#[derive(Debug, clap::Args)]
pub struct EmitArgs {
    /// The model file.
    pub file: PathBuf,
    /// Megatron-LM release to target (`v2.2`).
    #[arg(long, value_name = "VERSION")]
    pub megatron: String,
    /// Output folder (default: `[emit] out` of fmoec.toml, else `out`).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Which MoE implementation the generated module uses.
    #[arg(long, value_enum, default_value_t)]
    pub runtime: Runtime,
    /// A Megatron-LM checkout: compute the patch from its files (default: `[emit]
    /// megatron_src` of fmoec.toml for this release, else the recorded release).
    #[arg(long, value_name = "PATH")]
    pub megatron_src: Option<PathBuf>,
    /// How diagnostics are printed.
    #[arg(long, value_enum, default_value_t)]
    pub diagnostics: DiagFormat,
}

pub fn run(args: &EmitArgs) -> anyhow::Result<ExitCode> {
    let loaded = match driver::load(&args.file, args.diagnostics) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let targets = check::megatron_targets();
    let release = match super::find_release(&args.megatron, &targets) {
        Ok((release, _)) => release,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let source_name = args
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // `driver::load` has already refused a malformed settings file.
    let settings = crate::settings::Settings::discover().unwrap_or_default();
    let output = args
        .output
        .clone()
        .or_else(|| settings.emit.out.clone())
        .unwrap_or_else(|| PathBuf::from("out"));
    let opts = EmitOptions {
        runtime: args.runtime,
        megatron_src: args
            .megatron_src
            .clone()
            .or_else(|| settings.emit.megatron_src.get(&args.megatron).cloned()),
        source_name,
    };
    let emitted = match super::emit(&loaded.checked, release, &opts) {
        Ok(e) => e,
        Err(EmitError::Model(diagnostics)) => {
            driver::report(&loaded.sources, &diagnostics, args.diagnostics);
            return Ok(ExitCode::from(1));
        }
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    driver::report(&loaded.sources, &emitted.warnings, args.diagnostics);
    std::fs::create_dir_all(&output)
        .map_err(|e| anyhow::anyhow!("cannot create `{}`: {e}", output.display()))?;
    for (name, text) in &emitted.files {
        let path = output.join(name);
        driver::write_atomic(&path, text.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot write `{}`: {e}", path.display()))?;
        #[cfg(unix)]
        if name.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
        }
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
