//! Training-time causal GQA attention and SwiGLU on the CPU, in the form that is fast on a
//! few cores: attention as small GEMMs per head (scores `S x S`, then `P V`), SwiGLU with a
//! vectorizable exponential. Same contracts, layouts and formulas as
//! [`crate::cpu::ops::attention_forward`] / [`crate::cpu::ops::attention_backward`] /
//! [`crate::cpu::ops::swiglu_forward`] / [`crate::cpu::ops::swiglu_backward`] (the
//! references they are tested against); [`crate::cpu::Cpu`] runs these.
//!
//! Per batch element `b` and query head `h` (kv head `g = h / (H / KVH)`), with `Q_h`, `K_g`,
//! `V_g`, `O_h` the `S x hd` blocks and `c = 1 / sqrt(hd)`:
//!
//! ```text
//! forward:  Z = c Q_h K_g^T;  P = softmax(Z + causal mask) (row-wise);  O_h = P V_g;
//!           lse_i = log sum_{j0(i)<=j<=i} exp(Z_ij)   (j0(i) = 0, or i + 1 - window)
//! backward: P recomputed from Z and lse;  dV_g += P^T dO_h;  dP = dO_h V_g^T;
//!           dZ = P * (dP - rowsum(dO_h * O_h));  dQ_h = c dZ K_g;  dK_g += c dZ^T Q_h
//! ```
//!
//! Queries go in blocks of 64 rows, each against the keys its rows can see (from the block's
//! first row's first key to its last row): dense GEMMs, far faster than row-by-row dot
//! products, over about half the `S x S` scores for causal attention (fewer with a sliding
//! window); the entries masked inside a block are computed and then zeroed.

use rayon::prelude::*;

use crate::cpu::gemm::{matmul_serial, Op};
use crate::cpu::ops::AttnShape;
use crate::error::{Error, Result};
use crate::shape::{Mat, MatMut};

fn need(arg: &'static str, got: usize, n: usize) -> Result<()> {
    if got != n {
        return Err(Error::Len { arg, expected: n, got });
    }
    Ok(())
}

fn check(s: &AttnShape, q: usize, k: usize, v: usize) -> Result<()> {
    // Re-validates the public fields, the window included (they may have been set without
    // AttnShape::new).
    s.checked()?;
    need("q", q, s.tokens() * s.q_width())?;
    need("k", k, s.tokens() * s.kv_width())?;
    need("v", v, s.tokens() * s.kv_width())
}

/// `e^x` for `x <= 0`, branch-free (vectorizes): `x = n ln2 + r`, a degree-6 polynomial for
/// `e^r`, `2^n` built in the exponent bits. Relative error below 5e-7; inputs below `-87`
/// give `e^-87`.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer (to even)
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // Cody-Waite split of ln 2 for an accurate reduction.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
}

/// `1 / (1 + e^-a)` from [`exp_neg`] of `-|a|`.
#[inline(always)]
fn sigmoid(a: f32) -> f32 {
    let e = exp_neg(-a.abs());
    let s = 1.0 / (1.0 + e);
    if a >= 0.0 {
        s
    } else {
        e * s
    }
}

const ELEMS: usize = 4096;

/// `h = silu(gate) * up = gate * sigmoid(gate) * up` (all of one length).
pub fn swiglu_forward(gate: &[f32], up: &[f32], h: &mut [f32]) -> Result<()> {
    need("up", up.len(), gate.len())?;
    need("h", h.len(), gate.len())?;
    h.par_chunks_mut(ELEMS).zip(gate.par_chunks(ELEMS).zip(up.par_chunks(ELEMS))).for_each(|(h, (g, u))| {
        for ((h, &a), &u) in h.iter_mut().zip(g).zip(u) {
            *h = a * sigmoid(a) * u;
        }
    });
    Ok(())
}

/// With `s = sigmoid(gate)`: `dgate = dh * up * s (1 + gate (1 - s))`, `dup = dh * gate * s`.
pub fn swiglu_backward(dh: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) -> Result<()> {
    let n = gate.len();
    need("dh", dh.len(), n)?;
    need("up", up.len(), n)?;
    need("dgate", dgate.len(), n)?;
    need("dup", dup.len(), n)?;
    dgate
        .par_chunks_mut(ELEMS)
        .zip(dup.par_chunks_mut(ELEMS))
        .zip(dh.par_chunks(ELEMS).zip(gate.par_chunks(ELEMS).zip(up.par_chunks(ELEMS))))
        .for_each(|((dg, du), (d, (g, u)))| {
            for i in 0..dg.len() {
                let (a, s) = (g[i], sigmoid(g[i]));
                du[i] = d[i] * a * s;
                dg[i] = d[i] * u[i] * s * (1.0 + a * (1.0 - s));
            }
        });
    Ok(())
}

/// Query rows per block: the scores of a block of queries are computed against the keys its
/// rows can see (from its first row's first key to its last row), not against all `S` keys.
const QB: usize = 64;

/// Rows `r0..r1` of head `head` of batch element `b` in a `(B*S) x width` buffer.
#[allow(clippy::too_many_arguments)]
fn rows<'a>(
    name: &'static str,
    x: &'a [f32],
    s: &AttnShape,
    b: usize,
    head: usize,
    width: usize,
    r0: usize,
    r1: usize,
) -> Result<Mat<'a, f32>> {
    let at = (b * s.seq + r0) * width + head * s.head_dim;
    Mat::strided(name, &x[at..], r1 - r0, s.head_dim, width)
}

/// The query blocks of a sequence: `(i0, i1, k0)`, rows `i0..i1` seeing keys `k0..i1`.
fn query_blocks(s: &AttnShape) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    (0..s.seq).step_by(QB).map(|i0| (i0, (i0 + QB).min(s.seq), s.first_key(i0)))
}

/// The causal (and windowed, [`AttnShape::first_key`]) softmax, in place, of the scores `z` of
/// queries `i0..i0 + lse.len()` against keys `k0..` (`lse.len()` rows of `z.len() / lse.len()`),
/// masked entries zeroed: with `recompute`, `P = exp(Z - lse)` from the given `lse`; otherwise
/// the row-wise softmax, filling `lse`.
fn probs(z: &mut [f32], s: &AttnShape, i0: usize, k0: usize, lse: &mut [f32], recompute: bool) {
    let kn = z.len() / lse.len();
    for (r, row) in z.chunks_exact_mut(kn).enumerate() {
        let i = i0 + r;
        let (j0, j1) = (s.first_key(i) - k0, i - k0);
        let live = &mut row[j0..=j1];
        if recompute {
            let l = lse[r];
            for x in live.iter_mut() {
                *x = exp_neg(*x - l);
            }
        } else {
            let m = live.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0.0f32;
            for x in live.iter_mut() {
                *x = exp_neg(*x - m);
                sum += *x;
            }
            let inv = 1.0 / sum;
            for x in live.iter_mut() {
                *x *= inv;
            }
            lse[r] = m + sum.ln();
        }
        row[..j0].fill(0.0);
        row[j1 + 1..].fill(0.0);
    }
}

/// Causal GQA attention forward (see the module docs): `out` is `(B*S) x (H*hd)`, `lse` is
/// `(B*S) x H`, as [`crate::cpu::ops::attention_forward`].
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    check(&s, q.len(), k.len(), v.len())?;
    need("out", out.len(), s.tokens() * s.q_width())?;
    need("lse", lse.len(), s.tokens() * s.heads)?;
    let (seq, hd, qw, kw) = (s.seq, s.head_dim, s.q_width(), s.kv_width());
    let c = 1.0 / (hd as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..s.batch).flat_map(|b| (0..s.heads).map(move |h| (b, h))).collect();
    let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(b, h)| -> Result<(Vec<f32>, Vec<f32>)> {
            let g = h / s.group();
            let mut o = vec![0.0f32; seq * hd];
            let mut l = vec![0.0f32; seq];
            let mut z = Vec::new();
            for (i0, i1, k0) in query_blocks(&s) {
                let (qn, kn) = (i1 - i0, i1 - k0);
                z.clear();
                z.resize(qn * kn, 0.0);
                let (qb, kb, vb) =
                    (rows("q", q, &s, b, h, qw, i0, i1)?, rows("k", k, &s, b, g, kw, k0, i1)?, rows("v", v, &s, b, g, kw, k0, i1)?);
                matmul_serial(&mut MatMut::new("Z", &mut z, qn, kn)?, 0.0, c, qb, Op::N, kb, Op::T)?;
                probs(&mut z, &s, i0, k0, &mut l[i0..i1], false);
                let ob = &mut o[i0 * hd..i1 * hd];
                matmul_serial(&mut MatMut::new("O", ob, qn, hd)?, 0.0, 1.0, Mat::new("P", &z, qn, kn)?, Op::N, vb, Op::N)?;
            }
            Ok((o, l))
        })
        .collect::<Result<_>>()?;
    for (&(b, h), (o, l)) in tasks.iter().zip(results) {
        for i in 0..seq {
            let t = b * seq + i;
            out[t * qw + h * hd..t * qw + (h + 1) * hd].copy_from_slice(&o[i * hd..(i + 1) * hd]);
            lse[t * s.heads + h] = l[i];
        }
    }
    Ok(())
}

/// Causal GQA attention backward (see the module docs), overwriting `dq`, `dk`, `dv`, as
/// [`crate::cpu::ops::attention_backward`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    s: AttnShape,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    check(&s, q.len(), k.len(), v.len())?;
    let (seq, hd, qw, kw, group) = (s.seq, s.head_dim, s.q_width(), s.kv_width(), s.group());
    need("dout", dout.len(), s.tokens() * qw)?;
    need("out", out.len(), s.tokens() * qw)?;
    need("lse", lse.len(), s.tokens() * s.heads)?;
    need("dq", dq.len(), s.tokens() * qw)?;
    need("dk", dk.len(), s.tokens() * kw)?;
    need("dv", dv.len(), s.tokens() * kw)?;
    let c = 1.0 / (hd as f32).sqrt();
    // One task per (batch, kv head): it owns dK_g, dV_g and dQ of its query heads, summed over
    // the group's heads and the query blocks in a fixed order.
    let tasks: Vec<(usize, usize)> = (0..s.batch).flat_map(|b| (0..s.kv_heads).map(move |g| (b, g))).collect();
    type Local = (Vec<f32>, Vec<f32>, Vec<f32>);
    let results: Vec<Local> = tasks
        .par_iter()
        .map(|&(b, g)| -> Result<Local> {
            let mut ldq = vec![0.0f32; group * seq * hd];
            let mut ldk = vec![0.0f32; seq * hd];
            let mut ldv = vec![0.0f32; seq * hd];
            let (mut p, mut dp) = (Vec::new(), Vec::new());
            let mut l = vec![0.0f32; QB];
            for hg in 0..group {
                let h = g * group + hg;
                for (i0, i1, k0) in query_blocks(&s) {
                    let (qn, kn) = (i1 - i0, i1 - k0);
                    let (qb, dob, ob) = (
                        rows("q", q, &s, b, h, qw, i0, i1)?,
                        rows("dout", dout, &s, b, h, qw, i0, i1)?,
                        rows("out", out, &s, b, h, qw, i0, i1)?,
                    );
                    let (kb, vb) = (rows("k", k, &s, b, g, kw, k0, i1)?, rows("v", v, &s, b, g, kw, k0, i1)?);
                    p.clear();
                    p.resize(qn * kn, 0.0);
                    dp.clear();
                    dp.resize(qn * kn, 0.0);
                    matmul_serial(&mut MatMut::new("Z", &mut p, qn, kn)?, 0.0, c, qb, Op::N, kb, Op::T)?;
                    for (r, li) in l[..qn].iter_mut().enumerate() {
                        *li = lse[(b * seq + i0 + r) * s.heads + h];
                    }
                    probs(&mut p, &s, i0, k0, &mut l[..qn], true);
                    let pm = Mat::new("P", &p, qn, kn)?;
                    let dvb = &mut ldv[k0 * hd..i1 * hd];
                    matmul_serial(&mut MatMut::new("dV", dvb, kn, hd)?, 1.0, 1.0, pm, Op::T, dob, Op::N)?;
                    matmul_serial(&mut MatMut::new("dP", &mut dp, qn, kn)?, 0.0, 1.0, dob, Op::N, vb, Op::T)?;
                    for r in 0..qn {
                        let delta: f32 = dob.row(r).iter().zip(ob.row(r)).map(|(a, b)| a * b).sum();
                        let (pr, dr) = (&p[r * kn..(r + 1) * kn], &mut dp[r * kn..(r + 1) * kn]);
                        for (d, &pv) in dr.iter_mut().zip(pr) {
                            *d = pv * (*d - delta);
                        }
                    }
                    let dz = Mat::new("dZ", &dp, qn, kn)?;
                    let dqb = &mut ldq[(hg * seq + i0) * hd..(hg * seq + i1) * hd];
                    matmul_serial(&mut MatMut::new("dQ", dqb, qn, hd)?, 0.0, c, dz, Op::N, kb, Op::N)?;
                    let dkb = &mut ldk[k0 * hd..i1 * hd];
                    matmul_serial(&mut MatMut::new("dK", dkb, kn, hd)?, 1.0, c, dz, Op::T, qb, Op::N)?;
                }
            }
            Ok((ldq, ldk, ldv))
        })
        .collect::<Result<_>>()?;
    for (&(b, g), (ldq, ldk, ldv)) in tasks.iter().zip(results) {
        for i in 0..seq {
            let t = b * seq + i;
            for hg in 0..group {
                let h = g * group + hg;
                dq[t * qw + h * hd..t * qw + (h + 1) * hd]
                    .copy_from_slice(&ldq[(hg * seq + i) * hd..(hg * seq + i + 1) * hd]);
            }
            dk[t * kw + g * hd..t * kw + (g + 1) * hd].copy_from_slice(&ldk[i * hd..(i + 1) * hd]);
            dv[t * kw + g * hd..t * kw + (g + 1) * hd].copy_from_slice(&ldv[i * hd..(i + 1) * hd]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ops;

    fn rnd(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Relative to the largest reference magnitude, floored at 1 (with one key, dq and dk are
    /// rounding noise around an exact 0).
    fn close(what: &str, a: &[f32], b: &[f32], tol: f32) {
        let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1.0);
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max) / scale;
        assert!(worst <= tol, "{what}: worst relative error {worst:e}");
    }

    /// Against the row-by-row reference ops, at several shapes (GQA, odd lengths, sliding
    /// windows of one key, shorter and longer than the sequence).
    #[test]
    fn attention_matches_the_reference_ops() {
        for (i, &(b, seq, h, kvh, hd, w)) in [
            (2, 7, 4, 2, 8, None),
            (1, 1, 3, 3, 4, None),
            (3, 33, 9, 3, 16, None),
            (4, 64, 9, 3, 64, None),
            (2, 33, 4, 2, 16, Some(5)),
            (1, 9, 2, 1, 8, Some(1)),
            (2, 7, 4, 2, 8, Some(7)),
            (1, 20, 6, 3, 32, Some(64)),
            // Several query blocks (of 64): causal, windows within one block and across two.
            (2, 150, 4, 2, 16, None),
            (1, 200, 3, 1, 8, Some(5)),
            (1, 150, 2, 2, 16, Some(70)),
            (1, 128, 2, 1, 8, Some(64)),
        ]
        .iter()
        .enumerate()
        {
            let s = AttnShape::new(b, seq, h, kvh, hd).unwrap().with_window(w).unwrap();
            let n = i as u64 * 10;
            let q = rnd(n + 1, s.tokens() * s.q_width()).iter().map(|x| x * 3.0).collect::<Vec<_>>();
            let k = rnd(n + 2, s.tokens() * s.kv_width());
            let v = rnd(n + 3, s.tokens() * s.kv_width());
            let g = rnd(n + 4, s.tokens() * s.q_width());
            let (mut o1, mut l1) = (vec![0.0; q.len()], vec![0.0; s.tokens() * h]);
            let (mut o2, mut l2) = (o1.clone(), l1.clone());
            attention_forward(&q, &k, &v, s, &mut o1, &mut l1).unwrap();
            ops::attention_forward(&q, &k, &v, s, &mut o2, &mut l2).unwrap();
            close("out", &o1, &o2, 1e-5);
            close("lse", &l1, &l2, 1e-5);
            let (mut dq1, mut dk1, mut dv1) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            let (mut dq2, mut dk2, mut dv2) = (dq1.clone(), dk1.clone(), dv1.clone());
            attention_backward(&g, &q, &k, &v, &o1, &l1, s, &mut dq1, &mut dk1, &mut dv1).unwrap();
            ops::attention_backward(&g, &q, &k, &v, &o2, &l2, s, &mut dq2, &mut dk2, &mut dv2).unwrap();
            close("dq", &dq1, &dq2, 1e-5);
            close("dk", &dk1, &dk2, 1e-5);
            close("dv", &dv1, &dv2, 1e-5);
        }
        let s = AttnShape::new(1, 4, 2, 1, 4).unwrap();
        assert!(attention_forward(&[0.0; 31], &[0.0; 16], &[0.0; 16], s, &mut [0.0; 32], &mut [0.0; 8]).is_err());
        // A window of 0 set directly on the public field is an error, not a panic.
        let w0 = AttnShape { window: Some(0), ..s };
        assert!(attention_forward(&[0.0; 32], &[0.0; 16], &[0.0; 16], w0, &mut [0.0; 32], &mut [0.0; 8]).is_err());
        let (mut d1, mut d2, mut d3) = ([0.0; 32], [0.0; 16], [0.0; 16]);
        assert!(attention_backward(&[0.0; 32], &[0.0; 32], &[0.0; 16], &[0.0; 16], &[0.0; 32], &[0.0; 8], w0, &mut d1, &mut d2, &mut d3)
            .is_err());
    }

    #[test]
    fn swiglu_matches_the_reference_ops() {
        let n = 10_000;
        let gate: Vec<f32> = rnd(7, n).iter().map(|x| x * 30.0).collect();
        let up = rnd(8, n);
        let dh = rnd(9, n);
        let (mut h1, mut h2) = (vec![0.0; n], vec![0.0; n]);
        swiglu_forward(&gate, &up, &mut h1).unwrap();
        ops::swiglu_forward(&gate, &up, &mut h2).unwrap();
        close("h", &h1, &h2, 1e-6);
        let (mut a1, mut b1, mut a2, mut b2) = (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&dh, &gate, &up, &mut a1, &mut b1).unwrap();
        ops::swiglu_backward(&dh, &gate, &up, &mut a2, &mut b2).unwrap();
        close("dgate", &a1, &a2, 1e-6);
        close("dup", &b1, &b2, 1e-6);
        assert!(swiglu_forward(&gate, &up[1..], &mut h1).is_err());
    }
}
