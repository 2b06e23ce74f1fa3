//! Diagnostics as data: what went wrong, where, and how to fix it.
//!
//! Every phase reports problems as [`Diagnostic`] values collected in a [`Sink`]; nothing
//! is printed until the command line renders them at the edge ([`render_human`],
//! [`render_json`]). This module owns source files ([`Sources`]) and spans; it knows
//! nothing about the language or the phases that produce diagnostics.

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::{Files, SimpleFiles};
use codespan_reporting::term;
use serde::Serialize;

/// Index of a file in [`Sources`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
pub struct FileId(pub u32);

/// A byte range in one source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
pub struct Span {
    pub file: FileId,
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(file: FileId, start: usize, end: usize) -> Self {
        Span { file, start, end }
    }

    /// The smallest span covering both (they must be in the same file).
    pub fn join(self, other: Span) -> Span {
        if self.file != other.file {
            return self;
        }
        Span {
            file: self.file,
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// A span with a message, underlined in the rendered output.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Label {
    pub span: Span,
    pub message: String,
}

/// One problem found in the user's input.
///
/// `code` is stable (`E0103`) so users and tests can refer to it; `message` is one
/// line; `primary` is where the problem is; `secondary` labels point at related text
/// ("first assigned here"); `help` says how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: String,
    pub message: String,
    pub primary: Label,
    pub secondary: Vec<Label>,
    pub help: Option<String>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(code: &str, span: Span, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, span, message)
    }

    pub fn warning(code: &str, span: Span, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, code, span, message)
    }

    fn new(severity: Severity, code: &str, span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            severity,
            code: code.to_string(),
            message: message.into(),
            primary: Label {
                span,
                message: String::new(),
            },
            secondary: Vec::new(),
            help: None,
            notes: Vec::new(),
        }
    }

    /// Text under the primary underline.
    pub fn with_label(mut self, message: impl Into<String>) -> Self {
        self.primary.message = message.into();
        self
    }

    pub fn with_secondary(mut self, span: Span, message: impl Into<String>) -> Self {
        self.secondary.push(Label {
            span,
            message: message.into(),
        });
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// Collects diagnostics from every phase, in the order they were found, each once: the
/// same diagnostic found again (a definition's body is checked at each of its calls, and an
/// error in it that no argument changes is found at each) would only repeat it and inflate
/// the count.
#[derive(Clone, Debug, Default)]
pub struct Sink {
    diagnostics: Vec<Diagnostic>,
    /// Indices into `diagnostics` by the hash of the diagnostic there.
    by_hash: std::collections::HashMap<u64, Vec<usize>>,
}

impl Sink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `d`, unless the same diagnostic is already here.
    pub fn push(&mut self, d: Diagnostic) {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        d.hash(&mut hasher);
        let hash = hasher.finish();
        let same = self.by_hash.entry(hash).or_default();
        if same.iter().any(|&i| self.diagnostics[i] == d) {
            return;
        }
        same.push(self.diagnostics.len());
        self.diagnostics.push(d);
    }

    pub fn extend(&mut self, ds: impl IntoIterator<Item = Diagnostic>) {
        for d in ds {
            self.push(d);
        }
    }

    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    pub fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }

    /// Diagnostics sorted by file and position, errors and warnings interleaved, so the
    /// output reads top to bottom like the file.
    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.diagnostics
            .sort_by_key(|d| (d.primary.span.file, d.primary.span.start, d.severity));
        self.diagnostics
    }
}

/// Text for one line: control characters (a line break in a file name) written as Rust
/// escapes (`\n`, `\u{7}`), everything else as it is. The one rule for names printed where
/// a line break would mislead: a diagnostic's header and a comment in an emitted file.
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A user's file or folder name (from the command line, the model file or the settings) for
/// the text of a message: [`one_line`] of its displayed form, so that a line break in the name
/// cannot split the message or fake a line of its own. Where a message also goes to JSON, the
/// element's `file` keeps the real name.
pub fn path_text(path: impl AsRef<std::path::Path>) -> String {
    one_line(&path.as_ref().display().to_string())
}

/// A file's name, shown with [`one_line`] in a rendered diagnostic's `┌─ NAME:LINE:COL`
/// header; [`Sources::name`] (and the JSON's `file`) keep it as it is.
#[derive(Clone, Debug)]
struct FileName(String);

impl std::fmt::Display for FileName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&one_line(&self.0))
    }
}

/// The source files a run has read: the user's files and the embedded stdlib, the latter
/// under pseudo names such as `<stdlib>/gates.fmoe` so diagnostics can point into it.
#[derive(Clone, Debug)]
pub struct Sources {
    files: SimpleFiles<FileName, String>,
    count: u32,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            files: SimpleFiles::new(),
            count: 0,
        }
    }
}

impl Sources {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> FileId {
        let id = self.files.add(FileName(name.into()), text.into());
        self.count += 1;
        FileId(id as u32)
    }

    pub fn name(&self, id: FileId) -> &str {
        self.files
            .get(id.0 as usize)
            .map(|f| f.name().0.as_str())
            .unwrap_or("<unknown>")
    }

    pub fn text(&self, id: FileId) -> &str {
        self.files
            .get(id.0 as usize)
            .map(|f| f.source().as_str())
            .unwrap_or("")
    }

    /// The text a span covers (empty if the span is out of range).
    pub fn slice(&self, span: Span) -> &str {
        self.text(span.file).get(span.start..span.end).unwrap_or("")
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, span: Span) -> (usize, usize) {
        match self.files.location(span.file.0 as usize, span.start) {
            Ok(loc) => (loc.line_number, loc.column_number),
            Err(_) => (0, 0),
        }
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

fn clamp(sources: &Sources, span: Span) -> std::ops::Range<usize> {
    let len = sources.text(span.file).len();
    let start = span.start.min(len);
    let end = span.end.clamp(start, len);
    start..end
}

fn to_codespan(sources: &Sources, d: &Diagnostic) -> cs::Diagnostic<usize> {
    let severity = match d.severity {
        Severity::Error => cs::Severity::Error,
        Severity::Warning => cs::Severity::Warning,
    };
    let mut labels = vec![cs::Label::primary(
        d.primary.span.file.0 as usize,
        clamp(sources, d.primary.span),
    )
    .with_message(d.primary.message.clone())];
    for l in &d.secondary {
        labels.push(
            cs::Label::secondary(l.span.file.0 as usize, clamp(sources, l.span))
                .with_message(l.message.clone()),
        );
    }
    let mut notes: Vec<String> = d.notes.iter().map(|n| format!("note: {n}")).collect();
    if let Some(h) = &d.help {
        notes.push(format!("help: {h}"));
    }
    cs::Diagnostic::new(severity)
        .with_code(d.code.clone())
        .with_message(d.message.clone())
        .with_labels(labels)
        .with_notes(notes)
}

/// Renders diagnostics as a compiler would print them, without colour: code, message,
/// `--> file:line:col`, the source line with the span underlined, labels, help.
pub fn render_human(sources: &Sources, diagnostics: &[Diagnostic]) -> String {
    let mut out = term::termcolor::NoColor::new(Vec::<u8>::new());
    let config = term::Config::default();
    for d in diagnostics {
        // Rendering only fails on spans outside their file, which `clamp` rules out.
        let _ = term::emit(&mut out, &config, &sources.files, &to_codespan(sources, d));
    }
    String::from_utf8_lossy(&out.into_inner()).into_owned()
}

/// Same as [`render_human`] but coloured for a terminal.
pub fn render_to_stderr(sources: &Sources, diagnostics: &[Diagnostic], colour: bool) {
    use std::io::Write;
    use term::termcolor::{BufferedStandardStream, ColorChoice};
    let choice = if colour {
        ColorChoice::Auto
    } else {
        ColorChoice::Never
    };
    // Buffered: codespan writes each diagnostic in dozens of small pieces, and unbuffered
    // stderr made each a system call (a file of 400,000 unused constants spent most of its
    // `check` printing their warnings).
    let mut writer = BufferedStandardStream::stderr(choice);
    let config = term::Config::default();
    for d in diagnostics {
        let _ = term::emit(
            &mut writer,
            &config,
            &sources.files,
            &to_codespan(sources, d),
        );
    }
    let _ = writer.flush();
}

#[derive(Serialize)]
struct JsonLabel<'a> {
    file: &'a str,
    line: usize,
    column: usize,
    start: usize,
    end: usize,
    message: &'a str,
}

#[derive(Serialize)]
struct JsonDiagnostic<'a> {
    severity: Severity,
    code: &'a str,
    message: &'a str,
    primary: Option<JsonLabel<'a>>,
    secondary: Vec<JsonLabel<'a>>,
    help: Option<&'a str>,
    notes: &'a [String],
}

fn json_label<'a>(sources: &'a Sources, l: &'a Label) -> JsonLabel<'a> {
    let (line, column) = sources.line_col(l.span);
    JsonLabel {
        file: sources.name(l.span.file),
        line,
        column,
        start: l.span.start,
        end: l.span.end,
        message: &l.message,
    }
}

/// Renders diagnostics as a JSON array for editors and scripts. Each element has
/// `severity`, `code`, `message`, `primary` and `secondary` labels (`file`, `line`,
/// `column`, byte `start`/`end`, `message`), `help` and `notes`.
pub fn render_json(sources: &Sources, diagnostics: &[Diagnostic]) -> String {
    serde_json::to_string_pretty(&json_items(sources, diagnostics)).unwrap_or_else(|_| "[]".into())
}

/// The elements of [`render_json`]'s array, to be joined with other files' into one array.
pub fn json_items(sources: &Sources, diagnostics: &[Diagnostic]) -> Vec<serde_json::Value> {
    diagnostics
        .iter()
        .map(|d| JsonDiagnostic {
            severity: d.severity,
            code: &d.code,
            message: &d.message,
            primary: Some(json_label(sources, &d.primary)),
            secondary: d.secondary.iter().map(|l| json_label(sources, l)).collect(),
            help: d.help.as_deref(),
            notes: &d.notes,
        })
        .map(|j| serde_json::to_value(j).unwrap_or_default())
        .collect()
}

/// A JSON error element for a problem with no place in a source: `primary` names `file`
/// (line and column 0: the whole file) where one is concerned, else it is `null`.
pub fn json_unplaced(
    code: &str,
    message: &str,
    help: Option<&str>,
    file: Option<&str>,
) -> serde_json::Value {
    json_unplaced_as(Severity::Error, code, message, help, file)
}

/// [`json_unplaced`] with another severity.
pub fn json_unplaced_as(
    severity: Severity,
    code: &str,
    message: &str,
    help: Option<&str>,
    file: Option<&str>,
) -> serde_json::Value {
    let primary = file.map(|f| JsonLabel {
        file: f,
        line: 0,
        column: 0,
        start: 0,
        end: 0,
        message: "",
    });
    serde_json::to_value(JsonDiagnostic {
        severity,
        code,
        message,
        primary,
        secondary: Vec::new(),
        help,
        notes: &[],
    })
    .unwrap_or_default()
}

/// A count with its noun in the right number: `count(1, "expert", "experts")` is
/// `1 expert`, `count(4, ...)` is `4 experts`. Messages never say "1 experts".
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// "did you mean `x`?": the closest candidate by edit distance, if close enough.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let score = strsim::jaro_winkler(name, c);
        if score > 0.8 && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| format!("did you mean `{c}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_location_and_help() {
        let mut sources = Sources::new();
        let f = sources.add("m.fmoe", "model m {\n  width = 7\n}\n");
        let d = Diagnostic::error("E0001", Span::new(f, 20, 21), "width must be even")
            .with_label("odd")
            .with_help("use 8");
        let text = render_human(&sources, std::slice::from_ref(&d));
        assert!(text.contains("error[E0001]: width must be even"), "{text}");
        assert!(text.contains("m.fmoe:2:11"), "{text}");
        assert!(text.contains("help: use 8"), "{text}");
        let json = render_json(&sources, &[d]);
        assert!(json.contains("\"line\": 2"), "{json}");
    }

    #[test]
    fn out_of_range_span_does_not_panic() {
        let mut sources = Sources::new();
        let f = sources.add("m.fmoe", "x");
        let d = Diagnostic::error("E0001", Span::new(f, 10, 3), "bad");
        let _ = render_human(&sources, &[d]);
    }

    #[test]
    fn control_characters_of_a_file_name_are_escaped_in_the_header_only() {
        let mut sources = Sources::new();
        let f = sources.add("/tmp/a\nb\u{7}.fmoe", "model m {\n  width = 7\n}\n");
        let d = Diagnostic::error("E0001", Span::new(f, 20, 21), "width must be even");
        let text = render_human(&sources, std::slice::from_ref(&d));
        assert!(text.contains("┌─ /tmp/a\\nb\\u{7}.fmoe:2:11\n"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&render_json(&sources, &[d])).unwrap();
        assert_eq!(json[0]["primary"]["file"], "/tmp/a\nb\u{7}.fmoe");
        assert_eq!(one_line("a\nb\r\u{7}ü.fmoe"), r"a\nb\r\u{7}ü.fmoe");
        // the same rule for a name in a message's text, a path or a model file's string
        let folder = std::path::Path::new("/tmp/runs\nof\ttoday");
        assert_eq!(
            path_text(folder.join("m.fmoe")),
            r"/tmp/runs\nof\ttoday/m.fmoe"
        );
        assert_eq!(path_text("my\ncorpus.txt"), r"my\ncorpus.txt");
    }

    #[test]
    fn sink_keeps_each_diagnostic_once() {
        let f = FileId(0);
        let mut sink = Sink::new();
        let unknown = Diagnostic::error("E0201", Span::new(f, 4, 7), "unknown name `MiB`");
        sink.push(unknown.clone());
        sink.extend([unknown.clone(), unknown.clone().with_help("add a `use`")]);
        sink.push(Diagnostic::error(
            "E0201",
            Span::new(f, 9, 12),
            "unknown name `MiB`",
        ));
        assert_eq!(sink.error_count(), 3, "{:#?}", sink.diagnostics());
    }

    #[test]
    fn suggests_close_names() {
        assert_eq!(
            did_you_mean("gshrad", ["gshard", "switch", "naive"]).as_deref(),
            Some("did you mean `gshard`?")
        );
        assert_eq!(did_you_mean("zzz", ["gshard"]), None);
    }
}
