//! Gradient reduction by parameter kind and the global gradient-norm clipping with
//! experts spread over ranks (DESIGN.md, "Semantics that must match").
//!
//! Convention: every rank's loss is the mean over its own (equally sized) share of the
//! global batch. Then averaging matches the single-rank run of the global batch:
//! - replicated parameters: summed over the data group, divided by its size D;
//! - expert parameters: each rank's expert gradients already hold the contributions of
//!   every rank of its expert group (the exchange brought their tokens); summing over
//!   the expert-data group adds the other expert groups', and dividing by the data
//!   group's size D averages over all shares of the batch;
//! - gate parameters: summed over the gate group and divided by its size (ranks of the
//!   gate group outside the data group hold identical gradients, e.g. tensor ranks).
//!
//! With tensor parallelism a second dimension, [`TensorSplit`], says how a parameter is
//! split over the tensor group: [`sum_partial_gradients`] completes the `Partial` ones and
//! [`clip_global_norm_tensor_parallel`] sums the squares of `Sharded` ones over the tensor
//! group. With pipeline parallelism [`clip_global_norm_pipeline`] sums each stage's squares
//! over the pipeline group (a parameter two stages hold, the tied embedding, counted once),
//! and [`sum_tied_gradients`] sums the tied embedding's gradient between its two stages.
//!
//! FasterMoE's shadowed experts ([`super::ExchangeOptions::shadowing`]) ran on copies on
//! every rank of the expert group; [`reduce_shadow_gradients`] sums the copies' gradients
//! into the owner's expert gradient during the exchange's backward, so that by
//! [`reduce_gradients`] every expert gradient is whole on its owner, as without shadows.

use super::error::{tensor_failure, CollectiveError, ErrorKind};
use super::{Collective, Groups, Result};
use tch::{Kind, Tensor};

/// How a parameter's gradient is shared between ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ParamKind {
    /// The same on every rank of the data group (embeddings, attention, norms, dense MLPs).
    Replicated,
    /// A rank's own experts (stacked `[E_local, ...]` tensors).
    Expert,
    /// Gate weights (FastMoE all-reduces them over the gate group).
    Gate,
}

const KINDS: [ParamKind; 3] = [ParamKind::Replicated, ParamKind::Expert, ParamKind::Gate];

/// `p.grad()`, first defining it as zeros when no gradient reached `p` (an expert that
/// received no tokens): its rank must still take part in the reduction.
fn grad_of(p: &Tensor) -> std::result::Result<Tensor, tch::TchError> {
    if !p.grad().defined() {
        p.f_sum(None)?.f_mul_scalar(0.0)?.f_backward()?;
    }
    Ok(p.grad())
}

/// Reduce the gradients (`.grad`) of `params` in place, by kind (see the module docs):
/// one flat all-reduce per kind, in the order replicated, expert, gate. Every rank
/// enters all three, also with no parameters of a kind. Parameters that do not require
/// grad are skipped. The ranks of a group must list the same parameters with the same
/// shapes and dtype per kind.
pub fn reduce_gradients(groups: &Groups, params: &[(ParamKind, &Tensor)], at: &str) -> Result<()> {
    let data_size = groups.data().size() as f64;
    // An empty bucket still goes through the group, on the parameters' device (NCCL takes
    // only tensors on its GPU).
    let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
    for kind in KINDS {
        let (group, divisor) = match kind {
            ParamKind::Replicated => (groups.data(), data_size),
            ParamKind::Expert => (groups.expert_data(), data_size),
            ParamKind::Gate => (groups.gate(), groups.gate().size() as f64),
        };
        let op = "reduce_gradients";
        let grads: Vec<Tensor> = params
            .iter()
            .filter(|(k, p)| *k == kind && p.requires_grad())
            .map(|(_, p)| grad_of(p))
            .collect::<std::result::Result<_, _>>()
            .map_err(tensor_failure(group.label(), op, at))?;
        all_reduce_bucket(
            group,
            (op, at),
            grads,
            device,
            Some(divisor),
            &format!("{} gradients", kind_name(kind)),
            &format!("{kind:?} parameters mix dtypes; reduce each dtype separately"),
        )?;
    }
    Ok(())
}

/// Sums `grads` over `group` in place as one flat bucket (then divides by `divisor`, if
/// any): every rank enters the all-reduce, also with no gradients (an empty bucket on
/// `device`, since NCCL takes only tensors on its GPU). `what` names the gradients in the
/// collective's label; `mixed` is the error when their dtypes differ.
fn all_reduce_bucket(
    group: &dyn Collective,
    (op, at): (&'static str, &str),
    grads: Vec<Tensor>,
    device: tch::Device,
    divisor: Option<f64>,
    what: &str,
    mixed: &str,
) -> Result<()> {
    let terr = tensor_failure(group.label(), op, at);
    let kind = grads.first().map(|g| g.kind()).unwrap_or(Kind::Float);
    if grads.iter().any(|g| g.kind() != kind) {
        return Err(CollectiveError::new(
            group.label(),
            op,
            at,
            ErrorKind::Invalid(mixed.to_string()),
        ));
    }
    let flats: Vec<Tensor> = grads
        .iter()
        .map(|g| g.f_reshape([-1]))
        .collect::<std::result::Result<_, _>>()
        .map_err(&terr)?;
    let mut bucket = if flats.is_empty() {
        Tensor::f_zeros([0], (Kind::Float, device)).map_err(&terr)?
    } else {
        Tensor::f_cat(&flats, 0).map_err(&terr)?
    };
    group.all_reduce_sum(&mut bucket, &format!("{at}, {what}"))?;
    if let Some(divisor) = divisor {
        let _ = bucket.f_div_scalar_(divisor).map_err(&terr)?;
    }
    let sizes: Vec<i64> = flats.iter().map(|f| f.numel() as i64).collect();
    let pieces = bucket.f_split_with_sizes(&sizes, 0).map_err(&terr)?;
    for (mut grad, piece) in grads.into_iter().zip(pieces) {
        let shape = grad.size();
        tch::no_grad(|| grad.f_copy_(&piece.f_reshape(&shape)?)).map_err(&terr)?;
    }
    Ok(())
}

fn kind_name(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Replicated => "replicated",
        ParamKind::Expert => "expert",
        ParamKind::Gate => "gate",
    }
}

/// Sums the gradients of replicated ("shadowed") experts over the expert `group` into each
/// owner's expert gradient: row `i` of `grads` (`[S, P]`, expert `i`'s parameters
/// flattened in the order of `stacked`) goes to position `owners[i].0`, which adds it into
/// the `.grad` of its stacked parameters (`stacked`, each `[E_local, ...]`) at local index
/// `owners[i].1`. One reduction per expert, in order; every rank of the group calls it with
/// the same owners.
pub fn reduce_shadow_gradients(
    group: &dyn Collective,
    stacked: &[Tensor],
    owners: &[(usize, usize)],
    grads: &Tensor,
    at: &str,
) -> Result<()> {
    const OP: &str = "reduce_shadow_gradients";
    let terr = tensor_failure(group.label(), OP, at);
    let me = group.rank();
    let widths: Vec<i64> = stacked
        .iter()
        .map(|t| t.size()[1..].iter().product())
        .collect();
    for (i, &(owner, local)) in owners.iter().enumerate() {
        // a copy of the row: the reduction works in place
        let mut row = grads
            .f_select(0, i as i64)
            .and_then(|r| r.f_detach_copy())
            .map_err(&terr)?;
        group.reduce_sum(
            &mut row,
            owner,
            &format!("{at}, shadowed expert {i} gradient"),
        )?;
        if owner != me {
            continue;
        }
        let pieces = row.f_split_with_sizes(&widths, 0).map_err(&terr)?;
        for (p, piece) in stacked.iter().zip(pieces) {
            if !p.requires_grad() {
                continue;
            }
            let mut slot = grad_of(p)
                .and_then(|g| g.f_select(0, local as i64))
                .map_err(&terr)?;
            let shape = slot.size();
            let _ = tch::no_grad(|| slot.f_add_(&piece.f_reshape(&shape)?.f_to_kind(slot.kind())?))
                .map_err(&terr)?;
        }
    }
    Ok(())
}

/// The global gradient norm and what clipping did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradientNorm {
    /// 2-norm over all distinct parameters of the whole model, before clipping.
    pub total: f64,
    /// The factor the gradients were multiplied by (1 when not clipped).
    pub scale: f64,
}

/// The global 2-norm of the (already reduced) gradients, and clipping to `max_norm`.
///
/// Replicated and gate gradients are identical on every rank after
/// [`reduce_gradients`], so each rank counts them once, locally. Expert gradients differ
/// per rank: their squared norms are summed over the expert group, which holds every
/// expert exactly once, so the norm does not depend on which rank holds which expert.
/// Every rank enters the expert group's all-reduce, also with no experts. Clipping
/// follows `torch.nn.utils.clip_grad_norm_`: scale by `max_norm / (total + 1e-6)` when
/// that is below 1.
pub fn clip_global_norm(
    groups: &Groups,
    params: &[(ParamKind, &Tensor)],
    max_norm: Option<f64>,
    at: &str,
) -> Result<GradientNorm> {
    let group = groups.expert();
    let terr = tensor_failure(group.label(), "clip_global_norm", at);
    let mut shared = 0.0f64;
    let mut expert = 0.0f64;
    let mut grads = Vec::new();
    for (kind, p) in params {
        let Some((grad, square)) = grad_and_square(p).map_err(&terr)? else {
            continue;
        };
        match kind {
            ParamKind::Expert => expert += square,
            ParamKind::Replicated | ParamKind::Gate => shared += square,
        }
        grads.push(grad);
    }
    // On the parameters' device: an NCCL communicator only takes tensors on its GPU.
    let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
    let mut expert_total = Tensor::f_from_slice(&[expert])
        .and_then(|t| t.f_to_device(device))
        .map_err(&terr)?;
    group.all_reduce_sum(&mut expert_total, &format!("{at}, expert gradient norm"))?;
    let expert_total = expert_total.f_double_value(&[0]).map_err(&terr)?;
    let total = (shared + expert_total).sqrt();
    clip_to(total, max_norm, grads, &terr)
}

/// How a parameter is split over the ranks of a tensor(-parallel) group. A second
/// dimension beside [`ParamKind`] (which says how the data, expert-data and gate groups
/// share it); with tensor = 1 every parameter is [`TensorSplit::Whole`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TensorSplit {
    /// The same tensor and the same full gradient on every tensor rank: norms, embeddings
    /// and head (replicated in the runtime), biases of row-parallel layers (added after the
    /// all-reduce), gates, whole (unsliced) experts.
    Whole,
    /// Each tensor rank holds a different slice with its complete gradient:
    /// column-parallel `qkv`, `w1`, `w3` (and their biases), row-parallel `proj`, `w2`,
    /// sliced experts' `w1`, `w3`, `b1`, `w2`.
    Sharded,
    /// The same tensor on every tensor rank, but each rank's gradient is only its share of
    /// the whole, so the shares are summed over the tensor group
    /// ([`sum_partial_gradients`]): a sliced expert's output bias `b2`, which only tensor
    /// rank 0 adds (inside the expert, before the tokens go back, so before the reduce).
    Partial,
}

/// Sums the gradients of the [`TensorSplit::Partial`] parameters over the tensor group, in
/// place (one flat all-reduce; every rank enters it, also with none). Run it after the
/// backward and before [`reduce_gradients`]; afterwards those parameters are
/// [`TensorSplit::Whole`].
pub fn sum_partial_gradients(
    tensor: &dyn Collective,
    params: &[(TensorSplit, &Tensor)],
    at: &str,
) -> Result<()> {
    let op = "sum_partial_gradients";
    let grads: Vec<Tensor> = params
        .iter()
        .filter(|(s, p)| *s == TensorSplit::Partial && p.requires_grad())
        .map(|(_, p)| grad_of(p))
        .collect::<std::result::Result<_, _>>()
        .map_err(tensor_failure(tensor.label(), op, at))?;
    let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
    all_reduce_bucket(
        tensor,
        (op, at),
        grads,
        device,
        None,
        "partial gradients",
        "partial parameters mix dtypes",
    )
}

/// [`clip_global_norm`] with tensor parallelism: the norm over all distinct parameters of
/// the whole model, as Megatron-LM counts it (tensor-parallel slices once each,
/// duplicates once) plus FastMoE's expert fix. Squared norms: [`TensorSplit::Whole`]
/// (and `Partial`, after [`sum_partial_gradients`]) replicated and gate parameters
/// locally; `Sharded` replicated ones summed over `tensor`; whole experts summed over the
/// expert group; sliced experts summed over `tensor`, then over the expert group. Every
/// rank enters the tensor group's all-reduce, then the expert group's. With a tensor
/// group of one rank this equals [`clip_global_norm`].
pub fn clip_global_norm_tensor_parallel(
    groups: &Groups,
    tensor: &dyn Collective,
    params: &[(ParamKind, TensorSplit, &Tensor)],
    max_norm: Option<f64>,
    at: &str,
) -> Result<GradientNorm> {
    let counted = vec![true; params.len()];
    let (squares, grads) = stage_squares(groups, tensor, params, &counted, at)?;
    clip_to(
        squares.sqrt(),
        max_norm,
        grads,
        &tensor_failure(tensor.label(), "clip_global_norm", at),
    )
}

/// [`clip_global_norm_tensor_parallel`] over pipeline stages: each stage's squares, counted
/// as that function counts them, summed over the pipeline group, so the norm is over every
/// parameter of the model once. `counted[i] == false` marks parameter `i` as a copy another
/// stage counts (the last stage's copy of a tied embedding: clipped, not counted). Every rank
/// enters its tensor, expert and pipeline groups' all-reduces, in that order.
pub fn clip_global_norm_pipeline(
    groups: &Groups,
    tensor: &dyn Collective,
    params: &[(ParamKind, TensorSplit, &Tensor)],
    counted: &[bool],
    max_norm: Option<f64>,
    at: &str,
) -> Result<GradientNorm> {
    let (squares, grads) = stage_squares(groups, tensor, params, counted, at)?;
    let pipeline = groups.pipeline();
    let perr = tensor_failure(pipeline.label(), "clip_global_norm", at);
    let device = params
        .first()
        .map_or(tch::Device::Cpu, |(_, _, p)| p.device());
    let mut total = Tensor::f_from_slice(&[squares])
        .and_then(|t| t.f_to_device(device))
        .map_err(&perr)?;
    pipeline.all_reduce_sum(&mut total, &format!("{at}, gradient norm over the stages"))?;
    let total = total.f_double_value(&[0]).map_err(&perr)?;
    clip_to(total.sqrt(), max_norm, grads, &perr)
}

/// Sums the gradients of `params` over `group` in place (one flat all-reduce): the tied
/// token embedding's between the first and the last pipeline stage (Megatron-LM's embedding
/// group), which then hold its whole gradient and stay equal after the optimizer's step.
/// Every rank of the group enters, in the same order.
pub fn sum_tied_gradients(group: &dyn Collective, params: &[&Tensor], at: &str) -> Result<()> {
    let op = "sum_tied_gradients";
    let grads: Vec<Tensor> = params
        .iter()
        .filter(|p| p.requires_grad())
        .map(|p| grad_of(p))
        .collect::<std::result::Result<_, _>>()
        .map_err(tensor_failure(group.label(), op, at))?;
    let device = params.first().map_or(tch::Device::Cpu, |p| p.device());
    all_reduce_bucket(
        group,
        (op, at),
        grads,
        device,
        None,
        "tied embedding gradients",
        "tied parameters mix dtypes",
    )
}

/// The squared norm of one stage's gradients (see [`clip_global_norm_tensor_parallel`]),
/// the same on every rank of the stage, and the gradients to clip (all of them, counted or
/// not).
fn stage_squares(
    groups: &Groups,
    tensor: &dyn Collective,
    params: &[(ParamKind, TensorSplit, &Tensor)],
    counted: &[bool],
    at: &str,
) -> Result<(f64, Vec<Tensor>)> {
    let terr = tensor_failure(tensor.label(), "clip_global_norm", at);
    // [shared whole, shared sharded, expert whole, expert sharded]
    let mut squares = [0.0f64; 4];
    let mut grads = Vec::new();
    for (i, (kind, split, p)) in params.iter().enumerate() {
        let Some((grad, square)) = grad_and_square(p).map_err(&terr)? else {
            continue;
        };
        grads.push(grad);
        if !counted.get(i).copied().unwrap_or(true) {
            continue;
        }
        let expert = *kind == ParamKind::Expert;
        let sharded = *split == TensorSplit::Sharded;
        squares[2 * usize::from(expert) + usize::from(sharded)] += square;
    }
    let device = params
        .first()
        .map_or(tch::Device::Cpu, |(_, _, p)| p.device());
    let mut sliced = Tensor::f_from_slice(&[squares[1], squares[3]])
        .and_then(|t| t.f_to_device(device))
        .map_err(&terr)?;
    tensor.all_reduce_sum(&mut sliced, &format!("{at}, tensor-sharded gradient norm"))?;
    let sliced = Vec::<f64>::try_from(sliced.f_to_device(tch::Device::Cpu).map_err(&terr)?)
        .map_err(&terr)?;
    let eerr = tensor_failure(groups.expert().label(), "clip_global_norm", at);
    let mut expert = Tensor::f_from_slice(&[squares[2] + sliced[1]])
        .and_then(|t| t.f_to_device(device))
        .map_err(&eerr)?;
    groups
        .expert()
        .all_reduce_sum(&mut expert, &format!("{at}, expert gradient norm"))?;
    let expert = expert.f_double_value(&[0]).map_err(&eerr)?;
    Ok((squares[0] + sliced[0] + expert, grads))
}

/// `p`'s gradient and its squared L2 norm (summed in f64), if `p` has one.
fn grad_and_square(p: &Tensor) -> Result<Option<(Tensor, f64)>, tch::TchError> {
    if !p.requires_grad() {
        return Ok(None);
    }
    let grad = p.grad();
    if !grad.defined() {
        return Ok(None);
    }
    let square = grad
        .f_to_kind(Kind::Double)?
        .f_square()?
        .f_sum(Kind::Double)?
        .f_double_value(&[])?;
    Ok(Some((grad, square)))
}

/// Scales `grads` in place as `clip_grad_norm_` does (by `max / (total + 1e-6)` when that is
/// below 1) and returns the norm and the factor applied.
fn clip_to(
    total: f64,
    max_norm: Option<f64>,
    grads: Vec<Tensor>,
    terr: &impl Fn(tch::TchError) -> CollectiveError,
) -> Result<GradientNorm> {
    let mut scale = 1.0;
    if let Some(max_norm) = max_norm {
        let coefficient = max_norm / (total + 1e-6);
        if coefficient < 1.0 {
            scale = coefficient;
            for mut grad in grads {
                let _ = tch::no_grad(|| grad.f_mul_scalar_(coefficient)).map_err(terr)?;
            }
        }
    }
    Ok(GradientNorm { total, scale })
}
