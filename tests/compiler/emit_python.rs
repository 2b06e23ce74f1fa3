//! Runs the generated Python module of every target: byte-compiles each runtime's module and
//! runs the pytest suite in tests/python against the fmoec one of every Megatron-LM target,
//! the targets side by side (torch CPU, gloo, 1, 2 and 4 processes); a Megatron-Core target's
//! module runs tests/megatron_core/test_generated_module.py inside Megatron-Core when
//! `FMOEC_MEGATRON_CORE_PKG` names the package (CI: PyPI's megatron-core wheel, unzipped).
//!
//! The interpreter is `FMOEC_PYTHON`, else `~/.cache/fmoec/venv/bin/python` (the venv with
//! torch, numpy and pytest that CI uses); without either the test says it was skipped.
//! `FMOEC_EMIT_KEEP=DIR` also writes the emitted files to DIR, to try them by hand.

use crate::emit_fixture;

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
        relative_to: None,
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

/// One layer, three engines: for every gate (naive, noisy, gshard, switch, swipe) and expert kind
/// (gelu, relu, swiglu; with and without biases; with and without shared experts) the runtime's
/// MoE layer (`fmoec run`) routes a batch in training and in evaluation, on random weights and
/// inputs and keyed draws, and the case is written to files (tests/python/test_engines.py says
/// what they hold): the weights, inputs and the very draws the runtime took, and the runtime's
/// output, routing, balance loss, input and weight gradients. tests/python/test_engines.py then
/// builds the emitted module's layer (and, with `FMOEC_FASTMOE` naming a FastMoE checkout,
/// FastMoE's own layer on the harness's emulation of its extension) on the same weights,
/// inputs and draws, and compares: fp32 within a relative 1e-5, routing exactly; FastMoE
/// through the deliberate differences README.md lists, each shown by the test.
#[cfg(feature = "runtime")]
#[test]
fn one_layer_is_the_same_in_the_runtime_the_emitted_module_and_fastmoe() {
    let Some(python) = python() else {
        eprintln!("skipped: no python with torch (set FMOEC_PYTHON)");
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    // FMOEC_EMIT_KEEP=DIR keeps the module and the cases there, to run pytest on them by hand
    let dir = std::env::var_os("FMOEC_EMIT_KEEP").map_or(temp.path().to_path_buf(), PathBuf::from);
    let cases = dir.join("cases");
    std::fs::create_dir_all(&cases).unwrap();
    let mut n = 0;
    for gate in [
        GateKind::Naive,
        GateKind::Noisy,
        GateKind::Gshard,
        GateKind::Switch,
        GateKind::Swipe,
    ] {
        use fmoec::check::Activation;
        for act in [Activation::Gelu, Activation::Relu, Activation::Swiglu] {
            for bias in [true, false] {
                for shared in [false, true] {
                    engine_case::write(&cases, n, gate, act, bias, shared);
                    n += 1;
                }
            }
        }
    }
    write("v2.2", Runtime::Fmoec, &dir);
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/test_engines.py");
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"])
        .arg(&tests)
        .env("FMOEC_MODULE_DIR", &dir)
        .env("FMOEC_ENGINE_CASES", &cases)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    // the emitted module for every case; with FastMoE also its layer for every case, and its
    // SWIPE on one process per expert
    let expected = if std::env::var_os("FMOEC_FASTMOE").is_some() {
        2 * n + 1
    } else {
        n
    };
    assert!(
        out.status.success() && text.contains(&format!("{expected} passed")),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The runtime's leg of the three-engine test: one case's files.
#[cfg(feature = "runtime")]
mod engine_case {
    use std::path::Path;

    use fmoec::check::{Activation, Capacity, Gate, GateKind, Mlp, Moe, SharedExperts};
    use fmoec::runtime::moe::{self, MoeLayer};
    use fmoec::runtime::params::ParamStore;
    use tch::{Device, Kind, Tensor};

    pub const TOKENS: i64 = 24;
    pub const WIDTH: i64 = 8;
    pub const EXPERTS: u64 = 4;
    pub const HIDDEN: u64 = 12;

    fn decl(gate: GateKind, act: Activation, shared: bool) -> Moe {
        let mlp = |hidden| Mlp {
            hidden,
            act,
            span: Default::default(),
        };
        // capacities that drop slots in training and (fewer) in evaluation
        let capacity = match gate {
            GateKind::Gshard => Some(Capacity {
                train: 0.6,
                eval: 1.0,
            }),
            GateKind::Switch => Some(Capacity {
                train: 0.8,
                eval: 1.5,
            }),
            _ => None,
        };
        Moe {
            experts: EXPERTS,
            top_k: if gate == GateKind::Switch { 1 } else { 2 },
            gate: Gate {
                kind: gate,
                capacity,
                balance_loss: 0.1,
                jitter: 0.6,
                random_routing: true,
                span: Default::default(),
            },
            expert: mlp(HIDDEN),
            shared: shared.then(|| SharedExperts {
                count: 2,
                expert: mlp(6),
            }),
            spans: Default::default(),
        }
    }

    fn name(kind: GateKind) -> &'static str {
        fmoec::gates::of(kind).name
    }

    fn act_name(a: Activation) -> &'static str {
        match a {
            Activation::Gelu => "gelu",
            Activation::Relu => "relu",
            Activation::Swiglu => "swiglu",
        }
    }

    /// Writes `case-NNN.json` (the layer) and `case-NNN.safetensors` (weights, inputs, draws
    /// and the runtime's results).
    pub fn write(dir: &Path, n: usize, gate: GateKind, act: Activation, bias: bool, shared: bool) {
        let d = decl(gate, act, shared);
        // libtorch's generator is process-wide; the other modules' tests draw from it too.
        let _rng = fmoec::runtime::model::lock_rng();
        tch::manual_seed(1000 + n as i64);
        let mut store = ParamStore::new(Device::Cpu, Kind::Float);
        let layer = MoeLayer::new(&mut store, "ffn", &d, WIDTH, bias, 0.02).unwrap();
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        tch::no_grad(|| {
            for p in &store.params {
                let size = p.tensor.size();
                let scale = if p.name.ends_with(".b1") || p.name.ends_with(".b2") {
                    0.1
                } else if p.name == "ffn.gate.weight" || p.name == "ffn.gate.bias" {
                    1.0
                } else {
                    0.3
                };
                let v = Tensor::randn(&size, (Kind::Float, Device::Cpu)) * scale;
                if p.name == "ffn.gate.weight" && gate != GateKind::Switch {
                    // expert 0 preferred by most tokens: capacities drop slots, SWIPE moves them
                    // (Switch's capacity drops slots without, and its jitter changes routing)
                    let col = v.select(1, 0).abs() + 0.3;
                    v.select(1, 0).copy_(&col);
                }
                p.tensor.shallow_clone().copy_(&v);
                let short = p.name.strip_prefix("ffn.").unwrap();
                tensors.push((format!("param.{short}"), v));
            }
        });
        let x = (Tensor::randn([TOKENS, WIDTH], (Kind::Float, Device::Cpu)) + 0.3)
            .set_requires_grad(true);
        let w_out = Tensor::randn([TOKENS, WIDTH], (Kind::Float, Device::Cpu));
        let key = Tensor::from_slice(&moe::draw_key_words(7000 + n as u64));
        let draws = layer.gate.draws(&x, true, Some(&key)).unwrap();
        let out = layer.forward_with_draws(&x, true, draws.as_ref()).unwrap();
        let objective =
            (&out.out * &w_out).sum(Kind::Float) + &out.balance_loss * d.gate.balance_loss;
        objective.backward();
        let routing =
            tch::no_grad(|| layer.gate.route_with_draws(&x, true, draws.as_ref())).unwrap();
        let eval = tch::no_grad(|| layer.forward_with_draws(&x, false, None)).unwrap();
        let eval_routing = tch::no_grad(|| layer.gate.route_with_draws(&x, false, None)).unwrap();
        let scalar = |t: &Tensor| t.detach().to_kind(Kind::Float).reshape([1]);
        tensors.push(("x".into(), x.detach()));
        tensors.push(("w_out".into(), w_out));
        if let Some(dr) = &draws {
            tensors.push(("draws".into(), dr.shallow_clone()));
        }
        tensors.push(("train.out".into(), out.out.detach()));
        tensors.push(("train.x_grad".into(), x.grad()));
        for p in &store.params {
            let short = p.name.strip_prefix("ffn.").unwrap();
            tensors.push((format!("train.grad.{short}"), p.tensor.grad()));
        }
        tensors.push(("train.balance_loss".into(), scalar(&out.balance_loss)));
        tensors.push(("train.expert".into(), routing.expert));
        tensors.push(("train.weight".into(), routing.weight.detach()));
        tensors.push(("eval.out".into(), eval.out.detach()));
        tensors.push(("eval.balance_loss".into(), scalar(&eval.balance_loss)));
        tensors.push(("eval.expert".into(), eval_routing.expert));
        tensors.push(("eval.weight".into(), eval_routing.weight.detach()));
        let stem = format!("case-{n:03}");
        let tensors: Vec<(String, Tensor)> = tensors
            .into_iter()
            .map(|(k, t)| (k, t.contiguous()))
            .collect();
        Tensor::write_safetensors(&tensors, dir.join(format!("{stem}.safetensors"))).unwrap();
        let capacity = d.gate.capacity.map(|c| [c.train, c.eval]);
        let config = serde_json::json!({
            "name": format!(
                "{}-{}-{}{}",
                name(gate),
                act_name(act),
                if bias { "bias" } else { "nobias" },
                if shared { "-shared" } else { "" }
            ),
            "gate": name(gate),
            "act": act_name(act),
            "bias": bias,
            "shared": d.shared.as_ref().map(|s| serde_json::json!({
                "count": s.count, "hidden": s.expert.hidden, "act": act_name(s.expert.act),
            })),
            "experts": d.experts,
            "top_k": d.top_k,
            "width": WIDTH,
            "tokens": TOKENS,
            "hidden": d.expert.hidden,
            "capacity": capacity,
            "jitter": d.gate.jitter,
            "random_routing": d.gate.random_routing,
            "balance_loss": d.gate.balance_loss,
        });
        std::fs::write(dir.join(format!("{stem}.json")), config.to_string()).unwrap();
    }
}
