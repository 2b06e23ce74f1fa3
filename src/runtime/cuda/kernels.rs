//! The CUDA kernels: their source (`kernels/*.cu`, embedded with `include_str!` and compiled
//! by NVRTC at run time for the device's compute capability, so users need no nvcc), their
//! typed ids ([`Kernel`]) with the parameter list each one declares ([`Param`]), and the
//! launch on torch's current stream, which checks the arguments against that list.
//!
//! Knows the kernels' names and signatures, not what the MoE layer does with them.

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CString};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Result};
use cudarc::driver::sys as cu;
use tch::{Device, Kind, Tensor};

use super::device::current_stream;

/// The kernels' source, one NVRTC program: the shared helpers first, then one file per
/// kernel family.
const SOURCE: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/rows.cu"),
    "\n",
    include_str!("kernels/swiglu.cu"),
    "\n",
    include_str!("kernels/bias_act.cu"),
    "\n",
    include_str!("kernels/plan.cu"),
    "\n",
    include_str!("kernels/xent.cu"),
    "\n",
    include_str!("kernels/draws.cu"),
    "\n",
    include_str!("kernels/fp8.cu"),
    "\n",
    include_str!("kernels/norm.cu"),
    "\n",
    include_str!("kernels/col_sums.cu"),
);

/// The element type of a kernel instance (its name's suffix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    Bf16,
    F32,
}

impl Elem {
    fn suffix(self) -> &'static str {
        match self {
            Elem::Bf16 => "bf16",
            Elem::F32 => "f32",
        }
    }

    /// Elements per 16-byte vector (the kernels' `Vec<T>::N`).
    pub fn per_vector(self) -> i64 {
        match self {
            Elem::Bf16 => 8,
            Elem::F32 => 4,
        }
    }

    /// The element type of `t`, where a kernel takes it: CUDA, bf16 or f32, the last
    /// dimension a multiple of 16 bytes and the data 16-byte aligned.
    pub fn of(t: &Tensor) -> Option<Elem> {
        if !t.device().is_cuda() {
            return None;
        }
        let (elem, bytes) = match t.kind() {
            Kind::BFloat16 => (Elem::Bf16, 2),
            Kind::Float => (Elem::F32, 4),
            _ => return None,
        };
        let d = *t.size().last()?;
        if (d * bytes) % 16 != 0 || (t.data_ptr() as usize) % 16 != 0 {
            return None;
        }
        Some(elem)
    }

    const BOTH: [Elem; 2] = [Elem::Bf16, Elem::F32];
}

/// The activation of the bias epilogue (`bias_act` kernels; a template parameter there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EpilogueAct {
    /// The bias alone.
    None,
    /// GELU, erf form.
    Gelu,
    Relu,
}

impl EpilogueAct {
    const ALL: [EpilogueAct; 3] = [EpilogueAct::None, EpilogueAct::Gelu, EpilogueAct::Relu];
}

/// The activation whose pass writes the row-wise FP8 copy of its output (`fp8_act*` kernels:
/// the second expert matmul's input).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Act {
    /// GELU, erf form, of the first matmul's output.
    Gelu,
    Relu,
    /// `silu(h1) · h3`.
    Swiglu,
}

impl Fp8Act {
    pub const ALL: [Fp8Act; 3] = [Fp8Act::Gelu, Fp8Act::Relu, Fp8Act::Swiglu];
}

/// The activation whose backward pass writes the row-wise FP8 copy of the input's gradient
/// (`fp8_act4`/`fp8_act5` kernels: the first expert matmul's output gradient). SwiGLU's
/// backward has two outputs: [`Kernel::Fp8SwigluGradQuantRows`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8ActGrad {
    /// GELU, erf form: `g · gelu'(a)`.
    Gelu,
    /// ReLU: `g · [a > 0]`.
    Relu,
}

impl Fp8ActGrad {
    pub const ALL: [Fp8ActGrad; 2] = [Fp8ActGrad::Gelu, Fp8ActGrad::Relu];
}

/// A kernel of the program, by what it does and the element type it was instantiated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Per-chunk counts of the plan keys.
    PlanCount,
    /// The scan over the chunks' counts.
    PlanScan,
    /// The stable placement of each chunk's slots.
    PlanPlace,
    /// The gates' keyed uniform draws (f32).
    KeyedUniform,
    SwigluFwd(Elem),
    SwigluBwd(Elem),
    GatherRows(Elem),
    SumRows(Elem),
    RowDots(Elem),
    BiasAct(EpilogueAct, Elem),
    /// Each expert's rows' column sums, in slices: f32 partial sums.
    SegmentSumsPart(Elem),
    /// The slices' partial sums added in order, in the gradient's type.
    SegmentSumsFinish(Elem),
    XentFwd(Elem),
    XentBwd(Elem),
    /// Row-wise FP8 quantisation (optionally gathering the rows as the dispatch does, or
    /// weighted as the combine's backward does).
    Fp8QuantRows(Elem),
    /// An activation writing its output and the output's row-wise FP8 copy in one pass.
    Fp8ActQuantRows(Fp8Act, Elem),
    /// An activation's backward writing the input's gradient and its row-wise FP8 copy.
    Fp8ActGradQuantRows(Fp8ActGrad, Elem),
    /// SwiGLU's backward writing both inputs' gradients and their row-wise FP8 copies.
    Fp8SwigluGradQuantRows(Elem),
    /// Column maxima of each row group (for per-group column scales).
    Fp8ColAmax(Elem),
    /// The second step of the column maxima a row-wise pass raises: its blocks' partial
    /// maxima of the groups they share, reduced.
    Fp8ColmaxReduce(Elem),
    /// FP8 scales from column maxima.
    Fp8ScalesFromAmax,
    /// The padded group ends of the side-by-side transposed copy (one warp).
    Fp8PaddedEnds,
    /// The transposed FP8 copy with per-group column scales.
    Fp8QuantTranspose(Elem),
    /// The transposed FP8 copy of an activation's output, computed on load from its input(s)
    /// as [`Kernel::Fp8ActQuantRows`] computes it (the output itself is never written).
    Fp8ActQuantTranspose(Fp8Act, Elem),
    /// The residual add and the LayerNorm/RMSNorm that reads it, one pass per row.
    NormFwd(Elem),
    /// Its backward: the input's gradient per row and the gain's/bias's per-block partial
    /// sums.
    NormBwd(Elem),
    /// The sum of those partial sums (f32), into the gradient or added to it.
    NormReduce,
    /// Column sums over chunks of rows, in f32 (a dense linear's bias gradient, first pass).
    ColSumsPart(Elem),
    /// The chunks' column sums added up, into or over an f32 vector (second pass).
    ColSumsFinish,
}

/// The type of one kernel parameter, as the `.cu` declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// A device pointer (any element type), or null where the kernel allows it.
    Ptr,
    /// `int`.
    I32,
    /// `long long`.
    I64,
}

impl Kernel {
    /// Every kernel of the program.
    pub fn all() -> Vec<Kernel> {
        let mut all = vec![
            Kernel::PlanCount,
            Kernel::PlanScan,
            Kernel::PlanPlace,
            Kernel::KeyedUniform,
        ];
        for e in Elem::BOTH {
            all.extend([
                Kernel::SwigluFwd(e),
                Kernel::SwigluBwd(e),
                Kernel::GatherRows(e),
                Kernel::SumRows(e),
                Kernel::RowDots(e),
                Kernel::SegmentSumsPart(e),
                Kernel::SegmentSumsFinish(e),
                Kernel::XentFwd(e),
                Kernel::XentBwd(e),
            ]);
            all.extend(EpilogueAct::ALL.map(|a| Kernel::BiasAct(a, e)));
            all.extend(Fp8Act::ALL.map(|a| Kernel::Fp8ActQuantRows(a, e)));
            all.extend(Fp8Act::ALL.map(|a| Kernel::Fp8ActQuantTranspose(a, e)));
            all.extend(Fp8ActGrad::ALL.map(|a| Kernel::Fp8ActGradQuantRows(a, e)));
            all.extend([
                Kernel::Fp8QuantRows(e),
                Kernel::Fp8SwigluGradQuantRows(e),
                Kernel::Fp8ColAmax(e),
                Kernel::Fp8ColmaxReduce(e),
                Kernel::Fp8QuantTranspose(e),
            ]);
            all.push(Kernel::ColSumsPart(e));
        }
        all.push(Kernel::Fp8ScalesFromAmax);
        all.push(Kernel::Fp8PaddedEnds);
        all.extend(Elem::BOTH.map(Kernel::NormFwd));
        all.extend(Elem::BOTH.map(Kernel::NormBwd));
        all.push(Kernel::NormReduce);
        all.push(Kernel::ColSumsFinish);
        all
    }

    /// Whether the kernel takes dynamic shared memory (the row-wise passes' column maxima),
    /// which may go past 48 KB where the device allows it.
    pub fn takes_dynamic_shared(self) -> bool {
        matches!(
            self,
            Kernel::Fp8QuantRows(_)
                | Kernel::Fp8ActQuantRows(..)
                | Kernel::Fp8ActGradQuantRows(..)
                | Kernel::Fp8SwigluGradQuantRows(_)
        )
    }

    /// Whether the kernel converts to FP8, which needs compute capability 8.9 or later (the
    /// program leaves these kernels out below that).
    pub fn needs_fp8(self) -> bool {
        // the row-wise passes (the kernels with dynamic shared memory) and these
        self.takes_dynamic_shared()
            || matches!(
                self,
                Kernel::Fp8ColAmax(_)
                    | Kernel::Fp8ColmaxReduce(_)
                    | Kernel::Fp8ScalesFromAmax
                    | Kernel::Fp8PaddedEnds
                    | Kernel::Fp8QuantTranspose(_)
                    | Kernel::Fp8ActQuantTranspose(..)
            )
    }

    /// The kernel's `extern "C"` name in the program.
    pub fn name(self) -> String {
        let typed = |base: &str, e: Elem| format!("{base}_{}", e.suffix());
        match self {
            Kernel::PlanCount => "plan_count".into(),
            Kernel::PlanScan => "plan_scan".into(),
            Kernel::PlanPlace => "plan_place".into(),
            Kernel::KeyedUniform => "keyed_uniform".into(),
            Kernel::SwigluFwd(e) => typed("swiglu_fwd", e),
            Kernel::SwigluBwd(e) => typed("swiglu_bwd", e),
            Kernel::GatherRows(e) => typed("gather_rows", e),
            Kernel::SumRows(e) => typed("sum_rows", e),
            Kernel::RowDots(e) => typed("row_dots", e),
            Kernel::BiasAct(a, e) => typed(
                match a {
                    EpilogueAct::None => "bias_act0",
                    EpilogueAct::Gelu => "bias_act1",
                    EpilogueAct::Relu => "bias_act2",
                },
                e,
            ),
            Kernel::SegmentSumsPart(e) => typed("segment_sums_part", e),
            Kernel::SegmentSumsFinish(e) => typed("segment_sums_finish", e),
            Kernel::XentFwd(e) => typed("xent_fwd", e),
            Kernel::XentBwd(e) => typed("xent_bwd", e),
            Kernel::Fp8QuantRows(e) => typed("fp8_quant_rows", e),
            Kernel::Fp8ActQuantRows(a, e) => typed(
                match a {
                    Fp8Act::Gelu => "fp8_act1_quant_rows",
                    Fp8Act::Relu => "fp8_act2_quant_rows",
                    Fp8Act::Swiglu => "fp8_act3_quant_rows",
                },
                e,
            ),
            Kernel::Fp8ActGradQuantRows(a, e) => typed(
                match a {
                    Fp8ActGrad::Gelu => "fp8_act4_quant_rows",
                    Fp8ActGrad::Relu => "fp8_act5_quant_rows",
                },
                e,
            ),
            Kernel::Fp8SwigluGradQuantRows(e) => typed("fp8_swiglu_grad_quant_rows", e),
            Kernel::Fp8ColAmax(e) => typed("fp8_col_amax", e),
            Kernel::Fp8ColmaxReduce(e) => typed("fp8_colmax_reduce", e),
            Kernel::Fp8ScalesFromAmax => "fp8_scales_from_amax".into(),
            Kernel::Fp8PaddedEnds => "fp8_padded_ends".into(),
            Kernel::Fp8QuantTranspose(e) => typed("fp8_quant_transpose", e),
            Kernel::Fp8ActQuantTranspose(a, e) => typed(
                match a {
                    Fp8Act::Gelu => "fp8_act1_quant_transpose",
                    Fp8Act::Relu => "fp8_act2_quant_transpose",
                    Fp8Act::Swiglu => "fp8_act3_quant_transpose",
                },
                e,
            ),
            Kernel::NormFwd(e) => typed("norm_fwd", e),
            Kernel::NormBwd(e) => typed("norm_bwd", e),
            Kernel::NormReduce => "norm_reduce".into(),
            Kernel::ColSumsPart(e) => typed("col_sums_part", e),
            Kernel::ColSumsFinish => "col_sums_finish".into(),
        }
    }

    /// The parameters the kernel declares, in order.
    pub fn params(self) -> &'static [Param] {
        use Param::{Ptr as P, I32 as I, I64 as L};
        match self {
            Kernel::PlanCount => &[P, L, I, L, P],
            Kernel::PlanScan => &[P, I, I, P, P, P, P],
            Kernel::PlanPlace => &[P, L, I, I, L, P, P, P, P, P, P, P, P],
            // (key, stream word, n, out)
            Kernel::KeyedUniform => &[P, L, L, P],
            Kernel::SwigluFwd(_) => &[P, P, P, L],
            Kernel::SwigluBwd(_) => &[P, P, P, P, P, L],
            // (src, index, k, f32 weights or null, out, rows, d)
            Kernel::GatherRows(_) | Kernel::SumRows(_) | Kernel::RowDots(_) => {
                &[P, P, I, P, P, L, I]
            }
            // (h, bias, row_expert, E, g or null, out, rows, d)
            Kernel::BiasAct(..) => &[P, P, P, I, P, P, L, I],
            // (g, row_expert, partial, rows, d, slices)
            Kernel::SegmentSumsPart(_) => &[P, P, P, L, I, I],
            // (partial, out, slices, n)
            Kernel::SegmentSumsFinish(_) => &[P, P, I, L],
            Kernel::XentFwd(_) => &[P, P, P, P, L, I],
            Kernel::XentBwd(_) => &[P, P, P, P, P, L, I],
            // (src, row_slot or null, k, weight or null, limit or null, copy or null, q, scale,
            // overflow, rows, d, ends, groups, column maxima or null, partial maxima or null)
            Kernel::Fp8QuantRows(_) => &[P, P, I, P, P, P, P, P, P, L, I, P, I, P, P],
            // (a, b or null, limit or null, out, q, scale, overflow, rows, d, ends, groups,
            // column maxima or null, partial maxima or null)
            Kernel::Fp8ActQuantRows(..) | Kernel::Fp8ActGradQuantRows(..) => {
                &[P, P, P, P, P, P, P, L, I, P, I, P, P]
            }
            // (a, b, g, limit or null, ga, ga's q, scale, overflow, rows, d, ends, groups,
            // ga's column maxima or null, partial maxima or null, then gb's gradient, q,
            // scale, column maxima or null, partial maxima or null)
            Kernel::Fp8SwigluGradQuantRows(_) => {
                &[P, P, P, P, P, P, P, P, L, I, P, I, P, P, P, P, P, P, P]
            }
            // (x, ends, groups, amax bits, d)
            Kernel::Fp8ColAmax(_) => &[P, P, I, P, I],
            // (partial maxima, ends, groups, chunk, blocks, blocks a span, amax bits, d)
            Kernel::Fp8ColmaxReduce(_) => &[P, P, I, L, L, I, P, I],
            // (amax bits, inv, scale, overflow, n)
            Kernel::Fp8ScalesFromAmax => &[P, P, P, P, L],
            // (ends, groups, padded ends)
            Kernel::Fp8PaddedEnds => &[P, I, P],
            // (x, x2 or null, ends, pad_ends, groups, inv, out, positions, d, group_stride,
            // col_stride, base)
            Kernel::Fp8QuantTranspose(_) | Kernel::Fp8ActQuantTranspose(..) => {
                &[P, P, P, P, I, P, P, L, I, L, L, I]
            }
            // (x, h or null, gamma, beta or null, s or null, y, mean or null, rstd, rows, d,
            // rms)
            Kernel::NormFwd(_) => &[P, P, P, P, P, P, P, P, L, I, I],
            // (dy, ds or null, s, gamma, mean or null, rstd, dx, gain partials, bias partials
            // or null, rows, d)
            Kernel::NormBwd(_) => &[P, P, P, P, P, P, P, P, P, L, I],
            // (gain partials, gain gradient, bias partials or null, bias gradient or null,
            // partial rows, d, accumulate)
            Kernel::NormReduce => &[P, P, P, P, I, I, I],
            // (g, partial, rows, d, chunk rows)
            Kernel::ColSumsPart(_) => &[P, P, L, I, L],
            // (partial, out, chunks, d, accumulate)
            Kernel::ColSumsFinish => &[P, P, I, I, I],
        }
    }
}

/// One kernel argument, passed by value.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(*mut c_void),
    I32(c_int),
    I64(i64),
}

impl Arg {
    fn param(&self) -> Param {
        match self {
            Arg::Ptr(_) => Param::Ptr,
            Arg::I32(_) => Param::I32,
            Arg::I64(_) => Param::I64,
        }
    }
}

/// A tensor's data pointer as a kernel argument (null for `None`).
pub fn ptr(t: Option<&Tensor>) -> Arg {
    Arg::Ptr(t.map(|t| t.data_ptr()).unwrap_or(std::ptr::null_mut()))
}

/// How a kernel is launched: `blocks` blocks along x (capped for grid-stride kernels) by
/// `blocks_y`, `threads` threads each, with `shared_bytes` of dynamic shared memory.
#[derive(Clone, Copy, Debug)]
pub struct Grid {
    pub blocks: i64,
    pub blocks_y: u32,
    pub threads: u32,
    pub shared_bytes: u32,
}

impl Grid {
    /// `blocks` blocks of `threads` threads, one row of blocks, no dynamic shared memory.
    pub fn linear(blocks: i64, threads: u32) -> Grid {
        Grid {
            blocks,
            blocks_y: 1,
            threads,
            shared_bytes: 0,
        }
    }
}

/// The program loaded on one device.
struct Module {
    ctx: cu::CUcontext,
    functions: HashMap<Kernel, cu::CUfunction>,
    /// The device's compute capability, `major · 10 + minor`.
    capability: i32,
    /// Its streaming multiprocessors.
    multiprocessors: i32,
    /// The dynamic shared memory a block may opt into (the kernels that take it have).
    shared_optin: i64,
}

// SAFETY: the driver's context and function handles are process-wide values, usable from
// any thread once the context is made current there, which every launch does first.
unsafe impl Send for Module {}

fn cu_check(what: &str, r: cu::CUresult) -> Result<()> {
    if r != cu::CUresult::CUDA_SUCCESS {
        bail!("{what}: CUDA driver error {r:?}");
    }
    Ok(())
}

type Modules = Mutex<HashMap<usize, std::result::Result<Module, String>>>;

fn modules() -> &'static Modules {
    static M: OnceLock<Modules> = OnceLock::new();
    M.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Compiles the program to PTX for compute capability `major.minor`.
pub fn compile(major: i32, minor: i32) -> Result<Vec<u8>> {
    use cudarc::nvrtc::result as nv;
    // SAFETY: only dlopens libnvrtc; no other preconditions.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!("libnvrtc was not found (add the CUDA libraries, e.g. torch's nvidia/cu13/lib, to LD_LIBRARY_PATH)");
    }
    let src = CString::new(SOURCE)?;
    let name = CString::new("fmoec_kernels.cu")?;
    let prog = nv::create_program(&src, Some(&name)).map_err(|e| anyhow!("nvrtc: {e:?}"))?;
    let mut opts = vec![
        format!("--gpu-architecture=compute_{major}{minor}"),
        "-std=c++17".to_string(),
        "--use_fast_math".to_string(),
    ];
    // the bf16 FP8 row passes' per-value first phase instead of the packed one (the same
    // bits; for timing the two in one build)
    if std::env::var("FMOEC_FP8_PACKED_ROWS").is_ok_and(|v| v == "0") {
        opts.push("-DFMOEC_FP8_HELD_ROWS".to_string());
    }
    // the bf16 transposed copy's per-value loads instead of the packed ones (the same bits)
    if std::env::var("FMOEC_FP8_PACKED_TRANSPOSE").is_ok_and(|v| v == "0") {
        opts.push("-DFMOEC_FP8_HELD_TRANSPOSE".to_string());
    }
    // SAFETY: `prog` is a live program handle (created above, destroyed below).
    let result = unsafe { nv::compile_program(prog, &opts) };
    let out = match result {
        // SAFETY: `prog` is live and compiled.
        Ok(()) => unsafe { nv::get_ptx(prog) }
            .map(|p| p.into_iter().map(|c| c as u8).collect::<Vec<u8>>())
            .map_err(|e| anyhow!("nvrtc get_ptx: {e:?}")),
        Err(e) => {
            // SAFETY: `prog` is live; the log is copied out.
            let log = unsafe { nv::get_program_log(prog) }
                .map(|l| {
                    let bytes: Vec<u8> = l.into_iter().map(|c| c as u8).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .unwrap_or_default();
            Err(anyhow!("nvrtc compile failed: {e:?}\n{log}"))
        }
    };
    // SAFETY: `prog` is live and destroyed exactly once, after its last use.
    unsafe {
        let _ = nv::destroy_program(prog);
    }
    out
}

/// One attribute of the CUDA device `dev` (libcuda loaded and initialised).
fn device_attribute(dev: cu::CUdevice, attribute: cu::CUdevice_attribute) -> Result<c_int> {
    let mut value = 0;
    // SAFETY: the out-pointer is a live local; the call only reads the device's attribute.
    unsafe {
        cu_check(
            "cuDeviceGetAttribute",
            cu::cuDeviceGetAttribute(&mut value, attribute, dev),
        )?;
    }
    Ok(value)
}

fn load(device: usize) -> Result<Module> {
    // SAFETY: dlopen of libcuda, then driver calls with out-pointers to live locals, in the
    // order the driver API requires (init, device, primary context made current, module).
    unsafe {
        if !cu::is_culib_present() {
            bail!("libcuda was not found");
        }
        cu_check("cuInit", cu::cuInit(0))?;
        let mut dev = 0;
        cu_check("cuDeviceGet", cu::cuDeviceGet(&mut dev, device as c_int))?;
        let mut ctx = std::ptr::null_mut();
        cu_check(
            "cuDevicePrimaryCtxRetain",
            cu::cuDevicePrimaryCtxRetain(&mut ctx, dev),
        )?;
        cu_check("cuCtxSetCurrent", cu::cuCtxSetCurrent(ctx))?;
        use cu::CUdevice_attribute as A;
        let major = device_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = device_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let multiprocessors = device_attribute(dev, A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let shared_optin = device_attribute(
            dev,
            A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?;
        let mut ptx = compile(major, minor)?;
        ptx.push(0);
        let mut module = std::ptr::null_mut();
        cu_check(
            "cuModuleLoadData",
            cu::cuModuleLoadData(&mut module, ptx.as_ptr() as *const c_void),
        )?;
        let mut functions = HashMap::new();
        let capability = major * 10 + minor;
        for kernel in Kernel::all() {
            if kernel.needs_fp8() && capability < 89 {
                continue;
            }
            let cname = CString::new(kernel.name())?;
            let mut f = std::ptr::null_mut();
            cu_check(
                "cuModuleGetFunction",
                cu::cuModuleGetFunction(&mut f, module, cname.as_ptr()),
            )?;
            if kernel.takes_dynamic_shared() {
                // the most the device lets a block of this kernel opt into (its static
                // shared memory counted)
                let mut fixed = 0;
                cu_check(
                    "cuFuncGetAttribute",
                    cu::cuFuncGetAttribute(
                        &mut fixed,
                        cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                        f,
                    ),
                )?;
                cu_check(
                    "cuFuncSetAttribute",
                    cu::cuFuncSetAttribute(
                        f,
                        cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        (shared_optin - fixed).max(0),
                    ),
                )?;
            }
            functions.insert(kernel, f);
        }
        Ok(Module {
            ctx,
            functions,
            capability,
            multiprocessors,
            shared_optin: shared_optin as i64,
        })
    }
}

/// Compiles and loads the kernels for `device` (once); the error says why they cannot run.
pub fn kernels_ready(device: usize) -> Result<()> {
    let mut m = modules()
        .lock()
        .map_err(|_| anyhow!("kernel cache poisoned"))?;
    let entry = m
        .entry(device)
        .or_insert_with(|| load(device).map_err(|e| format!("{e:#}")));
    match entry {
        Ok(_) => Ok(()),
        Err(e) => bail!("fused kernels unavailable on cuda:{device}: {e}"),
    }
}

impl Module {
    fn function(&self, kernel: Kernel) -> Result<cu::CUfunction> {
        self.functions
            .get(&kernel)
            .copied()
            .ok_or_else(|| anyhow!("kernel {} is not loaded", kernel.name()))
    }
}

/// `f` of `device`'s loaded program (compiled and loaded first, once).
fn with_module<R>(device: usize, f: impl FnOnce(&Module) -> Result<R>) -> Result<R> {
    kernels_ready(device)?;
    let m = modules()
        .lock()
        .map_err(|_| anyhow!("kernel cache poisoned"))?;
    match m.get(&device) {
        Some(Ok(module)) => f(module),
        _ => bail!("fused kernels not loaded on cuda:{device}"),
    }
}

/// The compute capability (`major · 10 + minor`) of `device`, once its kernels are loaded.
pub fn capability(device: usize) -> Result<i32> {
    with_module(device, |m| Ok(m.capability))
}

/// The streaming multiprocessors of `device`, once its kernels are loaded.
pub fn multiprocessors(device: usize) -> Result<i64> {
    with_module(device, |m| Ok(m.multiprocessors.max(1) as i64))
}

/// The dynamic shared memory a block of a kernel that takes it
/// ([`Kernel::takes_dynamic_shared`]) may have on `device`.
pub fn dynamic_shared_limit(device: usize) -> Result<i64> {
    with_module(device, |m| Ok(m.shared_optin))
}

/// How many blocks of `kernel` (of `threads` threads and `shared_bytes` of dynamic shared
/// memory) the whole of `device` holds at once: the driver's occupancy, which counts the
/// kernel's registers as well as its threads and shared memory, times the multiprocessors.
/// A grid of this many blocks runs in one wave. (Counting threads and shared memory alone,
/// the row-wise passes with column maxima asked for 7 blocks of 256 threads a
/// multiprocessor where their 40-56 registers a thread leave room for 4-6, so a second,
/// thinner wave ran after the first.)
pub fn resident_blocks(
    device: usize,
    kernel: Kernel,
    threads: u32,
    shared_bytes: u32,
) -> Result<i64> {
    with_module(device, |m| {
        let f = m.function(kernel)?;
        let mut per_multiprocessor: c_int = 0;
        // SAFETY: `f` belongs to the loaded module (never unloaded) and the out-pointer is
        // a live local; the call only reads the function's attributes.
        unsafe {
            cu_check("cuCtxSetCurrent", cu::cuCtxSetCurrent(m.ctx))?;
            cu_check(
                "cuOccupancyMaxActiveBlocksPerMultiprocessor",
                cu::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                    &mut per_multiprocessor,
                    f,
                    threads as c_int,
                    shared_bytes as usize,
                ),
            )?;
        }
        Ok(per_multiprocessor.max(1) as i64 * m.multiprocessors.max(1) as i64)
    })
}

/// Says once on stderr why the fused kernels cannot run (the libtorch path runs instead).
pub fn warn_unavailable(device: usize) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Err(e) = kernels_ready(device) {
        WARNED.call_once(|| eprintln!("warning: {e:#}; using the libtorch path"));
    }
}

/// The CUDA device index of `t` (0 for a CPU tensor).
pub fn device_index(t: &Tensor) -> usize {
    match t.device() {
        Device::Cuda(n) => n,
        _ => 0,
    }
}

/// Launches `kernel` on `device`'s current torch stream with `args`, which must match the
/// kernel's [`Kernel::params`]. Tensors behind pointer arguments must be contiguous, on
/// `device`, and alive until the stream reaches the kernel (torch's allocator keeps freed
/// blocks stream-ordered, so holding them through the call is enough).
pub fn launch(device: usize, kernel: Kernel, grid: Grid, args: &[Arg]) -> Result<()> {
    let declared = kernel.params();
    if args.len() != declared.len() || args.iter().zip(declared).any(|(a, p)| a.param() != *p) {
        bail!(
            "kernel {}: arguments {:?} do not match its parameters {declared:?}",
            kernel.name(),
            args.iter().map(Arg::param).collect::<Vec<_>>()
        );
    }
    if grid.blocks == 0 || grid.blocks_y == 0 {
        return Ok(());
    }
    with_module(device, |module| {
        launch_loaded(module, device, kernel, grid, args)
    })
}

/// [`launch`] on the loaded `module` of `device`, the arguments checked.
fn launch_loaded(
    module: &Module,
    device: usize,
    kernel: Kernel,
    grid: Grid,
    args: &[Arg],
) -> Result<()> {
    let f = module.function(kernel)?;
    let stream = current_stream(device)?;
    let blocks = grid.blocks.min(1 << 20) as u32;
    let mut values = args.to_vec();
    let mut params: Vec<*mut c_void> = values
        .iter_mut()
        .map(|a| match a {
            Arg::Ptr(p) => p as *mut *mut c_void as *mut c_void,
            Arg::I32(i) => i as *mut c_int as *mut c_void,
            Arg::I64(l) => l as *mut i64 as *mut c_void,
        })
        .collect();
    // SAFETY: `params` holds one pointer per declared parameter (checked above), each to a
    // live value of that parameter's type in `values`, which is neither moved nor dropped
    // until the call returns (the driver copies the values at launch); the pointers inside
    // are device memory of live tensors (the caller's contract above); `f` and the context
    // belong to the loaded module, which is never unloaded.
    unsafe {
        cu_check("cuCtxSetCurrent", cu::cuCtxSetCurrent(module.ctx))?;
        cu_check(
            &kernel.name(),
            cu::cuLaunchKernel(
                f,
                blocks,
                grid.blocks_y,
                1,
                grid.threads,
                1,
                1,
                grid.shared_bytes,
                stream as cu::CUstream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            ),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The program compiles with NVRTC for Hopper (no GPU needed, only libnvrtc: torch's
    /// `nvidia/cu13/lib`, which `.ci/env.sh` puts on the library path) and holds every
    /// kernel; skipped, saying so, where libnvrtc is absent.
    #[test]
    fn kernel_source_compiles_with_nvrtc() {
        // SAFETY: only dlopens libnvrtc.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipped: libnvrtc not found");
            return;
        }
        let ptx = compile(9, 0).unwrap();
        let ptx = String::from_utf8_lossy(&ptx);
        for kernel in Kernel::all() {
            let name = kernel.name();
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name} missing from the PTX"
            );
            // every parameter declared on the Rust side is one the PTX entry takes
            let entry = ptx.split(&format!(".entry {name}(")).nth(1).unwrap();
            let declared = entry.split(')').next().unwrap().matches(".param").count();
            assert_eq!(declared, kernel.params().len(), "{name}'s parameters");
        }
    }

    /// Arguments that do not match a kernel's parameters are refused before any launch.
    #[test]
    fn mismatched_arguments_are_refused() {
        let err = launch(
            0,
            Kernel::SwigluFwd(Elem::F32),
            Grid::linear(1, 32),
            &[Arg::I32(1)],
        )
        .unwrap_err();
        assert!(format!("{err}").contains("do not match"), "{err}");
    }
}
