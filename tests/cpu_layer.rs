//! The CPU backend against the float64 reference and the PyTorch fixtures, in f32, bf16 and
//! f16, contiguous and strided; and bad calls, which must give `Err` and never panic.
//!
//! Tolerances (relative to the largest magnitude of the expected tensor, see
//! `common::assert_close`): inputs are first rounded to the storage type and the reference runs
//! on the rounded inputs, so what is measured is the backend's own error: f32 accumulation
//! (`1e-5`) plus, for outputs stored in `T`, one final rounding to `T` (`T::tolerance()`:
//! bf16 `1e-2` > its unit roundoff `2^-8`, f16 `2e-3` > `2^-11`). Adapter gradients are f32 in
//! every dtype, so they are held to the f32 tolerance.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::{assert_close, assert_close_floor, layer_cases, load_f64, rand_vec, t};
use half::{bf16, f16};
use proptest::prelude::*;
use wegeft::cpu::{self, LoraSaved, Saved};
use wegeft::reference as r;
use wegeft::{Element, Error, LayerShape, Mat, MatMut};

const F32_TOL: f64 = 1e-5;

// ---------------------------------------------------------------------------------------------
// helpers

/// Rounds through `T`.
fn round<T: Element>(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| T::from_f32(x as f32).to_f32() as f64).collect()
}

/// A `rows x cols` matrix stored with row stride `cols + pad`; the padding holds `fill`.
fn padded<T: Element>(v: &[f64], rows: usize, cols: usize, pad: usize, fill: f32) -> Vec<T> {
    let ld = cols + pad;
    let mut out = vec![T::from_f32(fill); rows * ld];
    for i in 0..rows {
        for j in 0..cols {
            out[i * ld + j] = T::from_f32(v[i * cols + j] as f32);
        }
    }
    out
}

/// The `rows x cols` content of a padded buffer, and whether all padding still equals `fill`.
fn unpad<T: Element>(buf: &[T], rows: usize, cols: usize, pad: usize, fill: f32) -> (Vec<f64>, bool) {
    let ld = cols + pad;
    let mut out = Vec::with_capacity(rows * cols);
    let mut pad_ok = true;
    for i in 0..rows {
        for j in 0..ld {
            let v = buf[i * ld + j].to_f32();
            if j < cols {
                out.push(v as f64);
            } else {
                pad_ok &= v.to_bits() == T::from_f32(fill).to_f32().to_bits();
            }
        }
    }
    (out, pad_ok)
}

fn view<'a, T>(name: &'static str, buf: &'a [T], rows: usize, cols: usize, pad: usize) -> Mat<'a, T> {
    Mat::strided(name, buf, rows, cols, cols + pad).unwrap()
}

fn view_mut<'a, T>(name: &'static str, buf: &'a mut [T], rows: usize, cols: usize, pad: usize) -> MatMut<'a, T> {
    MatMut::strided(name, buf, rows, cols, cols + pad).unwrap()
}

fn m4<'a>(name: &'static str, v: &'a [f32], rows: usize, cols: usize) -> Mat<'a, f32> {
    Mat::new(name, v, rows, cols).unwrap()
}

fn m<'a>(name: &'static str, v: &'a [f32], (rows, cols): (usize, usize)) -> Mat<'a, f32> {
    Mat::new(name, v, rows, cols).unwrap()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The largest magnitude in `v`.
fn max_of(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// Inputs of one layer, in f64 (already rounded to the storage type under test).
struct Data {
    x: Vec<f64>,
    w: Vec<f64>,
    b: Vec<f64>,
    phi: Vec<f64>,
    psi: Vec<f64>,
    g: Vec<f64>,
    /// Initial contents of the accumulated gradients (f32 values).
    dphi0: Vec<f64>,
    dpsi0: Vec<f64>,
}

impl Data {
    /// Every input's absolute value: run through the reference, the size of the terms each
    /// output sums (what rounding errors scale with).
    fn abs(&self) -> Data {
        let a = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<f64>>();
        Data {
            x: a(&self.x),
            w: a(&self.w),
            b: a(&self.b),
            phi: a(&self.phi),
            psi: a(&self.psi),
            g: a(&self.g),
            dphi0: a(&self.dphi0),
            dpsi0: a(&self.dpsi0),
        }
    }

    fn random(s: &LayerShape, seed: u64, small_pair: bool) -> Data {
        // Entries below 0.3/sqrt(d_in) keep ||s psi phi|| < 1: the merge is invertible.
        let k = if small_pair { 0.3 / (s.d_in as f64).sqrt() } else { 1.0 };
        let sc = |v: Vec<f64>| v.iter().map(|x| x * k).collect::<Vec<_>>();
        Data {
            x: rand_vec(seed, s.tokens * s.d_in),
            w: rand_vec(seed ^ 11, s.d_out * s.d_in),
            b: rand_vec(seed ^ 12, s.d_out),
            phi: sc(rand_vec(seed ^ 13, s.d_in * s.rank)),
            psi: sc(rand_vec(seed ^ 14, s.rank * s.d_in)),
            g: rand_vec(seed ^ 15, s.tokens * s.d_out),
            dphi0: f64s(&f32s(&rand_vec(seed ^ 16, s.d_in * s.rank))),
            dpsi0: f64s(&f32s(&rand_vec(seed ^ 17, s.rank * s.d_in))),
        }
    }

    fn rounded<T: Element>(&self) -> Data {
        Data {
            x: round::<T>(&self.x),
            w: round::<T>(&self.w),
            b: round::<T>(&self.b),
            phi: round::<T>(&self.phi),
            psi: round::<T>(&self.psi),
            g: round::<T>(&self.g),
            dphi0: self.dphi0.clone(),
            dpsi0: self.dpsi0.clone(),
        }
    }
}

/// Row-stride padding of each matrix argument.
#[derive(Clone, Copy, Debug, Default)]
struct Pads {
    x: usize,
    w: usize,
    phi: usize,
    psi: usize,
    y: usize,
    g: usize,
    dx: usize,
}

const FILL: f32 = -7.25;

/// WeGeFT forward (with bias), backward (saved and recomputed, gradients accumulated onto
/// `dphi0`/`dpsi0`, with and without dx), merge and unmerge through the CPU backend in `T`,
/// against the reference on the same (rounded) inputs. Returns `(y, dx, dphi, dpsi, W_merged)`
/// from the backend for further checks.
#[allow(clippy::type_complexity)]
fn check_wegeft<T: Element>(
    what: &str,
    s: &LayerShape,
    d: &Data,
    scale: f32,
    p: Pads,
    check_unmerge: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let tol = T::tolerance();
    let sc = scale as f64;
    let (tk, din, dout, rk) = (s.tokens, s.d_in, s.d_out, s.rank);
    let x = padded::<T>(&d.x, tk, din, p.x, f32::NAN);
    let w = padded::<T>(&d.w, dout, din, p.w, f32::NAN);
    let phi = padded::<T>(&d.phi, din, rk, p.phi, f32::NAN);
    let psi = padded::<T>(&d.psi, rk, din, p.psi, f32::NAN);
    let g = padded::<T>(&d.g, tk, dout, p.g, f32::NAN);
    let b: Vec<T> = d.b.iter().map(|&v| T::from_f32(v as f32)).collect();
    let xv = view("x", &x, tk, din, p.x);
    let wv = view("W", &w, dout, din, p.w);
    let phiv = view("phi", &phi, din, rk, p.phi);
    let psiv = view("psi", &psi, rk, din, p.psi);
    let gv = view("G", &g, tk, dout, p.g);

    // forward
    let y_ref = r::wegeft_forward(s, &d.x, &d.w, Some(&d.b), &d.phi, &d.psi, sc).unwrap();
    let mut y = padded::<T>(&vec![0.0; tk * dout], tk, dout, p.y, FILL);
    let saved =
        cpu::wegeft_forward(s, xv, wv, Some(&b), phiv, psiv, scale, view_mut("y", &mut y, tk, dout, p.y)).unwrap();
    let (y_got, pad_ok) = unpad(&y, tk, dout, p.y, FILL);
    assert!(pad_ok, "{what}: forward wrote into the padding of y");
    // Every output is a sum of products that may cancel (one element at T = 1, d_out = 1): its
    // rounding is measured against the size of the terms, the same computation on the inputs'
    // absolute values (`a`), not against the result alone.
    let a = d.abs();
    let y_floor = max_of(&r::wegeft_forward(s, &a.x, &a.w, Some(&a.b), &a.phi, &a.psi, sc.abs()).unwrap());
    assert_close_floor(&format!("{what}: y"), &y_got, &y_ref, tol, y_floor);
    let c_ref: Vec<f64> = r::generate_c(s, &d.w, &d.phi, sc);
    let u_ref = r::matmul(&d.x, &t(&d.psi, rk, din), tk, din, rk);
    let c_floor = max_of(&r::generate_c(s, &a.w, &a.phi, sc.abs()));
    let u_floor = max_of(&r::matmul(&a.x, &t(&a.psi, rk, din), tk, din, rk));
    assert_close_floor(&format!("{what}: saved C"), &f64s(&saved.c), &c_ref, F32_TOL, c_floor);
    assert_close_floor(&format!("{what}: saved u"), &f64s(&saved.u), &u_ref, F32_TOL, u_floor);

    // backward
    let gr = r::wegeft_backward(s, &d.x, &d.w, &d.phi, &d.psi, sc, &d.g).unwrap();
    let dphi_want = add(&d.dphi0, &gr.dphi);
    let dpsi_want = add(&d.dpsi0, &gr.dpsi);
    let ga = r::wegeft_backward(s, &a.x, &a.w, &a.phi, &a.psi, sc.abs(), &a.g).unwrap();
    let dx_floor = max_of(&ga.dx);
    let dphi_floor = max_of(&add(&a.dphi0, &ga.dphi));
    let dpsi_floor = max_of(&add(&a.dpsi0, &ga.dpsi));
    let mut dx_out = Vec::new();
    let (mut dphi_out, mut dpsi_out) = (Vec::new(), Vec::new());
    for (k, sv) in [Some(&saved), None].into_iter().enumerate() {
        let mut dx = padded::<T>(&vec![0.0; tk * din], tk, din, p.dx, FILL);
        let mut dphi = f32s(&d.dphi0);
        let mut dpsi = f32s(&d.dpsi0);
        cpu::wegeft_backward(
            s,
            xv,
            wv,
            phiv,
            psiv,
            scale,
            sv,
            gv,
            Some(view_mut("dx", &mut dx, tk, din, p.dx)),
            &mut dphi,
            &mut dpsi,
        )
        .unwrap();
        let (dx_got, pad_ok) = unpad(&dx, tk, din, p.dx, FILL);
        assert!(pad_ok, "{what}: backward wrote into the padding of dx");
        let tag = if k == 0 { "saved" } else { "recomputed" };
        assert_close_floor(&format!("{what}: dx ({tag})"), &dx_got, &gr.dx, tol, dx_floor);
        assert_close_floor(&format!("{what}: dphi0 + dphi ({tag})"), &f64s(&dphi), &dphi_want, F32_TOL, dphi_floor);
        assert_close_floor(&format!("{what}: dpsi0 + dpsi ({tag})"), &f64s(&dpsi), &dpsi_want, F32_TOL, dpsi_floor);
        if k == 0 {
            dx_out = dx_got;
            dphi_out = f64s(&dphi);
            dpsi_out = f64s(&dpsi);
        }
    }
    // without dx: the same gradients
    let mut dphi = f32s(&d.dphi0);
    let mut dpsi = f32s(&d.dpsi0);
    cpu::wegeft_backward(s, xv, wv, phiv, psiv, scale, Some(&saved), gv, None, &mut dphi, &mut dpsi).unwrap();
    assert_close_floor(&format!("{what}: dphi (no dx)"), &f64s(&dphi), &dphi_want, F32_TOL, dphi_floor);
    assert_close_floor(&format!("{what}: dpsi (no dx)"), &f64s(&dpsi), &dpsi_want, F32_TOL, dpsi_floor);

    // merge
    let wm_ref = r::merge(s, &d.w, &d.phi, &d.psi, sc).unwrap();
    let mut wm = w.clone();
    cpu::wegeft_merge(s, view_mut("W", &mut wm, dout, din, p.w), phiv, psiv, scale).unwrap();
    let (wm_got, _) = unpad(&wm, dout, din, p.w, f32::NAN);
    let wm_floor = max_of(&r::merge(s, &a.w, &a.phi, &a.psi, sc.abs()).unwrap());
    assert_close_floor(&format!("{what}: merge"), &wm_got, &wm_ref, tol, wm_floor);

    // unmerge of the (stored) merged weight
    if check_unmerge {
        let wu_ref = r::unmerge(s, &wm_got, &d.phi, &d.psi, sc).unwrap();
        cpu::wegeft_unmerge(s, view_mut("W", &mut wm, dout, din, p.w), phiv, psiv, scale).unwrap();
        let (wu_got, _) = unpad(&wm, dout, din, p.w, f32::NAN);
        assert_close(&format!("{what}: unmerge"), &wu_got, &wu_ref, tol);
    }
    (y_got, dx_out, dphi_out, dpsi_out, wm_got)
}

/// LoRA forward/backward and the frozen layer through the CPU backend in `T`.
fn check_lora_frozen<T: Element>(what: &str, s: &LayerShape, d: &Data, scale: f32, p: Pads) {
    let tol = T::tolerance();
    let sc = scale as f64;
    let (tk, din, dout, rk) = (s.tokens, s.d_in, s.d_out, s.rank);
    // LoRA's A (r x d_in) and B (d_out x r): reuse psi, and phi's values reshaped.
    let a64 = d.psi.clone();
    let b64 = round::<T>(&rand_vec(d.phi.len() as u64 ^ 99, dout * rk));
    let x = padded::<T>(&d.x, tk, din, p.x, f32::NAN);
    let w = padded::<T>(&d.w, dout, din, p.w, f32::NAN);
    let a = padded::<T>(&a64, rk, din, p.psi, f32::NAN);
    let bm = padded::<T>(&b64, dout, rk, p.phi, f32::NAN);
    let g = padded::<T>(&d.g, tk, dout, p.g, f32::NAN);
    let bias: Vec<T> = d.b.iter().map(|&v| T::from_f32(v as f32)).collect();
    let (xv, wv, av, bv, gv) = (
        view("x", &x, tk, din, p.x),
        view("W", &w, dout, din, p.w),
        view("A", &a, rk, din, p.psi),
        view("B", &bm, dout, rk, p.phi),
        view("G", &g, tk, dout, p.g),
    );

    let y_ref = r::lora_forward(s, &d.x, &d.w, Some(&d.b), &a64, &b64, sc).unwrap();
    let mut y = padded::<T>(&vec![0.0; tk * dout], tk, dout, p.y, FILL);
    let saved: LoraSaved =
        cpu::lora_forward(s, xv, wv, Some(&bias), av, bv, scale, view_mut("y", &mut y, tk, dout, p.y)).unwrap();
    let (y_got, pad_ok) = unpad(&y, tk, dout, p.y, FILL);
    assert!(pad_ok, "{what}: lora forward wrote into padding");
    assert_close(&format!("{what}: lora y"), &y_got, &y_ref, tol);

    let gr = r::lora_backward(s, &d.x, &d.w, &a64, &b64, sc, &d.g).unwrap();
    for sv in [Some(&saved), None] {
        let mut dx = padded::<T>(&vec![0.0; tk * din], tk, din, p.dx, FILL);
        let mut da = f32s(&d.dpsi0);
        let mut db = vec![0.5f32; dout * rk];
        cpu::lora_backward(
            s,
            xv,
            wv,
            av,
            bv,
            scale,
            sv,
            gv,
            Some(view_mut("dx", &mut dx, tk, din, p.dx)),
            &mut da,
            &mut db,
        )
        .unwrap();
        let (dx_got, pad_ok) = unpad(&dx, tk, din, p.dx, FILL);
        assert!(pad_ok, "{what}: lora backward wrote into padding");
        assert_close(&format!("{what}: lora dx"), &dx_got, &gr.dx, tol);
        assert_close(&format!("{what}: lora dA"), &f64s(&da), &add(&d.dpsi0, &gr.da), F32_TOL);
        let db_want: Vec<f64> = gr.db.iter().map(|v| v + 0.5).collect();
        assert_close(&format!("{what}: lora dB"), &f64s(&db), &db_want, F32_TOL);
    }

    // frozen: y = x W^T + b, dx = G W
    let mut yf_ref = r::matmul(&d.x, &t(&d.w, dout, din), tk, din, dout);
    for row in yf_ref.chunks_mut(dout) {
        for (v, bj) in row.iter_mut().zip(&d.b) {
            *v += bj;
        }
    }
    let mut y = padded::<T>(&vec![0.0; tk * dout], tk, dout, p.y, FILL);
    cpu::frozen_forward(xv, wv, Some(&bias), view_mut("y", &mut y, tk, dout, p.y)).unwrap();
    assert_close(&format!("{what}: frozen y"), &unpad(&y, tk, dout, p.y, FILL).0, &yf_ref, tol);
    let mut dx = padded::<T>(&vec![0.0; tk * din], tk, din, p.dx, FILL);
    cpu::frozen_backward(gv, wv, view_mut("dx", &mut dx, tk, din, p.dx)).unwrap();
    assert_close(
        &format!("{what}: frozen dx"),
        &unpad(&dx, tk, din, p.dx, FILL).0,
        &r::matmul(&d.g, &d.w, tk, dout, din),
        tol,
    );
}

// ---------------------------------------------------------------------------------------------
// fixtures

/// The tensors of a fixture file, by name.
type Tensors = std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>;

fn get<'a>(m: &'a Tensors, k: &str) -> &'a [f64] {
    &m.get(k).unwrap_or_else(|| panic!("fixture tensor {k} missing")).1
}

fn fixture_data(case: &common::LayerCase) -> (LayerShape, Data, Tensors) {
    let f = load_f64(&case.file);
    let s = LayerShape::new(case.t, case.d_in, case.d_out, case.rank).unwrap();
    let d = Data {
        x: get(&f, "layer.x").to_vec(),
        w: get(&f, "layer.W").to_vec(),
        b: get(&f, "layer.b").to_vec(),
        phi: t(get(&f, "layer.in_proj"), s.rank, s.d_in),
        psi: t(get(&f, "layer.out_proj"), s.d_in, s.rank),
        g: get(&f, "layer.G").to_vec(),
        dphi0: vec![0.0; s.d_in * s.rank],
        dpsi0: vec![0.0; s.rank * s.d_in],
    };
    (s, d, f)
}

#[test]
fn fixtures_f32() {
    for case in layer_cases() {
        let (s, d, f) = fixture_data(&case);
        let what = format!("{} f32", case.file);
        let (y, dx, dphi, dpsi, wm) = check_wegeft::<f32>(&what, &s, &d.rounded::<f32>(), 1.0, Pads::default(), true);
        // and straight against PyTorch's float64 answers
        assert_close(&format!("{what}: y vs fixture"), &y, get(&f, "layer.y"), F32_TOL);
        assert_close(&format!("{what}: dx vs fixture"), &dx, get(&f, "layer.dx"), F32_TOL);
        assert_close(
            &format!("{what}: dphi vs fixture"),
            &dphi,
            &t(get(&f, "layer.d_in_proj"), s.rank, s.d_in),
            F32_TOL,
        );
        assert_close(
            &format!("{what}: dpsi vs fixture"),
            &dpsi,
            &t(get(&f, "layer.d_out_proj"), s.d_in, s.rank),
            F32_TOL,
        );
        assert_close(&format!("{what}: W_merged vs fixture"), &wm, get(&f, "layer.W_merged"), F32_TOL);
        // unmerge of the fixture's merged weight gives W back
        let mut w = f32s(get(&f, "layer.W_merged"));
        let (phi, psi) = (f32s(&d.phi), f32s(&d.psi));
        cpu::wegeft_unmerge(
            &s,
            MatMut::new("W", &mut w, s.d_out, s.d_in).unwrap(),
            Mat::new("phi", &phi, s.d_in, s.rank).unwrap(),
            Mat::new("psi", &psi, s.rank, s.d_in).unwrap(),
            1.0,
        )
        .unwrap();
        assert_close(&format!("{what}: unmerge(W_merged) vs W"), &f64s(&w), get(&f, "layer.W"), F32_TOL);
        check_lora_frozen::<f32>(&what, &s, &d.rounded::<f32>(), 0.5, Pads::default());
    }
}

#[test]
fn fixtures_bf16() {
    for case in layer_cases() {
        let (s, d, _) = fixture_data(&case);
        let what = format!("{} bf16", case.file);
        check_wegeft::<bf16>(&what, &s, &d.rounded::<bf16>(), 1.0, Pads::default(), true);
        check_lora_frozen::<bf16>(&what, &s, &d.rounded::<bf16>(), 0.5, Pads::default());
    }
}

#[test]
fn fixtures_f16() {
    for case in layer_cases() {
        let (s, d, _) = fixture_data(&case);
        let what = format!("{} f16", case.file);
        check_wegeft::<f16>(&what, &s, &d.rounded::<f16>(), 1.0, Pads::default(), true);
        check_lora_frozen::<f16>(&what, &s, &d.rounded::<f16>(), 0.5, Pads::default());
    }
}

/// Two layers sharing one pair: the pair's gradients are summed by accumulating both layers'
/// backward calls into the same buffers.
#[test]
fn fixtures_chain_by_accumulation() {
    let mut n = 0;
    for case in layer_cases() {
        let f = load_f64(&case.file);
        if !f.contains_key("chain.x") {
            continue;
        }
        n += 1;
        let s = LayerShape::new(case.t, case.d_in, case.d_out, case.rank).unwrap();
        let (tk, d, rk) = (s.tokens, s.d_in, s.rank);
        let phi = f32s(&t(get(&f, "chain.in_proj"), rk, d));
        let psi = f32s(&t(get(&f, "chain.out_proj"), d, rk));
        let w1 = f32s(get(&f, "chain.W1"));
        let w2 = f32s(get(&f, "chain.W2"));
        let x = f32s(get(&f, "chain.x"));
        let g = f32s(get(&f, "chain.G"));
        let (phiv, psiv) = (m4("phi", &phi, d, rk), m4("psi", &psi, rk, d));
        let mut h1 = vec![0.0f32; tk * d];
        let mut z = vec![0.0f32; tk * d];
        let s1 = cpu::wegeft_forward(
            &s,
            m4("x", &x, tk, d),
            m4("W1", &w1, d, d),
            None,
            phiv,
            psiv,
            1.0,
            MatMut::new("h1", &mut h1, tk, d).unwrap(),
        )
        .unwrap();
        let s2 = cpu::wegeft_forward(
            &s,
            m4("h1", &h1, tk, d),
            m4("W2", &w2, d, d),
            None,
            phiv,
            psiv,
            1.0,
            MatMut::new("z", &mut z, tk, d).unwrap(),
        )
        .unwrap();
        assert_close(&format!("{}: chain z", case.file), &f64s(&z), get(&f, "chain.z"), F32_TOL);
        let mut dphi = vec![0.0f32; d * rk];
        let mut dpsi = vec![0.0f32; rk * d];
        let mut g1 = vec![0.0f32; tk * d];
        let mut dx = vec![0.0f32; tk * d];
        cpu::wegeft_backward(
            &s,
            m4("h1", &h1, tk, d),
            m4("W2", &w2, d, d),
            phiv,
            psiv,
            1.0,
            Some(&s2),
            m4("G", &g, tk, d),
            Some(MatMut::new("g1", &mut g1, tk, d).unwrap()),
            &mut dphi,
            &mut dpsi,
        )
        .unwrap();
        cpu::wegeft_backward(
            &s,
            m4("x", &x, tk, d),
            m4("W1", &w1, d, d),
            phiv,
            psiv,
            1.0,
            Some(&s1),
            m4("g1", &g1, tk, d),
            Some(MatMut::new("dx", &mut dx, tk, d).unwrap()),
            &mut dphi,
            &mut dpsi,
        )
        .unwrap();
        assert_close(&format!("{}: chain dx", case.file), &f64s(&dx), get(&f, "chain.dx"), F32_TOL);
        assert_close(
            &format!("{}: chain dphi", case.file),
            &f64s(&dphi),
            &t(get(&f, "chain.d_in_proj"), rk, d),
            F32_TOL,
        );
        assert_close(
            &format!("{}: chain dpsi", case.file),
            &f64s(&dpsi),
            &t(get(&f, "chain.d_out_proj"), d, rk),
            F32_TOL,
        );
    }
    assert!(n > 0, "no chain fixtures");
}

#[test]
fn singular_unmerge_is_an_error_and_leaves_w() {
    // r = 1, psi phi = -1: I_r + s psi phi = 0.
    let s = LayerShape::new(1, 3, 2, 1).unwrap();
    let phi = vec![1.0f32, 0.0, 0.0];
    let psi = vec![-1.0f32, 0.0, 0.0];
    let mut w = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let res = cpu::wegeft_unmerge(
        &s,
        MatMut::new("W", &mut w, 2, 3).unwrap(),
        Mat::new("phi", &phi, 3, 1).unwrap(),
        Mat::new("psi", &psi, 1, 3).unwrap(),
        1.0,
    );
    assert!(matches!(res, Err(Error::Numerical(_))), "{res:?}");
    assert_eq!(w, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
}

// ---------------------------------------------------------------------------------------------
// random shapes

fn shapes() -> impl Strategy<Value = (usize, usize, usize, usize)> {
    let rank = prop_oneof![4 => 1usize..=8, 1 => 9usize..=256];
    (prop_oneof![1 => Just(1usize), 4 => 1usize..=40], 1usize..=70, 1usize..=70, rank)
}

fn pads() -> impl Strategy<Value = Pads> {
    (proptest::bool::ANY, proptest::collection::vec(0usize..=3, 7)).prop_map(|(on, v)| {
        if on {
            Pads { x: v[0], w: v[1], phi: v[2], psi: v[3], y: v[4], g: v[5], dx: v[6] }
        } else {
            Pads::default()
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    // `small`: a pair small enough for the merge to be invertible (then unmerge is checked too);
    // otherwise entries of phi and psi are as large as those of x and W, so the adapter term
    // dominates y.
    #[test]
    fn random_f32_vs_reference(
        (tk, din, dout, rk) in shapes(), p in pads(), seed in any::<u64>(), scale in 0.1f32..4.0, small in any::<bool>()
    ) {
        let s = LayerShape::new(tk, din, dout, rk).unwrap();
        let d = Data::random(&s, seed, small).rounded::<f32>();
        let what = format!("f32 {s:?} {p:?} scale {scale} small {small}");
        check_wegeft::<f32>(&what, &s, &d, scale, p, small);
        check_lora_frozen::<f32>(&what, &s, &d, scale, p);
    }

    #[test]
    fn random_half_vs_reference(
        (tk, din, dout, rk) in shapes(), p in pads(), seed in any::<u64>(), scale in 0.1f32..4.0, small in any::<bool>()
    ) {
        let s = LayerShape::new(tk, din, dout, rk).unwrap();
        let d = Data::random(&s, seed, small);
        check_wegeft::<bf16>(&format!("bf16 {s:?} {p:?} small {small}"), &s, &d.rounded::<bf16>(), scale, p, small);
        check_wegeft::<f16>(&format!("f16 {s:?} {p:?} small {small}"), &s, &d.rounded::<f16>(), scale, p, small);
    }
}

// ---------------------------------------------------------------------------------------------
// bad calls

/// One way to get a call wrong.
#[derive(Clone, Copy, Debug)]
enum Bad {
    XRows,
    XCols,
    WRows,
    WCols,
    PhiShape,
    PsiShape,
    YShape,
    GShape,
    DxShape,
    BiasLen,
    RankZero,
    TokensZero,
    DphiLen,
    DpsiLen,
    SavedU,
    SavedC,
    ScaleNan,
}

const ALL_BAD: [Bad; 17] = [
    Bad::XRows,
    Bad::XCols,
    Bad::WRows,
    Bad::WCols,
    Bad::PhiShape,
    Bad::PsiShape,
    Bad::YShape,
    Bad::GShape,
    Bad::DxShape,
    Bad::BiasLen,
    Bad::RankZero,
    Bad::TokensZero,
    Bad::DphiLen,
    Bad::DpsiLen,
    Bad::SavedU,
    Bad::SavedC,
    Bad::ScaleNan,
];

/// Calls every entry point with one argument wrong; each must return `Err` (no panic) and
/// leave its outputs untouched. Returns how many calls were made.
fn bad_calls(tk: usize, din: usize, dout: usize, rk: usize, bad: Bad) -> usize {
    let good = LayerShape { tokens: tk, d_in: din, d_out: dout, rank: rk };
    let s = match bad {
        Bad::RankZero => LayerShape { rank: 0, ..good },
        Bad::TokensZero => LayerShape { tokens: 0, ..good },
        _ => good,
    };
    let inc = |b: bool, v: usize| if b { v + 1 } else { v };
    let (xr, xc) = (inc(matches!(bad, Bad::XRows), tk), inc(matches!(bad, Bad::XCols), din));
    let (wr, wc) = (inc(matches!(bad, Bad::WRows), dout), inc(matches!(bad, Bad::WCols), din));
    let phi_s = (din, inc(matches!(bad, Bad::PhiShape), rk));
    let psi_s = (inc(matches!(bad, Bad::PsiShape), rk), din);
    let y_s = (tk, inc(matches!(bad, Bad::YShape), dout));
    let g_s = (inc(matches!(bad, Bad::GShape), tk), dout);
    let dx_s = (tk, inc(matches!(bad, Bad::DxShape), din));
    let blen = inc(matches!(bad, Bad::BiasLen), dout);
    let dphi_len = inc(matches!(bad, Bad::DphiLen), din * rk);
    let dpsi_len = inc(matches!(bad, Bad::DpsiLen), rk * din);
    let scale = if matches!(bad, Bad::ScaleNan) { f32::NAN } else { 1.0 };
    let saved = Saved {
        u: vec![0.0; inc(matches!(bad, Bad::SavedU), tk * rk)],
        c: vec![0.0; inc(matches!(bad, Bad::SavedC), dout * rk)],
    };

    let x = vec![1.0f32; xr * xc];
    let w = vec![1.0f32; wr * wc];
    let phi = vec![1.0f32; phi_s.0 * phi_s.1];
    let psi = vec![1.0f32; psi_s.0 * psi_s.1];
    let g = vec![1.0f32; g_s.0 * g_s.1];
    let bias = vec![0.0f32; blen];
    let (xv, wv, phiv, psiv, gv) =
        (m("x", &x, (xr, xc)), m("W", &w, (wr, wc)), m("phi", &phi, phi_s), m("psi", &psi, psi_s), m("G", &g, g_s));
    let sentinel = 3.5f32;
    let mut calls = 0;
    let mut expect_err = |name: &str, f: &mut dyn FnMut() -> Result<(), Error>| {
        calls += 1;
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Err(_)) => {}
            Ok(Ok(())) => panic!("{name} accepted bad input {bad:?} (shape {s:?})"),
            Err(_) => panic!("{name} panicked on bad input {bad:?} (shape {s:?})"),
        }
    };
    let adapter_bad = !matches!(
        bad,
        Bad::GShape
            | Bad::DxShape
            | Bad::DphiLen
            | Bad::DpsiLen
            | Bad::SavedU
            | Bad::SavedC
            | Bad::YShape
            | Bad::BiasLen
    );
    let fwd_bad = !matches!(bad, Bad::GShape | Bad::DxShape | Bad::DphiLen | Bad::DpsiLen | Bad::SavedU | Bad::SavedC);
    let bwd_bad = !matches!(bad, Bad::YShape | Bad::BiasLen);

    if fwd_bad {
        let mut y = vec![sentinel; y_s.0 * y_s.1];
        expect_err("wegeft_forward", &mut || {
            cpu::wegeft_forward(
                &s,
                xv,
                wv,
                Some(&bias),
                phiv,
                psiv,
                scale,
                MatMut::new("y", &mut y, y_s.0, y_s.1).unwrap(),
            )
            .map(|_| ())
        });
        assert!(y.iter().all(|&v| v == sentinel), "wegeft_forward wrote y before failing on {bad:?}");
        expect_err("lora_forward", &mut || {
            // A = psi-shaped, B = phi transposed: (d_out x r) from the (wr) rows
            cpu::lora_forward(
                &s,
                xv,
                wv,
                Some(&bias),
                psiv,
                m("B", &vec![1.0; wr * phi_s.1], (wr, phi_s.1)),
                scale,
                MatMut::new("y", &mut y, y_s.0, y_s.1).unwrap(),
            )
            .map(|_| ())
        });
        assert!(y.iter().all(|&v| v == sentinel), "lora_forward wrote y before failing on {bad:?}");
    }
    if bwd_bad {
        let mut dx = vec![sentinel; dx_s.0 * dx_s.1];
        let mut dphi = vec![sentinel; dphi_len];
        let mut dpsi = vec![sentinel; dpsi_len];
        for sv in [Some(&saved), None] {
            if sv.is_none() && matches!(bad, Bad::SavedU | Bad::SavedC) {
                continue;
            }
            expect_err("wegeft_backward", &mut || {
                cpu::wegeft_backward(
                    &s,
                    xv,
                    wv,
                    phiv,
                    psiv,
                    scale,
                    sv,
                    gv,
                    Some(MatMut::new("dx", &mut dx, dx_s.0, dx_s.1).unwrap()),
                    &mut dphi,
                    &mut dpsi,
                )
            });
        }
        assert!(
            dx.iter().chain(&dphi).chain(&dpsi).all(|&v| v == sentinel),
            "wegeft_backward wrote before failing on {bad:?}"
        );
        if !matches!(bad, Bad::SavedU | Bad::SavedC) {
            // LoRA: dA has psi's shape (r x d_in), dB is d_out x r.
            let bmat = vec![1.0f32; wr * phi_s.1];
            let mut db = vec![sentinel; inc(matches!(bad, Bad::DphiLen), dout * rk)];
            expect_err("lora_backward", &mut || {
                cpu::lora_backward(
                    &s,
                    xv,
                    wv,
                    psiv,
                    m("B", &bmat, (wr, phi_s.1)),
                    scale,
                    None,
                    gv,
                    Some(MatMut::new("dx", &mut dx, dx_s.0, dx_s.1).unwrap()),
                    &mut dpsi,
                    &mut db,
                )
            });
            assert!(db.iter().chain(&dpsi).all(|&v| v == sentinel), "lora_backward wrote before failing on {bad:?}");
        }
    }
    if adapter_bad && !matches!(bad, Bad::XRows | Bad::XCols | Bad::TokensZero) {
        let mut wm = vec![sentinel; wr * wc];
        expect_err("wegeft_merge", &mut || {
            cpu::wegeft_merge(&s, MatMut::new("W", &mut wm, wr, wc).unwrap(), phiv, psiv, scale)
        });
        expect_err("wegeft_unmerge", &mut || {
            cpu::wegeft_unmerge(&s, MatMut::new("W", &mut wm, wr, wc).unwrap(), phiv, psiv, scale)
        });
        assert!(wm.iter().all(|&v| v == sentinel), "merge/unmerge wrote W before failing on {bad:?}");
    }
    // the frozen layer: only its own arguments matter
    if matches!(bad, Bad::XCols | Bad::WCols | Bad::YShape | Bad::BiasLen | Bad::TokensZero) {
        let zero = matches!(bad, Bad::TokensZero);
        let rows = if zero { 0 } else { xr };
        let x0 = vec![1.0f32; rows * xc];
        let mut y = vec![sentinel; rows * y_s.1];
        expect_err("frozen_forward", &mut || {
            cpu::frozen_forward(
                m("x", &x0, (rows, xc)),
                wv,
                Some(&bias),
                MatMut::new("y", &mut y, rows, y_s.1).unwrap(),
            )
        });
        assert!(y.iter().all(|&v| v == sentinel));
    }
    if matches!(bad, Bad::WCols | Bad::WRows | Bad::GShape | Bad::DxShape) {
        let mut dx = vec![sentinel; dx_s.0 * dx_s.1];
        expect_err("frozen_backward", &mut || {
            cpu::frozen_backward(gv, wv, MatMut::new("dx", &mut dx, dx_s.0, dx_s.1).unwrap())
        });
        assert!(dx.iter().all(|&v| v == sentinel));
    }
    calls
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn bad_calls_are_errors_not_panics(tk in 1usize..6, din in 1usize..6, dout in 1usize..6, rk in 1usize..4, i in 0usize..ALL_BAD.len()) {
        prop_assert!(bad_calls(tk, din, dout, rk, ALL_BAD[i]) > 0);
    }

    #[test]
    fn bad_views_are_errors_not_panics(rows in 0usize..6, cols in 0usize..6, ld in 0usize..8, len in 0usize..40) {
        let buf = vec![0.0f32; len];
        let r = catch_unwind(|| Mat::strided("x", &buf, rows, cols, ld).map(|_| ()));
        let span = if rows == 0 || cols == 0 { 0 } else { (rows - 1) * ld + cols };
        match r {
            Ok(Ok(())) => prop_assert!(ld >= cols && len >= span),
            Ok(Err(_)) => prop_assert!(ld < cols || len < span),
            Err(_) => prop_assert!(false, "Mat::strided panicked"),
        }
        let r = catch_unwind(|| Mat::new("x", &buf, rows, cols).map(|_| ()));
        prop_assert!(matches!(r, Ok(res) if res.is_ok() == (len == rows * cols)));
    }
}

/// Every entry point once with every kind of bad argument (the proptest above samples).
#[test]
fn every_bad_kind_on_every_entry_point() {
    let mut total = 0;
    for bad in ALL_BAD {
        total += bad_calls(3, 4, 5, 2, bad);
        total += bad_calls(1, 1, 1, 1, bad);
    }
    assert!(total > 60, "only {total} bad calls made");
}

/// One token: the row stride of `x`, `y`, `G`, `dx` is irrelevant and may be anything a view
/// accepts (even `usize::MAX`); results equal the contiguous call.
#[test]
fn single_token_any_stride() {
    fn run<T: Element>() {
        let s = LayerShape::new(1, 5, 3, 2).unwrap();
        let d = Data::random(&s, 7, false).rounded::<T>();
        let conv = |v: &[f64]| v.iter().map(|&e| T::from_f32(e as f32)).collect::<Vec<T>>();
        let (x, w, phi, psi, g) = (conv(&d.x), conv(&d.w), conv(&d.phi), conv(&d.psi), conv(&d.g));
        let wv = Mat::new("W", &w, 3, 5).unwrap();
        let (phiv, psiv) = (Mat::new("phi", &phi, 5, 2).unwrap(), Mat::new("psi", &psi, 2, 5).unwrap());
        let mut out = Vec::new();
        for ld in [None, Some(usize::MAX)] {
            let xv = match ld {
                None => Mat::new("x", &x, 1, 5).unwrap(),
                Some(ld) => Mat::strided("x", &x, 1, 5, ld).unwrap(),
            };
            let gv = match ld {
                None => Mat::new("G", &g, 1, 3).unwrap(),
                Some(ld) => Mat::strided("G", &g, 1, 3, ld).unwrap(),
            };
            let mut y = vec![T::from_f32(0.0); 3];
            let mut dx = vec![T::from_f32(0.0); 5];
            let (mut dphi, mut dpsi) = (vec![0.0f32; 10], vec![0.0f32; 10]);
            let yv = MatMut::strided("y", &mut y, 1, 3, ld.unwrap_or(3)).unwrap();
            let sv = cpu::wegeft_forward(&s, xv, wv, None, phiv, psiv, 1.5, yv).unwrap();
            let dxv = MatMut::strided("dx", &mut dx, 1, 5, ld.unwrap_or(5)).unwrap();
            cpu::wegeft_backward(&s, xv, wv, phiv, psiv, 1.5, Some(&sv), gv, Some(dxv), &mut dphi, &mut dpsi).unwrap();
            out.push((
                y.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                dx.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                dphi,
                dpsi,
            ));
        }
        assert_eq!(out[0], out[1], "{}", std::any::type_name::<T>());
        let y_ref = r::wegeft_forward(&s, &d.x, &d.w, None, &d.phi, &d.psi, 1.5).unwrap();
        assert_close("single token y", &f64s(&out[0].0), &y_ref, T::tolerance());
    }
    run::<f32>();
    run::<bf16>();
    run::<f16>();
}
