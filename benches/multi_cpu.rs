//! CPU benchmark: many adapters in one batch (f32 forward, rank 16).
//!
//! For a layer of SmolLM2-135M's shape (576 x 576, T = 256 tokens) and a 4096 x 4096 layer
//! (T = 64), with the T tokens spread evenly over 1, 8 and 64 adapters (sorted by adapter, so
//! the "one after another" runs need no gather — their best case):
//!
//! * `multi_edit`: [`wegeft::cpu::multi`], per-token input edit then one frozen GEMM;
//! * `multi_kext`: the same with the K-extended form per adapter group (`C_a` built per call);
//! * `wegeft_seq`: the single-adapter layer (`cpu::wegeft_forward`) once per adapter group;
//! * `lora_seq`: our LoRA layer (`cpu::lora_forward`) once per adapter group, per-adapter `B`;
//! * `lora_multi`: LoRA batched like punica's SGMV (one frozen GEMM, then per-group `x A^T B^T`).
//!
//! `cargo bench --bench multi_cpu`; `WEGEFT_BENCH_QUICK=1` for a tiny smoke run.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use wegeft::cpu::multi::{lora_multi_forward, wegeft_multi_forward, MultiAdapters, MultiPath};
use wegeft::cpu::{lora_forward, wegeft_forward};
use wegeft::{LayerShape, Mat, MatMut};

fn rnd(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

struct Setup {
    t: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    n_ad: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    phi: Vec<f32>,
    psi: Vec<f32>,
    lora_b: Vec<f32>,
    scales: Vec<f32>,
    idx: Vec<i32>,
}

impl Setup {
    fn new(t: usize, d_in: usize, d_out: usize, r: usize, n_ad: usize) -> Setup {
        let per = t / n_ad;
        Setup {
            t,
            d_in,
            d_out,
            r,
            n_ad,
            x: rnd(1, t * d_in, 1.0),
            w: rnd(2, d_out * d_in, 1.0 / (d_in as f32).sqrt()),
            phi: rnd(3, n_ad * d_in * r, 0.05),
            psi: rnd(4, n_ad * r * d_in, 0.05),
            lora_b: rnd(5, n_ad * d_out * r, 0.05),
            scales: vec![1.0; n_ad],
            idx: (0..t).map(|i| (i / per.max(1)).min(n_ad - 1) as i32).collect(),
        }
    }
    fn group(&self, a: usize) -> (usize, usize) {
        let per = self.t / self.n_ad;
        let start = a * per;
        let end = if a + 1 == self.n_ad { self.t } else { start + per };
        (start, end)
    }
    fn run(&self, what: &str, y: &mut [f32]) {
        let (t, d, o, r) = (self.t, self.d_in, self.d_out, self.r);
        let x = Mat::new("x", &self.x, t, d).unwrap();
        let w = Mat::new("W", &self.w, o, d).unwrap();
        let ym = MatMut::new("y", y, t, o).unwrap();
        match what {
            "multi_edit" | "multi_kext" => {
                let path = if what == "multi_edit" { MultiPath::InputEdit } else { MultiPath::KExtended };
                let ad = MultiAdapters::new(&self.phi, &self.psi, &self.scales, d, r).unwrap();
                wegeft_multi_forward(x, w, None, &ad, &self.idx, path, ym).unwrap();
            }
            "lora_multi" => {
                lora_multi_forward(x, w, None, &self.psi, &self.lora_b, &self.scales, r, &self.idx, ym).unwrap();
            }
            "wegeft_seq" | "lora_seq" => {
                let n = d * r;
                for a in 0..self.n_ad {
                    let (s0, s1) = self.group(a);
                    let shape = LayerShape::new(s1 - s0, d, o, r).unwrap();
                    let xg = Mat::new("x", &self.x[s0 * d..s1 * d], s1 - s0, d).unwrap();
                    let yg = MatMut::new("y", &mut y[s0 * o..s1 * o], s1 - s0, o).unwrap();
                    let psi = Mat::new("psi", &self.psi[a * n..(a + 1) * n], r, d).unwrap();
                    if what == "wegeft_seq" {
                        let phi = Mat::new("phi", &self.phi[a * n..(a + 1) * n], d, r).unwrap();
                        black_box(wegeft_forward(&shape, xg, w, None, phi, psi, 1.0, yg).unwrap());
                    } else {
                        let b = Mat::new("B", &self.lora_b[a * o * r..(a + 1) * o * r], o, r).unwrap();
                        black_box(lora_forward(&shape, xg, w, None, psi, b, 1.0, yg).unwrap());
                    }
                }
            }
            _ => unreachable!(),
        }
    }
}

const METHODS: [&str; 5] = ["multi_edit", "multi_kext", "wegeft_seq", "lora_seq", "lora_multi"];

fn main() {
    let quick = std::env::var("WEGEFT_BENCH_QUICK").is_ok();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(if quick { 10 } else { 300 }))
        .measurement_time(Duration::from_millis(if quick { 50 } else { 1500 }))
        .configure_from_args();
    let shapes: &[(usize, usize, usize)] = if quick { &[(16, 64, 48)] } else { &[(256, 576, 576), (64, 4096, 4096)] };
    let r = 16;
    for &(t, d_in, d_out) in shapes {
        let mut g = c.benchmark_group(format!("multi {d_out}x{d_in} T={t} r={r}"));
        for n_ad in [1usize, 8, 64] {
            let s = Setup::new(t, d_in, d_out, r, n_ad.min(t));
            let mut y = vec![0.0f32; t * d_out];
            for m in METHODS {
                g.bench_with_input(BenchmarkId::new(m, n_ad), &n_ad, |b, _| b.iter(|| s.run(m, black_box(&mut y))));
            }
        }
        g.finish();
    }
    c.final_summary();
}
