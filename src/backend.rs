//! The seam between the model and an engine: every operation the Llama model needs, on
//! buffers that live wherever the engine keeps them.
//!
//! The model ([`crate::model::llama`]) is written once over this trait; [`crate::cpu::Cpu`]
//! implements it on host `Vec<f32>`s, and the CUDA backend on device memory. Compute is f32.
//! Matrices are row-major; "`T x d`" means `T` rows (tokens) of `d` contiguous floats.
//!
//! Conventions: functions named `*_forward` overwrite their outputs; `*_backward` functions
//! *accumulate* into adapter gradients (`dphi`, `dpsi`) so that a pair shared by many layers
//! sums its gradient naturally, and accumulate into an input gradient when told to
//! (`accumulate: true`), overwrite it otherwise. Every method checks its lengths and returns
//! [`crate::Error`] on disagreement; none panics on bad input.

use crate::error::Result;
use crate::shape::LayerShape;

/// The shape of one causal grouped-query attention call (`batch` sequences of `seq` tokens,
/// `heads` query heads sharing `kv_heads` key/value heads of `head_dim`): the CPU ops' type,
/// shared by every backend.
pub use crate::cpu::ops::AttnShape;

/// The hyper-parameters of one AdamW step, with `torch.optim.AdamW`'s semantics:
/// `p <- p (1 - lr wd)`, `m <- b1 m + (1 - b1) g`, `v <- b2 v + (1 - b2) g^2`,
/// `p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)` at step `t >= 1`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The 1-based step number `t`.
    pub step: u64,
}

/// Dropout on `W` inside the adapter path (the PEFT fork's `wegeft_dropout`), training only:
/// `C = s (W o M / (1 - p)) phi` with the mask `M_ij = [u(seed, i d_in + j) >= p]`, `u` a
/// uniform in `[0, 1)` from a counter-based hash (so the backward regenerates the same mask).
/// The frozen product `x W^T` and the input gradient `G W` keep the whole `W`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    /// `u(seed, i)`: splitmix64 of `seed` and `i`, top 24 bits, in `[0, 1)`.
    #[inline]
    pub fn uniform(seed: u64, i: u64) -> f32 {
        let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Checks `0 <= p < 1`.
    pub fn check(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.p) {
            return Err(crate::error::Error::invalid("dropout", format!("must be in [0, 1), got {}", self.p)));
        }
        Ok(())
    }
}

/// An engine for the Llama model. `Buf` is an f32 buffer owned by the engine.
pub trait Backend {
    /// An f32 buffer on this engine.
    type Buf;
    /// What [`Backend::wegeft_forward`] keeps for [`Backend::wegeft_backward`]: `u = x psi^T`
    /// (`T x r`) and `C = s W phi` (`d_out x r`).
    type Saved;

    /// A short name (`"cpu"`, `"cuda"`).
    fn name(&self) -> &'static str;
    /// A buffer of `n` zeros.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// A buffer of `n` elements for the output of the next operation, which overwrites all of
    /// it: its contents are unspecified until then. The CUDA engine hands out device memory as
    /// it is (no memset: a training step of SmolLM2 at 8192 tokens would otherwise clear ~19 GB);
    /// the CPU engine fills NaN, so that an operation that leaves part of its output unwritten
    /// shows in every result and every test. Buffers that are accumulated into take
    /// [`Backend::zeros`]. The default is [`Backend::zeros`].
    fn output(&self, n: usize) -> Result<Self::Buf> {
        self.zeros(n)
    }
    /// A buffer for an activation or a gradient that is then read only as an input the
    /// products round to their own type anyway: `x` of [`Backend::linear_forward`],
    /// [`Backend::wegeft_forward`] and [`Backend::wegeft_backward`], `G` of
    /// [`Backend::linear_backward`] and [`Backend::wegeft_backward`], `dout` of
    /// [`Backend::attention_backward`], and its `out` once stashed. It must be written in full
    /// first, by `y` of [`Backend::rmsnorm_forward`], `h` of [`Backend::swiglu_forward`], `out`
    /// of [`Backend::attention_forward`], `dq`, `dk`, `dv` of [`Backend::attention_backward`],
    /// `dgate`, `dup` of [`Backend::swiglu_backward`] (from stashed gate and up) or an
    /// overwritten (not accumulated) `dx` of [`Backend::linear_backward`] or
    /// [`Backend::wegeft_backward`]; [`Backend::rope`] turns one in place. The engine may keep
    /// it in the products' input type: the CUDA engine with bf16 weights keeps it in bf16 (the
    /// values the products would round it to, without the conversions); the CPU engine and
    /// the default give [`Backend::output`]. [`Backend::stash`] keeps it as it is.
    fn operand(&self, n: usize) -> Result<Self::Buf> {
        self.output(n)
    }
    /// A buffer holding a copy of `data`.
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// A buffer holding `data`, taking it over where the engine can (the CPU keeps the `Vec`).
    fn upload_vec(&self, data: Vec<f32>) -> Result<Self::Buf> {
        self.upload(&data)
    }
    /// A frozen weight matrix (a projection, the embedding, the LM head), taken over like
    /// [`Backend::upload_vec`]. An engine may store it in a narrower type (the CUDA engine keeps
    /// bf16); the buffer is then only an operand of the products, the embedding and the LM head,
    /// and downloads as f32. The default keeps it as an f32 buffer.
    fn upload_weight(&self, data: Vec<f32>) -> Result<Self::Buf> {
        self.upload_vec(data)
    }
    /// The buffer's content, on the host.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Number of f32 elements in `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// `buf <- 0`.
    fn fill_zero(&self, buf: &mut Self::Buf) -> Result<()>;
    /// `dst[dst_offset .. dst_offset + src.len()] <- src`.
    fn copy_into(&self, src: &Self::Buf, dst: &mut Self::Buf, dst_offset: usize) -> Result<()>;
    /// `dst[dst_offset .. dst_offset + len] <- src[src_offset .. src_offset + len]`.
    fn copy_range(
        &self,
        src: &Self::Buf,
        src_offset: usize,
        len: usize,
        dst: &mut Self::Buf,
        dst_offset: usize,
    ) -> Result<()>;
    /// `y <- y + x` (same length).
    fn add_assign(&self, y: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// `y[r, :] += bias` for each of the `rows` rows of `y` (`rows x dim`, f32); `bias` has
    /// `dim` elements (a frozen layer's bias).
    fn add_bias(&self, y: &mut Self::Buf, bias: &Self::Buf, rows: usize, dim: usize) -> Result<()>;

    /// `out <- a + b` (all of the same length; `out` is overwritten, so it may be an
    /// [`Backend::output`]). The default copies `a` and adds `b`.
    fn add(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf) -> Result<()> {
        for (arg, got) in [("b", self.len(b)), ("out", self.len(out))] {
            if got != self.len(a) {
                return Err(crate::error::Error::Len { arg, expected: self.len(a), got });
            }
        }
        self.copy_into(a, out, 0)?;
        self.add_assign(out, b)
    }

    /// A copy of the f32 buffer `buf` for products to read many times, in the type they round
    /// it to: bf16 on the CUDA engine with bf16 weights (one conversion instead of one per
    /// product), a plain copy on the CPU engine and by default. Accepted as `phi` and `psi` of
    /// [`Backend::wegeft_forward`] and [`Backend::wegeft_backward`]; the model makes one per
    /// adapter pair and pass, shared by every layer.
    fn operand_copy(&self, buf: &Self::Buf) -> Result<Self::Buf> {
        let mut c = self.output(self.len(buf))?;
        self.copy_into(buf, &mut c, 0)?;
        Ok(c)
    }

    /// `buf`, an activation kept for the backward pass and never written again. The engine may
    /// store it narrower: the CUDA engine with bf16 weights keeps it in bf16, half the bytes
    /// (saved activations are most of a training step's memory). A stashed buffer is only
    /// read, and only by the arguments documented to accept one: `q`, `k`, `v` and `out` of
    /// [`Backend::attention_backward`], `x` of [`Backend::wegeft_backward`], `gate` and `up` of
    /// [`Backend::swiglu_forward`] and [`Backend::swiglu_backward`]. The default keeps `buf`.
    fn stash(&self, buf: Self::Buf) -> Result<Self::Buf> {
        Ok(buf)
    }

    /// `out[t] = table[ids[t]]`: `table` is `vocab x dim`, `out` is `ids.len() x dim`.
    fn embedding_forward(
        &self,
        table: &Self::Buf,
        vocab: usize,
        dim: usize,
        ids: &[u32],
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// RMSNorm of each row: `rstd = 1 / sqrt(mean(x^2) + eps)`, `y = x * rstd * weight`.
    /// `x`, `y`: `rows x dim`; `rstd`: `rows`. `y` may be an [`Backend::operand`].
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        x: &Self::Buf,
        weight: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
        y: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) -> Result<()>;

    /// RMSNorm backward: with `g = dy * weight`,
    /// `dx += rstd * (g - x * rstd^2 * mean(g * x))` (accumulates into `dx`).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        x: &Self::Buf,
        weight: &Self::Buf,
        rstd: &Self::Buf,
        dy: &Self::Buf,
        rows: usize,
        dim: usize,
        dx: &mut Self::Buf,
    ) -> Result<()>;

    /// Frozen linear layer: `y = x W^T`, `x`: `rows x d_in`, `W`: `d_out x d_in`. `x` may be
    /// an [`Backend::operand`].
    fn linear_forward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        d_in: usize,
        d_out: usize,
        y: &mut Self::Buf,
    ) -> Result<()>;

    /// Input gradient of a frozen linear layer: `dx (+)= G W`, `G`: `rows x d_out`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        g: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        d_in: usize,
        d_out: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;

    /// WeGeFT forward (`shape.tokens` rows): `C = s W phi`, `u = x psi^T`, `y = x W^T + u C^T`
    /// (overwrites `y`). Returns `u` and `C` for the backward. With `dropout`, `C` is made
    /// from the masked `W` (see [`Dropout`]). `x` may be an [`Backend::operand`]; `phi`, `psi`
    /// may be [`Backend::operand_copy`]s (here and in the backward).
    #[allow(clippy::too_many_arguments)]
    fn wegeft_forward(
        &self,
        shape: LayerShape,
        x: &Self::Buf,
        w: &Self::Buf,
        phi: &Self::Buf,
        psi: &Self::Buf,
        scale: f32,
        dropout: Option<Dropout>,
        y: &mut Self::Buf,
    ) -> Result<Self::Saved>;

    /// WeGeFT backward from `G = dL/dy`, with `u`, `C` saved by the forward: `v = G C`,
    /// `S = G^T u`; `dx (+)= G W + v psi` (when `dx` is given; `bool` = accumulate);
    /// `dphi += s W^T S` (the masked `W` with `dropout`, the same as the forward's);
    /// `dpsi += v^T x`. `x` may be [`Backend::stash`]ed or an [`Backend::operand`].
    #[allow(clippy::too_many_arguments)]
    fn wegeft_backward(
        &self,
        shape: LayerShape,
        x: &Self::Buf,
        w: &Self::Buf,
        phi: &Self::Buf,
        psi: &Self::Buf,
        scale: f32,
        dropout: Option<Dropout>,
        saved: &Self::Saved,
        g: &Self::Buf,
        dx: Option<(&mut Self::Buf, bool)>,
        dphi: &mut Self::Buf,
        dpsi: &mut Self::Buf,
    ) -> Result<()>;

    /// Many WeGeFT adapters in one batch (inference): row `t` of `x` (`rows x d_in`) goes
    /// through adapter `a = adapter_of_row[t]`,
    /// `y_t = h_t W^T` with `h_t = x_t + s_a (x_t psi_a^T) phi_a^T` (`= x_t W^T + (x_t psi_a^T)
    /// (s_a W phi_a)^T`), or `y_t = x_t W^T` for `a = -1`. `phi` stacks the `A = scales.len()`
    /// adapters' `phi_a` (`A x d_in x rank`), `psi` their `psi_a` (`A x rank x d_in`);
    /// `y` is `rows x d_out` (overwritten).
    ///
    /// The default runs each adapter group through [`Backend::wegeft_forward`] (rows gathered
    /// and scattered with [`Backend::copy_range`]): correct on any engine, not fast. Engines
    /// override it with a batched kernel ([`crate::cpu::multi`] on the CPU).
    #[allow(clippy::too_many_arguments)]
    fn wegeft_multi_forward(
        &self,
        rows: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
        x: &Self::Buf,
        w: &Self::Buf,
        phi: &Self::Buf,
        psi: &Self::Buf,
        scales: &[f32],
        adapter_of_row: &[i32],
        y: &mut Self::Buf,
    ) -> Result<()> {
        multi_forward_by_groups(self, rows, d_in, d_out, rank, x, w, phi, psi, scales, adapter_of_row, y)
    }

    /// Rotary position embedding, HF "rotate half" convention, in place on `x`
    /// (`positions.len()` rows of `heads * head_dim`): for `i < head_dim/2`, with
    /// `f = pos * inv_freq[i]` (`rope`'s frequencies, [`crate::rope::Rope::inv_freq`]:
    /// `theta^(-2i/head_dim)` unless scaled):
    /// `(x_i, x_{i+h/2}) <- (x_i cos f - x_{i+h/2} sin f, x_{i+h/2} cos f + x_i sin f)`.
    /// `inverse` applies the transpose rotation (angle `-f`), which is the backward.
    fn rope(
        &self,
        x: &mut Self::Buf,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        rope: &crate::rope::Rope,
        inverse: bool,
    ) -> Result<()>;

    /// Causal GQA attention over whole sequences (`q`: `B*S x H*hd`, `k`, `v`: `B*S x KVH*hd`):
    /// `out = softmax(q k^T / sqrt(hd) + causal mask) v` per head (the mask also hides keys
    /// outside [`AttnShape::window`] when it is set), query head `h` reading
    /// kv head `h / (H / KVH)`; `lse` (`B*S x H`) keeps each row's log-sum-exp of the scaled
    /// scores for the backward. `out` may be an [`Backend::operand`].
    fn attention_forward(
        &self,
        shape: AttnShape,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    ) -> Result<()>;

    /// Attention backward: with `P = exp(q k^T / sqrt(hd) - lse)`, `dV = P^T dO`,
    /// `dP = dO V^T`, `dS = P (dP - rowsum(dO * O))`, `dq = dS k / sqrt(hd)`,
    /// `dk = dS^T q / sqrt(hd)` (summed over the query heads of a group). Overwrites
    /// `dq`, `dk`, `dv`. `q`, `k`, `v` and `out` may be [`Backend::stash`]ed (`out` also an
    /// [`Backend::operand`]).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        shape: AttnShape,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
    ) -> Result<()>;

    /// One decoding step: `q` holds one new token per sequence (`batch x H*hd`); the caches
    /// are `batch x capacity x KVH*hd` and already hold the new token's key and value at
    /// position `len - 1`. Attention over positions `0..len`, or the last `window` of them;
    /// writes `out` (`batch x H*hd`).
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        batch: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        len: usize,
        window: Option<usize>,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// SwiGLU: `h = silu(gate) * up`, `silu(a) = a / (1 + e^-a)`; all of length `n`.
    /// `gate` and `up` may be [`Backend::stash`]ed (here and in the backward); `h` may be an
    /// [`Backend::operand`].
    fn swiglu_forward(&self, gate: &Self::Buf, up: &Self::Buf, h: &mut Self::Buf) -> Result<()>;

    /// SwiGLU backward: `dgate = dh * up * sig(a) (1 + a (1 - sig(a)))`, `dup = dh * silu(a)`.
    fn swiglu_backward(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dh: &Self::Buf,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    ) -> Result<()>;

    /// `logits = h E^T` for `rows` rows of `h` (`rows x dim`), `E`: `vocab x dim`.
    fn logits(
        &self,
        h: &Self::Buf,
        head: &Self::Buf,
        rows: usize,
        dim: usize,
        vocab: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// The LM head and cross-entropy, computed only on rows with a label
    /// (`labels[t] >= 0`), chunked so that `T x vocab` logits never exist at once.
    /// Returns the *sum* over labelled rows of `logsumexp(z_t) - z_t[label_t]`, `z_t = h_t E^T`.
    /// With `dh = Some((buf, c))`, writes `dh_t = c (softmax(z_t) - onehot(label_t)) E`
    /// (zero on unlabelled rows).
    #[allow(clippy::too_many_arguments)]
    fn lm_head_loss(
        &self,
        h: &Self::Buf,
        head: &Self::Buf,
        dim: usize,
        vocab: usize,
        labels: &[i32],
        dh: Option<(&mut Self::Buf, f32)>,
    ) -> Result<f32>;

    /// One AdamW step on `param` from `grad` with moments `m`, `v` (see [`AdamHyper`]).
    fn adamw_step(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        hyper: AdamHyper,
    ) -> Result<()>;
}

/// The checks of [`Backend::wegeft_multi_forward`]: every length against the shapes, every
/// index `-1` or in `0..scales.len()`, finite scales.
#[allow(clippy::too_many_arguments)]
pub fn check_multi<B: Backend + ?Sized>(
    be: &B,
    rows: usize,
    d_in: usize,
    d_out: usize,
    rank: usize,
    x: &B::Buf,
    w: &B::Buf,
    phi: &B::Buf,
    psi: &B::Buf,
    scales: &[f32],
    adapter_of_row: &[i32],
    y: &B::Buf,
) -> Result<()> {
    use crate::error::Error;
    LayerShape::new(rows, d_in, d_out, rank)?;
    if scales.is_empty() {
        return Err(Error::ZeroDim { what: "adapters (scales.len())" });
    }
    let per = d_in * rank;
    let n_ad = scales.len();
    for (arg, got, expected) in [
        ("x", be.len(x), rows * d_in),
        ("W", be.len(w), d_out * d_in),
        ("phi", be.len(phi), n_ad * per),
        ("psi", be.len(psi), n_ad * per),
        ("y", be.len(y), rows * d_out),
        ("adapter_of_row", adapter_of_row.len(), rows),
    ] {
        if got != expected {
            return Err(Error::Len { arg, expected, got });
        }
    }
    if let Some(a) = scales.iter().position(|s| !s.is_finite()) {
        return Err(Error::invalid("scales", format!("scale of adapter {a} is {}", scales[a])));
    }
    crate::cpu::multi::group_tokens(adapter_of_row, n_ad).map(|_| ())
}

/// The default [`Backend::wegeft_multi_forward`]: each adapter group's rows gathered with
/// [`Backend::copy_range`], run through [`Backend::wegeft_forward`] (rows without an adapter
/// through [`Backend::linear_forward`]) and scattered back. Public so that it can be tested
/// against an engine's own implementation.
#[allow(clippy::too_many_arguments)]
pub fn multi_forward_by_groups<B: Backend + ?Sized>(
    be: &B,
    rows: usize,
    d_in: usize,
    d_out: usize,
    rank: usize,
    x: &B::Buf,
    w: &B::Buf,
    phi: &B::Buf,
    psi: &B::Buf,
    scales: &[f32],
    adapter_of_row: &[i32],
    y: &mut B::Buf,
) -> Result<()> {
    check_multi(be, rows, d_in, d_out, rank, x, w, phi, psi, scales, adapter_of_row, y)?;
    let n_ad = scales.len();
    let groups = crate::cpu::multi::group_tokens(adapter_of_row, n_ad)?;
    let per = d_in * rank;
    for g in 0..=n_ad {
        let toks = groups.tokens(g);
        if toks.is_empty() {
            continue;
        }
        let n = toks.len();
        let mut xg = be.output(n * d_in)?;
        for (i, &t) in toks.iter().enumerate() {
            be.copy_range(x, t * d_in, d_in, &mut xg, i * d_in)?;
        }
        let mut yg = be.output(n * d_out)?;
        if g < n_ad {
            let mut phi_a = be.output(per)?;
            let mut psi_a = be.output(per)?;
            be.copy_range(phi, g * per, per, &mut phi_a, 0)?;
            be.copy_range(psi, g * per, per, &mut psi_a, 0)?;
            let shape = LayerShape::new(n, d_in, d_out, rank)?;
            be.wegeft_forward(shape, &xg, w, &phi_a, &psi_a, scales[g], None, &mut yg)?;
        } else {
            be.linear_forward(&xg, w, n, d_in, d_out, &mut yg)?;
        }
        for (i, &t) in toks.iter().enumerate() {
            be.copy_range(&yg, i * d_out, d_out, y, t * d_out)?;
        }
    }
    Ok(())
}
