//! [`Path::Tuned`]: each K-extended product (`y = [x|u][W|C]^T`, `dx = [G|v][W;psi]`) runs on
//! whichever path was fastest for its shape, measured on the device the first time that shape
//! is seen.
//!
//! The first call of a shape runs every candidate path (`Exec::tune_candidates`: composed,
//! and the fused GEMM's sm_80 and, on compute capability 9.0, sm_90a kernels where its vector
//! loads apply) once to warm up and [`TUNE_REPS`] times between CUDA events on the caller's
//! stream, waiting for each; the lowest median wins. The winner runs last, so the call's output
//! is the winner's, exactly what later calls of that shape compute. The choice is kept per
//! device (its [`TuneTable`]) for the life of the process: [`crate::cuda::CudaBackend::tuned_paths`]
//! lists it, [`crate::cuda::CudaBackend::pin_path`] fixes one by hand (a table read from an
//! earlier run, say).
//!
//! Reproducibility: every path is deterministic, but the paths round differently, and two
//! processes may pick different winners for a shape where two paths time within noise. Under
//! `Tuned` results are therefore bitwise reproducible within a process, not across processes
//! (as with cuDNN's benchmark mode); pin the paths, or use [`Path::Auto`], where that matters.
//! Tuning waits for the stream, so it must not run while the stream is being captured into a
//! CUDA graph.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::exec::Exec;
use super::layer::Path;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Timed runs per candidate (after one warm-up run); the median counts.
pub const TUNE_REPS: usize = 5;

/// One operand pair of a K-extended product: `(a, lda, b, ldb, k)`.
pub(crate) type Pair = (CUdeviceptr, usize, CUdeviceptr, usize, usize);

/// What a tuned choice is remembered by: the product's form, dtype and sizes, its leading
/// dimensions, whether it adds a bias, and whether its operands suit the fused GEMM's 16-byte
/// vector loads (which decides the candidates).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TuneKey {
    /// `true`: `D = A1 B1^T + A2 B2^T` (forward); `false`: `D = A1 B1 + A2 B2` (input gradient).
    pub nt: bool,
    pub dtype: DType,
    pub m: usize,
    pub n: usize,
    pub k1: usize,
    pub k2: usize,
    /// `(lda1, ldb1, lda2, ldb2, ldd)`.
    pub lds: (usize, usize, usize, usize, usize),
    pub bias: bool,
    /// Both operand pairs are 16-bit, 16-byte aligned, with leading dimensions multiples of 8.
    pub vector_loads: bool,
}

impl TuneKey {
    pub(crate) fn new(nt: bool, dtype: DType, p1: Pair, p2: Pair, bias: bool, (ldd, m, n): (usize, usize, usize)) -> Self {
        let (a1, lda1, b1, ldb1, k1) = p1;
        let (a2, lda2, b2, ldb2, k2) = p2;
        TuneKey {
            nt,
            dtype,
            m,
            n,
            k1,
            k2,
            lds: (lda1, ldb1, lda2, ldb2, ldd),
            bias,
            vector_loads: vector_loads(dtype, (a1, lda1, b1, ldb1)) && (k2 == 0 || vector_loads(dtype, (a2, lda2, b2, ldb2))),
        }
    }
}

/// Whether an operand pair gets the fused GEMM's 16-byte `cp.async` loads: a 2-byte dtype, both
/// pointers 16-byte aligned, both leading dimensions multiples of 8 elements.
pub(crate) fn vector_loads(dtype: DType, (a, lda, b, ldb): (CUdeviceptr, usize, CUdeviceptr, usize)) -> bool {
    dtype != DType::F32 && (a | b) % 16 == 0 && lda % 8 == 0 && ldb % 8 == 0
}

/// A tuned choice: the winner and the median milliseconds of every candidate, in the order run.
#[derive(Clone, Debug, PartialEq)]
pub struct Tuned {
    pub path: Path,
    pub timings: Vec<(Path, f64)>,
}

/// The choices made so far on one device.
#[derive(Debug, Default)]
pub struct TuneTable(Mutex<HashMap<TuneKey, Tuned>>);

impl TuneTable {
    pub(crate) fn get(&self, key: &TuneKey) -> Option<Path> {
        self.0.lock().ok()?.get(key).map(|t| t.path)
    }
    pub(crate) fn insert(&self, key: TuneKey, tuned: Tuned) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(key, tuned);
        }
    }
    /// Every choice, in no particular order.
    pub(crate) fn entries(&self) -> Vec<(TuneKey, Tuned)> {
        self.0.lock().map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect()).unwrap_or_default()
    }
}

/// Runs `run` on the path tuned for `key`, tuning it first when it is new (see the module docs).
///
/// # Safety
/// `run(path)` must be safe to call repeatedly, on any candidate path: it overwrites its output
/// and reads nothing it writes.
pub(crate) unsafe fn run_tuned<E: Exec + ?Sized>(
    exec: &E,
    stream: CUstream,
    key: TuneKey,
    run: &dyn Fn(Path) -> Result<()>,
) -> Result<()> {
    if let Some(path) = exec.tune_table().get(&key) {
        return run(path);
    }
    let candidates = exec.tune_candidates(key.dtype, key.vector_loads);
    let mut timings = Vec::with_capacity(candidates.len());
    for &path in &candidates {
        run(path)?;
        let mut ms = Vec::with_capacity(TUNE_REPS);
        for _ in 0..TUNE_REPS {
            ms.push(unsafe { exec.time_ms(stream, path, &mut || run(path))? });
        }
        ms.sort_by(f64::total_cmp);
        timings.push((path, ms[TUNE_REPS / 2]));
    }
    let &(best, _) = timings
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .ok_or_else(|| Error::invalid("path", "no path to tune over"))?;
    if candidates.last() != Some(&best) {
        run(best)?;
    }
    exec.tune_table().insert(key, Tuned { path: best, timings });
    Ok(())
}

impl super::context::CudaBackend {
    /// The choices [`Path::Tuned`] has made on this device so far, with every candidate's median
    /// milliseconds, sorted by key.
    pub fn tuned_paths(&self) -> Vec<(TuneKey, Tuned)> {
        let mut v = self.tuned.entries();
        v.sort_by_key(|(k, _)| (k.nt, k.dtype.name(), k.m, k.n, k.k1, k.k2, k.lds, k.bias, k.vector_loads));
        v
    }

    /// Makes [`Path::Tuned`] use `path` for `key` without timing it (`Auto`, `Fused`,
    /// `FusedSm90` or `Composed`; a fused path must be built in).
    pub fn pin_path(&self, key: TuneKey, path: Path) -> Result<()> {
        match path {
            Path::Tuned => return Err(Error::invalid("path", "a pinned path must be a concrete one, not Path::Tuned")),
            Path::Fused | Path::FusedSm90 if !super::layer::FUSED_GEMM_BUILT => {
                return Err(Error::invalid("path", "the fused K-extended GEMM is not built in"))
            }
            _ => {}
        }
        self.tuned.insert(key, Tuned { path, timings: Vec::new() });
        Ok(())
    }
}
