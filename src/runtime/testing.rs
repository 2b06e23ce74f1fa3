//! Helpers shared by the runtime's unit tests (those of the `cuda` feature's modules: FP8 and
//! the trace).

/// `examples/tiny.fmoe`, checked, with every `(from, to)` of `edits` replaced in its text (each
/// `from` must be there), and without its checkpoints and evaluations.
pub(crate) fn tiny(edits: &[(&str, &str)]) -> crate::check::Checked {
    let path = format!("{}/examples/tiny.fmoe", env!("CARGO_MANIFEST_DIR"));
    let mut text = std::fs::read_to_string(&path).unwrap();
    let quiet = [
        ("checkpoint = every(100, dir = \"ckpt/tiny\")", ""),
        ("eval       = every(50, batches = 4)", ""),
    ];
    for (from, to) in edits.iter().chain(&quiet) {
        assert!(text.contains(from), "examples/tiny.fmoe has no `{from}`");
        text = text.replace(from, to);
    }
    let mut sources = crate::diag::Sources::new();
    let file = sources.add(path, text);
    let mut sink = crate::diag::Sink::new();
    let checked = crate::check::check_file(&mut sources, file, &mut sink);
    assert_eq!(sink.error_count(), 0);
    checked.unwrap()
}

/// Lib tests that train hold this: one training at a time in the test binary, since
/// libtorch's thread count (and through it the order of a matmul's sums) is shared by the
/// process, and some tests compare two runs bit for bit.
static TRAINING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Trains `checked` with `opts` on one CPU thread, alone among the lib tests (see [`TRAINING`]).
pub(crate) fn train_alone(
    checked: &crate::check::Checked,
    opts: &crate::runtime::train::RunOptions,
) -> anyhow::Result<crate::runtime::train::RunSummary> {
    let _alone = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(1);
    crate::runtime::train::train(checked, opts)
}
