//! Scratch device memory for one call: allocated and freed in stream order
//! (`cuMemAllocAsync` / `cuMemFreeAsync`), so it is safe on any stream a caller gives.

use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::context::{cuda_err, CudaBackend};
use crate::error::Result;

/// `bytes` of device memory usable on `stream` until dropped (the free is queued on the same
/// stream, after every kernel that uses it).
pub(crate) struct DeviceBuf {
    ptr: CUdeviceptr,
    stream: CUstream,
}

impl DeviceBuf {
    pub(crate) fn new(dev: &CudaBackend, stream: CUstream, bytes: usize, op: &'static str) -> Result<Self> {
        dev.context().bind_to_thread().map_err(cuda_err(op))?;
        // SAFETY: `stream` belongs to the backend's context (every caller checks or owns it).
        let ptr = unsafe { cudarc::driver::result::malloc_async(stream, bytes.max(256)) }.map_err(cuda_err(op))?;
        Ok(DeviceBuf { ptr, stream })
    }
    pub(crate) fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_async on this stream; freed once, in stream order.
        unsafe {
            let _ = cudarc::driver::result::free_async(self.ptr, self.stream);
        }
    }
}
