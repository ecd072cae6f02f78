//! Training: the optimiser ([`optim`]), data ([`data`]: JSONL records, batching), the built-in
//! task ([`arithmetic`]), the loop's core ([`trainer`]) and run checkpoints ([`checkpoint`]).
pub mod arithmetic;
pub mod data;
pub mod optim;
pub mod trainer;
pub mod checkpoint;
