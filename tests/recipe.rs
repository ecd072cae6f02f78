//! The training recipe beyond plain AdamW, as transformers' Trainer runs it: learning-rate
//! schedules (`get_scheduler`), gradient clipping (`clip_grad_norm_`), gradient accumulation
//! and an evaluation loss during training. Reference data from scripts/recipe_reference.py (transformers 5.24, PyTorch
//! float64).

mod common;
#[path = "common/reference.rs"]
mod reference;
#[path = "common/smollm2.rs"]
mod smollm2;
#[path = "common/tiny.rs"]
mod tiny;

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
    // A batch without a labelled position adds nothing; only such batches are an error.
    let mut none = Batch::causal(&seqs[..2]).unwrap();
    none.labels.iter_mut().for_each(|l| *l = -1);
    let mut five = Trainer::new(&Cpu, &model, &ad, opt).unwrap();
    let c = five.step_many(&[Batch::causal(&seqs).unwrap(), none.clone()]).unwrap();
    assert_eq!((c.loss, c.grad_norm), (a.loss, a.grad_norm), "an empty batch changed the step");
    assert_eq!(five.host_adapter().unwrap(), three.host_adapter().unwrap());
    assert!(Trainer::new(&Cpu, &model, &ad, opt).unwrap().step_many(&[none]).is_err());
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

/// `finetune --eval-data`: the evaluation loss before training, every `--eval-every` steps and
/// after the last, logged as `{"step": k, "eval_loss": ...}`; before training (a fresh adapter,
/// whose `psi` is zero) it is the base model's mean loss over the file; training on that same
/// data lowers it. Evaluation data without a token to predict is refused.
#[test]
fn finetune_reports_the_evaluation_loss() {
    use wegeft::train::{data, trainer::eval_loss};
    let dir = common::fresh_dir("evaldata");
    let (model_path, train) = (dir.join("tiny.gguf"), dir.join("train.jsonl"));
    tiny::write_gguf(&model_path);
    tiny::write_data(&train, 6);
    let (out, log) = (dir.join("out"), dir.join("log.jsonl"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["finetune", "--model", &s(&model_path), "--data", &s(&train), "--rank", "2", "--targets", "q_proj,v_proj,down_proj", "--lr", "2e-2", "--batch", "3", "--seq", "16", "--steps", "5", "--out", &s(&out)]
            .iter()
            .map(|x| x.to_string())
            .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let a = args(&["--eval-data", &s(&train), "--eval-every", "2", "--log-json", &s(&log)]);
    common::wegeft_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let evals: Vec<(u64, f64)> =
        lines.iter().filter(|l| l.get("eval_loss").is_some()).map(|l| (l["step"].as_u64().unwrap(), l["eval_loss"].as_f64().unwrap())).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 2, 4, 5], "{evals:?}");
    assert_eq!(lines.iter().filter(|l| l.get("loss").is_some()).count(), 5);
    // Before training: the base model's loss over the file.
    let w = LlamaWeights::load(&model_path).unwrap();
    let tok = wegeft::model::Tokenizer::from_gguf(&model_path).unwrap();
    let model = Llama::from_host(&Cpu, HostWeights::from_llama(w).unwrap()).unwrap();
    let examples = data::read_jsonl(&train, Some(&tok), 16).unwrap();
    let base = eval_loss(&Cpu, &model, None, &examples, 3, tok.pad_id().unwrap_or(0)).unwrap();
    assert!((evals[0].1 - base).abs() <= 1e-6 * base, "{} vs the base model's {base}", evals[0].1);
    assert!(evals[3].1 < evals[0].1 - 1e-3, "training on the data did not lower its loss: {evals:?}");
    // Refused: a missing file, and a file of prompts with empty completions.
    let _ = std::fs::remove_dir_all(&out);
    let e = common::run_wegeft(&args(&["--eval-data", &s(&dir.join("none.jsonl"))]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("none.jsonl"));
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "{\"prompt\": \"abc\", \"completion\": \"\"}\n").unwrap();
    let e = common::run_wegeft(&args(&["--eval-data", &s(&empty)]).iter().map(String::as_str).collect::<Vec<_>>());
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && msg.contains("empty.jsonl"), "{msg}");
    assert!(!out.exists(), "a refused run left {}", out.display());
    let _ = std::fs::remove_dir_all(&dir);
}
