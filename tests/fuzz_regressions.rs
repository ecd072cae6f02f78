//! The fuzz targets' inputs in the normal test suite: every committed seed
//! (`fuzz/seeds/<target>/`) and crash input (`fuzz/regressions/<target>/`) goes through the
//! same calls as its target (see `fuzz/fuzz_targets/`), which must return without panicking;
//! the well-formed seeds must also load, so that the fuzzers start from inputs that reach deep.

use std::path::{Path, PathBuf};

use wegeft::adapter::io::{load_gift, load_peft};
use wegeft::adapter::ModelDims;
use wegeft::model::weights::gguf::GgufFile;
use wegeft::model::{LlamaWeights, Tokenizer};
use wegeft::train::data::{make_batch, parse_jsonl, Encode};

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in [root.join("seeds").join(target), root.join("regressions").join(target)] {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            if e.path().is_file() {
                out.push((
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wegeft-fuzzreg-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `gguf` target's calls; returns (parsed, weights loaded, tokenizer built).
fn gguf(data: &[u8]) -> (bool, bool, bool) {
    let Ok(g) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return (false, false, false);
    };
    for t in g.tensors() {
        let _ = g.tensor_f32(&t.name);
    }
    let w = LlamaWeights::from_gguf_file(&g).is_ok();
    let tok = Tokenizer::from_gguf_file(&g);
    if let Ok(t) = &tok {
        if let Ok(ids) = t.encode("Hello 12 ab", false) {
            let _ = t.decode(&ids, false);
        }
    }
    (true, w, tok.is_ok())
}

#[test]
fn gguf_inputs() {
    let all = inputs("gguf");
    assert!(all.len() >= 4, "seeds missing: {}", all.len());
    for (name, data) in &all {
        let (parsed, weights, tok) = gguf(data);
        match name.as_str() {
            "tiny_llama.gguf" | "tiny_qwen2.gguf" | "tiny_qwen3.gguf" | "tiny_smollm3.gguf" | "tiny_granite.gguf" => {
                assert!(parsed && weights && tok, "{name}")
            }
            "tokenizer_only.gguf" => assert!(parsed && tok, "{name}"),
            "one_tensor.gguf" | "header_only.gguf" => assert!(parsed, "{name}"),
            _ => {}
        }
    }
}

/// The `adapter` target's calls: mode byte, u16 JSON length, JSON, safetensors.
fn adapter(dir: &Path, data: &[u8]) -> bool {
    if data.len() < 3 {
        return false;
    }
    let mode = data[0];
    let n = (u16::from_le_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
    let (json, st) = data[3..].split_at(n);
    let dims = ModelDims::new(2, 8, 12).unwrap();
    if mode & 1 == 0 {
        let p = dir.join("adapter.safetensors");
        std::fs::write(&p, st).unwrap();
        let jp = dir.join("adapter.json");
        if mode & 2 == 0 {
            std::fs::write(&jp, json).unwrap();
        } else {
            let _ = std::fs::remove_file(&jp);
        }
        load_gift(&p, &dims).is_ok()
    } else {
        std::fs::write(dir.join("adapter_model.safetensors"), st).unwrap();
        std::fs::write(dir.join("adapter_config.json"), json).unwrap();
        load_peft(dir, &dims).is_ok()
    }
}

#[test]
fn adapter_inputs() {
    let dir = scratch("adapter");
    let all = inputs("adapter");
    assert!(all.len() >= 4);
    for (name, data) in &all {
        let ok = adapter(&dir, data);
        if ["gift_with_json", "gift_no_json", "gift_shared", "peft"].contains(&name.as_str()) {
            assert!(ok, "seed {name} does not load");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn safetensors_inputs() {
    let dir = scratch("st");
    let all = inputs("safetensors");
    assert!(all.len() >= 2);
    for (name, data) in &all {
        if data.len() < 2 {
            continue;
        }
        let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
        let (json, st) = data[2..].split_at(n);
        std::fs::write(dir.join("config.json"), json).unwrap();
        std::fs::write(dir.join("model.safetensors"), st).unwrap();
        let r = LlamaWeights::from_safetensors_dir(&dir);
        if let Ok(w) = &r {
            w.validate().unwrap();
        }
        if name == "tiny_llama" {
            assert!(r.is_ok(), "{name}: {:?}", r.err());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

struct Bytes;
impl Encode for Bytes {
    fn encode(&self, text: &str) -> wegeft::Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }
}

#[test]
fn jsonl_inputs() {
    let all = inputs("jsonl");
    assert!(all.len() >= 3);
    for (name, data) in &all {
        let Some((&first, rest)) = data.split_first() else {
            continue;
        };
        let seq = (first & 0x3f) as usize;
        let enc: Option<&dyn Encode> = if first & 0x40 != 0 { Some(&Bytes) } else { None };
        let r = parse_jsonl(Path::new("fuzz.jsonl"), rest, enc, seq);
        if let Ok(ex) = &r {
            let refs: Vec<_> = ex.iter().take(8).collect();
            make_batch(&refs, 0).unwrap();
        }
        assert!(r.is_ok(), "seed {name}: {:?}", r.err());
    }
}
