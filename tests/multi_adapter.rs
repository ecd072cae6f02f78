//! Several adapters on one base model (`MultiAdapter`, `Llama::generate_multi`,
//! `Llama::forward_cached_multi`): every sequence's greedy tokens and logits equal those of
//! running its adapter alone. On a tiny random model (edge cases, bad input) and on the real
//! SmolLM2-135M (`$WEGEFT_MODEL`) with small random adapters written and read back in the
//! official GIFT layout and the PEFT-fork layout (scale alpha / r, sharing groups).

mod common;

use common::{rand_f32, tiny_weights};

use std::path::PathBuf;

use wegeft::adapter::{self, Adapter as FileAdapter, AdapterConfig, Module, ShareGroup, Sharing};
use wegeft::cpu::Cpu;
use wegeft::model::llama::{Dims, HostAdapter, HostWeights, Llama, MultiAdapter};
use wegeft::model::{LlamaWeights, Tokenizer};


fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

// ---- tiny model ----------------------------------------------------------------------------

fn tiny_dims() -> Dims {
    Dims { hidden: 32, layers: 2, heads: 4, kv_heads: 2, head_dim: 8, ffn: 48, vocab: 61, rope: wegeft::rope::Rope::new(10000.0), eps: 1e-5, window: None, full_layers: vec![], nope_layers: vec![] }
}


/// Rank-`r` pairs on `targets` (module indices); `shared`: one pair per module across layers.
fn tiny_adapter(d: &Dims, targets: &[usize], r: usize, shared: bool, scale: f32, seed: u64) -> HostAdapter {
    let mut pairs = Vec::new();
    let mut sites = vec![[None; 7]; d.layers];
    let mut s = seed;
    for &m in targets {
        let (din, _) = d.module_dims(m);
        let copies = if shared { 1 } else { d.layers };
        for c in 0..copies {
            s += 2;
            pairs.push((m, rand_f32(s, din * r, 0.4), rand_f32(s + 1, r * din, 0.4)));
            let idx = pairs.len() - 1;
            if shared {
                for row in sites.iter_mut() {
                    row[m] = Some(idx);
                }
            } else {
                sites[c][m] = Some(idx);
            }
        }
    }
    HostAdapter { rank: r, scale, pairs, sites, dropout: 0.0 }
}

/// Tokens and prefill logits of every prompt, batched with several adapters, against each
/// prompt with its own adapter alone (`-1`: no adapter).
fn check_against_alone(
    model: &Llama<Cpu>,
    hosts: &[HostAdapter],
    prompts: &[Vec<u32>],
    which: &[i32],
    max_new: usize,
    tol: f64,
) -> Vec<Vec<u32>> {
    let be = Cpu;
    let multi = MultiAdapter::upload(&be, &model.dims, hosts).unwrap();
    let alone: Vec<_> = hosts.iter().map(|h| h.upload(&be, &model.dims).unwrap()).collect();
    let pick = |a: i32| if a < 0 { None } else { Some(&alone[a as usize]) };
    let got = model.generate_multi(&be, &multi, prompts, which, max_new, &[]).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let want = model.generate(&be, pick(which[i]), p, max_new, &[]).unwrap();
        assert_eq!(got[i], want, "prompt {i} (adapter {}): batched tokens differ from the adapter alone", which[i]);
    }
    // Logits: all prompts of the first length in one cache, against each alone.
    let len = prompts[0].len();
    let same: Vec<usize> = (0..prompts.len()).filter(|&i| prompts[i].len() == len).collect();
    let ids: Vec<u32> = same.iter().flat_map(|&i| prompts[i].clone()).collect();
    let seq_idx: Vec<i32> = same.iter().map(|&i| which[i]).collect();
    let mut cache = model.new_cache(&be, same.len(), len + 2).unwrap();
    let v = model.dims.vocab;
    let mut logits = model.forward_cached_multi(&be, &multi, &seq_idx, &ids, &mut cache).unwrap();
    let next: Vec<u32> = (0..same.len()).map(|j| (j * 7 % v) as u32).collect();
    let logits2 = model.forward_cached_multi(&be, &multi, &seq_idx, &next, &mut cache).unwrap();
    logits.extend(logits2);
    for (j, &i) in same.iter().enumerate() {
        let mut c1 = model.new_cache(&be, 1, len + 2).unwrap();
        let mut want = model.forward_cached(&be, pick(which[i]), &prompts[i], &mut c1).unwrap();
        want.extend(model.forward_cached(&be, pick(which[i]), &[next[j]], &mut c1).unwrap());
        let n = same.len() * v;
        let got: Vec<f32> = [&logits[j * v..(j + 1) * v], &logits[n + j * v..n + (j + 1) * v]].concat();
        common::assert_close(&format!("logits of prompt {i} (adapter {})", which[i]), &f64s(&got), &f64s(&want), tol);
    }
    got
}

#[test]
fn tiny_model_batched_adapters_equal_each_alone() {
    let d = tiny_dims();
    let model = Llama::new(&Cpu, &tiny_weights(&d, 7, false)).unwrap();
    let hosts = vec![
        tiny_adapter(&d, &[0, 2], 3, true, 1.0, 100),
        tiny_adapter(&d, &[0, 1, 2, 3, 4, 5, 6], 5, false, 2.0, 200),
        tiny_adapter(&d, &[6], 2, true, 0.5, 300),
    ];
    let prompts: Vec<Vec<u32>> =
        vec![vec![1, 5, 9], vec![2, 6, 10], vec![3, 7, 11], vec![4, 8, 12], vec![5, 9, 13, 17, 21], vec![6, 10, 14, 18, 22]];
    let which = [0, 1, 2, -1, 1, 0];
    let out = check_against_alone(&model, &hosts, &prompts, &which, 6, 1e-5);
    // The adapters matter: each one changes the tokens of at least one of these prompts.
    let base = model.generate_batch(&Cpu, None, &prompts, 6, &[]).unwrap();
    assert!(out[0] != base[0] || out[5] != base[5], "adapter 0 changes nothing");
    assert!(out[1] != base[1] || out[4] != base[4], "adapter 1 changes nothing");
    // One adapter for everything, and no adapter at all.
    check_against_alone(&model, &hosts, &prompts, &[1; 6], 3, 1e-5);
    check_against_alone(&model, &hosts, &prompts, &[-1; 6], 3, 1e-5);
    // Deterministic.
    let multi = MultiAdapter::upload(&Cpu, &d, &hosts).unwrap();
    let a = model.generate_multi(&Cpu, &multi, &prompts, &which, 4, &[]).unwrap();
    let b = model.generate_multi(&Cpu, &multi, &prompts, &which, 4, &[]).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_multi_input_is_an_error_naming_it() {
    let d = tiny_dims();
    let model = Llama::new(&Cpu, &tiny_weights(&d, 7, false)).unwrap();
    let hosts = vec![tiny_adapter(&d, &[0], 3, true, 1.0, 1), tiny_adapter(&d, &[1], 2, true, 1.0, 2)];
    let multi = MultiAdapter::upload(&Cpu, &d, &hosts).unwrap();
    let prompts = vec![vec![1u32, 2], vec![3, 4]];
    let e = model.generate_multi(&Cpu, &multi, &prompts, &[0, 2], 2, &[]).unwrap_err().to_string();
    assert!(e.contains("adapter_of_prompt") && e.contains("entry 1 names adapter 2"), "{e}");
    let e = model.generate_multi(&Cpu, &multi, &prompts, &[0, -2], 2, &[]).unwrap_err().to_string();
    assert!(e.contains("entry 1 names adapter -2"), "{e}");
    let e = model.generate_multi(&Cpu, &multi, &prompts, &[0], 2, &[]).unwrap_err().to_string();
    assert!(e.contains("adapter_of_prompt"), "{e}");
    let mut cache = model.new_cache(&Cpu, 2, 4).unwrap();
    let e = model.forward_cached_multi(&Cpu, &multi, &[0], &[1, 2, 3, 4], &mut cache).unwrap_err().to_string();
    assert!(e.contains("adapter_of_seq"), "{e}");
    let e = MultiAdapter::<Cpu>::upload(&Cpu, &d, &[]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("adapters"), "{e}");
    let mut wrong = tiny_dims();
    wrong.hidden = 16;
    wrong.heads = 2;
    let e = MultiAdapter::upload(&Cpu, &wrong, &hosts).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("adapter 0"), "{e}");
    // A stack built for another model is refused by this one.
    let mut other = tiny_dims();
    other.layers = 3;
    let hosts3 = vec![tiny_adapter(&other, &[0], 3, true, 1.0, 1)];
    let m3 = MultiAdapter::upload(&Cpu, &other, &hosts3).unwrap();
    let e = model.generate_multi(&Cpu, &m3, &prompts, &[0, 0], 2, &[]).unwrap_err().to_string();
    assert!(e.contains("layers"), "{e}");
    // max_new = 0 and an empty prompt.
    assert_eq!(model.generate_multi(&Cpu, &multi, &prompts, &[0, 1], 0, &[]).unwrap(), vec![Vec::<u32>::new(); 2]);
    let e = model.generate_multi(&Cpu, &multi, &[vec![1], vec![]], &[0, 1], 2, &[]).unwrap_err().to_string();
    assert!(e.contains("prompt 1 is empty"), "{e}");
}

// ---- the real model ------------------------------------------------------------------------

fn model_path() -> PathBuf {
    let p = match std::env::var_os("WEGEFT_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    assert!(p.is_file(), "model {} not found: run `bash scripts/fetch-model.sh` (or set WEGEFT_MODEL)", p.display());
    p
}

/// A random adapter of `config` (every pair's phi and psi uniform in `(-mag, mag)`).
fn random_adapter(config: AdapterConfig, dims: adapter::ModelDims, seed: u64, mag: f32) -> FileAdapter {
    let r = config.rank;
    let vals = FileAdapter::pair_names(&config, &dims)
        .unwrap()
        .iter()
        .enumerate()
        .map(|(k, _)| {
            let shape = FileAdapter::new(config.clone(), dims).unwrap();
            let d_in = shape.pairs()[k].d_in;
            (rand_f32(seed + 2 * k as u64, d_in * r, mag), rand_f32(seed + 2 * k as u64 + 1, r * d_in, mag))
        })
        .collect();
    FileAdapter::from_values(config, dims, vals).unwrap()
}

#[test]
fn smollm2_batched_adapters_equal_each_alone() {
    let path = model_path();
    let weights = LlamaWeights::load(&path).unwrap();
    let model = Llama::from_host(&Cpu, HostWeights::from_llama(weights).unwrap()).unwrap();
    let tok = Tokenizer::from_gguf(&path).unwrap();
    let ad = model.dims.adapter_dims().unwrap();
    let dir = std::env::temp_dir().join(format!("wegeft_multi_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // 0: official GIFT layout (scale 1, one pair per module), rank 4 on q and v.
    let c0 = AdapterConfig::new(4, vec![Module::QProj, Module::VProj]).unwrap();
    let f0 = dir.join("a0.safetensors");
    adapter::io::save_gift(&random_adapter(c0, ad, 10, 0.05), &f0).unwrap();
    // 1: PEFT-fork layout, alpha 16 at rank 8 (s = 2), sharing groups over all seven modules.
    let mut c1 = AdapterConfig::new(8, Module::ALL.to_vec()).unwrap();
    c1.alpha = Some(16.0);
    c1.sharing = Sharing::Groups(vec![
        ShareGroup { modules: vec![Module::QProj, Module::KProj, Module::VProj], layers: None },
        ShareGroup { modules: vec![Module::GateProj, Module::UpProj], layers: Some(vec![0, 1, 2]) },
    ]);
    let f1 = dir.join("a1");
    adapter::io::save_peft(&random_adapter(c1, ad, 20, 0.02), &f1).unwrap();
    // 2: GIFT layout, rank 2 on down_proj (d_in = intermediate).
    let c2 = AdapterConfig::new(2, vec![Module::DownProj]).unwrap();
    let f2 = dir.join("a2.safetensors");
    adapter::io::save_gift(&random_adapter(c2, ad, 30, 0.05), &f2).unwrap();

    let hosts = vec![
        HostAdapter::from_adapter(&adapter::io::load_gift(&f0, &ad).unwrap()).unwrap(),
        HostAdapter::from_adapter(&adapter::io::load_peft(&f1, &ad).unwrap()).unwrap(),
        HostAdapter::from_adapter(&adapter::io::load_gift(&f2, &ad).unwrap()).unwrap(),
    ];
    assert_eq!(hosts[1].scale, 2.0);
    let _ = std::fs::remove_dir_all(&dir);

    let texts = ["The capital of France is", "Two plus two equals four and", "Once upon a time there", "def fibonacci(n):"];
    let mut prompts: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, false).unwrap()[..5].to_vec()).collect();
    prompts.push(tok.chat_prompt("What is 7 times 8?").unwrap());
    let which = [0, 1, 2, -1, 1];
    let out = check_against_alone(&model, &hosts, &prompts, &which, 6, 1e-4);
    // Each adapter changes the greedy continuation of its prompt.
    let base = model.generate_batch(&Cpu, None, &prompts, 6, &[]).unwrap();
    for i in [0, 1, 2] {
        let mut c = model.new_cache(&Cpu, 1, 8).unwrap();
        let up = hosts[which[i] as usize].upload(&Cpu, &model.dims).unwrap();
        let a = model.forward_cached(&Cpu, Some(&up), &prompts[i], &mut c).unwrap();
        let mut c = model.new_cache(&Cpu, 1, 8).unwrap();
        let b = model.forward_cached(&Cpu, None, &prompts[i], &mut c).unwrap();
        let diff = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff > 0.05, "adapter {} moves the logits of prompt {i} by only {diff}", which[i]);
    }
    eprintln!("base {base:?}\nmulti {out:?}");
}

// ---- the CLI -------------------------------------------------------------------------------

fn wegeft_bin(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_wegeft")).args(args).output().expect("run wegeft")
}

#[test]
fn cli_generate_with_several_adapters_equals_each_alone() {
    let model = model_path();
    let model = model.to_str().unwrap();
    let weights = LlamaWeights::load(model).unwrap();
    let dims = Dims::from_config(&weights.config).adapter_dims().unwrap();
    drop(weights);
    let dir = std::env::temp_dir().join(format!("wegeft_multi_cli_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("first.safetensors");
    let b = dir.join("second");
    adapter::io::save_gift(
        &random_adapter(AdapterConfig::new(4, vec![Module::QProj, Module::VProj]).unwrap(), dims, 40, 0.05),
        &a,
    )
    .unwrap();
    let mut cb = AdapterConfig::new(2, vec![Module::UpProj, Module::DownProj]).unwrap();
    cb.alpha = Some(8.0);
    adapter::io::save_peft(&random_adapter(cb, dims, 50, 0.05), &b).unwrap();
    let jsonl = dir.join("prompts.jsonl");
    std::fs::write(
        &jsonl,
        concat!(
            "{\"adapter\": 1, \"prompt\": \"Name a colour.\"}\n",
            "\n",
            "{\"adapter\": \"first.safetensors\", \"prompt\": \"Name a colour.\"}\n",
            "{\"adapter\": null, \"prompt\": \"What is 2 + 3?\"}\n",
        ),
    )
    .unwrap();
    let adapters = format!("{},{}", a.display(), b.display());
    let out = wegeft_bin(&[
        "generate", "--model", model, "--adapters", &adapters, "--prompts", jsonl.to_str().unwrap(), "--max-new", "5",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines.iter().map(|v| v["line"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 3, 4]);
    let singles: [(Option<&PathBuf>, &str); 3] =
        [(Some(&b), "Name a colour."), (Some(&a), "Name a colour."), (None, "What is 2 + 3?")];
    for (v, (ad, prompt)) in lines.iter().zip(singles) {
        let mut args = vec!["generate", "--model", model, "--prompt", prompt, "--max-new", "5"];
        let p;
        if let Some(ad) = ad {
            p = ad.display().to_string();
            args.extend(["--adapter", &p]);
        }
        let one = wegeft_bin(&args);
        assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
        assert_eq!(
            v["completion"].as_str().unwrap(),
            String::from_utf8(one.stdout).unwrap().trim_end_matches('\n'),
            "record {v}"
        );
    }
    // The two adapters disagree on the same prompt (the test would catch a mix-up).
    assert_ne!(lines[0]["tokens"], lines[1]["tokens"]);
    // Bad records: one line naming the record's line.
    for (bad, want) in [
        ("{\"adapter\": 2, \"prompt\": \"x\"}", "line 2: adapter 2 is not an index"),
        ("{\"adapter\": \"nope.safetensors\", \"prompt\": \"x\"}", "line 2: adapter \"nope.safetensors\""),
        ("{\"prompt\": \"x\"}", "line 2: no \"adapter\""),
        ("{\"adapter\": 0}", "line 2: missing field `prompt`"),
        ("not json", "line 2:"),
    ] {
        std::fs::write(&jsonl, format!("{{\"adapter\": 0, \"prompt\": \"ok\"}}\n{bad}\n")).unwrap();
        let out = wegeft_bin(&["generate", "--model", model, "--adapters", &adapters, "--prompts", jsonl.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want) && err.trim().lines().count() == 1, "{bad}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
