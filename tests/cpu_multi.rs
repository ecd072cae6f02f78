//! Many adapters in one batch on the CPU (`wegeft::cpu::multi`) against the float64 oracle:
//! the input-side algebra `x W'^T = (x + s (x psi^T) phi^T) W^T`, both paths against running
//! each token through its own adapter's layer, LoRA's multi-adapter twin, determinism, errors.

mod common;

use common::{assert_close, rand_vec};
use wegeft::cpu::multi::{
    lora_multi_forward, multi_edit, wegeft_multi_forward, MultiAdapters, MultiPath, NO_ADAPTER,
};
use wegeft::reference as rf;
use wegeft::{LayerShape, Mat, MatMut};

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}
fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The algebra the multi path rests on, in float64: `h W^T + b` equals the layer's forward and
/// `x (W + s W phi psi)^T + b` for GIFT (s = 1) and PEFT (s = alpha / r) scales.
#[test]
fn input_edit_then_frozen_gemm_is_the_layer_in_f64() {
    for (t, d_in, d_out, r, scale) in [(5, 24, 17, 3, 1.0), (9, 40, 64, 8, 16.0 / 8.0), (1, 7, 3, 1, -0.5)] {
        let s = LayerShape::new(t, d_in, d_out, r).unwrap();
        let x = rand_vec(1, t * d_in);
        let w = rand_vec(2, d_out * d_in);
        let b = rand_vec(3, d_out);
        let phi = rand_vec(4, d_in * r);
        let psi = rand_vec(5, r * d_in);
        let want = rf::wegeft_forward(&s, &x, &w, Some(&b), &phi, &psi, scale).unwrap();
        let h = rf::input_edit(&s, &x, &phi, &psi, scale).unwrap();
        let mut got = rf::matmul(&h, &rf::transpose(&w, d_out, d_in), t, d_in, d_out);
        for row in got.chunks_mut(d_out) {
            for (y, bb) in row.iter_mut().zip(&b) {
                *y += bb;
            }
        }
        assert_close("h W^T + b vs layer", &got, &want, 1e-12);
        let merged = rf::merge(&s, &w, &phi, &psi, scale).unwrap();
        let mut direct = rf::matmul(&x, &rf::transpose(&merged, d_out, d_in), t, d_in, d_out);
        for row in direct.chunks_mut(d_out) {
            for (y, bb) in row.iter_mut().zip(&b) {
                *y += bb;
            }
        }
        assert_close("x W'^T + b vs layer", &direct, &want, 1e-12);
    }
}

struct Case {
    t: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    x: Vec<f64>,
    w: Vec<f64>,
    b: Vec<f64>,
    phi: Vec<f64>,
    psi: Vec<f64>,
    scales: Vec<f64>,
    idx: Vec<i32>,
}

fn case(seed: u64, t: usize, d_in: usize, d_out: usize, r: usize, n_ad: usize) -> Case {
    let idx: Vec<i32> = rand_vec(seed + 9, t)
        .iter()
        .map(|v| (((v + 1.0) / 2.0 * (n_ad as f64 + 1.0)) as i32).min(n_ad as i32) - 1)
        .collect();
    Case {
        t,
        d_in,
        d_out,
        r,
        x: rand_vec(seed, t * d_in),
        w: rand_vec(seed + 1, d_out * d_in),
        b: rand_vec(seed + 2, d_out),
        phi: rand_vec(seed + 3, n_ad * d_in * r),
        psi: rand_vec(seed + 4, n_ad * r * d_in),
        scales: (0..n_ad).map(|a| [1.0, 2.0, 0.25, -1.5][a % 4]).collect(),
        idx,
    }
}

impl Case {
    fn want(&self, bias: bool) -> Vec<f64> {
        let n = self.d_in * self.r;
        let phis: Vec<&[f64]> = self.phi.chunks(n).collect();
        let psis: Vec<&[f64]> = self.psi.chunks(n).collect();
        rf::wegeft_multi_forward(
            self.d_in,
            self.d_out,
            self.r,
            &self.x,
            &self.w,
            bias.then_some(&self.b[..]),
            &phis,
            &psis,
            &self.scales,
            &self.idx,
        )
        .unwrap()
    }
    fn run(&self, path: MultiPath, bias: bool) -> Vec<f32> {
        let (x, w, b, phi, psi) = (f32s(&self.x), f32s(&self.w), f32s(&self.b), f32s(&self.phi), f32s(&self.psi));
        let sc = f32s(&self.scales);
        let ad = MultiAdapters::new(&phi, &psi, &sc, self.d_in, self.r).unwrap();
        let mut y = vec![f32::NAN; self.t * self.d_out];
        wegeft_multi_forward(
            Mat::new("x", &x, self.t, self.d_in).unwrap(),
            Mat::new("W", &w, self.d_out, self.d_in).unwrap(),
            bias.then_some(&b[..]),
            &ad,
            &self.idx,
            path,
            MatMut::new("y", &mut y, self.t, self.d_out).unwrap(),
        )
        .unwrap();
        y
    }
}

#[test]
fn every_path_equals_each_adapter_alone() {
    for (seed, t, d_in, d_out, r, n_ad) in
        [(10, 1, 8, 5, 1, 1), (20, 37, 33, 29, 4, 3), (30, 130, 72, 96, 8, 8), (40, 64, 48, 40, 16, 64)]
    {
        let mut c = case(seed, t, d_in, d_out, r, n_ad);
        for sorted in [false, true] {
            // Sorted: consecutive tokens per adapter (edited in place), with strided x and y.
            if sorted {
                c.idx.sort();
                let (xs, ys) = (c.x.clone(), c.idx.clone());
                let want = c.want(true);
                let pad = |v: &[f64], cols: usize| -> Vec<f32> {
                    v.chunks(cols).flat_map(|row| row.iter().map(|&x| x as f32).chain([f32::NAN; 3])).collect()
                };
                let (x, w, b) = (pad(&xs, d_in), f32s(&c.w), f32s(&c.b));
                let (phi, psi, sc) = (f32s(&c.phi), f32s(&c.psi), f32s(&c.scales));
                let ad = MultiAdapters::new(&phi, &psi, &sc, d_in, r).unwrap();
                let mut y = vec![f32::NAN; t * (d_out + 2)];
                wegeft_multi_forward(
                    Mat::strided("x", &x, t, d_in, d_in + 3).unwrap(),
                    Mat::new("W", &w, d_out, d_in).unwrap(),
                    Some(&b),
                    &ad,
                    &ys,
                    MultiPath::InputEdit,
                    MatMut::strided("y", &mut y, t, d_out, d_out + 2).unwrap(),
                )
                .unwrap();
                let got: Vec<f64> = y.chunks(d_out + 2).flat_map(|row| row[..d_out].iter().map(|&v| v as f64)).collect();
                assert_close(&format!("multi sorted strided T={t} A={n_ad}"), &got, &want, 2e-5);
            }
        for bias in [false, true] {
            let want = c.want(bias);
            for path in [MultiPath::Auto, MultiPath::InputEdit, MultiPath::KExtended] {
                let got = c.run(path, bias);
                assert_close(&format!("multi {path:?} T={t} A={n_ad} bias={bias}"), &f64s(&got), &want, 2e-5);
            }
        }
        // Deterministic: bitwise equal on a second run.
        assert_eq!(c.run(MultiPath::InputEdit, true), c.run(MultiPath::InputEdit, true));
        }
        assert!(c.idx.contains(&NO_ADAPTER) || t < 8, "cases should mix in tokens without an adapter");
    }
}

#[test]
fn edit_alone_matches_the_reference_edit() {
    let mut c = case(50, 23, 40, 8, 4, 3);
    let (x, phi, psi, sc) = (f32s(&c.x), f32s(&c.phi), f32s(&c.psi), f32s(&c.scales));
    let ad = MultiAdapters::new(&phi, &psi, &sc, c.d_in, c.r).unwrap();
    let one = LayerShape::new(1, c.d_in, 1, c.r).unwrap();
    let n = c.d_in * c.r;
    // Shuffled tokens (gathered groups), then sorted ones (groups edited in place, side by
    // side, in disjoint row ranges of a strided h whose padding must stay untouched).
    for (sorted, ld) in [(false, c.d_in), (true, c.d_in + 5)] {
        if sorted {
            c.idx.sort();
        }
        let mut h = vec![f32::NAN; (c.t - 1) * ld + c.d_in];
        let hm = MatMut::strided("h", &mut h, c.t, c.d_in, ld).unwrap();
        multi_edit(Mat::new("x", &x, c.t, c.d_in).unwrap(), &ad, &c.idx, hm).unwrap();
        for (t, &a) in c.idx.iter().enumerate() {
            let xt = &c.x[t * c.d_in..(t + 1) * c.d_in];
            let want = if a < 0 {
                xt.to_vec()
            } else {
                let a = a as usize;
                rf::input_edit(&one, xt, &c.phi[a * n..(a + 1) * n], &c.psi[a * n..(a + 1) * n], c.scales[a]).unwrap()
            };
            let got = f64s(&h[t * ld..t * ld + c.d_in]);
            assert_close(&format!("h row {t} (adapter {a}, sorted {sorted})"), &got, &want, 1e-5);
            if t + 1 < c.t {
                assert!(h[t * ld + c.d_in..(t + 1) * ld].iter().all(|v| v.is_nan()), "padding after row {t} written");
            }
        }
    }
}

#[test]
fn lora_multi_matches_the_reference() {
    let (t, d_in, d_out, r, n_ad) = (41, 24, 30, 4, 5);
    let c = case(60, t, d_in, d_out, r, n_ad);
    let a_stack = rand_vec(61, n_ad * r * d_in);
    let b_stack = rand_vec(62, n_ad * d_out * r);
    let mut y = vec![f32::NAN; t * d_out];
    lora_multi_forward(
        Mat::new("x", &f32s(&c.x), t, d_in).unwrap(),
        Mat::new("W", &f32s(&c.w), d_out, d_in).unwrap(),
        Some(&f32s(&c.b)),
        &f32s(&a_stack),
        &f32s(&b_stack),
        &f32s(&c.scales),
        r,
        &c.idx,
        MatMut::new("y", &mut y, t, d_out).unwrap(),
    )
    .unwrap();
    let one = LayerShape::new(1, d_in, d_out, r).unwrap();
    for (i, &a) in c.idx.iter().enumerate() {
        let xt = &c.x[i * d_in..(i + 1) * d_in];
        let want = if a < 0 {
            let zero_a = vec![0.0; r * d_in];
            let zero_b = vec![0.0; d_out * r];
            rf::lora_forward(&one, xt, &c.w, Some(&c.b), &zero_a, &zero_b, 1.0).unwrap()
        } else {
            let a = a as usize;
            rf::lora_forward(
                &one,
                xt,
                &c.w,
                Some(&c.b),
                &a_stack[a * r * d_in..(a + 1) * r * d_in],
                &b_stack[a * d_out * r..(a + 1) * d_out * r],
                c.scales[a],
            )
            .unwrap()
        };
        assert_close(&format!("lora row {i}"), &f64s(&y[i * d_out..(i + 1) * d_out]), &want, 2e-5);
    }
}

#[test]
fn bad_arguments_are_errors_naming_them() {
    let (d, r) = (8, 2);
    let phi = vec![0.0f32; 2 * d * r];
    let psi = vec![0.0f32; 2 * d * r];
    let sc = [1.0f32, 1.0];
    let e = MultiAdapters::new(&phi[1..], &psi, &sc, d, r).unwrap_err().to_string();
    assert!(e.contains("phi"), "{e}");
    let e = MultiAdapters::new(&phi, &psi[..5], &sc, d, r).unwrap_err().to_string();
    assert!(e.contains("psi"), "{e}");
    let e = MultiAdapters::new(&phi, &psi, &[1.0, f32::NAN], d, r).unwrap_err().to_string();
    assert!(e.contains("scale"), "{e}");
    let ad = MultiAdapters::new(&phi, &psi, &sc, d, r).unwrap();
    let x = vec![0.0f32; 3 * d];
    let w = vec![0.0f32; 4 * d];
    let mut y = vec![0.0f32; 3 * 4];
    let run = |idx: &[i32], xc: usize, wc: usize, yr: usize, b: Option<&[f32]>, y: &mut Vec<f32>| {
        wegeft_multi_forward(
            Mat::new("x", &x[..3 * xc], 3, xc).unwrap(),
            Mat::new("W", &w[..4 * wc], 4, wc).unwrap(),
            b,
            &ad,
            idx,
            MultiPath::Auto,
            MatMut::new("y", &mut y[..yr * 4], yr, 4).unwrap(),
        )
        .unwrap_err()
        .to_string()
    };
    let e = run(&[0, 2, 1], d, d, 3, None, &mut y);
    assert!(e.contains("adapter_of_token") && e.contains("token 1 names adapter 2"), "{e}");
    let e = run(&[0, 1], d, d, 3, None, &mut y);
    assert!(e.contains("adapter_of_token"), "{e}");
    let e = run(&[0, 1, 1], 4, d, 3, None, &mut y);
    assert!(e.contains("x"), "{e}");
    let e = run(&[0, 1, 1], d, 4, 3, None, &mut y);
    assert!(e.contains("W"), "{e}");
    let e = run(&[0, 1, 1], d, d, 2, None, &mut y);
    assert!(e.contains("y"), "{e}");
    let e = run(&[0, 1, 1], d, d, 3, Some(&[0.0; 3]), &mut y);
    assert!(e.contains("b"), "{e}");
}

/// The trait's default (what an engine without its own multi kernel runs) against the CPU
/// backend's own implementation, and both against the oracle; bad indices are errors.
#[test]
fn backend_default_equals_the_cpu_backend() {
    use wegeft::backend::{multi_forward_by_groups, Backend};
    use wegeft::cpu::Cpu;
    let c = case(70, 45, 40, 24, 4, 5);
    let (x, w, phi, psi, sc) = (f32s(&c.x), f32s(&c.w), f32s(&c.phi), f32s(&c.psi), f32s(&c.scales));
    let mut y1 = vec![f32::NAN; c.t * c.d_out];
    let mut y2 = vec![f32::NAN; c.t * c.d_out];
    Cpu.wegeft_multi_forward(c.t, c.d_in, c.d_out, c.r, &x, &w, &phi, &psi, &sc, &c.idx, &mut y1).unwrap();
    multi_forward_by_groups(&Cpu, c.t, c.d_in, c.d_out, c.r, &x, &w, &phi, &psi, &sc, &c.idx, &mut y2).unwrap();
    let want = c.want(false);
    assert_close("Cpu::wegeft_multi_forward", &f64s(&y1), &want, 2e-5);
    assert_close("default wegeft_multi_forward", &f64s(&y2), &want, 2e-5);
    let mut bad = c.idx.clone();
    bad[3] = 5;
    let e = Cpu.wegeft_multi_forward(c.t, c.d_in, c.d_out, c.r, &x, &w, &phi, &psi, &sc, &bad, &mut y1).unwrap_err();
    assert!(e.to_string().contains("token 3 names adapter 5"), "{e}");
    let e = multi_forward_by_groups(&Cpu, c.t, c.d_in, c.d_out, c.r, &x, &w, &phi[1..].to_vec(), &psi, &sc, &c.idx, &mut y2)
        .unwrap_err();
    assert!(e.to_string().contains("phi"), "{e}");
}

/// The half-storage entry (`wegeft_multi_forward_as`) equals the f32 one on the same rounded
/// values to within one bf16 rounding of `y`, and (proptest) never panics on arguments of the
/// wrong size: it returns Ok exactly when every length, index and scale is consistent.
#[test]
fn half_storage_entry_matches_the_f32_one() {
    use half::bf16;
    use wegeft::cpu::multi::wegeft_multi_forward_as;
    let (t, din, dout, r, n_ad) = (13, 24, 16, 4, 3);
    let bfv = |seed: u64, n: usize| -> Vec<bf16> { rand_vec(seed, n).iter().map(|&v| bf16::from_f64(v * 0.5)).collect() };
    let (x, w, b, phi, psi) = (bfv(1, t * din), bfv(2, dout * din), bfv(3, dout), bfv(4, n_ad * din * r), bfv(5, n_ad * r * din));
    let sc = [0.5f32, 1.0, 2.0];
    let idx: Vec<i32> = (0..t as i32).map(|i| i % 4 - 1).collect();
    let mut y = vec![bf16::from_f32(f32::NAN); t * dout];
    wegeft_multi_forward_as(
        Mat::new("x", &x, t, din).unwrap(),
        Mat::new("W", &w, dout, din).unwrap(),
        Some(&b),
        &phi,
        &psi,
        &sc,
        r,
        &idx,
        MultiPath::Auto,
        MatMut::new("y", &mut y, t, dout).unwrap(),
    )
    .unwrap();
    let f = |v: &[bf16]| -> Vec<f32> { v.iter().map(|e| e.to_f32()).collect() };
    let (xf, wf, bf, phif, psif) = (f(&x), f(&w), f(&b), f(&phi), f(&psi));
    let ad = MultiAdapters::new(&phif, &psif, &sc, din, r).unwrap();
    let mut yf = vec![f32::NAN; t * dout];
    let (xm, wm) = (Mat::new("x", &xf, t, din).unwrap(), Mat::new("W", &wf, dout, din).unwrap());
    wegeft_multi_forward(xm, wm, Some(&bf), &ad, &idx, MultiPath::Auto, MatMut::new("y", &mut yf, t, dout).unwrap()).unwrap();
    assert_close("bf16 storage vs f32", &f64s(&f(&y)), &f64s(&yf), 1e-2);
}

mod bad_sizes {
    use super::*;
    use half::bf16;
    use proptest::prelude::*;
    use wegeft::cpu::multi::wegeft_multi_forward_as;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn multi_forward_never_panics(
            t in 0usize..4, din in 0usize..4, dout in 0usize..4, r in 0usize..3, n_ad in 0usize..3,
            dphi in 0usize..3, dpsi in 0usize..3, didx in 0usize..3, dbias in 0usize..3,
            with_bias in any::<bool>(), bad_index in any::<bool>(), nan_scale in any::<bool>(),
        ) {
            // d* = 1: the right length; 0 or 2: one element short or long.
            let len = |n: usize, d: usize| (n + d).saturating_sub(1);
            let z = |n: usize| vec![bf16::from_f32(0.25); n];
            let (x, w) = (z(t * din), z(dout * din));
            let (phi, psi) = (z(len(n_ad * din * r, dphi)), z(len(n_ad * r * din, dpsi)));
            let b = z(len(dout, dbias));
            let mut sc = vec![1.0f32; n_ad];
            if nan_scale && n_ad > 0 {
                sc[0] = f32::NAN;
            }
            let mut idx: Vec<i32> = (0..len(t, didx)).map(|i| if n_ad == 0 { -1 } else { (i % n_ad) as i32 }).collect();
            if bad_index && !idx.is_empty() {
                idx[0] = n_ad as i32;
            }
            let mut y = z(t * dout);
            let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                wegeft_multi_forward_as(
                    Mat::new("x", &x, t, din).unwrap(),
                    Mat::new("W", &w, dout, din).unwrap(),
                    with_bias.then_some(&b[..]),
                    &phi,
                    &psi,
                    &sc,
                    r,
                    &idx,
                    MultiPath::Auto,
                    MatMut::new("y", &mut y, t, dout).unwrap(),
                )
            }));
            prop_assert!(got.is_ok(), "wegeft_multi_forward_as panicked");
            let consistent = t > 0 && din > 0 && dout > 0 && r > 0 && n_ad > 0 && dphi == 1 && dpsi == 1
                && didx == 1 && (!with_bias || dbias == 1) && !bad_index && !nan_scale;
            prop_assert_eq!(got.unwrap().is_ok(), consistent);
        }
    }
}
