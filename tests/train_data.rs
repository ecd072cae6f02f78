//! Training data: JSONL records, loss masks, batching order, the arithmetic task's splits.

use std::collections::HashSet;

use wegeft::train::arithmetic::{self, split_of, Problem, Split};
use wegeft::train::data::{make_batch, read_jsonl, Batcher, Encode, Example};
use wegeft::Result;

/// One token per byte, offset by 10.
struct Bytes;
impl Encode for Bytes {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(|b| b as u32 + 10).collect())
    }
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("wegeft-data-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn records_and_loss_masks() {
    let p = write(
        "ok.jsonl",
        "{\"tokens\": [1, 2, 3, 4]}\n\n{\"text\": \"ab\"}\n{\"prompt\": \"xy\", \"completion\": \"z\"}\n",
    );
    let ex = read_jsonl(&p, Some(&Bytes), 3).unwrap();
    assert_eq!(ex.len(), 3);
    // Cut to 3 tokens; the loss on every next token.
    assert_eq!(ex[0], Example { ids: vec![1, 2, 3], target: vec![false, true, true] });
    assert_eq!(ex[1], Example { ids: vec![107, 108], target: vec![false, true] });
    // The loss on the completion only.
    assert_eq!(ex[2], Example { ids: vec![130, 131, 132], target: vec![false, false, true] });
    // A batch: right-padded, labels shifted, -1 where nothing is predicted.
    let b = make_batch(&[&ex[0], &ex[1], &ex[2]], 0).unwrap();
    assert_eq!((b.batch, b.seq), (3, 3));
    assert_eq!(b.ids, vec![1, 2, 3, 107, 108, 0, 130, 131, 132]);
    assert_eq!(b.labels, vec![2, 3, -1, 108, -1, -1, -1, 132, -1]);
    assert_eq!(b.count(), 4);
    let _ = std::fs::remove_file(&p);
}

#[test]
fn bad_records_name_the_line() {
    for (i, text) in [
        "{\"tokens\": [1, 2]}\n{\"tokens\": [1], \"text\": \"a\"}\n",
        "{\"tokens\": [1, 2]}\nnot json\n",
        "{\"tokens\": [1, 2]}\n{\"prompt\": \"a\"}\n",
        "{\"tokens\": [1, 2]}\n{\"tokens\": [7]}\n",
    ]
    .iter()
    .enumerate()
    {
        let p = write(&format!("bad{i}.jsonl"), text);
        let e = read_jsonl(&p, Some(&Bytes), 8).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let _ = std::fs::remove_file(&p);
    }
    // Text without a tokenizer, no records, a missing file.
    let p = write("notok.jsonl", "{\"text\": \"a b\"}\n");
    assert!(read_jsonl(&p, None, 8).is_err());
    let p2 = write("empty.jsonl", "\n");
    assert!(read_jsonl(&p2, None, 8).is_err());
    assert!(read_jsonl(std::path::Path::new("/nonexistent.jsonl"), None, 8)
        .unwrap_err()
        .to_string()
        .contains("/nonexistent.jsonl"));
    let _ = std::fs::remove_file(&p);
    let _ = std::fs::remove_file(&p2);
}

#[test]
fn batches_in_file_order_or_shuffled() {
    let mut b = Batcher::new(5, 2, None).unwrap();
    let order: Vec<usize> = (0..5).flat_map(|_| b.next_indices()).collect();
    assert_eq!(order, vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
    let run = |seed| {
        let mut b = Batcher::new(50, 5, Some(seed)).unwrap();
        (0..20).flat_map(|_| b.next_indices()).collect::<Vec<_>>()
    };
    let (a, a2, c) = (run(1), run(1), run(2));
    assert_eq!(a, a2, "seeded shuffle is deterministic");
    assert_ne!(a, c);
    // Each pass is a permutation.
    for pass in a.chunks(50) {
        let set: HashSet<_> = pass.iter().collect();
        assert_eq!(set.len(), 50);
    }
    assert_ne!(&a[..50], &(0..50).collect::<Vec<_>>()[..]);
    assert!(Batcher::new(0, 2, None).is_err() && Batcher::new(3, 0, None).is_err());
}

#[test]
fn arithmetic_splits_are_disjoint_and_seeded() {
    let train = arithmetic::problems(Split::Train, 0, 2000).unwrap();
    let held = arithmetic::problems(Split::HeldOut, 0, 500).unwrap();
    let ts: HashSet<(u32, u32)> = train.iter().map(|p| (p.a, p.b)).collect();
    assert!(held.iter().all(|p| !ts.contains(&(p.a, p.b))), "a held-out problem is in the training split");
    assert!(train.iter().chain(&held).all(|p| (100..=999).contains(&p.a) && (100..=999).contains(&p.b)));
    assert!(held.iter().all(|p| split_of(p.a, p.b) == Split::HeldOut));
    assert_eq!(train, arithmetic::problems(Split::Train, 0, 2000).unwrap());
    assert_ne!(train[..20], arithmetic::problems(Split::Train, 1, 20).unwrap()[..]);
    // About 1 in 8 of all pairs is held out.
    let n_held = (100..1000)
        .flat_map(|a| (100..1000).map(move |b| (a, b)))
        .filter(|&(a, b)| split_of(a, b) == Split::HeldOut)
        .count();
    let frac = n_held as f64 / 810_000.0;
    assert!((0.11..0.14).contains(&frac), "{frac}");
    let p = Problem { a: 345, b: 678 };
    assert_eq!(p.question(), "What is 345 + 678?");
    assert_eq!(p.answer(), "1023");
    assert!(arithmetic::is_correct(&p, " 1023\n") && !arithmetic::is_correct(&p, "1024"));
}
