//! View models: every value the templates print, computed here from the checked model.
//!
//! Templates (`src/emit/templates/`) only substitute and loop; formatting of Python
//! literals and shell arguments happens in this module. Knows nothing about the patch or
//! which target's templates print it.

use std::path::{Path, PathBuf};

/// One MoE layer as the generated module's table lists it.
#[derive(Clone, Debug)]
pub struct LayerView {
    pub index: usize,
    pub experts: u64,
    pub top_k: u64,
    pub gate: &'static str,
    pub hidden: u64,
    pub act: &'static str,
    /// A Python literal: `(1.2, 2.4)` or `None`.
    pub capacity: String,
    pub balance_loss: String,
    pub jitter: String,
    /// `True` or `False`.
    pub random_routing: &'static str,
    /// A Python literal: `dict(count=2, hidden=1408, act='swiglu')` for shared experts, else
    /// `None`.
    pub shared: String,
    /// For the README: experts on each rank of the expert group.
    pub experts_per_rank: u64,
}

/// One gate of the generated module's gate table: its definition and its stdlib defaults, as
/// Python literals.
#[derive(Clone, Debug)]
pub struct GateView {
    pub name: &'static str,
    pub class: &'static str,
    /// `2`, or `None` for any `top_k`.
    pub top_k: String,
    pub capacity: String,
    pub balance_loss: String,
    pub jitter: String,
    pub random_routing: &'static str,
}

/// One `--flag value` line of the launch command.
#[derive(Clone, Debug)]
pub struct ArgLine {
    pub text: String,
}

/// One row of the README's placement table.
#[derive(Clone, Debug)]
pub struct GroupRow {
    pub kind: &'static str,
    pub groups: String,
}

/// Everything the templates of a target print (`fmoec_moe.py`, `train.sh`, `README.md`):
/// templates read it as `v`.
#[derive(Clone, Debug)]
pub struct TargetView {
    // The target.
    pub megatron_version: String,
    /// The tree the patch applies to (commit or tag).
    pub tree: String,
    pub patch_name: String,
    pub patched_files: Vec<String>,
    // Where the files come from.
    pub module_name: &'static str,
    pub fmoec_version: &'static str,
    /// The model file's name for comments ([`one_line`]).
    pub source_name: String,
    /// The model file's name as a Markdown code span ([`md_code`]).
    pub source_name_md: String,
    /// `fmoec plan --megatron VERSION FILE` as a Markdown code span, the name one shell word.
    pub plan_command_md: String,
    pub model_name: String,
    // The MoE runtime.
    pub runtime: &'static str,
    pub fastmoe: bool,
    // The gates and the MoE layers and their placement.
    pub gates: Vec<GateView>,
    /// `True` when the model's linear layers (the gates' too) have biases.
    pub bias: &'static str,
    pub layers: Vec<LayerView>,
    /// 0 = the data-parallel group.
    pub expert_group_size: u64,
    /// A Python literal: the per-rank expert count, or `None` when layers differ.
    pub experts_per_worker: String,
    /// `"16 GPUs of h100_sxm: tensor 2 x pipeline 1 x data 8"`.
    pub planned_layout: String,
    /// Which ranks share experts, in words.
    pub expert_group: String,
    pub groups: Vec<GroupRow>,
    // The launch.
    pub nproc_per_node: u64,
    pub nnodes: u64,
    /// Ranks the model file was planned for.
    pub world: u64,
    /// The files train.sh passes to Megatron, as far as the model file names them.
    pub files: LaunchFiles,
    pub args: Vec<ArgLine>,
    /// The warnings of the emit, for the README.
    pub notes: Vec<String>,
    // How the MoE layers train, where the target has a MoE of its own.
    /// Megatron's own MoE trains them (no module is written).
    pub native: bool,
    /// fmoec's module trains them.
    pub fmoec_layer: bool,
    /// Why Megatron's own MoE cannot train them (empty otherwise).
    pub native_unfit: String,
    /// The vocabulary the model is built with (the planner's, padded as the target pads it).
    pub vocab: u64,
    /// The activation of Megatron's own MLPs (`gelu`, `swiglu`).
    pub megatron_act: &'static str,
}

/// A file the model file names and `fmoec run` reads, written for a script that runs elsewhere:
/// `run` (and `check`'s W0009) take a relative path from the folder they run in, but train.sh
/// runs in a Megatron-LM checkout, so the path is resolved against the folder `fmoec emit` ran
/// in and written absolute.
#[derive(Clone, Debug)]
pub struct RunFile {
    /// The absolute path as one shell word (train.sh).
    pub word: String,
    /// The absolute path with control characters escaped.
    pub shown: String,
    /// [`Self::shown`] as a Markdown code span (README.md).
    pub md: String,
}

impl RunFile {
    /// `path` as written in the model file; a relative one is taken from `relative_to`, else
    /// from the current directory. An empty path stays empty (there is nothing to resolve).
    pub fn resolve(path: &str, relative_to: Option<&Path>) -> Self {
        let text = if path.is_empty() {
            String::new()
        } else {
            let joined = match relative_to {
                Some(dir) => dir.join(path),
                None => PathBuf::from(path),
            };
            let resolved = std::path::absolute(&joined).unwrap_or(joined);
            resolved.to_string_lossy().into_owned()
        };
        let shown = one_line(&text);
        RunFile {
            word: sh_word(&text),
            md: md_code(&shown),
            shown,
        }
    }
}

/// The files train.sh passes to Megatron that a model file can name, each the default of its
/// variable ([`RunFile`]), or `None` where the model file names none and train.sh asks for the
/// variable.
#[derive(Clone, Debug)]
pub struct LaunchFiles {
    /// `DATA_PATH`: the train block's `megatron("prefix")`.
    pub data_path: Option<RunFile>,
    /// `VOCAB_FILE` and `MERGE_FILE`: the files of `tokenizer = gpt2(vocab, merges)`.
    pub vocab_file: Option<RunFile>,
    pub merge_file: Option<RunFile>,
    /// Whether the model file names any of them.
    pub any: bool,
    /// The defaults, for the README.
    pub defaults: Vec<FileDefault>,
    /// What the README's launch command sets: the variables without a default, with example
    /// values (`VOCAB_FILE=gpt2-vocab.json ...`); empty when the model file names every file.
    pub launch_env: String,
}

/// One variable of train.sh and the file it defaults to.
#[derive(Clone, Debug)]
pub struct FileDefault {
    pub var: &'static str,
    /// [`RunFile::shown`].
    pub path: String,
    /// [`RunFile::md`].
    pub md: String,
}

impl LaunchFiles {
    pub fn new(
        data_path: Option<RunFile>,
        vocab_file: Option<RunFile>,
        merge_file: Option<RunFile>,
    ) -> Self {
        // train.sh's order
        let defaults: Vec<FileDefault> = [
            ("DATA_PATH", &data_path),
            ("VOCAB_FILE", &vocab_file),
            ("MERGE_FILE", &merge_file),
        ]
        .into_iter()
        .filter_map(|(var, file)| {
            file.as_ref().map(|f| FileDefault {
                var,
                path: f.shown.clone(),
                md: f.md.clone(),
            })
        })
        .collect();
        // the order the README's launch line always had
        let launch_env: Vec<String> = [
            ("VOCAB_FILE", &vocab_file, "gpt2-vocab.json"),
            ("MERGE_FILE", &merge_file, "gpt2-merges.txt"),
            ("DATA_PATH", &data_path, "my-corpus_text_document"),
        ]
        .into_iter()
        .filter(|(_, file, _)| file.is_none())
        .map(|(var, _, example)| format!("{var}={example}"))
        .collect();
        LaunchFiles {
            any: !defaults.is_empty(),
            defaults,
            launch_env: launch_env.join(" "),
            data_path,
            vocab_file,
            merge_file,
        }
    }
}

/// A Python float literal (`0.01`, `1.0`, `3e-5`) for a finite value, rounded to 12
/// significant digits so that computed values print as written (`3e-4 * 0.1` as `3e-5`).
pub fn py_float(x: f64) -> String {
    let rounded: f64 = format!("{x:.11e}").parse().unwrap_or(x);
    let s = format!("{rounded:?}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// A shell word: left bare when safe, else single-quoted.
pub fn sh_word(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `text` as one Markdown code span that holds it whatever it contains (CommonMark 0.31,
/// "Code spans"): a span ends at the first run of exactly as many backticks as opened it, so the
/// fence is one backtick longer than the longest run inside; a span that begins and ends with a
/// space loses one space at each end, so a text that begins or ends with a backtick (which
/// would join the fence) or a space is padded with one space each side. A text of spaces only
/// is kept as it is; an empty one, which no code span can hold, is shown as one space.
/// Backslashes and `<`, `&` are literal inside a span. `text` must hold no line break
/// ([`one_line`]): a span turns one into a space.
pub fn md_code(text: &str) -> String {
    if text.is_empty() {
        return "` `".to_string();
    }
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest + 1);
    let edge = |c: char| c == '`' || c == ' ';
    let pad = if text.chars().all(|c| c == ' ') {
        ""
    } else if text.starts_with(edge) || text.ends_with(edge) {
        " "
    } else {
        ""
    };
    format!("{fence}{pad}{text}{pad}{fence}")
}

/// Text for one line of a comment in the emitted files: control characters (a line break in a
/// file name) written as escapes, so that they cannot end the comment and turn the rest into
/// Python or shell code. The same rule as a diagnostic's header.
pub use crate::diag::one_line;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_floats_and_shell_words() {
        assert_eq!(py_float(0.01), "0.01");
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(3e-4), "0.0003");
        assert_eq!(py_float(3e-4 * 0.1), "3e-5");
        assert_eq!(sh_word("ckpt/run-1"), "ckpt/run-1");
        assert_eq!(sh_word("my data"), "'my data'");
        assert_eq!(sh_word("it's"), r"'it'\''s'");
        assert_eq!(one_line("a\nb\r\u{7}ü.fmoe"), r"a\nb\r\u{7}ü.fmoe");
    }

    /// A code span's fence is longer than every run of backticks inside, and a text that
    /// begins or ends with a backtick or a space is padded (the parser strips one space each
    /// side); a plain path keeps single backticks.
    #[test]
    fn markdown_code_spans_hold_any_text() {
        assert_eq!(md_code("/data/corpus"), "`/data/corpus`");
        assert_eq!(md_code("it's my `x` dir"), "``it's my `x` dir``");
        assert_eq!(md_code("a ``b`` ```c"), "````a ``b`` ```c````");
        assert_eq!(md_code("`start"), "`` `start ``");
        assert_eq!(md_code("end`"), "`` end` ``");
        assert_eq!(md_code("`"), "`` ` ``");
        assert_eq!(md_code(" both "), "`  both  `");
        assert_eq!(md_code("  "), "`  `");
        assert_eq!(md_code(""), "` `");
    }

    /// A relative path is taken from the folder given (else the current one) and written
    /// absolute; an absolute one stays as it is; the shell word keeps the real name, the shown
    /// text escapes its control characters.
    #[test]
    fn run_files_are_resolved_against_the_folder_emit_ran_in() {
        let here = Path::new("/work/my models");
        let data = RunFile::resolve("data/it's\tx_text_document", Some(here));
        assert_eq!(
            data.word,
            "'/work/my models/data/it'\\''s\tx_text_document'"
        );
        assert_eq!(data.shown, r"/work/my models/data/it's\tx_text_document");
        let absolute = RunFile::resolve("/data/corpus", Some(here));
        assert_eq!(absolute.word, "/data/corpus");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            RunFile::resolve("corpus", None).shown,
            cwd.join("corpus").to_string_lossy()
        );
        assert_eq!(RunFile::resolve("", Some(here)).word, "''");
    }

    /// The README's launch line sets only the variables the model file leaves without a
    /// default, and the defaults are listed in train.sh's order.
    #[test]
    fn the_launch_line_asks_only_for_what_the_model_file_does_not_name() {
        let file = |p: &str| Some(RunFile::resolve(p, Some(Path::new("/w"))));
        let none = LaunchFiles::new(None, None, None);
        assert!(!none.any && none.defaults.is_empty());
        assert_eq!(
            none.launch_env,
            "VOCAB_FILE=gpt2-vocab.json MERGE_FILE=gpt2-merges.txt DATA_PATH=my-corpus_text_document"
        );
        let data = LaunchFiles::new(file("d"), None, None);
        assert_eq!(
            data.launch_env,
            "VOCAB_FILE=gpt2-vocab.json MERGE_FILE=gpt2-merges.txt"
        );
        let all = LaunchFiles::new(file("d"), file("v.json"), file("m.txt"));
        assert_eq!(all.launch_env, "");
        let listed: Vec<(&str, &str)> = all
            .defaults
            .iter()
            .map(|d| (d.var, d.path.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                ("DATA_PATH", "/w/d"),
                ("VOCAB_FILE", "/w/v.json"),
                ("MERGE_FILE", "/w/m.txt")
            ]
        );
    }
}
