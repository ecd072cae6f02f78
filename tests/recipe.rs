//! The training recipe beyond plain AdamW, as transformers' Trainer runs it: learning-rate
//! schedules (`get_scheduler`), gradient clipping (`clip_grad_norm_`) and gradient
//! accumulation. Reference data from scripts/recipe_reference.py (transformers 5.24, PyTorch
//! float64).

mod common;
#[path = "common/reference.rs"]
mod reference;
#[path = "common/smollm2.rs"]
mod smollm2;

use std::path::PathBuf;

use wegeft::cpu::Cpu;
use wegeft::model::llama::{Batch, HostAdapter, HostWeights, Llama};
use wegeft::model::LlamaWeights;
use wegeft::train::optim::AdamWConfig;
use wegeft::train::schedule::{LrSchedule, ScheduleKind};
use wegeft::train::trainer::Trainer;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// Every case's learning rates, updates 1 to total + 3, as transformers' schedulers set them.
#[test]
fn schedules_match_transformers() {
    let r = reference::read_json(&data("schedules.json"));
    for c in r["cases"].as_array().unwrap() {
        let kind = ScheduleKind::parse(c["kind"].as_str().unwrap()).unwrap();
        let (warmup, total, lr) = (c["warmup"].as_u64().unwrap(), c["total"].as_u64().unwrap(), c["lr"].as_f64().unwrap());
        let s = LrSchedule::new(kind, warmup, total);
        for (t, want) in c["lrs"].as_array().unwrap().iter().enumerate() {
            let (got, want) = (s.lr(lr, t as u64 + 1), want.as_f64().unwrap());
            assert!((got - want).abs() <= 1e-15 * want.abs(), "{kind:?} warmup {warmup} total {total}: update {}: {got} vs {want}", t + 1);
        }
    }
    assert!(ScheduleKind::parse("step").is_err());
    // A constant schedule does not depend on the run's length (a resumed run may change it).
    assert_eq!(LrSchedule::new(ScheduleKind::Constant, 2, 10), LrSchedule::new(ScheduleKind::Constant, 2, 99));
}

/// The float64 PyTorch fine-tune with a cosine schedule and warm-up, clipping that catches some
/// updates and not others, and two batches per update.
#[test]
fn recipe_finetune_matches_pytorch() {
    let model = Llama::from_host(&Cpu, HostWeights::from_llama(LlamaWeights::load(data("llama3/hf")).unwrap()).unwrap()).unwrap();
    reference::finetune_matches_pytorch(&model, &data("llama3/recipe"));
}

fn tiny() -> (Llama<Cpu>, HostAdapter, Vec<Vec<u32>>) {
    let model = Llama::from_host(&Cpu, HostWeights::from_llama(LlamaWeights::load(data("llama3/hf")).unwrap()).unwrap()).unwrap();
    let ad = smollm2::adapter(&model.dims, 3);
    let v = model.dims.vocab;
    let seqs = (0..4).map(|b| (0..12).map(|t| ((b * 31 + t * 17 + 5) % v) as u32).collect()).collect();
    (model, ad, seqs)
}

/// Two batches accumulated in one update are one batch of both: the same loss, gradient norm
/// and parameters (up to the order of summation).
#[test]
fn accumulated_batches_are_one_batch() {
    let (model, ad, seqs) = tiny();
    let opt = AdamWConfig { lr: 1e-2, weight_decay: 0.0, ..AdamWConfig::default() };
    let mut one = Trainer::new(&Cpu, &model, &ad, opt).unwrap();
    let mut two = Trainer::new(&Cpu, &model, &ad, opt).unwrap();
    for _ in 0..3 {
        let a = one.step_many(&[Batch::causal(&seqs).unwrap()]).unwrap();
        let b = two.step_many(&[Batch::causal(&seqs[..2]).unwrap(), Batch::causal(&seqs[2..]).unwrap()]).unwrap();
        assert!((a.loss - b.loss).abs() <= 1e-6 * a.loss.abs(), "{a:?} vs {b:?}");
        assert!((a.grad_norm - b.grad_norm).abs() <= 1e-5 * a.grad_norm, "{a:?} vs {b:?}");
        assert_eq!(a.lr, b.lr);
    }
    // The updates, as the PyTorch comparisons measure them: |u1 - u2| / |u1| over all values.
    let (x, y) = (one.host_adapter().unwrap(), two.host_adapter().unwrap());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (((_, p1, s1), (_, p2, s2)), (_, p0, s0)) in x.pairs.iter().zip(&y.pairs).zip(&ad.pairs) {
        for ((g, w), i) in p1.iter().chain(s1).zip(p2.iter().chain(s2)).zip(p0.iter().chain(s0)) {
            num += (*g as f64 - *w as f64).powi(2);
            den += (*g as f64 - *i as f64).powi(2);
        }
    }
    let dist = (num / den).sqrt();
    assert!(den > 0.0 && dist <= 1e-5, "accumulated update {dist:e} (relative) from one batch's");
    // A batch of unequal parts: still the mean over all their labelled positions.
    let mut three = Trainer::new(&Cpu, &model, &ad, opt).unwrap();
    let mut four = Trainer::new(&Cpu, &model, &ad, opt).unwrap();
    let a = three.step_many(&[Batch::causal(&seqs).unwrap()]).unwrap();
    let b = four.step_many(&[Batch::causal(&seqs[..1]).unwrap(), Batch::causal(&seqs[1..]).unwrap()]).unwrap();
    assert!((a.loss - b.loss).abs() <= 1e-6 * a.loss.abs() && (a.grad_norm - b.grad_norm).abs() <= 1e-5 * a.grad_norm, "{a:?} vs {b:?}");
    assert!(Trainer::new(&Cpu, &model, &ad, opt).unwrap().step_many(&[]).is_err());
}

/// Clipping: a bound above the gradient's norm changes nothing, bitwise; a bound below it
/// scales the gradient to that norm (`bound / (norm + 1e-6)`, torch's coefficient), and that
/// scaled gradient is what AdamW takes (its first moment after one step is 0.1 times it). The
/// reported norm is the one before clipping. A bound that is not a positive number is refused.
#[test]
fn clipping_scales_the_gradient_to_the_bound() {
    let (model, ad, seqs) = tiny();
    let b = Batch::causal(&seqs).unwrap();
    let opt = AdamWConfig { lr: 1e-2, weight_decay: 0.0, ..AdamWConfig::default() };
    let flat = |v: Vec<(Vec<f32>, Vec<f32>)>| -> Vec<f32> { v.into_iter().flat_map(|(a, b)| a.into_iter().chain(b)).collect() };
    let run = |clip: Option<f64>, steps: usize| {
        let mut tr = Trainer::new(&Cpu, &model, &ad, opt).unwrap();
        if let Some(c) = clip {
            tr = tr.with_max_grad_norm(c).unwrap();
        }
        let st: Vec<_> = (0..steps).map(|_| tr.step_many(std::slice::from_ref(&b)).unwrap()).collect();
        (st, flat(tr.last_grads().unwrap()), flat(tr.optimizer_state().unwrap().1), tr.host_adapter().unwrap())
    };
    let (plain, g, _, plain_ad) = run(None, 3);
    let (loose, _, _, loose_ad) = run(Some(plain.iter().map(|s| s.grad_norm).fold(0.0, f64::max) * 1.5), 3);
    assert_eq!((&plain, &plain_ad), (&loose, &loose_ad), "a bound above the norm changed the run");

    let (first, g1, _, _) = run(None, 1);
    let norm = first[0].grad_norm;
    let from_g1 = g1.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    assert!((norm - from_g1).abs() <= 1e-12 * norm, "reported norm {norm} vs the gradient's {from_g1}");
    let bound = 0.25 * norm;
    let (clipped, gc, m, _) = run(Some(bound), 1);
    assert_eq!(clipped[0].grad_norm, norm, "the norm is reported before clipping");
    let k = bound / (norm + 1e-6);
    let norm_c = gc.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    assert!((norm_c - bound).abs() <= 1e-6 * bound, "clipped norm {norm_c}, bound {bound}");
    for ((x, y), mi) in g1.iter().zip(&gc).zip(&m) {
        assert!((*y as f64 - k * *x as f64).abs() <= 1e-6 * (k * x.abs() as f64).max(1e-12), "{y} vs {k} x {x}");
        assert!((mi - 0.1 * y).abs() <= 1e-6 * y.abs().max(1e-12), "AdamW's moment {mi} vs 0.1 x {y}");
    }
    assert!(g.iter().any(|&x| x != 0.0));
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(Trainer::new(&Cpu, &model, &ad, opt).unwrap().with_max_grad_norm(bad).is_err(), "{bad}");
    }
}
