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
    emit::emit(c, &emit::v2_2::RELEASE, &opts)
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
    match emit::emit(&c, &emit::v2_2::RELEASE, &opts) {
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
    let err = emit::find_release("v9.9", &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no Megatron-LM release `v9.9` to emit for; known: v2.2"
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
    let out = emit::emit(&c, &emit::v2_2::RELEASE, &opts).expect("emit");
    assert!(
        out.warnings
            .iter()
            .any(|w| w.code == "W0806"
                && w.message.contains("`keep = 3` applies to `fmoec run` only")),
        "{:?}",
        out.warnings
    );
}
