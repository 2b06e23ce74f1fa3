//! Runs the generated Python module of every target: byte-compiles each runtime's module and
//! runs the pytest suite in tests/python against the fmoec one of every Megatron-LM target,
//! the targets side by side (torch CPU, gloo, 1, 2 and 4 processes); a Megatron-Core target's
//! module runs tests/megatron_core/test_generated_module.py inside Megatron-Core when
//! `FMOEC_MEGATRON_CORE_PKG` names the package (CI: PyPI's megatron-core wheel, unzipped).
//!
//! The interpreter is `FMOEC_PYTHON`, else `~/.cache/fmoec/venv/bin/python` (the venv with
//! torch, numpy and pytest that CI uses); without either the test says it was skipped.
//! `FMOEC_EMIT_KEEP=DIR` also writes the emitted files to DIR, to try them by hand.

mod emit_fixture;

use std::path::PathBuf;
use std::process::Command;

use fmoec::check::GateKind;
use fmoec::emit::{EmitOptions, Runtime};

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FMOEC_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(std::env::var_os("HOME")?).join(".cache/fmoec/venv/bin/python");
    venv.exists().then_some(venv)
}

fn write(version: &str, runtime: Runtime, dir: &std::path::Path) {
    let c = emit_fixture::checked(4, 1, 1, 8, GateKind::Gshard);
    let opts = EmitOptions {
        runtime,
        megatron_src: None,
        source_name: "tiny.fmoe".into(),
    };
    for (name, text) in emit_fixture::emit(&c, version, &opts).unwrap().files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

#[test]
fn keep_emitted_files_when_asked() {
    if let Some(keep) = std::env::var_os("FMOEC_EMIT_KEEP") {
        std::fs::create_dir_all(&keep).unwrap();
        write("v2.2", Runtime::Fmoec, std::path::Path::new(&keep));
        assert!(std::path::Path::new(&keep).join("fmoec_moe.py").exists());
    }
}

/// The pytest suite of a Megatron-Core target's module (tests/megatron_core).
fn core_tests(version: &str) -> PathBuf {
    assert_eq!(
        version, "core_v0.19",
        "a new Megatron-Core target needs its suite here"
    );
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/megatron_core/test_generated_module.py")
}

#[test]
fn generated_module_passes_its_python_tests() {
    let Some(python) = python() else {
        eprintln!("skipped: no python with torch (set FMOEC_PYTHON)");
        return;
    };
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let mut suites = Vec::new();
    for target in fmoec::emit::registry::targets().unwrap() {
        let version = target.decl.version.clone();
        for runtime in [Runtime::Fmoec, Runtime::Fastmoe] {
            let name = if runtime == Runtime::Fmoec {
                "fmoec"
            } else {
                "fastmoe"
            };
            if !target.decl.allows("runtimes", name) {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            write(&version, runtime, dir.path());
            let status = Command::new(&python)
                .args(["-m", "py_compile"])
                .arg(dir.path().join("fmoec_moe.py"))
                .status()
                .unwrap();
            assert!(status.success(), "py_compile {version} {name}");
            if runtime != Runtime::Fmoec {
                continue;
            }
            // Megatron-Core's module lives inside Megatron-Core: its own suite, with the
            // package (CI unzips PyPI's wheel: .ci/env.sh's fmoec_megatron_core)
            let mut cmd = Command::new(&python);
            cmd.args(["-m", "pytest", "-q", "-p", "no:cacheprovider"]);
            if target.decl.can("native_expert_parallel") {
                let Some(package) = std::env::var_os("FMOEC_MEGATRON_CORE_PKG") else {
                    eprintln!(
                        "skipped the {version} module's suite: set FMOEC_MEGATRON_CORE_PKG to \
                         a folder holding megatron/core (the megatron-core wheel unzipped)"
                    );
                    continue;
                };
                cmd.arg(core_tests(&version))
                    .env("FMOEC_MEGATRON_CORE_PKG", package);
            } else {
                cmd.arg(&tests);
            }
            let child = cmd
                .env("FMOEC_MODULE_DIR", dir.path())
                // no __pycache__ left in the source tree
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .spawn()
                .unwrap();
            suites.push((version.clone(), child, dir));
        }
    }
    let failed: Vec<String> = suites
        .into_iter()
        .filter_map(|(version, mut child, _dir)| {
            (!child.wait().unwrap().success()).then_some(version)
        })
        .collect();
    assert!(failed.is_empty(), "pytest failed for {failed:?}");
}

/// The Switch gate's `jitter` means one thing in `fmoec run` and in the emitted module (the gate
/// input times U(1 - eps, 1 + eps)): the runtime routes a batch with keyed draws, and the
/// module's SwitchGate, given the same weights, inputs and draws, routes alike
/// (tests/python/test_jitter.py). Before, the module added the noise to the logits.
#[cfg(feature = "runtime")]
#[test]
fn switch_jitter_routes_alike_in_run_and_in_the_emitted_module() {
    use fmoec::check::{Activation, Capacity, Gate, Mlp, Moe};
    use fmoec::runtime::moe::{self, MoeLayer};
    use fmoec::runtime::params::ParamStore;
    use tch::{Device, Kind, Tensor};

    let Some(python) = python() else {
        eprintln!("skipped: no python with torch (set FMOEC_PYTHON)");
        return;
    };
    let (tokens, width, experts, jitter) = (64i64, 8i64, 4u64, 0.5);
    let decl = Moe {
        experts,
        top_k: 1,
        gate: Gate {
            kind: GateKind::Switch,
            // room for every token: no drops in either engine
            capacity: Some(Capacity {
                train: 8.0,
                eval: 8.0,
            }),
            balance_loss: 0.01,
            jitter,
            random_routing: false,
            span: Default::default(),
        },
        expert: Mlp {
            hidden: 8,
            act: Activation::Gelu,
            span: Default::default(),
        },
        shared: None,
        spans: Default::default(),
    };
    tch::manual_seed(7);
    let mut store = ParamStore::new(Device::Cpu, Kind::Float);
    let layer = MoeLayer::new(&mut store, "ffn", &decl, width, true, 0.02).unwrap();
    tch::no_grad(|| {
        let w = Tensor::randn([width, experts as i64], (Kind::Float, Device::Cpu));
        layer.gate.weight.shallow_clone().copy_(&w);
        let b = Tensor::randn([experts as i64], (Kind::Float, Device::Cpu)) * 0.1;
        layer.gate.bias.as_ref().unwrap().shallow_clone().copy_(&b);
    });
    let x = Tensor::randn([tokens, width], (Kind::Float, Device::Cpu));
    let key = Tensor::from_slice(&moe::draw_key_words(1234));
    let routed = tch::no_grad(|| layer.gate.route(&x, true, Some(&key))).unwrap();
    let clean = tch::no_grad(|| layer.gate.route(&x, false, None)).unwrap();
    // the draws the runtime's Switch gate takes for its jitter: stream 0 of the key, x's shape
    let draws = moe::keyed_uniform(&key, 0, &[tokens, width]).unwrap();
    let rows = |t: &Tensor| -> Vec<Vec<f64>> {
        Vec::<Vec<f64>>::try_from(t.to_kind(Kind::Double)).unwrap()
    };
    let flat = |t: &Tensor| -> Vec<f64> {
        Vec::<f64>::try_from(t.reshape([-1]).to_kind(Kind::Double)).unwrap()
    };
    let ids = |t: &Tensor| -> Vec<i64> { Vec::<i64>::try_from(t.reshape([-1])).unwrap() };
    let case = serde_json::json!({
        "x": rows(&x),
        "weight": rows(&layer.gate.weight.detach()),
        "bias": flat(&layer.gate.bias.as_ref().unwrap().detach()),
        "draws": rows(&draws),
        "jitter": jitter,
        "capacity": [8.0, 8.0],
        "expert": ids(&routed.expert),
        "weight_out": flat(&routed.weight),
        "balance_loss": routed.balance_loss.double_value(&[]),
        "expert_without_jitter": ids(&clean.expert),
    });
    let dir = tempfile::tempdir().unwrap();
    write("v2.2", Runtime::Fmoec, dir.path());
    let case_path = dir.path().join("jitter.json");
    std::fs::write(&case_path, case.to_string()).unwrap();
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/test_jitter.py");
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"])
        .arg(&tests)
        .env("FMOEC_MODULE_DIR", dir.path())
        .env("FMOEC_JITTER_CASE", &case_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
