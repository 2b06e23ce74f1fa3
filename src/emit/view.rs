//! View models: every value the templates print, computed here from the checked model.
//!
//! Templates (`src/emit/templates/`) only substitute and loop; formatting of Python
//! literals and shell arguments happens in this module. Knows nothing about the patch or
//! which target's templates print it.

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
    pub source_name: String,
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
    /// Set when the model file names a Megatron dataset; otherwise DATA_PATH must be given.
    pub data_path: Option<String>,
    /// Set when the train block names a GPT-2 tokenizer (`gpt2(vocab, merges)`): the defaults
    /// of VOCAB_FILE and MERGE_FILE; otherwise they must be given.
    pub gpt2_files: Option<Gpt2Files>,
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

/// The GPT-2 tokenizer's two files as shell words: absolute paths, resolved against the
/// directory fmoec ran in as `fmoec run` and `fmoec check` read them, because train.sh runs in
/// a Megatron-LM checkout.
#[derive(Clone, Debug)]
pub struct Gpt2Files {
    pub vocab: String,
    pub merges: String,
}

impl Gpt2Files {
    /// The files of `gpt2(vocab, merges)`, relative paths taken from the current directory.
    pub fn resolve(vocab: &str, merges: &str) -> Self {
        let absolute = |p: &str| {
            let resolved = std::path::absolute(p).unwrap_or_else(|_| p.into());
            sh_word(&resolved.to_string_lossy())
        };
        Gpt2Files {
            vocab: absolute(vocab),
            merges: absolute(merges),
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
}
