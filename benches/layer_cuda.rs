//! GPU benchmark of one layer, timed with CUDA events (bf16 storage): WeGeFT forward and
//! backward on each available path (composed: cuBLASLt + rank-r kernels; fused: the
//! K-extended GEMM when built in), LoRA forward/backward, and the frozen layer alone
//! (the floor every adapter is measured against).
//!
//! `cargo bench --features cuda --bench layer_cuda`. Without a device it prints
//! `skipped: no CUDA device` and exits 0 (with `WEGEFT_REQUIRE_GPU=1` it exits 1).
//! Environment: `WEGEFT_BENCH_ITERS` (timed iterations, default 20), `WEGEFT_BENCH_JSON`
//! (a file to write the results to as JSON lines), `WEGEFT_BENCH_QUICK=1` (one small shape).

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use wegeft::cuda::{CudaBackend, Dropout, Launch, Path, FUSED_GEMM_BUILT};
use wegeft::{Error, LayerShape};

type T = bf16;

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
        u: st.alloc_zeros(s.tokens * s.rank).unwrap(),
        c: st.alloc_zeros(s.d_out * s.rank).unwrap(),
        y: st.alloc_zeros(s.tokens * s.d_out).unwrap(),
        dx: st.alloc_zeros(s.tokens * s.d_in).unwrap(),
        dphi: st.alloc_zeros(s.d_in * s.rank).unwrap(),
        dpsi: st.alloc_zeros(s.rank * s.d_in).unwrap(),
        bm: rand(st, s.d_out * s.rank, 6, 0.01),
        da: st.alloc_zeros(s.rank * s.d_in).unwrap(),
        db: st.alloc_zeros(s.d_out * s.rank).unwrap(),
    }
}

/// Median milliseconds of `iters` runs of `f` (after 3 warm-up runs), timed with events.
fn time(dev: &CudaBackend, iters: usize, mut f: impl FnMut() -> wegeft::Result<()>) -> wegeft::Result<f64> {
    let st = dev.stream();
    for _ in 0..3 {
        f()?;
    }
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let e0 = dev.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| Error::Cuda { op: "event", msg: e.to_string() })?;
        let e1 = dev.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| Error::Cuda { op: "event", msg: e.to_string() })?;
        e0.record(st).map_err(|e| Error::Cuda { op: "event", msg: e.to_string() })?;
        f()?;
        e1.record(st).map_err(|e| Error::Cuda { op: "event", msg: e.to_string() })?;
        e1.synchronize().map_err(|e| Error::Cuda { op: "event", msg: e.to_string() })?;
        ms.push(e0.elapsed_ms(&e1).map_err(|e| Error::Cuda { op: "event", msg: e.to_string() })? as f64);
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
    let iters: usize = std::env::var("WEGEFT_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
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
    println!("{:<28} {:<26} {:>10} {:>9}", "shape", "op", "ms", "TFLOP/s");
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
        rows.push(("frozen fwd (cuBLASLt)".into(), time(&dev, iters, || dev.frozen_forward(&s, &b.x, &b.w, None, &mut b.y, None)), frozen_flops));
        rows.push(("frozen bwd dx (cuBLASLt)".into(), time(&dev, iters, || dev.frozen_backward(&s, &b.w, &b.g, &mut b.dx, None)), frozen_flops));
        for p in paths {
            let l = Launch::new().path(p);
            rows.push((
                format!("wegeft fwd {p:?}"),
                time(&dev, iters, || dev.wegeft_forward(&s, &b.x, &b.w, None, &b.phi, &b.psi, sc, Dropout::NONE, &mut b.u, &mut b.c, &mut b.y, l)),
                frozen_flops,
            ));
            rows.push((
                format!("wegeft bwd {p:?}"),
                time(&dev, iters, || {
                    dev.wegeft_backward(&s, &b.x, &b.w, &b.psi, sc, Dropout::NONE, &b.u, &b.c, &b.g, Some(&mut b.dx), &mut b.dphi, &mut b.dpsi, l)
                }),
                frozen_flops,
            ));
            rows.push((
                format!("lora fwd {p:?}"),
                time(&dev, iters, || dev.lora_forward(&s, &b.x, &b.w, None, &b.psi, &b.bm, sc, &mut b.u, &mut b.y, l)),
                frozen_flops,
            ));
            rows.push((
                format!("lora bwd {p:?}"),
                time(&dev, iters, || {
                    dev.lora_backward(&s, &b.x, &b.w, &b.psi, &b.bm, sc, &b.u, &b.g, Some(&mut b.dx), &mut b.da, &mut b.db, l)
                }),
                frozen_flops,
            ));
        }
        rows.push((
            "wegeft merge".into(),
            time(&dev, iters, || dev.wegeft_merge(&s, &mut b.w, &b.phi, &b.psi, 1e-3, None)),
            2.0 * s.d_out as f64 * s.d_in as f64 * s.rank as f64 * 2.0,
        ));
        for (op, r, flops) in rows {
            match r {
                Ok(ms) => {
                    println!("{label:<28} {op:<26} {ms:>10.4} {:>9.1}", flops / (ms * 1e-3) / 1e12);
                    if let Some(f) = json.as_mut() {
                        use std::io::Write;
                        let _ = writeln!(f, "{{\"device\":{name:?},\"shape\":{label:?},\"op\":{op:?},\"ms\":{ms}}}");
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
