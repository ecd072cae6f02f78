//! The candle layer (feature `candle`): a tiny two-layer candle model whose layers share one
//! WeGeFT pair, trained with candle's autograd and `candle_nn` optimisers (AdamW, SGD), matches
//! the same model run on this crate's CPU path by hand (`cpu::wegeft_forward` / `_backward`,
//! the chain rule written out, `train::optim::AdamW` or plain SGD): losses at every step and
//! the final `phi`, `psi`. Also half storage, batch dimensions, and bad input.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Module, Optimizer};
use wegeft::candle::WegeftLinear;
use wegeft::cpu;
use wegeft::train::optim::{AdamW, AdamWConfig};
use wegeft::{LayerShape, Mat, MatMut};

const D_IN: usize = 16;
const HID: usize = 16;
const D_OUT: usize = 12;
const R: usize = 4;
const BATCH: usize = 2;
const SEQ: usize = 5;
const T: usize = BATCH * SEQ;
const SCALE: f32 = 0.5;
const STEPS: usize = 6;

/// Deterministic values in [-a, a).
fn vals(seed: u64, n: usize, a: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
        })
        .collect()
}

struct Problem {
    x: Vec<f32>,
    target: Vec<f32>,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
    phi: Vec<f32>,
    psi: Vec<f32>,
}

fn problem() -> Problem {
    Problem {
        x: vals(1, T * D_IN, 1.0),
        target: vals(2, T * D_OUT, 1.0),
        w1: vals(3, HID * D_IN, 0.25),
        b1: vals(4, HID, 0.1),
        w2: vals(5, D_OUT * HID, 0.25),
        b2: vals(6, D_OUT, 0.1),
        phi: vals(7, D_IN * R, 0.5),
        psi: vals(8, R * D_IN, 0.5),
    }
}

/// A contiguous view (panics on a bad shape: test code).
fn m<'a, T>(name: &'static str, data: &'a [T], rows: usize, cols: usize) -> Mat<'a, T> {
    Mat::new(name, data, rows, cols).unwrap()
}

enum Opt {
    AdamW(AdamWConfig),
    Sgd(f64),
}

/// The model on this crate's CPU path: `h = relu(L1(x))`, `y = L2(h)`, both layers adapted by
/// the same `(phi, psi)`; loss `mean((y - target)^2)`. Returns the loss before each update and
/// the final pair.
fn train_reference(p: &Problem, opt: &Opt) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let s1 = LayerShape::new(T, D_IN, HID, R).unwrap();
    let s2 = LayerShape::new(T, HID, D_OUT, R).unwrap();
    let (mut phi, mut psi) = (p.phi.clone(), p.psi.clone());
    let mut adam = match opt {
        Opt::AdamW(c) => Some(AdamW::new(*c, &[phi.len(), psi.len()]).unwrap()),
        Opt::Sgd(_) => None,
    };
    let mut losses = vec![];
    for _ in 0..STEPS {
        let mut h = vec![0f32; T * HID];
        let sv1 = cpu::wegeft_forward(
            &s1,
            m("x", &p.x, T, D_IN),
            m("W1", &p.w1, HID, D_IN),
            Some(&p.b1),
            m("phi", &phi, D_IN, R),
            m("psi", &psi, R, D_IN),
            SCALE,
            MatMut::new("h", &mut h, T, HID).unwrap(),
        )
        .unwrap();
        let a: Vec<f32> = h.iter().map(|&v| v.max(0.0)).collect();
        let mut y = vec![0f32; T * D_OUT];
        let sv2 = cpu::wegeft_forward(
            &s2,
            m("a", &a, T, HID),
            m("W2", &p.w2, D_OUT, HID),
            Some(&p.b2),
            m("phi", &phi, D_IN, R),
            m("psi", &psi, R, D_IN),
            SCALE,
            MatMut::new("y", &mut y, T, D_OUT).unwrap(),
        )
        .unwrap();
        let n = (T * D_OUT) as f32;
        let loss = y.iter().zip(&p.target).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / n;
        losses.push(loss);
        let g: Vec<f32> = y.iter().zip(&p.target).map(|(a, b)| 2.0 * (a - b) / n).collect();
        let (mut dphi, mut dpsi) = (vec![0f32; D_IN * R], vec![0f32; R * D_IN]);
        let mut da = vec![0f32; T * HID];
        cpu::wegeft_backward(
            &s2,
            m("a", &a, T, HID),
            m("W2", &p.w2, D_OUT, HID),
            m("phi", &phi, D_IN, R),
            m("psi", &psi, R, D_IN),
            SCALE,
            Some(&sv2),
            m("G", &g, T, D_OUT),
            Some(MatMut::new("da", &mut da, T, HID).unwrap()),
            &mut dphi,
            &mut dpsi,
        )
        .unwrap();
        let gh: Vec<f32> = da.iter().zip(&h).map(|(&d, &hv)| if hv > 0.0 { d } else { 0.0 }).collect();
        cpu::wegeft_backward(
            &s1,
            m("x", &p.x, T, D_IN),
            m("W1", &p.w1, HID, D_IN),
            m("phi", &phi, D_IN, R),
            m("psi", &psi, R, D_IN),
            SCALE,
            Some(&sv1),
            m("G", &gh, T, HID),
            None,
            &mut dphi,
            &mut dpsi,
        )
        .unwrap();
        match (opt, adam.as_mut()) {
            (Opt::AdamW(_), Some(adam)) => adam.step(&mut [&mut phi, &mut psi], &[&dphi, &dpsi]).unwrap(),
            (Opt::Sgd(lr), _) => {
                for (p, g) in phi.iter_mut().zip(&dphi).chain(psi.iter_mut().zip(&dpsi)) {
                    *p -= *lr as f32 * g;
                }
            }
            _ => unreachable!(),
        }
    }
    (losses, phi, psi)
}

/// The same model in candle: `WegeftLinear` layers, autograd, a `candle_nn` optimiser.
fn train_candle(p: &Problem, opt: &Opt) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let dev = Device::Cpu;
    let t = |v: &[f32], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, &dev).unwrap();
    let phi = Var::from_tensor(&t(&p.phi, &[D_IN, R])).unwrap();
    let psi = Var::from_tensor(&t(&p.psi, &[R, D_IN])).unwrap();
    let l1 =
        WegeftLinear::new(&t(&p.w1, &[HID, D_IN]), Some(&t(&p.b1, &[HID])), phi.as_tensor(), psi.as_tensor(), SCALE)
            .unwrap();
    let l2 =
        WegeftLinear::new(&t(&p.w2, &[D_OUT, HID]), Some(&t(&p.b2, &[D_OUT])), phi.as_tensor(), psi.as_tensor(), SCALE)
            .unwrap();
    let x = t(&p.x, &[BATCH, SEQ, D_IN]);
    let target = t(&p.target, &[BATCH, SEQ, D_OUT]);
    let vars = vec![phi.clone(), psi.clone()];
    let mut optimizer: Box<dyn FnMut(&Tensor)> = match opt {
        Opt::AdamW(c) => {
            let params = candle_nn::ParamsAdamW {
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
            };
            let mut o = candle_nn::AdamW::new(vars, params).unwrap();
            Box::new(move |loss| o.backward_step(loss).unwrap())
        }
        Opt::Sgd(lr) => {
            let mut o = candle_nn::SGD::new(vars, *lr).unwrap();
            Box::new(move |loss| o.backward_step(loss).unwrap())
        }
    };
    let mut losses = vec![];
    for _ in 0..STEPS {
        let y = l2.forward(&l1.forward(&x).unwrap().relu().unwrap()).unwrap();
        assert_eq!(y.dims(), &[BATCH, SEQ, D_OUT]);
        let loss = (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        optimizer(&loss);
    }
    let flat = |v: &Var| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (losses, flat(&phi), flat(&psi))
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let (i, d) =
        got.iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .enumerate()
            .fold((0, 0f32), |m, (i, d)| if d > m.1 { (i, d) } else { m });
    assert!(
        d <= tol * scale,
        "{what}: worst |diff| {d:e} at {i} (got {}, want {}), allowed {:e}",
        got[i],
        want[i],
        tol * scale
    );
}

fn check(opt: Opt, name: &str) {
    let p = problem();
    let (lr, phir, psir) = train_reference(&p, &opt);
    let (lc, phic, psic) = train_candle(&p, &opt);
    println!("{name}: losses candle {lc:?}\n{name}: losses crate  {lr:?}");
    assert!(lr.windows(2).all(|w| w[1] < w[0]), "{name}: the reference loss did not go down at every step: {lr:?}");
    assert_close(&format!("{name} losses"), &lc, &lr, 1e-5);
    assert_close(&format!("{name} final phi"), &phic, &phir, 1e-5);
    assert_close(&format!("{name} final psi"), &psic, &psir, 1e-5);
    assert!(phic != p.phi && psic != p.psi, "{name}: the pair did not move");
}

#[test]
fn adamw_training_matches_the_crate_cpu_path() {
    check(Opt::AdamW(AdamWConfig { lr: 5e-2, weight_decay: 0.01, ..AdamWConfig::default() }), "AdamW");
}

#[test]
fn sgd_training_matches_the_crate_cpu_path() {
    check(Opt::Sgd(0.2), "SGD");
}

/// bf16 and f16 storage: the candle forward and gradients equal the crate's CPU path exactly
/// (the same code runs).
#[test]
fn half_storage_matches_the_crate_cpu_path() {
    let p = problem();
    let dev = Device::Cpu;
    for dt in [DType::BF16, DType::F16] {
        let t = |v: &[f32], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, &dev).unwrap().to_dtype(dt).unwrap();
        let phi = Var::from_tensor(&t(&p.phi, &[D_IN, R])).unwrap();
        let psi = Var::from_tensor(&t(&p.psi, &[R, D_IN])).unwrap();
        let w = t(&p.w1, &[HID, D_IN]);
        let l = WegeftLinear::new(&w, None, phi.as_tensor(), psi.as_tensor(), SCALE).unwrap();
        let x = Var::from_tensor(&t(&p.x, &[T, D_IN])).unwrap();
        let y = l.forward(x.as_tensor()).unwrap();
        let g = t(&vals(9, T * HID, 1.0), &[T, HID]);
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The crate's CPU path on the same half inputs (compared through f32 values).
        let sh = LayerShape::new(T, D_IN, HID, R).unwrap();
        macro_rules! reference {
            ($ty:ty) => {{
                let h = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<$ty>().unwrap();
                let (xv, wv, phiv, psiv, gv) = (h(x.as_tensor()), h(&w), h(phi.as_tensor()), h(psi.as_tensor()), h(&g));
                let mut yv = vec![<$ty>::ZERO; T * HID];
                cpu::wegeft_forward(
                    &sh,
                    m("x", &xv, T, D_IN),
                    m("W", &wv, HID, D_IN),
                    None,
                    m("phi", &phiv, D_IN, R),
                    m("psi", &psiv, R, D_IN),
                    SCALE,
                    MatMut::new("y", &mut yv, T, HID).unwrap(),
                )
                .unwrap();
                let mut dx = vec![<$ty>::ZERO; T * D_IN];
                let (mut dphi, mut dpsi) = (vec![0f32; D_IN * R], vec![0f32; R * D_IN]);
                cpu::wegeft_backward(
                    &sh,
                    m("x", &xv, T, D_IN),
                    m("W", &wv, HID, D_IN),
                    m("phi", &phiv, D_IN, R),
                    m("psi", &psiv, R, D_IN),
                    SCALE,
                    None,
                    m("G", &gv, T, HID),
                    Some(MatMut::new("dx", &mut dx, T, D_IN).unwrap()),
                    &mut dphi,
                    &mut dpsi,
                )
                .unwrap();
                let to = |v: Vec<$ty>| v.into_iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
                let round = |v: Vec<f32>| v.into_iter().map(|e| <$ty>::from_f32(e).to_f32()).collect::<Vec<f32>>();
                (to(yv), to(dx), round(dphi), round(dpsi))
            }};
        }
        let (yr, dxr, dphir, dpsir) = if dt == DType::BF16 { reference!(half::bf16) } else { reference!(half::f16) };
        assert_eq!(f32s(&y), yr, "{dt:?} y");
        assert_eq!(f32s(grads.get(x.as_tensor()).unwrap()), dxr, "{dt:?} dx");
        assert_eq!(f32s(grads.get(phi.as_tensor()).unwrap()), dphir, "{dt:?} dphi");
        assert_eq!(f32s(grads.get(psi.as_tensor()).unwrap()), dpsir, "{dt:?} dpsi");
    }
}

#[test]
fn bad_input_is_an_error() {
    let dev = Device::Cpu;
    let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
    let err = |r: wegeft::Result<WegeftLinear>| r.unwrap_err().to_string();
    assert!(err(WegeftLinear::new(&z(&[8, 6]), None, &z(&[5, 2]), &z(&[2, 6]), 1.0)).contains("phi"));
    assert!(err(WegeftLinear::new(&z(&[8, 6]), None, &z(&[6, 2]), &z(&[2, 5]), 1.0)).contains("psi"));
    assert!(err(WegeftLinear::new(&z(&[8, 6]), Some(&z(&[7])), &z(&[6, 2]), &z(&[2, 6]), 1.0)).contains("b"));
    assert!(err(WegeftLinear::new(&z(&[8, 6]), None, &z(&[6, 2]), &z(&[2, 6]), f32::NAN)).contains("scale"));
    assert!(err(WegeftLinear::new(&z(&[8, 6, 1]), None, &z(&[6, 2]), &z(&[2, 6]), 1.0)).contains("W"));
    let half = z(&[6, 2]).to_dtype(DType::BF16).unwrap();
    assert!(err(WegeftLinear::new(&z(&[8, 6]), None, &half, &z(&[2, 6]), 1.0)).contains("dtype"));
    let l = WegeftLinear::new(&z(&[8, 6]), None, &z(&[6, 2]), &z(&[2, 6]), 1.0).unwrap();
    let e = l.forward(&z(&[3, 5])).unwrap_err().to_string();
    assert!(e.contains("d_in = 6"), "{e}");
    let e = l.forward(&z(&[3, 6]).to_dtype(DType::F16).unwrap()).unwrap_err().to_string();
    assert!(e.contains("dtype"), "{e}");
}
