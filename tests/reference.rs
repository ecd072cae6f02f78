//! The float64 reference against PyTorch autograd fixtures and against finite differences.

mod common;

use common::{assert_close, layer_cases, load_f64, rand_vec, t};
use proptest::prelude::*;
use wegeft::reference as r;
use wegeft::LayerShape;

const TOL: f64 = 1e-10;

fn get<'a>(m: &'a std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>, k: &str) -> &'a [f64] {
    &m.get(k).unwrap_or_else(|| panic!("fixture tensor {k} missing")).1
}

#[test]
fn fixtures_single_layer() {
    for case in layer_cases() {
        let f = load_f64(&case.file);
        let s = LayerShape::new(case.t, case.d_in, case.d_out, case.rank).unwrap();
        let (din, rk) = (s.d_in, s.rank);
        let phi = t(get(&f, "layer.in_proj"), rk, din);
        let psi = t(get(&f, "layer.out_proj"), din, rk);
        let (x, w, b, g) = (get(&f, "layer.x"), get(&f, "layer.W"), get(&f, "layer.b"), get(&f, "layer.G"));
        let name = |k: &str| format!("{}: {k}", case.file);

        let y = r::wegeft_forward(&s, x, w, Some(b), &phi, &psi, 1.0).unwrap();
        assert_close(&name("y"), &y, get(&f, "layer.y"), TOL);

        let gr = r::wegeft_backward(&s, x, w, &phi, &psi, 1.0, g).unwrap();
        assert_close(&name("dx"), &gr.dx, get(&f, "layer.dx"), TOL);
        assert_close(&name("dphi"), &gr.dphi, &t(get(&f, "layer.d_in_proj"), rk, din), TOL);
        assert_close(&name("dpsi"), &gr.dpsi, &t(get(&f, "layer.d_out_proj"), din, rk), TOL);

        let wm = r::merge(&s, w, &phi, &psi, 1.0).unwrap();
        assert_close(&name("W_merged"), &wm, get(&f, "layer.W_merged"), TOL);
        let wu = r::unmerge(&s, get(&f, "layer.W_merged"), &phi, &psi, 1.0).unwrap();
        assert_close(&name("unmerge(W_merged)"), &wu, w, TOL);
    }
}

#[test]
fn fixtures_shared_chain() {
    let mut n = 0;
    for case in layer_cases() {
        let f = load_f64(&case.file);
        if !f.contains_key("chain.x") {
            assert_ne!(case.d_in, case.d_out, "{}: square case without chain.*", case.file);
            continue;
        }
        n += 1;
        let s = LayerShape::new(case.t, case.d_in, case.d_out, case.rank).unwrap();
        let (din, rk) = (s.d_in, s.rank);
        let phi = t(get(&f, "chain.in_proj"), rk, din);
        let psi = t(get(&f, "chain.out_proj"), din, rk);
        let ws = [get(&f, "chain.W1"), get(&f, "chain.W2")];
        let hs = r::stack_forward(&s, &ws, get(&f, "chain.x"), &phi, &psi, 1.0).unwrap();
        assert_close(&format!("{}: chain z", case.file), hs.last().unwrap(), get(&f, "chain.z"), TOL);
        let gr = r::stack_backward(&s, &ws, &hs, &phi, &psi, 1.0, get(&f, "chain.G")).unwrap();
        assert_close(&format!("{}: chain dx", case.file), &gr.dx, get(&f, "chain.dx"), TOL);
        assert_close(&format!("{}: chain dphi", case.file), &gr.dphi, &t(get(&f, "chain.d_in_proj"), rk, din), TOL);
        assert_close(&format!("{}: chain dpsi", case.file), &gr.dpsi, &t(get(&f, "chain.d_out_proj"), din, rk), TOL);
    }
    assert!(n > 0, "no chain fixtures found");
}

/// `sum(a * b)`.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences of `loss` with respect to every element of `p`.
fn fd(p: &[f64], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-5;
    let mut q = p.to_vec();
    (0..p.len())
        .map(|i| {
            q[i] = p[i] + h;
            let lp = loss(&q);
            q[i] = p[i] - h;
            let lm = loss(&q);
            q[i] = p[i];
            (lp - lm) / (2.0 * h)
        })
        .collect()
}

/// The loss is linear in each single element, so central differences are exact up to
/// rounding: `~1e-16 * |L| / h`, with `|L|` at most ~100 here.
const FD_TOL: f64 = 1e-7;

/// `got` vs finite differences `want`, to `FD_TOL` relative to `max(max |want|, 1)`: the
/// rounding error of the differences does not shrink with the gradient, so a gradient that is
/// small everywhere is compared absolutely.
fn assert_fd(what: &str, got: &[f64], want: &[f64]) {
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs() / scale).fold(0.0, f64::max);
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(worst <= FD_TOL, "{what}: worst error {worst:e} (relative to {scale:e}) > {FD_TOL:e}");
}

fn dims() -> impl Strategy<Value = (usize, usize, usize, usize, u64, f64)> {
    (1usize..=5, 1usize..=6, 1usize..=6, 1usize..=4, any::<u64>(), 0.25f64..2.0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn wegeft_backward_matches_finite_differences((tk, din, dout, rk, seed, sc) in dims()) {
        let s = LayerShape::new(tk, din, dout, rk).unwrap();
        let x = rand_vec(seed, tk * din);
        let w = rand_vec(seed ^ 1, dout * din);
        let b = rand_vec(seed ^ 2, dout);
        let phi = rand_vec(seed ^ 3, din * rk);
        let psi = rand_vec(seed ^ 4, rk * din);
        let g = rand_vec(seed ^ 5, tk * dout);
        let gr = r::wegeft_backward(&s, &x, &w, &phi, &psi, sc, &g).unwrap();
        let loss = |x: &[f64], phi: &[f64], psi: &[f64]| {
            dot(&r::wegeft_forward(&s, x, &w, Some(&b), phi, psi, sc).unwrap(), &g)
        };
        assert_fd("dx vs fd", &gr.dx, &fd(&x, |x| loss(x, &phi, &psi)));
        assert_fd("dphi vs fd", &gr.dphi, &fd(&phi, |p| loss(&x, p, &psi)));
        assert_fd("dpsi vs fd", &gr.dpsi, &fd(&psi, |p| loss(&x, &phi, p)));
    }

    #[test]
    fn lora_backward_matches_finite_differences((tk, din, dout, rk, seed, sc) in dims()) {
        let s = LayerShape::new(tk, din, dout, rk).unwrap();
        let x = rand_vec(seed, tk * din);
        let w = rand_vec(seed ^ 1, dout * din);
        let a = rand_vec(seed ^ 3, rk * din);
        let bm = rand_vec(seed ^ 4, dout * rk);
        let g = rand_vec(seed ^ 5, tk * dout);
        let gr = r::lora_backward(&s, &x, &w, &a, &bm, sc, &g).unwrap();
        let loss = |x: &[f64], a: &[f64], bm: &[f64]| dot(&r::lora_forward(&s, x, &w, None, a, bm, sc).unwrap(), &g);
        assert_fd("lora dx vs fd", &gr.dx, &fd(&x, |x| loss(x, &a, &bm)));
        assert_fd("lora dA vs fd", &gr.da, &fd(&a, |p| loss(&x, p, &bm)));
        assert_fd("lora dB vs fd", &gr.db, &fd(&bm, |p| loss(&x, &a, p)));
    }

    #[test]
    fn merge_unmerge_and_merged_forward((tk, din, dout, rk, seed, sc) in dims()) {
        let s = LayerShape::new(tk, din, dout, rk).unwrap();
        // Entries below 0.3/sqrt(d_in) keep ||s psi phi|| < 1, so I + s phi psi is invertible.
        let small = 0.3 / (din as f64).sqrt();
        let x = rand_vec(seed, tk * din);
        let w = rand_vec(seed ^ 1, dout * din);
        let b = rand_vec(seed ^ 2, dout);
        let phi: Vec<f64> = rand_vec(seed ^ 3, din * rk).iter().map(|v| v * small).collect();
        let psi: Vec<f64> = rand_vec(seed ^ 4, rk * din).iter().map(|v| v * small).collect();
        let wm = r::merge(&s, &w, &phi, &psi, sc).unwrap();
        let wu = r::unmerge(&s, &wm, &phi, &psi, sc).unwrap();
        assert_close("unmerge(merge(W))", &wu, &w, 1e-12);
        // The frozen layer with the merged weight is the adapter layer.
        let mut frozen = r::matmul(&x, &t(&wm, dout, din), tk, din, dout);
        for row in frozen.chunks_mut(dout) {
            for (y, bj) in row.iter_mut().zip(&b) {
                *y += bj;
            }
        }
        let y = r::wegeft_forward(&s, &x, &w, Some(&b), &phi, &psi, sc).unwrap();
        assert_close("x W_merged^T + b vs adapter forward", &frozen, &y, 1e-12);
    }

    #[test]
    fn zero_psi_is_the_frozen_layer((tk, din, dout, rk, seed, sc) in dims()) {
        let s = LayerShape::new(tk, din, dout, rk).unwrap();
        let x = rand_vec(seed, tk * din);
        let w = rand_vec(seed ^ 1, dout * din);
        let phi = rand_vec(seed ^ 3, din * rk);
        let psi = vec![0.0; rk * din];
        let g = rand_vec(seed ^ 5, tk * dout);
        let y = r::wegeft_forward(&s, &x, &w, None, &phi, &psi, sc).unwrap();
        prop_assert_eq!(&y, &r::matmul(&x, &t(&w, dout, din), tk, din, dout));
        let gr = r::wegeft_backward(&s, &x, &w, &phi, &psi, sc, &g).unwrap();
        prop_assert_eq!(&gr.dx, &r::matmul(&g, &w, tk, dout, din));
        prop_assert!(gr.dphi.iter().all(|&v| v == 0.0), "dphi must vanish when psi = 0");
        prop_assert_eq!(r::merge(&s, &w, &phi, &psi, sc).unwrap(), w);
    }
}

/// `matmul` walks b row by row for speed; every output must still be the sum of its products in
/// order from 0, bit for bit as the plain dot-product loop gives it (the oracle's meaning).
#[test]
fn matmul_sums_each_output_in_order() {
    for (m, k, n, seed) in [(1, 1, 1, 1), (3, 0, 4, 2), (0, 5, 3, 3), (7, 13, 5, 4), (17, 64, 33, 5)] {
        let (a, b) = (rand_vec(seed, m * k), rand_vec(seed + 100, k * n));
        let got = r::matmul(&a, &b, m, k, n);
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for l in 0..k {
                    acc += a[i * k + l] * b[l * n + j];
                }
                assert_eq!(got[i * n + j].to_bits(), acc.to_bits(), "({i}, {j}) of {m}x{k} * {k}x{n}");
            }
        }
        assert_eq!(got.len(), m * n);
    }
}
