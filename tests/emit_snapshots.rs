//! Snapshots of every emitted file, for hand-built checked models (the examples join once
//! the front end lands). Review diffs with `cargo insta review`; never bless blindly.

mod emit_fixture;

use fmoec::check::GateKind;
use fmoec::emit::{self, EmitError, EmitOptions, Runtime};

fn emitted(c: &fmoec::check::Checked, runtime: Runtime) -> Vec<(String, String)> {
    let opts = EmitOptions {
        runtime,
        megatron_src: None,
        source_name: "tiny.fmoe".into(),
    };
    emit::emit(c, &emit::registry::find("v2.2").unwrap(), &opts)
        .expect("emit")
        .files
}

#[test]
fn gshard_16_gpus_tensor_2() {
    let files = emitted(
        &emit_fixture::checked(16, 2, 1, 32, GateKind::Gshard),
        Runtime::Fmoec,
    );
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "megatron-v2.2.patch",
            "fmoec_moe.py",
            "train.sh",
            "README.md"
        ]
    );
    for (name, text) in &files {
        insta::assert_snapshot!(format!("gshard_t2_{name}"), text);
    }
}

#[test]
fn switch_pipeline_fastmoe_runtime() {
    let files = emitted(
        &emit_fixture::checked(8, 1, 2, 8, GateKind::Switch),
        Runtime::Fastmoe,
    );
    for (name, text) in &files {
        insta::assert_snapshot!(format!("switch_p2_fastmoe_{name}"), text);
    }
}

#[test]
fn output_is_byte_stable_and_the_patch_is_model_independent() {
    let a = emitted(
        &emit_fixture::checked(16, 2, 1, 32, GateKind::Gshard),
        Runtime::Fmoec,
    );
    let b = emitted(
        &emit_fixture::checked(16, 2, 1, 32, GateKind::Gshard),
        Runtime::Fmoec,
    );
    assert_eq!(a, b);
    let c = emitted(
        &emit_fixture::checked(4, 1, 1, 4, GateKind::Naive),
        Runtime::Fmoec,
    );
    assert_eq!(a[0], c[0], "the patch only calls into the module");
    assert_ne!(a[1], c[1]);
}

#[test]
fn indivisible_experts_are_a_diagnostic() {
    let c = emit_fixture::checked(16, 2, 1, 6, GateKind::Gshard);
    let opts = EmitOptions {
        source_name: "tiny.fmoe".into(),
        ..Default::default()
    };
    match emit::emit(&c, &emit::registry::find("v2.2").unwrap(), &opts) {
        Err(EmitError::Model(ds)) => {
            assert!(ds
                .iter()
                .any(|d| d.message
                    == "experts = 6 is not divisible by the 8 ranks of the expert group"));
        }
        other => panic!("expected a diagnostic, got {other:?}"),
    }
}

#[test]
fn unknown_release_lists_the_known_ones() {
    let err = emit::registry::find("v9.9").unwrap_err();
    assert_eq!(
        err.to_string(),
        "no Megatron-LM release `v9.9` to emit for; known: v2.2 \
         (`fmoec emit --megatron list` says what each supports)"
    );
}

/// Megatron-LM v2.2 has no checkpoint retention: a `keep` is said to apply to `fmoec run` only.
#[test]
fn checkpoint_keep_is_a_warning_for_megatron() {
    let mut c = emit_fixture::checked(16, 2, 1, 32, GateKind::Gshard);
    c.train.as_mut().unwrap().checkpoint.as_mut().unwrap().keep = 3;
    let opts = EmitOptions {
        runtime: Runtime::Fmoec,
        megatron_src: None,
        source_name: "tiny.fmoe".into(),
    };
    let out = emit::emit(&c, &emit::registry::find("v2.2").unwrap(), &opts).expect("emit");
    assert!(
        out.warnings
            .iter()
            .any(|w| w.code == "W0806"
                && w.message.contains("`keep = 3` applies to `fmoec run` only")),
        "{:?}",
        out.warnings
    );
}

/// Every declared target has its template folder and a patch that parses and changes the files
/// it declares; every folder is declared.
#[test]
fn every_target_is_a_declaration_plus_a_folder() {
    let targets = emit::registry::targets().unwrap_or_else(|e| panic!("{e}"));
    assert!(!targets.is_empty());
    assert_eq!(
        emit::registry::undeclared_folders(),
        Vec::<&str>::new(),
        "template folders without a declaration in stdlib/megatron.fmoe"
    );
    for t in &targets {
        let patch = t
            .patch
            .as_ref()
            .expect("the Megatron-LM releases patch something");
        // the recorded patch renders back byte for byte
        let text = emit::megatron::diff_recorded(patch);
        assert_eq!(
            emit::megatron::ReleasePatch::parse(&text).as_ref(),
            Ok(patch)
        );
    }
}

#[test]
fn megatron_list_prints_every_target_and_its_capabilities() {
    insta::assert_snapshot!(emit::registry::list());
}

/// What a target lacks is a diagnostic generated from the declarations: the same rule names
/// whichever declared target has the capability (here a made-up one).
#[test]
fn capability_diagnostics_come_from_the_declarations() {
    let v22 = emit::registry::find("v2.2").unwrap().decl;
    let mut other = v22.clone();
    other.version = "v9.1".into();
    other.capabilities.insert(
        "norm".into(),
        fmoec::check::Capability::Set(vec!["layernorm".into(), "rmsnorm".into()]),
    );
    let mut c = emit_fixture::checked(4, 1, 1, 8, GateKind::Gshard);
    c.model.norm = fmoec::check::Norm::RmsNorm;
    let all = [v22.clone(), other.clone()];
    let ds = emit::support::diagnostics(&c, &v22, &all);
    assert_eq!(ds.len(), 1, "{ds:?}");
    assert_eq!(ds[0].code, "E0801");
    assert_eq!(
        ds[0].message,
        "Megatron-LM v2.2 has no RMSNorm (`norm = rmsnorm`)"
    );
    assert_eq!(
        ds[0].help.as_deref(),
        Some("Megatron-LM v9.1 has it (`--megatron v9.1`); or train it with `fmoec run`")
    );
    assert!(emit::support::diagnostics(&c, &other, &all).is_empty());
    // bf16 where the target has only fp16: a warning and the stand-in
    c.model.norm = fmoec::check::Norm::LayerNorm;
    c.train.as_mut().unwrap().precision = fmoec::check::Precision::Bf16;
    let ds = emit::support::diagnostics(&c, &v22, &all);
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0].code, "W0803");
    assert_eq!(emit::support::precision_flag(&c, &v22), Some("--fp16"));
}
