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
    pub fn backward(self, loss: &Tensor, expert_group: &dyn Collective, at: &str) -> Result<()> {
        let tensor_err =
            |e| CollectiveError::new(expert_group.label(), "backward", at, ErrorKind::Tensor(e));
        if loss.requires_grad() {
            loss.f_backward().map_err(tensor_err)?;
        }
        for step in self.steps.into_iter().rev() {
            let mut roots: Vec<(Tensor, Tensor)> = Vec::new();
            for boundary in step.iter().rev() {
                match boundary {
                    Boundary::Local(cut) => {
                        if cut.source().requires_grad() {
                            roots.push((
                                cut.source().shallow_clone(),
                                cut.leaf_grad().map_err(tensor_err)?,
                            ));
                        }
                    }
                    Boundary::Exchange(exchange) => {
                        let grad = exchange.backward(expert_group, at)?;
                        roots.push((exchange.source().shallow_clone(), grad));
                    }
                }
            }
            let pairs: Vec<(&Tensor, &Tensor)> = roots.iter().map(|(s, g)| (s, g)).collect();
            backward_roots(&pairs).map_err(tensor_err)?;
        }
        Ok(())
    }
}
