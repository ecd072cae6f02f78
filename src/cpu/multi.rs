//! Many WeGeFT adapters in one batch (multi-tenant inference) on the CPU.
//!
//! `A` adapters share one frozen layer `W` (`d_out x d_in`); adapter `a` has the pair
//! `phi_a` (`d_in x r`), `psi_a` (`r x d_in`) and the scale `s_a`. Every token `t` names its
//! adapter `a_t` (or [`NO_ADAPTER`]). Because WeGeFT's update acts on the *input* side,
//!
//! ```text
//! y_t = x_t W'_a^T  with  W'_a = W + s_a W phi_a psi_a
//!     = (x_t + s_a (x_t psi_a^T) phi_a^T) W^T = h_t W^T
//! h_t = x_t + s_a u_t phi_a^T,   u_t = x_t psi_a^T        (h_t = x_t without an adapter)
//! ```
//!
//! so each token needs only a `d_in -> r -> d_in` edit, and then *all* tokens go through one
//! shared GEMM with `W` — no per-adapter `d_out x r` matrices (LoRA's `B`, punica's SGMV/BGMV)
//! and no split of the big GEMM.
//!
//! Two ways to run it ([`MultiPath`]):
//!
//! * [`MultiPath::InputEdit`]: tokens grouped by adapter (a stable counting sort, so the order
//!   inside a group is the token order); per group `u = x_g psi_a^T`, `h_g = x_g + s_a u phi_a^T`
//!   (two rank-`r` GEMMs of the `gemm` crate; a group of consecutive tokens, such as one
//!   sequence, is edited in place in `h`, others are gathered and scattered); then
//!   `y = h W^T (+ b)`, one GEMM over all tokens.
//! * [`MultiPath::KExtended`]: per group the layer's K-extended form
//!   `y_g = [x_g | u] [W | C_a]^T`, `C_a = s_a W phi_a` (`d_out x r`, built per call): one
//!   frozen GEMM per group plus a `d_out x d_in x r` product per adapter.
//!
//! [`MultiPath::Auto`] picks `InputEdit`: on the CPU the K-extended form showed no stable win
//! even for one adapter (it must build `C_a = s W phi`, `d_out d_in r` multiply-adds per call)
//! and loses by 2.5-18x with 8 or 64 adapters (BENCHMARKS.md, "Many adapters in one batch").
//!
//! Results are deterministic: the grouping is a stable sort, and every product is computed by
//! the same GEMM calls in the same order for the same input (the `gemm` crate splits work over
//! output blocks, never over K).

use rayon::prelude::*;

use super::gemm::{matmul, Op};
use super::layer::{with_f32_out, F32};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::shape::{Mat, MatMut};

/// The adapter index of a token that uses no adapter (the base model).
pub const NO_ADAPTER: i32 = -1;


/// `A` adapters of one layer, stacked: `phi` is `A x d_in x r`, `psi` is `A x r x d_in`
/// (adapter `a`'s matrices are contiguous, row-major), `scales[a] = s_a`.
#[derive(Clone, Copy, Debug)]
pub struct MultiAdapters<'a> {
    phi: &'a [f32],
    psi: &'a [f32],
    scales: &'a [f32],
    d_in: usize,
    rank: usize,
}

impl<'a> MultiAdapters<'a> {
    /// Checks `phi.len() == psi.len() == A d_in r` with `A = scales.len() >= 1`, `d_in, r > 0`
    /// and finite scales.
    pub fn new(phi: &'a [f32], psi: &'a [f32], scales: &'a [f32], d_in: usize, rank: usize) -> Result<Self> {
        if d_in == 0 {
            return Err(Error::ZeroDim { what: "d_in" });
        }
        if rank == 0 {
            return Err(Error::ZeroDim { what: "rank" });
        }
        if scales.is_empty() {
            return Err(Error::ZeroDim { what: "adapters (scales.len())" });
        }
        let per = crate::shape::checked_len("phi", d_in, rank)?;
        let n = per
            .checked_mul(scales.len())
            .ok_or(Error::Overflow { what: "stacked phi", rows: scales.len(), cols: per })?;
        if phi.len() != n {
            return Err(Error::invalid(
                "phi",
                format!("{} adapters x {d_in} x {rank} need {n} elements, got {}", scales.len(), phi.len()),
            ));
        }
        if psi.len() != n {
            return Err(Error::invalid(
                "psi",
                format!("{} adapters x {rank} x {d_in} need {n} elements, got {}", scales.len(), psi.len()),
            ));
        }
        if let Some(a) = scales.iter().position(|s| !s.is_finite()) {
            return Err(Error::invalid("scales", format!("scale of adapter {a} is {}", scales[a])));
        }
        Ok(MultiAdapters { phi, psi, scales, d_in, rank })
    }
    /// `A`.
    pub fn count(&self) -> usize {
        self.scales.len()
    }
    pub fn d_in(&self) -> usize {
        self.d_in
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// `phi_a` (`d_in x r`).
    pub fn phi(&self, a: usize) -> Result<Mat<'a, f32>> {
        let n = self.d_in * self.rank;
        Mat::new("phi_a", self.phi.get(a * n..(a + 1) * n).ok_or_else(|| self.oob(a))?, self.d_in, self.rank)
    }
    /// `psi_a` (`r x d_in`).
    pub fn psi(&self, a: usize) -> Result<Mat<'a, f32>> {
        let n = self.d_in * self.rank;
        Mat::new("psi_a", self.psi.get(a * n..(a + 1) * n).ok_or_else(|| self.oob(a))?, self.rank, self.d_in)
    }
    /// `s_a`.
    pub fn scale(&self, a: usize) -> Result<f32> {
        self.scales.get(a).copied().ok_or_else(|| self.oob(a))
    }
    fn oob(&self, a: usize) -> Error {
        Error::invalid("adapter", format!("adapter {a} of {}", self.count()))
    }
}

/// How [`wegeft_multi_forward`] runs (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MultiPath {
    #[default]
    Auto,
    InputEdit,
    KExtended,
}

/// Tokens grouped by adapter: `order[starts[g]..starts[g + 1]]` are the tokens (ascending) of
/// group `g`; group `g < A` is adapter `g`, group `A` the tokens without an adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Groups {
    pub order: Vec<usize>,
    pub starts: Vec<usize>,
}

impl Groups {
    /// Tokens of adapter `a` (`a == A`: no adapter).
    pub fn tokens(&self, g: usize) -> &[usize] {
        &self.order[self.starts[g]..self.starts[g + 1]]
    }
}

/// Checks every index (`-1` or `0..adapters`) and groups the tokens by adapter (stable).
pub fn group_tokens(adapter_of_token: &[i32], adapters: usize) -> Result<Groups> {
    let mut counts = vec![0usize; adapters + 2];
    for (t, &a) in adapter_of_token.iter().enumerate() {
        let g = check_index(t, a, adapters)?;
        counts[g + 1] += 1;
    }
    for g in 1..counts.len() {
        counts[g] += counts[g - 1];
    }
    let starts = counts.clone();
    let mut next = counts;
    let mut order = vec![0usize; adapter_of_token.len()];
    for (t, &a) in adapter_of_token.iter().enumerate() {
        let g = if a < 0 { adapters } else { a as usize };
        order[next[g]] = t;
        next[g] += 1;
    }
    Ok(Groups { order, starts })
}

fn check_index(t: usize, a: i32, adapters: usize) -> Result<usize> {
    if a == NO_ADAPTER {
        return Ok(adapters);
    }
    if a < 0 || a as usize >= adapters {
        return Err(Error::invalid(
            "adapter_of_token",
            format!("token {t} names adapter {a}; valid are 0..{adapters} and {NO_ADAPTER} (none)"),
        ));
    }
    Ok(a as usize)
}

/// Per-sequence convenience: `adapter_of_seq[b]` for each of the `lens[b]` tokens of sequence
/// `b`, in order (sequences concatenated). Indices are checked by the functions that use them.
pub fn tokens_of_sequences(adapter_of_seq: &[i32], lens: &[usize]) -> Result<Vec<i32>> {
    if adapter_of_seq.len() != lens.len() {
        return Err(Error::Len { arg: "lens", expected: adapter_of_seq.len(), got: lens.len() });
    }
    Ok(adapter_of_seq.iter().zip(lens).flat_map(|(&a, &n)| std::iter::repeat(a).take(n)).collect())
}

fn check_x(x: &Mat<'_, f32>, ad: &MultiAdapters<'_>, idx: &[i32]) -> Result<()> {
    if x.cols() != ad.d_in {
        return Err(Error::Shape { arg: x.name(), expected: (x.rows(), ad.d_in), got: x.shape() });
    }
    if idx.len() != x.rows() {
        return Err(Error::Len { arg: "adapter_of_token", expected: x.rows(), got: idx.len() });
    }
    if x.rows() == 0 {
        return Err(Error::ZeroDim { what: "tokens" });
    }
    Ok(())
}

/// Rows `tokens` of `x`, contiguous (`tokens.len() x cols`).
fn gather(x: &Mat<'_, f32>, tokens: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(tokens.len() * x.cols());
    for &t in tokens {
        out.extend_from_slice(x.row(t));
    }
    out
}

/// `h_g = x_g + s_a (x_g psi_a^T) phi_a^T` for the gathered rows `xg` (`n x d_in`), in place.
fn edit_group(xg: &mut [f32], n: usize, ad: &MultiAdapters<'_>, a: usize) -> Result<()> {
    let (d, r) = (ad.d_in, ad.rank);
    let mut u = vec![0.0f32; n * r];
    {
        let xv = Mat::new("x_g", &*xg, n, d)?;
        matmul(&mut MatMut::new("u", &mut u, n, r)?, 0.0, 1.0, xv, Op::N, ad.psi(a)?, Op::T)?;
    }
    let s = ad.scale(a)?;
    matmul(&mut MatMut::new("h_g", xg, n, d)?, 1.0, s, Mat::new("u", &u, n, r)?, Op::N, ad.phi(a)?, Op::T)
}

/// The per-token input edit alone: `h_t = x_t + s_a (x_t psi_a^T) phi_a^T` with `a = a_t`
/// (`h_t = x_t` for [`NO_ADAPTER`]). `x`, `h`: `T x d_in`; `adapter_of_token`: `T` indices.
pub fn multi_edit(x: Mat<'_, f32>, ad: &MultiAdapters<'_>, adapter_of_token: &[i32], h: MatMut<'_, f32>) -> Result<()> {
    check_x(&x, ad, adapter_of_token)?;
    let mut h = h.expect(x.shape())?;
    let groups = group_tokens(adapter_of_token, ad.count())?;
    edit_into(&x, ad, &groups, &mut h)
}

fn edit_into(x: &Mat<'_, f32>, ad: &MultiAdapters<'_>, groups: &Groups, h: &mut MatMut<'_, f32>) -> Result<()> {
    let a_count = ad.count();
    let (d, r) = (ad.d_in, ad.rank);
    // A group of consecutive tokens (each sequence's, in generation) is edited in place in `h`:
    // no gather, no scatter. Such groups own disjoint row ranges of `h`, so they run side by
    // side (a large one also splits its GEMMs over the threads).
    let contiguous = |a: usize| {
        let toks = groups.tokens(a);
        !toks.is_empty() && toks[toks.len() - 1] - toks[0] + 1 == toks.len()
    };
    let mut ranges: Vec<(usize, usize, usize)> =
        (0..a_count).filter(|&a| contiguous(a)).map(|a| (groups.tokens(a)[0], groups.tokens(a).len(), a)).collect();
    ranges.sort_unstable();
    let ldh = h.ld();
    let mut parts = Vec::with_capacity(ranges.len());
    let (mut rest, mut rest_row): (&mut [f32], usize) = (h.data_mut(), 0);
    for &(s0, n, a) in &ranges {
        let tail = std::mem::take(&mut rest).split_at_mut((s0 - rest_row) * ldh).1;
        let (mine, after) = tail.split_at_mut((n * ldh).min(tail.len()));
        parts.push((s0, n, a, mine));
        (rest, rest_row) = (after, s0 + n);
    }
    parts.into_par_iter().try_for_each(|(s0, n, a, hs)| -> Result<()> {
        let mut hg = MatMut::strided("h_g", hs, n, d, ldh)?;
        for i in 0..n {
            hg.row_mut(i).copy_from_slice(x.row(s0 + i));
        }
        let xg = Mat::strided("x_g", &x.data()[s0 * x.ld()..], n, d, x.ld())?;
        let mut u = vec![0.0f32; n * r];
        matmul(&mut MatMut::new("u", &mut u, n, r)?, 0.0, 1.0, xg, Op::N, ad.psi(a)?, Op::T)?;
        matmul(&mut hg, 1.0, ad.scale(a)?, Mat::new("u", &u, n, r)?, Op::N, ad.phi(a)?, Op::T)
    })?;
    // The other groups run side by side (each small); results are scattered in a fixed order.
    let edited: Vec<(usize, Vec<f32>)> = (0..a_count)
        .into_par_iter()
        .filter(|&a| !groups.tokens(a).is_empty() && !contiguous(a))
        .map(|a| {
            let toks = groups.tokens(a);
            let mut xg = gather(x, toks);
            edit_group(&mut xg, toks.len(), ad, a)?;
            Ok((a, xg))
        })
        .collect::<Result<_>>()?;
    for &t in groups.tokens(a_count) {
        h.row_mut(t).copy_from_slice(x.row(t));
    }
    for (a, hg) in edited {
        for (i, &t) in groups.tokens(a).iter().enumerate() {
            h.row_mut(t).copy_from_slice(&hg[i * d..(i + 1) * d]);
        }
    }
    Ok(())
}

/// Many adapters in one batch: `y_t = h_t W^T (+ b)` with `h_t = x_t + s_a (x_t psi_a^T)
/// phi_a^T`, `a = adapter_of_token[t]` (`h_t = x_t` for [`NO_ADAPTER`]) — equal to running each
/// token through its own adapter's layer `y = x W^T + (x psi_a^T)(s_a W phi_a)^T + b`.
///
/// `x`: `T x d_in`, `w`: `d_out x d_in`, `bias`: `d_out`, `y`: `T x d_out` (views may be
/// strided). Errors name the argument: a bad shape, a bias length, an index outside
/// `0..A` other than `-1`, `T = 0`.
pub fn wegeft_multi_forward(
    x: Mat<'_, f32>,
    w: Mat<'_, f32>,
    bias: Option<&[f32]>,
    ad: &MultiAdapters<'_>,
    adapter_of_token: &[i32],
    path: MultiPath,
    y: MatMut<'_, f32>,
) -> Result<()> {
    check_x(&x, ad, adapter_of_token)?;
    if w.cols() != ad.d_in {
        return Err(Error::Shape { arg: w.name(), expected: (w.rows(), ad.d_in), got: w.shape() });
    }
    let (t, d_out) = (x.rows(), w.rows());
    if d_out == 0 {
        return Err(Error::ZeroDim { what: "d_out" });
    }
    if let Some(b) = bias {
        crate::shape::check_len("b", b, d_out)?;
    }
    let mut y = y.expect((t, d_out))?;
    let groups = group_tokens(adapter_of_token, ad.count())?;
    // Auto: the input edit (see the module docs for why never the K-extended form).
    let kext = match path {
        MultiPath::InputEdit | MultiPath::Auto => false,
        MultiPath::KExtended => true,
    };
    if kext {
        return kext_forward(&x, &w, bias, ad, &groups, &mut y);
    }
    let mut h = vec![0.0f32; t * ad.d_in];
    edit_into(&x, ad, &groups, &mut MatMut::new("h", &mut h, t, ad.d_in)?)?;
    xwt_bias(&mut y, Mat::new("h", &h, t, ad.d_in)?, w, bias)
}

/// [`wegeft_multi_forward`] for `f32`, `bf16` or `f16` storage of `x`, `W`, `b`, the stacked
/// pairs and `y` (`phi`: `A x d_in x rank`, `psi`: `A x rank x d_in`, `A = scales.len()`),
/// computed in f32 as the single-adapter CPU layer does: half inputs are converted once, `y`
/// is rounded once. Same checks and errors.
#[allow(clippy::too_many_arguments)]
pub fn wegeft_multi_forward_as<T: Element>(
    x: Mat<'_, T>,
    w: Mat<'_, T>,
    bias: Option<&[T]>,
    phi: &[T],
    psi: &[T],
    scales: &[f32],
    rank: usize,
    adapter_of_token: &[i32],
    path: MultiPath,
    mut y: MatMut<'_, T>,
) -> Result<()> {
    let to_f32 = |v: &[T]| -> Vec<f32> { v.iter().map(|e| e.to_f32()).collect() };
    let (phi, psi) = (to_f32(phi), to_f32(psi));
    let ad = MultiAdapters::new(&phi, &psi, scales, x.cols(), rank)?;
    let bias = bias.map(to_f32);
    let (xf, wf) = (F32::of(x)?, F32::of(w)?);
    with_f32_out(&mut y, false, |y| {
        let (rows, cols, ld, name) = (y.rows(), y.cols(), y.ld(), y.name());
        let y = MatMut::strided(name, y.data_mut(), rows, cols, ld)?;
        wegeft_multi_forward(xf.mat()?, wf.mat()?, bias.as_deref(), &ad, adapter_of_token, path, y)
    })
}

/// `y <- x W^T (+ b)`.
fn xwt_bias(y: &mut MatMut<'_, f32>, x: Mat<'_, f32>, w: Mat<'_, f32>, bias: Option<&[f32]>) -> Result<()> {
    let alpha = match bias {
        Some(b) => {
            for i in 0..y.rows() {
                y.row_mut(i).copy_from_slice(b);
            }
            1.0
        }
        None => 0.0,
    };
    matmul(y, alpha, 1.0, x, Op::N, w, Op::T)
}

/// Per adapter group `y_g = [x_g | u] [W | C_a]^T (+ b)`, `C_a = s_a W phi_a`; plain
/// `x_g W^T (+ b)` for the tokens without an adapter.
fn kext_forward(
    x: &Mat<'_, f32>,
    w: &Mat<'_, f32>,
    bias: Option<&[f32]>,
    ad: &MultiAdapters<'_>,
    groups: &Groups,
    y: &mut MatMut<'_, f32>,
) -> Result<()> {
    let (d, r, d_out) = (ad.d_in, ad.rank, w.rows());
    for g in 0..=ad.count() {
        let toks = groups.tokens(g);
        if toks.is_empty() {
            continue;
        }
        let n = toks.len();
        let xg = gather(x, toks);
        let xv = Mat::new("x_g", &xg, n, d)?;
        let mut yg = vec![0.0f32; n * d_out];
        {
            let mut yv = MatMut::new("y_g", &mut yg, n, d_out)?;
            xwt_bias(&mut yv, xv, *w, bias)?;
            if g < ad.count() {
                let mut c = vec![0.0f32; d_out * r];
                matmul(&mut MatMut::new("C_a", &mut c, d_out, r)?, 0.0, ad.scale(g)?, *w, Op::N, ad.phi(g)?, Op::N)?;
                let mut u = vec![0.0f32; n * r];
                matmul(&mut MatMut::new("u", &mut u, n, r)?, 0.0, 1.0, xv, Op::N, ad.psi(g)?, Op::T)?;
                matmul(&mut yv, 1.0, 1.0, Mat::new("u", &u, n, r)?, Op::N, Mat::new("C_a", &c, d_out, r)?, Op::T)?;
            }
        }
        for (i, &tk) in toks.iter().enumerate() {
            y.row_mut(tk).copy_from_slice(&yg[i * d_out..(i + 1) * d_out]);
        }
    }
    Ok(())
}

/// The LoRA layer doing the same multi-adapter job, for comparison (punica's SGMV semantics):
/// per adapter group `y_g = x_g W^T + s_a (x_g A_a^T) B_a^T (+ b)` after one frozen GEMM
/// over all tokens, with `A_a` (`r x d_in`) stacked in `a` (`A x r x d_in`) and `B_a`
/// (`d_out x r`) stacked in `b_stack` (`A x d_out x r`).
#[allow(clippy::too_many_arguments)]
pub fn lora_multi_forward(
    x: Mat<'_, f32>,
    w: Mat<'_, f32>,
    bias: Option<&[f32]>,
    a: &[f32],
    b_stack: &[f32],
    scales: &[f32],
    rank: usize,
    adapter_of_token: &[i32],
    y: MatMut<'_, f32>,
) -> Result<()> {
    let (t, d, d_out) = (x.rows(), x.cols(), w.rows());
    if w.cols() != d {
        return Err(Error::Shape { arg: w.name(), expected: (d_out, d), got: w.shape() });
    }
    if adapter_of_token.len() != t {
        return Err(Error::Len { arg: "adapter_of_token", expected: t, got: adapter_of_token.len() });
    }
    let n_ad = scales.len();
    crate::shape::check_len("A stack", a, n_ad * rank * d)?;
    crate::shape::check_len("B stack", b_stack, n_ad * d_out * rank)?;
    if let Some(b) = bias {
        crate::shape::check_len("b", b, d_out)?;
    }
    let mut y = y.expect((t, d_out))?;
    let groups = group_tokens(adapter_of_token, n_ad)?;
    xwt_bias(&mut y, x, w, bias)?;
    let deltas: Vec<(usize, Vec<f32>)> = (0..n_ad)
        .into_par_iter()
        .filter(|&g| !groups.tokens(g).is_empty())
        .map(|g| {
            let toks = groups.tokens(g);
            let n = toks.len();
            let xg = gather(&x, toks);
            let mut xa = vec![0.0f32; n * rank];
            let am = Mat::new("A_a", &a[g * rank * d..(g + 1) * rank * d], rank, d)?;
            matmul(&mut MatMut::new("xA", &mut xa, n, rank)?, 0.0, 1.0, Mat::new("x_g", &xg, n, d)?, Op::N, am, Op::T)?;
            let bm = Mat::new("B_a", &b_stack[g * d_out * rank..(g + 1) * d_out * rank], d_out, rank)?;
            let mut dy = vec![0.0f32; n * d_out];
            matmul(&mut MatMut::new("dy", &mut dy, n, d_out)?, 0.0, scales[g], Mat::new("xA", &xa, n, rank)?, Op::N, bm, Op::T)?;
            Ok((g, dy))
        })
        .collect::<Result<_>>()?;
    for (g, dy) in deltas {
        for (i, &tk) in groups.tokens(g).iter().enumerate() {
            for (yv, dv) in y.row_mut(tk).iter_mut().zip(&dy[i * d_out..(i + 1) * d_out]) {
                *yv += dv;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_is_stable_and_checked() {
        let g = group_tokens(&[1, -1, 0, 1, 0], 2).unwrap();
        assert_eq!(g.tokens(0), &[2, 4]);
        assert_eq!(g.tokens(1), &[0, 3]);
        assert_eq!(g.tokens(2), &[1]);
        let e = group_tokens(&[0, 2], 2).unwrap_err().to_string();
        assert!(e.contains("token 1 names adapter 2"), "{e}");
        let e = group_tokens(&[-2], 2).unwrap_err().to_string();
        assert!(e.contains("token 0 names adapter -2"), "{e}");
        assert_eq!(tokens_of_sequences(&[3, -1], &[2, 1]).unwrap(), vec![3, 3, -1]);
        assert!(tokens_of_sequences(&[3], &[2, 1]).is_err());
    }
}
