//! The device as libtorch sees it, through the C++ shim: torch's current CUDA stream, the
//! caching allocator's statistics, CUDA events on that stream, and the shim's last error.
//! Knows nothing about kernels or the MoE layer.

use std::ffi::{c_char, c_int, c_void, CStr};

use anyhow::{anyhow, bail, Result};
use cudarc::runtime::sys as rt;

extern "C" {
    fn fmoec_shim_current_stream(device: c_int) -> *mut c_void;
    fn fmoec_shim_memory(device: c_int, peak: *mut i64, current: *mut i64) -> c_int;
    fn fmoec_shim_reset_peak(device: c_int) -> c_int;
    fn fmoec_shim_empty_cache() -> c_int;
    fn fmoec_shim_last_error() -> *const c_char;
}

/// The `cudaStream_t` libtorch issues work to on `device` now.
pub fn current_stream(device: usize) -> Result<*mut c_void> {
    // SAFETY: the shim takes a plain index, catches every C++ exception and returns null
    // instead.
    let s = unsafe { fmoec_shim_current_stream(device as c_int) };
    if s.is_null() && !tch::Cuda::is_available() {
        bail!("no CUDA device: no current stream");
    }
    Ok(s)
}

/// `(peak, current)` bytes allocated by torch's caching allocator on `device`.
pub fn memory(device: usize) -> Result<(i64, i64)> {
    let (mut peak, mut current) = (0i64, 0i64);
    // SAFETY: two out-pointers to live locals; the shim catches exceptions.
    let rc = unsafe { fmoec_shim_memory(device as c_int, &mut peak, &mut current) };
    if rc != 0 {
        return Err(shim_error("reading torch's CUDA allocator statistics"));
    }
    Ok((peak, current))
}

/// Resets the allocator's peak statistics on `device` (after returning cached blocks).
pub fn reset_peak_memory(device: usize) -> Result<()> {
    empty_cache()?;
    // SAFETY: no arguments beyond the index; the shim catches exceptions.
    if unsafe { fmoec_shim_reset_peak(device as c_int) } != 0 {
        return Err(shim_error("resetting torch's CUDA allocator statistics"));
    }
    Ok(())
}

/// Returns the caching allocator's unused blocks to the device.
pub fn empty_cache() -> Result<()> {
    // SAFETY: no arguments; the shim catches exceptions.
    if unsafe { fmoec_shim_empty_cache() } != 0 {
        return Err(shim_error("emptying torch's CUDA allocator cache"));
    }
    Ok(())
}

/// An error saying `what` failed, with the message the shim kept for this thread.
pub(crate) fn shim_error(what: &str) -> anyhow::Error {
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message, which
    // stays valid until the next shim call on this thread (it is copied here at once).
    let msg = unsafe { CStr::from_ptr(fmoec_shim_last_error()) }.to_string_lossy();
    anyhow!("{what}: {msg}")
}

fn rt_check(what: &str, e: rt::cudaError_t) -> Result<()> {
    if e != rt::cudaError::cudaSuccess {
        bail!("{what}: CUDA runtime error {e:?}");
    }
    Ok(())
}

/// A CUDA event recorded on torch's current stream.
pub struct Event(rt::cudaEvent_t);

impl Event {
    pub fn new() -> Result<Event> {
        let mut e = std::ptr::null_mut();
        // SAFETY: an out-pointer to a local handle, which the runtime fills.
        rt_check("cudaEventCreate", unsafe { rt::cudaEventCreate(&mut e) })?;
        Ok(Event(e))
    }

    /// Records the event on `device`'s current torch stream.
    pub fn record(&self, device: usize) -> Result<()> {
        let s = current_stream(device)?;
        // SAFETY: a live event (owned by `self`) and a stream handle torch keeps alive.
        rt_check("cudaEventRecord", unsafe {
            rt::cudaEventRecord(self.0, s as rt::cudaStream_t)
        })
    }

    /// Milliseconds from `self` to `end` (waits for `end`).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f64> {
        let mut ms = 0f32;
        // SAFETY: both events are live (owned), `ms` is a live local.
        unsafe {
            rt_check("cudaEventSynchronize", rt::cudaEventSynchronize(end.0))?;
            rt_check(
                "cudaEventElapsedTime",
                rt::cudaEventElapsedTime(&mut ms, self.0, end.0),
            )?;
        }
        Ok(ms as f64)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the handle is live and owned by `self`, destroyed once.
        unsafe {
            rt::cudaEventDestroy(self.0);
        }
    }
}
