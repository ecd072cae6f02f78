//! The CPU backend (to be filled in).
