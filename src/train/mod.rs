//! Training: the optimiser ([`optim`]).
pub mod optim;
