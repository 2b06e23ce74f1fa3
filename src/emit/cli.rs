//! `fmoec emit`: command-line arguments, and writing the emitted files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::diag::path_text;
use crate::driver::{self, DiagFormat};

use super::{EmitError, EmitOptions, Runtime};

#[derive(Debug, clap::Args)]
pub struct EmitArgs {
    /// The model file (not needed with `--megatron list`).
    pub file: Option<PathBuf>,
    /// Megatron-LM release to target (`v2.2`, ...); `list` prints the targets and what each
    /// supports.
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
    /// Overwrite files in the output folder that fmoec did not write, or that were edited
    /// since it wrote them (without it such files stop the emit and nothing is written).
    #[arg(long)]
    pub force: bool,
    /// How diagnostics are printed.
    #[arg(long, value_enum, default_value_t)]
    pub diagnostics: DiagFormat,
}

/// The record of what `fmoec emit` wrote into an output folder (file name → SHA-256 of its
/// contents), so that a later emit replaces its own files but no one else's.
const MANIFEST: &str = ".fmoec-emit.json";

/// A file of the emit that is in the way in the output folder.
struct Clash {
    path: PathBuf,
    /// Why, after the path: "exists and is not written by fmoec".
    why: String,
    /// `--force` may overwrite it (a file), or nothing may (a folder, or what cannot be read).
    forceable: bool,
}

/// The files of `files` (and the manifest) that exist in `output` with other contents than
/// fmoec last wrote there, that it never wrote, or that no file can replace.
fn conflicts(output: &Path, files: &[(String, String)]) -> Vec<Clash> {
    let recorded: BTreeMap<String, String> = std::fs::read(output.join(MANIFEST))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut out = Vec::new();
    let blocked = |path: PathBuf, why: String| Clash {
        path,
        why,
        forceable: false,
    };
    let manifest = output.join(MANIFEST);
    if manifest.exists() && !manifest.is_file() {
        out.push(blocked(manifest, "exists and is not a file".to_string()));
    }
    for (name, text) in files {
        let path = output.join(name);
        if path.exists() && !path.is_file() {
            out.push(blocked(path, "exists and is not a file".to_string()));
            continue;
        }
        let old = match std::fs::read(&path) {
            Ok(old) => old,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.push(blocked(path, format!("exists and cannot be read ({e})")));
                continue;
            }
        };
        if old == text.as_bytes() {
            continue;
        }
        let why = match recorded.get(name) {
            Some(sum) if *sum == driver::sha256_hex(&old) => continue,
            Some(_) => "exists and is changed since fmoec wrote it",
            None => "exists and is not written by fmoec",
        };
        out.push(Clash {
            path,
            why: why.to_string(),
            forceable: true,
        });
    }
    out
}

pub fn run(args: &EmitArgs) -> anyhow::Result<ExitCode> {
    if args.megatron == "list" {
        crate::out!("{}", super::registry::list());
        return Ok(ExitCode::SUCCESS);
    }
    let (target, file) = match target_and_file(args) {
        Ok(found) => found,
        Err(code) => return Ok(code),
    };
    // The front end and the planner's rules for the target (its layout and memory) in one
    // pass: every mistake of both in one report.
    let target_rules = crate::plan::TargetRules::of(&target.decl);
    let rules = driver::Rules {
        planning: driver::Planning::For(&crate::plan::Overrides::NONE, &target_rules),
        data_files: false,
        warnings: driver::Warnings::All,
    };
    let loaded = match driver::load_with(file, args.diagnostics, rules) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let (output, opts) = output_and_options(args, file);
    // The plan the files are written for (`load_with` reported its warnings)
    let Some(plan) = loaded.plan else {
        anyhow::bail!("no plan was made (a bug in fmoec; please report it)")
    };
    let emitted = match super::emit(&loaded.checked, &plan, &target, &opts) {
        Ok(e) => e,
        Err(EmitError::Model(diagnostics)) => {
            driver::report(&loaded.sources, &diagnostics, args.diagnostics);
            return Ok(ExitCode::from(1));
        }
        Err(e) => {
            driver::report_error(&e.to_string(), None, args.diagnostics);
            return Ok(ExitCode::from(2));
        }
    };
    let mut warnings = plan.warnings.clone();
    warnings.extend(emitted.warnings.iter().cloned());
    driver::report(&loaded.sources, &warnings, args.diagnostics);
    if let Some(code) = refuse_clashes(&output, &emitted.files, args)? {
        return Ok(code);
    }
    write_files(&output, &emitted.files)?;
    Ok(ExitCode::SUCCESS)
}

/// The release `--megatron` names and the model file; else the exit status, the mistake said.
fn target_and_file(args: &EmitArgs) -> Result<(super::Target, &Path), ExitCode> {
    let target = match super::registry::find(&args.megatron) {
        Ok(t) => t,
        Err(e) => {
            driver::report_error(&e.to_string(), None, args.diagnostics);
            return Err(ExitCode::from(2));
        }
    };
    let Some(file) = &args.file else {
        crate::errln!(
            "error: the model file is missing: fmoec emit --megatron {} MODEL.fmoe",
            args.megatron
        );
        return Err(ExitCode::from(2));
    };
    Ok((target, file))
}

/// The output folder and the emit's options: the command line's, else fmoec.toml's `[emit]`
/// (`driver::load` has already refused a malformed settings file), else the defaults.
fn output_and_options(args: &EmitArgs, file: &Path) -> (PathBuf, EmitOptions) {
    let source_name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
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
        // relative paths from where fmoec runs, as `fmoec run` reads them
        relative_to: None,
    };
    (output, opts)
}

/// Whether the output folder keeps the files from being written: it is a file (an error), or
/// files of the emit clash ([`conflicts`]) and `--force` cannot or may not replace them (each
/// said, and the exit status 1).
fn refuse_clashes(
    output: &Path,
    files: &[(String, String)],
    args: &EmitArgs,
) -> anyhow::Result<Option<ExitCode>> {
    if output.exists() && !output.is_dir() {
        anyhow::bail!(
            "cannot write into `{}`: it is a file, not a folder",
            path_text(output)
        );
    }
    let clashes = conflicts(output, files);
    let blocked = clashes.iter().any(|c| !c.forceable);
    if !blocked && (clashes.is_empty() || args.force) {
        return Ok(None);
    }
    for c in &clashes {
        let message = format!("`{}` {}", path_text(&c.path), c.why);
        driver::report_error(&message, Some(&c.path), args.diagnostics);
    }
    // `--force` replaces files, never a folder: nothing is written rather than a part
    let advice = if blocked {
        "nothing was written: choose another folder with --output, or move those out of \
         the way"
    } else {
        "nothing was written: choose another folder with --output, move those files, or \
         pass --force to overwrite them"
    };
    match args.diagnostics {
        DiagFormat::Human => crate::errln!("{advice}"),
        DiagFormat::Json => driver::report_error(advice, None, args.diagnostics),
    }
    Ok(Some(ExitCode::from(1)))
}

/// Writes the files into `output` (made where missing; train.sh executable), each said, then the
/// manifest of what was written.
fn write_files(output: &Path, files: &[(String, String)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(output)
        .map_err(|e| anyhow::anyhow!("cannot create `{}`: {e}", path_text(output)))?;
    let mut recorded = BTreeMap::new();
    for (name, text) in files {
        recorded.insert(name.clone(), driver::sha256_hex(text.as_bytes()));
        let path = output.join(name);
        driver::write_atomic(&path, text.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot write `{}`: {e}", path_text(&path)))?;
        #[cfg(unix)]
        if name.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
        }
        crate::outln!("wrote {}", path_text(&path));
    }
    let manifest = serde_json::to_string_pretty(&recorded).expect("a map of strings serializes");
    let path = output.join(MANIFEST);
    driver::write_atomic(&path, format!("{manifest}\n").as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write `{}`: {e}", path_text(&path)))?;
    Ok(())
}
