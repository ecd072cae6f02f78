//! The CPU backend: [`backend::Cpu`] implements [`crate::backend::Backend`] on host memory.
pub mod backend;

pub use backend::Cpu;
