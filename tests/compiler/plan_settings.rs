//! User hardware profiles from `fmoec.toml`.

use std::path::Path;

use fmoec::settings::{Settings, SettingsError};

const A100: &str = r#"
[hardware.lab_a100]
memory_gib = 40
bf16_tflops = 312.0
fp32_tflops = 19.5
hbm_gbps = 1555.0
nvlink_gbps = 300.0
network_gbps = 25.0
gpus_per_node = 8

[run]
device = "cuda"
"#;

#[test]
fn reads_a_profile() {
    let s = Settings::parse(A100, Path::new("fmoec.toml")).unwrap();
    let h = s.hardware_profile("lab_a100").unwrap();
    assert_eq!(h.memory_bytes, 40 * (1 << 30));
    assert_eq!(h.fp16_tflops, 312.0, "fp16 defaults to bf16");
    assert_eq!(h.gpus_per_node, 8);
    assert!(s.hardware_profile("h100_sxm").is_none());
    assert_eq!(s.run.device.as_deref(), Some("cuda"));
}

#[test]
fn rejects_bad_profiles_with_the_reason() {
    let bad = A100.replace("gpus_per_node = 8", "gpus_per_node = 0");
    let e = Settings::parse(&bad, Path::new("fmoec.toml")).unwrap_err();
    assert!(matches!(e, SettingsError::Parse { .. }));
    assert!(
        e.to_string().contains("hardware.lab_a100.gpus_per_node"),
        "{e}"
    );
    let typo = A100.replace("hbm_gbps", "hbm_gpbs");
    let e = Settings::parse(&typo, Path::new("fmoec.toml")).unwrap_err();
    assert!(e.to_string().contains("hbm_gpbs"), "{e}");
}

#[test]
fn discovers_the_file_in_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fmoec.toml"), A100).unwrap();
    let s = Settings::discover_in(dir.path()).unwrap();
    assert!(s.hardware_profile("lab_a100").is_some());
    assert_eq!(s.source.unwrap(), dir.path().join("fmoec.toml"));
}

#[test]
fn a_user_profile_is_usable_in_a_model_file() {
    let s = Settings::parse(A100, Path::new("fmoec.toml")).unwrap();
    let user: std::collections::BTreeMap<_, _> = s
        .hardware
        .iter()
        .map(|(n, h)| (n.clone(), h.to_hardware(n)))
        .collect();
    let text =
        "model m {\n  vocab = 256\n  context = 64\n  width = 64\n  heads = 4\n  depth = 2\n  \
                block = transformer(attention = causal(), ffn = mlp(hidden = 256, act = gelu))\n}\n\
                parallel {\n  gpus = 2 of lab_a100\n}\n";
    let mut sources = fmoec::diag::Sources::new();
    let file = sources.add("m.fmoe", text);
    let mut sink = fmoec::diag::Sink::new();
    let checked = fmoec::check::check_file_with(&mut sources, file, &mut sink, &user)
        .unwrap_or_else(|| {
            panic!(
                "{}",
                fmoec::diag::render_human(&sources, sink.diagnostics())
            )
        });
    assert_eq!(checked.parallel.hardware.name, "lab_a100");
    assert_eq!(checked.parallel.hardware.memory_bytes, 40 << 30);

    // without the settings the same file is an error naming the profile
    let mut sources = fmoec::diag::Sources::new();
    let file = sources.add("m.fmoe", text);
    let mut sink = fmoec::diag::Sink::new();
    assert!(fmoec::check::check_file(&mut sources, file, &mut sink).is_none());
    let rendered = fmoec::diag::render_human(&sources, sink.diagnostics());
    assert!(
        rendered.contains("unknown hardware profile `lab_a100`"),
        "{rendered}"
    );
}
