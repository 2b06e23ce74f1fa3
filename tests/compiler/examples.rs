//! Every file in `examples/` and the embedded stdlib checks clean (no diagnostics at
//! all), and the checked model of each example is snapshotted as JSON.

use std::path::Path;

use fmoec::check;
use fmoec::diag::{render_human, Sink, Sources};

fn example_files() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "fmoe"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_checks_clean_and_matches_its_snapshot() {
    let files = example_files();
    assert!(files.len() >= 5, "expected the examples, found {files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = format!("examples/{}", path.file_name().unwrap().to_string_lossy());
        let mut sources = Sources::new();
        let file = sources.add(name.clone(), text);
        let mut sink = Sink::new();
        let checked = check::check_file(&mut sources, file, &mut sink);
        let diags = sink.into_sorted();
        assert!(
            diags.is_empty(),
            "{name} has diagnostics:\n{}",
            render_human(&sources, &diags)
        );
        let checked = checked.unwrap_or_else(|| panic!("{name} did not check"));
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        insta::assert_json_snapshot!(format!("checked-{stem}"), checked);
    }
}

#[test]
fn stdlib_checks_clean() {
    let mut sources = Sources::new();
    let mut sink = Sink::new();
    check::check_stdlib(&mut sources, &mut sink);
    let diags = sink.into_sorted();
    assert!(diags.is_empty(), "{}", render_human(&sources, &diags));
}

#[test]
fn stdlib_declares_the_seed_target_and_profiles() {
    let targets = check::megatron_targets();
    let v22 = targets
        .iter()
        .find(|t| t.version == "v2.2")
        .expect("v2.2 target");
    assert_eq!(v22.tree, "8aa4619f2b2a57b5725026a50ebd2b15e8121482");
    assert_eq!(v22.templates, "v2.2");
    assert_eq!(v22.torch_min, "1.8");
    assert!(v22.allows("norm", "layernorm") && !v22.allows("norm", "rmsnorm"));
    assert!(!v22.can("native_expert_parallel") && !v22.can("shared_experts"));
    for f in [
        "megatron/arguments.py",
        "megatron/training.py",
        "megatron/optimizer/optimizer.py",
        "megatron/optimizer/clip_grads.py",
    ] {
        assert!(v22.patched_files.iter().any(|p| p == f), "{f} missing");
    }
    for name in ["h100_sxm", "h200", "a100_80g", "v100_32g"] {
        let h = check::hardware_profile(name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(h.name, name);
        assert!(h.memory_bytes > 0 && h.bf16_tflops > 0.0 && h.gpus_per_node == 8);
    }
    let h100 = check::hardware_profile("h100_sxm").unwrap();
    assert_eq!(
        h100.memory_bytes,
        81_559 * 1_048_576,
        "nvidia-smi memory.total of an H100 80GB"
    );
    assert_eq!(h100.hbm_gbps, 3350.0);
    assert!(check::hardware_profile("tpu_v9").is_none());
}
