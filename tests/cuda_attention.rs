//! The CUDA attention kernels (`wegeft::cuda::attention`) against the CPU attention
//! (`wegeft::cpu::ops`, the plain row-by-row oracle) on random inputs rounded to the device
//! dtype: causal tails (S a multiple of no tile), GQA, S = 1, head dims 16 / 64 / 80 / 128, the
//! tensor-core and plain forwards, the backward, decode against the forward's last row,
//! bitwise determinism, and argument checks. Outputs start as NaN.
//!
//! Without a CUDA device each test prints `skipped: no CUDA device` and passes; with
//! `WEGEFT_REQUIRE_GPU=1` it fails instead (the GPU check runs them so).
//! `sanitize_attention` is the small case compute-sanitizer runs.
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;

use common::{assert_close, assert_close_floor, attention_grad_floors, rand_vec};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use half::{bf16, f16};
use wegeft::backend::AttnShape;
use wegeft::cpu::ops;
use wegeft::cuda::attention::{attention_backward, attention_decode, attention_forward};
use wegeft::cuda::CudaBackend;
use wegeft::Element;

// ---- the one skip rule ---------------------------------------------------------------------

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

/// `v` rounded to `T` and back (what the device sees), as f32.
fn rounded<T: Element>(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x as f32).to_f32()).collect()
}

fn up<T: El>(s: &Arc<CudaStream>, v: &[f32]) -> CudaSlice<T> {
    let h: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    s.clone_htod(&h).unwrap()
}

fn poisoned<T: El>(s: &Arc<CudaStream>, n: usize) -> CudaSlice<T> {
    s.clone_htod(&vec![T::from_f32(f32::NAN); n]).unwrap()
}

fn down<T: El>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<f64> {
    s.clone_dtoh(d).unwrap().into_iter().map(|x| x.to_f32() as f64).collect()
}

fn bits<T: El>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<u8> {
    bytemuck::cast_slice(&s.clone_dtoh(d).unwrap()).to_vec()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Tolerance relative to the largest reference element: f32 1e-4, bf16 2e-2.
fn tol<T: Element>() -> f64 {
    if T::DTYPE == wegeft::DType::F32 {
        1e-4
    } else {
        2e-2
    }
}

/// Random q, k, v, dout of `s`, rounded to `T` (scores of a few units, as in a real model).
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

fn inputs<T: Element>(s: AttnShape, seed: u64) -> Inputs {
    let n = s.tokens();
    let sc = |v: Vec<f64>, a: f64| v.into_iter().map(|x| x * a).collect::<Vec<_>>();
    Inputs {
        q: rounded::<T>(&sc(rand_vec(seed, n * s.q_width()), 1.5)),
        k: rounded::<T>(&sc(rand_vec(seed + 1, n * s.kv_width()), 1.5)),
        v: rounded::<T>(&rand_vec(seed + 2, n * s.kv_width())),
        dout: rounded::<T>(&rand_vec(seed + 3, n * s.q_width())),
    }
}

/// The CPU forward: (out, lse).
fn cpu_forward(s: AttnShape, x: &Inputs) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0.0; s.tokens() * s.q_width()];
    let mut lse = vec![0.0; s.tokens() * s.heads];
    ops::attention_forward(&x.q, &x.k, &x.v, s, &mut out, &mut lse).unwrap();
    (out, lse)
}

/// The GPU forward: (out, lse).
fn gpu_forward<T: El>(dev: &CudaBackend, s: AttnShape, x: &Inputs) -> (CudaSlice<T>, CudaSlice<f32>) {
    let st = dev.stream().clone();
    let (q, k, v) = (up::<T>(&st, &x.q), up::<T>(&st, &x.k), up::<T>(&st, &x.v));
    let mut out = poisoned::<T>(&st, s.tokens() * s.q_width());
    let mut lse = poisoned::<f32>(&st, s.tokens() * s.heads);
    attention_forward(dev, &st, s, &q, &k, &v, &mut out, &mut lse).unwrap();
    (out, lse)
}

fn shape(b: usize, seq: usize, h: usize, kvh: usize, hd: usize) -> AttnShape {
    AttnShape::new(b, seq, h, kvh, hd).unwrap()
}

fn check_forward<T: El>(dev: &CudaBackend, s: AttnShape, seed: u64) {
    let st = dev.stream().clone();
    let x = inputs::<T>(s, seed);
    let (want_out, want_lse) = cpu_forward(s, &x);
    let (out, lse) = gpu_forward::<T>(dev, s, &x);
    let what = format!("{} {s:?}", T::DTYPE.name());
    assert_close(&format!("forward out {what}"), &down(&st, &out), &f64s(&want_out), tol::<T>());
    let lse_tol = if T::DTYPE == wegeft::DType::F32 { 1e-5 } else { 1e-3 };
    assert_close(&format!("forward lse {what}"), &down(&st, &lse), &f64s(&want_lse), lse_tol);
}

/// The backward from the CPU's out and lse (rounded to `T`), against the CPU backward.
fn check_backward<T: El>(dev: &CudaBackend, s: AttnShape, seed: u64) {
    let st = dev.stream().clone();
    let x = inputs::<T>(s, seed);
    let (out, lse) = cpu_forward(s, &x);
    let out = rounded::<T>(&f64s(&out));
    let (n, qw, kw) = (s.tokens(), s.q_width(), s.kv_width());
    let (mut dq, mut dk, mut dv) = (vec![0.0; n * qw], vec![0.0; n * kw], vec![0.0; n * kw]);
    ops::attention_backward(&x.dout, &x.q, &x.k, &x.v, &out, &lse, s, &mut dq, &mut dk, &mut dv).unwrap();
    let (q, k, v) = (up::<T>(&st, &x.q), up::<T>(&st, &x.k), up::<T>(&st, &x.v));
    let (o, l, g) = (up::<T>(&st, &out), up::<f32>(&st, &lse), up::<T>(&st, &x.dout));
    let mut gdq = poisoned::<T>(&st, n * qw);
    let mut gdk = poisoned::<T>(&st, n * kw);
    let mut gdv = poisoned::<T>(&st, n * kw);
    attention_backward(dev, &st, s, &q, &k, &v, &o, &l, &g, &mut gdq, &mut gdk, &mut gdv).unwrap();
    let what = format!("{} {s:?}", T::DTYPE.name());
    // A window of one key or S = 1: dq and dk are exactly zero, the checks are against noise.
    let (fq, fk) = attention_grad_floors(s.head_dim, &x.q, &x.k, &x.v, &x.dout);
    assert_close_floor(&format!("dq {what}"), &down(&st, &gdq), &f64s(&dq), tol::<T>(), fq);
    assert_close_floor(&format!("dk {what}"), &down(&st, &gdk), &f64s(&dk), tol::<T>(), fk);
    assert_close(&format!("dv {what}"), &down(&st, &gdv), &f64s(&dv), tol::<T>());
}

/// Shapes: tails of every tile size (64 / 32 / 16 rows), S = 1, GQA groups 1 / 2 / 3 / 4, both
/// kernel widths and the tensor-core head dims; sliding windows of one key, shorter than a
/// tile and across tiles.
fn shapes() -> Vec<AttnShape> {
    let win = |s: AttnShape, w: usize| s.with_window(Some(w)).unwrap();
    vec![
        shape(2, 77, 4, 2, 64),
        shape(1, 1, 3, 1, 64),
        shape(1, 130, 2, 1, 128),
        shape(2, 33, 4, 4, 16),
        shape(1, 50, 3, 1, 80),
        shape(1, 300, 9, 3, 64),
        win(shape(2, 77, 4, 2, 64), 9),
        win(shape(1, 130, 2, 1, 128), 64),
        win(shape(2, 33, 4, 4, 16), 1),
        win(shape(1, 300, 9, 3, 64), 100),
    ]
}

#[test]
fn forward_f32_matches_cpu() {
    let dev = gpu_or_skip!();
    for (i, s) in shapes().into_iter().enumerate() {
        check_forward::<f32>(&dev, s, 10 + i as u64);
    }
}

#[test]
fn forward_bf16_matches_cpu() {
    let dev = gpu_or_skip!();
    for (i, s) in shapes().into_iter().enumerate() {
        check_forward::<bf16>(&dev, s, 20 + i as u64);
    }
    // A long sequence: many key tiles, online rescaling across them.
    check_forward::<bf16>(&dev, shape(1, 1000, 3, 1, 64), 29);
}

#[test]
fn backward_f32_matches_cpu() {
    let dev = gpu_or_skip!();
    for (i, s) in shapes().into_iter().enumerate() {
        check_backward::<f32>(&dev, s, 30 + i as u64);
    }
}

#[test]
fn backward_bf16_matches_cpu() {
    let dev = gpu_or_skip!();
    for (i, s) in shapes().into_iter().enumerate() {
        check_backward::<bf16>(&dev, s, 40 + i as u64);
    }
}

/// Decoding the last token of a sequence from a cache equals the forward's last row (and the
/// CPU decode), with the same sliding window; the cache is longer than `len` and holds garbage
/// past it.
#[allow(clippy::too_many_arguments)]
fn check_decode<T: El>(
    dev: &CudaBackend,
    b: usize,
    h: usize,
    kvh: usize,
    hd: usize,
    len: usize,
    cap: usize,
    window: Option<usize>,
    seed: u64,
) {
    let st = dev.stream().clone();
    let s = shape(b, len, h, kvh, hd).with_window(window).unwrap();
    let x = inputs::<T>(s, seed);
    let (fwd, _) = gpu_forward::<T>(dev, s, &x);
    let fwd = down(&st, &fwd);
    let (qw, kw) = (s.q_width(), s.kv_width());
    // Caches: the sequence's k, v at positions 0..len, then garbage.
    let junk = rounded::<T>(&rand_vec(seed + 7, b * cap * kw));
    let (mut kc, mut vc) = (junk.clone(), junk);
    let mut q = vec![0.0f32; b * qw];
    let mut want = vec![0.0f64; b * qw];
    for bi in 0..b {
        for j in 0..len {
            let src = (bi * len + j) * kw..(bi * len + j + 1) * kw;
            kc[(bi * cap + j) * kw..(bi * cap + j + 1) * kw].copy_from_slice(&x.k[src.clone()]);
            vc[(bi * cap + j) * kw..(bi * cap + j + 1) * kw].copy_from_slice(&x.v[src]);
        }
        let last = (bi * len + len - 1) * qw;
        q[bi * qw..(bi + 1) * qw].copy_from_slice(&x.q[last..last + qw]);
        want[bi * qw..(bi + 1) * qw].copy_from_slice(&fwd[last..last + qw]);
    }
    let mut cpu = vec![0.0f32; b * qw];
    ops::attention_decode(&q, &kc, &vc, b, h, kvh, hd, cap, len, window, &mut cpu).unwrap();
    let (gq, gk, gv) = (up::<T>(&st, &q), up::<T>(&st, &kc), up::<T>(&st, &vc));
    let mut out = poisoned::<T>(&st, b * qw);
    attention_decode(dev, &st, &gq, &gk, &gv, b, h, kvh, hd, cap, len, window, &mut out).unwrap();
    let got = down(&st, &out);
    let what = format!("decode {} b{b} h{h} kvh{kvh} hd{hd} len{len} cap{cap} window {window:?}", T::DTYPE.name());
    assert_close(&format!("{what} vs CPU decode"), &got, &f64s(&cpu), tol::<T>());
    assert_close(&format!("{what} vs forward's last row"), &got, &want, tol::<T>());
}

#[test]
fn decode_matches_the_forwards_last_row() {
    let dev = gpu_or_skip!();
    check_decode::<f32>(&dev, 2, 4, 2, 64, 1, 8, None, 50);
    check_decode::<f32>(&dev, 2, 9, 3, 64, 300, 310, None, 51);
    check_decode::<f32>(&dev, 1, 2, 1, 80, 513, 600, None, 52);
    check_decode::<bf16>(&dev, 2, 9, 3, 64, 257, 400, None, 53);
    check_decode::<bf16>(&dev, 1, 4, 2, 128, 70, 70, None, 54);
    // Sliding windows: within one chunk, across a chunk boundary, of one key.
    check_decode::<f32>(&dev, 2, 9, 3, 64, 300, 310, Some(40), 55);
    check_decode::<bf16>(&dev, 1, 2, 1, 80, 600, 600, Some(300), 56);
    check_decode::<f32>(&dev, 1, 4, 2, 128, 70, 80, Some(1), 57);
}

/// Forward, backward and decode twice on the same inputs: the same bits.
fn check_deterministic<T: El>(dev: &CudaBackend, s: AttnShape) {
    let st = dev.stream().clone();
    let x = inputs::<T>(s, 60);
    let run = || {
        let (out, lse) = gpu_forward::<T>(dev, s, &x);
        let (q, k, v, g) = (up::<T>(&st, &x.q), up::<T>(&st, &x.k), up::<T>(&st, &x.v), up::<T>(&st, &x.dout));
        let mut dq = poisoned::<T>(&st, s.tokens() * s.q_width());
        let mut dk = poisoned::<T>(&st, s.tokens() * s.kv_width());
        let mut dv = poisoned::<T>(&st, s.tokens() * s.kv_width());
        attention_backward(dev, &st, s, &q, &k, &v, &out, &lse, &g, &mut dq, &mut dk, &mut dv).unwrap();
        let mut dec = poisoned::<T>(&st, s.batch * s.q_width());
        let qd = up::<T>(&st, &x.q[..s.batch * s.q_width()]);
        attention_decode(dev, &st, &qd, &k, &v, s.batch, s.heads, s.kv_heads, s.head_dim, s.seq, s.seq, s.window, &mut dec)
            .unwrap();
        [bits(&st, &out), bits(&st, &lse), bits(&st, &dq), bits(&st, &dk), bits(&st, &dv), bits(&st, &dec)]
    };
    let (a, b) = (run(), run());
    for (i, name) in ["out", "lse", "dq", "dk", "dv", "decode"].iter().enumerate() {
        assert!(a[i] == b[i], "{} {name}: two runs differ", T::DTYPE.name());
    }
}

#[test]
fn two_runs_are_bitwise_equal() {
    let dev = gpu_or_skip!();
    check_deterministic::<bf16>(&dev, shape(2, 300, 9, 3, 64));
    check_deterministic::<f32>(&dev, shape(1, 100, 4, 2, 64));
    check_deterministic::<bf16>(&dev, shape(1, 300, 9, 3, 64).with_window(Some(70)).unwrap());
}

#[test]
fn bad_arguments_are_refused_before_launch() {
    let dev = gpu_or_skip!();
    let st = dev.stream().clone();
    let s = shape(1, 4, 2, 1, 64);
    let q = poisoned::<f32>(&st, 4 * 128);
    let k = poisoned::<f32>(&st, 4 * 64);
    let mut out = poisoned::<f32>(&st, 4 * 128);
    let mut lse = poisoned::<f32>(&st, 4 * 2);
    // k passed as v is fine; q as k has the wrong length.
    assert!(attention_forward(&dev, &st, s, &q, &k, &k, &mut out, &mut lse).is_ok());
    let e = attention_forward(&dev, &st, s, &q, &q, &k, &mut out, &mut lse).unwrap_err();
    assert!(e.to_string().starts_with("k:"), "{e}");
    let mut short = poisoned::<f32>(&st, 7);
    assert!(attention_forward(&dev, &st, s, &q, &k, &k, &mut out, &mut short).is_err());
    let big = shape(1, 4, 2, 1, 256);
    let qb = poisoned::<f32>(&st, 4 * 512);
    let kb = poisoned::<f32>(&st, 4 * 256);
    let mut ob = poisoned::<f32>(&st, 4 * 512);
    let e = attention_forward(&dev, &st, big, &qb, &kb, &kb, &mut ob, &mut lse).unwrap_err();
    assert!(e.to_string().contains("head_dim"), "{e}");
    let qh = poisoned::<f16>(&st, 4 * 128);
    let kh = poisoned::<f16>(&st, 4 * 64);
    let mut oh = poisoned::<f16>(&st, 4 * 128);
    assert!(attention_forward(&dev, &st, s, &qh, &kh, &kh, &mut oh, &mut lse).is_err());
    let mut dec = poisoned::<f32>(&st, 128);
    let q1 = poisoned::<f32>(&st, 128);
    let e = attention_decode(&dev, &st, &q1, &k, &k, 1, 2, 1, 64, 4, 5, None, &mut dec).unwrap_err();
    assert!(e.to_string().contains("len"), "{e}");
    let e = attention_decode(&dev, &st, &q1, &k, &k, 1, 2, 1, 64, 4, 4, Some(0), &mut dec).unwrap_err();
    assert!(e.to_string().contains("window"), "{e}");
    let e = attention_forward(&dev, &st, AttnShape { window: Some(0), ..s }, &q, &k, &k, &mut out, &mut lse).unwrap_err();
    assert!(e.to_string().contains("window"), "{e}");
}

/// The small case compute-sanitizer runs (memcheck, racecheck): every kernel once, tails in
/// every tile, checked against the CPU too.
#[test]
fn sanitize_attention() {
    let dev = gpu_or_skip!();
    check_forward::<bf16>(&dev, shape(1, 70, 2, 1, 64), 70);
    check_forward::<bf16>(&dev, shape(1, 19, 2, 2, 128), 71);
    check_forward::<f32>(&dev, shape(1, 37, 2, 1, 80), 72);
    check_backward::<bf16>(&dev, shape(1, 37, 2, 1, 64), 73);
    check_backward::<f32>(&dev, shape(1, 21, 2, 2, 128), 74);
    check_decode::<bf16>(&dev, 1, 2, 1, 64, 260, 270, None, 75);
    check_decode::<f32>(&dev, 1, 2, 2, 16, 3, 5, None, 76);
    // Sliding windows: tiles skipped before the window, masked within it.
    check_forward::<bf16>(&dev, shape(1, 140, 2, 1, 64).with_window(Some(20)).unwrap(), 77);
    check_backward::<bf16>(&dev, shape(1, 140, 2, 1, 64).with_window(Some(20)).unwrap(), 78);
    check_backward::<f32>(&dev, shape(1, 45, 2, 2, 128).with_window(Some(5)).unwrap(), 79);
    check_decode::<f32>(&dev, 1, 2, 1, 64, 300, 300, Some(30), 80);
}
