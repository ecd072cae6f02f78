//! `Backend::stash` (the activations kept for the backward, bf16 on the CUDA engine) checked on
//! the CPU, where a GPU run is rare: `Bf16Stash` is the CPU backend with the CUDA engine's
//! stash rule. It rounds every stashed buffer to bf16 and marks it, and every argument that
//! the trait does not document as accepting a stashed buffer refuses a marked one, as the CUDA
//! engine's dtype checks do. Training through it shows that the model hands stashed
//! activations only to those arguments, and what storing them in bf16 costs in accuracy.

mod common;

use common::{rand_f32, tiny_weights};

use wegeft::backend::{AdamHyper, AttnShape, Backend, Dropout};
use wegeft::cpu::Cpu;
use wegeft::model::llama::{Batch, Dims, HostAdapter, Llama};
use wegeft::train::optim::AdamWConfig;
use wegeft::train::trainer::Trainer;
use wegeft::{Error, LayerShape, Result};

/// A CPU buffer, marked when it came from [`Backend::stash`].
#[derive(Clone, Debug)]
struct Buf {
    v: Vec<f32>,
    stashed: bool,
}

/// The CPU backend with bf16 stashing (see the module docs); counts the buffers stashed.
#[derive(Default)]
struct Bf16Stash {
    stashed: std::cell::Cell<usize>,
}

fn plain<'a>(arg: &'static str, b: &'a Buf) -> Result<&'a Vec<f32>> {
    if b.stashed {
        return Err(Error::invalid(arg, "a stashed activation where the trait does not accept one"));
    }
    Ok(&b.v)
}

fn plain_mut<'a>(arg: &'static str, b: &'a mut Buf) -> Result<&'a mut Vec<f32>> {
    if b.stashed {
        return Err(Error::invalid(arg, "a stashed activation written to"));
    }
    Ok(&mut b.v)
}

fn buf(v: Vec<f32>) -> Buf {
    Buf { v, stashed: false }
}

impl Backend for Bf16Stash {
    type Buf = Buf;
    type Saved = <Cpu as Backend>::Saved;

    fn name(&self) -> &'static str {
        "cpu-bf16-stash"
    }
    fn zeros(&self, n: usize) -> Result<Buf> {
        Ok(buf(vec![0.0; n]))
    }
    fn upload(&self, data: &[f32]) -> Result<Buf> {
        Ok(buf(data.to_vec()))
    }
    fn download(&self, b: &Buf) -> Result<Vec<f32>> {
        Ok(b.v.clone())
    }
    fn len(&self, b: &Buf) -> usize {
        b.v.len()
    }
    fn fill_zero(&self, b: &mut Buf) -> Result<()> {
        Cpu.fill_zero(plain_mut("fill_zero", b)?)
    }
    fn copy_into(&self, src: &Buf, dst: &mut Buf, at: usize) -> Result<()> {
        Cpu.copy_into(plain("copy_into src", src)?, plain_mut("copy_into dst", dst)?, at)
    }
    fn copy_range(&self, src: &Buf, so: usize, len: usize, dst: &mut Buf, d_o: usize) -> Result<()> {
        Cpu.copy_range(plain("copy_range src", src)?, so, len, plain_mut("copy_range dst", dst)?, d_o)
    }
    fn add_assign(&self, y: &mut Buf, x: &Buf) -> Result<()> {
        Cpu.add_assign(plain_mut("add_assign y", y)?, plain("add_assign x", x)?)
    }
    fn stash(&self, b: Buf) -> Result<Buf> {
        let v = plain("stash", &b)?.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        self.stashed.set(self.stashed.get() + 1);
        Ok(Buf { v, stashed: true })
    }
    fn embedding_forward(&self, table: &Buf, vocab: usize, dim: usize, ids: &[u32], out: &mut Buf) -> Result<()> {
        Cpu.embedding_forward(plain("table", table)?, vocab, dim, ids, plain_mut("out", out)?)
    }
    fn rmsnorm_forward(&self, x: &Buf, w: &Buf, rows: usize, dim: usize, eps: f32, y: &mut Buf, rstd: &mut Buf) -> Result<()> {
        Cpu.rmsnorm_forward(plain("x", x)?, plain("weight", w)?, rows, dim, eps, plain_mut("y", y)?, plain_mut("rstd", rstd)?)
    }
    fn rmsnorm_backward(&self, x: &Buf, w: &Buf, rstd: &Buf, dy: &Buf, rows: usize, dim: usize, dx: &mut Buf) -> Result<()> {
        let (x, w, rstd, dy) = (plain("x", x)?, plain("weight", w)?, plain("rstd", rstd)?, plain("dy", dy)?);
        Cpu.rmsnorm_backward(x, w, rstd, dy, rows, dim, plain_mut("dx", dx)?)
    }
    fn linear_forward(&self, x: &Buf, w: &Buf, rows: usize, d_in: usize, d_out: usize, y: &mut Buf) -> Result<()> {
        Cpu.linear_forward(plain("x", x)?, plain("W", w)?, rows, d_in, d_out, plain_mut("y", y)?)
    }
    fn linear_backward(&self, g: &Buf, w: &Buf, rows: usize, d_in: usize, d_out: usize, dx: &mut Buf, acc: bool) -> Result<()> {
        Cpu.linear_backward(plain("G", g)?, plain("W", w)?, rows, d_in, d_out, plain_mut("dx", dx)?, acc)
    }
    fn wegeft_forward(
        &self,
        s: LayerShape,
        x: &Buf,
        w: &Buf,
        phi: &Buf,
        psi: &Buf,
        scale: f32,
        drop: Option<Dropout>,
        y: &mut Buf,
    ) -> Result<Self::Saved> {
        let (x, w, phi, psi) = (plain("x", x)?, plain("W", w)?, plain("phi", phi)?, plain("psi", psi)?);
        Cpu.wegeft_forward(s, x, w, phi, psi, scale, drop, plain_mut("y", y)?)
    }
    fn wegeft_backward(
        &self,
        s: LayerShape,
        x: &Buf,
        w: &Buf,
        phi: &Buf,
        psi: &Buf,
        scale: f32,
        drop: Option<Dropout>,
        saved: &Self::Saved,
        g: &Buf,
        dx: Option<(&mut Buf, bool)>,
        dphi: &mut Buf,
        dpsi: &mut Buf,
    ) -> Result<()> {
        // x may be stashed.
        let (w, phi, psi, g) = (plain("W", w)?, plain("phi", phi)?, plain("psi", psi)?, plain("G", g)?);
        let dx = match dx {
            Some((d, acc)) => Some((plain_mut("dx", d)?, acc)),
            None => None,
        };
        Cpu.wegeft_backward(s, &x.v, w, phi, psi, scale, drop, saved, g, dx, plain_mut("dphi", dphi)?, plain_mut("dpsi", dpsi)?)
    }
    fn rope(&self, x: &mut Buf, heads: usize, hd: usize, pos: &[u32], theta: f32, inverse: bool) -> Result<()> {
        Cpu.rope(plain_mut("x", x)?, heads, hd, pos, theta, inverse)
    }
    fn attention_forward(&self, s: AttnShape, q: &Buf, k: &Buf, v: &Buf, out: &mut Buf, lse: &mut Buf) -> Result<()> {
        Cpu.attention_forward(s, plain("q", q)?, plain("k", k)?, plain("v", v)?, plain_mut("out", out)?, plain_mut("lse", lse)?)
    }
    fn attention_backward(
        &self,
        s: AttnShape,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        out: &Buf,
        lse: &Buf,
        dout: &Buf,
        dq: &mut Buf,
        dk: &mut Buf,
        dv: &mut Buf,
    ) -> Result<()> {
        // q, k, v, out may be stashed.
        let (lse, dout) = (plain("lse", lse)?, plain("dout", dout)?);
        let (dq, dk, dv) = (plain_mut("dq", dq)?, plain_mut("dk", dk)?, plain_mut("dv", dv)?);
        Cpu.attention_backward(s, &q.v, &k.v, &v.v, &out.v, lse, dout, dq, dk, dv)
    }
    fn attention_decode(
        &self,
        q: &Buf,
        kc: &Buf,
        vc: &Buf,
        batch: usize,
        heads: usize,
        kv_heads: usize,
        hd: usize,
        cap: usize,
        len: usize,
        out: &mut Buf,
    ) -> Result<()> {
        let (q, kc, vc) = (plain("q", q)?, plain("k_cache", kc)?, plain("v_cache", vc)?);
        Cpu.attention_decode(q, kc, vc, batch, heads, kv_heads, hd, cap, len, plain_mut("out", out)?)
    }
    fn swiglu_forward(&self, gate: &Buf, up: &Buf, h: &mut Buf) -> Result<()> {
        // gate, up may be stashed.
        Cpu.swiglu_forward(&gate.v, &up.v, plain_mut("h", h)?)
    }
    fn swiglu_backward(&self, gate: &Buf, up: &Buf, dh: &Buf, dgate: &mut Buf, dup: &mut Buf) -> Result<()> {
        Cpu.swiglu_backward(&gate.v, &up.v, plain("dh", dh)?, plain_mut("dgate", dgate)?, plain_mut("dup", dup)?)
    }
    fn logits(&self, h: &Buf, head: &Buf, rows: usize, dim: usize, vocab: usize, out: &mut Buf) -> Result<()> {
        Cpu.logits(plain("h", h)?, plain("head", head)?, rows, dim, vocab, plain_mut("logits", out)?)
    }
    fn lm_head_loss(&self, h: &Buf, head: &Buf, dim: usize, vocab: usize, labels: &[i32], dh: Option<(&mut Buf, f32)>) -> Result<f32> {
        let dh = match dh {
            Some((d, c)) => Some((plain_mut("dh", d)?, c)),
            None => None,
        };
        Cpu.lm_head_loss(plain("h", h)?, plain("head", head)?, dim, vocab, labels, dh)
    }
    fn adamw_step(&self, p: &mut Buf, g: &Buf, m: &mut Buf, v: &mut Buf, hp: AdamHyper) -> Result<()> {
        Cpu.adamw_step(plain_mut("param", p)?, plain("grad", g)?, plain_mut("m", m)?, plain_mut("v", v)?, hp)
    }
}

fn dims() -> Dims {
    Dims { hidden: 64, layers: 3, heads: 4, kv_heads: 2, head_dim: 16, ffn: 96, vocab: 97, rope_theta: 10000.0, eps: 1e-5 }
}

/// Rank-4 pairs shared across layers on every module, with nonzero phi and psi.
fn adapter(d: &Dims) -> HostAdapter {
    let r = 4;
    let pairs: Vec<_> = (0..7)
        .map(|m| {
            let (din, _) = d.module_dims(m);
            (m, rand_f32(40 + 2 * m as u64, din * r, 0.3), rand_f32(41 + 2 * m as u64, r * din, 0.3))
        })
        .collect();
    let sites = vec![std::array::from_fn(Some); d.layers];
    HostAdapter { rank: r, scale: 1.0, pairs, sites, dropout: 0.0 }
}

fn batch(d: &Dims, salt: usize) -> Batch {
    let seqs: Vec<Vec<u32>> =
        (0..2).map(|b| (0..12).map(|t| ((b * 37 + t * 23 + salt * 11 + 3) % d.vocab) as u32).collect()).collect();
    let mut bt = Batch::causal(&seqs).unwrap();
    bt.labels[..3].iter_mut().for_each(|l| *l = -1);
    bt
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// The model stashes only where the trait allows it (every other argument refuses a stashed
/// buffer), the loss is unchanged (the forward reads the activations before they are
/// stashed), and the gradients move by about bf16's rounding.
#[test]
fn stashed_activations_reach_only_the_arguments_that_accept_them() {
    let d = dims();
    let w = tiny_weights(&d, 5, false);
    let ad = adapter(&d);
    let bt = batch(&d, 0);

    let cpu = Llama::new(&Cpu, &w).unwrap();
    let a = ad.upload(&Cpu, &d).unwrap();
    let mut want = a.zero_grads(&Cpu).unwrap();
    let want_loss = cpu.loss_and_grad(&Cpu, &a, &bt, &mut want).unwrap();

    let be = Bf16Stash::default();
    let model = Llama::new(&be, &w).unwrap();
    let a = ad.upload(&be, &d).unwrap();
    let mut got = a.zero_grads(&be).unwrap();
    let loss = model.loss_and_grad(&be, &a, &bt, &mut got).unwrap();
    assert_eq!(be.stashed.get(), 6 * d.layers, "q, k, v, att, gate, up of every layer");
    assert_eq!(loss, want_loss, "the loss does not see the stash");
    for (p, ((gphi, gpsi), (wphi, wpsi))) in got.iter().zip(&want).enumerate() {
        for (what, g, w) in [("dphi", &gphi.v, wphi), ("dpsi", &gpsi.v, wpsi)] {
            let e = rel(g, w);
            assert!(e > 0.0, "pair {p} {what}: the bf16 stash changed nothing, so the test does not test it");
            assert!(e < 1e-2, "pair {p} {what}: relative error {e:e} from storing activations in bf16");
        }
    }
    // Evaluation saves nothing and stashes nothing.
    let before = be.stashed.get();
    assert_eq!(model.loss(&be, Some(&a), &bt).unwrap(), want_loss);
    assert_eq!(be.stashed.get(), before);
}

/// A few AdamW steps with bf16 stashing stay within the CUDA test's bound of the f32 run
/// (tests/cuda_model.rs `smollm2_training_losses_match_cpu`: 2e-2 relative).
#[test]
fn training_with_a_bf16_stash_follows_the_f32_run() {
    let d = dims();
    let w = tiny_weights(&d, 6, true);
    let ad = adapter(&d);
    let opt = AdamWConfig { lr: 5e-3, weight_decay: 0.01, ..AdamWConfig::default() };
    let batches: Vec<Batch> = (0..4).map(|k| batch(&d, k)).collect();
    let cpu = Llama::new(&Cpu, &w).unwrap();
    let mut tr = Trainer::new(&Cpu, &cpu, &ad, opt).unwrap();
    let want: Vec<f32> = batches.iter().map(|b| tr.step(b).unwrap()).collect();
    let be = Bf16Stash::default();
    let model = Llama::new(&be, &w).unwrap();
    let mut tr = Trainer::new(&be, &model, &ad, opt).unwrap();
    let got: Vec<f32> = batches.iter().map(|b| tr.step(b).unwrap()).collect();
    println!("losses: bf16 stash {got:?}, f32 {want:?}");
    assert_eq!(got[0], want[0], "step 0 comes before any update");
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(((g - w) / w).abs() < 2e-3, "step {k}: loss {g} vs {w}");
    }
    assert!(want[3] < want[0], "the run trains");
}
