//! The Llama model: [`llama`] (the network, written once over the [`crate::backend::Backend`]
//! trait) and its files: hyper-parameters ([`config`]), weights from GGUF or HF safetensors
//! ([`weights`]), the tokenizer ([`tokenizer`]) and chat prompts ([`chat`]).
//!
//! ```no_run
//! use wegeft::model::{LlamaWeights, Tokenizer};
//! let path = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";
//! let weights = LlamaWeights::load(path)?;          // f32, HF names, q/k un-permuted
//! let tok = Tokenizer::from_gguf(path)?;
//! let ids = tok.encode("The capital of France is", false)?; // [504, 3575, 282, 4649, 314]
//! let prompt = tok.chat_prompt("What is the capital of France?")?;
//! # Ok::<(), wegeft::Error>(())
//! ```

pub mod chat;
pub mod config;
pub mod llama;
pub mod tokenizer;
pub mod weights;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{LlamaConfig, Multipliers};
pub use tokenizer::Tokenizer;
pub use weights::gguf::GgufFile;
pub use weights::{LayerWeights, LlamaWeights, Tensor, LINEAR_MODULES};

/// Where `scripts/fetch-model.sh` puts the SmolLM2-135M-Instruct GGUF, relative to the
/// repository root.
pub const DEFAULT_MODEL_PATH: &str = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";
