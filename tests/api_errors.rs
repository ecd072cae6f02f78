//! The public API of the model, adapter, data, trainer and checkpoint modules called with
//! random bad arguments (lengths, ranks, token ids, module indices, dtypes, byte soup): every
//! call returns, an invalid one as an `Err`, and nothing panics. (The layer functions and
//! matrix views have the same properties in tests/cpu_layer.rs.)

#[path = "common/tiny.rs"]
mod tiny;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use proptest::prelude::*;
use wegeft::adapter::{Adapter, AdapterConfig, ModelDims, Module};
use wegeft::cpu::Cpu;
use wegeft::model::llama::{Batch, HostAdapter, HostWeights, Llama};
use wegeft::model::weights::gguf::{dequantize, GgmlType, GgufFile};
use wegeft::model::weights::unpermute_qk_rows;
use wegeft::model::{LlamaWeights, Tensor, Tokenizer};
use wegeft::train::checkpoint::Checkpoint;
use wegeft::train::data::{make_batch, parse_jsonl, Batcher, Example};
use wegeft::train::optim::{AdamW, AdamWConfig};
use wegeft::train::trainer::Trainer;

struct Fixture {
    model: Llama<Cpu>,
    host: HostWeights,
    tok: Tokenizer,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let g = GgufFile::from_bytes("tiny.gguf", tiny::gguf_bytes()).unwrap();
        let host = HostWeights::from_llama(LlamaWeights::from_gguf_file(&g).unwrap()).unwrap();
        let model = Llama::new(&Cpu, &host).unwrap();
        Fixture {
            model,
            host,
            tok: Tokenizer::from_gguf_file(&g).unwrap(),
        }
    })
}

/// Runs `f`; a panic fails the property with `what`.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| TestCaseError::fail(format!("{what} panicked")))
}

fn ids_strategy() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(prop_oneof![8 => 0u32..97, 1 => 97u32..200, 1 => Just(u32::MAX)], 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn model_calls_with_bad_batches(
        batch in 0usize..4, seq in 0usize..6, ids in ids_strategy(), labels in prop::collection::vec(-3i32..100, 0..12)
    ) {
        let f = fixture();
        let b = Batch { batch, seq, ids: ids.clone(), labels: labels.clone() };
        let valid = batch > 0 && seq > 0 && seq <= tiny::CONTEXT && ids.len() == batch * seq && labels.len() == batch * seq
            && ids.iter().all(|&i| (i as usize) < tiny::VOCAB)
            && labels.iter().all(|&l| l == -1 || (0..tiny::VOCAB as i32).contains(&l));
        let r = no_panic("loss", || f.model.loss(&Cpu, None, &b))?;
        if !valid {
            prop_assert!(r.is_err(), "accepted {b:?}");
        }
        let mut grads = Vec::new();
        let ad = HostAdapter::shared(2, 1.0, tiny::LAYERS, vec![(0, vec![0.1; 32], vec![0.1; 32])]).unwrap();
        let a = ad.upload(&Cpu, &f.model.dims).unwrap();
        let r = no_panic("loss_and_grad", || f.model.loss_and_grad(&Cpu, &a, &b, &mut grads))?;
        prop_assert!(r.is_err(), "loss_and_grad without gradient buffers succeeded");
        let r = no_panic("score", || f.model.score(&Cpu, Some(&a), &ids))?;
        let ids_valid = !ids.is_empty() && ids.iter().all(|&i| (i as usize) < tiny::VOCAB);
        prop_assert_eq!(r.is_ok(), ids_valid, "score {:?}", ids);
        let r = no_panic("generate", || f.model.generate(&Cpu, None, &ids, seq, &[0]))?;
        if !ids_valid {
            prop_assert!(r.is_err());
        }
        let prompts: Vec<Vec<u32>> = (0..batch).map(|k| ids[..ids.len().saturating_sub(k)].to_vec()).collect();
        let _ = no_panic("generate_batch", || f.model.generate_batch(&Cpu, None, &prompts, 2, &[]))?;
        let r = no_panic("new_cache", || f.model.new_cache(&Cpu, batch, seq))?;
        if let Ok(mut c) = r {
            let r = no_panic("forward_cached", || f.model.forward_cached(&Cpu, None, &ids, &mut c))?;
            if ids.len() % batch != 0 || ids.len() / batch > seq || !ids_valid {
                prop_assert!(r.is_err());
            }
        } else {
            prop_assert!(batch == 0 || seq == 0);
        }
        let _ = no_panic("decode", || f.tok.decode(&ids, true))?;
    }

    #[test]
    fn adapters_with_bad_shapes(
        rank in 0usize..4, module in 0usize..9, phi_len in 0usize..80, psi_len in 0usize..80,
        site in prop::option::of(0usize..3), layers in 0usize..4, dropout in -0.5f32..1.5
    ) {
        let f = fixture();
        let d = &f.model.dims;
        let mut sites = vec![[None; 7]; layers];
        if let (Some(p), Some(row)) = (site, sites.first_mut()) {
            row[module % 7] = Some(p);
        }
        let ad = HostAdapter { rank, scale: 1.0, pairs: vec![(module, vec![0.0; phi_len], vec![0.0; psi_len])], sites, dropout };
        let d_in = if module < 7 { d.module_dims(module).0 } else { 0 };
        let valid = rank > 0 && module < 7 && phi_len == d_in * rank && psi_len == d_in * rank && layers == d.layers
            && (0.0..1.0).contains(&dropout) && site.map_or(true, |p| p == 0);
        let r = no_panic("HostAdapter::check", || ad.check(d))?;
        prop_assert_eq!(r.is_ok(), valid, "check {:?}", r);
        let r = no_panic("HostAdapter::upload", || ad.upload(&Cpu, d))?;
        prop_assert_eq!(r.is_ok(), valid);
        let _ = no_panic("HostAdapter::shared", || HostAdapter::shared(rank, 1.0, layers, ad.pairs.clone()))?;
        // Trainer::resume with moments of the wrong lengths.
        if valid {
            let m = vec![(vec![0.0; phi_len + 1], vec![0.0; psi_len])];
            let r = no_panic("Trainer::resume", || Trainer::resume(&Cpu, &f.model, &ad, AdamWConfig::default(), 3, &m, &m))?;
            prop_assert!(r.is_err());
            let r = no_panic("Trainer::resume", || Trainer::resume(&Cpu, &f.model, &ad, AdamWConfig::default(), 3, &[], &[]))?;
            prop_assert!(r.is_err());
        }
        // The library adapter: from_values with wrong lengths, configs with bad ranks.
        let dims = ModelDims::new(tiny::LAYERS, tiny::HIDDEN, tiny::FFN).unwrap();
        let cfg = no_panic("AdapterConfig::new", || AdapterConfig::new(rank, vec![Module::ALL[module % 7]]))?;
        prop_assert_eq!(cfg.is_ok(), rank > 0);
        if let Ok(cfg) = cfg {
            let r = no_panic("Adapter::from_values", || Adapter::from_values(cfg.clone(), dims, vec![(vec![0.0; phi_len], vec![0.0; psi_len])]))?;
            let want = dims.d_in(Module::ALL[module % 7]) * rank;
            prop_assert_eq!(r.is_ok(), phi_len == want && psi_len == want);
            let _ = no_panic("validate_for", || cfg.validate_for(&dims))?;
        }
        prop_assert!(no_panic("ModelDims::new", || ModelDims::new(layers, 0, 4))?.is_err());
    }

    #[test]
    fn data_and_optimiser_with_bad_lengths(
        n in 0usize..5, batch in 0usize..4, pos in 0usize..9, ids in ids_strategy(), flags in 0usize..12,
        sizes in prop::collection::vec(0usize..5, 0..4), plen in 0usize..5, seq in 0usize..5, bytes in prop::collection::vec(any::<u8>(), 0..64)
    ) {
        let r = no_panic("Batcher::new", || Batcher::new(n, batch, Some(1)))?;
        prop_assert_eq!(r.is_ok(), n > 0 && batch > 0);
        if let Ok(mut b) = r {
            let s = no_panic("Batcher::seek", || b.seek(2, pos))?;
            prop_assert_eq!(s.is_ok(), pos <= n);
            let idx = no_panic("next_indices", || b.next_indices())?;
            prop_assert!(idx.len() == batch && idx.iter().all(|&i| i < n));
        }
        let e = Example { ids: ids.clone(), target: vec![true; flags] };
        let r = no_panic("make_batch", || make_batch(&[&e], 0))?;
        prop_assert_eq!(r.is_ok(), !ids.is_empty() && ids.len() == flags);
        prop_assert!(no_panic("make_batch", || make_batch(&[], 0))?.is_err());
        let r = no_panic("parse_jsonl", || parse_jsonl(std::path::Path::new("x.jsonl"), &bytes, None, seq))?;
        if seq < 2 {
            prop_assert!(r.is_err());
        }
        let r = no_panic("AdamW::new", || AdamW::new(AdamWConfig::default(), &sizes))?;
        let mut opt = r.unwrap();
        let mut params: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &s)| vec![0.0; if i == 0 { plen } else { s }]).collect();
        let grads: Vec<Vec<f32>> = params.clone();
        let mut pr: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
        let gr: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let r = no_panic("AdamW::step", || opt.step(&mut pr, &gr))?;
        prop_assert_eq!(r.is_ok(), sizes.first().map_or(true, |&s| s == plen));
        let r = no_panic("AdamW::set_lr", || opt.set_lr(f64::from(seq as i32 - 2) * 1e-3))?;
        prop_assert_eq!(r.is_ok(), seq >= 2);
    }

    #[test]
    fn loaders_and_weight_helpers_with_bad_arguments(
        ty in 0u32..40, len in 0usize..300, out_len in 0usize..300, heads in 0usize..5, head_dim in 0usize..5,
        cols in 0usize..5, data_len in 0usize..60, shape in prop::collection::vec(0usize..5, 0..4),
        bytes in prop::collection::vec(any::<u8>(), 0..200)
    ) {
        if let Some(t) = GgmlType::from_id(ty) {
            let data = vec![0u8; len];
            let mut out = vec![0.0f32; out_len];
            let r = no_panic("dequantize", || dequantize(t, &data, &mut out))?;
            if t.bytes_for(out_len as u64) != Some(len as u64) {
                prop_assert!(r.is_err());
            }
        }
        let data = vec![0.0f32; data_len];
        let r = no_panic("unpermute_qk_rows", || unpermute_qk_rows(&data, heads, head_dim, cols))?;
        let ok = head_dim > 0 && head_dim % 2 == 0 && data_len == heads * head_dim * cols;
        prop_assert_eq!(r.is_ok(), ok, "{} x {} x {} over {}", heads, head_dim, cols, data_len);
        let r = no_panic("Tensor::new", || Tensor::new(shape.clone(), vec![0.0; data_len]))?;
        prop_assert_eq!(r.is_ok(), shape.iter().product::<usize>() == data_len);
        let r = no_panic("GgufFile::from_bytes", || GgufFile::from_bytes("soup.gguf", bytes.clone()))?;
        prop_assert!(r.is_err());
        let dir = std::env::temp_dir().join(format!("wegeft-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("ck-{len}-{data_len}.safetensors"));
        std::fs::write(&p, &bytes).unwrap();
        let r = no_panic("Checkpoint::load", || Checkpoint::load(&p))?;
        prop_assert!(r.is_err());
        let _ = std::fs::remove_file(&p);
    }
}

#[test]
fn host_weights_of_the_wrong_size_are_refused() {
    let f = fixture();
    let mut w = f.host.clone();
    w.embed.pop();
    assert!(Llama::new(&Cpu, &w).is_err());
    let mut w = f.host.clone();
    w.layers[1].proj[6].push(0.0);
    assert!(Llama::new(&Cpu, &w).is_err());
    let mut w = f.host.clone();
    w.layers.pop();
    assert!(Llama::new(&Cpu, &w).is_err());
    let mut w = f.host.clone();
    w.dims.heads = 3; // does not divide hidden / head_dim
    assert!(catch_unwind(AssertUnwindSafe(|| Llama::new(&Cpu, &w).is_err())).unwrap());
}
