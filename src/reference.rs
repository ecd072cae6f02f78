//! The oracle: WeGeFT and LoRA in float64 with plain loops, written to be read, not to be fast.
//! Every other implementation in the crate is tested against these functions.
//!
//! Row-major, contiguous `Vec<f64>`; shapes as in [`LayerShape`]. With scale `s`:
//!
//! ```text
//! C = s W phi          (d_out x r)        u = x psi^T   (T x r)
//! y = x W^T + u C^T + b
//! v = G C              (T x r)            S = G^T u     (d_out x r)
//! dx   = G W + v psi
//! dphi = s W^T S       (d_in x r)         dpsi = v^T x  (r x d_in)
//! merge:   W' = W + C psi = W (I + s phi psi)
//! unmerge: W  = W' (I - s phi (I_r + s psi phi)^-1 psi)
//! ```

use crate::error::{Error, Result};
use crate::shape::{check_len, LayerShape};

/// `a (m x k) * b (k x n)`. Every output sums its k products in order (l = 0, 1, ...) from 0;
/// the loops walk `b` row by row (contiguous), which keeps the oracle fast enough for the GPU
/// tests' layers of 8+ MiB and gives the same bits as the dot-product order.
pub fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    assert_eq!(a.len(), m * k, "matmul: a");
    assert_eq!(b.len(), k * n, "matmul: b");
    let mut c = vec![0.0; m * n];
    if n == 0 {
        return c;
    }
    for (ci, ai) in c.chunks_exact_mut(n).zip(a.chunks_exact(k.max(1))) {
        for (l, &ail) in ai.iter().enumerate() {
            for (cij, &blj) in ci.iter_mut().zip(&b[l * n..(l + 1) * n]) {
                *cij += ail * blj;
            }
        }
    }
    c
}

/// Transpose of `a` (`m x n`), giving `n x m`.
pub fn transpose(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    assert_eq!(a.len(), m * n, "transpose");
    let mut t = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            t[j * m + i] = a[i * n + j];
        }
    }
    t
}

fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn scaled(a: &[f64], s: f64) -> Vec<f64> {
    a.iter().map(|x| x * s).collect()
}

fn check(arg: &'static str, v: &[f64], (r, c): (usize, usize)) -> Result<()> {
    if v.len() != r * c {
        return Err(Error::Layout { arg, rows: r, cols: c, ld: c, needed: r * c, len: v.len() });
    }
    Ok(())
}

fn check_adapter(s: &LayerShape, w: &[f64], phi: &[f64], psi: &[f64]) -> Result<()> {
    check("W", w, s.w())?;
    check("phi", phi, s.phi())?;
    check("psi", psi, s.psi())
}

/// `C = s W phi` (`d_out x r`).
pub fn generate_c(s: &LayerShape, w: &[f64], phi: &[f64], scale: f64) -> Vec<f64> {
    scaled(&matmul(w, phi, s.d_out, s.d_in, s.rank), scale)
}

/// WeGeFT forward: `y = x W^T + (x psi^T)(s W phi)^T + b`.
pub fn wegeft_forward(
    s: &LayerShape,
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    phi: &[f64],
    psi: &[f64],
    scale: f64,
) -> Result<Vec<f64>> {
    check("x", x, s.x())?;
    check_adapter(s, w, phi, psi)?;
    if let Some(b) = b {
        check_len("b", b, s.d_out)?;
    }
    let c = generate_c(s, w, phi, scale);
    let u = matmul(x, &transpose(psi, s.rank, s.d_in), s.tokens, s.d_in, s.rank);
    let mut y = add(
        &matmul(x, &transpose(w, s.d_out, s.d_in), s.tokens, s.d_in, s.d_out),
        &matmul(&u, &transpose(&c, s.d_out, s.rank), s.tokens, s.rank, s.d_out),
    );
    if let Some(b) = b {
        for row in y.chunks_mut(s.d_out) {
            for (yj, bj) in row.iter_mut().zip(b) {
                *yj += bj;
            }
        }
    }
    Ok(y)
}

/// Gradients of one WeGeFT layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Grads {
    /// `T x d_in`.
    pub dx: Vec<f64>,
    /// `d_in x r`.
    pub dphi: Vec<f64>,
    /// `r x d_in`.
    pub dpsi: Vec<f64>,
}

/// WeGeFT backward from `G = dL/dy`: `dx = G W + v psi`, `dphi = s W^T (G^T u)`, `dpsi = v^T x`
/// with `v = G C`. (The bias gradient, `sum_t G`, is the frozen layer's business.)
pub fn wegeft_backward(
    s: &LayerShape,
    x: &[f64],
    w: &[f64],
    phi: &[f64],
    psi: &[f64],
    scale: f64,
    g: &[f64],
) -> Result<Grads> {
    check("x", x, s.x())?;
    check("G", g, s.y())?;
    check_adapter(s, w, phi, psi)?;
    let (t, din, dout, r) = (s.tokens, s.d_in, s.d_out, s.rank);
    let c = generate_c(s, w, phi, scale);
    let u = matmul(x, &transpose(psi, r, din), t, din, r);
    let v = matmul(g, &c, t, dout, r);
    let big_s = matmul(&transpose(g, t, dout), &u, dout, t, r);
    let dx = add(&matmul(g, w, t, dout, din), &matmul(&v, psi, t, r, din));
    let dphi = scaled(&matmul(&transpose(w, dout, din), &big_s, din, dout, r), scale);
    let dpsi = matmul(&transpose(&v, t, r), x, r, t, din);
    Ok(Grads { dx, dphi, dpsi })
}

/// Merge: `W + s W phi psi` (`d_out x d_in`).
pub fn merge(s: &LayerShape, w: &[f64], phi: &[f64], psi: &[f64], scale: f64) -> Result<Vec<f64>> {
    check_adapter(s, w, phi, psi)?;
    let c = generate_c(s, w, phi, scale);
    Ok(add(w, &matmul(&c, psi, s.d_out, s.rank, s.d_in)))
}

/// Exact unmerge: `W = W' (I + s phi psi)^-1 = W' - (W' phi) (I_r + s psi phi)^-1 (s psi)`
/// (Woodbury). Fails when `I_r + s psi phi` is singular, i.e. the merge was not invertible.
pub fn unmerge(s: &LayerShape, w_merged: &[f64], phi: &[f64], psi: &[f64], scale: f64) -> Result<Vec<f64>> {
    check_adapter(s, w_merged, phi, psi)?;
    let (din, dout, r) = (s.d_in, s.d_out, s.rank);
    // K = I_r + s psi phi  (r x r)
    let mut k = scaled(&matmul(psi, phi, r, din, r), scale);
    for i in 0..r {
        k[i * r + i] += 1.0;
    }
    // Z = K^-1 (s psi)  (r x d_in)
    let z = solve(&k, &scaled(psi, scale), r, din)?;
    let wphi = matmul(w_merged, phi, dout, din, r);
    let corr = matmul(&wphi, &z, dout, r, din);
    Ok(w_merged.iter().zip(&corr).map(|(a, b)| a - b).collect())
}

/// Solves `A X = B` for `X` (`A` is `n x n`, `B` is `n x m`) by Gaussian elimination with
/// partial pivoting. Errors on a (numerically) singular `A`.
pub fn solve(a: &[f64], b: &[f64], n: usize, m: usize) -> Result<Vec<f64>> {
    let mut a = a.to_vec();
    let mut x = b.to_vec();
    let norm = a.iter().fold(0.0f64, |acc, v| acc.max(v.abs()));
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))
            .unwrap_or(col);
        let p = a[piv * n + col];
        if !(p.abs() > 1e-13 * norm.max(1.0)) {
            return Err(Error::Numerical(format!(
                "unmerge: I_r + s psi phi is singular (pivot {p:e} in column {col} of {n})"
            )));
        }
        if piv != col {
            for j in 0..n {
                a.swap(piv * n + j, col * n + j);
            }
            for j in 0..m {
                x.swap(piv * m + j, col * m + j);
            }
        }
        for i in 0..n {
            if i == col {
                continue;
            }
            let f = a[i * n + col] / p;
            if f == 0.0 {
                continue;
            }
            for j in col..n {
                a[i * n + j] -= f * a[col * n + j];
            }
            for j in 0..m {
                x[i * m + j] -= f * x[col * m + j];
            }
        }
    }
    for i in 0..n {
        let d = a[i * n + i];
        for j in 0..m {
            x[i * m + j] /= d;
        }
    }
    Ok(x)
}

/// A stack of square layers (`d x d`, no bias) that share one `phi`/`psi` pair:
/// `h_0 = x`, `h_{l+1} = layer_l(h_l)`. Returns every `h` (`h[0] = x`, last is the output).
pub fn stack_forward(
    s: &LayerShape,
    ws: &[&[f64]],
    x: &[f64],
    phi: &[f64],
    psi: &[f64],
    scale: f64,
) -> Result<Vec<Vec<f64>>> {
    if s.d_in != s.d_out {
        return Err(Error::invalid("shape", format!("a shared stack needs square layers, got {}x{}", s.d_out, s.d_in)));
    }
    let mut hs = vec![x.to_vec()];
    for w in ws {
        let y = wegeft_forward(s, hs.last().unwrap(), w, None, phi, psi, scale)?;
        hs.push(y);
    }
    Ok(hs)
}

/// Backward through [`stack_forward`] from `G = dL/d(output)`; the gradients of the shared
/// pair are summed over layers.
pub fn stack_backward(
    s: &LayerShape,
    ws: &[&[f64]],
    hs: &[Vec<f64>],
    phi: &[f64],
    psi: &[f64],
    scale: f64,
    g: &[f64],
) -> Result<Grads> {
    if hs.len() != ws.len() + 1 {
        return Err(Error::invalid("hs", format!("expected {} activations, got {}", ws.len() + 1, hs.len())));
    }
    let mut g = g.to_vec();
    let mut dphi = vec![0.0; s.d_in * s.rank];
    let mut dpsi = vec![0.0; s.rank * s.d_in];
    for (l, w) in ws.iter().enumerate().rev() {
        let gr = wegeft_backward(s, &hs[l], w, phi, psi, scale, &g)?;
        dphi = add(&dphi, &gr.dphi);
        dpsi = add(&dpsi, &gr.dpsi);
        g = gr.dx;
    }
    Ok(Grads { dx: g, dphi, dpsi })
}

/// LoRA forward: `y = x W^T + s (x A^T) B^T + b`, `A` is `r x d_in`, `B` is `d_out x r`.
pub fn lora_forward(
    s: &LayerShape,
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    a: &[f64],
    bm: &[f64],
    scale: f64,
) -> Result<Vec<f64>> {
    check("x", x, s.x())?;
    check("W", w, s.w())?;
    check("A", a, s.lora_a())?;
    check("B", bm, s.lora_b())?;
    // LoRA's delta is B A; W phi psi with "W phi" replaced by the free matrix B.
    let xa = matmul(x, &transpose(a, s.rank, s.d_in), s.tokens, s.d_in, s.rank);
    let mut y = add(
        &matmul(x, &transpose(w, s.d_out, s.d_in), s.tokens, s.d_in, s.d_out),
        &scaled(&matmul(&xa, &transpose(bm, s.d_out, s.rank), s.tokens, s.rank, s.d_out), scale),
    );
    if let Some(b) = b {
        check_len("b", b, s.d_out)?;
        for row in y.chunks_mut(s.d_out) {
            for (yj, bj) in row.iter_mut().zip(b) {
                *yj += bj;
            }
        }
    }
    Ok(y)
}

/// LoRA gradients.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraGrads {
    pub dx: Vec<f64>,
    /// `r x d_in`.
    pub da: Vec<f64>,
    /// `d_out x r`.
    pub db: Vec<f64>,
}

/// LoRA backward: `dx = G W + s (G B) A`, `dA = s (G B)^T x`, `dB = s G^T (x A^T)`.
pub fn lora_backward(
    s: &LayerShape,
    x: &[f64],
    w: &[f64],
    a: &[f64],
    bm: &[f64],
    scale: f64,
    g: &[f64],
) -> Result<LoraGrads> {
    check("x", x, s.x())?;
    check("G", g, s.y())?;
    check("W", w, s.w())?;
    check("A", a, s.lora_a())?;
    check("B", bm, s.lora_b())?;
    let (t, din, dout, r) = (s.tokens, s.d_in, s.d_out, s.rank);
    let gb = scaled(&matmul(g, bm, t, dout, r), scale);
    let xa = matmul(x, &transpose(a, r, din), t, din, r);
    let dx = add(&matmul(g, w, t, dout, din), &matmul(&gb, a, t, r, din));
    let da = matmul(&transpose(&gb, t, r), x, r, t, din);
    let db = scaled(&matmul(&transpose(g, t, dout), &xa, dout, t, r), scale);
    Ok(LoraGrads { dx, da, db })
}

/// Many adapters in one batch, the definition: token `t` goes through the layer of adapter
/// `a = adapter_of_token[t]`, `y_t = x_t W^T + (x_t psi_a^T)(s_a W phi_a)^T + b` (just
/// `x_t W^T + b` for `a = -1`), each token on its own ([`wegeft_forward`] with one token).
/// `phis[a]`, `psis[a]`, `scales[a]` are adapter `a`'s pair and scale; `T = adapter_of_token.len()`.
#[allow(clippy::too_many_arguments)]
pub fn wegeft_multi_forward(
    d_in: usize,
    d_out: usize,
    rank: usize,
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    phis: &[&[f64]],
    psis: &[&[f64]],
    scales: &[f64],
    adapter_of_token: &[i32],
) -> Result<Vec<f64>> {
    let t = adapter_of_token.len();
    check("x", x, (t, d_in))?;
    if phis.len() != scales.len() || psis.len() != scales.len() {
        return Err(Error::invalid("phis", format!("{} phis, {} psis, {} scales", phis.len(), psis.len(), scales.len())));
    }
    let one = LayerShape::new(1, d_in, d_out, rank)?;
    let mut y = Vec::with_capacity(t * d_out);
    for (i, &a) in adapter_of_token.iter().enumerate() {
        let xt = &x[i * d_in..(i + 1) * d_in];
        let yt = if a == -1 {
            let mut yt = matmul(xt, &transpose(w, d_out, d_in), 1, d_in, d_out);
            if let Some(b) = b {
                check_len("b", b, d_out)?;
                yt = add(&yt, b);
            }
            yt
        } else if a >= 0 && (a as usize) < scales.len() {
            let a = a as usize;
            wegeft_forward(&one, xt, w, b, phis[a], psis[a], scales[a])?
        } else {
            return Err(Error::invalid("adapter_of_token", format!("token {i} names adapter {a}")));
        };
        y.extend(yt);
    }
    Ok(y)
}

/// The input-side form of one adapted token: `h = x + s (x psi^T) phi^T` (`T x d_in`), so that
/// `x W'^T = h W^T` for `W' = W + s W phi psi`.
pub fn input_edit(s: &LayerShape, x: &[f64], phi: &[f64], psi: &[f64], scale: f64) -> Result<Vec<f64>> {
    check("x", x, s.x())?;
    check("phi", phi, s.phi())?;
    check("psi", psi, s.psi())?;
    let u = matmul(x, &transpose(psi, s.rank, s.d_in), s.tokens, s.d_in, s.rank);
    let d = matmul(&u, &transpose(phi, s.d_in, s.rank), s.tokens, s.rank, s.d_in);
    Ok(add(x, &scaled(&d, scale)))
}
