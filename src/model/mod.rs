//! The Llama model: [`llama`] (written once over the [`crate::backend::Backend`] trait).
pub mod llama;
