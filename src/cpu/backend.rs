//! [`Cpu`]: the [`Backend`] on host memory (`Vec<f32>`), with f32 GEMMs from the `gemm`
//! crate and rayon for the row-parallel ops.

use rayon::prelude::*;

use crate::backend::{AdamHyper, AttnShape, Backend};
use crate::error::{Error, Result};
use crate::shape::LayerShape;

/// The CPU engine. Stateless: threads come from rayon's global pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Cpu {
    pub fn new() -> Self {
        Cpu
    }
}

fn need(arg: &'static str, buf: &[f32], n: usize) -> Result<()> {
    if buf.len() != n {
        return Err(Error::Len { arg, expected: n, got: buf.len() });
    }
    Ok(())
}

fn need_at_least(arg: &'static str, buf: &[f32], n: usize) -> Result<()> {
    if buf.len() < n {
        return Err(Error::Len { arg, expected: n, got: buf.len() });
    }
    Ok(())
}

/// Elements spanned by a strided `rows x cols` operand.
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// A strided operand: data, row stride, column stride.
#[derive(Clone, Copy)]
pub(crate) struct Op<'a> {
    pub d: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// Row-major `a` with `ld` columns per row.
pub(crate) fn rm(d: &[f32], ld: usize) -> Op<'_> {
    Op { d, rs: ld, cs: 1 }
}
/// The transpose of a row-major matrix with `ld` columns per row.
pub(crate) fn tr(d: &[f32], ld: usize) -> Op<'_> {
    Op { d, rs: 1, cs: ld }
}

/// `C (m x n, row-major, row stride ldc) = [C +] alpha * A (m x k) B (k x n)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm(
    what: &'static str,
    m: usize,
    n: usize,
    k: usize,
    a: Op<'_>,
    b: Op<'_>,
    c: &mut [f32],
    ldc: usize,
    alpha: f32,
    accumulate: bool,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if a.d.len() < span(m, k, a.rs, a.cs) || b.d.len() < span(k, n, b.rs, b.cs) || c.len() < span(m, n, ldc, 1) || ldc < n
    {
        return Err(Error::invalid(
            what,
            format!(
                "matmul {m}x{k} * {k}x{n}: operand buffers too small (a {}, b {}, c {})",
                a.d.len(),
                b.d.len(),
                c.len()
            ),
        ));
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= 32 * 32 * 32 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the spans of all three operands were checked against their buffers above;
    // `c` is exclusively borrowed and cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.d.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.d.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

#[inline]
fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

/// `theta^(-2i/d)` for `i < d/2`, in f32 as transformers computes it.
fn inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2).map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32)).collect()
}

impl Backend for Cpu {
    type Buf = Vec<f32>;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn fill_zero(&self, buf: &mut Vec<f32>) -> Result<()> {
        buf.fill(0.0);
        Ok(())
    }
    fn copy_into(&self, src: &Vec<f32>, dst: &mut Vec<f32>, dst_offset: usize) -> Result<()> {
        let end = dst_offset.checked_add(src.len()).filter(|&e| e <= dst.len()).ok_or_else(|| {
            Error::invalid("copy_into", format!("{} elements at offset {dst_offset} overrun {}", src.len(), dst.len()))
        })?;
        dst[dst_offset..end].copy_from_slice(src);
        Ok(())
    }
    fn add_assign(&self, y: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        need("add_assign x", x, y.len())?;
        y.par_iter_mut().with_min_len(4096).zip(x.par_iter()).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn embedding_forward(&self, table: &Vec<f32>, vocab: usize, dim: usize, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        need("embedding table", table, vocab * dim)?;
        need("embedding out", out, ids.len() * dim)?;
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= vocab {
                return Err(Error::invalid("ids", format!("token id {id} at position {t} is outside the vocabulary of {vocab}")));
            }
            out[t * dim..(t + 1) * dim].copy_from_slice(&table[id * dim..(id + 1) * dim]);
        }
        Ok(())
    }

    fn rmsnorm_forward(&self, x: &Vec<f32>, weight: &Vec<f32>, rows: usize, dim: usize, eps: f32, y: &mut Vec<f32>, rstd: &mut Vec<f32>) -> Result<()> {
        need("rmsnorm x", x, rows * dim)?;
        need("rmsnorm weight", weight, dim)?;
        need("rmsnorm y", y, rows * dim)?;
        need("rmsnorm rstd", rstd, rows)?;
        y.par_chunks_mut(dim).zip(rstd.par_iter_mut()).zip(x.par_chunks(dim)).for_each(|((yr, rs), xr)| {
            let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let r = 1.0 / (ss + eps).sqrt();
            *rs = r;
            for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(weight.iter()) {
                *yv = wv * (xv * r);
            }
        });
        Ok(())
    }

    fn rmsnorm_backward(&self, x: &Vec<f32>, weight: &Vec<f32>, rstd: &Vec<f32>, dy: &Vec<f32>, rows: usize, dim: usize, dx: &mut Vec<f32>) -> Result<()> {
        need("rmsnorm x", x, rows * dim)?;
        need("rmsnorm weight", weight, dim)?;
        need("rmsnorm rstd", rstd, rows)?;
        need("rmsnorm dy", dy, rows * dim)?;
        need("rmsnorm dx", dx, rows * dim)?;
        dx.par_chunks_mut(dim).zip(x.par_chunks(dim)).zip(dy.par_chunks(dim)).zip(rstd.par_iter()).for_each(
            |(((dxr, xr), dyr), &r)| {
                let mut dot = 0.0f32;
                for ((xv, gv), wv) in xr.iter().zip(dyr).zip(weight.iter()) {
                    dot += gv * wv * xv;
                }
                let coef = dot / dim as f32 * r * r;
                for (((d, xv), gv), wv) in dxr.iter_mut().zip(xr).zip(dyr).zip(weight.iter()) {
                    *d += r * (gv * wv - xv * coef);
                }
            },
        );
        Ok(())
    }

    fn linear_forward(&self, x: &Vec<f32>, w: &Vec<f32>, rows: usize, d_in: usize, d_out: usize, y: &mut Vec<f32>) -> Result<()> {
        need("linear x", x, rows * d_in)?;
        need("linear W", w, d_out * d_in)?;
        need("linear y", y, rows * d_out)?;
        mm("linear_forward", rows, d_out, d_in, rm(x, d_in), tr(w, d_in), y, d_out, 1.0, false)
    }

    fn linear_backward(&self, g: &Vec<f32>, w: &Vec<f32>, rows: usize, d_in: usize, d_out: usize, dx: &mut Vec<f32>, accumulate: bool) -> Result<()> {
        need("linear G", g, rows * d_out)?;
        need("linear W", w, d_out * d_in)?;
        need("linear dx", dx, rows * d_in)?;
        mm("linear_backward", rows, d_in, d_out, rm(g, d_out), rm(w, d_in), dx, d_in, 1.0, accumulate)
    }

    fn wegeft_forward(
        &self,
        s: LayerShape,
        x: &Vec<f32>,
        w: &Vec<f32>,
        phi: &Vec<f32>,
        psi: &Vec<f32>,
        scale: f32,
        y: &mut Vec<f32>,
        u: &mut Vec<f32>,
        c: &mut Vec<f32>,
    ) -> Result<()> {
        let (t, din, dout, r) = (s.tokens, s.d_in, s.d_out, s.rank);
        need("wegeft x", x, t * din)?;
        need("wegeft W", w, dout * din)?;
        need("wegeft phi", phi, din * r)?;
        need("wegeft psi", psi, r * din)?;
        need("wegeft y", y, t * dout)?;
        need("wegeft u", u, t * r)?;
        need("wegeft C", c, dout * r)?;
        mm("wegeft C = s W phi", dout, r, din, rm(w, din), rm(phi, r), c, r, scale, false)?;
        mm("wegeft u = x psi^T", t, r, din, rm(x, din), tr(psi, din), u, r, 1.0, false)?;
        mm("wegeft y = x W^T", t, dout, din, rm(x, din), tr(w, din), y, dout, 1.0, false)?;
        mm("wegeft y += u C^T", t, dout, r, rm(u, r), tr(c, r), y, dout, 1.0, true)
    }

    fn wegeft_backward(
        &self,
        s: LayerShape,
        x: &Vec<f32>,
        w: &Vec<f32>,
        psi: &Vec<f32>,
        scale: f32,
        u: &Vec<f32>,
        c: &Vec<f32>,
        g: &Vec<f32>,
        dx: Option<(&mut Vec<f32>, bool)>,
        dphi: &mut Vec<f32>,
        dpsi: &mut Vec<f32>,
    ) -> Result<()> {
        let (t, din, dout, r) = (s.tokens, s.d_in, s.d_out, s.rank);
        need("wegeft x", x, t * din)?;
        need("wegeft W", w, dout * din)?;
        need("wegeft psi", psi, r * din)?;
        need("wegeft u", u, t * r)?;
        need("wegeft C", c, dout * r)?;
        need("wegeft G", g, t * dout)?;
        need("wegeft dphi", dphi, din * r)?;
        need("wegeft dpsi", dpsi, r * din)?;
        let mut v = vec![0.0f32; t * r];
        mm("wegeft v = G C", t, r, dout, rm(g, dout), rm(c, r), &mut v, r, 1.0, false)?;
        let mut big_s = vec![0.0f32; dout * r];
        mm("wegeft S = G^T u", dout, r, t, tr(g, dout), rm(u, r), &mut big_s, r, 1.0, false)?;
        mm("wegeft dphi += s W^T S", din, r, dout, tr(w, din), rm(&big_s, r), dphi, r, scale, true)?;
        mm("wegeft dpsi += v^T x", r, din, t, tr(&v, r), rm(x, din), dpsi, din, 1.0, true)?;
        if let Some((dx, acc)) = dx {
            need("wegeft dx", dx, t * din)?;
            mm("wegeft dx = G W", t, din, dout, rm(g, dout), rm(w, din), dx, din, 1.0, acc)?;
            mm("wegeft dx += v psi", t, din, r, rm(&v, r), rm(psi, din), dx, din, 1.0, true)?;
        }
        Ok(())
    }

    fn rope(&self, x: &mut Vec<f32>, heads: usize, head_dim: usize, positions: &[u32], theta: f32, inverse: bool) -> Result<()> {
        if head_dim % 2 != 0 {
            return Err(Error::invalid("rope head_dim", format!("must be even, got {head_dim}")));
        }
        let width = heads * head_dim;
        need("rope x", x, positions.len() * width)?;
        let inv = inv_freq(head_dim, theta);
        let half = head_dim / 2;
        x.par_chunks_mut(width).zip(positions.par_iter()).for_each(|(row, &p)| {
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv
                .iter()
                .map(|f| {
                    let a = p as f32 * f;
                    (a.cos(), if inverse { -a.sin() } else { a.sin() })
                })
                .unzip();
            for hrow in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (hrow[i], hrow[i + half]);
                    hrow[i] = a * cos[i] - b * sin[i];
                    hrow[i + half] = b * cos[i] + a * sin[i];
                }
            }
        });
        Ok(())
    }

    fn attention_forward(&self, s: AttnShape, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, out: &mut Vec<f32>, lse: &mut Vec<f32>) -> Result<()> {
        s.check()?;
        need("attention q", q, s.q_elems())?;
        need_at_least("attention k", k, s.kv_elems())?;
        need_at_least("attention v", v, s.kv_elems())?;
        need("attention out", out, s.q_elems())?;
        need("attention lse", lse, s.lse_elems())?;
        let (hd, qw, kw) = (s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        // One task per (batch, head): local output rows and lse, scattered afterwards.
        let tasks: Vec<(usize, usize)> = (0..s.batch).flat_map(|b| (0..s.heads).map(move |h| (b, h))).collect();
        let group = s.heads / s.kv_heads;
        let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
            .par_iter()
            .map(|&(b, h)| {
                let kh = h / group;
                let mut o = vec![0.0f32; s.q_len * hd];
                let mut l = vec![0.0f32; s.q_len];
                let mut sc = vec![0.0f32; s.kv_len];
                for i in 0..s.q_len {
                    let qr = &q[(b * s.q_len + i) * qw + h * hd..][..hd];
                    let n = s.q_offset + i + 1;
                    let mut mx = f32::NEG_INFINITY;
                    for j in 0..n {
                        let kr = &k[(b * s.kv_stride + j) * kw + kh * hd..][..hd];
                        let d: f32 = qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
                        sc[j] = d;
                        mx = mx.max(d);
                    }
                    let mut sum = 0.0f32;
                    for sj in sc[..n].iter_mut() {
                        *sj = (*sj - mx).exp();
                        sum += *sj;
                    }
                    let inv = 1.0 / sum;
                    let orow = &mut o[i * hd..(i + 1) * hd];
                    for j in 0..n {
                        let p = sc[j] * inv;
                        let vr = &v[(b * s.kv_stride + j) * kw + kh * hd..][..hd];
                        for (ov, vv) in orow.iter_mut().zip(vr) {
                            *ov += p * vv;
                        }
                    }
                    l[i] = mx + sum.ln();
                }
                (o, l)
            })
            .collect();
        for (&(b, h), (o, l)) in tasks.iter().zip(results) {
            for i in 0..s.q_len {
                out[(b * s.q_len + i) * qw + h * hd..][..hd].copy_from_slice(&o[i * hd..(i + 1) * hd]);
            }
            lse[(b * s.heads + h) * s.q_len..][..s.q_len].copy_from_slice(&l);
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        s: AttnShape,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        dout: &Vec<f32>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
    ) -> Result<()> {
        s.check()?;
        need("attention q", q, s.q_elems())?;
        need_at_least("attention k", k, s.kv_elems())?;
        need_at_least("attention v", v, s.kv_elems())?;
        need("attention out", out, s.q_elems())?;
        need("attention dout", dout, s.q_elems())?;
        need("attention lse", lse, s.lse_elems())?;
        need("attention dq", dq, s.q_elems())?;
        need("attention dk", dk, k.len())?;
        need("attention dv", dv, v.len())?;
        let (hd, qw, kw) = (s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        let group = s.heads / s.kv_heads;
        // One task per (batch, kv head): it owns dk/dv of that head and dq of its query heads.
        let tasks: Vec<(usize, usize)> = (0..s.batch).flat_map(|b| (0..s.kv_heads).map(move |h| (b, h))).collect();
        type Local = (Vec<f32>, Vec<f32>, Vec<f32>);
        let results: Vec<Local> = tasks
            .par_iter()
            .map(|&(b, kh)| {
                let mut ldq = vec![0.0f32; group * s.q_len * hd];
                let mut ldk = vec![0.0f32; s.kv_len * hd];
                let mut ldv = vec![0.0f32; s.kv_len * hd];
                let mut p = vec![0.0f32; s.kv_len];
                for hg in 0..group {
                    let h = kh * group + hg;
                    for i in 0..s.q_len {
                        let row = (b * s.q_len + i) * qw + h * hd;
                        let qr = &q[row..row + hd];
                        let dor = &dout[row..row + hd];
                        let or = &out[row..row + hd];
                        let l = lse[(b * s.heads + h) * s.q_len + i];
                        let n = s.q_offset + i + 1;
                        let delta: f32 = dor.iter().zip(or).map(|(a, b)| a * b).sum();
                        let dqr = &mut ldq[(hg * s.q_len + i) * hd..][..hd];
                        for j in 0..n {
                            let kr = &k[(b * s.kv_stride + j) * kw + kh * hd..][..hd];
                            let vr = &v[(b * s.kv_stride + j) * kw + kh * hd..][..hd];
                            let sc: f32 = qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
                            let pj = (sc - l).exp();
                            p[j] = pj;
                            let dp: f32 = dor.iter().zip(vr).map(|(a, b)| a * b).sum();
                            let ds = pj * (dp - delta) * scale;
                            for (d, kv) in dqr.iter_mut().zip(kr) {
                                *d += ds * kv;
                            }
                            let dkr = &mut ldk[j * hd..(j + 1) * hd];
                            for (d, qv) in dkr.iter_mut().zip(qr) {
                                *d += ds * qv;
                            }
                            let dvr = &mut ldv[j * hd..(j + 1) * hd];
                            for (d, g) in dvr.iter_mut().zip(dor) {
                                *d += pj * g;
                            }
                        }
                    }
                }
                (ldq, ldk, ldv)
            })
            .collect();
        dk.fill(0.0);
        dv.fill(0.0);
        for (&(b, kh), (ldq, ldk, ldv)) in tasks.iter().zip(results) {
            for hg in 0..group {
                let h = kh * group + hg;
                for i in 0..s.q_len {
                    dq[(b * s.q_len + i) * qw + h * hd..][..hd].copy_from_slice(&ldq[(hg * s.q_len + i) * hd..][..hd]);
                }
            }
            for j in 0..s.kv_len {
                let at = (b * s.kv_stride + j) * kw + kh * hd;
                dk[at..at + hd].copy_from_slice(&ldk[j * hd..(j + 1) * hd]);
                dv[at..at + hd].copy_from_slice(&ldv[j * hd..(j + 1) * hd]);
            }
        }
        Ok(())
    }

    fn swiglu_forward(&self, gate: &Vec<f32>, up: &Vec<f32>, h: &mut Vec<f32>) -> Result<()> {
        need("swiglu up", up, gate.len())?;
        need("swiglu h", h, gate.len())?;
        h.par_iter_mut().with_min_len(4096).zip(gate.par_iter().zip(up.par_iter())).for_each(|(h, (&a, &u))| {
            *h = a * sigmoid(a) * u;
        });
        Ok(())
    }

    fn swiglu_backward(&self, gate: &Vec<f32>, up: &Vec<f32>, dh: &Vec<f32>, dgate: &mut Vec<f32>, dup: &mut Vec<f32>) -> Result<()> {
        let n = gate.len();
        need("swiglu up", up, n)?;
        need("swiglu dh", dh, n)?;
        need("swiglu dgate", dgate, n)?;
        need("swiglu dup", dup, n)?;
        dgate
            .par_iter_mut()
            .with_min_len(4096)
            .zip(dup.par_iter_mut())
            .zip(gate.par_iter().zip(up.par_iter()).zip(dh.par_iter()))
            .for_each(|((dg, du), ((&a, &u), &g))| {
                let sg = sigmoid(a);
                *du = g * a * sg;
                *dg = g * u * sg * (1.0 + a * (1.0 - sg));
            });
        Ok(())
    }

    fn logits(&self, h: &Vec<f32>, head: &Vec<f32>, rows: usize, dim: usize, vocab: usize, out: &mut Vec<f32>) -> Result<()> {
        need("logits h", h, rows * dim)?;
        need("logits head", head, vocab * dim)?;
        need("logits out", out, rows * vocab)?;
        mm("logits = h E^T", rows, vocab, dim, rm(h, dim), tr(head, dim), out, vocab, 1.0, false)
    }

    fn lm_head_loss(&self, h: &Vec<f32>, head: &Vec<f32>, dim: usize, vocab: usize, labels: &[i32], dh: Option<(&mut Vec<f32>, f32)>) -> Result<f32> {
        let rows = labels.len();
        need("lm_head h", h, rows * dim)?;
        need("lm_head head", head, vocab * dim)?;
        for (t, &l) in labels.iter().enumerate() {
            if l >= vocab as i32 {
                return Err(Error::invalid("labels", format!("label {l} at row {t} is outside the vocabulary of {vocab}")));
            }
        }
        let picked: Vec<usize> = (0..rows).filter(|&t| labels[t] >= 0).collect();
        let mut dh = dh;
        if let Some((d, _)) = dh.as_mut() {
            need("lm_head dh", d, rows * dim)?;
            d.fill(0.0);
        }
        const CHUNK: usize = 64;
        let mut total = 0.0f64;
        let mut hc = vec![0.0f32; CHUNK * dim];
        let mut z = vec![0.0f32; CHUNK * vocab];
        let mut dhc = vec![0.0f32; CHUNK * dim];
        for chunk in picked.chunks(CHUNK) {
            let n = chunk.len();
            for (i, &t) in chunk.iter().enumerate() {
                hc[i * dim..(i + 1) * dim].copy_from_slice(&h[t * dim..(t + 1) * dim]);
            }
            mm("lm_head logits", n, vocab, dim, rm(&hc, dim), tr(head, dim), &mut z, vocab, 1.0, false)?;
            let grad_scale = dh.as_ref().map(|(_, c)| *c);
            let losses: Vec<f64> = z[..n * vocab]
                .par_chunks_mut(vocab)
                .zip(chunk.par_iter())
                .map(|(zr, &t)| {
                    let label = labels[t] as usize;
                    let mx = zr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let sum: f64 = zr.iter().map(|&v| ((v - mx) as f64).exp()).sum();
                    let lse = mx as f64 + sum.ln();
                    let loss = lse - zr[label] as f64;
                    if let Some(c) = grad_scale {
                        for v in zr.iter_mut() {
                            *v = (((*v as f64) - lse).exp() as f32) * c;
                        }
                        zr[label] -= c;
                    }
                    loss
                })
                .collect();
            total += losses.iter().sum::<f64>();
            if let Some((d, _)) = dh.as_mut() {
                mm("lm_head dh = dz E", n, dim, vocab, rm(&z, vocab), rm(head, dim), &mut dhc, dim, 1.0, false)?;
                for (i, &t) in chunk.iter().enumerate() {
                    d[t * dim..(t + 1) * dim].copy_from_slice(&dhc[i * dim..(i + 1) * dim]);
                }
            }
        }
        Ok(total as f32)
    }

    fn adamw_step(&self, param: &mut Vec<f32>, grad: &Vec<f32>, m: &mut Vec<f32>, v: &mut Vec<f32>, hp: AdamHyper) -> Result<()> {
        let n = param.len();
        need("adamw grad", grad, n)?;
        need("adamw m", m, n)?;
        need("adamw v", v, n)?;
        if hp.step == 0 {
            return Err(Error::invalid("adamw step", "steps count from 1"));
        }
        let bc1 = 1.0 - (hp.beta1 as f64).powi(hp.step as i32);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(hp.step as i32);
        let step_size = (hp.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = 1.0 - hp.lr * hp.weight_decay;
        for i in 0..n {
            let g = grad[i];
            param[i] *= decay;
            // torch: m.lerp_(g, 1 - b1); v.mul_(b2).addcmul_(g, g, 1 - b2).
            m[i] += (1.0 - hp.beta1) * (g - m[i]);
            v[i] = v[i] * hp.beta2 + (1.0 - hp.beta2) * g * g;
            let denom = v[i].sqrt() / bc2_sqrt + hp.eps;
            param[i] -= step_size * m[i] / denom;
        }
        Ok(())
    }
}
