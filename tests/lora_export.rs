//! A WeGeFT adapter exported as a standard LoRA (`HostAdapter::to_lora`, `save_peft_lora`,
//! `weights::gguf_lora`; the CLI's `export-lora`): `W + B A` is the merged weight at every
//! adapted site, on the tiny GGUFs of every supported family (those whose q/k rows llama.cpp
//! permutes and those it keeps in HF order), and the files hold exactly those factors in the
//! layouts PEFT and llama.cpp read.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use wegeft::adapter::lora::{peft_lora_key, save_peft_lora, Lora};
use wegeft::model::llama::{Dims, HostAdapter};
use wegeft::model::weights::gguf::{GgmlType, GgufValue};
use wegeft::model::weights::{gguf_lora, permute_qk_rows};
use wegeft::model::{GgufFile, LlamaWeights};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// The tiny GGUFs, and whether llama.cpp stores their q/k rows permuted (Llama-converted
/// architectures) or in HF order (Qwen).
fn models() -> Vec<(PathBuf, bool)> {
    vec![
        (data("llama3/tiny.gguf"), true),
        (data("granite/tiny.gguf"), true),
        (data("smollm3/tiny.gguf"), true),
        (data("qwen/qwen2/tiny.gguf"), false),
        (data("qwen/qwen3/tiny.gguf"), false),
    ]
}

/// One pair per module type for all seven, rank 3, scale 0.75, values spread over [-0.15, 0.15).
fn adapter(dims: &Dims) -> HostAdapter {
    let rank = 3;
    let pairs = (0..7)
        .map(|m| {
            let (d_in, _) = dims.module_dims(m);
            let v = |seed: usize| {
                (0..d_in * rank).map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.3).collect()
            };
            (m, v(2 * m), v(2 * m + 1))
        })
        .collect();
    HostAdapter::shared(rank, 0.75, dims.layers, pairs).unwrap()
}

/// `W + B A` (`d_out x d_in`, row-major).
fn plus_ba(w: &[f32], b: &[f32], a: &[f32], d_out: usize, d_in: usize, r: usize) -> Vec<f32> {
    let mut out = w.to_vec();
    for i in 0..d_out {
        for j in 0..d_in {
            out[i * d_in + j] += (0..r).map(|k| b[i * r + k] * a[k * d_in + j]).sum::<f32>();
        }
    }
    out
}

fn assert_near(what: &str, got: &[f32], want: &[f32], base: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = base.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    let err = got.iter().zip(want).fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(err <= 2e-6 * scale, "{what}: |W + BA - merged| = {err}, |W| up to {scale}");
    assert!(got.iter().zip(base).any(|(g, b)| (g - b).abs() > 1e-4 * scale), "{what}: nothing changed");
}

/// `W + B A` equals the merge at every site, for every family; `A` is `psi` and `B` has
/// WeGeFT's scale in it.
#[test]
fn lora_factors_give_the_merged_weights() {
    for (path, _) in models() {
        let w = LlamaWeights::load(&path).unwrap();
        let dims = Dims::from_config(&w.config);
        let ad = adapter(&dims);
        let lora = ad.to_lora(&w).unwrap();
        assert_eq!((lora.rank, lora.n_layers, lora.sites.len()), (3, dims.layers, 7 * dims.layers));
        let mut merged = w.clone();
        ad.merge_into(&mut merged).unwrap();
        for s in &lora.sites {
            let what = format!("{} {}", path.display(), s.module.key(s.layer));
            let m = s.module.index();
            assert_eq!((s.d_in, s.d_out), dims.module_dims(m), "{what}");
            assert!(s.a == ad.pairs[m].2, "{what}: A is not psi");
            let base = &w.layers[s.layer].linear(s.module.name()).unwrap().data;
            let want = &merged.layers[s.layer].linear(s.module.name()).unwrap().data;
            assert_near(&what, &plus_ba(base, &s.b, &s.a, s.d_out, s.d_in, 3), want, base);
        }
    }
}

/// The llama.cpp file: adapter metadata for the source's architecture, and per site
/// `lora_a` (`ne = [d_in, r]`) and `lora_b` (`ne = [r, d_out]`) such that the file's own
/// weight plus `lora_b lora_a` is the merged weight as llama.cpp stores it (q/k rows permuted
/// where it permutes them).
#[test]
fn gguf_lora_is_what_llama_cpp_adds_to_its_weights() {
    for (path, permutes) in models() {
        let src = GgufFile::open(&path).unwrap();
        let w = LlamaWeights::from_gguf_file(&src).unwrap();
        let c = w.config.clone();
        let dims = Dims::from_config(&c);
        let ad = adapter(&dims);
        let lora = ad.to_lora(&w).unwrap();
        let back = GgufFile::from_bytes("lora.gguf", gguf_lora(&src, &c, &lora).unwrap().to_bytes().unwrap()).unwrap();
        let name = path.display();
        let s = |k: &str| back.get_str(k).unwrap().to_string();
        assert_eq!(s("general.architecture"), src.get_str("general.architecture").unwrap(), "{name}");
        assert_eq!((s("general.type"), s("adapter.type")), ("adapter".into(), "lora".into()), "{name}");
        assert_eq!(back.get("adapter.lora.alpha"), Some(&GgufValue::F32(3.0)), "{name}");
        assert_eq!(back.tensors().len(), 2 * lora.sites.len(), "{name}");
        let mut merged = w.clone();
        ad.merge_into(&mut merged).unwrap();
        for site in &lora.sites {
            let module = site.module.name();
            let field = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"][site.module.index()];
            let base_name = format!("blk.{}.{field}.weight", site.layer);
            let (a, b) = (back.tensor_info(&format!("{base_name}.lora_a")).unwrap(), back.tensor_info(&format!("{base_name}.lora_b")).unwrap());
            assert_eq!((a.ty, b.ty), (GgmlType::F32, GgmlType::F32));
            assert_eq!(a.ne, vec![site.d_in as u64, 3], "{name} {base_name}");
            assert_eq!(b.ne, vec![3, site.d_out as u64], "{name} {base_name}");
            let (_, a) = back.tensor_f32(&format!("{base_name}.lora_a")).unwrap();
            let (_, b) = back.tensor_f32(&format!("{base_name}.lora_b")).unwrap();
            let (_, file_w) = src.tensor_f32(&base_name).unwrap();
            let heads = match module {
                "q_proj" if permutes => Some(c.num_attention_heads),
                "k_proj" if permutes => Some(c.num_key_value_heads),
                _ => None,
            };
            let merged_w = &merged.layers[site.layer].linear(module).unwrap().data;
            let want = match heads {
                Some(h) => permute_qk_rows(merged_w, h, c.head_dim, site.d_in).unwrap(),
                None => merged_w.clone(),
            };
            assert_near(&format!("{name} {base_name}"), &plus_ba(&file_w, &b, &a, site.d_out, site.d_in, 3), &want, &file_w);
        }
    }
}

/// The PEFT directory: `lora_alpha = r`, the targeted module names, and exactly one
/// `lora_A`/`lora_B` pair per site with the exported values.
#[test]
fn peft_lora_directory_holds_the_factors() {
    let path = data("llama3/tiny.gguf");
    let w = LlamaWeights::load(&path).unwrap();
    let dims = Dims::from_config(&w.config);
    let mut ad = adapter(&dims);
    // q, v and down only.
    for row in &mut ad.sites {
        for m in [1, 3, 4, 5] {
            row[m] = None;
        }
    }
    let lora = ad.to_lora(&w).unwrap();
    let dir = common::fresh_dir("lora-peft");
    save_peft_lora(&lora, &dir).unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_u64()), (Some(3), Some(3)));
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj", "down_proj"]));
    assert_eq!(cfg["use_dora"], false);
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let keys: HashSet<String> = st.names().into_iter().map(String::from).collect();
    let want: HashSet<String> = lora
        .sites
        .iter()
        .flat_map(|s| [peft_lora_key(s.layer, s.module, "A"), peft_lora_key(s.layer, s.module, "B")])
        .collect();
    assert_eq!(keys, want);
    assert!(keys.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(keys.contains("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    for s in &lora.sites {
        let get = |f: &str| {
            let t = st.tensor(&peft_lora_key(s.layer, s.module, f)).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::F32);
            (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<f32>>())
        };
        assert_eq!(get("A"), (vec![3, s.d_in], s.a.clone()));
        assert_eq!(get("B"), (vec![s.d_out, 3], s.b.clone()));
    }
    // Sites on some layers only: `target_modules` becomes one pattern naming exactly those.
    let mut sub = ad.clone();
    sub.sites[0][2] = None; // v_proj of layer 0
    let lora = sub.to_lora(&w).unwrap();
    save_peft_lora(&lora, &dir).unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    let pattern = cfg["target_modules"].as_str().expect("a pattern").to_string();
    for s in &lora.sites {
        assert!(pattern.contains(&s.module.key(s.layer).replace('.', "\\.")), "{pattern} misses {}", s.module.key(s.layer));
    }
    assert!(!pattern.contains("layers\\.0\\.self_attn\\.v_proj"), "{pattern}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad exports are errors naming the problem: a model the adapter was not made for (the
/// site's weight has another shape in the GGUF), a malformed `Lora`.
#[test]
fn bad_exports_are_errors() {
    let llama = GgufFile::open(data("llama3/tiny.gguf")).unwrap();
    // SmolLM3's tiny model is 32 wide, Llama 3's 64.
    let other = GgufFile::open(data("smollm3/tiny.gguf")).unwrap();
    let w = LlamaWeights::from_gguf_file(&llama).unwrap();
    let lora = adapter(&Dims::from_config(&w.config)).to_lora(&w).unwrap();
    let e = gguf_lora(&other, &w.config, &lora).unwrap_err().to_string();
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("LoRA site"), "{e}");
    let mut extra = lora.clone();
    extra.n_layers = 100; // a site beyond a smaller model
    extra.sites[0].layer = 99;
    let e = gguf_lora(&llama, &w.config, &extra).unwrap_err().to_string();
    assert!(e.contains("blk.99"), "{e}");
    let bad = |f: &dyn Fn(&mut Lora)| {
        let mut l = lora.clone();
        f(&mut l);
        let dir = common::fresh_dir("lora-bad");
        let e = save_peft_lora(&l, &dir).unwrap_err().to_string();
        assert!(!dir.join("adapter_config.json").exists(), "{e}: a file was written");
        let _ = std::fs::remove_dir_all(&dir);
        e
    };
    assert!(bad(&|l| l.rank = 0).contains("rank"));
    assert!(bad(&|l| {
        l.sites[3].b.pop();
    }).contains("lora B"));
    assert!(bad(&|l| l.sites[2].a.push(0.0)).contains("lora A"));
    assert!(bad(&|l| l.sites[1] = l.sites[0].clone()).contains("twice"));
    assert!(bad(&|l| l.sites[0].layer = l.n_layers).contains("n_layers"));
    // An adapter for another model is refused before anything is computed.
    let small = LlamaWeights::from_gguf_file(&other).unwrap();
    assert!(adapter(&Dims::from_config(&small.config)).to_lora(&w).is_err());
}

/// What PEFT and llama.cpp computed with this crate's exports (scripts/lora_reference.py, data
/// in tests/data/lora/<family>/): the crate still writes the same factors (the PEFT directory
/// from the HF checkpoint, the llama.cpp file from the GGUF), and its own WeGeFT model — the
/// adapter applied as this crate applies it — gives the logits PEFT gave with the LoRA (within
/// f32 rounding) and llama.cpp gave with it (within llama.cpp's own f16 distance, which the
/// script measured on the model without an adapter).
#[test]
fn exports_are_what_peft_and_llama_cpp_ran() {
    use wegeft::adapter::io::load_gift;
    use wegeft::cpu::Cpu;
    use wegeft::model::llama::{HostWeights, Llama};
    for (family, model_dir) in [("llama3", "llama3"), ("qwen3", "qwen/qwen3"), ("granite", "granite")] {
        let (src, rec) = (data(model_dir), data("lora").join(family));
        let hf = LlamaWeights::load(src.join("hf")).unwrap();
        let dims = Dims::from_config(&hf.config);
        let ad = HostAdapter::from_adapter(&load_gift(&src.join("train_final.safetensors"), &dims.adapter_dims().unwrap()).unwrap()).unwrap();

        // The PEFT directory, re-exported: the same config, the same factors.
        let dir = common::fresh_dir(&format!("lora-{family}"));
        save_peft_lora(&ad.to_lora(&hf).unwrap(), &dir).unwrap();
        let json = |d: &std::path::Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(d.join("adapter_config.json")).unwrap()).unwrap() };
        assert_eq!(json(&dir), json(&rec.join("peft")), "{family}");
        let (now, then) = (std::fs::read(dir.join("adapter_model.safetensors")).unwrap(), std::fs::read(rec.join("peft/adapter_model.safetensors")).unwrap());
        let (now, then) = (safetensors::SafeTensors::deserialize(&now).unwrap(), safetensors::SafeTensors::deserialize(&then).unwrap());
        let mut names = now.names();
        names.sort();
        let mut then_names = then.names();
        then_names.sort();
        assert_eq!(names, then_names, "{family}");
        let f32s = |b: &[u8]| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<f32>>();
        for n in names {
            let (a, b) = (now.tensor(n).unwrap(), then.tensor(n).unwrap());
            assert_eq!(a.shape(), b.shape(), "{family} {n}");
            assert_close(&format!("{family} {n}"), &f32s(a.data()), &f32s(b.data()));
        }
        let _ = std::fs::remove_dir_all(&dir);

        // The llama.cpp file, re-exported from the GGUF: the same keys and tensors.
        let gsrc = GgufFile::open(src.join("tiny.gguf")).unwrap();
        let gw = LlamaWeights::from_gguf_file(&gsrc).unwrap();
        let now = GgufFile::from_bytes("now.gguf", gguf_lora(&gsrc, &gw.config, &ad.to_lora(&gw).unwrap()).unwrap().to_bytes().unwrap()).unwrap();
        let then = GgufFile::open(rec.join("lora.gguf")).unwrap();
        assert_eq!(now.metadata(), then.metadata(), "{family}");
        assert_eq!(now.tensors().len(), then.tensors().len(), "{family}");
        for (a, b) in now.tensors().iter().zip(then.tensors()) {
            assert_eq!((&a.name, &a.ne, a.ty), (&b.name, &b.ne, b.ty), "{family}");
            assert_close(&format!("{family} {}", a.name), &now.tensor_f32(&a.name).unwrap().1, &then.tensor_f32(&b.name).unwrap().1);
        }

        // The crate's WeGeFT model against what the runtimes computed with the LoRA.
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(rec.join("logits.json")).unwrap()).unwrap();
        let ids: Vec<u32> = r["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let model = Llama::from_host(&Cpu, HostWeights::from_llama(hf.clone()).unwrap()).unwrap();
        let (logits, _) = model.score(&Cpu, Some(&ad.upload(&Cpu, &model.dims).unwrap()), &ids).unwrap();
        let v = model.dims.vocab;
        let scale = r["scale"].as_f64().unwrap();
        let distance = |runtime: &str| {
            let mut worst = 0.0f64;
            for (k, p) in r["positions"].as_array().unwrap().iter().enumerate() {
                let p = p.as_u64().unwrap() as usize;
                let want = r["logits"][runtime][k].as_array().unwrap();
                for (g, w) in logits[p * v..(p + 1) * v].iter().zip(want) {
                    worst = worst.max((*g as f64 - w.as_f64().unwrap()).abs() / scale);
                }
            }
            worst
        };
        let d = &r["distances"];
        let cpp_noise = 2.0 * d["llama_cpp_base"].as_f64().unwrap() + 1e-4;
        let (reference, peft, cpp) = (distance("reference"), distance("peft"), distance("llama_cpp"));
        println!("{family}: ours vs float64 reference {reference:.1e}, vs PEFT {peft:.1e}, vs llama.cpp {cpp:.1e} (allowed {cpp_noise:.1e})");
        assert!(reference <= 1e-5 && peft <= 1e-5, "{family}: reference {reference:e}, PEFT {peft:e}");
        assert!(cpp <= cpp_noise, "{family}: llama.cpp {cpp:e}");
        // The adapter matters here by far more than those distances.
        assert!(distance("reference_base") >= 10.0 * cpp_noise.max(1e-5), "{family}: the adapter changes too little");
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    let err = got.iter().zip(want).fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(err <= 1e-6 * scale, "{what}: {err} apart (largest {scale})");
}
