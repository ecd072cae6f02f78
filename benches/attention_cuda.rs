//! GPU benchmark of the attention kernels (`wegeft::cuda::attention`, bf16, SmolLM2's heads:
//! H=9, KVH=3, hd=64, B=16, S=512 and 2048): forward (tensor-core kernel), backward (D,
//! tensor-core dq and dk/dv passes), and one decode step over a 2048-position cache. Timed with
//! CUDA events: 3 warm-up runs, then the median of `WEGEFT_BENCH_ITERS` (default 30) runs, each
//! after a 256 MiB memset that evicts the L2. Prints milliseconds and TFLOP/s counted as
//! FlashAttention does for causal attention (forward `2 B H S^2 hd`, backward 2.5x that).
//! `scripts/torch_sdpa.py` times PyTorch's `scaled_dot_product_attention` on the same shapes.
//!
//! `cargo bench --features cuda --bench attention_cuda`. Without a device it prints
//! `skipped: no CUDA device` and exits 0 (with `WEGEFT_REQUIRE_GPU=1` it exits 1).

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use wegeft::backend::AttnShape;
use wegeft::cuda::attention::{attention_backward, attention_decode, attention_forward};
use wegeft::cuda::CudaBackend;
use wegeft::Error;

fn rand(st: &Arc<CudaStream>, n: usize, seed: u64) -> CudaSlice<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let h: Vec<bf16> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        })
        .collect();
    st.clone_htod(&h).expect("upload")
}

fn cuda_err(e: impl std::fmt::Display) -> Error {
    Error::Cuda { op: "bench event", msg: e.to_string() }
}

/// Median milliseconds of `iters` runs of `f` after 3 warm-up runs, L2 flushed before each.
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

fn run(dev: &CudaBackend, iters: usize) -> wegeft::Result<()> {
    let st = dev.stream().clone();
    let mut flush = st.alloc_zeros::<u8>(256 << 20).map_err(cuda_err)?;
    let (b, h, kvh, hd) = (16usize, 9usize, 3usize, 64usize);
    for seq in [512usize, 2048] {
        let s = AttnShape::new(b, seq, h, kvh, hd)?;
        let (n, qw, kw) = (s.tokens(), s.q_width(), s.kv_width());
        let q = rand(&st, n * qw, 1);
        let k = rand(&st, n * kw, 2);
        let v = rand(&st, n * kw, 3);
        let g = rand(&st, n * qw, 4);
        let mut out = st.alloc_zeros::<bf16>(n * qw).map_err(cuda_err)?;
        let mut lse = st.alloc_zeros::<f32>(n * h).map_err(cuda_err)?;
        let mut dq = st.alloc_zeros::<bf16>(n * qw).map_err(cuda_err)?;
        let mut dk = st.alloc_zeros::<bf16>(n * kw).map_err(cuda_err)?;
        let mut dv = st.alloc_zeros::<bf16>(n * kw).map_err(cuda_err)?;
        let flops = 2.0 * (b * h) as f64 * (seq * seq) as f64 * hd as f64;
        let fwd = time(dev, &mut flush, iters, || attention_forward(dev, &st, s, &q, &k, &v, &mut out, &mut lse))?;
        let bwd = time(dev, &mut flush, iters, || {
            attention_backward(dev, &st, s, &q, &k, &v, &out, &lse, &g, &mut dq, &mut dk, &mut dv)
        })?;
        println!(
            "attention B={b} S={seq} H={h} KVH={kvh} hd={hd}: forward {fwd:.3} ms ({:.1} TFLOP/s), backward {bwd:.3} ms ({:.1} TFLOP/s)",
            flops / fwd / 1e9,
            2.5 * flops / bwd / 1e9
        );
        println!("{{\"op\":\"attention\",\"seq\":{seq},\"fwd_ms\":{fwd:.4},\"bwd_ms\":{bwd:.4}}}");
    }
    // One decode step: B=16 sequences, 2048 positions of cache.
    let (cap, len) = (2048usize, 2048usize);
    let q = rand(&st, b * h * hd, 5);
    let kc = rand(&st, b * cap * kvh * hd, 6);
    let vc = rand(&st, b * cap * kvh * hd, 7);
    let mut out = st.alloc_zeros::<bf16>(b * h * hd).map_err(cuda_err)?;
    let dec = time(dev, &mut flush, iters, || attention_decode(dev, &st, &q, &kc, &vc, b, h, kvh, hd, cap, len, &mut out))?;
    let bytes = 2.0 * (b * len * kvh * hd * 2) as f64;
    println!("attention decode B={b} len={len}: {dec:.4} ms ({:.0} GB/s of K/V)", bytes / dec / 1e6);
    println!("{{\"op\":\"decode\",\"len\":{len},\"ms\":{dec:.4}}}");
    Ok(())
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
    let iters: usize = std::env::var("WEGEFT_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    println!("device: {} (cc {:?}); bf16; median of {iters}", dev.name().unwrap_or_default(), dev.compute_capability());
    if let Err(e) = run(&dev, iters) {
        eprintln!("attention benchmark failed: {e}");
        std::process::exit(1);
    }
}
