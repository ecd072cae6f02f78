//! cuBLASLt on raw device pointers: the frozen GEMMs `y = x W^T (+ b)` and `dx = G W`, and
//! the rank-r products of [`super::ProductEngine::CublasLt`] (`src/cuda/product.rs`).
//! Row-major in, row-major out (cuBLASLt is column-major: a row-major `D = A B` is run as the
//! column-major `D^T = B^T A^T`). Compute in f32 (`CUBLAS_COMPUTE_32F`, no TF32 for f32
//! storage), so results agree with the reference to the storage type's precision.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::context::CudaBackend;
use super::mem::DeviceBuf;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The most workspace cuBLASLt may ask for (split-K partial sums). A call gets exactly what
/// its algorithm asks for (stream-ordered, from the pool), and none when that is zero: the
/// frozen GEMMs and most rank-r products need none, and an allocation in the stream between
/// two kernels is not free.
const WORKSPACE: usize = 32 << 20;

/// The cuBLASLt handle and a cache of the plan made for each problem.
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    /// `None`: cuBLASLt has no algorithm for the problem (on its operands' alignment).
    plans: Mutex<HashMap<Key, Option<Arc<Plan>>>>,
}

/// What a call of one problem needs besides its pointers, made once: the layouts, the
/// descriptor, the algorithm and its workspace size. Building these per call took a good part
/// of the host's time per product, and at small shapes the host's time is the layer's (the
/// layer bench's `host:` line).
struct Plan {
    layouts: [Layout; 3],
    /// The descriptor the heuristic saw. A problem with a bias carries the bias pointer in its
    /// descriptor, so each such call makes its own (the same attributes; the cached algorithm
    /// fits it) and this one only served the choice.
    desc: Desc,
    algo: sys::cublasLtMatmulAlgo_t,
    /// Bytes of workspace the algorithm asks for (split-K partial sums); none is allocated
    /// for 0.
    ws: usize,
}

// SAFETY: a cuBLASLt handle may be used from any thread (calls are serialised per stream by
// the caller); the plan cache is behind a Mutex. A plan's layouts and descriptor are only read
// after they are made (cublasLtMatmul reads them; nothing sets an attribute on a cached one).
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle was created by cublasLtCreate and is destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    dtype: DType,
    out: DType,
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldd: usize,
    bias: bool,
    beta: bool,
    /// Alignment (bytes, up to 256) of cuBLASLt's A (our `b`), B (our `a`) and C = D.
    align: (u32, u32, u32),
}

/// The alignment of a device address in bytes, capped at 256 (cuBLASLt's default assumption:
/// an algorithm chosen for 256-byte aligned operands may fault on a row-offset sub-matrix).
fn alignment(p: CUdeviceptr) -> u32 {
    1u32 << p.trailing_zeros().min(8)
}

fn blas_err(op: &'static str) -> impl FnOnce(lt::CublasError) -> Error {
    move |e| Error::Cuda { op, msg: format!("{e:?}") }
}

fn data_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
    }
}

struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        unsafe {
            let _ = lt::destroy_matrix_layout(self.0);
        }
    }
}
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        unsafe {
            let _ = lt::destroy_matmul_desc(self.0);
        }
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        unsafe {
            let _ = lt::destroy_matmul_pref(self.0);
        }
    }
}

/// The column-major cuBLASLt call for a row-major product: `D^T (n x m) = op(B)^T op(A)^T`.
/// The first cuBLASLt operand is the B buffer: a row-major `k x n` B (ld `ldb`) is the
/// column-major `n x k` matrix `B^T`, used as is; a row-major `n x k` B (`transb`) is the
/// column-major `k x n` matrix, transposed by cuBLASLt. Likewise for A as the second operand.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ColMajor {
    /// cuBLASLt's TRANSA, TRANSB.
    pub trans: [bool; 2],
    /// `(rows, cols, ld)` of the first operand (B buffer), second (A buffer) and of D.
    pub layouts: [(usize, usize, usize); 3],
}

impl ColMajor {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plan(transa: bool, transb: bool, m: usize, n: usize, k: usize, lda: usize, ldb: usize, ldd: usize) -> Self {
        let first = if transb { (k, n, ldb) } else { (n, k, ldb) };
        let second = if transa { (m, k, lda) } else { (k, m, lda) };
        ColMajor { trans: [transb, transa], layouts: [first, second, (n, m, ldd)] }
    }
}

impl CudaBackend {
    fn lt(&self) -> Result<&Lt> {
        let r = self.blas.get_or_init(|| {
            // SAFETY: only tries to dlopen libcublasLt.
            if !unsafe { sys::is_culib_present() } {
                return Err("libcublasLt not found (install the CUDA toolkit's cuBLAS or add its lib dir to LD_LIBRARY_PATH)".into());
            }
            self.context().bind_to_thread().map_err(|e| e.to_string())?;
            let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
            Ok(Lt { handle, plans: Mutex::new(HashMap::new()) })
        });
        r.as_ref().map_err(|msg| Error::Cuda { op: "cuBLASLt", msg: msg.clone() })
    }

    /// Row-major `D[m x n] = op(A) op(B) (+ bias[n]) (+ beta D)`, where `op(A)` is `A`
    /// (`m x k`, row stride `lda`) or, with `transa`, the transpose of the `k x m` matrix `A`;
    /// likewise `op(B)` is `B` (`k x n`) or, with `transb`, the transpose of `n x k` `B`.
    ///
    /// # Safety
    /// The pointers must be valid device buffers of `dtype` for those shapes, on this
    /// backend's context, and `stream` must belong to it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn lt_gemm(
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
        self.lt_gemm_ex(op, dtype, dtype, stream, transa, transb, m, n, k, a, lda, b, ldb, bias, beta, d, ldd)
    }

    /// [`CudaBackend::lt_gemm`] with `A`, `B` of `dtype` and `D` of `out` (e.g. bf16 inputs
    /// with an f32 result, which `beta` then accumulates into in f32). `bias` is of `out`.
    ///
    /// # Safety
    /// As for [`CudaBackend::lt_gemm`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn lt_gemm_ex(
        &self,
        op: &'static str,
        dtype: DType,
        out: DType,
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
        if self.lt_matmul(op, dtype, out, stream, transa, transb, m, n, k, a, lda, b, ldb, bias, 1.0, beta, d, ldd)? {
            Ok(())
        } else {
            Err(Error::Cuda { op, msg: format!("cuBLASLt has no algorithm for {m}x{n}x{k} ({} -> {})", dtype.name(), out.name()) })
        }
    }

    /// [`CudaBackend::lt_gemm_ex`] with `alpha` (`D = alpha op(A) op(B) (+ bias) + beta D`),
    /// and `Ok(false)` instead of an error when cuBLASLt has no algorithm for the problem
    /// (then nothing was enqueued).
    ///
    /// # Safety
    /// As for [`CudaBackend::lt_gemm`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn lt_matmul(
        &self,
        op: &'static str,
        dtype: DType,
        out: DType,
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
        alpha: f32,
        beta: f32,
        d: CUdeviceptr,
        ldd: usize,
    ) -> Result<bool> {
        let h = self.lt()?;
        self.context().bind_to_thread().map_err(super::context::cuda_err(op))?;
        let align = (alignment(b), alignment(a), alignment(d));
        let key = Key { dtype, out, transa, transb, m, n, k, lda, ldb, ldd, bias: bias.is_some(), beta: beta != 0.0, align };
        let cached = h.plans.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        let plan = match cached {
            Some(p) => p,
            None => {
                let p = make_plan(h, op, &key)?.map(Arc::new);
                h.plans.lock().unwrap_or_else(|e| e.into_inner()).insert(key, p.clone());
                p
            }
        };
        let Some(plan) = plan else { return Ok(false) };
        let biased = bias.map(|bp| make_desc(op, &key, Some(bp))).transpose()?;
        let desc = biased.as_ref().unwrap_or(&plan.desc).0;
        let work = if plan.ws > 0 { Some(DeviceBuf::new(self, stream, plan.ws, op)?) } else { None };
        let [la, lb, ld] = &plan.layouts;
        self.count_launch();
        lt::matmul(
            h.handle,
            desc,
            &alpha as *const f32 as _,
            &beta as *const f32 as _,
            b as *const c_void,
            la.0,
            a as *const c_void,
            lb.0,
            d as *const c_void,
            ld.0,
            d as *mut c_void,
            ld.0,
            &plan.algo,
            work.as_ref().map_or(std::ptr::null_mut(), |w| w.ptr() as *mut c_void),
            plan.ws,
            stream as _,
        )
        .map_err(blas_err(op))?;
        Ok(true)
    }
}

/// The matmul descriptor of a problem: f32 compute, its transposes, and with `bias` the bias
/// epilogue on that pointer.
fn make_desc(op: &'static str, key: &Key, bias: Option<CUdeviceptr>) -> Result<Desc> {
    let desc = Desc(
        lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F).map_err(blas_err(op))?,
    );
    let set = |attr: sys::cublasLtMatmulDescAttributes_t, ptr: *const c_void, size: usize| {
        // SAFETY: `ptr` points at `size` bytes of the attribute's type.
        unsafe { lt::set_matmul_desc_attribute(desc.0, attr, ptr, size) }.map_err(blas_err(op))
    };
    let plan = ColMajor::plan(key.transa, key.transb, key.m, key.n, key.k, key.lda, key.ldb, key.ldd);
    let ta: i32 = plan.trans[0] as i32;
    let tb: i32 = plan.trans[1] as i32;
    set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &ta as *const i32 as _, 4)?;
    set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &tb as *const i32 as _, 4)?;
    if let Some(bp) = bias.as_ref() {
        let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
        set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi as *const _ as _, std::mem::size_of::<sys::cublasLtEpilogue_t>())?;
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            bp as *const CUdeviceptr as _,
            std::mem::size_of::<CUdeviceptr>(),
        )?;
    }
    Ok(desc)
}

/// The plan of a problem: its layouts and descriptor, and the algorithm cuBLASLt's heuristic
/// offers for operands of the key's alignment (`None`: it offers none).
fn make_plan(h: &Lt, op: &'static str, key: &Key) -> Result<Option<Plan>> {
    let dt = data_type(key.dtype);
    let cm = ColMajor::plan(key.transa, key.transb, key.m, key.n, key.k, key.lda, key.ldb, key.ldd);
    let [(r0, c0, l0), (r1, c1, l1), (r2, c2, l2)] = cm.layouts;
    // Each is destroyed by its wrapper's Drop.
    let layouts = [
        Layout(lt::create_matrix_layout(dt, r0 as u64, c0 as u64, l0 as i64).map_err(blas_err(op))?),
        Layout(lt::create_matrix_layout(dt, r1 as u64, c1 as u64, l1 as i64).map_err(blas_err(op))?),
        Layout(lt::create_matrix_layout(data_type(key.out), r2 as u64, c2 as u64, l2 as i64).map_err(blas_err(op))?),
    ];
    // The heuristic sees a descriptor with the bias epilogue when the problem has a bias
    // (any non-null pointer will do for choosing).
    let desc = make_desc(op, key, key.bias.then_some(256))?;
    let pref = Pref(lt::create_matmul_pref().map_err(blas_err(op))?);
    let ws = WORKSPACE;
    // SAFETY: each attribute gets a pointer to a value of its type.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref.0,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws as *const usize as _,
            std::mem::size_of::<usize>(),
        )
        .map_err(blas_err(op))?;
        // The operands' true alignment, so that the heuristic only offers algorithms
        // that can run on them (cuBLASLt assumes 256 bytes otherwise).
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let align = key.align;
        for (attr, v) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align.0),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align.1),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align.2),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align.2),
        ] {
            lt::set_matmul_pref_attribute(pref.0, attr, &v as *const u32 as _, 4).map_err(blas_err(op))?;
        }
    }
    let [la, lb, ld] = &layouts;
    // SAFETY: the handle, descriptor, layouts and preference are live.
    let heur = match unsafe { lt::get_matmul_algo_heuristic(h.handle, desc.0, la.0, lb.0, ld.0, ld.0, pref.0) } {
        Ok(heur) => heur,
        Err(lt::CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => return Ok(None),
        Err(e) => return Err(blas_err(op)(e)),
    };
    Ok(Some(Plan { layouts, desc, algo: heur.algo, ws: heur.workspaceSize }))
}

#[cfg(test)]
mod tests {
    use super::{alignment, ColMajor};

    #[test]
    fn alignment_is_the_largest_power_of_two_dividing_the_address_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0100 + 16), 16);
        assert_eq!(alignment(0x7f00_0000_0000 + 72 * 4), 32);
        assert_eq!(alignment(0x7f00_0000_0002), 2);
        assert_eq!(alignment(0), 256);
    }

    /// What cuBLASLt computes from a plan, in column-major terms, on the raw buffers:
    /// `D(i, j) = sum_l op0(i, l) op1(l, j)`, `X(r, c) = buf[r + c * ld]`.
    fn run_colmajor(p: &ColMajor, first: &[f64], second: &[f64], d: &mut [f64]) {
        let [(r0, c0, l0), (r1, c1, l1), (rd, cd, ldd)] = p.layouts;
        let (m, k) = if p.trans[0] { (c0, r0) } else { (r0, c0) };
        let (k2, n) = if p.trans[1] { (c1, r1) } else { (r1, c1) };
        assert_eq!(k, k2, "inner dimensions");
        assert_eq!((rd, cd), (m, n), "D layout");
        assert!(l0 >= r0 && l1 >= r1 && ldd >= rd, "column-major ld smaller than rows");
        let x0 = |i: usize, l: usize| if p.trans[0] { first[l + i * l0] } else { first[i + l * l0] };
        let x1 = |l: usize, j: usize| if p.trans[1] { second[j + l * l1] } else { second[l + j * l1] };
        for i in 0..m {
            for j in 0..n {
                d[i + j * ldd] = (0..k).map(|l| x0(i, l) * x1(l, j)).sum();
            }
        }
    }

    #[test]
    fn column_major_plan_computes_the_row_major_product() {
        let (m, n, k) = (5usize, 7usize, 3usize);
        for transa in [false, true] {
            for transb in [false, true] {
                let (lda, ldb, ldd) = (if transa { m } else { k } + 2, if transb { k } else { n } + 1, n + 3);
                let a: Vec<f64> = (0..(if transa { k } else { m }) * lda).map(|i| (i as f64 * 0.37).sin()).collect();
                let b: Vec<f64> = (0..(if transb { n } else { k }) * ldb).map(|i| (i as f64 * 0.91).cos()).collect();
                let mut d = vec![f64::NAN; m * ldd];
                let plan = ColMajor::plan(transa, transb, m, n, k, lda, ldb, ldd);
                run_colmajor(&plan, &b, &a, &mut d);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|l| {
                                let av = if transa { a[l * lda + i] } else { a[i * lda + l] };
                                let bv = if transb { b[j * ldb + l] } else { b[l * ldb + j] };
                                av * bv
                            })
                            .sum();
                        let got = d[i * ldd + j];
                        assert!((got - want).abs() < 1e-12, "transa={transa} transb={transb} D[{i},{j}]: {got} vs {want}");
                    }
                }
            }
        }
    }
}
