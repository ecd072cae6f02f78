//! The CUDA backend (feature `cuda`): hand-written kernels from `kernels/*.cu`, compiled by
//! `build.rs` and embedded, driven through cudarc (libcuda loaded at run time, so the crate
//! builds and its CPU tests run without CUDA).
//!
//! * [`context`]: [`CudaBackend`], one device: driver check ([`Error::NoCuda`](crate::Error)
//!   without a driver or device), context, default stream, kernel modules, the
//!   [`ProductEngine`] of the rank-r products.
//! * [`kernels`]: the embedded PTX/cubins and the `ptxas -v` report ([`kernels::PTXAS_REPORT`]).
//! * [`attention`]: causal GQA attention forward, backward and decode (`kernels/attention.cu`):
//!   safe `attention_*` on `CudaSlice`s and `attention_*_raw` on `CUdeviceptr` + `CUstream`.
//! * [`layer`]: the layer API — `wegeft_forward`, `wegeft_backward`, `wegeft_merge`,
//!   `wegeft_unmerge`, `lora_forward`, `lora_backward`, `frozen_forward`, `frozen_backward` on
//!   `CudaSlice`s, and `*_raw` twins on `CUdeviceptr` + `CUstream` for frameworks.
//!
//! * [`backend`]: [`Gpu`], the [`crate::backend::Backend`] of the Llama model on the device
//!   (bf16 frozen weights, f32 activations and adapter state), over the kernels of
//!   `kernels/{embedding,rmsnorm,rope,swiglu,xent,adamw,elementwise}.cu` and `kernels/attention.cu` ([`attention`]).
//!
//! * [`multi`]: many adapters in one batch (`multi_edit_T`, the per-token input edit, then
//!   one frozen GEMM).
//!
//! The math is the one of [`crate::reference`]; see [`layer`] for the formulas.
//!
//! # The fused K-extended GEMM ([`gemm`])
//!
//! `build.rs` emits `--cfg wegeft_gemm` when `src/cuda/gemm.rs` exists. `exec.rs`
//! (`Exec::kext_fused`) fills a `gemm::GemmKext` and calls `gemm::gemm_kext_nt::<T>` (forward,
//! `D = A1 B1^T + A2 B2^T (+ bias)`) or `gemm::gemm_kext_nn::<T>` (input gradient,
//! `D = A1 B1 + A2 B2`) on the caller's raw stream; kernels come from
//! `CudaBackend::function` and are launched with `CudaBackend::launch`, which maps errors to
//! `Error::Cuda`. [`Path::Fused`] and [`Path::FusedSm90`] (wgmma kernels on compute capability
//! 9.0) use it; [`Path::Tuned`] times the candidates on the first call of each shape and keeps
//! the fastest ([`tune`]); [`Path::Auto`], the default, is [`Path::Composed`] (cuBLASLt plus
//! the rank-r products), which was as fast as or faster than the fused paths on an H200 in the
//! training step and every layer backward measured (BENCHMARKS.md).
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
//! Rank-r products accumulate in f32. By default ([`ProductEngine::CublasLt`]) they run in
//! cuBLASLt like the frozen GEMMs, with `CUBLAS_COMPUTE_32F` (no TF32 for f32 storage); the
//! bf16 `dphi`, whose `S` is f32, runs as two bf16 products of `S`'s high and low bf16 parts.
//! The masked products (dropout on W), the f16 `dphi` and the 16-bit unmerge run on the tile
//! kernels of `kernels/lowrank.cu` and `merge.cu` (all of them with [`ProductEngine::Tiles`]):
//! with f32 storage an FMA loop; with bf16 / f16 storage TF32 WMMA, exact for 16-bit inputs
//! (an f32 `S` in `dphi` is split in two TF32 terms); reductions over tokens split-K with a
//! fixed-order sum. Every result is bitwise reproducible on a given device (cuBLASLt's
//! algorithms are deterministic for a given problem and device; `tests/cuda_layer.rs` checks
//! both engines).
//!
//! The rank-r products are skinny (`r` columns) and memory-bound on a large layer; the tile
//! kernels reach a few tens of TFLOP/s there, cuBLASLt several times that (BENCHMARKS.md,
//! `Composed` against `ComposedTiles`).

mod arg;
pub mod attention;
pub mod backend;
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
pub mod multi;
mod product;
pub mod tune;

pub use backend::{Gpu, GpuBuf, GpuSaved};
pub use context::{driver_present, CudaBackend, Image, ProductEngine};
pub use layer::{dropout_hash, dropout_keep, Dropout, Launch, Path, FUSED_GEMM_BUILT};
pub use tune::{TuneKey, Tuned};
