//! SmolLM3 models, checked against implementations independent of this crate
//! (tests/data/smollm3/, written by scripts/smollm3_reference.py with transformers and gguf-py):
//! * a tiny model of SmolLM3's architecture (Llama's block, no RoPE in every 4th layer), as an
//!   HF checkpoint and as the GGUF llama.cpp's converter writes (`smollm3`, q/k permuted, no key
//!   for the NoPE layers: llama.cpp skips RoPE in every 4th), against transformers' logits;
//! * a WeGeFT fine-tune of it against PyTorch autograd and `torch.optim.AdamW` in float64;
//! * SmolLM3-3B's chat template (as llama.cpp vendors it) against `apply_chat_template`;
//! * the CLI end to end on a SmolLM3-shaped GGUF with Llama 3's tokenizer (SmolLM3's).

mod common;
#[path = "common/reference.rs"]
mod reference;

use std::path::PathBuf;

use reference::LOGIT_TOL;

use wegeft::cpu::Cpu;
use wegeft::model::config::Arch;
use wegeft::model::llama::{HostWeights, Llama};
use wegeft::model::{ChatMessage, ChatTemplate, LlamaWeights};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm3").join(name)
}

fn cpu_model(w: LlamaWeights) -> Llama<Cpu> {
    Llama::from_host(&Cpu, HostWeights::from_llama(w).unwrap()).unwrap()
}

#[test]
fn smollm3_with_nope_layers_matches_transformers_as_hf_and_gguf() {
    let logits = data("logits.json");
    let hf = LlamaWeights::load(data("hf")).unwrap();
    assert_eq!((hf.config.arch, &hf.config.nope_layers[..]), (Arch::SmolLM3, &[3, 7][..]));
    let flags: Vec<u64> = reference::read_json(&logits)["no_rope_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(flags, [1, 1, 1, 0, 1, 1, 1, 0], "the reference's own layers");
    reference::compare_with(&cpu_model(hf.clone()), &logits, true);
    // The GGUF: q/k un-permuted, the NoPE layers llama.cpp assumes; the same model.
    let gguf = LlamaWeights::load(data("tiny.gguf")).unwrap();
    assert_eq!(gguf.config.nope_layers, hf.config.nope_layers);
    assert_eq!(gguf.layers, hf.layers);
    reference::compare_with(&cpu_model(gguf.clone()), &logits, true);
    // Written back as HF (what `wegeft merge` writes), it reads as SmolLM3 again.
    let dir = common::fresh_dir("smollm3");
    gguf.save_safetensors_hf(&dir).unwrap();
    let cfg = reference::read_json(&dir.join("config.json"));
    assert_eq!(cfg["model_type"], "smollm3");
    let again = LlamaWeights::load(&dir).unwrap();
    assert_eq!(again.config.nope_layers, [3, 7]);
    reference::compare_with(&cpu_model(again), &logits, true);
    std::fs::remove_dir_all(&dir).unwrap();
    // The NoPE layers matter (so the checks above can fail): with RoPE everywhere, far off.
    let mut everywhere = HostWeights::from_llama(hf).unwrap();
    everywhere.dims.nope_layers.clear();
    let off = reference::compare_with(&Llama::from_host(&Cpu, everywhere).unwrap(), &logits, false);
    assert!(off > 100.0 * LOGIT_TOL, "with RoPE in every layer the logits land within {off:e}");
}

#[test]
fn finetune_of_the_smollm3_model_matches_pytorch_in_float64() {
    reference::finetune_matches_pytorch(&cpu_model(LlamaWeights::load(data("hf")).unwrap()), &data(""));
}

#[test]
fn smollm3_chat_template_renders_as_apply_chat_template() {
    let r = reference::read_json(&data("chat/cases.json"));
    let src = std::fs::read_to_string(data("chat/smollm3.jinja")).unwrap();
    let mut n = 0;
    for c in r["cases"].as_array().unwrap() {
        let msgs: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let kwargs = c["kwargs"].as_object().unwrap().clone();
        let t = ChatTemplate::from_jinja(&src).unwrap().with_kwargs(kwargs.clone()).unwrap();
        assert_eq!(t.render(&msgs, gen).unwrap(), c["text"].as_str().unwrap(), "{} messages, {gen}, {kwargs:?}", msgs.len());
        n += 1;
    }
    assert_eq!(n, 7);
}

#[test]
fn cli_finetunes_scores_generates_and_merges_a_smollm3_gguf() {
    let dir = common::fresh_dir("smollm3-cli");
    let m = dir.join("tiny-smollm3.gguf");
    let tokenizer = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/llama3/tokenizer.json");
    assert!(tokenizer.is_file(), "{} not found: run `bash scripts/fetch-model.sh`", tokenizer.display());
    let template = std::fs::read_to_string(data("chat/smollm3.jinja")).unwrap();
    // SmolLM3 uses Llama 3's vocabulary without a BOS. (Its own tokenizer renames two reserved
    // tokens to ChatML's <|im_start|> and <|im_end|>; Meta's, used here, has none, so the
    // template's markers are plain text and turns end at <|eot_id|>.)
    let vocab = common::GgufVocab { pre: "llama-bpe", bos: "<|begin_of_text|>", add_bos: false, eos: "<|eot_id|>", template: &template };
    reference::instruct_gguf(&data("tiny.gguf"), &tokenizer, &vocab, &m);
    // Its template's system block is long: the default --seq of 64 cuts the answers off, which
    // is an error saying how long the examples are.
    let out = common::run_wegeft(&["finetune", "--model", m.to_str().unwrap(), "--task", "arithmetic", "--steps", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--seq") && err.contains("cut off the answer"), "{err}");
    // A random model over 128256 tokens starts near ln(128256) = 11.76.
    let run = reference::cli_round_trip(&m, &dir, "What is 345 + 678?", 8.0..16.0, &["--seq", "384"]);
    assert_eq!(reference::ids_of(&run.score["ids"]), [3923, 374, 220, 12901, 489, 220, 17458, 30]);
    assert_eq!(reference::read_json(&run.merged.join("config.json"))["model_type"], "smollm3");
    std::fs::remove_dir_all(&dir).unwrap();
}
