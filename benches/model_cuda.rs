//! GPU benchmark of a whole training step of the Llama harness on a SmolLM2-135M-shaped model
//! with seeded random weights (`HostWeights::random`; no model file): forward, backward and
//! AdamW of a WeGeFT adapter (rank 8, shared pairs, PEFT-style init with a nonzero psi so
//! that every product does real work), bf16 frozen weights, B=16, S=512, targets `q,v` and
//! all seven. Reports tokens per second (median step time over the timed steps) and the peak
//! device memory of the step (the memory pool's high-water mark, weights included).
//!
//! `cargo bench --features cuda --bench model_cuda`. Without a device it prints
//! `skipped: no CUDA device` and exits 0 (with `WEGEFT_REQUIRE_GPU=1` it exits 1).
//! Environment: `WEGEFT_BENCH_STEPS` (timed steps, default 5), `WEGEFT_BENCH_BATCH` (16),
//! `WEGEFT_BENCH_SEQ` (512), `WEGEFT_BENCH_LAYERS` (30), `WEGEFT_BENCH_JSON` (a file to append
//! the results to as JSON lines), `WEGEFT_LAYER_PATH` (`composed` / `fused` / `fused_sm90` /
//! `tuned`: only that path for the WeGeFT layers). Without it, each configuration runs on the
//! default path (`Auto`, reported as `wegeft-cuda`: what users get) and then on the others
//! (`Composed`, `FusedSm90` on a compute capability 9.0 device, and `Tuned`, which times the
//! paths per shape in its warm-up step), reported as `wegeft-cuda (path)`, so
//! that one run shows which path a training step should take.
//!
//! Each row also reports `first_loss` (the warm-up step's, computed from the initial weights
//! before any update, identical on every path) and `loss` (the last timed step's). After all
//! rows are printed, the bench exits 1 if a configuration failed, if any loss is not finite,
//! or if, for the same targets, a path's first or last loss differs from the first path's by
//! more than [`LOSS_TOL`] relative.

use std::io::Write;
use std::time::Instant;

use wegeft::adapter::{self, AdapterConfig, Module};
use wegeft::cuda::{Gpu, Path};
use wegeft::model::llama::{Batch, Dims, HostAdapter, HostWeights, Llama};
use wegeft::train::optim::AdamWConfig;
use wegeft::train::trainer::Trainer;
use wegeft::Error;

/// Relative tolerance between the paths' losses for the same targets. The paths differ only in
/// how the bf16 K-extended products are summed (~1e-3 of an activation); the first loss comes
/// from identical weights, the last after a few AdamW steps at lr 1e-3, so honest paths agree
/// to ~1e-3 and a broken one (a wrong tile, NaN) is far off.
const LOSS_TOL: f64 = 2e-2;

/// One printed row's losses, for the checks after the table.
struct Losses {
    targets: String,
    imp: String,
    first: f32,
    last: f32,
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(Error::NoCuda(msg)) => {
            if std::env::var("WEGEFT_REQUIRE_GPU").as_deref() == Ok("1") {
                eprintln!("WEGEFT_REQUIRE_GPU=1 but no CUDA device: {msg}");
                std::process::exit(1);
            }
            println!("skipped: no CUDA device ({msg})");
            return;
        }
        Err(e) => {
            eprintln!("CUDA backend failed to start: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = run(&gpu) {
        eprintln!("model_cuda: {e}");
        std::process::exit(1);
    }
}

fn run(gpu: &Gpu) -> wegeft::Result<()> {
    let (batch, seq, steps) = (env("WEGEFT_BENCH_BATCH", 16), env("WEGEFT_BENCH_SEQ", 512), env("WEGEFT_BENCH_STEPS", 5));
    let mut dims = Dims::smollm2_135m();
    dims.layers = env("WEGEFT_BENCH_LAYERS", dims.layers);
    let name = gpu.device().name()?;
    let model = Llama::from_host(gpu, HostWeights::random(&dims, 1, false)?)?;
    let seqs: Vec<Vec<u32>> =
        (0..batch).map(|b| (0..seq).map(|t| ((b * 7919 + t * 104_729 + 17) % dims.vocab) as u32).collect()).collect();
    let bt = Batch::causal(&seqs)?;
    let mut json = std::env::var("WEGEFT_BENCH_JSON")
        .ok()
        .map(|p| std::fs::OpenOptions::new().create(true).append(true).open(&p).map_err(|e| Error::io(&p, e)))
        .transpose()?;
    let paths = if std::env::var("WEGEFT_LAYER_PATH").is_ok() {
        vec![gpu.path()]
    } else {
        let mut p = vec![Path::Auto, Path::Composed];
        if gpu.device().compute_capability() == (9, 0) {
            p.push(Path::FusedSm90);
        }
        p.push(Path::Tuned);
        p
    };
    let mut failed = false;
    let mut losses: Vec<Losses> = Vec::new();
    for targets in [vec![Module::QProj, Module::VProj], Module::ALL.to_vec()] {
        let names: Vec<&str> = targets.iter().map(|m| m.name()).collect();
        for &path in &paths {
            gpu.set_path(path);
            let imp = if path == Path::Auto { "wegeft-cuda".to_string() } else { format!("wegeft-cuda ({path:?})") };
            // A failed configuration is printed and the others still run; the exit status says.
            let (first, loss, step_s, peak, launches) = match one_config(gpu, &model, &dims, &bt, &targets, steps) {
                Ok(r) => r,
                Err(e) => {
                    failed = true;
                    println!("{} {imp}: FAILED: {e}", names.join(","));
                    continue;
                }
            };
            let line = serde_json::json!({
                "bench": "model_step", "impl": imp, "device": name, "batch": batch, "seq": seq, "rank": 8,
                "layers": dims.layers, "path": format!("{:?}", gpu.path()), "targets": names, "step_s": step_s, "tokens_per_s": (batch * seq) as f64 / step_s,
                "peak_mem_bytes": peak, "loss": loss, "first_loss": first, "launches_per_step": launches,
                "us_per_launch": step_s * 1e6 / launches.max(1) as f64,
            });
            println!("{line}");
            if let Some(f) = json.as_mut() {
                writeln!(f, "{line}").map_err(|e| Error::io("WEGEFT_BENCH_JSON", e))?;
            }
            losses.push(Losses { targets: names.join(","), imp, first, last: loss });
        }
    }
    failed |= !check_losses(&losses);
    if failed {
        return Err(Error::invalid("model_cuda", "a configuration failed or the losses check failed (see the lines above)"));
    }
    Ok(())
}

/// One configuration on the current path: (first loss, last loss, median step seconds, peak
/// device bytes, kernel launches + cuBLASLt calls per timed step). The step time divided by the
/// launches says whether launch overhead (a few microseconds of host time each) can matter:
/// what capturing the step in a CUDA graph would save.
fn one_config(gpu: &Gpu, model: &Llama<Gpu>, dims: &Dims, bt: &Batch, targets: &[Module], steps: usize) -> wegeft::Result<(f32, f32, f64, u64, u64)> {
    let config = AdapterConfig::new(8, targets.to_vec())?;
    let init = adapter::Adapter::for_benchmark(config, dims.adapter_dims()?)?;
    let host = HostAdapter::from_adapter(&init)?;
    let opt = AdamWConfig { lr: 1e-3, weight_decay: 0.0, ..AdamWConfig::default() };
    let mut tr = Trainer::new(gpu, model, &host, opt)?;
    gpu.synchronize()?;
    gpu.reset_peak_memory()?;
    // Warm-up (cuBLASLt heuristics, module loads, pool growth); its loss is computed from the
    // initial weights, before any update.
    let first = tr.step(bt)?;
    let mut times = Vec::with_capacity(steps);
    let mut loss = f32::NAN;
    let launches0 = gpu.device().launch_count();
    for _ in 0..steps.max(1) {
        let t0 = Instant::now();
        loss = tr.step(bt)?;
        gpu.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let step_s = times[times.len() / 2];
    let launches = (gpu.device().launch_count() - launches0) / steps.max(1) as u64;
    let peak = gpu.peak_memory()?;
    Ok((first, loss, step_s, peak, launches))
}

/// Prints one `loss check` line per targets (and one per problem); false if any loss is not
/// finite or the paths' first or last losses differ by more than [`LOSS_TOL`] relative.
fn check_losses(rows: &[Losses]) -> bool {
    let mut ok = true;
    for r in rows {
        if !r.first.is_finite() || !r.last.is_finite() {
            ok = false;
            println!("loss check: {} {}: NOT FINITE (first loss {}, last loss {})", r.targets, r.imp, r.first, r.last);
        }
    }
    let mut seen: Vec<&str> = Vec::new();
    for r in rows {
        if seen.contains(&r.targets.as_str()) {
            continue;
        }
        seen.push(&r.targets);
        let group: Vec<&Losses> = rows.iter().filter(|g| g.targets == r.targets).collect();
        let base = group[0];
        let (mut worst_first, mut worst_last) = (0f64, 0f64);
        for g in &group[1..] {
            for (which, a, b, worst) in
                [("first", g.first, base.first, &mut worst_first), ("last", g.last, base.last, &mut worst_last)]
            {
                let d = (a as f64 - b as f64).abs() / (b as f64).abs().max(1e-30);
                // NaN (a non-finite loss) counts as an infinite difference.
                let d = if d.is_finite() { d } else { f64::INFINITY };
                *worst = worst.max(d);
                if d > LOSS_TOL {
                    ok = false;
                    println!(
                        "loss check: {}: MISMATCH {which} loss {a} ({}) vs {b} ({}): relative difference {d:.3e} > {LOSS_TOL:e}",
                        r.targets, g.imp, base.imp
                    );
                }
            }
        }
        let paths: Vec<&str> = group.iter().map(|g| g.imp.as_str()).collect();
        println!(
            "loss check: {} over {}: first {}, last {}; worst relative difference {worst_first:.2e} first, {worst_last:.2e} last (tol {LOSS_TOL:e})",
            r.targets,
            paths.join(" / "),
            group.iter().map(|g| g.first.to_string()).collect::<Vec<_>>().join(" / "),
            group.iter().map(|g| g.last.to_string()).collect::<Vec<_>>().join(" / "),
        );
    }
    ok
}
