//! The WeGeFT layer on the CPU, with the frozen layer and LoRA beside it for comparison.
//!
//! Storage `T` is `f32`, `bf16` or `f16` ([`Element`]); compute and accumulation are `f32`.
//! Shapes as in [`LayerShape`]; scale `s`:
//!
//! ```text
//! C = s W phi            (d_out x r)         u = x psi^T   (T x r)
//! forward:   y  = x W^T + u C^T (+ b)  = [x | u] [W | C]^T
//! backward:  v  = G C    (T x r)             S = G^T u     (d_out x r)
//!            dx = G W + v psi          = [G | v] [W ; psi]
//!            dphi += s W^T S           (d_in x r)
//!            dpsi += v^T x             (r x d_in)
//! merge:     W <- W + C psi            = W (I + s phi psi)
//! unmerge:   W <- W - (W phi) (I_r + s psi phi)^-1 (s psi)
//! ```
//!
//! How it runs:
//!
//! * The K-extended products run as two GEMMs into the same output (the second with
//!   `alpha = 1`, i.e. accumulating), so the rank-`r` part costs its FLOPs plus one pass over the
//!   output; the `d_out x d_in` matrix `W phi psi` is never built. (A literally concatenated K
//!   would first copy `x` and `W` into `[x | u]`, `[W | C]`: a pass over both, more than the
//!   `T x d_out` pass it saves.)
//! * The small rank-`r` products run in independent pairs under `rayon::join`, one thread each
//!   (`C | u` in the forward; `v | S^T`, then `dphi^T | dpsi` in the backward). `S^T = u^T G` and
//!   `dphi^T = s S^T W` rather than `S`, `W^T S`: the `gemm` crate is faster with the long
//!   dimension on the output rows (~1.4x at `d = 2048, r = 64`); `dphi^T` is added transposed.
//! * For `f32` storage every operand is used in place (no copies). `bf16`/`f16` operands are
//!   converted to `f32` once per call (into per-thread pooled scratch, so no page faults) and the
//!   result is rounded once at the end. `W` is converted on every call: the cost is
//!   `O(d_out d_in)` against the `O(T d_out d_in)` product.
//!
//! Every function checks every shape, length, stride and the scale before doing any work and
//! returns an [`Error`] otherwise; none panics on bad input.

use std::any::TypeId;
use std::borrow::Cow;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::gemm::{matmul, matmul_serial, Op, PARALLEL_THRESHOLD};
use super::scratch::Scratch;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::shape::{check_len, LayerShape, Mat, MatMut};

/// What [`wegeft_forward`] keeps for [`wegeft_backward`] (both `f32`, contiguous, row-major).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Saved {
    /// `u = x psi^T`, `T x r`.
    pub u: Vec<f32>,
    /// `C = s W phi`, `d_out x r` (the scale is included).
    pub c: Vec<f32>,
}

/// What [`lora_forward`] keeps for [`lora_backward`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoraSaved {
    /// `x A^T`, `T x r` (unscaled).
    pub xa: Vec<f32>,
}

// ----------------------------------------------------------------------------------------------
// f32 views of T storage

fn is_f32<T: 'static>() -> bool {
    TypeId::of::<T>() == TypeId::of::<f32>()
}

/// `dst[i] = src[i] as f32` (equal lengths): a shift for bf16, half's vectorised slice
/// conversion for f16.
fn row_to_f32<T: Element>(src: &[T], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    if TypeId::of::<T>() == TypeId::of::<bf16>() {
        if let Ok(s) = bytemuck::try_cast_slice::<T, u16>(src) {
            // bf16 is the high half of an f32: exact, and a loop the compiler vectorises.
            for (d, &b) in dst.iter_mut().zip(s) {
                *d = f32::from_bits((b as u32) << 16);
            }
            return;
        }
    }
    if TypeId::of::<T>() == TypeId::of::<f16>() {
        if let Ok(s) = bytemuck::try_cast_slice::<T, f16>(src) {
            return s.convert_to_f32_slice(dst);
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// f32 to bf16 bits, rounding to nearest even; NaN stays a (quiet) NaN. Branch-free, so that
/// loops over it vectorise; the same results as `half::bf16::from_f32`.
#[inline(always)]
fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

/// `dst[i] = T::from_f32(src[i])` (equal lengths, round to nearest even).
fn row_from_f32<T: Element>(src: &[f32], dst: &mut [T]) {
    debug_assert_eq!(src.len(), dst.len());
    if TypeId::of::<T>() == TypeId::of::<bf16>() {
        if let Ok(d) = bytemuck::try_cast_slice_mut::<T, u16>(dst) {
            for (d, &x) in d.iter_mut().zip(src) {
                *d = f32_to_bf16_bits(x);
            }
            return;
        }
    }
    if TypeId::of::<T>() == TypeId::of::<f16>() {
        if let Ok(d) = bytemuck::try_cast_slice_mut::<T, f16>(dst) {
            return d.convert_from_f32_slice(src);
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = T::from_f32(*s);
    }
}

/// Minimum elements before a conversion is split over the rayon pool.
const PAR_CONVERT: usize = 1 << 15;

/// Borrowed `f32` data or a pooled converted copy.
enum Buf<'a> {
    View(&'a [f32]),
    Pool(Scratch),
}

impl Buf<'_> {
    fn as_slice(&self) -> &[f32] {
        match self {
            Buf::View(v) => v,
            Buf::Pool(s) => s,
        }
    }
}

/// An `f32` copy or view of a `T` matrix: borrowed as is for `f32`, converted (contiguous)
/// otherwise.
pub(crate) struct F32<'a> {
    data: Buf<'a>,
    rows: usize,
    cols: usize,
    ld: usize,
    name: &'static str,
}

impl<'a> F32<'a> {
    pub(crate) fn of<T: Element>(m: Mat<'a, T>) -> Result<Self> {
        let (rows, cols, name) = (m.rows(), m.cols(), m.name());
        if is_f32::<T>() {
            if let Ok(data) = bytemuck::try_cast_slice::<T, f32>(m.data()) {
                return Ok(F32 { data: Buf::View(data), rows, cols, ld: m.ld(), name });
            }
        }
        // Every element is written by the conversion below.
        let mut out = Scratch::stale(rows * cols);
        let conv = |(i, dst): (usize, &mut [f32])| row_to_f32(m.row(i), dst);
        if rows * cols >= PAR_CONVERT {
            out.par_chunks_mut(cols.max(1)).enumerate().for_each(conv);
        } else {
            out.chunks_mut(cols.max(1)).enumerate().for_each(conv);
        }
        Ok(F32 { data: Buf::Pool(out), rows, cols, ld: cols, name })
    }

    pub(crate) fn mat(&self) -> Result<Mat<'_, f32>> {
        Mat::strided(self.name, self.data.as_slice(), self.rows, self.cols, self.ld)
    }
}

/// Runs `f` on an `f32` view of `y`: `y` itself for `f32` storage, otherwise a scratch copy
/// that is rounded back into `y` afterwards. The copy holds `y`'s values when `read_old`;
/// otherwise its contents are unspecified and `f` must overwrite every element (as every
/// caller does: a product with `alpha = 0`, or a bias fill first).
pub(crate) fn with_f32_out<T: Element>(
    y: &mut MatMut<'_, T>,
    read_old: bool,
    f: impl FnOnce(&mut MatMut<'_, f32>) -> Result<()>,
) -> Result<()> {
    let (rows, cols, ld, name) = (y.rows(), y.cols(), y.ld(), y.name());
    if is_f32::<T>() {
        if let Ok(data) = bytemuck::try_cast_slice_mut::<T, f32>(y.data_mut()) {
            let mut v = MatMut::strided(name, data, rows, cols, ld)?;
            return f(&mut v);
        }
    }
    let mut scratch = Scratch::stale(rows * cols);
    if read_old {
        let src = y.as_ref();
        let conv = |(i, dst): (usize, &mut [f32])| row_to_f32(src.row(i), dst);
        if rows * cols >= PAR_CONVERT {
            scratch.par_chunks_mut(cols.max(1)).enumerate().for_each(conv);
        } else {
            scratch.chunks_mut(cols.max(1)).enumerate().for_each(conv);
        }
    }
    {
        let mut v = MatMut::new(name, &mut scratch, rows, cols)?;
        f(&mut v)?;
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    // Row i of y is data[i * ld..i * ld + cols]; the view spans (rows - 1) * ld + cols.
    let span = &mut y.data_mut()[..(rows - 1) * ld + cols];
    let store = |(d, s): (&mut [T], &[f32])| row_from_f32(s, &mut d[..cols]);
    if rows * cols >= PAR_CONVERT {
        span.par_chunks_mut(ld).zip(scratch.par_chunks(cols)).for_each(store);
    } else {
        span.chunks_mut(ld).zip(scratch.chunks(cols)).for_each(store);
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// checks

/// Re-checks a shape whose fields may have been set by hand.
fn checked_shape(s: &LayerShape) -> Result<LayerShape> {
    LayerShape::new(s.tokens, s.d_in, s.d_out, s.rank)
}

fn check_scale(scale: f32) -> Result<()> {
    if !scale.is_finite() {
        return Err(Error::invalid("scale", format!("must be finite, got {scale}")));
    }
    Ok(())
}

fn check_opt_len<E>(arg: &'static str, v: Option<&[E]>, n: usize) -> Result<()> {
    match v {
        Some(v) => check_len(arg, v, n),
        None => Ok(()),
    }
}

/// Shape of a frozen call, from `x` (`T x d_in`) and `W` (`d_out x d_in`).
fn frozen_shape<T>(x: &Mat<'_, T>, w: &Mat<'_, T>) -> Result<(usize, usize, usize)> {
    let (t, d_in) = x.shape();
    let d_out = w.rows();
    // LayerShape::new checks positivity and overflow; rank 1 stands in for "no adapter".
    LayerShape::new(t, d_in, d_out, 1)?;
    if w.cols() != d_in {
        return Err(Error::Shape { arg: w.name(), expected: (d_out, d_in), got: w.shape() });
    }
    Ok((t, d_in, d_out))
}

fn fill_bias(y: &mut MatMut<'_, f32>, b: &[f32]) {
    for i in 0..y.rows() {
        y.row_mut(i).copy_from_slice(b);
    }
}

fn bias_f32<T: Element>(b: Option<&[T]>) -> Option<Vec<f32>> {
    b.map(|b| b.iter().map(|v| v.to_f32()).collect())
}

/// `y <- x W^T (+ b)` in f32 (the frozen product; `alpha = 0` when there is no bias).
fn xwt(y: &mut MatMut<'_, f32>, x: Mat<'_, f32>, w: Mat<'_, f32>, b: Option<&[f32]>) -> Result<()> {
    let alpha = match b {
        Some(b) => {
            fill_bias(y, b);
            1.0
        }
        None => 0.0,
    };
    matmul(y, alpha, 1.0, x, Op::N, w, Op::T)
}

fn mat<'a>(name: &'static str, v: &'a [f32], (r, c): (usize, usize)) -> Result<Mat<'a, f32>> {
    Mat::new(name, v, r, c)
}

fn mat_mut<'a>(name: &'static str, v: &'a mut [f32], (r, c): (usize, usize)) -> Result<MatMut<'a, f32>> {
    MatMut::new(name, v, r, c)
}

// ----------------------------------------------------------------------------------------------
// the frozen layer

/// The frozen layer: `y = x W^T + b`. `x` is `T x d_in`, `w` is `d_out x d_in`, `bias` has
/// `d_out` elements, `y` is `T x d_out`.
pub fn frozen_forward<T: Element>(x: Mat<'_, T>, w: Mat<'_, T>, bias: Option<&[T]>, y: MatMut<'_, T>) -> Result<()> {
    let (t, _, d_out) = frozen_shape(&x, &w)?;
    let mut y = y.expect((t, d_out))?;
    check_opt_len("b", bias, d_out)?;
    let (xf, wf) = (F32::of(x)?, F32::of(w)?);
    let b = bias_f32(bias);
    with_f32_out(&mut y, false, |y| xwt(y, xf.mat()?, wf.mat()?, b.as_deref()))
}

/// The frozen layer's input gradient: `dx = G W`. `g` is `T x d_out`, `w` is `d_out x d_in`,
/// `dx` is `T x d_in` (overwritten).
pub fn frozen_backward<T: Element>(g: Mat<'_, T>, w: Mat<'_, T>, dx: MatMut<'_, T>) -> Result<()> {
    let (t, d_out) = g.shape();
    let d_in = w.cols();
    LayerShape::new(t, d_in, d_out, 1)?;
    let w = w.expect((d_out, d_in))?;
    let mut dx = dx.expect((t, d_in))?;
    let (gf, wf) = (F32::of(g)?, F32::of(w)?);
    with_f32_out(&mut dx, false, |dx| matmul(dx, 0.0, 1.0, gf.mat()?, Op::N, wf.mat()?, Op::N))
}

// ----------------------------------------------------------------------------------------------
// WeGeFT

/// `C = s W phi` (`d_out x r`), f32.
fn generate_c(sh: &LayerShape, w: Mat<'_, f32>, phi: Mat<'_, f32>, scale: f32) -> Result<Vec<f32>> {
    let mut c = vec![0.0f32; sh.d_out * sh.rank];
    matmul(&mut mat_mut("C", &mut c, sh.c())?, 0.0, scale, w, Op::N, phi, Op::N)?;
    Ok(c)
}

/// `u = x psi^T` (`T x r`), f32.
fn generate_u(sh: &LayerShape, x: Mat<'_, f32>, psi: Mat<'_, f32>) -> Result<Vec<f32>> {
    let mut u = vec![0.0f32; sh.tokens * sh.rank];
    matmul(&mut mat_mut("u", &mut u, sh.u())?, 0.0, 1.0, x, Op::N, psi, Op::T)?;
    Ok(u)
}

/// Runs two fallible closures side by side on the rayon pool, or one after the other when
/// together they are under [`PARALLEL_THRESHOLD`] multiply-adds (`work`), too little to pay
/// for a fork.
fn pair(work: usize, a: impl FnOnce() -> Result<()> + Send, b: impl FnOnce() -> Result<()> + Send) -> Result<()> {
    if work < PARALLEL_THRESHOLD || rayon::current_num_threads() < 2 {
        a()?;
        return b();
    }
    let (ra, rb) = rayon::join(a, b);
    ra.and(rb)
}

/// `(C, u)`, computed side by side (each product on one thread).
fn c_and_u(
    sh: &LayerShape,
    x: &F32<'_>,
    w: &F32<'_>,
    phi: &F32<'_>,
    psi: &F32<'_>,
    scale: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut c = vec![0.0f32; sh.d_out * sh.rank];
    let mut u = vec![0.0f32; sh.tokens * sh.rank];
    let (wm, phim, xm, psim) = (w.mat()?, phi.mat()?, x.mat()?, psi.mat()?);
    let (mut cm, mut um) = (mat_mut("C", &mut c, sh.c())?, mat_mut("u", &mut u, sh.u())?);
    let work = (sh.d_out + sh.tokens).saturating_mul(sh.d_in).saturating_mul(sh.rank);
    pair(
        work,
        || matmul_serial(&mut cm, 0.0, scale, wm, Op::N, phim, Op::N),
        || matmul_serial(&mut um, 0.0, 1.0, xm, Op::N, psim, Op::T),
    )?;
    Ok((c, u))
}

fn check_adapter<T>(sh: &LayerShape, w: Mat<'_, T>, phi: Mat<'_, T>, psi: Mat<'_, T>, scale: f32) -> Result<()> {
    w.expect(sh.w())?;
    phi.expect(sh.phi())?;
    psi.expect(sh.psi())?;
    check_scale(scale)
}

/// WeGeFT forward: `y = x W^T + u C^T + b` with `C = s W phi`, `u = x psi^T`, i.e. the
/// K-extended product `y = [x | u] [W | C]^T (+ b)`; `W phi psi` is never formed.
///
/// Shapes ([`LayerShape`]): `x` `T x d_in`, `w` `d_out x d_in`, `bias` `d_out`, `phi`
/// `d_in x r`, `psi` `r x d_in`, `y` `T x d_out` (overwritten). Returns [`Saved`] (`u`, `C`)
/// for [`wegeft_backward`]. Cost: the frozen product plus `2 d_out d_in r` (C) +
/// `2 T d_in r` (u) + `2 T r d_out` FLOPs.
#[allow(clippy::too_many_arguments)]
pub fn wegeft_forward<T: Element>(
    shape: &LayerShape,
    x: Mat<'_, T>,
    w: Mat<'_, T>,
    bias: Option<&[T]>,
    phi: Mat<'_, T>,
    psi: Mat<'_, T>,
    scale: f32,
    y: MatMut<'_, T>,
) -> Result<Saved> {
    let sh = checked_shape(shape)?;
    let x = x.expect(sh.x())?;
    check_adapter(&sh, w, phi, psi, scale)?;
    check_opt_len("b", bias, sh.d_out)?;
    let mut y = y.expect(sh.y())?;

    let (xf, wf, phif, psif) = (F32::of(x)?, F32::of(w)?, F32::of(phi)?, F32::of(psi)?);
    let b = bias_f32(bias);
    let (c, u) = c_and_u(&sh, &xf, &wf, &phif, &psif, scale)?;
    with_f32_out(&mut y, false, |y| {
        xwt(y, xf.mat()?, wf.mat()?, b.as_deref())?;
        matmul(y, 1.0, 1.0, mat("u", &u, sh.u())?, Op::N, mat("C", &c, sh.c())?, Op::T)
    })?;
    Ok(Saved { u, c })
}

/// WeGeFT backward from `G = dL/dy` (`T x d_out`), with `v = G C`, `S = G^T u`:
///
/// ```text
/// dx    = G W + v psi = [G | v] [W ; psi]     (T x d_in, overwritten; skipped if None)
/// dphi += s W^T S                              (d_in x r, f32, accumulated)
/// dpsi += v^T x                                (r x d_in, f32, accumulated)
/// ```
///
/// Gradients of the pair accumulate, so a pair shared by many layers gets the sum when each
/// layer's backward is called with the same buffers. `saved` is what [`wegeft_forward`]
/// returned for the same inputs; with `None`, `u` and `C` are recomputed. Extra cost over the
/// frozen backward: `2 T d_out r` (v) + `2 d_out T r` (S) + `2 d_in d_out r` (dphi) +
/// `2 r d_in T` (dpsi) + `2 T r d_in` (v psi) FLOPs (+ u, C when not saved).
#[allow(clippy::too_many_arguments)]
pub fn wegeft_backward<T: Element>(
    shape: &LayerShape,
    x: Mat<'_, T>,
    w: Mat<'_, T>,
    phi: Mat<'_, T>,
    psi: Mat<'_, T>,
    scale: f32,
    saved: Option<&Saved>,
    g: Mat<'_, T>,
    dx: Option<MatMut<'_, T>>,
    dphi: &mut [f32],
    dpsi: &mut [f32],
) -> Result<()> {
    let sh = checked_shape(shape)?;
    let x = x.expect(sh.x())?;
    check_adapter(&sh, w, phi, psi, scale)?;
    let g = g.expect(sh.y())?;
    let mut dx = match dx {
        Some(d) => Some(d.expect(sh.x())?),
        None => None,
    };
    check_len("dphi", dphi, sh.d_in * sh.rank)?;
    check_len("dpsi", dpsi, sh.rank * sh.d_in)?;
    if let Some(s) = saved {
        check_len("saved.u", &s.u, sh.tokens * sh.rank)?;
        check_len("saved.c", &s.c, sh.d_out * sh.rank)?;
    }

    let (xf, wf, psif, gf) = (F32::of(x)?, F32::of(w)?, F32::of(psi)?, F32::of(g)?);
    let (u, c): (Cow<'_, [f32]>, Cow<'_, [f32]>) = match saved {
        Some(s) => (Cow::Borrowed(&s.u), Cow::Borrowed(&s.c)),
        None => {
            let phif = F32::of(phi)?;
            let (c, u) = c_and_u(&sh, &xf, &wf, &phif, &psif, scale)?;
            (Cow::Owned(u), Cow::Owned(c))
        }
    };
    let (t, r) = (sh.tokens, sh.rank);
    // The four rank-r products are small: run them in pairs side by side, each on one thread.
    // v = G C (T x r) | S^T = u^T G (r x d_out). (S^T rather than S: the gemm crate runs
    // products with a long output row dimension faster, here ~1.4x at d = 2048, r = 64.)
    let d_out = sh.d_out;
    // Scratch contents are unspecified; the products below (alpha = 0) overwrite them.
    let mut v = Scratch::stale(t * r);
    let mut st = Scratch::stale(r * d_out);
    let (gm, cm, um) = (gf.mat()?, mat("C", &c, sh.c())?, mat("u", &u, sh.u())?);
    let (mut vm, mut stm) = (mat_mut("v", &mut v, sh.u())?, mat_mut("S^T", &mut st, (r, d_out))?);
    let work = 2usize.saturating_mul(t).saturating_mul(d_out).saturating_mul(r);
    pair(
        work,
        || matmul_serial(&mut vm, 0.0, 1.0, gm, Op::N, cm, Op::N),
        || matmul_serial(&mut stm, 0.0, 1.0, um, Op::T, gm, Op::N),
    )?;
    // dphi^T = s S^T W (r x d_in, scratch) | dpsi += v^T x
    let mut dphi_t = Scratch::stale(r * sh.d_in);
    let (vm, stm) = (mat("v", &v, sh.u())?, mat("S^T", &st, (r, d_out))?);
    let (mut dphitm, mut dpsim) = (mat_mut("dphi^T", &mut dphi_t, sh.psi())?, mat_mut("dpsi", dpsi, sh.psi())?);
    let (wm, xm) = (wf.mat()?, xf.mat()?);
    let work = (d_out + t).saturating_mul(sh.d_in).saturating_mul(r);
    pair(
        work,
        || matmul_serial(&mut dphitm, 0.0, scale, stm, Op::N, wm, Op::N),
        || matmul_serial(&mut dpsim, 1.0, 1.0, vm, Op::T, xm, Op::N),
    )?;
    add_transposed(dphi, &dphi_t, r, sh.d_in);
    // dx = G W + v psi
    if let Some(dx) = dx.as_mut() {
        with_f32_out(dx, false, |dx| {
            matmul(dx, 0.0, 1.0, gf.mat()?, Op::N, wf.mat()?, Op::N)?;
            matmul(dx, 1.0, 1.0, mat("v", &v, sh.u())?, Op::N, psif.mat()?, Op::N)
        })?;
    }
    Ok(())
}

/// `acc (n x r) += t^T` for `t` stored `r x n` (small: adapter-sized).
fn add_transposed(acc: &mut [f32], t: &[f32], r: usize, n: usize) {
    for (i, row) in acc.chunks_mut(r).enumerate().take(n) {
        for (k, d) in row.iter_mut().enumerate() {
            *d += t[k * n + i];
        }
    }
}

/// Merge in place: `W <- W + C psi = W + s W phi psi` (`W` is `d_out x d_in`). For half
/// storage the merged weight is rounded once. `shape.tokens` is not used (any positive value).
pub fn wegeft_merge<T: Element>(
    shape: &LayerShape,
    w: MatMut<'_, T>,
    phi: Mat<'_, T>,
    psi: Mat<'_, T>,
    scale: f32,
) -> Result<()> {
    let sh = checked_shape(shape)?;
    let mut w = w.expect(sh.w())?;
    check_adapter(&sh, w.as_ref(), phi, psi, scale)?;
    let (phif, psif) = (F32::of(phi)?, F32::of(psi)?);
    with_f32_out(&mut w, true, |w| {
        let c = generate_c(&sh, w.as_ref(), phif.mat()?, scale)?;
        matmul(w, 1.0, 1.0, mat("C", &c, sh.c())?, Op::N, psif.mat()?, Op::N)
    })
}

/// Exact unmerge in place, the inverse of [`wegeft_merge`]:
///
/// ```text
/// W <- W' (I + s phi psi)^-1 = W' - (W' phi) (I_r + s psi phi)^-1 (s psi)     (Woodbury)
/// ```
///
/// The `r x r` system is solved in f64; `(W' phi)` and the final update run in f32. Returns
/// [`Error::Numerical`] (and leaves `W` untouched) when `I_r + s psi phi` is singular.
pub fn wegeft_unmerge<T: Element>(
    shape: &LayerShape,
    w: MatMut<'_, T>,
    phi: Mat<'_, T>,
    psi: Mat<'_, T>,
    scale: f32,
) -> Result<()> {
    let sh = checked_shape(shape)?;
    let mut w = w.expect(sh.w())?;
    check_adapter(&sh, w.as_ref(), phi, psi, scale)?;
    let (d_in, r) = (sh.d_in, sh.rank);
    let to64 = |m: Mat<'_, T>| -> Vec<f64> {
        let mut v = Vec::with_capacity(m.rows() * m.cols());
        for i in 0..m.rows() {
            v.extend(m.row(i).iter().map(|e| e.to_f32() as f64));
        }
        v
    };
    let (phi64, psi64) = (to64(phi), to64(psi));
    let s = scale as f64;
    // K = I_r + s psi phi (r x r), f64
    let mut k = vec![0.0f64; r * r];
    {
        let mut km = MatMut::new("K", &mut k, r, r)?;
        matmul(&mut km, 0.0, s, Mat::new("psi", &psi64, r, d_in)?, Op::N, Mat::new("phi", &phi64, d_in, r)?, Op::N)?;
    }
    for i in 0..r {
        k[i * r + i] += 1.0;
    }
    // Z = K^-1 (s psi) (r x d_in): invert K (r^3), then one product.
    let mut eye = vec![0.0f64; r * r];
    for i in 0..r {
        eye[i * r + i] = 1.0;
    }
    let kinv = crate::reference::solve(&k, &eye, r, r)?;
    let mut z64 = vec![0.0f64; r * d_in];
    {
        let mut zm = MatMut::new("Z", &mut z64, r, d_in)?;
        matmul(&mut zm, 0.0, s, Mat::new("K^-1", &kinv, r, r)?, Op::N, Mat::new("psi", &psi64, r, d_in)?, Op::N)?;
    }
    let z: Vec<f32> = z64.iter().map(|&v| v as f32).collect();
    let phif = F32::of(phi)?;
    with_f32_out(&mut w, true, |w| {
        // W phi (d_out x r) from the merged weight, then W -= (W phi) Z.
        let wphi = generate_c(&sh, w.as_ref(), phif.mat()?, 1.0)?;
        matmul(w, 1.0, -1.0, mat("W phi", &wphi, sh.c())?, Op::N, mat("Z", &z, sh.psi())?, Op::N)
    })
}

// ----------------------------------------------------------------------------------------------
// LoRA

fn check_lora<T>(sh: &LayerShape, w: Mat<'_, T>, a: Mat<'_, T>, b: Mat<'_, T>, scale: f32) -> Result<()> {
    w.expect(sh.w())?;
    a.expect(sh.lora_a())?;
    b.expect(sh.lora_b())?;
    check_scale(scale)
}

/// LoRA forward: `y = x W^T + s (x A^T) B^T + b`, `A` is `r x d_in`, `B` is `d_out x r`.
/// Returns `x A^T` for [`lora_backward`].
#[allow(clippy::too_many_arguments)]
pub fn lora_forward<T: Element>(
    shape: &LayerShape,
    x: Mat<'_, T>,
    w: Mat<'_, T>,
    bias: Option<&[T]>,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    scale: f32,
    y: MatMut<'_, T>,
) -> Result<LoraSaved> {
    let sh = checked_shape(shape)?;
    let x = x.expect(sh.x())?;
    check_lora(&sh, w, a, b, scale)?;
    check_opt_len("b", bias, sh.d_out)?;
    let mut y = y.expect(sh.y())?;
    let (xf, wf, af, bf) = (F32::of(x)?, F32::of(w)?, F32::of(a)?, F32::of(b)?);
    let bias = bias_f32(bias);
    let xa = generate_u(&sh, xf.mat()?, af.mat()?)?;
    with_f32_out(&mut y, false, |y| {
        xwt(y, xf.mat()?, wf.mat()?, bias.as_deref())?;
        matmul(y, 1.0, scale, mat("xA^T", &xa, sh.u())?, Op::N, bf.mat()?, Op::T)
    })?;
    Ok(LoraSaved { xa })
}

/// LoRA backward from `G = dL/dy`:
///
/// ```text
/// dx  = G W + s (G B) A      (T x d_in, overwritten; skipped if None)
/// dA += s (G B)^T x          (r x d_in, f32, accumulated)
/// dB += s G^T (x A^T)        (d_out x r, f32, accumulated)
/// ```
#[allow(clippy::too_many_arguments)]
pub fn lora_backward<T: Element>(
    shape: &LayerShape,
    x: Mat<'_, T>,
    w: Mat<'_, T>,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    scale: f32,
    saved: Option<&LoraSaved>,
    g: Mat<'_, T>,
    dx: Option<MatMut<'_, T>>,
    da: &mut [f32],
    db: &mut [f32],
) -> Result<()> {
    let sh = checked_shape(shape)?;
    let x = x.expect(sh.x())?;
    check_lora(&sh, w, a, b, scale)?;
    let g = g.expect(sh.y())?;
    let mut dx = match dx {
        Some(d) => Some(d.expect(sh.x())?),
        None => None,
    };
    check_len("dA", da, sh.rank * sh.d_in)?;
    check_len("dB", db, sh.d_out * sh.rank)?;
    if let Some(s) = saved {
        check_len("saved.xa", &s.xa, sh.tokens * sh.rank)?;
    }
    let (xf, wf, af, bf, gf) = (F32::of(x)?, F32::of(w)?, F32::of(a)?, F32::of(b)?, F32::of(g)?);
    let xa: Cow<'_, [f32]> = match saved {
        Some(s) => Cow::Borrowed(&s.xa),
        None => Cow::Owned(generate_u(&sh, xf.mat()?, af.mat()?)?),
    };
    // The same pairing as in wegeft_backward.
    // gb = s G B (T x r) | dB^T = s (x A^T)^T G (r x d_out, scratch)
    let (t, r, d_out) = (sh.tokens, sh.rank, sh.d_out);
    let mut gb = Scratch::stale(t * r);
    let mut db_t = Scratch::stale(r * d_out);
    let (gm, bm, xam) = (gf.mat()?, bf.mat()?, mat("xA^T", &xa, sh.u())?);
    let (mut gbm, mut dbtm) = (mat_mut("GB", &mut gb, sh.u())?, mat_mut("dB^T", &mut db_t, (r, d_out))?);
    let work = 2usize.saturating_mul(t).saturating_mul(d_out).saturating_mul(r);
    pair(
        work,
        || matmul_serial(&mut gbm, 0.0, scale, gm, Op::N, bm, Op::N),
        || matmul_serial(&mut dbtm, 0.0, scale, xam, Op::T, gm, Op::N),
    )?;
    add_transposed(db, &db_t, r, d_out);
    // dA += gb^T x
    matmul(&mut mat_mut("dA", da, sh.lora_a())?, 1.0, 1.0, mat("GB", &gb, sh.u())?, Op::T, xf.mat()?, Op::N)?;
    if let Some(dx) = dx.as_mut() {
        with_f32_out(dx, false, |dx| {
            matmul(dx, 0.0, 1.0, gf.mat()?, Op::N, wf.mat()?, Op::N)?;
            matmul(dx, 1.0, 1.0, mat("GB", &gb, sh.u())?, Op::N, af.mat()?, Op::N)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_conversions_match_half() {
        let mut vals: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.5,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-40,
            -3e-39,
            65504.0,
            3.4e38,
        ];
        // every rounding case around a few bf16 values, including ties
        for base in [1.0f32, -2.75, 1e-3, 3.0e38] {
            let b = base.to_bits();
            for k in 0..=0x1_0001u32 {
                vals.push(f32::from_bits(b.wrapping_add(k)));
            }
        }
        let mut got = vec![bf16::ZERO; vals.len()];
        row_from_f32(&vals, &mut got);
        for (g, v) in got.iter().zip(&vals) {
            let want = bf16::from_f32(*v);
            assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "{v:e}: {g} vs {want}");
        }
        let mut back = vec![0.0f32; got.len()];
        row_to_f32(&got, &mut back);
        for (b, g) in back.iter().zip(&got) {
            assert!(b.to_bits() == g.to_f32().to_bits() || b.is_nan());
        }
        let mut h = vec![f16::ZERO; vals.len()];
        row_from_f32(&vals, &mut h);
        for (g, v) in h.iter().zip(&vals) {
            let want = f16::from_f32(*v);
            assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "{v:e}: f16 {g} vs {want}");
        }
    }
}
