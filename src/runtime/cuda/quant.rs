//! FP8 (e4m3) operands for the scaled matmuls, with dynamic scales computed from the tensor
//! itself (no amax history): each scaling group (a row, or a column of one group of rows)
//! gets `inv = 448 / max(amax, 1e-12)`, its values become `e4m3(x · inv)` (saturating) and
//! the matmul multiplies back by `scale = max(amax, 1e-12) / 448`. All-zero groups (dropped
//! slots, empty experts) get the floor, so no scale is 0, Inf or NaN; a group whose amax is
//! not finite counts into an overflow counter (an int32 on the device) that the caller reads
//! once per step.
//!
//! Three layouts, one pass each over the input (the column scales read it once more):
//! - [`quant_rows`]: row-wise, `[R, C]` → `[R, C]` with `[R]` scales (the left operand of
//!   every matmul; a weight's input-gradient operand), also inside the pass that makes the
//!   tensor, which then writes both copies: [`gather_quant_rows`] (the dispatch's gather,
//!   or weighted, the combine's backward) and [`act_quant_rows`] (the activation between
//!   the expert matmuls);
//! - [`quant_transposed`] side by side: rows in groups (experts) → `[C, P]`, each group's
//!   rows padded to a multiple of 16 positions, with `[G·C]` per-group column scales (the
//!   weight gradient's operands, whose contraction runs over the tokens);
//! - [`quant_transposed`] stacked: `G` equal groups (an expert's weight) → `[G, C, len]` with
//!   `[G, C]` scales (a weight's forward operand, as the matmul wants it column-major).
//!
//! The activation's output can also exist only as FP8: [`act_quant_rows_only`] writes its
//! rows without the output, and [`act_quant_transposed`] makes its transposed copy from the
//! activation's input, computing the activation on load (the same bits).
//!
//! The row-wise passes can also return the column maxima of each row group
//! ([`ColumnMaxima`]), which the transposed copy of the same tensor then takes instead of a
//! pass of its own over the tensor.
//!
//! Each function runs its kernels on a GPU of compute capability 8.9 or later (bf16 or f32
//! input, rows of a multiple of 16 bytes) and otherwise the same function in libtorch ops,
//! which compute the same bits (the kernels round every product and division as IEEE f32
//! does): the CPU reference mode of `precision = fp8`, and the check of the kernels.
//!
//! Knows the scaling recipe and the layouts the scaled matmuls want, not the layer.

use std::ffi::c_int;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::kernels::{
    self, device_index, dynamic_shared_limit, launch, multiprocessors, ptr, resident_blocks, Arg,
    Elem, Fp8Act, Fp8ActGrad, Grid, Kernel,
};

/// The largest finite e4m3 value.
pub const FP8_MAX: f64 = 448.0;
/// The floor on a scaling group's amax.
pub const FP8_EPS: f64 = 1e-12;

/// An FP8 operand: e4m3 values and the f32 scales that multiply them back.
pub struct Fp8 {
    pub q: Tensor,
    pub scale: Tensor,
}

impl Fp8 {
    pub fn shallow_clone(&self) -> Fp8 {
        Fp8 {
            q: self.q.shallow_clone(),
            scale: self.scale.shallow_clone(),
        }
    }

    /// The values times their scales, in f32 (`scale_of_row` broadcasts the scales along
    /// the rows of `q` as they were quantised).
    pub fn dequantize_rows(&self) -> Result<Tensor> {
        Ok(self
            .q
            .f_to_kind(Kind::Float)?
            .f_mul(&self.scale.f_unsqueeze(-1)?)?)
    }
}

/// Whether the FP8 kernels run on `t`'s device for `t` (its type and row width), unless
/// `FMOEC_FP8_KERNELS=0` (the libtorch ops run instead).
pub fn kernels_apply(t: &Tensor) -> bool {
    Elem::of(t).is_some() && kernels_run_on(t.device())
}

/// Whether the FP8 kernels run on `device` (a GPU of compute capability 8.9 or later),
/// unless `FMOEC_FP8_KERNELS=0`.
fn kernels_run_on(device: Device) -> bool {
    let Device::Cuda(index) = device else {
        return false;
    };
    if std::env::var("FMOEC_FP8_KERNELS").is_ok_and(|v| v == "0") {
        return false;
    }
    kernels::capability(index).is_ok_and(|c| c >= 89)
}

fn e4m3() -> Kind {
    Kind::Float8e4m3fn
}

/// `e4m3(x · inv)` with saturation, in libtorch ops (the kernels' function).
fn to_e4m3(x: &Tensor, inv: &Tensor) -> Result<Tensor> {
    Ok(x.f_mul(inv)?
        .f_clamp(-FP8_MAX, FP8_MAX)?
        .f_to_kind(e4m3())?)
}

/// `(inv, scale)` of maxima `amax` (f32; NaN counts as Inf), and the number of non-finite
/// maxima added into `overflow`.
fn scales_of(amax: &Tensor, overflow: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let finite = amax.f_isfinite()?;
    if let Some(o) = overflow {
        let bad = finite
            .f_logical_not()?
            .f_sum(Kind::Int)?
            .f_to_device(o.device())?;
        let _ = o.shallow_clone().f_add_(&bad)?;
    }
    let amax = amax.f_where_scalarother(&finite, f64::INFINITY)?;
    let floor = amax.f_clamp_min(FP8_EPS)?;
    // tensor by tensor, so each is one IEEE division as the kernels' __fdiv_rn (a division
    // by a scalar may run as a product with its reciprocal)
    let max = floor.f_full_like(FP8_MAX)?;
    let inv = max.f_div(&floor)?;
    let scale = floor.f_div(&max)?;
    Ok((inv, scale))
}

/// `|x|` in f32 with NaN as Inf (an overflow either way).
fn abs_f32(x: &Tensor) -> Result<Tensor> {
    let a = x.f_to_kind(Kind::Float)?.f_abs()?;
    Ok(a.f_where_scalarother(&a.f_isnan()?.f_logical_not()?, f64::INFINITY)?)
}

/// The column maxima of each row group of a tensor, as a row-wise pass raised them: int32
/// `[G·C]`, the bits of the non-negative f32 maxima (Inf where a value was not finite), for
/// [`quant_transposed`] of the same tensor with the same group ends.
pub type ColumnMaxima = Tensor;

/// f32 `[G, C]`: the largest `|x|` of each column within each group of rows (groups ending
/// at `ends`; rows past the last group left out; NaN as Inf).
fn group_column_amax(x: &Tensor, ends: &Tensor) -> Result<Tensor> {
    let (rows, cols) = x.size2()?;
    let groups = ends.size()[0];
    let device = x.device();
    let row = Tensor::f_arange(rows, (Kind::Int64, device))?;
    // the first group whose end is past the row
    let group = row.f_searchsorted(
        &ends.f_to_kind(Kind::Int64)?,
        false,
        true,
        "right",
        None::<Tensor>,
    )?;
    let kept = group.f_lt(groups)?;
    let g = group.f_clamp_max(groups - 1)?;
    let xf = x.f_to_kind(Kind::Float)?;
    let absx = abs_f32(&xf)?.f_where_self(&kept.f_unsqueeze(1)?, &xf.f_zeros_like()?)?;
    Ok(Tensor::f_zeros([groups, cols], (Kind::Float, device))?
        .f_index_reduce(0, &g, &absx, "amax", true)?)
}

/// [`ColumnMaxima`] of `x` computed in libtorch ops (the reference of the fused passes).
pub fn column_maxima_reference(x: &Tensor, ends: &Tensor) -> Result<ColumnMaxima> {
    Ok(group_column_amax(x, ends)?
        .f_contiguous()?
        .f_view_dtype(Kind::Int)?
        .f_reshape([-1])?)
}

/// How a row-wise pass's blocks hand on the column maxima they raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaximaReduction {
    /// Each block copies its maxima of the groups it shares with other blocks into a small
    /// buffer (and stores those of the groups it holds alone), and a second kernel reduces
    /// the buffer: the default.
    TwoStep,
    /// Each block raises the maxima by atomicMax when its rows leave a group and at the end
    /// (`FMOEC_FP8_MAXIMA_REDUCE=atomic`): the earlier way, whose S1 passes took about 0.11 ms
    /// more on an H100 (BENCHMARKS.md 2026-12-06, part 4).
    Atomic,
}

thread_local! {
    static REDUCTION_ON_THIS_THREAD: std::cell::Cell<Option<MaximaReduction>> =
        const { std::cell::Cell::new(None) };
}

/// On this thread, the row-wise passes reduce their column maxima this way (`None`: as
/// `FMOEC_FP8_MAXIMA_REDUCE` says): for the kernel checks, which check both.
pub fn reduce_maxima_on_this_thread(way: Option<MaximaReduction>) {
    REDUCTION_ON_THIS_THREAD.with(|r| r.set(way));
}

fn maxima_reduction() -> MaximaReduction {
    REDUCTION_ON_THIS_THREAD
        .with(|r| r.get())
        .unwrap_or_else(|| {
            if std::env::var("FMOEC_FP8_MAXIMA_REDUCE").is_ok_and(|v| v == "atomic") {
                MaximaReduction::Atomic
            } else {
                MaximaReduction::TwoStep
            }
        })
}

/// Where a row-wise kernel writes column maxima, when it can: the group ends (int32), their
/// count, the zeroed maxima, the pass's launch, and (two-step) its blocks' partial maxima.
struct FusedMaxima {
    ends: Tensor,
    groups: i64,
    amax: Tensor,
    elem: Elem,
    d: i64,
    grid: Grid,
    /// Two rows of `d` maxima (as the input's type holds them) a block of `grid`; not
    /// zeroed: the second kernel reads only the rows the blocks wrote.
    partial: Option<Tensor>,
}

/// The most shared memory one output's column maxima take in a row pass (the limit a kernel
/// has without opting into more: rows of up to 24576 bf16 values); a pass with two outputs
/// opts into twice that where the device allows it.
const SHARED_DEFAULT_LIMIT: i64 = 48 * 1024;

/// The most blocks of a row-wise pass whose partial maxima one block of the second kernel
/// reduces (see [`blocks_a_span`]).
const BLOCKS_A_SPAN: i64 = 32;

/// Blocks of a row-wise pass (`blocks` of them) whose partial maxima one block of the second
/// kernel reduces, where that kernel's grid has `blocks_y` column blocks: spans short enough
/// for two of its blocks a multiprocessor, up to [`BLOCKS_A_SPAN`]. A span's threads read their
/// blocks' partial rows one after another, so a grid of a few long spans waits on them: at F0
/// 32 blocks a span made 17 blocks of 128 threads, 18-21 us a pass on an H100 (BENCHMARKS.md
/// 2026-12-06, F0 kernel by kernel); spans sized to the grid take it to 11.2 us against 19.5
/// for 32-block spans measured in the same call (BENCHMARKS.md, 2026-12-06 19:24-19:27 UTC).
/// `FMOEC_FP8_MAXIMA_SPAN=n` sets it (32: the earlier way).
fn blocks_a_span(blocks: i64, blocks_y: i64, device: usize) -> Result<i64> {
    if let Some(n) = std::env::var("FMOEC_FP8_MAXIMA_SPAN")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|&n| n >= 1)
    {
        return Ok(n);
    }
    let spans = (2 * multiprocessors(device)? / blocks_y.max(1)).max(1);
    Ok(((blocks + spans - 1) / spans).clamp(1, BLOCKS_A_SPAN))
}

impl FusedMaxima {
    /// For a pass of `kernel` over `rows` rows of width `d` of `elem` on `x`'s device with
    /// groups ending at `ends`, writing `outputs` outputs (each its own maxima, in one block's
    /// shared memory); `None` where an output's d values would not fit 48 KB, or all of them
    /// not the block's shared memory (the transposed copy then computes the maxima itself).
    /// The first output's maxima; [`FusedMaxima::sibling`] gives the others'.
    fn new(
        x: &Tensor,
        kernel: Kernel,
        elem: Elem,
        rows: i64,
        d: i64,
        ends: Option<&Tensor>,
        outputs: i64,
    ) -> Result<Option<FusedMaxima>> {
        let Some(ends) = ends else {
            return Ok(None);
        };
        let groups = ends.size()[0];
        let per_output = d * (16 / elem.per_vector());
        if groups == 0
            || per_output > SHARED_DEFAULT_LIMIT
            || per_output * outputs > dynamic_shared_limit(device_index(x))?
            || std::env::var("FMOEC_FP8_COLUMN_MAXIMA").is_ok_and(|v| v == "0")
        {
            return Ok(None);
        }
        let grid = Self::resident_grid(x, kernel, elem, rows, d, outputs)?;
        Ok(Some(FusedMaxima {
            ends: ends.f_to_kind(Kind::Int)?.f_contiguous()?,
            groups,
            amax: Tensor::f_zeros([groups * d], (Kind::Int, x.device()))?,
            elem,
            d,
            partial: Self::partial_rows(grid, elem, d, x.device())?,
            grid,
        }))
    }

    /// The maxima of another output of the same pass: the same groups and grid, their own
    /// maxima and partial rows.
    fn sibling(&self) -> Result<FusedMaxima> {
        let device = self.amax.device();
        Ok(FusedMaxima {
            ends: self.ends.shallow_clone(),
            groups: self.groups,
            amax: self.amax.f_zeros_like()?,
            elem: self.elem,
            d: self.d,
            grid: self.grid,
            partial: Self::partial_rows(self.grid, self.elem, self.d, device)?,
        })
    }

    /// The two-step reduction's partial rows for `grid`'s blocks (none with atomics).
    fn partial_rows(grid: Grid, elem: Elem, d: i64, device: Device) -> Result<Option<Tensor>> {
        Ok(match maxima_reduction() {
            MaximaReduction::TwoStep => Some(Tensor::f_empty(
                [grid.blocks * 2 * d * (16 / elem.per_vector())],
                (Kind::Uint8, device),
            )?),
            MaximaReduction::Atomic => None,
        })
    }

    /// The kernel's last four arguments (nulls without maxima).
    fn args(this: Option<&FusedMaxima>) -> [Arg; 4] {
        match this {
            Some(m) => [
                ptr(Some(&m.ends)),
                Arg::I32(m.groups as c_int),
                ptr(Some(&m.amax)),
                ptr(m.partial.as_ref()),
            ],
            None => [ptr(None), Arg::I32(0), ptr(None), ptr(None)],
        }
    }

    /// The launch of a row-wise pass over `rows` rows: one block of 128 threads per row
    /// (grid-stride), or with maxima [`FusedMaxima::resident_grid`].
    fn grid(this: Option<&FusedMaxima>, rows: i64) -> Grid {
        match this {
            Some(m) => m.grid,
            None => Grid::linear(rows, 128),
        }
    }

    /// With maxima: one wave of resident blocks of `kernel`, each over a contiguous chunk of
    /// rows with its d values of shared memory, of up to 256 threads
    /// (`FMOEC_FP8_MAXIMA_THREADS`; no more than a row has 16-byte vectors: S3's hidden rows
    /// of 768 have 96). On an H100 128 and 512 threads measured within the run-to-run spread
    /// of 256 at S1 (BENCHMARKS.md 2026-12-06 part 3, call C). The driver says how many blocks
    /// are resident ([`resident_blocks`]); `FMOEC_FP8_RESIDENT=threads` counts threads and
    /// shared memory alone, the earlier way, which asked S1's passes for more blocks than
    /// their registers let in (SwiGLU's pass took 1399-1410 us on an H100 in one wave against
    /// 1584-1592 in two; BENCHMARKS.md 2026-12-06, FP8 part 7). Each output of the pass keeps
    /// its d values.
    fn resident_grid(
        x: &Tensor,
        kernel: Kernel,
        elem: Elem,
        rows: i64,
        d: i64,
        outputs: i64,
    ) -> Result<Grid> {
        let shared = outputs * d * (16 / elem.per_vector());
        let threads = std::env::var("FMOEC_FP8_MAXIMA_THREADS")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .map(|t| (t + 31) / 32 * 32)
            .unwrap_or(256)
            .min((d / elem.per_vector() + 31) / 32 * 32)
            .clamp(64, 1024);
        let device = device_index(x);
        let blocks = if std::env::var("FMOEC_FP8_RESIDENT").is_ok_and(|v| v == "threads") {
            // by threads (2048 a multiprocessor), shared memory (about 200 KB usable) and
            // the hardware's 32 blocks
            let per_multiprocessor = (2048 / threads)
                .min(200 * 1024 / shared.max(1))
                .clamp(1, 32);
            multiprocessors(device)? * per_multiprocessor
        } else {
            resident_blocks(device, kernel, threads as u32, shared as u32)?
        };
        Ok(Grid {
            blocks: blocks.min(rows.max(1)),
            blocks_y: 1,
            threads: threads as u32,
            shared_bytes: shared as u32,
        })
    }

    /// After the pass (on the same stream): the two-step reduction's second kernel, which
    /// raises the maxima of the groups its blocks shared from their partial rows.
    fn finish(this: Option<&FusedMaxima>, rows: i64, device: usize) -> Result<()> {
        let Some(m) = this else {
            return Ok(());
        };
        let Some(partial) = &m.partial else {
            return Ok(());
        };
        let blocks = m.grid.blocks;
        // the pass's chunks: ceil(rows / blocks) rows a block, as the kernel computes them
        let chunk = (rows + blocks - 1) / blocks;
        let vectors = m.d / m.elem.per_vector();
        let threads = vectors.clamp(32, 256);
        let blocks_y = (vectors + threads - 1) / threads;
        let per_span = blocks_a_span(blocks, blocks_y, device)?;
        launch(
            device,
            Kernel::Fp8ColmaxReduce(m.elem),
            Grid {
                blocks: (blocks + per_span - 1) / per_span,
                blocks_y: blocks_y as u32,
                threads: ((threads + 31) / 32 * 32) as u32,
                shared_bytes: 0,
            },
            &[
                ptr(Some(partial)),
                ptr(Some(&m.ends)),
                Arg::I32(m.groups as c_int),
                Arg::I64(chunk.max(1)),
                Arg::I64(blocks),
                Arg::I32(per_span as c_int),
                ptr(Some(&m.amax)),
                Arg::I32(m.d as c_int),
            ],
        )
    }
}

/// One launch of a row-wise FP8 pass (`quant_rows` in `fp8.cu`, through any of its kernels):
/// what every such launch sets up the same way (the limit's type, the FP8 rows' arguments,
/// the column maxima's arguments, grid and second step).
struct RowPass<'a> {
    kernel: Kernel,
    /// The kernel's arguments before `limit`: its source(s), and for `fp8_quant_rows` the
    /// gather's index, `k` and weights.
    sources: Vec<Arg>,
    /// The first row past every expert group (an int32 scalar on the device), if any.
    limit: Option<&'a Tensor>,
    /// Where the pass also writes the rows it quantises, in the input's type, if anywhere.
    copy: Option<&'a Tensor>,
    overflow: Option<&'a Tensor>,
    /// The second output of a pass that has two (SwiGLU's backward): its rows in the
    /// input's type, FP8 rows and maxima (on the first's grid).
    second: Option<(&'a Tensor, &'a Fp8, Option<&'a FusedMaxima>)>,
}

impl RowPass<'_> {
    /// Runs a pass of one output over `rows` rows of width `d` of `x` into new FP8 rows, and
    /// with `col_ends` raises their [`ColumnMaxima`] where the pass can hold them.
    fn run_into_new(
        &self,
        x: &Tensor,
        rows: i64,
        d: i64,
        col_ends: Option<&Tensor>,
    ) -> Result<(Fp8, Option<ColumnMaxima>)> {
        let Some(elem) = Elem::of(x) else {
            bail!("FP8 row pass over a tensor of {:?}", x.kind());
        };
        let q = empty_rows(rows, d, x.device())?;
        let maxima = FusedMaxima::new(x, self.kernel, elem, rows, d, col_ends, 1)?;
        self.run(x, rows, d, &q, maxima.as_ref())?;
        Ok((q, maxima.map(|m| m.amax)))
    }

    /// Runs the pass over `rows` rows of width `d` of `x` (the tensor that gives the device)
    /// into `out`, raising `maxima` if given (then on its resident grid, and its second step
    /// after it).
    fn run(
        &self,
        x: &Tensor,
        rows: i64,
        d: i64,
        out: &Fp8,
        maxima: Option<&FusedMaxima>,
    ) -> Result<()> {
        let limit = self.limit.map(|l| l.f_to_kind(Kind::Int)).transpose()?;
        let mut args = self.sources.clone();
        args.extend([
            ptr(limit.as_ref()),
            ptr(self.copy),
            ptr(Some(&out.q)),
            ptr(Some(&out.scale)),
            ptr(self.overflow),
            Arg::I64(rows),
            Arg::I32(d as c_int),
        ]);
        args.extend(FusedMaxima::args(maxima));
        if let Some((copy, out, maxima)) = self.second {
            let [_, _, colmax, partial] = FusedMaxima::args(maxima);
            args.extend([
                ptr(Some(copy)),
                ptr(Some(&out.q)),
                ptr(Some(&out.scale)),
                colmax,
                partial,
            ]);
        }
        let device = device_index(x);
        launch(device, self.kernel, FusedMaxima::grid(maxima, rows), &args)?;
        FusedMaxima::finish(maxima, rows, device)?;
        FusedMaxima::finish(self.second.and_then(|(_, _, m)| m), rows, device)
    }
}

/// Uninitialised row-wise FP8 storage for `rows` rows of width `d` on `device`.
fn empty_rows(rows: i64, d: i64, device: Device) -> Result<Fp8> {
    Ok(Fp8 {
        q: Tensor::f_empty([rows, d], (e4m3(), device))?,
        scale: Tensor::f_empty([rows], (Kind::Float, device))?,
    })
}

/// Row-wise quantisation of `x` (`[R, C]`): `[R, C]` e4m3 and `[R]` scales. With `limit`
/// (an int32 scalar on `x`'s device: the first row past every expert group), the rows from
/// there on are taken as zeros (they hold what the grouped matmul left) and raise no
/// overflow. Non-finite rows count into `overflow`.
pub fn quant_rows(x: &Tensor, limit: Option<&Tensor>, overflow: Option<&Tensor>) -> Result<Fp8> {
    let (rows, cols) = x.size2()?;
    let out = empty_rows(rows, cols, x.device())?;
    quant_rows_into(x, limit, overflow, &out)?;
    Ok(out)
}

/// [`quant_rows`] and the [`ColumnMaxima`] of `x`'s row groups ending at `ends` (rows past
/// the last group, and from `limit` on, left out), in one pass where the kernels run; on a
/// GPU where the pass cannot hold them (rows too wide for its shared memory,
/// `FMOEC_FP8_COLUMN_MAXIMA=0`) `None`, and the transposed copy computes them with its own
/// kernel (the libtorch reference here, the CPU's way, was 4x slower on an H100: S1 SwiGLU's
/// backward 68 ms against 26, BENCHMARKS.md 2026-12-06 part 3).
pub fn quant_rows_with_maxima(
    x: &Tensor,
    limit: Option<&Tensor>,
    overflow: Option<&Tensor>,
    ends: &Tensor,
) -> Result<(Fp8, Option<ColumnMaxima>)> {
    let (rows, cols) = x.size2()?;
    let out = empty_rows(rows, cols, x.device())?;
    let maxima = quant_rows_with_maxima_into(x, limit, overflow, ends, &out)?;
    Ok((out, maxima))
}

/// [`quant_rows_with_maxima`] into `out` (of the right shapes), in place: a cached weight
/// copy's rows, whose pass then hands its column maxima to the copy's transposed operand
/// instead of that copy reading the master once more for them.
pub fn quant_rows_with_maxima_into(
    x: &Tensor,
    limit: Option<&Tensor>,
    overflow: Option<&Tensor>,
    ends: &Tensor,
    out: &Fp8,
) -> Result<Option<ColumnMaxima>> {
    let (rows, cols) = x.size2()?;
    if out.q.size() != [rows, cols] || out.scale.size() != [rows] {
        bail!("FP8 rows: output of the wrong shape");
    }
    if kernels_apply(x) && cols < i32::MAX as i64 {
        let elem = Elem::of(x).expect("checked by kernels_apply");
        if let Some(maxima) = FusedMaxima::new(
            x,
            Kernel::Fp8QuantRows(elem),
            elem,
            rows,
            cols,
            Some(ends),
            1,
        )? {
            let x = x.f_contiguous()?;
            RowPass {
                kernel: Kernel::Fp8QuantRows(elem),
                sources: vec![ptr(Some(&x)), ptr(None), Arg::I32(1), ptr(None)],
                limit,
                copy: None,
                overflow,
                second: None,
            }
            .run(&x, rows, cols, out, Some(&maxima))?;
            return Ok(Some(maxima.amax));
        }
    }
    quant_rows_into(x, limit, overflow, out)?;
    if x.device().is_cuda() {
        return Ok(None);
    }
    Ok(Some(column_maxima_reference(
        &rows_before(x, limit)?,
        ends,
    )?))
}

/// The reference's FP8 rows of a pass's output `x` (its rows from `limit` on already
/// zeros), and with `col_ends` its [`ColumnMaxima`]: what the fused passes compute where
/// their kernels do not run.
fn reference_rows(
    x: &Tensor,
    limit: Option<&Tensor>,
    overflow: Option<&Tensor>,
    col_ends: Option<&Tensor>,
) -> Result<(Fp8, Option<ColumnMaxima>)> {
    let q = quant_rows(x, limit, overflow)?;
    let maxima = col_ends
        .map(|ends| column_maxima_reference(x, ends))
        .transpose()?;
    Ok((q, maxima))
}

/// `x` with the rows from `limit` on as zeros (they hold what the grouped matmul left).
fn rows_before(x: &Tensor, limit: Option<&Tensor>) -> Result<Tensor> {
    let Some(limit) = limit else {
        return Ok(x.shallow_clone());
    };
    let keep = Tensor::f_arange(x.size()[0], (Kind::Int64, x.device()))?
        .f_lt_tensor(&limit.f_to_kind(Kind::Int64)?)?
        .f_unsqueeze(1)?;
    Ok(x.f_where_self(&keep, &x.f_zeros_like()?)?)
}

/// [`quant_rows`] into `out` (of the right shapes), in place: a cached weight copy keeps its
/// memory from step to step.
pub fn quant_rows_into(
    x: &Tensor,
    limit: Option<&Tensor>,
    overflow: Option<&Tensor>,
    out: &Fp8,
) -> Result<()> {
    let (rows, cols) = x.size2()?;
    if out.q.size() != [rows, cols] || out.scale.size() != [rows] {
        bail!("FP8 rows: output of the wrong shape");
    }
    if kernels_apply(x) && cols < i32::MAX as i64 {
        let elem = Elem::of(x).expect("checked by kernels_apply");
        let x = x.f_contiguous()?;
        RowPass {
            kernel: Kernel::Fp8QuantRows(elem),
            sources: vec![ptr(Some(&x)), ptr(None), Arg::I32(1), ptr(None)],
            limit,
            copy: None,
            overflow,
            second: None,
        }
        .run(&x, rows, cols, out, None)?;
        return Ok(());
    }
    let mut xf = x.f_to_kind(Kind::Float)?;
    if let Some(limit) = limit {
        let keep = Tensor::f_arange(rows, (Kind::Int64, x.device()))?
            .f_lt_tensor(&limit.f_to_kind(Kind::Int64)?)?
            .f_unsqueeze(1)?;
        xf = xf.f_where_self(&keep, &xf.f_zeros_like()?)?;
    }
    let amax = if cols == 0 {
        Tensor::f_zeros([rows], (Kind::Float, x.device()))?
    } else {
        abs_f32(&xf)?.f_amax(&[1][..], false)?
    };
    let (inv, scale) = scales_of(&amax, overflow)?;
    out.q
        .shallow_clone()
        .f_copy_(&to_e4m3(&xf, &inv.f_unsqueeze(1)?)?)?;
    out.scale.shallow_clone().f_copy_(&scale)?;
    Ok(())
}

/// A gather and the row-wise quantisation in one pass: `xs[r] = x[s / k]` for `s =
/// row_slot[r] ≥ 0` (zero rows elsewhere) in `x`'s type, times `weight[s]` (f32, `[T·k]`) if
/// given, and `xs` quantised row-wise. Without `weight` the dispatch's gather; with it the
/// combine's backward (the output gradient of every slot times its gate weight), so the
/// expert's input gradient and weight gradient need no pass of their own for its FP8 rows.
/// With `col_ends` (the expert groups' ends of `xs`), also `xs`'s [`ColumnMaxima`] (`None`
/// where the pass cannot hold them: the transposed copy computes them then).
pub fn gather_quant_rows(
    x: &Tensor,
    row_slot: &Tensor,
    k: i64,
    weight: Option<&Tensor>,
    overflow: Option<&Tensor>,
    col_ends: Option<&Tensor>,
) -> Result<(Tensor, Fp8, Option<ColumnMaxima>)> {
    let (_, d) = x.size2()?;
    let rows = row_slot.size()[0];
    let weight = weight
        .map(|w| w.f_to_kind(Kind::Float)?.f_reshape([-1])?.f_contiguous())
        .transpose()?;
    if kernels_apply(x) && d < i32::MAX as i64 {
        let elem = Elem::of(x).expect("checked by kernels_apply");
        let x = x.f_contiguous()?;
        let row_slot = row_slot.f_contiguous()?;
        let xs = Tensor::f_empty([rows, d], (x.kind(), x.device()))?;
        let (out, maxima) = RowPass {
            kernel: Kernel::Fp8QuantRows(elem),
            sources: vec![
                ptr(Some(&x)),
                ptr(Some(&row_slot)),
                Arg::I32(k as c_int),
                ptr(weight.as_ref()),
            ],
            limit: None,
            copy: Some(&xs),
            overflow,
            second: None,
        }
        .run_into_new(&x, rows, d, col_ends)?;
        return Ok((xs, out, maxima));
    }
    let xs = super::ops::gather_rows(x, row_slot, k, weight.as_ref())?;
    let (q, maxima) = reference_rows(&xs, None, overflow, col_ends)?;
    Ok((xs, q, maxima))
}

/// An activation and the row-wise quantisation of its output in one pass: `(out, FP8 rows
/// of out)`, `out = act(a)` (GELU, erf form, or ReLU) or `silu(a) · b` (SwiGLU), `[R, C]` in
/// `a`'s type. With `limit` (as in [`quant_rows`]) the rows from there on are zeros in both
/// (they hold what the grouped matmul left, never read). The kernel computes each value as
/// the SwiGLU kernel and the bias epilogue do; the libtorch reference (CPU) uses libtorch's
/// activations. With `col_ends` (the expert groups' ends), also `out`'s [`ColumnMaxima`]
/// (`None` where the pass cannot hold them).
pub fn act_quant_rows(
    a: &Tensor,
    b: Option<&Tensor>,
    act: Fp8Act,
    limit: Option<&Tensor>,
    overflow: Option<&Tensor>,
    col_ends: Option<&Tensor>,
) -> Result<(Tensor, Fp8, Option<ColumnMaxima>)> {
    let (out, q, maxima) = act_rows(a, b, act, limit, overflow, col_ends, true)?;
    Ok((out.expect("asked for"), q, maxima))
}

/// [`act_quant_rows`] without its output in `a`'s type: the FP8 rows (and column maxima)
/// alone, the same bits, for a matmul whose weight gradient makes its transposed copy with
/// [`act_quant_transposed`] (the kernel writes no output; the reference computes it and
/// drops it).
pub fn act_quant_rows_only(
    a: &Tensor,
    b: Option<&Tensor>,
    act: Fp8Act,
    limit: Option<&Tensor>,
    overflow: Option<&Tensor>,
    col_ends: Option<&Tensor>,
) -> Result<(Fp8, Option<ColumnMaxima>)> {
    let (_, q, maxima) = act_rows(a, b, act, limit, overflow, col_ends, false)?;
    Ok((q, maxima))
}

/// Checks SwiGLU's second input against the first.
fn check_act_inputs(a: &Tensor, b: Option<&Tensor>, act: Fp8Act) -> Result<()> {
    if (act == Fp8Act::Swiglu) != b.is_some() {
        bail!("FP8 activation: SwiGLU takes two inputs, the others one");
    }
    if let Some(b) = b {
        if b.size() != a.size() || b.kind() != a.kind() {
            bail!(
                "FP8 SwiGLU: inputs {:?} and {:?} differ",
                a.size(),
                b.size()
            );
        }
    }
    Ok(())
}

/// `act(a)` (SwiGLU: `silu(a) · b`) in libtorch ops: the reference of the kernels.
fn act_reference(a: &Tensor, b: Option<&Tensor>, act: Fp8Act) -> Result<Tensor> {
    Ok(match (act, b) {
        (Fp8Act::Gelu, _) => a.f_gelu("none")?,
        (Fp8Act::Relu, _) => a.f_relu()?,
        (Fp8Act::Swiglu, Some(b)) => super::ops::swiglu(a, b)?,
        (Fp8Act::Swiglu, None) => bail!("FP8 SwiGLU: one input"),
    })
}

/// [`act_quant_rows`], writing the output only if `write_output` (the kernel; the reference
/// always computes it).
fn act_rows(
    a: &Tensor,
    b: Option<&Tensor>,
    act: Fp8Act,
    limit: Option<&Tensor>,
    overflow: Option<&Tensor>,
    col_ends: Option<&Tensor>,
    write_output: bool,
) -> Result<(Option<Tensor>, Fp8, Option<ColumnMaxima>)> {
    let (rows, cols) = a.size2()?;
    check_act_inputs(a, b, act)?;
    let b_fits = b.is_none_or(|b| Elem::of(b).is_some());
    if kernels_apply(a) && b_fits && cols < i32::MAX as i64 {
        let elem = Elem::of(a).expect("checked by kernels_apply");
        let a = a.f_contiguous()?;
        let b = b.map(|b| b.f_contiguous()).transpose()?;
        let out = write_output.then(|| a.f_empty_like()).transpose()?;
        let (q, maxima) = RowPass {
            kernel: Kernel::Fp8ActQuantRows(act, elem),
            sources: vec![ptr(Some(&a)), ptr(b.as_ref())],
            limit,
            copy: out.as_ref(),
            overflow,
            second: None,
        }
        .run_into_new(&a, rows, cols, col_ends)?;
        return Ok((out, q, maxima));
    }
    let out = rows_before(&act_reference(a, b, act)?, limit)?;
    let (q, maxima) = reference_rows(&out, limit, overflow, col_ends)?;
    Ok((Some(out), q, maxima))
}

/// An activation's backward and the row-wise quantisation of the input's gradient in one
/// pass: `(ga, FP8 rows of ga)` with `ga = g · act'(a)` (GELU, erf form, or ReLU) in `a`'s
/// type, rows from `limit` on zeros in both, and with `col_ends` `ga`'s [`ColumnMaxima`]
/// (`None` where the pass cannot hold them). The kernel computes each value as the bias
/// epilogue's backward does; the libtorch reference (CPU) uses libtorch's backward.
pub fn act_grad_quant_rows(
    a: &Tensor,
    g: &Tensor,
    act: Fp8ActGrad,
    limit: Option<&Tensor>,
    overflow: Option<&Tensor>,
    col_ends: Option<&Tensor>,
) -> Result<(Tensor, Fp8, Option<ColumnMaxima>)> {
    let (rows, cols) = a.size2()?;
    if g.size() != a.size() || g.kind() != a.kind() {
        bail!(
            "FP8 activation backward: input {:?} and gradient {:?} differ",
            a.size(),
            g.size()
        );
    }
    if kernels_apply(a) && Elem::of(g).is_some() && cols < i32::MAX as i64 {
        let elem = Elem::of(a).expect("checked by kernels_apply");
        let a = a.f_contiguous()?;
        let g = g.f_contiguous()?;
        let ga = a.f_empty_like()?;
        let (q, maxima) = RowPass {
            kernel: Kernel::Fp8ActGradQuantRows(act, elem),
            sources: vec![ptr(Some(&a)), ptr(Some(&g))],
            limit,
            copy: Some(&ga),
            overflow,
            second: None,
        }
        .run_into_new(&a, rows, cols, col_ends)?;
        return Ok((ga, q, maxima));
    }
    let ga = match act {
        Fp8ActGrad::Gelu => a.f_gelu_backward(g, "none")?,
        Fp8ActGrad::Relu => a.f_threshold_backward(g, 0.0)?,
    };
    let ga = rows_before(&ga, limit)?;
    let (q, maxima) = reference_rows(&ga, limit, overflow, col_ends)?;
    Ok((ga, q, maxima))
}

/// What SwiGLU's backward pass gives for one of its inputs: the gradient in the input's type,
/// its row-wise FP8 copy and, with `col_ends`, its [`ColumnMaxima`].
pub type SwigluGrad = (Tensor, Fp8, Option<ColumnMaxima>);

/// SwiGLU's backward and the row-wise quantisation of both gradients in one pass: for
/// `silu(a) · b` and the output's gradient `g`, `ga` and `gb` as the SwiGLU kernel's backward
/// computes them, in `a`'s type, each with its FP8 rows (and with `col_ends` its column
/// maxima; `None` where the pass cannot hold them), rows from `limit` on zeros. One read of
/// `a`, `b` and `g`: the SwiGLU kernel and a pass over each gradient read `ga` and `gb` twice
/// more (S1: 1.9 GB; on an H100 the S1 SwiGLU layer took 35.1-35.4 ms with the pass, 36.0-36.1
/// without, BENCHMARKS.md 2026-12-06, FP8 part 7). The libtorch reference (CPU) uses
/// libtorch's backward.
pub fn swiglu_grad_quant_rows(
    a: &Tensor,
    b: &Tensor,
    g: &Tensor,
    limit: Option<&Tensor>,
    overflow: Option<&Tensor>,
    col_ends: Option<&Tensor>,
) -> Result<(SwigluGrad, SwigluGrad)> {
    let (rows, cols) = a.size2()?;
    if b.size() != a.size() || g.size() != a.size() || b.kind() != a.kind() || g.kind() != a.kind()
    {
        bail!(
            "FP8 SwiGLU backward: inputs {:?} and {:?}, gradient {:?} differ",
            a.size(),
            b.size(),
            g.size()
        );
    }
    if kernels_apply(a) && Elem::of(b).is_some() && Elem::of(g).is_some() && cols < i32::MAX as i64
    {
        let elem = Elem::of(a).expect("checked by kernels_apply");
        let (a, b, g) = (a.f_contiguous()?, b.f_contiguous()?, g.f_contiguous()?);
        let (ga, gb) = (a.f_empty_like()?, a.f_empty_like()?);
        let (qa, qb) = (
            empty_rows(rows, cols, a.device())?,
            empty_rows(rows, cols, a.device())?,
        );
        let kernel = Kernel::Fp8SwigluGradQuantRows(elem);
        let maxima_a = FusedMaxima::new(&a, kernel, elem, rows, cols, col_ends, 2)?;
        let maxima_b = maxima_a.as_ref().map(FusedMaxima::sibling).transpose()?;
        RowPass {
            kernel,
            sources: vec![ptr(Some(&a)), ptr(Some(&b)), ptr(Some(&g))],
            limit,
            copy: Some(&ga),
            overflow,
            second: Some((&gb, &qb, maxima_b.as_ref())),
        }
        .run(&a, rows, cols, &qa, maxima_a.as_ref())?;
        return Ok((
            (ga, qa, maxima_a.map(|m| m.amax)),
            (gb, qb, maxima_b.map(|m| m.amax)),
        ));
    }
    let (ga, gb) = super::ops::swiglu_backward(a, b, g)?;
    let each = |grad: Tensor| -> Result<SwigluGrad> {
        let grad = rows_before(&grad, limit)?;
        let (q, maxima) = reference_rows(&grad, limit, overflow, col_ends)?;
        Ok((grad, q, maxima))
    };
    Ok((each(ga)?, each(gb)?))
}

/// Where [`quant_transposed`] puts each group's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transposed {
    /// `[C, positions]`: the groups side by side along the positions, each padded to a
    /// multiple of 16 (`positions` at least `R + 15·G`, a multiple of 16); the scales
    /// `[G·C]`, group-major. The weight gradient's operands.
    SideBySide { positions: i64 },
    /// `[G, C, len]`: `G` groups of `len` rows each (every group full), scales `[G, C]`. A
    /// weight's forward operand.
    Stacked { len: i64 },
}

/// The padded group ends of [`Transposed::SideBySide`] (int32 `[G]`, cumulative, each
/// group's row count rounded up to a multiple of 16), from the group ends `ends`
/// (non-decreasing). On a GPU one launch of ours: the libtorch ops below are about ten small
/// kernels, and every transposed copy of a weight gradient needs these ends (on an H100, 29
/// µs a copy, four copies an iteration of the S1 layer: BENCHMARKS.md, FP8 part 5).
pub fn padded_ends(ends: &Tensor) -> Result<Tensor> {
    let groups = ends.size()[0];
    if kernels_run_on(ends.device()) && (1..i32::MAX as i64).contains(&groups) {
        let ends32 = ends.f_to_kind(Kind::Int)?.f_contiguous()?;
        let padded = Tensor::f_empty([groups], (Kind::Int, ends.device()))?;
        launch(
            device_index(&ends32),
            Kernel::Fp8PaddedEnds,
            Grid::linear(1, 32),
            &[
                ptr(Some(&ends32)),
                Arg::I32(groups as c_int),
                ptr(Some(&padded)),
            ],
        )?;
        return Ok(padded);
    }
    padded_ends_reference(ends)
}

/// [`padded_ends`] in libtorch ops (the CPU reference, and the check of the kernel).
pub fn padded_ends_reference(ends: &Tensor) -> Result<Tensor> {
    let ends = ends.f_to_kind(Kind::Int64)?;
    let zero = Tensor::f_zeros([1], (Kind::Int64, ends.device()))?;
    let counts = ends.f_diff(1, 0, Some(&zero), None::<&Tensor>)?;
    let padded = counts
        .f_add_scalar(15)?
        .f_div_scalar_mode(16, "floor")?
        .f_mul_scalar(16)?;
    Ok(padded.f_cumsum(0, Kind::Int)?)
}

/// The positions [`Transposed::SideBySide`] needs for `rows` rows in `groups` groups.
pub fn side_by_side_positions(rows: i64, groups: i64) -> i64 {
    (rows + 15 * groups + 15) / 16 * 16
}

/// The transposed FP8 copy of `x` (`[R, C]`, rows in groups ending at `ends`, int32 `[G]`)
/// with per-group column scales, laid out as `layout` says: `(copy, scales, padded ends)`
/// (the padded ends for [`Transposed::SideBySide`], else `ends`). Rows past the last group
/// are not read. Non-finite columns count into `overflow`. `maxima`: the column maxima a
/// row-wise pass over `x` already raised (with these `ends`), else they are computed here.
pub fn quant_transposed(
    x: &Tensor,
    ends: &Tensor,
    layout: Transposed,
    overflow: Option<&Tensor>,
    maxima: Option<&ColumnMaxima>,
) -> Result<(Fp8, Tensor)> {
    transposed(Source::Tensor(x), ends, layout, overflow, maxima)
}

/// [`quant_transposed`] of `act(a)` (SwiGLU: `silu(a) · b`), computed on load from `a` (and
/// `b`) as [`act_quant_rows`] computes it, so the copy is bit-equal to the transposed copy of
/// that pass's output, which need not be written or kept: the second expert matmul's weight
/// gradient takes it, with the column maxima that [`act_quant_rows_only`] raised. Without
/// those maxima (the pass could not hold them), or where the kernels do not run, the output
/// is made first (by the pass, or the reference) and copied as [`quant_transposed`] does.
pub fn act_quant_transposed(
    a: &Tensor,
    b: Option<&Tensor>,
    act: Fp8Act,
    ends: &Tensor,
    layout: Transposed,
    overflow: Option<&Tensor>,
    maxima: Option<&ColumnMaxima>,
) -> Result<(Fp8, Tensor)> {
    check_act_inputs(a, b, act)?;
    transposed(Source::Act(a, b, act), ends, layout, overflow, maxima)
}

/// The transposed copy of `source` in new storage, with the padded ends.
fn transposed(
    source: Source,
    ends: &Tensor,
    layout: Transposed,
    overflow: Option<&Tensor>,
    maxima: Option<&ColumnMaxima>,
) -> Result<(Fp8, Tensor)> {
    let rows_of = match source {
        Source::Tensor(x) => x,
        Source::Act(a, _, _) => a,
    };
    let (out, pad_ends) = transposed_storage(rows_of, ends, layout)?;
    transposed_into(
        source,
        TransposedCopy {
            ends,
            pad_ends: &pad_ends,
            layout,
            overflow,
            maxima,
            out: &out,
        },
    )?;
    Ok((out, pad_ends))
}

/// What a transposed copy reads.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The tensor itself.
    Tensor(&'a Tensor),
    /// An activation's output, computed on load from its input(s) (SwiGLU's two).
    Act(&'a Tensor, Option<&'a Tensor>, Fp8Act),
}

/// Uninitialised storage of the transposed copy of `x` (`[R, C]`) in `layout` (rows in groups
/// ending at `ends`), and its padded ends ([`padded_ends`] side by side, else `ends`).
fn transposed_storage(x: &Tensor, ends: &Tensor, layout: Transposed) -> Result<(Fp8, Tensor)> {
    let (_, cols) = x.size2()?;
    let groups = ends.size()[0];
    let device = x.device();
    let (shape, scale_shape, pad_ends): (Vec<i64>, Vec<i64>, Tensor) = match layout {
        Transposed::SideBySide { positions } => (
            vec![cols, positions],
            vec![groups * cols],
            padded_ends(ends)?,
        ),
        Transposed::Stacked { len } => (
            vec![groups, cols, len],
            vec![groups, cols],
            ends.f_to_kind(Kind::Int)?,
        ),
    };
    let out = Fp8 {
        q: Tensor::f_empty(shape.as_slice(), (e4m3(), device))?,
        scale: Tensor::f_empty(scale_shape.as_slice(), (Kind::Float, device))?,
    };
    Ok((out, pad_ends))
}

/// [`quant_transposed`] into `out` (of the right shapes) with the padded ends given, in
/// place.
pub fn quant_transposed_into(
    x: &Tensor,
    ends: &Tensor,
    pad_ends: &Tensor,
    layout: Transposed,
    overflow: Option<&Tensor>,
    maxima: Option<&ColumnMaxima>,
    out: &Fp8,
) -> Result<()> {
    transposed_into(
        Source::Tensor(x),
        TransposedCopy {
            ends,
            pad_ends,
            layout,
            overflow,
            maxima,
            out,
        },
    )
}

/// What a transposed copy is given besides its source: the groups' ends and padded ends, the
/// layout, the overflow counter, the column maxima a row-wise pass already raised, and the
/// storage it writes.
#[derive(Clone, Copy)]
struct TransposedCopy<'a> {
    ends: &'a Tensor,
    pad_ends: &'a Tensor,
    layout: Transposed,
    overflow: Option<&'a Tensor>,
    maxima: Option<&'a ColumnMaxima>,
    out: &'a Fp8,
}

/// [`quant_transposed_into`] of `source`.
fn transposed_into(source: Source, copy: TransposedCopy) -> Result<()> {
    let (x, x2, act) = match source {
        Source::Tensor(x) => (x, None, None),
        Source::Act(a, b, act) => (a, b, Some(act)),
    };
    let (_, cols) = x.size2()?;
    let fused = kernels_apply(x) && cols < i32::MAX as i64;
    if let Some(act) = act {
        let on_load = fused && x2.is_none_or(|b| Elem::of(b).is_some()) && copy.maxima.is_some();
        if !on_load {
            let h = act_output(x, x2, act)?;
            return transposed_into(Source::Tensor(&h), copy);
        }
    }
    let groups = copy.groups(cols)?;
    if fused {
        copy.kernels(x, x2, act, groups)
    } else {
        copy.reference(x, groups)
    }
}

/// An activation's output for a copy that cannot compute it on load: the pass's (which computes
/// what the copy on load would) on a GPU, libtorch's where the kernels do not run.
fn act_output(a: &Tensor, b: Option<&Tensor>, act: Fp8Act) -> Result<Tensor> {
    if kernels_apply(a) {
        Ok(act_rows(a, b, act, None, None, None, true)?
            .0
            .expect("asked for"))
    } else {
        act_reference(a, b, act)
    }
}

impl TransposedCopy<'_> {
    /// The number of groups, checked against the column maxima given (`cols` columns).
    fn groups(&self, cols: i64) -> Result<i64> {
        let groups = self.ends.size()[0];
        if groups == 0 {
            bail!("FP8 transposed copy: no groups");
        }
        if let Some(m) = self.maxima {
            if m.size() != [groups * cols] || m.kind() != Kind::Int {
                bail!(
                    "FP8 transposed copy: column maxima {:?} for {groups} groups of {cols}",
                    m.size()
                );
            }
        }
        Ok(groups)
    }

    /// On a GPU: the column maxima (unless given), the scales from them, then the copy, each
    /// one launch of ours.
    fn kernels(
        &self,
        x: &Tensor,
        x2: Option<&Tensor>,
        act: Option<Fp8Act>,
        groups: i64,
    ) -> Result<()> {
        let (_, cols) = x.size2()?;
        let device = x.device();
        let ends32 = self.ends.f_to_kind(Kind::Int)?.f_contiguous()?;
        let pad32 = self.pad_ends.f_to_kind(Kind::Int)?.f_contiguous()?;
        let (positions, group_stride, col_stride, base) = match self.layout {
            Transposed::SideBySide { positions } => (positions, 0, positions, 1),
            Transposed::Stacked { len } => (groups * len, cols * len, len, 0),
        };
        let elem = Elem::of(x).expect("checked by kernels_apply");
        let x = x.f_contiguous()?;
        let x2 = x2.map(Tensor::f_contiguous).transpose()?;
        let di = device_index(&x);
        let amax = match self.maxima {
            Some(m) => m.f_contiguous()?,
            None => group_column_amax_kernel(&x, elem, &ends32, groups)?,
        };
        let inv = Tensor::f_empty([groups * cols], (Kind::Float, device))?;
        let n = groups * cols;
        launch(
            di,
            Kernel::Fp8ScalesFromAmax,
            Grid::linear(((n + 255) / 256).min(4096), 256),
            &[
                ptr(Some(&amax)),
                ptr(Some(&inv)),
                ptr(Some(&self.out.scale)),
                ptr(self.overflow),
                Arg::I64(n),
            ],
        )?;
        launch(
            di,
            match act {
                None => Kernel::Fp8QuantTranspose(elem),
                Some(act) => Kernel::Fp8ActQuantTranspose(act, elem),
            },
            Grid {
                // tiles of TP = 128 positions by TC = 64 columns
                blocks: (positions + 127) / 128,
                blocks_y: ((cols + 63) / 64) as u32,
                threads: 256,
                shared_bytes: 0,
            },
            &[
                ptr(Some(&x)),
                ptr(x2.as_ref()),
                ptr(Some(&ends32)),
                ptr(Some(&pad32)),
                Arg::I32(groups as c_int),
                ptr(Some(&inv)),
                ptr(Some(&self.out.q)),
                Arg::I64(positions),
                Arg::I32(cols as c_int),
                Arg::I64(group_stride),
                Arg::I64(col_stride),
                Arg::I32(base),
            ],
        )?;
        Ok(())
    }

    /// In libtorch ops: each row's group, its column maxima per group, then the rows scaled by
    /// their group's column scales and placed at their positions.
    fn reference(&self, x: &Tensor, groups: i64) -> Result<()> {
        let (rows, cols) = x.size2()?;
        let device = x.device();
        let ends64 = self.ends.f_to_kind(Kind::Int64)?;
        let row = Tensor::f_arange(rows, (Kind::Int64, device))?;
        // the first group whose end is past the row
        let group = row.f_searchsorted(&ends64, false, true, "right", None::<Tensor>)?;
        let kept = group.f_lt(groups)?;
        let g = group.f_clamp_max(groups - 1)?;
        let xf = x.f_to_kind(Kind::Float)?;
        let amax = match self.maxima {
            Some(m) => m
                .f_contiguous()?
                .f_view_dtype(Kind::Float)?
                .f_reshape([groups, cols])?,
            None => group_column_amax(x, self.ends)?,
        };
        let (inv, scale) = scales_of(&amax.f_reshape([-1])?, self.overflow)?;
        self.out
            .scale
            .shallow_clone()
            .f_copy_(&scale.f_reshape(self.out.scale.size())?)?;
        let inv = inv.f_reshape([groups, cols])?;
        let scaled = to_e4m3(&xf, &inv.f_index_select(0, &g)?)?.f_to_kind(Kind::Float)?;
        match self.layout {
            Transposed::SideBySide { positions } => {
                let at = self.side_by_side_positions(&ends64, &row, &g)?;
                // rows past the last group go to a scratch position dropped below
                let at = at.f_where_scalarother(&kept, positions)?;
                let full = Tensor::f_zeros([cols, positions + 1], (Kind::Float, device))?
                    .f_index_copy(1, &at, &scaled.f_transpose(0, 1)?)?;
                self.out
                    .q
                    .shallow_clone()
                    .f_copy_(&full.f_narrow(1, 0, positions)?.f_to_kind(e4m3())?)?;
            }
            Transposed::Stacked { len } => {
                if rows != groups * len {
                    bail!("FP8 stacked copy: {rows} rows for {groups} groups of {len}");
                }
                let t = scaled
                    .f_reshape([groups, len, cols])?
                    .f_transpose(1, 2)?
                    .f_to_kind(e4m3())?;
                self.out.q.shallow_clone().f_copy_(&t)?;
            }
        }
        Ok(())
    }

    /// Each row's position side by side: its place in its group `g`, from that group's padded
    /// start.
    fn side_by_side_positions(&self, ends64: &Tensor, row: &Tensor, g: &Tensor) -> Result<Tensor> {
        let device = row.device();
        let zero = Tensor::f_zeros([1], (Kind::Int64, device))?;
        let starts = ends64.f_diff(1, 0, Some(&zero), None::<&Tensor>)?;
        let starts = ends64.f_sub(&starts)?;
        let pad64 = self.pad_ends.f_to_kind(Kind::Int64)?;
        let pad_counts = pad64.f_diff(1, 0, Some(&zero), None::<&Tensor>)?;
        let pad_starts = pad64.f_sub(&pad_counts)?;
        Ok(row
            .f_sub(&starts.f_index_select(0, g)?)?
            .f_add(&pad_starts.f_index_select(0, g)?)?)
    }
}

/// The column maxima of `x` per group (int32 bits of f32, `[G·C]`), one launch of ours.
fn group_column_amax_kernel(
    x: &Tensor,
    elem: Elem,
    ends32: &Tensor,
    groups: i64,
) -> Result<Tensor> {
    let (rows, cols) = x.size2()?;
    let amax = Tensor::f_zeros([groups * cols], (Kind::Int, x.device()))?;
    let col_chunks = (cols / elem.per_vector() + 31) / 32;
    launch(
        device_index(x),
        Kernel::Fp8ColAmax(elem),
        Grid {
            // COL_CHUNK (128) rows a block: enough blocks to fill the GPU at 8192
            // rows (512 left F0's [8192, 1024] with 64 blocks, 0.47 TB/s on an H100)
            blocks: (rows + 127) / 128,
            blocks_y: col_chunks as u32,
            threads: 256,
            shared_bytes: 0,
        },
        &[
            ptr(Some(x)),
            ptr(Some(ends32)),
            Arg::I32(groups as c_int),
            ptr(Some(&amax)),
            Arg::I32(cols as c_int),
        ],
    )?;
    Ok(amax)
}

/// A defined int32 scalar counter on `device` for [`quant_rows`] and friends.
pub fn overflow_counter(device: Device) -> Result<Tensor> {
    Ok(Tensor::f_zeros([1], (Kind::Int, device))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[&[f32]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).reshape([rows.len() as i64, rows[0].len() as i64])
    }

    fn values(x: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(x.to_kind(Kind::Float).reshape([-1])).unwrap()
    }

    /// Row-wise: each row's scale is its amax / 448 (computed from the tensor now, so it
    /// follows the values), its largest element becomes ±448, an all-zero row gets the
    /// floor's scale and zeros (no 0, Inf or NaN scale), and the product back is within
    /// e4m3's rounding (3 mantissa bits: half an ulp is 1/16 relative).
    #[test]
    fn row_scales_are_dynamic_with_a_floor() {
        let x = t(&[
            &[1.0, -2.0, 0.5, 0.25],
            &[0.0, 0.0, 0.0, 0.0],
            &[300.0, 1.0, -7.0, 2.0],
        ]);
        let q = quant_rows(&x, None, None).unwrap();
        let s = values(&q.scale);
        assert_eq!(s[0], 2.0 / 448.0);
        assert_eq!(s[1], (FP8_EPS as f32) / (FP8_MAX as f32));
        assert_eq!(s[2], 300.0 / 448.0);
        let qv = values(&q.q);
        assert_eq!(qv[1], -448.0);
        assert_eq!(qv[8], 448.0);
        assert!(qv[4..8].iter().all(|v| *v == 0.0));
        let back = values(&q.dequantize_rows().unwrap());
        for (b, x) in back.iter().zip(values(&x)) {
            assert!((b - x).abs() <= x.abs() / 16.0 + 1e-6, "{b} for {x}");
        }
        // dynamic: doubling the tensor doubles the scales, not the values
        let q2 = quant_rows(&x.f_mul_scalar(2.0).unwrap(), None, None).unwrap();
        assert_eq!(values(&q2.q), qv);
        assert_eq!(values(&q2.scale)[0], 4.0 / 448.0);
    }

    /// Rows from `limit` on (past every expert group) are zeros with the floor's scale even
    /// when they hold NaN, and raise no overflow; an Inf or a NaN inside counts one per row.
    #[test]
    fn rows_past_the_limit_are_not_read_and_non_finite_rows_overflow() {
        let x = t(&[
            &[1.0, 2.0],
            &[f32::INFINITY, 1.0],
            &[f32::NAN, 1.0],
            &[f32::NAN, f32::NAN],
        ]);
        let overflow = overflow_counter(Device::Cpu).unwrap();
        let limit = Tensor::from_slice(&[3i32]);
        let q = quant_rows(&x, Some(&limit), Some(&overflow)).unwrap();
        assert_eq!(values(&overflow), [2.0]);
        assert_eq!(values(&q.scale)[3], (FP8_EPS as f32) / (FP8_MAX as f32));
        assert_eq!(&values(&q.q)[6..], [0.0, 0.0]);
    }

    /// The dispatch's gather: dropped slots (`-1`) are zero rows with finite scales.
    #[test]
    fn gathered_dropped_slots_are_zero_rows_with_finite_scales() {
        let x = t(&[&[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0]]);
        let row_slot = Tensor::from_slice(&[3i64, -1, 0]);
        let (xs, q, _) = gather_quant_rows(&x, &row_slot, 2, None, None, None).unwrap();
        assert_eq!(
            values(&xs),
            [5.0, 6.0, 7.0, 8.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0]
        );
        let s = values(&q.scale);
        assert!(s.iter().all(|v| v.is_finite() && *v > 0.0), "{s:?}");
        assert!(values(&q.q)[4..8].iter().all(|v| *v == 0.0));
    }

    /// The weight gradient's layout: `[C, P]`, each group's rows (here 3, 0 and 17 rows) at
    /// its padded position (0, 16, 16: multiples of 16), zeros in the padding and past the
    /// last group, scales per group and column (an empty group gets the floor).
    #[test]
    fn groups_side_by_side_are_padded_to_16_with_per_group_column_scales() {
        let rows = 3 + 17 + 2;
        let x = Tensor::arange(rows * 2, (Kind::Float, Device::Cpu))
            .reshape([rows, 2])
            .f_add_scalar(1.0)
            .unwrap();
        let ends = Tensor::from_slice(&[3i32, 3, 20]);
        let positions = side_by_side_positions(rows, 3);
        assert_eq!(positions, 80);
        let (q, pad_ends) =
            quant_transposed(&x, &ends, Transposed::SideBySide { positions }, None, None).unwrap();
        assert_eq!(Vec::<i32>::try_from(&pad_ends).unwrap(), [16, 16, 48]);
        assert_eq!(q.q.size(), [2, 80]);
        let v = values(&q.q);
        let s = values(&q.scale);
        // group 0: rows 0..3, column 0 holds 1, 3, 5 (amax 5)
        assert_eq!(s[0], 5.0 / 448.0);
        let back = |j: usize, c: usize, g: usize| v[c * 80 + j] * s[g * 2 + c];
        assert!((back(2, 0, 0) - 5.0).abs() < 1e-5);
        assert!((back(0, 1, 0) - 2.0).abs() < 2.0 / 16.0);
        assert!(v[3..16].iter().all(|x| *x == 0.0), "padding");
        // the empty group: the floor
        assert_eq!(s[2], (FP8_EPS as f32) / (FP8_MAX as f32));
        // group 2: rows 3..20 at positions 16..33; amax of column 1 is x[19, 1] = 40
        assert_eq!(s[5], 40.0 / 448.0);
        assert!((back(16 + 16, 1, 2) - 40.0).abs() < 1e-4);
        assert!(
            v[33..80].iter().all(|x| *x == 0.0),
            "padding and past the groups"
        );
    }

    /// A weight's forward operand: `G` groups of `len` rows transposed to `[G, C, len]`, each
    /// column of each group scaled by its own amax.
    #[test]
    fn stacked_copies_are_each_group_transposed() {
        let w = Tensor::arange(2 * 3 * 4, (Kind::Float, Device::Cpu))
            .reshape([6, 4])
            .f_sub_scalar(5.0)
            .unwrap();
        let ends = Tensor::from_slice(&[3i32, 6]);
        let (q, _) =
            quant_transposed(&w, &ends, Transposed::Stacked { len: 3 }, None, None).unwrap();
        assert_eq!(q.q.size(), [2, 4, 3]);
        assert_eq!(q.scale.size(), [2, 4]);
        let back = q.dequantize_rows().unwrap();
        let want = w.reshape([2, 3, 4]).transpose(1, 2);
        let err = (back - &want).abs().max().double_value(&[]);
        let top = want.abs().max().double_value(&[]);
        assert!(err <= top / 16.0, "{err}");
        // group 1, column 3: rows 3..6 hold 10, 14, 18: amax 18
        assert_eq!(values(&q.scale)[7], 18.0 / 448.0);
    }

    /// The column maxima a row-wise pass returns are each group's `|x|` maxima (rows past
    /// the last group and from `limit` on left out, an empty group zeros), and the
    /// transposed copy made from them is the one that computes its own.
    #[test]
    fn row_pass_maxima_are_the_transposed_copy_s_own() {
        let x = t(&[
            &[1.0, -2.0],
            &[-3.0, 0.5],
            &[0.25, 7.0],
            &[9.0, 9.0],
            &[f32::NAN, 1.0],
        ]);
        let ends = Tensor::from_slice(&[2i32, 2, 3]);
        let limit = Tensor::from_slice(&[3i32]);
        let (q, maxima) = quant_rows_with_maxima(&x, Some(&limit), None, &ends).unwrap();
        assert_eq!(
            values(&q.scale),
            values(&quant_rows(&x, Some(&limit), None).unwrap().scale)
        );
        let maxima = maxima.expect("the CPU reference computes the maxima");
        let m = values(&maxima.view_dtype(Kind::Float));
        assert_eq!(m, [3.0, 2.0, 0.0, 0.0, 0.25, 7.0]);
        let layout = Transposed::SideBySide {
            positions: side_by_side_positions(5, 3),
        };
        let (own, _) = quant_transposed(&x, &ends, layout, None, None).unwrap();
        let (given, _) = quant_transposed(&x, &ends, layout, None, Some(&maxima)).unwrap();
        assert_eq!(values(&own.q), values(&given.q));
        assert_eq!(values(&own.scale), values(&given.scale));
        // maxima of another shape are refused, not misread
        let wrong = Tensor::zeros([4], (Kind::Int, Device::Cpu));
        assert!(quant_transposed(&x, &ends, layout, None, Some(&wrong)).is_err());
    }

    /// The activation's backward pass: `g · act'(a)` (libtorch's backward on the CPU), rows
    /// from `limit` on zeros, its FP8 rows and column maxima those of that gradient.
    #[test]
    fn activation_backward_writes_the_gradient_and_its_fp8_rows() {
        let a = t(&[&[-1.0, 0.5], &[2.0, -0.25], &[3.0, 4.0]]);
        let g = t(&[&[1.0, -2.0], &[0.5, 4.0], &[f32::NAN, 1.0]]);
        let ends = Tensor::from_slice(&[1i32, 2]);
        let limit = Tensor::from_slice(&[2i32]);
        for act in Fp8ActGrad::ALL {
            let (ga, q, maxima) =
                act_grad_quant_rows(&a, &g, act, Some(&limit), None, Some(&ends)).unwrap();
            let want = match act {
                Fp8ActGrad::Gelu => a.gelu_backward(&g, "none"),
                Fp8ActGrad::Relu => a.threshold_backward(&g, 0.0),
            };
            let (gv, wv) = (values(&ga), values(&want));
            assert_eq!(&gv[..4], &wv[..4], "{act:?}");
            assert_eq!(&gv[4..], [0.0, 0.0], "{act:?}: rows past the limit");
            let qw = quant_rows(&ga, Some(&limit), None).unwrap();
            assert_eq!(values(&q.q), values(&qw.q));
            assert_eq!(values(&q.scale), values(&qw.scale));
            let m = values(&maxima.unwrap().view_dtype(Kind::Float));
            let abs: Vec<f32> = gv.iter().map(|v| v.abs()).collect();
            assert_eq!(m, [abs[0], abs[1], abs[2], abs[3]], "{act:?}");
        }
        assert!(
            act_grad_quant_rows(&a, &g.narrow(0, 0, 2), Fp8ActGrad::Gelu, None, None, None)
                .is_err()
        );
    }
}
