//! IBM Granite (3.x dense): Llama's block with four scalars, which the model folds into its
//! frozen weights (`HostWeights::from_llama`). Checked against implementations independent of
//! this crate (tests/data/granite/, written by scripts/granite_reference.py with transformers
//! and gguf-py): a tiny `GraniteForCausalLM` whose scalars each matter (embedding 12, residual
//! 0.22, attention 0.09 in place of 1/sqrt(16), logits divided by 6) as an HF checkpoint and as
//! the GGUF llama.cpp's converter writes (q/k permuted, `granite.*` scales); a float64 PyTorch
//! fine-tune in the official formulation (which checks that folding leaves WeGeFT's updates
//! exact); and a merge, written as an HF Granite checkpoint, that scores as the adapter model.

mod common;
#[path = "common/reference.rs"]
mod reference;

use std::path::PathBuf;

use reference::LOGIT_TOL;
use wegeft::cpu::Cpu;
use wegeft::model::config::Arch;
use wegeft::model::llama::{Dims, HostAdapter, HostWeights, Llama};
use wegeft::model::{LlamaWeights, Multipliers};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/granite").join(name)
}

fn cpu_model(w: LlamaWeights) -> Llama<Cpu> {
    Llama::from_host(&Cpu, HostWeights::from_llama(w).unwrap()).unwrap()
}

#[test]
fn granite_checkpoints_match_transformers() {
    let hf = LlamaWeights::load(data("hf")).unwrap();
    let want = Multipliers { embedding: 12.0, residual: 0.22, attention: 0.09, logits_scaling: 6.0 };
    assert_eq!((hf.config.arch, hf.config.multipliers), (Arch::Granite, Some(want)));
    reference::compare_with(&cpu_model(hf.clone()), &data("logits.json"), true);
    let gguf = LlamaWeights::load(data("tiny.gguf")).unwrap();
    assert_eq!((gguf.config.arch, gguf.config.multipliers), (Arch::Granite, Some(want)));
    reference::compare_with(&cpu_model(gguf), &data("logits.json"), true);
    // Each scalar matters: with any one of them left out (attention: Llama's 1/sqrt(head_dim))
    // the logits are far off, so the checks above can fail.
    let variants = [
        ("embedding", Multipliers { embedding: 1.0, ..want }),
        ("residual", Multipliers { residual: 1.0, ..want }),
        ("attention", Multipliers { attention: 0.25, ..want }),
        ("logits_scaling", Multipliers { logits_scaling: 1.0, ..want }),
    ];
    for (name, m) in variants {
        let mut w = hf.clone();
        w.config.multipliers = Some(m);
        let off = reference::compare_with(&cpu_model(w), &data("logits.json"), false);
        assert!(off > 100.0 * LOGIT_TOL, "without its {name} scalar the model lands within {off:e}");
    }
    // The HF save keeps the file's (unfolded) weights and says Granite with its scalars.
    let out = common::fresh_dir("granite-out");
    hf.save_safetensors_hf(&out).unwrap();
    let back = LlamaWeights::load(&out).unwrap();
    assert_eq!(back.config, hf.config);
    reference::compare_with(&cpu_model(back), &data("logits.json"), true);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn granite_finetune_matches_pytorch() {
    reference::finetune_matches_pytorch(&cpu_model(LlamaWeights::load(data("hf")).unwrap()), &data(""));
}

/// The reference fine-tune's final adapter merged into the file's weights, saved as an HF
/// Granite checkpoint and read back, scores as the folded model with the adapter does.
#[test]
fn merged_granite_equals_the_adapter_model() {
    let w = LlamaWeights::load(data("hf")).unwrap();
    let dims = Dims::from_config(&w.config);
    let ad = wegeft::adapter::io::load_gift(&data("train_final.safetensors"), &dims.adapter_dims().unwrap()).unwrap();
    let host = HostAdapter::from_adapter(&ad).unwrap();
    let model = cpu_model(w.clone());
    let ids: Vec<u32> = (0..40).map(|t| (t * 37 + 11) % 256).collect();
    let (want, _) = model.score(&Cpu, Some(&host.upload(&Cpu, &dims).unwrap()), &ids).unwrap();
    let (base, _) = model.score(&Cpu, None, &ids).unwrap();
    let mut merged = w;
    host.merge_into(&mut merged).unwrap();
    let out = common::fresh_dir("granite-merged");
    merged.save_safetensors_hf(&out).unwrap();
    let cfg: serde_json::Value = reference::read_json(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0].as_str(), Some("GraniteForCausalLM"));
    let (got, _) = cpu_model(LlamaWeights::load(&out).unwrap()).score(&Cpu, None, &ids).unwrap();
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    common::assert_close("merged vs adapter logits", &to64(&got), &to64(&want), 1e-4);
    let moved = base.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(moved > 1e-2, "the adapter barely changes the logits ({moved:e})");
    std::fs::remove_dir_all(&out).unwrap();
}
