//! UI tests: each `tests/ui/NAME.fmoe` is a bad (or warning-worthy) input, and
//! `tests/ui/NAME.stderr` holds its diagnostics as `fmoec check` renders them (human
//! format, no colour): the front end's and the planner's, found in one pass. Run with
//! `FMOEC_BLESS=1` to rewrite the `.stderr` files; the differences are printed either way,
//! so a bless can be reviewed.

use std::path::{Path, PathBuf};

use fmoec::diag::{render_human, Sources};
use fmoec::driver::{analyse, Rules};

fn ui_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/ui exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "fmoe"))
        .collect();
    files.sort();
    files
}

/// The rendered diagnostics of one file, as `fmoec check` prints them.
fn render(path: &Path) -> (String, usize, usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let name = format!("tests/ui/{}", path.file_name().unwrap().to_string_lossy());
    let mut sources = Sources::new();
    let file = sources.add(name, text);
    let analysis = analyse(
        &mut sources,
        file,
        &Default::default(),
        Rules {
            data_files: true,
            ..Rules::AS_WRITTEN
        },
    );
    let errors = analysis.errors;
    assert_eq!(
        analysis.checked.is_some(),
        errors == 0,
        "a file checks iff it has no errors"
    );
    assert_eq!(
        analysis.plan.is_some(),
        errors == 0,
        "a file plans iff it has no errors"
    );
    let diags = analysis.diagnostics;
    (render_human(&sources, &diags), errors, diags.len())
}

/// A line diff (longest common subsequence), `-` expected, `+` actual.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out += &format!("  {}\n", a[i]);
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out += &format!("+ {}\n", b[j]);
            j += 1;
        } else {
            out += &format!("- {}\n", a[i]);
            i += 1;
        }
    }
    out
}

#[test]
fn ui_diagnostics_match_expected() {
    let bless = std::env::var_os("FMOEC_BLESS").is_some_and(|v| v == "1");
    let files = ui_files();
    assert!(
        files.len() >= 40,
        "expected at least 40 ui tests, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for path in files {
        let (actual, errors, total) = render(&path);
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        // `warn-*` files check with warnings only; every other file must fail.
        if stem.starts_with("warn-") {
            assert!(errors == 0 && total > 0, "{stem}: expected warnings only");
        } else {
            assert!(errors > 0, "{stem}: expected at least one error, got none");
        }
        let expected_path = path.with_extension("stderr");
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if expected != actual {
            eprintln!(
                "--- {stem}: expected (-) vs actual (+)\n{}",
                diff(&expected, &actual)
            );
            if bless {
                std::fs::write(&expected_path, &actual).unwrap();
                eprintln!("blessed {}", expected_path.display());
            } else {
                failures.push(stem);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "ui output differs for {failures:?}; rerun with FMOEC_BLESS=1 to accept"
    );
}
