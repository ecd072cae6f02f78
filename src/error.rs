//! The one error type of the crate. Every variant carries what a user needs to fix the call:
//! the argument, the shapes involved, the file or tensor.

use std::path::PathBuf;

/// Result alias used by every public function of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `wegeft`. A panic inside the library is a bug; bad input
/// always comes back as one of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A dimension that must be positive was zero (e.g. rank 0, no tokens).
    #[error("{what} must be positive, got 0")]
    ZeroDim { what: &'static str },

    /// A matrix argument has the wrong shape.
    #[error("{arg}: expected shape {expected:?}, got {got:?}")]
    Shape { arg: &'static str, expected: (usize, usize), got: (usize, usize) },

    /// A vector argument (bias) has the wrong length.
    #[error("{arg}: expected length {expected}, got {got}")]
    Len { arg: &'static str, expected: usize, got: usize },

    /// A matrix view does not fit its buffer, or its row stride is smaller than its width.
    #[error("{arg}: a {rows}x{cols} view with row stride {ld} needs {needed} elements, buffer has {len}")]
    Layout { arg: &'static str, rows: usize, cols: usize, ld: usize, needed: usize, len: usize },

    /// A row stride smaller than the number of columns.
    #[error("{arg}: row stride {ld} is smaller than the {cols} columns")]
    Stride { arg: &'static str, ld: usize, cols: usize },

    /// Two arguments that must have the same dtype do not.
    #[error("{arg}: expected dtype {expected}, got {got}")]
    DType { arg: &'static str, expected: &'static str, got: &'static str },

    /// A device pointer or buffer that must be aligned is not.
    #[error("{arg}: address {addr:#x} is not {align}-byte aligned")]
    Align { arg: &'static str, addr: usize, align: usize },

    /// A size whose element count overflows `usize`.
    #[error("{what}: size overflows ({rows} x {cols})")]
    Overflow { what: &'static str, rows: usize, cols: usize },

    /// A numeric failure, e.g. a singular matrix in the unmerge solve.
    #[error("numerical error: {0}")]
    Numerical(String),

    /// Any other invalid argument, described in words.
    #[error("invalid argument {arg}: {msg}")]
    Invalid { arg: &'static str, msg: String },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, #[source] source: std::io::Error },

    /// A file was read but its content is wrong (corrupt, truncated, missing tensor...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },

    /// The CUDA backend is not available (no driver, no device, or built without `cuda`).
    #[error("CUDA unavailable: {0}")]
    NoCuda(String),

    /// An error reported by the CUDA driver, cuBLAS or a kernel launch.
    #[error("CUDA error in {op}: {msg}")]
    Cuda { op: &'static str, msg: String },
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(arg: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid { arg, msg: msg.into() }
    }
    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// Shorthand for [`Error::Format`].
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
}
