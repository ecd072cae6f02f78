//! JSONL training data: `parse_jsonl` on any bytes, with and without a tokenizer (a byte
//! encoder), at a sequence length from the first byte; every example must then batch.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use wegeft::train::data::{make_batch, parse_jsonl, Encode};

struct Bytes;
impl Encode for Bytes {
    fn encode(&self, text: &str) -> wegeft::Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let seq = (first & 0x3f) as usize;
    let enc: Option<&dyn Encode> = if first & 0x40 != 0 { Some(&Bytes) } else { None };
    if let Ok(ex) = parse_jsonl(Path::new("fuzz.jsonl"), rest, enc, seq) {
        assert!(!ex.is_empty());
        for e in &ex {
            assert!(e.ids.len() <= seq && e.ids.len() == e.target.len() && e.count() > 0);
        }
        let refs: Vec<_> = ex.iter().take(8).collect();
        let b = make_batch(&refs, 0).expect("parsed examples must batch");
        assert_eq!(b.ids.len(), b.batch * b.seq);
    }
});
