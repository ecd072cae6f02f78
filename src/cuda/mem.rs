//! Scratch device memory for one call: allocated and freed in stream order
//! (`cuMemAllocAsync` / `cuMemFreeAsync`), so it is safe on any stream a caller gives.

use std::sync::Arc;

use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::CudaContext;

use super::context::{cuda_err, CudaBackend};
use crate::error::Result;

/// `bytes` of device memory usable on `stream` until dropped (the free is queued on the same
/// stream, after every kernel that uses it).
pub(crate) struct DeviceBuf {
    ptr: CUdeviceptr,
    stream: CUstream,
    // Bound again for the free: a NULL `stream` means the default stream of whichever context
    // is current, which in a multi-device process may no longer be this one.
    ctx: Arc<CudaContext>,
}

impl DeviceBuf {
    pub(crate) fn new(dev: &CudaBackend, stream: CUstream, bytes: usize, op: &'static str) -> Result<Self> {
        dev.context().bind_to_thread().map_err(cuda_err(op))?;
        // SAFETY: `stream` belongs to the backend's context (every caller checks or owns it).
        let ptr = unsafe { cudarc::driver::result::malloc_async(stream, bytes.max(256)) }.map_err(cuda_err(op))?;
        Ok(DeviceBuf { ptr, stream, ctx: dev.context().clone() })
    }
    pub(crate) fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_async on this stream of this context; freed once, in
        // stream order.
        unsafe {
            let _ = self.ctx.bind_to_thread();
            let _ = cudarc::driver::result::free_async(self.ptr, self.stream);
        }
    }
}
