//! GPU benchmark of one layer, timed with CUDA events (bf16 storage): WeGeFT forward and
//! backward on each available path (composed: cuBLASLt + rank-r kernels; fused: the
//! K-extended GEMM when built in, `Fused` and `FusedSm90`), LoRA forward/backward, and the
//! frozen layer alone through cuBLASLt (forward `y = x W^T`, backward `dx = G W`: the floor
//! every adapter is measured against). Each result is also printed as a ratio to that floor.
//!
//! Shapes (one run): T=8192, d_in=d_out=4096, r=64, and SmolLM2-135M's projections at
//! T=4096 (576x576, 576->1536, 1536->576; r=8). Inputs are random (never zeros; the saved
//! `u`, `c` the backward reads come from the forward timed just before it). Timing: 3 warm-up
//! runs, then per rep a 256 MiB memset (flushes the L2, outside the timed interval) and one
//! run between two events; the median of the reps is reported.
//!
//! `cargo bench --features cuda --bench layer_cuda`. Without a device it prints
//! `skipped: no CUDA device` and exits 0 (with `WEGEFT_REQUIRE_GPU=1` it exits 1).
//! Environment: `WEGEFT_BENCH_ITERS` (timed reps, default 50), `WEGEFT_BENCH_JSON`
//! (a file to write the results to as JSON lines), `WEGEFT_BENCH_QUICK=1` (one small shape).

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use wegeft::cuda::{CudaBackend, Dropout, Launch, Path, FUSED_GEMM_BUILT};
use wegeft::{Error, LayerShape};

type T = bf16;

const FROZEN_FWD: &str = "frozen fwd (cuBLASLt)";
const FROZEN_BWD: &str = "frozen bwd dx (cuBLASLt)";

struct Bufs {
    x: CudaSlice<T>,
    w: CudaSlice<T>,
    phi: CudaSlice<T>,
    psi: CudaSlice<T>,
    g: CudaSlice<T>,
    u: CudaSlice<T>,
    c: CudaSlice<T>,
    y: CudaSlice<T>,
    dx: CudaSlice<T>,
    dphi: CudaSlice<f32>,
    dpsi: CudaSlice<f32>,
    bm: CudaSlice<T>,
    da: CudaSlice<f32>,
    db: CudaSlice<f32>,
}

fn rand(st: &Arc<CudaStream>, n: usize, seed: u64, amp: f32) -> CudaSlice<T> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let h: Vec<T> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp)
        })
        .collect();
    st.clone_htod(&h).expect("upload")
}

fn bufs(st: &Arc<CudaStream>, s: &LayerShape) -> Bufs {
    let a = 1.0 / (s.d_in as f32).sqrt();
    Bufs {
        x: rand(st, s.tokens * s.d_in, 1, 1.0),
        w: rand(st, s.d_out * s.d_in, 2, a),
        phi: rand(st, s.d_in * s.rank, 3, a),
        psi: rand(st, s.rank * s.d_in, 4, a),
        g: rand(st, s.tokens * s.d_out, 5, 1.0),
        // Saved activations: random until the forward overwrites them (never zeros).
        u: rand(st, s.tokens * s.rank, 7, 1.0),
        c: rand(st, s.d_out * s.rank, 8, 0.1),
        y: st.alloc_zeros(s.tokens * s.d_out).unwrap(),
        dx: st.alloc_zeros(s.tokens * s.d_in).unwrap(),
        dphi: st.alloc_zeros(s.d_in * s.rank).unwrap(),
        dpsi: st.alloc_zeros(s.rank * s.d_in).unwrap(),
        bm: rand(st, s.d_out * s.rank, 6, 0.01),
        da: st.alloc_zeros(s.rank * s.d_in).unwrap(),
        db: st.alloc_zeros(s.d_out * s.rank).unwrap(),
    }
}

fn cuda_err(e: impl std::fmt::Display) -> Error {
    Error::Cuda { op: "bench event", msg: e.to_string() }
}

/// Bytes written between reps to evict the L2 (H100: 50 MB, H200: 60 MB).
const FLUSH_BYTES: usize = 256 << 20;

/// Median milliseconds of `iters` runs of `f` (after 3 warm-up runs), timed with events; the
/// L2 is flushed (a memset of `flush`, outside the events) before every timed run.
fn time(dev: &CudaBackend, flush: &mut CudaSlice<u8>, iters: usize, mut f: impl FnMut() -> wegeft::Result<()>) -> wegeft::Result<f64> {
    let st = dev.stream();
    for _ in 0..3 {
        f()?;
    }
    let e0 = dev.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda_err)?;
    let e1 = dev.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda_err)?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        st.memset_zeros(flush).map_err(cuda_err)?;
        e0.record(st).map_err(cuda_err)?;
        f()?;
        e1.record(st).map_err(cuda_err)?;
        e1.synchronize().map_err(cuda_err)?;
        ms.push(e0.elapsed_ms(&e1).map_err(cuda_err)? as f64);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

fn main() {
    let dev = match CudaBackend::new(0) {
        Ok(d) => d,
        Err(Error::NoCuda(msg)) => {
            println!("skipped: no CUDA device ({msg})");
            if std::env::var("WEGEFT_REQUIRE_GPU").as_deref() == Ok("1") {
                std::process::exit(1);
            }
            return;
        }
        Err(e) => {
            eprintln!("CUDA backend failed: {e}");
            std::process::exit(1);
        }
    };
    let iters: usize = std::env::var("WEGEFT_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let quick = std::env::var("WEGEFT_BENCH_QUICK").as_deref() == Ok("1");
    let mut json = std::env::var("WEGEFT_BENCH_JSON").ok().map(|p| std::fs::File::create(p).expect("WEGEFT_BENCH_JSON"));
    let name = dev.name().unwrap_or_default();
    println!("device: {name} (cc {:?}, {} SMs, image {:?}); bf16; median of {iters}; fused GEMM built: {FUSED_GEMM_BUILT}", dev.compute_capability(), dev.sm_count(), dev.image());
    let shapes: Vec<(&str, LayerShape)> = if quick {
        vec![("quick 512x256->384 r8", LayerShape::new(512, 256, 384, 8).unwrap())]
    } else {
        vec![
            ("T8192 4096->4096 r64", LayerShape::new(8192, 4096, 4096, 64).unwrap()),
            ("SmolLM2 T4096 576->576 r8", LayerShape::new(4096, 576, 576, 8).unwrap()),
            ("SmolLM2 T4096 576->1536 r8", LayerShape::new(4096, 576, 1536, 8).unwrap()),
            ("SmolLM2 T4096 1536->576 r8", LayerShape::new(4096, 1536, 576, 8).unwrap()),
        ]
    };
    let mut flush: CudaSlice<u8> = match dev.stream().alloc_zeros(FLUSH_BYTES) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("L2 flush buffer ({FLUSH_BYTES} bytes): {e}");
            std::process::exit(1);
        }
    };
    println!("L2 flushed ({} MiB memset) before every timed rep; ratios: forward ops / frozen fwd, backward ops / frozen bwd dx, fwd+bwd / (frozen fwd + frozen bwd dx)", FLUSH_BYTES >> 20);
    println!("TFLOP/s counts the frozen product alone (2 T d_in d_out), for every op");
    println!("{:<28} {:<26} {:>10} {:>9} {:>8}", "shape", "op", "ms", "TFLOP/s", "x frozen");
    let mut failed = false;
    for (label, s) in shapes {
        let st = dev.stream().clone();
        let mut b = bufs(&st, &s);
        let sc = 2.0f32;
        let mut paths = vec![Path::Composed];
        if FUSED_GEMM_BUILT {
            paths.push(Path::Fused);
            paths.push(Path::FusedSm90);
        }
        let frozen_flops = 2.0 * s.tokens as f64 * s.d_in as f64 * s.d_out as f64;
        let mut rows: Vec<(String, wegeft::Result<f64>, f64)> = Vec::new();
        rows.push((FROZEN_FWD.into(), time(&dev, &mut flush, iters, || dev.frozen_forward(&s, &b.x, &b.w, None, &mut b.y, None)), frozen_flops));
        rows.push((FROZEN_BWD.into(), time(&dev, &mut flush, iters, || dev.frozen_backward(&s, &b.w, &b.g, &mut b.dx, None)), frozen_flops));
        for p in paths {
            let l = Launch::new().path(p);
            rows.push((
                format!("wegeft fwd {p:?}"),
                time(&dev, &mut flush, iters, || dev.wegeft_forward(&s, &b.x, &b.w, None, &b.phi, &b.psi, sc, Dropout::NONE, &mut b.u, &mut b.c, &mut b.y, l)),
                frozen_flops,
            ));
            rows.push((
                format!("wegeft bwd {p:?}"),
                time(&dev, &mut flush, iters, || {
                    dev.wegeft_backward(&s, &b.x, &b.w, &b.psi, sc, Dropout::NONE, &b.u, &b.c, &b.g, Some(&mut b.dx), &mut b.dphi, &mut b.dpsi, l)
                }),
                frozen_flops,
            ));
            rows.push((
                format!("lora fwd {p:?}"),
                time(&dev, &mut flush, iters, || dev.lora_forward(&s, &b.x, &b.w, None, &b.psi, &b.bm, sc, &mut b.u, &mut b.y, l)),
                frozen_flops,
            ));
            rows.push((
                format!("lora bwd {p:?}"),
                time(&dev, &mut flush, iters, || {
                    dev.lora_backward(&s, &b.x, &b.w, &b.psi, &b.bm, sc, &b.u, &b.g, Some(&mut b.dx), &mut b.da, &mut b.db, l)
                }),
                frozen_flops,
            ));
        }
        rows.push((
            "wegeft merge".into(),
            time(&dev, &mut flush, iters, || dev.wegeft_merge(&s, &mut b.w, &b.phi, &b.psi, 1e-3, None)),
            2.0 * s.d_out as f64 * s.d_in as f64 * s.rank as f64 * 2.0,
        ));
        let ms_of = |rows: &[(String, wegeft::Result<f64>, f64)], op: &str| -> Option<f64> {
            rows.iter().find(|r| r.0 == op).and_then(|r| r.1.as_ref().ok().copied())
        };
        let frozen_fwd = ms_of(&rows, FROZEN_FWD);
        let frozen_bwd = ms_of(&rows, FROZEN_BWD);
        // fwd+bwd sums per (method, path): the training step's cost of the layer.
        let mut sums: Vec<(String, wegeft::Result<f64>, f64)> = Vec::new();
        for (op, _, _) in rows.iter().filter(|r| r.0.contains(" fwd ")) {
            let bwd = op.replace(" fwd ", " bwd ");
            if let (Some(f), Some(b)) = (ms_of(&rows, op), ms_of(&rows, &bwd)) {
                sums.push((op.replace(" fwd ", " fwd+bwd "), Ok(f + b), 0.0));
            }
        }
        if let (Some(f), Some(b)) = (frozen_fwd, frozen_bwd) {
            sums.insert(0, ("frozen fwd+bwd dx (cuBLASLt)".into(), Ok(f + b), 0.0));
        }
        let frozen_sum = frozen_fwd.zip(frozen_bwd).map(|(f, b)| f + b);
        rows.extend(sums);
        for (op, r, flops) in rows {
            let floor = if op.contains("fwd+bwd") {
                frozen_sum
            } else if op.contains(" bwd") {
                frozen_bwd
            } else if op.contains(" fwd") {
                frozen_fwd
            } else {
                None
            };
            match r {
                Ok(ms) => {
                    let ratio = floor.map(|f| ms / f);
                    let tf = if flops > 0.0 { format!("{:>9.1}", flops / (ms * 1e-3) / 1e12) } else { format!("{:>9}", "") };
                    let rs = ratio.map(|x| format!("{x:>8.3}")).unwrap_or_else(|| format!("{:>8}", "-"));
                    println!("{label:<28} {op:<26} {ms:>10.4} {tf} {rs}");
                    if let Some(f) = json.as_mut() {
                        use std::io::Write;
                        let ratio = ratio.map(|x| x.to_string()).unwrap_or_else(|| "null".into());
                        let _ = writeln!(
                            f,
                            "{{\"device\":{name:?},\"shape\":{label:?},\"op\":{op:?},\"ms\":{ms},\"ratio_to_frozen\":{ratio},\"iters\":{iters}}}"
                        );
                    }
                }
                Err(e) => {
                    failed = true;
                    println!("{label:<28} {op:<26} FAILED: {e}");
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
