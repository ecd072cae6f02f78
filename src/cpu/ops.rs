//! The non-WeGeFT operations of a Llama model on the CPU: f32, row-major, every forward paired
//! with its hand-written backward (llm.c style `*_forward` / `*_backward`).
//!
//! Layouts (all row-major, contiguous):
//!
//! | tensor | layout |
//! |---|---|
//! | hidden states `x` | `N x d` (`N = B * S` tokens, batch-major) |
//! | queries `q`, attention output | `(B, S, H, hd)` = `N x (H * hd)` — the `q_proj` output as is |
//! | keys/values `k`, `v` | `(B, S, KVH, hd)` = `N x (KVH * hd)` |
//! | attention `lse` | `(B, S, H)` = `N x H` |
//! | logits | `N x V` |
//!
//! Backward functions **overwrite** their gradient outputs (they never accumulate); use
//! [`add_inplace`] for residual sums. Every function checks its shapes first and returns an
//! [`Error`] naming the argument; none panics on bad input.

use crate::error::{Error, Result};
use rayon::prelude::*;

/// Target value that [`cross_entropy_forward`] and friends skip (as `torch`'s `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

// ---------------------------------------------------------------------------------------------
// checks

fn check_len(arg: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::Len { arg, expected, got });
    }
    Ok(())
}

fn nonzero(what: &'static str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(Error::ZeroDim { what });
    }
    Ok(())
}

fn mul(what: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or(Error::Overflow { what, rows: a, cols: b })
}

/// Checks that `buf` holds exactly `rows x cols` elements.
fn check_mat(arg: &'static str, len: usize, rows: usize, cols: usize) -> Result<()> {
    let needed = mul(arg, rows, cols)?;
    if len != needed {
        return Err(Error::Layout { arg, rows, cols, ld: cols, needed, len });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// elementwise helpers

/// `dst[i] += src[i]` (residual connections, gradient sums).
pub fn add_inplace(dst: &mut [f32], src: &[f32]) -> Result<()> {
    check_len("src", src.len(), dst.len())?;
    dst.par_chunks_mut(4096).zip(src.par_chunks(4096)).for_each(|(d, s)| {
        for (a, b) in d.iter_mut().zip(s) {
            *a += *b;
        }
    });
    Ok(())
}

/// `out[i] = a[i] + b[i]`.
pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) -> Result<()> {
    check_len("b", b.len(), a.len())?;
    check_len("out", out.len(), a.len())?;
    out.par_chunks_mut(4096).zip(a.par_chunks(4096).zip(b.par_chunks(4096))).for_each(|(o, (x, y))| {
        for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
            *o = *x + *y;
        }
    });
    Ok(())
}

/// `y[r, :] += bias` for every row `r` of `y` (`rows x bias.len()`).
pub fn add_bias(y: &mut [f32], bias: &[f32], rows: usize) -> Result<()> {
    let dim = bias.len();
    if dim == 0 {
        return Err(Error::ZeroDim { what: "bias" });
    }
    check_len("y", y.len(), rows.checked_mul(dim).ok_or(Error::Overflow { what: "y", rows, cols: dim })?)?;
    y.par_chunks_mut(dim).for_each(|row| {
        for (a, b) in row.iter_mut().zip(bias) {
            *a += *b;
        }
    });
    Ok(())
}

/// `x[i] *= alpha`.
pub fn scale_inplace(x: &mut [f32], alpha: f32) -> Result<()> {
    x.par_chunks_mut(4096).for_each(|c| c.iter_mut().for_each(|v| *v *= alpha));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// embedding

/// Token embedding lookup: `out[t, :] = table[ids[t], :]`.
///
/// `table` is `vocab x d`, `out` is `ids.len() x d`. An id `>= vocab` is an [`Error::Invalid`]
/// naming the position. The table is frozen, so there is no backward.
pub fn embedding_forward(ids: &[u32], table: &[f32], vocab: usize, d: usize, out: &mut [f32]) -> Result<()> {
    nonzero("vocab", vocab)?;
    nonzero("d", d)?;
    check_mat("table", table.len(), vocab, d)?;
    check_mat("out", out.len(), ids.len(), d)?;
    if let Some((t, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(Error::invalid("ids", format!("ids[{t}] = {id} is out of range for vocab {vocab}")));
    }
    out.par_chunks_mut(d).zip(ids.par_iter()).for_each(|(row, &id)| {
        let id = id as usize;
        row.copy_from_slice(&table[id * d..(id + 1) * d]);
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// RMSNorm (HF `LlamaRMSNorm`), per row of `x` (`n x d`):
///
/// ```text
/// rstd = 1 / sqrt(mean_j(x_j^2) + eps)        y_j = (x_j * rstd) * w_j
/// ```
///
/// The mean of squares is accumulated in f64 and rounded to f32 (torch sums in f32 with a
/// pairwise reduction; f64 is closer to the exact value than either). Writes `out` (`n x d`)
/// and `rstd` (`n`), which [`rmsnorm_backward`] needs.
pub fn rmsnorm_forward(
    x: &[f32],
    weight: &[f32],
    n: usize,
    d: usize,
    eps: f32,
    out: &mut [f32],
    rstd: &mut [f32],
) -> Result<()> {
    nonzero("d", d)?;
    check_mat("x", x.len(), n, d)?;
    check_len("weight", weight.len(), d)?;
    check_mat("out", out.len(), n, d)?;
    check_len("rstd", rstd.len(), n)?;
    if !(eps >= 0.0) {
        return Err(Error::invalid("eps", format!("must be >= 0, got {eps}")));
    }
    out.par_chunks_mut(d).zip(rstd.par_iter_mut()).zip(x.par_chunks(d)).for_each(|((o, r), xr)| {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let var = (ss / d as f64) as f32;
        let rs = 1.0 / (var + eps).sqrt();
        *r = rs;
        for ((o, &xv), &w) in o.iter_mut().zip(xr).zip(weight) {
            *o = w * (xv * rs);
        }
    });
    Ok(())
}

/// Backward of [`rmsnorm_forward`] with a frozen weight (no `dweight`). With `r = rstd`,
/// `g_j = dout_j * w_j`:
///
/// ```text
/// dx_j = r * g_j - r^3 / d * x_j * sum_k(g_k * x_k)
/// ```
///
/// Overwrites `dx` (`n x d`).
pub fn rmsnorm_backward(
    dout: &[f32],
    x: &[f32],
    weight: &[f32],
    rstd: &[f32],
    n: usize,
    d: usize,
    dx: &mut [f32],
) -> Result<()> {
    nonzero("d", d)?;
    check_mat("dout", dout.len(), n, d)?;
    check_mat("x", x.len(), n, d)?;
    check_len("weight", weight.len(), d)?;
    check_len("rstd", rstd.len(), n)?;
    check_mat("dx", dx.len(), n, d)?;
    dx.par_chunks_mut(d)
        .zip(dout.par_chunks(d))
        .zip(x.par_chunks(d))
        .zip(rstd.par_iter())
        .for_each(|(((dxr, dor), xr), &r)| {
            let dot: f64 = dor.iter().zip(weight).zip(xr).map(|((&g, &w), &xv)| (g * w) as f64 * xv as f64).sum();
            let c = (dot as f32) * r * r * r / d as f32;
            for (((o, &g), &w), &xv) in dxr.iter_mut().zip(dor).zip(weight).zip(xr) {
                *o = r * (g * w) - c * xv;
            }
        });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Precomputed rotary tables, computed in f32 exactly as transformers' `LlamaRotaryEmbedding`
/// (default rope type) does:
///
/// ```text
/// inv_freq_i = 1 / theta^((2i) / head_dim)     (i < head_dim/2, all f32)
/// angle(p, i) = f32(p) * inv_freq_i            cos/sin of that f32 angle
/// ```
#[derive(Clone, Debug)]
pub struct RopeCache {
    head_dim: usize,
    max_pos: usize,
    /// `max_pos x head_dim/2`
    cos: Vec<f32>,
    /// `max_pos x head_dim/2`
    sin: Vec<f32>,
}

impl RopeCache {
    /// Tables for positions `0..max_pos` of plain RoPE with base `theta`. `head_dim` must be
    /// even and positive, `theta > 0`.
    pub fn new(head_dim: usize, theta: f32, max_pos: usize) -> Result<Self> {
        Self::for_rope(head_dim, &crate::rope::Rope::new(theta), max_pos)
    }

    /// Tables for positions `0..max_pos` of `rope` (its base and scaling,
    /// [`crate::rope::Rope::inv_freq`]): `a = f32(pos) inv_freq_i`, `(cos a, sin a)` in f32, as
    /// transformers computes them.
    pub fn for_rope(head_dim: usize, rope: &crate::rope::Rope, max_pos: usize) -> Result<Self> {
        nonzero("head_dim", head_dim)?;
        nonzero("max_pos", max_pos)?;
        let inv_freq = rope.inv_freq(head_dim)?;
        let half = head_dim / 2;
        let len = mul("rope table", max_pos, half)?;
        let mut cos = vec![0.0f32; len];
        let mut sin = vec![0.0f32; len];
        cos.par_chunks_mut(half).zip(sin.par_chunks_mut(half)).enumerate().for_each(|(p, (c, s))| {
            for i in 0..half {
                let a = p as f32 * inv_freq[i];
                c[i] = a.cos();
                s[i] = a.sin();
            }
        });
        Ok(RopeCache { head_dim, max_pos, cos, sin })
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    pub fn max_pos(&self) -> usize {
        self.max_pos
    }
    /// `(cos, sin)` of the angle for position `pos` and frequency index `i < head_dim/2`.
    pub fn get(&self, pos: usize, i: usize) -> Result<(f32, f32)> {
        if pos >= self.max_pos || i >= self.head_dim / 2 {
            return Err(Error::invalid("pos", format!("({pos}, {i}) outside the table {} x {}", self.max_pos, self.head_dim / 2)));
        }
        let k = pos * (self.head_dim / 2) + i;
        Ok((self.cos[k], self.sin[k]))
    }

    fn check(&self, x_len: usize, positions: &[usize], heads: usize) -> Result<()> {
        nonzero("heads", heads)?;
        let width = mul("heads * head_dim", heads, self.head_dim)?;
        check_mat("x", x_len, positions.len(), width)?;
        if let Some((t, &p)) = positions.iter().enumerate().find(|(_, &p)| p >= self.max_pos) {
            return Err(Error::invalid(
                "positions",
                format!("positions[{t}] = {p} is beyond the RoPE table ({} positions)", self.max_pos),
            ));
        }
        Ok(())
    }

    fn rotate(&self, x: &mut [f32], positions: &[usize], heads: usize, sign: f32) -> Result<()> {
        self.check(x.len(), positions, heads)?;
        let hd = self.head_dim;
        let half = hd / 2;
        x.par_chunks_mut(heads * hd).zip(positions.par_iter()).for_each(|(row, &p)| {
            let c = &self.cos[p * half..(p + 1) * half];
            let s = &self.sin[p * half..(p + 1) * half];
            for head in row.chunks_exact_mut(hd) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    let si = sign * s[i];
                    // HF: q*cos + rotate_half(q)*sin, rotate_half(q) = [-q2, q1]
                    x1[i] = a * c[i] + (-b) * si;
                    x2[i] = b * c[i] + a * si;
                }
            }
        });
        Ok(())
    }
}

/// Rotary position embedding in place, HF rotate-half convention. `x` is
/// `positions.len() x (heads * head_dim)` (row `t` at position `positions[t]`); within each
/// head, the pairs `(x_i, x_{i+hd/2})` rotate by `angle(p, i)`:
///
/// ```text
/// x_i'        = x_i cos - x_{i+hd/2} sin
/// x_{i+hd/2}' = x_{i+hd/2} cos + x_i sin
/// ```
pub fn rope_forward(x: &mut [f32], positions: &[usize], heads: usize, cache: &RopeCache) -> Result<()> {
    cache.rotate(x, positions, heads, 1.0)
}

/// Backward of [`rope_forward`] in place: the rotation is orthogonal, so the gradient rotates
/// by `-angle` (`dx_i = g_i cos + g_{i+hd/2} sin`, `dx_{i+hd/2} = g_{i+hd/2} cos - g_i sin`).
pub fn rope_backward(dx: &mut [f32], positions: &[usize], heads: usize, cache: &RopeCache) -> Result<()> {
    cache.rotate(dx, positions, heads, -1.0)
}

// ---------------------------------------------------------------------------------------------
// attention

/// Shape of one causal grouped-query attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// A sliding window (Mistral 7B v0.1's, Qwen's `use_sliding_window`): query `i` attends
    /// to keys `j` with `i - window < j <= i` only, as transformers masks it. `None`: plain
    /// causal attention.
    pub window: Option<usize>,
}

impl AttnShape {
    /// A checked shape: all positive, `heads` a multiple of `kv_heads`, sizes representable;
    /// no window.
    pub fn new(batch: usize, seq: usize, heads: usize, kv_heads: usize, head_dim: usize) -> Result<Self> {
        let s = AttnShape { batch, seq, heads, kv_heads, head_dim, window: None };
        s.validate()?;
        Ok(s)
    }
    /// The same shape with a sliding window of `window` keys (`None`: none); a window of 0 is
    /// an error.
    pub fn with_window(self, window: Option<usize>) -> Result<Self> {
        AttnShape { window, ..self }.checked()
    }
    /// The shape itself, checked as [`AttnShape::new`] and [`AttnShape::with_window`] check it
    /// (for a shape built as a struct literal).
    pub fn checked(self) -> Result<Self> {
        self.validate()?;
        Ok(self)
    }
    /// The first key query `i` attends to (`i + 1 - window`, or 0).
    pub fn first_key(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }
    /// One past the last query that attends to key `j` (`j + window`, at most `seq`).
    pub fn query_end(&self, j: usize) -> usize {
        self.window.map_or(self.seq, |w| j.saturating_add(w).min(self.seq))
    }
    fn validate(&self) -> Result<()> {
        for (what, v) in [
            ("batch", self.batch),
            ("seq", self.seq),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
        ] {
            nonzero(what, v)?;
        }
        if self.window == Some(0) {
            return Err(Error::ZeroDim { what: "window" });
        }
        if self.heads % self.kv_heads != 0 {
            return Err(Error::invalid(
                "kv_heads",
                format!("heads {} is not a multiple of kv_heads {}", self.heads, self.kv_heads),
            ));
        }
        let n = mul("batch * seq", self.batch, self.seq)?;
        mul("q", n, mul("heads * head_dim", self.heads, self.head_dim)?)?;
        mul("lse", n, self.heads)?;
        Ok(())
    }
    /// Tokens `B * S`.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
    /// Width of a `q` / output row, `H * hd`.
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Width of a `k` / `v` row, `KVH * hd`.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Query heads per kv head, `H / KVH`; head `h` reads kv head `h / group()`.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn check_qkv(&self, q: usize, k: usize, v: usize) -> Result<()> {
        self.validate()?;
        check_mat("q", q, self.tokens(), self.q_width())?;
        check_mat("k", k, self.tokens(), self.kv_width())?;
        check_mat("v", v, self.tokens(), self.kv_width())?;
        Ok(())
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four partial sums: keeps the dependency chain short and lets the compiler vectorise.
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Causal grouped-query attention forward. For batch `b`, query head `h` (kv head
/// `g = h / (H/KVH)`), query position `i`, keys `j` from [`AttnShape::first_key`]`(i)` to `i`:
///
/// ```text
/// s_ij = (q_i . k_j) / sqrt(hd)   (j0 <= j <= i)      lse_i = log sum_j exp(s_ij)
/// out_i = sum_j exp(s_ij - lse_i) v_j
/// ```
///
/// Writes `out` (`(B,S,H,hd)`) and `lse` (`(B,S,H)`), the softmax statistics that
/// [`attention_backward`] uses to recompute the probabilities. Memory beyond the outputs: one
/// row of `S` scores per worker. Sequences of different lengths need no mask when padded on
/// the right: causality keeps the padding out of every earlier position; give the padded
/// targets [`IGNORE_INDEX`] in the loss.
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    shape.check_qkv(q.len(), k.len(), v.len())?;
    check_mat("out", out.len(), shape.tokens(), shape.q_width())?;
    check_mat("lse", lse.len(), shape.tokens(), shape.heads)?;
    let AttnShape { seq, heads, head_dim: hd, .. } = shape;
    let (qw, kw, group) = (shape.q_width(), shape.kv_width(), shape.group());
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(qw).zip(lse.par_chunks_mut(heads)).enumerate().for_each_init(
        || vec![0.0f32; seq],
        |scores, (t, (orow, lrow))| {
            let (b, i) = (t / seq, t % seq);
            let base = b * seq;
            let j0 = shape.first_key(i);
            for h in 0..heads {
                let g = h / group;
                let qh = &q[t * qw + h * hd..t * qw + (h + 1) * hd];
                let mut m = f32::NEG_INFINITY;
                for j in j0..=i {
                    let kj = &k[(base + j) * kw + g * hd..(base + j) * kw + (g + 1) * hd];
                    let s = dot(qh, kj) * scale;
                    scores[j] = s;
                    m = m.max(s);
                }
                let mut l = 0.0f32;
                for s in scores[j0..=i].iter_mut() {
                    *s = (*s - m).exp();
                    l += *s;
                }
                let oh = &mut orow[h * hd..(h + 1) * hd];
                oh.fill(0.0);
                let inv = 1.0 / l;
                for j in j0..=i {
                    let vj = &v[(base + j) * kw + g * hd..(base + j) * kw + (g + 1) * hd];
                    axpy(oh, scores[j] * inv, vj);
                }
                lrow[h] = m + l.ln();
            }
        },
    );
    Ok(())
}

/// Backward of [`attention_forward`] (flash-attention style: probabilities are recomputed from
/// `lse`, nothing `S x S` is stored). With `p_ij = exp(s_ij - lse_i)`, `D_i = dout_i . out_i`:
///
/// ```text
/// dp_ij = dout_i . v_j        ds_ij = p_ij (dp_ij - D_i)
/// dq_i = scale sum_j ds_ij k_j     dk_j = scale sum_{i>=j, h in group} ds_ij q_i
/// dv_j = sum_{i>=j, h in group} p_ij dout_i
/// ```
///
/// (with a window, `j` runs from [`AttnShape::first_key`]`(i)` and `i` up to
/// [`AttnShape::query_end`]`(j)`).
///
/// Overwrites `dq` (`(B,S,H,hd)`), `dk` and `dv` (`(B,S,KVH,hd)`). Runs in two parallel passes:
/// one over query rows (`dq`), one over key rows (`dk`, `dv`), each deterministic.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    shape: AttnShape,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    shape.check_qkv(q.len(), k.len(), v.len())?;
    let n = shape.tokens();
    check_mat("dout", dout.len(), n, shape.q_width())?;
    check_mat("out", out.len(), n, shape.q_width())?;
    check_mat("lse", lse.len(), n, shape.heads)?;
    check_mat("dq", dq.len(), n, shape.q_width())?;
    check_mat("dk", dk.len(), n, shape.kv_width())?;
    check_mat("dv", dv.len(), n, shape.kv_width())?;
    let AttnShape { seq, heads, head_dim: hd, kv_heads, .. } = shape;
    let (qw, kw, group) = (shape.q_width(), shape.kv_width(), shape.group());
    let scale = 1.0 / (hd as f32).sqrt();

    // D_i = dout_i . out_i per (token, head)
    let mut dd = vec![0.0f32; n * heads];
    dd.par_chunks_mut(heads).enumerate().for_each(|(t, drow)| {
        for h in 0..heads {
            let r = t * qw + h * hd..t * qw + (h + 1) * hd;
            drow[h] = dot(&dout[r.clone()], &out[r]);
        }
    });

    // pass 1: dq, over query rows
    dq.par_chunks_mut(qw).enumerate().for_each(|(t, dqrow)| {
        let (b, i) = (t / seq, t % seq);
        let base = b * seq;
        dqrow.fill(0.0);
        for h in 0..heads {
            let g = h / group;
            let qh = &q[t * qw + h * hd..t * qw + (h + 1) * hd];
            let doh = &dout[t * qw + h * hd..t * qw + (h + 1) * hd];
            let (l, di) = (lse[t * heads + h], dd[t * heads + h]);
            let dqh = &mut dqrow[h * hd..(h + 1) * hd];
            for j in shape.first_key(i)..=i {
                let kr = (base + j) * kw + g * hd..(base + j) * kw + (g + 1) * hd;
                let p = (dot(qh, &k[kr.clone()]) * scale - l).exp();
                let dp = dot(doh, &v[kr.clone()]);
                axpy(dqh, scale * p * (dp - di), &k[kr]);
            }
        }
    });

    // pass 2: dk, dv, over key rows
    dk.par_chunks_mut(kw).zip(dv.par_chunks_mut(kw)).enumerate().for_each(|(t, (dkrow, dvrow))| {
        let (b, j) = (t / seq, t % seq);
        let base = b * seq;
        dkrow.fill(0.0);
        dvrow.fill(0.0);
        for g in 0..kv_heads {
            let kj = &k[t * kw + g * hd..t * kw + (g + 1) * hd];
            let vj = &v[t * kw + g * hd..t * kw + (g + 1) * hd];
            let dkg = &mut dkrow[g * hd..(g + 1) * hd];
            let dvg = &mut dvrow[g * hd..(g + 1) * hd];
            for h in g * group..(g + 1) * group {
                for i in j..shape.query_end(j) {
                    let ti = base + i;
                    let qr = ti * qw + h * hd..ti * qw + (h + 1) * hd;
                    let p = (dot(&q[qr.clone()], kj) * scale - lse[ti * heads + h]).exp();
                    let dp = dot(&dout[qr.clone()], vj);
                    axpy(dvg, p, &dout[qr.clone()]);
                    axpy(dkg, scale * p * (dp - dd[ti * heads + h]), &q[qr]);
                }
            }
        }
    });
    Ok(())
}

/// Stores the keys or values of one new token per sequence into a KV cache: `new` is
/// `batch x width` (`width = KVH * hd`), `cache` is `(batch, capacity, width)`, and row `b` of
/// `new` goes to position `pos` of sequence `b`.
pub fn kv_cache_store(new: &[f32], cache: &mut [f32], batch: usize, capacity: usize, width: usize, pos: usize) -> Result<()> {
    nonzero("width", width)?;
    nonzero("capacity", capacity)?;
    check_mat("new", new.len(), batch, width)?;
    check_mat("cache", cache.len(), mul("batch * capacity", batch, capacity)?, width)?;
    if pos >= capacity {
        return Err(Error::invalid("pos", format!("position {pos} is beyond the cache capacity {capacity}")));
    }
    for b in 0..batch {
        cache[(b * capacity + pos) * width..(b * capacity + pos + 1) * width].copy_from_slice(&new[b * width..(b + 1) * width]);
    }
    Ok(())
}

/// One greedy-decoding attention step against a KV cache. `q` is `batch x (H * hd)` (the new
/// token of each sequence); `k_cache`, `v_cache` are `(batch, capacity, KVH, hd)` and already
/// hold the new token's key and value at position `len - 1`; attention runs over positions
/// `0..len` (causality is implied: the new token is the last one), or the last `window` of
/// them. Writes `out` (`batch x (H * hd)`), same formula as [`attention_forward`].
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    batch: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    window: Option<usize>,
    out: &mut [f32],
) -> Result<()> {
    let shape = AttnShape::new(batch, capacity.max(1), heads, kv_heads, head_dim)?.with_window(window)?;
    nonzero("capacity", capacity)?;
    nonzero("len", len)?;
    if len > capacity {
        return Err(Error::invalid("len", format!("{len} exceeds the cache capacity {capacity}")));
    }
    let (qw, kw, group, hd) = (shape.q_width(), shape.kv_width(), shape.group(), head_dim);
    check_mat("q", q.len(), batch, qw)?;
    check_mat("out", out.len(), batch, qw)?;
    let cache_rows = mul("batch * capacity", batch, capacity)?;
    check_mat("k_cache", k_cache.len(), cache_rows, kw)?;
    check_mat("v_cache", v_cache.len(), cache_rows, kw)?;
    let scale = 1.0 / (hd as f32).sqrt();
    let j0 = shape.first_key(len - 1);
    out.par_chunks_mut(qw).enumerate().for_each_init(
        || vec![0.0f32; len],
        |scores, (b, orow)| {
            let base = b * capacity;
            for h in 0..heads {
                let g = h / group;
                let qh = &q[b * qw + h * hd..b * qw + (h + 1) * hd];
                let mut m = f32::NEG_INFINITY;
                for j in j0..len {
                    let r = (base + j) * kw + g * hd..(base + j) * kw + (g + 1) * hd;
                    scores[j] = dot(qh, &k_cache[r]) * scale;
                    m = m.max(scores[j]);
                }
                let mut l = 0.0f32;
                for s in scores[j0..].iter_mut() {
                    *s = (*s - m).exp();
                    l += *s;
                }
                let oh = &mut orow[h * hd..(h + 1) * hd];
                oh.fill(0.0);
                for j in j0..len {
                    let r = (base + j) * kw + g * hd..(base + j) * kw + (g + 1) * hd;
                    axpy(oh, scores[j] / l, &v_cache[r]);
                }
            }
        },
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SwiGLU: `out = silu(gate) * up`, `silu(g) = g / (1 + exp(-g))` (elementwise, any length).
pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    check_len("up", up.len(), gate.len())?;
    check_len("out", out.len(), gate.len())?;
    out.par_chunks_mut(4096).zip(gate.par_chunks(4096).zip(up.par_chunks(4096))).for_each(|(o, (g, u))| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    });
    Ok(())
}

/// Backward of [`swiglu_forward`], with `sg = sigmoid(gate)`:
///
/// ```text
/// dup = dout * silu(gate)          dgate = dout * up * sg * (1 + gate * (1 - sg))
/// ```
///
/// Overwrites `dgate` and `dup`.
pub fn swiglu_backward(dout: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) -> Result<()> {
    let n = gate.len();
    check_len("dout", dout.len(), n)?;
    check_len("up", up.len(), n)?;
    check_len("dgate", dgate.len(), n)?;
    check_len("dup", dup.len(), n)?;
    const C: usize = 4096;
    dgate
        .par_chunks_mut(C)
        .zip(dup.par_chunks_mut(C))
        .zip(dout.par_chunks(C).zip(gate.par_chunks(C).zip(up.par_chunks(C))))
        .for_each(|((dg, du), (d, (g, u)))| {
            for i in 0..dg.len() {
                let s = sigmoid(g[i]);
                du[i] = d[i] * g[i] * s;
                dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// cross-entropy

fn check_targets(targets: &[i32], n: usize, vocab: usize) -> Result<usize> {
    check_len("targets", targets.len(), n)?;
    let mut count = 0;
    for (t, &y) in targets.iter().enumerate() {
        if y == IGNORE_INDEX {
            continue;
        }
        if y < 0 || y as usize >= vocab {
            return Err(Error::invalid(
                "targets",
                format!("targets[{t}] = {y} is neither in 0..{vocab} nor IGNORE_INDEX ({IGNORE_INDEX})"),
            ));
        }
        count += 1;
    }
    if count == 0 {
        return Err(Error::invalid("targets", format!("all {n} targets are IGNORE_INDEX: the mean loss is undefined")));
    }
    Ok(count)
}

/// `(max, log sum exp(x - max))` of a row, the sum in f64.
#[inline]
fn row_lse(row: &[f32]) -> f32 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let s: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
    m + s.ln() as f32
}

/// Cross-entropy of `logits` (`n x vocab`) against `targets` (`n`; [`IGNORE_INDEX`] skips a
/// row), as `torch.nn.functional.cross_entropy(reduction="mean")`:
///
/// ```text
/// losses_t = logsumexp(logits_t) - logits_t[y_t]   (0 for ignored rows)
/// loss = sum_t losses_t / count(non-ignored)
/// ```
///
/// The log-sum-exp is stabilised by the row max. Writes `losses` (`n`) and returns the mean.
/// A target outside `0..vocab` (other than `IGNORE_INDEX`) or no target at all is an error.
pub fn cross_entropy_forward(logits: &[f32], targets: &[i32], n: usize, vocab: usize, losses: &mut [f32]) -> Result<f32> {
    nonzero("vocab", vocab)?;
    check_mat("logits", logits.len(), n, vocab)?;
    check_len("losses", losses.len(), n)?;
    let count = check_targets(targets, n, vocab)?;
    losses.par_iter_mut().zip(logits.par_chunks(vocab)).zip(targets.par_iter()).for_each(|((l, row), &y)| {
        *l = if y == IGNORE_INDEX { 0.0 } else { row_lse(row) - row[y as usize] };
    });
    let total: f64 = losses.iter().map(|&l| l as f64).sum();
    Ok((total / count as f64) as f32)
}

/// Backward of [`cross_entropy_forward`] in place: `logits` becomes
///
/// ```text
/// dlogits_t = dloss * (softmax(logits_t) - onehot(y_t)) / count     (0 for ignored rows)
/// ```
///
/// `dloss` is the gradient of the final loss with respect to the mean (1 for plain training).
pub fn cross_entropy_backward(logits: &mut [f32], targets: &[i32], n: usize, vocab: usize, dloss: f32) -> Result<()> {
    nonzero("vocab", vocab)?;
    check_mat("logits", logits.len(), n, vocab)?;
    let count = check_targets(targets, n, vocab)?;
    let c = dloss / count as f32;
    logits.par_chunks_mut(vocab).zip(targets.par_iter()).for_each(|(row, &y)| softmax_grad_row(row, y, c));
    Ok(())
}

/// `row <- c * (softmax(row) - onehot(y))`, or zeros for an ignored row.
fn softmax_grad_row(row: &mut [f32], y: i32, c: f32) {
    if y == IGNORE_INDEX {
        row.fill(0.0);
        return;
    }
    let lse = row_lse(row);
    for x in row.iter_mut() {
        *x = c * (*x - lse).exp();
    }
    row[y as usize] -= c;
}

/// The language-model head and cross-entropy fused, chunk by chunk over rows, without ever
/// holding the `n x vocab` logits: for each chunk of at most `chunk_rows` rows,
///
/// ```text
/// logits = hidden_chunk emb^T          (chunk x vocab; emb is the tied vocab x d matrix)
/// loss  += sum_t (logsumexp(logits_t) - logits_t[y_t])
/// dhidden_chunk = (dloss / count) (softmax(logits) - onehot(y)) emb       (if asked)
/// ```
///
/// Returns the mean loss over non-ignored targets, and writes `dhidden` (`n x d`) when given.
/// The embedding matrix is frozen: no gradient for it. Peak extra memory:
/// `chunk_rows x vocab` floats.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_cross_entropy(
    hidden: &[f32],
    emb: &[f32],
    targets: &[i32],
    n: usize,
    d: usize,
    vocab: usize,
    chunk_rows: usize,
    dloss: f32,
    mut dhidden: Option<&mut [f32]>,
) -> Result<f32> {
    nonzero("d", d)?;
    nonzero("vocab", vocab)?;
    nonzero("chunk_rows", chunk_rows)?;
    check_mat("hidden", hidden.len(), n, d)?;
    check_mat("emb", emb.len(), vocab, d)?;
    if let Some(dh) = dhidden.as_deref() {
        check_mat("dhidden", dh.len(), n, d)?;
    }
    let count = check_targets(targets, n, vocab)?;
    let c = dloss / count as f32;
    let rows = chunk_rows.min(n);
    let mut logits = vec![0.0f32; mul("chunk logits", rows, vocab)?];
    let mut total = 0.0f64;
    let mut r0 = 0;
    while r0 < n {
        let m = rows.min(n - r0);
        let lg = &mut logits[..m * vocab];
        let h = &hidden[r0 * d..(r0 + m) * d];
        // lg (m x V) = h (m x d) emb^T
        gemm_f32(m, vocab, d, lg, h, d as isize, 1, emb, 1, d as isize, false);
        let tg = &targets[r0..r0 + m];
        let part: f64 = lg
            .par_chunks_mut(vocab)
            .zip(tg.par_iter())
            .map(|(row, &y)| {
                if y == IGNORE_INDEX {
                    row.fill(0.0);
                    return 0.0;
                }
                let lse = row_lse(row);
                let l = (lse - row[y as usize]) as f64;
                for x in row.iter_mut() {
                    *x = c * (*x - lse).exp();
                }
                row[y as usize] -= c;
                l
            })
            .sum();
        total += part;
        if let Some(dh) = dhidden.as_deref_mut() {
            // dh (m x d) = dlogits (m x V) emb (V x d)
            gemm_f32(m, d, vocab, &mut dh[r0 * d..(r0 + m) * d], lg, vocab as isize, 1, emb, d as isize, 1, false);
        }
        r0 += m;
    }
    Ok((total / count as f64) as f32)
}

/// Logits of the (tied) language-model head: `logits = hidden emb^T`, `hidden` `n x d`, `emb`
/// `vocab x d`, `logits` `n x vocab` (for evaluation and generation; training uses
/// [`lm_head_cross_entropy`], which never holds all the logits).
pub fn lm_head_forward(hidden: &[f32], emb: &[f32], n: usize, d: usize, vocab: usize, logits: &mut [f32]) -> Result<()> {
    nonzero("d", d)?;
    nonzero("vocab", vocab)?;
    check_mat("hidden", hidden.len(), n, d)?;
    check_mat("emb", emb.len(), vocab, d)?;
    check_mat("logits", logits.len(), n, vocab)?;
    if n > 0 {
        gemm_f32(n, vocab, d, logits, hidden, d as isize, 1, emb, 1, d as isize, false);
    }
    Ok(())
}

/// `dst (m x n, row-major contiguous) = lhs (m x k) rhs (k x n)` with the given strides
/// (`*_rs` row stride, `*_cs` column stride) for `lhs`/`rhs`. Callers check the lengths.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: &[f32],
    rhs_rs: isize,
    rhs_cs: isize,
    accumulate: bool,
) {
    debug_assert_eq!(dst.len(), m * n);
    let par = if m * n * k > 1 << 15 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the callers check that `lhs` spans (m-1)*lhs_rs + (k-1)*lhs_cs + 1 elements,
    // `rhs` (k-1)*rhs_rs + (n-1)*rhs_cs + 1 and `dst` m*n; the slices do not alias (one is &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}
