//! The device self-check (`fmoec bench moe --check-kernels`): every kernel and fused
//! autograd op of this folder against a libtorch reference written here, computed on the
//! CPU in f64, on fresh random inputs with dropped slots and NaN-poisoned memory. On a CPU
//! the ops take their libtorch branch, so the same check tests the autograd wiring in CI.
//!
//! Its references are its own (not the MoE layer's code), so nothing here imports the
//! layer.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::autograd::{
    add_norm_op, bias_act_op, cast_op, combine_op, cross_entropy_rows, dispatch_op, swiglu_op,
    NormOp, NormWeight,
};
use super::kernels::EpilogueAct;
use super::linear::linear_op;
use super::ops::{
    act_ref, column_sums, expert_order, gather_rows, kept_rows, key_positions, plan_kernels_apply,
    row_dots, sum_rows, RowOrder,
};

/// The stable expert order of the slots `keys` (`[n]` int64, keys outside `[0, e)`
/// dropped, sorted last) with libtorch ops: the reference for the plan kernels.
fn reference_order(keys: &Tensor, k: i64, e: i64) -> Result<RowOrder> {
    let n = keys.size()[0];
    let device = keys.device();
    let kept = keys.f_ge(0)?.f_logical_and(&keys.f_lt(e)?)?;
    let keyed = keys.f_where_scalarother(&kept, e)?;
    let order = keyed.f_argsort_stable(true, 0, false)?;
    let sorted_key = keyed.f_index_select(0, &order)?;
    let counts = key_counts(&keyed, e + 1)?.f_narrow(0, 0, e)?;
    let offsets = counts.f_cumsum(0, Kind::Int)?;
    let valid = sorted_key.f_lt(e)?;
    let row_slot = order.f_where_scalarother(&valid, -1)?;
    let rows = Tensor::f_arange(n, (Kind::Int64, device))?;
    let slot_row = order
        .f_empty_like()?
        .f_scatter(0, &order, &rows)?
        .f_where_scalarother(&kept, -1)?;
    Ok(RowOrder {
        token: order.f_div_scalar_mode(k, "floor")?,
        order,
        sorted_key,
        row_slot,
        slot_row,
        counts,
        offsets,
    })
}

/// How often each value `0..bins` occurs in `keys` (every key in range), `[bins]` int64.
fn key_counts(keys: &Tensor, bins: i64) -> Result<Tensor> {
    Ok(
        Tensor::f_zeros([bins], (Kind::Int64, keys.device()))?.f_scatter_add(
            0,
            keys,
            &keys.f_ones_like()?,
        )?,
    )
}

/// The order the device computes: the plan kernels where they apply, else the reference.
fn device_order(keys: &Tensor, k: i64, e: i64) -> Result<RowOrder> {
    if plan_kernels_apply(keys, e) {
        expert_order(keys, k, e)
    } else {
        reference_order(keys, k, e)
    }
}

/// Each slot's position among the earlier slots of its key (keys outside `[0, e)` counted
/// among themselves), with libtorch ops.
fn reference_positions(keys: &Tensor, e: i64) -> Result<Tensor> {
    let n = keys.size()[0];
    let kept = keys.f_ge(0)?.f_logical_and(&keys.f_lt(e)?)?;
    let keyed = keys.f_where_scalarother(&kept, e)?;
    let sorted = keyed.f_argsort_stable(true, 0, false)?;
    let counts = key_counts(&keyed, e + 1)?;
    let starts = counts.f_cumsum(0, Kind::Int64)?.f_sub(&counts)?;
    let sorted_keys = keyed.f_index_select(0, &sorted)?;
    let rank = Tensor::f_arange(n, (Kind::Int64, keys.device()))?;
    let pos_sorted = rank.f_sub(&starts.f_index_select(0, &sorted_keys)?)?;
    Ok(pos_sorted
        .f_zeros_like()?
        .f_scatter(0, &sorted, &pos_sorted)?)
}

/// The tokens `x` `[T, d]` gathered into the order's rows, dropped rows zero.
fn reference_dispatch(x: &Tensor, o: &RowOrder) -> Result<Tensor> {
    let xs = x.f_index_select(0, &o.token)?;
    let valid = o.row_slot.f_ge(0)?.f_unsqueeze(1)?;
    Ok(xs.f_where_self(&valid, &xs.f_zeros_like()?)?)
}

/// `Σ_j weight[t, j] · ys[row of slot t·k+j]` over kept slots, `[T, d]`.
fn reference_combine(ys: &Tensor, o: &RowOrder, weight: &Tensor, tokens: i64) -> Result<Tensor> {
    let valid = o.row_slot.f_ge(0)?.f_unsqueeze(1)?;
    let w = weight
        .f_reshape([-1])?
        .f_index_select(0, &o.order)?
        .f_to_kind(ys.kind())?;
    let ys = ys.f_where_self(&valid, &ys.f_zeros_like()?)?;
    let out = Tensor::f_zeros([tokens, ys.size()[1]], (ys.kind(), ys.device()))?;
    Ok(out.f_index_add(0, &o.token, &ys.f_mul(&w.f_unsqueeze(1)?)?)?)
}

pub(crate) fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?;
    let b = b.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?;
    if a.f_isnan()?.f_any()?.f_int64_value(&[])? != 0 {
        return Ok(f64::NAN);
    }
    let num = a.f_sub(&b)?.f_norm()?.f_double_value(&[])?;
    let den = b.f_norm()?.f_double_value(&[])?;
    Ok(if den > 0.0 { num / den } else { num })
}

/// Fills the caching allocator's next block of `n` elements with NaN, so a kernel that
/// leaves an element unwritten shows up as NaN in the check.
pub(crate) fn poison(n: i64, kind: Kind, device: Device) -> Result<()> {
    let _ = Tensor::f_full([n], f64::NAN, (kind, device))?;
    Ok(())
}

/// The comparisons of [`self_check`]: one line each, and how many failed.
#[derive(Default)]
pub(crate) struct Checks {
    pub lines: Vec<String>,
    pub failed: usize,
}

impl Checks {
    pub fn record(&mut self, label: String, ok: bool, detail: String) {
        if !ok {
            self.failed += 1;
        }
        let verdict = if ok { "ok" } else { "FAILED" };
        self.lines.push(format!("{label}: {detail} {verdict}"));
    }

    /// `got` within `tol` (relative, norm-wise) of `want`; NaN anywhere fails.
    pub fn close(&mut self, label: String, got: &Tensor, want: &Tensor, tol: f64) -> Result<()> {
        let r = rel(got, want)?;
        self.record(label, r.is_finite() && r <= tol, format!("rel err {r:.2e}"));
        Ok(())
    }

    /// The same integers (shape and values).
    pub fn equal(&mut self, label: String, got: &Tensor, want: &Tensor) -> Result<()> {
        let got = got.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?;
        let want = want.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?;
        let ok = got.size() == want.size() && got.f_equal(&want)?;
        self.record(label, ok, "equal".to_string());
        Ok(())
    }
}

/// Backpropagates `Σ out · g`, computed in `kind` on `out`'s device.
pub(crate) fn seed_backward(out: &Tensor, g: &Tensor, kind: Kind) -> Result<()> {
    out.f_to_kind(kind)?
        .f_mul(&g.f_to_device(out.device())?.f_to_kind(kind)?)?
        .f_sum(kind)?
        .f_backward()?;
    Ok(())
}

/// Checks every kernel and fused autograd op on `device` against a libtorch reference
/// written here, computed on the CPU in f64, on fresh random inputs with dropped slots, and
/// the plan kernels for integer equality with a libtorch stable sort. Returns one line per
/// check; an error if any is off (tolerance 1e-5 for f32, 8e-3 for bf16).
pub fn self_check(device: Device) -> Result<Vec<String>> {
    let mut c = Checks::default();
    let kinds: &[Kind] = if device.is_cuda() {
        &[Kind::Float, Kind::BFloat16]
    } else {
        &[Kind::Float]
    };
    for &kind in kinds {
        check_dispatch_and_combine(&mut c, device, kind)?;
        check_swiglu(&mut c, device, kind)?;
        check_bias_act(&mut c, device, kind)?;
    }
    check_plans(&mut c, device)?;
    for &kind in kinds {
        check_lm_loss(&mut c, device, kind)?;
    }
    for &kind in kinds {
        check_add_norm(&mut c, device, kind)?;
        check_column_sums(&mut c, device, kind)?;
        check_fused_linear(&mut c, device, kind)?;
    }
    if c.failed > 0 {
        bail!(
            "{} kernel check(s) failed:\n{}",
            c.failed,
            c.lines.join("\n")
        );
    }
    Ok(c.lines)
}

/// The tolerance of a kernel against the f64 reference in `kind`.
fn tol_of(kind: Kind) -> f64 {
    if kind == Kind::BFloat16 {
        8e-3
    } else {
        1e-5
    }
}

/// Normal random values of `shape` on the CPU in `kind`.
fn randn(shape: &[i64], kind: Kind) -> Result<Tensor> {
    Ok(Tensor::f_randn(shape, (Kind::Double, Device::Cpu))?.f_to_kind(kind)?)
}

/// `t` in f64 as a leaf requiring grad (the reference's input).
fn leaf64(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_to_kind(Kind::Double)?.f_set_requires_grad(true)?)
}

/// The gather and the weighted sum of rows (raw kernels, then the dispatch and combine
/// autograd ops) on tokens with dropped slots, against libtorch in f64.
fn check_dispatch_and_combine(c: &mut Checks, device: Device, kind: Kind) -> Result<()> {
    let cpu = Device::Cpu;
    let tol = tol_of(kind);
    for &(t, k, e, d) in &[
        (37i64, 3i64, 5i64, 64i64),
        (1000, 8, 128, 2048),
        (513, 2, 8, 1032),
    ] {
        let label = |name: &str| format!("{name:<26} {kind:?} T={t} k={k} E={e} d={d}");
        let mut expert = Tensor::f_randint(e, [t, k], (Kind::Int64, cpu))?;
        let drop = Tensor::f_rand([t, k], (Kind::Float, cpu))?.f_lt(0.2)?;
        expert = expert.f_masked_fill(&drop, -1)?;
        let (x, ys, g, gxs) = (
            randn(&[t, d], kind)?,
            randn(&[t * k, d], kind)?,
            randn(&[t, d], kind)?,
            randn(&[t * k, d], kind)?,
        );
        let w = Tensor::f_rand([t, k], (Kind::Float, cpu))?;
        // reference: libtorch on the CPU in f64
        let plan_ref = reference_order(&expert.f_reshape([-1])?, k, e)?;
        let x64 = leaf64(&x)?;
        let xs_ref = reference_dispatch(&x64, &plan_ref)?;
        seed_backward(&xs_ref, &gxs, Kind::Double)?;
        let (ys64, w64) = (leaf64(&ys)?, leaf64(&w)?);
        let out_ref = reference_combine(&ys64, &plan_ref, &w64, t)?;
        seed_backward(&out_ref, &g, Kind::Double)?;
        let (gys_ref, gw_ref, gx_ref) = (ys64.grad(), w64.grad(), x64.grad());

        // device: raw kernels, then the autograd ops
        let dev = |t: &Tensor| t.f_to_device(device);
        let plan = device_order(&dev(&expert)?.f_reshape([-1])?, k, e)?;
        let (xd, ysd, wd, gd) = (dev(&x)?, dev(&ys)?, dev(&w)?, dev(&g)?);
        // poison the dropped rows of ys with NaN: no kernel may read them
        let dropped_rows = plan.row_slot.f_lt(0)?.f_unsqueeze(1)?;
        let ysd = ysd.f_masked_fill(&dropped_rows, f64::NAN)?;
        poison(t * k * d, kind, device)?;
        let got = gather_rows(&xd, &plan.row_slot, k, None)?;
        c.close(label("gather_rows"), &got, &xs_ref, tol)?;
        poison(t * d, kind, device)?;
        let got = sum_rows(&ysd, &plan.slot_row, k, Some(&wd))?;
        c.close(label("sum_rows (weighted)"), &got, &out_ref, tol)?;
        poison(t * k, Kind::Float, device)?;
        let got = row_dots(&ysd, &plan.slot_row, k, &gd)?.f_reshape([t, k])?;
        c.close(label("row_dots"), &got, &gw_ref, tol)?;
        let xg = xd.f_detach()?.f_set_requires_grad(true)?;
        let xs = dispatch_op(&xg, &plan.row_slot, &plan.slot_row, k)?;
        seed_backward(&xs, &gxs, Kind::Float)?;
        c.close(label("dispatch_op forward"), &xs, &xs_ref, tol)?;
        c.close(label("dispatch_op grad x"), &xg.grad(), &gx_ref, tol)?;
        let ysg = ysd.f_detach()?.f_set_requires_grad(true)?;
        let wg = wd.f_detach()?.f_set_requires_grad(true)?;
        let out = combine_op(&ysg, &wg, &plan.slot_row, &plan.row_slot)?;
        seed_backward(&out, &g, Kind::Float)?;
        c.close(label("combine_op forward"), &out, &out_ref, tol)?;
        c.close(label("combine_op grad ys"), &ysg.grad(), &gys_ref, tol)?;
        c.close(label("combine_op grad weight"), &wg.grad(), &gw_ref, tol)?;
    }
    Ok(())
}

/// SwiGLU's autograd op against libtorch's `silu(a) · b` in f64.
fn check_swiglu(c: &mut Checks, device: Device, kind: Kind) -> Result<()> {
    let tol = tol_of(kind);
    for &(rows, h) in &[(37i64, 64i64), (4099, 768)] {
        let label = |name: &str| format!("{name:<26} {kind:?} rows={rows} h={h}");
        let a = randn(&[rows, h], kind)?
            .f_mul_scalar(3.0)?
            .f_to_kind(kind)?;
        let (b, g) = (randn(&[rows, h], kind)?, randn(&[rows, h], kind)?);
        let (a64, b64) = (leaf64(&a)?, leaf64(&b)?);
        let want = a64.f_silu()?.f_mul(&b64)?;
        seed_backward(&want, &g, Kind::Double)?;
        let ag = a.f_to_device(device)?.f_set_requires_grad(true)?;
        let bg = b.f_to_device(device)?.f_set_requires_grad(true)?;
        poison(rows * h, kind, device)?;
        let got = swiglu_op(&ag, &bg)?;
        seed_backward(&got, &g, Kind::Float)?;
        c.close(label("swiglu_op forward"), &got, &want, tol)?;
        c.close(label("swiglu_op grad h1"), &ag.grad(), &a64.grad(), tol)?;
        c.close(label("swiglu_op grad h3"), &bg.grad(), &b64.grad(), tol)?;
    }
    Ok(())
}

/// The bias-and-activation epilogue's autograd op on rows in expert order, the last fifth
/// dropped, against libtorch in f64.
fn check_bias_act(c: &mut Checks, device: Device, kind: Kind) -> Result<()> {
    let cpu = Device::Cpu;
    let tol = tol_of(kind);
    for &(rows, e, d) in &[(37i64, 5i64, 64i64), (4099, 16, 768), (3001, 128, 1032)] {
        for act in [EpilogueAct::None, EpilogueAct::Gelu, EpilogueAct::Relu] {
            let label =
                |name: &str| format!("{name:<26} {kind:?} act={act:?} rows={rows} E={e} d={d}");
            // rows in expert order, the last fifth dropped (expert E)
            let kept = rows * 4 / 5;
            let (sorted, _) = Tensor::f_randint(e, [kept], (Kind::Int64, cpu))?.f_sort(0, false)?;
            let dropped = Tensor::f_full([rows - kept], e, (Kind::Int64, cpu))?;
            let row_expert = Tensor::f_cat(&[sorted, dropped], 0)?;
            let h = randn(&[rows, d], kind)?
                .f_mul_scalar(2.0)?
                .f_to_kind(kind)?;
            let (b, g) = (randn(&[e, d], kind)?, randn(&[rows, d], kind)?);
            let (h64, b64) = (leaf64(&h)?, leaf64(&b)?);
            let (valid, idx) = kept_rows(&row_expert, e)?;
            let y = act_ref(&h64.f_add(&b64.f_index_select(0, &idx)?)?, act)?;
            let want = y.f_where_self(&valid, &y.f_zeros_like()?)?;
            seed_backward(&want, &g, Kind::Double)?;
            // the dropped rows of h are NaN on the device: the kernels may not read them
            let hd = h
                .f_to_device(device)?
                .f_masked_fill(&valid.f_logical_not()?.f_to_device(device)?, f64::NAN)?
                .f_set_requires_grad(true)?;
            let bd = b.f_to_device(device)?.f_set_requires_grad(true)?;
            poison(rows * d, kind, device)?;
            let got = bias_act_op(&hd, &bd, &row_expert.f_to_device(device)?, act)?;
            seed_backward(&got, &g, Kind::Float)?;
            c.close(label("bias_act_op forward"), &got, &want, tol)?;
            c.close(label("bias_act_op grad h"), &hd.grad(), &h64.grad(), tol)?;
            c.close(label("bias_act_op grad bias"), &bd.grad(), &b64.grad(), tol)?;
        }
    }
    Ok(())
}

/// The plan kernels against the libtorch sort on the CPU: the same integers.
fn check_plans(c: &mut Checks, device: Device) -> Result<()> {
    let cpu = Device::Cpu;
    for &(t, k, e) in &[
        (37i64, 3i64, 5i64),
        (1000, 8, 128),
        (5000, 2, 16),
        (9001, 2, 256),
    ] {
        let label = |name: &str| format!("plan {name:<21} T={t} k={k} E={e}");
        let mut expert = Tensor::f_randint(e, [t, k], (Kind::Int64, cpu))?;
        let drop = Tensor::f_rand([t, k], (Kind::Float, cpu))?.f_lt(0.2)?;
        expert = expert.f_masked_fill(&drop, -1)?;
        let flat = expert.f_reshape([-1])?;
        let want = reference_order(&flat, k, e)?;
        let got = device_order(&flat.f_to_device(device)?, k, e)?;
        for (name, g, w) in [
            ("order", &got.order, &want.order),
            ("token", &got.token, &want.token),
            ("expert", &got.sorted_key, &want.sorted_key),
            ("row_slot", &got.row_slot, &want.row_slot),
            ("slot_row", &got.slot_row, &want.slot_row),
            ("counts", &got.counts, &want.counts),
            ("offsets", &got.offsets, &want.offsets),
        ] {
            c.equal(label(name), g, w)?;
        }
        // capacity queues: each slot's place among the slots of its expert, slot-major
        let slot_major = expert.f_transpose(0, 1)?.f_reshape([-1])?;
        let dev_major = slot_major.f_to_device(device)?;
        let got = if plan_kernels_apply(&dev_major, e) {
            key_positions(&dev_major, e)?
        } else {
            reference_positions(&dev_major, e)?
        };
        c.equal(
            label("capacity"),
            &got,
            &reference_positions(&slot_major, e)?,
        )?;
    }
    Ok(())
}

/// The LM loss: per-row cross-entropy and its gradient, one row's target ignored.
fn check_lm_loss(c: &mut Checks, device: Device, kind: Kind) -> Result<()> {
    let cpu = Device::Cpu;
    let tol = tol_of(kind);
    for &(rows, v) in &[(37i64, 264i64), (300, 50304)] {
        let label = |name: &str| format!("{name:<26} {kind:?} rows={rows} V={v}");
        let logits = randn(&[rows, v], kind)?
            .f_mul_scalar(4.0)?
            .f_to_kind(kind)?;
        let target = Tensor::f_randint(v, [rows], (Kind::Int64, cpu))?;
        let _ = target.f_get(0)?.f_fill_(-100)?;
        let g = Tensor::f_rand([rows], (Kind::Float, cpu))?;
        let l64 = leaf64(&logits)?;
        let keep = target.f_ge(0)?;
        let picked = l64
            .f_log_softmax(1, Kind::Double)?
            .f_gather(1, &target.f_clamp_min(0)?.f_unsqueeze(1)?, false)?
            .f_squeeze_dim(1)?
            .f_neg()?;
        let want = picked.f_where_self(&keep, &picked.f_zeros_like()?)?;
        seed_backward(&want, &g, Kind::Double)?;
        let ld = logits.f_to_device(device)?.f_set_requires_grad(true)?;
        let got = cross_entropy_rows(&ld, &target.f_to_device(device)?)?;
        let Some(got) = got else {
            c.record(
                label("cross_entropy_rows"),
                !device.is_cuda(),
                "not applied".into(),
            );
            continue;
        };
        seed_backward(&got, &g, Kind::Float)?;
        c.close(label("cross_entropy_rows forward"), &got, &want, 1e-5)?;
        c.close(
            label("cross_entropy_rows grad"),
            &ld.grad(),
            &l64.grad(),
            tol,
        )?;
    }
    Ok(())
}

/// The fused residual add and norm ([`add_norm_op`]), LayerNorm and RMSNorm, with and
/// without the residual branch, against libtorch's add and `layer_norm`/`rms_norm` with
/// autograd in f64 on the CPU (the sum rounded to `kind` as libtorch's add rounds it, the
/// weights the op's copies in `kind`): `s`, `y` and the gradients of `x`, `h`, the gain and
/// the bias for seeds on both outputs. Each case runs twice: the first backward starts the
/// f32 masters' `.grad`, the second adds into it (twice the reference). Widths 1024, 4096,
/// 1000 (an odd multiple of 8) and 8192 (the widest the kernels take), row counts of no
/// round size; a width past that and a width not a multiple of 8 are declined (libtorch
/// runs). On a CPU the op declines, which is all there is to check.
fn check_add_norm(c: &mut Checks, device: Device, kind: Kind) -> Result<()> {
    let cpu = Device::Cpu;
    if !device.is_cuda() {
        let x = randn(&[3, 64], kind)?;
        let g = Tensor::f_ones([64], (Kind::Float, cpu))?;
        let gamma = NormWeight {
            master: &g,
            copy: &g,
        };
        let declined = add_norm_op(&x, Some(&x), gamma, None, 1e-5)?.is_none();
        c.record(
            format!("{:<26} {kind:?}", "add_norm_op on the CPU"),
            declined,
            "declined".into(),
        );
        return Ok(());
    }
    let tol = tol_of(kind);
    for &(rows, d) in &[
        (37i64, 1024i64),
        (4099, 1024),
        (1031, 4096),
        (517, 1000),
        (67, 8192),
    ] {
        for norm in [NormOp::LayerNorm, NormOp::RmsNorm] {
            for with_h in [true, false] {
                let label = |name: &str| {
                    format!("{name:<26} {kind:?} {norm:?} h={with_h} rows={rows} d={d}")
                };
                check_add_norm_case(c, device, kind, tol, (rows, d), norm, with_h, &label)?;
            }
        }
    }
    for d in [8200i64, 1004] {
        let x = randn(&[5, d], kind)?.f_to_device(device)?;
        let g = Tensor::f_ones([d], (Kind::Float, device))?;
        let copy = g.f_to_kind(kind)?;
        let gamma = NormWeight {
            master: &g,
            copy: &copy,
        };
        let declined = add_norm_op(&x, Some(&x), gamma, None, 1e-5)?.is_none();
        c.record(
            format!("{:<26} {kind:?} d={d}", "add_norm_op declines"),
            declined,
            "declined".into(),
        );
    }
    Ok(())
}

/// One case of [`check_add_norm`].
#[allow(clippy::too_many_arguments)]
fn check_add_norm_case(
    c: &mut Checks,
    device: Device,
    kind: Kind,
    tol: f64,
    (rows, d): (i64, i64),
    norm: NormOp,
    with_h: bool,
    label: &dyn Fn(&str) -> String,
) -> Result<()> {
    let layer = norm == NormOp::LayerNorm;
    // a mean and a spread of their own per row, as a residual stream has
    let x = randn(&[rows, d], kind)?
        .f_mul(&Tensor::f_rand([rows, 1], (Kind::Double, Device::Cpu))?.f_mul_scalar(3.0)?)?
        .f_add(&randn(&[rows, 1], Kind::Double)?)?
        .f_to_kind(kind)?;
    let h = randn(&[rows, d], kind)?;
    let gamma = randn(&[d], Kind::Float)?
        .f_mul_scalar(0.2)?
        .f_add_scalar(1.0)?;
    let beta = randn(&[d], Kind::Float)?.f_mul_scalar(0.1)?;
    let (gs, gy) = (randn(&[rows, d], kind)?, randn(&[rows, d], kind)?);
    // the reference: the weights as the op reads them (its copies in `kind`)
    let (x64, h64) = (leaf64(&x)?, leaf64(&h)?);
    let g64 = leaf64(&gamma.f_to_kind(kind)?)?;
    let b64 = leaf64(&beta.f_to_kind(kind)?)?;
    let s64 = if with_h {
        let sum = x64.f_add(&h64)?;
        // rounded to `kind` as libtorch's add is, the gradient passed straight through
        let rounded = sum.f_to_kind(kind)?.f_to_kind(Kind::Double)?;
        sum.f_add(&rounded.f_sub(&sum)?.f_detach()?)?
    } else {
        x64.shallow_clone()
    };
    let y64 = if layer {
        s64.f_layer_norm([d], Some(&g64), Some(&b64), 1e-5, false)?
    } else {
        s64.f_rms_norm([d], Some(&g64), 1e-5)?
    };
    let seeded = |s: &Tensor, y: &Tensor, k: Kind| -> Result<Tensor> {
        let on = |g: &Tensor| g.f_to_device(s.device())?.f_to_kind(k);
        Ok(s.f_to_kind(k)?
            .f_mul(&on(&gs)?)?
            .f_sum(k)?
            .f_add(&y.f_to_kind(k)?.f_mul(&on(&gy)?)?.f_sum(k)?)?)
    };
    seeded(&s64, &y64, Kind::Double)?.f_backward()?;
    // the op, twice: the masters' `.grad` started, then added into
    let xd = x.f_to_device(device)?.f_set_requires_grad(true)?;
    let hd = h.f_to_device(device)?.f_set_requires_grad(true)?;
    let gm = gamma.f_to_device(device)?.f_set_requires_grad(true)?;
    let bm = beta.f_to_device(device)?.f_set_requires_grad(true)?;
    let (gc, bc) = (
        gm.f_to_kind(kind)?.f_detach()?,
        bm.f_to_kind(kind)?.f_detach()?,
    );
    for pass in 1..=2 {
        poison(rows * d, kind, device)?;
        let weight = |master, copy| NormWeight { master, copy };
        let Some(out) = add_norm_op(
            &xd,
            with_h.then_some(&hd),
            weight(&gm, &gc),
            layer.then(|| weight(&bm, &bc)),
            1e-5,
        )?
        else {
            c.record(label("add_norm_op"), false, "declined".into());
            return Ok(());
        };
        seeded(&out.s, &out.y, Kind::Float)?.f_backward()?;
        let times = |t: &Tensor| t.f_mul_scalar(pass as f64);
        let at = |name: &str| label(&format!("add_norm_op {name} #{pass}"));
        if pass == 1 {
            c.close(at("s"), &out.s, &s64, tol)?;
            c.close(at("y"), &out.y, &y64, tol)?;
        }
        c.close(at("grad x"), &xd.grad(), &times(&x64.grad())?, tol)?;
        if with_h {
            c.close(at("grad h"), &hd.grad(), &times(&h64.grad())?, tol)?;
        }
        c.close(at("grad gain"), &gm.grad(), &times(&g64.grad())?, tol)?;
        if layer {
            c.close(at("grad bias"), &bm.grad(), &times(&b64.grad())?, tol)?;
        }
    }
    Ok(())
}

/// The column sums (a dense linear's bias gradient) against libtorch in f64, written fresh and
/// added into an f32 vector that holds values already (tolerance 1e-5: f32 sums of the same
/// values in both dtypes).
fn check_column_sums(c: &mut Checks, device: Device, kind: Kind) -> Result<()> {
    for &(rows, d) in &[(37i64, 64i64), (1000, 1032), (8192, 1024), (5, 4096)] {
        let label = |name: &str| format!("{name:<26} {kind:?} rows={rows} d={d}");
        let g = randn(&[rows, d], kind)?;
        let before = randn(&[d], Kind::Float)?;
        let want =
            g.f_to_kind(Kind::Double)?
                .f_sum_dim_intlist([0i64].as_slice(), false, Kind::Double)?;
        let gd = g.f_to_device(device)?;
        poison(d, Kind::Float, device)?;
        match column_sums(&gd, None)? {
            Some(got) => c.close(label("column_sums"), &got, &want, 1e-5)?,
            None => c.record(label("column_sums"), false, "no sums".into()),
        }
        let acc = before.f_to_device(device)?.f_detach_copy()?;
        let fresh = column_sums(&gd, Some(&acc))?;
        c.record(
            label("column_sums into in place"),
            fresh.is_none(),
            "added in place".into(),
        );
        let want_acc = want.f_add(&before.f_to_kind(Kind::Double)?)?;
        c.close(label("column_sums into"), &acc, &want_acc, 1e-5)?;
    }
    Ok(())
}

/// The dense linear whose backward accumulates into the f32 masters ([`linear_op`]) against
/// the unfused path it replaces (the cast op on the same copies, libtorch's `addmm` and its
/// backward) on the same device, and against libtorch in f64 on the CPU: the output and the
/// input's gradient of each of two micro-batches, and the masters' gradients after both (the
/// first starts each master's `.grad`, the second accumulates into it in place). Tolerances:
/// the kernels' (8e-3 in bf16, 1e-5 in f32) for everything against the unfused path (which
/// rounds each micro-batch's weight and bias gradients to bf16) and for the output and input
/// gradient against f64; 1e-4 in bf16 for the fused masters' gradients against f64, which
/// are accumulated in f32 from the bf16 operands.
fn check_fused_linear(c: &mut Checks, device: Device, kind: Kind) -> Result<()> {
    let tol = tol_of(kind);
    let master_tol = if kind == Kind::BFloat16 { 1e-4 } else { tol };
    // a leaf of its own on the device (`to_device` alone aliases on the CPU)
    let leaf = |t: &Tensor| -> Result<Tensor> {
        Ok(t.f_to_device(device)?
            .f_detach_copy()?
            .f_set_requires_grad(true)?)
    };
    let copy_of = |m: &Tensor| -> Result<Tensor> { Ok(m.f_detach()?.f_to_kind(kind)?) };
    for &(shape, n) in &[(&[37i64, 64][..], 96i64), (&[2, 256, 512][..], 768)] {
        for with_bias in [false, true] {
            let label =
                |name: &str| format!("{name:<26} {kind:?} x={shape:?} n={n} bias={with_bias}");
            let k = *shape.last().expect("2-D or 3-D");
            let mut out_shape = shape.to_vec();
            *out_shape.last_mut().expect("2-D or 3-D") = n;
            let xs = [randn(shape, kind)?, randn(shape, kind)?];
            let gs = [randn(&out_shape, kind)?, randn(&out_shape, kind)?];
            let (w0, b0) = (randn(&[k, n], Kind::Float)?, randn(&[n], Kind::Float)?);
            // reference: the copies' values in f64 on the CPU
            let (w64, b64) = (leaf64(&w0.f_to_kind(kind)?)?, leaf64(&b0.f_to_kind(kind)?)?);
            // fused and unfused: the same f32 masters on the device and their copies
            let (wf, bf, wu, bu) = (leaf(&w0)?, leaf(&b0)?, leaf(&w0)?, leaf(&b0)?);
            let (wf_copy, bf_copy) = (copy_of(&wf)?, copy_of(&bf)?);
            let (wu_copy, bu_copy) = (copy_of(&wu)?, copy_of(&bu)?);
            let mut grad_at = None;
            for (mb, (x, g)) in xs.iter().zip(&gs).enumerate() {
                let x64 = leaf64(x)?;
                let x2 = x64.f_reshape([-1, k])?;
                let want = if with_bias {
                    b64.f_addmm(&x2, &w64)?
                } else {
                    x2.f_mm(&w64)?
                }
                .f_reshape(out_shape.as_slice())?;
                seed_backward(&want, g, Kind::Double)?;

                let xf = leaf(x)?;
                let bias = with_bias.then_some((&bf, &bf_copy));
                let got = linear_op(&xf, &wf, &wf_copy, bias)?;
                seed_backward(&got, g, Kind::Float)?;

                let xu = leaf(x)?;
                let (wc, xu2) = (cast_op(&wu, &wu_copy)?, xu.f_reshape([-1, k])?);
                let unfused = if with_bias {
                    cast_op(&bu, &bu_copy)?.f_addmm(&xu2, &wc)?
                } else {
                    xu2.f_mm(&wc)?
                }
                .f_reshape(out_shape.as_slice())?;
                seed_backward(&unfused, g, Kind::Float)?;

                let step = |name: &str| label(&format!("{name} mb{mb}"));
                c.close(step("fused linear forward"), &got, &want, tol)?;
                c.close(step("fused linear vs unfused"), &got, &unfused, tol)?;
                c.close(step("fused linear grad x"), &xf.grad(), &x64.grad(), tol)?;
                c.close(
                    step("fused linear grad x unf."),
                    &xf.grad(),
                    &xu.grad(),
                    tol,
                )?;
                let at = wf.grad().data_ptr() as usize;
                if mb == 0 {
                    grad_at = Some(at);
                } else {
                    c.record(
                        label("fused linear grad w in place"),
                        grad_at == Some(at) && wf.grad().kind() == Kind::Float,
                        "the same f32 .grad".into(),
                    );
                }
            }
            c.close(
                label("fused linear grad w"),
                &wf.grad(),
                &w64.grad(),
                master_tol,
            )?;
            c.close(
                label("fused linear grad w unf."),
                &wf.grad(),
                &wu.grad(),
                tol,
            )?;
            if with_bias {
                c.close(
                    label("fused linear grad b"),
                    &bf.grad(),
                    &b64.grad(),
                    master_tol,
                )?;
                c.close(
                    label("fused linear grad b unf."),
                    &bf.grad(),
                    &bu.grad(),
                    tol,
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a CPU the ops take their libtorch branch: this checks the autograd wiring through
    /// the C++ shim (forward, every gradient, dropped slots) against the f64 reference.
    #[test]
    fn fused_ops_match_the_reference_on_cpu() {
        let lines = self_check(Device::Cpu).unwrap();
        assert!(lines.len() >= 70, "{lines:?}");
        assert!(lines.iter().all(|l| l.ends_with(" ok")), "{lines:?}");
    }
}
