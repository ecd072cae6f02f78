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
//! the results to as JSON lines), `WEGEFT_LAYER_PATH` (`composed` / `fused` / `fused_sm90`: only
//! that path for the WeGeFT layers). Without it, each configuration runs on the default path
//! (`Auto`, reported as `wegeft-cuda`: what users get) and then on the others (`Composed`,
//! and `FusedSm90` on a compute capability 9.0 device), reported as `wegeft-cuda (path)`, so
//! that one run shows which path a training step should take.

use std::io::Write;
use std::time::Instant;

use wegeft::adapter::{self, AdapterConfig, Module};
use wegeft::cuda::{Gpu, Path};
use wegeft::model::llama::{Batch, Dims, HostAdapter, HostWeights, Llama};
use wegeft::train::optim::AdamWConfig;
use wegeft::train::trainer::Trainer;
use wegeft::Error;

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
        p
    };
    for targets in [vec![Module::QProj, Module::VProj], Module::ALL.to_vec()] {
        for &path in &paths {
            gpu.set_path(path);
            let config = AdapterConfig::new(8, targets.clone())?;
            let mut init = adapter::Adapter::new(config, dims.adapter_dims()?)?;
            for k in 0..init.pairs().len() {
                let (_, psi) = init.pair_values_mut(k)?;
                psi.iter_mut().enumerate().for_each(|(i, v)| *v = ((i % 7) as f32 - 3.0) * 1e-3);
            }
            let host = HostAdapter::from_adapter(&init)?;
            let opt = AdamWConfig { lr: 1e-3, weight_decay: 0.0, ..AdamWConfig::default() };
            let mut tr = Trainer::new(gpu, &model, &host, opt)?;
            gpu.synchronize()?;
            gpu.reset_peak_memory()?;
            tr.step(&bt)?; // warm-up (cuBLASLt heuristics, module loads, pool growth)
            let mut times = Vec::with_capacity(steps);
            let mut loss = 0.0;
            for _ in 0..steps.max(1) {
                let t0 = Instant::now();
                loss = tr.step(&bt)?;
                gpu.synchronize()?;
                times.push(t0.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            let step_s = times[times.len() / 2];
            let peak = gpu.peak_memory()?;
            let names: Vec<&str> = targets.iter().map(|m| m.name()).collect();
            let imp = if path == Path::Auto { "wegeft-cuda".to_string() } else { format!("wegeft-cuda ({path:?})") };
            let line = serde_json::json!({
                "bench": "model_step", "impl": imp, "device": name, "batch": batch, "seq": seq, "rank": 8,
                "layers": dims.layers, "path": format!("{:?}", gpu.path()), "targets": names, "step_s": step_s, "tokens_per_s": (batch * seq) as f64 / step_s,
                "peak_mem_bytes": peak, "loss": loss,
            });
            println!("{line}");
            if let Some(f) = json.as_mut() {
                writeln!(f, "{line}").map_err(|e| Error::io("WEGEFT_BENCH_JSON", e))?;
            }
        }
    }
    Ok(())
}
