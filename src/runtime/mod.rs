//! `runtime`: the built-in trainer on libtorch (tch), behind the `runtime` cargo feature.
//!
//! Owns everything that runs tensors: the module tree built from the checked model
//! ([`model`]), the MoE layer and its gates ([`moe`]), parameters ([`params`]) and their
//! per-step compute-dtype copies ([`cast`]), AdamW and the schedule ([`optim`]), data
//! ([`data`]), checkpoints ([`checkpoint`]), multi-rank training ([`distributed`]); the
//! trainer in phases ([`trainer`]) behind the entry points and report types of [`train`],
//! with its micro-batch runner alone on a device ([`replay`]), metrics log ([`metrics`]),
//! progress display ([`progress`]), stop signals ([`stop`]), memory check ([`fit`]) and
//! default run folders ([`folders`]); sampling ([`sample`]), the plot ([`plot`]), `fmoec bench
//! moe` ([`bench`]) with the GPU's clock and power while it times ([`telemetry`]), `precision =
//! fp8` ([`fp8`]), and, with feature `cuda`, the CUDA code
//! (`cuda`: the shim, the kernels and the fused ops), CUDA
//! graphs over a training micro-batch (`graph`) and libtorch's multi-tensor optimizer kernels
//! (`foreach`). The `fmoec run` command line is [`cli`], the edge: nothing else here imports
//! it or the driver.
//! It reads the checked [`crate::check::Checked`] artifact and the planner's
//! [`crate::plan::ParallelPlan`]; it knows nothing about source text, the planner's internals
//! or the Megatron emitter.

pub mod bench;
pub mod cast;
pub mod checkpoint;
pub mod cli;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod distributed;
pub mod fit;
pub mod folders;
#[cfg(feature = "cuda")]
pub mod foreach;
pub mod fp8;
#[cfg(feature = "cuda")]
pub mod graph;
pub mod metrics;
pub mod model;
pub mod moe;
pub mod optim;
pub mod params;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod replay;
pub mod sample;
pub mod stop;
pub mod telemetry;
#[cfg(all(test, feature = "cuda"))]
pub(crate) mod testing;
pub mod trace;
pub mod train;
pub mod trainer;

use anyhow::{bail, Result};
use tch::Device;

/// Parses `cpu`, `cuda` or `cuda:N` and checks the device exists in this libtorch.
pub fn parse_device(s: &str) -> Result<Device> {
    let device = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => bail!("unknown device `{s}`: expected `cpu`, `cuda` or `cuda:N`"),
        },
    };
    if let Device::Cuda(n) = device {
        if !tch::Cuda::is_available() {
            bail!(
                "device `{s}`: CUDA is not available to this fmoec (a CPU-only libtorch, no GPU, or a \
                 build without `--features cuda`, which links libtorch_cuda); see the README, section Training with fmoec run"
            );
        }
        let count = tch::Cuda::device_count() as usize;
        if n >= count {
            bail!(
                "device `{s}`: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{})",
                count.saturating_sub(1)
            );
        }
    }
    Ok(device)
}
