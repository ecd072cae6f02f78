//! Training: the optimiser ([`optim`]) and its learning-rate schedule ([`schedule`]), data
//! ([`data`]: JSONL records, batching), the built-in task ([`arithmetic`]), the loop's core
//! ([`trainer`]: gradient accumulation and clipping) and run checkpoints ([`checkpoint`]).
pub mod arithmetic;
pub mod data;
pub mod optim;
pub mod schedule;
pub mod trainer;
pub mod checkpoint;
