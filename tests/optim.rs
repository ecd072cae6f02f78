//! AdamW against `torch.optim.AdamW`'s update written out in float64, and hand-computed steps.

mod common;

use common::{assert_close, rand_vec};
use wegeft::train::optim::{AdamW, AdamWConfig};

/// torch.optim.AdamW (single tensor, amsgrad=False, maximize=False) in f64.
struct Ref {
    c: AdamWConfig,
    t: i32,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Ref {
    fn step(&mut self, p: &mut [f64], g: &[f64]) {
        self.t += 1;
        let c = self.c;
        let bc1 = 1.0 - c.beta1.powi(self.t);
        let bc2 = 1.0 - c.beta2.powi(self.t);
        for i in 0..p.len() {
            p[i] *= 1.0 - c.lr * c.weight_decay;
            self.m[i] = c.beta1 * self.m[i] + (1.0 - c.beta1) * g[i];
            self.v[i] = c.beta2 * self.v[i] + (1.0 - c.beta2) * g[i] * g[i];
            let denom = self.v[i].sqrt() / bc2.sqrt() + c.eps;
            p[i] -= c.lr / bc1 * self.m[i] / denom;
        }
    }
}

#[test]
fn defaults_are_torch_defaults() {
    let c = AdamWConfig::default();
    assert_eq!((c.lr, c.beta1, c.beta2, c.eps, c.weight_decay), (1e-3, 0.9, 0.999, 1e-8, 0.01));
}

#[test]
fn first_steps_by_hand() {
    // p = 1, g = 0.5 every step, defaults.
    // step 1: p = 1 - 1e-5 = 0.99999; m = 0.05, v = 2.5e-4; m_hat = 0.5, v_hat = 0.25;
    //         p -= 1e-3 * 0.5 / (0.5 + 1e-8)  ->  0.98999000002
    // step 2: p *= 1 - 1e-5; m = 0.095, v = 4.9975e-4; bc1 = 0.19, bc2 = 0.001999;
    //         m_hat = 0.5, v_hat = 0.25 -> p -= 1e-3 * (0.5 / (0.5 + 1e-8))
    let mut opt = AdamW::new(AdamWConfig::default(), &[1]).unwrap();
    let mut p = [1.0f32];
    let g = [0.5f32];
    opt.step(&mut [&mut p[..]], &[&g[..]]).unwrap();
    let want1 = 0.99999f64 - 1e-3 * 0.5 / (0.5 + 1e-8);
    assert!((p[0] as f64 - want1).abs() < 1e-7, "{} vs {want1}", p[0]);
    assert_eq!(opt.step, 1);
    assert!((opt.m[0][0] as f64 - 0.05).abs() < 1e-6 * 0.05);
    assert!((opt.v[0][0] as f64 - 2.5e-4).abs() < 1e-6 * 2.5e-4);
    opt.step(&mut [&mut p[..]], &[&g[..]]).unwrap();
    let want2 = want1 * (1.0 - 1e-5) - 1e-3 * 0.5 / (0.5 + 1e-8);
    assert!((p[0] as f64 - want2).abs() < 1e-7, "{} vs {want2}", p[0]);
    assert!((opt.m[0][0] as f64 - 0.095).abs() < 1e-6 * 0.095);
    assert!((opt.v[0][0] as f64 - 4.9975e-4).abs() < 1e-6 * 4.9975e-4);
}

#[test]
fn zero_gradient_still_decays_and_moves_by_momentum() {
    // wd 0, one step with g = 1 then one with g = 0: step 2 moves by lr * m_hat / (sqrt(v_hat) + eps)
    let c = AdamWConfig { lr: 0.1, weight_decay: 0.0, ..Default::default() };
    let mut opt = AdamW::new(c, &[1]).unwrap();
    let mut p = [0.0f32];
    opt.step(&mut [&mut p[..]], &[&[1.0f32][..]]).unwrap();
    assert!((p[0] + 0.1).abs() < 1e-6, "{}", p[0]); // -lr * 1/(1+eps)
    opt.step(&mut [&mut p[..]], &[&[0.0f32][..]]).unwrap();
    // m = 0.09, bc1 = 0.19 -> m_hat = 0.47368; v = 0.000999, bc2 = 0.001999 -> v_hat = 0.49975
    let m_hat = 0.09 / 0.19;
    let v_hat: f64 = 0.000999 / 0.001999;
    let want = -0.1 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
    assert!((p[0] as f64 - want).abs() < 1e-6, "{} vs {want}", p[0]);
}

#[test]
fn matches_f64_formula_over_many_steps() {
    for (seed, c) in [
        (1u64, AdamWConfig::default()),
        (2, AdamWConfig { lr: 5e-3, weight_decay: 0.0, ..Default::default() }),
        (3, AdamWConfig { lr: 2e-2, beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.1 }),
    ] {
        let sizes = [17usize, 5];
        let mut opt = AdamW::new(c, &sizes).unwrap();
        let mut r: Vec<Ref> = sizes.iter().map(|&n| Ref { c, t: 0, m: vec![0.0; n], v: vec![0.0; n] }).collect();
        let mut p: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| rand_vec(seed * 10 + i as u64, n).iter().map(|&x| x as f32).collect()).collect();
        let mut p64: Vec<Vec<f64>> = p.iter().map(|v| v.iter().map(|&x| x as f64).collect()).collect();
        for step in 0..20u64 {
            let g: Vec<Vec<f32>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| rand_vec(seed * 1000 + step * 7 + i as u64, n).iter().map(|&x| (x * 0.3) as f32).collect())
                .collect();
            {
                let mut ps: Vec<&mut [f32]> = p.iter_mut().map(|v| v.as_mut_slice()).collect();
                let gs: Vec<&[f32]> = g.iter().map(|v| v.as_slice()).collect();
                opt.step(&mut ps, &gs).unwrap();
            }
            for i in 0..sizes.len() {
                let g64: Vec<f64> = g[i].iter().map(|&x| x as f64).collect();
                r[i].step(&mut p64[i], &g64);
            }
        }
        for i in 0..sizes.len() {
            let got: Vec<f64> = p[i].iter().map(|&x| x as f64).collect();
            assert_close("adamw params", &got, &p64[i], 2e-6);
            let m: Vec<f64> = opt.m[i].iter().map(|&x| x as f64).collect();
            assert_close("adamw m", &m, &r[i].m, 1e-5);
            let v: Vec<f64> = opt.v[i].iter().map(|&x| x as f64).collect();
            assert_close("adamw v", &v, &r[i].v, 1e-5);
        }
        assert_eq!(opt.step, 20);
    }
}

#[test]
fn bad_input_changes_nothing() {
    let mut opt = AdamW::new(AdamWConfig::default(), &[3, 2]).unwrap();
    let before = opt.clone();
    let mut a = [1.0f32; 3];
    let mut b = [1.0f32; 2];
    let g = [1.0f32; 3];
    assert!(opt.step(&mut [&mut a[..], &mut b[..]], &[&g[..], &g[..]]).is_err()); // grad 1 has 3, not 2
    assert!(opt.step(&mut [&mut a[..]], &[&g[..]]).is_err()); // one tensor missing
    assert_eq!(opt, before);
    assert_eq!(a, [1.0; 3]);
    assert!(AdamW::new(AdamWConfig { beta1: 1.0, ..Default::default() }, &[1]).is_err());
    assert!(AdamW::new(AdamWConfig { lr: -1.0, ..Default::default() }, &[1]).is_err());
    assert!(AdamW::new(AdamWConfig { eps: f64::NAN, ..Default::default() }, &[1]).is_err());
    assert!(opt.set_lr(-0.5).is_err());
    opt.set_lr(0.5).unwrap();
    assert_eq!(opt.config.lr, 0.5);
}

#[test]
fn state_round_trip_and_resume() {
    let dir = std::env::temp_dir().join(format!("wegeft-optim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("adamw.json");
    let c = AdamWConfig { lr: 1e-2, ..Default::default() };
    let mut opt = AdamW::new(c, &[4]).unwrap();
    let mut p = [0.1f32, -0.2, 0.3, 0.4];
    let g = [0.01f32, 0.5, -0.3, 1e-7];
    for _ in 0..3 {
        opt.step(&mut [&mut p[..]], &[&g[..]]).unwrap();
    }
    opt.save(&path).unwrap();
    let mut loaded = AdamW::load(&path).unwrap();
    assert_eq!(loaded, opt); // bitwise: f32 -> shortest decimal -> f32 is exact
    let mut p2 = p;
    opt.step(&mut [&mut p[..]], &[&g[..]]).unwrap();
    loaded.step(&mut [&mut p2[..]], &[&g[..]]).unwrap();
    assert_eq!(p, p2);
    // corrupt and truncated files are errors
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    assert!(AdamW::load(&path).is_err());
    std::fs::write(&path, text.replacen("\"v\":[[", "\"v\":[[1.0,", 1)).unwrap();
    assert!(AdamW::load(&path).is_err());
    assert!(AdamW::load(&dir.join("missing.json")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn clip_grad_norm_like_torch() {
    use wegeft::train::optim::clip_grad_norm;
    let mut a = [3.0f32, 0.0];
    let mut b = [4.0f32];
    let n = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0).unwrap();
    assert_eq!(n, 5.0);
    let coef = 1.0f32 / (5.0 + 1e-6);
    assert_eq!(a, [3.0 * coef, 0.0]);
    assert_eq!(b, [4.0 * coef]);
    // below the limit: untouched
    let n = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 10.0).unwrap();
    assert!((n - 1.0).abs() < 1e-6);
    assert_eq!(b, [4.0 * coef]);
    let mut c = [f32::INFINITY];
    assert!(clip_grad_norm(&mut [&mut c[..]], 1.0).is_err());
    assert!(clip_grad_norm(&mut [&mut a[..]], 0.0).is_err());
}
