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
//! declares `pub mod gemm;` and `exec.rs` (`Exec::kext_fused`) calls (in `unsafe` blocks, integer arguments
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
//!
//! Every `kernels/*.cu` is compiled three times: PTX for `compute_80`, cubins for `sm_80` and
//! `sm_90a`; the device loads the `sm_90a` cubin on compute capability 9.0, the `sm_80` one
//! on 8.x, the PTX elsewhere. Code that needs Hopper features (wgmma, TMA, setmaxnreg) must
//! sit under `#if defined(__CUDA_ARCH_FEAT_SM90_ALL)` (defined only for `sm_90a`) with an
//! `sm_80` fallback in the `#else`, so that the `compute_80` PTX and the `sm_80` cubin build.
//! `tests/ptxas.rs` fails when any kernel spills or has a stack frame.
//!
//! # Precision
//!
//! Rank-r products accumulate in f32. With f32 storage they run as an FMA loop; with bf16 /
//! f16 storage on the tensor cores as TF32 WMMA, exact for 16-bit inputs (an f32 `S` in `dphi`
//! is split in two TF32 terms). The frozen GEMMs run in cuBLASLt with `CUBLAS_COMPUTE_32F`
//! (no TF32 for f32 storage). Reductions over tokens are split-K with a fixed-order sum, so
//! every result is bitwise reproducible on a given device.

mod blas;
pub mod context;
mod exec;
#[cfg(test)]
mod host_exec;
#[cfg(wegeft_gemm)]
pub mod gemm;
pub mod kernels;
pub mod layer;
mod mem;
mod product;

pub use context::{driver_present, CudaBackend, Image};
pub use layer::{dropout_hash, dropout_keep, Dropout, Launch, Path, FUSED_GEMM_BUILT};
