//! Checkpoint and resume through the `wegeft` binary on a tiny GGUF model: 2 + 2 steps end
//! bitwise equal to 4 (file order and shuffled, with weight dropout), a different run config is
//! refused, runs SIGKILLed at random moments (during saves included) always leave a checkpoint
//! that loads and resumes to the uninterrupted result, and a non-finite loss stops training
//! with the last good checkpoint kept.

#[path = "common/tiny.rs"]
mod tiny;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use wegeft::train::checkpoint::Checkpoint;

fn wegeft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wegeft"))
        .args(args)
        .output()
        .expect("run wegeft")
}

fn ok(args: &[&str]) -> Output {
    let out = wegeft(args);
    assert!(
        out.status.success(),
        "wegeft {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn fails(args: &[&str]) -> String {
    let out = wegeft(args);
    assert!(!out.status.success(), "wegeft {args:?} should fail");
    let e = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(e.lines().count(), 1, "not one line: {e}");
    e
}

struct Setup {
    dir: PathBuf,
    model: PathBuf,
    data: PathBuf,
}

fn setup(name: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("wegeft-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("tiny.gguf");
    tiny::write_gguf(&model);
    let data = dir.join("train.jsonl");
    tiny::write_data(&data, 7);
    Setup { dir, model, data }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `finetune` arguments on the tiny model: rank 2 on three modules, batch 3 over 7 examples
/// (so 4 steps wrap an epoch), seq 16, then `extra`.
fn args<'a>(st: &'a Setup, out: &'a Path, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "finetune",
        "--model",
        s(&st.model),
        "--data",
        s(&st.data),
        "--rank",
        "2",
        "--targets",
        "q_proj,v_proj,down_proj",
        "--lr",
        "1e-2",
        "--batch",
        "3",
        "--seq",
        "16",
        "--steps",
        steps,
        "--out",
        s(out),
    ];
    a.extend_from_slice(extra);
    a
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Whether two safetensors files hold the same tensors (names, dtypes, shapes, bytes) and the
/// same metadata (the header's key order follows a `HashMap`, so the files' bytes may differ).
fn same_safetensors(a: &Path, b: &Path) -> bool {
    let (ba, bb) = (read(a), read(b));
    let (sa, sb) = (
        safetensors::SafeTensors::deserialize(&ba).unwrap(),
        safetensors::SafeTensors::deserialize(&bb).unwrap(),
    );
    let (mut na, mut nb) = (sa.names(), sb.names());
    na.sort();
    nb.sort();
    let meta = |x: &[u8]| safetensors::SafeTensors::read_metadata(x).unwrap().1.metadata().clone();
    na == nb
        && meta(&ba) == meta(&bb)
        && na.iter().all(|n| {
            let (x, y) = (sa.tensor(n).unwrap(), sb.tensor(n).unwrap());
            x.dtype() == y.dtype() && x.shape() == y.shape() && x.data() == y.data()
        })
}

#[test]
fn two_plus_two_steps_equal_four_bitwise() {
    let st = setup("resume");
    for (tag, extra) in [
        ("plain", vec![]),
        ("shuffle", vec!["--shuffle", "--seed", "5", "--dropout", "0.2"]),
        // A warm-up longer than the first leg, clipping, two batches per update (a constant
        // schedule: its length is not part of it, so a 2-step run can continue to 4).
        ("recipe", vec!["--warmup-steps", "3", "--max-grad-norm", "0.05", "--grad-accum", "2"]),
    ] {
        let (a, b, c) = (
            st.dir.join(format!("a-{tag}")),
            st.dir.join(format!("b-{tag}")),
            st.dir.join(format!("c-{tag}")),
        );
        let (la, lb) = (
            st.dir.join(format!("a-{tag}.jsonl")),
            st.dir.join(format!("bc-{tag}.jsonl")),
        );
        let mut e = extra.clone();
        e.extend(["--save-every", "4", "--log-json", s(&la)]);
        ok(&args(&st, &a, "4", &e));
        let mut e = extra.clone();
        e.extend(["--save-every", "2", "--log-json", s(&lb)]);
        ok(&args(&st, &b, "2", &e));
        assert_eq!(Checkpoint::load(&b.join("checkpoint")).unwrap().step, 2);
        let bck = b.join("checkpoint");
        e.extend(["--resume", s(&bck)]);
        ok(&args(&st, &c, "4", &e));
        // The adapter, the whole checkpoint (adapter, AdamW moments, step, data position) and
        // the losses: bitwise the same.
        assert!(
            same_safetensors(&a.join("adapter.safetensors"), &c.join("adapter.safetensors")),
            "{tag}: adapters differ"
        );
        let (ca, cc) = (
            Checkpoint::load(&a.join("checkpoint")).unwrap(),
            Checkpoint::load(&c.join("checkpoint")).unwrap(),
        );
        assert_eq!(ca.step, 4);
        assert_eq!(ca, cc, "{tag}: checkpoints differ");
        assert_ne!(
            ca.params,
            Checkpoint::load(&bck).unwrap().params,
            "{tag}: steps 3-4 changed nothing"
        );
        assert_eq!(
            std::fs::read_to_string(&la).unwrap(),
            std::fs::read_to_string(&lb).unwrap(),
            "{tag}: losses differ"
        );
        assert_eq!(std::fs::read_to_string(&la).unwrap().lines().count(), 4);
    }
    let _ = std::fs::remove_dir_all(&st.dir);
}

#[test]
fn resume_refuses_a_different_run() {
    let st = setup("refuse");
    let b = st.dir.join("b");
    ok(&args(&st, &b, "2", &["--save-every", "1"]));
    let ck = b.join("checkpoint");
    let c = st.dir.join("c");
    let e = fails(&args(&st, &c, "4", &["--resume", s(&ck), "--rank", "3"]));
    assert!(
        e.contains("adapter.rank was 2, now 3") && e.contains("checkpoint.safetensors"),
        "{e}"
    );
    let e = fails(&args(&st, &c, "4", &["--resume", s(&ck), "--lr", "0.5"]));
    assert!(e.contains("optim.lr"), "{e}");
    let mut a = args(&st, &c, "4", &["--resume", s(&ck)]);
    a[8] = "q_proj,v_proj";
    let e = fails(&a);
    assert!(e.contains("adapter.targets"), "{e}");
    let e = fails(&args(&st, &c, "4", &["--resume", s(&ck), "--no-sharing"]));
    assert!(e.contains("adapter.sharing"), "{e}");
    let e = fails(&args(&st, &c, "4", &["--resume", s(&ck), "--batch", "2"]));
    assert!(e.contains("batch was 3, now 2"), "{e}");
    let e = fails(&args(&st, &c, "4", &["--resume", s(&ck), "--shuffle"]));
    assert!(e.contains("shuffle"), "{e}");
    let e = fails(&args(&st, &c, "4", &["--resume", s(&ck), "--grad-accum", "2"]));
    assert!(e.contains("grad_accum was 1, now 2"), "{e}");
    let e = fails(&args(&st, &c, "4", &["--resume", s(&ck), "--max-grad-norm", "1"]));
    assert!(e.contains("max_grad_norm was null, now 1"), "{e}");
    let e = fails(&args(&st, &c, "4", &["--resume", s(&ck), "--warmup-steps", "2"]));
    assert!(e.contains("schedule.warmup_steps was 0, now 2"), "{e}");
    let e = fails(&args(&st, &c, "4", &["--resume", s(&ck), "--lr-schedule", "cosine"]));
    assert!(e.contains("schedule.kind was \"constant\", now \"cosine\""), "{e}");
    // A decaying schedule decays over its run's total: another total is another schedule.
    let d = st.dir.join("d");
    ok(&args(&st, &d, "3", &["--save-every", "1", "--lr-schedule", "linear"]));
    let e = fails(&args(&st, &c, "5", &["--resume", s(&d.join("checkpoint")), "--lr-schedule", "linear"]));
    assert!(e.contains("schedule.total_steps was 3, now 5"), "{e}");
    let other = st.dir.join("other.jsonl");
    tiny::write_data(&other, 8);
    let mut a = args(&st, &c, "4", &["--resume", s(&ck)]);
    a[4] = s(&other);
    let e = fails(&a);
    assert!(e.contains("data"), "{e}");
    // A model with other weights (same shape) is another model.
    let mut bytes = tiny::gguf_bytes();
    let n = bytes.len();
    bytes[n - 8] ^= 0x40;
    bytes.extend_from_slice(&[0u8; 32]);
    let m2 = st.dir.join("tiny2.gguf");
    std::fs::write(&m2, bytes).unwrap();
    let mut a = args(&st, &c, "4", &["--resume", s(&ck)]);
    a[2] = s(&m2);
    let e = fails(&a);
    assert!(e.contains("model_"), "{e}");
    let e = fails(&args(&st, &c, "2", &["--resume", s(&ck)]));
    assert!(e.contains("--steps") && e.contains("already at step 2"), "{e}");
    let e = fails(&args(&st, &c, "4", &["--resume", s(&st.dir.join("nope"))]));
    assert!(e.contains("nope"), "{e}");
    // A checkpoint that is not one: named.
    std::fs::write(st.dir.join("junk.safetensors"), b"junk").unwrap();
    let e = fails(&args(&st, &c, "4", &["--resume", s(&st.dir.join("junk.safetensors"))]));
    assert!(e.contains("junk.safetensors"), "{e}");
    assert!(!c.exists(), "a refused resume left {}", c.display());
    let _ = std::fs::remove_dir_all(&st.dir);
}

/// SIGKILL a run that checkpoints every step at pseudo-random moments (some land inside a
/// save: the temporary file, the fsync or the rename), several times; after each kill the
/// checkpoint on disk must load, and resuming from it must end bitwise where an uninterrupted
/// run ends.
#[test]
fn sigkill_during_saves_leaves_a_checkpoint_that_resumes() {
    let st = setup("kill");
    let steps = "400";
    let full = st.dir.join("full");
    // With a decaying schedule, clipping and two batches per update: resuming must take up
    // the schedule where it was.
    let recipe = ["--lr-schedule", "cosine", "--warmup-steps", "40", "--max-grad-norm", "0.05", "--grad-accum", "2"];
    let args = |st: &'_ Setup, out: &Path, steps: &str, extra: &[&str]| -> Vec<String> {
        let mut e: Vec<&str> = recipe.to_vec();
        e.extend_from_slice(extra);
        args(st, out, steps, &e).into_iter().map(String::from).collect()
    };
    let ok = |a: &[String]| ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&args(&st, &full, steps, &["--shuffle", "--save-every", "1000"]));
    let out = st.dir.join("killed");
    let ck = out.join("checkpoint");
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let (mut kills, mut loaded_steps) = (0, Vec::new());
    for round in 0..6 {
        let mut a = args(&st, &out, steps, &["--shuffle", "--save-every", "1"]);
        if ck.join("checkpoint.safetensors").exists() {
            a.extend(["--resume".to_string(), s(&ck).to_string()]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_wegeft"))
            .args(&a)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let wait = Duration::from_millis(30 + rng % 120);
        let t0 = Instant::now();
        while t0.elapsed() < wait && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        if child.try_wait().unwrap().is_some() {
            let o = child.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            break; // finished before the kill
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        if ck.join("checkpoint.safetensors").exists() {
            let c = Checkpoint::load(&ck).unwrap_or_else(|e| panic!("round {round}: checkpoint does not load: {e}"));
            loaded_steps.push(c.step);
        }
    }
    assert!(kills >= 3, "only {kills} runs were killed before finishing");
    assert!(
        loaded_steps.iter().any(|&k| k > 0),
        "no checkpoint was written before the kills: {loaded_steps:?}"
    );
    assert!(
        loaded_steps.windows(2).all(|w| w[0] <= w[1]),
        "checkpoints went back: {loaded_steps:?}"
    );
    if Checkpoint::load(&ck).map_or(true, |c| c.step < 400) {
        ok(&{
            let mut a = args(&st, &out, steps, &["--shuffle", "--save-every", "1"]);
            a.extend(["--resume".to_string(), s(&ck).to_string()]);
            a
        });
    }
    assert!(same_safetensors(
        &full.join("adapter.safetensors"),
        &out.join("adapter.safetensors")
    ));
    assert_eq!(
        Checkpoint::load(&full.join("checkpoint")).unwrap(),
        Checkpoint::load(&ck).unwrap()
    );
    eprintln!("kills: {kills}, checkpoint steps after each: {loaded_steps:?}");
    let _ = std::fs::remove_dir_all(&st.dir);
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let st = setup("nan");
    let out = st.dir.join("out");
    // Weight decay 1e38 at lr 1e-2: each step multiplies phi by 1 - 1e36. Step 1 leaves it
    // finite (|phi| <~ 1e35); step 2 overflows (the loss, a gradient or phi itself).
    let e = fails(&args(&st, &out, "10", &["--weight-decay", "1e38", "--save-every", "1"]));
    assert!(
        e.contains("step 2") && e.contains("last good checkpoint") && e.contains("(step 1)"),
        "{e}"
    );
    let c = Checkpoint::load(&out.join("checkpoint")).unwrap();
    assert_eq!(c.step, 1);
    assert!(c.params.iter().all(|(a, b)| a.iter().chain(b).all(|x| x.is_finite())));
    assert!(
        !out.join("adapter.safetensors").exists(),
        "an adapter was written after a failed run"
    );
    // Without checkpoints: the same stop, and nothing left in --out.
    let out2 = st.dir.join("out2");
    let e = fails(&args(&st, &out2, "10", &["--weight-decay", "1e38"]));
    assert!(e.contains("step 2") && e.contains("no checkpoint"), "{e}");
    assert!(!out2.exists(), "{} left behind", out2.display());
    let _ = std::fs::remove_dir_all(&st.dir);
}

/// The library side: a save/load round trip is exact; a torn or altered file is refused
/// naming it; a temporary file left by a killed save is ignored by `load` and removed by the
/// next `save`.
#[test]
fn checkpoint_file_round_trip_and_damage() {
    let st = setup("lib");
    let b = st.dir.join("b");
    ok(&args(&st, &b, "3", &["--save-every", "3", "--shuffle"]));
    let dir = b.join("checkpoint");
    let c = Checkpoint::load(&dir).unwrap();
    assert_eq!((c.step, c.params.len()), (3, 3));
    assert!(
        c.v.iter().all(|(a, b)| a.iter().chain(b).any(|&x| x > 0.0)),
        "second moments are zero"
    );
    let copy = st.dir.join("copy");
    c.save(&copy).unwrap();
    assert_eq!(Checkpoint::load(&copy).unwrap(), c);
    let file = Checkpoint::file(&copy);
    let bytes = read(&file);
    // A stale temporary file of a killed save: load ignores it, save removes it.
    let stale = copy.join(".checkpoint.safetensors.tmp999999");
    std::fs::write(&stale, &bytes[..bytes.len() / 3]).unwrap();
    assert_eq!(Checkpoint::load(&copy).unwrap(), c);
    c.save(&copy).unwrap();
    assert!(!stale.exists());
    // Torn: every cut is an error naming the file.
    for cut in [0, 7, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&file, &bytes[..cut]).unwrap();
        let e = Checkpoint::load(&copy).unwrap_err().to_string();
        assert!(e.contains("checkpoint.safetensors"), "cut {cut}: {e}");
    }
    // A NaN moment.
    let mut bad = c.clone();
    bad.v[1].0[0] = f32::NAN;
    bad.save(&copy).unwrap();
    let e = Checkpoint::load(&copy).unwrap_err().to_string();
    assert!(e.contains("adamw.v.1.phi") && e.contains("not finite"), "{e}");
    // Inconsistent lengths are refused before writing.
    let mut bad = c.clone();
    bad.m[0].1.pop();
    assert!(bad.save(&st.dir.join("never")).is_err());
    let _ = std::fs::remove_dir_all(&st.dir);
}
