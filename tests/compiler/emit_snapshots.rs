//! Snapshots of every emitted file, for hand-built checked models (the examples join once
//! the front end lands). Review diffs with `cargo insta review`; never bless blindly.

use crate::emit_fixture;

use fmoec::check::GateKind;
use fmoec::emit::{self, EmitOptions, Runtime};

fn emitted(c: &fmoec::check::Checked, runtime: Runtime) -> Vec<(String, String)> {
    emitted_for(c, "v2.2", runtime)
}

fn emitted_for(
    c: &fmoec::check::Checked,
    version: &str,
    runtime: Runtime,
) -> Vec<(String, String)> {
    let opts = EmitOptions {
        runtime,
        megatron_src: None,
        source_name: "tiny.fmoe".into(),
        relative_to: None,
    };
    emit_fixture::emit(c, version, &opts).expect("emit").files
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

/// The plan is the planner's: a model it cannot plan never reaches the emitter, and the emitter
/// keeps no rules of its own about the grid (E0802-E0806 and E0808 were copies of them).
#[test]
fn indivisible_experts_are_the_planners_diagnostic() {
    let c = emit_fixture::checked(16, 2, 1, 6, GateKind::Gshard);
    let ds = fmoec::plan::build(&c).unwrap_err();
    assert!(
        ds.iter().any(|d| d.message
            == "layer 1: experts = 6 is not divisible by the 8 ranks of the expert group"),
        "{ds:?}"
    );
}

/// The micro-batch and the groups train.sh and the README show are the plan's.
#[test]
fn train_sh_takes_the_micro_batch_and_groups_from_the_plan() {
    let mut c = emit_fixture::checked(8, 2, 1, 8, GateKind::Gshard);
    c.parallel.micro_batch = None;
    let plan = fmoec::plan::build(&c).unwrap();
    let opts = EmitOptions {
        source_name: "tiny.fmoe".into(),
        ..Default::default()
    };
    let target = emit::registry::find("v2.2").unwrap();
    let files = emit::emit(&c, &plan, &target, &opts).unwrap().files;
    let train = &files.iter().find(|(n, _)| n == "train.sh").unwrap().1;
    assert!(
        train.contains(&format!("--micro-batch-size {} ", plan.micro_batch)),
        "{train}"
    );
    let readme = &files.iter().find(|(n, _)| n == "README.md").unwrap().1;
    assert!(
        readme.contains("| data | [0, 2, 4, 6] [1, 3, 5, 7] |"),
        "{readme}"
    );
}

#[test]
fn unknown_release_lists_the_known_ones() {
    let err = emit::registry::find("v9.9").unwrap_err();
    assert_eq!(
        err.to_string(),
        "no Megatron-LM release `v9.9` to emit for; known: core_v0.19, v2.2, v2.5, v3.0.2 \
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
        relative_to: None,
    };
    let out = emit_fixture::emit(&c, "v2.2", &opts).expect("emit");
    assert!(
        out.warnings
            .iter()
            .any(|w| w.code == "W0806"
                && w.message.contains("`keep = 3` applies to `fmoec run` only")),
        "{:?}",
        out.warnings
    );
}

/// `init` (a Hugging Face folder, an fmoec checkpoint, upcycling) is `fmoec run`'s: every
/// target emits the file and says so at the `init` (W0811; before, the emitted training
/// silently started from random weights).
#[test]
fn init_is_a_warning_for_every_target() {
    use fmoec::check::{InitSource, InitSpec};
    let mut c = emit_fixture::checked(16, 2, 1, 32, GateKind::Gshard);
    let at = fmoec::diag::Span::new(fmoec::diag::FileId(0), 10, 20);
    c.train.as_mut().unwrap().init = Some(InitSpec {
        source: InitSource::Hf("hf/model".into()),
        upcycle: None,
        span: at,
        source_span: at,
    });
    let opts = EmitOptions {
        runtime: Runtime::Fmoec,
        megatron_src: None,
        source_name: "tiny.fmoe".into(),
        relative_to: None,
    };
    for version in ["v2.2", "v2.5", "v3.0.2", "core_v0.19"] {
        let out = emit_fixture::emit(&c, version, &opts).expect("emit");
        let said: Vec<_> = out.warnings.iter().filter(|w| w.code == "W0811").collect();
        assert_eq!(said.len(), 1, "{version}: {:?}", out.warnings);
        assert_eq!(said[0].primary.span, at);
        assert!(
            said[0]
                .message
                .contains("`init` applies to `fmoec run` only"),
            "{}",
            said[0].message
        );
    }
}

/// FasterMoE's options are `fmoec run`'s: every target emits the file and says so (W0810) at
/// each option (before, the emitted training silently went without them).
#[test]
fn fastermoe_options_are_a_warning_for_every_target() {
    let mut c = emit_fixture::checked(16, 2, 1, 32, GateKind::Gshard);
    c.parallel.smart_schedule = fmoec::check::SmartSchedule::Auto;
    c.parallel.shadowing = fmoec::check::Shadowing::Dynamic;
    let opts = EmitOptions {
        runtime: Runtime::Fmoec,
        megatron_src: None,
        source_name: "tiny.fmoe".into(),
        relative_to: None,
    };
    for version in ["v2.2", "v2.5", "v3.0.2", "core_v0.19"] {
        let out = emit_fixture::emit(&c, version, &opts).expect("emit");
        let said: Vec<&str> = out
            .warnings
            .iter()
            .filter(|w| w.code == "W0810")
            .map(|w| w.message.as_str())
            .collect();
        assert_eq!(said.len(), 2, "{version}: {:?}", out.warnings);
        assert!(said[0].starts_with("`smart_schedule` is FasterMoE's option of `fmoec run`"));
        assert!(said[1].starts_with("`shadowing` is FasterMoE's option of `fmoec run`"));
        // `plan --megatron` says it too, and emits nothing: worded for both commands
        assert!(
            said.iter().all(|m| !m.contains("emitted here")
                && m.contains(&format!(
                    "what `emit --megatron {version}` writes and `plan --megatron {version}` costs"
                ))),
            "{said:?}"
        );
    }
}

/// Every declared target has its template folder and, where it declares patched files, a patch
/// that parses and changes them (Megatron-Core patches nothing); every folder is declared.
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
        let Some(patch) = t.patch.as_ref() else {
            assert!(t.decl.patched_files.is_empty(), "{}", t.decl.version);
            continue;
        };
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
    let plan = fmoec::plan::build(&c).unwrap();
    let ds = emit::support::diagnostics(&c, &plan, &v22, &all);
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
    assert!(emit::support::diagnostics(&c, &plan, &other, &all).is_empty());
    // bf16 where the target has only fp16: a warning and the stand-in
    c.model.norm = fmoec::check::Norm::LayerNorm;
    c.train.as_mut().unwrap().precision = fmoec::check::Precision::Bf16;
    let ds = emit::support::diagnostics(&c, &plan, &v22, &all);
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0].code, "W0803");
    assert_eq!(emit::support::precision_flag(&c, &v22), Some("--fp16"));
}

/// No target declares the interleaved pipeline schedule: `virtual_stages` is refused by each,
/// in a sentence, at the value the file wrote.
#[test]
fn the_interleaved_schedule_is_refused_by_every_target() {
    let mut c = emit_fixture::checked(4, 1, 2, 8, GateKind::Gshard);
    c.parallel.virtual_stages = 2;
    let plan = fmoec::plan::build(&c).unwrap();
    assert_eq!(plan.virtual_stages, 2);
    let all = fmoec::check::megatron_targets();
    assert!(all.iter().any(|t| t.version == "core_v0.19"));
    for target in &all {
        let ds = emit::support::diagnostics(&c, &plan, target, &all);
        let refusal = ds
            .iter()
            .find(|d| d.message.contains("virtual_stages"))
            .unwrap_or_else(|| panic!("{}: {ds:?}", target.version));
        assert_eq!(refusal.code, "E0801");
        assert_eq!(
            refusal.message,
            format!(
                "Megatron-LM {} has no interleaved pipeline schedule (`virtual_stages = 2`)",
                target.version
            )
        );
        assert_eq!(
            refusal.help.as_deref(),
            Some("no Megatron-LM target has it yet; train it with `fmoec run`")
        );
    }
}

/// The generated module's gate table is `fmoec::gates` with the stdlib's defaults: every gate
/// of the definition, every gate of the stdlib, no other.
#[test]
fn gate_table_is_the_one_definition_with_the_stdlib_defaults() {
    let defaults = fmoec::check::gate_defaults();
    let kinds: Vec<GateKind> = defaults.iter().map(|g| g.kind).collect();
    let defined: Vec<GateKind> = fmoec::gates::GATES.iter().map(|g| g.kind).collect();
    assert_eq!(kinds, defined);
    let c = emit_fixture::checked(4, 1, 1, 8, GateKind::Gshard);
    let opts = EmitOptions {
        source_name: "tiny.fmoe".into(),
        ..Default::default()
    };
    let files = emit_fixture::emit(&c, "v2.2", &opts).unwrap().files;
    let module = &files.iter().find(|(n, _)| n == "fmoec_moe.py").unwrap().1;
    assert!(module.contains(
        "    'gshard': dict(cls='GShardGate', top_k=2, capacity=(1.2, 2.4), balance_loss=0.01,\n        \
         jitter=0.0, random_routing=True),"
    ));
    assert!(module.contains("_FMOEC_BIAS = True"));
}

/// One GPU is "1 GPU", in the README, train.sh and the module (it said "1 GPUs").
#[test]
fn one_gpu_is_singular() {
    let c = emit_fixture::checked(1, 1, 1, 4, GateKind::Gshard);
    let opts = EmitOptions {
        source_name: "tiny.fmoe".into(),
        ..Default::default()
    };
    for (name, text) in emit_fixture::emit(&c, "v2.2", &opts).unwrap().files {
        assert!(!text.contains("1 GPUs"), "{name}");
        if name != "megatron-v2.2.patch" {
            assert!(text.contains("1 GPU of h100_sxm"), "{name}");
        }
    }
}

/// Every file of every later target for the tensor-parallel fixture (v2.2's are above).
#[test]
fn every_target_emits_every_file() {
    for version in emit::registry::versions() {
        if version == "v2.2" {
            continue;
        }
        let files = emitted_for(
            &emit_fixture::checked(16, 2, 1, 32, GateKind::Gshard),
            &version,
            Runtime::Fmoec,
        );
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        let patch = format!("megatron-{version}.patch");
        // Megatron-Core patches nothing: the gshard layers are the module's, through its spec
        let expected: &[&str] = if version.starts_with("core") {
            &["fmoec_moe.py", "train.sh", "README.md"]
        } else {
            &[patch.as_str(), "fmoec_moe.py", "train.sh", "README.md"]
        };
        assert_eq!(names, expected);
        for (name, text) in &files {
            insta::assert_snapshot!(format!("{version}_gshard_t2_{name}"), text);
        }
        // byte-stable
        assert_eq!(
            files,
            emitted_for(
                &emit_fixture::checked(16, 2, 1, 32, GateKind::Gshard),
                &version,
                Runtime::Fmoec
            )
        );
    }
}

/// `--runtime fastmoe` is refused where a target does not list it, with what it has.
#[test]
fn a_runtime_the_target_lacks_is_refused() {
    let c = emit_fixture::checked(4, 1, 1, 8, GateKind::Gshard);
    let opts = EmitOptions {
        runtime: Runtime::Fastmoe,
        source_name: "tiny.fmoe".into(),
        ..Default::default()
    };
    let err = emit_fixture::emit(&c, "v2.5", &opts).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Megatron-LM v2.5 has no `--runtime fastmoe`; its runtimes: fmoec"
    );
}

/// `--runtime fastmoe` refuses at emit time what FastMoE's own Megatron layer cannot train as
/// the file declares it (before, `groups_of(N)` stopped training at its first step, and the
/// other cases trained another model or failed in the layer): expert groups smaller than the
/// data group, non-GELU experts, gate arguments other than FastMoE's defaults, its noisy gate.
#[test]
fn fastmoe_runtime_refuses_what_its_layer_cannot_train() {
    use fmoec::check::{Activation, Capacity, Checked, ExpertGroup, Ffn};
    let with = |runtime| EmitOptions {
        runtime,
        source_name: "tiny.fmoe".into(),
        ..Default::default()
    };
    let refused = |c: &Checked| -> Vec<String> {
        match emit_fixture::emit(c, "v2.2", &with(Runtime::Fastmoe)) {
            Err(emit::EmitError::Model(ds)) => ds
                .into_iter()
                .filter(|d| d.code == "E0809")
                .map(|d| d.message)
                .collect(),
            Err(e) => panic!("another error: {e}"),
            Ok(_) => Vec::new(),
        }
    };
    let fastmoe = "FastMoE's Megatron layer (`--runtime fastmoe`)";
    let mut c = emit_fixture::checked(4, 1, 1, 8, GateKind::Gshard);
    assert!(
        refused(&c).is_empty(),
        "FastMoE's defaults, experts over the data group"
    );
    c.parallel.experts = ExpertGroup::Size { size: 2 };
    assert_eq!(
        refused(&c),
        [format!(
            "{fastmoe} splits experts over the whole data-parallel group (4 ranks) or not at all, not over expert groups of 2 data ranks"
        )]
    );
    assert!(emit_fixture::emit(&c, "v2.2", &with(Runtime::Fmoec)).is_ok());
    c.parallel.experts = ExpertGroup::Replicated;
    assert!(
        refused(&c).is_empty(),
        "replicated experts are FastMoE's too"
    );
    for layer in &mut c.model.layers {
        if let Ffn::Moe(m) = &mut layer.ffn {
            m.expert.act = Activation::Swiglu;
            m.gate.capacity = Some(Capacity {
                train: 1.25,
                eval: 2.0,
            });
        }
    }
    assert_eq!(
        refused(&c),
        [
            format!("{fastmoe} has GELU experts only, not swiglu experts"),
            format!(
                "{fastmoe} builds its gshard gate with FastMoE's defaults (capacity (1.2, 2.4) and random routing); this gate's arguments cannot reach it"
            ),
        ]
    );
    let noisy = emit_fixture::checked(4, 1, 1, 8, GateKind::Noisy);
    assert_eq!(
        refused(&noisy),
        [format!(
            "{fastmoe} cannot run FastMoE's noisy gate: its layer misroutes the gate's flat index (top_k > 1) and its evaluation divides by zero noise"
        )]
    );
}
