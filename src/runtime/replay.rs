//! How the micro-batches of a run alone on one device run ([`Runner`]): op by op, or (feature
//! `cuda`, on a GPU) one warm-up micro-batch op by op, the next captured as a CUDA graph, and
//! every later one a replay of it with its own tokens and draw keys copied in (see
//! [`crate::runtime::graph`]). Knows one micro-batch's forward, loss and backward; nothing
//! about steps, optimizers or files.

#[cfg(feature = "cuda")]
use anyhow::bail;
use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::runtime::cast;
use crate::runtime::model::{ForwardOutput, Transformer};
#[cfg(feature = "cuda")]
use crate::runtime::moe::Telemetry;

/// One training micro-batch alone on a device: forward, loss, backward (the gradients add
/// up in the masters' `.grad`); returns the LM loss and the forward's extras.
pub(super) fn train_micro_batch(
    model: &Transformer,
    batch: &Tensor,
    n_micro: u64,
) -> Result<(Tensor, ForwardOutput)> {
    let (lm, out) = model.loss(batch, true)?;
    let total = lm.f_add(&out.balance_loss)?.f_div_scalar(n_micro as f64)?;
    total.f_backward()?;
    Ok((lm, out))
}

/// How the micro-batches of a run alone on one device are run: op by op, or (feature `cuda`,
/// on a GPU) one warm-up micro-batch op by op, then the next captured as a CUDA graph and
/// every later one a replay of it with its own tokens and draw keys copied in (see
/// [`crate::runtime::graph`]). A capture that fails (some op waits for the host) says why
/// once and leaves the run op by op. When the runner goes (the run is over or failed), this
/// thread's weight copies go with it.
pub struct Runner {
    stage: Stage,
}

/// Where a [`Runner`] is. Moving from one stage to the next drops nothing but the stage: the
/// weight copies made for the warm-up are the ones the capture records.
enum Stage {
    Eager,
    #[cfg(feature = "cuda")]
    Warmup,
    #[cfg(feature = "cuda")]
    Capture,
    #[cfg(feature = "cuda")]
    Replay(Box<Captured>),
}

/// A captured micro-batch: the graph, its input tokens and its outputs (rewritten in place
/// by every replay).
#[cfg(feature = "cuda")]
pub struct Captured {
    graph: crate::runtime::graph::Graph,
    batch: Tensor,
    lm: Tensor,
    out: ForwardOutput,
}

impl Runner {
    /// Graphs when asked for, on a GPU: the run moves to a side stream of torch's pool. Not
    /// for a model with MoE layers outside bf16 (`grouped`: it has some; `compute`: its
    /// dtype), which says so: there libtorch's grouped matmul takes a fallback that reads the
    /// group sizes on the host, which no graph can capture (its CUTLASS path is bf16 only).
    pub fn new(cuda_graph: bool, device: Device, compute: Kind, grouped: bool) -> Result<Runner> {
        Ok(Runner::at(first_stage(
            cuda_graph, device, compute, grouped,
        )?))
    }

    /// A runner at `stage`, the one place a runner is made. A warm-up turns this thread's
    /// weight copies on (one bf16 copy of each weight per step, at addresses the graph keeps
    /// reading); the runner's end turns them off.
    fn at(stage: Stage) -> Runner {
        #[cfg(feature = "cuda")]
        if matches!(stage, Stage::Warmup) {
            cast::enable();
        }
        Runner { stage }
    }

    /// Runs one micro-batch of `tokens` (on the CPU) with the model's draw keys as they are
    /// set now.
    pub fn run(
        &mut self,
        model: &Transformer,
        tokens: &Tensor,
        n_micro: u64,
    ) -> Result<(Tensor, ForwardOutput)> {
        let device = model.store.device;
        match &mut self.stage {
            Stage::Eager => train_micro_batch(model, &tokens.f_to_device(device)?, n_micro),
            #[cfg(feature = "cuda")]
            Stage::Warmup => {
                let out = train_micro_batch(model, &tokens.f_to_device(device)?, n_micro)?;
                self.stage = Stage::Capture;
                Ok(out)
            }
            #[cfg(feature = "cuda")]
            Stage::Capture => self.capture(model, tokens.f_to_device(device)?, n_micro),
            #[cfg(feature = "cuda")]
            Stage::Replay(c) => c.replay(tokens),
        }
    }

    /// The second micro-batch, `batch` (on the model's device): captured as a CUDA graph and
    /// the runner replays it from now on, or, where it cannot be captured, run op by op and
    /// the runner stays so.
    #[cfg(feature = "cuda")]
    fn capture(
        &mut self,
        model: &Transformer,
        batch: Tensor,
        n_micro: u64,
    ) -> Result<(Tensor, ForwardOutput)> {
        let captured = match without_gradient(model) {
            Some(why) => Err(why),
            None => capture_warmed(|| train_micro_batch(model, &batch, n_micro))?,
        };
        match captured {
            Ok((graph, (lm, out))) => {
                let result = (lm.shallow_clone(), shallow(&out));
                self.stage = Stage::Replay(Box::new(Captured {
                    graph,
                    batch,
                    lm,
                    out,
                }));
                Ok(result)
            }
            Err(why) => {
                eprintln!(
                    "warning: the training micro-batch could not be captured as a CUDA \
                     graph ({why}); running it op by op (--no-cuda-graph says so up front)"
                );
                self.stage = Stage::Eager;
                cast::disable();
                train_micro_batch(model, &batch, n_micro)
            }
        }
    }

    /// How the micro-batches ran, for the summary's device line (empty: op by op).
    pub fn describe(&self) -> &'static str {
        match self.stage {
            #[cfg(feature = "cuda")]
            Stage::Replay(_) => " + CUDA graph",
            _ => "",
        }
    }
}

/// Where a new runner starts: the warm-up when graphs are asked for on a GPU and can be
/// captured (the run then moves to a side stream of torch's pool), else op by op.
fn first_stage(cuda_graph: bool, device: Device, compute: Kind, grouped: bool) -> Result<Stage> {
    #[cfg(feature = "cuda")]
    if let (true, Device::Cuda(n)) = (cuda_graph, device) {
        if grouped && compute != Kind::BFloat16 {
            eprintln!(
                "note: micro-batches run op by op, not as a CUDA graph: outside bf16 \
                 libtorch's grouped matmul reads its group sizes on the host (precision = \
                 bf16 gets the graph)"
            );
            return Ok(Stage::Eager);
        }
        crate::runtime::graph::use_side_stream(n)?;
        return Ok(Stage::Warmup);
    }
    let _ = (cuda_graph, device, compute, grouped);
    Ok(Stage::Eager)
}

impl Drop for Runner {
    /// The run is over (or failed): this thread's weight copies go.
    fn drop(&mut self) {
        cast::disable();
        #[cfg(feature = "cuda")]
        crate::runtime::fp8::clear();
    }
}

#[cfg(feature = "cuda")]
impl Captured {
    /// Copies `tokens` (on the CPU) into the captured batch and replays the graph.
    fn replay(&self, tokens: &Tensor) -> Result<(Tensor, ForwardOutput)> {
        if tokens.size() != self.batch.size() {
            bail!(
                "internal error: a micro-batch of shape {:?} for a graph captured with {:?}",
                tokens.size(),
                self.batch.size()
            );
        }
        crate::runtime::model::copy_from_host(tokens, &self.batch)?;
        self.graph.replay()?;
        Ok((self.lm.shallow_clone(), shallow(&self.out)))
    }
}

/// Why the warm-up micro-batch leaves nothing to capture: a parameter that got no gradient
/// (every gradient must exist before the capture, which then adds into it as every eager
/// micro-batch after the first does).
#[cfg(feature = "cuda")]
fn without_gradient(model: &Transformer) -> Option<String> {
    model
        .store
        .params
        .iter()
        .find(|p| p.tensor.requires_grad() && !p.tensor.grad().defined())
        .map(|p| format!("`{}` got no gradient in the warm-up micro-batch", p.name))
}

/// Captures the work of `body` as a CUDA graph, on the current stream (a side stream: see
/// [`crate::runtime::graph::use_side_stream`]), after the same work ran there op by op (the
/// warm-up: libraries' workspaces and kernels exist before the capture), and replays it once,
/// so its outputs hold their values. `Ok(Err(why))` where the work cannot be captured (some
/// op waits for the host), in one line; `Err` where the replay failed. For the trainer's
/// micro-batch and `fmoec bench moe --cuda-graph`, which times layers as training runs them.
#[cfg(feature = "cuda")]
pub(crate) fn capture_warmed<T>(
    body: impl FnOnce() -> Result<T>,
) -> Result<std::result::Result<(crate::runtime::graph::Graph, T), String>> {
    // the warm-up's cached blocks would otherwise stay beside the graph's pool
    crate::runtime::cuda::empty_cache()?;
    match crate::runtime::graph::Graph::capture(body) {
        Ok((graph, out)) => {
            graph.replay()?;
            Ok(Ok((graph, out)))
        }
        // libtorch's messages go on with a C++ backtrace: the first line says it
        Err(e) => Ok(Err(format!("{e:#}")
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())),
    }
}

/// Another handle on the same output tensors.
#[cfg(feature = "cuda")]
fn shallow(out: &ForwardOutput) -> ForwardOutput {
    ForwardOutput {
        logits: out.logits.shallow_clone(),
        balance_loss: out.balance_loss.shallow_clone(),
        telemetry: out
            .telemetry
            .iter()
            .map(|(i, t)| {
                (
                    *i,
                    Telemetry {
                        tokens_per_expert: t.tokens_per_expert.shallow_clone(),
                        dropped_fraction: t.dropped_fraction.shallow_clone(),
                        gate_entropy: t.gate_entropy.shallow_clone(),
                        balance_loss: t.balance_loss.shallow_clone(),
                        shadowed: t.shadowed.as_ref().map(Tensor::shallow_clone),
                    },
                )
            })
            .collect(),
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    /// The warm-up's weight copies are the ones the capture records and every replay reads:
    /// going from one stage to the next keeps them, and only the runner's end drops them.
    #[test]
    fn the_weight_copies_outlive_the_stages_and_go_with_the_runner() {
        let mut runner = Runner::at(Stage::Warmup);
        assert!(cast::enabled(), "the warm-up has no weight copies");
        runner.stage = Stage::Capture;
        assert!(
            cast::enabled(),
            "the capture lost the warm-up's weight copies"
        );
        drop(runner);
        assert!(!cast::enabled());
    }

    /// Asked for graphs on the CPU, the runner runs op by op and makes no weight copies.
    #[test]
    fn graphs_on_the_cpu_run_op_by_op_without_weight_copies() {
        let runner = Runner::new(true, Device::Cpu, Kind::BFloat16, false).unwrap();
        assert!(matches!(runner.stage, Stage::Eager));
        assert!(!cast::enabled());
        assert_eq!(runner.describe(), "");
    }
}
