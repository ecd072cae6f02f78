//! A small safe wrapper over the [`gemm`] crate for row-major strided matrix products.
//!
//! ```text
//! C <- alpha * C + beta * op(A) op(B)        op(X) = X or X^T
//! ```
//!
//! (`alpha` scales the old `C`, `beta` the product: the `gemm` crate's naming, kept so the two
//! read alike.) With `alpha == 0` the old contents of `C` are never read, so `C` may hold
//! anything (even NaN). Transposes cost nothing: a row-major `rows x cols` view with row stride
//! `ld` is, transposed, a `cols x rows` matrix with row stride 1 and column stride `ld`, and the
//! `gemm` crate takes both strides.
//!
//! Products of fewer than [`PARALLEL_THRESHOLD`] multiply-adds run on the calling thread; larger
//! ones on the rayon pool. Scalars: `f32` and `f64` ([`Scalar`], sealed). Half-precision storage
//! is converted to `f32` by the callers (see [`crate::cpu::layer`]) and accumulated in `f32`.

use crate::error::{Error, Result};
use crate::shape::{Mat, MatMut};

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `op(X) = X`.
    N,
    /// `op(X) = X^T`.
    T,
}

/// Products with at least this many multiply-adds (`m * n * k`) run on the rayon pool.
pub const PARALLEL_THRESHOLD: usize = 64 * 64 * 64;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A scalar the `gemm` crate multiplies natively: `f32` or `f64`.
pub trait Scalar:
    sealed::Sealed + Copy + Send + Sync + PartialEq + Default + std::ops::Mul<Output = Self> + 'static
{
    /// The additive identity.
    const ZERO: Self;
}
impl Scalar for f32 {
    const ZERO: Self = 0.0;
}
impl Scalar for f64 {
    const ZERO: Self = 0.0;
}

/// `(rows, cols, row stride, col stride)` of `op(X)` for a row-major view `X`.
fn op_dims<F>(x: &Mat<'_, F>, op: Op) -> (usize, usize, isize, isize) {
    let ld = stride(x.rows(), x.cols(), x.ld());
    match op {
        Op::N => (x.rows(), x.cols(), ld, 1),
        Op::T => (x.cols(), x.rows(), 1, ld),
    }
}

/// The row stride to hand to `gemm`. With two rows or more, `ld < data.len() <= isize::MAX`
/// (a slice never exceeds `isize::MAX` bytes); a single row never moves by its stride, so any
/// `ld` a view allows (up to `usize::MAX`) is replaced by `cols`.
fn stride(rows: usize, cols: usize, ld: usize) -> isize {
    let ld = if rows <= 1 { cols } else { ld };
    isize::try_from(ld).unwrap_or(isize::MAX)
}

/// `c <- alpha * c + beta * op(a) op(b)`.
///
/// Shapes: `op(a)` is `m x k`, `op(b)` is `k x n`, `c` is `m x n`; any mismatch is an
/// [`Error::Shape`] naming the operand. All three views may be strided (`ld > cols`). With
/// `alpha == 0` the old contents of `c` are not read. `k == 0` gives `c <- alpha * c`.
pub fn matmul<F: Scalar>(
    c: &mut MatMut<'_, F>,
    alpha: F,
    beta: F,
    a: Mat<'_, F>,
    op_a: Op,
    b: Mat<'_, F>,
    op_b: Op,
) -> Result<()> {
    matmul_impl(c, alpha, beta, a, op_a, b, op_b, true)
}

/// [`matmul`] on the calling thread only, for small products run side by side under
/// `rayon::join` (one synchronisation for the pair instead of one per product).
pub fn matmul_serial<F: Scalar>(
    c: &mut MatMut<'_, F>,
    alpha: F,
    beta: F,
    a: Mat<'_, F>,
    op_a: Op,
    b: Mat<'_, F>,
    op_b: Op,
) -> Result<()> {
    matmul_impl(c, alpha, beta, a, op_a, b, op_b, false)
}

#[allow(clippy::too_many_arguments)]
fn matmul_impl<F: Scalar>(
    c: &mut MatMut<'_, F>,
    alpha: F,
    beta: F,
    a: Mat<'_, F>,
    op_a: Op,
    b: Mat<'_, F>,
    op_b: Op,
    parallel: bool,
) -> Result<()> {
    let (m, k, a_rs, a_cs) = op_dims(&a, op_a);
    let (kb, n, b_rs, b_cs) = op_dims(&b, op_b);
    if kb != k {
        // Report the shape `b` would need to have as stored.
        let expected = match op_b {
            Op::N => (k, n),
            Op::T => (n, k),
        };
        return Err(Error::Shape { arg: b.name(), expected, got: b.shape() });
    }
    if c.shape() != (m, n) {
        return Err(Error::Shape { arg: c.name(), expected: (m, n), got: c.shape() });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let c_ld = stride(c.rows(), c.cols(), c.ld());
    if k == 0 {
        for i in 0..m {
            for v in c.row_mut(i) {
                *v = if alpha == F::ZERO { F::ZERO } else { *v * alpha };
            }
        }
        return Ok(());
    }
    let work = m.saturating_mul(n).saturating_mul(k);
    let par = if parallel && work >= PARALLEL_THRESHOLD && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    let read_dst = alpha != F::ZERO;
    // SAFETY: every view was checked at construction to span its buffer:
    // `(rows - 1) * ld + cols <= data.len()`; op_dims maps op(X)[i][j] to X[j][i] for the
    // transposed case, which stays inside the same span. `c` is borrowed mutably, `a` and `b`
    // shared, so `c` aliases neither. F is f32 or f64 (sealed), both supported by `gemm`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.data_mut().as_mut_ptr(),
            1,
            c_ld,
            read_dst,
            a.data().as_ptr(),
            a_cs,
            a_rs,
            b.data().as_ptr(),
            b_cs,
            b_rs,
            alpha,
            beta,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// `c <- alpha * c + beta * op(a) op(b)` on contiguous row-major slices, for scratch buffers:
/// `a` is stored `ar x ac`, `b` is `br x bc`, `c` is `m x n`. Same checks as [`matmul`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_slices<F: Scalar>(
    c: &mut [F],
    (m, n): (usize, usize),
    alpha: F,
    beta: F,
    a: &[F],
    (ar, ac): (usize, usize),
    op_a: Op,
    b: &[F],
    (br, bc): (usize, usize),
    op_b: Op,
) -> Result<()> {
    let a = Mat::new("a", a, ar, ac)?;
    let b = Mat::new("b", b, br, bc)?;
    let mut c = MatMut::new("c", c, m, n)?;
    matmul(&mut c, alpha, beta, a, op_a, b, op_b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        crate::reference::matmul(a, b, m, k, n)
    }

    #[test]
    fn all_transposes_strided() {
        let (m, k, n) = (37, 53, 29);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 7 % 13) as f64) - 6.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| ((i * 5 % 11) as f64) - 5.0).collect();
        let want = naive(&a, &b, m, k, n);
        let at = crate::reference::transpose(&a, m, k);
        let bt = crate::reference::transpose(&b, k, n);
        for (op_a, op_b) in [(Op::N, Op::N), (Op::T, Op::N), (Op::N, Op::T), (Op::T, Op::T)] {
            // strided copies with ld = cols + 3
            let pad = |src: &[f64], r: usize, c: usize| -> Vec<f32> {
                let mut v = vec![f32::NAN; r * (c + 3)];
                for i in 0..r {
                    for j in 0..c {
                        v[i * (c + 3) + j] = src[i * c + j] as f32;
                    }
                }
                v
            };
            let (ad, (ar, ac)) = if op_a == Op::N { (pad(&a, m, k), (m, k)) } else { (pad(&at, k, m), (k, m)) };
            let (bd, (br, bc)) = if op_b == Op::N { (pad(&b, k, n), (k, n)) } else { (pad(&bt, n, k), (n, k)) };
            let av = Mat::strided("a", &ad, ar, ac, ac + 3).unwrap();
            let bv = Mat::strided("b", &bd, br, bc, bc + 3).unwrap();
            let mut cd = vec![1.0f32; m * (n + 1)];
            {
                let mut cv = MatMut::strided("c", &mut cd, m, n, n + 1).unwrap();
                matmul(&mut cv, 2.0, 0.5, av, op_a, bv, op_b).unwrap();
            }
            for i in 0..m {
                for j in 0..n {
                    let w = 2.0 + 0.5 * want[i * n + j];
                    assert!((cd[i * (n + 1) + j] as f64 - w).abs() < 1e-3, "{op_a:?} {op_b:?} ({i},{j})");
                }
                if i + 1 < m {
                    assert_eq!(cd[i * (n + 1) + n], 1.0, "padding untouched");
                }
            }
        }
    }

    #[test]
    fn alpha_zero_ignores_nan_and_shape_errors() {
        let a = vec![1.0f32; 6];
        let b = vec![2.0f32; 6];
        let mut c = vec![f32::NAN; 4];
        matmul_slices(&mut c, (2, 2), 0.0, 1.0, &a, (2, 3), Op::N, &b, (3, 2), Op::N).unwrap();
        assert_eq!(c, vec![6.0; 4]);
        let err = matmul_slices(&mut c, (2, 2), 0.0, 1.0, &a, (2, 3), Op::N, &b, (2, 3), Op::N);
        assert!(matches!(err, Err(Error::Shape { arg: "b", .. })));
        let mut c3 = vec![0.0f32; 6];
        let err = matmul_slices(&mut c3, (3, 2), 0.0, 1.0, &a, (2, 3), Op::N, &b, (3, 2), Op::N);
        assert!(matches!(err, Err(Error::Shape { arg: "c", .. })));
    }

    #[test]
    fn single_rows_with_huge_strides() {
        // A 1-row view may have any stride; it must not turn into a negative gemm stride.
        let a = [1.0f32, 2.0, 3.0];
        let b = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut c = [0.0f32; 2];
        let av = Mat::strided("a", &a, 1, 3, usize::MAX).unwrap();
        let bv = Mat::new("b", &b, 3, 2).unwrap();
        let mut cv = MatMut::strided("c", &mut c, 1, 2, usize::MAX).unwrap();
        matmul(&mut cv, 0.0, 1.0, av, Op::N, bv, Op::N).unwrap();
        assert_eq!(c, [4.0, 5.0]);
        let mut c2 = [0.0f32; 3];
        let mut cv = MatMut::new("c", &mut c2, 3, 1).unwrap();
        matmul(&mut cv, 0.0, 1.0, av, Op::T, Mat::strided("one", &[2.0f32], 1, 1, usize::MAX).unwrap(), Op::N).unwrap();
        assert_eq!(c2, [2.0, 4.0, 6.0]);
    }

    #[test]
    fn large_parallel_f64() {
        let (m, k, n) = (130, 70, 90);
        let a: Vec<f64> = (0..m * k).map(|i| (i % 17) as f64 * 0.25 - 2.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i % 19) as f64 * 0.5 - 4.5).collect();
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![0.0; m * n];
        matmul_slices(&mut c, (m, n), 0.0, 1.0, &a, (m, k), Op::N, &b, (k, n), Op::N).unwrap();
        for (g, w) in c.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9);
        }
    }
}
