//! Whether a run fits the machine it is about to run on, decided before anything is
//! allocated: the planner's estimate of one rank's memory for `fmoec run` (`fmoec plan
//! --memory-model fmoec`, the one [`crate::runtime::distributed::WorldPlan`] carries) against
//! what the device has free now (the host's available memory for CPU ranks, all of a
//! process's in-process ranks together; the GPU's free memory for a CUDA rank). A run that
//! cannot fit is refused with both figures instead of failing in an allocation minutes later.
//! Knows nothing about training.

use anyhow::{bail, Result};
use tch::Device;

use crate::plan::render::bytes;
use crate::plan::Memory;

/// Memory a device has free now, and where that figure comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Free {
    pub bytes: u64,
    /// `this host`, `cuda:0`.
    pub device: String,
    /// How the figure was read: `available (MemAvailable in /proc/meminfo)`.
    pub how: &'static str,
}

/// What `device` has free now; `None` where this platform cannot say.
pub fn free_memory(device: Device) -> Option<Free> {
    match device {
        Device::Cpu => host_available(),
        Device::Cuda(n) => gpu_free(n),
        _ => None,
    }
}

/// `MemAvailable` of `/proc/meminfo` (Linux): what the host can give new allocations
/// without swapping.
fn host_available() -> Option<Free> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo_available_kib(&text)?;
    Some(Free {
        bytes: kib.saturating_mul(1024),
        device: "this host".into(),
        how: "available (MemAvailable in /proc/meminfo)",
    })
}

fn meminfo_available_kib(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(feature = "cuda")]
fn gpu_free(n: usize) -> Option<Free> {
    use cudarc::runtime::result;
    // SAFETY: only asks whether libcudart can be opened (torch has loaded it when CUDA is
    // available); calling into cudarc without it would panic.
    if !unsafe { cudarc::runtime::sys::is_culib_present() } {
        return None;
    }
    let ordinal = i32::try_from(n).ok()?;
    result::device::set(ordinal).ok()?;
    let (free, _total) = result::get_mem_info().ok()?;
    Some(Free {
        bytes: free as u64,
        device: format!("cuda:{n}"),
        how: "free (cudaMemGetInfo)",
    })
}

#[cfg(not(feature = "cuda"))]
fn gpu_free(_: usize) -> Option<Free> {
    None
}

/// Refuses a run of `ranks` ranks on `device` (in this process, sharing it) whose planned
/// memory per rank, `per_rank`, exceeds what the device has free. `layout` says how the plan
/// was made (`--world 1`), for the message.
pub fn check(per_rank: &Memory, ranks: u64, device: Device, layout: &str) -> Result<()> {
    let Some(free) = free_memory(device) else {
        return Ok(());
    };
    let needed = per_rank.total.saturating_mul(ranks);
    if needed <= free.bytes {
        return Ok(());
    }
    let parts: Vec<String> = per_rank
        .parts()
        .iter()
        .map(|(name, n)| format!("{name} {}", bytes(*n)))
        .collect();
    let each = if ranks > 1 {
        format!(" ({ranks} ranks of {} each)", bytes(per_rank.total))
    } else {
        String::new()
    };
    bail!(
        "this run does not fit: the planner estimates {}{each} for it (`fmoec plan {layout} \
         --memory-model fmoec`: {}), but {} has {} {}; use more devices or ranks, a smaller \
         micro-batch, or a smaller model",
        bytes(needed),
        parts.join(", "),
        free.device,
        bytes(free.bytes),
        free.how
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available() {
        let text =
            "MemTotal:       24000000 kB\nMemFree:          100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_available_kib(text), Some(20_000_000));
        assert_eq!(meminfo_available_kib("MemTotal: 1 kB\n"), None);
    }
}
