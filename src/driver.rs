//! The command-line edge shared by every subcommand: read a model file, run the front
//! end, render diagnostics to stderr, and turn failure into an exit code.

use std::path::Path;
use std::process::ExitCode;

use crate::check::{self, Checked};
use crate::diag::{self, FileId, Sink, Sources};

/// How diagnostics are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DiagFormat {
    /// Rendered like a compiler: location, underlined source, help.
    #[default]
    Human,
    /// A JSON array on stderr, for editors and scripts.
    Json,
}

/// A checked model file with the sources its diagnostics point into.
pub struct Loaded {
    pub sources: Sources,
    pub file: FileId,
    pub checked: Checked,
}

/// Prints diagnostics on stderr in the chosen format.
pub fn report(sources: &Sources, diagnostics: &[diag::Diagnostic], format: DiagFormat) {
    if diagnostics.is_empty() {
        return;
    }
    match format {
        DiagFormat::Human => {
            use std::io::IsTerminal;
            let colour = std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal();
            diag::render_to_stderr(sources, diagnostics, colour);
        }
        DiagFormat::Json => eprintln!("{}", diag::render_json(sources, diagnostics)),
    }
}

/// Reads and checks `path`. Diagnostics (warnings too) are printed; on any error the
/// caller gets the exit code to return (1 for errors in the file, 2 if it can't be read).
pub fn load(path: &Path, format: DiagFormat) -> Result<Loaded, ExitCode> {
    // Parsing and checking recurse once per level of an expression (at most
    // `MAX_NESTING` brackets of `MAX_CHAIN` operators each): a deep stack of its own, so
    // no file can overflow it.
    std::thread::scope(|s| {
        match std::thread::Builder::new()
            .name("fmoec-front-end".into())
            .stack_size(FRONT_END_STACK)
            .spawn_scoped(s, || load_here(path, format))
        {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(_) => load_here(path, format),
        }
    })
}

/// Stack of the thread that parses and checks a file (only touched as deep as used).
const FRONT_END_STACK: usize = 256 << 20;

fn load_here(path: &Path, format: DiagFormat) -> Result<Loaded, ExitCode> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read `{}`: {e}", path.display());
            return Err(ExitCode::from(2));
        }
    };
    let settings = match crate::settings::Settings::discover() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Err(ExitCode::from(2));
        }
    };
    let user_hardware = settings
        .hardware
        .iter()
        .map(|(name, h)| (name.clone(), h.to_hardware(name)))
        .collect();
    let mut sources = Sources::new();
    let file = sources.add(path.display().to_string(), text);
    let mut sink = Sink::new();
    let checked = check::check_file_with(&mut sources, file, &mut sink, &user_hardware);
    let errors = sink.error_count();
    let diagnostics = sink.into_sorted();
    report(&sources, &diagnostics, format);
    match checked {
        Some(checked) if errors == 0 => Ok(Loaded {
            sources,
            file,
            checked,
        }),
        _ => {
            if format == DiagFormat::Human {
                eprintln!(
                    "error: could not check `{}` due to {} previous error{}",
                    path.display(),
                    errors.max(1),
                    if errors == 1 { "" } else { "s" }
                );
            }
            Err(ExitCode::from(1))
        }
    }
}

/// The SHA-256 of `bytes` in lowercase hex (checkpoint and emit manifests).
pub use crate::digest::sha256_hex;

/// Writes a file so that readers see the old content or the new, never a part: the bytes
/// go to a temporary file beside it, which is synced and renamed over the target.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
