//! CPU Llama ops against float64 references written here, and every backward against central
//! finite differences of the float64 reference forward.

mod common;

use common::{assert_close, rand_vec};
use wegeft::cpu::ops::*;
use wegeft::Error;

fn f32v(seed: u64, n: usize, scale: f64) -> Vec<f32> {
    rand_vec(seed, n).into_iter().map(|v| (v * scale) as f32).collect()
}
fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Central finite-difference gradient of `f` at `x` (f64, step `h`).
fn fd_grad(x: &[f64], h: f64, f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = x[i];
            x[i] = x0 + h;
            let fp = f(&x);
            x[i] = x0 - h;
            let fm = f(&x);
            x[i] = x0;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

fn dotf(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ----------------------------------------------------------------------------- embedding

#[test]
fn embedding_lookup_and_bounds() {
    let (vocab, d) = (7, 3);
    let table = f32v(1, vocab * d, 1.0);
    let ids = [3u32, 0, 6, 3];
    let mut out = vec![0.0; ids.len() * d];
    embedding_forward(&ids, &table, vocab, d, &mut out).unwrap();
    for (t, &id) in ids.iter().enumerate() {
        assert_eq!(&out[t * d..(t + 1) * d], &table[id as usize * d..(id as usize + 1) * d]);
    }
    let err = embedding_forward(&[1, 7], &table, vocab, d, &mut out[..2 * d]).unwrap_err();
    assert!(matches!(err, Error::Invalid { arg: "ids", .. }), "{err}");
    assert!(embedding_forward(&ids, &table[1..], vocab, d, &mut out).is_err());
    assert!(embedding_forward(&ids, &table, vocab, d, &mut out[1..]).is_err());
}

// ----------------------------------------------------------------------------- rmsnorm

fn rmsnorm_ref(x: &[f64], w: &[f64], n: usize, d: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; n * d];
    for t in 0..n {
        let r = &x[t * d..(t + 1) * d];
        let ms = r.iter().map(|v| v * v).sum::<f64>() / d as f64;
        let rs = 1.0 / (ms + eps).sqrt();
        for j in 0..d {
            y[t * d + j] = r[j] * rs * w[j];
        }
    }
    y
}

#[test]
fn rmsnorm_forward_backward() {
    for &(n, d) in &[(3usize, 5usize), (4, 16), (1, 7)] {
        let eps = 1e-5;
        let x = f32v(10 + d as u64, n * d, 2.0);
        let w = f32v(20 + d as u64, d, 1.5);
        let g = f32v(30 + d as u64, n * d, 1.0);
        let mut y = vec![0.0; n * d];
        let mut rstd = vec![0.0; n];
        rmsnorm_forward(&x, &w, n, d, eps as f32, &mut y, &mut rstd).unwrap();
        let (x64, w64, g64) = (to64(&x), to64(&w), to64(&g));
        assert_close("rmsnorm y", &to64(&y), &rmsnorm_ref(&x64, &w64, n, d, eps), 1e-6);
        let mut dx = vec![0.0; n * d];
        rmsnorm_backward(&g, &x, &w, &rstd, n, d, &mut dx).unwrap();
        let want = fd_grad(&x64, 1e-6, &|xx| dotf(&rmsnorm_ref(xx, &w64, n, d, eps), &g64));
        assert_close("rmsnorm dx", &to64(&dx), &want, 1e-5);
    }
}

#[test]
fn rmsnorm_bad_shapes() {
    let (n, d) = (2, 4);
    let x = vec![1.0f32; n * d];
    let w = vec![1.0f32; d];
    let mut y = vec![0.0; n * d];
    let mut r = vec![0.0; n];
    assert!(matches!(rmsnorm_forward(&x, &w[..3], n, d, 1e-5, &mut y, &mut r), Err(Error::Len { arg: "weight", .. })));
    assert!(matches!(rmsnorm_forward(&x, &w, n, d, 1e-5, &mut y, &mut r[..1]), Err(Error::Len { arg: "rstd", .. })));
    assert!(matches!(rmsnorm_forward(&x[1..], &w, n, d, 1e-5, &mut y, &mut r), Err(Error::Layout { arg: "x", .. })));
    assert!(rmsnorm_forward(&x, &w, n, d, -1.0, &mut y, &mut r).is_err());
    assert!(rmsnorm_forward(&x, &w, n, 0, 1e-5, &mut y, &mut r).is_err());
    let mut dx = vec![0.0; n * d];
    assert!(rmsnorm_backward(&x, &x, &w, &r, n, d, &mut dx[1..]).is_err());
    assert!(rmsnorm_backward(&x[..4], &x, &w, &r, n, d, &mut dx).is_err());
}

// ----------------------------------------------------------------------------- rope

fn rope_ref(x: &[f64], pos: &[usize], heads: usize, hd: usize, theta: f64) -> Vec<f64> {
    let half = hd / 2;
    let mut y = x.to_vec();
    for (t, &p) in pos.iter().enumerate() {
        for h in 0..heads {
            let o = t * heads * hd + h * hd;
            for i in 0..half {
                let a = p as f64 * theta.powf(-(2.0 * i as f64) / hd as f64);
                let (c, s) = (a.cos(), a.sin());
                let (x1, x2) = (x[o + i], x[o + i + half]);
                y[o + i] = x1 * c - x2 * s;
                y[o + i + half] = x2 * c + x1 * s;
            }
        }
    }
    y
}

#[test]
fn rope_matches_formula_and_inverts() {
    let (heads, hd, theta) = (3usize, 8usize, 100000.0f32);
    let pos: Vec<usize> = vec![0, 1, 2, 7, 50, 99];
    let cache = RopeCache::new(hd, theta, 100).unwrap();
    let x = f32v(5, pos.len() * heads * hd, 1.0);
    let mut y = x.clone();
    rope_forward(&mut y, &pos, heads, &cache).unwrap();
    let want = rope_ref(&to64(&x), &pos, heads, hd, theta as f64);
    assert_close("rope y", &to64(&y), &want, 2e-5);
    // position 0 is the identity
    assert_eq!(&y[..heads * hd], &x[..heads * hd]);
    // backward = transpose: <R x, g> = <x, R^T g>
    let g = f32v(6, x.len(), 1.0);
    let mut rg = g.clone();
    rope_backward(&mut rg, &pos, heads, &cache).unwrap();
    let lhs = dotf(&to64(&y), &to64(&g));
    let rhs = dotf(&to64(&x), &to64(&rg));
    assert!((lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
    // and the inverse
    rope_backward(&mut y, &pos, heads, &cache).unwrap();
    assert_close("rope inverse", &to64(&y), &to64(&x), 1e-6);
}

#[test]
fn rope_angles_computed_in_f32_like_transformers() {
    // transformers: inv_freq = 1/(base ** (arange(0, dim, 2).float() / dim)) in f32,
    // freqs = pos.float() * inv_freq (f32), cos/sin in f32.
    let (hd, theta) = (64usize, 100000.0f32);
    let cache = RopeCache::new(hd, theta, 2048).unwrap();
    for &p in &[1usize, 17, 511, 2047] {
        for &i in &[0usize, 1, 13, 31] {
            let inv = 1.0f32 / theta.powf((2 * i) as f32 / hd as f32);
            let a = p as f32 * inv;
            assert_eq!(cache.get(p, i).unwrap(), (a.cos(), a.sin()));
        }
    }
}

#[test]
fn rope_bad_input() {
    let cache = RopeCache::new(4, 10000.0, 8).unwrap();
    let mut x = vec![0.0f32; 2 * 8];
    assert!(rope_forward(&mut x, &[0, 8], 2, &cache).is_err()); // position beyond table
    assert!(rope_forward(&mut x, &[0, 1, 2], 2, &cache).is_err()); // rows
    assert!(rope_forward(&mut x, &[0, 1], 3, &cache).is_err()); // width
    assert!(RopeCache::new(5, 10000.0, 8).is_err());
    assert!(RopeCache::new(4, -1.0, 8).is_err());
    assert!(RopeCache::new(0, 10000.0, 8).is_err());
}

// ----------------------------------------------------------------------------- attention

/// Naive causal GQA attention in f64 with explicit S x S scores (a key `w` or more positions
/// back masked like a future one when the shape has a window `w`). Returns (out, lse).
fn attn_ref(q: &[f64], k: &[f64], v: &[f64], s: AttnShape) -> (Vec<f64>, Vec<f64>) {
    let AttnShape { batch, seq, heads, kv_heads, head_dim: hd, .. } = s;
    let (qw, kw, grp) = (heads * hd, kv_heads * hd, heads / kv_heads);
    let mut out = vec![0.0; batch * seq * qw];
    let mut lse = vec![0.0; batch * seq * heads];
    let scale = 1.0 / (hd as f64).sqrt();
    for b in 0..batch {
        for h in 0..heads {
            let g = h / grp;
            let mut sc = vec![vec![f64::NEG_INFINITY; seq]; seq];
            for i in 0..seq {
                for j in 0..=i {
                    if s.window.is_some_and(|w| i - j >= w) {
                        continue;
                    }
                    let qi = &q[(b * seq + i) * qw + h * hd..][..hd];
                    let kj = &k[(b * seq + j) * kw + g * hd..][..hd];
                    sc[i][j] = dotf(qi, kj) * scale;
                }
                let m = sc[i].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc[i].iter().map(|x| (x - m).exp()).sum();
                lse[(b * seq + i) * heads + h] = m + z.ln();
                for j in 0..=i {
                    let p = (sc[i][j] - m).exp() / z;
                    for d in 0..hd {
                        out[(b * seq + i) * qw + h * hd + d] += p * v[(b * seq + j) * kw + g * hd + d];
                    }
                }
            }
        }
    }
    (out, lse)
}

fn attn_case(batch: usize, seq: usize, heads: usize, kv_heads: usize, hd: usize, seed: u64) {
    attn_case_windowed(batch, seq, heads, kv_heads, hd, None, seed)
}

fn attn_case_windowed(batch: usize, seq: usize, heads: usize, kv_heads: usize, hd: usize, window: Option<usize>, seed: u64) {
    let s = AttnShape::new(batch, seq, heads, kv_heads, hd).unwrap().with_window(window).unwrap();
    let n = batch * seq;
    let q = f32v(seed, n * heads * hd, 1.5);
    let k = f32v(seed + 1, n * kv_heads * hd, 1.5);
    let v = f32v(seed + 2, n * kv_heads * hd, 1.0);
    let g = f32v(seed + 3, n * heads * hd, 1.0);
    let mut out = vec![0.0; n * heads * hd];
    let mut lse = vec![0.0; n * heads];
    attention_forward(&q, &k, &v, s, &mut out, &mut lse).unwrap();
    let (q64, k64, v64, g64) = (to64(&q), to64(&k), to64(&v), to64(&g));
    let (want_out, want_lse) = attn_ref(&q64, &k64, &v64, s);
    assert_close("attn out", &to64(&out), &want_out, 1e-5);
    assert_close("attn lse", &to64(&lse), &want_lse, 1e-5);

    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    attention_backward(&g, &q, &k, &v, &out, &lse, s, &mut dq, &mut dk, &mut dv).unwrap();
    let h = 1e-6;
    let want_dq = fd_grad(&q64, h, &|x| dotf(&attn_ref(x, &k64, &v64, s).0, &g64));
    let want_dk = fd_grad(&k64, h, &|x| dotf(&attn_ref(&q64, x, &v64, s).0, &g64));
    let want_dv = fd_grad(&v64, h, &|x| dotf(&attn_ref(&q64, &k64, x, s).0, &g64));
    assert_close("attn dq", &to64(&dq), &want_dq, 2e-5);
    assert_close("attn dk", &to64(&dk), &want_dk, 2e-5);
    assert_close("attn dv", &to64(&dv), &want_dv, 2e-5);
}

#[test]
fn attention_gqa_6_2_odd_seq() {
    attn_case(2, 5, 6, 2, 4, 100);
}

#[test]
fn attention_gqa_9_3() {
    attn_case(1, 7, 9, 3, 8, 200);
}

#[test]
fn attention_mha_and_mqa() {
    attn_case(2, 3, 2, 2, 6, 300);
    attn_case(1, 4, 4, 1, 2, 400);
    attn_case(1, 1, 3, 1, 4, 500);
}

#[test]
fn attention_with_sliding_windows() {
    attn_case_windowed(2, 7, 6, 2, 4, Some(3), 600);
    attn_case_windowed(1, 5, 2, 1, 4, Some(1), 700);
    attn_case_windowed(1, 4, 2, 2, 4, Some(9), 800);
    // The window masks: a window of 2 differs from none past position 1.
    let s = AttnShape::new(1, 4, 2, 1, 4).unwrap();
    let q = f32v(1, 4 * 8, 1.5);
    let k = f32v(2, 4 * 4, 1.5);
    let v = f32v(3, 4 * 4, 1.0);
    let run = |s: AttnShape| {
        let (mut out, mut lse) = (vec![0.0; 4 * 8], vec![0.0; 4 * 2]);
        attention_forward(&q, &k, &v, s, &mut out, &mut lse).unwrap();
        out
    };
    let (a, b) = (run(s), run(s.with_window(Some(2)).unwrap()));
    assert_eq!(a[..16], b[..16]);
    assert_ne!(a[16..], b[16..]);
    assert!(s.with_window(Some(0)).is_err());
}

#[test]
fn attention_decode_matches_last_row() {
    decode_matches_last_row(None);
    decode_matches_last_row(Some(4));
    decode_matches_last_row(Some(1));
}

fn decode_matches_last_row(window: Option<usize>) {
    let (batch, seq, heads, kvh, hd) = (2usize, 6usize, 6usize, 2usize, 8usize);
    let s = AttnShape::new(batch, seq, heads, kvh, hd).unwrap().with_window(window).unwrap();
    let n = batch * seq;
    let q = f32v(7, n * heads * hd, 1.0);
    let k = f32v(8, n * kvh * hd, 1.0);
    let v = f32v(9, n * kvh * hd, 1.0);
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; n * heads];
    attention_forward(&q, &k, &v, s, &mut out, &mut lse).unwrap();
    let cap = 10;
    let kw = kvh * hd;
    let (mut kc, mut vc) = (vec![f32::NAN; batch * cap * kw], vec![f32::NAN; batch * cap * kw]);
    for j in 0..seq {
        let kj: Vec<f32> = (0..batch).flat_map(|b| k[(b * seq + j) * kw..][..kw].to_vec()).collect();
        let vj: Vec<f32> = (0..batch).flat_map(|b| v[(b * seq + j) * kw..][..kw].to_vec()).collect();
        kv_cache_store(&kj, &mut kc, batch, cap, kw, j).unwrap();
        kv_cache_store(&vj, &mut vc, batch, cap, kw, j).unwrap();
    }
    assert!(kv_cache_store(&k[..batch * kw], &mut kc, batch, cap, kw, cap).is_err());
    assert!(kv_cache_store(&k[..batch * kw - 1], &mut kc, batch, cap, kw, 0).is_err());
    let qw = heads * hd;
    for len in 1..=seq {
        let ql: Vec<f32> = (0..batch).flat_map(|b| q[(b * seq + len - 1) * qw..][..qw].to_vec()).collect();
        let mut o = vec![0.0; batch * qw];
        // With a window, positions before it hold NaN: they must not be read.
        let (mut kc, mut vc) = (kc.clone(), vc.clone());
        for b in 0..batch {
            for j in 0..s.first_key(len - 1) {
                kc[(b * cap + j) * kw..][..kw].fill(f32::NAN);
                vc[(b * cap + j) * kw..][..kw].fill(f32::NAN);
            }
        }
        attention_decode(&ql, &kc, &vc, batch, heads, kvh, hd, cap, len, window, &mut o).unwrap();
        // positions >= len hold NaN: they must not be read
        let want: Vec<f64> = (0..batch).flat_map(|b| to64(&out[(b * seq + len - 1) * qw..][..qw])).collect();
        assert_close("decode", &to64(&o), &want, 1e-6);
    }
    let mut o = vec![0.0; batch * qw];
    assert!(attention_decode(&q[..batch * qw], &kc, &vc, batch, heads, kvh, hd, cap, cap + 1, window, &mut o).is_err());
    assert!(attention_decode(&q[..batch * qw], &kc[1..], &vc, batch, heads, kvh, hd, cap, 3, window, &mut o).is_err());
    assert!(attention_decode(&q[..batch * qw], &kc, &vc, batch, heads, kvh, hd, cap, 3, Some(0), &mut o).is_err());
}

#[test]
fn attention_bad_shapes() {
    assert!(AttnShape::new(1, 4, 6, 4, 8).is_err()); // 6 % 4
    assert!(AttnShape::new(0, 4, 6, 2, 8).is_err());
    let s = AttnShape::new(1, 4, 6, 2, 8).unwrap();
    let q = vec![0.0f32; 4 * 48];
    let k = vec![0.0f32; 4 * 16];
    let mut out = vec![0.0f32; 4 * 48];
    let mut lse = vec![0.0f32; 4 * 6];
    assert!(matches!(attention_forward(&q, &q, &k, s, &mut out, &mut lse), Err(Error::Layout { arg: "k", .. })));
    assert!(matches!(attention_forward(&q, &k, &k, s, &mut out, &mut lse[1..]), Err(Error::Layout { arg: "lse", .. })));
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; k.len()]);
    assert!(attention_backward(&q, &q, &k, &k, &out, &lse, s, &mut dq, &mut dk, &mut dv[1..]).is_err());
    assert!(attention_backward(&q[1..], &q, &k, &k, &out, &lse, s, &mut dq, &mut dk, &mut dv).is_err());
}

// ----------------------------------------------------------------------------- swiglu

#[test]
fn swiglu_forward_backward() {
    let n = 37;
    let gate = f32v(11, n, 4.0);
    let up = f32v(12, n, 2.0);
    let g = f32v(13, n, 1.0);
    let mut out = vec![0.0; n];
    swiglu_forward(&gate, &up, &mut out).unwrap();
    let f = |ga: &[f64], u: &[f64]| -> Vec<f64> { ga.iter().zip(u).map(|(a, b)| a / (1.0 + (-a).exp()) * b).collect() };
    let (ga64, up64, g64) = (to64(&gate), to64(&up), to64(&g));
    assert_close("swiglu", &to64(&out), &f(&ga64, &up64), 1e-6);
    let (mut dgate, mut dup) = (vec![0.0; n], vec![0.0; n]);
    swiglu_backward(&g, &gate, &up, &mut dgate, &mut dup).unwrap();
    assert_close("swiglu dgate", &to64(&dgate), &fd_grad(&ga64, 1e-6, &|x| dotf(&f(x, &up64), &g64)), 1e-6);
    assert_close("swiglu dup", &to64(&dup), &fd_grad(&up64, 1e-6, &|x| dotf(&f(&ga64, x), &g64)), 1e-6);
    assert!(swiglu_forward(&gate, &up[1..], &mut out).is_err());
    assert!(swiglu_backward(&g, &gate, &up, &mut dgate[1..], &mut dup).is_err());
}

// ----------------------------------------------------------------------------- cross-entropy

fn xent_ref(logits: &[f64], targets: &[i32], v: usize) -> f64 {
    let mut tot = 0.0;
    let mut cnt = 0;
    for (t, &y) in targets.iter().enumerate() {
        if y == IGNORE_INDEX {
            continue;
        }
        let r = &logits[t * v..(t + 1) * v];
        let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + r.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        tot += lse - r[y as usize];
        cnt += 1;
    }
    tot / cnt as f64
}

#[test]
fn cross_entropy_forward_backward() {
    let (n, v) = (6usize, 11usize);
    let logits = f32v(21, n * v, 8.0);
    let targets = [3, IGNORE_INDEX, 0, 10, 5, IGNORE_INDEX];
    let mut losses = vec![0.0; n];
    let loss = cross_entropy_forward(&logits, &targets, n, v, &mut losses).unwrap();
    let l64 = to64(&logits);
    let want = xent_ref(&l64, &targets, v);
    assert!((loss as f64 - want).abs() < 1e-6 * want.abs().max(1.0), "{loss} vs {want}");
    assert_eq!(losses[1], 0.0);
    assert_eq!(losses[5], 0.0);
    let mut d = logits.clone();
    cross_entropy_backward(&mut d, &targets, n, v, 2.0).unwrap();
    let fd = fd_grad(&l64, 1e-6, &|x| 2.0 * xent_ref(x, &targets, v));
    assert_close("xent dlogits", &to64(&d), &fd, 1e-6);
    assert!(d[v..2 * v].iter().all(|&x| x == 0.0));
    // large logits stay finite (stable log-sum-exp)
    let big: Vec<f32> = logits.iter().map(|x| x + 1e4).collect();
    let lb = cross_entropy_forward(&big, &targets, n, v, &mut losses).unwrap();
    assert!((lb - loss).abs() < 2e-3, "{lb} vs {loss}");
}

#[test]
fn cross_entropy_bad_input() {
    let (n, v) = (2usize, 4usize);
    let logits = vec![0.0f32; n * v];
    let mut losses = vec![0.0; n];
    assert!(cross_entropy_forward(&logits, &[0, 4], n, v, &mut losses).is_err());
    assert!(cross_entropy_forward(&logits, &[0, -1], n, v, &mut losses).is_err());
    assert!(cross_entropy_forward(&logits, &[IGNORE_INDEX, IGNORE_INDEX], n, v, &mut losses).is_err());
    assert!(cross_entropy_forward(&logits, &[0], n, v, &mut losses).is_err());
    assert!(cross_entropy_forward(&logits[1..], &[0, 1], n, v, &mut losses).is_err());
    let mut d = logits.clone();
    assert!(cross_entropy_backward(&mut d, &[0, 9], n, v, 1.0).is_err());
}

#[test]
fn lm_head_fused_matches_unfused() {
    let (n, d, v) = (7usize, 5usize, 13usize);
    let hidden = f32v(31, n * d, 1.0);
    let emb = f32v(32, v * d, 1.0);
    let targets = [1, 12, IGNORE_INDEX, 0, 7, 7, 3];
    // unfused reference in f64
    let (h64, e64) = (to64(&hidden), to64(&emb));
    let logits = |h: &[f64]| -> Vec<f64> {
        let mut l = vec![0.0; n * v];
        for t in 0..n {
            for j in 0..v {
                l[t * v + j] = dotf(&h[t * d..(t + 1) * d], &e64[j * d..(j + 1) * d]);
            }
        }
        l
    };
    let want_loss = xent_ref(&logits(&h64), &targets, v);
    let want_dh = fd_grad(&h64, 1e-6, &|h| 0.5 * xent_ref(&logits(h), &targets, v));
    for chunk in [1usize, 3, 7, 100] {
        let mut dh = vec![0.0; n * d];
        let loss = lm_head_cross_entropy(&hidden, &emb, &targets, n, d, v, chunk, 0.5, Some(&mut dh)).unwrap();
        assert!((loss as f64 - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0), "chunk {chunk}: {loss} vs {want_loss}");
        assert_close("lm head dhidden", &to64(&dh), &want_dh, 1e-5);
        let l2 = lm_head_cross_entropy(&hidden, &emb, &targets, n, d, v, chunk, 1.0, None).unwrap();
        assert_eq!(l2, loss);
    }
    let mut dh = vec![0.0; n * d];
    assert!(lm_head_cross_entropy(&hidden, &emb[1..], &targets, n, d, v, 2, 1.0, None).is_err());
    assert!(lm_head_cross_entropy(&hidden, &emb, &targets, n, d, v, 0, 1.0, None).is_err());
    assert!(lm_head_cross_entropy(&hidden, &emb, &targets, n, d, v, 2, 1.0, Some(&mut dh[1..])).is_err());
}

// ----------------------------------------------------------------------------- helpers

#[test]
fn add_helpers() {
    let a = vec![1.0f32, 2.0, 3.0];
    let b = vec![0.5f32, -1.0, 4.0];
    let mut o = vec![0.0; 3];
    add(&a, &b, &mut o).unwrap();
    assert_eq!(o, vec![1.5, 1.0, 7.0]);
    let mut c = a.clone();
    add_inplace(&mut c, &b).unwrap();
    assert_eq!(c, o);
    assert!(add_inplace(&mut c, &b[1..]).is_err());
    assert!(add(&a, &b, &mut o[1..]).is_err());
    scale_inplace(&mut c, 2.0).unwrap();
    assert_eq!(c, vec![3.0, 2.0, 14.0]);
}

#[test]
fn lm_head_forward_matches_dot_products() {
    let (n, d, v) = (5usize, 9usize, 70usize);
    let hidden = f32v(41, n * d, 1.0);
    let emb = f32v(42, v * d, 1.0);
    let mut logits = vec![0.0; n * v];
    lm_head_forward(&hidden, &emb, n, d, v, &mut logits).unwrap();
    let (h, e) = (to64(&hidden), to64(&emb));
    let want: Vec<f64> = (0..n * v).map(|i| dotf(&h[i / v * d..][..d], &e[i % v * d..][..d])).collect();
    assert_close("lm head logits", &to64(&logits), &want, 1e-6);
    assert!(lm_head_forward(&hidden, &emb, n, d, v, &mut logits[1..]).is_err());
    assert!(lm_head_forward(&hidden[1..], &emb, n, d, v, &mut logits).is_err());
}

/// Analytic attention backward in f64 with explicit S x S probabilities (the textbook formula).
fn attn_ref_backward(g: &[f64], q: &[f64], k: &[f64], v: &[f64], s: AttnShape) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let AttnShape { batch, seq, heads, kv_heads, head_dim: hd, .. } = s;
    let (qw, kw, grp) = (heads * hd, kv_heads * hd, heads / kv_heads);
    let scale = 1.0 / (hd as f64).sqrt();
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for b in 0..batch {
        for h in 0..heads {
            let gk = h / grp;
            let qi = |i: usize| (b * seq + i) * qw + h * hd;
            let kj = |j: usize| (b * seq + j) * kw + gk * hd;
            for i in 0..seq {
                let sc: Vec<f64> = (0..=i).map(|j| dotf(&q[qi(i)..][..hd], &k[kj(j)..][..hd]) * scale).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|x| (x - m).exp() / z).collect();
                let dp: Vec<f64> = (0..=i).map(|j| dotf(&g[qi(i)..][..hd], &v[kj(j)..][..hd])).collect();
                let dd: f64 = (0..=i).map(|j| p[j] * dp[j]).sum();
                for j in 0..=i {
                    let ds = p[j] * (dp[j] - dd) * scale;
                    for e in 0..hd {
                        dq[qi(i) + e] += ds * k[kj(j) + e];
                        dk[kj(j) + e] += ds * q[qi(i) + e];
                        dv[kj(j) + e] += p[j] * g[qi(i) + e];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

#[test]
fn attention_smollm2_shape_against_f64() {
    // SmolLM2-135M attention: 9 heads, 3 kv heads, head_dim 64; odd sequence length
    let s = AttnShape::new(2, 37, 9, 3, 64).unwrap();
    let n = s.tokens();
    let q = f32v(51, n * s.q_width(), 2.0);
    let k = f32v(52, n * s.kv_width(), 2.0);
    let v = f32v(53, n * s.kv_width(), 1.0);
    let g = f32v(54, n * s.q_width(), 1.0);
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; n * 9];
    attention_forward(&q, &k, &v, s, &mut out, &mut lse).unwrap();
    let (q64, k64, v64, g64) = (to64(&q), to64(&k), to64(&v), to64(&g));
    let (want_out, want_lse) = attn_ref(&q64, &k64, &v64, s);
    assert_close("attn out (smollm2 shape)", &to64(&out), &want_out, 1e-5);
    assert_close("attn lse (smollm2 shape)", &to64(&lse), &want_lse, 1e-5);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    attention_backward(&g, &q, &k, &v, &out, &lse, s, &mut dq, &mut dk, &mut dv).unwrap();
    let (wq, wk, wv) = attn_ref_backward(&g64, &q64, &k64, &v64, s);
    assert_close("attn dq (smollm2 shape)", &to64(&dq), &wq, 1e-5);
    assert_close("attn dk (smollm2 shape)", &to64(&dk), &wk, 1e-5);
    assert_close("attn dv (smollm2 shape)", &to64(&dv), &wv, 1e-5);
}
