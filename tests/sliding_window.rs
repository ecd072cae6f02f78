//! Sliding-window attention against transformers (data from scripts/window_reference.py in
//! tests/data/window/): the tiny reference weights of tests/data/llama3 and tests/data/qwen
//! under configs whose window is shorter than most of the reference sequences —
//! `MistralForCausalLM` with `sliding_window` 7 (every layer), Qwen2 with `use_sliding_window`
//! and `max_window_layers` 1 (layer 1 only, window 6), Qwen3 with an explicit `layer_types`
//! (layer 0 only, window 5). Logits within [`reference::LOGIT_TOL`], the window shown to
//! matter, a float64 PyTorch fine-tune followed, and the HF checkpoint written back read with
//! the same windows.

mod common;
#[path = "common/reference.rs"]
mod reference;

use std::path::{Path, PathBuf};

use wegeft::cpu::Cpu;
use wegeft::model::llama::{HostWeights, Llama};
use wegeft::model::LlamaWeights;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// The reference weights of `family` under tests/data/window/`family`/config.json, in a fresh
/// directory.
fn checkpoint(family: &str) -> PathBuf {
    let weights = match family {
        "mistral" => root().join("llama3/hf/model.safetensors"),
        f => root().join(format!("qwen/{f}/hf/model.safetensors")),
    };
    let dir = common::fresh_dir(&format!("window-{family}"));
    std::fs::copy(weights, dir.join("model.safetensors")).unwrap();
    std::fs::copy(root().join(format!("window/{family}/config.json")), dir.join("config.json")).unwrap();
    dir
}

fn cpu_model(w: LlamaWeights) -> Llama<Cpu> {
    Llama::from_host(&Cpu, HostWeights::from_llama(w).unwrap()).unwrap()
}

/// Logits, the window's effect, the fine-tune and the round trip through an HF save for one
/// family, whose layers have the windows `windows`.
fn check(family: &str, windows: &[Option<usize>]) {
    let dir = checkpoint(family);
    let data = root().join("window").join(family);
    let w = LlamaWeights::load(&dir).unwrap();
    let got: Vec<Option<usize>> = (0..w.config.num_hidden_layers).map(|l| w.config.window_at(l)).collect();
    assert_eq!(got, windows, "{family}: the windows per layer");
    let model = cpu_model(w.clone());
    reference::compare_with(&model, &data.join("logits.json"), true);
    // Without the window the logits are far off, so the check above can fail.
    let mut plain = w.clone();
    plain.config.sliding_window = None;
    plain.config.full_attention_layers.clear();
    let off = reference::compare_with(&cpu_model(plain), &data.join("logits.json"), false);
    assert!(off > 100.0 * reference::LOGIT_TOL, "{family}: full attention lands within {off:e}");
    reference::finetune_matches_pytorch(&model, &data);
    round_trip(family, &dir, &data, windows);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The HF checkpoint this crate writes says the same windows, and scores the same.
fn round_trip(family: &str, dir: &Path, data: &Path, windows: &[Option<usize>]) {
    let out = common::fresh_dir(&format!("window-{family}-out"));
    LlamaWeights::load(dir).unwrap().save_safetensors_hf(&out).unwrap();
    let back = LlamaWeights::load(&out).unwrap();
    let got: Vec<Option<usize>> = (0..back.config.num_hidden_layers).map(|l| back.config.window_at(l)).collect();
    assert_eq!(got, windows, "{family}: the windows after an HF save");
    reference::compare_with(&cpu_model(back), &data.join("logits.json"), true);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn mistral_with_a_sliding_window_matches_transformers() {
    check("mistral", &[Some(7), Some(7)]);
}

#[test]
fn qwen2_with_max_window_layers_matches_transformers() {
    check("qwen2", &[None, Some(6)]);
}

#[test]
fn qwen3_with_layer_types_matches_transformers() {
    check("qwen3", &[Some(5), None]);
}

/// Greedy decoding with the KV cache past the window gives what full forwards give.
#[test]
fn decoding_past_the_window_matches_full_forwards() {
    let dir = checkpoint("qwen3");
    let model = cpu_model(LlamaWeights::load(&dir).unwrap());
    let prompt: Vec<u32> = vec![5, 77, 140, 3, 9, 201];
    let new = model.generate(&Cpu, None, &prompt, 12, &[]).unwrap();
    let mut seq = prompt.clone();
    for _ in 0..12 {
        let (lg, _) = model.score(&Cpu, None, &seq).unwrap();
        let last = &lg[(seq.len() - 1) * model.dims.vocab..];
        seq.push(last.iter().enumerate().fold(0, |b, (i, v)| if *v > last[b] { i } else { b }) as u32);
    }
    assert_eq!(new, seq[prompt.len()..].to_vec());
    std::fs::remove_dir_all(&dir).unwrap();
}
