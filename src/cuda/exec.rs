//! What the layer algorithms (`layer.rs`) need from a device, as a trait: launch a rank-r
//! product, run a cuBLASLt GEMM, hold scratch memory, copy small buffers, synchronise, and
//! optionally run the fused K-extended GEMM. [`CudaBackend`] implements it with the real
//! device; the unit tests implement it with a float64 host interpreter of the same kernel
//! contracts, so that the launch wiring (operands, strides, shapes, scalars) is checked on
//! machines without a GPU.

use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::context::{cuda_err, CudaBackend};
use super::layer::Path;
use super::mem::DeviceBuf;
use super::product::Product;
use super::tune::TuneTable;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

/// Scratch memory that lives until dropped.
pub(crate) trait Scratch {
    fn ptr(&self) -> CUdeviceptr;
}

impl Scratch for DeviceBuf {
    fn ptr(&self) -> CUdeviceptr {
        DeviceBuf::ptr(self)
    }
}

/// Operands of one K-extended GEMM: `(a1, lda1, b1, ldb1, k1)`, `(a2, lda2, b2, ldb2, k2)`,
/// optional bias, `(d, ldd, m, n)`.
pub(crate) type KextArgs = (
    (CUdeviceptr, usize, CUdeviceptr, usize, usize),
    (CUdeviceptr, usize, CUdeviceptr, usize, usize),
    Option<CUdeviceptr>,
    (CUdeviceptr, usize, usize, usize),
);

/// The fused forward's second operand pair, `u = x psi^T` (T x r) and `C = scale W phi`
/// (d_out x r), for one launch of `wegeft_uc_{bf16,f16}` (`kernels/wegeft_uc.cuh`); all operands
/// packed: x `T x d_in`, W `d_out x d_in`, psi `r x d_in`, phi `d_in x r`, u and C with ld `r`.
/// Whether the kernel takes it and whether the layer should: `gemm.rs` (`applies`, `worth_it`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct WegeftUc {
    pub tokens: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
    pub x: CUdeviceptr,
    pub w: CUdeviceptr,
    pub psi: CUdeviceptr,
    pub phi: CUdeviceptr,
    pub u: CUdeviceptr,
    pub c: CUdeviceptr,
    pub scale: f32,
}

/// The backward for one launch of `wegeft_bwd_{bf16,f16}_tma` (`kernels/wegeft_rank_tma.cuh`):
/// `v = G C` (T x r), `S = G^T u` (d_out x r, f32), `dpsi += v^T x` (r x d_in, f32),
/// `dx = G W + v psi` (T x d_in) and, unless `dphi` is 0 (dropout: the caller's, over the masked
/// W), `dphi += scale W^T S` (d_in x r, f32); all packed: G `T x d_out`, W `d_out x d_in`, C
/// `d_out x r`, psi `r x d_in`, u `T x r`, x `T x d_in`. Whether the kernel takes it and whether
/// the layer should: `gemm.rs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WegeftBwd {
    pub tokens: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
    pub g: CUdeviceptr,
    pub w: CUdeviceptr,
    pub c: CUdeviceptr,
    pub psi: CUdeviceptr,
    pub u: CUdeviceptr,
    pub x: CUdeviceptr,
    pub v: CUdeviceptr,
    pub s: CUdeviceptr,
    pub dpsi: CUdeviceptr,
    pub dx: CUdeviceptr,
    pub dphi: CUdeviceptr,
    pub scale: f32,
}

pub(crate) trait Exec {
    type Buf: Scratch;

    /// Launches product kernel `name` (output dtype `out`), see `product.rs`.
    unsafe fn product(&self, name: &str, out: DType, stream: CUstream, p: Product) -> Result<()>;

    /// Row-major `D[m x n] = op(A) op(B) (+ bias[n]) (+ beta D)`, see `blas.rs`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        &self,
        op: &'static str,
        dtype: DType,
        stream: CUstream,
        transa: bool,
        transb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: CUdeviceptr,
        lda: usize,
        b: CUdeviceptr,
        ldb: usize,
        bias: Option<CUdeviceptr>,
        beta: f32,
        d: CUdeviceptr,
        ldd: usize,
    ) -> Result<()>;

    fn scratch(&self, stream: CUstream, bytes: usize, op: &'static str) -> Result<Self::Buf>;
    unsafe fn download<T: Element>(&self, dst: &mut [T], src: CUdeviceptr, stream: CUstream, op: &'static str) -> Result<()>;
    unsafe fn upload_f32(&self, dst: CUdeviceptr, src: &[f32], stream: CUstream, op: &'static str) -> Result<()>;
    unsafe fn sync(&self, stream: CUstream, op: &'static str) -> Result<()>;

    /// Runs the fused K-extended GEMM (`nt`: `D = A1 B1^T + A2 B2^T (+ bias)`, else
    /// `D = A1 B1 + A2 B2`) when `path` asks for it and it is available; `Ok(false)` means
    /// the caller runs the composed path. Without a fused GEMM, `Path::Fused` is an error.
    /// `dependent`: the previous kernel on `stream` is [`Exec::fused_uc`]'s, writing the second
    /// pair (see `gemm::GemmOptions::dependent`).
    unsafe fn kext_fused<T: Element>(&self, _nt: bool, _stream: CUstream, path: Path, _args: KextArgs, _dependent: bool) -> Result<bool> {
        match path {
            Path::Fused | Path::FusedSm90 => Err(Error::invalid("path", "a fused path asked for, but the fused K-extended GEMM is not built in")),
            _ => Ok(false),
        }
    }

    /// The fused forward's second operand pair in one launch (`wegeft_uc_*`, see [`WegeftUc`];
    /// no dropout), when `path` is [`Path::FusedSm90`] and the kernel applies here; then the
    /// forward's K-extended GEMM should follow at once with `dependent` set. `Ok(false)`:
    /// nothing launched, the caller computes u and C itself.
    unsafe fn fused_uc<T: Element>(&self, _stream: CUstream, _path: Path, _uc: &WegeftUc) -> Result<bool> {
        Ok(false)
    }

    /// The whole fused forward in one launch (`wegeft_fwd_*_tma`: u, C and
    /// `y = [x|u][W|C]^T (+ bias)`, y `tokens x d_out` packed; no dropout), when `path` is
    /// [`Path::FusedSm90`] and the layer should take it here. `Ok(false)`: nothing launched.
    unsafe fn fused_forward<T: Element>(&self, _stream: CUstream, _path: Path, _uc: &WegeftUc, _bias: Option<CUdeviceptr>, _y: CUdeviceptr) -> Result<bool> {
        Ok(false)
    }

    /// The backward in one launch (`wegeft_bwd_*_tma`, see [`WegeftBwd`]), when `path` is
    /// [`Path::FusedSm90`] and the layer should take it here. `Ok(false)`: nothing launched.
    unsafe fn fused_backward<T: Element>(&self, _stream: CUstream, _path: Path, _bw: &WegeftBwd) -> Result<bool> {
        Ok(false)
    }

    /// [`Path::Tuned`]'s choices on this device.
    fn tune_table(&self) -> &TuneTable;

    /// The paths [`Path::Tuned`] times for a product in `dtype`; `vector_loads`: its operands
    /// suit the fused GEMM's 16-byte loads (see [`super::tune::vector_loads`]). Never empty.
    fn tune_candidates(&self, _dtype: DType, _vector_loads: bool) -> Vec<Path> {
        vec![Path::Composed]
    }

    /// Milliseconds that `run` (the product on `path`) takes on `stream`; waits for the stream.
    unsafe fn time_ms(&self, stream: CUstream, path: Path, run: &mut dyn FnMut() -> Result<()>) -> Result<f64>;
}

impl Exec for CudaBackend {
    type Buf = DeviceBuf;

    unsafe fn product(&self, name: &str, out: DType, stream: CUstream, p: Product) -> Result<()> {
        self.launch_product(name, out, stream, p)
    }

    unsafe fn gemm(
        &self,
        op: &'static str,
        dtype: DType,
        stream: CUstream,
        transa: bool,
        transb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: CUdeviceptr,
        lda: usize,
        b: CUdeviceptr,
        ldb: usize,
        bias: Option<CUdeviceptr>,
        beta: f32,
        d: CUdeviceptr,
        ldd: usize,
    ) -> Result<()> {
        self.lt_gemm(op, dtype, stream, transa, transb, m, n, k, a, lda, b, ldb, bias, beta, d, ldd)
    }

    fn scratch(&self, stream: CUstream, bytes: usize, op: &'static str) -> Result<DeviceBuf> {
        DeviceBuf::new(self, stream, bytes, op)
    }

    unsafe fn download<T: Element>(&self, dst: &mut [T], src: CUdeviceptr, stream: CUstream, op: &'static str) -> Result<()> {
        cudarc::driver::result::memcpy_dtoh_async(dst, src, stream).map_err(cuda_err(op))
    }

    unsafe fn upload_f32(&self, dst: CUdeviceptr, src: &[f32], stream: CUstream, op: &'static str) -> Result<()> {
        cudarc::driver::result::memcpy_htod_async(dst, src, stream).map_err(cuda_err(op))
    }

    unsafe fn sync(&self, stream: CUstream, op: &'static str) -> Result<()> {
        cudarc::driver::result::stream::synchronize(stream).map_err(cuda_err(op))
    }

    fn tune_table(&self) -> &TuneTable {
        &self.tuned
    }

    fn tune_candidates(&self, dtype: DType, vector_loads: bool) -> Vec<Path> {
        let mut paths = vec![Path::Composed];
        if cfg!(wegeft_gemm) && vector_loads {
            paths.push(Path::Fused);
            if dtype != DType::F32 && self.compute_capability() == (9, 0) {
                paths.push(Path::FusedSm90);
            }
        }
        paths
    }

    unsafe fn time_ms(&self, stream: CUstream, _path: Path, run: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        const OP: &str = "Path::Tuned timing";
        self.context().bind_to_thread().map_err(cuda_err(OP))?;
        let start = Event::new(OP)?;
        let end = Event::new(OP)?;
        // SAFETY: both events were just created on this context and live until the end of this
        // function; `stream` is the caller's stream of this context.
        unsafe {
            cudarc::driver::result::event::record(start.0, stream).map_err(cuda_err(OP))?;
            run()?;
            cudarc::driver::result::event::record(end.0, stream).map_err(cuda_err(OP))?;
            cudarc::driver::result::event::synchronize(end.0).map_err(cuda_err(OP))?;
            Ok(cudarc::driver::result::event::elapsed(start.0, end.0).map_err(cuda_err(OP))? as f64)
        }
    }

    #[cfg(wegeft_gemm)]
    unsafe fn kext_fused<T: Element>(&self, nt: bool, stream: CUstream, path: Path, args: KextArgs, dependent: bool) -> Result<bool> {
        // Auto is Composed (see Path::Auto).
        if matches!(path, Path::Composed | Path::Auto) {
            return Ok(false);
        }
        let ((a1, lda1, b1, ldb1, k1), (a2, lda2, b2, ldb2, k2), bias, (d, ldd, m, n)) = args;
        let g = super::gemm::GemmKext { m, n, k1, k2, a1, lda1, b1, ldb1, a2, lda2, b2, ldb2, bias, beta: 0.0, d, ldd };
        let opts = super::gemm::GemmOptions { use_sm90: path == Path::FusedSm90, dependent };
        unsafe {
            if nt {
                super::gemm::gemm_kext_nt::<T>(self, stream, &g, opts)?;
            } else {
                super::gemm::gemm_kext_nn::<T>(self, stream, &g, opts)?;
            }
        }
        Ok(true)
    }

    #[cfg(wegeft_gemm)]
    unsafe fn fused_forward<T: Element>(&self, stream: CUstream, path: Path, uc: &WegeftUc, bias: Option<CUdeviceptr>, y: CUdeviceptr) -> Result<bool> {
        if !self.sm90a_fused(path) {
            return Ok(false);
        }
        if !uc.one_launch_applies::<T>() || !uc.one_launch_worth_it() {
            return Ok(false);
        }
        // SAFETY: the caller's buffers, of the packed shapes of `uc`; y `tokens x d_out`.
        unsafe { super::gemm::wegeft_fwd::<T>(self, stream, uc, bias, y) }
    }

    #[cfg(wegeft_gemm)]
    unsafe fn fused_backward<T: Element>(&self, stream: CUstream, path: Path, bw: &WegeftBwd) -> Result<bool> {
        if !self.sm90a_fused(path) {
            return Ok(false);
        }
        if !bw.applies::<T>() || !bw.worth_it() {
            return Ok(false);
        }
        // SAFETY: the caller's buffers, of the packed shapes of `bw`.
        unsafe { super::gemm::wegeft_bwd::<T>(self, stream, bw) }
    }

    #[cfg(wegeft_gemm)]
    unsafe fn fused_uc<T: Element>(&self, stream: CUstream, path: Path, uc: &WegeftUc) -> Result<bool> {
        // Only where the GEMM that follows is the TMA kernel, which overlaps with it.
        if !self.sm90a_fused(path) {
            return Ok(false);
        }
        if !uc.applies::<T>() || !uc.worth_it() {
            return Ok(false);
        }
        // SAFETY: the caller's buffers, of the packed shapes of `uc`.
        unsafe { super::gemm::wegeft_uc::<T>(self, stream, uc)? };
        Ok(true)
    }
}

impl CudaBackend {
    /// Whether `path` is [`Path::FusedSm90`] on a device that runs the sm_90a image (where
    /// the TMA kernels, and the one-launch kernels built on them, exist; only a compute
    /// capability 9.0 device does).
    fn sm90a_fused(&self, path: Path) -> bool {
        path == Path::FusedSm90 && self.image() == super::context::Image::Sm90a
    }
}

/// A CUDA event with timing, destroyed when dropped.
struct Event(cudarc::driver::sys::CUevent);

impl Event {
    fn new(op: &'static str) -> Result<Event> {
        cudarc::driver::result::event::create(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT).map(Event).map_err(cuda_err(op))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by `Event::new`, destroyed once; the driver releases an event that is
        // still pending once it completes.
        let _ = unsafe { cudarc::driver::result::event::destroy(self.0) };
    }
}
