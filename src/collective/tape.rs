//! Backward in segments: autograd cuts ([`Cut`]), a multi-root backward
//! ([`backward_roots`]) and the [`Tape`] that replays them in reverse, entering the
//! exchanges' collectives in the same order on every rank.
//!
//! tch has no custom autograd functions, so a distributed MoE layer cuts the graph
//! wherever data crosses ranks. The graph between cuts (a *segment*) must be traversed
//! once: all roots that reach into the same region go into one backward call. A MoE
//! layer's recipe:
//!
//! ```text
//! tape.step();                         // segment: layer input → gate, sort, exchange
//! let h = tape.cut(&h)?;               //   residual stream enters here
//! let (weights, order, counts) = gate_and_sort(&h);
//! tape.step();
//! let w = tape.cut(&weights)?;         //   combine weights leave the region as a leaf
//! let (y, ex) = exchange_experts(expert_group, &placement, &h.index_select(0, &order), &counts, "layer 3", experts)?;
//! tape.record(ex);                     //   tokens leave the region through the exchange
//! let out = h + combine(&y, &w, &order);
//! ...
//! tape.backward(&loss, expert_group, "step 12 backward")?;
//! ```
//!
//! `tape.backward` first backpropagates the loss (stopping at every leaf), then runs the
//! steps last to first: each exchange's reverse all-to-all, then one backward call over
//! the step's roots (`source`, gradient of its leaf or the exchange's returned
//! gradient). The weights cut and the exchange share a step because both come from the
//! gate/sort region; the layer input's cut is its own, earlier step because its leaf's
//! gradient is complete only after that region was traversed.
//!
//! Tensor parallelism adds Megatron's two region operators: a copy-to-region cut
//! ([`Tape::copy_to_tensor_region`]: identity forward; its leaf's gradient is summed over
//! the tensor group by [`Tape::backward_tensor_parallel`] before it continues from the
//! source) and [`reduce_from_tensor_region`] (all-reduce forward, identity backward, no cut
//! needed). A leaf's gradient must be complete when its step runs: a computation that is
//! cut again later (an exchange fed from a copy leaf) records that cut in a later step.

use super::error::{CollectiveError, ErrorKind};
use super::exchange::{defined_or_zeros, ExchangeTape};
use super::{Collective, Result};
use tch::{Kind, TchError, Tensor};

/// An autograd cut: `leaf` carries `source`'s values with no history; after the part of
/// the graph that uses `leaf` was backpropagated, `leaf`'s gradient is sent on from
/// `source`.
pub struct Cut {
    source: Tensor,
    leaf: Tensor,
}

impl Cut {
    pub fn new(source: &Tensor) -> std::result::Result<Cut, TchError> {
        let leaf = source
            .f_detach()?
            .f_set_requires_grad(source.requires_grad())?;
        Ok(Cut {
            source: source.shallow_clone(),
            leaf,
        })
    }

    pub fn source(&self) -> &Tensor {
        &self.source
    }

    pub fn leaf(&self) -> &Tensor {
        &self.leaf
    }

    /// The gradient accumulated on the leaf, or zeros if none reached it.
    pub fn leaf_grad(&self) -> std::result::Result<Tensor, TchError> {
        defined_or_zeros(&self.leaf)
    }
}

/// Backpropagate several roots with given gradients in one pass: the gradients of
/// `Σ (root · grad)`, accumulated into every leaf's `.grad`. Roots that do not require
/// grad are skipped; with none left this does nothing.
pub fn backward_roots(roots: &[(&Tensor, &Tensor)]) -> std::result::Result<(), TchError> {
    let mut total: Option<Tensor> = None;
    for (root, grad) in roots {
        if !root.requires_grad() {
            continue;
        }
        let term = root.f_mul(&grad.f_detach()?)?.f_sum(Kind::Double)?;
        total = Some(match total {
            None => term,
            Some(acc) => acc.f_add(&term)?,
        });
    }
    match total {
        Some(total) => total.f_backward(),
        None => Ok(()),
    }
}

enum Boundary {
    Local(Cut),
    Exchange(ExchangeTape),
    /// Megatron's "copy to tensor-parallel region": the leaf's gradient is summed over the
    /// tensor group before it is sent on from the source.
    TensorCopy(Cut),
}

impl Boundary {
    /// Where the backward of this cut's segment starts: its source and the gradient that
    /// flows into it (`None`: the source needs none). An exchange runs its reverse
    /// all-to-alls on `expert_group`; a copy to the tensor region sums its gradient over
    /// `tensor_group`.
    fn root(
        &self,
        expert_group: &dyn Collective,
        tensor_group: Option<&dyn Collective>,
        at: &str,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let tensor_err =
            |e| CollectiveError::new(expert_group.label(), "backward", at, ErrorKind::Tensor(e));
        match self {
            Boundary::Local(cut) => {
                if !cut.source().requires_grad() {
                    return Ok(None);
                }
                let grad = cut.leaf_grad().map_err(tensor_err)?;
                Ok(Some((cut.source().shallow_clone(), grad)))
            }
            Boundary::Exchange(exchange) => {
                let grad = exchange.backward(expert_group, at)?;
                Ok(Some((exchange.source().shallow_clone(), grad)))
            }
            Boundary::TensorCopy(cut) => {
                let Some(group) = tensor_group else {
                    return Err(CollectiveError::new(
                        expert_group.label(),
                        "backward",
                        at,
                        ErrorKind::Invalid(
                            "the pass has copy-to-tensor-region cuts: run it with backward_tensor_parallel and the tensor group".into(),
                        ),
                    ));
                };
                // Every rank of the tensor group enters the all-reduce, also when
                // nothing here needs the gradient.
                let mut grad = cut
                    .leaf_grad()
                    .map_err(tensor_err)?
                    .f_contiguous()
                    .map_err(tensor_err)?;
                group
                    .all_reduce_sum(&mut grad, &format!("{at}, copy to tensor region backward"))?;
                Ok(cut
                    .source()
                    .requires_grad()
                    .then(|| (cut.source().shallow_clone(), grad)))
            }
        }
    }
}

/// Megatron's "reduce from tensor-parallel region": the sum of `partial` over `group` in the
/// forward, the identity in the backward (the gradient of the result flows unchanged into
/// `partial`). The value is `sum + (partial − partial)` with the difference attached to the
/// graph and `sum` detached, so every rank gets the all-reduce's bits exactly.
pub fn reduce_from_tensor_region(
    group: &dyn Collective,
    partial: &Tensor,
    at: &str,
) -> Result<Tensor> {
    let tensor_err = |e| {
        CollectiveError::new(
            group.label(),
            "reduce_from_tensor_region",
            at,
            ErrorKind::Tensor(e),
        )
    };
    let detached = partial.f_detach().map_err(tensor_err)?;
    // A copy: the all-reduce works in place and `partial`'s storage belongs to its graph.
    let mut sum = detached.f_zeros_like().map_err(tensor_err)?;
    sum.f_copy_(&detached).map_err(tensor_err)?;
    group.all_reduce_sum(&mut sum, at)?;
    if !partial.requires_grad() {
        return Ok(sum);
    }
    partial
        .f_sub(&detached)
        .and_then(|zero| sum.f_add(&zero))
        .map_err(tensor_err)
}

/// The cuts of one forward pass, grouped into steps, replayed in reverse by
/// [`Tape::backward`]. See the module docs for the recipe.
#[derive(Default)]
pub struct Tape {
    steps: Vec<Vec<Boundary>>,
}

impl Tape {
    pub fn new() -> Tape {
        Tape::default()
    }

    /// Start a new step: the cuts recorded until the next `step()` are backpropagated
    /// together, in one pass.
    pub fn step(&mut self) {
        self.steps.push(Vec::new());
    }

    fn current(&mut self) -> &mut Vec<Boundary> {
        if self.steps.is_empty() {
            self.steps.push(Vec::new());
        }
        let last = self.steps.len() - 1;
        &mut self.steps[last]
    }

    /// Cut the graph at `t`; returns the leaf to compute with.
    pub fn cut(&mut self, t: &Tensor) -> std::result::Result<Tensor, TchError> {
        let cut = Cut::new(t)?;
        let leaf = cut.leaf().shallow_clone();
        self.current().push(Boundary::Local(cut));
        Ok(leaf)
    }

    /// Megatron's "copy to tensor-parallel region": cut the graph at `t` (the identity in
    /// the forward); in the backward the leaf's gradient is summed over the tensor group
    /// given to [`Tape::backward_tensor_parallel`] before it continues from `t`. Use the
    /// returned leaf as the input of the computation split over the tensor ranks.
    pub fn copy_to_tensor_region(&mut self, t: &Tensor) -> std::result::Result<Tensor, TchError> {
        let cut = Cut::new(t)?;
        let leaf = cut.leaf().shallow_clone();
        self.current().push(Boundary::TensorCopy(cut));
        Ok(leaf)
    }

    /// Number of copy-to-region cuts recorded (each costs one tensor all-reduce in the
    /// backward).
    pub fn tensor_copies(&self) -> usize {
        self.steps
            .iter()
            .flatten()
            .filter(|b| matches!(b, Boundary::TensorCopy(_)))
            .count()
    }

    /// Record an exchange (its `combined` output is the leaf, its tokens the source).
    pub fn record(&mut self, exchange: ExchangeTape) {
        self.current().push(Boundary::Exchange(exchange));
    }

    /// Number of exchanges recorded (each costs two all-to-alls in the backward).
    pub fn exchanges(&self) -> usize {
        self.steps
            .iter()
            .flatten()
            .filter(|b| matches!(b, Boundary::Exchange(_)))
            .count()
    }

    /// Backpropagate `loss` (a scalar) through every segment. Exchanges run their
    /// reverse all-to-alls on `expert_group`; `at` labels them in errors.
    /// A tape with copy-to-region cuts ([`Tape::copy_to_tensor_region`]) needs
    /// [`Tape::backward_tensor_parallel`].
    pub fn backward(self, loss: &Tensor, expert_group: &dyn Collective, at: &str) -> Result<()> {
        self.replay(loss, expert_group, None, at)
    }

    /// [`Tape::backward`] for a pass with tensor parallelism: the gradient of every
    /// copy-to-region leaf is summed over `tensor_group` (in the reverse order of the
    /// forward cuts, on every rank of the tensor group) before it continues to its source.
    pub fn backward_tensor_parallel(
        self,
        loss: &Tensor,
        expert_group: &dyn Collective,
        tensor_group: &dyn Collective,
        at: &str,
    ) -> Result<()> {
        self.replay(loss, expert_group, Some(tensor_group), at)
    }

    fn replay(
        self,
        loss: &Tensor,
        expert_group: &dyn Collective,
        tensor_group: Option<&dyn Collective>,
        at: &str,
    ) -> Result<()> {
        let tensor_err =
            |e| CollectiveError::new(expert_group.label(), "backward", at, ErrorKind::Tensor(e));
        if loss.requires_grad() {
            loss.f_backward().map_err(tensor_err)?;
        }
        for step in self.steps.into_iter().rev() {
            let mut roots: Vec<(Tensor, Tensor)> = Vec::new();
            for boundary in step.iter().rev() {
                roots.extend(boundary.root(expert_group, tensor_group, at)?);
            }
            let pairs: Vec<(&Tensor, &Tensor)> = roots.iter().map(|(s, g)| (s, g)).collect();
            backward_roots(&pairs).map_err(tensor_err)?;
        }
        Ok(())
    }
}
