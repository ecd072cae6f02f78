//! Unit tests of the launch wiring without a GPU: [`HostExec`] implements [`Exec`] with a
//! float64 interpreter of each kernel's contract (the layout flags of every
//! `WEGEFT_PRODUCT_KERNEL` in `kernels/*.cu`, checked against the sources below), and the
//! layer algorithms of `layer.rs` run on it against `crate::reference`. The kernels
//! themselves are checked by `tests/kernel_emulation.rs` and, on a GPU, `tests/cuda_layer.rs`.

use std::cell::RefCell;
use std::collections::HashMap;

use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::exec::{Exec, KextArgs, Scratch, WegeftBwd, WegeftUc};
use super::tune::{TuneTable, TUNE_REPS};
use super::layer::{dropout_keep, Dropout, Layer, Path};
use super::product::{Product, KERNELS};
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::reference as rf;
use crate::shape::LayerShape;

/// Device memory as host `f64` buffers keyed by fake, 256-byte aligned addresses.
#[derive(Default)]
struct HostExec {
    mem: RefCell<HashMap<CUdeviceptr, Vec<f64>>>,
    next: RefCell<CUdeviceptr>,
    log: RefCell<Vec<String>>,
    /// With a "fused GEMM" (`Some`): a direct f64 K-extended product, and the milliseconds that
    /// `time_ms` reports for the fused and the composed path.
    fused: Option<(f64, f64)>,
    tuned: TuneTable,
}

struct HostBuf(CUdeviceptr);
impl Scratch for HostBuf {
    fn ptr(&self) -> CUdeviceptr {
        self.0
    }
}

impl HostExec {
    fn alloc(&self, v: Vec<f64>) -> CUdeviceptr {
        let mut next = self.next.borrow_mut();
        *next += 0x1_0000_0000; // far apart: no buffer can run into another
        self.mem.borrow_mut().insert(*next, v);
        *next
    }
    fn get(&self, p: CUdeviceptr) -> Vec<f64> {
        self.mem.borrow().get(&p).unwrap_or_else(|| panic!("no buffer at {p:#x}")).clone()
    }
    /// u = x psi^T and C = scale W phi of `uc` (packed) into its u and C buffers; returned too.
    fn host_uc(&self, uc: &WegeftUc) -> Result<(Vec<f64>, Vec<f64>)> {
        let s = LayerShape::new(uc.tokens, uc.d_in, uc.d_out, uc.rank)?;
        let psi_t = rf::transpose(&self.get(uc.psi), uc.rank, uc.d_in);
        let u = rf::matmul(&self.get(uc.x), &psi_t, uc.tokens, uc.d_in, uc.rank);
        let c = rf::generate_c(&s, &self.get(uc.w), &self.get(uc.phi), uc.scale as f64);
        self.mem.borrow_mut().insert(uc.u, u.clone());
        self.mem.borrow_mut().insert(uc.c, c.clone());
        Ok((u, c))
    }
    /// Element `i` of the buffer at `p`, panicking on an out-of-bounds index (a wiring bug).
    fn at(buf: &[f64], i: usize, what: &str) -> f64 {
        *buf.get(i).unwrap_or_else(|| panic!("{what}: index {i} out of bounds ({})", buf.len()))
    }
}

impl Exec for HostExec {
    type Buf = HostBuf;

    unsafe fn product(&self, name: &str, _out: DType, _stream: CUstream, p: Product) -> Result<()> {
        self.log.borrow_mut().push(name.to_string());
        let op = name.rsplit_once('_').map(|(o, _)| o).unwrap();
        let &(_, ta, tb, mask) = KERNELS.iter().find(|k| k.0 == op).unwrap_or_else(|| panic!("unknown kernel {name}"));
        let (a, b) = (self.get(p.a), self.get(p.b));
        let mut d = self.get(p.d);
        let bias = (p.bias != 0).then(|| self.get(p.bias));
        let keep = if mask && p.p > 0.0 { 1.0 / (1.0 - p.p as f64) } else { 1.0 };
        for m in 0..p.m {
            for n in 0..p.n {
                let mut acc = 0.0;
                for k in 0..p.k {
                    let (ai, (row, col)) = if ta { (k * p.lda + m, (k, m)) } else { (m * p.lda + k, (m, k)) };
                    let mut av = Self::at(&a, ai, "A");
                    if mask && p.p > 0.0 {
                        av *= if dropout_keep(p.seed, row as u32, col as u32, p.p) { keep } else { 0.0 };
                    }
                    let bv = Self::at(&b, if tb { n * p.ldb + k } else { k * p.ldb + n }, "B");
                    acc += av * bv;
                }
                let di = m * p.ldd + n;
                let mut out = p.alpha as f64 * acc;
                if p.beta != 0.0 {
                    out += p.beta as f64 * Self::at(&d, di, "D");
                }
                if let Some(bv) = &bias {
                    out += bv[n];
                }
                assert!(di < d.len(), "{name}: D index {di} out of bounds ({})", d.len());
                d[di] = out;
            }
        }
        self.mem.borrow_mut().insert(p.d, d);
        Ok(())
    }

    unsafe fn gemm(
        &self,
        op: &'static str,
        _dtype: DType,
        _stream: CUstream,
        transa: bool,
        transb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: CUdeviceptr,
        lda: usize,
        b: CUdeviceptr,
        ldb: usize,
        bias: Option<CUdeviceptr>,
        beta: f32,
        d: CUdeviceptr,
        ldd: usize,
    ) -> Result<()> {
        self.log.borrow_mut().push(op.to_string());
        let (av, bv) = (self.get(a), self.get(b));
        let mut dv = self.get(d);
        let bias = bias.map(|p| self.get(p));
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for l in 0..k {
                    let x = Self::at(&av, if transa { l * lda + i } else { i * lda + l }, "gemm A");
                    let y = Self::at(&bv, if transb { j * ldb + l } else { l * ldb + j }, "gemm B");
                    acc += x * y;
                }
                if beta != 0.0 {
                    acc += beta as f64 * dv[i * ldd + j];
                }
                if let Some(bb) = &bias {
                    acc += bb[j];
                }
                dv[i * ldd + j] = acc;
            }
        }
        self.mem.borrow_mut().insert(d, dv);
        Ok(())
    }

    fn scratch(&self, _stream: CUstream, bytes: usize, _op: &'static str) -> Result<HostBuf> {
        // Sized in elements of at least 2 bytes; NaN so that a read before a write shows.
        Ok(HostBuf(self.alloc(vec![f64::NAN; bytes / 2])))
    }

    unsafe fn download<T: Element>(&self, dst: &mut [T], src: CUdeviceptr, _stream: CUstream, _op: &'static str) -> Result<()> {
        let v = self.get(src);
        for (i, x) in dst.iter_mut().enumerate() {
            *x = T::from_f32(Self::at(&v, i, "download") as f32);
        }
        Ok(())
    }

    unsafe fn upload_f32(&self, dst: CUdeviceptr, src: &[f32], _stream: CUstream, _op: &'static str) -> Result<()> {
        let mut v = self.get(dst);
        for (i, x) in src.iter().enumerate() {
            assert!(i < v.len(), "upload out of bounds");
            v[i] = *x as f64;
        }
        self.mem.borrow_mut().insert(dst, v);
        Ok(())
    }

    unsafe fn sync(&self, _stream: CUstream, _op: &'static str) -> Result<()> {
        Ok(())
    }

    unsafe fn fused_uc<T: Element>(&self, _stream: CUstream, path: Path, uc: &WegeftUc) -> Result<bool> {
        // What the device's wegeft_uc kernel computes (packed operands), for FusedSm90 with a
        // "fused GEMM"; the K-extended GEMM after it then runs composed here.
        if self.fused.is_none() || path != Path::FusedSm90 {
            return Ok(false);
        }
        self.log.borrow_mut().push("wegeft_uc".into());
        self.host_uc(uc)?;
        Ok(true)
    }

    unsafe fn fused_forward<T: Element>(&self, _stream: CUstream, path: Path, uc: &WegeftUc, bias: Option<CUdeviceptr>, y: CUdeviceptr) -> Result<bool> {
        // What wegeft_fwd computes (u, C, then y = x W^T + u C^T + bias from them, y packed),
        // where the device's policy takes it.
        if self.fused.is_none() || path != Path::FusedSm90 || !uc.one_launch_worth_it() {
            return Ok(false);
        }
        self.log.borrow_mut().push("wegeft_fwd".into());
        let (u, c) = self.host_uc(uc)?;
        let (t, din, dout, r) = (uc.tokens, uc.d_in, uc.d_out, uc.rank);
        let xw = rf::matmul(&self.get(uc.x), &rf::transpose(&self.get(uc.w), dout, din), t, din, dout);
        let uct = rf::matmul(&u, &rf::transpose(&c, dout, r), t, r, dout);
        let b = bias.map(|p| self.get(p));
        let yv: Vec<f64> = (0..t * dout).map(|i| xw[i] + uct[i] + b.as_ref().map_or(0.0, |b| Self::at(b, i % dout, "bias"))).collect();
        self.mem.borrow_mut().insert(y, yv);
        Ok(true)
    }

    unsafe fn fused_backward<T: Element>(&self, _stream: CUstream, path: Path, bw: &WegeftBwd) -> Result<bool> {
        // What wegeft_bwd computes (v = G C; S = G^T u; dpsi += v^T x and dx = G W + v psi from
        // that v; dphi += scale W^T S when given; packed), where the device's policy takes it.
        if self.fused.is_none() || path != Path::FusedSm90 || !bw.worth_it() {
            return Ok(false);
        }
        self.log.borrow_mut().push("wegeft_bwd".into());
        let (t, din, dout, r) = (bw.tokens, bw.d_in, bw.d_out, bw.rank);
        let (g, w) = (self.get(bw.g), self.get(bw.w));
        let v = rf::matmul(&g, &self.get(bw.c), t, dout, r);
        let big_s = rf::matmul(&rf::transpose(&g, t, dout), &self.get(bw.u), dout, t, r);
        let vtx = rf::matmul(&rf::transpose(&v, t, r), &self.get(bw.x), r, t, din);
        let gw = rf::matmul(&g, &w, t, dout, din);
        let vpsi = rf::matmul(&v, &self.get(bw.psi), t, r, din);
        let dpsi: Vec<f64> = self.get(bw.dpsi).iter().zip(&vtx).map(|(a, b)| a + b).collect();
        if bw.dphi != 0 {
            let wts = rf::matmul(&rf::transpose(&w, dout, din), &big_s, din, dout, r);
            let dphi: Vec<f64> = self.get(bw.dphi).iter().zip(&wts).map(|(a, b)| a + bw.scale as f64 * b).collect();
            self.mem.borrow_mut().insert(bw.dphi, dphi);
        }
        let mut mem = self.mem.borrow_mut();
        mem.insert(bw.v, v);
        mem.insert(bw.s, big_s);
        mem.insert(bw.dpsi, dpsi);
        mem.insert(bw.dx, gw.iter().zip(&vpsi).map(|(a, b)| a + b).collect());
        Ok(true)
    }

    unsafe fn kext_fused<T: Element>(&self, nt: bool, _stream: CUstream, path: Path, args: KextArgs, _dependent: bool) -> Result<bool> {
        if self.fused.is_none() {
            return match path {
                Path::Fused | Path::FusedSm90 => Err(crate::Error::invalid("path", "no fused GEMM")),
                _ => Ok(false),
            };
        }
        if path != Path::Fused {
            return Ok(false);
        }
        self.log.borrow_mut().push("fused".into());
        let ((a1, lda1, b1, ldb1, k1), (a2, lda2, b2, ldb2, k2), bias, (d, ldd, m, n)) = args;
        let mut dv = self.get(d);
        let bias = bias.map(|p| self.get(p));
        for i in 0..m {
            for j in 0..n {
                let mut acc = bias.as_ref().map_or(0.0, |b| b[j]);
                for (a, lda, b, ldb, k) in [(a1, lda1, b1, ldb1, k1), (a2, lda2, b2, ldb2, k2)] {
                    let (av, bv) = (self.get(a), self.get(b));
                    for l in 0..k {
                        acc += Self::at(&av, i * lda + l, "fused A") * Self::at(&bv, if nt { j * ldb + l } else { l * ldb + j }, "fused B");
                    }
                }
                dv[i * ldd + j] = acc;
            }
        }
        self.mem.borrow_mut().insert(d, dv);
        Ok(true)
    }

    fn tune_table(&self) -> &TuneTable {
        &self.tuned
    }

    fn tune_candidates(&self, _dtype: DType, _vector_loads: bool) -> Vec<Path> {
        if self.fused.is_some() {
            vec![Path::Composed, Path::Fused]
        } else {
            vec![Path::Composed]
        }
    }

    unsafe fn time_ms(&self, _stream: CUstream, path: Path, run: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        run()?;
        let (fused, composed) = self.fused.unwrap_or((f64::NAN, 1.0));
        Ok(if path == Path::Fused { fused } else { composed })
    }
}

fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "{what}[{i}]: got {g}, want {w} (scale {scale:e})");
    }
}

fn data(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

const NULL: CUstream = std::ptr::null_mut();

#[test]
fn kernel_table_matches_the_sources() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut found = Vec::new();
    for f in ["lowrank.cu", "merge.cu"] {
        let src = std::fs::read_to_string(root.join(f)).unwrap();
        for line in src.lines().filter(|l| l.trim_start().starts_with("WEGEFT_PRODUCT_KERNEL(")) {
            let args: Vec<&str> = line.split('(').nth(1).unwrap().split(')').next().unwrap().split(',').map(str::trim).collect();
            let op = args[0].trim_end_matches("##SUF").trim_end_matches('_').to_string();
            found.push((op, args[4] == "true", args[5] == "true", args[6] == "true"));
        }
    }
    assert_eq!(found.len(), KERNELS.len(), "kernels in the sources: {found:?}");
    for (op, ta, tb, mask) in KERNELS {
        assert!(found.iter().any(|f| f.0 == *op && (f.1, f.2, f.3) == (*ta, *tb, *mask)), "{op}: not declared as ({ta}, {tb}, {mask}) in {found:?}");
    }
}

fn case(s: &LayerShape, seed: u64) -> [Vec<f64>; 6] {
    let a = 1.0 / (s.d_in as f64).sqrt();
    [
        data(seed, s.tokens * s.d_in),
        data(seed + 1, s.d_out * s.d_in).iter().map(|v| v * a).collect(),
        data(seed + 2, s.d_out),
        data(seed + 3, s.d_in * s.rank).iter().map(|v| v * a).collect(),
        data(seed + 4, s.rank * s.d_in).iter().map(|v| v * a).collect(),
        data(seed + 5, s.tokens * s.d_out),
    ]
}

#[test]
fn wegeft_forward_backward_wiring() {
    for &(t, din, dout, r) in &[(5, 7, 9, 3), (1, 6, 4, 1), (9, 4, 11, 5)] {
        let s = LayerShape::new(t, din, dout, r).unwrap();
        let [x, w, b, phi, psi, g] = case(&s, 10 + t as u64);
        let h = HostExec::default();
        let (xp, wp, bp, php, psp, gp) = (h.alloc(x.clone()), h.alloc(w.clone()), h.alloc(b.clone()), h.alloc(phi.clone()), h.alloc(psi.clone()), h.alloc(g.clone()));
        let (up, cp, yp) = (h.alloc(vec![f64::NAN; t * r]), h.alloc(vec![f64::NAN; dout * r]), h.alloc(vec![f64::NAN; t * dout]));
        let scale = 0.75;
        unsafe { h.forward_impl::<f32>(&s, NULL, Path::Auto, xp, wp, Some(bp), php, psp, scale as f32, Dropout::NONE, up, cp, yp) }.unwrap();
        close("y", &h.get(yp), &rf::wegeft_forward(&s, &x, &w, Some(&b), &phi, &psi, scale).unwrap(), 1e-12);
        close("C", &h.get(cp), &rf::generate_c(&s, &w, &phi, scale), 1e-12);
        let dphi0 = data(77, din * r);
        let dpsi0 = data(78, r * din);
        let (dxp, dphp, dpsp) = (h.alloc(vec![f64::NAN; t * din]), h.alloc(dphi0.clone()), h.alloc(dpsi0.clone()));
        unsafe { h.backward_impl::<f32>(&s, NULL, Path::Auto, xp, wp, psp, scale as f32, Dropout::NONE, up, cp, gp, Some(dxp), dphp, dpsp) }
            .unwrap();
        let gr = rf::wegeft_backward(&s, &x, &w, &phi, &psi, scale, &g).unwrap();
        close("dx", &h.get(dxp), &gr.dx, 1e-12);
        let dphi: Vec<f64> = h.get(dphp).iter().zip(&dphi0).map(|(a, b)| a - b).collect();
        let dpsi: Vec<f64> = h.get(dpsp).iter().zip(&dpsi0).map(|(a, b)| a - b).collect();
        close("dphi (accumulated)", &dphi, &gr.dphi, 1e-12);
        close("dpsi (accumulated)", &dpsi, &gr.dpsi, 1e-12);
    }
}

#[test]
fn fused_forward_takes_u_and_c_from_one_launch_without_dropout_only() {
    // A small layer (x and W within UC_MAX_BYTES): wegeft_uc, then the GEMM; a large one: the
    // whole forward in one launch (wegeft_fwd). With dropout neither.
    for (s, want) in [(LayerShape::new(6, 16, 9, 8).unwrap(), "wegeft_uc"), (LayerShape::new(2, 4096, 1100, 8).unwrap(), "wegeft_fwd")] {
        fused_forward_case(&s, want);
    }
}

fn fused_forward_case(s: &LayerShape, want: &str) {
    let s = *s;
    let [x, w, b, phi, psi, _] = case(&s, 41);
    let (t, dout, r) = (s.tokens, s.d_out, s.rank);
    for drop in [Dropout::NONE, Dropout { p: 0.25, seed: 3 }] {
        let h = HostExec { fused: Some((1.0, 2.0)), ..Default::default() };
        let (xp, wp, bp, php, psp) = (h.alloc(x.clone()), h.alloc(w.clone()), h.alloc(b.clone()), h.alloc(phi.clone()), h.alloc(psi.clone()));
        let (up, cp, yp) = (h.alloc(vec![f64::NAN; t * r]), h.alloc(vec![f64::NAN; dout * r]), h.alloc(vec![f64::NAN; t * dout]));
        unsafe { h.forward_impl::<f32>(&s, NULL, Path::FusedSm90, xp, wp, Some(bp), php, psp, 0.5, drop, up, cp, yp) }.unwrap();
        let log = h.log.borrow();
        let taken: Vec<&String> = log.iter().filter(|n| *n == "wegeft_uc" || *n == "wegeft_fwd").collect();
        if drop.p == 0.0 {
            assert_eq!(taken, [want], "{s:?}: {log:?}");
        } else {
            assert!(taken.is_empty(), "{drop:?}: {log:?}");
        }
        if want == "wegeft_fwd" && drop.p == 0.0 {
            assert_eq!(log.len(), 1, "one launch, nothing else: {log:?}");
        }
        if drop.p == 0.0 {
            close("y", &h.get(yp), &rf::wegeft_forward(&s, &x, &w, Some(&b), &phi, &psi, 0.5).unwrap(), 1e-12);
            close("C", &h.get(cp), &rf::generate_c(&s, &w, &phi, 0.5), 1e-12);
            close("u", &h.get(up), &rf::matmul(&x, &rf::transpose(&psi, r, s.d_in), t, s.d_in, r), 1e-12);
        }
    }
}

#[test]
fn fused_backward_takes_one_launch_for_large_layers_only() {
    // A large layer (x and W above UC_MAX_BYTES) with dx: wegeft_bwd (v, S, dpsi, dx and dphi;
    // with dropout all but dphi, which then follows over the masked W); without dx, or a small
    // layer: as before.
    for (s, want_one) in [(LayerShape::new(2, 4096, 1100, 8).unwrap(), true), (LayerShape::new(6, 16, 9, 8).unwrap(), false)] {
        let [x, w, _, phi, psi, g] = case(&s, 51);
        let (t, din, dout, r) = (s.tokens, s.d_in, s.d_out, s.rank);
        for drop in [Dropout::NONE, Dropout { p: 0.25, seed: 3 }] {
            for with_dx in [true, false] {
                let h = HostExec { fused: Some((1.0, 2.0)), ..Default::default() };
                let (xp, wp, php, psp, gp) = (h.alloc(x.clone()), h.alloc(w.clone()), h.alloc(phi.clone()), h.alloc(psi.clone()), h.alloc(g.clone()));
                let (up, cp, yp) = (h.alloc(vec![f64::NAN; t * r]), h.alloc(vec![f64::NAN; dout * r]), h.alloc(vec![f64::NAN; t * dout]));
                unsafe { h.forward_impl::<f32>(&s, NULL, Path::FusedSm90, xp, wp, None, php, psp, 0.5, drop, up, cp, yp) }.unwrap();
                h.log.borrow_mut().clear();
                let dphi0 = data(77, din * r);
                let dpsi0 = data(78, r * din);
                let (dxp, dphp, dpsp) = (h.alloc(vec![f64::NAN; t * din]), h.alloc(dphi0.clone()), h.alloc(dpsi0.clone()));
                let dx = with_dx.then_some(dxp);
                unsafe { h.backward_impl::<f32>(&s, NULL, Path::FusedSm90, xp, wp, psp, 0.5, drop, up, cp, gp, dx, dphp, dpsp) }.unwrap();
                let log = h.log.borrow().clone();
                let one = want_one && with_dx;
                let ran = |k: &str| log.iter().any(|n| n.starts_with(k));
                assert_eq!(ran("wegeft_bwd"), one, "{s:?} dx {with_dx} {drop:?}: {log:?}");
                for k in ["lowrank_v", "lowrank_s", "lowrank_dpsi"] {
                    assert_eq!(ran(k), !one, "{k}: {log:?}");
                }
                // dphi inside the launch without dropout; with it, over the masked W after it.
                assert_eq!(ran("lowrank_dphi"), !(one && drop.p == 0.0), "{log:?}");
                // Against the reference with the same u and C (the forward's; C masked with
                // dropout).
                let (u, c) = (h.get(up), h.get(cp));
                let v = rf::matmul(&g, &c, t, dout, r);
                if with_dx {
                    let want = rf::matmul(&g, &w, t, dout, din).iter().zip(rf::matmul(&v, &psi, t, r, din)).map(|(a, b)| a + b).collect::<Vec<_>>();
                    close("dx", &h.get(dxp), &want, 1e-12);
                }
                let dpsi: Vec<f64> = h.get(dpsp).iter().zip(&dpsi0).map(|(a, b)| a - b).collect();
                close("dpsi (accumulated, from v)", &dpsi, &rf::matmul(&rf::transpose(&v, t, r), &x, r, t, din), 1e-12);
                let big_s = rf::matmul(&rf::transpose(&g, t, dout), &u, dout, t, r);
                let wm = masked_w(&s, &w, drop);
                let want_dphi: Vec<f64> = rf::matmul(&rf::transpose(&wm, dout, din), &big_s, din, dout, r).iter().map(|v| v * 0.5).collect();
                let dphi: Vec<f64> = h.get(dphp).iter().zip(&dphi0).map(|(a, b)| a - b).collect();
                close("dphi (accumulated, from S)", &dphi, &want_dphi, 1e-9);
            }
        }
    }
}

/// M .* W / (1 - p): the W that C and dphi see under `drop` (W itself without dropout).
fn masked_w(s: &LayerShape, w: &[f64], drop: Dropout) -> Vec<f64> {
    (0..s.d_out * s.d_in)
        .map(|k| if dropout_keep(drop.seed, (k / s.d_in) as u32, (k % s.d_in) as u32, drop.p) { w[k] / (1.0 - drop.p as f64) } else { 0.0 })
        .collect()
}

#[test]
fn dropout_wiring_masks_w_in_c_and_dphi_only() {
    let s = LayerShape::new(6, 13, 11, 4).unwrap();
    let [x, w, _, phi, psi, g] = case(&s, 3);
    let drop = Dropout { p: 0.4, seed: 99 };
    let wm = masked_w(&s, &w, drop);
    let h = HostExec::default();
    let (xp, wp, php, psp, gp) = (h.alloc(x.clone()), h.alloc(w.clone()), h.alloc(phi.clone()), h.alloc(psi.clone()), h.alloc(g.clone()));
    let (up, cp, yp) = (h.alloc(vec![0.0; 6 * 4]), h.alloc(vec![0.0; 11 * 4]), h.alloc(vec![0.0; 6 * 11]));
    unsafe { h.forward_impl::<f32>(&s, NULL, Path::Composed, xp, wp, None, php, psp, 2.0, drop, up, cp, yp) }.unwrap();
    let c = rf::generate_c(&s, &wm, &phi, 2.0);
    close("C with dropout", &h.get(cp), &c, 1e-6);
    let u = rf::matmul(&x, &rf::transpose(&psi, 4, 13), 6, 13, 4);
    let mut y = rf::matmul(&x, &rf::transpose(&w, 11, 13), 6, 13, 11);
    for (a, b) in y.iter_mut().zip(rf::matmul(&u, &rf::transpose(&c, 11, 4), 6, 4, 11)) {
        *a += b;
    }
    close("y with dropout (frozen part unmasked)", &h.get(yp), &y, 1e-6);
    let (dphp, dpsp) = (h.alloc(vec![0.0; 13 * 4]), h.alloc(vec![0.0; 4 * 13]));
    unsafe { h.backward_impl::<f32>(&s, NULL, Path::Composed, xp, wp, psp, 2.0, drop, up, cp, gp, None, dphp, dpsp) }.unwrap();
    let big_s = rf::matmul(&rf::transpose(&g, 6, 11), &u, 11, 6, 4);
    let dphi: Vec<f64> = rf::matmul(&rf::transpose(&wm, 11, 13), &big_s, 13, 11, 4).iter().map(|v| v * 2.0).collect();
    close("dphi with dropout", &h.get(dphp), &dphi, 1e-6);
}

#[test]
fn merge_unmerge_wiring() {
    let s = LayerShape::new(1, 9, 7, 3).unwrap();
    let [_, w, _, phi, psi, _] = case(&s, 5);
    let h = HostExec::default();
    let (wp, php, psp) = (h.alloc(w.clone()), h.alloc(phi.clone()), h.alloc(psi.clone()));
    unsafe { h.merge_impl::<f32>(&s, NULL, wp, php, psp, 0.5) }.unwrap();
    let merged = rf::merge(&s, &w, &phi, &psi, 0.5).unwrap();
    close("merge", &h.get(wp), &merged, 1e-12);
    unsafe { h.unmerge_impl::<f32>(&s, NULL, wp, php, psp, 0.5) }.unwrap();
    // Z goes through f32 on its way to the device.
    close("unmerge", &h.get(wp), &w, 1e-6);
}

#[test]
fn lora_wiring() {
    let s = LayerShape::new(5, 8, 6, 2).unwrap();
    let [x, w, b, _, a, g] = case(&s, 8);
    let bm = data(40, 6 * 2);
    let h = HostExec::default();
    let (xp, wp, bp, ap, bmp, gp) = (h.alloc(x.clone()), h.alloc(w.clone()), h.alloc(b.clone()), h.alloc(a.clone()), h.alloc(bm.clone()), h.alloc(g.clone()));
    let (xap, yp) = (h.alloc(vec![f64::NAN; 5 * 2]), h.alloc(vec![f64::NAN; 5 * 6]));
    unsafe { h.lora_forward_impl::<f32>(&s, NULL, Path::Auto, xp, wp, Some(bp), ap, bmp, 1.5, xap, yp) }.unwrap();
    close("lora y", &h.get(yp), &rf::lora_forward(&s, &x, &w, Some(&b), &a, &bm, 1.5).unwrap(), 1e-12);
    let (dxp, dap, dbp) = (h.alloc(vec![f64::NAN; 5 * 8]), h.alloc(vec![0.0; 2 * 8]), h.alloc(vec![0.0; 6 * 2]));
    unsafe { h.lora_backward_impl::<f32>(&s, NULL, Path::Auto, xp, wp, ap, bmp, 1.5, xap, gp, Some(dxp), dap, dbp) }.unwrap();
    let gr = rf::lora_backward(&s, &x, &w, &a, &bm, 1.5, &g).unwrap();
    close("lora dx", &h.get(dxp), &gr.dx, 1e-12);
    close("lora dA", &h.get(dap), &gr.da, 1e-12);
    close("lora dB", &h.get(dbp), &gr.db, 1e-12);
}

#[test]
fn fused_path_without_the_fused_gemm_is_an_error() {
    if super::layer::FUSED_GEMM_BUILT {
        return; // the device implementation decides; HostExec never has a fused GEMM
    }
    let s = LayerShape::new(2, 4, 4, 1).unwrap();
    let h = HostExec::default();
    let p: Vec<CUdeviceptr> = (0..7).map(|_| h.alloc(vec![0.0; 16])).collect();
    let r = unsafe { h.forward_impl::<f32>(&s, NULL, Path::Fused, p[0], p[1], None, p[2], p[3], 1.0, Dropout::NONE, p[4], p[5], p[6]) };
    assert!(matches!(r, Err(crate::Error::Invalid { arg: "path", .. })), "{r:?}");
}

/// The kernels a K-extended product ran, by path: `fused`, or the composed GEMM + `lowrank_addmm`.
fn runs(log: &[String]) -> Vec<&'static str> {
    log.iter()
        .filter_map(|e| match e.as_str() {
            "fused" => Some("fused"),
            e if e.starts_with("frozen GEMM") => Some("composed"),
            _ => None,
        })
        .collect()
}

#[test]
fn tuned_path_times_each_candidate_once_per_shape_and_keeps_the_fastest() {
    let reps = TUNE_REPS + 1;
    for (fused_ms, composed_ms, winner) in [(1.0, 2.0, Path::Fused), (3.0, 2.0, Path::Composed)] {
        let s = LayerShape::new(5, 7, 9, 3).unwrap();
        let [x, w, b, phi, psi, g] = case(&s, 21);
        let h = HostExec { fused: Some((fused_ms, composed_ms)), ..Default::default() };
        let (xp, wp, bp, php, psp, gp) = (h.alloc(x.clone()), h.alloc(w.clone()), h.alloc(b.clone()), h.alloc(phi.clone()), h.alloc(psi.clone()), h.alloc(g.clone()));
        let (up, cp, yp) = (h.alloc(vec![f64::NAN; 5 * 3]), h.alloc(vec![f64::NAN; 9 * 3]), h.alloc(vec![f64::NAN; 5 * 9]));
        let want_y = rf::wegeft_forward(&s, &x, &w, Some(&b), &phi, &psi, 0.5).unwrap();
        let gr = rf::wegeft_backward(&s, &x, &w, &phi, &psi, 0.5, &g).unwrap();
        let last = if winner == Path::Fused { "fused" } else { "composed" };
        for call in 0..2 {
            h.log.borrow_mut().clear();
            unsafe { h.forward_impl::<f32>(&s, NULL, Path::Tuned, xp, wp, Some(bp), php, psp, 0.5, Dropout::NONE, up, cp, yp) }.unwrap();
            close("tuned y", &h.get(yp), &want_y, 1e-12);
            let log = h.log.borrow().clone();
            let r = runs(&log);
            if call == 0 {
                // Composed, then fused, each warm-up + timed runs; the winner runs last.
                let mut want = vec!["composed"; reps];
                want.extend(vec!["fused"; reps]);
                if winner == Path::Composed {
                    want.push("composed");
                }
                assert_eq!(r, want, "{log:?}");
            } else {
                assert_eq!(r, vec![last], "a tuned shape runs once: {log:?}");
            }
            // u and C are computed once per call, not per candidate.
            assert_eq!(log.iter().filter(|e| e.starts_with("lowrank_u")).count(), 1, "{log:?}");
        }
        // The backward's dx product is tuned separately (a new key); dphi, dpsi accumulate once.
        let (dxp, dphp, dpsp) = (h.alloc(vec![f64::NAN; 5 * 7]), h.alloc(vec![0.0; 7 * 3]), h.alloc(vec![0.0; 3 * 7]));
        h.log.borrow_mut().clear();
        unsafe { h.backward_impl::<f32>(&s, NULL, Path::Tuned, xp, wp, psp, 0.5, Dropout::NONE, up, cp, gp, Some(dxp), dphp, dpsp) }.unwrap();
        assert_eq!(runs(&h.log.borrow()).len(), 2 * reps + usize::from(winner == Path::Composed));
        close("tuned dx", &h.get(dxp), &gr.dx, 1e-12);
        close("tuned dphi", &h.get(dphp), &gr.dphi, 1e-12);
        close("tuned dpsi", &h.get(dpsp), &gr.dpsi, 1e-12);
        let table = h.tuned.entries();
        assert_eq!(table.len(), 2, "{table:?}");
        for (key, t) in &table {
            assert_eq!(t.path, winner, "{key:?}");
            assert_eq!(t.timings, vec![(Path::Composed, composed_ms), (Path::Fused, fused_ms)]);
            assert_eq!((key.m, key.bias), if key.nt { (5, true) } else { (5, false) });
            assert_eq!((key.n, key.k1, key.k2), if key.nt { (9, 7, 3) } else { (7, 9, 3) });
        }
        // Another shape is tuned anew.
        let s2 = LayerShape::new(4, 7, 9, 3).unwrap();
        h.log.borrow_mut().clear();
        unsafe { h.forward_impl::<f32>(&s2, NULL, Path::Tuned, xp, wp, Some(bp), php, psp, 0.5, Dropout::NONE, up, cp, yp) }.unwrap();
        assert!(runs(&h.log.borrow()).len() >= 2 * reps);
        assert_eq!(h.tuned.entries().len(), 3);
    }
}

#[test]
fn tuned_path_without_a_fused_gemm_is_the_composed_one() {
    let s = LayerShape::new(3, 6, 5, 2).unwrap();
    let [x, w, _, phi, psi, _] = case(&s, 31);
    let h = HostExec::default();
    let (xp, wp, php, psp) = (h.alloc(x.clone()), h.alloc(w.clone()), h.alloc(phi.clone()), h.alloc(psi.clone()));
    let (up, cp, yp) = (h.alloc(vec![f64::NAN; 3 * 2]), h.alloc(vec![f64::NAN; 5 * 2]), h.alloc(vec![f64::NAN; 3 * 5]));
    unsafe { h.forward_impl::<f32>(&s, NULL, Path::Tuned, xp, wp, None, php, psp, 1.0, Dropout::NONE, up, cp, yp) }.unwrap();
    close("y", &h.get(yp), &rf::wegeft_forward(&s, &x, &w, None, &phi, &psi, 1.0).unwrap(), 1e-12);
    let table = h.tuned.entries();
    assert_eq!(table.len(), 1);
    assert_eq!(table[0].1.path, Path::Composed);
    assert!(!table[0].0.vector_loads, "f32 never takes the vector loads");
}
