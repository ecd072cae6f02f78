//! [`Cpu`]: the [`Backend`] on host memory (`Vec<f32>`). A thin layer over the CPU kernels:
//! [`crate::cpu::layer`] (WeGeFT and frozen layers), [`crate::cpu::ops`] (the model ops),
//! [`crate::cpu::gemm`] (products), [`crate::train::optim`] (AdamW). What lives here is only
//! the LM head with its chunked cross-entropy.

use rayon::prelude::*;

use crate::backend::{AdamHyper, AttnShape, Backend, Dropout};
use crate::cpu::attention::{self, exp_neg};
use crate::cpu::gemm::{matmul_slices, Op};
use crate::cpu::{layer, ops};
use crate::error::{Error, Result};
use crate::shape::{LayerShape, Mat, MatMut};
use crate::train::optim::{AdamW, AdamWConfig};

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

/// `dst <- src` or `dst += src`, through a scratch buffer filled by `f` when accumulating.
fn write_or_add(dst: &mut [f32], accumulate: bool, f: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    if accumulate {
        let mut tmp = vec![0.0f32; dst.len()];
        f(&mut tmp)?;
        ops::add_inplace(dst, &tmp)
    } else {
        f(dst)
    }
}

/// `W o M / (1 - p)` (see [`Dropout`]), row-parallel.
fn masked(w: &[f32], d_in: usize, d: Dropout) -> Result<Vec<f32>> {
    d.check()?;
    let keep = 1.0 / (1.0 - d.p);
    let mut out = vec![0.0f32; w.len()];
    out.par_chunks_mut(d_in.max(1)).zip(w.par_chunks(d_in.max(1))).enumerate().for_each(|(i, (o, wr))| {
        let base = (i * d_in) as u64;
        for (j, (o, &x)) in o.iter_mut().zip(wr).enumerate() {
            *o = if Dropout::uniform(d.seed, base + j as u64) >= d.p { x * keep } else { 0.0 };
        }
    });
    Ok(out)
}

/// Rows of the LM head processed at once: `CHUNK x vocab` logits at a time (100 MB for a
/// 49152-token vocabulary). Large on purpose: the head's weight (`vocab x dim`) streams from
/// memory once per chunk, and on 2 cores the product runs at ~110 GFLOP/s with 64 rows,
/// ~310 with 256, ~370 with 512.
const CHUNK: usize = 512;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Saved = layer::Saved;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    /// NaN: a part of an output that an operation fails to write poisons what follows.
    fn output(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![f32::NAN; n])
    }
    /// A plain copy (the CPU products read f32).
    fn operand_copy(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn upload_vec(&self, data: Vec<f32>) -> Result<Vec<f32>> {
        Ok(data)
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
    fn copy_range(
        &self,
        src: &Vec<f32>,
        src_offset: usize,
        len: usize,
        dst: &mut Vec<f32>,
        dst_offset: usize,
    ) -> Result<()> {
        let s_end = src_offset.checked_add(len).filter(|&e| e <= src.len());
        let d_end = dst_offset.checked_add(len).filter(|&e| e <= dst.len());
        match (s_end, d_end) {
            (Some(se), Some(de)) => {
                dst[dst_offset..de].copy_from_slice(&src[src_offset..se]);
                Ok(())
            }
            _ => Err(Error::invalid(
                "copy_range",
                format!(
                    "{len} elements from {src_offset} (of {}) to {dst_offset} (of {}) overrun",
                    src.len(),
                    dst.len()
                ),
            )),
        }
    }
    fn add_assign(&self, y: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        ops::add_inplace(y, x)
    }
    fn add(&self, a: &Vec<f32>, b: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        ops::add(a, b, out)
    }
    fn add_bias(&self, y: &mut Vec<f32>, bias: &Vec<f32>, rows: usize, dim: usize) -> Result<()> {
        need("bias", bias, dim)?;
        ops::add_bias(y, bias, rows)
    }

    fn embedding_forward(
        &self,
        table: &Vec<f32>,
        vocab: usize,
        dim: usize,
        ids: &[u32],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        ops::embedding_forward(ids, table, vocab, dim, out)
    }

    fn rmsnorm_forward(
        &self,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
        y: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
    ) -> Result<()> {
        ops::rmsnorm_forward(x, weight, rows, dim, eps, y, rstd)
    }

    fn rmsnorm_backward(
        &self,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        rstd: &Vec<f32>,
        dy: &Vec<f32>,
        rows: usize,
        dim: usize,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        write_or_add(dx, true, |d| ops::rmsnorm_backward(dy, x, weight, rstd, rows, dim, d))
    }

    fn linear_forward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        d_in: usize,
        d_out: usize,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        layer::frozen_forward(
            Mat::new("x", x, rows, d_in)?,
            Mat::new("W", w, d_out, d_in)?,
            None,
            MatMut::new("y", y, rows, d_out)?,
        )
    }

    fn linear_backward(
        &self,
        g: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        d_in: usize,
        d_out: usize,
        dx: &mut Vec<f32>,
        accumulate: bool,
    ) -> Result<()> {
        let (g, w) = (Mat::new("G", g, rows, d_out)?, Mat::new("W", w, d_out, d_in)?);
        if accumulate {
            // dx += G W in one product.
            return matmul_slices(
                dx,
                (rows, d_in),
                1.0,
                1.0,
                g.data(),
                (rows, d_out),
                Op::N,
                w.data(),
                (d_out, d_in),
                Op::N,
            );
        }
        layer::frozen_backward(g, w, MatMut::new("dx", dx, rows, d_in)?)
    }

    fn wegeft_forward(
        &self,
        s: LayerShape,
        x: &Vec<f32>,
        w: &Vec<f32>,
        phi: &Vec<f32>,
        psi: &Vec<f32>,
        scale: f32,
        dropout: Option<Dropout>,
        y: &mut Vec<f32>,
    ) -> Result<layer::Saved> {
        let (xm, wm) = (Mat::new("x", x, s.tokens, s.d_in)?, Mat::new("W", w, s.d_out, s.d_in)?);
        let (phim, psim) = (Mat::new("phi", phi, s.d_in, s.rank)?, Mat::new("psi", psi, s.rank, s.d_in)?);
        let Some(d) = dropout else {
            return layer::wegeft_forward(&s, xm, wm, None, phim, psim, scale, MatMut::new("y", y, s.tokens, s.d_out)?);
        };
        // C from the masked W; the frozen product from the whole W.
        let wd = masked(w, s.d_in, d)?;
        let (t, din, dout, r) = (s.tokens, s.d_in, s.d_out, s.rank);
        let mut c = vec![0.0f32; dout * r];
        matmul_slices(&mut c, (dout, r), 0.0, scale, &wd, (dout, din), Op::N, phi, (din, r), Op::N)?;
        let mut u = vec![0.0f32; t * r];
        matmul_slices(&mut u, (t, r), 0.0, 1.0, x, (t, din), Op::N, psi, (r, din), Op::T)?;
        layer::frozen_forward(xm, wm, None, MatMut::new("y", y, t, dout)?)?;
        matmul_slices(y, (t, dout), 1.0, 1.0, &u, (t, r), Op::N, &c, (dout, r), Op::T)?;
        Ok(layer::Saved { u, c })
    }

    fn wegeft_multi_forward(
        &self,
        rows: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
        x: &Vec<f32>,
        w: &Vec<f32>,
        phi: &Vec<f32>,
        psi: &Vec<f32>,
        scales: &[f32],
        adapter_of_row: &[i32],
        y: &mut Vec<f32>,
    ) -> Result<()> {
        crate::backend::check_multi(self, rows, d_in, d_out, rank, x, w, phi, psi, scales, adapter_of_row, y)?;
        let ad = crate::cpu::multi::MultiAdapters::new(phi, psi, scales, d_in, rank)?;
        crate::cpu::multi::wegeft_multi_forward(
            Mat::new("x", x, rows, d_in)?,
            Mat::new("W", w, d_out, d_in)?,
            None,
            &ad,
            adapter_of_row,
            crate::cpu::multi::MultiPath::Auto,
            MatMut::new("y", y, rows, d_out)?,
        )
    }

    fn wegeft_backward(
        &self,
        s: LayerShape,
        x: &Vec<f32>,
        w: &Vec<f32>,
        phi: &Vec<f32>,
        psi: &Vec<f32>,
        scale: f32,
        dropout: Option<Dropout>,
        saved: &layer::Saved,
        g: &Vec<f32>,
        dx: Option<(&mut Vec<f32>, bool)>,
        dphi: &mut Vec<f32>,
        dpsi: &mut Vec<f32>,
    ) -> Result<()> {
        let x = Mat::new("x", x, s.tokens, s.d_in)?;
        let phi = Mat::new("phi", phi, s.d_in, s.rank)?;
        let psi = Mat::new("psi", psi, s.rank, s.d_in)?;
        let g = Mat::new("G", g, s.tokens, s.d_out)?;
        if let Some(d) = dropout {
            // The layer's backward with the masked W gives dphi = s W_d^T S and dpsi = v^T x
            // (v = G C from the saved C); dx = G W + v psi takes the whole W.
            let wd = masked(w, s.d_in, d)?;
            let wdm = Mat::new("W", &wd, s.d_out, s.d_in)?;
            layer::wegeft_backward(&s, x, wdm, phi, psi, scale, Some(saved), g, None, dphi, dpsi)?;
            if let Some((dx, acc)) = dx {
                let (t, din, dout, r) = (s.tokens, s.d_in, s.d_out, s.rank);
                let mut v = vec![0.0f32; t * r];
                matmul_slices(&mut v, (t, r), 0.0, 1.0, g.data(), (t, dout), Op::N, &saved.c, (dout, r), Op::N)?;
                let alpha = if acc { 1.0 } else { 0.0 };
                matmul_slices(dx, (t, din), alpha, 1.0, g.data(), (t, dout), Op::N, w, (dout, din), Op::N)?;
                matmul_slices(dx, (t, din), 1.0, 1.0, &v, (t, r), Op::N, psi.data(), (r, din), Op::N)?;
            }
            return Ok(());
        }
        let w = Mat::new("W", w, s.d_out, s.d_in)?;
        match dx {
            None => layer::wegeft_backward(&s, x, w, phi, psi, scale, Some(saved), g, None, dphi, dpsi),
            Some((dx, acc)) => write_or_add(dx, acc, |d| {
                let d = MatMut::new("dx", d, s.tokens, s.d_in)?;
                layer::wegeft_backward(&s, x, w, phi, psi, scale, Some(saved), g, Some(d), dphi, dpsi)
            }),
        }
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        rope: &crate::rope::Rope,
        inverse: bool,
    ) -> Result<()> {
        let pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
        let max_pos = pos.iter().max().map_or(1, |p| p + 1);
        let cache = ops::RopeCache::for_rope(head_dim, rope, max_pos)?;
        if inverse {
            ops::rope_backward(x, &pos, heads, &cache)
        } else {
            ops::rope_forward(x, &pos, heads, &cache)
        }
    }

    fn attention_forward(
        &self,
        shape: AttnShape,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
    ) -> Result<()> {
        attention::attention_forward(q, k, v, shape, out, lse)
    }

    fn attention_backward(
        &self,
        shape: AttnShape,
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
        attention::attention_backward(dout, q, k, v, out, lse, shape, dq, dk, dv)
    }

    fn attention_decode(
        &self,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        batch: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        len: usize,
        window: Option<usize>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        ops::attention_decode(q, k_cache, v_cache, batch, heads, kv_heads, head_dim, capacity, len, window, out)
    }

    fn swiglu_forward(&self, gate: &Vec<f32>, up: &Vec<f32>, h: &mut Vec<f32>) -> Result<()> {
        attention::swiglu_forward(gate, up, h)
    }

    fn swiglu_backward(
        &self,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dh: &Vec<f32>,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
    ) -> Result<()> {
        attention::swiglu_backward(dh, gate, up, dgate, dup)
    }

    fn logits(
        &self,
        h: &Vec<f32>,
        head: &Vec<f32>,
        rows: usize,
        dim: usize,
        vocab: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        need("logits h", h, rows * dim)?;
        need("logits head", head, vocab * dim)?;
        matmul_slices(out, (rows, vocab), 0.0, 1.0, h, (rows, dim), Op::N, head, (vocab, dim), Op::T)
    }

    fn lm_head_loss(
        &self,
        h: &Vec<f32>,
        head: &Vec<f32>,
        dim: usize,
        vocab: usize,
        labels: &[i32],
        dh: Option<(&mut Vec<f32>, f32)>,
    ) -> Result<f32> {
        let rows = labels.len();
        need("lm_head h", h, rows * dim)?;
        need("lm_head head", head, vocab * dim)?;
        for (t, &l) in labels.iter().enumerate() {
            if l >= vocab as i32 {
                return Err(Error::invalid(
                    "labels",
                    format!("label {l} at row {t} is outside the vocabulary of {vocab}"),
                ));
            }
        }
        let picked: Vec<usize> = (0..rows).filter(|&t| labels[t] >= 0).collect();
        let mut dh = dh;
        if let Some((d, _)) = dh.as_mut() {
            need("lm_head dh", d, rows * dim)?;
            d.fill(0.0);
        }
        let mut total = 0.0f64;
        let cap = CHUNK.min(picked.len());
        let mut hc = vec![0.0f32; cap * dim];
        let mut z = vec![0.0f32; cap * vocab];
        let mut dhc = vec![0.0f32; cap * dim];
        for chunk in picked.chunks(CHUNK) {
            let n = chunk.len();
            for (i, &t) in chunk.iter().enumerate() {
                hc[i * dim..(i + 1) * dim].copy_from_slice(&h[t * dim..(t + 1) * dim]);
            }
            matmul_slices(
                &mut z[..n * vocab],
                (n, vocab),
                0.0,
                1.0,
                &hc[..n * dim],
                (n, dim),
                Op::N,
                head,
                (vocab, dim),
                Op::T,
            )?;
            let grad_scale = dh.as_ref().map(|(_, c)| *c);
            let losses: Vec<f64> = z[..n * vocab]
                .par_chunks_mut(vocab)
                .zip(chunk.par_iter())
                .map(|(zr, &t)| {
                    let label = labels[t] as usize;
                    let target = zr[label];
                    let mx = zr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    // One pass of f32 exponentials (kept for the gradient), summed in f64 in
                    // blocks of 8 f32 partial sums.
                    let mut sum = 0.0f64;
                    for block in zr.chunks_mut(512) {
                        let mut part = [0.0f32; 8];
                        let mut it = block.chunks_exact_mut(8);
                        for c in &mut it {
                            for (p, v) in part.iter_mut().zip(c.iter_mut()) {
                                *v = exp_neg(*v - mx);
                                *p += *v;
                            }
                        }
                        for v in it.into_remainder() {
                            *v = exp_neg(*v - mx);
                            part[0] += *v;
                        }
                        sum += part.iter().map(|&p| p as f64).sum::<f64>();
                    }
                    let loss = mx as f64 + sum.ln() - target as f64;
                    if let Some(c) = grad_scale {
                        let k = (c as f64 / sum) as f32;
                        for v in zr.iter_mut() {
                            *v *= k;
                        }
                        zr[label] -= c;
                    }
                    loss
                })
                .collect();
            total += losses.iter().sum::<f64>();
            if let Some((d, _)) = dh.as_mut() {
                matmul_slices(
                    &mut dhc[..n * dim],
                    (n, dim),
                    0.0,
                    1.0,
                    &z[..n * vocab],
                    (n, vocab),
                    Op::N,
                    head,
                    (vocab, dim),
                    Op::N,
                )?;
                for (i, &t) in chunk.iter().enumerate() {
                    d[t * dim..(t + 1) * dim].copy_from_slice(&dhc[i * dim..(i + 1) * dim]);
                }
            }
        }
        Ok(total as f32)
    }

    fn adamw_step(
        &self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        hp: AdamHyper,
    ) -> Result<()> {
        if hp.step == 0 {
            return Err(Error::invalid("adamw step", "steps count from 1"));
        }
        let n = param.len();
        need("adamw m", m, n)?;
        need("adamw v", v, n)?;
        let config =
            AdamWConfig { lr: hp.lr, beta1: hp.beta1, beta2: hp.beta2, eps: hp.eps, weight_decay: hp.weight_decay };
        // The optimiser's own update, on moments lent to it for this step.
        let mut opt = AdamW::new(config, &[])?;
        opt.step = hp.step - 1;
        opt.m = vec![std::mem::take(m)];
        opt.v = vec![std::mem::take(v)];
        let r = opt.step(&mut [param.as_mut_slice()], &[grad.as_slice()]);
        *m = opt.m.pop().unwrap_or_default();
        *v = opt.v.pop().unwrap_or_default();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::{exp_neg, Cpu, CHUNK};
    use crate::backend::Backend;

    /// The chunked LM head + cross-entropy (more rows than one chunk) against plain f64 math.
    #[test]
    fn lm_head_loss_matches_naive_over_several_chunks() {
        let (rows, dim, vocab) = (2 * CHUNK + 37, 8, 50);
        let mut seed = 1u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let h: Vec<f32> = (0..rows * dim).map(|_| rnd() * 2.0).collect();
        let e: Vec<f32> = (0..vocab * dim).map(|_| rnd()).collect();
        let labels: Vec<i32> = (0..rows).map(|t| if t % 7 == 3 { -1 } else { ((t * 13) % vocab) as i32 }).collect();
        let c = 0.01f32;
        let mut dh = vec![0.0f32; rows * dim];
        let loss = Cpu.lm_head_loss(&h, &e, dim, vocab, &labels, Some((&mut dh, c))).unwrap() as f64;
        let (mut want, mut worst) = (0.0f64, 0.0f64);
        for t in 0..rows {
            let z: Vec<f64> =
                (0..vocab).map(|v| (0..dim).map(|i| h[t * dim + i] as f64 * e[v * dim + i] as f64).sum()).collect();
            if labels[t] < 0 {
                assert!(dh[t * dim..(t + 1) * dim].iter().all(|&x| x == 0.0));
                continue;
            }
            let mx = z.iter().cloned().fold(f64::MIN, f64::max);
            let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            want += lse - z[labels[t] as usize];
            for i in 0..dim {
                let g: f64 = (0..vocab)
                    .map(|v| {
                        c as f64
                            * ((z[v] - lse).exp() - if v == labels[t] as usize { 1.0 } else { 0.0 })
                            * e[v * dim + i] as f64
                    })
                    .sum();
                worst = worst.max((g - dh[t * dim + i] as f64).abs());
            }
        }
        assert!((loss - want).abs() <= 1e-5 * want, "loss {loss} vs {want}");
        assert!(worst <= 1e-7, "dh off by {worst:e}");
    }

    #[test]
    fn exp_neg_matches_libm() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 87.0 / 200_000.0;
            let (got, want) = (exp_neg(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert!(exp_neg(-1000.0) < 1e-37);
        assert_eq!(exp_neg(0.0), 1.0);
    }
}
