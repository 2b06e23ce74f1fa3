//! The fmoec binary run as a user runs it, for the tests of `check`, `plan` and `emit` as
//! commands (cli_check, emit_examples, emit_megatron): a command in a folder, what it printed,
//! the files an emit wrote, and an emitted train.sh launched with a stand-in python that
//! prints the arguments Megatron would get.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository's root (the folder `examples/` and `tests/` are in).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `fmoec` to be run in `dir`, without colour.
pub fn command_in(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fmoec"));
    cmd.current_dir(dir).env("NO_COLOR", "1");
    cmd
}

/// `fmoec ARGS` in `dir`.
pub fn fmoec_in(dir: &Path, args: &[&str]) -> Output {
    command_in(dir).args(args).output().expect("fmoec runs")
}

/// `fmoec ARGS` in the repository's root (model files named as `examples/tiny.fmoe`).
pub fn fmoec(args: &[&str]) -> Output {
    fmoec_in(root(), args)
}

/// Runs `cmd`, which must succeed (else the test fails with what it printed); its stdout.
pub fn succeeds(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed:\n{}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a command printed on stdout.
pub fn stdout_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a command printed on stderr.
pub fn stderr_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What a command printed, stdout then stderr.
pub fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The JSON on stderr of a command run with `--diagnostics json`: one array, always.
pub fn json_diagnostics(out: &Output) -> Vec<serde_json::Value> {
    let stderr = stderr_text(out);
    match serde_json::from_str::<serde_json::Value>(&stderr) {
        Ok(serde_json::Value::Array(items)) => items,
        other => panic!("stderr is not one JSON array ({other:?}):\n{stderr}"),
    }
}

/// Every example model file's name (`examples/NAME.fmoe`), the smallest first.
pub const EXAMPLES: [&str; 6] = [
    "tiny",
    "gpt2-medium-moe",
    "gpt345m-fmoefy",
    "mixtral-8x7b",
    "deepseek-moe",
    "plan-only",
];

/// The text of `examples/NAME.fmoe`.
pub fn example(name: &str) -> String {
    let path = root().join(format!("examples/{name}.fmoe"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A model block that checks (a small dense GPT: no `parallel`, no `train`), for files that
/// are about something else.
pub const SMALL_MODEL: &str =
    "model m {\n    vocab = 256; context = 8; width = 32; heads = 4; depth = 2\n    \
     block = transformer(attention = causal(), ffn = mlp(hidden = 64))\n}\n";

/// The file `name` in `dir` with the bytes `text`, written; its path.
pub fn model_file(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    file
}

/// `fmoec emit --megatron VERSION MODEL -o OUT EXTRA...` in the repository's root, as it ended
/// (a refusal too).
pub fn emit_output(version: &str, model: &str, out: &Path, extra: &[&str]) -> Output {
    command_in(root())
        .args(["emit", "--megatron", version, model, "-o"])
        .arg(out)
        .args(extra)
        .output()
        .expect("fmoec runs")
}

/// `fmoec emit --megatron VERSION MODEL -o OUT` in `dir`, as a user runs it there (relative
/// paths of the model file are taken from `dir`); it must succeed. Returns its stderr (the
/// warnings).
pub fn emit_in(dir: &Path, version: &str, model: impl AsRef<Path>, out: &Path) -> String {
    let output = command_in(dir)
        .args(["emit", "--megatron", version])
        .arg(model.as_ref())
        .arg("-o")
        .arg(out)
        .output()
        .expect("fmoec runs");
    assert!(
        output.status.success(),
        "{version}:\n{}",
        stderr_text(&output)
    );
    stderr_text(&output)
}

/// `fmoec plan --megatron VERSION --format json MODEL` in `dir` (it must succeed), its JSON
/// written to `file`.
pub fn plan_json_to(dir: &Path, version: &str, model: &Path, file: &Path) {
    let plan = succeeds(
        command_in(dir)
            .args(["plan", "--megatron", version, "--format", "json"])
            .arg(model),
    );
    std::fs::write(file, plan).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
}

/// The text of the file `name` an emit wrote into `out`.
pub fn emitted_file(out: &Path, name: &str) -> String {
    std::fs::read_to_string(out.join(name))
        .unwrap_or_else(|e| panic!("{}: {e}", out.join(name).display()))
}

/// The folder `name` in `parent`, made.
pub fn folder(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A stand-in for `python` in train.sh: every `python -c` probe succeeds, and the launch prints
/// its arguments one per line (`ARG --vocab-file`, `ARG /path`), so the test sees what Megatron
/// would be given.
pub fn argument_printing_python(dir: &Path) -> PathBuf {
    let python = dir.join("python");
    std::fs::write(
        &python,
        "#!/usr/bin/env bash\nif [ \"$1\" = -c ]; then exit 0; fi\nprintf 'ARG %s\\n' \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    python
}

/// The value train.sh passes after `flag`, from [`argument_printing_python`]'s lines.
pub fn argument_after(printed: &str, flag: &str) -> Option<String> {
    let lines: Vec<&str> = printed.lines().collect();
    let at = lines.iter().position(|l| *l == format!("ARG {flag}"))?;
    lines.get(at + 1)?.strip_prefix("ARG ").map(str::to_string)
}
