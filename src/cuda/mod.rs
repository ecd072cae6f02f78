//! The CUDA backend (feature `cuda`): hand-written kernels from `kernels/*.cu`, compiled by
//! `build.rs` and embedded, driven through cudarc (libcuda loaded at run time, so the crate
//! builds and its CPU tests run without CUDA).
//!
//! * [`context`]: [`CudaBackend`], one device: driver check ([`Error::NoCuda`](crate::Error)
//!   without a driver or device), context, default stream, kernel modules.
//! * [`kernels`]: the embedded PTX/cubins and the `ptxas -v` report ([`kernels::PTXAS_REPORT`]).
//! * [`layer`]: the layer API — `wegeft_forward`, `wegeft_backward`, `wegeft_merge`,
//!   `wegeft_unmerge`, `lora_forward`, `lora_backward`, `frozen_forward`, `frozen_backward` on
//!   `CudaSlice`s, and `*_raw` twins on `CUdeviceptr` + `CUstream` for frameworks.
//!
//! The math is the one of [`crate::reference`]; see [`layer`] for the formulas.
//!
//! # For the fused K-extended GEMM (`gemm.rs`)
//!
//! `build.rs` emits `--cfg wegeft_gemm` when `src/cuda/gemm.rs` exists; then this module
//! declares `pub mod gemm;` and [`layer`] calls (in `unsafe` blocks, with integer arguments
//! passed as `as _`):
//!
//! ```ignore
//! crate::cuda::gemm::gemm_kext_nt::<T>(dev: &CudaBackend, stream: CUstream,
//!     a1: CUdeviceptr, lda1, b1: CUdeviceptr, ldb1, k1,
//!     a2: CUdeviceptr, lda2, b2: CUdeviceptr, ldb2, k2,
//!     bias: Option<CUdeviceptr>, beta: f32, d: CUdeviceptr, ldd, m, n) -> crate::Result<()>
//! //  D[m x n] = A1 B1^T + A2 B2^T (+ bias[n]) (+ beta D); A1 m x k1, B1 n x k1, A2 m x k2, B2 n x k2
//! crate::cuda::gemm::gemm_kext_nn::<T>(/* same arguments; bias is always None */)
//! //  D[m x n] = A1 B1 + A2 B2;   A1 m x k1, B1 k1 x n, A2 m x k2, B2 k2 x n
//! ```
//!
//! with `T: crate::Element`, row-major operands, leading dimensions in elements. The kernels
//! are looked up with `CudaBackend::function(&self, name: &str) -> crate::Result<CudaFunction>`
//! (`pub(crate)`; any `extern "C"` kernel of any `kernels/*.cu`) and launched with
//! `CudaBackend::launch(&self, op: &'static str, f: &CudaFunction, grid: (u32, u32, u32),
//! block: (u32, u32, u32), smem: u32, stream: CUstream, params: &mut [*mut c_void])`
//! (`pub(crate) unsafe`), which maps errors to `Error::Cuda`. `compute_capability()` and
//! `sm_count()` describe the device. Under `Path::Auto` the fused GEMM is used when every
//! leading dimension is a multiple of 16 bytes; `Path::Fused` always uses it.

mod blas;
pub mod context;
#[cfg(wegeft_gemm)]
pub mod gemm;
pub mod kernels;
pub mod layer;
mod mem;
mod product;

pub use context::{driver_present, CudaBackend, Image};
pub use layer::{dropout_hash, dropout_keep, Dropout, Launch, Path, FUSED_GEMM_BUILT};
