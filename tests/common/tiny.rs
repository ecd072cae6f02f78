//! A tiny Llama written as a GGUF file with a byte-level BPE tokenizer, for tests of the CLI
//! that need a real model file but not the real model: vocabulary 97 (`<|im_end|>`, the 94
//! printable ASCII characters, `Ġ` for space, `Ċ` for newline), hidden 16, MLP 32, 2 layers,
//! 2 heads of 8, 1 KV head, context 32. Deterministic random weights.
#![allow(dead_code)]

use std::path::Path;

use wegeft::model::weights::gguf::{GgufValue, GgufValueType, GgufWriter};

pub const VOCAB: usize = 97;
pub const HIDDEN: usize = 16;
pub const FFN: usize = 32;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 2;
pub const KV_HEADS: usize = 1;
pub const HEAD_DIM: usize = 8;
pub const CONTEXT: usize = 32;

fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

/// The tokens: `<|im_end|>` (id 0, control), `!`..`~` (ids 1..=94), `Ġ` (95), `Ċ` (96).
pub fn tokens() -> Vec<String> {
    let mut t = vec!["<|im_end|>".to_string()];
    t.extend((b'!'..=b'~').map(|c| (c as char).to_string()));
    t.push("\u{120}".into());
    t.push("\u{10a}".into());
    t
}

/// The GGUF bytes of the tiny model.
pub fn gguf_bytes() -> Vec<u8> {
    let strs = |v: Vec<String>| GgufValue::Array(GgufValueType::String, v.into_iter().map(GgufValue::String).collect());
    let mut w = GgufWriter::new();
    w.kv("general.architecture", GgufValue::String("llama".into()));
    w.kv("llama.block_count", GgufValue::U32(LAYERS as u32));
    w.kv("llama.context_length", GgufValue::U32(CONTEXT as u32));
    w.kv("llama.embedding_length", GgufValue::U32(HIDDEN as u32));
    w.kv("llama.feed_forward_length", GgufValue::U32(FFN as u32));
    w.kv("llama.attention.head_count", GgufValue::U32(HEADS as u32));
    w.kv("llama.attention.head_count_kv", GgufValue::U32(KV_HEADS as u32));
    w.kv("llama.rope.freq_base", GgufValue::F32(10000.0));
    w.kv("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5));
    w.kv("llama.vocab_size", GgufValue::U32(VOCAB as u32));
    w.kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()));
    w.kv("tokenizer.ggml.pre", GgufValue::String("gpt2".into()));
    w.kv("tokenizer.ggml.tokens", strs(tokens()));
    w.kv("tokenizer.ggml.merges", strs(vec![]));
    let types = (0..VOCAB).map(|i| GgufValue::I32(if i == 0 { 3 } else { 1 })).collect();
    w.kv("tokenizer.ggml.token_type", GgufValue::Array(GgufValueType::I32, types));
    w.kv("tokenizer.ggml.eos_token_id", GgufValue::U32(0));
    let (h, f, q, kv) = (HIDDEN, FFN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut k = 0u64;
    let mut t = |w: &mut GgufWriter, name: &str, shape: &[usize], scale: f32, offset: f32| {
        k += 1;
        let n = shape.iter().product();
        let v: Vec<f32> = values(k, n, scale).into_iter().map(|x| x + offset).collect();
        w.tensor_f32(name, shape, &v).unwrap();
    };
    t(&mut w, "token_embd.weight", &[VOCAB, h], 1.0, 0.0);
    for l in 0..LAYERS {
        let p = |s: &str| format!("blk.{l}.{s}.weight");
        t(&mut w, &p("attn_q"), &[q, h], 0.4, 0.0);
        t(&mut w, &p("attn_k"), &[kv, h], 0.4, 0.0);
        t(&mut w, &p("attn_v"), &[kv, h], 0.4, 0.0);
        t(&mut w, &p("attn_output"), &[h, q], 0.4, 0.0);
        t(&mut w, &p("ffn_gate"), &[f, h], 0.4, 0.0);
        t(&mut w, &p("ffn_up"), &[f, h], 0.4, 0.0);
        t(&mut w, &p("ffn_down"), &[h, f], 0.3, 0.0);
        t(&mut w, &p("attn_norm"), &[h], 0.1, 1.0);
        t(&mut w, &p("ffn_norm"), &[h], 0.1, 1.0);
    }
    t(&mut w, "output_norm.weight", &[h], 0.1, 1.0);
    w.to_bytes().unwrap()
}

/// Writes the tiny model to `path`.
pub fn write_gguf(path: &Path) {
    std::fs::write(path, gguf_bytes()).unwrap();
}

/// A JSONL file of `n` short text records (a few words each), written to `path`.
pub fn write_data(path: &Path, n: usize) {
    let words = ["the cat", "a dog", "sums: 1+2=3", "hello world", "x y z", "ab cd ef"];
    let text: String = (0..n)
        .map(|i| {
            if i % 3 == 2 {
                format!(
                    "{{\"prompt\":\"q{i}: \",\"completion\":\"{}\"}}\n",
                    words[i % words.len()]
                )
            } else {
                format!(
                    "{{\"text\":\"{} {}\"}}\n",
                    words[i % words.len()],
                    words[(i * 5 + 1) % words.len()]
                )
            }
        })
        .collect();
    std::fs::write(path, text).unwrap();
}
