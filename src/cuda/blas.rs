//! The frozen GEMMs through cuBLASLt on raw device pointers: `y = x W^T (+ b)` and `dx = G W`.
//! Row-major in, row-major out (cuBLASLt is column-major: a row-major `D = A B` is run as the
//! column-major `D^T = B^T A^T`). Compute in f32 (`CUBLAS_COMPUTE_32F`, no TF32 for f32
//! storage), so results agree with the reference to the storage type's precision.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::context::CudaBackend;
use super::mem::DeviceBuf;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Workspace handed to cuBLASLt for each call (stream-ordered allocation from the pool).
const WORKSPACE: usize = 32 << 20;

/// The cuBLASLt handle and a cache of the algorithm chosen for each problem.
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    algos: Mutex<HashMap<Key, sys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: a cuBLASLt handle may be used from any thread (calls are serialised per stream by
// the caller); the algorithm cache is behind a Mutex.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

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

impl CudaBackend {
    fn lt(&self) -> Result<&Lt> {
        let r = self.blas.get_or_init(|| {
            // SAFETY: only tries to dlopen libcublasLt.
            if !unsafe { sys::is_culib_present() } {
                return Err("libcublasLt not found (install the CUDA toolkit's cuBLAS or add its lib dir to LD_LIBRARY_PATH)".into());
            }
            self.context().bind_to_thread().map_err(|e| e.to_string())?;
            let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
            Ok(Lt { handle, algos: Mutex::new(HashMap::new()) })
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
        let h = self.lt()?;
        self.context().bind_to_thread().map_err(super::context::cuda_err(op))?;
        let dt = data_type(dtype);
        // Column-major view: D^T (n x m) = op(B)^T (n x k) op(A)^T (k x m).
        // First operand: the B buffer. Row-major k x n (ld ldb) is column-major n x k: no op.
        // Row-major n x k (transb) is column-major k x n: transpose it.
        let (b_rows, b_cols) = if transb { (k, n) } else { (n, k) };
        let (a_rows, a_cols) = if transa { (m, k) } else { (k, m) };
        let la = Layout(lt::create_matrix_layout(dt, b_rows as u64, b_cols as u64, ldb as i64).map_err(blas_err(op))?);
        let lb = Layout(lt::create_matrix_layout(dt, a_rows as u64, a_cols as u64, lda as i64).map_err(blas_err(op))?);
        let ld = Layout(lt::create_matrix_layout(dt, n as u64, m as u64, ldd as i64).map_err(blas_err(op))?);
        let desc = Desc(
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(blas_err(op))?,
        );
        let set = |attr: sys::cublasLtMatmulDescAttributes_t, ptr: *const c_void, size: usize| {
            lt::set_matmul_desc_attribute(desc.0, attr, ptr, size).map_err(blas_err(op))
        };
        let ta: i32 = transb as i32;
        let tb: i32 = transa as i32;
        set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &ta as *const i32 as _, 4)?;
        set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &tb as *const i32 as _, 4)?;
        if let Some(bp) = bias.as_ref() {
            let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epi as *const _ as _,
                std::mem::size_of::<sys::cublasLtEpilogue_t>(),
            )?;
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                bp as *const CUdeviceptr as _,
                std::mem::size_of::<CUdeviceptr>(),
            )?;
        }
        let key = Key { dtype, transa, transb, m, n, k, lda, ldb, ldd, bias: bias.is_some(), beta: beta != 0.0 };
        let cached = h.algos.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied();
        let algo = match cached {
            Some(a) => a,
            None => {
                let pref = Pref(lt::create_matmul_pref().map_err(blas_err(op))?);
                let ws = WORKSPACE;
                lt::set_matmul_pref_attribute(
                    pref.0,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const usize as _,
                    std::mem::size_of::<usize>(),
                )
                .map_err(blas_err(op))?;
                let heur = lt::get_matmul_algo_heuristic(h.handle, desc.0, la.0, lb.0, ld.0, ld.0, pref.0)
                    .map_err(blas_err(op))?;
                h.algos.lock().unwrap_or_else(|e| e.into_inner()).insert(key, heur.algo);
                heur.algo
            }
        };
        let work = DeviceBuf::new(self, stream, WORKSPACE, op)?;
        let alpha = 1.0f32;
        lt::matmul(
            h.handle,
            desc.0,
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
            &algo,
            work.ptr() as *mut c_void,
            WORKSPACE,
            stream as _,
        )
        .map_err(blas_err(op))
    }
}
