//! The CPU backend: f32 compute over the `gemm` crate and rayon.
//!
//! * [`ops`] — the non-WeGeFT Llama ops (embedding, RMSNorm, RoPE, GQA attention, SwiGLU,
//!   cross-entropy), each forward paired with its backward.
pub mod ops;
