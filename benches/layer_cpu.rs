//! CPU layer benchmark: WeGeFT, LoRA and the frozen layer alone (f32), forward + backward.
//!
//! `cargo bench --bench layer_cpu` runs criterion on forward+backward of each method, then
//! prints a table of forward, backward and forward+backward times (medians of interleaved
//! runs), their ratio to the frozen layer, the exact FLOP-count ratio (the floor) and how far
//! above that floor each method is. `WEGEFT_BENCH_QUICK=1` runs a tiny shape for a smoke test.
//!
//! The frozen backward computes `dx = G W` only (no weight gradient); the adapters' backward
//! computes `dx` and their own parameter gradients, from what their forward saved.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use wegeft::cpu::{self, LoraSaved, Saved};
use wegeft::{LayerShape, Mat, MatMut};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Frozen,
    Wegeft,
    Lora,
}

const METHODS: [Method; 3] = [Method::Frozen, Method::Wegeft, Method::Lora];

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Frozen => "frozen",
            Method::Wegeft => "wegeft",
            Method::Lora => "lora",
        }
    }

    /// Exact FLOPs (a multiply-add is 2) of (forward, backward), bias excluded.
    fn flops(self, s: &LayerShape) -> (f64, f64) {
        let (t, di, dout, r) = (s.tokens as f64, s.d_in as f64, s.d_out as f64, s.rank as f64);
        let frozen = 2.0 * t * di * dout;
        match self {
            Method::Frozen => (frozen, frozen),
            Method::Wegeft => (
                // C = s W phi, u = x psi^T, u C^T
                frozen + 2.0 * dout * di * r + 2.0 * t * di * r + 2.0 * t * r * dout,
                // v = G C, S = G^T u, dphi = s W^T S, dpsi = v^T x, v psi
                frozen
                    + 2.0 * t * dout * r
                    + 2.0 * dout * t * r
                    + 2.0 * di * dout * r
                    + 2.0 * r * di * t
                    + 2.0 * t * r * di,
            ),
            Method::Lora => (
                // x A^T, (x A^T) B^T
                frozen + 2.0 * t * di * r + 2.0 * t * r * dout,
                // G B, dA = (G B)^T x, dB = G^T (x A^T), (G B) A
                frozen + 2.0 * t * dout * r + 2.0 * r * t * di + 2.0 * dout * t * r + 2.0 * t * r * di,
            ),
        }
    }
}

/// Inputs and output buffers of one shape.
struct Bench {
    s: LayerShape,
    x: Vec<f32>,
    w: Vec<f32>,
    phi: Vec<f32>,
    psi: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    g: Vec<f32>,
    y: Vec<f32>,
    dx: Vec<f32>,
    dphi: Vec<f32>,
    dpsi: Vec<f32>,
    da: Vec<f32>,
    db: Vec<f32>,
}

fn rand(seed: u64, n: usize, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

impl Bench {
    fn new(t: usize, d: usize, r: usize) -> Bench {
        let s = LayerShape::new(t, d, d, r).unwrap();
        let k = 1.0 / (d as f32).sqrt();
        Bench {
            s,
            x: rand(1, t * d, 1.0),
            w: rand(2, d * d, k),
            phi: rand(3, d * r, k),
            psi: rand(4, r * d, k),
            a: rand(5, r * d, k),
            b: rand(6, d * r, k),
            g: rand(7, t * d, 1.0),
            y: vec![0.0; t * d],
            dx: vec![0.0; t * d],
            dphi: vec![0.0; d * r],
            dpsi: vec![0.0; r * d],
            da: vec![0.0; r * d],
            db: vec![0.0; d * r],
        }
    }

    fn forward(&mut self, m: Method) -> Saves {
        let s = self.s;
        let x = Mat::new("x", &self.x, s.tokens, s.d_in).unwrap();
        let w = Mat::new("W", &self.w, s.d_out, s.d_in).unwrap();
        let y = MatMut::new("y", &mut self.y, s.tokens, s.d_out).unwrap();
        match m {
            Method::Frozen => {
                cpu::frozen_forward(x, w, None, y).unwrap();
                Saves::None
            }
            Method::Wegeft => {
                let phi = Mat::new("phi", &self.phi, s.d_in, s.rank).unwrap();
                let psi = Mat::new("psi", &self.psi, s.rank, s.d_in).unwrap();
                Saves::Wegeft(cpu::wegeft_forward(&s, x, w, None, phi, psi, 2.0, y).unwrap())
            }
            Method::Lora => {
                let a = Mat::new("A", &self.a, s.rank, s.d_in).unwrap();
                let b = Mat::new("B", &self.b, s.d_out, s.rank).unwrap();
                Saves::Lora(cpu::lora_forward(&s, x, w, None, a, b, 2.0, y).unwrap())
            }
        }
    }

    fn backward(&mut self, saves: &Saves) {
        let s = self.s;
        let x = Mat::new("x", &self.x, s.tokens, s.d_in).unwrap();
        let w = Mat::new("W", &self.w, s.d_out, s.d_in).unwrap();
        let g = Mat::new("G", &self.g, s.tokens, s.d_out).unwrap();
        let dx = MatMut::new("dx", &mut self.dx, s.tokens, s.d_in).unwrap();
        match saves {
            Saves::None => cpu::frozen_backward(g, w, dx).unwrap(),
            Saves::Wegeft(sv) => {
                let phi = Mat::new("phi", &self.phi, s.d_in, s.rank).unwrap();
                let psi = Mat::new("psi", &self.psi, s.rank, s.d_in).unwrap();
                cpu::wegeft_backward(&s, x, w, phi, psi, 2.0, Some(sv), g, Some(dx), &mut self.dphi, &mut self.dpsi)
                    .unwrap()
            }
            Saves::Lora(sv) => {
                let a = Mat::new("A", &self.a, s.rank, s.d_in).unwrap();
                let b = Mat::new("B", &self.b, s.d_out, s.rank).unwrap();
                cpu::lora_backward(&s, x, w, a, b, 2.0, Some(sv), g, Some(dx), &mut self.da, &mut self.db).unwrap()
            }
        }
    }
}

enum Saves {
    None,
    Wegeft(Saved),
    Lora(LoraSaved),
}

fn shapes(quick: bool) -> Vec<(usize, usize, usize)> {
    if quick {
        vec![(64, 96, 8)]
    } else {
        vec![(512, 576, 8), (1024, 2048, 64)]
    }
}

fn criterion_benches(c: &mut Criterion, quick: bool) {
    for (t, d, r) in shapes(quick) {
        let mut bench = Bench::new(t, d, r);
        let mut group = c.benchmark_group(format!("layer_cpu_f32/T{t}_d{d}_r{r}"));
        group.throughput(criterion::Throughput::Elements(t as u64));
        for m in METHODS {
            group.bench_function(BenchmarkId::new("fwd+bwd", m.name()), |bch| {
                bch.iter(|| {
                    let sv = bench.forward(m);
                    bench.backward(black_box(&sv));
                })
            });
        }
        group.finish();
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Median of `v`.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Interleaved timing of every method (round-robin, so that load from other processes falls
/// on all alike), then the table.
fn table(quick: bool) {
    println!("\nWeGeFT CPU layer, f32, {} rayon threads (medians of interleaved runs)", rayon::current_num_threads());
    println!(
        "{:<17} {:<7} {:>9} {:>9} {:>9} | {:>6} {:>6} {:>6} | {:>7} {:>7} {:>7} | {:>6} {:>6} {:>6} {:>8}",
        "shape",
        "method",
        "fwd ms",
        "bwd ms",
        "f+b ms",
        "fwd/fz",
        "bwd/fz",
        "f+b/fz",
        "floor f",
        "floor b",
        "floor",
        "x fl f",
        "x fl b",
        "x fl",
        "x fl min"
    );
    for (t, d, r) in shapes(quick) {
        let mut bench = Bench::new(t, d, r);
        let s = bench.s;
        // warm up and size the run: about 10 s per shape (at least 9 rounds)
        let t0 = Instant::now();
        for m in METHODS {
            let sv = bench.forward(m);
            bench.backward(&sv);
        }
        let per_round = t0.elapsed().as_secs_f64();
        let budget = if quick { 0.2 } else { 10.0 };
        let rounds = ((budget / per_round.max(1e-6)) as usize).clamp(9, 200);
        let mut fwd = vec![Vec::new(); 3];
        let mut bwd = vec![Vec::new(); 3];
        for _ in 0..rounds {
            for (k, m) in METHODS.into_iter().enumerate() {
                let t0 = Instant::now();
                let sv = bench.forward(m);
                let t1 = Instant::now();
                bench.backward(black_box(&sv));
                let t2 = Instant::now();
                fwd[k].push((t1 - t0).as_secs_f64());
                bwd[k].push((t2 - t1).as_secs_f64());
            }
        }
        let both: Vec<Vec<f64>> = (0..3).map(|k| fwd[k].iter().zip(&bwd[k]).map(|(a, b)| a + b).collect()).collect();
        let (ff, fb, fboth) = (median(fwd[0].clone()), median(bwd[0].clone()), median(both[0].clone()));
        let (zf, zb) = Method::Frozen.flops(&s);
        for (k, m) in METHODS.into_iter().enumerate() {
            let (mf, mb) = (median(fwd[k].clone()), median(bwd[k].clone()));
            let mboth = median(both[k].clone());
            let (lf, lb) = m.flops(&s);
            let (floor_f, floor_b, floor) = (lf / zf, lb / zb, (lf + lb) / (zf + zb));
            let (rf, rb, rboth) = (mf / ff, mb / fb, mboth / fboth);
            let rmin = min(&both[k]) / min(&both[0]);
            println!(
                "{:<17} {:<7} {:>9.3} {:>9.3} {:>9.3} | {:>6.3} {:>6.3} {:>6.3} | {:>7.3} {:>7.3} {:>7.3} | {:>6.3} {:>6.3} {:>6.3} {:>8.3}",
                format!("T{t} d{d} r{r}"),
                m.name(),
                mf * 1e3,
                mb * 1e3,
                mboth * 1e3,
                rf,
                rb,
                rboth,
                floor_f,
                floor_b,
                floor,
                rf / floor_f,
                rb / floor_b,
                rboth / floor,
                rmin / floor
            );
        }
        let gflops = (zf + zb) / fboth / 1e9;
        println!("{:<17} frozen fwd+bwd runs at {gflops:.1} GFLOP/s; {rounds} rounds", format!("T{t} d{d} r{r}"));
    }
    println!(
        "fz = the frozen layer; floor = FLOPs / frozen FLOPs; x fl = (median time ratio) / floor; \
         x fl min = (ratio of the fastest fwd+bwd runs) / floor, the least disturbed by other load."
    );
}

fn main() {
    let quick = std::env::var("WEGEFT_BENCH_QUICK").map(|v| v == "1").unwrap_or(false);
    // `cargo test --benches` runs this binary without `--bench`: a one-shot smoke run then.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let quick = quick || !bench_mode;
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(if quick { 100 } else { 1000 }))
        .measurement_time(Duration::from_millis(if quick { 300 } else { 3000 }))
        .configure_from_args();
    criterion_benches(&mut c, quick);
    c.final_summary();
    table(quick);
}
