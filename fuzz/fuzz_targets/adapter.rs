//! Adapter loader: the bytes become the files of an adapter, which is then loaded for a tiny
//! model (2 layers, hidden 8, intermediate 12). Input: one mode byte, a little-endian u16
//! length `n`, `n` bytes of JSON, then the safetensors bytes. Mode bit 0: official layout
//! (`adapter.safetensors` + `adapter.json`) or PEFT layout (`adapter_config.json` +
//! `adapter_model.safetensors`); bit 1: leave the JSON out. Must return `Err`, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use wegeft::adapter::io::{load_gift, load_peft, save_gift, save_peft};
use wegeft::adapter::ModelDims;

fn scratch() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("wegeft-fuzz-adapter-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let mode = data[0];
    let n = (u16::from_le_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
    let (json, st) = data[3..].split_at(n);
    let dir = scratch();
    let dims = ModelDims::new(2, 8, 12).unwrap();
    let (res, out) = if mode & 1 == 0 {
        let p = dir.join("adapter.safetensors");
        let jp = dir.join("adapter.json");
        std::fs::write(&p, st).unwrap();
        if mode & 2 == 0 {
            std::fs::write(&jp, json).unwrap();
        } else {
            let _ = std::fs::remove_file(&jp);
        }
        (load_gift(&p, &dims), dir.join("out.safetensors"))
    } else {
        std::fs::write(dir.join("adapter_model.safetensors"), st).unwrap();
        std::fs::write(dir.join("adapter_config.json"), json).unwrap();
        (load_peft(&dir, &dims), dir.join("out"))
    };
    // What loads must save and load back to the same values.
    if let Ok(a) = res {
        let back = if mode & 1 == 0 {
            save_gift(&a, &out).and_then(|_| load_gift(&out, &dims))
        } else {
            save_peft(&a, &out).and_then(|_| load_peft(&out, &dims))
        };
        match back {
            Ok(b) => {
                assert_eq!(a.pairs().len(), b.pairs().len());
                for (p, q) in a.pairs().iter().zip(b.pairs()) {
                    assert_eq!(p.phi, q.phi);
                    assert_eq!(p.psi, q.psi);
                }
            }
            // The official layout cannot hold every sharing a PEFT file can; nothing else fails.
            Err(e) => assert!(mode & 1 == 0 && e.to_string().contains("GIFT layout"), "{e}"),
        }
    }
});
