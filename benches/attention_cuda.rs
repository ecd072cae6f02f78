//! GPU benchmark of the attention kernels (`wegeft::cuda::attention`, bf16, SmolLM2's heads:
//! H=9, KVH=3, hd=64, B=16, S=512 and 2048, and S=2048 with a sliding window of 512): forward
//! (tensor-core kernel), backward (D, tensor-core dq and dk/dv passes), and one decode step over
//! a 2048-position cache. Timed with
//! CUDA events: 3 warm-up runs, then the median of `WEGEFT_BENCH_ITERS` (default 30) runs, each
//! after a 256 MiB memset that evicts the L2. Prints milliseconds and TFLOP/s counted as
//! FlashAttention does for causal attention (forward `2 B H S^2 hd`, backward 2.5x that; with a
//! window `w`, `4 B H hd (S w - w^2 / 2)`, the scores a query keeps, times two).
//! `scripts/torch_sdpa.py` times PyTorch's `scaled_dot_product_attention` on the same shapes.
//!
//! After the timings, the bf16 kernels' results (forward `out`, `lse`; backward `dq`, `dk`,
//! `dv`; decode `out`), each run once more into outputs poisoned with NaN, are checked against
//! the plain-FMA f32 kernels (the same math, `src/cuda/attention.rs`) run on the same
//! bf16-valued inputs (the backward on the bf16 forward's `out` and `lse`). Errors are relative
//! to the largest f32 element, tolerances as in tests/cuda_attention.rs against the CPU: bf16
//! results 2e-2, the bf16 kernel's f32 `lse` 1e-3. A NaN anywhere fails. A mismatch prints the
//! kernel, the quantity and the error, and the bench exits 1 after printing everything.
//!
//! `cargo bench --features cuda --bench attention_cuda`. Without a device it prints
//! `skipped: no CUDA device` and exits 0 (with `WEGEFT_REQUIRE_GPU=1` it exits 1).

#[path = "common/gpu.rs"]
mod gpu;
use gpu::{cuda_err, poison, rel_err, time};

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
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

// ---- the check against the plain f32 kernels ------------------------------------------------------

/// Tolerance of a bf16 result against the f32 kernels' (tests/cuda_attention.rs, bf16 vs CPU).
const TOL_BF16: f64 = 2e-2;
/// Tolerance of the bf16 forward's f32 `lse` (tests/cuda_attention.rs, bf16 vs CPU).
const TOL_LSE: f64 = 1e-3;



fn down_bf16(st: &Arc<CudaStream>, buf: &CudaSlice<bf16>) -> wegeft::Result<Vec<f32>> {
    Ok(st.clone_dtoh(buf).map_err(cuda_err)?.into_iter().map(|v| v.to_f32()).collect())
}

/// An f32 copy of a bf16 device buffer (exact: every bf16 value is an f32).
fn widen(st: &Arc<CudaStream>, buf: &CudaSlice<bf16>) -> wegeft::Result<CudaSlice<f32>> {
    st.clone_htod(&down_bf16(st, buf)?).map_err(cuda_err)
}

fn poisoned<E: DeviceRepr>(st: &Arc<CudaStream>, n: usize) -> wegeft::Result<CudaSlice<E>> {
    // SAFETY: every byte is written by the poisoning memset before anything reads it.
    let mut b = unsafe { st.alloc::<E>(n) }.map_err(cuda_err)?;
    poison(st, &mut b)?;
    Ok(b)
}

/// Compares `got` with `want`, printing a MISMATCH line when the error passes `tol`; returns
/// whether it passed and the error.
fn compare(what: &str, q: &str, got: &[f32], want: &[f32], tol: f64) -> (bool, f64) {
    let (e, at) = rel_err(got, want);
    if e > tol {
        // (`rel_err` never returns NaN: non-finite values are infinite errors.)
        println!(
            "check {what}: MISMATCH {q}: error {e:.3e} at element {at} (got {}, f32 kernel {}), tolerance {tol:e}",
            got.get(at).copied().unwrap_or(f32::NAN),
            want.get(at).copied().unwrap_or(f32::NAN)
        );
        return (false, e);
    }
    (true, e)
}

/// The bf16 forward and backward of `s` on `q, k, v, g` against the f32 kernels' on the same
/// values; prints one line (and one per mismatch), returns whether everything agreed.
#[allow(clippy::too_many_arguments)]
fn check_fwd_bwd(
    dev: &CudaBackend,
    st: &Arc<CudaStream>,
    s: AttnShape,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    g: &CudaSlice<bf16>,
) -> wegeft::Result<bool> {
    let (n, qw, kw) = (s.tokens(), s.q_width(), s.kv_width());
    // bf16 (tensor-core kernels for hd 64), from poisoned outputs.
    let mut out = poisoned::<bf16>(st, n * qw)?;
    let mut lse = poisoned::<f32>(st, n * s.heads)?;
    attention_forward(dev, st, s, q, k, v, &mut out, &mut lse)?;
    let mut dq = poisoned::<bf16>(st, n * qw)?;
    let mut dk = poisoned::<bf16>(st, n * kw)?;
    let mut dv = poisoned::<bf16>(st, n * kw)?;
    attention_backward(dev, st, s, q, k, v, &out, &lse, g, &mut dq, &mut dk, &mut dv)?;
    // f32 (plain-FMA kernels) on the same values; the backward reads the bf16 forward's out, lse.
    let (q32, k32, v32, g32) = (widen(st, q)?, widen(st, k)?, widen(st, v)?, widen(st, g)?);
    let mut out32 = poisoned::<f32>(st, n * qw)?;
    let mut lse32 = poisoned::<f32>(st, n * s.heads)?;
    attention_forward(dev, st, s, &q32, &k32, &v32, &mut out32, &mut lse32)?;
    let outw = widen(st, &out)?;
    let mut dq32 = poisoned::<f32>(st, n * qw)?;
    let mut dk32 = poisoned::<f32>(st, n * kw)?;
    let mut dv32 = poisoned::<f32>(st, n * kw)?;
    attention_backward(dev, st, s, &q32, &k32, &v32, &outw, &lse, &g32, &mut dq32, &mut dk32, &mut dv32)?;
    let what = match s.window {
        None => format!("S={}", s.seq),
        Some(w) => format!("S={} window {w}", s.seq),
    };
    let d32 = |b: &CudaSlice<f32>| st.clone_dtoh(b).map_err(cuda_err);
    let results = [
        compare(&what, "forward out", &down_bf16(st, &out)?, &d32(&out32)?, TOL_BF16),
        compare(&what, "forward lse", &d32(&lse)?, &d32(&lse32)?, TOL_LSE),
        compare(&what, "backward dq", &down_bf16(st, &dq)?, &d32(&dq32)?, TOL_BF16),
        compare(&what, "backward dk", &down_bf16(st, &dk)?, &d32(&dk32)?, TOL_BF16),
        compare(&what, "backward dv", &down_bf16(st, &dv)?, &d32(&dv32)?, TOL_BF16),
    ];
    let ok = results.iter().all(|r| r.0);
    let errs: Vec<String> = results.iter().map(|r| format!("{:.2e}", r.1)).collect();
    println!(
        "check {what} bf16 vs f32 kernels: error out {}, lse {}, dq {}, dk {}, dv {} (tol {TOL_BF16:e}, lse {TOL_LSE:e}): {}",
        errs[0],
        errs[1],
        errs[2],
        errs[3],
        errs[4],
        if ok { "ok" } else { "OUT OF TOLERANCE" }
    );
    Ok(ok)
}


fn run(dev: &CudaBackend, iters: usize) -> wegeft::Result<()> {
    let st = dev.stream().clone();
    let mut flush = st.alloc_zeros::<u8>(256 << 20).map_err(cuda_err)?;
    let (b, h, kvh, hd) = (16usize, 9usize, 3usize, 64usize);
    let mut all_ok = true;
    let mut causal_ms = (0.0, 0.0);
    for (seq, window) in [(512usize, None), (2048, None), (2048, Some(512usize))] {
        let s = AttnShape::new(b, seq, h, kvh, hd)?.with_window(window)?;
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
        // Scores kept, times 2 (multiply-add), times 2 (Q K^T and P V).
        let kept = match window {
            None => (seq * seq) as f64 / 2.0,
            Some(w) => (seq * w) as f64 - (w * w) as f64 / 2.0,
        };
        let flops = 4.0 * (b * h) as f64 * kept * hd as f64;
        let fwd = time(dev, &mut flush, iters, || attention_forward(dev, &st, s, &q, &k, &v, &mut out, &mut lse))?;
        let bwd = time(dev, &mut flush, iters, || {
            attention_backward(dev, &st, s, &q, &k, &v, &out, &lse, &g, &mut dq, &mut dk, &mut dv)
        })?;
        println!(
            "attention B={b} S={seq} H={h} KVH={kvh} hd={hd} window {window:?}: forward {fwd:.3} ms ({:.1} TFLOP/s), backward {bwd:.3} ms ({:.1} TFLOP/s)",
            flops / fwd / 1e9,
            2.5 * flops / bwd / 1e9
        );
        match window {
            None => {
                causal_ms = (fwd, bwd);
                println!("{{\"op\":\"attention\",\"seq\":{seq},\"fwd_ms\":{fwd:.4},\"bwd_ms\":{bwd:.4}}}");
            }
            Some(w) => {
                // Against causal attention over the same length (the loop's previous shape).
                println!(
                    "sliding window {w} of {seq}: forward {:.2}x, backward {:.2}x causal attention's time",
                    fwd / causal_ms.0,
                    bwd / causal_ms.1
                );
                println!("{{\"op\":\"attention\",\"seq\":{seq},\"window\":{w},\"fwd_ms\":{fwd:.4},\"bwd_ms\":{bwd:.4}}}");
            }
        }
        // Checked after the timings (printed above, whatever the check says).
        match check_fwd_bwd(dev, &st, s, &q, &k, &v, &g) {
            Ok(ok) => all_ok &= ok,
            Err(e) => {
                all_ok = false;
                println!("check S={seq}: FAILED: {e}");
            }
        }
    }
    // One decode step: B=16 sequences, 2048 positions of cache.
    let (cap, len) = (2048usize, 2048usize);
    let q = rand(&st, b * h * hd, 5);
    let kc = rand(&st, b * cap * kvh * hd, 6);
    let vc = rand(&st, b * cap * kvh * hd, 7);
    let mut out = st.alloc_zeros::<bf16>(b * h * hd).map_err(cuda_err)?;
    let dec = time(dev, &mut flush, iters, || attention_decode(dev, &st, &q, &kc, &vc, b, h, kvh, hd, cap, len, None, &mut out))?;
    let bytes = 2.0 * (b * len * kvh * hd * 2) as f64;
    println!("attention decode B={b} len={len}: {dec:.4} ms ({:.0} GB/s of K/V)", bytes / dec / 1e6);
    println!("{{\"op\":\"decode\",\"len\":{len},\"ms\":{dec:.4}}}");
    // The bf16 decode against the f32 one on the same values.
    let check_decode = || -> wegeft::Result<bool> {
        let mut o16 = poisoned::<bf16>(&st, b * h * hd)?;
        attention_decode(dev, &st, &q, &kc, &vc, b, h, kvh, hd, cap, len, None, &mut o16)?;
        let (q32, k32, v32) = (widen(&st, &q)?, widen(&st, &kc)?, widen(&st, &vc)?);
        let mut o32 = poisoned::<f32>(&st, b * h * hd)?;
        attention_decode(dev, &st, &q32, &k32, &v32, b, h, kvh, hd, cap, len, None, &mut o32)?;
        let (ok, e) = compare("decode", "out", &down_bf16(&st, &o16)?, &st.clone_dtoh(&o32).map_err(cuda_err)?, TOL_BF16);
        println!("check decode bf16 vs f32 kernels: error out {e:.2e} (tol {TOL_BF16:e}): {}", if ok { "ok" } else { "OUT OF TOLERANCE" });
        Ok(ok)
    };
    match check_decode() {
        Ok(ok) => all_ok &= ok,
        Err(e) => {
            all_ok = false;
            println!("check decode: FAILED: {e}");
        }
    }
    if !all_ok {
        return Err(Error::invalid("attention check", "the bf16 kernels disagree with the f32 ones (see the lines above)"));
    }
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
