//! GGUF reader: any bytes -> `GgufFile::from_bytes`; on success every tensor is dequantized
//! and the Llama weights and the tokenizer are built from it. Must return `Err`, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wegeft::model::weights::gguf::GgufFile;
use wegeft::model::{LlamaWeights, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let Ok(g) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    for t in g.tensors() {
        let _ = g.tensor_f32(&t.name);
    }
    let _ = LlamaWeights::from_gguf_file(&g);
    if let Ok(tok) = Tokenizer::from_gguf_file(&g) {
        if let Ok(ids) = tok.encode("Hello 12 ab", false) {
            let _ = tok.decode(&ids, false);
        }
    }
});
