//! SentencePiece BPE vocabularies in GGUF (`tokenizer.ggml.model = "llama"`: Llama 1/2,
//! TinyLlama, Mistral 7B v0.1, CodeLlama) against the `sentencepiece` library itself.
//! tests/data/spm/ (scripts/spm_reference.py): a vocabulary trained by `sentencepiece` in
//! Llama 2's configuration, written to GGUF by gguf-py's `SentencePieceVocab` (as llama.cpp's
//! converter does), and `sentencepiece`'s ids for a set of texts.

mod common;

use std::path::PathBuf;

use wegeft::model::weights::gguf::{GgufFile, GgufValue, GgufWriter};
use wegeft::model::Tokenizer;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/spm").join(name)
}

#[test]
fn sentencepiece_vocabulary_from_gguf_encodes_and_decodes_as_sentencepiece() {
    let tok = Tokenizer::from_gguf(data("tokenizer.gguf")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(data("cases.json")).unwrap()).unwrap();
    assert_eq!(tok.vocab_size() as u64, r["vocab_size"].as_u64().unwrap());
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let mut byte_fallbacks = 0;
    for c in r["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.decode(&got, false).unwrap(), c["decoded"].as_str().unwrap(), "{text:?}");
        byte_fallbacks += got.iter().filter(|&&i| tok.id_to_token(i).is_some_and(|t| t.starts_with("<0x"))).count();
        // BOS first on request (add_bos_token), never EOS.
        let with = tok.encode(text, true).unwrap();
        assert_eq!((with[0], &with[1..]), (1, &want[..]));
    }
    assert!(byte_fallbacks > 0, "no case reaches the byte fallback");
    // Special tokens written in the text are matched whole.
    let s = tok.encode("<s>x</s>", false).unwrap();
    assert_eq!((s[0], s[s.len() - 1]), (1, 2));
    assert_eq!(tok.eos_id(), 2);
}

#[test]
fn sentencepiece_metadata_errors_name_the_key() {
    let g = GgufFile::open(data("tokenizer.gguf")).unwrap();
    let rebuilt = |drop: &str, replace: Option<(&str, GgufValue)>| {
        let mut w = GgufWriter::new();
        for (k, v) in g.metadata() {
            if k == drop {
                if let Some((k2, v2)) = &replace {
                    w.kv(*k2, v2.clone());
                }
            } else {
                w.kv(k.clone(), v.clone());
            }
        }
        let g = GgufFile::from_bytes("spm.gguf", w.to_bytes().unwrap()).unwrap();
        Tokenizer::from_gguf_file(&g).unwrap_err().to_string()
    };
    let e = rebuilt("tokenizer.ggml.scores", None);
    assert!(e.contains("tokenizer.ggml.scores") && e.contains("spm.gguf"), "{e}");
    let short = GgufValue::Array(wegeft::model::weights::gguf::GgufValueType::F32, vec![GgufValue::F32(0.0); 3]);
    let e = rebuilt("tokenizer.ggml.scores", Some(("tokenizer.ggml.scores", short)));
    assert!(e.contains("3 entries"), "{e}");
    let e = rebuilt("tokenizer.ggml.model", Some(("tokenizer.ggml.model", GgufValue::String("bert".into()))));
    assert!(e.contains("\"bert\" is not supported"), "{e}");
}

/// A Llama 2 chat-style template (system block, roles checked, `.strip()`), as
/// tests/data/chat/cases.json checks it against transformers.
fn llama2_style_template() -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat/cases.json");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    r["templates"]["llama2_style"].as_str().unwrap().to_string()
}

/// A Llama 2-shaped GGUF: the tiny reference model of tests/data/llama3/ with plain RoPE (no
/// `rope_freqs`), the SentencePiece vocabulary above and an embedding of its size.
fn tiny_llama2_gguf(path: &std::path::Path) {
    let model = GgufFile::open(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/llama3/tiny.gguf")).unwrap();
    let tok = GgufFile::open(data("tokenizer.gguf")).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in model.metadata() {
        if k != "llama.vocab_size" && !k.starts_with("tokenizer.") {
            w.kv(k.clone(), v.clone());
        }
    }
    let vocab = tok.get_str_array("tokenizer.ggml.tokens").unwrap().len();
    for (k, v) in tok.metadata() {
        if k.starts_with("tokenizer.") {
            w.kv(k.clone(), v.clone());
        }
    }
    w.kv("tokenizer.chat_template", GgufValue::String(llama2_style_template()));
    w.kv("llama.vocab_size", GgufValue::U32(vocab as u32));
    for t in model.tensors() {
        match t.name.as_str() {
            "rope_freqs.weight" => {}
            "token_embd.weight" => {
                let h = t.ne[0] as usize;
                let mut rng = wegeft::rng::Rng::new(5);
                let e: Vec<f32> = (0..vocab * h).map(|_| rng.uniform_f32(-0.05, 0.05)).collect();
                w.tensor_f32(&t.name, &[vocab, h], &e).unwrap();
            }
            _ => {
                w.tensor(&t.name, &t.ne, t.ty, model.tensor_bytes(&t.name).unwrap().to_vec()).unwrap();
            }
        }
    }
    w.write(path).unwrap();
}

#[test]
fn cli_finetunes_and_scores_a_sentencepiece_llama() {
    let dir = common::fresh_dir("spm-cli");
    let m = dir.join("tiny-llama2.gguf");
    tiny_llama2_gguf(&m);
    let tok = Tokenizer::from_gguf(&m).unwrap();
    // The chat prompt: BOS, then "[INST] ... [/INST]" tokenized as SentencePiece does.
    let prompt = tok.chat_prompt("What is 345 + 678?").unwrap();
    assert_eq!(prompt[0], 1);
    assert_eq!(&prompt[1..], &tok.encode("[INST] What is 345 + 678? [/INST]", false).unwrap()[..]);
    assert_eq!(tok.end_of_turn_id(), 2, "no end-of-turn token: answers end with </s>");
    let run = common::wegeft_ok;
    let (ms, out, log) = (m.to_str().unwrap(), dir.join("adapter"), dir.join("log.jsonl"));
    run(&[
        "finetune", "--model", ms, "--task", "arithmetic", "--rank", "4", "--steps", "2", "--batch", "2", "--eval-n", "1",
        "--out", out.to_str().unwrap(), "--log-json", log.to_str().unwrap(),
    ]);
    let losses: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    // Near ln(vocab) for a random model.
    let ln_v = (tok.vocab_size() as f64).ln();
    assert!(losses.len() == 2 && losses.iter().all(|l| (l - ln_v).abs() < 2.0), "{losses:?} vs ln V = {ln_v}");
    let sc: serde_json::Value = serde_json::from_str(&run(&["score", "--model", ms, "--text", "Hello world"])).unwrap();
    let ids: Vec<u64> = sc["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    let want: Vec<u64> =
        std::iter::once(1).chain(tok.encode("Hello world", false).unwrap().into_iter().map(u64::from)).collect();
    assert_eq!(ids, want);
    std::fs::remove_dir_all(&dir).unwrap();
}
