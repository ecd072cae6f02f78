//! Checks of a model family against the reference data scripts/llama3_reference.py and
//! scripts/qwen_reference.py write (transformers' logits, a float64 PyTorch fine-tune), and the
//! CLI run end to end on an instruct-shaped GGUF. Used by tests/llama3.rs and tests/qwen.rs;
//! included with `#[path = "common/reference.rs"] mod reference;` next to `mod common;`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use wegeft::cpu::Cpu;
use wegeft::model::llama::{argmax, Llama};
use wegeft::model::weights::gguf::{GgufFile, GgufValue, GgufWriter};

use crate::common::{gguf_tokenizer_metadata, wegeft_ok as wegeft, GgufVocab};

/// f32 against f32 in another order of summation, over 300 positions of a random model (the
/// worst seen is about 1e-6 of the largest logit).
pub const LOGIT_TOL: f64 = 1e-5;

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Compares the model's logits and loss on every sequence of the reference file (a
/// `logits.json`) with transformers'; with `check`, asserts them within [`LOGIT_TOL`] of the
/// largest logit, the loss within 1e-5, the argmax equal up to near ties. Returns the largest
/// logit difference relative to the largest logit.
pub fn compare_with(model: &Llama<Cpu>, reference: &Path, check: bool) -> f64 {
    let r = read_json(reference);
    let name = reference.display();
    let mut worst = 0.0f64;
    for c in r["cases"].as_array().unwrap() {
        let ids = ids_of(&c["ids"]);
        let (logits, loss) = model.score(&Cpu, None, &ids).unwrap();
        let v = model.dims.vocab;
        for (k, p) in c["positions"].as_array().unwrap().iter().enumerate() {
            let p = p.as_u64().unwrap() as usize;
            let want: Vec<f64> = c["logits"][k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let got = &logits[p * v..(p + 1) * v];
            let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let diff = got.iter().zip(&want).fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
            worst = worst.max(diff / scale);
        }
        if check {
            let want_loss = c["loss"].as_f64().unwrap();
            let loss = loss.unwrap() as f64;
            assert!((loss - want_loss).abs() <= 1e-5 * want_loss.abs(), "{name}: loss {loss} vs {want_loss} ({} ids)", ids.len());
            for (t, w) in ids_of(&c["argmax"]).into_iter().enumerate() {
                let row = &logits[t * v..(t + 1) * v];
                let g = argmax(row);
                // A different argmax only where transformers' top two are within rounding.
                assert!(g == w as usize || (row[g] - row[w as usize]).abs() < 1e-4, "{name}: argmax at {t}: {g} vs {w}");
            }
        }
    }
    if check {
        println!("{name}: logits within {worst:.2e} of the largest (tolerance {LOGIT_TOL:e})");
        assert!(worst <= LOGIT_TOL, "{name}: logits differ from transformers by {worst:e} of the largest");
    }
    worst
}

/// A WeGeFT fine-tune of `model` (all seven projections, one pair per module type, the official
/// formulation) against PyTorch autograd + `torch.optim.AdamW` in float64, from `dir`'s
/// `train.json`, `train_init.safetensors` and `train_final.safetensors`: the losses before each
/// update within 1e-6, each pair's update within 2e-5 of PyTorch's, relative to its size — or,
/// where `train.json` records how far PyTorch's own float32 run lands (`f32_update_dist`, for an
/// ill-conditioned fine-tune), within 10 times that if it is more. Where `train.json` holds a
/// `recipe` (transformers' Trainer setup): its schedule, gradient clipping and batches per
/// update, with each update's learning rate within 1e-15 of transformers' and its gradient norm
/// within 1e-5 of torch's.
pub fn finetune_matches_pytorch(model: &Llama<Cpu>, dir: &Path) {
    use wegeft::adapter::io::load_gift;
    use wegeft::model::llama::{Batch, HostAdapter};
    use wegeft::train::{optim::AdamWConfig, trainer::Trainer};
    let t = read_json(&dir.join("train.json"));
    let dims = model.dims.adapter_dims().unwrap();
    let load = |f: &str| {
        let p = dir.join(f);
        HostAdapter::from_adapter(&load_gift(&p, &dims).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
    };
    let init = load("train_init.safetensors");
    assert_eq!(init.pairs.len(), 7);
    let opt = AdamWConfig { lr: t["lr"].as_f64().unwrap(), beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut tr = Trainer::new(&Cpu, model, &init, opt).unwrap();
    // A recipe (transformers' Trainer setup): schedule, clipping, batches per update.
    let recipe = &t["recipe"];
    let accum = recipe["grad_accum"].as_u64().unwrap_or(1) as usize;
    if recipe.is_object() {
        use wegeft::train::schedule::{LrSchedule, ScheduleKind};
        let kind = ScheduleKind::parse(recipe["schedule"].as_str().unwrap()).unwrap();
        let steps = recipe["steps"].as_u64().unwrap();
        tr = tr.with_schedule(LrSchedule::new(kind, recipe["warmup_steps"].as_u64().unwrap(), steps));
        if let Some(max) = recipe["max_grad_norm"].as_f64() {
            tr = tr.with_max_grad_norm(max).unwrap();
        }
    }
    let name = dir.display();
    let batches: Vec<Batch> = t["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| Batch::causal(&serde_json::from_value::<Vec<Vec<u32>>>(b.clone()).unwrap()).unwrap())
        .collect();
    assert_eq!(batches.len(), accum * t["losses"].as_array().unwrap().len(), "{name}: batches");
    for (k, (group, want)) in batches.chunks(accum).zip(t["losses"].as_array().unwrap()).enumerate() {
        let st = tr.step_many(group).unwrap();
        let (loss, want) = (st.loss as f64, want.as_f64().unwrap());
        assert!(((loss - want) / want).abs() <= 1e-6, "{name} step {k}: loss {loss} vs PyTorch {want}");
        if recipe.is_object() {
            let (lr, norm) = (t["lrs"][k].as_f64().unwrap(), t["grad_norms"][k].as_f64().unwrap());
            assert!((st.lr - lr).abs() <= 1e-15 * lr, "{name} step {k}: lr {} vs transformers' {lr}", st.lr);
            assert!((st.grad_norm - norm).abs() <= 1e-5 * norm, "{name} step {k}: gradient norm {} vs torch's {norm}", st.grad_norm);
        }
    }
    let fin = tr.host_adapter().unwrap();
    let want = load("train_final.safetensors");
    for (((m, phi, psi), (wm, wphi, wpsi)), (_, iphi, ipsi)) in fin.pairs.iter().zip(&want.pairs).zip(&init.pairs) {
        assert_eq!(m, wm);
        // Our update against PyTorch's, relative to its size.
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for ((g, w), i) in phi.iter().chain(psi).zip(wphi.iter().chain(wpsi)).zip(iphi.iter().chain(ipsi)) {
            num += (*g as f64 - *w as f64).powi(2);
            den += (*w as f64 - *i as f64).powi(2);
        }
        let dist = (num / den).sqrt();
        let module = wegeft::model::llama::MODULES[*m];
        let tol = t["f32_update_dist"][module].as_f64().map_or(2e-5, |f32_dist| (10.0 * f32_dist).max(2e-5));
        println!("{name} {module}: update {dist:.2e} (relative) from PyTorch's float64 (tolerance {tol:.1e})");
        assert!(den > 0.0 && dist <= tol, "{name} {module}: our update is {dist:e} (relative) from PyTorch's (tolerance {tol:e})");
    }
}

/// Writes to `path` the tiny reference GGUF `src` with a whole tokenizer in its metadata
/// (`tokenizer_json` as [`gguf_tokenizer_metadata`] writes it) and an embedding of that
/// vocabulary's size (seeded, f16): an instruct GGUF in every respect but size.
pub fn instruct_gguf(src: &Path, tokenizer_json: &Path, vocab: &GgufVocab, path: &Path) {
    let g = GgufFile::open(src).unwrap();
    let arch = g.get_str("general.architecture").unwrap().to_string();
    let vocab_key = format!("{arch}.vocab_size");
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata() {
        if *k != vocab_key && !k.starts_with("tokenizer.") {
            w.kv(k.clone(), v.clone());
        }
    }
    let n = gguf_tokenizer_metadata(&mut w, tokenizer_json, vocab);
    if g.get(&vocab_key).is_some() {
        w.kv(vocab_key, GgufValue::U32(n as u32));
    }
    for t in g.tensors() {
        if t.name == "token_embd.weight" {
            let h = t.ne[0] as usize;
            let mut rng = wegeft::rng::Rng::new(11);
            let e: Vec<u8> =
                (0..n * h).flat_map(|_| half::f16::from_f32(rng.uniform_f32(-0.05, 0.05)).to_le_bytes()).collect();
            w.tensor(&t.name, &[h as u64, n as u64], t.ty, e).unwrap();
        } else {
            w.tensor(&t.name, &t.ne, t.ty, g.tensor_bytes(&t.name).unwrap().to_vec()).unwrap();
        }
    }
    w.write(path).unwrap();
}

/// What [`cli_round_trip`] leaves for the caller's own checks.
pub struct CliRun {
    /// The fine-tuned adapter file.
    pub adapter: PathBuf,
    /// `wegeft score --adapter ... --text TEXT` on the GGUF.
    pub score: serde_json::Value,
    /// The HF checkpoint `wegeft merge` wrote.
    pub merged: PathBuf,
}

/// The CLI end to end on the GGUF `model`, in `dir`: three steps of `finetune --task
/// arithmetic` with `finetune_args` added (logged losses in `losses`), `score` of `text` with
/// the adapter,
/// `generate`, and `merge` into an HF checkpoint that scores `text` as the GGUF with the
/// adapter does (same ids and argmax, loss within 1e-4).
pub fn cli_round_trip(model: &Path, dir: &Path, text: &str, losses: std::ops::Range<f64>, finetune_args: &[&str]) -> CliRun {
    let range = losses;
    let (ms, out, log) = (model.to_str().unwrap(), dir.join("adapter"), dir.join("log.jsonl"));
    let mut args = vec![
        "finetune", "--model", ms, "--task", "arithmetic", "--targets", "q_proj,v_proj,down_proj", "--rank", "4",
        "--steps", "3", "--batch", "2", "--eval-n", "1", "--out", out.to_str().unwrap(), "--log-json",
        log.to_str().unwrap(),
    ];
    args.extend_from_slice(finetune_args);
    let stdout = wegeft(&args);
    assert!(stdout.contains("held-out exact match before") && stdout.contains("after"), "{stdout}");
    let losses: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| range.contains(l)), "{losses:?} not in {range:?}");
    let adapter = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .expect("an adapter file");
    let ad = adapter.to_str().unwrap();
    let score: serde_json::Value =
        serde_json::from_str(&wegeft(&["score", "--model", ms, "--adapter", ad, "--text", text])).unwrap();
    assert!(score["loss"].as_f64().unwrap().is_finite());
    let g = wegeft(&["generate", "--model", ms, "--adapter", ad, "--prompt", "Hi", "--max-new", "4"]);
    assert!(!g.trim().is_empty());
    let merged = dir.join("merged");
    wegeft(&["merge", "--model", ms, "--adapter", ad, "--out", merged.to_str().unwrap()]);
    let via: serde_json::Value =
        serde_json::from_str(&wegeft(&["score", "--model", merged.to_str().unwrap(), "--text", text])).unwrap();
    assert_eq!(via["ids"], score["ids"]);
    assert_eq!(via["argmax"], score["argmax"]);
    let (a, b) = (via["loss"].as_f64().unwrap(), score["loss"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-4, "merged {a} vs adapter {b}");
    CliRun { adapter, score, merged }
}
