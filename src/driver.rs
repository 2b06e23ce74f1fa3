//! The command-line edge shared by every subcommand: read a model file, run the front
//! end and the planner's rules on it, render diagnostics to stderr, and turn failure into
//! an exit code.
//!
//! It knows the phases only through their entry points (`check`, `plan`); it knows nothing
//! about what a subcommand does with the checked file afterwards.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

use crate::check::{self, Checked};
use crate::diag::{self, FileId, Sink, Sources};
use crate::plan::{self, Overrides, ParallelPlan, TargetRules};

/// How diagnostics are printed (`--diagnostics`, the same flag in every subcommand).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DiagFormat {
    /// Rendered like a compiler: location, underlined source, help.
    #[default]
    Human,
    /// One JSON array on stderr when the command ends (`[]` when there is nothing to
    /// say), with every diagnostic of the command, for editors and scripts.
    Json,
}

/// A checked model file with the sources its diagnostics point into, and its plan when the
/// caller asked for one.
pub struct Loaded {
    pub sources: Sources,
    pub file: FileId,
    pub checked: Checked,
    /// The plan `load_with` made (`None` with [`Planning::None`]).
    pub plan: Option<ParallelPlan>,
}

/// What [`load_with`] plans after the front end.
#[derive(Clone, Copy, Debug)]
pub enum Planning<'a> {
    /// Nothing: the caller plans for itself (`fmoec plan --auto`).
    None,
    /// The file's `parallel` block under these what-if overrides (none: the file as
    /// written, which is what `check`, `emit` and `run` accept).
    With(&'a Overrides),
    /// The same, planned for the training one Megatron-LM target describes (its layout,
    /// vocabulary and memory: `fmoec emit --megatron VERSION`, `fmoec plan --megatron VERSION`).
    For(&'a Overrides, &'a TargetRules),
}

/// Which rules [`load_with`] and [`analyse`] apply beyond the front end's.
#[derive(Clone, Copy, Debug)]
pub struct Rules<'a> {
    pub planning: Planning<'a>,
    /// Warn about data files that are not here (`fmoec check`; a plan or an emitted
    /// Megatron training reads its data elsewhere).
    pub data_files: bool,
    /// Which warnings are reported (errors always are).
    pub warnings: Warnings,
}

impl Rules<'_> {
    /// The file as written: the front end and the planner (what `emit` and `run` accept).
    pub const AS_WRITTEN: Rules<'static> = Rules {
        planning: Planning::With(&Overrides::NONE),
        data_files: false,
        warnings: Warnings::All,
    };
}

/// Which warnings [`load_with`] reports; errors are reported whatever this says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warnings {
    /// The front end's and the plan's.
    All,
    /// The front end's only: the plan made here is not the one the command runs (`fmoec run`
    /// on several ranks checks the file as written, then plans its world and reports that
    /// plan's warnings). The plan's own stay on [`Loaded::plan`].
    FrontEnd,
    /// None: another process of the same run reports them (a rank of a launched run that
    /// does not speak for it).
    None,
}

/// Diagnostics of this command in JSON, printed as one array by [`finish`].
static JSON_DIAGNOSTICS: Mutex<Vec<serde_json::Value>> = Mutex::new(Vec::new());

fn push_json(items: Vec<serde_json::Value>) {
    JSON_DIAGNOSTICS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(items);
}

/// Reports diagnostics in the chosen format: on stderr now (human), or kept for the one
/// JSON array [`finish`] prints.
pub fn report(sources: &Sources, diagnostics: &[diag::Diagnostic], format: DiagFormat) {
    match format {
        DiagFormat::Human => {
            if diagnostics.is_empty() {
                return;
            }
            use std::io::IsTerminal;
            let colour = std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal();
            diag::render_to_stderr(sources, diagnostics, colour);
        }
        DiagFormat::Json => push_json(diag::json_items(sources, diagnostics)),
    }
}

/// Reports an error that has no place in a model's text (a bad command-line value, a file in
/// the way, a failure while running): a plain `error:` line, or in JSON an element with
/// code `E0002` and, where a file is concerned, `primary.file` (line and column 0).
pub fn report_error(message: &str, file: Option<&Path>, format: DiagFormat) {
    report_unplaced("E0002", message, None, file, format);
}

/// [`report_error`] with a `help` (a line of its own in human form, JSON's `help`).
pub fn report_error_with_help(message: &str, help: Option<&str>, format: DiagFormat) {
    report_unplaced("E0002", message, help, None, format);
}

/// Reports a file that cannot be read: code `E0001` in JSON.
fn report_unreadable(message: &str, file: &Path, format: DiagFormat) {
    report_unplaced("E0001", message, None, Some(file), format);
}

fn report_unplaced(
    code: &str,
    message: &str,
    help: Option<&str>,
    file: Option<&Path>,
    format: DiagFormat,
) {
    match format {
        DiagFormat::Human => match help {
            Some(help) => crate::errln!("error: {message}\n  help: {help}"),
            None => crate::errln!("error: {message}"),
        },
        DiagFormat::Json => push_json(vec![diag::json_unplaced(
            code,
            message,
            help,
            file.map(|f| f.display().to_string()).as_deref(),
        )]),
    }
}

/// The code of the JSON element [`report_interruption`] gives.
pub const INTERRUPTED: &str = "W0090";

/// Says in JSON that the command was interrupted (a run stopped by Ctrl-C or SIGTERM after
/// saving where it was): an element with severity `warning`, code [`INTERRUPTED`] and
/// `message`, so that a tool reading the array learns why the exit status is 130 or 143.
/// In human form the command has said so in its own line already, and this says nothing.
pub fn report_interruption(message: &str, format: DiagFormat) {
    if format == DiagFormat::Json {
        push_json(vec![diag::json_unplaced_as(
            diag::Severity::Warning,
            INTERRUPTED,
            message,
            None,
            None,
        )]);
    }
}

/// Diagnostics another process of the same command reported in JSON (read with
/// [`read_handed_json`]), kept for the one array [`finish`] prints.
pub fn report_json(items: Vec<serde_json::Value>) {
    push_json(items);
}

/// Where [`finish`] puts the JSON array instead of stderr (see [`hand_json_to`]).
static JSON_HANDED_TO: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Makes [`finish`] write the JSON array to `file` instead of stderr: this process is one
/// of several whose diagnostics another process prints as its own one array (a rank of
/// `fmoec run`'s launcher), so its stderr carries no array.
pub fn hand_json_to(file: PathBuf) {
    *JSON_HANDED_TO.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
}

/// The diagnostics a process wrote to `file` by [`hand_json_to`]; `Ok(None)` when it wrote
/// none (it never got to [`finish`]).
pub fn read_handed_json(file: &Path) -> anyhow::Result<Option<Vec<serde_json::Value>>> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(anyhow::anyhow!(
                "cannot read `{}`: {e}",
                diag::path_text(file)
            ))
        }
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        anyhow::anyhow!(
            "`{}` is not a JSON array of diagnostics: {e}",
            diag::path_text(file)
        )
    })
}

/// Ends a command's diagnostics: in JSON, prints the one array of everything reported
/// (`[]` for nothing), or writes it where [`hand_json_to`] says. Call once, as the command
/// ends.
pub fn finish(format: DiagFormat) {
    if format == DiagFormat::Json {
        let items =
            std::mem::take(&mut *JSON_DIAGNOSTICS.lock().unwrap_or_else(|e| e.into_inner()));
        let text = serde_json::to_string_pretty(&items).unwrap_or_else(|_| "[]".into());
        let handed_to = JSON_HANDED_TO
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // Written whole or not at all: the reader takes a missing file for "nothing said".
        // If it cannot be written, stderr still gets the diagnostics.
        if let Some(file) = handed_to {
            if write_atomic(&file, text.as_bytes()).is_ok() {
                return;
            }
        }
        crate::errln!("{text}");
    }
}

/// Makes a panic (a bug in fmoec, never the user's input) end like any other error of the
/// command: one `error:` line with a help (in JSON an element with code `E0003`, in the one
/// array [`finish`] prints), instead of Rust's panic text. With `RUST_BACKTRACE` set, Rust's
/// own report follows, with the backtrace (in JSON the backtrace is the element's note). The
/// caller catches the unwinding and calls [`finish`]; a rank's array then reaches its
/// launcher like any other.
pub fn report_panics(format: DiagFormat) {
    let rust_report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        let at = info
            .location()
            .map(|l| format!(" (at {}:{})", l.file(), l.line()))
            .unwrap_or_default();
        let message = format!("fmoec failed inside: {what}{at}");
        let help = "this is a bug in fmoec, not a mistake in the input: please report it with \
                    the command line and the model file (`RUST_BACKTRACE=1` shows where it \
                    happened)";
        let backtrace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
        match format {
            DiagFormat::Human => {
                crate::errln!("error: {message}\n  help: {help}");
                if backtrace {
                    rust_report(info);
                }
            }
            // `try_lock`: a panic while this thread holds the list must not wait on itself
            DiagFormat::Json => {
                let mut item = diag::json_unplaced("E0003", &message, Some(help), None);
                if backtrace {
                    let trace = std::backtrace::Backtrace::force_capture();
                    item["notes"] = serde_json::json!([format!("backtrace:\n{trace}")]);
                }
                if let Ok(mut items) = JSON_DIAGNOSTICS.try_lock() {
                    items.push(item);
                }
            }
        }
    }));
}

/// Panics on purpose where `FMOEC_DEBUG_PANIC` says, for the tests of [`report_panics`]:
/// `main` in every command as it starts, `rank-N` in rank N of a run once it knows where its
/// diagnostics go.
pub fn panic_if_asked(here: &str) {
    if std::env::var_os("FMOEC_DEBUG_PANIC").is_some_and(|asked| asked == here) {
        panic!("FMOEC_DEBUG_PANIC={here} asks for a panic here");
    }
}

/// Reads and checks `path` and plans it as written: every rule of the front end and of the
/// planner, in one pass. Diagnostics (warnings too) are reported; on any error the caller
/// gets the exit code to return (1 for errors in the file, 2 if it can't be read).
pub fn load(path: &Path, format: DiagFormat) -> Result<Loaded, ExitCode> {
    load_with(path, format, Rules::AS_WRITTEN)
}

/// [`load`] with the rules the caller needs (see [`Rules`]).
pub fn load_with(path: &Path, format: DiagFormat, rules: Rules) -> Result<Loaded, ExitCode> {
    // Parsing and checking recurse once per level of an expression (at most
    // `MAX_NESTING` brackets of `MAX_CHAIN` operators each): a deep stack of its own, so
    // no file can overflow it.
    std::thread::scope(|s| {
        match std::thread::Builder::new()
            .name("fmoec-front-end".into())
            .stack_size(FRONT_END_STACK)
            .spawn_scoped(s, || load_here(path, format, rules))
        {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(_) => load_here(path, format, rules),
        }
    })
}

/// Stack of the thread that parses and checks a file (only touched as deep as used).
const FRONT_END_STACK: usize = 256 << 20;

/// The largest model file read: thousands of times any real one (the examples and the
/// stdlib are a few KiB), so that a device such as `/dev/zero` or a runaway generated file
/// is refused instead of read until the memory runs out.
pub const MAX_MODEL_FILE_BYTES: u64 = 16 << 20;

/// A model file's bytes, at most [`MAX_MODEL_FILE_BYTES`] of them read.
fn read_model_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_MODEL_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_MODEL_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "it is larger than {} MiB (a model file is a few KiB of text)",
            MAX_MODEL_FILE_BYTES >> 20
        )));
    }
    Ok(bytes)
}

/// `E0001` for a model file that is not UTF-8, pointing at its first bad byte: the file's text
/// is added to `sources` with each bad sequence shown as U+FFFD (the text before the first one
/// is the file's own, so the line, the column and the byte offset are the file's).
fn not_utf8_diagnostic(
    sources: &mut Sources,
    path: &Path,
    error: &std::string::FromUtf8Error,
) -> diag::Diagnostic {
    let bytes = error.as_bytes();
    let at = error.utf8_error().valid_up_to();
    let text = String::from_utf8_lossy(bytes).into_owned();
    let file = sources.add(path.display().to_string(), text);
    // Empty: the span must not end inside the replacement character, which is wider than
    // the byte it stands for.
    let span = diag::Span::new(file, at, at);
    let (line, column) = sources.line_col(span);
    let byte = bytes[at];
    let what = match error.utf8_error().error_len() {
        Some(_) => "does not start or continue a UTF-8 character",
        None => "starts a UTF-8 character that the file ends before",
    };
    diag::Diagnostic::error(
        "E0001",
        span,
        format!(
            "cannot read `{}`: it is not UTF-8 text (byte 0x{byte:02X} at line {line}, column \
             {column}, byte offset {at})",
            diag::path_text(path)
        ),
    )
    .with_label(format!("byte 0x{byte:02X} {what}"))
    .with_help(
        if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
            // what Windows PowerShell's `>` writes
            "it starts with a UTF-16 byte-order mark: model files are UTF-8, so save it as UTF-8 \
         (e.g. `iconv -f utf-16 -t utf-8`)"
        } else {
            "model files are UTF-8: save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or remove \
         the byte"
        },
    )
}

fn load_here(path: &Path, format: DiagFormat, rules: Rules) -> Result<Loaded, ExitCode> {
    let text = read_model_text(path, format)?;
    let user_hardware = user_hardware(format)?;
    let mut sources = Sources::new();
    let file = sources.add(path.display().to_string(), text);
    let analysis = analyse(&mut sources, file, &user_hardware, rules);
    let said: Vec<_> = analysis
        .diagnostics
        .iter()
        .filter(|d| rules.warnings != Warnings::None || d.is_error())
        .cloned()
        .collect();
    report(&sources, &said, format);
    match analysis.checked {
        Some(checked) => Ok(Loaded {
            sources,
            file,
            checked,
            plan: analysis.plan,
        }),
        None => Err(could_not_check(path, analysis.errors, format)),
    }
}

/// The model file's text; a file that cannot be read or is not UTF-8 is reported (exit 2).
fn read_model_text(path: &Path, format: DiagFormat) -> Result<String, ExitCode> {
    match read_model_file(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|e| {
            let mut sources = Sources::new();
            let not_utf8 = not_utf8_diagnostic(&mut sources, path, &e);
            report(&sources, &[not_utf8], format);
            ExitCode::from(2)
        }),
        Err(e) => {
            report_unreadable(
                &format!("cannot read `{}`: {e}", diag::path_text(path)),
                path,
                format,
            );
            Err(ExitCode::from(2))
        }
    }
}

/// The hardware profiles of the user's `fmoec.toml`, by name; a settings file that cannot be
/// read is reported (exit 2).
fn user_hardware(
    format: DiagFormat,
) -> Result<std::collections::BTreeMap<String, check::Hardware>, ExitCode> {
    let settings = crate::settings::Settings::discover().map_err(|e| {
        report_error(&e.to_string(), None, format);
        ExitCode::from(2)
    })?;
    Ok(settings
        .hardware
        .iter()
        .map(|(name, h)| (name.clone(), h.to_hardware(name)))
        .collect())
}

/// The closing line of a file with errors (human format only); exit 1.
fn could_not_check(path: &Path, errors: usize, format: DiagFormat) -> ExitCode {
    if format == DiagFormat::Human {
        crate::errln!(
            "error: could not check `{}` due to {}",
            diag::path_text(path),
            diag::count(errors.max(1) as u64, "previous error", "previous errors")
        );
    }
    ExitCode::from(1)
}

/// What [`analyse`] found in one file.
pub struct Analysis {
    /// Every diagnostic of the front end and the planner, in file order.
    pub diagnostics: Vec<diag::Diagnostic>,
    pub errors: usize,
    /// The checked file, when there were no errors.
    pub checked: Option<Checked>,
    /// The plan [`Planning`] asked for, when there were no errors.
    pub plan: Option<ParallelPlan>,
}

/// The front end and the planner's rules on a file already in `sources`, in one pass:
/// what `fmoec check` reports (the UI tests call this too).
pub fn analyse(
    sources: &mut Sources,
    file: FileId,
    user_hardware: &std::collections::BTreeMap<String, check::Hardware>,
    rules: Rules,
) -> Analysis {
    let mut sink = Sink::new();
    let best = check::check_file_best_effort(sources, file, &mut sink, user_hardware);
    let plan_warnings = rules.warnings == Warnings::All;
    let plan = match rules.planning {
        Planning::With(o) => {
            plan_rules(&best, o, &TargetRules::default(), plan_warnings, &mut sink)
        }
        Planning::For(o, target) => plan_rules(&best, o, target, plan_warnings, &mut sink),
        Planning::None => None,
    };
    if rules.data_files {
        sink.extend(
            best.train
                .as_ref()
                .map(check::train_rules::data_files_here)
                .unwrap_or_default(),
        );
    }
    let errors = sink.error_count();
    let clean = errors == 0;
    Analysis {
        diagnostics: sink.into_sorted(),
        errors,
        checked: best.checked().filter(|_| clean),
        plan: plan.filter(|_| clean),
    }
}

/// The planner's rules on what the front end built: a whole plan (memory included) when
/// every block was built, else the rules that can be decided on the blocks that were. Its
/// errors go to `sink`, and so do its warnings with `plan_warnings` (else they stay on the
/// plan); the plan comes back when there is one.
fn plan_rules(
    best: &check::BestEffort,
    overrides: &Overrides,
    target: &TargetRules,
    plan_warnings: bool,
    sink: &mut Sink,
) -> Option<ParallelPlan> {
    let parallel = best.parallel.as_ref()?;
    let checked = best.checked().filter(|_| best.complete);
    let Some(checked) = checked else {
        sink.extend(plan::layout_rules(
            best.model.as_ref(),
            parallel,
            best.train.as_ref(),
            overrides,
        ));
        return None;
    };
    match plan::build_for(&checked, overrides, target) {
        Ok(mut plan) => {
            if plan_warnings {
                sink.extend(std::mem::take(&mut plan.warnings));
            }
            Some(plan)
        }
        Err(diagnostics) => {
            sink.extend(diagnostics);
            None
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

/// A command-line count of at least 1 (`--world`, `--top-k`, ...), for clap's `value_parser`:
/// a 0 is refused where it was typed, with words instead of clap's `0 is not in 1..MAX`, so
/// that no diagnostic points into the model file at a value the file does not hold.
pub fn one_or_more<T>(v: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + From<u8>,
    T::Err: std::fmt::Display,
{
    match v.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        Ok(_) => Err(format!("must be 1 or more, found {v}")),
        Err(e) => Err(e.to_string()),
    }
}
