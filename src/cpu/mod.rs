//! The CPU backend: the same math as [`crate::reference`], in f32 on top of the `gemm` crate
//! and rayon.
//!
//! * [`gemm`]: a safe, checked wrapper for strided row-major products
//!   `C <- alpha C + beta op(A) op(B)` (also used by the model code);
//! * [`layer`]: the WeGeFT layer (forward, backward, merge, exact unmerge) on the K-extended
//!   formulation, and the frozen layer and LoRA for comparison;
//! * [`ops`] — the non-WeGeFT Llama ops (embedding, RMSNorm, RoPE, GQA attention, SwiGLU,
//!   cross-entropy), each forward paired with its backward;
//! * [`attention`]: training-time attention as per-head GEMMs and SwiGLU with a vectorizable
//!   exponential (faster twins of the [`ops`] versions, tested against them);
//! * [`multi`]: many adapters in one batch (per-token adapter indices, the input-side edit
//!   `h = x + s (x psi_a^T) phi_a^T` then one shared GEMM);
//! * [`backend`]: [`Cpu`], the [`crate::backend::Backend`] on host memory.

pub mod attention;
pub mod backend;
pub mod gemm;
pub mod layer;
pub mod multi;
pub mod ops;
mod scratch;

pub use backend::Cpu;
pub use layer::{
    frozen_backward, frozen_forward, lora_backward, lora_forward, wegeft_backward, wegeft_forward, wegeft_merge,
    wegeft_unmerge, LoraSaved, Saved,
};
