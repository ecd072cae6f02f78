//! Helpers shared by the integration tests: fixture loading and comparisons that print the
//! worst element and the tolerance when they fail.

#![allow(dead_code, clippy::neg_cmp_op_on_partial_ord)]

use std::collections::HashMap;
use std::path::PathBuf;

/// `../shared/fixtures` relative to the crate root, or `$WEGEFT_FIXTURES`. A missing folder is
/// a test failure, not a skip: the fixtures are part of the test suite.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("WEGEFT_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    };
    assert!(dir.is_dir(), "fixtures folder {} not found (set WEGEFT_FIXTURES)", dir.display());
    dir
}

/// An empty scratch directory `wegeft-<tag>-<pid>` in the system's temp dir (what an earlier
/// run left there is removed first).
pub fn fresh_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wegeft-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create a scratch directory");
    d
}

/// Runs the `wegeft` binary with `args`.
pub fn run_wegeft(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_wegeft")).args(args).output().expect("run wegeft")
}

/// Runs the `wegeft` binary with `args` and returns its stdout; a failure shows both outputs.
pub fn wegeft_ok(args: &[&str]) -> String {
    let out = run_wegeft(args);
    assert!(
        out.status.success(),
        "wegeft {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The runs of consecutive `target` ids, each decoded (special tokens kept).
pub fn target_runs(tok: &wegeft::model::Tokenizer, ids: &[u32], target: &[bool]) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    for (t, (&id, &on)) in ids.iter().zip(target).enumerate() {
        if on {
            if t == 0 || !target[t - 1] {
                runs.push(Vec::new());
            }
            runs.last_mut().expect("a run was started").push(id);
        }
    }
    runs.iter().map(|r| tok.decode(r, false).expect("decodes")).collect()
}

/// The chat tests' conversation: two exchanges, user then assistant.
pub fn two_exchanges() -> Vec<wegeft::model::ChatMessage> {
    use wegeft::model::ChatMessage;
    vec![
        ChatMessage::new("user", "What is 2 + 2?"),
        ChatMessage::new("assistant", "4"),
        ChatMessage::new("user", "And 3 + 3?"),
        ChatMessage::new("assistant", "It is 6."),
    ]
}

/// The text of the trained runs of `msgs` as a training record ([`target_runs`] of
/// `chat_targets`), after checking that its ids are the conversation's `chat_ids`.
pub fn trained_turns(tok: &wegeft::model::Tokenizer, msgs: &[wegeft::model::ChatMessage]) -> Vec<String> {
    let (ids, target) = tok.chat_targets(msgs).unwrap();
    assert_eq!(ids, tok.chat_ids(msgs, false).unwrap());
    target_runs(tok, &ids, &target)
}

/// One layer fixture case from `layer/index.json`.
#[derive(Debug, serde::Deserialize)]
pub struct LayerCase {
    pub file: String,
    #[serde(rename = "T")]
    pub t: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
}

pub fn layer_cases() -> Vec<LayerCase> {
    let path = fixtures_dir().join("layer/index.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cases: Vec<LayerCase> = serde_json::from_str(&text).unwrap();
    assert!(!cases.is_empty(), "no layer fixture cases");
    cases
}

/// All F64 tensors of a fixture file, by name.
pub fn load_f64(file: &str) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let path = fixtures_dir().join("layer").join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F64, "{name}");
            let data: Vec<f64> = view
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

/// Transpose of a row-major `m x n` matrix.
pub fn t(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    wegeft::reference::transpose(a, m, n)
}

/// Asserts `got` matches `want` to relative tolerance `tol`, measured against the largest
/// magnitude in `want` (so elements near zero do not dominate). Prints the worst element.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_close_floor(what, got, want, tol, 1e-30);
}

/// `assert_close` with the error measured against `max(max |want|, floor)`: for an output
/// that cancels to (nearly) zero, `floor` is a fraction of the size of the terms that cancel,
/// the size both sides' rounding noise scales with.
pub fn assert_close_floor(what: &str, got: &[f64], want: &[f64], tol: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(floor);
    let (mut worst, mut at) = (0.0f64, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // NaN (an unwritten, poisoned output) counts as an infinite error.
        let e = (g - w).abs() / scale;
        let e = if e.is_nan() { f64::INFINITY } else { e };
        if e > worst {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= tol,
        "{what}: worst relative error {worst:e} at element {at} (got {}, want {}, max |want| {scale:e}), tolerance {tol:e}",
        got[at],
        want[at]
    );
}

/// The floors of attention's dq and dk for `assert_close_floor`: 1% of the size of the terms
/// `scale ds_ij k_j` and `scale ds_ij q_i` before they cancel, with `ds_ij = p_ij (dp_ij - D_i)`
/// and `|dp_ij|, |D_i| <= max |dout_i| max |v_j|` (per head, Euclidean norms). Where every
/// query sees one key (S = 1, a window of 1) `p_ij = 1`, `dp_ij = D_i` and dq, dk are exactly
/// zero: both sides give only rounding noise, which a check against `max |want|` (itself
/// noise, or 0) cannot tell from an error. Elsewhere `max |want|` is far above the floor.
pub fn attention_grad_floors(head_dim: usize, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> (f64, f64) {
    let norm = |x: &[f32]| x.chunks_exact(head_dim).fold(0.0f64, |m, h| m.max(h.iter().map(|&e| e as f64 * e as f64).sum::<f64>().sqrt()));
    let amax = |x: &[f32]| x.iter().fold(0.0f64, |m, &e| m.max((e as f64).abs()));
    let terms = norm(dout) * norm(v) / (head_dim as f64).sqrt();
    (0.01 * terms * amax(k), 0.01 * terms * amax(q))
}

/// A deterministic pseudo-random vector in [-1, 1) (splitmix64), for tests that need data
/// without proptest.
pub fn rand_vec(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// The one skip rule of the GPU tests (`tests/cuda_*.rs`): the started device, or `None` after
/// printing `skipped: no CUDA device` when there is none; with `WEGEFT_REQUIRE_GPU=1` no device
/// is a failure. Any other error starting the device fails the test.
pub fn device_or_skip<T>(started: wegeft::Result<T>) -> Option<T> {
    match started {
        Ok(dev) => Some(dev),
        Err(wegeft::Error::NoCuda(msg)) => {
            if std::env::var("WEGEFT_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("WEGEFT_REQUIRE_GPU=1 but no CUDA device: {msg}");
            }
            println!("skipped: no CUDA device ({msg})");
            None
        }
        Err(e) => panic!("CUDA backend failed to start: {e}"),
    }
}

/// [`rand_vec`] scaled to `[-scale, scale)`, as f32.
pub fn rand_f32(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    rand_vec(seed, n).into_iter().map(|v| v as f32 * scale).collect()
}

/// Seeded weights of a small Llama (the model tests' tiny model): norms near 1, projections
/// scaled by `1.7 / sqrt(d_in)`; `tied` leaves out the LM head.
pub fn tiny_weights(d: &wegeft::model::llama::Dims, seed: u64, tied: bool) -> wegeft::model::llama::HostWeights {
    let mut s = seed;
    let mut next = |n: usize, scale: f32| {
        s += 1;
        rand_f32(s, n, scale)
    };
    let layers = (0..d.layers)
        .map(|_| {
            let norm = |v: Vec<f32>| v.into_iter().map(|x| 1.0 + 0.2 * x).collect::<Vec<f32>>();
            wegeft::model::llama::HostLayer {
                attn_norm: norm(next(d.hidden, 1.0)),
                mlp_norm: norm(next(d.hidden, 1.0)),
                proj: std::array::from_fn(|m| {
                    let (i, o) = d.module_dims(m);
                    next(i * o, 1.0 / (i as f32).sqrt() * 1.7)
                }),
                bias: Default::default(),
                qk_norm: None,
            }
        })
        .collect();
    wegeft::model::llama::HostWeights {
        dims: d.clone(),
        embed: next(d.vocab * d.hidden, 1.0),
        final_norm: next(d.hidden, 0.3).into_iter().map(|x| 1.0 + x).collect(),
        lm_head: if tied { None } else { Some(next(d.vocab * d.hidden, 0.5)) },
        layers,
    }
}

/// The special tokens of [`gguf_tokenizer_metadata`]: BOS (and whether it is added), EOS, the
/// pre-tokenizer name and the chat template.
pub struct GgufVocab<'a> {
    pub pre: &'a str,
    pub bos: &'a str,
    pub add_bos: bool,
    pub eos: &'a str,
    pub template: &'a str,
}

/// Adds to `w` the tokenizer metadata llama.cpp's converter writes for a byte-level BPE
/// `tokenizer.json` (`_set_vocab_gpt2`): every id's token in order (the BPE vocabulary, then the
/// added tokens), type 1 (normal), 3 (control: the added special tokens) or 4 (user-defined:
/// the other added tokens), the merges, and `v`'s pre-tokenizer, BOS, EOS and chat template.
/// Returns the vocabulary size.
pub fn gguf_tokenizer_metadata(w: &mut wegeft::model::weights::gguf::GgufWriter, tokenizer_json: &std::path::Path, v: &GgufVocab) -> usize {
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tokenizer_json).unwrap()).unwrap();
    let mut by_id: Vec<(u64, String, i32)> = t["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tok, id)| (id.as_u64().unwrap(), tok.clone(), 1))
        .collect();
    for a in t["added_tokens"].as_array().unwrap() {
        let ty = if a["special"].as_bool().unwrap() { 3 } else { 4 };
        by_id.push((a["id"].as_u64().unwrap(), a["content"].as_str().unwrap().to_string(), ty));
    }
    by_id.sort();
    assert!(by_id.iter().enumerate().all(|(i, (id, _, _))| *id == i as u64), "ids are not dense");
    // Merges are "a b" strings in older tokenizer.json files, ["a", "b"] pairs in newer ones.
    let merges: Vec<String> = t["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m.as_str() {
            Some(s) => s.to_string(),
            None => format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()),
        })
        .collect();
    let tokens: Vec<(String, i32)> = by_id.into_iter().map(|(_, t, ty)| (t, ty)).collect();
    gguf_vocab_metadata(w, &tokens, merges, v)
}

/// The tokenizer metadata of [`gguf_tokenizer_metadata`] from the vocabulary itself: `tokens`
/// (string and token type) in id order, `merges` ("a b") in priority order. Returns the
/// vocabulary size.
pub fn gguf_vocab_metadata(
    w: &mut wegeft::model::weights::gguf::GgufWriter,
    tokens: &[(String, i32)],
    merges: Vec<String>,
    v: &GgufVocab,
) -> usize {
    use wegeft::model::weights::gguf::{GgufValue, GgufValueType};
    let strings = |v: Vec<String>| GgufValue::Array(GgufValueType::String, v.into_iter().map(GgufValue::String).collect());
    let id_of = |s: &str| tokens.iter().position(|(t, _)| t == s).unwrap_or_else(|| panic!("no token {s:?}")) as u32;
    w.kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()));
    w.kv("tokenizer.ggml.pre", GgufValue::String(v.pre.into()));
    w.kv("tokenizer.ggml.tokens", strings(tokens.iter().map(|(t, _)| t.clone()).collect()));
    w.kv(
        "tokenizer.ggml.token_type",
        GgufValue::Array(GgufValueType::I32, tokens.iter().map(|(_, ty)| GgufValue::I32(*ty)).collect()),
    );
    w.kv("tokenizer.ggml.merges", strings(merges));
    w.kv("tokenizer.ggml.bos_token_id", GgufValue::U32(id_of(v.bos)));
    w.kv("tokenizer.ggml.eos_token_id", GgufValue::U32(id_of(v.eos)));
    w.kv("tokenizer.ggml.add_bos_token", GgufValue::Bool(v.add_bos));
    w.kv("tokenizer.chat_template", GgufValue::String(v.template.into()));
    tokens.len()
}
