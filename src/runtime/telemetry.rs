//! What a GPU's clock and power did while some work ran: NVML (the driver's management
//! library, loaded at run time) sampled on a thread of its own. An H100 SXM at its 700 W
//! limit lowers its SM clock well below the maximum under matmul load, and by how much
//! depends on the work: the figures say how a timing was made. Knows nothing about what
//! runs; a machine without NVML (or a build without the `cuda` feature) gets `None`, never
//! an error.

use std::collections::BTreeMap;

use serde::Serialize;

#[cfg(feature = "cuda")]
pub use nvml::{pci_bus_id, Sampler};

/// A thread sampling `device`'s clock and power until [`Sampler::finish`], where NVML can see
/// it (a CUDA device, the `cuda` feature, the driver's library); `None` elsewhere.
pub fn sample(device: tch::Device) -> Option<Sampler> {
    match device {
        #[cfg(feature = "cuda")]
        tch::Device::Cuda(n) => Sampler::start(&pci_bus_id(n)?),
        _ => None,
    }
}

/// Without the `cuda` feature there is nothing to sample with: no sampler exists.
#[cfg(not(feature = "cuda"))]
pub enum Sampler {}

#[cfg(not(feature = "cuda"))]
impl Sampler {
    pub fn finish(self) -> Option<Summary> {
        match self {}
    }
}

impl std::fmt::Display for Summary {
    /// `SM 1650 MHz (lowest 1455), 690 W, power cap 100% of 72 samples`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SM {} MHz (lowest {}), {:.0} W, power cap {:.0}% of {} samples",
            self.sm_mhz_median,
            self.sm_mhz_min,
            self.power_w_median,
            100.0 * self.power_capped,
            self.samples
        )
    }
}

/// One reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub sm_mhz: u32,
    pub power_w: f64,
    /// The driver held the clocks down for power (software or hardware power cap).
    pub power_capped: bool,
}

/// The readings of a span of work, summarised.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub samples: usize,
    pub sm_mhz_median: u32,
    pub sm_mhz_min: u32,
    pub power_w_median: f64,
    /// Share of the samples in which the power cap held the clocks down.
    pub power_capped: f64,
}

/// Readings folded in as they come: a count per clock (MHz) and per whole watt, so a run of
/// days holds a few hundred numbers, not a sample every 10 ms.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    sm_mhz: BTreeMap<u32, u64>,
    power_w: BTreeMap<u32, u64>,
    capped: u64,
    samples: u64,
}

impl Tally {
    pub fn add(&mut self, s: Sample) {
        *self.sm_mhz.entry(s.sm_mhz).or_default() += 1;
        *self.power_w.entry(s.power_w.round() as u32).or_default() += 1;
        self.capped += u64::from(s.power_capped);
        self.samples += 1;
    }

    /// Medians (power to the watt), the lowest clock, the power cap's share; `None` for no
    /// readings.
    pub fn summary(&self) -> Option<Summary> {
        let lowest = *self.sm_mhz.keys().next()?;
        Some(Summary {
            samples: self.samples as usize,
            sm_mhz_median: middle(&self.sm_mhz, self.samples),
            sm_mhz_min: lowest,
            power_w_median: middle(&self.power_w, self.samples) as f64,
            power_capped: self.capped as f64 / self.samples as f64,
        })
    }
}

/// The value at position `n / 2` of the `n` values `counts` holds, in order.
fn middle(counts: &BTreeMap<u32, u64>, n: u64) -> u32 {
    let mut seen = 0;
    for (&value, &count) in counts {
        seen += count;
        if seen > n / 2 {
            return value;
        }
    }
    0
}

/// [`Tally::summary`] of `samples`.
pub fn summarize(samples: &[Sample]) -> Option<Summary> {
    let mut tally = Tally::default();
    samples.iter().for_each(|&s| tally.add(s));
    tally.summary()
}

/// The sampling thread, through NVML (the `nvml-wrapper` crate, which loads the library at
/// run time) and the CUDA runtime's device ids.
#[cfg(feature = "cuda")]
mod nvml {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use nvml_wrapper::enum_wrappers::device::Clock;
    use nvml_wrapper::Nvml;

    use super::{Sample, Summary, Tally};

    /// How often the thread asks NVML (its power reading is itself an average over a short
    /// window).
    const PERIOD: Duration = Duration::from_millis(10);

    /// A sampling thread, from [`Sampler::start`] to [`Sampler::finish`] (or to its drop,
    /// when the work it watched failed).
    pub struct Sampler {
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<Tally>>,
    }

    impl Drop for Sampler {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    impl Sampler {
        /// Samples the GPU at PCI bus id `bus_id` (as CUDA names it: `0000:1B:00.0`) until
        /// [`Sampler::finish`]; `None` where NVML or the device cannot be opened.
        pub fn start(bus_id: &str) -> Option<Sampler> {
            let nvml = Nvml::init().ok()?;
            // fail here, not on the thread, when the device is not NVML's
            nvml.device_by_pci_bus_id(bus_id).ok()?;
            let stop = Arc::new(AtomicBool::new(false));
            let (flag, bus_id) = (stop.clone(), bus_id.to_string());
            let thread = std::thread::spawn(move || {
                let mut tally = Tally::default();
                let Ok(device) = nvml.device_by_pci_bus_id(bus_id) else {
                    return tally;
                };
                while !flag.load(Ordering::Relaxed) {
                    if let (Ok(sm_mhz), Ok(milliwatts)) =
                        (device.clock_info(Clock::SM), device.power_usage())
                    {
                        let power_capped = device.current_throttle_reasons().is_ok_and(|r| {
                            use nvml_wrapper::bitmasks::device::ThrottleReasons as R;
                            r.intersects(R::SW_POWER_CAP | R::HW_POWER_BRAKE_SLOWDOWN)
                        });
                        tally.add(Sample {
                            sm_mhz,
                            power_w: milliwatts as f64 / 1e3,
                            power_capped,
                        });
                    }
                    std::thread::sleep(PERIOD);
                }
                tally
            });
            Some(Sampler {
                stop,
                thread: Some(thread),
            })
        }

        /// Stops the thread; the summary of what it read (`None` if it read nothing).
        pub fn finish(mut self) -> Option<Summary> {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.take()?.join().ok()?.summary()
        }
    }

    /// The PCI bus id of CUDA device `ordinal` (which NVML's numbering need not share, e.g.
    /// under `CUDA_VISIBLE_DEVICES`); `None` where the runtime cannot say.
    pub fn pci_bus_id(ordinal: usize) -> Option<String> {
        use cudarc::runtime::sys as rt;
        // SAFETY: checks that the runtime library loaded before calling into it.
        if !unsafe { rt::is_culib_present() } {
            return None;
        }
        let mut buf = [0 as std::ffi::c_char; 32];
        // SAFETY: the buffer is live and its length is passed; the runtime writes a
        // NUL-terminated id of at most 13 characters into it.
        let rc = unsafe {
            rt::cudaDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, ordinal as i32)
        };
        if rc != rt::cudaError::cudaSuccess {
            return None;
        }
        // SAFETY: NUL-terminated by the call above (the buffer was zeroed, and is longer).
        let id = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        Some(id.to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sm_mhz: u32, power_w: f64, power_capped: bool) -> Sample {
        Sample {
            sm_mhz,
            power_w,
            power_capped,
        }
    }

    #[test]
    fn summaries_take_medians_the_lowest_clock_and_the_caps_share() {
        assert_eq!(summarize(&[]), None);
        let s = summarize(&[
            sample(1980, 310.0, false),
            sample(1395, 698.0, true),
            sample(1350, 697.0, true),
            sample(1095, 699.0, true),
        ])
        .unwrap();
        assert_eq!(s.samples, 4);
        assert_eq!((s.sm_mhz_median, s.sm_mhz_min), (1395, 1095));
        assert_eq!(s.power_w_median, 698.0);
        assert_eq!(s.power_capped, 0.75);
    }

    #[test]
    fn a_long_run_keeps_counts_not_samples() {
        let mut tally = Tally::default();
        for i in 0..1_000_000u32 {
            tally.add(sample(
                1300 + 15 * (i % 20),
                690.0 + (i % 7) as f64 * 0.4,
                i % 4 != 0,
            ));
        }
        assert!(tally.sm_mhz.len() == 20 && tally.power_w.len() <= 4);
        let s = tally.summary().unwrap();
        assert_eq!((s.samples, s.sm_mhz_min), (1_000_000, 1300));
        assert_eq!(s.sm_mhz_median, 1300 + 15 * 10);
        assert_eq!(s.power_capped, 0.75);
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn no_nvml_or_no_device_is_none_not_an_error() {
        // this machine may or may not have a driver: either way nothing panics, and a bus id
        // no GPU has gives no sampler
        assert!(Sampler::start("ffff:ff:1f.7").is_none());
        let _ = pci_bus_id(0);
    }
}
