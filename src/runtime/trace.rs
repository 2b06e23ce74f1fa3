//! Kernel traces of a run (`fmoec run --trace`): libtorch's profiler (Kineto; CUPTI on a GPU)
//! records a few steps into a Chrome trace, which ui.perfetto.dev or chrome://tracing opens,
//! and [`summarize`] reads it back to say where the GPU's time went, by kind of work.
//!
//! The profiler is prepared when the run is set up, before a CUDA graph is captured, so that
//! the kernels a replayed graph runs are recorded one by one like the others. The traced steps
//! are a few after the first of the run (the first warms up and captures the graph): they show
//! training as it goes on. Tracing needs the C++ shim, so a build with the `cuda` feature.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::diag::path_text;

/// What `--trace` asked for: the trace's file and how many steps it covers.
#[derive(Clone, Debug)]
pub struct TraceRequest {
    pub path: PathBuf,
    pub steps: u64,
}

/// The steps (numbered from 1, as in `metrics.jsonl`) a run from step `start` to `stop_at`
/// traces: `count` steps from the second of the run, fewer where the run ends sooner, and the
/// first when it takes only one.
pub fn traced_steps(start: u64, stop_at: u64, count: u64) -> RangeInclusive<u64> {
    let first = if stop_at >= start + 2 {
        start + 2
    } else {
        start + 1
    };
    first..=(first + count.max(1) - 1).min(stop_at)
}

/// Where the GPU's time went in a trace.
#[derive(Clone, Debug, Serialize)]
pub struct TraceSummary {
    /// The trace file.
    pub path: PathBuf,
    /// The traced steps, numbered from 1.
    pub first_step: u64,
    pub last_step: u64,
    /// Kernels, copies and memsets the GPU ran in the traced steps.
    pub gpu_events: u64,
    /// From the first GPU event's start to the last one's end.
    pub span_ms: f64,
    /// Time at least one GPU event ran (overlapping events counted once).
    pub busy_ms: f64,
    /// By kind of work, longest first.
    pub kinds: Vec<Share>,
    /// The longest kernel families, longest first.
    pub top: Vec<Share>,
}

/// The GPU time of one kind of work or one kernel family.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Share {
    pub name: String,
    pub ms: f64,
    pub events: u64,
}

/// How many kernel families [`TraceSummary::top`] lists.
const TOP_FAMILIES: usize = 12;

/// One event of a Chrome trace (the fields this module reads).
#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    ph: String,
    #[serde(default)]
    cat: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    ts: f64,
    #[serde(default)]
    dur: f64,
}

#[derive(Deserialize)]
struct Trace {
    #[serde(rename = "traceEvents", default)]
    events: Vec<Event>,
}

/// Reads the Chrome trace at `path` (of steps `steps`) and sums its GPU events.
pub fn summarize(path: &Path, steps: RangeInclusive<u64>) -> Result<TraceSummary> {
    let text = std::fs::read(path).with_context(|| format!("reading `{}`", path_text(path)))?;
    let trace: Trace = serde_json::from_slice(&text)
        .with_context(|| format!("`{}` is not a Chrome trace", path_text(path)))?;
    // each event with its kernel family, worked out once for both tables
    let gpu: Vec<(&Event, String)> = trace
        .events
        .iter()
        .filter(|e| is_gpu_event(e))
        .map(|e| (e, family(&e.name)))
        .collect();
    Ok(TraceSummary {
        path: path.to_path_buf(),
        first_step: *steps.start(),
        last_step: *steps.end(),
        gpu_events: gpu.len() as u64,
        span_ms: span_us(&gpu) / 1e3,
        busy_ms: busy_us(&gpu) / 1e3,
        kinds: shares(&gpu, |(e, f)| kind_of(&e.cat, &e.name, f), usize::MAX),
        top: shares(&gpu, |(_, f)| f, TOP_FAMILIES),
    })
}

/// A complete event the GPU ran: a kernel, a copy or a memset.
fn is_gpu_event(e: &Event) -> bool {
    e.ph == "X" && matches!(e.cat.as_str(), "kernel" | "gpu_memcpy" | "gpu_memset")
}

/// From the first event's start to the last one's end, in µs.
fn span_us(events: &[(&Event, String)]) -> f64 {
    let start = events
        .iter()
        .map(|(e, _)| e.ts)
        .fold(f64::INFINITY, f64::min);
    let end = events
        .iter()
        .map(|(e, _)| e.ts + e.dur)
        .fold(f64::NEG_INFINITY, f64::max);
    if events.is_empty() {
        0.0
    } else {
        end - start
    }
}

/// The length of the union of the events' intervals, in µs.
fn busy_us(events: &[(&Event, String)]) -> f64 {
    let mut spans: Vec<(f64, f64)> = events.iter().map(|(e, _)| (e.ts, e.ts + e.dur)).collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut busy = 0.0;
    let mut open: Option<(f64, f64)> = None;
    for (s, e) in spans {
        open = match open {
            Some((os, oe)) if s <= oe => Some((os, oe.max(e))),
            Some((os, oe)) => {
                busy += oe - os;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    busy + open.map_or(0.0, |(s, e)| e - s)
}

/// The events' time summed by `key`, longest first (ties by name), at most `limit` of them.
fn shares<'a>(
    events: &'a [(&Event, String)],
    key: impl Fn(&'a (&Event, String)) -> &'a str,
    limit: usize,
) -> Vec<Share> {
    let mut by: std::collections::BTreeMap<&str, (f64, u64)> = Default::default();
    for event in events {
        let entry = by.entry(key(event)).or_default();
        entry.0 += event.0.dur;
        entry.1 += 1;
    }
    let mut out: Vec<Share> = by
        .into_iter()
        .map(|(name, (us, events))| Share {
            name: name.to_string(),
            ms: us / 1e3,
            events,
        })
        .collect();
    out.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
    out.truncate(limit);
    out
}

/// A kernel's family: its name without `void `, the common namespaces and the template and
/// call arguments; for libtorch's generic elementwise and reduction kernels, with the functors
/// named in the arguments (which say what they compute).
pub fn family(name: &str) -> String {
    if let Some(head) = mangled_head(name) {
        return head;
    }
    let mut n = name.strip_prefix("void ").unwrap_or(name).to_string();
    for ns in [
        "at::native::",
        "native::",
        "<unnamed>::",
        "(anonymous namespace)::",
        "at_cuda_detail::",
    ] {
        n = n.replace(ns, "");
    }
    let head_len = n.find(['<', '(']).unwrap_or(n.len());
    let mut head = n[..head_len].trim().to_string();
    if head.contains("elementwise") || head.contains("reduce_kernel") {
        let functors = functor_names(&n[head_len..]);
        if !functors.is_empty() {
            let joined: String = functors.join(",").chars().take(70).collect();
            head = format!("{head} [{joined}]");
        }
    }
    head.chars().take(110).collect()
}

/// The qualified name at the head of a mangled (Itanium ABI) name that the trace left as it
/// was (`_ZN7cutlass13device_kernelI...` is `cutlass::device_kernel`); `None` for others.
fn mangled_head(name: &str) -> Option<String> {
    let mut rest = name.strip_prefix("_ZN")?;
    let mut parts = Vec::new();
    loop {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            break;
        }
        let len: usize = rest[..digits].parse().ok()?;
        let ident = rest.get(digits..digits + len)?;
        parts.push(ident);
        rest = &rest[digits + len..];
    }
    (!parts.is_empty()).then(|| parts.join("::"))
}

/// The distinct functor names in a kernel's arguments (words ending in `Functor`,
/// `_kernel_cuda`, `_kernel_impl` or `Ops`), sorted, at most three.
fn functor_names(args: &str) -> Vec<String> {
    let mut found: Vec<String> = args
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| {
            ["Functor", "_kernel_cuda", "_kernel_impl", "Ops"]
                .iter()
                .any(|end| w.len() > end.len() && w.ends_with(end))
        })
        .map(str::to_string)
        .collect();
    found.sort();
    found.dedup();
    found.truncate(3);
    found
}

/// The kind of work of a GPU event of category `cat` and kernel name `name`.
pub fn kind(cat: &str, name: &str) -> &'static str {
    kind_of(cat, name, &family(name))
}

/// [`kind`], given the kernel's [`family`] `f`.
fn kind_of(cat: &str, name: &str, f: &str) -> &'static str {
    if cat != "kernel" {
        return "memcpy and memset";
    }
    let has = |w: &str| f.contains(w);
    let grouped = ["GroupProblemShape", "grouped_gemm", "grouped_mm"]
        .iter()
        .any(|w| name.contains(w));
    if has("sdpa") || has("dot_do_o") || has("flash") || has("fmha") {
        "attention"
    } else if grouped {
        "grouped matmuls (experts)"
    } else if has("nvjet") || has("splitK") || has("cutlass") || f.to_lowercase().contains("gemm") {
        "dense matmuls (cuBLAS)"
    } else if f.starts_with("fp8_") {
        "FP8 quantisation (fmoec)"
    } else if has("layer_norm") || has("GammaBeta") || f.starts_with("norm_") {
        "LayerNorm"
    } else if has("direct_copy") || has("bfloat16_copy") || has("CatArray") {
        "copies and dtype conversions"
    } else if f.starts_with("xent_") || has("SoftMax") {
        "LM loss"
    } else if [
        "bias_act",
        "segment_sums",
        "gather_rows",
        "sum_rows",
        "row_dots",
        "plan_",
        "swiglu_",
        "keyed_",
    ]
    .iter()
    .any(|p| f.starts_with(p))
    {
        "MoE kernels (fmoec)"
    } else if has("multi_tensor_apply") || has("fused_adam") {
        "optimizer (multi-tensor)"
    } else if has("reduce_kernel") || f.starts_with("col_sums_") {
        "reductions"
    } else {
        "other elementwise"
    }
}

/// The trace's file and steps, as the run's summary names them.
pub fn title(s: &TraceSummary) -> String {
    let steps = if s.first_step == s.last_step {
        format!("step {}", s.first_step)
    } else {
        format!("steps {}-{}", s.first_step, s.last_step)
    };
    format!(
        "{} ({steps}; open it in ui.perfetto.dev)",
        path_text(&s.path)
    )
}

/// The summary's lines for the run's log: per step, the GPU's busy time, the kinds of
/// work and the longest kernel families.
pub fn summary_lines(s: &TraceSummary) -> Vec<String> {
    let steps = (s.last_step + 1 - s.first_step) as f64;
    let per_step = |ms: f64| ms / steps;
    let mut lines = vec![format!("trace: {}", title(s))];
    if s.gpu_events == 0 {
        lines.push("no GPU work in the trace (a CPU run records the operators only)".into());
        return lines;
    }
    lines.push(format!(
        "a step: GPU busy {:.2} of {:.2} ms ({:.1}%), {:.0} kernels, copies and memsets",
        per_step(s.busy_ms),
        per_step(s.span_ms),
        100.0 * s.busy_ms / s.span_ms.max(1e-9),
        s.gpu_events as f64 / steps,
    ));
    let summed: f64 = s.kinds.iter().map(|k| k.ms).sum();
    lines.push(format!(
        "{:>9} {:>6} {:>8}  kind of work",
        "ms/step", "share", "events"
    ));
    for k in &s.kinds {
        lines.push(share_line(k, steps, summed));
    }
    lines.push(format!(
        "{:>9} {:>6} {:>8}  longest kernel families",
        "ms/step", "share", "events"
    ));
    for k in &s.top {
        lines.push(share_line(k, steps, summed));
    }
    lines
}

fn share_line(k: &Share, steps: f64, summed: f64) -> String {
    format!(
        "{:9.3} {:5.1}% {:8.0}  {}",
        k.ms / steps,
        100.0 * k.ms / summed.max(1e-9),
        k.events as f64 / steps,
        k.name
    )
}

#[cfg(feature = "cuda")]
pub use recorder::Tracer;

#[cfg(feature = "cuda")]
mod recorder {
    use std::ffi::{c_char, c_int, CString};
    use std::ops::RangeInclusive;
    use std::path::PathBuf;

    use anyhow::{Context, Result};
    use tch::Device;

    use super::{summarize, traced_steps, TraceRequest, TraceSummary};
    use crate::diag::path_text;
    use crate::runtime::cuda::shim_error;

    extern "C" {
        fn fmoec_shim_trace_prepare(cuda: c_int) -> c_int;
        fn fmoec_shim_trace_start(cuda: c_int) -> c_int;
        fn fmoec_shim_trace_stop(path: *const c_char) -> c_int;
    }

    /// Kineto's logging threshold (5: nothing), read when the profiler starts.
    const KINETO_LOG_LEVEL: &str = "KINETO_LOG_LEVEL";

    /// Records the steps of a [`TraceRequest`] with libtorch's profiler.
    pub struct Tracer {
        path: PathBuf,
        steps: RangeInclusive<u64>,
        cuda: c_int,
        device: Device,
        recording: bool,
        done: bool,
    }

    impl Tracer {
        /// Prepares the profiler (before any CUDA graph is captured) for the steps
        /// [`traced_steps`] picks of a run from `start` to `stop_at` on `device`.
        pub fn prepare(
            request: &TraceRequest,
            device: Device,
            start: u64,
            stop_at: u64,
        ) -> Result<Tracer> {
            let cuda = c_int::from(device.is_cuda());
            if !device.is_cuda() && std::env::var_os(KINETO_LOG_LEVEL).is_none() {
                // A CPU run on a machine without a GPU: Kineto would log an ERROR line for
                // the GPU it looks for while writing the trace, which this run never asked for.
                std::env::set_var(KINETO_LOG_LEVEL, "5");
            }
            // SAFETY: the shim catches every C++ exception.
            if unsafe { fmoec_shim_trace_prepare(cuda) } != 0 {
                return Err(shim_error("preparing libtorch's profiler for --trace"));
            }
            Ok(Tracer {
                path: request.path.clone(),
                steps: traced_steps(start, stop_at, request.steps),
                cuda,
                device,
                recording: false,
                done: false,
            })
        }

        /// Before step `step` (numbered from 1) runs: starts recording at the first traced one.
        pub fn before_step(&mut self, step: u64) -> Result<()> {
            if !self.recording && !self.done && step == *self.steps.start() {
                // SAFETY: as above.
                if unsafe { fmoec_shim_trace_start(self.cuda) } != 0 {
                    return Err(shim_error("starting libtorch's profiler"));
                }
                self.recording = true;
            }
            Ok(())
        }

        /// After step `step` ran: at the last traced one, [`Tracer::finish`]es.
        pub fn after_step(&mut self, step: u64) -> Result<Option<TraceSummary>> {
            if self.recording && step >= *self.steps.end() {
                return self.finish(step);
            }
            Ok(None)
        }

        /// Stops recording (after the GPU has run what was issued) and writes the trace,
        /// whole or not at all, with the steps up to `last_step`; `None` when nothing was
        /// being recorded.
        pub fn finish(&mut self, last_step: u64) -> Result<Option<TraceSummary>> {
            if !self.recording {
                return Ok(None);
            }
            self.recording = false;
            self.done = true;
            if let Device::Cuda(i) = self.device {
                tch::Cuda::synchronize(i as i64);
            }
            if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).with_context(|| {
                    format!("creating the trace's folder `{}`", path_text(parent))
                })?;
            }
            let partial = self.path.with_extension("json.partial");
            let c_path = CString::new(partial.to_string_lossy().as_bytes())
                .context("the trace's path holds a NUL byte")?;
            // SAFETY: a NUL-terminated path alive for the call; the shim catches exceptions.
            if unsafe { fmoec_shim_trace_stop(c_path.as_ptr()) } != 0 {
                let _ = std::fs::remove_file(&partial);
                return Err(shim_error(&format!(
                    "writing the trace `{}`",
                    path_text(&self.path)
                )));
            }
            std::fs::rename(&partial, &self.path)
                .with_context(|| format!("writing the trace `{}`", path_text(&self.path)))?;
            let steps = *self.steps.start()..=last_step.min(*self.steps.end());
            summarize(&self.path, steps).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traced_steps_follow_the_first_of_the_run() {
        assert_eq!(traced_steps(0, 100, 2), 2..=3);
        assert_eq!(traced_steps(40, 100, 3), 42..=44);
        assert_eq!(traced_steps(0, 2, 5), 2..=2);
        assert_eq!(traced_steps(0, 1, 2), 1..=1);
        assert_eq!(traced_steps(7, 8, 2), 8..=8);
    }

    #[test]
    fn families_drop_namespaces_and_arguments_and_name_the_functors() {
        assert_eq!(
            family("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)"),
            "vectorized_elementwise_kernel"
        );
        assert_eq!(
            family("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl_Functor, std::array<char*, 2ul> >(int, x)"),
            "vectorized_elementwise_kernel [GeluCUDAKernelImpl_Functor]"
        );
        assert_eq!(
            family("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT"),
            "nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT"
        );
        assert_eq!(
            family("fp8_act1_quant_rows_bf16"),
            "fp8_act1_quant_rows_bf16"
        );
        assert_eq!(
            family("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<x> >(y)"),
            "cutlass::device_kernel"
        );
    }

    #[test]
    fn kinds_sort_the_kernels_of_a_training_step() {
        let grouped = "_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalINS1_17GroupProblemShapeIN4cute5tupleIJiiiEEEEEE";
        for (name, expected) in [
            ("nvjet_tst_128x256", "dense matmuls (cuBLAS)"),
            ("cutlass::Kernel2<cutlass_80_wmma_tensorop_s161616gemm>(x)", "dense matmuls (cuBLAS)"),
            (grouped, "grouped matmuls (experts)"),
            ("void at::cuda::detail::prepare_grouped_gemm_data<cutlass::bfloat16_t>(x)", "grouped matmuls (experts)"),
            ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
            ("void at::native::vectorized_layer_norm_kernel<float>(int)", "LayerNorm"),
            ("norm_bwd_bf16", "LayerNorm"),
            ("col_sums_part_bf16", "reductions"),
            ("fp8_act1_quant_rows_bf16", "FP8 quantisation (fmoec)"),
            ("gather_rows_bf16", "MoE kernels (fmoec)"),
            ("xent_fwd", "LM loss"),
            ("multi_tensor_apply_kernel", "optimizer (multi-tensor)"),
            ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul> >(int)", "other elementwise"),
        ] {
            assert_eq!(kind("kernel", name), expected, "{name}");
        }
        assert_eq!(
            kind("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)"),
            "memcpy and memset"
        );
    }

    #[test]
    fn mangled_names_keep_their_qualified_head() {
        assert_eq!(
            family(
                "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm"
            ),
            "cutlass::device_kernel"
        );
        assert_eq!(family("_ZN7cutlass"), "cutlass");
        assert_eq!(family("_ZN99cut"), "_ZN99cut");
    }

    /// A trace of two steps: four kernels (two overlapping; one a grouped matmul whose kind
    /// shows only past the family's 110 characters), a copy, and CPU events that the summary
    /// leaves out.
    const TRACE: &str = r#"{"schemaVersion": 1, "traceEvents": [
      {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 500.0},
      {"ph": "X", "cat": "kernel", "name": "nvjet_tst_a", "ts": 100.0, "dur": 300.0, "args": {"stream": 7}},
      {"ph": "X", "cat": "kernel", "name": "void at::native::vectorized_layer_norm_kernel<float>(int)", "ts": 350.0, "dur": 100.0},
      {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": 600.0, "dur": 50.0},
      {"ph": "X", "cat": "kernel", "name": "nvjet_tst_a", "ts": 900.0, "dur": 200.0},
      {"ph": "X", "cat": "kernel", "name": "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13GemmUniversalINS5_17GroupProblemShapeIN4cute5tupleIJiiiEEEEEE", "ts": 1100.0, "dur": 40.0},
      {"ph": "i", "cat": "kernel", "name": "marker", "ts": 2000.0},
      {"name": "process_name", "ph": "M", "args": {"name": "python"}}
    ], "traceName": "x"}"#;

    #[test]
    fn a_summary_sums_the_gpu_events_by_kind_and_family() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.json");
        std::fs::write(&path, TRACE).unwrap();
        let s = summarize(&path, 2..=3).unwrap();
        assert_eq!(s.gpu_events, 5);
        assert!((s.span_ms - 1.04).abs() < 1e-12, "{}", s.span_ms);
        // 100..450, 600..650, 900..1140
        assert!((s.busy_ms - 0.64).abs() < 1e-12, "{}", s.busy_ms);
        let kinds: Vec<(&str, f64, u64)> = s
            .kinds
            .iter()
            .map(|k| (k.name.as_str(), k.ms, k.events))
            .collect();
        assert_eq!(
            kinds,
            [
                ("dense matmuls (cuBLAS)", 0.5, 2),
                ("LayerNorm", 0.1, 1),
                ("memcpy and memset", 0.05, 1),
                ("grouped matmuls (experts)", 0.04, 1)
            ]
        );
        assert_eq!(s.top[0].name, "nvjet_tst_a");
        let lines = summary_lines(&s);
        assert!(lines[0].contains("steps 2-3"), "{lines:?}");
        assert!(
            lines[1].starts_with("a step: GPU busy 0.32 of 0.52 ms (61.5%), 2 kernels"),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("0.250  72.5%        1  dense matmuls (cuBLAS)")),
            "{lines:?}"
        );
    }

    #[test]
    fn a_file_that_is_no_trace_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.json");
        std::fs::write(&path, "{\"traceEvents\": [").unwrap();
        let e = summarize(&path, 1..=1).unwrap_err();
        assert!(format!("{e:#}").contains("is not a Chrome trace"), "{e:#}");
    }

    /// A CPU run records the operators of the steps after the first into a whole Chrome
    /// trace (its folder made), and its summary names the file and the steps.
    #[cfg(feature = "cuda")]
    #[test]
    fn a_run_writes_the_trace_of_its_second_and_third_steps() {
        let dir = tempfile::tempdir().unwrap();
        // in a folder that is not there yet
        let path = dir.path().join("traces/steps.json");
        let tiny = crate::runtime::testing::tiny(&[
            ("steps      = 300", "steps = 5"),
            ("batch      = 16 x 128 tokens", "batch = 4 x 32 tokens"),
        ]);
        let summary = crate::runtime::testing::train_alone(
            &tiny,
            &crate::runtime::train::RunOptions {
                out: dir.path().join("out"),
                checkpoints: dir.path().join("out/checkpoints"),
                trace: Some(TraceRequest {
                    path: path.clone(),
                    steps: 2,
                }),
                ..Default::default()
            },
        )
        .unwrap();
        let t = summary.trace.expect("the run's summary has the trace");
        assert_eq!((t.first_step, t.last_step, t.gpu_events), (2, 3, 0));
        assert_eq!(t.path, path);
        let trace: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let ops: Vec<&str> = trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["cat"] == "cpu_op")
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert!(
            ops.contains(&"aten::mm") || ops.contains(&"aten::addmm"),
            "{:?}",
            &ops[..ops.len().min(20)]
        );
        assert!(!dir.path().join("traces/steps.json.partial").exists());
        let written = std::fs::read_to_string(dir.path().join("out/summary.json")).unwrap();
        assert!(written.contains("\"first_step\": 2"), "{written}");
    }
}
