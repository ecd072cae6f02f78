//! # wegeft
//!
//! Kernels and a training harness for **WeGeFT** (Weight-Generative Fine-Tuning, ICML 2025).
//!
//! A frozen linear layer `W` (`d_out x d_in`) is adapted by a pair of trainable matrices
//! `phi` (`d_in x r`) and `psi` (`r x d_in`), one pair per module type shared by every layer:
//!
//! ```text
//! W' = W + s W phi psi            (s = alpha / r where a scale is asked for, else 1)
//! ```
//!
//! For tokens `x` (`T x d_in`), with `C = s W phi` (`d_out x r`) and `u = x psi^T` (`T x r`):
//!
//! * forward: `y = x W^T + u C^T (+ b)` — one GEMM over `K = d_in + r`:
//!   `y = [x | u] [W | C]^T`. The `d_out x d_in` matrix `W phi psi` is never built.
//! * backward from `G = dL/dy`: `v = G C`, `S = G^T u`; `dx = G W + v psi = [G | v] [W ; psi]`;
//!   `dphi = s W^T S`; `dpsi = v^T x`. Summed over the layers sharing the pair; no gradient
//!   for `W`.
//! * merge: `W <- W + C psi`; exact unmerge with
//!   `(I + s phi psi)^-1 = I - s phi (I_r + s psi phi)^-1 psi`.
//!
//! The official PyTorch code stores `in_proj.weight = phi^T` and `out_proj.weight = psi^T`.
//!
//! Many adapters in one batch (multi-tenant inference): since `x W'^T = h W^T` with
//! `h = x + s (x psi^T) phi^T`, each token applies its own adapter as a rank-`r` input edit and
//! all tokens share one GEMM with `W` ([`cpu::multi`], `cuda::multi`,
//! [`model::llama::Llama::generate_multi`]).
//!
//! Modules: [`reference`](mod@reference) (float64 oracle), [`cpu`] (fast CPU backend), `cuda` (feature
//! `cuda`), [`backend`] (the trait the model runs on), [`model`] (the Llama model
//! [`model::llama`], its config, weights, tokenizer), [`adapter`] (config, init, files),
//! [`train`] (AdamW, data, the arithmetic task, the trainer), [`rope`] (RoPE's frequencies and
//! scalings), [`shape`] (shapes and matrix
//! views), [`error`].
//!
//! Fine-tuning from Rust, on the CPU:
//!
//! ```no_run
//! use wegeft::adapter::{Adapter, AdapterConfig, Module};
//! use wegeft::cpu::Cpu;
//! use wegeft::model::llama::{Batch, HostAdapter, HostWeights, Llama};
//! use wegeft::model::LlamaWeights;
//! use wegeft::train::{optim::AdamWConfig, trainer::Trainer};
//!
//! let w = LlamaWeights::load(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let model = Llama::from_host(&Cpu, HostWeights::from_llama(w)?)?;
//! let config = AdapterConfig::new(8, vec![Module::QProj, Module::VProj])?;
//! let init = HostAdapter::from_adapter(&Adapter::new(config, model.dims.adapter_dims()?)?)?;
//! let opt = AdamWConfig { lr: 2e-3, weight_decay: 0.0, ..AdamWConfig::default() };
//! let mut trainer = Trainer::new(&Cpu, &model, &init, opt)?;
//! let loss = trainer.step(&Batch::causal(&[vec![504, 3575, 282, 4649, 314]])?)?; // before the update
//! # Ok::<(), wegeft::Error>(())
//! ```

// `!(a <= b)` is how the checks reject NaN along with out-of-range values; indexed loops
// over several arrays at once read closest to the formulas.
#![allow(clippy::neg_cmp_op_on_partial_ord, clippy::needless_range_loop)]

pub mod adapter;
pub mod backend;
#[cfg(feature = "candle")]
pub mod candle;
pub mod capi;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod model;
pub mod reference;
pub mod rng;
pub mod rope;
pub mod shape;
pub mod train;

pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use shape::{LayerShape, Mat, MatMut};
