//! The launcher of the rank-r product kernels (`kernels/common.cuh`, `tile_product`):
//!
//! ```text
//! D[M x N] = alpha * sum_k A(m, k) B(k, n) + beta * D + bias[n]
//! ```
//!
//! with the layout of A and B fixed by the kernel (see `kernels/lowrank.cu`, `kernels/merge.cu`).
//! When K is long next to the number of output tiles (the reductions over tokens or over
//! d_out), K is split over `ksplit` blocks that write f32 partial sums to scratch memory, and
//! `splitk_reduce_<dtype of D>` adds them in a fixed order: bitwise deterministic for a given
//! device and shape, no float atomics.

use super::arg::kargs;

use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::context::CudaBackend;
use super::mem::DeviceBuf;
use crate::dtype::DType;
use crate::error::{Error, Result};

const TILE: usize = 64;
const THREADS: u32 = 256;

/// One product launch. Leading dimensions in elements.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Product {
    pub a: CUdeviceptr,
    pub lda: usize,
    pub b: CUdeviceptr,
    pub ldb: usize,
    pub d: CUdeviceptr,
    pub ldd: usize,
    /// `N` elements of D's dtype, or 0 for none.
    pub bias: CUdeviceptr,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
    /// Dropout probability on A (masked kernels only; 0 = none).
    pub p: f32,
    pub seed: u64,
}

impl Product {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(a: CUdeviceptr, lda: usize, b: CUdeviceptr, ldb: usize, d: CUdeviceptr, ldd: usize, m: usize, n: usize, k: usize) -> Self {
        Product { a, lda, b, ldb, d, ldd, bias: 0, m, n, k, alpha: 1.0, beta: 0.0, p: 0.0, seed: 0 }
    }
    pub(crate) fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }
    pub(crate) fn beta(mut self, beta: f32) -> Self {
        self.beta = beta;
        self
    }
    pub(crate) fn dropout(mut self, p: f32, seed: u64) -> Self {
        self.p = p;
        self.seed = seed;
        self
    }
}

fn to_i32(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(what, format!("{v} exceeds the kernels' 32-bit index range")))
}

/// Number of K slices: enough blocks to fill the device twice over, each slice at least 256
/// long, at most 64 slices.
fn ksplit(dev: &CudaBackend, m: usize, n: usize, k: usize) -> usize {
    let tiles = m.div_ceil(TILE) * n.div_ceil(TILE);
    let want = (2 * dev.sm_count() as usize).div_ceil(tiles.max(1));
    want.min(k.div_ceil(256)).clamp(1, 64)
}

impl CudaBackend {
    /// Launches product kernel `name` whose output D has dtype `out`.
    ///
    /// # Safety
    /// The pointers must be valid for the shapes of `p` and the kernel's layout, on `stream`.
    pub(crate) unsafe fn launch_product(&self, name: &str, out: DType, stream: CUstream, p: Product) -> Result<()> {
        const OP: &str = "rank-r product";
        if p.m == 0 || p.n == 0 {
            return Ok(());
        }
        let (m, n, k) = (to_i32("M", p.m)?, to_i32("N", p.n)?, to_i32("K", p.k)?);
        let grid_y = p.n.div_ceil(TILE);
        if grid_y > 65535 {
            return Err(Error::invalid("N", format!("{} columns exceed the launch grid", p.n)));
        }
        let grid_x = u32::try_from(p.m.div_ceil(TILE)).map_err(|_| Error::invalid("M", "too many rows"))?;
        let split = ksplit(self, p.m, p.n, p.k);
        let f = self.function(name)?;
        let work = if split > 1 {
            let bytes = split
                .checked_mul(p.m)
                .and_then(|v| v.checked_mul(p.n))
                .and_then(|v| v.checked_mul(4))
                .ok_or(Error::Overflow { what: "split-K scratch", rows: p.m, cols: p.n })?;
            Some(DeviceBuf::new(self, stream, bytes, OP)?)
        } else {
            None
        };
        let (lda, ldb, ldd) = (p.lda as i64, p.ldb as i64, p.ldd as i64);
        let wptr: CUdeviceptr = work.as_ref().map_or(0, |w| w.ptr());
        let ks = split as i32;
        let params = kargs![p.a, lda, p.b, ldb, p.d, ldd, p.bias, m, n, k, p.alpha, p.beta, p.p, p.seed, wptr, ks];
        self.launch(OP, &f, (grid_x, grid_y as u32, split as u32), (THREADS, 1, 1), 0, stream, &params)?;
        if split > 1 {
            let r = self.function(&format!("splitk_reduce_{}", out.name()))?;
            let total = p.m as u64 * p.n as u64;
            let blocks = u32::try_from(total.div_ceil(THREADS as u64))
                .map_err(|_| Error::invalid("M x N", "too many outputs for one launch"))?;
            let rparams = kargs![wptr, ks, m, n, p.d, ldd, p.bias, p.alpha, p.beta];
            self.launch("split-K reduce", &r, (blocks, 1, 1), (THREADS, 1, 1), 0, stream, &rparams)?;
        }
        drop(work);
        Ok(())
    }
}
