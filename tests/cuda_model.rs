//! The Llama harness on the CUDA backend ([`wegeft::cuda::Gpu`]) against the CPU backend on the
//! same weights: every op of the `Backend` trait on random inputs; a SmolLM2-135M-shaped model
//! with seeded random weights (no model file on the GPU machine): logits and argmax, greedy
//! decoding, training losses over a few AdamW steps; two runs bitwise equal.
//!
//! Two device configurations: `Gpu::new_f32` (f32 weights: every product in f32, tight
//! tolerances) and `Gpu::new` (bf16 frozen weights, activations rounded to bf16 at the GEMM
//! inputs: bf16 tolerances, against the CPU on the same bf16-rounded weights).
//!
//! Without a CUDA device each test prints `skipped: no CUDA device` and passes; with
//! `WEGEFT_REQUIRE_GPU=1` it fails instead (the GPU check runs them so).
#![cfg(feature = "cuda")]

mod common;
#[path = "common/smollm2.rs"]
mod smollm2;

use smollm2::{adapter, assert_run_follows, batches, dims as smollm2, prompt, same_argmax, train_losses};

use wegeft::backend::{AdamHyper, AttnShape, Backend};
use wegeft::cpu::Cpu;
use wegeft::cuda::Gpu;
use wegeft::model::llama::{HostWeights, Llama};
use wegeft::rope::Rope;
use wegeft::{DType, LayerShape};

// ---- the one skip rule ---------------------------------------------------------------------

fn gpu_with(weights: DType) -> Option<Gpu> {
    common::device_or_skip(Gpu::with_weights(0, weights))
}

macro_rules! gpu_or_skip {
    ($w:expr) => {
        match gpu_with($w) {
            Some(g) => g,
            None => return,
        }
    };
}

// ---- helpers -------------------------------------------------------------------------------

fn rv(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    common::rand_vec(seed, n).into_iter().map(|v| v as f32 * scale).collect()
}

fn bf(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// `got` vs `want`, worst error relative to `max |want|`.
fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    close_floor(what, got, want, tol, 1e-30);
}

/// `close` relative to `max(max |want|, floor)` (common::assert_close_floor).
fn close_floor(what: &str, got: &[f32], want: &[f32], tol: f64, floor: f64) {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite values on the device");
    common::assert_close_floor(what, &f64s(got), &f64s(want), tol, floor);
}

fn up(g: &Gpu, v: &[f32]) -> wegeft::cuda::GpuBuf {
    g.upload(v).unwrap()
}

fn down(g: &Gpu, b: &wegeft::cuda::GpuBuf) -> Vec<f32> {
    g.download(b).unwrap()
}

/// Tolerances of the products: f32 weights vs bf16 weights (activations rounded on the way in).
fn gemm_tol(g: &Gpu) -> f64 {
    if g.weight_dtype() == DType::F32 {
        2e-5
    } else {
        1.5e-2
    }
}

// ---- ops -----------------------------------------------------------------------------------

#[test]
fn elementwise_ops_match_cpu() {
    let g = gpu_or_skip!(DType::F32);
    let (rows, dim) = (37usize, 200usize);
    // embedding: f32 table, and a bf16 weight table (exact against the rounded table).
    let (vocab, ids) = (50usize, vec![3u32, 0, 49, 7, 7, 12]);
    let table = rv(1, vocab * dim, 1.0);
    let mut want = vec![0.0f32; ids.len() * dim];
    Cpu.embedding_forward(&table, vocab, dim, &ids, &mut want).unwrap();
    let mut out = g.zeros(ids.len() * dim).unwrap();
    g.embedding_forward(&up(&g, &table), vocab, dim, &ids, &mut out).unwrap();
    assert_eq!(down(&g, &out), want, "embedding f32");
    let gb = gpu_or_skip!(DType::BF16);
    let tb = gb.upload_weight(table.clone()).unwrap();
    assert_eq!(tb.dtype(), DType::BF16);
    let mut out = gb.zeros(ids.len() * dim).unwrap();
    gb.embedding_forward(&tb, vocab, dim, &ids, &mut out).unwrap();
    Cpu.embedding_forward(&bf(&table), vocab, dim, &ids, &mut want).unwrap();
    assert_eq!(gb.download(&out).unwrap(), want, "embedding bf16");
    assert!(g.embedding_forward(&up(&g, &table), vocab, dim, &[50], &mut g.zeros(dim).unwrap()).is_err(), "id out of range");

    // rmsnorm forward / backward (accumulating into a nonzero dx).
    let x = rv(2, rows * dim, 3.0);
    let w: Vec<f32> = rv(3, dim, 0.3).iter().map(|v| 1.0 + v).collect();
    let (mut y, mut rstd) = (vec![0.0f32; rows * dim], vec![0.0f32; rows]);
    Cpu.rmsnorm_forward(&x, &w, rows, dim, 1e-5, &mut y, &mut rstd).unwrap();
    let (mut yd, mut rd) = (g.zeros(rows * dim).unwrap(), g.zeros(rows).unwrap());
    let (xd, wd) = (up(&g, &x), up(&g, &w));
    g.rmsnorm_forward(&xd, &wd, rows, dim, 1e-5, &mut yd, &mut rd).unwrap();
    close("rmsnorm y", &down(&g, &yd), &y, 1e-6);
    close("rmsnorm rstd", &down(&g, &rd), &rstd, 1e-6);
    let dy = rv(4, rows * dim, 1.0);
    let mut dx = rv(5, rows * dim, 1.0);
    let mut dxd = up(&g, &dx);
    Cpu.rmsnorm_backward(&x, &w, &rstd, &dy, rows, dim, &mut dx).unwrap();
    g.rmsnorm_backward(&xd, &wd, &up(&g, &rstd), &up(&g, &dy), rows, dim, &mut dxd).unwrap();
    close("rmsnorm dx", &down(&g, &dxd), &dx, 1e-5);
    // Into a product operand (bf16 with bf16 weights): the f32 result rounded once.
    let (mut yo, mut ro) = (gb.operand(rows * dim).unwrap(), gb.output(rows).unwrap());
    assert_eq!(yo.dtype(), DType::BF16, "operand dtype with bf16 weights");
    gb.rmsnorm_forward(&up(&gb, &x), &up(&gb, &w), rows, dim, 1e-5, &mut yo, &mut ro).unwrap();
    let mut yf = gb.output(rows * dim).unwrap();
    gb.rmsnorm_forward(&up(&gb, &x), &up(&gb, &w), rows, dim, 1e-5, &mut yf, &mut ro).unwrap();
    assert_eq!(gb.download(&yo).unwrap(), bf(&gb.download(&yf).unwrap()), "rmsnorm into an operand");
    assert_eq!(g.operand(7).unwrap().dtype(), DType::F32, "f32 weights: operands are f32");

    // bias added to every row (exact: one f32 add per element).
    let bias = rv(30, dim, 1.0);
    let mut yb = rv(31, rows * dim, 1.0);
    let mut ybd = up(&g, &yb);
    Cpu.add_bias(&mut yb, &bias, rows, dim).unwrap();
    g.add_bias(&mut ybd, &up(&g, &bias), rows, dim).unwrap();
    assert_eq!(down(&g, &ybd), yb, "add_bias");
    assert!(g.add_bias(&mut ybd, &up(&g, &bias[1..]), rows, dim).is_err(), "short bias");

    // rope forward and inverse at scattered positions.
    let (heads, hd) = (3usize, 64usize);
    let pos: Vec<u32> = (0..rows as u32).map(|t| (t * 37 + 5) % 900).collect();
    let q = rv(6, rows * heads * hd, 1.0);
    // Plain, then Llama 3.1's scaling, then plain again: the device's cached table follows.
    let llama3 = Rope::new(500000.0).with_scaling(wegeft::rope::RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    for rope in [Rope::new(100000.0), llama3, Rope::new(100000.0)] {
        for inverse in [false, true] {
            let mut want = q.clone();
            Cpu.rope(&mut want, heads, hd, &pos, &rope, inverse).unwrap();
            let mut qd = up(&g, &q);
            g.rope(&mut qd, heads, hd, &pos, &rope, inverse).unwrap();
            close(&format!("rope {rope:?} inverse {inverse}"), &down(&g, &qd), &want, 1e-6);
        }
    }

    // swiglu forward / backward.
    let n = rows * dim;
    let (ga, u, dh) = (rv(7, n, 6.0), rv(8, n, 2.0), rv(9, n, 1.0));
    let mut h = vec![0.0f32; n];
    Cpu.swiglu_forward(&ga, &u, &mut h).unwrap();
    let (gad, ud) = (up(&g, &ga), up(&g, &u));
    let mut hd_ = g.zeros(n).unwrap();
    g.swiglu_forward(&gad, &ud, &mut hd_).unwrap();
    close("swiglu h", &down(&g, &hd_), &h, 1e-6);
    let (mut dga, mut du) = (vec![0.0f32; n], vec![0.0f32; n]);
    Cpu.swiglu_backward(&ga, &u, &dh, &mut dga, &mut du).unwrap();
    let (mut dgad, mut dud) = (g.zeros(n).unwrap(), g.zeros(n).unwrap());
    g.swiglu_backward(&gad, &ud, &up(&g, &dh), &mut dgad, &mut dud).unwrap();
    close("swiglu dgate", &down(&g, &dgad), &dga, 1e-6);
    close("swiglu dup", &down(&g, &dud), &du, 1e-6);

    // add, copies, fill.
    let mut yd = up(&g, &ga);
    g.add_assign(&mut yd, &ud).unwrap();
    let sum: Vec<f32> = ga.iter().zip(&u).map(|(a, b)| a + b).collect();
    assert_eq!(down(&g, &yd), sum, "add_assign");
    let mut so = g.output(n).unwrap();
    g.add(&gad, &ud, &mut so).unwrap();
    assert_eq!(down(&g, &so), sum, "add");
    assert!(g.add(&gad, &up(&g, &u[1..]), &mut so).is_err(), "add: lengths");
    let mut dst = g.zeros(n).unwrap();
    g.copy_range(&ud, 10, 100, &mut dst, 500).unwrap();
    let got = down(&g, &dst);
    assert_eq!(&got[500..600], &u[10..110]);
    assert!(got[..500].iter().chain(&got[600..]).all(|&v| v == 0.0));
    assert!(g.copy_range(&ud, n - 5, 10, &mut dst, 0).is_err(), "overrun");
    g.fill_zero(&mut dst).unwrap();
    assert!(down(&g, &dst).iter().all(|&v| v == 0.0));

    // AdamW, two steps with weight decay: the CPU optimiser's exact arithmetic.
    let p0 = rv(10, 1000, 1.0);
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; 1000], vec![0.0f32; 1000]);
    let (mut pd, mut md, mut vd) = (up(&g, &p0), g.zeros(1000).unwrap(), g.zeros(1000).unwrap());
    for step in 1..=2 {
        let gr = rv(10 + step, 1000, 0.1);
        let hp = AdamHyper { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step };
        Cpu.adamw_step(&mut p, &gr, &mut m, &mut v, hp).unwrap();
        g.adamw_step(&mut pd, &up(&g, &gr), &mut md, &mut vd, hp).unwrap();
    }
    close("adamw p", &down(&g, &pd), &p, 1e-6);
    close("adamw m", &down(&g, &md), &m, 1e-6);
    close("adamw v", &down(&g, &vd), &v, 1e-6);

    // SwiGLU on gate and up stashed in bf16 (bf16 weights): the CPU op on the rounded values.
    let (gas, uds) = (gb.stash(up(&gb, &ga)).unwrap(), gb.stash(up(&gb, &u)).unwrap());
    assert_eq!((gas.dtype(), uds.dtype()), (DType::BF16, DType::BF16), "stash rounds to bf16");
    assert_eq!(gb.download(&gas).unwrap(), bf(&ga), "stash rounds to nearest even");
    Cpu.swiglu_forward(&bf(&ga), &bf(&u), &mut h).unwrap();
    let mut hs = gb.zeros(n).unwrap();
    gb.swiglu_forward(&gas, &uds, &mut hs).unwrap();
    close("swiglu h (stashed)", &gb.download(&hs).unwrap(), &h, 1e-6);
    Cpu.swiglu_backward(&bf(&ga), &bf(&u), &dh, &mut dga, &mut du).unwrap();
    let (mut dgs, mut dus) = (gb.zeros(n).unwrap(), gb.zeros(n).unwrap());
    gb.swiglu_backward(&gas, &uds, &gb.upload(&dh).unwrap(), &mut dgs, &mut dus).unwrap();
    close("swiglu dgate (stashed)", &gb.download(&dgs).unwrap(), &dga, 1e-6);
    close("swiglu dup (stashed)", &gb.download(&dus).unwrap(), &du, 1e-6);
    assert!(gb.swiglu_forward(&gas, &gb.upload(&u).unwrap(), &mut hs).is_err(), "gate and up of different dtypes");
    // Into an operand, from f32 and from stashed gate and up: the f32 h rounded once.
    let mut ho = gb.operand(n).unwrap();
    gb.swiglu_forward(&gas, &uds, &mut ho).unwrap();
    assert_eq!(gb.download(&ho).unwrap(), bf(&gb.download(&hs).unwrap()), "swiglu stashed -> operand");
    let mut hf = gb.output(n).unwrap();
    gb.swiglu_forward(&gb.upload(&ga).unwrap(), &gb.upload(&u).unwrap(), &mut hf).unwrap();
    gb.swiglu_forward(&gb.upload(&ga).unwrap(), &gb.upload(&u).unwrap(), &mut ho).unwrap();
    assert_eq!(gb.download(&ho).unwrap(), bf(&gb.download(&hf).unwrap()), "swiglu f32 -> operand");
    assert!(g.stash(up(&g, &ga)).unwrap().dtype() == DType::F32, "f32 weights: the stash keeps f32");
    // Gradients into operands from stashed gate and up: the f32 gradients rounded once.
    let (mut dgo, mut duo) = (gb.operand(n).unwrap(), gb.operand(n).unwrap());
    gb.swiglu_backward(&gas, &uds, &gb.upload(&dh).unwrap(), &mut dgo, &mut duo).unwrap();
    assert_eq!(gb.download(&dgo).unwrap(), bf(&gb.download(&dgs).unwrap()), "swiglu dgate into an operand");
    assert_eq!(gb.download(&duo).unwrap(), bf(&gb.download(&dus).unwrap()), "swiglu dup into an operand");
    let gaf = gb.upload(&ga).unwrap();
    assert!(gb.swiglu_backward(&gaf, &gb.upload(&u).unwrap(), &gb.upload(&dh).unwrap(), &mut dgo, &mut duo).is_err(), "bf16 gradients need stashed gate and up");

    // Bad input is an error, not a panic.
    assert!(g.rmsnorm_forward(&xd, &wd, rows + 1, dim, 1e-5, &mut yd, &mut rd).is_err());
    assert!(g.swiglu_forward(&gad, &up(&g, &u[1..]), &mut hd_).is_err());
}

#[test]
fn attention_matches_cpu() {
    // bf16 weights: attention runs the bf16 tensor-core kernels on rounded activations.
    for wdt in [DType::BF16, DType::F32] {
        let g = gpu_or_skip!(wdt);
        let (tf, tb) = if wdt == DType::F32 { (2e-6, 1e-5) } else { (2e-2, 3e-2) };
        attention_cases(&g, wdt, tf, tb);
    }
    let g = gpu_or_skip!(DType::F32);
    attention_decode_case(&g);
}

fn attention_cases(g: &Gpu, wdt: DType, tf: f64, tb: f64) {
    for (b, s, h, kvh, hd, w) in [
        (2usize, 37usize, 6usize, 2usize, 64usize, None),
        (1, 130, 4, 4, 40, None),
        (3, 1, 9, 3, 64, None),
        (2, 200, 9, 3, 64, None),
        // Sliding windows: shorter than a key tile, across tiles, on the plain kernels.
        (2, 200, 9, 3, 64, Some(5)),
        (1, 190, 4, 2, 64, Some(70)),
        (1, 130, 4, 4, 40, Some(33)),
    ] {
        let shape = AttnShape::new(b, s, h, kvh, hd).unwrap().with_window(w).unwrap();
        let (t, qw, kw) = (b * s, h * hd, kvh * hd);
        let (q, k, v, dout) = (rv(20, t * qw, 1.5), rv(21, t * kw, 1.5), rv(22, t * kw, 1.0), rv(23, t * qw, 1.0));
        let (mut out, mut lse) = (vec![0.0f32; t * qw], vec![0.0f32; t * h]);
        Cpu.attention_forward(shape, &q, &k, &v, &mut out, &mut lse).unwrap();
        let (qd, kd, vd) = (up(g, &q), up(g, &k), up(g, &v));
        let (mut od, mut ld) = (g.zeros(t * qw).unwrap(), g.zeros(t * h).unwrap());
        g.attention_forward(shape, &qd, &kd, &vd, &mut od, &mut ld).unwrap();
        let tag = format!("{wdt:?} B{b} S{s} H{h}/{kvh} hd{hd} window {w:?}");
        close(&format!("attention out {tag}"), &down(g, &od), &out, tf);
        close(&format!("attention lse {tag}"), &down(g, &ld), &lse, tf);
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; t * qw], vec![0.0f32; t * kw], vec![0.0f32; t * kw]);
        Cpu.attention_backward(shape, &q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv).unwrap();
        let (mut dqd, mut dkd, mut dvd) = (g.zeros(t * qw).unwrap(), g.zeros(t * kw).unwrap(), g.zeros(t * kw).unwrap());
        g.attention_backward(shape, &qd, &kd, &vd, &od, &ld, &up(g, &dout), &mut dqd, &mut dkd, &mut dvd).unwrap();
        // S = 1: dq and dk are exactly zero, the checks are against noise.
        let (fq, fk) = common::attention_grad_floors(hd, &q, &k, &v, &dout);
        close_floor(&format!("attention dq {tag}"), &down(g, &dqd), &dq, tb, fq);
        close_floor(&format!("attention dk {tag}"), &down(g, &dkd), &dk, tb, fk);
        close(&format!("attention dv {tag}"), &down(g, &dvd), &dv, tb);
        // Stashed q, k, v, out (bf16 with bf16 weights): the kernels read exactly what they
        // rounded to themselves before, so the gradients are the same bits.
        let st = |b: &wegeft::cuda::GpuBuf| g.stash(up(g, &down(g, b))).unwrap();
        let (qs, ks, vs, os) = (st(&qd), st(&kd), st(&vd), st(&od));
        assert_eq!(qs.dtype(), if wdt == DType::BF16 { DType::BF16 } else { DType::F32 }, "stash dtype {tag}");
        let (mut dqs, mut dks, mut dvs) = (g.zeros(t * qw).unwrap(), g.zeros(t * kw).unwrap(), g.zeros(t * kw).unwrap());
        g.attention_backward(shape, &qs, &ks, &vs, &os, &ld, &up(g, &dout), &mut dqs, &mut dks, &mut dvs).unwrap();
        assert_eq!(down(g, &dqs), down(g, &dqd), "attention dq from stashed inputs {tag}");
        assert_eq!(down(g, &dks), down(g, &dkd), "attention dk from stashed inputs {tag}");
        assert_eq!(down(g, &dvs), down(g, &dvd), "attention dv from stashed inputs {tag}");
        if wdt == DType::BF16 {
            assert!(g.attention_forward(shape, &qs, &kd, &vd, &mut od, &mut ld).is_err(), "the forward takes no stashed input");
        }
        // The output into a product operand: the kernels' own bf16 (f32 weights: f32) output.
        let (mut oo, mut lo) = (g.operand(t * qw).unwrap(), g.output(t * h).unwrap());
        g.attention_forward(shape, &qd, &kd, &vd, &mut oo, &mut lo).unwrap();
        assert_eq!(down(g, &oo), down(g, &od), "attention out into an operand {tag}");
        assert_eq!(down(g, &lo), down(g, &ld), "attention lse with an operand out {tag}");
        // Gradients into operands, from an operand dout, then rope on an operand: the f32
        // path's values rounded once (f32 weights: the same f32 values).
        let r1 = |v: Vec<f32>| if wdt == DType::BF16 { bf(&v) } else { v };
        let dout_o = g.operand_copy(&up(g, &dout)).unwrap();
        let (mut dqo, mut dko, mut dvo) = (g.operand(t * qw).unwrap(), g.operand(t * kw).unwrap(), g.operand(t * kw).unwrap());
        g.attention_backward(shape, &qd, &kd, &vd, &od, &ld, &dout_o, &mut dqo, &mut dko, &mut dvo).unwrap();
        assert_eq!(down(g, &dqo), r1(down(g, &dqd)), "attention dq into an operand {tag}");
        assert_eq!(down(g, &dko), r1(down(g, &dkd)), "attention dk into an operand {tag}");
        assert_eq!(down(g, &dvo), r1(down(g, &dvd)), "attention dv into an operand {tag}");
        let pos: Vec<u32> = (0..t as u32).map(|i| i % s as u32).collect();
        g.rope(&mut dqo, h, hd, &pos, &Rope::new(10000.0), true).unwrap();
        g.rope(&mut dqd, h, hd, &pos, &Rope::new(10000.0), true).unwrap();
        assert_eq!(down(g, &dqo), r1(down(g, &dqd)), "rope on an operand {tag}");
    }
}

fn attention_decode_case(g: &Gpu) {
    // decode: one query per sequence against caches of capacity 50, 23 positions filled; all
    // of them, or the last 7 (a sliding window).
    let (b, h, kvh, hd, cap, len) = (3usize, 6usize, 2usize, 64usize, 50usize, 23usize);
    let (q, kc, vc) = (rv(30, b * h * hd, 1.5), rv(31, b * cap * kvh * hd, 1.5), rv(32, b * cap * kvh * hd, 1.0));
    for window in [None, Some(7)] {
        let mut out = vec![0.0f32; b * h * hd];
        Cpu.attention_decode(&q, &kc, &vc, b, h, kvh, hd, cap, len, window, &mut out).unwrap();
        let mut od = g.zeros(b * h * hd).unwrap();
        g.attention_decode(&up(g, &q), &up(g, &kc), &up(g, &vc), b, h, kvh, hd, cap, len, window, &mut od).unwrap();
        close(&format!("attention decode, window {window:?}"), &down(g, &od), &out, 2e-6);
    }
    let mut od = g.zeros(b * h * hd).unwrap();
    assert!(g.attention_decode(&up(g, &q), &up(g, &kc), &up(g, &vc), b, h, kvh, hd, cap, cap + 1, None, &mut od).is_err());
}

/// Frozen and WeGeFT layers, the logits and the chunked LM head loss, on f32 and bf16 weights.
#[test]
fn products_match_cpu() {
    for wdt in [DType::F32, DType::BF16] {
        let g = gpu_or_skip!(wdt);
        let tol = gemm_tol(&g);
        let (t, din, dout, r) = (77usize, 192usize, 136usize, 8usize);
        let (x, w0, gr) = (rv(40, t * din, 1.0), rv(41, dout * din, 0.1), rv(42, t * dout, 1.0));
        let w = if wdt == DType::BF16 { bf(&w0) } else { w0.clone() };
        let wd = g.upload_weight(w0.clone()).unwrap();
        let (xd, gd) = (up(&g, &x), up(&g, &gr));
        // frozen
        let mut y = vec![0.0f32; t * dout];
        Cpu.linear_forward(&x, &w, t, din, dout, &mut y).unwrap();
        let mut yd = g.zeros(t * dout).unwrap();
        g.linear_forward(&xd, &wd, t, din, dout, &mut yd).unwrap();
        close(&format!("linear y {wdt:?}"), &down(&g, &yd), &y, tol);
        for acc in [false, true] {
            let mut dx = rv(43, t * din, 1.0);
            let mut dxd = up(&g, &dx);
            Cpu.linear_backward(&gr, &w, t, din, dout, &mut dx, acc).unwrap();
            g.linear_backward(&gd, &wd, t, din, dout, &mut dxd, acc).unwrap();
            close(&format!("linear dx {wdt:?} acc={acc}"), &down(&g, &dxd), &dx, tol);
        }
        // WeGeFT
        let s = LayerShape::new(t, din, dout, r).unwrap();
        let (phi, psi) = (rv(44, din * r, 0.3), rv(45, r * din, 0.3));
        let (phid, psid) = (up(&g, &phi), up(&g, &psi));
        let saved = Cpu.wegeft_forward(s, &x, &w, &phi, &psi, 0.5, None, &mut y).unwrap();
        let sd = g.wegeft_forward(s, &xd, &wd, &phid, &psid, 0.5, None, &mut yd).unwrap();
        close(&format!("wegeft y {wdt:?}"), &down(&g, &yd), &y, tol);
        // x as a product operand (rounded once, as the layers round it): the same bits.
        let mut xo = g.operand(t * din).unwrap();
        let mut ro = g.output(t).unwrap();
        g.rmsnorm_forward(&xd, &up(&g, &vec![1.0; din]), t, din, 0.0, &mut xo, &mut ro).unwrap();
        let mut xf = g.output(t * din).unwrap();
        g.rmsnorm_forward(&xd, &up(&g, &vec![1.0; din]), t, din, 0.0, &mut xf, &mut ro).unwrap();
        let (mut y1, mut y2) = (g.output(t * dout).unwrap(), g.output(t * dout).unwrap());
        g.linear_forward(&xo, &wd, t, din, dout, &mut y1).unwrap();
        g.linear_forward(&xf, &wd, t, din, dout, &mut y2).unwrap();
        assert_eq!(down(&g, &y1), down(&g, &y2), "linear y from an operand {wdt:?}");
        g.wegeft_forward(s, &xo, &wd, &phid, &psid, 0.5, None, &mut y1).unwrap();
        g.wegeft_forward(s, &xf, &wd, &phid, &psid, 0.5, None, &mut y2).unwrap();
        assert_eq!(down(&g, &y1), down(&g, &y2), "wegeft y from an operand {wdt:?}");
        // phi, psi as operand copies (rounded once, as every call rounds them): the same bits.
        let (phic, psic) = (g.operand_copy(&phid).unwrap(), g.operand_copy(&psid).unwrap());
        let sc = g.wegeft_forward(s, &xd, &wd, &phic, &psic, 0.5, None, &mut y1).unwrap();
        let sf = g.wegeft_forward(s, &xd, &wd, &phid, &psid, 0.5, None, &mut y2).unwrap();
        assert_eq!(down(&g, &y1), down(&g, &y2), "wegeft y from operand copies of phi, psi {wdt:?}");
        let grads = |phi: &wegeft::cuda::GpuBuf, psi: &wegeft::cuda::GpuBuf, sv: &wegeft::cuda::GpuSaved| {
            let (mut dx, mut dphi, mut dpsi) = (g.output(t * din).unwrap(), g.zeros(din * r).unwrap(), g.zeros(r * din).unwrap());
            g.wegeft_backward(s, &xd, &wd, phi, psi, 0.5, None, sv, &gd, Some((&mut dx, false)), &mut dphi, &mut dpsi).unwrap();
            (down(&g, &dx), down(&g, &dphi), down(&g, &dpsi))
        };
        assert_eq!(grads(&phic, &psic, &sc), grads(&phid, &psid, &sf), "wegeft gradients from operand copies {wdt:?}");
        // G as an operand and dx into an operand (overwritten): the f32 path's values.
        let r1 = |v: Vec<f32>| if wdt == DType::BF16 { bf(&v) } else { v };
        let go = g.operand_copy(&gd).unwrap();
        let (mut dxo, mut dphio, mut dpsio) = (g.operand(t * din).unwrap(), g.zeros(din * r).unwrap(), g.zeros(r * din).unwrap());
        g.wegeft_backward(s, &xd, &wd, &phid, &psid, 0.5, None, &sf, &go, Some((&mut dxo, false)), &mut dphio, &mut dpsio).unwrap();
        let (dxf, dphif, dpsif) = grads(&phid, &psid, &sf);
        assert_eq!(down(&g, &dxo), r1(dxf), "wegeft dx into an operand {wdt:?}");
        assert_eq!((down(&g, &dphio), down(&g, &dpsio)), (dphif, dpsif), "wegeft dphi, dpsi from an operand G {wdt:?}");
        assert!(
            g.wegeft_backward(s, &xd, &wd, &phid, &psid, 0.5, None, &sf, &go, Some((&mut dxo, true)), &mut dphio, &mut dpsio).is_err()
                || wdt == DType::F32,
            "an operand dx is not accumulated into"
        );
        let mut dlo = g.operand(t * din).unwrap();
        g.linear_backward(&go, &wd, t, din, dout, &mut dlo, false).unwrap();
        let mut dl = vec![0.0f32; t * din];
        Cpu.linear_backward(&gr, &w, t, din, dout, &mut dl, false).unwrap();
        close(&format!("linear dx into an operand from an operand G {wdt:?}"), &down(&g, &dlo), &dl, tol);
        for acc in [false, true] {
            let mut dx = rv(46, t * din, 1.0);
            let (mut dphi, mut dpsi) = (rv(47, din * r, 0.1), rv(48, r * din, 0.1));
            let (mut dxd, mut dphid, mut dpsid) = (up(&g, &dx), up(&g, &dphi), up(&g, &dpsi));
            Cpu.wegeft_backward(s, &x, &w, &phi, &psi, 0.5, None, &saved, &gr, Some((&mut dx, acc)), &mut dphi, &mut dpsi)
                .unwrap();
            g.wegeft_backward(s, &xd, &wd, &phid, &psid, 0.5, None, &sd, &gd, Some((&mut dxd, acc)), &mut dphid, &mut dpsid)
                .unwrap();
            close(&format!("wegeft dx {wdt:?} acc={acc}"), &down(&g, &dxd), &dx, tol);
            close(&format!("wegeft dphi {wdt:?} acc={acc}"), &down(&g, &dphid), &dphi, tol);
            close(&format!("wegeft dpsi {wdt:?} acc={acc}"), &down(&g, &dpsid), &dpsi, tol);
            // A stashed x gives the same bits: the layer rounds x to the weights' dtype anyway.
            let xs = g.stash(up(&g, &x)).unwrap();
            let (mut dxs, mut dphis, mut dpsis) = (up(&g, &rv(46, t * din, 1.0)), up(&g, &rv(47, din * r, 0.1)), up(&g, &rv(48, r * din, 0.1)));
            g.wegeft_backward(s, &xs, &wd, &phid, &psid, 0.5, None, &sd, &gd, Some((&mut dxs, acc)), &mut dphis, &mut dpsis)
                .unwrap();
            assert_eq!(down(&g, &dxs), down(&g, &dxd), "wegeft dx from a stashed x {wdt:?}");
            assert_eq!(down(&g, &dphis), down(&g, &dphid), "wegeft dphi from a stashed x {wdt:?}");
            assert_eq!(down(&g, &dpsis), down(&g, &dpsid), "wegeft dpsi from a stashed x {wdt:?}");
        }
        // Many adapters in one batch (the Gpu override: multi_edit_f32 + the frozen product).
        let na = 3usize;
        let (phis, psis) = (rv(53, na * din * r, 0.3), rv(54, na * r * din, 0.3));
        let scales = [0.5f32, 1.0, 2.0];
        let which: Vec<i32> = (0..t).map(|i| (i % 4) as i32 - 1).collect();
        Cpu.wegeft_multi_forward(t, din, dout, r, &x, &w, &phis, &psis, &scales, &which, &mut y).unwrap();
        g.wegeft_multi_forward(t, din, dout, r, &xd, &wd, &up(&g, &phis), &up(&g, &psis), &scales, &which, &mut yd)
            .unwrap();
        close(&format!("wegeft_multi y {wdt:?}"), &down(&g, &yd), &y, tol);
        let mut bad = which.clone();
        bad[5] = na as i32;
        assert!(
            g.wegeft_multi_forward(t, din, dout, r, &xd, &wd, &up(&g, &phis), &up(&g, &psis), &scales, &bad, &mut yd)
                .is_err(),
            "adapter index outside the stack"
        );
        // logits and the LM head over more than one chunk of labelled rows.
        let (rows, dim, vocab) = (wegeft::cuda::backend::LM_CHUNK * 2 + 37, 64usize, 301usize);
        let h = rv(50, rows * dim, 1.0);
        let e0 = rv(51, vocab * dim, 0.5);
        let e = if wdt == DType::BF16 { bf(&e0) } else { e0.clone() };
        let ed = g.upload_weight(e0).unwrap();
        let hd = up(&g, &h);
        let lrows = 45;
        let mut z = vec![0.0f32; lrows * vocab];
        Cpu.logits(&h[..lrows * dim].to_vec(), &e, lrows, dim, vocab, &mut z).unwrap();
        let mut zd = g.zeros(lrows * vocab).unwrap();
        g.logits(&up(&g, &h[..lrows * dim]), &ed, lrows, dim, vocab, &mut zd).unwrap();
        close(&format!("logits {wdt:?}"), &down(&g, &zd), &z, tol);
        let labels: Vec<i32> = (0..rows).map(|t| if t % 5 == 2 { -1 } else { ((t * 13) % vocab) as i32 }).collect();
        let mut dh = vec![0.0f32; rows * dim];
        let loss = Cpu.lm_head_loss(&h, &e, dim, vocab, &labels, Some((&mut dh, 0.01))).unwrap();
        let mut dhd = up(&g, &rv(52, rows * dim, 1.0)); // overwritten, unlabelled rows zeroed
        let lossd = g.lm_head_loss(&hd, &ed, dim, vocab, &labels, Some((&mut dhd, 0.01))).unwrap();
        let ltol = if wdt == DType::F32 { 1e-5 } else { 5e-3 };
        assert!(((lossd - loss) / loss).abs() < ltol, "lm_head loss {wdt:?}: {lossd} vs {loss}");
        close(&format!("lm_head dh {wdt:?}"), &down(&g, &dhd), &dh, if wdt == DType::F32 { 1e-5 } else { 2e-2 });
        let lossn = g.lm_head_loss(&hd, &ed, dim, vocab, &labels, None).unwrap();
        assert_eq!(lossn, lossd, "the loss does not depend on whether the gradient is asked for");
        let mut bad = labels.clone();
        bad[3] = vocab as i32;
        assert!(g.lm_head_loss(&hd, &ed, dim, vocab, &bad, None).is_err(), "label outside the vocabulary");
    }
}

/// The WeGeFT layer on the composed path (cuBLASLt + rank-r kernels) agrees with the CPU too,
/// so a failure of the default (fused) path is told apart from one of the model code.
#[test]
fn composed_path_matches_cpu() {
    let g = gpu_or_skip!(DType::BF16).with_path(wegeft::cuda::Path::Composed);
    let (t, din, dout, r) = (64usize, 576usize, 192usize, 8usize);
    let (x, w0, gr) = (rv(60, t * din, 1.0), rv(61, dout * din, 0.05), rv(62, t * dout, 1.0));
    let w = bf(&w0);
    let s = LayerShape::new(t, din, dout, r).unwrap();
    let (phi, psi) = (rv(63, din * r, 0.3), rv(64, r * din, 0.3));
    let mut y = vec![0.0f32; t * dout];
    let saved = Cpu.wegeft_forward(s, &x, &w, &phi, &psi, 0.5, None, &mut y).unwrap();
    let (xd, wd, phid, psid) = (up(&g, &x), g.upload_weight(w0).unwrap(), up(&g, &phi), up(&g, &psi));
    let mut yd = g.zeros(t * dout).unwrap();
    let sd = g.wegeft_forward(s, &xd, &wd, &phid, &psid, 0.5, None, &mut yd).unwrap();
    close("composed wegeft y", &down(&g, &yd), &y, 1.5e-2);
    let (mut dx, mut dphi, mut dpsi) = (vec![0.0f32; t * din], vec![0.0f32; din * r], vec![0.0f32; r * din]);
    Cpu.wegeft_backward(s, &x, &w, &phi, &psi, 0.5, None, &saved, &gr, Some((&mut dx, false)), &mut dphi, &mut dpsi).unwrap();
    let (mut dxd, mut dphid, mut dpsid) = (g.zeros(t * din).unwrap(), g.zeros(din * r).unwrap(), g.zeros(r * din).unwrap());
    g.wegeft_backward(s, &xd, &wd, &phid, &psid, 0.5, None, &sd, &up(&g, &gr), Some((&mut dxd, false)), &mut dphid, &mut dpsid)
        .unwrap();
    close("composed wegeft dx", &down(&g, &dxd), &dx, 1.5e-2);
    close("composed wegeft dphi", &down(&g, &dphid), &dphi, 1.5e-2);
    close("composed wegeft dpsi", &down(&g, &dpsid), &dpsi, 1.5e-2);
}

// ---- the whole model -----------------------------------------------------------------------

#[test]
fn smollm2_logits_match_cpu() {
    for wdt in [DType::F32, DType::BF16] {
        let g = gpu_or_skip!(wdt);
        let d = smollm2(30);
        let mut w = HostWeights::random(&d, 7, false).unwrap();
        if wdt == DType::BF16 {
            w.round_to_bf16();
        }
        let ad = adapter(&d, 100);
        let ids = prompt(&d, 24, 1);
        let cpu = Llama::new(&Cpu, &w).unwrap();
        let (want, wloss) = cpu.score(&Cpu, Some(&ad.upload(&Cpu, &d).unwrap()), &ids).unwrap();
        drop(cpu);
        let dev = Llama::from_host(&g, w).unwrap();
        let (got, gloss) = dev.score(&g, Some(&ad.upload(&g, &d).unwrap()), &ids).unwrap();
        let tol = if wdt == DType::F32 { 1e-3 } else { 3e-2 };
        close(&format!("SmolLM2-shaped logits {wdt:?}"), &got, &want, tol);
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        same_argmax(&format!("argmax {wdt:?}"), &got, &want, d.vocab, 2.0 * tol as f32 * scale);
        let (gl, wl) = (gloss.unwrap(), wloss.unwrap());
        assert!(((gl - wl) / wl).abs() < tol as f32, "loss {wdt:?}: {gl} vs {wl}");
    }
}

#[test]
fn greedy_decoding_matches_cpu() {
    let g = gpu_or_skip!(DType::F32);
    let d = smollm2(4);
    let w = HostWeights::random(&d, 9, false).unwrap();
    let ad = adapter(&d, 200);
    let prompts = vec![prompt(&d, 11, 2), prompt(&d, 11, 3)];
    let cpu = Llama::new(&Cpu, &w).unwrap();
    let want = cpu.generate_batch(&Cpu, Some(&ad.upload(&Cpu, &d).unwrap()), &prompts, 6, &[]).unwrap();
    let dev = Llama::from_host(&g, w).unwrap();
    let got = dev.generate_batch(&g, Some(&ad.upload(&g, &d).unwrap()), &prompts, 6, &[]).unwrap();
    assert_eq!(got, want, "greedy tokens, f32 weights");
}

#[test]
fn smollm2_training_losses_match_cpu() {
    let g = gpu_or_skip!(DType::BF16);
    let d = smollm2(30);
    let bts = batches(&d, 3, 2, 40);
    let ad = adapter(&d, 300);
    let mut w = HostWeights::random(&d, 11, false).unwrap();
    w.round_to_bf16();
    let cpu = Llama::new(&Cpu, &w).unwrap();
    let (want, want_ad) = train_losses(&Cpu, &cpu, &ad, &bts);
    drop(cpu);
    let dev = Llama::from_host(&g, w).unwrap();
    let (got, got_ad) = train_losses(&g, &dev, &ad, &bts);
    println!("losses: cuda bf16 {got:?}, cpu {want:?}");
    // The adapters moved the same way (AdamW normalises the step, so compare the updates).
    assert_run_follows("cuda bf16 vs cpu", &ad, (&got, &got_ad), (&want, &want_ad), 2e-2, 0.8);
}

/// The training recipe on the device (a cosine schedule with warm-up, clipping that catches
/// every update, two batches per update: the trainer's host-side arithmetic over device
/// gradients) follows the CPU run: losses and gradient norms within 2e-2, update cosines
/// above 0.8. Tolerances checked on the precision model (tests/cuda_precision.rs).
#[test]
fn recipe_training_matches_cpu() {
    let g = gpu_or_skip!(DType::BF16);
    let case = smollm2::recipe_case();
    let dev = Llama::from_host(&g, case.weights.clone()).unwrap();
    let got = smollm2::recipe_run(&g, &dev, &case.adapter, &case.batches, case.bound);
    case.assert_follows("cuda bf16 vs cpu, recipe", &got, 2e-2, 2e-2, 0.8);
}

#[test]
fn qwen_extras_match_cpu() {
    for wdt in [DType::F32, DType::BF16] {
        let g = gpu_or_skip!(wdt);
        let mut w = smollm2::qwen_shaped(21);
        if wdt == DType::BF16 {
            w.round_to_bf16();
        }
        let d = w.dims.clone();
        let ad = adapter(&d, 500);
        let ids = prompt(&d, 24, 4);
        let cpu = Llama::new(&Cpu, &w).unwrap();
        let (want, _) = cpu.score(&Cpu, Some(&ad.upload(&Cpu, &d).unwrap()), &ids).unwrap();
        let bts = batches(&d, 3, 2, 40);
        let (want_l, want_ad) = train_losses(&Cpu, &cpu, &ad, &bts);
        drop(cpu);
        let dev = Llama::from_host(&g, w).unwrap();
        let (got, _) = dev.score(&g, Some(&ad.upload(&g, &d).unwrap()), &ids).unwrap();
        let tol = if wdt == DType::F32 { 1e-3 } else { 3e-2 };
        close(&format!("Qwen-shaped logits {wdt:?}"), &got, &want, tol);
        let (got_l, got_ad) = train_losses(&g, &dev, &ad, &bts);
        println!("Qwen-shaped losses {wdt:?}: cuda {got_l:?}, cpu {want_l:?}");
        assert_run_follows(&format!("Qwen-shaped {wdt:?}"), &ad, (&got_l, &got_ad), (&want_l, &want_ad), 2e-2, 0.8);
    }
}

#[test]
fn two_runs_are_bitwise_equal() {
    let g = gpu_or_skip!(DType::BF16);
    let d = smollm2(4);
    let w = HostWeights::random(&d, 13, false).unwrap();
    let bts = batches(&d, 2, 3, 33);
    let ad = adapter(&d, 400);
    let dev = Llama::from_host(&g, w).unwrap();
    let (l1, a1) = train_losses(&g, &dev, &ad, &bts);
    let (l2, a2) = train_losses(&g, &dev, &ad, &bts);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    assert_eq!(bits(&l1), bits(&l2), "losses");
    for ((_, p1, s1), (_, p2, s2)) in a1.pairs.iter().zip(&a2.pairs) {
        assert_eq!(bits(p1), bits(p2), "phi");
        assert_eq!(bits(s1), bits(s2), "psi");
    }
    assert!(l1.iter().all(|l| l.is_finite() && *l > 0.0));
}
