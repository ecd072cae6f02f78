//! A SmolLM2-135M-shaped model with seeded random weights and the training setup of the GPU
//! model tests (tests/cuda_model.rs), shared with the CPU test of the CUDA engine's precision
//! model (tests/cuda_precision.rs), which checks the GPU tests' tolerances against it.
//! Included with `#[path = "common/smollm2.rs"] mod smollm2;` next to `mod common;`.

#![allow(dead_code)]

use wegeft::backend::Backend;
use wegeft::model::llama::{argmax, Batch, Dims, HostAdapter, Llama};
use wegeft::train::optim::AdamWConfig;
use wegeft::train::trainer::Trainer;

use crate::common::rand_f32;

/// SmolLM2-135M's dimensions with `layers` layers.
pub fn dims(layers: usize) -> Dims {
    let mut d = Dims::smollm2_135m();
    d.layers = layers;
    d
}

/// A Qwen3-shaped variant of the 4-layer model: heads of 128 (q is 576 -> 1152), biases on
/// q, k, v (Qwen2's) and o, Qwen3's head norms, no RoPE in the last layer (SmolLM3's NoPE), and
/// a sliding window of 9 keys in layers 1 and 3 (Qwen's `use_sliding_window`); seeded random
/// weights, untied head.
pub fn qwen_shaped(seed: u64) -> wegeft::model::llama::HostWeights {
    let d = Dims { head_dim: 128, nope_layers: vec![3], window: Some(9), full_layers: vec![0, 2], ..dims(4) };
    let mut w = wegeft::model::llama::HostWeights::random(&d, seed, false).unwrap();
    w.add_random_extras(seed, [true, true, true, true, false, false, false], true);
    w
}

/// Rank-8 shared pairs on all seven modules with nonzero phi and psi.
pub fn adapter(d: &Dims, seed: u64) -> HostAdapter {
    let r = 8;
    let mut pairs = Vec::new();
    let mut sites = vec![[None; 7]; d.layers];
    for m in 0..7 {
        let (din, _) = d.module_dims(m);
        pairs.push((m, rand_f32(seed + 2 * m as u64, din * r, 0.05), rand_f32(seed + 2 * m as u64 + 1, r * din, 0.05)));
        for row in sites.iter_mut() {
            row[m] = Some(m);
        }
    }
    HostAdapter { rank: r, scale: 1.0, pairs, sites, dropout: 0.0 }
}

/// `n` token ids spread over the vocabulary.
pub fn prompt(d: &Dims, n: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|t| ((t * 104_729 + salt * 7919 + 17) % d.vocab) as u32).collect()
}

/// Rows where `got`'s argmax differs from `want`'s must be near ties in `want` (its logit at
/// `got`'s argmax within `gap` of its maximum). Returns how many rows differ.
pub fn same_argmax(what: &str, got: &[f32], want: &[f32], vocab: usize, gap: f32) -> usize {
    let mut differ = 0;
    for (row, (gr, wr)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        let (a, b) = (argmax(gr), argmax(wr));
        if a != b {
            differ += 1;
            assert!(wr[b] - wr[a] <= gap, "{what}: row {row} argmax {a} vs {b}, reference logits {} vs {}", wr[a], wr[b]);
        }
    }
    println!("{what}: {differ} of {} rows with a different argmax (near ties)", want.len() / vocab);
    differ
}

/// The losses of AdamW steps (lr 2e-3, weight decay 0.01) over `batches`, and the adapter after.
pub fn train_losses<B: Backend>(be: &B, model: &Llama<B>, ad: &HostAdapter, batches: &[Batch]) -> (Vec<f32>, HostAdapter) {
    let opt = AdamWConfig { lr: 2e-3, weight_decay: 0.01, ..AdamWConfig::default() };
    let mut tr = Trainer::new(be, model, ad, opt).unwrap();
    let losses = batches.iter().map(|b| tr.step(b).unwrap()).collect();
    (losses, tr.host_adapter().unwrap())
}

/// [`train_losses`] with the recipe of transformers' Trainer: a cosine schedule with one warm-up
/// step over the run, the gradient clipped to `max_norm`, two batches per update. Returns each
/// update's loss and gradient norm (before clipping), and the adapter after.
pub fn recipe_run<B: Backend>(
    be: &B,
    model: &Llama<B>,
    ad: &HostAdapter,
    batches: &[Batch],
    max_norm: f64,
) -> (Vec<f32>, Vec<f64>, HostAdapter) {
    use wegeft::train::schedule::{LrSchedule, ScheduleKind};
    let opt = AdamWConfig { lr: 4e-3, weight_decay: 0.01, ..AdamWConfig::default() };
    let updates = batches.len() as u64 / 2;
    let mut tr = Trainer::new(be, model, ad, opt)
        .unwrap()
        .with_schedule(LrSchedule::new(ScheduleKind::Cosine, 1, updates))
        .with_max_grad_norm(max_norm)
        .unwrap();
    let (losses, norms) = batches.chunks(2).map(|c| tr.step_many(c).unwrap()).map(|s| (s.loss, s.grad_norm)).unzip();
    (losses, norms, tr.host_adapter().unwrap())
}

/// The recipe case of tests/cuda_model.rs `recipe_training_matches_cpu` and its precision-model
/// twin: a 6-layer SmolLM2-shaped model (bf16-rounded weights), 6 batches (3 updates of 2), an
/// adapter, a clipping bound of half the smallest unclipped gradient norm (so every update is
/// clipped), and the CPU run at that bound (losses, gradient norms, adapter after).
pub struct RecipeCase {
    pub weights: wegeft::model::llama::HostWeights,
    pub batches: Vec<Batch>,
    pub adapter: HostAdapter,
    pub bound: f64,
    pub want: (Vec<f32>, Vec<f64>, HostAdapter),
}

pub fn recipe_case() -> RecipeCase {
    use wegeft::cpu::Cpu;
    let d = dims(6);
    let batches = batches(&d, 6, 2, 40);
    let adapter = adapter(&d, 600);
    let mut weights = wegeft::model::llama::HostWeights::random(&d, 17, false).unwrap();
    weights.round_to_bf16();
    let cpu = Llama::new(&Cpu, &weights).unwrap();
    let (_, free, _) = recipe_run(&Cpu, &cpu, &adapter, &batches, 1e30);
    let bound = 0.5 * free.iter().cloned().fold(f64::INFINITY, f64::min);
    let want = recipe_run(&Cpu, &cpu, &adapter, &batches, bound);
    RecipeCase { weights, batches, adapter, bound, want }
}

impl RecipeCase {
    /// Asserts that `got` (a [`recipe_run`] of this case) follows the CPU run: gradient norms
    /// within `norm_tol` relative, then [`assert_run_follows`] with `loss_tol` and `min_cos`.
    /// Returns the worst update cosine.
    pub fn assert_follows(&self, what: &str, got: &(Vec<f32>, Vec<f64>, HostAdapter), norm_tol: f64, loss_tol: f32, min_cos: f64) -> f64 {
        let (want, want_n, want_ad) = &self.want;
        println!("{what}: losses {:?} vs {want:?}, gradient norms {:?} vs {want_n:?} (clipped to {})", got.0, got.1, self.bound);
        for (a, b) in got.1.iter().zip(want_n) {
            assert!(((a - b) / b).abs() < norm_tol, "{what}: gradient norm {a} vs {b}");
        }
        assert_run_follows(what, &self.adapter, (&got.0, &got.2), (want, want_ad), loss_tol, min_cos)
    }
}

/// `n` batches of `b` sequences of `s` tokens, the first half of each batch without loss.
pub fn batches(d: &Dims, n: usize, b: usize, s: usize) -> Vec<Batch> {
    (0..n)
        .map(|k| {
            let seqs: Vec<Vec<u32>> = (0..b).map(|i| prompt(d, s, 10 * k + i)).collect();
            let mut bt = Batch::causal(&seqs).unwrap();
            bt.labels[..s / 2].iter_mut().for_each(|l| *l = -1); // a prompt without loss
            bt
        })
        .collect()
}

/// Asserts that a training run `got` (losses, final adapter) follows the reference run `want`
/// from the same `init`: every loss within `loss_tol` relative, every pair's update with a cosine
/// above `min_cos` ([`update_cosines`]); `what` names the run in a failure. Returns the worst
/// cosine.
pub fn assert_run_follows(
    what: &str,
    init: &HostAdapter,
    got: (&[f32], &HostAdapter),
    want: (&[f32], &HostAdapter),
    loss_tol: f32,
    min_cos: f64,
) -> f64 {
    for (k, (a, b)) in got.0.iter().zip(want.0).enumerate() {
        assert!(((a - b) / b).abs() < loss_tol, "{what}: step {k}: loss {a} vs the reference {b} (tolerance {loss_tol})");
    }
    let mut worst = 1.0f64;
    for (p, m, cos) in update_cosines(init, got.1, want.1) {
        assert!(cos > min_cos, "{what}: pair {p} {m}: cosine of the updates {cos} (at least {min_cos})");
        worst = worst.min(cos);
    }
    worst
}

/// Per pair and matrix (`"phi"`, `"psi"`), the cosine between the updates `got - init` and
/// `want - init` (AdamW normalises a step, so the directions are what two runs can share).
pub fn update_cosines(init: &HostAdapter, got: &HostAdapter, want: &HostAdapter) -> Vec<(usize, &'static str, f64)> {
    let mut out = Vec::new();
    for (p, ((_, gphi, gpsi), (_, wphi, wpsi))) in got.pairs.iter().zip(&want.pairs).enumerate() {
        let (_, phi0, psi0) = &init.pairs[p];
        let delta = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y) as f64).collect::<Vec<f64>>();
        for (what, g, w, i) in [("phi", gphi, wphi, phi0), ("psi", gpsi, wpsi, psi0)] {
            let (dg, dw) = (delta(g, i), delta(w, i));
            let dot: f64 = dg.iter().zip(&dw).map(|(a, b)| a * b).sum();
            let (ng, nw) = (dg.iter().map(|v| v * v).sum::<f64>(), dw.iter().map(|v| v * v).sum::<f64>());
            out.push((p, what, dot / (ng.sqrt() * nw.sqrt()).max(1e-30)));
        }
    }
    out
}
