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
//!
//! On [`ProductEngine::CublasLt`] (the default) a product goes to cuBLASLt instead whenever
//! [`blas_form`] takes it (same layout, same `alpha`, `beta`; f32 accumulation): the tile
//! kernels reached 15-30 TFLOP/s on these skinny products on an H200, cuBLASLt runs them near
//! the memory's speed (BENCHMARKS.md, `ComposedTiles` against `Composed`).

use super::arg::kargs;

use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::context::{CudaBackend, ProductEngine};
use super::mem::DeviceBuf;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// `(kernel op, TRANS_A, TRANS_B, MASK_A)`, as declared in kernels/lowrank.cu and merge.cu.
pub(crate) const KERNELS: &[(&str, bool, bool, bool)] = &[
    ("lowrank_u", false, true, false),
    ("wegeft_c", false, false, true),
    ("lowrank_v", false, false, false),
    ("lowrank_s", true, false, false),
    ("lowrank_dpsi", true, false, false),
    ("lowrank_dphi", true, false, true),
    ("lowrank_addmm_nt", false, true, false),
    ("lowrank_addmm_nn", false, false, false),
    ("merge", false, false, false),
    ("unmerge_wphi", false, false, false),
    ("unmerge_psiphi", false, false, false),
    ("unmerge", false, false, false),
];

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
        if self.product_engine() == ProductEngine::CublasLt && self.product_by_blas(name, out, stream, &p)? {
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

    /// Runs product `name` through cuBLASLt when [`blas_form`] takes it; `Ok(false)`: nothing
    /// that writes the caller's buffers was enqueued, the tile kernel must run it (also when
    /// cuBLASLt has no algorithm).
    ///
    /// # Safety
    /// As for [`CudaBackend::launch_product`].
    unsafe fn product_by_blas(&self, name: &str, out: DType, stream: CUstream, p: &Product) -> Result<bool> {
        const OP: &str = "rank-r product (cuBLASLt)";
        let Some(BlasForm { dtype, transa, transb, split_b }) = blas_form(name, p) else { return Ok(false) };
        if !split_b {
            return unsafe {
                self.lt_matmul(OP, dtype, out, stream, transa, transb, p.m, p.n, p.k, p.a, p.lda, p.b, p.ldb, None, p.alpha, p.beta, p.d, p.ldd)
            };
        }
        // dphi = alpha W^T S + beta dphi with S (d_out x r) f32: S = S_hi + S_lo, both bf16
        // (S_lo = bf16(S - S_hi)), stored side by side as [S_hi | S_lo] (d_out x 2r), so that
        // one bf16 product reads W once: P = alpha W^T [S_hi | S_lo] (d_in x 2r, f32), then
        // dphi = P[:, :r] + P[:, r:] + beta dphi (add_halves_f32).
        let (rows, cols) = (p.k, p.n);
        let len = rows.checked_mul(2 * cols).ok_or(Error::Overflow { what: "S", rows, cols: 2 * cols })?;
        let hilo = DeviceBuf::new(self, stream, len * 2, OP)?;
        let plen = p.m.checked_mul(2 * cols).ok_or(Error::Overflow { what: "W^T S", rows: p.m, cols: 2 * cols })?;
        let prod = DeviceBuf::new(self, stream, plen * 4, OP)?;
        let (sp, hp, r64, c32) = (p.b, hilo.ptr(), rows as i64, to_i32("r", cols)?);
        let blocks = |n: usize| self.grid_stride_blocks(n, THREADS);
        let split = self.function("split_f32_bf16x2")?;
        self.launch(OP, &split, (blocks(rows * cols), 1, 1), (THREADS, 1, 1), 0, stream, &kargs![sp, hp, r64, c32])?;
        let (pp, ldp) = (prod.ptr(), 2 * cols);
        // SAFETY: hilo holds d_out x 2r bf16, prod d_in x 2r f32; A is the caller's W.
        let done = unsafe {
            self.lt_matmul(OP, dtype, out, stream, transa, transb, p.m, ldp, p.k, p.a, p.lda, hp, ldp, None, p.alpha, 0.0, pp, ldp)
        }?;
        if !done {
            return Ok(false);
        }
        let halves = self.function("add_halves_f32")?;
        let (dp, m64, ldd, beta) = (p.d, p.m as i64, p.ldd as i64, p.beta);
        self.launch(OP, &halves, (blocks(p.m * cols), 1, 1), (THREADS, 1, 1), 0, stream, &kargs![pp, dp, m64, c32, ldd, beta])?;
        Ok(true)
    }
}

/// How cuBLASLt runs a rank-r product (see [`blas_form`]): A and B of `dtype`, with the
/// kernel's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlasForm {
    pub dtype: DType,
    pub transa: bool,
    pub transb: bool,
    /// B is f32 beside a bf16 A (`lowrank_dphi_bf16`'s `S`): split into a high and a low bf16
    /// part side by side (`split_f32_bf16x2`), one matmul over both, its two halves added
    /// (`add_halves_f32`). Carries B to about 2^-17 of its size. Otherwise one matmul.
    pub split_b: bool,
}

/// Whether product kernel `name` (`OP_DTYPE`, `OP` one of [`KERNELS`]) runs through cuBLASLt
/// on [`ProductEngine::CublasLt`], and how. Not taken: a dropout mask on A, an empty K, a
/// bias, an f32 operand beside f16 ones (`lowrank_dphi_f16`'s `S`, whose split could leave
/// f16's range) or beside a 16-bit output (`unmerge_bf16`, `unmerge_f16`: `P Z` is f32).
pub(crate) fn blas_form(name: &str, p: &Product) -> Option<BlasForm> {
    let (op, suffix) = name.rsplit_once('_')?;
    let &(_, transa, transb, masked) = KERNELS.iter().find(|k| k.0 == op)?;
    let dtype = [DType::F32, DType::BF16, DType::F16].into_iter().find(|d| d.name() == suffix)?;
    if (masked && p.p > 0.0) || p.k == 0 || p.bias != 0 {
        return None;
    }
    let form = |split_b| Some(BlasForm { dtype, transa, transb, split_b });
    match (op, dtype) {
        (_, DType::F32) => form(false),
        ("unmerge", _) | ("lowrank_dphi", DType::F16) => None,
        ("lowrank_dphi", _) if p.ldb == p.n => form(true),
        ("lowrank_dphi", _) => None,
        _ => form(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prod(k: usize) -> Product {
        Product::new(0x1000, 8, 0x2000, 8, 0x3000, 8, 8, 8, k)
    }

    #[test]
    fn blas_form_takes_the_unmasked_products_of_one_dtype() {
        let direct = |dtype, transa, transb| Some(BlasForm { dtype, transa, transb, split_b: false });
        let bf = DType::BF16;
        assert_eq!(blas_form("lowrank_u_bf16", &prod(8)), direct(bf, false, true));
        assert_eq!(blas_form("lowrank_s_f16", &prod(8)), direct(DType::F16, true, false));
        assert_eq!(blas_form("lowrank_addmm_nt_bf16", &prod(8)), direct(bf, false, true));
        assert_eq!(blas_form("lowrank_addmm_nn_bf16", &prod(8)), direct(bf, false, false));
        assert_eq!(blas_form("merge_bf16", &prod(8)), direct(bf, false, false));
        // The mask: only without dropout.
        assert_eq!(blas_form("wegeft_c_bf16", &prod(8)), direct(bf, false, false));
        assert_eq!(blas_form("wegeft_c_bf16", &prod(8).dropout(0.1, 7)), None);
        assert_eq!(blas_form("lowrank_dphi_bf16", &prod(8).dropout(0.1, 7)), None);
        // dphi's f32 S: split for bf16, direct for f32, the tiles for f16 (and a strided S).
        assert_eq!(blas_form("lowrank_dphi_bf16", &prod(8)), Some(BlasForm { dtype: bf, transa: true, transb: false, split_b: true }));
        assert_eq!(blas_form("lowrank_dphi_f32", &prod(8)), direct(DType::F32, true, false));
        assert_eq!(blas_form("lowrank_dphi_f16", &prod(8)), None);
        let mut strided = prod(8);
        strided.ldb = 9;
        assert_eq!(blas_form("lowrank_dphi_bf16", &strided), None);
        // unmerge's f32 P Z into a 16-bit W: tiles; all-f32: cuBLASLt.
        assert_eq!(blas_form("unmerge_bf16", &prod(8)), None);
        assert_eq!(blas_form("unmerge_f32", &prod(8)), direct(DType::F32, false, false));
        assert_eq!(blas_form("unmerge_wphi_bf16", &prod(8)), direct(bf, false, false));
        // Empty K, a bias, unknown names and dtypes.
        assert_eq!(blas_form("lowrank_u_bf16", &prod(0)), None);
        let mut biased = prod(8);
        biased.bias = 0x4000;
        assert_eq!(blas_form("lowrank_u_bf16", &biased), None);
        assert_eq!(blas_form("lowrank_w_bf16", &prod(8)), None);
        assert_eq!(blas_form("lowrank_u_f64", &prod(8)), None);
        assert_eq!(blas_form("splitk_reduce_bf16", &prod(8)), None);
    }

    #[test]
    fn every_product_kernel_has_a_form_or_a_reason() {
        // Each op of KERNELS, unmasked, in bf16: all but unmerge go to cuBLASLt.
        for (op, ..) in KERNELS {
            let form = blas_form(&format!("{op}_bf16"), &prod(8));
            assert_eq!(form.is_none(), *op == "unmerge", "{op}: {form:?}");
        }
    }
}
