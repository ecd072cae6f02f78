//! What the GPU benchmarks share (`#[path]`-included by each): timing with events, NaN
//! poisoning of outputs, and the result check.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DeviceRepr};
use wegeft::cuda::CudaBackend;
use wegeft::Error;

pub fn cuda_err(e: impl std::fmt::Display) -> Error {
    Error::Cuda { op: "bench event", msg: e.to_string() }
}

/// Fills `buf` with 0xFF bytes (NaN in bf16 and f32) on `st`.
pub fn poison<E: DeviceRepr>(st: &Arc<CudaStream>, buf: &mut CudaSlice<E>) -> wegeft::Result<()> {
    st.context().bind_to_thread().map_err(cuda_err)?;
    let bytes = buf.num_bytes();
    let (p, _guard) = buf.device_ptr_mut(st);
    // SAFETY: `p` is `buf`'s allocation of `bytes` bytes on this context, written on `st`; the
    // guard orders the memset with cudarc's tracking of the buffer.
    unsafe { cudarc::driver::result::memset_d8_async(p, 0xFF, bytes, st.cu_stream()) }.map_err(cuda_err)
}

/// Median milliseconds of `iters` runs of `f` (after 3 warm-up runs), timed with events; the
/// L2 is flushed (a memset of `flush`, outside the events) before every timed run.
pub fn time(dev: &CudaBackend, flush: &mut CudaSlice<u8>, iters: usize, mut f: impl FnMut() -> wegeft::Result<()>) -> wegeft::Result<f64> {
    let st = dev.stream();
    for _ in 0..3 {
        f()?;
    }
    let e0 = dev.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda_err)?;
    let e1 = dev.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda_err)?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        st.memset_zeros(flush).map_err(cuda_err)?;
        e0.record(st).map_err(cuda_err)?;
        f()?;
        e1.record(st).map_err(cuda_err)?;
        e1.synchronize().map_err(cuda_err)?;
        ms.push(e0.elapsed_ms(&e1).map_err(cuda_err)? as f64);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Worst `|got - want| / max |want|` and its index; a NaN or infinity on either side (or a
/// length mismatch) is an infinite error, so it can never be skipped by a comparison.
pub fn rel_err(got: &[f32], want: &[f32]) -> (f64, usize) {
    if got.len() != want.len() {
        return (f64::INFINITY, 0);
    }
    let scale = want.iter().filter(|v| v.is_finite()).fold(0f64, |m, &v| m.max((v as f64).abs())).max(1e-30);
    let (mut worst, mut at) = (0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = if g.is_finite() && w.is_finite() { (g as f64 - w as f64).abs() / scale } else { f64::INFINITY };
        if e > worst {
            worst = e;
            at = i;
        }
    }
    (worst, at)
}
