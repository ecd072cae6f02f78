//! Bad input through the `wegeft` binary, on a tiny GGUF model: a truncated or corrupt model,
//! adapters of the wrong rank, modules or shapes, data that is not UTF-8, not JSON or empty, a
//! sequence longer than the context, `--steps 0`, a bad training recipe (`--grad-accum 0`, an
//! unknown `--lr-schedule`, a `--max-grad-norm` that is not a positive number), an `--out` that
//! cannot be written. Each is one line on stderr naming the file or the argument, a non-zero
//! exit, and no output left.

mod common;

#[path = "common/tiny.rs"]
mod tiny;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn wegeft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wegeft"))
        .args(args)
        .output()
        .expect("run wegeft")
}

fn ok(args: &[&str]) {
    let out = wegeft(args);
    assert!(
        out.status.success(),
        "wegeft {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `args`, which must fail with exit code 1 and one line on stderr containing every
/// string of `want`; returns the line.
fn fails(args: &[&str], want: &[&str]) -> String {
    let out = wegeft(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "wegeft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(e.lines().count(), 1, "wegeft {args:?}: not one line:\n{e}");
    assert!(e.starts_with("error: "), "{e}");
    for w in want {
        assert!(e.contains(w), "wegeft {args:?}: {e:?} does not mention {w:?}");
    }
    assert!(
        out.stdout.is_empty(),
        "printed {}",
        String::from_utf8_lossy(&out.stdout)
    );
    e
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct T {
    dir: PathBuf,
    model: PathBuf,
    data: PathBuf,
}

fn setup(name: &str) -> T {
    let dir = common::fresh_dir(&format!("clierr-{name}"));
    let model = dir.join("tiny.gguf");
    tiny::write_gguf(&model);
    let data = dir.join("train.jsonl");
    tiny::write_data(&data, 5);
    T { dir, model, data }
}

/// A `finetune` on the tiny model that must fail naming `want`, leaving neither `--out` nor
/// the `--log-json` file behind. `with` replaces or adds options.
fn finetune_fails(t: &T, with: &[(&str, &str)], want: &[&str]) -> String {
    let out = t.dir.join("out");
    let log = t.dir.join("log.jsonl");
    let mut opts: Vec<(String, String)> = [
        ("--model", s(&t.model)),
        ("--data", s(&t.data)),
        ("--rank", "2"),
        ("--targets", "q_proj,v_proj"),
        ("--steps", "2"),
        ("--batch", "2"),
        ("--seq", "16"),
        ("--out", s(&out)),
        ("--log-json", s(&log)),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    for (k, v) in with {
        match opts.iter_mut().find(|(a, _)| a == k) {
            Some(o) => o.1 = v.to_string(),
            None => opts.push((k.to_string(), v.to_string())),
        }
    }
    let mut args = vec!["finetune".to_string()];
    for (k, v) in opts {
        args.push(k);
        args.push(v);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out_path = PathBuf::from(args[args.iter().position(|a| *a == "--out").unwrap() + 1]);
    let existed = out_path.exists();
    let e = fails(&args, want);
    if !existed {
        assert!(!out_path.exists(), "{e}: left {}", out_path.display());
    }
    assert!(!log.exists(), "{e}: left {}", log.display());
    e
}

#[test]
fn corrupt_or_truncated_model() {
    let t = setup("model");
    let bytes = tiny::gguf_bytes();
    let trunc = t.dir.join("trunc.gguf");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &["score", "--model", s(&trunc), "--tokens", "1,2"],
        &["trunc.gguf", "past the end"],
    );
    let short = t.dir.join("short.gguf");
    std::fs::write(&short, &bytes[..10]).unwrap();
    fails(
        &["score", "--model", s(&short), "--tokens", "1,2"],
        &["short.gguf", "truncated"],
    );
    let mut bad = bytes.clone();
    bad[0] = b'X';
    let badp = t.dir.join("bad.gguf");
    std::fs::write(&badp, &bad).unwrap();
    fails(
        &["score", "--model", s(&badp), "--tokens", "1,2"],
        &["bad.gguf", "not a GGUF"],
    );
    // A metadata string cut short: the key is named.
    let mut cut = bytes.clone();
    let at = cut.windows(13).position(|w| w == b"llama.vocab_s").unwrap() - 8;
    cut[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let cutp = t.dir.join("cut.gguf");
    std::fs::write(&cutp, &cut).unwrap();
    fails(&["score", "--model", s(&cutp), "--tokens", "1,2"], &["cut.gguf"]);
    finetune_fails(&t, &[("--model", s(&trunc))], &["trunc.gguf"]);
    fails(
        &["score", "--model", s(&t.dir.join("missing.gguf")), "--tokens", "1"],
        &["missing.gguf"],
    );
    // An HF directory with a truncated safetensors file.
    let hf = t.dir.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(hf.join("config.json"), r#"{"model_type":"llama","vocab_size":97,"hidden_size":16,"intermediate_size":32,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":32,"tie_word_embeddings":true}"#).unwrap();
    std::fs::write(
        hf.join("model.safetensors"),
        &b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":"[..],
    )
    .unwrap();
    fails(&["score", "--model", s(&hf), "--tokens", "1"], &["model.safetensors"]);
    let _ = std::fs::remove_dir_all(&t.dir);
}

fn write_st(path: &Path, tensors: &[(&str, Vec<usize>)]) {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, shape)| {
            (
                n.to_string(),
                shape.clone(),
                vec![0u8; shape.iter().product::<usize>() * 4],
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, shape, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path).unwrap();
}

#[test]
fn adapter_of_the_wrong_rank_modules_or_shapes() {
    let t = setup("adapter");
    let good = t.dir.join("good");
    ok(&[
        "finetune",
        "--model",
        s(&t.model),
        "--data",
        s(&t.data),
        "--rank",
        "2",
        "--targets",
        "q_proj,v_proj",
        "--steps",
        "1",
        "--batch",
        "2",
        "--seq",
        "16",
        "--out",
        s(&good),
    ]);
    let ad = good.join("adapter.safetensors");
    ok(&[
        "score",
        "--model",
        s(&t.model),
        "--adapter",
        s(&ad),
        "--tokens",
        "1,2,3",
    ]);
    let score = |p: &Path, want: &[&str]| {
        fails(
            &["score", "--model", s(&t.model), "--adapter", s(p), "--tokens", "1,2"],
            want,
        )
    };
    // The JSON beside it says rank 3 / other modules.
    let json = std::fs::read_to_string(good.join("adapter.json")).unwrap();
    std::fs::write(good.join("adapter.json"), json.replace("\"rank\": 2", "\"rank\": 3")).unwrap();
    score(&ad, &["adapter.json", "rank 3"]);
    std::fs::write(good.join("adapter.json"), json.replace("\"v_proj\"", "\"k_proj\"")).unwrap();
    score(&ad, &["adapter.json", "target_modules"]);
    std::fs::write(good.join("adapter.json"), &json).unwrap();
    // Tensors: an unknown module, the wrong d_in, a rank that disagrees between tensors.
    let p = t.dir.join("mod.safetensors");
    write_st(
        &p,
        &[
            ("in_projections.qq_proj.weight", vec![2, 16]),
            ("out_projections.qq_proj.weight", vec![16, 2]),
        ],
    );
    score(&p, &["mod.safetensors", "qq_proj"]);
    let p = t.dir.join("shape.safetensors");
    write_st(
        &p,
        &[
            ("in_projections.q_proj.weight", vec![2, 12]),
            ("out_projections.q_proj.weight", vec![12, 2]),
        ],
    );
    score(&p, &["shape.safetensors", "in_projections.q_proj.weight", "[2, 12]"]);
    let p = t.dir.join("rank.safetensors");
    write_st(
        &p,
        &[
            ("in_projections.q_proj.weight", vec![2, 16]),
            ("out_projections.q_proj.weight", vec![16, 2]),
            ("in_projections.v_proj.weight", vec![4, 16]),
            ("out_projections.v_proj.weight", vec![16, 4]),
        ],
    );
    score(&p, &["rank.safetensors", "v_proj"]);
    // down_proj's input is the MLP width (32), not hidden.
    let p = t.dir.join("down.safetensors");
    write_st(
        &p,
        &[
            ("in_projections.down_proj.weight", vec![2, 16]),
            ("out_projections.down_proj.weight", vec![16, 2]),
        ],
    );
    score(&p, &["down.safetensors", "down_proj", "[2, 32]"]);
    let p = t.dir.join("junk.safetensors");
    std::fs::write(&p, b"not a safetensors file").unwrap();
    score(&p, &["junk.safetensors"]);
    // Through finetune --init-adapter: nothing written.
    finetune_fails(
        &t,
        &[("--init-adapter", s(&t.dir.join("shape.safetensors")))],
        &["shape.safetensors"],
    );
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
fn bad_data() {
    let t = setup("data");
    let p = t.dir.join("latin1.jsonl");
    std::fs::write(&p, b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
    finetune_fails(&t, &[("--data", s(&p))], &["latin1.jsonl", "line 2", "UTF-8"]);
    let p = t.dir.join("notjson.jsonl");
    std::fs::write(&p, "hello world\n").unwrap();
    finetune_fails(&t, &[("--data", s(&p))], &["notjson.jsonl", "line 1"]);
    let p = t.dir.join("fields.jsonl");
    std::fs::write(&p, "{\"tokens\": [1, 2]}\n{\"tokens\": [1, -2]}\n").unwrap();
    finetune_fails(&t, &[("--data", s(&p))], &["fields.jsonl", "line 2"]);
    let p = t.dir.join("big.jsonl");
    std::fs::write(&p, "{\"tokens\": [1, 2, 500]}\n").unwrap();
    finetune_fails(&t, &[("--data", s(&p))], &["big.jsonl", "record 1", "500"]);
    let p = t.dir.join("empty.jsonl");
    std::fs::write(&p, "").unwrap();
    finetune_fails(&t, &[("--data", s(&p))], &["empty.jsonl", "no records"]);
    let p = t.dir.join("blank.jsonl");
    std::fs::write(&p, "\n  \n\n").unwrap();
    finetune_fails(&t, &[("--data", s(&p))], &["blank.jsonl", "no records"]);
    finetune_fails(&t, &[("--data", s(&t.dir.join("absent.jsonl")))], &["absent.jsonl"]);
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
fn bad_arguments() {
    let t = setup("args");
    finetune_fails(&t, &[("--steps", "0")], &["--steps"]);
    finetune_fails(&t, &[("--seq", "64")], &["--seq", "64", "32"]);
    finetune_fails(&t, &[("--batch", "0")], &["batch"]);
    finetune_fails(&t, &[("--rank", "0")], &["rank"]);
    finetune_fails(&t, &[("--lr", "NaN")], &["lr"]);
    finetune_fails(&t, &[("--dropout", "1.5")], &["dropout"]);
    finetune_fails(&t, &[("--grad-accum", "0")], &["--grad-accum"]);
    finetune_fails(&t, &[("--lr-schedule", "step")], &["--lr-schedule", "step"]);
    finetune_fails(&t, &[("--max-grad-norm", "0")], &["--max-grad-norm"]);
    finetune_fails(&t, &[("--max-grad-norm", "NaN")], &["--max-grad-norm"]);
    let long: Vec<String> = (0..40).map(|i| (i % 90 + 1).to_string()).collect();
    fails(
        &["score", "--model", s(&t.model), "--tokens", &long.join(",")],
        &["40 tokens", "context of 32"],
    );
    fails(&["score", "--model", s(&t.model), "--tokens", "1,97"], &["97"]);
    // --out: under a regular file, or a regular file itself.
    let file = t.dir.join("file.txt");
    std::fs::write(&file, "x").unwrap();
    finetune_fails(&t, &[("--out", s(&file.join("sub")))], &["--out", "file.txt/sub"]);
    finetune_fails(&t, &[("--out", s(&file))], &["--out", "file.txt", "not a directory"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    finetune_fails(
        &t,
        &[("--out", "/proc/wegeft-no-such-dir/out")],
        &["--out", "/proc/wegeft-no-such-dir/out"],
    );
    // The run itself works with the same files.
    ok(&[
        "finetune",
        "--model",
        s(&t.model),
        "--data",
        s(&t.data),
        "--rank",
        "2",
        "--targets",
        "q_proj",
        "--steps",
        "1",
        "--batch",
        "2",
        "--seq",
        "16",
        "--out",
        s(&t.dir.join("fine")),
    ]);
    let _ = std::fs::remove_dir_all(&t.dir);
}

/// `merge` and `export-lora` with a bad adapter or an `--out` that cannot be written: one line
/// naming the file, nothing left behind; the same commands work with good arguments.
#[test]
fn merge_and_export_lora_refuse_bad_adapters_and_outputs() {
    let t = setup("export");
    let good = t.dir.join("good");
    ok(&[
        "finetune", "--model", s(&t.model), "--data", s(&t.data), "--rank", "2", "--targets", "q_proj,v_proj",
        "--steps", "1", "--batch", "2", "--seq", "16", "--out", s(&good),
    ]);
    let ad = good.join("adapter.safetensors");
    let bad = t.dir.join("shape.safetensors");
    write_st(&bad, &[("in_projections.q_proj.weight", vec![2, 12]), ("out_projections.q_proj.weight", vec![12, 2])]);
    let file = t.dir.join("file.txt");
    std::fs::write(&file, "x").unwrap();
    for cmd in ["merge", "export-lora"] {
        for out in [t.dir.join(format!("{cmd}-dir")), t.dir.join(format!("{cmd}.gguf"))] {
            // A wrong adapter: nothing written.
            fails(&[cmd, "--model", s(&t.model), "--adapter", s(&bad), "--out", s(&out)], &["shape.safetensors", "[2, 12]"]);
            assert!(!out.exists(), "{cmd}: left {}", out.display());
            // A good one.
            ok(&[cmd, "--model", s(&t.model), "--adapter", s(&ad), "--out", s(&out)]);
            assert!(out.exists(), "{cmd}: wrote nothing at {}", out.display());
        }
        // --out under a regular file.
        let under = file.join(format!("{cmd}-out"));
        fails(&[cmd, "--model", s(&t.model), "--adapter", s(&ad), "--out", s(&under)], &["file.txt"]);
        let under = file.join(format!("{cmd}.gguf"));
        fails(&[cmd, "--model", s(&t.model), "--adapter", s(&ad), "--out", s(&under)], &["file.txt"]);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        // A missing adapter file.
        fails(&[cmd, "--model", s(&t.model), "--adapter", s(&t.dir.join("none.safetensors")), "--out", s(&t.dir.join("x"))], &["none.safetensors"]);
        assert!(!t.dir.join("x").exists());
    }
    let _ = std::fs::remove_dir_all(&t.dir);
}
