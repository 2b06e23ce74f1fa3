//! CUDA graphs over torch's work (feature `cuda`): capture once what a closure issues to the
//! current stream, then replay it with one launch.
//!
//! A training micro-batch on one GPU is a few thousand kernels, many of them a few
//! microseconds long, issued one by one from the CPU (autograd included); the GPU then
//! waits on the CPU between them. Captured into a graph, the same kernels run back to back.
//! The rules are CUDA's and libtorch's: capture on a side stream ([`use_side_stream`]) after
//! a warm-up run of the same work on it; nothing in the captured work may synchronise with
//! the host (a read of a value, a copy from pageable memory), which fails the capture
//! rather than running; every replay reads its inputs from, and writes its outputs to, the
//! same device memory as the capture did (copy new inputs into the captured tensors before a
//! replay, consume the outputs before the next). Tensors allocated during the capture live in
//! the graph's own memory pool until the graph is dropped.
//!
//! This module knows streams and graphs only, not what the captured work computes.

use std::ffi::{c_int, c_void};
use std::ptr::NonNull;

use anyhow::Result;
use tch::Tensor;

use crate::runtime::cuda::shim_error;

extern "C" {
    fn fmoec_shim_use_side_stream(device: c_int) -> c_int;
    fn fmoec_shim_copy_from_host(src: *mut c_void, dst: *mut c_void) -> c_int;
    fn fmoec_shim_graph_new() -> *mut c_void;
    fn fmoec_shim_graph_begin(graph: *mut c_void) -> c_int;
    fn fmoec_shim_graph_end(graph: *mut c_void) -> c_int;
    fn fmoec_shim_graph_replay(graph: *mut c_void) -> c_int;
    fn fmoec_shim_graph_free(graph: *mut c_void);
}

/// Makes a stream of torch's pool the current stream of `device` on this thread (after the
/// work already issued on the old one has finished).
pub fn use_side_stream(device: usize) -> Result<()> {
    // SAFETY: the shim catches every C++ exception.
    if unsafe { fmoec_shim_use_side_stream(device as c_int) } != 0 {
        return Err(shim_error("switching to a side CUDA stream"));
    }
    Ok(())
}

/// Copies the CPU tensor `src` into `dst` (on a GPU) through pinned memory, stream-ordered,
/// without waiting for the device.
pub fn copy_from_host(src: &Tensor, dst: &Tensor) -> Result<()> {
    let (mut src, mut dst) = (src.shallow_clone(), dst.shallow_clone());
    // SAFETY: two live tensors for the duration of the call; the shim catches exceptions.
    let rc = unsafe {
        fmoec_shim_copy_from_host(
            src.as_mut_ptr() as *mut c_void,
            dst.as_mut_ptr() as *mut c_void,
        )
    };
    if rc != 0 {
        return Err(shim_error("copying to the GPU"));
    }
    Ok(())
}

/// A captured CUDA graph.
pub struct Graph(NonNull<c_void>);

impl Graph {
    /// Captures the work `body` issues to the current stream (a side stream, see
    /// [`use_side_stream`]). Nothing of it runs now: replay the graph to run it. When `body`
    /// or the capture fails, the capture is ended (the stream is usable again) and the error
    /// says why.
    pub fn capture<T>(body: impl FnOnce() -> Result<T>) -> Result<(Graph, T)> {
        // SAFETY: the shim catches every C++ exception and returns null instead.
        let raw = unsafe { fmoec_shim_graph_new() };
        let graph = Graph(NonNull::new(raw).ok_or_else(|| shim_error("creating a CUDA graph"))?);
        // SAFETY: a live graph; the shim catches exceptions.
        if unsafe { fmoec_shim_graph_begin(graph.0.as_ptr()) } != 0 {
            return Err(shim_error("starting a CUDA graph capture"));
        }
        let out = body();
        // SAFETY: as above; ends the capture whether or not `body` succeeded.
        let ended = unsafe { fmoec_shim_graph_end(graph.0.as_ptr()) };
        let out = out?;
        if ended != 0 {
            return Err(shim_error("ending the CUDA graph capture"));
        }
        Ok((graph, out))
    }

    /// Runs the captured work again on the current stream.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: a live, captured graph; the shim catches exceptions.
        if unsafe { fmoec_shim_graph_replay(self.0.as_ptr()) } != 0 {
            return Err(shim_error("replaying the CUDA graph"));
        }
        Ok(())
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: created by fmoec_shim_graph_new, freed once.
        unsafe { fmoec_shim_graph_free(self.0.as_ptr()) }
    }
}
