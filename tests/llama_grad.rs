//! The whole Llama model on a tiny random configuration: adapter gradients against finite
//! differences, KV-cache decoding against the full forward, determinism, bad input.

mod common;

use common::{rand_f32, tiny_weights};

use wegeft::cpu::Cpu;
use wegeft::model::llama::{argmax, Batch, Dims, HostAdapter, HostWeights, Llama, MODULES};


fn tiny_dims() -> Dims {
    Dims {
        hidden: 32,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        ffn: 48,
        vocab: 61,
        rope: wegeft::rope::Rope::new(10000.0),
        eps: 1e-5,
        window: None,
        full_layers: vec![],
        nope_layers: vec![],
    }
}


/// Rank-3 pairs with nonzero phi and psi on `targets`; `shared` = one pair per module
/// type across layers, else one pair per layer and module.
fn tiny_adapter(d: &Dims, targets: &[usize], shared: bool, scale: f32, seed: u64) -> HostAdapter {
    let r = 3;
    let mut pairs = Vec::new();
    let mut sites = vec![[None; 7]; d.layers];
    let mut s = seed;
    for &m in targets {
        let (din, _) = d.module_dims(m);
        let copies = if shared { 1 } else { d.layers };
        for c in 0..copies {
            s += 2;
            pairs.push((m, rand_f32(s, din * r, 0.4), rand_f32(s + 1, r * din, 0.4)));
            let idx = pairs.len() - 1;
            if shared {
                for row in sites.iter_mut() {
                    row[m] = Some(idx);
                }
            } else {
                sites[c][m] = Some(idx);
            }
        }
    }
    HostAdapter { rank: r, scale, pairs, sites, dropout: 0.0 }
}

fn tiny_batch(d: &Dims) -> Batch {
    let seqs: Vec<Vec<u32>> =
        (0..2).map(|b| (0..7).map(|t| ((b * 31 + t * 17 + 5) % d.vocab) as u32).collect()).collect();
    let mut batch = Batch::causal(&seqs).unwrap();
    // No loss on one position, as for a prompt.
    batch.labels[1] = -1;
    batch
}

fn loss_at(model: &Llama<Cpu>, ad: &HostAdapter, batch: &Batch) -> f64 {
    let a = ad.upload(&Cpu, &model.dims).unwrap();
    model.loss(&Cpu, Some(&a), batch).unwrap() as f64
}

/// [`tiny_dims`] with Llama 3.1's RoPE scaling, its bands placed so that the 4 frequencies of
/// the 8-wide heads fall in all three (kept, interpolated, divided).
fn tiny_dims_llama3() -> Dims {
    use wegeft::rope::{Rope, RopeScaling};
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 128.0,
        original_max_position_embeddings: 2048,
    };
    let d = Dims { rope: Rope::new(10000.0).with_scaling(scaling), ..tiny_dims() };
    let (plain, scaled) = (Rope::new(10000.0).inv_freq(8).unwrap(), d.rope.inv_freq(8).unwrap());
    let ratios: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| s / p).collect();
    assert!(ratios[0] == 1.0 && ratios[3] == 0.125 && ratios[1..3].iter().all(|r| *r < 1.0 && *r > 0.125), "{ratios:?}");
    d
}

fn check_grads(tied: bool, shared: bool, targets: &[usize], scale: f32) {
    check_grads_with(tiny_dims(), tied, shared, targets, scale)
}

fn check_grads_with(d: Dims, tied: bool, shared: bool, targets: &[usize], scale: f32) {
    check_grads_on(tiny_weights(&d, 100, tied), shared, targets, scale)
}

/// Qwen2's extras: biases on q, k, v.
const QWEN2_BIAS: [bool; 7] = [true, true, true, false, false, false, false];

/// [`tiny_dims`] with heads wider than `hidden / heads` (q is 32 -> 48), as Qwen3's are.
fn tiny_dims_wide_heads() -> Dims {
    Dims { head_dim: 12, ..tiny_dims() }
}

/// Random weights with biases on `bias` and, with `qk_norm`, Qwen3's head norms.
fn weights_with_extras(d: &Dims, tied: bool, bias: [bool; 7], qk_norm: bool) -> HostWeights {
    let mut w = tiny_weights(d, 100, tied);
    w.add_random_extras(9, bias, qk_norm);
    w
}

#[test]
fn grad_with_qwen2_biases() {
    check_grads_on(weights_with_extras(&tiny_dims(), true, QWEN2_BIAS, false), true, &[0, 1, 2, 3, 4, 5, 6], 1.0);
}

#[test]
fn grad_with_qwen3_head_norms_and_every_bias() {
    let w = weights_with_extras(&tiny_dims_wide_heads(), false, [true; 7], true);
    check_grads_on(w, true, &[0, 1, 2, 3, 4, 5, 6], 1.0);
    // The lowest adapted layer is 1 here: its head norms' backward must still feed q and k.
    let w = weights_with_extras(&tiny_dims_wide_heads(), false, [false; 7], true);
    check_grads_on(w, false, &[0, 1], 0.5);
}

#[test]
fn extras_change_the_model() {
    // Biases and head norms are used (a test that ignored them would pass the gradient checks).
    let d = tiny_dims_wide_heads();
    let ids: Vec<u32> = vec![3, 14, 15, 9, 26];
    let plain = Llama::new(&Cpu, &tiny_weights(&d, 100, true)).unwrap().score(&Cpu, None, &ids).unwrap().0;
    for (bias, qk) in [(QWEN2_BIAS, false), ([false, false, false, true, false, false, false], false), ([false; 7], true)] {
        let m = Llama::new(&Cpu, &weights_with_extras(&d, true, bias, qk)).unwrap();
        let got = m.score(&Cpu, None, &ids).unwrap().0;
        let diff = got.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff > 1e-2, "bias {bias:?} qk_norm {qk}: logits moved only {diff}");
    }
    // Mis-sized extras are refused, naming the tensor.
    let mut w = weights_with_extras(&d, true, QWEN2_BIAS, true);
    w.layers[1].bias[2].as_mut().unwrap().pop();
    let e = Llama::new(&Cpu, &w).err().unwrap().to_string();
    assert!(e.contains("layers.1.v_proj.bias"), "{e}");
    let mut w = weights_with_extras(&d, true, QWEN2_BIAS, true);
    w.layers[0].qk_norm.as_mut().unwrap().1.push(1.0);
    let e = Llama::new(&Cpu, &w).err().unwrap().to_string();
    assert!(e.contains("layers.0.k_norm"), "{e}");
}

fn check_grads_on(w: HostWeights, shared: bool, targets: &[usize], scale: f32) {
    let d = w.dims.clone();
    let model = Llama::new(&Cpu, &w).unwrap();
    let ad = tiny_adapter(&d, targets, shared, scale, 7);
    let batch = tiny_batch(&d);
    let a = ad.upload(&Cpu, &d).unwrap();
    let mut grads = a.zero_grads(&Cpu).unwrap();
    let loss = model.loss_and_grad(&Cpu, &a, &batch, &mut grads).unwrap() as f64;
    assert!(
        (loss - loss_at(&model, &ad, &batch)).abs() < 1e-5 * loss.abs(),
        "loss_and_grad's loss differs from loss()"
    );
    // Directional derivatives along random directions, one pair at a time and all at once.
    let eps = 2e-3f32;
    let mut dirs: Vec<Vec<(Vec<f32>, Vec<f32>)>> = Vec::new();
    for (p, (_, phi, psi)) in ad.pairs.iter().enumerate() {
        for which in 0..2 {
            let mut dir: Vec<(Vec<f32>, Vec<f32>)> =
                ad.pairs.iter().map(|(_, f, s)| (vec![0.0; f.len()], vec![0.0; s.len()])).collect();
            if which == 0 {
                dir[p].0 = rand_f32(1000 + p as u64, phi.len(), 1.0);
            } else {
                dir[p].1 = rand_f32(2000 + p as u64, psi.len(), 1.0);
            }
            dirs.push(dir);
        }
    }
    dirs.push(
        ad.pairs
            .iter()
            .enumerate()
            .map(|(p, (_, f, s))| (rand_f32(3000 + p as u64, f.len(), 1.0), rand_f32(4000 + p as u64, s.len(), 1.0)))
            .collect(),
    );
    let (mut worst, mut scale_max) = (0.0f64, 0.0f64);
    let mut rows = Vec::new();
    for dir in &dirs {
        let shifted = |sign: f32| {
            let mut ad2 = ad.clone();
            for ((_, phi, psi), (dphi, dpsi)) in ad2.pairs.iter_mut().zip(dir) {
                phi.iter_mut().zip(dphi).for_each(|(p, d)| *p += sign * eps * d);
                psi.iter_mut().zip(dpsi).for_each(|(p, d)| *p += sign * eps * d);
            }
            loss_at(&model, &ad2, &batch)
        };
        let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps as f64);
        let an: f64 = grads
            .iter()
            .zip(dir)
            .map(|((gphi, gpsi), (dphi, dpsi))| {
                gphi.iter().zip(dphi).map(|(g, d)| (*g as f64) * (*d as f64)).sum::<f64>()
                    + gpsi.iter().zip(dpsi).map(|(g, d)| (*g as f64) * (*d as f64)).sum::<f64>()
            })
            .sum();
        let d = (fd - an).abs();
        worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
        scale_max = scale_max.max(an.abs());
        rows.push((fd, an));
    }
    assert!(scale_max > 1e-3, "gradients vanish: {rows:?}");
    assert!(
        worst <= 2e-3 * scale_max.max(1.0),
        "finite differences disagree (fd, analytic): {rows:?}; worst {worst:e}"
    );
}

#[test]
fn grad_with_llama3_rope_scaling() {
    check_grads_with(tiny_dims_llama3(), true, true, &[0, 1, 2, 3, 4, 5, 6], 1.0);
}

#[test]
fn grad_all_targets_shared_tied() {
    check_grads(true, true, &[0, 1, 2, 3, 4, 5, 6], 1.0);
}

#[test]
fn grad_per_layer_pairs_untied_scaled() {
    check_grads(false, false, &[0, 2, 3, 6], 0.5);
}

#[test]
fn grad_single_target_in_the_mlp() {
    check_grads(true, true, &[5], 2.0);
}

/// One pair shared by q, k, v, gate and up (all read the hidden state) in every layer, as
/// the PEFT fork's `tied_modules` allow: the pair's gradient sums over ten sites.
#[test]
fn grad_pair_shared_across_module_types() {
    let d = tiny_dims();
    let mut ad = tiny_adapter(&d, &[0], true, 0.9, 21);
    for row in ad.sites.iter_mut() {
        for m in [1, 2, 4, 5] {
            row[m] = Some(0);
        }
    }
    let model = Llama::new(&Cpu, &tiny_weights(&d, 33, true)).unwrap();
    let batch = tiny_batch(&d);
    let a = ad.upload(&Cpu, &d).unwrap();
    let mut grads = a.zero_grads(&Cpu).unwrap();
    model.loss_and_grad(&Cpu, &a, &batch, &mut grads).unwrap();
    let eps = 2e-3f32;
    for which in 0..2 {
        let dir = rand_f32(77 + which, ad.pairs[0].1.len(), 1.0);
        let shifted = |sign: f32| {
            let mut ad2 = ad.clone();
            let t = if which == 0 { &mut ad2.pairs[0].1 } else { &mut ad2.pairs[0].2 };
            t.iter_mut().zip(&dir).for_each(|(p, d)| *p += sign * eps * d);
            loss_at(&model, &ad2, &batch)
        };
        let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps as f64);
        let g = if which == 0 { &grads[0].0 } else { &grads[0].1 };
        let an: f64 = g.iter().zip(&dir).map(|(g, d)| *g as f64 * *d as f64).sum();
        assert!(
            (fd - an).abs() <= 2e-3 * an.abs().max(1.0),
            "{}: fd {fd} vs analytic {an}",
            ["phi", "psi"][which as usize]
        );
    }
    // A site pointing at a pair of the wrong d_in is refused (down_proj reads the FFN width).
    ad.sites[1][6] = Some(0);
    assert!(ad.upload(&Cpu, &d).is_err());
}

/// Weight dropout (the PEFT fork's `wegeft_dropout`): the training pass with fixed masks
/// against finite differences of that same training loss; evaluation ignores it.
#[test]
fn grad_with_weight_dropout() {
    let d = tiny_dims();
    let mut ad = tiny_adapter(&d, &[0, 2, 4, 6], true, 1.0, 5);
    ad.dropout = 0.3;
    let model = Llama::new(&Cpu, &tiny_weights(&d, 8, true)).unwrap();
    let batch = tiny_batch(&d);
    let train_loss = |ad: &HostAdapter| {
        let mut a = ad.upload(&Cpu, &d).unwrap();
        a.dropout_seed = 1234;
        let mut g = a.zero_grads(&Cpu).unwrap();
        let l = model.loss_and_grad(&Cpu, &a, &batch, &mut g).unwrap() as f64;
        (l, g)
    };
    let (l0, grads) = train_loss(&ad);
    // Dropout is active in training, off in evaluation.
    let mut plain = ad.clone();
    plain.dropout = 0.0;
    let eval = loss_at(&model, &ad, &batch);
    assert_eq!(eval, loss_at(&model, &plain, &batch));
    assert!((l0 - eval).abs() > 1e-4, "dropout changes nothing: {l0} vs {eval}");
    assert_eq!(l0, train_loss(&ad).0, "same seed, same masks");
    let eps = 2e-3f32;
    for (p, (_, phi, psi)) in ad.pairs.iter().enumerate() {
        for which in 0..2 {
            let n = if which == 0 { phi.len() } else { psi.len() };
            let dir = rand_f32(500 + 2 * p as u64 + which, n, 1.0);
            let shifted = |sign: f32| {
                let mut ad2 = ad.clone();
                let t = if which == 0 { &mut ad2.pairs[p].1 } else { &mut ad2.pairs[p].2 };
                t.iter_mut().zip(&dir).for_each(|(x, d)| *x += sign * eps * d);
                train_loss(&ad2).0
            };
            let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps as f64);
            let g = if which == 0 { &grads[p].0 } else { &grads[p].1 };
            let an: f64 = g.iter().zip(&dir).map(|(g, d)| *g as f64 * *d as f64).sum();
            assert!((fd - an).abs() <= 2e-3 * an.abs().max(1.0), "pair {p} {which}: fd {fd} vs analytic {an}");
        }
    }
    // Out of range.
    ad.dropout = 1.0;
    assert!(ad.upload(&Cpu, &d).is_err());
}

#[test]
fn kv_cache_decode_matches_full_forward() {
    kv_cache_decode_matches_full_forward_with(tiny_dims());
}

#[test]
fn kv_cache_decode_with_llama3_rope_scaling() {
    kv_cache_decode_matches_full_forward_with(tiny_dims_llama3());
}

#[test]
fn kv_cache_decode_with_qwen_extras() {
    let d = tiny_dims_wide_heads();
    let mut w = tiny_weights(&d, 5, true);
    w.add_random_extras(4, QWEN2_BIAS, true);
    kv_cache_decode_matches_full_forward_on(w);
}

fn kv_cache_decode_matches_full_forward_with(d: Dims) {
    kv_cache_decode_matches_full_forward_on(tiny_weights(&d, 5, true))
}

fn kv_cache_decode_matches_full_forward_on(w: HostWeights) {
    let d = w.dims.clone();
    let model = Llama::new(&Cpu, &w).unwrap();
    let ad = tiny_adapter(&d, &[0, 1, 2, 3, 4, 5, 6], true, 1.0, 3).upload(&Cpu, &d).unwrap();
    let ids: Vec<u32> = vec![3, 14, 15, 9, 26, 5, 35, 8, 9];
    let (logits, _) = model.score(&Cpu, Some(&ad), &ids).unwrap();
    let mut cache = model.new_cache(&Cpu, 1, 16).unwrap();
    // A prefill of 4 tokens, then one at a time.
    let mut got = model.forward_cached(&Cpu, Some(&ad), &ids[..4], &mut cache).unwrap();
    for t in 4..=ids.len() {
        let want: Vec<f64> = logits[(t - 1) * d.vocab..t * d.vocab].iter().map(|&v| v as f64).collect();
        let g: Vec<f64> = got.iter().map(|&v| v as f64).collect();
        common::assert_close(&format!("logits at position {}", t - 1), &g, &want, 1e-5);
        if t < ids.len() {
            got = model.forward_cached(&Cpu, Some(&ad), &ids[t..t + 1], &mut cache).unwrap();
        }
    }
    assert_eq!(cache.len(), ids.len());
    // Greedy generation equals argmax over repeated full forwards.
    let new = model.generate(&Cpu, Some(&ad), &ids[..3], 5, &[]).unwrap();
    let mut seq = ids[..3].to_vec();
    for _ in 0..5 {
        let (lg, _) = model.score(&Cpu, Some(&ad), &seq).unwrap();
        seq.push(argmax(&lg[(seq.len() - 1) * d.vocab..]) as u32);
    }
    assert_eq!(new, seq[3..].to_vec());
    // The cache refuses to overflow.
    let mut small = model.new_cache(&Cpu, 1, 2).unwrap();
    assert!(model.forward_cached(&Cpu, None, &ids[..3], &mut small).is_err());
}

#[test]
fn batched_generation_matches_one_at_a_time() {
    let d = tiny_dims();
    let model = Llama::new(&Cpu, &tiny_weights(&d, 11, false)).unwrap();
    let ad = tiny_adapter(&d, &[0, 3, 5], false, 0.7, 2).upload(&Cpu, &d).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![7, 8], vec![4, 5, 6], vec![9, 9, 9], vec![30]];
    // Stop on a token that some sequences produce, so that they finish at different times.
    let first: Vec<u32> = prompts.iter().map(|p| model.generate(&Cpu, Some(&ad), p, 1, &[]).unwrap()[0]).collect();
    let stop = [first[2]];
    let batched = model.generate_batch(&Cpu, Some(&ad), &prompts, 6, &stop).unwrap();
    for (p, got) in prompts.iter().zip(&batched) {
        assert_eq!(got, &model.generate(&Cpu, Some(&ad), p, 6, &stop).unwrap(), "prompt {p:?}");
    }
    assert_eq!(batched[2], vec![first[2]]);
    // Batched prefill logits equal the full forward's.
    let mut cache = model.new_cache(&Cpu, 2, 8).unwrap();
    let lg = model.forward_cached(&Cpu, Some(&ad), &[1, 2, 3, 4, 5, 6], &mut cache).unwrap();
    for (j, p) in [[1u32, 2, 3], [4, 5, 6]].iter().enumerate() {
        let (full, _) = model.score(&Cpu, Some(&ad), p).unwrap();
        let want: Vec<f64> = full[2 * d.vocab..].iter().map(|&v| v as f64).collect();
        let got: Vec<f64> = lg[j * d.vocab..(j + 1) * d.vocab].iter().map(|&v| v as f64).collect();
        common::assert_close("batched prefill logits", &got, &want, 1e-5);
    }
    // A second step with the wrong number of tokens is an error.
    assert!(model.forward_cached(&Cpu, None, &[1, 2, 3], &mut cache).is_err());
}

#[test]
fn gradients_are_deterministic() {
    let d = tiny_dims();
    let model = Llama::new(&Cpu, &tiny_weights(&d, 9, true)).unwrap();
    let a = tiny_adapter(&d, &[0, 2, 6], true, 1.0, 4).upload(&Cpu, &d).unwrap();
    let batch = tiny_batch(&d);
    let run = || {
        let mut g = a.zero_grads(&Cpu).unwrap();
        let l = model.loss_and_grad(&Cpu, &a, &batch, &mut g).unwrap();
        (l.to_bits(), g.into_iter().flat_map(|(x, y)| x.into_iter().chain(y)).map(f32::to_bits).collect::<Vec<_>>())
    };
    assert_eq!(run(), run());
}

#[test]
fn bad_input_is_an_error() {
    let d = tiny_dims();
    let w = tiny_weights(&d, 1, true);
    let model = Llama::new(&Cpu, &w).unwrap();
    // A token outside the vocabulary.
    let mut batch = tiny_batch(&d);
    batch.ids[3] = d.vocab as u32;
    assert!(model.loss(&Cpu, None, &batch).is_err());
    // A label outside the vocabulary.
    let mut batch = tiny_batch(&d);
    batch.labels[2] = d.vocab as i32 + 4;
    assert!(model.loss(&Cpu, None, &batch).is_err());
    // No labels.
    let mut batch = tiny_batch(&d);
    batch.labels.iter_mut().for_each(|l| *l = -1);
    assert!(model.loss(&Cpu, None, &batch).is_err());
    // A weight of the wrong size.
    let mut bad = w.clone();
    bad.layers[1].proj[2].pop();
    let err = Llama::new(&Cpu, &bad).err().expect("wrong size accepted").to_string();
    assert!(err.contains(MODULES[2]), "{err}");
    // An adapter pair of the wrong size.
    let mut ad = tiny_adapter(&d, &[0], true, 1.0, 1);
    ad.pairs[0].1.pop();
    assert!(ad.upload(&Cpu, &d).is_err());
}

/// The seeded random weights the GPU tests and benchmark use (`HostWeights::random`): shapes,
/// determinism, bf16 rounding of the matrices only, and a loss of the order of ln(vocab) on a
/// two-layer SmolLM2-shaped model (activations neither vanish nor explode).
#[test]
fn random_smollm2_weights_are_seeded_and_sane() {
    let mut d = Dims::smollm2_135m();
    d.layers = 2;
    let w = HostWeights::random(&d, 5, false).unwrap();
    assert_eq!(w.embed.len(), d.vocab * d.hidden);
    assert!(w.lm_head.is_none());
    for l in &w.layers {
        for m in 0..7 {
            let (i, o) = d.module_dims(m);
            assert_eq!(l.proj[m].len(), i * o);
        }
    }
    let again = HostWeights::random(&d, 5, false).unwrap();
    assert_eq!(w.layers[1].proj[6], again.layers[1].proj[6]);
    assert_ne!(w.layers[1].proj[6], HostWeights::random(&d, 6, false).unwrap().layers[1].proj[6]);
    let mut r = w.clone();
    r.round_to_bf16();
    assert!(r.layers[0].proj[0].iter().all(|&x| half::bf16::from_f32(x).to_f32() == x));
    assert_eq!(r.layers[0].attn_norm, w.layers[0].attn_norm, "norm weights stay f32");
    let model = Llama::new(&Cpu, &w).unwrap();
    let ids: Vec<u32> = (0..12).map(|t| (t * 7919 + 3) % d.vocab as u32).collect();
    let loss = model.loss(&Cpu, None, &Batch::causal(&[ids]).unwrap()).unwrap();
    let lnv = (d.vocab as f32).ln();
    assert!(loss.is_finite() && loss > 0.5 * lnv && loss < 3.0 * lnv, "loss {loss} vs ln(vocab) {lnv}");
}

/// A sliding window of 3 keys in layer 1 only (layer 0 keeps full attention), as Qwen's
/// `max_window_layers` makes it; the tiny batch's sequences are 7 tokens long.
fn tiny_dims_window() -> Dims {
    Dims { window: Some(3), full_layers: vec![0], ..tiny_dims() }
}

#[test]
fn a_sliding_window_masks_keys_past_it() {
    let d = tiny_dims_window();
    let w = tiny_weights(&d, 5, true);
    let model = Llama::new(&Cpu, &w).unwrap();
    let full = Llama::new(&Cpu, &HostWeights { dims: tiny_dims(), ..w.clone() }).unwrap();
    let ids: Vec<u32> = vec![3, 14, 15, 9, 26, 5, 35];
    // Up to the window's length, causal attention; past it, other logits.
    let (a, _) = model.score(&Cpu, None, &ids).unwrap();
    let (b, _) = full.score(&Cpu, None, &ids).unwrap();
    let v = d.vocab;
    assert_eq!(a[..3 * v], b[..3 * v]);
    assert!(a[3 * v..4 * v].iter().zip(&b[3 * v..4 * v]).any(|(x, y)| (x - y).abs() > 1e-3));
    // The window in layer 0 instead: different again.
    let other = Llama::new(&Cpu, &HostWeights { dims: Dims { full_layers: vec![1], ..d.clone() }, ..w.clone() }).unwrap();
    assert_ne!(other.score(&Cpu, None, &ids).unwrap().0, a);
    for bad in [Dims { window: Some(0), ..tiny_dims() }, Dims { full_layers: vec![2], ..tiny_dims_window() }] {
        assert!(Llama::new(&Cpu, &tiny_weights(&bad, 5, true)).is_err(), "{bad:?}");
    }
}

#[test]
fn grad_with_a_sliding_window() {
    check_grads_with(tiny_dims_window(), true, true, &[0, 1, 2, 3, 4, 5, 6], 1.0);
    check_grads_with(Dims { window: Some(1), full_layers: vec![], ..tiny_dims() }, false, false, &[0, 2, 6], 0.5);
}

#[test]
fn kv_cache_decode_with_a_sliding_window() {
    // Decoding past the window: each step attends to the last 3 cached tokens in layer 1.
    kv_cache_decode_matches_full_forward_with(tiny_dims_window());
}

/// SmolLM3's NoPE layers: [`tiny_dims`] with no RoPE in layer 1.
fn tiny_dims_nope() -> Dims {
    Dims { nope_layers: vec![1], ..tiny_dims() }
}

#[test]
fn grad_with_a_nope_layer() {
    check_grads_with(tiny_dims_nope(), true, true, &[0, 1, 2, 3, 4, 5, 6], 1.0);
}

#[test]
fn kv_cache_decode_with_a_nope_layer() {
    kv_cache_decode_matches_full_forward_with(tiny_dims_nope());
    // The layer without RoPE is used: the logits move.
    let ids: Vec<u32> = vec![3, 14, 15, 9, 26];
    let w = tiny_weights(&tiny_dims(), 5, true);
    let with = Llama::new(&Cpu, &w).unwrap().score(&Cpu, None, &ids).unwrap().0;
    let without = Llama::new(&Cpu, &HostWeights { dims: tiny_dims_nope(), ..w }).unwrap().score(&Cpu, None, &ids).unwrap().0;
    let diff = with.iter().zip(&without).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff > 1e-2, "a NoPE layer changed the logits by {diff} only");
    assert!(Llama::new(&Cpu, &tiny_weights(&Dims { nope_layers: vec![2], ..tiny_dims() }, 5, true)).is_err());
}
