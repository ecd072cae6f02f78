//! The CUDA backend against the float64 reference (`wegeft::reference`): every kernel on fresh
//! random inputs, outputs poisoned with NaN before each run, sizes that are multiples of no
//! tile, ranks 1, 8, 64 and 256, a single token; the PyTorch fixtures; determinism. Each on
//! both engines of the rank-r products (cuBLASLt, the tile kernels).
//!
//! Without a CUDA device each GPU test prints `skipped: no CUDA device` and passes; with
//! `WEGEFT_REQUIRE_GPU=1` it fails instead (the GPU check runs them so).
//! Tests named `sanitize_*` are the small cases compute-sanitizer runs.
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;

use common::{assert_close, rand_vec, t};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use half::{bf16, f16};
use wegeft::cuda::{dropout_keep, CudaBackend, Dropout, Launch, Path, ProductEngine};
use wegeft::reference as rf;
use wegeft::{DType, Element, Error, LayerShape};

// ---- the one skip rule ---------------------------------------------------------------------

/// The device, or `None` (after printing `skipped: no CUDA device`) when there is none and
/// `WEGEFT_REQUIRE_GPU` is not `1`. Any other error fails the test.
fn gpu() -> Option<CudaBackend> {
    common::device_or_skip(CudaBackend::new(0))
}

macro_rules! gpu_or_skip {
    () => {
        match gpu() {
            Some(d) => d,
            None => return,
        }
    };
}

// ---- host <-> device ------------------------------------------------------------------------

trait El: Element + DeviceRepr {}
impl El for f32 {}
impl El for bf16 {}
impl El for f16 {}

/// `v` rounded to `T` and back: what the device sees.
fn q<T: Element>(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| T::from_f32(x as f32).to_f32() as f64).collect()
}

fn up<T: El>(s: &Arc<CudaStream>, v: &[f64]) -> CudaSlice<T> {
    let h: Vec<T> = v.iter().map(|&x| T::from_f32(x as f32)).collect();
    s.clone_htod(&h).unwrap()
}

fn up_f32(s: &Arc<CudaStream>, v: &[f64]) -> CudaSlice<f32> {
    up::<f32>(s, v)
}

/// An output buffer of `n` NaNs.
fn poisoned<T: El>(s: &Arc<CudaStream>, n: usize) -> CudaSlice<T> {
    s.clone_htod(&vec![T::from_f32(f32::NAN); n]).unwrap()
}

fn down<T: El>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<f64> {
    s.clone_dtoh(d).unwrap().into_iter().map(|x| x.to_f32() as f64).collect()
}

fn bits<T: El>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<u8> {
    bytemuck::cast_slice(&s.clone_dtoh(d).unwrap()).to_vec()
}

/// Tolerance of a result in `T` (relative to the largest reference element).
fn tol<T: Element>() -> f64 {
    T::tolerance()
}

/// A layer's random inputs (already rounded to `T`).
struct Case {
    s: LayerShape,
    x: Vec<f64>,
    w: Vec<f64>,
    b: Vec<f64>,
    phi: Vec<f64>,
    psi: Vec<f64>,
    g: Vec<f64>,
    dphi0: Vec<f64>,
    dpsi0: Vec<f64>,
    scale: f64,
}

fn case<T: Element>(seed: u64, tokens: usize, d_in: usize, d_out: usize, rank: usize) -> Case {
    let s = LayerShape::new(tokens, d_in, d_out, rank).unwrap();
    let r = |k: u64, n: usize, amp: f64| q::<T>(&rand_vec(seed * 101 + k, n).iter().map(|v| v * amp).collect::<Vec<_>>());
    Case {
        s,
        x: r(1, tokens * d_in, 1.0),
        w: r(2, d_out * d_in, 1.0 / (d_in as f64).sqrt()),
        b: r(3, d_out, 0.5),
        phi: r(4, d_in * rank, 1.0 / (d_in as f64).sqrt()),
        psi: r(5, rank * d_in, 1.0 / (d_in as f64).sqrt()),
        g: r(6, tokens * d_out, 1.0),
        dphi0: rand_vec(seed * 101 + 7, d_in * rank),
        dpsi0: rand_vec(seed * 101 + 8, rank * d_in),
        scale: 0.75,
    }
}

/// (T, d_in, d_out): odd sizes (every kernel's tails, the fused GEMM's scalar loads), and one
/// with every leading dimension a multiple of 8, where FusedSm90 takes the TMA kernels and, for
/// ranks 8 and 64, computes u and C in one launch (`wegeft_uc_*`) with the forward GEMM
/// launched as its programmatic dependent (for the whole forward in one launch, above 8 MiB
/// of x and W: `ONE_LAUNCH` below).
const SHAPES: &[(usize, usize, usize)] = &[(37, 83, 71), (1, 129, 65), (130, 67, 259), (200, 136, 264)];
const RANKS: &[usize] = &[1, 8, 64, 256];

/// Every concrete path this build has.
fn concrete_paths() -> Vec<Path> {
    let mut p = vec![Path::Composed];
    if wegeft::cuda::FUSED_GEMM_BUILT {
        p.push(Path::Fused);
        p.push(Path::FusedSm90);
    }
    p
}

/// The concrete paths and `Tuned` (whose first call of a shape runs each of them, the winner
/// last: its results must be as right as theirs).
/// The engines of the rank-r products: every check runs on both.
const ENGINES: [ProductEngine; 2] = [ProductEngine::CublasLt, ProductEngine::Tiles];

fn paths() -> Vec<Path> {
    let mut p = concrete_paths();
    p.push(Path::Tuned);
    p
}

// ---- forward / backward ---------------------------------------------------------------------

fn check_forward<T: El>(dev: &CudaBackend, c: &Case, path: Path, what: &str) {
    let st = dev.stream().clone();
    let s = &c.s;
    let (x, w, b) = (up::<T>(&st, &c.x), up::<T>(&st, &c.w), up::<T>(&st, &c.b));
    let (phi, psi) = (up::<T>(&st, &c.phi), up::<T>(&st, &c.psi));
    let mut u = poisoned::<T>(&st, s.tokens * s.rank);
    let mut cc = poisoned::<T>(&st, s.d_out * s.rank);
    let mut y = poisoned::<T>(&st, s.tokens * s.d_out);
    dev.wegeft_forward(s, &x, &w, Some(&b), &phi, &psi, c.scale as f32, Dropout::NONE, &mut u, &mut cc, &mut y, Launch::new().path(path))
        .unwrap();
    let want_y = rf::wegeft_forward(s, &c.x, &c.w, Some(&c.b), &c.phi, &c.psi, c.scale).unwrap();
    let want_u = rf::matmul(&c.x, &t(&c.psi, s.rank, s.d_in), s.tokens, s.d_in, s.rank);
    let want_c = rf::generate_c(s, &c.w, &c.phi, c.scale);
    assert_close(&format!("{what} u"), &down(&st, &u), &want_u, tol::<T>());
    assert_close(&format!("{what} C"), &down(&st, &cc), &want_c, tol::<T>());
    assert_close(&format!("{what} y"), &down(&st, &y), &want_y, tol::<T>());
}

fn check_backward<T: El>(dev: &CudaBackend, c: &Case, path: Path, what: &str) {
    let st = dev.stream().clone();
    let s = &c.s;
    let (x, w, g) = (up::<T>(&st, &c.x), up::<T>(&st, &c.w), up::<T>(&st, &c.g));
    let (phi, psi) = (up::<T>(&st, &c.phi), up::<T>(&st, &c.psi));
    let mut u = poisoned::<T>(&st, s.tokens * s.rank);
    let mut cc = poisoned::<T>(&st, s.d_out * s.rank);
    let mut y = poisoned::<T>(&st, s.tokens * s.d_out);
    let launch = Launch::new().path(path);
    dev.wegeft_forward(s, &x, &w, None, &phi, &psi, c.scale as f32, Dropout::NONE, &mut u, &mut cc, &mut y, launch).unwrap();
    let mut dx = poisoned::<T>(&st, s.tokens * s.d_in);
    let mut dphi = up_f32(&st, &c.dphi0);
    let mut dpsi = up_f32(&st, &c.dpsi0);
    dev.wegeft_backward(s, &x, &w, &psi, c.scale as f32, Dropout::NONE, &u, &cc, &g, Some(&mut dx), &mut dphi, &mut dpsi, launch)
        .unwrap();
    assert_backward::<T>(&st, c, what, &dx, &dphi, &dpsi);
}

/// A backward's dx, dphi and dpsi (accumulated onto `c.dphi0`, `c.dpsi0`) against the reference.
fn assert_backward<T: El>(st: &Arc<CudaStream>, c: &Case, what: &str, dx: &CudaSlice<T>, dphi: &CudaSlice<f32>, dpsi: &CudaSlice<f32>) {
    // The device computed from u and C rounded to T: within the tolerance of T.
    let gr = rf::wegeft_backward(&c.s, &c.x, &c.w, &c.phi, &c.psi, c.scale, &c.g).unwrap();
    assert_close(&format!("{what} dx"), &down(st, dx), &gr.dx, tol::<T>());
    // Accumulated in f32 onto random initial values; compare the increments' scale.
    let got_dphi: Vec<f64> = down(st, dphi).iter().zip(&c.dphi0).map(|(a, b)| a - b).collect();
    let got_dpsi: Vec<f64> = down(st, dpsi).iter().zip(&c.dpsi0).map(|(a, b)| a - b).collect();
    assert_close(&format!("{what} dphi"), &got_dphi, &gr.dphi, tol::<T>().max(1e-5) * 2.0);
    assert_close(&format!("{what} dpsi"), &got_dpsi, &gr.dpsi, tol::<T>().max(1e-5) * 2.0);
}

fn forward_all<T: El>() {
    let dev = gpu_or_skip!();
    for (i, &(tk, din, dout)) in SHAPES.iter().enumerate() {
        for &r in RANKS {
            let c = case::<T>(i as u64 * 10 + r as u64, tk, din, dout, r);
            for e in ENGINES {
                dev.set_product_engine(e);
                for p in paths() {
                    check_forward::<T>(&dev, &c, p, &format!("{} T={tk} d_in={din} d_out={dout} r={r} {p:?} {e:?}", T::DTYPE));
                }
            }
        }
    }
}

fn backward_all<T: El>() {
    let dev = gpu_or_skip!();
    for (i, &(tk, din, dout)) in SHAPES.iter().enumerate() {
        for &r in RANKS {
            let c = case::<T>(i as u64 * 10 + r as u64 + 1000, tk, din, dout, r);
            for e in ENGINES {
                dev.set_product_engine(e);
                for p in paths() {
                    check_backward::<T>(&dev, &c, p, &format!("{} T={tk} d_in={din} d_out={dout} r={r} {p:?} {e:?}", T::DTYPE));
                }
            }
        }
    }
}

#[test]
fn forward_f32() {
    forward_all::<f32>();
}
#[test]
fn forward_bf16() {
    forward_all::<bf16>();
}
#[test]
fn forward_f16() {
    forward_all::<f16>();
}
#[test]
fn backward_f32() {
    backward_all::<f32>();
}
#[test]
fn backward_bf16() {
    backward_all::<bf16>();
}
#[test]
fn backward_f16() {
    backward_all::<f16>();
}

/// A long token dimension, so the reductions over tokens are split over blocks.
#[test]
fn backward_long_reduction_f32() {
    let dev = gpu_or_skip!();
    let c = case::<f32>(77, 3001, 96, 40, 8);
    for e in ENGINES {
        dev.set_product_engine(e);
        check_backward::<f32>(&dev, &c, Path::Composed, &format!("f32 T=3001 split-K {e:?}"));
    }
    let c = case::<bf16>(78, 3001, 96, 40, 8);
    for e in ENGINES {
        dev.set_product_engine(e);
        check_backward::<bf16>(&dev, &c, Path::Composed, &format!("bf16 T=3001 {e:?}"));
    }
}

// ---- dropout ----------------------------------------------------------------------------------

#[test]
fn dropout_mask_rate_and_determinism() {
    // Host mirror only: no GPU needed.
    let (p, n) = (0.3f32, 200_000u32);
    let kept = (0..n).filter(|&i| dropout_keep(42, i / 500, i % 500, p)).count() as f64 / n as f64;
    assert!((kept - 0.7).abs() < 0.01, "kept fraction {kept}, want 0.7");
    assert!((0..1000).all(|i| dropout_keep(7, i, 3, p) == dropout_keep(7, i, 3, p)));
    let differ = (0..1000).filter(|&i| dropout_keep(7, i, 3, p) != dropout_keep(8, i, 3, p)).count();
    assert!(differ > 200, "seeds 7 and 8 give nearly the same mask ({differ} of 1000 differ)");
    assert!((0..1000).all(|i| dropout_keep(1, i, i, 0.0)));
}

fn check_dropout<T: El>(dev: &CudaBackend) {
    let st = dev.stream().clone();
    let c = case::<T>(5, 45, 77, 61, 8);
    let s = &c.s;
    let drop = Dropout { p: 0.25, seed: 0xDEAD_BEEF };
    // W .* M / (1 - p), on the host.
    let wm: Vec<f64> = (0..s.d_out * s.d_in)
        .map(|k| {
            let (o, i) = ((k / s.d_in) as u32, (k % s.d_in) as u32);
            if dropout_keep(drop.seed, o, i, drop.p) {
                c.w[k] / (1.0 - drop.p as f64)
            } else {
                0.0
            }
        })
        .collect();
    let (x, w, g) = (up::<T>(&st, &c.x), up::<T>(&st, &c.w), up::<T>(&st, &c.g));
    let (phi, psi) = (up::<T>(&st, &c.phi), up::<T>(&st, &c.psi));
    let mut u = poisoned::<T>(&st, s.tokens * s.rank);
    let mut cc = poisoned::<T>(&st, s.d_out * s.rank);
    let mut y = poisoned::<T>(&st, s.tokens * s.d_out);
    dev.wegeft_forward(s, &x, &w, None, &phi, &psi, c.scale as f32, drop, &mut u, &mut cc, &mut y, Launch::new()).unwrap();
    let want_c = rf::generate_c(s, &wm, &c.phi, c.scale);
    let want_u = rf::matmul(&c.x, &t(&c.psi, s.rank, s.d_in), s.tokens, s.d_in, s.rank);
    let mut want_y = rf::matmul(&c.x, &t(&c.w, s.d_out, s.d_in), s.tokens, s.d_in, s.d_out);
    for (a, b) in want_y.iter_mut().zip(rf::matmul(&want_u, &t(&want_c, s.d_out, s.rank), s.tokens, s.rank, s.d_out)) {
        *a += b;
    }
    assert_close("dropout C", &down(&st, &cc), &want_c, tol::<T>());
    assert_close("dropout y", &down(&st, &y), &want_y, tol::<T>());
    let mut dphi = st.alloc_zeros::<f32>(s.d_in * s.rank).unwrap();
    let mut dpsi = st.alloc_zeros::<f32>(s.rank * s.d_in).unwrap();
    dev.wegeft_backward(s, &x, &w, &psi, c.scale as f32, drop, &u, &cc, &g, None, &mut dphi, &mut dpsi, Launch::new()).unwrap();
    let big_s = rf::matmul(&t(&c.g, s.tokens, s.d_out), &want_u, s.d_out, s.tokens, s.rank);
    let want_dphi: Vec<f64> =
        rf::matmul(&t(&wm, s.d_out, s.d_in), &big_s, s.d_in, s.d_out, s.rank).iter().map(|v| v * c.scale).collect();
    let v = rf::matmul(&c.g, &want_c, s.tokens, s.d_out, s.rank);
    let want_dpsi = rf::matmul(&t(&v, s.tokens, s.rank), &c.x, s.rank, s.tokens, s.d_in);
    assert_close("dropout dphi", &down(&st, &dphi), &want_dphi, tol::<T>().max(1e-5) * 2.0);
    assert_close("dropout dpsi", &down(&st, &dpsi), &want_dpsi, tol::<T>().max(1e-5) * 2.0);
}

#[test]
fn dropout_f32() {
    let dev = gpu_or_skip!();
    check_dropout::<f32>(&dev);
}
#[test]
fn dropout_bf16() {
    let dev = gpu_or_skip!();
    check_dropout::<bf16>(&dev);
}

// ---- merge / unmerge ----------------------------------------------------------------------

fn check_merge<T: El>(dev: &CudaBackend, c: &Case, what: &str) {
    let st = dev.stream().clone();
    let s = &c.s;
    let mut w = up::<T>(&st, &c.w);
    let (phi, psi) = (up::<T>(&st, &c.phi), up::<T>(&st, &c.psi));
    dev.wegeft_merge(s, &mut w, &phi, &psi, c.scale as f32, None).unwrap();
    let merged = down(&st, &w);
    let want = rf::merge(s, &c.w, &c.phi, &c.psi, c.scale).unwrap();
    assert_close(&format!("{what} merge"), &merged, &want, tol::<T>());
    // Unmerge what the device merged (as stored), against the reference unmerge of it.
    dev.wegeft_unmerge(s, &mut w, &phi, &psi, c.scale as f32, None).unwrap();
    let want_back = rf::unmerge(s, &merged, &c.phi, &c.psi, c.scale).unwrap();
    assert_close(&format!("{what} unmerge"), &down(&st, &w), &want_back, tol::<T>() * 2.0);
    assert_close(&format!("{what} unmerge(merge(W)) = W"), &down(&st, &w), &c.w, tol::<T>() * 4.0);
}

fn merge_all<T: El>() {
    let dev = gpu_or_skip!();
    for (i, &(_, din, dout)) in SHAPES.iter().enumerate() {
        for &r in RANKS {
            let c = case::<T>(i as u64 * 10 + r as u64 + 2000, 1, din, dout, r);
            for e in ENGINES {
                dev.set_product_engine(e);
                check_merge::<T>(&dev, &c, &format!("{} d_in={din} d_out={dout} r={r} {e:?}", T::DTYPE));
            }
        }
    }
}

#[test]
fn merge_unmerge_f32() {
    merge_all::<f32>();
}
#[test]
fn merge_unmerge_bf16() {
    merge_all::<bf16>();
}
#[test]
fn merge_unmerge_f16() {
    merge_all::<f16>();
}

#[test]
fn unmerge_singular_is_an_error() {
    let dev = gpu_or_skip!();
    let st = dev.stream().clone();
    // psi phi = -1/s makes I + s psi phi = 0 (rank 1).
    let s = LayerShape::new(1, 4, 3, 1).unwrap();
    let phi = up::<f32>(&st, &[1.0, 0.0, 0.0, 0.0]);
    let psi = up::<f32>(&st, &[-2.0, 0.0, 0.0, 0.0]);
    let mut w = up::<f32>(&st, &rand_vec(3, 12));
    match dev.wegeft_unmerge(&s, &mut w, &phi, &psi, 0.5, None) {
        Err(Error::Numerical(_)) => {}
        other => panic!("expected Err(Numerical), got {other:?}"),
    }
}

// ---- LoRA and the frozen layer --------------------------------------------------------------

fn check_lora<T: El>(dev: &CudaBackend, c: &Case, path: Path, what: &str) {
    let st = dev.stream().clone();
    let s = &c.s;
    // A (r x d_in) = psi's shape, B (d_out x r).
    let bm = q::<T>(&rand_vec(99, s.d_out * s.rank));
    let (x, w, b, g) = (up::<T>(&st, &c.x), up::<T>(&st, &c.w), up::<T>(&st, &c.b), up::<T>(&st, &c.g));
    let (a, bd) = (up::<T>(&st, &c.psi), up::<T>(&st, &bm));
    let mut xa = poisoned::<T>(&st, s.tokens * s.rank);
    let mut y = poisoned::<T>(&st, s.tokens * s.d_out);
    let launch = Launch::new().path(path);
    dev.lora_forward(s, &x, &w, Some(&b), &a, &bd, c.scale as f32, &mut xa, &mut y, launch).unwrap();
    let want_y = rf::lora_forward(s, &c.x, &c.w, Some(&c.b), &c.psi, &bm, c.scale).unwrap();
    assert_close(&format!("{what} lora y"), &down(&st, &y), &want_y, tol::<T>());
    let mut dx = poisoned::<T>(&st, s.tokens * s.d_in);
    let mut da = st.alloc_zeros::<f32>(s.rank * s.d_in).unwrap();
    let mut db = st.alloc_zeros::<f32>(s.d_out * s.rank).unwrap();
    dev.lora_backward(s, &x, &w, &a, &bd, c.scale as f32, &xa, &g, Some(&mut dx), &mut da, &mut db, launch).unwrap();
    let gr = rf::lora_backward(s, &c.x, &c.w, &c.psi, &bm, c.scale, &c.g).unwrap();
    assert_close(&format!("{what} lora dx"), &down(&st, &dx), &gr.dx, tol::<T>());
    assert_close(&format!("{what} lora dA"), &down(&st, &da), &gr.da, tol::<T>().max(1e-5) * 2.0);
    assert_close(&format!("{what} lora dB"), &down(&st, &db), &gr.db, tol::<T>().max(1e-5) * 2.0);
}

fn check_frozen<T: El>(dev: &CudaBackend, c: &Case, what: &str) {
    let st = dev.stream().clone();
    let s = &c.s;
    let (x, w, b, g) = (up::<T>(&st, &c.x), up::<T>(&st, &c.w), up::<T>(&st, &c.b), up::<T>(&st, &c.g));
    let mut y = poisoned::<T>(&st, s.tokens * s.d_out);
    dev.frozen_forward(s, &x, &w, Some(&b), &mut y, None).unwrap();
    let mut want = rf::matmul(&c.x, &t(&c.w, s.d_out, s.d_in), s.tokens, s.d_in, s.d_out);
    for row in want.chunks_mut(s.d_out) {
        row.iter_mut().zip(&c.b).for_each(|(a, b)| *a += b);
    }
    assert_close(&format!("{what} frozen y"), &down(&st, &y), &want, tol::<T>());
    let mut dx = poisoned::<T>(&st, s.tokens * s.d_in);
    dev.frozen_backward(s, &w, &g, &mut dx, None).unwrap();
    let want_dx = rf::matmul(&c.g, &c.w, s.tokens, s.d_out, s.d_in);
    assert_close(&format!("{what} frozen dx"), &down(&st, &dx), &want_dx, tol::<T>());
}

fn lora_frozen_all<T: El>() {
    let dev = gpu_or_skip!();
    for (i, &(tk, din, dout)) in SHAPES.iter().enumerate() {
        for &r in &[1usize, 8, 64] {
            let c = case::<T>(i as u64 * 10 + r as u64 + 3000, tk, din, dout, r);
            let what = format!("{} T={tk} d_in={din} d_out={dout} r={r}", T::DTYPE);
            for e in ENGINES {
                dev.set_product_engine(e);
                for p in paths() {
                    check_lora::<T>(&dev, &c, p, &format!("{what} {p:?} {e:?}"));
                }
            }
            check_frozen::<T>(&dev, &c, &what);
        }
    }
}

#[test]
fn lora_and_frozen_f32() {
    lora_frozen_all::<f32>();
}
#[test]
fn lora_and_frozen_bf16() {
    lora_frozen_all::<bf16>();
}

// ---- the PyTorch fixtures ------------------------------------------------------------------

#[test]
fn fixtures_f32() {
    let dev = gpu_or_skip!();
    let st = dev.stream().clone();
    for case in common::layer_cases() {
        let f = common::load_f64(&case.file);
        let get = |k: &str| f.get(k).unwrap_or_else(|| panic!("{}: no {k}", case.file)).1.clone();
        let s = LayerShape::new(case.t, case.d_in, case.d_out, case.rank).unwrap();
        let (x, w, b, g) = (get("layer.x"), get("layer.W"), get("layer.b"), get("layer.G"));
        // in_proj = phi^T (r x d_in), out_proj = psi^T (d_in x r).
        let phi = t(&get("layer.in_proj"), s.rank, s.d_in);
        let psi = t(&get("layer.out_proj"), s.d_in, s.rank);
        let (xd, wd, bd, gd) = (up::<f32>(&st, &x), up::<f32>(&st, &w), up::<f32>(&st, &b), up::<f32>(&st, &g));
        let (phid, psid) = (up::<f32>(&st, &phi), up::<f32>(&st, &psi));
        for (e, p) in ENGINES.into_iter().flat_map(|e| paths().into_iter().map(move |p| (e, p))) {
            dev.set_product_engine(e);
            let what = format!("{} {p:?} {e:?}", case.file);
            let mut u = poisoned::<f32>(&st, s.tokens * s.rank);
            let mut c = poisoned::<f32>(&st, s.d_out * s.rank);
            let mut y = poisoned::<f32>(&st, s.tokens * s.d_out);
            let launch = Launch::new().path(p);
            dev.wegeft_forward(&s, &xd, &wd, Some(&bd), &phid, &psid, 1.0, Dropout::NONE, &mut u, &mut c, &mut y, launch).unwrap();
            assert_close(&format!("{what} y"), &down(&st, &y), &get("layer.y"), 1e-5);
            let mut dx = poisoned::<f32>(&st, s.tokens * s.d_in);
            let mut dphi = st.alloc_zeros::<f32>(s.d_in * s.rank).unwrap();
            let mut dpsi = st.alloc_zeros::<f32>(s.rank * s.d_in).unwrap();
            dev.wegeft_backward(&s, &xd, &wd, &psid, 1.0, Dropout::NONE, &u, &c, &gd, Some(&mut dx), &mut dphi, &mut dpsi, launch)
                .unwrap();
            assert_close(&format!("{what} dx"), &down(&st, &dx), &get("layer.dx"), 1e-5);
            let d_in_proj = t(&down(&st, &dphi), s.d_in, s.rank);
            let d_out_proj = t(&down(&st, &dpsi), s.rank, s.d_in);
            assert_close(&format!("{what} d_in_proj"), &d_in_proj, &get("layer.d_in_proj"), 1e-5);
            assert_close(&format!("{what} d_out_proj"), &d_out_proj, &get("layer.d_out_proj"), 1e-5);
        }
        for e in ENGINES {
            dev.set_product_engine(e);
            let mut wm = up::<f32>(&st, &w);
            dev.wegeft_merge(&s, &mut wm, &phid, &psid, 1.0, None).unwrap();
            assert_close(&format!("{} W_merged {e:?}", case.file), &down(&st, &wm), &get("layer.W_merged"), 1e-5);
        }
    }
}

// ---- the forward, and most of the backward, in one launch each (FusedSm90, large layers) ----

/// Layers whose x and W exceed 8 MiB (`UC_MAX_BYTES`), every leading dimension a multiple of
/// 8: on an H100 / H200 (the sm_90a image) FusedSm90 runs the forward as one launch,
/// `wegeft_fwd_*_tma` (u and C as rank tiles of the GEMM's grid), and the backward (v, S,
/// dpsi, dphi and dx) as another, `wegeft_bwd_*_tma`. A tall, thin one (64 row
/// blocks of u, one C block); tails in T and d_out with two 64-column rank chunks (r = 72) and
/// two tiles of y across; r = 256 (four chunks, four u / C k tiles).
const ONE_LAUNCH: &[(usize, usize, usize, usize)] = &[(8200, 512, 8, 8), (300, 8000, 264, 72), (520, 4096, 600, 256)];

fn check_one_launch<T: El>(dev: &CudaBackend, i: usize, (tk, din, dout, r): (usize, usize, usize, usize)) {
    assert!((tk + dout) * din * 2 > 8 << 20, "not above UC_MAX_BYTES");
    let c = case::<T>(300 + i as u64, tk, din, dout, r);
    let what = format!("{} one launch T={tk} d_in={din} d_out={dout} r={r}", T::DTYPE);
    let st = dev.stream().clone();
    let s = &c.s;
    let (x, w, b) = (up::<T>(&st, &c.x), up::<T>(&st, &c.w), up::<T>(&st, &c.b));
    let (phi, psi) = (up::<T>(&st, &c.phi), up::<T>(&st, &c.psi));
    let run = |u: &mut CudaSlice<T>, cc: &mut CudaSlice<T>, y: &mut CudaSlice<T>| {
        let before = dev.launch_count();
        dev.wegeft_forward(s, &x, &w, Some(&b), &phi, &psi, c.scale as f32, Dropout::NONE, u, cc, y, Launch::new().path(Path::FusedSm90))
            .unwrap();
        dev.launch_count() - before
    };
    let (mut u, mut cc, mut y) = (poisoned::<T>(&st, tk * r), poisoned::<T>(&st, dout * r), poisoned::<T>(&st, tk * dout));
    let launches = run(&mut u, &mut cc, &mut y);
    let hopper = dev.image() == wegeft::cuda::Image::Sm90a;
    assert_eq!(launches == 1, hopper, "{what}: {launches} launches (one launch expected exactly on an sm_90a device)");
    let want_y = rf::wegeft_forward(s, &c.x, &c.w, Some(&c.b), &c.phi, &c.psi, c.scale).unwrap();
    let want_u = rf::matmul(&c.x, &t(&c.psi, r, din), tk, din, r);
    let want_c = rf::generate_c(s, &c.w, &c.phi, c.scale);
    assert_close(&format!("{what} u"), &down(&st, &u), &want_u, tol::<T>());
    assert_close(&format!("{what} C"), &down(&st, &cc), &want_c, tol::<T>());
    assert_close(&format!("{what} y"), &down(&st, &y), &want_y, tol::<T>());
    // Deterministic: the same bits again (tiles go to whichever block takes them first).
    let (mut u2, mut c2, mut y2) = (poisoned::<T>(&st, tk * r), poisoned::<T>(&st, dout * r), poisoned::<T>(&st, tk * dout));
    run(&mut u2, &mut c2, &mut y2);
    assert!(bits(&st, &u) == bits(&st, &u2) && bits(&st, &cc) == bits(&st, &c2) && bits(&st, &y) == bits(&st, &y2), "{what}: two runs differ");

    // The backward: v, S, dpsi, dphi and dx in one launch (wegeft_bwd_*_tma): fewer launches
    // than a backward without dx (v, S, dphi, dpsi) exactly on an sm_90a device (more
    // elsewhere: the dx GEMM is added); dx, dphi, dpsi against the reference, and the same bits
    // twice.
    let g = up::<T>(&st, &c.g);
    let back = |dx: Option<&mut CudaSlice<T>>| {
        let mut dphi = up_f32(&st, &c.dphi0);
        let mut dpsi = up_f32(&st, &c.dpsi0);
        let before = dev.launch_count();
        dev.wegeft_backward(s, &x, &w, &psi, c.scale as f32, Dropout::NONE, &u, &cc, &g, dx, &mut dphi, &mut dpsi, Launch::new().path(Path::FusedSm90))
            .unwrap();
        (dev.launch_count() - before, dphi, dpsi)
    };
    let (without_dx, _, _) = back(None);
    let mut dx = poisoned::<T>(&st, tk * din);
    let (with_dx, dphi, dpsi) = back(Some(&mut dx));
    assert_eq!(with_dx < without_dx, hopper, "{what}: backward {with_dx} launches with dx, {without_dx} without");
    assert_backward::<T>(&st, &c, &what, &dx, &dphi, &dpsi);
    let mut dx2 = poisoned::<T>(&st, tk * din);
    let (_, dphi2, dpsi2) = back(Some(&mut dx2));
    assert!(bits(&st, &dx) == bits(&st, &dx2) && bits(&st, &dphi) == bits(&st, &dphi2) && bits(&st, &dpsi) == bits(&st, &dpsi2), "{what}: two backward runs differ");

    // With dropout on W the one launch leaves dphi (over the masked W) to the layer: the same
    // gradients as the composed path's, forward and backward both with the mask.
    let drop = Dropout { p: 0.1, seed: 7 };
    let grads = |path: Path| {
        let (mut u, mut cc, mut y) = (poisoned::<T>(&st, tk * r), poisoned::<T>(&st, dout * r), poisoned::<T>(&st, tk * dout));
        let launch = Launch::new().path(path);
        dev.wegeft_forward(s, &x, &w, None, &phi, &psi, c.scale as f32, drop, &mut u, &mut cc, &mut y, launch).unwrap();
        let mut dx = poisoned::<T>(&st, tk * din);
        let mut dphi = up_f32(&st, &c.dphi0);
        let mut dpsi = up_f32(&st, &c.dpsi0);
        dev.wegeft_backward(s, &x, &w, &psi, c.scale as f32, drop, &u, &cc, &g, Some(&mut dx), &mut dphi, &mut dpsi, launch).unwrap();
        // The increments of the f32 accumulators (they start from c.dphi0, c.dpsi0).
        let inc = |got: Vec<f64>, base: &[f64]| -> Vec<f64> { got.iter().zip(base).map(|(a, b)| a - b).collect() };
        [down(&st, &dx), inc(down(&st, &dphi), &c.dphi0), inc(down(&st, &dpsi), &c.dpsi0)]
    };
    let (fused, composed) = (grads(Path::FusedSm90), grads(Path::Composed));
    for (i, name) in ["dx", "dphi", "dpsi"].iter().enumerate() {
        assert_close(&format!("{what} dropout {name}, FusedSm90 vs Composed"), &fused[i], &composed[i], tol::<T>().max(1e-5) * 2.0);
    }
}

#[test]
fn forward_and_backward_in_one_launch_each_bf16() {
    let dev = gpu_or_skip!();
    for (i, &sh) in ONE_LAUNCH.iter().enumerate() {
        check_one_launch::<bf16>(&dev, i, sh);
    }
}

#[test]
fn forward_and_backward_in_one_launch_each_f16() {
    let dev = gpu_or_skip!();
    for (i, &sh) in ONE_LAUNCH.iter().enumerate() {
        check_one_launch::<f16>(&dev, i, sh);
    }
}

/// Layers where `Path::Fused` takes the sm_80 kernels' wide tile (`gemm_kext_*_wide`, 128 x 256;
/// `gemm::tc_wide`: once its tiles give each of the device's `sms` SMs one): the forward's
/// (T x d_out) in the first, aligned, rank 8; the backward's dx (T x d_in) in the second, odd
/// d_in (scalar loads of W and psi) and d_out, rank 64 (two k tiles of the second pair). The
/// other product of each takes the 128 x 128 tile. Tails in T and both widths.
fn wide_cases(sms: usize) -> [(usize, usize, usize, usize); 2] {
    let tk = 128 * sms.div_ceil(9) + 37;
    [(tk, 72, 2104, 8), (tk, 2100, 37, 64)]
}

fn check_wide<T: El>(dev: &CudaBackend, i: usize, (tk, din, dout, r): (usize, usize, usize, usize)) {
    let sms = dev.sm_count() as usize;
    let wide = |m: usize, n: usize| m.div_ceil(128) * n.div_ceil(256) >= sms;
    let (fwd, bwd) = (wide(tk, dout), wide(tk, din));
    assert!(fwd != bwd, "T={tk} d_in={din} d_out={dout}: one product on each tile ({sms} SMs)");
    let c = case::<T>(400 + i as u64, tk, din, dout, r);
    let what = format!("{} Fused, wide sm_80 tile for the {}, T={tk} d_in={din} d_out={dout} r={r}", T::DTYPE, if fwd { "forward" } else { "dx" });
    check_forward::<T>(dev, &c, Path::Fused, &what);
    check_backward::<T>(dev, &c, Path::Fused, &what);
}

#[test]
fn fused_sm80_wide_tile_bf16() {
    let dev = gpu_or_skip!();
    for (i, sh) in wide_cases(dev.sm_count() as usize).into_iter().enumerate() {
        check_wide::<bf16>(&dev, i, sh);
    }
}

#[test]
fn fused_sm80_wide_tile_f16() {
    let dev = gpu_or_skip!();
    for (i, sh) in wide_cases(dev.sm_count() as usize).into_iter().enumerate() {
        check_wide::<f16>(&dev, i, sh);
    }
}

// ---- determinism ------------------------------------------------------------------------------

fn run_backward_bits<T: El>(dev: &CudaBackend, c: &Case, path: Path, drop: Dropout) -> Vec<Vec<u8>> {
    let st = dev.stream().clone();
    let s = &c.s;
    let (x, w, g) = (up::<T>(&st, &c.x), up::<T>(&st, &c.w), up::<T>(&st, &c.g));
    let (phi, psi) = (up::<T>(&st, &c.phi), up::<T>(&st, &c.psi));
    let mut u = poisoned::<T>(&st, s.tokens * s.rank);
    let mut cc = poisoned::<T>(&st, s.d_out * s.rank);
    let mut y = poisoned::<T>(&st, s.tokens * s.d_out);
    dev.wegeft_forward(s, &x, &w, None, &phi, &psi, c.scale as f32, drop, &mut u, &mut cc, &mut y, Launch::new().path(path))
        .unwrap();
    let mut dx = poisoned::<T>(&st, s.tokens * s.d_in);
    let mut dphi = st.alloc_zeros::<f32>(s.d_in * s.rank).unwrap();
    let mut dpsi = st.alloc_zeros::<f32>(s.rank * s.d_in).unwrap();
    dev.wegeft_backward(s, &x, &w, &psi, c.scale as f32, drop, &u, &cc, &g, Some(&mut dx), &mut dphi, &mut dpsi, Launch::new().path(path))
        .unwrap();
    vec![bits(&st, &y), bits(&st, &dx), bits(&st, &dphi), bits(&st, &dpsi)]
}

#[test]
fn deterministic_bitwise() {
    let dev = gpu_or_skip!();
    let c = case::<bf16>(11, 2049, 300, 200, 64);
    // Under Tuned the first run times the paths (the winner last), the second takes the winner.
    // Without dropout every rank-r product of the cuBLASLt engine runs in cuBLASLt; with it
    // the masked ones run on the tile kernels.
    for e in ENGINES {
        dev.set_product_engine(e);
        for drop in [Dropout::NONE, Dropout { p: 0.1, seed: 3 }] {
            for path in [Path::Auto, Path::Tuned] {
                let a = run_backward_bits::<bf16>(&dev, &c, path, drop);
                let b = run_backward_bits::<bf16>(&dev, &c, path, drop);
                for (i, name) in ["y", "dx", "dphi", "dpsi"].iter().enumerate() {
                    assert!(a[i] == b[i], "{name} differs between two identical runs on {path:?} {e:?} dropout {}", drop.p);
                }
            }
        }
    }
}

// ---- bad input -------------------------------------------------------------------------------

#[test]
fn bad_input_is_an_error_before_any_launch() {
    let dev = gpu_or_skip!();
    let st = dev.stream().clone();
    let c = case::<f32>(1, 5, 16, 8, 4);
    let s = &c.s;
    let (x, w, phi, psi) = (up::<f32>(&st, &c.x), up::<f32>(&st, &c.w), up::<f32>(&st, &c.phi), up::<f32>(&st, &c.psi));
    let mut u = poisoned::<f32>(&st, s.tokens * s.rank);
    let mut cc = poisoned::<f32>(&st, s.d_out * s.rank);
    let mut y_short = poisoned::<f32>(&st, s.tokens * s.d_out - 1);
    let r = dev.wegeft_forward(s, &x, &w, None, &phi, &psi, 1.0, Dropout::NONE, &mut u, &mut cc, &mut y_short, Launch::new());
    assert!(matches!(r, Err(Error::Layout { arg: "y", .. })), "short y: {r:?}");
    let mut y = poisoned::<f32>(&st, s.tokens * s.d_out);
    let r = dev.wegeft_forward(s, &x, &w, None, &phi, &psi, 1.0, Dropout { p: 1.0, seed: 0 }, &mut u, &mut cc, &mut y, Launch::new());
    assert!(matches!(r, Err(Error::Invalid { arg: "dropout.p", .. })), "p = 1: {r:?}");
    let r = dev.wegeft_forward(s, &x, &w, None, &phi, &psi, f32::NAN, Dropout::NONE, &mut u, &mut cc, &mut y, Launch::new());
    assert!(matches!(r, Err(Error::Invalid { arg: "scale", .. })), "NaN scale: {r:?}");
    let zero = LayerShape { tokens: 0, ..*s };
    let r = dev.wegeft_forward(&zero, &x, &w, None, &phi, &psi, 1.0, Dropout::NONE, &mut u, &mut cc, &mut y, Launch::new());
    assert!(matches!(r, Err(Error::ZeroDim { .. })), "zero tokens: {r:?}");
    if !wegeft::cuda::FUSED_GEMM_BUILT {
        let r = dev.wegeft_forward(s, &x, &w, None, &phi, &psi, 1.0, Dropout::NONE, &mut u, &mut cc, &mut y, Launch::new().path(Path::Fused));
        assert!(matches!(r, Err(Error::Invalid { arg: "path", .. })), "fused without gemm: {r:?}");
    }
    // A misaligned raw pointer.
    let (xp, _gx) = x.device_ptr(&st);
    let (wp, _gw) = w.device_ptr(&st);
    let (php, _gp) = phi.device_ptr(&st);
    let (psp, _gs) = psi.device_ptr(&st);
    let (yp, _gy) = y.device_ptr(&st);
    let r = unsafe {
        dev.wegeft_forward_raw(DType::F32, s, st.cu_stream(), xp + 4, wp, None, php, psp, 1.0, Dropout::NONE, yp, yp, yp, Path::Composed)
    };
    assert!(matches!(r, Err(Error::Align { arg: "x", .. })), "misaligned x: {r:?}");
    // Nothing was written to y: still all NaN.
    assert!(down(&st, &y).iter().all(|v| v.is_nan()), "y was written by a rejected call");
}

// ---- small cases for compute-sanitizer -------------------------------------------------------

/// Every kernel once, split-K paths included (T and d_in above 512), small enough for
/// compute-sanitizer. The GPU check runs `sanitize_` tests under memcheck, racecheck and
/// initcheck.
fn sanitize_case<T: El>(dev: &CudaBackend) {
    let c = case::<T>(21, 600, 520, 70, 5);
    let m = case::<T>(22, 1, 520, 70, 5);
    // (Tuned runs these same kernels, only more often.)
    for e in ENGINES {
        dev.set_product_engine(e);
        for p in concrete_paths() {
            check_forward::<T>(dev, &c, p, &format!("sanitize {e:?}"));
            check_backward::<T>(dev, &c, p, &format!("sanitize {e:?}"));
            check_lora::<T>(dev, &c, p, &format!("sanitize {e:?}"));
        }
        check_merge::<T>(dev, &m, &format!("sanitize {e:?}"));
    }
    // The one-launch forward and backward (bf16 / f16 on an sm_90a device; elsewhere other
    // routes): the smallest of their cases (64 + 1 rank tiles, 65 tiles of y of 8 k tiles each).
    if T::DTYPE != DType::F32 {
        check_one_launch::<T>(dev, 0, ONE_LAUNCH[0]);
        // The sm_80 kernels' wide tile (Path::Fused; its forward on the wide tile).
        check_wide::<T>(dev, 0, wide_cases(dev.sm_count() as usize)[0]);
    }
    check_frozen::<T>(dev, &c, "sanitize");
    check_dropout::<T>(dev);
}

#[test]
fn sanitize_f32() {
    let dev = gpu_or_skip!();
    sanitize_case::<f32>(&dev);
}
#[test]
fn sanitize_bf16() {
    let dev = gpu_or_skip!();
    sanitize_case::<bf16>(&dev);
}
#[test]
fn sanitize_f16() {
    let dev = gpu_or_skip!();
    sanitize_case::<f16>(&dev);
}

#[test]
fn skip_helper_reports_no_device_here_or_a_device() {
    // On a machine without CUDA this exercises the skip path; with WEGEFT_REQUIRE_GPU=1 and no
    // device it fails, as it must.
    if let Some(dev) = gpu() {
        assert!(dev.compute_capability().0 >= 8);
        assert!(dev.sm_count() > 0);
    }
}
