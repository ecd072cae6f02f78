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
//! The K-extended products run as two GEMMs into the same output (the second with `alpha = 1`,
//! i.e. accumulating), so the rank-`r` part costs its FLOPs plus one pass over the output; the
//! `d_out x d_in` matrix `W phi psi` is never built. For `f32` storage every operand is used in
//! place (no copies); `bf16`/`f16` operands are converted to `f32` scratch once per call and the
//! result is rounded once at the end.
//!
//! Every function checks every shape, length, stride and the scale before doing any work and
//! returns an [`Error`] otherwise; none panics on bad input.

use std::any::TypeId;
use std::borrow::Cow;

use rayon::prelude::*;

use super::gemm::{matmul, Op};
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

/// Minimum elements before a conversion is split over the rayon pool.
const PAR_CONVERT: usize = 1 << 15;

/// An `f32` copy or view of a `T` matrix: borrowed as is for `f32`, converted (contiguous)
/// otherwise.
struct F32<'a> {
    data: Cow<'a, [f32]>,
    rows: usize,
    cols: usize,
    ld: usize,
    name: &'static str,
}

impl<'a> F32<'a> {
    fn of<T: Element>(m: Mat<'a, T>) -> Result<Self> {
        let (rows, cols, name) = (m.rows(), m.cols(), m.name());
        if is_f32::<T>() {
            if let Ok(data) = bytemuck::try_cast_slice::<T, f32>(m.data()) {
                return Ok(F32 { data: Cow::Borrowed(data), rows, cols, ld: m.ld(), name });
            }
        }
        let mut out = vec![0.0f32; rows * cols];
        let conv = |(i, dst): (usize, &mut [f32])| {
            for (d, s) in dst.iter_mut().zip(m.row(i)) {
                *d = s.to_f32();
            }
        };
        if rows * cols >= PAR_CONVERT {
            out.par_chunks_mut(cols.max(1)).enumerate().for_each(conv);
        } else {
            out.chunks_mut(cols.max(1)).enumerate().for_each(conv);
        }
        Ok(F32 { data: Cow::Owned(out), rows, cols, ld: cols, name })
    }

    fn mat(&self) -> Result<Mat<'_, f32>> {
        Mat::strided(self.name, &self.data, self.rows, self.cols, self.ld)
    }
}

/// Runs `f` on an `f32` view of `y`: `y` itself for `f32` storage, otherwise a scratch copy
/// (filled from `y` when `read_old`) that is rounded back into `y` afterwards.
fn with_f32_out<T: Element>(
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
    let mut scratch = vec![0.0f32; rows * cols];
    if read_old {
        let src = y.as_ref();
        let conv = |(i, dst): (usize, &mut [f32])| {
            for (d, s) in dst.iter_mut().zip(src.row(i)) {
                *d = s.to_f32();
            }
        };
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
    let data = y.data_mut();
    let store = |(i, src): (usize, &[f32]), data: &mut [T]| {
        for (d, s) in data[i * ld..i * ld + cols].iter_mut().zip(src) {
            *d = T::from_f32(*s);
        }
    };
    if rows * cols >= PAR_CONVERT && ld == cols {
        data[..rows * cols]
            .par_chunks_mut(cols)
            .zip(scratch.par_chunks(cols))
            .for_each(|(d, s)| store((0, s), d));
    } else {
        for (i, src) in scratch.chunks(cols.max(1)).enumerate() {
            store((i, src), data);
        }
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
    let c = generate_c(&sh, wf.mat()?, phif.mat()?, scale)?;
    let u = generate_u(&sh, xf.mat()?, psif.mat()?)?;
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
            (
                Cow::Owned(generate_u(&sh, xf.mat()?, psif.mat()?)?),
                Cow::Owned(generate_c(&sh, wf.mat()?, phif.mat()?, scale)?),
            )
        }
    };
    let (t, r) = (sh.tokens, sh.rank);
    // v = G C (T x r), S = G^T u (d_out x r)
    let mut v = vec![0.0f32; t * r];
    matmul(&mut mat_mut("v", &mut v, sh.u())?, 0.0, 1.0, gf.mat()?, Op::N, mat("C", &c, sh.c())?, Op::N)?;
    let mut s = vec![0.0f32; sh.d_out * r];
    matmul(&mut mat_mut("S", &mut s, sh.c())?, 0.0, 1.0, gf.mat()?, Op::T, mat("u", &u, sh.u())?, Op::N)?;
    // dphi += s W^T S, dpsi += v^T x
    matmul(&mut mat_mut("dphi", dphi, sh.phi())?, 1.0, scale, wf.mat()?, Op::T, mat("S", &s, sh.c())?, Op::N)?;
    matmul(&mut mat_mut("dpsi", dpsi, sh.psi())?, 1.0, 1.0, mat("v", &v, sh.u())?, Op::T, xf.mat()?, Op::N)?;
    // dx = G W + v psi
    if let Some(dx) = dx.as_mut() {
        with_f32_out(dx, false, |dx| {
            matmul(dx, 0.0, 1.0, gf.mat()?, Op::N, wf.mat()?, Op::N)?;
            matmul(dx, 1.0, 1.0, mat("v", &v, sh.u())?, Op::N, psif.mat()?, Op::N)
        })?;
    }
    Ok(())
}

/// Merge in place: `W <- W + C psi = W + s W phi psi` (`W` is `d_out x d_in`). For half
/// storage the merged weight is rounded once. `shape.tokens` is not used (any positive value).
pub fn wegeft_merge<T: Element>(shape: &LayerShape, w: MatMut<'_, T>, phi: Mat<'_, T>, psi: Mat<'_, T>, scale: f32) -> Result<()> {
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
pub fn wegeft_unmerge<T: Element>(shape: &LayerShape, w: MatMut<'_, T>, phi: Mat<'_, T>, psi: Mat<'_, T>, scale: f32) -> Result<()> {
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
    // gb = s G B (T x r)
    let mut gb = vec![0.0f32; sh.tokens * sh.rank];
    matmul(&mut mat_mut("GB", &mut gb, sh.u())?, 0.0, scale, gf.mat()?, Op::N, bf.mat()?, Op::N)?;
    // dA += gb^T x ; dB += s G^T xa
    matmul(&mut mat_mut("dA", da, sh.lora_a())?, 1.0, 1.0, mat("GB", &gb, sh.u())?, Op::T, xf.mat()?, Op::N)?;
    matmul(&mut mat_mut("dB", db, sh.lora_b())?, 1.0, scale, gf.mat()?, Op::T, mat("xA^T", &xa, sh.u())?, Op::N)?;
    if let Some(dx) = dx.as_mut() {
        with_f32_out(dx, false, |dx| {
            matmul(dx, 0.0, 1.0, gf.mat()?, Op::N, wf.mat()?, Op::N)?;
            matmul(dx, 1.0, 1.0, mat("GB", &gb, sh.u())?, Op::N, af.mat()?, Op::N)
        })?;
    }
    Ok(())
}
