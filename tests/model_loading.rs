//! Loading SmolLM2-135M-Instruct: GGUF parsing and dequantization, config, weights (names,
//! shapes, q/k un-permutation), safetensors round trip, tokenizer and chat prompt, and hostile
//! files. The real model comes from `scripts/fetch-model.sh` (or `$WEGEFT_MODEL`); without it
//! these tests fail and say how to get it.

#![allow(clippy::needless_range_loop)] // index loops mirror the block formulas

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::{bf16, f16};
use wegeft::model::weights::gguf::{dequantize, GgmlType, GgufFile, GgufValue, GgufValueType, GgufWriter};
use wegeft::model::weights::{permute_qk_rows, unpermute_qk_rows};
use wegeft::model::{ChatMessage, LlamaConfig, LlamaWeights, Tensor, Tokenizer, LINEAR_MODULES};
use wegeft::Error;

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

fn model_path() -> PathBuf {
    let p = match std::env::var_os("WEGEFT_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(wegeft::model::DEFAULT_MODEL_PATH),
    };
    assert!(
        p.is_file(),
        "model file {} not found: run scripts/fetch-model.sh (or set WEGEFT_MODEL to the SmolLM2-135M-Instruct Q4_1 gguf)",
        p.display()
    );
    p
}

fn gguf() -> &'static GgufFile {
    static G: OnceLock<GgufFile> = OnceLock::new();
    G.get_or_init(|| GgufFile::open(model_path()).expect("open gguf"))
}

fn weights() -> &'static LlamaWeights {
    static W: OnceLock<LlamaWeights> = OnceLock::new();
    W.get_or_init(|| LlamaWeights::from_gguf_file(gguf()).expect("load weights"))
}

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_gguf_file(gguf()).expect("load tokenizer"))
}

fn json(file: &str) -> serde_json::Value {
    let p = common::fixtures_dir().join("smollm2").join(file);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// A fresh empty directory under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "wegeft-model-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Parses `bytes` and, when that succeeds, dequantizes every tensor; must never panic.
fn parse_no_panic(bytes: Vec<u8>) -> Result<(), Error> {
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<(), Error> {
        let g = GgufFile::from_bytes("hostile.gguf", bytes)?;
        for t in g.tensors().to_vec() {
            g.tensor_f32(&t.name)?;
        }
        Ok(())
    }));
    r.unwrap_or_else(|_| panic!("the GGUF reader panicked"))
}

fn expect_format_err(bytes: Vec<u8>, needle: &str) {
    match parse_no_panic(bytes) {
        Err(Error::Format { path, msg }) => {
            assert_eq!(path, Path::new("hostile.gguf"));
            assert!(msg.contains(needle), "error {msg:?} does not mention {needle:?}");
        }
        other => panic!("expected a Format error mentioning {needle:?}, got {other:?}"),
    }
}

fn f16b(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

// ------------------------------------------------------------------------------------------
// Config and weights of the real model
// ------------------------------------------------------------------------------------------

#[test]
fn config_from_gguf_metadata() {
    let g = gguf();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.tensors().len(), 272);
    let c = LlamaConfig::from_gguf(g).unwrap();
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.num_attention_heads, 9);
    assert_eq!(c.num_key_value_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.rope_theta, 100000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-10, "eps {}", c.rms_norm_eps);
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_id, Some(2));
}

#[test]
fn tensor_types_match_the_model_card() {
    let g = gguf();
    assert_eq!(g.tensor_info("token_embd.weight").unwrap().ty, GgmlType::Q8_0);
    assert_eq!(g.tensor_info("blk.7.attn_q.weight").unwrap().ty, GgmlType::Q4_1);
    assert_eq!(g.tensor_info("blk.7.ffn_down.weight").unwrap().ty, GgmlType::Q4_1);
    assert_eq!(g.tensor_info("blk.7.attn_norm.weight").unwrap().ty, GgmlType::F32);
    assert_eq!(g.tensor_info("token_embd.weight").unwrap().shape(), vec![49152, 576]);
    match g.tensor_info("output.weight") {
        Err(Error::Format { msg, .. }) => assert!(msg.contains("output.weight")),
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
}

#[test]
fn every_weight_loads_with_its_shape() {
    let w = weights();
    w.validate().unwrap();
    let c = &w.config;
    assert_eq!(w.embed_tokens.shape, vec![49152, 576]);
    assert_eq!(w.layers.len(), 30);
    assert!(w.lm_head.is_none());
    assert_eq!(w.lm_head().shape, vec![49152, 576]);
    assert_eq!(w.norm.shape, vec![576]);
    for (l, lw) in w.layers.iter().enumerate() {
        assert_eq!(lw.q_proj.shape, vec![576, 576], "layer {l}");
        assert_eq!(lw.k_proj.shape, vec![192, 576], "layer {l}");
        assert_eq!(lw.v_proj.shape, vec![192, 576], "layer {l}");
        assert_eq!(lw.o_proj.shape, vec![576, 576], "layer {l}");
        assert_eq!(lw.gate_proj.shape, vec![1536, 576], "layer {l}");
        assert_eq!(lw.up_proj.shape, vec![1536, 576], "layer {l}");
        assert_eq!(lw.down_proj.shape, vec![576, 1536], "layer {l}");
        assert_eq!(lw.input_layernorm.shape, vec![576], "layer {l}");
        assert_eq!(lw.post_attention_layernorm.shape, vec![576], "layer {l}");
        for m in LINEAR_MODULES {
            let t = lw.linear(m).unwrap();
            let (o, i) = c.linear_shape(m).unwrap();
            assert_eq!(t.shape, vec![o, i], "layer {l} {m}");
            t.mat("w").unwrap();
        }
    }
    let named = w.named_tensors();
    assert_eq!(named.len(), 1 + 30 * 9 + 1);
    assert_eq!(named[1].0, "model.layers.0.self_attn.q_proj.weight");
    for (name, t) in named {
        assert!(t.data.iter().all(|x| x.is_finite()), "{name} has a non-finite value");
        assert!(t.data.iter().any(|&x| x != 0.0), "{name} is all zeros");
    }
}

/// HF row `h*64 + half*32 + j` of q_proj/k_proj is GGUF row `h*64 + 2j + half`; every other
/// tensor is the GGUF tensor unchanged.
#[test]
fn q_and_k_rows_are_unpermuted_from_gguf() {
    let (g, w) = (gguf(), weights());
    for l in [0usize, 17, 29] {
        for (name, t, heads) in
            [("attn_q", &w.layers[l].q_proj, 9usize), ("attn_k", &w.layers[l].k_proj, 3usize)]
        {
            let (_, raw) = g.tensor_f32(&format!("blk.{l}.{name}.weight")).unwrap();
            for h in 0..heads {
                for half in 0..2 {
                    for j in 0..32 {
                        let hf = h * 64 + half * 32 + j;
                        let gg = h * 64 + 2 * j + half;
                        assert_eq!(&t.data[hf * 576..(hf + 1) * 576], &raw[gg * 576..(gg + 1) * 576]);
                    }
                }
            }
        }
        let (_, raw_v) = g.tensor_f32(&format!("blk.{l}.attn_v.weight")).unwrap();
        assert_eq!(w.layers[l].v_proj.data, raw_v);
        let (_, raw_down) = g.tensor_f32(&format!("blk.{l}.ffn_down.weight")).unwrap();
        assert_eq!(w.layers[l].down_proj.data, raw_down);
    }
}

/// Attention scores are the same with llama.cpp's layout + interleaved RoPE and with the
/// un-permuted HF layout + rotate-half RoPE (layer 0, every head, a few positions).
#[test]
fn unpermuted_rows_with_rotate_half_rope_match_interleaved_rope() {
    let (g, w) = (gguf(), weights());
    let (hd, d) = (64usize, 576usize);
    let x: Vec<f32> = (0..d).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3).collect();
    let y: Vec<f32> = (0..d).map(|i| ((i * 53 % 97) as f32 / 48.0 - 1.0) * 0.3).collect();
    let matvec = |m: &[f32], v: &[f32]| -> Vec<f32> {
        m.chunks_exact(d).map(|r| r.iter().zip(v).map(|(a, b)| a * b).sum()).collect()
    };
    let theta = |i: usize, pos: usize| pos as f32 * 100000f32.powf(-2.0 * i as f32 / hd as f32);
    let rope_interleaved = |v: &mut [f32], pos: usize| {
        for head in v.chunks_exact_mut(hd) {
            for i in 0..hd / 2 {
                let (c, s) = (theta(i, pos).cos(), theta(i, pos).sin());
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * c - b * s;
                head[2 * i + 1] = b * c + a * s;
            }
        }
    };
    let rope_half = |v: &mut [f32], pos: usize| {
        for head in v.chunks_exact_mut(hd) {
            for i in 0..hd / 2 {
                let (c, s) = (theta(i, pos).cos(), theta(i, pos).sin());
                let (a, b) = (head[i], head[i + hd / 2]);
                head[i] = a * c - b * s;
                head[i + hd / 2] = b * c + a * s;
            }
        }
    };
    let (_, gq) = g.tensor_f32("blk.0.attn_q.weight").unwrap();
    let (_, gk) = g.tensor_f32("blk.0.attn_k.weight").unwrap();
    let mut worst = 0f32;
    for (pq, pk) in [(3usize, 1usize), (17, 5), (40, 39)] {
        let (mut q1, mut k1) = (matvec(&gq, &x), matvec(&gk, &y));
        rope_interleaved(&mut q1, pq);
        rope_interleaved(&mut k1, pk);
        let (mut q2, mut k2) = (matvec(&w.layers[0].q_proj.data, &x), matvec(&w.layers[0].k_proj.data, &y));
        rope_half(&mut q2, pq);
        rope_half(&mut k2, pk);
        for h in 0..9 {
            let kh = h / 3;
            let dot = |q: &[f32], k: &[f32]| -> f32 { (0..hd).map(|i| q[h * hd + i] * k[kh * hd + i]).sum() };
            let (s1, s2) = (dot(&q1, &k1), dot(&q2, &k2));
            worst = worst.max((s1 - s2).abs() / (1.0 + s1.abs()));
        }
    }
    assert!(worst < 1e-4, "scores differ by {worst} (relative)");
    // And without un-permuting, rotate-half RoPE gives different scores (the check can fail).
    let (mut q3, mut k3) = (matvec(&gq, &x), matvec(&gk, &y));
    rope_half(&mut q3, 17);
    rope_half(&mut k3, 5);
    let (mut q1, mut k1) = (matvec(&gq, &x), matvec(&gk, &y));
    rope_interleaved(&mut q1, 17);
    rope_interleaved(&mut k1, 5);
    let s_wrong: f32 = (0..64).map(|i| q3[i] * k3[i]).sum();
    let s_right: f32 = (0..64).map(|i| q1[i] * k1[i]).sum();
    assert!((s_wrong - s_right).abs() > 1e-3, "{s_wrong} vs {s_right}");
}

// ------------------------------------------------------------------------------------------
// A plain f32 forward pass over the loaded weights vs transformers' logits
// ------------------------------------------------------------------------------------------

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(a, b)| a * r * b).collect()
}

/// `y[t] = x[t] W^T` for `W` (out x in).
fn linear(x: &[Vec<f32>], w: &Tensor) -> Vec<Vec<f32>> {
    x.iter()
        .map(|xt| w.data.chunks_exact(w.cols()).map(|r| r.iter().zip(xt).map(|(a, b)| a * b).sum()).collect())
        .collect()
}

/// Logits (T x vocab) of HF's LlamaForCausalLM on `ids`, written as plainly as possible.
fn reference_logits(w: &LlamaWeights, ids: &[u32]) -> Vec<Vec<f32>> {
    let c = &w.config;
    let (d, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads);
    let n = ids.len();
    let mut x: Vec<Vec<f32>> =
        ids.iter().map(|&i| w.embed_tokens.data[i as usize * d..(i as usize + 1) * d].to_vec()).collect();
    let rope = |v: &mut [f32], pos: usize| {
        for head in v.chunks_exact_mut(hd) {
            for i in 0..hd / 2 {
                let th = pos as f32 * c.rope_theta.powf(-2.0 * i as f32 / hd as f32);
                let (co, si) = (th.cos(), th.sin());
                let (a, b) = (head[i], head[i + hd / 2]);
                head[i] = a * co - b * si;
                head[i + hd / 2] = b * co + a * si;
            }
        }
    };
    for lw in &w.layers {
        let h: Vec<Vec<f32>> =
            x.iter().map(|t| rmsnorm(t, &lw.input_layernorm.data, c.rms_norm_eps)).collect();
        let mut q = linear(&h, &lw.q_proj);
        let mut k = linear(&h, &lw.k_proj);
        let v = linear(&h, &lw.v_proj);
        for t in 0..n {
            rope(&mut q[t], t);
            rope(&mut k[t], t);
        }
        let mut att = vec![vec![0f32; nh * hd]; n];
        for hh in 0..nh {
            let kh = hh / (nh / nkv);
            for t in 0..n {
                let s: Vec<f32> = (0..=t)
                    .map(|u| {
                        (0..hd).map(|i| q[t][hh * hd + i] * k[u][kh * hd + i]).sum::<f32>()
                            / (hd as f32).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (u, eu) in e.iter().enumerate() {
                    for i in 0..hd {
                        att[t][hh * hd + i] += eu / z * v[u][kh * hd + i];
                    }
                }
            }
        }
        let o = linear(&att, &lw.o_proj);
        for t in 0..n {
            for i in 0..d {
                x[t][i] += o[t][i];
            }
        }
        let h2: Vec<Vec<f32>> =
            x.iter().map(|t| rmsnorm(t, &lw.post_attention_layernorm.data, c.rms_norm_eps)).collect();
        let gt = linear(&h2, &lw.gate_proj);
        let up = linear(&h2, &lw.up_proj);
        let a: Vec<Vec<f32>> = gt
            .iter()
            .zip(&up)
            .map(|(g, u)| g.iter().zip(u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect())
            .collect();
        let dn = linear(&a, &lw.down_proj);
        for t in 0..n {
            for i in 0..d {
                x[t][i] += dn[t][i];
            }
        }
    }
    let xf: Vec<Vec<f32>> = x.iter().map(|t| rmsnorm(t, &w.norm.data, c.rms_norm_eps)).collect();
    linear(&xf, w.lm_head())
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn loaded_weights_reproduce_transformers_logits() {
    let w = weights();
    let r = json("prompt_reference.json");
    let ids = ids_of(&r["ids"]);
    let logits = reference_logits(w, &ids);
    let am: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
    assert_eq!(am, ids_of(&r["argmax_per_pos"]));
    let mut worst = 0f32;
    for pair in r["top10_last"].as_array().unwrap() {
        let (id, want) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
        worst = worst.max((logits[4][id] - want).abs());
    }
    eprintln!("prompt_reference: top-10 last logits worst abs diff {worst:.2e}");
    assert!(worst < 1e-3, "top-10 last logits: worst abs diff {worst} (tolerance 1e-3)");
    // Loss with labels = ids (shifted by one, mean over the 4 predictions).
    let mut loss = 0f64;
    for t in 0..ids.len() - 1 {
        let l = &logits[t];
        let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + l.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        loss += lse - l[ids[t + 1] as usize] as f64;
    }
    loss /= (ids.len() - 1) as f64;
    let want = r["ce_loss_labels_eq_ids"].as_f64().unwrap();
    eprintln!("prompt_reference: loss {loss} vs {want}");
    assert!((loss - want).abs() / want < 1e-4, "loss {loss} vs {want}");

    // logits.json: the full last-position logits of a few sequences.
    for (ci, case) in json("logits.json").as_array().unwrap().iter().enumerate().take(2) {
        let ids = ids_of(&case["ids"]);
        let logits = reference_logits(w, &ids);
        let am: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        assert_eq!(am, ids_of(&case["argmax"]), "case {ci}");
        let want: Vec<f32> =
            case["logits_last"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let (mut worst, mut at) = (0f32, 0);
        for (i, (a, b)) in logits.last().unwrap().iter().zip(&want).enumerate() {
            let d = if (a - b).is_nan() { f32::INFINITY } else { (a - b).abs() };
            if d > worst {
                worst = d;
                at = i;
            }
        }
        eprintln!("logits.json case {ci}: last logits worst abs diff {worst:.2e}");
        assert!(
            worst < 1e-3,
            "case {ci}: last logits worst abs diff {worst} at id {at} ({} vs {})",
            logits.last().unwrap()[at],
            want[at]
        );
    }
}

// ------------------------------------------------------------------------------------------
// Tokenizer
// ------------------------------------------------------------------------------------------

#[test]
fn tokenizer_matches_the_reference_prompt_ids() {
    let tok = tokenizer();
    let r = json("prompt_reference.json");
    assert_eq!(tok.encode("The capital of France is", false).unwrap(), vec![504, 3575, 282, 4649, 314]);
    assert_eq!(tok.encode(r["text"].as_str().unwrap(), false).unwrap(), ids_of(&r["ids"]));
    // SmolLM2 adds no BOS, even with add_special.
    assert_eq!(tok.encode("The capital of France is", true).unwrap(), vec![504, 3575, 282, 4649, 314]);
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.eos_id(), 2);
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.pad_id(), Some(2));
}

#[test]
fn chat_prompt_matches_transformers_apply_chat_template() {
    let tok = tokenizer();
    let r = json("prompt_reference.json");
    let want = ids_of(&r["chat_ids_user_What_is_the_capital_of_France"]);
    assert_eq!(tok.chat_prompt("What is the capital of France?").unwrap(), want);
    let text = tok.chat_text(&[ChatMessage::new("user", "What is the capital of France?")], true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(tok.decode(&want, false).unwrap(), text);
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![1]);
    assert_eq!(tok.encode("<|im_end|>", false).unwrap(), vec![2]);
    assert_eq!(tok.encode("<|endoftext|>", false).unwrap(), vec![0]);
}

#[test]
fn chat_records_train_on_the_assistant_turns_with_smollm2s_template() {
    // The default system prompt and the user turns are context; the newline after each
    // <|im_end|> is not trained on.
    assert_eq!(common::trained_turns(tokenizer(), &common::two_exchanges()), ["4<|im_end|>", "It is 6.<|im_end|>"]);
}

#[test]
fn digits_are_split_one_per_token() {
    let tok = tokenizer();
    let id = |s: &str| tok.token_to_id(s).unwrap();
    assert_eq!(tok.encode("2024", false).unwrap(), vec![id("2"), id("0"), id("2"), id("4")]);
    // The space before a digit stays its own piece ("Ġ"), not merged into "Ġ1".
    assert_eq!(tok.encode(" 12", false).unwrap(), vec![id("Ġ"), id("1"), id("2")]);
    assert_eq!(
        tok.encode("x=3.14", false).unwrap(),
        vec![id("x"), id("="), id("3"), id("."), id("1"), id("4")]
    );
    for ids in [tok.encode("12+345=357", false).unwrap()] {
        assert_eq!(ids.len(), 10);
        for t in ids {
            assert_eq!(tok.decode(&[t], false).unwrap().chars().count(), 1);
        }
    }
}

/// Ids from transformers 5.24's GGUF tokenizer (`convert_gguf_tokenizer` on this file's
/// `tokenizer.ggml.*` metadata), an independent implementation. It does not split digits
/// first, which only matters for whitespace directly before a digit, so these texts have none.
#[test]
fn tokenizer_matches_transformers_gguf_tokenizer() {
    let tok = tokenizer();
    let cases: &[(&str, &[u32])] = &[
        ("The capital of France is", &[504, 3575, 282, 4649, 314]),
        ("Hello, world! How are you doing today?", &[19556, 28, 905, 17, 1073, 359, 346, 2567, 1834, 47]),
        (
            "  leading spaces, tabs\tand\nnewlines\n\n",
            &[216, 2899, 5600, 28, 29416, 197, 397, 198, 2241, 5110, 1116],
        ),
        (
            "Unicode: café, naïve, 日本語, emoji 🦀🚀",
            &[
                3706, 15817, 42, 37366, 28, 15486, 46494, 28, 17097, 241, 115, 40993, 179, 120, 248, 28, 649,
                33777, 15107, 116, 218, 10813, 244, 218,
            ],
        ),
        (
            "Numbers1234567890and3.14159,-42",
            &[39006, 33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 397, 35, 30, 33, 36, 33, 37, 41, 10790, 36, 34],
        ),
        ("x=3.14", &[104, 45, 35, 30, 33, 36]),
        ("2024", &[34, 32, 34, 36]),
        ("12+345=357", &[33, 34, 27, 35, 36, 37, 45, 35, 37, 39]),
        ("<|im_start|>user\nHi<|im_end|>\n", &[1, 4093, 198, 26843, 2, 198]),
        (
            "def f(x):\n    return x**2  # square\n",
            &[1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5222, 198],
        ),
        (
            "I'm sure they'll've done it; it's John's.",
            &[57, 5248, 2090, 502, 3060, 3543, 2294, 357, 43, 357, 506, 2322, 506, 30],
        ),
        (
            "Ünïcödé   multiple     spaces\r\n\r\nCRLF",
            &[142, 246, 94, 25972, 83, 7466, 84, 2756, 256, 2701, 289, 5600, 7209, 198, 9088, 60, 54],
        ),
        ("a<|im_end|>b<|endoftext|>c<repo_name>d", &[81, 2, 82, 0, 83, 3, 84]),
        ("<|im_start|>assistant\n", &[1, 520, 9531, 198]),
        ("", &[]),
    ];
    for (text, want) in cases {
        assert_eq!(tok.encode(text, false).unwrap(), *want, "{text:?}");
    }
}

/// Where llama.cpp's `smollm` pre-tokenizer (digits split off first) and a plain GPT-2 split
/// differ: "a  1" is `a`, `ĠĠ`, `1` (the two spaces end a piece), not `a`, `Ġ`, `Ġ1`->`Ġ`,`1`.
#[test]
fn whitespace_before_a_digit_follows_the_smollm_pre_tokenizer() {
    let tok = tokenizer();
    let id = |s: &str| tok.token_to_id(s).unwrap();
    assert_eq!(tok.encode("a  1", false).unwrap(), vec![id("a"), id("ĠĠ"), id("1")]);
}

#[test]
fn decode_round_trips() {
    let tok = tokenizer();
    for text in [
        "The capital of France is Paris.",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "Unicode: café, naïve, 日本語, emoji 🦀🚀",
        "Numbers 1234567890 and 3.14159, -42",
        "<|im_start|>user\nHi<|im_end|>\n",
        "",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
    }
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
    assert!(matches!(tok.decode(&[49152], false), Err(Error::Invalid { .. })));
}

#[test]
fn tokenizer_json_round_trip() {
    let tok = tokenizer();
    let dir = temp_dir("tok");
    tok.save_hf(&dir).unwrap();
    let back = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(back.eos_id(), 2);
    for text in ["The capital of France is", " 12 apples", "<|im_start|>assistant\n"] {
        assert_eq!(back.encode(text, false).unwrap(), tok.encode(text, false).unwrap(), "{text:?}");
    }
    assert_eq!(
        back.chat_prompt("What is the capital of France?").unwrap(),
        tok.chat_prompt("What is the capital of France?").unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ------------------------------------------------------------------------------------------
// Dequantization of hand-made blocks
// ------------------------------------------------------------------------------------------

/// Writes `blocks` as a 1-row tensor of type `ty` in a GGUF file, reads it back through
/// `GgufFile::open`, and returns the f32 values.
fn roundtrip_tensor(ty: GgmlType, ne: &[u64], bytes: Vec<u8>) -> Vec<f32> {
    let dir = temp_dir("deq");
    let path = dir.join("t.gguf");
    let mut w = GgufWriter::new();
    w.kv("general.architecture", GgufValue::String("test".into()));
    w.tensor("t", ne, ty, bytes).unwrap();
    w.write(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let (shape, v) = g.tensor_f32("t").unwrap();
    assert_eq!(shape, ne.iter().rev().map(|&d| d as usize).collect::<Vec<_>>());
    std::fs::remove_dir_all(&dir).unwrap();
    v
}

#[test]
fn dequantize_q8_0() {
    // d = 0.5, q[j] = j*8 - 128 (as i8): x[j] = 0.5 * (8j - 128).
    let mut b = f16b(0.5).to_vec();
    b.extend((0..32).map(|j| (j * 8 - 128) as i8 as u8));
    let v = roundtrip_tensor(GgmlType::Q8_0, &[32], b);
    assert_eq!(v[0], -64.0);
    assert_eq!(v[16], 0.0);
    assert_eq!(v[31], 60.0);
    for j in 0..32 {
        assert_eq!(v[j], 0.5 * (8.0 * j as f32 - 128.0));
    }
}

#[test]
fn dequantize_q4_0() {
    // d = 2, qs[j] = j | (15 - j) << 4: x[j] = 2 (j - 8), x[j + 16] = 2 (15 - j - 8).
    let mut b = f16b(2.0).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let v = roundtrip_tensor(GgmlType::Q4_0, &[32], b);
    assert_eq!(&v[..3], &[-16.0, -14.0, -12.0]);
    assert_eq!(&v[16..19], &[14.0, 12.0, 10.0]);
    for j in 0..16 {
        assert_eq!(v[j], 2.0 * (j as f32 - 8.0));
        assert_eq!(v[j + 16], 2.0 * (7.0 - j as f32));
    }
}

#[test]
fn dequantize_q4_1_two_rows() {
    // Two rows of 32 (ne = [32, 2]); row r: d = 0.25 (r+1), m = -1 + r.
    let mut b = Vec::new();
    for r in 0..2u8 {
        b.extend(f16b(0.25 * (r + 1) as f32));
        b.extend(f16b(-1.0 + r as f32));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    }
    let v = roundtrip_tensor(GgmlType::Q4_1, &[32, 2], b);
    assert_eq!(v.len(), 64);
    assert_eq!(v[0], -1.0);
    assert_eq!(v[15], 2.75);
    assert_eq!(v[16], 2.75);
    assert_eq!(v[32], 0.0);
    assert_eq!(v[32 + 15], 7.5);
    for r in 0..2 {
        let (d, m) = (0.25 * (r + 1) as f32, -1.0 + r as f32);
        for j in 0..16 {
            assert_eq!(v[r * 32 + j], d * j as f32 + m);
            assert_eq!(v[r * 32 + j + 16], d * (15 - j) as f32 + m);
        }
    }
}

#[test]
fn dequantize_q5_0_and_q5_1() {
    // qh = 0xF0F0_0FF0: bit j set for j in 4..12 and 20..24, 28..32.
    let qh: u32 = 0xF0F0_0FF0;
    let qs: Vec<u8> = (0..16u8).map(|j| (j % 16) | ((j * 3 % 16) << 4)).collect();
    let q5 = |j: usize| -> f32 {
        let lo = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 } as u32;
        (lo | (((qh >> j) & 1) << 4)) as f32
    };
    let mut b = f16b(1.5).to_vec();
    b.extend(qh.to_le_bytes());
    b.extend(&qs);
    let v = roundtrip_tensor(GgmlType::Q5_0, &[32], b);
    assert_eq!(v[0], 1.5 * (0.0 - 16.0));
    assert_eq!(v[4], 1.5 * (4.0 + 16.0 - 16.0));
    for j in 0..32 {
        assert_eq!(v[j], 1.5 * (q5(j) - 16.0), "Q5_0 j={j}");
    }
    let mut b = f16b(0.5).to_vec();
    b.extend(f16b(-3.0));
    b.extend(qh.to_le_bytes());
    b.extend(&qs);
    let v = roundtrip_tensor(GgmlType::Q5_1, &[32], b);
    assert_eq!(v[31], 0.5 * ((15 * 3 % 16) as f32 + 16.0) - 3.0);
    for j in 0..32 {
        assert_eq!(v[j], 0.5 * q5(j) - 3.0, "Q5_1 j={j}");
    }
}

#[test]
fn dequantize_float_types() {
    let vals = [1.0f32, -2.5, 0.0, 65504.0, 1e-3, -7.75];
    let b: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(roundtrip_tensor(GgmlType::F32, &[3, 2], b), vals);
    let b: Vec<u8> = vals.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect();
    let want: Vec<f32> = vals.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    assert_eq!(roundtrip_tensor(GgmlType::F16, &[6], b), want);
    assert_eq!(want[1], -2.5);
    let b: Vec<u8> = vals.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
    let want: Vec<f32> = vals.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    assert_eq!(roundtrip_tensor(GgmlType::BF16, &[2, 3], b), want);
    assert_eq!(want[5], -7.75);
}

/// Every supported quantized type against gguf-py (llama.cpp's Python package, an independent
/// implementation): `tests/data/quants/NAME.bin` holds 4 random blocks (every bit of every
/// field used), `NAME.f32` what gguf-py 0.19.0 dequantizes them to (`scripts/quant_vectors.py`).
/// Equal to the bit: both compute the same f32 products in the same order.
#[test]
fn dequantize_matches_gguf_py() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/quants");
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ];
    for ty in types {
        let bytes = std::fs::read(dir.join(format!("{}.bin", ty.name()))).unwrap();
        let want: Vec<f32> = std::fs::read(dir.join(format!("{}.f32", ty.name())))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (block, size) = ty.block();
        assert_eq!((bytes.len() / size, want.len() / block), (4, 4), "{}: fixture sizes", ty.name());
        assert!(ty.is_supported(), "{}", ty.name());
        let mut got = vec![f32::NAN; want.len()];
        dequantize(ty, &bytes, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{} value {i} (block {}, index {}): {g} vs gguf-py {w}", ty.name(), i / block, i % block);
        }
        // And through a GGUF file, as two rows of two blocks.
        let v = roundtrip_tensor(ty, &[2 * block as u64, 2], bytes);
        assert_eq!(v, want, "{} through a GGUF file", ty.name());
    }
}

/// A file written by gguf-py's own `GGUFWriter` (`tests/data/quants/gguf_py_kquants.gguf`, also a
/// fuzz seed): one 512-value row of each K-quant, the first two blocks of the vectors above.
#[test]
fn reads_k_quants_written_by_gguf_py() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/quants");
    let g = GgufFile::open(dir.join("gguf_py_kquants.gguf")).unwrap();
    for ty in [GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
        let want: Vec<f32> = std::fs::read(dir.join(format!("{}.f32", ty.name())))
            .unwrap()
            .chunks_exact(4)
            .take(512)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (shape, v) = g.tensor_f32(&format!("t.{}", ty.name())).unwrap();
        assert_eq!(shape, vec![1, 512], "{}", ty.name());
        assert_eq!(v, want, "{}", ty.name());
    }
}

#[test]
fn dequantize_rejects_unsupported_types_and_sizes() {
    let mut out = vec![0f32; 256];
    let e = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut out).unwrap_err();
    assert!(matches!(&e, Error::Invalid { msg, .. } if msg.contains("IQ2_XXS")), "{e}");
    assert!(dequantize(GgmlType::Q4_1, &[0u8; 19], &mut out[..32]).is_err());
    assert!(dequantize(GgmlType::Q4_1, &[0u8; 20], &mut out[..31]).is_err());
    assert!(dequantize(GgmlType::Q6_K, &[0u8; 210], &mut out[..255]).is_err(), "not a whole block");
    // An unsupported type in a file: the error names the file and the tensor.
    let mut w = GgufWriter::new();
    w.tensor("blk.0.ffn_up.weight", &[256], GgmlType::IQ2_XXS, vec![0u8; 66]).unwrap();
    let g = GgufFile::from_bytes("k.gguf", w.to_bytes().unwrap()).unwrap();
    match g.tensor_f32("blk.0.ffn_up.weight") {
        Err(Error::Format { path, msg }) => {
            assert_eq!(path, Path::new("k.gguf"));
            assert!(msg.contains("blk.0.ffn_up.weight") && msg.contains("IQ2_XXS"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

// ------------------------------------------------------------------------------------------
// A tiny synthetic Llama: GGUF -> weights -> safetensors -> weights
// ------------------------------------------------------------------------------------------

const TINY: (usize, usize, usize, usize, usize, usize, usize) = (16, 8, 12, 2, 2, 1, 4); // vocab, hidden, ffn, layers, heads, kv, head_dim

fn tiny_config() -> LlamaConfig {
    let (v, h, i, l, nh, nkv, hd) = TINY;
    LlamaConfig {
        vocab_size: v,
        hidden_size: h,
        intermediate_size: i,
        num_hidden_layers: l,
        num_attention_heads: nh,
        num_key_value_heads: nkv,
        head_dim: hd,
        rope_theta: 10000.0,
        rope_scaling: Default::default(),
        rms_norm_eps: 1e-6,
        max_position_embeddings: 32,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
        arch: Default::default(),
        attention_bias: false,
        mlp_bias: false,
        sliding_window: None,
        full_attention_layers: vec![],
        nope_layers: vec![],
        multipliers: None,
    }
}

/// Deterministic distinct values for tensor number `k`.
fn vals(k: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| (k * 1000 + i) as f32 * 0.001).collect()
}

/// llama.cpp's converter permutation, written as its numpy expression:
/// `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
fn llama_cpp_permute(w: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    let hh = rows / n_head / 2;
    let mut out = vec![0f32; w.len()];
    // out[h, j, half, :] = w[h, half, j, :]
    for h in 0..n_head {
        for half in 0..2 {
            for j in 0..hh {
                let src = ((h * 2 + half) * hh + j) * cols;
                let dst = ((h * hh + j) * 2 + half) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// (HF name, shape, values) of every tensor.
type Named = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The HF tensors of the tiny model (name, shape, values) and its GGUF file.
fn tiny_model(tied: bool) -> (Named, GgufWriter) {
    tiny_model_with(tied, false)
}

/// [`tiny_model`], with `bias`: a bias on every projection (Llama's `attention_bias` and
/// `mlp_bias`), q's and k's permuted in the GGUF as their rows are.
fn tiny_model_with(tied: bool, bias: bool) -> (Named, GgufWriter) {
    let (v, h, i, l, nh, nkv, hd) = TINY;
    let mut hf = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for layer in 0..l {
        for (f, s) in [
            ("self_attn.q_proj", vec![nh * hd, h]),
            ("self_attn.k_proj", vec![nkv * hd, h]),
            ("self_attn.v_proj", vec![nkv * hd, h]),
            ("self_attn.o_proj", vec![h, nh * hd]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
        ] {
            hf.push((format!("model.layers.{layer}.{f}.weight"), s));
        }
        if bias {
            for (f, n) in [
                ("self_attn.q_proj", nh * hd),
                ("self_attn.k_proj", nkv * hd),
                ("self_attn.v_proj", nkv * hd),
                ("self_attn.o_proj", h),
                ("mlp.gate_proj", i),
                ("mlp.up_proj", i),
                ("mlp.down_proj", h),
            ] {
                hf.push((format!("model.layers.{layer}.{f}.bias"), vec![n]));
            }
        }
    }
    hf.push(("model.norm.weight".to_string(), vec![h]));
    if !tied {
        hf.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    let hf: Vec<(String, Vec<usize>, Vec<f32>)> = hf
        .into_iter()
        .enumerate()
        .map(|(k, (n, s))| {
            let len = s.iter().product();
            (n, s, vals(k, len))
        })
        .collect();
    let mut w = GgufWriter::new();
    w.kv("general.architecture", GgufValue::String("llama".into()));
    w.kv("llama.block_count", GgufValue::U32(l as u32));
    w.kv("llama.context_length", GgufValue::U32(32));
    w.kv("llama.embedding_length", GgufValue::U32(h as u32));
    w.kv("llama.feed_forward_length", GgufValue::U32(i as u32));
    w.kv("llama.attention.head_count", GgufValue::U32(nh as u32));
    w.kv("llama.attention.head_count_kv", GgufValue::U32(nkv as u32));
    w.kv("llama.rope.freq_base", GgufValue::F32(10000.0));
    w.kv("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-6));
    w.kv("llama.vocab_size", GgufValue::U32(v as u32));
    w.kv("general.alignment", GgufValue::U32(64));
    for (name, shape, data) in &hf {
        let g = name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.layers.", "blk.")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("input_layernorm", "attn_norm")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output");
        let cols = shape.get(1).copied().unwrap_or(1);
        let data = if g.contains("attn_q") {
            llama_cpp_permute(data, nh, shape[0], cols)
        } else if g.contains("attn_k") {
            llama_cpp_permute(data, nkv, shape[0], cols)
        } else {
            data.clone()
        };
        w.tensor_f32(g, shape, &data).unwrap();
    }
    (hf, w)
}

fn assert_weights_equal_hf(w: &LlamaWeights, hf: &[(String, Vec<usize>, Vec<f32>)]) {
    let named = w.named_tensors();
    assert_eq!(named.len(), hf.len());
    for ((n1, t), (n2, s, d)) in named.iter().zip(hf) {
        assert_eq!(n1, n2);
        assert_eq!(&t.shape, s, "{n1}");
        assert_eq!(&t.data, d, "{n1}");
    }
}

#[test]
fn tiny_gguf_loads_with_hf_names_and_unpermuted_rows() {
    for tied in [true, false] {
        let (hf, writer) = tiny_model(tied);
        let dir = temp_dir("tiny");
        let path = dir.join("tiny.gguf");
        writer.write(&path).unwrap();
        let w = LlamaWeights::load(&path).unwrap();
        let mut want_cfg = tiny_config();
        want_cfg.tie_word_embeddings = tied;
        assert_eq!(w.config, want_cfg);
        assert_weights_equal_hf(&w, &hf);
        assert_eq!(w.lm_head.is_none(), tied);

        // safetensors round trip through `load` of a directory.
        let out = dir.join("hf");
        w.save_safetensors_hf(&out).unwrap();
        assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());
        assert!(!out.join("model.safetensors.tmp").exists());
        let back = LlamaWeights::load(&out).unwrap();
        assert_eq!(back, w);
        assert_eq!(LlamaWeights::load(out.join("model.safetensors")).unwrap(), w);
        // Saving again over the same directory replaces the files.
        back.save_safetensors_hf(&out).unwrap();
        assert_eq!(LlamaWeights::from_safetensors_dir(&out).unwrap(), w);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn llama_gguf_with_biases_loads_them_unpermuted_and_round_trips() {
    let (hf, writer) = tiny_model_with(false, true);
    let g = GgufFile::from_bytes("biased.gguf", writer.to_bytes().unwrap()).unwrap();
    let w = LlamaWeights::from_gguf_file(&g).unwrap();
    assert!(w.config.attention_bias && w.config.mlp_bias);
    assert_weights_equal_hf(&w, &hf);
    // config.json says so, and the HF checkpoint reads back the same.
    let dir = temp_dir("biased");
    w.save_safetensors_hf(&dir).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg["attention_bias"].as_bool(), cfg["mlp_bias"].as_bool()), (Some(true), Some(true)));
    assert_eq!(LlamaWeights::load(&dir).unwrap(), w);
    std::fs::remove_dir_all(&dir).unwrap();
    // A bias the config does not have, or one it has missing, is refused by name.
    let mut bad = w.clone();
    bad.layers[1].biases[5] = None;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("layer 1") && e.contains("up_proj"), "{e}");
    let mut bad = w;
    bad.config.mlp_bias = false;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("gate_proj") && e.contains("none"), "{e}");
}

#[test]
fn sharded_bf16_f16_safetensors_load() {
    use safetensors::tensor::{Dtype, TensorView};
    let (hf, _) = tiny_model(false);
    let dir = temp_dir("shards");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&{
            let mut c = tiny_config();
            c.tie_word_embeddings = false;
            c.to_hf_json().unwrap()
        })
        .unwrap(),
    )
    .unwrap();
    // First half of the tensors in BF16, the rest in F16, in two shards.
    let mid = hf.len() / 2;
    let mut weight_map = serde_json::Map::new();
    let mut expect = Vec::new();
    for (shard, part) in [(0, &hf[..mid]), (1, &hf[mid..])] {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = part
            .iter()
            .map(|(n, s, d)| {
                let bytes: Vec<u8> = if shard == 0 {
                    d.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect()
                } else {
                    d.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect()
                };
                let rounded: Vec<f32> = if shard == 0 {
                    d.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
                } else {
                    d.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
                };
                expect.push((n.clone(), s.clone(), rounded));
                (n.clone(), s.clone(), bytes)
            })
            .collect();
        let views: Vec<(String, TensorView)> = bufs
            .iter()
            .map(|(n, s, b)| {
                let dt = if shard == 0 { Dtype::BF16 } else { Dtype::F16 };
                (n.clone(), TensorView::new(dt, s.clone(), b).unwrap())
            })
            .collect();
        safetensors::tensor::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for (n, _, _) in part {
            weight_map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    let w = LlamaWeights::load(&dir).unwrap();
    assert_weights_equal_hf(&w, &expect);
    // Saving into a directory that holds a sharded checkpoint is refused.
    assert!(matches!(w.save_safetensors_hf(&dir), Err(Error::Invalid { .. })));
    // A missing shard entry names the tensor.
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({ "weight_map": { "model.norm.weight": "model-00002-of-00002.safetensors" } })
            .to_string(),
    )
    .unwrap();
    match LlamaWeights::load(&dir) {
        Err(Error::Format { msg, .. }) => assert!(msg.contains("model.embed_tokens.weight"), "{msg}"),
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_weights_with_wrong_shapes_or_missing_tensors_are_errors() {
    let (_, _, _, _, nh, _, hd) = TINY;
    let h = TINY.1;
    let orig = GgufFile::from_bytes("ok.gguf", tiny_model(true).1.to_bytes().unwrap()).unwrap();
    assert!(LlamaWeights::from_gguf_file(&orig).is_ok());
    // The tiny file again, without tensor `skip`, with tensor `replace` given another shape,
    // and with an extra tensor the model does not use.
    let rebuild = |skip: &str, replace: Option<(&str, Vec<usize>)>, extra: bool| -> Vec<u8> {
        let mut w = GgufWriter::new();
        for (k, val) in orig.metadata() {
            w.kv(k.clone(), val.clone());
        }
        for t in orig.tensors() {
            if t.name == skip {
                continue;
            }
            match &replace {
                Some((n, shape)) if *n == t.name => {
                    w.tensor_f32(t.name.clone(), shape, &vec![0.5; shape.iter().product()]).unwrap();
                }
                _ => {
                    w.tensor(t.name.clone(), &t.ne, t.ty, orig.tensor_bytes(&t.name).unwrap().to_vec())
                        .unwrap();
                }
            }
        }
        if extra {
            w.tensor_f32("blk.0.attn_sinks.weight", &[nh], &vec![0.0; nh]).unwrap();
        }
        w.to_bytes().unwrap()
    };
    let check = |bytes: Vec<u8>, needle: &str| {
        let r = catch_unwind(AssertUnwindSafe(|| {
            let g = GgufFile::from_bytes("bad.gguf", bytes)?;
            LlamaWeights::from_gguf_file(&g)
        }))
        .expect("panicked");
        match r {
            Err(Error::Format { path, msg }) => {
                assert_eq!(path, Path::new("bad.gguf"));
                assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
            }
            other => panic!("expected an error about {needle}, got {:?}", other.map(|_| ())),
        }
    };
    check(rebuild("blk.1.ffn_up.weight", None, false), "blk.1.ffn_up.weight");
    check(rebuild("", Some(("blk.0.attn_k.weight", vec![2 * hd, h])), false), "blk.0.attn_k.weight");
    check(rebuild("", Some(("output_norm.weight", vec![h + 1])), false), "output_norm.weight");
    check(rebuild("", None, true), "blk.0.attn_sinks.weight");
}

#[test]
fn permute_and_unpermute_are_inverse_and_match_the_converter() {
    let (nh, hd, cols) = (3usize, 8usize, 5usize);
    let w: Vec<f32> = (0..nh * hd * cols).map(|x| x as f32).collect();
    let p = permute_qk_rows(&w, nh, hd, cols).unwrap();
    assert_eq!(p, llama_cpp_permute(&w, nh, nh * hd, cols));
    assert_eq!(unpermute_qk_rows(&p, nh, hd, cols).unwrap(), w);
    assert!(unpermute_qk_rows(&w, nh, 7, cols).is_err());
    assert!(unpermute_qk_rows(&w[1..], nh, hd, cols).is_err());
}

// ------------------------------------------------------------------------------------------
// Hostile files
// ------------------------------------------------------------------------------------------

/// A small valid file exercising every metadata value type, arrays included.
fn small_valid_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.kv("u8", GgufValue::U8(7))
        .kv("i8", GgufValue::I8(-7))
        .kv("u16", GgufValue::U16(700))
        .kv("i16", GgufValue::I16(-700))
        .kv("u32", GgufValue::U32(70000))
        .kv("i32", GgufValue::I32(-70000))
        .kv("f32", GgufValue::F32(0.5))
        .kv("bool", GgufValue::Bool(true))
        .kv("str", GgufValue::String("héllo".into()))
        .kv("u64", GgufValue::U64(1 << 40))
        .kv("i64", GgufValue::I64(-(1 << 40)))
        .kv("f64", GgufValue::F64(0.25))
        .kv(
            "arr",
            GgufValue::Array(
                GgufValueType::String,
                vec![GgufValue::String("a".into()), GgufValue::String("bc".into())],
            ),
        )
        .kv(
            "nested",
            GgufValue::Array(
                GgufValueType::Array,
                vec![GgufValue::Array(GgufValueType::I32, vec![GgufValue::I32(1), GgufValue::I32(-2)])],
            ),
        );
    let mut q = f16b(0.5).to_vec();
    q.extend(f16b(1.0));
    q.extend([0x21u8; 16]);
    w.tensor("q", &[32], GgmlType::Q4_1, q).unwrap();
    w.tensor_f32("f", &[2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    w.to_bytes().unwrap()
}

#[test]
fn small_file_reads_every_value_type() {
    let g = GgufFile::from_bytes("small.gguf", small_valid_file()).unwrap();
    assert_eq!(g.get("u8"), Some(&GgufValue::U8(7)));
    assert_eq!(g.get("i16"), Some(&GgufValue::I16(-700)));
    assert_eq!(g.get_usize("u64").unwrap(), 1 << 40);
    assert_eq!(g.get("i64").unwrap().as_i64(), Some(-(1 << 40)));
    assert_eq!(g.get_f64("f64").unwrap(), 0.25);
    assert_eq!(g.get_f64("f32").unwrap(), 0.5);
    assert!(g.get_bool("bool").unwrap());
    assert_eq!(g.get_str("str").unwrap(), "héllo");
    assert_eq!(g.get_str_array("arr").unwrap(), vec!["a", "bc"]);
    assert_eq!(g.get("nested").unwrap().as_array().unwrap()[0].as_array().unwrap()[1], GgufValue::I32(-2));
    assert!(g.get_usize("i8").is_err());
    assert!(matches!(g.get_str("u8"), Err(Error::Format { .. })));
    assert!(matches!(g.get_usize("missing"), Err(Error::Format { .. })));
    let (shape, q) = g.tensor_f32("q").unwrap();
    assert_eq!(shape, vec![32]);
    assert_eq!(q[0], 0.5 * 1.0 + 1.0);
    assert_eq!(q[16], 0.5 * 2.0 + 1.0);
    assert_eq!(g.tensor_f32("f").unwrap(), (vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]));
}

#[test]
fn truncated_files_are_errors_at_every_cut() {
    let full = small_valid_file();
    parse_no_panic(full.clone()).unwrap();
    for cut in 0..full.len() {
        // A cut inside the trailing padding of the last tensor can still be a valid file.
        let last = GgufFile::from_bytes("x", full.clone()).unwrap();
        let end = last.tensors().iter().map(|t| last.data_start() + t.offset + t.n_bytes).max().unwrap();
        let r = parse_no_panic(full[..cut].to_vec());
        if (cut as u64) < end {
            match r {
                Err(Error::Format { msg, .. }) => assert!(
                    msg.contains("truncated") || msg.contains("past the end") || msg.contains("cannot fit"),
                    "cut {cut}: {msg}"
                ),
                other => panic!("cut {cut}: expected a Format error, got {other:?}"),
            }
        }
    }
}

#[test]
fn truncated_real_model_is_an_error() {
    let bytes = std::fs::read(model_path()).unwrap();
    let data_start = gguf().data_start() as usize;
    let mut cuts: Vec<usize> = (0..64).collect();
    cuts.extend((0..150).map(|k| 64 + k * (data_start - 64) / 150));
    cuts.extend([data_start, data_start + 1000, bytes.len() / 2, bytes.len() - 1]);
    for cut in cuts {
        match parse_no_panic(bytes[..cut].to_vec()) {
            Err(Error::Format { .. }) => {}
            other => panic!("cut {cut}: expected a Format error, got {other:?}"),
        }
    }
    // One byte short: the error names the last tensor of the file, which runs past the end.
    match GgufFile::from_bytes("cut.gguf", bytes[..bytes.len() - 1].to_vec()) {
        Err(Error::Format { msg, .. }) => {
            assert!(msg.contains("past the end") && msg.contains("output_norm.weight"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
}

fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(version.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

fn kv_raw(b: &mut Vec<u8>, key: &str, ty: u32, value: &[u8]) {
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(value);
}

fn tensor_raw(b: &mut Vec<u8>, name: &str, ne: &[u64], ty: u32, offset: u64) {
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name.as_bytes());
    b.extend((ne.len() as u32).to_le_bytes());
    for d in ne {
        b.extend(d.to_le_bytes());
    }
    b.extend(ty.to_le_bytes());
    b.extend(offset.to_le_bytes());
}

#[test]
fn hostile_headers_are_errors() {
    let pad = |mut b: Vec<u8>| {
        b.resize(b.len() + 256, 0);
        b
    };
    expect_format_err(b"GGU".to_vec(), "truncated");
    expect_format_err(pad(b"GGML\x03\0\0\0".to_vec()), "bad magic");
    expect_format_err(pad(header(1, 0, 0)), "version 1");
    expect_format_err(pad(header(3u32.swap_bytes(), 0, 0)), "big-endian");
    expect_format_err(pad(header(99, 0, 0)), "unknown GGUF version 99");
    expect_format_err(pad(header(3, u64::MAX, 0)), "tensor count");
    expect_format_err(pad(header(3, 0, u64::MAX)), "metadata count");
    expect_format_err(pad(header(2, 1 << 40, 1 << 40)), "count");

    // A string length of u64::MAX.
    let mut b = header(3, 0, 1);
    b.extend(u64::MAX.to_le_bytes());
    expect_format_err(pad(b), "truncated");
    // Unknown value type.
    let mut b = header(3, 0, 1);
    kv_raw(&mut b, "k", 13, &[]);
    expect_format_err(pad(b), "unknown value type 13");
    // Absurd array length.
    let mut b = header(3, 0, 1);
    let mut v = 4u32.to_le_bytes().to_vec();
    v.extend(u64::MAX.to_le_bytes());
    kv_raw(&mut b, "arr", 9, &v);
    expect_format_err(pad(b), "cannot fit");
    // Arrays nested too deep (each level: type Array, count 1).
    let mut b = header(3, 0, 1);
    let mut v = Vec::new();
    for _ in 0..20 {
        v.extend(9u32.to_le_bytes());
        v.extend(1u64.to_le_bytes());
    }
    kv_raw(&mut b, "deep", 9, &v);
    expect_format_err(pad(b), "nested");
    // Invalid bool, invalid UTF-8.
    let mut b = header(3, 0, 1);
    kv_raw(&mut b, "b", 7, &[2]);
    expect_format_err(pad(b), "bool");
    let mut b = header(3, 0, 1);
    let mut v = 2u64.to_le_bytes().to_vec();
    v.extend([0xff, 0xfe]);
    kv_raw(&mut b, "s", 8, &v);
    expect_format_err(pad(b), "UTF-8");
    // Duplicate key.
    let mut b = header(3, 0, 2);
    kv_raw(&mut b, "k", 4, &1u32.to_le_bytes());
    kv_raw(&mut b, "k", 4, &1u32.to_le_bytes());
    expect_format_err(pad(b), "duplicate");
    // Bad alignment.
    let mut b = header(3, 0, 1);
    kv_raw(&mut b, "general.alignment", 4, &3u32.to_le_bytes());
    expect_format_err(pad(b), "general.alignment");
    let mut b = header(3, 0, 1);
    kv_raw(&mut b, "general.alignment", 4, &0u32.to_le_bytes());
    expect_format_err(pad(b), "general.alignment");

    // Tensor infos.
    let one = |name: &str, ne: &[u64], ty: u32, off: u64| {
        let mut b = header(3, 1, 0);
        tensor_raw(&mut b, name, ne, ty, off);
        pad(b)
    };
    expect_format_err(one("t", &[32], 99, 0), "unknown ggml type id 99");
    expect_format_err(one("t", &[1, 1, 1, 1, 1], 0, 0), "5 dimensions");
    expect_format_err(one("t", &[], 0, 0), "0 dimensions");
    expect_format_err(one("t", &[33], 3, 0), "block size");
    expect_format_err(one("t", &[32], 0, 4), "alignment");
    expect_format_err(one("t", &[u64::MAX, u64::MAX], 0, 0), "overflow");
    expect_format_err(one("blk.0.attn_q.weight", &[1 << 20], 0, 0), "blk.0.attn_q.weight");
    expect_format_err(one("t", &[32], 0, u64::MAX - 31), "past the end");
    let mut b = header(3, 2, 0);
    tensor_raw(&mut b, "t", &[8], 0, 0);
    tensor_raw(&mut b, "t", &[8], 0, 32);
    expect_format_err(pad(b), "duplicate tensor");
}

#[test]
fn random_corruption_never_panics() {
    let base = small_valid_file();
    // xorshift, fixed seed.
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let (mut ok, mut err) = (0, 0);
    for _ in 0..3000 {
        let mut b = base.clone();
        for _ in 0..(1 + next() % 4) {
            let i = (next() as usize) % b.len();
            b[i] = match next() % 3 {
                0 => next() as u8,
                1 => 0xff,
                _ => 0,
            };
        }
        match parse_no_panic(b) {
            Ok(()) => ok += 1,
            Err(Error::Format { .. }) => err += 1,
            Err(e) => panic!("unexpected error kind {e:?}"),
        }
    }
    assert!(err > 0 && ok > 0, "ok {ok}, err {err}");
}

/// A tiny tokenizer's metadata (byte-level BPE, smollm pre-tokenizer, one control token).
fn tiny_tokenizer_file() -> Vec<u8> {
    let strs = |v: &[&str]| {
        GgufValue::Array(GgufValueType::String, v.iter().map(|s| GgufValue::String(s.to_string())).collect())
    };
    let mut w = GgufWriter::new();
    w.kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", GgufValue::String("smollm".into()))
        .kv("tokenizer.ggml.tokens", strs(&["<|im_end|>", "a", "b", "ab", "Ġ", "1", "ĠĠ"]))
        .kv("tokenizer.ggml.merges", strs(&["a b", "Ġ Ġ"]))
        .kv(
            "tokenizer.ggml.token_type",
            GgufValue::Array(
                GgufValueType::I32,
                [3, 1, 1, 1, 1, 1, 1].iter().map(|&t| GgufValue::I32(t)).collect(),
            ),
        )
        .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(0))
        .kv("tokenizer.ggml.add_bos_token", GgufValue::Bool(false));
    w.to_bytes().unwrap()
}

#[test]
fn tiny_tokenizer_from_metadata() {
    let g = GgufFile::from_bytes("tok.gguf", tiny_tokenizer_file()).unwrap();
    let tok = Tokenizer::from_gguf_file(&g).unwrap();
    assert_eq!(tok.encode("ab", false).unwrap(), vec![3]);
    assert_eq!(tok.encode("a  1<|im_end|>", false).unwrap(), vec![1, 6, 5, 0]);
    assert_eq!(tok.decode(&[3, 6, 5, 0], true).unwrap(), "ab  1");
    assert_eq!(tok.eos_id(), 0);
    assert!(tok.chat_prompt("hi").is_err(), "no chat template in this file");
}

/// Corrupting the metadata of a small Llama model and a small tokenizer gives errors, never a
/// panic, through the config, weights and tokenizer builders too.
#[test]
fn random_corruption_of_model_metadata_never_panics() {
    let model = tiny_model(true).1.to_bytes().unwrap();
    let model_header = GgufFile::from_bytes("x", model.clone()).unwrap().data_start() as usize;
    let tok = tiny_tokenizer_file();
    let mut s: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let (mut ok, mut err) = (0, 0);
    for it in 0..1500 {
        let (mut b, span) =
            if it % 2 == 0 { (model.clone(), model_header) } else { (tok.clone(), tok.len()) };
        for _ in 0..(1 + next() % 3) {
            let i = (next() as usize) % span;
            b[i] = match next() % 4 {
                0 => next() as u8,
                1 => 0xff,
                2 => b[i].wrapping_add(1),
                _ => 0,
            };
        }
        let r = catch_unwind(AssertUnwindSafe(|| -> Result<(), Error> {
            let g = GgufFile::from_bytes("hostile.gguf", b)?;
            if it % 2 == 0 {
                LlamaWeights::from_gguf_file(&g)?;
            } else {
                let t = Tokenizer::from_gguf_file(&g)?;
                let ids = t.encode("ab a  1 <|im_end|>", false)?;
                t.decode(&ids, false)?;
            }
            Ok(())
        }))
        .unwrap_or_else(|_| panic!("iteration {it} panicked"));
        match r {
            Ok(()) => ok += 1,
            Err(Error::Format { .. }) => err += 1,
            Err(e) => panic!("iteration {it}: unexpected error kind {e:?}"),
        }
    }
    assert!(err > 0 && ok > 0, "ok {ok}, err {err}");
}

#[test]
fn absurd_llama_metadata_is_an_error() {
    let orig = GgufFile::from_bytes("ok.gguf", tiny_model(true).1.to_bytes().unwrap()).unwrap();
    for (key, value, needle) in [
        ("llama.block_count", GgufValue::U32(u32::MAX), "llama.block_count 4294967295 is more than 65536"),
        ("llama.block_count", GgufValue::U32(3), "blk.2.attn_q.weight"),
        ("llama.attention.head_count", GgufValue::U32(0), "num_attention_heads"),
        ("llama.attention.head_count_kv", GgufValue::U32(3), "num_key_value_heads"),
        ("llama.embedding_length", GgufValue::U64(1 << 62), "overflow"),
        ("llama.embedding_length", GgufValue::U64(u64::MAX), "head_dim"),
        ("llama.feed_forward_length", GgufValue::String("12".into()), "llama.feed_forward_length"),
        ("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(f32::NAN), "rms_norm_eps"),
        ("general.architecture", GgufValue::String("gemma".into()), "gemma"),
    ] {
        let mut w = GgufWriter::new();
        for (k, v) in orig.metadata() {
            w.kv(k.clone(), if k == key { value.clone() } else { v.clone() });
        }
        for t in orig.tensors() {
            w.tensor(t.name.clone(), &t.ne, t.ty, orig.tensor_bytes(&t.name).unwrap().to_vec()).unwrap();
        }
        let bytes = w.to_bytes().unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            LlamaWeights::from_gguf_file(&GgufFile::from_bytes("bad.gguf", bytes).unwrap())
        }))
        .unwrap_or_else(|_| panic!("{key} panicked"));
        match r {
            Err(Error::Format { msg, .. }) => {
                assert!(msg.contains(needle), "{key}: {msg:?} lacks {needle:?}")
            }
            other => panic!("{key}: expected a Format error, got {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn model_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<GgufFile>();
    check::<LlamaWeights>();
    check::<Tokenizer>();
}
