//! Tokenizer construction from GGUF metadata, structure-aware: the `tokenizer.ggml.*` keys
//! are generated (vocabulary, merges, token types, special ids, pre-tokenizer, chat
//! template), written with `GgufWriter`, read back, and the tokenizer is built and run on a
//! generated text, and the chat template rendered (a prompt, and a training conversation with
//! its assistant turn found). Must return `Err`, never panic.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wegeft::model::weights::gguf::{GgufFile, GgufValue, GgufValueType, GgufWriter};
use wegeft::model::Tokenizer;

#[derive(Arbitrary, Debug)]
struct Input {
    model: u8,
    pre: u8,
    tokens: Vec<String>,
    /// Merges as pairs of token indices (mostly valid), plus raw strings.
    merges: Vec<(u8, u8)>,
    raw_merges: Vec<String>,
    types: Option<Vec<i8>>,
    /// SentencePiece scores (`tokenizer.ggml.model = "llama"`).
    scores: Option<Vec<f32>>,
    add_space_prefix: Option<bool>,
    eos: Option<u32>,
    bos: Option<u32>,
    pad: Option<u32>,
    add_bos: Option<bool>,
    template: Option<String>,
    text: String,
    decode: Vec<u32>,
}

fn strs(v: &[String]) -> GgufValue {
    GgufValue::Array(
        GgufValueType::String,
        v.iter().map(|s| GgufValue::String(s.clone())).collect(),
    )
}

fuzz_target!(|inp: Input| {
    let mut w = GgufWriter::new();
    let model = ["gpt2", "llama", ""][inp.model as usize % 3];
    w.kv("tokenizer.ggml.model", GgufValue::String(model.into()));
    match inp.pre % 7 {
        0 => {}
        1 => {
            w.kv("tokenizer.ggml.pre", GgufValue::String("smollm".into()));
        }
        2 => {
            w.kv("tokenizer.ggml.pre", GgufValue::String("gpt2".into()));
        }
        3 => {
            w.kv("tokenizer.ggml.pre", GgufValue::String("llama-bpe".into()));
        }
        4 => {
            w.kv("tokenizer.ggml.pre", GgufValue::String("qwen2".into()));
        }
        5 => {
            w.kv("tokenizer.ggml.pre", GgufValue::String("tekken".into()));
        }
        _ => {
            w.kv("tokenizer.ggml.pre", GgufValue::U32(7));
        }
    }
    w.kv("tokenizer.ggml.tokens", strs(&inp.tokens));
    let n = inp.tokens.len().max(1);
    let mut merges: Vec<String> = inp
        .merges
        .iter()
        .filter_map(|&(a, b)| {
            Some(format!(
                "{} {}",
                inp.tokens.get(a as usize % n)?,
                inp.tokens.get(b as usize % n)?
            ))
        })
        .collect();
    merges.extend(inp.raw_merges.iter().cloned());
    w.kv("tokenizer.ggml.merges", strs(&merges));
    if let Some(t) = &inp.types {
        w.kv(
            "tokenizer.ggml.token_type",
            GgufValue::Array(
                GgufValueType::I32,
                t.iter().map(|&x| GgufValue::I32(x as i32 % 6)).collect(),
            ),
        );
    }
    for (k, v) in [
        ("tokenizer.ggml.eos_token_id", inp.eos),
        ("tokenizer.ggml.bos_token_id", inp.bos),
        ("tokenizer.ggml.padding_token_id", inp.pad),
    ] {
        if let Some(v) = v {
            w.kv(k, GgufValue::U32(v % (n as u32 + 2)));
        }
    }
    if let Some(sc) = &inp.scores {
        w.kv(
            "tokenizer.ggml.scores",
            GgufValue::Array(GgufValueType::F32, sc.iter().map(|&x| GgufValue::F32(x)).collect()),
        );
    }
    if let Some(b) = inp.add_space_prefix {
        w.kv("tokenizer.ggml.add_space_prefix", GgufValue::Bool(b));
    }
    if let Some(b) = inp.add_bos {
        w.kv("tokenizer.ggml.add_bos_token", GgufValue::Bool(b));
    }
    // The template is a Jinja program now run by minijinja: a generated one, or a real one
    // (then rendered with the generated text).
    if let Some(t) = &inp.template {
        let t = match t.len() {
            1 => wegeft::model::chat::LLAMA3_CHAT_TEMPLATE.to_string(),
            2 => wegeft::model::chat::SMOLLM2_CHAT_TEMPLATE.to_string(),
            3 => include_str!("../../tests/data/qwen/chat/qwen3.jinja").to_string(),
            _ => t.clone(),
        };
        w.kv("tokenizer.chat_template", GgufValue::String(t));
    }
    let Ok(bytes) = w.to_bytes() else { return };
    let g = GgufFile::from_bytes("fuzz.gguf", bytes).expect("a file written by GgufWriter must parse");
    let Ok(tok) = Tokenizer::from_gguf_file(&g) else { return };
    if let Ok(ids) = tok.encode(&inp.text, true) {
        let _ = tok.decode(&ids, false);
    }
    let _ = tok.decode(&inp.decode, true);
    let _ = tok.chat_prompt(&inp.text);
    // A training conversation: several renderings compared as prefixes, offsets mapped to turns
    // (two exchanges, so that a turn rendered otherwise later is looked up in the whole).
    let reply = inp.text.chars().rev().collect::<String>();
    let turns = [
        wegeft::model::ChatMessage::new("user", inp.text.clone()),
        wegeft::model::ChatMessage::new("assistant", reply.clone()),
        wegeft::model::ChatMessage::new("user", reply),
        wegeft::model::ChatMessage::new("assistant", inp.text.clone()),
    ];
    for n in [2, 4] {
        if let Ok((ids, target)) = tok.chat_targets(&turns[..n]) {
            assert_eq!(ids.len(), target.len());
        }
    }
});
