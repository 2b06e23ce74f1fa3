//! Every example through `fmoec emit --megatron v2.2`: snapshots of every emitted file, or of
//! the rendered diagnostics for models Megatron-LM v2.2 cannot express.

use std::path::Path;

use fmoec::check;
use fmoec::diag::{self, Sink, Sources};
use fmoec::emit::{self, EmitError, EmitOptions};

fn emit_example(name: &str) -> Result<(Vec<(String, String)>, String), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file_name = format!("examples/{name}.fmoe");
    let text = std::fs::read_to_string(root.join(&file_name)).unwrap();
    let mut sources = Sources::new();
    let file = sources.add(file_name, text);
    let mut sink = Sink::new();
    let checked = check::check_file(&mut sources, file, &mut sink).expect("examples check");
    assert!(!sink.has_errors(), "{name} has errors");
    let target = emit::registry::find("v2.2").unwrap();
    let opts = EmitOptions {
        source_name: format!("{name}.fmoe"),
        ..Default::default()
    };
    let plan = fmoec::plan::build(&checked).unwrap_or_else(|ds| panic!("{name} plans: {ds:?}"));
    match emit::emit(&checked, &plan, &target, &opts) {
        Ok(e) => Ok((e.files, diag::render_human(&sources, &e.warnings))),
        Err(EmitError::Model(ds)) => Err(diag::render_human(&sources, &ds)),
        Err(e) => panic!("{name}: {e}"),
    }
}

#[test]
fn examples_megatron_can_train() {
    for name in ["tiny", "gpt2-medium-moe", "gpt345m-fmoefy", "plan-only"] {
        let (files, warnings) = emit_example(name).unwrap_or_else(|d| panic!("{name}:\n{d}"));
        for (file, text) in files {
            insta::assert_snapshot!(format!("{name}__{file}"), text);
        }
        insta::assert_snapshot!(format!("{name}__warnings"), warnings);
    }
}

#[test]
fn examples_megatron_v22_cannot_express_are_diagnostics() {
    for name in ["mixtral-8x7b", "deepseek-moe"] {
        let rendered = emit_example(name)
            .err()
            .unwrap_or_else(|| panic!("{name} emitted"));
        insta::assert_snapshot!(format!("{name}__errors"), rendered);
    }
}

#[test]
fn every_example_is_covered() {
    let mut names: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter_map(|n| n.strip_suffix(".fmoe").map(str::to_string))
            .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "deepseek-moe",
            "gpt2-medium-moe",
            "gpt345m-fmoefy",
            "mixtral-8x7b",
            "plan-only",
            "tiny"
        ]
    );
}
