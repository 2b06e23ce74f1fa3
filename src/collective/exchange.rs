//! The expert-parallel MoE exchange: counts, tokens to the experts' ranks, local
//! experts, results back; and its explicit backward.
//!
//! Autograd is cut twice: the tokens a rank receives are a fresh leaf (`received`), and
//! the results it gets back are another (`combined`). [`ExchangeTape::backward`] runs
//! the reverse exchange: the gradient of `combined` travels to the experts' ranks,
//! goes through the local experts (accumulating their parameter gradients), and the
//! gradient of `received` travels back; the caller then backpropagates it from the
//! tokens it sent (see [`super::Tape`]).

use super::error::{CollectiveError, ErrorKind};
use super::tape::backward_roots;
use super::{Collective, ExpertPlacement, Result};
use tch::{Kind, Tensor};

/// What one exchange needs to run backward. Keep it until the backward pass; call
/// [`ExchangeTape::backward`] once, on every rank of the expert group, in the reverse
/// order of the forward exchanges.
pub struct ExchangeTape {
    at: String,
    source: Tensor,
    send_counts: Vec<i64>,
    recv_counts: Vec<i64>,
    /// Row `i` of the expert-major buffer is row `to_expert_major[i]` of the
    /// source-major one (`None`: the two orders agree).
    to_expert_major: Option<Tensor>,
    to_source_major: Option<Tensor>,
    received: Tensor,
    expert_out: Tensor,
    combined: Tensor,
    local_counts: Vec<i64>,
}

fn tensor_err(
    group: &dyn Collective,
    op: &'static str,
    at: &str,
) -> impl Fn(tch::TchError) -> CollectiveError {
    let group = group.label().to_string();
    let at = at.to_string();
    move |e| CollectiveError::new(&group, op, &at, ErrorKind::Tensor(e))
}

fn permute(t: &Tensor, index: &Option<Tensor>) -> std::result::Result<Tensor, tch::TchError> {
    match index {
        Some(index) => t.f_index_select(0, index),
        None => Ok(t.shallow_clone()),
    }
}

/// Run one MoE layer's experts across the expert group.
///
/// - `tokens`: this rank's token copies, `[N, ...]`, sorted by slot (see
///   [`ExpertPlacement::slot_of_expert`]); it may be attached to the autograd graph.
/// - `counts[slot]`: how many rows go to each slot (length = global experts, sum = N).
/// - `experts(received, local_counts)`: runs this rank's local experts on `received`
///   (`[R, ...]`, grouped by local expert, `local_counts[j]` rows for local expert `j`,
///   a leaf that requires grad) and returns `[R, ...]` outputs in the same order. It is
///   called on every rank, also with `R = 0`.
///
/// Returns `combined`: `[N, ...]`, the expert outputs for `tokens`' rows in the same
/// order, a leaf that requires grad, and the tape for the backward. Every rank of the
/// group must call this (the same number of times, in the same order), even with no
/// tokens. `at` labels the call site in errors (`"step 7, layer 3"`).
pub fn exchange_experts<F>(
    group: &dyn Collective,
    placement: &ExpertPlacement,
    tokens: &Tensor,
    counts: &[i64],
    at: &str,
    experts: F,
) -> Result<(Tensor, ExchangeTape)>
where
    F: FnOnce(&Tensor, &[i64]) -> std::result::Result<Tensor, tch::TchError>,
{
    const OP: &str = "exchange_experts";
    let invalid =
        |message: String| CollectiveError::new(group.label(), OP, at, ErrorKind::Invalid(message));
    let size = group.size();
    let me = group.rank();
    let rows = tokens.size().first().copied().unwrap_or(0);
    if placement.ranks() != size {
        return Err(invalid(format!(
            "the placement spreads experts over {} ranks but the group has {size}",
            placement.ranks()
        )));
    }
    if counts.len() != placement.experts()
        || counts.iter().any(|&c| c < 0)
        || counts.iter().sum::<i64>() != rows
    {
        return Err(invalid(format!(
            "counts {counts:?} must give, for each of the {} experts, how many of the {rows} token rows go to it",
            placement.experts()
        )));
    }

    let all_counts = group.all_gather_counts(counts, &format!("{at}, dispatch counts"))?;
    if all_counts.iter().any(|c| c.len() != counts.len()) {
        return Err(invalid(
            "the ranks disagree on the number of experts".into(),
        ));
    }
    let send_counts: Vec<i64> = (0..size)
        .map(|q| counts[placement.slots(q)].iter().sum())
        .collect();
    let mine = placement.slots(me);
    let recv_counts: Vec<i64> = all_counts
        .iter()
        .map(|c| c[mine.clone()].iter().sum())
        .collect();
    let local_counts: Vec<i64> = mine
        .clone()
        .map(|slot| all_counts.iter().map(|c| c[slot]).sum())
        .collect();

    // Source-major (rank s, then local expert j) to expert-major (j, then s).
    let mut offsets = vec![vec![0i64; mine.len()]; size];
    let mut next = 0i64;
    for (s, row) in offsets.iter_mut().enumerate() {
        for (j, slot) in mine.clone().enumerate() {
            row[j] = next;
            next += all_counts[s][slot];
        }
    }
    let mut order = Vec::with_capacity(next as usize);
    for (j, slot) in mine.clone().enumerate() {
        for s in 0..size {
            order.extend(offsets[s][j]..offsets[s][j] + all_counts[s][slot]);
        }
    }
    let identity = order.iter().enumerate().all(|(i, &r)| i as i64 == r);
    let device = tokens.device();
    let terr = tensor_err(group, OP, at);
    let (to_expert_major, to_source_major) = if identity {
        (None, None)
    } else {
        let mut inverse = vec![0i64; order.len()];
        for (i, &r) in order.iter().enumerate() {
            inverse[r as usize] = i as i64;
        }
        let forward = Tensor::f_from_slice(&order)
            .and_then(|t| t.f_to_device(device))
            .map_err(&terr)?;
        let backward = Tensor::f_from_slice(&inverse)
            .and_then(|t| t.f_to_device(device))
            .map_err(&terr)?;
        (Some(forward), Some(backward))
    };

    let sent = tokens.f_detach().map_err(&terr)?;
    let arrived = group.all_to_all_v(
        &sent,
        &send_counts,
        &recv_counts,
        &format!("{at}, dispatch"),
    )?;
    let received = permute(&arrived, &to_expert_major)
        .and_then(|t| t.f_detach())
        .and_then(|t| t.f_set_requires_grad(true))
        .map_err(&terr)?;
    let expert_out = experts(&received, &local_counts).map_err(&terr)?;
    let out_rows = expert_out.size().first().copied().unwrap_or(-1);
    if out_rows != next {
        return Err(invalid(format!(
            "the experts returned {out_rows} rows for {next} received"
        )));
    }
    let back = permute(&expert_out.f_detach().map_err(&terr)?, &to_source_major).map_err(&terr)?;
    let returned =
        group.all_to_all_v(&back, &recv_counts, &send_counts, &format!("{at}, combine"))?;
    let combined = returned.f_set_requires_grad(true).map_err(&terr)?;
    let tape = ExchangeTape {
        at: at.to_string(),
        source: tokens.shallow_clone(),
        send_counts,
        recv_counts,
        to_expert_major,
        to_source_major,
        received,
        expert_out,
        combined: combined.shallow_clone(),
        local_counts,
    };
    Ok((combined, tape))
}

impl ExchangeTape {
    /// The tokens given to the forward exchange (attached to their graph).
    pub fn source(&self) -> &Tensor {
        &self.source
    }

    /// Rows this rank received per local expert in the forward.
    pub fn local_counts(&self) -> &[i64] {
        &self.local_counts
    }

    /// Rows this rank sent to / received from each rank of the group in the forward.
    pub fn send_counts(&self) -> &[i64] {
        &self.send_counts
    }

    pub fn recv_counts(&self) -> &[i64] {
        &self.recv_counts
    }

    /// The reverse exchange. Reads the gradient accumulated on `combined` (zeros if
    /// none reached it), sends it to the experts' ranks, backpropagates it through the
    /// local experts (their parameters' `.grad` accumulate), and returns the gradient of
    /// [`ExchangeTape::source`], `[N, ...]`. The caller backpropagates it from `source`
    /// (with the other roots of the same segment: [`super::Tape`] does this).
    /// Call once per forward exchange, on every rank of the group.
    pub fn backward(&self, group: &dyn Collective, at: &str) -> Result<Tensor> {
        const OP: &str = "exchange_experts backward";
        let label = format!("{at}, {}", self.at);
        let terr = tensor_err(group, OP, &label);
        let grad_combined = defined_or_zeros(&self.combined).map_err(&terr)?;
        let grad_back = group.all_to_all_v(
            &grad_combined,
            &self.send_counts,
            &self.recv_counts,
            &format!("{label}, combine backward"),
        )?;
        let grad_expert_out = permute(&grad_back, &self.to_expert_major).map_err(&terr)?;
        if self.expert_out.requires_grad() {
            backward_roots(&[(&self.expert_out, &grad_expert_out)]).map_err(&terr)?;
        }
        let grad_received = defined_or_zeros(&self.received).map_err(&terr)?;
        let grad_sent = permute(&grad_received, &self.to_source_major).map_err(&terr)?;
        group.all_to_all_v(
            &grad_sent,
            &self.recv_counts,
            &self.send_counts,
            &format!("{label}, dispatch backward"),
        )
    }
}

/// `t.grad()`, or zeros shaped like `t` when no gradient reached it.
pub(crate) fn defined_or_zeros(t: &Tensor) -> std::result::Result<Tensor, tch::TchError> {
    let grad = t.grad();
    if grad.defined() {
        Ok(grad)
    } else {
        let kind = t.f_kind().unwrap_or(Kind::Float);
        Tensor::f_zeros(t.size(), (kind, t.device()))
    }
}
