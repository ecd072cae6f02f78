//! Many adapters in one batch on the GPU (`wegeft::cuda::multi`): the per-token edit kernel
//! against the CPU multi path, the whole `y = h W^T + b` against the CPU multi path and against
//! running each adapter alone through the single-adapter CUDA layer; determinism; bad input.
//! Plus `bench_multi` (ignored; the GPU runner's `multi_bench` step runs it): 1, 8 and 64
//! adapters in one batch vs the adapters one after another vs our LoRA layer doing the same job.
//!
//! Without a CUDA device each GPU test prints `skipped: no CUDA device` and passes; with
//! `WEGEFT_REQUIRE_GPU=1` it fails instead (the GPU check runs them so).
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;

use common::{assert_close, rand_vec};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use wegeft::cpu::multi::{multi_edit, wegeft_multi_forward, MultiAdapters, MultiPath};
use wegeft::cuda::{CudaBackend, Dropout, Launch, Path};
use wegeft::{Element, LayerShape, Mat, MatMut};

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

trait El: Element + DeviceRepr + ValidAsZeroBits {}
impl El for f32 {}
impl El for bf16 {}
impl El for f16 {}

/// `v` rounded to `T` (what the device sees), as f32.
fn q<T: Element>(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x as f32).to_f32()).collect()
}
fn up<T: El>(s: &Arc<CudaStream>, v: &[f32]) -> CudaSlice<T> {
    let h: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    s.clone_htod(&h).unwrap()
}
fn down<T: El>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<f64> {
    s.clone_dtoh(d).unwrap().into_iter().map(|x| x.to_f32() as f64).collect()
}

struct Case {
    t: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    phi: Vec<f32>,
    psi: Vec<f32>,
    scales: Vec<f32>,
    idx: Vec<i32>,
}

fn case<T: Element>(seed: u64, t: usize, d_in: usize, d_out: usize, r: usize, n_ad: usize) -> Case {
    let sc = |v: Vec<f64>, a: f64| v.into_iter().map(|x| x * a).collect::<Vec<_>>();
    let idx = (0..t).map(|i| ((i * 7 + seed as usize) % (n_ad + 1)) as i32 - 1).collect();
    Case {
        t,
        d_in,
        d_out,
        r,
        x: q::<T>(&rand_vec(seed, t * d_in)),
        w: q::<T>(&sc(rand_vec(seed + 1, d_out * d_in), 1.0 / (d_in as f64).sqrt())),
        b: q::<T>(&sc(rand_vec(seed + 2, d_out), 0.5)),
        phi: q::<T>(&sc(rand_vec(seed + 3, n_ad * d_in * r), 1.0 / (d_in as f64).sqrt())),
        psi: q::<T>(&sc(rand_vec(seed + 4, n_ad * r * d_in), 1.0 / (d_in as f64).sqrt())),
        scales: (0..n_ad).map(|a| [1.0, 2.0, 0.5, -0.75][a % 4]).collect(),
        idx,
    }
}

impl Case {
    fn cpu_y(&self) -> Vec<f64> {
        let ad = MultiAdapters::new(&self.phi, &self.psi, &self.scales, self.d_in, self.r).unwrap();
        let mut y = vec![0.0f32; self.t * self.d_out];
        wegeft_multi_forward(
            Mat::new("x", &self.x, self.t, self.d_in).unwrap(),
            Mat::new("W", &self.w, self.d_out, self.d_in).unwrap(),
            Some(&self.b),
            &ad,
            &self.idx,
            MultiPath::InputEdit,
            MatMut::new("y", &mut y, self.t, self.d_out).unwrap(),
        )
        .unwrap();
        y.into_iter().map(|v| v as f64).collect()
    }
    fn gpu_y<T: El>(&self, dev: &CudaBackend) -> Vec<f64> {
        let st = dev.stream();
        let mut y = up::<T>(st, &vec![f32::NAN; self.t * self.d_out]);
        let b = up::<T>(st, &self.b);
        dev.wegeft_multi_forward(
            &up::<T>(st, &self.x),
            &up::<T>(st, &self.w),
            Some(&b),
            &up::<T>(st, &self.phi),
            &up::<T>(st, &self.psi),
            &self.scales,
            &self.idx,
            self.d_in,
            self.d_out,
            self.r,
            &mut y,
        )
        .unwrap();
        down(st, &y)
    }
    /// Every token through the single-adapter CUDA layer of its adapter (all tokens run with
    /// each adapter, then each token's row is taken from its own adapter's run).
    fn alone_y<T: El>(&self, dev: &CudaBackend) -> Vec<f64> {
        let st = dev.stream();
        let s = LayerShape::new(self.t, self.d_in, self.d_out, self.r).unwrap();
        let (x, w, b) = (up::<T>(st, &self.x), up::<T>(st, &self.w), up::<T>(st, &self.b));
        let mut y = up::<T>(st, &vec![0.0; self.t * self.d_out]);
        dev.frozen_forward(&s, &x, &w, Some(&b), &mut y, None).unwrap();
        let mut out = down(st, &y);
        let n = self.d_in * self.r;
        for a in 0..self.scales.len() {
            let phi = up::<T>(st, &self.phi[a * n..(a + 1) * n]);
            let psi = up::<T>(st, &self.psi[a * n..(a + 1) * n]);
            let mut u = up::<T>(st, &vec![0.0; self.t * self.r]);
            let mut c = up::<T>(st, &vec![0.0; self.d_out * self.r]);
            dev.wegeft_forward(&s, &x, &w, Some(&b), &phi, &psi, self.scales[a], Dropout::NONE, &mut u, &mut c, &mut y, Launch::new())
                .unwrap();
            let ya = down(st, &y);
            for (t, &i) in self.idx.iter().enumerate() {
                if i == a as i32 {
                    out[t * self.d_out..(t + 1) * self.d_out].copy_from_slice(&ya[t * self.d_out..(t + 1) * self.d_out]);
                }
            }
        }
        out
    }
}

fn forward_matches<T: El>(dev: &CudaBackend) {
    for (seed, t, d_in, d_out, r, n_ad) in [(1, 37, 72, 80, 8, 3), (2, 1, 64, 40, 1, 1), (3, 130, 128, 96, 16, 64), (4, 9, 256, 48, 64, 2)] {
        let c = case::<T>(seed, t, d_in, d_out, r, n_ad);
        let got = c.gpu_y::<T>(dev);
        let what = format!("{} T={t} d_in={d_in} d_out={d_out} r={r} A={n_ad}", T::DTYPE.name());
        assert_close(&format!("gpu multi vs cpu multi, {what}"), &got, &c.cpu_y(), T::tolerance());
        assert_close(&format!("gpu multi vs each adapter alone, {what}"), &got, &c.alone_y::<T>(dev), 2.0 * T::tolerance());
        // The K-extended path over runs of one adapter (random and sorted adapter orders).
        for sorted in [false, true] {
            let mut idx = c.idx.clone();
            if sorted {
                idx.sort();
            }
            let st = dev.stream();
            let (x, w, phi, psi) = (up::<T>(st, &c.x), up::<T>(st, &c.w), up::<T>(st, &c.phi), up::<T>(st, &c.psi));
            let (b, mut y) = (up::<T>(st, &c.b), up::<T>(st, &vec![f32::NAN; t * d_out]));
            dev.wegeft_multi_forward_path(&x, &w, Some(&b), &phi, &psi, &c.scales, &idx, d_in, d_out, r, &mut y, MultiPath::KExtended)
                .unwrap();
            let mut want = vec![0.0f32; t * d_out];
            let ad = MultiAdapters::new(&c.phi, &c.psi, &c.scales, d_in, r).unwrap();
            wegeft_multi_forward(
                Mat::new("x", &c.x, t, d_in).unwrap(),
                Mat::new("w", &c.w, d_out, d_in).unwrap(),
                Some(&c.b),
                &ad,
                &idx,
                MultiPath::InputEdit,
                MatMut::new("y", &mut want, t, d_out).unwrap(),
            )
            .unwrap();
            let want: Vec<f64> = want.into_iter().map(|v| v as f64).collect();
            assert_close(&format!("gpu multi K-extended (sorted {sorted}) vs cpu, {what}"), &down::<T>(st, &y), &want, 2.0 * T::tolerance());
        }
    }
}

#[test]
fn multi_forward_f32() {
    let dev = gpu_or_skip!();
    forward_matches::<f32>(&dev);
}

#[test]
fn multi_forward_bf16() {
    let dev = gpu_or_skip!();
    forward_matches::<bf16>(&dev);
}

#[test]
fn multi_forward_f16() {
    let dev = gpu_or_skip!();
    forward_matches::<f16>(&dev);
}

#[test]
fn multi_edit_matches_cpu_and_is_deterministic() {
    let dev = gpu_or_skip!();
    let st = dev.stream();
    let c = case::<f32>(5, 67, 300, 8, 9, 4);
    let ad = MultiAdapters::new(&c.phi, &c.psi, &c.scales, c.d_in, c.r).unwrap();
    let mut want = vec![0.0f32; c.t * c.d_in];
    multi_edit(Mat::new("x", &c.x, c.t, c.d_in).unwrap(), &ad, &c.idx, MatMut::new("h", &mut want, c.t, c.d_in).unwrap()).unwrap();
    let (x, phi, psi) = (up::<f32>(st, &c.x), up::<f32>(st, &c.phi), up::<f32>(st, &c.psi));
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut h = up::<f32>(st, &vec![f32::NAN; c.t * c.d_in]);
        dev.multi_edit(&x, &phi, &psi, &c.scales, &c.idx, c.d_in, c.r, &mut h).unwrap();
        runs.push(st.clone_dtoh(&h).unwrap());
    }
    let want: Vec<f64> = want.into_iter().map(|v| v as f64).collect();
    assert_close("multi_edit f32", &runs[0].iter().map(|&v| v as f64).collect::<Vec<_>>(), &want, 1e-5);
    assert_eq!(runs[0], runs[1], "multi_edit is not bitwise deterministic");
    let c = case::<bf16>(6, 40, 128, 64, 8, 5);
    assert_eq!(c.gpu_y::<bf16>(&dev), c.gpu_y::<bf16>(&dev), "multi forward is not bitwise deterministic");
}

#[test]
fn bad_multi_input_is_an_error() {
    let dev = gpu_or_skip!();
    let st = dev.stream();
    let c = case::<f32>(7, 4, 16, 8, 2, 2);
    let (x, phi, psi) = (up::<f32>(st, &c.x), up::<f32>(st, &c.phi), up::<f32>(st, &c.psi));
    let mut h = up::<f32>(st, &vec![0.0; c.t * c.d_in]);
    let e = dev.multi_edit(&x, &phi, &psi, &c.scales, &[0, 1, 2, -1], 16, 2, &mut h).unwrap_err().to_string();
    assert!(e.contains("token 2 names adapter 2"), "{e}");
    let e = dev.multi_edit(&x, &phi, &psi, &c.scales, &[0, 1, -1], 16, 2, &mut h).unwrap_err().to_string();
    assert!(e.contains("x"), "{e}");
    let e = dev.multi_edit(&x, &phi, &psi, &c.scales[..1], &[0, 0, 0, 0], 16, 2, &mut h).unwrap_err().to_string();
    assert!(e.contains("phi"), "{e}");
    let e = dev.multi_edit(&x, &phi, &psi, &c.scales, &[0; 4], 16, 300, &mut h).unwrap_err().to_string();
    assert!(e.contains("rank"), "{e}");
}

#[test]
fn sanitize_multi() {
    let dev = gpu_or_skip!();
    let c = case::<bf16>(8, 5, 40, 24, 3, 2);
    assert_close("sanitize multi bf16", &c.gpu_y::<bf16>(&dev), &c.cpu_y(), bf16::tolerance());
}

// ---- benchmark (ignored: `cuda_multi bench_ --ignored --nocapture`) --------------------------

fn time_it(dev: &CudaBackend, iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    dev.synchronize().unwrap();
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    dev.synchronize().unwrap();
    t0.elapsed().as_secs_f64() / iters as f64
}

#[test]
#[ignore]
fn bench_multi() {
    let dev = gpu_or_skip!();
    let st = dev.stream().clone();
    let iters: usize = std::env::var("WEGEFT_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let r = 16;
    println!("| shape (d_out x d_in) | T | adapters | multi, input edit (ms) | multi, K-extended per run (ms) | WeGeFT one after another (ms) | LoRA one after another (ms) | frozen (ms) |");
    println!("|---|---|---|---|---|---|---|---|");
    for (d_out, d_in) in [(576usize, 576usize), (4096, 4096)] {
        for t in [256usize, 1024] {
            for n_ad in [1usize, 8, 64] {
                let per = t / n_ad;
                let c = case::<bf16>(9, t, d_in, d_out, r, n_ad);
                // Tokens sorted by adapter (contiguous groups of `per`) so that the sequential
                // runs need no gather: the most favourable case for them.
                let idx: Vec<i32> = (0..t).map(|i| (i / per).min(n_ad - 1) as i32).collect();
                let (x, w, phi, psi) = (up::<bf16>(&st, &c.x), up::<bf16>(&st, &c.w), up::<bf16>(&st, &c.phi), up::<bf16>(&st, &c.psi));
                let lora_b = up::<bf16>(&st, &q::<bf16>(&rand_vec(10, n_ad * d_out * r)));
                let mut y = up::<bf16>(&st, &vec![0.0; t * d_out]);
                let mut u = up::<bf16>(&st, &vec![0.0; t * r]);
                let mut cc = up::<bf16>(&st, &vec![0.0; d_out * r]);
                let multi = time_it(&dev, iters, || {
                    dev.wegeft_multi_forward(&x, &w, None, &phi, &psi, &c.scales, &idx, d_in, d_out, r, &mut y).unwrap()
                });
                let kext = time_it(&dev, iters, || {
                    dev.wegeft_multi_forward_path(&x, &w, None, &phi, &psi, &c.scales, &idx, d_in, d_out, r, &mut y, MultiPath::KExtended)
                        .unwrap()
                });
                let s_all = LayerShape::new(t, d_in, d_out, r).unwrap();
                let frozen = time_it(&dev, iters, || dev.frozen_forward(&s_all, &x, &w, None, &mut y, None).unwrap());
                let e = 2u64; // bf16 bytes
                let seq = |lora: bool, y: &mut CudaSlice<bf16>, u: &mut CudaSlice<bf16>, cc: &mut CudaSlice<bf16>| {
                    let (xp, _g1) = x.device_ptr(&st);
                    let (wp, _g2) = w.device_ptr(&st);
                    let (php, _g3) = phi.device_ptr(&st);
                    let (psp, _g4) = psi.device_ptr(&st);
                    let (bp, _g5) = lora_b.device_ptr(&st);
                    let (yp, _g6) = y.device_ptr_mut(&st);
                    let (up_, _g7) = u.device_ptr_mut(&st);
                    let (cp, _g8) = cc.device_ptr_mut(&st);
                    for a in 0..n_ad {
                        let rows = if a + 1 == n_ad { t - a * per } else { per };
                        let s = LayerShape::new(rows, d_in, d_out, r).unwrap();
                        let off = (a * per) as u64;
                        let pa = (a * d_in * r) as u64 * e;
                        // SAFETY: every pointer is inside its buffer (rows of contiguous groups),
                        // 16-byte aligned (d_in, d_out, r multiples of 8), all on this stream.
                        unsafe {
                            if lora {
                                dev.lora_forward_raw(
                                    bf16::DTYPE, &s, st.cu_stream(), xp + off * d_in as u64 * e, wp, None, psp + pa,
                                    bp + (a * d_out * r) as u64 * e, c.scales[a], up_, yp + off * d_out as u64 * e, Path::Auto,
                                )
                                .unwrap();
                            } else {
                                dev.wegeft_forward_raw(
                                    bf16::DTYPE, &s, st.cu_stream(), xp + off * d_in as u64 * e, wp, None, php + pa, psp + pa,
                                    c.scales[a], Dropout::NONE, up_, cp, yp + off * d_out as u64 * e, Path::Auto,
                                )
                                .unwrap();
                            }
                        }
                    }
                };
                let wseq = time_it(&dev, iters, || seq(false, &mut y, &mut u, &mut cc));
                let lseq = time_it(&dev, iters, || seq(true, &mut y, &mut u, &mut cc));
                println!(
                    "| {d_out} x {d_in} | {t} | {n_ad} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                    multi * 1e3,
                    kext * 1e3,
                    wseq * 1e3,
                    lseq * 1e3,
                    frozen * 1e3
                );
            }
        }
    }
}
