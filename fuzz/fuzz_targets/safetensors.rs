//! Hugging Face checkpoint loader: the bytes become `config.json` and `model.safetensors` of
//! a directory, loaded with `LlamaWeights::from_safetensors_dir`. Input: a little-endian u16
//! length `n`, `n` bytes of `config.json`, then the safetensors bytes. Must return `Err`,
//! never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use wegeft::model::LlamaWeights;

fn scratch() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("wegeft-fuzz-st-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (json, st) = data[2..].split_at(n);
    let dir = scratch();
    std::fs::write(dir.join("config.json"), json).unwrap();
    std::fs::write(dir.join("model.safetensors"), st).unwrap();
    if let Ok(w) = LlamaWeights::from_safetensors_dir(&dir) {
        w.validate().expect("loaded weights must validate");
    }
});
