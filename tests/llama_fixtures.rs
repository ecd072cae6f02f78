//! The whole model on SmolLM2-135M-Instruct against transformers (`prompt_reference.json`,
//! `logits.json`) and against the official WeGeFT code's own fine-tune (`train.json`).
//! Needs the model: `bash scripts/fetch-model.sh` (or `$WEGEFT_MODEL`).

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;
use wegeft::adapter;
use wegeft::cpu::Cpu;
use wegeft::model::llama::{argmax, Dims, HostAdapter, HostWeights, Llama, MODULES};
use wegeft::model::{LlamaWeights, Tokenizer};
use wegeft::train::data::{self, Batcher, Example};
use wegeft::train::optim::AdamWConfig;
use wegeft::train::trainer::Trainer;

fn model_path() -> PathBuf {
    let p = match std::env::var_os("WEGEFT_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    assert!(p.is_file(), "model {} not found: run `bash scripts/fetch-model.sh` (or set WEGEFT_MODEL)", p.display());
    p
}

struct Fixture {
    model: Llama<Cpu>,
    tok: Tokenizer,
    weights: LlamaWeights,
}

/// The model, loaded once for all the tests of this file.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let path = model_path();
        let weights = LlamaWeights::load(&path).unwrap();
        let model = Llama::new(&Cpu, &HostWeights::from_llama(weights.clone()).unwrap()).unwrap();
        let tok = Tokenizer::from_gguf(&path).unwrap();
        Fixture { model, tok, weights }
    })
}

fn json(name: &str) -> Value {
    let p = common::fixtures_dir().join("smollm2").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

/// `[[id, logit], ...]` against our logits row: same ids in the same order, logits within `tol`.
fn check_top(what: &str, row: &[f32], want: &Value, tol: f32) {
    let want: Vec<(usize, f32)> = want
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_f64().unwrap() as f32))
        .collect();
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    for (k, (id, logit)) in want.iter().enumerate() {
        let err = (row[*id] - logit).abs();
        assert!(err <= tol, "{what}: logit of token {id} is {}, want {logit} (error {err:e} > {tol:e})", row[*id]);
        // Ranks may swap only between near-ties.
        if idx[k] != *id {
            let gap = (row[idx[k]] - row[*id]).abs();
            assert!(gap <= 2.0 * tol, "{what}: rank {k} is token {} ({}), want {id} ({logit})", idx[k], row[idx[k]]);
        }
    }
}

fn check_loss(what: &str, got: f32, want: f64, rel: f64) {
    let err = (got as f64 - want).abs() / want.abs();
    assert!(err <= rel, "{what}: loss {got}, want {want} (relative error {err:e} > {rel:e})");
}

#[test]
fn prompt_reference_matches_transformers() {
    let f = fixture();
    let r = json("prompt_reference.json");
    let ids = f.tok.encode(r["text"].as_str().unwrap(), false).unwrap();
    assert_eq!(ids, ids_of(&r["ids"]), "tokenization of the prompt");
    let (logits, loss) = f.model.score(&Cpu, None, &ids).unwrap();
    let v = f.model.dims.vocab;
    let am: Vec<usize> = logits.chunks(v).map(argmax).collect();
    assert_eq!(am, usizes(&r["argmax_per_pos"]), "argmax per position");
    check_top("top10 last", &logits[(ids.len() - 1) * v..], &r["top10_last"], 1e-3);
    check_loss("prompt loss", loss.unwrap(), r["ce_loss_labels_eq_ids"].as_f64().unwrap(), 1e-4);
    // Greedy continuation through the KV cache.
    let greedy = f.model.generate(&Cpu, None, &ids, 10, &[]).unwrap();
    assert_eq!(greedy, ids_of(&r["greedy_10"]), "greedy decoding of 10 tokens");
    // The chat template.
    let chat = f.tok.chat_prompt("What is the capital of France?").unwrap();
    assert_eq!(chat, ids_of(&r["chat_ids_user_What_is_the_capital_of_France"]), "chat prompt ids");
}

#[test]
fn logits_match_transformers() {
    let f = fixture();
    let v = f.model.dims.vocab;
    for (i, case) in json("logits.json").as_array().unwrap().iter().enumerate() {
        let ids = ids_of(&case["ids"]);
        let (logits, loss) = f.model.score(&Cpu, None, &ids).unwrap();
        let am: Vec<usize> = logits.chunks(v).map(argmax).collect();
        assert_eq!(am, usizes(&case["argmax"]), "case {i}: argmax per position");
        check_loss(&format!("case {i}"), loss.unwrap(), case["loss"].as_f64().unwrap(), 1e-4);
        let last = &logits[(ids.len() - 1) * v..];
        check_top(&format!("case {i} top5"), last, &case["top5_last"], 1e-3);
        let want: Vec<f64> = case["logits_last"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(want.len(), v);
        let (worst, at) = last.iter().zip(&want).enumerate().fold((0.0f64, 0), |(w, a), (j, (g, t))| {
            let e = (*g as f64 - t).abs();
            let e = if e.is_nan() { f64::INFINITY } else { e };
            if e > w {
                (e, j)
            } else {
                (w, a)
            }
        });
        assert!(
            worst <= 1e-3,
            "case {i}: last-position logit {at} off by {worst:e} (got {}, want {})",
            last[at],
            want[at]
        );
    }
}

/// The official code's fine-tune: losses before each update, final adapter, probe logits.
#[test]
fn finetune_reproduces_the_official_run() {
    let f = fixture();
    let t = json("train.json");
    let dims = f.model.dims.clone();
    let dir = common::fixtures_dir().join("smollm2");
    let init = adapter::io::load_gift(&dir.join("init_adapter.safetensors"), &dims.adapter_dims().unwrap()).unwrap();
    assert_eq!(init.rank(), t["rank"].as_u64().unwrap() as usize);
    let targets: Vec<String> = init.config.targets.iter().map(|m| m.name().to_string()).collect();
    let mut want_targets: Vec<String> =
        t["targets"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    let mut got_targets = targets.clone();
    want_targets.sort();
    got_targets.sort();
    assert_eq!(got_targets, want_targets);
    let host = HostAdapter::from_adapter(&init).unwrap();
    let opt = AdamWConfig { lr: t["lr"].as_f64().unwrap(), beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let seq = t["seq"].as_u64().unwrap() as usize;
    let batch = t["batch"].as_u64().unwrap() as usize;
    let examples: Vec<Example> = data::read_jsonl(&dir.join("train.jsonl"), None, seq).unwrap();
    let run = || {
        let mut tr = Trainer::new(&Cpu, &f.model, &host, opt).unwrap();
        let mut b = Batcher::new(examples.len(), batch, None).unwrap();
        let mut losses = Vec::new();
        for _ in 0..t["steps"].as_u64().unwrap() {
            let idx = b.next_indices();
            let refs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
            losses.push(tr.step(&data::make_batch(&refs, 0).unwrap()).unwrap());
        }
        (losses, tr.host_adapter().unwrap(), tr)
    };
    let (losses, fin, tr) = run();
    // This run is chaotic: even in exact arithmetic it amplifies a perturbation ~50x per step
    // from step 2 on, and f32 rounding seeds it (docs/fixture-precision.md: the fixture re-run
    // in PyTorch). The float64 trajectory itself is 1.8e-5 / 3.1e-3 (relative) from the fixture
    // at losses 4 / 5 and 0.03-0.11 from its final adapter; PyTorch f32 with its non-AVX512
    // kernels is 9.7e-3 / 2.2e-2 and up to 0.19. So: losses 0..=3 within 1e-4 (we get <= 1e-5),
    // losses 4, 5 within 3e-2 (we get 6.7e-4, 1.3e-3), the final adapter within 0.25 of its
    // update (relative Frobenius distance per module; we get 0.06..0.19), the probe logits
    // within 1.0.
    let want: Vec<f64> = t["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(losses.len(), want.len());
    for (i, (g, w)) in losses.iter().zip(&want).enumerate() {
        check_loss(&format!("step {i}"), *g, *w, if i < 4 { 1e-4 } else { 3e-2 });
    }
    // The final adapter, pair by pair: the distance between our update and theirs.
    let want_final =
        adapter::io::load_gift(&dir.join("final_adapter.safetensors"), &dims.adapter_dims().unwrap()).unwrap();
    let want_final = HostAdapter::from_adapter(&want_final).unwrap();
    assert_eq!(fin.pairs.len(), want_final.pairs.len());
    for (((m, phi, psi), (wm, wphi, wpsi)), (im, iphi, ipsi)) in
        fin.pairs.iter().zip(&want_final.pairs).zip(&host.pairs)
    {
        assert_eq!((m, m), (wm, im));
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for ((g, w), i) in phi.iter().chain(psi).zip(wphi.iter().chain(wpsi)).zip(iphi.iter().chain(ipsi)) {
            num += (*g as f64 - *w as f64).powi(2);
            den += (*w as f64 - *i as f64).powi(2);
        }
        let dist = (num / den).sqrt();
        assert!(
            den > 0.0 && dist <= 0.25,
            "{}: our update is {dist:.3} (relative) away from the official one",
            MODULES[*m]
        );
    }
    // The adapted model's logits after training.
    let probe = ids_of(&t["probe_ids"]);
    let (logits, _) = f.model.score(&Cpu, Some(tr.adapter()), &probe).unwrap();
    let v = dims.vocab;
    check_top("probe top5 after training", &logits[(probe.len() - 1) * v..], &t["probe_logits_last_top5"], 1.0);
    // Determinism: a second run is bitwise equal.
    let (losses2, fin2, _) = run();
    assert_eq!(
        losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        losses2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert!(fin == fin2, "a second run gives a different adapter");
}

/// Merged weights give the adapter model's logits.
#[test]
fn merged_weights_equal_the_adapter_model() {
    let f = fixture();
    let dims: Dims = f.model.dims.clone();
    let dir = common::fixtures_dir().join("smollm2");
    let ad = adapter::io::load_gift(&dir.join("final_adapter.safetensors"), &dims.adapter_dims().unwrap()).unwrap();
    let host = HostAdapter::from_adapter(&ad).unwrap();
    let mut w = f.weights.clone();
    host.merge_into(&mut w).unwrap();
    let merged = Llama::new(&Cpu, &HostWeights::from_llama(w).unwrap()).unwrap();
    let ids: Vec<u32> = vec![504, 3575, 282, 4649, 314, 7042, 30];
    let a = host.upload(&Cpu, &dims).unwrap();
    let (want, _) = f.model.score(&Cpu, Some(&a), &ids).unwrap();
    let (got, _) = merged.score(&Cpu, None, &ids).unwrap();
    let (base, _) = f.model.score(&Cpu, None, &ids).unwrap();
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    common::assert_close("merged vs adapter logits", &to64(&got), &to64(&want), 1e-4);
    // The adapter does change the logits (so the comparison above means something).
    let moved = base.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(moved > 1e-2, "the trained adapter barely changes the logits ({moved:e})");
}
