//! Training: the optimiser ([`optim`]), data ([`data`]: JSONL records, batching), the built-in
//! task ([`arithmetic`]) and the loop's core ([`trainer`]).
pub mod arithmetic;
pub mod data;
pub mod optim;
pub mod trainer;
