//! GPU benchmark of one layer, timed with CUDA events (bf16 storage): WeGeFT forward and
//! backward on each available path (composed: cuBLASLt + rank-r products; fused: the
//! K-extended GEMM when built in, `Fused` and `FusedSm90`; the rank-r products through
//! cuBLASLt, the default `ProductEngine`, and for `ComposedTiles` through the tile kernels
//! of `kernels/lowrank.cu`), LoRA forward/backward, and the
//! frozen layer alone through cuBLASLt (forward `y = x W^T`, backward `dx = G W`: the floor
//! every adapter is measured against). Each result is also printed as a ratio to that floor.
//!
//! Shapes (one run): T=8192, d_in=d_out=4096, r=64, and SmolLM2-135M's projections at
//! T=4096 (576x576, 576->1536, 1536->576; r=8). Inputs are random (never zeros; the saved
//! `u`, `c` the backward reads come from the forward timed just before it). Timing: 3 warm-up
//! runs, then per rep a 256 MiB memset (flushes the L2, outside the timed interval) and one
//! run between two events; the median of the reps is reported.
//!
//! After the timings of a shape, every path's results are checked against the `Composed`
//! path's (cuBLASLt + the rank-r kernels) on the same inputs, each call run once more from
//! outputs poisoned with NaN and zeroed gradient accumulators: `Auto`, `ComposedTiles`, and
//! `Fused`, `FusedSm90` when built in; WeGeFT `y`, `u`, `C`, `dx`, `dphi`, `dpsi` and LoRA `y`, `xa`,
//! `dx`, `dA`, `dB` (every backward reads the reference forward's saved `u`, `C`, `xa`). Errors
//! are relative to the largest reference element; tolerances: see [`TOL_BF16`], [`TOL_F32`].
//! A NaN anywhere (in the reference too) fails. A mismatch prints the path, the quantity and
//! the error, and the bench exits 1 after printing everything.
//!
//! Two measurements for what comes next, per shape: `kext fwd|bwd cuBLASLt (padded)`, the
//! K-extended products as single cuBLASLt GEMMs on operands stored padded (`[x|u]`, `[W|C]`,
//! `[G|v]`, `[W;psi]`; random data, unchecked): the floor of a fused GEMM as fast as cuBLAS;
//! a `host:` line, the host's time to enqueue a WeGeFT forward + backward against the
//! device's (whether a CUDA graph would pay at that shape); and a `graph:` line, that pair
//! captured into a CUDA graph and replayed (its time, and whether the replay writes the same
//! y, u, C and dx as a direct call: a MISMATCH fails the bench; a pair that cannot be captured
//! is reported, not failed, since the crate captures nothing itself).
//!
//! `cargo bench --features cuda --bench layer_cuda`. Without a device it prints
//! `skipped: no CUDA device` and exits 0 (with `WEGEFT_REQUIRE_GPU=1` it exits 1).
//! Environment: `WEGEFT_BENCH_ITERS` (timed reps, default 50), `WEGEFT_BENCH_JSON`
//! (a file to write the results to as JSON lines), `WEGEFT_BENCH_QUICK=1` (one small shape).

#[path = "common/gpu.rs"]
mod gpu;
use gpu::{cuda_err, poison, rel_err, time};

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use wegeft::cuda::{CudaBackend, Dropout, Launch, Path, ProductEngine, FUSED_GEMM_BUILT};
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

// ---- the cross-path check ----------------------------------------------------------------------

/// Tolerance of a bf16 result (`y`, `dx`, the saved `u`, `C`, `xa`) against the Composed
/// path's, relative to its largest element. Both sides round to bf16 (2^-9 relative) and read
/// the same bf16 operands; only the summation order of the K = d_in (+ r) products differs,
/// so honest results differ by ~1e-3 of the largest element. tests/cuda_layer.rs allows bf16
/// 1e-2 against float64 at K <= 259; 2e-2 at K = 4096 still fails a wrong or skipped tile, a
/// lost K chunk or an unwritten (NaN) element.
const TOL_BF16: f64 = 2e-2;
/// Tolerance of the f32 gradient accumulators (`dphi`, `dpsi`, `dA`, `dB`). The path only
/// switches the two K-extended GEMMs (`y`, `dx`); these come from the same rank-r kernels on
/// the same inputs whatever the path, so they agree to f32 rounding (tests/cuda_layer.rs: f32
/// 1e-5 against float64; 1e-4 leaves room for a split-K order). More means a path disturbed them.
const TOL_F32: f64 = 1e-4;
/// The f32 gradients of `ComposedTiles` (the rank-r products on the tile kernels) against
/// Composed's (cuBLASLt): the two engines sum in another order, so the bf16 intermediates they
/// round (`v = G C`, `gb = s G B`, `u`, `C`) differ by an ulp here and there (2^-8 relative),
/// and the gradients made from them by up to that much. The first GPU run gave 1.5e-4 at
/// T = 8192; 4e-3 still fails a wrong or lost tile. (Both engines are checked against float64
/// in tests/cuda_layer.rs.)
const TOL_F32_ENGINES: f64 = 4e-3;



fn down_t(dev: &CudaBackend, buf: &CudaSlice<T>) -> wegeft::Result<Vec<f32>> {
    Ok(dev.stream().clone_dtoh(buf).map_err(cuda_err)?.into_iter().map(|v| v.to_f32()).collect())
}

fn down_f32(dev: &CudaBackend, buf: &CudaSlice<f32>) -> wegeft::Result<Vec<f32>> {
    dev.stream().clone_dtoh(buf).map_err(cuda_err)
}

/// The reference forward's saved activations, read by every path's backward.
struct Saved {
    u: CudaSlice<T>,
    c: CudaSlice<T>,
    xa: CudaSlice<T>,
}

/// One path's results: (quantity, values, tolerance).
type Outputs = Vec<(&'static str, Vec<f32>, f64)>;

/// Runs the four layer calls once on `path`, each from outputs poisoned with NaN (gradient
/// accumulators zeroed), and downloads every result. The backwards read `saved`; with `save`
/// (the reference run) this run's forward results are copied there first.
fn run_once(dev: &CudaBackend, s: &LayerShape, b: &mut Bufs, saved: &mut Saved, path: Path, sc: f32, save: bool) -> wegeft::Result<Outputs> {
    let st = dev.stream().clone();
    let l = Launch::new().path(path);
    let mut out: Outputs = Vec::new();
    poison(dev.stream(), &mut b.u)?;
    poison(dev.stream(), &mut b.c)?;
    poison(dev.stream(), &mut b.y)?;
    dev.wegeft_forward(s, &b.x, &b.w, None, &b.phi, &b.psi, sc, Dropout::NONE, &mut b.u, &mut b.c, &mut b.y, l)?;
    out.push(("wegeft y", down_t(dev, &b.y)?, TOL_BF16));
    out.push(("wegeft u", down_t(dev, &b.u)?, TOL_BF16));
    out.push(("wegeft C", down_t(dev, &b.c)?, TOL_BF16));
    if save {
        st.memcpy_dtod(&b.u, &mut saved.u).map_err(cuda_err)?;
        st.memcpy_dtod(&b.c, &mut saved.c).map_err(cuda_err)?;
    }
    poison(dev.stream(), &mut b.dx)?;
    st.memset_zeros(&mut b.dphi).map_err(cuda_err)?;
    st.memset_zeros(&mut b.dpsi).map_err(cuda_err)?;
    dev.wegeft_backward(s, &b.x, &b.w, &b.psi, sc, Dropout::NONE, &saved.u, &saved.c, &b.g, Some(&mut b.dx), &mut b.dphi, &mut b.dpsi, l)?;
    out.push(("wegeft dx", down_t(dev, &b.dx)?, TOL_BF16));
    out.push(("wegeft dphi", down_f32(dev, &b.dphi)?, TOL_F32));
    out.push(("wegeft dpsi", down_f32(dev, &b.dpsi)?, TOL_F32));
    poison(dev.stream(), &mut b.u)?;
    poison(dev.stream(), &mut b.y)?;
    dev.lora_forward(s, &b.x, &b.w, None, &b.psi, &b.bm, sc, &mut b.u, &mut b.y, l)?;
    out.push(("lora y", down_t(dev, &b.y)?, TOL_BF16));
    out.push(("lora xa", down_t(dev, &b.u)?, TOL_BF16));
    if save {
        st.memcpy_dtod(&b.u, &mut saved.xa).map_err(cuda_err)?;
    }
    poison(dev.stream(), &mut b.dx)?;
    st.memset_zeros(&mut b.da).map_err(cuda_err)?;
    st.memset_zeros(&mut b.db).map_err(cuda_err)?;
    dev.lora_backward(s, &b.x, &b.w, &b.psi, &b.bm, sc, &saved.xa, &b.g, Some(&mut b.dx), &mut b.da, &mut b.db, l)?;
    out.push(("lora dx", down_t(dev, &b.dx)?, TOL_BF16));
    out.push(("lora dA", down_f32(dev, &b.da)?, TOL_F32));
    out.push(("lora dB", down_f32(dev, &b.db)?, TOL_F32));
    Ok(out)
}

/// Checks every path against `Composed` on `b`'s inputs (see the module docs). Returns the
/// lines to print and whether anything failed.
/// `kext fwd cuBLASLt (padded)`: `y = [x|u][W|C]^T` as one cuBLASLt GEMM with K = d_in + r,
/// `[x|u]` (T x (d_in + r)) and `[W|C]` (d_out x (d_in + r)) stored padded; `kext bwd ...`:
/// `dx = [G|v][W;psi]` with K = d_out + r, `[W;psi]` stored as (d_out + r) x d_in. The floor a
/// fused K-extended GEMM as fast as cuBLAS would reach (before `u`, `C`, `v`).
fn ceiling_rows(dev: &CudaBackend, flush: &mut CudaSlice<u8>, iters: usize, s: &LayerShape, flops: f64) -> Vec<(String, wegeft::Result<f64>, f64)> {
    use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
    let st = dev.stream().clone();
    let (t, din, dout, r) = (s.tokens, s.d_in, s.d_out, s.rank);
    let blas = match CudaBlasLT::new(st.clone()) {
        Ok(b) => b,
        Err(e) => {
            let e = || Err(Error::Cuda { op: "cuBLASLt", msg: format!("{e:?}") });
            return vec![("kext fwd cuBLASLt (padded)".into(), e(), flops), ("kext bwd cuBLASLt (padded)".into(), e(), flops)];
        }
    };
    let cfg = |transa: bool, m: usize, n: usize, k: usize, lda: usize, ldb: usize, ldc: usize| MatmulConfig {
        transa,
        transb: false,
        transc: false,
        m: m as u64,
        n: n as u64,
        k: k as u64,
        alpha: 1.0,
        lda: lda as i64,
        ldb: ldb as i64,
        beta: 0.0,
        ldc: ldc as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let blas_err = |e: cudarc::cublaslt::result::CublasError| Error::Cuda { op: "cuBLASLt", msg: format!("{e:?}") };
    // Column-major: y^T (d_out x T) = [W|C] (op: transposed) [x|u]^T.
    let (k1, xu, wc) = (din + r, rand(&st, t * (din + r), 11, 1.0), rand(&st, dout * (din + r), 12, 0.02));
    let mut y: CudaSlice<T> = st.alloc_zeros(t * dout).unwrap();
    let fwd = time(dev, flush, iters, || {
        // SAFETY: xu, wc and y hold exactly the padded matrices described by the config.
        unsafe { blas.matmul(cfg(true, dout, t, k1, k1, k1, dout), &wc, &xu, &mut y, None, None) }.map_err(blas_err)
    });
    // dx^T (d_in x T) = [W;psi]^T (as stored) [G|v]^T.
    let (k2, gv, wp) = (dout + r, rand(&st, t * (dout + r), 13, 1.0), rand(&st, (dout + r) * din, 14, 0.02));
    let mut dx: CudaSlice<T> = st.alloc_zeros(t * din).unwrap();
    let bwd = time(dev, flush, iters, || {
        // SAFETY: as above.
        unsafe { blas.matmul(cfg(false, din, t, k2, din, k2, din), &wp, &gv, &mut dx, None, None) }.map_err(blas_err)
    });
    vec![("kext fwd cuBLASLt (padded)".into(), fwd, flops), ("kext bwd cuBLASLt (padded)".into(), bwd, flops)]
}

/// One WeGeFT forward + backward pair on `b` (no bias, no dropout), as a training step runs it.
fn fwd_bwd_pair(dev: &CudaBackend, s: &LayerShape, b: &mut Bufs, sc: f32, l: Launch) -> wegeft::Result<()> {
    dev.wegeft_forward(s, &b.x, &b.w, None, &b.phi, &b.psi, sc, Dropout::NONE, &mut b.u, &mut b.c, &mut b.y, l)?;
    dev.wegeft_backward(s, &b.x, &b.w, &b.psi, sc, Dropout::NONE, &b.u, &b.c, &b.g, Some(&mut b.dx), &mut b.dphi, &mut b.dpsi, l)
}

/// One WeGeFT forward + backward pair (Auto) captured into a CUDA graph and replayed 20 times:
/// milliseconds per replayed pair, and whether a replay writes the same y, u, C and dx as a
/// direct call (bitwise). What capturing the training step would give where the layer is
/// host-bound; the crate does not capture anything itself.
/// The bool: the replay wrote something else (a failure of the bench).
fn graph_line(dev: &CudaBackend, label: &str, s: &LayerShape, b: &mut Bufs, sc: f32) -> (String, bool) {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    const N: usize = 20;
    let l = Launch::new();
    let st = dev.stream().clone();
    let mut run = || -> wegeft::Result<(String, bool)> {
        let pair = |b: &mut Bufs| fwd_bwd_pair(dev, s, b, sc, l);
        pair(b)?; // warm: algorithm choices, pool growth
        let direct = [down_t(dev, &b.y)?, down_t(dev, &b.u)?, down_t(dev, &b.c)?, down_t(dev, &b.dx)?];
        st.synchronize().map_err(cuda_err)?;
        st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(cuda_err)?;
        let captured = pair(b);
        let graph = st.end_capture(CUgraphInstantiate_flags(0)).map_err(cuda_err);
        captured?;
        let graph = graph?.ok_or_else(|| Error::invalid("graph", "the capture made no graph"))?;
        for p in [&mut b.y, &mut b.u, &mut b.c, &mut b.dx] {
            poison(&st, p)?;
        }
        graph.launch().map_err(cuda_err)?;
        let replayed = [down_t(dev, &b.y)?, down_t(dev, &b.u)?, down_t(dev, &b.c)?, down_t(dev, &b.dx)?];
        let same = direct.iter().zip(&replayed).all(|(a, r)| a.iter().zip(r).all(|(x, y)| x.to_bits() == y.to_bits()));
        st.synchronize().map_err(cuda_err)?;
        let t0 = std::time::Instant::now();
        for _ in 0..N {
            graph.launch().map_err(cuda_err)?;
        }
        let host = t0.elapsed().as_secs_f64() * 1e3 / N as f64;
        st.synchronize().map_err(cuda_err)?;
        let total = t0.elapsed().as_secs_f64() * 1e3 / N as f64;
        let line = format!(
            "{label:<28} graph: one fwd + bwd pair (Auto) replayed from a CUDA graph takes {total:.4} ms per pair ({host:.4} ms on the host); replay {}",
            if same { "writes the same y, u, C, dx" } else { "MISMATCH: y, u, C or dx differ from a direct call" }
        );
        Ok((line, !same))
    };
    match run() {
        Ok(r) => r,
        // Not capturable is a finding, not a failure: the crate does not capture.
        Err(e) => (format!("{label:<28} graph: capturing a fwd + bwd pair did not work: {e}"), false),
    }
}

/// Enqueues 20 WeGeFT forward + backward pairs (Auto) without waiting, then waits: the host's
/// milliseconds per pair against the device's (the whole wait included).
fn host_enqueue_line(dev: &CudaBackend, label: &str, s: &LayerShape, b: &mut Bufs, sc: f32) -> String {
    const N: usize = 20;
    let l = Launch::new();
    let mut run = || -> wegeft::Result<(f64, f64)> {
        dev.stream().synchronize().map_err(cuda_err)?;
        let t0 = std::time::Instant::now();
        for _ in 0..N {
            fwd_bwd_pair(dev, s, b, sc, l)?;
        }
        let host = t0.elapsed().as_secs_f64() * 1e3 / N as f64;
        dev.stream().synchronize().map_err(cuda_err)?;
        Ok((host, t0.elapsed().as_secs_f64() * 1e3 / N as f64))
    };
    let _ = run(); // warm: algorithm choices, pool growth
    match run() {
        Ok((host, total)) => format!(
            "{label:<28} host: enqueueing wegeft fwd + bwd (Auto) takes {host:.4} ms per pair on the host; {total:.4} ms per pair until the device is done ({})",
            if host > 0.8 * total { "host-bound" } else { "device-bound" }
        ),
        Err(e) => format!("{label:<28} host: enqueue timing FAILED: {e}"),
    }
}

/// A path's name in the table: `Composed` on the tile kernels is `ComposedTiles`.
fn label_of(p: Path, engine: ProductEngine) -> String {
    match engine {
        ProductEngine::CublasLt => format!("{p:?}"),
        ProductEngine::Tiles => format!("{p:?}Tiles"),
    }
}

fn check_paths(dev: &CudaBackend, label: &str, s: &LayerShape, b: &mut Bufs, sc: f32) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut failed = false;
    let st = dev.stream().clone();
    let saved = (|| -> wegeft::Result<Saved> {
        Ok(Saved {
            u: st.alloc_zeros(s.tokens * s.rank).map_err(cuda_err)?,
            c: st.alloc_zeros(s.d_out * s.rank).map_err(cuda_err)?,
            xa: st.alloc_zeros(s.tokens * s.rank).map_err(cuda_err)?,
        })
    })();
    let reference = saved.and_then(|mut saved| run_once(dev, s, b, &mut saved, Path::Composed, sc, true).map(|r| (r, saved)));
    let (refs, mut saved) = match reference {
        Ok(r) => r,
        Err(e) => {
            lines.push(format!("{label:<28} check: the Composed reference FAILED: {e}"));
            return (lines, true);
        }
    };
    for (q, v, _) in &refs {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            failed = true;
            lines.push(format!("{label:<28} check Composed (reference): MISMATCH {q}: non-finite {} at element {i}", v[i]));
        }
    }
    // Composed on the tile kernels for the rank-r products (`ProductEngine::Tiles`) too.
    let mut paths = vec![(Path::Auto, ProductEngine::CublasLt), (Path::Composed, ProductEngine::Tiles)];
    if FUSED_GEMM_BUILT {
        paths.push((Path::Fused, ProductEngine::CublasLt));
        paths.push((Path::FusedSm90, ProductEngine::CublasLt));
    }
    paths.push((Path::Tuned, ProductEngine::CublasLt));
    for (p, engine) in paths {
        dev.set_product_engine(engine);
        let outs = run_once(dev, s, b, &mut saved, p, sc, false);
        dev.set_product_engine(ProductEngine::CublasLt);
        let p = label_of(p, engine);
        match outs {
            Err(e) => {
                failed = true;
                lines.push(format!("{label:<28} check {p}: FAILED: {e}"));
            }
            Ok(outs) => {
                let (mut worst_h, mut worst_f, mut bad) = (0f64, 0f64, false);
                for ((q, got, tol), (_, want, _)) in outs.iter().zip(&refs) {
                    let f32_grad = *tol == TOL_F32;
                    let tol = &if f32_grad && engine == ProductEngine::Tiles { TOL_F32_ENGINES } else { *tol };
                    let (e, at) = rel_err(got, want);
                    if f32_grad {
                        worst_f = worst_f.max(e);
                    } else {
                        worst_h = worst_h.max(e);
                    }
                    if e > *tol {
                        // (`rel_err` never returns NaN: non-finite values are infinite errors.)
                        bad = true;
                        lines.push(format!(
                            "{label:<28} check {p}: MISMATCH {q}: error {e:.3e} at element {at} (got {}, Composed {}), tolerance {tol:e}",
                            got.get(at).copied().unwrap_or(f32::NAN),
                            want.get(at).copied().unwrap_or(f32::NAN)
                        ));
                    }
                }
                failed |= bad;
                lines.push(format!(
                    "{label:<28} check {p} vs Composed: worst error {worst_h:.2e} (bf16 y u C dx xa, tol {TOL_BF16:e}), {worst_f:.2e} (f32 dphi dpsi dA dB, tol {:e}): {}",
                    if engine == ProductEngine::Tiles { TOL_F32_ENGINES } else { TOL_F32 },
                    if bad { "OUT OF TOLERANCE" } else { "ok" }
                ));
            }
        }
    }
    (lines, failed)
}

/// Bytes written between reps to evict the L2 (H100: 50 MB, H200: 60 MB).
const FLUSH_BYTES: usize = 256 << 20;


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
        // Tuned last: its warm-up runs time the others once per product, then it runs the winner.
        let mut paths = vec![(Path::Composed, ProductEngine::CublasLt), (Path::Composed, ProductEngine::Tiles)];
        if FUSED_GEMM_BUILT {
            paths.push((Path::Fused, ProductEngine::CublasLt));
            paths.push((Path::FusedSm90, ProductEngine::CublasLt));
        }
        paths.push((Path::Tuned, ProductEngine::CublasLt));
        let frozen_flops = 2.0 * s.tokens as f64 * s.d_in as f64 * s.d_out as f64;
        let mut rows: Vec<(String, wegeft::Result<f64>, f64)> = Vec::new();
        rows.push((FROZEN_FWD.into(), time(&dev, &mut flush, iters, || dev.frozen_forward(&s, &b.x, &b.w, None, &mut b.y, None)), frozen_flops));
        rows.push((FROZEN_BWD.into(), time(&dev, &mut flush, iters, || dev.frozen_backward(&s, &b.w, &b.g, &mut b.dx, None)), frozen_flops));
        for (p, engine) in paths {
            dev.set_product_engine(engine);
            let l = Launch::new().path(p);
            let p = label_of(p, engine);
            rows.push((
                format!("wegeft fwd {p}"),
                time(&dev, &mut flush, iters, || dev.wegeft_forward(&s, &b.x, &b.w, None, &b.phi, &b.psi, sc, Dropout::NONE, &mut b.u, &mut b.c, &mut b.y, l)),
                frozen_flops,
            ));
            rows.push((
                format!("wegeft bwd {p}"),
                time(&dev, &mut flush, iters, || {
                    dev.wegeft_backward(&s, &b.x, &b.w, &b.psi, sc, Dropout::NONE, &b.u, &b.c, &b.g, Some(&mut b.dx), &mut b.dphi, &mut b.dpsi, l)
                }),
                frozen_flops,
            ));
            rows.push((
                format!("lora fwd {p}"),
                time(&dev, &mut flush, iters, || dev.lora_forward(&s, &b.x, &b.w, None, &b.psi, &b.bm, sc, &mut b.u, &mut b.y, l)),
                frozen_flops,
            ));
            rows.push((
                format!("lora bwd {p}"),
                time(&dev, &mut flush, iters, || {
                    dev.lora_backward(&s, &b.x, &b.w, &b.psi, &b.bm, sc, &b.u, &b.g, Some(&mut b.dx), &mut b.da, &mut b.db, l)
                }),
                frozen_flops,
            ));
            dev.set_product_engine(ProductEngine::CublasLt);
        }
        // The K-extended products as single cuBLASLt GEMMs on padded operands: what the fused
        // form would cost at cuBLAS's speed (not a path of the crate; random data, unchecked).
        rows.extend(ceiling_rows(&dev, &mut flush, iters, &s, frozen_flops));
        // Every path's results against Composed's, before the merge below changes W.
        let (check_lines, check_failed) = check_paths(&dev, label, &s, &mut b, sc);
        failed |= check_failed;
        // The host's side: how long enqueueing a forward + backward takes against how long the
        // device runs it (host-bound where the first is the larger).
        let host_line = host_enqueue_line(&dev, label, &s, &mut b, sc);
        let (graph_line, graph_failed) = graph_line(&dev, label, &s, &mut b, sc);
        failed |= graph_failed;
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
        for l in check_lines {
            println!("{l}");
        }
        println!("{host_line}");
        println!("{graph_line}");
    }
    // What Path::Tuned chose for every product it met (the check's shapes included).
    for (k, t) in dev.tuned_paths() {
        let times: Vec<String> = t.timings.iter().map(|(p, ms)| format!("{p:?} {ms:.4} ms")).collect();
        println!(
            "tuned: {} {} m={} n={} k1={} k2={} vector loads {} -> {:?} ({})",
            if k.nt { "fwd  [x|u][W|C]^T" } else { "bwd  [G|v][W;psi]" },
            k.dtype.name(),
            k.m,
            k.n,
            k.k1,
            k.k2,
            k.vector_loads,
            t.path,
            times.join(", ")
        );
    }
    if failed {
        eprintln!("layer_cuda: a row failed or a path's results differ from Composed's (see the lines above)");
        std::process::exit(1);
    }
}
