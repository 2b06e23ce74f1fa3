//! The kernels as functions of tensors: each launches its kernel where the kernel applies
//! (CUDA, bf16 or f32, rows of a multiple of 16 bytes) and otherwise computes the same
//! function with libtorch ops, so every caller, and the autograd wiring above, runs on a CPU
//! too. Dropped slots (`-1` in the index tensors) are skipped: rows the grouped matmul leaves
//! uninitialised are never used.
//!
//! Knows the MoE layer's index conventions (slots `token·k + j`, rows in expert order,
//! dropped rows last), not the layer itself.

use std::ffi::c_int;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use super::kernels::{
    device_index, kernels_ready, launch, ptr, resident_blocks, Arg, Elem, EpilogueAct, Grid, Kernel,
};

/// Launches a row kernel of signature `(src, index, k, f32 weights or null, out, n, d)`
/// (`gather_rows_*`, `sum_rows_*`) writing `n` rows of `src`'s width, on `blocks` blocks.
fn launch_rows(
    kernel: Kernel,
    src: &Tensor,
    index: &Tensor,
    k: i64,
    weights: Option<&Tensor>,
    n: i64,
    blocks: i64,
) -> Result<Tensor> {
    let (_, d) = src.size2()?;
    let src = src.f_contiguous()?;
    let index = index.f_contiguous()?;
    let weights = weights
        .map(|w| w.f_to_kind(Kind::Float)?.f_contiguous())
        .transpose()?;
    let out = Tensor::f_empty([n, d], (src.kind(), src.device()))?;
    launch(
        device_index(&src),
        kernel,
        Grid::linear(blocks, 128),
        &[
            ptr(Some(&src)),
            ptr(Some(&index)),
            Arg::I32(k as c_int),
            ptr(weights.as_ref()),
            ptr(Some(&out)),
            Arg::I64(n),
            Arg::I32(d as c_int),
        ],
    )?;
    Ok(out)
}

/// `out[r] = scale[s] · src[s / k]` for `s = row_slot[r] ≥ 0`, zero rows elsewhere.
pub fn gather_rows(
    src: &Tensor,
    row_slot: &Tensor,
    k: i64,
    scale: Option<&Tensor>,
) -> Result<Tensor> {
    let rows = row_slot.size()[0];
    if let Some(elem) = Elem::of(src) {
        // one warp per row, four rows per block
        return launch_rows(
            Kernel::GatherRows(elem),
            src,
            row_slot,
            k,
            scale,
            rows,
            (rows + 3) / 4,
        );
    }
    // libtorch reference: the same function
    let valid = row_slot.f_ge(0)?;
    let s = row_slot.f_clamp_min(0)?;
    let mut out = src.f_index_select(0, &s.f_div_scalar_mode(k, "floor")?)?;
    if let Some(scale) = scale {
        let w = scale
            .f_reshape([-1])?
            .f_index_select(0, &s)?
            .f_to_kind(src.kind())?;
        out = out.f_mul(&w.f_unsqueeze(1)?)?;
    }
    Ok(out.f_where_self(&valid.f_unsqueeze(1)?, &out.f_zeros_like()?)?)
}

/// `out[t] = Σ_j weight[t·k+j] · src[slot_row[t·k+j]]` over kept slots (`[T, d]`).
pub fn sum_rows(
    src: &Tensor,
    slot_row: &Tensor,
    k: i64,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, d) = src.size2()?;
    let tokens = slot_row.size()[0] / k;
    if let Some(elem) = Elem::of(src) {
        // one block per token
        return launch_rows(
            Kernel::SumRows(elem),
            src,
            slot_row,
            k,
            weight,
            tokens,
            tokens,
        );
    }
    let valid = slot_row.f_ge(0)?;
    let rows = src.f_index_select(0, &slot_row.f_clamp_min(0)?)?; // [T·k, d]
    let mut w = valid.f_to_kind(Kind::Float)?;
    if let Some(weight) = weight {
        w = w.f_mul(&weight.f_to_kind(Kind::Float)?.f_reshape([-1])?)?;
    }
    let w = w.f_to_kind(src.kind())?.f_reshape([tokens, 1, k])?;
    let rows = rows.f_where_self(&valid.f_unsqueeze(1)?, &rows.f_zeros_like()?)?;
    Ok(w.f_bmm(&rows.f_reshape([tokens, k, d])?)?
        .f_squeeze_dim(1)?)
}

/// `out[t·k+j] = ⟨a[slot_row[t·k+j]], b[t]⟩` (f32) over kept slots, zero for dropped ones.
pub fn row_dots(a: &Tensor, slot_row: &Tensor, k: i64, b: &Tensor) -> Result<Tensor> {
    let (_, d) = a.size2()?;
    let tokens = slot_row.size()[0] / k;
    if let (Some(elem), true) = (Elem::of(a), a.kind() == b.kind()) {
        let a = a.f_contiguous()?;
        let b = b.f_contiguous()?;
        let idx = slot_row.f_contiguous()?;
        let out = Tensor::f_empty([tokens * k], (Kind::Float, a.device()))?;
        launch(
            device_index(&a),
            Kernel::RowDots(elem),
            Grid::linear(tokens, 128),
            &[
                ptr(Some(&a)),
                ptr(Some(&idx)),
                Arg::I32(k as c_int),
                ptr(Some(&b)),
                ptr(Some(&out)),
                Arg::I64(tokens),
                Arg::I32(d as c_int),
            ],
        )?;
        return Ok(out);
    }
    let valid = slot_row.f_ge(0)?;
    let rows = a
        .f_index_select(0, &slot_row.f_clamp_min(0)?)?
        .f_to_kind(Kind::Float)?
        .f_reshape([tokens, k, d])?;
    let dots = rows
        .f_mul(&b.f_to_kind(Kind::Float)?.f_unsqueeze(1)?)?
        .f_sum_dim_intlist(2, false, Kind::Float)?
        .f_reshape([tokens * k])?;
    Ok(dots.f_where_self(&valid, &dots.f_zeros_like()?)?)
}

/// Launches the grid-stride elementwise `kernel` over `n` elements of type `elem` on
/// `like`'s device: blocks of 128 threads, one 16-byte vector per thread and iteration.
fn launch_elementwise(
    kernel: Kernel,
    elem: Elem,
    like: &Tensor,
    n: i64,
    args: &[Arg],
) -> Result<()> {
    let blocks = ((n / elem.per_vector() + 127) / 128).min(132 * 16);
    launch(device_index(like), kernel, Grid::linear(blocks, 128), args)
}

/// `silu(a) · b`, one pass (f32 inside).
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let (Some(elem), true, true) = (
        Elem::of(a),
        Elem::of(b).is_some(),
        a.size() == b.size() && a.kind() == b.kind(),
    ) {
        let a = a.f_contiguous()?;
        let b = b.f_contiguous()?;
        let out = a.f_empty_like()?;
        let n = a.numel() as i64;
        launch_elementwise(
            Kernel::SwigluFwd(elem),
            elem,
            &a,
            n,
            &[ptr(Some(&a)), ptr(Some(&b)), ptr(Some(&out)), Arg::I64(n)],
        )?;
        return Ok(out);
    }
    Ok(a.f_silu()?.f_mul(b)?)
}

/// The gradients of `silu(a) · b` for the output gradient `g`: `(ga, gb)`, one pass.
pub fn swiglu_backward(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    if let (Some(elem), true, true) = (
        Elem::of(a),
        Elem::of(b).is_some() && Elem::of(g).is_some(),
        a.size() == b.size()
            && a.size() == g.size()
            && a.kind() == b.kind()
            && a.kind() == g.kind(),
    ) {
        let a = a.f_contiguous()?;
        let b = b.f_contiguous()?;
        let g = g.f_contiguous()?;
        let ga = a.f_empty_like()?;
        let gb = a.f_empty_like()?;
        let n = a.numel() as i64;
        launch_elementwise(
            Kernel::SwigluBwd(elem),
            elem,
            &a,
            n,
            &[
                ptr(Some(&a)),
                ptr(Some(&b)),
                ptr(Some(&g)),
                ptr(Some(&ga)),
                ptr(Some(&gb)),
                Arg::I64(n),
            ],
        )?;
        return Ok((ga, gb));
    }
    let s = a.f_sigmoid()?;
    let silu = a.f_mul(&s)?;
    let gb = g.f_mul(&silu)?;
    let ds = s.f_mul(&a.f_mul(&s.f_neg()?.f_add_scalar(1.0)?)?.f_add_scalar(1.0)?)?;
    let ga = g.f_mul(b)?.f_mul(&ds)?;
    Ok((ga, gb))
}

/// The most experts the plan kernels take (their shared memory holds 33·(E+1) ints).
pub const PLAN_MAX_EXPERTS: i64 = 256;
/// Slots per block of the plan kernels.
const PLAN_CHUNK: i64 = 4096;

/// Whether the plan kernels apply to `keys` (`[n]` int64 on a CUDA device, `e` experts);
/// `FMOEC_FUSED_PLAN=0` switches them off (the libtorch sort runs instead).
pub fn plan_kernels_apply(keys: &Tensor, e: i64) -> bool {
    keys.device().is_cuda()
        && keys.kind() == Kind::Int64
        && keys.dim() == 1
        && (1..=PLAN_MAX_EXPERTS).contains(&e)
        && keys.size()[0] < i32::MAX as i64
        && !std::env::var("FMOEC_FUSED_PLAN").is_ok_and(|v| v == "0")
}

/// A stable expert order of `n` slots, as [`crate::runtime::moe::DispatchPlan`] holds it.
pub struct RowOrder {
    /// Slot of each row (slots sorted by key, stable; dropped slots, key `E`, last).
    pub order: Tensor,
    /// `order / k`.
    pub token: Tensor,
    /// The key of each row (`E` for dropped slots).
    pub sorted_key: Tensor,
    /// Slot of each row, `-1` for dropped rows.
    pub row_slot: Tensor,
    /// Row of each slot, `-1` for dropped slots.
    pub slot_row: Tensor,
    /// Kept slots per expert, `[E]` int64.
    pub counts: Tensor,
    /// Group ends, `[E]` int32.
    pub offsets: Tensor,
}

/// Per-chunk counts and the scan: `(counts, offsets, key_start, block_start, chunks)`.
fn plan_counts(keys: &Tensor, e: i64) -> Result<(Tensor, Tensor, Tensor, Tensor, i64)> {
    let n = keys.size()[0];
    let (dev, di, b) = (keys.device(), device_index(keys), e + 1);
    let nb = ((n + PLAN_CHUNK - 1) / PLAN_CHUNK).max(1);
    let block_counts = Tensor::f_empty([nb, b], (Kind::Int, dev))?;
    launch(
        di,
        Kernel::PlanCount,
        Grid {
            blocks: nb,
            blocks_y: 1,
            threads: 512,
            shared_bytes: (b * 4) as u32,
        },
        &[
            ptr(Some(keys)),
            Arg::I64(n),
            Arg::I32(e as c_int),
            Arg::I64(PLAN_CHUNK),
            ptr(Some(&block_counts)),
        ],
    )?;
    let counts = Tensor::f_empty([e], (Kind::Int64, dev))?;
    let offsets = Tensor::f_empty([e], (Kind::Int, dev))?;
    let key_start = Tensor::f_empty([b], (Kind::Int64, dev))?;
    let block_start = Tensor::f_empty([nb, b], (Kind::Int, dev))?;
    launch(
        di,
        Kernel::PlanScan,
        Grid {
            blocks: 1,
            blocks_y: 1,
            threads: 1024,
            shared_bytes: (b * 4) as u32,
        },
        &[
            ptr(Some(&block_counts)),
            Arg::I32(nb as c_int),
            Arg::I32(e as c_int),
            ptr(Some(&counts)),
            ptr(Some(&offsets)),
            ptr(Some(&key_start)),
            ptr(Some(&block_start)),
        ],
    )?;
    Ok((counts, offsets, key_start, block_start, nb))
}

/// The placement pass: positions within each key (`pos`) or the index maps (`maps`).
fn plan_place(
    keys: &Tensor,
    k: i64,
    e: i64,
    (key_start, block_start, nb): (&Tensor, &Tensor, i64),
    pos: Option<&Tensor>,
    maps: Option<[&Tensor; 5]>,
) -> Result<()> {
    let b = e + 1;
    let map = |i: usize| maps.map(|m| m[i]);
    launch(
        device_index(keys),
        Kernel::PlanPlace,
        Grid {
            blocks: nb,
            blocks_y: 1,
            threads: 1024,
            shared_bytes: (33 * b * 4) as u32,
        },
        &[
            ptr(Some(keys)),
            Arg::I64(keys.size()[0]),
            Arg::I32(k as c_int),
            Arg::I32(e as c_int),
            Arg::I64(PLAN_CHUNK),
            ptr(Some(block_start)),
            ptr(Some(key_start)),
            ptr(pos),
            ptr(map(0)),
            ptr(map(1)),
            ptr(map(2)),
            ptr(map(3)),
            ptr(map(4)),
        ],
    )
}

/// The stable expert order of the slots `keys` (`[n]` int64, slot `s = token·k + j`, keys
/// outside `[0, e)` dropped) in three launches and no host synchronisation. The caller
/// checks [`plan_kernels_apply`].
pub fn expert_order(keys: &Tensor, k: i64, e: i64) -> Result<RowOrder> {
    let keys = keys.f_contiguous()?;
    let n = keys.size()[0];
    let (counts, offsets, key_start, block_start, nb) = plan_counts(&keys, e)?;
    let new = || Tensor::f_empty([n], (Kind::Int64, keys.device()));
    let (order, token, sorted_key, row_slot, slot_row) = (new()?, new()?, new()?, new()?, new()?);
    plan_place(
        &keys,
        k,
        e,
        (&key_start, &block_start, nb),
        None,
        Some([&order, &token, &sorted_key, &row_slot, &slot_row]),
    )?;
    Ok(RowOrder {
        order,
        token,
        sorted_key,
        row_slot,
        slot_row,
        counts,
        offsets,
    })
}

/// Each slot's position among the slots of its key before it (`[n]` int64; dropped slots
/// counted among themselves), for capacity limits. The caller checks [`plan_kernels_apply`].
pub fn key_positions(keys: &Tensor, e: i64) -> Result<Tensor> {
    let keys = keys.f_contiguous()?;
    let (_, _, key_start, block_start, nb) = plan_counts(&keys, e)?;
    let pos = Tensor::f_empty([keys.size()[0]], (Kind::Int64, keys.device()))?;
    plan_place(
        &keys,
        1,
        e,
        (&key_start, &block_start, nb),
        Some(&pos),
        None,
    )?;
    Ok(pos)
}

/// The epilogue's activation with libtorch ops (the reference).
pub(crate) fn act_ref(x: &Tensor, act: EpilogueAct) -> Result<Tensor> {
    Ok(match act {
        EpilogueAct::Gelu => x.f_gelu("none")?,
        EpilogueAct::Relu => x.f_relu()?,
        EpilogueAct::None => x.shallow_clone(),
    })
}

fn act_grad_ref(x: &Tensor, act: EpilogueAct) -> Result<Tensor> {
    Ok(match act {
        EpilogueAct::Gelu => {
            let cdf = x
                .f_mul_scalar(std::f64::consts::FRAC_1_SQRT_2)?
                .f_erf()?
                .f_add_scalar(1.0)?
                .f_mul_scalar(0.5)?;
            let pdf = x.f_square()?.f_mul_scalar(-0.5)?.f_exp()?.f_mul_scalar(
                0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2,
            )?;
            cdf.f_add(&x.f_mul(&pdf)?)?
        }
        EpilogueAct::Relu => x.f_gt(0.0)?.f_to_kind(x.kind())?,
        EpilogueAct::None => x.f_ones_like()?,
    })
}

/// The rows of `row_expert` that are kept slots (`[N, 1]` bool) and their expert clamped
/// into `[0, E)` (for the libtorch reference paths).
pub(crate) fn kept_rows(row_expert: &Tensor, experts: i64) -> Result<(Tensor, Tensor)> {
    let valid = row_expert
        .f_ge(0)?
        .f_logical_and(&row_expert.f_lt(experts)?)?
        .f_unsqueeze(1)?;
    Ok((valid, row_expert.f_clamp(0, experts - 1)?))
}

/// The bias epilogue of a grouped matmul over rows in expert order:
/// `act(h[r] + bias[row_expert[r]])`, zero rows for dropped slots (`row_expert[r]` outside
/// `[0, E)`, whose `h` rows are not used). With `g`, the backward instead:
/// `g[r] · act'(h[r] + bias[e])`, zero for dropped rows. `bias` is `[E, d]` of `h`'s dtype.
pub(crate) fn bias_act_pass(
    h: &Tensor,
    bias: &Tensor,
    row_expert: &Tensor,
    act: EpilogueAct,
    g: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, d) = h.size2()?;
    let experts = bias.size()[0];
    let same = |t: &Tensor| Elem::of(t).is_some() && t.kind() == h.kind() && t.size()[1] == d;
    if let (Some(elem), true, true) = (
        Elem::of(h),
        same(bias),
        g.is_none_or(|g| same(g) && g.size()[0] == rows),
    ) {
        let h = h.f_contiguous()?;
        let bias = bias.f_contiguous()?;
        let g = g.map(|g| g.f_contiguous()).transpose()?;
        let idx = row_expert.f_contiguous()?;
        let out = h.f_empty_like()?;
        // a block of 128 threads per row and 128 vectors
        let per_block = 128 * elem.per_vector();
        launch(
            device_index(&h),
            Kernel::BiasAct(act, elem),
            Grid {
                blocks: rows,
                blocks_y: ((d + per_block - 1) / per_block) as u32,
                threads: 128,
                shared_bytes: 0,
            },
            &[
                ptr(Some(&h)),
                ptr(Some(&bias)),
                ptr(Some(&idx)),
                Arg::I32(experts as c_int),
                ptr(g.as_ref()),
                ptr(Some(&out)),
                Arg::I64(rows),
                Arg::I32(d as c_int),
            ],
        )?;
        return Ok(out);
    }
    let (valid, idx) = kept_rows(row_expert, experts)?;
    let pre = h.f_add(&bias.f_index_select(0, &idx)?)?;
    let out = match g {
        None => act_ref(&pre, act)?,
        Some(g) => g.f_mul(&act_grad_ref(&pre, act)?)?,
    };
    Ok(out.f_where_self(&valid, &out.f_zeros_like()?)?)
}

/// `out[e] = Σ g[r]` over the rows `r` of expert `e` (`[E, d]`, f32 sums in `g`'s dtype);
/// `row_expert` is sorted (expert order) with dropped rows (`E`) last, never read. On a GPU
/// two launches without atomics: each expert's rows in slices (about 512 blocks in all, as
/// [`column_sums`]; one block an expert and column chunk left 64-128 blocks on an H100's
/// 132 multiprocessors at GPT-2-medium-MoE's shapes), then the slices added in order.
pub fn segment_sums(g: &Tensor, row_expert: &Tensor, experts: i64) -> Result<Tensor> {
    let (rows, d) = g.size2()?;
    if let Some(elem) = Elem::of(g).filter(|_| experts > 0 && d > 0) {
        let g = g.f_contiguous()?;
        let idx = row_expert.f_contiguous()?;
        let device = device_index(&g);
        let col_blocks = (d / elem.per_vector() + 31) / 32;
        // slices of at least 64 rows an expert on average
        let slices = (512 / (experts * col_blocks)).clamp(1, (rows / (64 * experts)).max(1));
        let partial = Tensor::f_empty([slices, experts, d], (Kind::Float, g.device()))?;
        launch(
            device,
            Kernel::SegmentSumsPart(elem),
            Grid {
                blocks: experts,
                blocks_y: (col_blocks * slices) as u32,
                threads: 256,
                shared_bytes: 0,
            },
            &[
                ptr(Some(&g)),
                ptr(Some(&idx)),
                ptr(Some(&partial)),
                Arg::I64(rows),
                Arg::I32(d as c_int),
                Arg::I32(slices as c_int),
            ],
        )?;
        let out = Tensor::f_empty([experts, d], (g.kind(), g.device()))?;
        let n = experts * d;
        launch(
            device,
            Kernel::SegmentSumsFinish(elem),
            Grid::linear(((n + 255) / 256).min(65_535), 256),
            &[
                ptr(Some(&partial)),
                ptr(Some(&out)),
                Arg::I32(slices as c_int),
                Arg::I64(n),
            ],
        )?;
        return Ok(out);
    }
    let (valid, idx) = kept_rows(row_expert, experts)?;
    let kept = g.f_where_self(&valid, &g.f_zeros_like()?)?;
    Ok(Tensor::f_zeros([experts, d], (g.kind(), g.device()))?.f_index_add(0, &idx, &kept)?)
}

/// The column sums of `g` (`[rows, d]`) in f32: added into `into` (`[d]` f32, contiguous,
/// on `g`'s device; a dense linear's bias `.grad`) and `None` returned, or, without `into`,
/// returned as a new `[d]` f32 tensor. On a GPU with the kernels (bf16 or f32 `g`, rows of a
/// multiple of 16 bytes) two launches without atomics: partial sums over chunks of rows, then
/// their sum into `into` in one pass; elsewhere libtorch's sum (and `add_`).
pub fn column_sums(g: &Tensor, into: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (rows, d) = g.size2()?;
    let into_fits = into.is_none_or(|t| {
        t.kind() == Kind::Float && t.size() == [d] && t.is_contiguous() && t.device() == g.device()
    });
    let g = g.f_contiguous()?;
    let kernel = Elem::of(&g)
        .filter(|_| into_fits && rows > 0 && d > 0 && d < c_int::MAX as i64)
        .filter(|_| kernels_ready(device_index(&g)).is_ok());
    let Some(elem) = kernel else {
        let sum_kind = match g.kind() {
            Kind::BFloat16 | Kind::Half => Kind::Float,
            other => other,
        };
        let sums = g.f_sum_dim_intlist([0i64].as_slice(), false, sum_kind)?;
        return match into {
            Some(acc) => {
                let _ = acc.shallow_clone().f_add_(&sums)?;
                Ok(None)
            }
            None => Ok(Some(sums)),
        };
    };
    // about 512 blocks in the first pass, chunks of at least 64 rows
    let col_blocks = (d / elem.per_vector() + 31) / 32;
    let chunks = (512 / col_blocks).clamp(1, (rows + 63) / 64);
    let chunk_rows = (rows + chunks - 1) / chunks;
    let chunks = (rows + chunk_rows - 1) / chunk_rows;
    let device = device_index(&g);
    let partial = Tensor::f_empty([chunks, d], (Kind::Float, g.device()))?;
    launch(
        device,
        Kernel::ColSumsPart(elem),
        Grid {
            blocks: col_blocks,
            blocks_y: chunks as u32,
            threads: 256,
            shared_bytes: 0,
        },
        &[
            ptr(Some(&g)),
            ptr(Some(&partial)),
            Arg::I64(rows),
            Arg::I32(d as c_int),
            Arg::I64(chunk_rows),
        ],
    )?;
    let (out, fresh) = match into {
        Some(acc) => (acc.shallow_clone(), false),
        None => (Tensor::f_empty([d], (Kind::Float, g.device()))?, true),
    };
    launch(
        device,
        Kernel::ColSumsFinish,
        Grid::linear((d + 255) / 256, 256),
        &[
            ptr(Some(&partial)),
            ptr(Some(&out)),
            Arg::I32(chunks as c_int),
            Arg::I32(d as c_int),
            Arg::I32(c_int::from(!fresh)),
        ],
    )?;
    Ok(fresh.then_some(out))
}

/// The gates' keyed uniform draws of `shape` (f32, in `[0, 1)`) on `key`'s device, a CUDA one:
/// the MoE layer's counter-based hash of `key` (`[2]` int64, two 32-bit words), the stream's
/// 32-bit word and each element's index, in one kernel instead of about thirty int64 ops, with
/// the same bits.
pub fn keyed_uniform(key: &Tensor, stream_word: i64, shape: &[i64]) -> Result<Tensor> {
    if key.kind() != Kind::Int64 || key.numel() != 2 {
        anyhow::bail!(
            "keyed draws: the key must be two int64 words, not {:?} {:?}",
            key.kind(),
            key.size()
        );
    }
    let key = key.f_contiguous()?;
    let n: i64 = shape.iter().product();
    let out = Tensor::f_empty(shape, (Kind::Float, key.device()))?;
    if n > 0 {
        launch(
            device_index(&key),
            Kernel::KeyedUniform,
            Grid::linear(((n + 255) / 256).min(132 * 16), 256),
            &[
                ptr(Some(&key)),
                Arg::I64(stream_word),
                Arg::I64(n),
                ptr(Some(&out)),
            ],
        )?;
    }
    Ok(out)
}

/// Blocks of 256 threads for the row kernels of `xent_*`, capped for their grid-stride loop.
fn xent_blocks(rows: i64) -> i64 {
    rows.min(132 * 64)
}

/// Launches `kernel` (`XentFwd` or `XentBwd` of the logits' type) over the rows of `logits`
/// (`[N, V]`) with the tensor arguments `tensors` (after the logits), then the row count and
/// `V`.
fn launch_xent(kernel: fn(Elem) -> Kernel, logits: &Tensor, tensors: &[&Tensor]) -> Result<()> {
    let (rows, v) = logits.size2()?;
    let elem = Elem::of(logits).context("cross-entropy: unsupported logits")?;
    let mut args = vec![ptr(Some(logits))];
    args.extend(tensors.iter().map(|t| ptr(Some(t))));
    args.extend([Arg::I64(rows), Arg::I32(v as c_int)]);
    launch(
        device_index(logits),
        kernel(elem),
        Grid::linear(xent_blocks(rows), 256),
        &args,
    )
}

pub(crate) fn xent_forward(logits: &Tensor, target: &Tensor, lse: &Tensor) -> Result<Tensor> {
    let loss = Tensor::f_empty([logits.size()[0]], (Kind::Float, logits.device()))?;
    launch_xent(Kernel::XentFwd, logits, &[target, &loss, lse])?;
    Ok(loss)
}

pub(crate) fn xent_backward(
    logits: &Tensor,
    target: &Tensor,
    lse: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    let g = g.f_to_kind(Kind::Float)?.f_contiguous()?;
    let grad = logits.f_empty_like()?;
    launch_xent(Kernel::XentBwd, logits, &[target, lse, &g, &grad])?;
    Ok(grad)
}

/// The epsilon the norm kernels add to the variance (`norm.cu`; libtorch's default).
pub const NORM_KERNEL_EPS: f64 = 1e-5;

/// The values of a row each thread of the norm kernels holds (`NORM_HELD` in `norm.cu`).
const NORM_HELD: i64 = 16;
/// The most threads a block of the norm kernels has (`NORM_THREADS_MAX` in `norm.cu`).
const NORM_THREADS_MAX: i64 = 512;

/// The threads of a block of the norm kernels for rows of `d` values of `elem` (a multiple
/// of 32, each thread holding at most [`NORM_HELD`] values of the row), or `None` where the
/// kernels do not take such rows: `d` not a positive multiple of 8, or wider than a block
/// holds (8192 values: 512 threads of 16).
pub fn norm_threads(elem: Elem, d: i64) -> Option<u32> {
    if d <= 0 || d % 8 != 0 {
        return None;
    }
    let per_thread = NORM_HELD / elem.per_vector();
    let vectors = d / elem.per_vector();
    let threads = (vectors + per_thread - 1) / per_thread;
    let threads = (threads + 31) / 32 * 32;
    (threads <= NORM_THREADS_MAX).then_some(threads as u32)
}

/// The blocks of the norm's backward for `rows` rows when `resident` of its blocks fit on
/// the device at once: at most one wave, and at least [`NORM_BACKWARD_ROWS`] rows a block
/// (each block writes its gain and bias sums as one row of f32 partial sums each, which the
/// reduction reads again: with a block per row they would be four times the bytes of the
/// bf16 rows themselves).
pub fn norm_backward_blocks(rows: i64, resident: i64) -> i64 {
    ((rows + NORM_BACKWARD_ROWS - 1) / NORM_BACKWARD_ROWS)
        .min(resident)
        .max(1)
}

/// The fewest rows a block of the norm's backward runs, where the rows allow
/// ([`norm_backward_blocks`]).
const NORM_BACKWARD_ROWS: i64 = 8;

/// The element type and block size of the norm kernels for `x` (`[.., d]`), the residual
/// branch `h` (`x`'s shape, or none), the gain and the bias (`[d]`), all in `x`'s dtype and
/// contiguous; `None` where the kernels do not apply (not CUDA, another dtype, unaligned,
/// no rows, `d` not a multiple of 8 or past [`norm_threads`]'s limit), and libtorch runs.
pub fn norm_kernel_fits(
    x: &Tensor,
    h: Option<&Tensor>,
    gamma: &Tensor,
    beta: Option<&Tensor>,
) -> Option<(Elem, u32)> {
    let elem = Elem::of(x)?;
    let d = *x.size().last()?;
    let same = |t: &Tensor, size: &[i64]| {
        Elem::of(t) == Some(elem) && t.size() == size && t.is_contiguous()
    };
    if !x.is_contiguous()
        || x.numel() == 0
        || !h.is_none_or(|h| same(h, &x.size()))
        || !same(gamma, &[d])
        || !beta.is_none_or(|b| same(b, &[d]))
    {
        return None;
    }
    Some((elem, norm_threads(elem, d)?))
}

/// `(rows, d)` of a tensor of rows of its last dimension's width, whatever its other
/// dimensions (the norm's tensors keep their shapes: see [`super::add_norm_op`]).
fn rows_of(t: &Tensor) -> Result<(i64, i64)> {
    match t.size().last() {
        Some(&d) if d > 0 => Ok((t.numel() as i64 / d, d)),
        _ => bail!("fused norm: a tensor without rows ({:?})", t.size()),
    }
}

/// What the norm's forward wrote: the residual sum `s` (`x + h`; none without `h`), the
/// output `y`, and per row the mean (LayerNorm) and `rstd` in f32, for the backward.
pub struct NormForward {
    pub s: Option<Tensor>,
    pub y: Tensor,
}

/// `s = x + h` and `y = norm(s) · gamma (+ beta)` over rows of `x` (`[.., d]`), one pass
/// (`mean`, `rstd`: `[rows]` f32, written; `mean` none for RMSNorm, which `rms` asks for).
/// The tensors must fit the kernels ([`norm_kernel_fits`]).
pub fn norm_forward(
    x: &Tensor,
    h: Option<&Tensor>,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    mean: Option<&Tensor>,
    rstd: &Tensor,
) -> Result<NormForward> {
    let (elem, threads) =
        norm_kernel_fits(x, h, gamma, beta).context("fused norm: unsupported tensors")?;
    let (rows, d) = rows_of(x)?;
    let s = h.map(|h| h.f_empty_like()).transpose()?;
    let y = x.f_empty_like()?;
    launch(
        device_index(x),
        Kernel::NormFwd(elem),
        Grid::linear(rows, threads),
        &[
            ptr(Some(x)),
            ptr(h),
            ptr(Some(gamma)),
            ptr(beta),
            ptr(s.as_ref()),
            ptr(Some(&y)),
            ptr(mean),
            ptr(Some(rstd)),
            Arg::I64(rows),
            Arg::I32(d as c_int),
            Arg::I32(mean.is_none() as c_int),
        ],
    )?;
    Ok(NormForward { s, y })
}

/// The backward of [`norm_forward`] for the output gradient `dy` and the gradient `ds`
/// reaching `s` from later (none where none does): `dx = ds + norm'(dy)` (the gradient of
/// both `x` and `h`), and the gain's (and, with `mean`, LayerNorm's, the bias's) gradients as
/// per-block partial sums, `[blocks, d]` f32 each, for [`norm_reduce`]. `s` is the residual
/// sum (`x` where there was no `h`).
pub fn norm_backward(
    dy: &Tensor,
    ds: Option<&Tensor>,
    s: &Tensor,
    gamma: &Tensor,
    mean: Option<&Tensor>,
    rstd: &Tensor,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (elem, threads) =
        norm_kernel_fits(s, Some(dy), gamma, None).context("fused norm: unsupported tensors")?;
    if ds.is_some_and(|ds| norm_kernel_fits(s, Some(ds), gamma, None).is_none()) {
        bail!("fused norm: the residual's gradient does not fit the kernels");
    }
    let (rows, d) = rows_of(s)?;
    let device = device_index(s);
    let blocks = norm_backward_blocks(
        rows,
        resident_blocks(device, Kernel::NormBwd(elem), threads, 0)?,
    );
    let dx = s.f_empty_like()?;
    let f32s = (Kind::Float, s.device());
    let dgamma = Tensor::f_empty([blocks, d], f32s)?;
    let dbeta = mean
        .map(|_| Tensor::f_empty([blocks, d], f32s))
        .transpose()?;
    launch(
        device,
        Kernel::NormBwd(elem),
        Grid::linear(blocks, threads),
        &[
            ptr(Some(dy)),
            ptr(ds),
            ptr(Some(s)),
            ptr(Some(gamma)),
            ptr(mean),
            ptr(Some(rstd)),
            ptr(Some(&dx)),
            ptr(Some(&dgamma)),
            ptr(dbeta.as_ref()),
            Arg::I64(rows),
            Arg::I32(d as c_int),
        ],
    )?;
    Ok((dx, dgamma, dbeta))
}

/// Adds up the partial sums of [`norm_backward`] (`[blocks, d]` f32) of the gain (and the
/// bias) into `out_gamma` (and `out_beta`), `[d]` f32 contiguous: added to what they hold
/// with `accumulate`, else overwritten.
pub fn norm_reduce(
    part_gamma: &Tensor,
    out_gamma: &Tensor,
    beta: Option<(&Tensor, &Tensor)>,
    accumulate: bool,
) -> Result<()> {
    let (parts, d) = part_gamma.size2()?;
    let fits = |t: &Tensor| t.kind() == Kind::Float && t.is_contiguous() && t.numel() as i64 == d;
    if !fits(out_gamma) || !beta.is_none_or(|(_, out)| fits(out)) {
        bail!("fused norm: the gradients to reduce into are not [{d}] f32");
    }
    launch(
        device_index(part_gamma),
        Kernel::NormReduce,
        Grid {
            blocks: (d + 31) / 32,
            blocks_y: if beta.is_some() { 2 } else { 1 },
            threads: 1024,
            shared_bytes: 0,
        },
        &[
            ptr(Some(part_gamma)),
            ptr(Some(out_gamma)),
            ptr(beta.map(|(part, _)| part)),
            ptr(beta.map(|(_, out)| out)),
            Arg::I32(parts as c_int),
            Arg::I32(d as c_int),
            Arg::I32(accumulate as c_int),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Rows up to 8192 wide take one block of at most 512 threads, a multiple of 32, each
    /// thread holding 16 values (two bf16 vectors or four f32 ones) or fewer; other widths
    /// fall back to libtorch.
    #[test]
    fn norm_blocks_hold_a_row() {
        for elem in [Elem::Bf16, Elem::F32] {
            for d in (8..=8192).step_by(8) {
                let threads = norm_threads(elem, d).unwrap_or_else(|| panic!("{elem:?} d={d}"));
                assert!(
                    threads % 32 == 0 && threads <= 512,
                    "{elem:?} d={d}: {threads}"
                );
                // enough threads for the row, and no warp without a value of it
                assert!(threads as i64 * NORM_HELD >= d, "{elem:?} d={d}: {threads}");
                assert!(
                    (threads as i64 - 32) * NORM_HELD < d,
                    "{elem:?} d={d}: {threads}"
                );
            }
            assert_eq!(norm_threads(elem, 1024), Some(64));
            assert_eq!(norm_threads(elem, 8192), Some(512));
            for d in [0, -8, 4, 1004, 8200, 16384] {
                assert_eq!(norm_threads(elem, d), None, "{elem:?} d={d}");
            }
        }
    }

    /// The backward runs at most one wave of blocks, each of at least 8 rows where there are
    /// that many.
    #[test]
    fn norm_backward_runs_one_wave_of_8_rows_a_block() {
        assert_eq!(norm_backward_blocks(8192, 1584), 1024);
        assert_eq!(norm_backward_blocks(65536, 1584), 1584);
        assert_eq!(norm_backward_blocks(37, 1584), 5);
        assert_eq!(norm_backward_blocks(3, 1584), 1);
        assert_eq!(norm_backward_blocks(1, 0), 1);
    }

    /// CPU tensors, other dtypes, mismatched shapes and unaligned rows are not the kernels'.
    #[test]
    fn norm_kernels_take_only_what_they_fit() {
        let cpu = (Kind::Float, Device::Cpu);
        let x = Tensor::ones([4, 64], cpu);
        let g = Tensor::ones([64], cpu);
        assert!(norm_kernel_fits(&x, Some(&x), &g, Some(&g)).is_none());
        assert!(norm_kernel_fits(&x, None, &g, None).is_none());
    }
}
