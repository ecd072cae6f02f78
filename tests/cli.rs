//! The `wegeft` binary end to end on SmolLM2-135M-Instruct (`bash scripts/fetch-model.sh`
//! or `$WEGEFT_MODEL`): score, finetune (the official run's first steps), eval, generate,
//! merge (the merged model scores like the adapter model), bench-step, and bad input.

mod common;

use common::{run_wegeft, wegeft_ok as ok};

use std::path::{Path, PathBuf};

use serde_json::Value;
use wegeft::model::weights::gguf::{GgmlType, GgufFile};
use wegeft::model::{LlamaWeights, LINEAR_MODULES};

fn model_path() -> PathBuf {
    let p = match std::env::var_os("WEGEFT_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    assert!(p.is_file(), "model {} not found: run `bash scripts/fetch-model.sh` (or set WEGEFT_MODEL)", p.display());
    p
}

fn fails(args: &[&str]) -> String {
    let out = run_wegeft(args);
    assert!(!out.status.success(), "wegeft {args:?} should fail, printed {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn fixture(name: &str) -> PathBuf {
    common::fixtures_dir().join("smollm2").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn score_prints_the_reference_numbers() {
    let m = model_path();
    let r: Value = serde_json::from_str(&std::fs::read_to_string(fixture("prompt_reference.json")).unwrap()).unwrap();
    let out: Value =
        serde_json::from_str(&ok(&["score", "--model", s(&m), "--text", "The capital of France is"])).unwrap();
    assert_eq!(out["ids"], r["ids"]);
    assert_eq!(out["argmax"], r["argmax_per_pos"]);
    let loss = out["loss"].as_f64().unwrap();
    let want = r["ce_loss_labels_eq_ids"].as_f64().unwrap();
    assert!((loss - want).abs() <= 1e-4 * want, "loss {loss} vs {want}");
    let top = out["top5_last"].as_array().unwrap();
    assert_eq!(top.len(), 5);
    for (g, w) in top.iter().zip(r["top10_last"].as_array().unwrap()) {
        assert_eq!(g[0], w[0]);
        assert!((g[1].as_f64().unwrap() - w[1].as_f64().unwrap()).abs() <= 1e-3, "{g} vs {w}");
    }
    // --tokens gives the same.
    let out2: Value =
        serde_json::from_str(&ok(&["score", "--model", s(&m), "--tokens", "504,3575,282,4649,314"])).unwrap();
    assert_eq!(out, out2);
}

#[test]
fn finetune_eval_merge_generate() {
    let m = model_path();
    let dir = common::fresh_dir("cli-ft");
    let log = dir.join("log.jsonl");
    let out = dir.join("adapter");
    // The official run's setup (train.json): rank 4, all targets, lr 5e-3, batch 2, seq 24.
    ok(&[
        "finetune",
        "--model",
        s(&m),
        "--data",
        s(&fixture("train.jsonl")),
        "--init-adapter",
        s(&fixture("init_adapter.safetensors")),
        "--lr",
        "5e-3",
        "--batch",
        "2",
        "--seq",
        "24",
        "--steps",
        "4",
        "--out",
        s(&out),
        "--log-json",
        s(&log),
    ]);
    let t: Value = serde_json::from_str(&std::fs::read_to_string(fixture("train.json")).unwrap()).unwrap();
    let lines: Vec<Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"].as_u64().unwrap(), i as u64);
        let (g, w) = (l["loss"].as_f64().unwrap(), t["losses"][i].as_f64().unwrap());
        assert!((g - w).abs() <= 1e-4 * w, "step {i}: loss {g}, official {w}");
    }
    let adapter = out.join("adapter.safetensors");
    assert!(adapter.is_file() && out.join("adapter.json").is_file());

    // Score with the adapter, and with the merged model: the same logits.
    let ids = "504,3575,282,4649,314";
    let with: Value =
        serde_json::from_str(&ok(&["score", "--model", s(&m), "--adapter", s(&adapter), "--tokens", ids])).unwrap();
    let base: Value = serde_json::from_str(&ok(&["score", "--model", s(&m), "--tokens", ids])).unwrap();
    assert_ne!(with["top5_last"], base["top5_last"], "the adapter changes nothing");
    // A merged model scores `ids` as the adapter model does: the same argmax, the top 5 of the
    // last position within `logit_tol`, the loss within `loss_tol`.
    let scores_as_adapter = |model: &Path, logit_tol: f64, loss_tol: f64| {
        let via: Value = serde_json::from_str(&ok(&["score", "--model", s(model), "--tokens", ids])).unwrap();
        assert_eq!(via["argmax"], with["argmax"], "{}", model.display());
        for (a, b) in via["top5_last"].as_array().unwrap().iter().zip(with["top5_last"].as_array().unwrap()) {
            assert_eq!(a[0], b[0]);
            assert!((a[1].as_f64().unwrap() - b[1].as_f64().unwrap()).abs() <= logit_tol, "{}: {a} vs adapter {b}", model.display());
        }
        let (lv, lw) = (via["loss"].as_f64().unwrap(), with["loss"].as_f64().unwrap());
        assert!((lv - lw).abs() <= loss_tol, "{}: loss {lv} vs adapter {lw}", model.display());
    };
    let merged = dir.join("merged");
    ok(&["merge", "--model", s(&m), "--adapter", s(&adapter), "--out", s(&merged)]);
    scores_as_adapter(&merged, 1e-3, 1e-4);
    // The merged directory's tokenizer works: --text agrees with the GGUF's.
    let t1: Value =
        serde_json::from_str(&ok(&["score", "--model", s(&merged), "--text", "What is 345 + 678?"])).unwrap();
    let t2: Value = serde_json::from_str(&ok(&["score", "--model", s(&m), "--text", "What is 345 + 678?"])).unwrap();
    assert_eq!(t1["ids"], t2["ids"]);
    // The same merge written as a GGUF: the model's own file with the seven adapted weights of
    // every layer re-written as F16 (the source's are Q4_1), every other tensor and key as it
    // was; it scores as the adapter model (within F16's rounding of the merged weights) and
    // carries the tokenizer.
    let merged_gguf = dir.join("merged.gguf");
    ok(&["merge", "--model", s(&m), "--adapter", s(&adapter), "--out", s(&merged_gguf)]);
    scores_as_adapter(&merged_gguf, 2e-2, 1e-3 * with["loss"].as_f64().unwrap());
    // Exactly: its weights are the merged HF checkpoint's, rounded to F16 (q/k rows permuted
    // for the file and back on loading).
    let (hf, gg) = (LlamaWeights::load(&merged).unwrap(), LlamaWeights::load(&merged_gguf).unwrap());
    for (l, (a, b)) in hf.layers.iter().zip(&gg.layers).enumerate() {
        for module in LINEAR_MODULES {
            let want: Vec<f32> = a.linear(module).unwrap().data.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
            assert!(b.linear(module).unwrap().data == want, "layer {l} {module}: not the merged weight rounded to F16");
        }
    }
    let t3: Value =
        serde_json::from_str(&ok(&["score", "--model", s(&merged_gguf), "--text", "What is 345 + 678?"])).unwrap();
    assert_eq!(t3["ids"], t2["ids"]);
    let (src, got) = (GgufFile::open(&m).unwrap(), GgufFile::open(&merged_gguf).unwrap());
    assert_eq!(src.metadata(), got.metadata());
    assert_eq!(src.tensors().len(), got.tensors().len());
    let mut rewritten = 0;
    for (a, b) in src.tensors().iter().zip(got.tensors()) {
        assert_eq!((&a.name, &a.ne), (&b.name, &b.ne));
        let adapted = a.name.starts_with("blk.") && !a.name.contains("norm");
        if adapted {
            assert_eq!(b.ty, GgmlType::F16, "{}", a.name);
            rewritten += 1;
        } else {
            assert_eq!(a.ty, b.ty, "{}", a.name);
            assert!(src.tensor_bytes(&a.name).unwrap() == got.tensor_bytes(&b.name).unwrap(), "{} changed", a.name);
        }
    }
    assert_eq!(rewritten, 7 * 30);

    // The adapter as a standard LoRA. PEFT's layout: at every one of the 210 sites, the base
    // weight plus `B A` is the merged checkpoint's weight.
    let lora_dir = dir.join("lora");
    ok(&["export-lora", "--model", s(&m), "--adapter", s(&adapter), "--out", s(&lora_dir)]);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(lora_dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["peft_type"].as_str(), cfg["lora_alpha"].as_u64()), (Some("LORA"), cfg["r"].as_u64()));
    let bytes = std::fs::read(lora_dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 2 * 7 * 30);
    let f32s = |key: &str| -> (Vec<usize>, Vec<f32>) {
        let t = st.tensor(key).unwrap_or_else(|_| panic!("{key} missing"));
        (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    };
    // `W + B A` for `W` (`d_out x d_in`), `b` (`d_out x r`), `a` (`r x d_in`).
    let plus_ba = |w: &[f32], b: &[f32], a: &[f32], r: usize| -> Vec<f32> {
        let d_in = a.len() / r;
        let mut out = w.to_vec();
        for (i, row) in out.chunks_exact_mut(d_in).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x += (0..r).map(|k| b[i * r + k] * a[k * d_in + j]).sum::<f32>();
            }
        }
        out
    };
    let max_err = |got: &[f32], want: &[f32]| got.iter().zip(want).fold(0.0f32, |e, (g, w)| e.max((g - w).abs()));
    let base = LlamaWeights::load(&m).unwrap();
    let r = cfg["r"].as_u64().unwrap() as usize;
    for (l, (b, h)) in base.layers.iter().zip(&hf.layers).enumerate() {
        for module in LINEAR_MODULES {
            let site = wegeft::adapter::Module::parse(module).unwrap().key(l);
            let key = |f: &str| format!("base_model.model.{site}.lora_{f}.weight");
            let ((sa, a), (sb, bb)) = (f32s(&key("A")), f32s(&key("B")));
            let (wb, wh) = (&b.linear(module).unwrap().data, &h.linear(module).unwrap().data);
            assert_eq!((sa[0], sb[1], sa[1] * sb[0]), (r, r, wb.len()), "layer {l} {module}: shapes {sa:?} {sb:?}");
            let scale = wh.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            let err = max_err(&plus_ba(wb, &bb, &a, r), wh);
            assert!(err <= 1e-6 * scale, "layer {l} {module}: |W + BA - merged| = {err} (|W| up to {scale})");
        }
    }
    // llama.cpp's layout: the GGUF's own (Q4_1) weight, dequantized, plus `lora_b lora_a` is
    // the merged GGUF's weight up to its F16 rounding, in the file's row order (q/k permuted).
    let lora_gguf = dir.join("lora.gguf");
    ok(&["export-lora", "--model", s(&m), "--adapter", s(&adapter), "--out", s(&lora_gguf)]);
    let lg = GgufFile::open(&lora_gguf).unwrap();
    assert_eq!((lg.get_str("general.type").unwrap(), lg.get_str("adapter.type").unwrap()), ("adapter", "lora"));
    assert_eq!(lg.get_str("general.architecture").unwrap(), src.get_str("general.architecture").unwrap());
    assert_eq!(lg.tensors().len(), 2 * 7 * 30);
    for info in got.tensors().iter().filter(|t| t.name.starts_with("blk.") && !t.name.contains("norm")) {
        let (_, a) = lg.tensor_f32(&format!("{}.lora_a", info.name)).unwrap();
        let (_, b) = lg.tensor_f32(&format!("{}.lora_b", info.name)).unwrap();
        let (_, w) = src.tensor_f32(&info.name).unwrap();
        let (_, want) = got.tensor_f32(&info.name).unwrap();
        let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let err = max_err(&plus_ba(&w, &b, &a, r), &want);
        assert!(err <= scale / 1024.0, "{}: |W + BA - merged| = {err} (|W| up to {scale})", info.name);
    }
    // A .gguf LoRA needs a GGUF model too.
    let e = run_wegeft(&["export-lora", "--model", s(&merged), "--adapter", s(&adapter), "--out", s(&dir.join("y.gguf"))]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("GGUF --model"));
    // A .gguf output needs a GGUF model.
    let e = run_wegeft(&["merge", "--model", s(&merged), "--adapter", s(&adapter), "--out", s(&dir.join("x.gguf"))]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("GGUF --model"));

    // Eval and generate run and report.
    let e: Value =
        serde_json::from_str(&ok(&["eval", "--model", s(&m), "--task", "arithmetic", "--n", "2", "--max-new", "6"]))
            .unwrap();
    assert_eq!(e["n"].as_u64(), Some(2));
    let acc = e["exact_match"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let g = ok(&["generate", "--model", s(&m), "--prompt", "What is the capital of France?", "--max-new", "8"]);
    assert!(g.contains("Paris"), "generated {g:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn finetune_arithmetic_smoke_and_bench() {
    let m = model_path();
    let dir = common::fresh_dir("cli-arith");
    let stdout = ok(&[
        "finetune",
        "--model",
        s(&m),
        "--task",
        "arithmetic",
        "--targets",
        "q_proj,v_proj",
        "--rank",
        "2",
        "--steps",
        "2",
        "--batch",
        "2",
        "--eval-n",
        "1",
        "--out",
        s(&dir),
        "--format",
        "peft",
    ]);
    assert!(stdout.contains("held-out exact match before") && stdout.contains("after"), "{stdout}");
    assert!(dir.join("adapter_config.json").is_file() && dir.join("adapter_model.safetensors").is_file());
    // A PEFT directory reads back; a repeated option overrides the earlier one (as demo.sh uses).
    ok(&["score", "--model", s(&m), "--adapter", s(&dir), "--tokens", "1,2,3"]);
    let b: Value =
        serde_json::from_str(&ok(&["bench-step", "--model", s(&m), "--batch", "1", "--seq", "8", "--steps", "9", "--steps", "1"]))
            .unwrap();
    assert!(b["tokens_per_s"].as_f64().unwrap() > 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_a_clear_error() {
    let m = model_path();
    let e = fails(&["score", "--model", "/nonexistent/model.gguf", "--tokens", "1"]);
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
    let e = fails(&["score", "--model", s(&m), "--device", "cuda", "--tokens", "1"]);
    assert!(e.contains("CUDA"), "{e}");
    let e = fails(&["score", "--model", s(&m), "--tokens", "49152"]);
    assert!(e.contains("49152"), "{e}");
    let dir = common::fresh_dir("cli-bad");
    let data = dir.join("bad.jsonl");
    std::fs::write(&data, "{\"tokens\": [1, 2, 3]}\n{\"txt\": \"oops\"}\n").unwrap();
    let e = fails(&["finetune", "--model", s(&m), "--data", s(&data), "--steps", "1", "--out", s(&dir)]);
    assert!(e.contains("line 2"), "{e}");
    let e = fails(&[
        "finetune",
        "--model",
        s(&m),
        "--task",
        "arithmetic",
        "--targets",
        "qq_proj",
        "--steps",
        "1",
        "--out",
        s(&dir),
    ]);
    assert!(e.contains("qq_proj"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
