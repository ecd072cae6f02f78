//! SentencePiece BPE vocabularies in GGUF (`tokenizer.ggml.model = "llama"`: Llama 1/2,
//! TinyLlama, Mistral 7B v0.1, CodeLlama) against the `sentencepiece` library itself.
//! tests/data/spm/ (scripts/spm_reference.py): a vocabulary trained by `sentencepiece` in
//! Llama 2's configuration, written to GGUF by gguf-py's `SentencePieceVocab` (as llama.cpp's
//! converter does), and `sentencepiece`'s ids for a set of texts.

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
