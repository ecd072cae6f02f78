//! The layer API of the CUDA backend: WeGeFT and LoRA forward/backward, merge/unmerge and the
//! frozen linear layer, on device buffers. Same math as `crate::reference` (see its docs):
//!
//! ```text
//! C = s (M .* W) phi   (d_out x r)          u = x psi^T   (T x r)
//! y = x W^T + u C^T + b                      = [x | u] [W | C]^T
//! v = G C              (T x r)               S = G^T u     (d_out x r)
//! dx   = G W + v psi                         = [G | v] [W ; psi]
//! dphi += s (M .* W)^T S   (d_in x r)        dpsi += v^T x  (r x d_in)
//! merge:   W <- W + C psi                    (C = s W phi, no dropout)
//! unmerge: W <- W - (W phi) Z,  Z = (I_r + s psi phi)^-1 s psi   (Z solved on the host, f64)
//! ```
//!
//! `M` is the optional dropout mask on W ([`Dropout`]); `p = 0` means no mask.
//!
//! The two K-extended products (`y` and `dx`) run either as one fused GEMM
//! (`crate::cuda::gemm`, when built in) or composed: the rank-r product `lowrank_addmm_*` (on
//! the [`super::ProductEngine`]) writes the output, then a cuBLASLt GEMM adds the frozen part
//! to it (beta = 1). [`Path`]
//! picks; `Auto` is the composed path (faster on an H200 at every measured shape); `Tuned`
//! measures the candidates once per shape and keeps the fastest.
//!
//! Every entry point checks shapes (the buffers must hold exactly the contiguous row-major
//! matrices of [`LayerShape`]), dtype and 16-byte alignment before the first launch, and
//! maps every launch error to [`Error::Cuda`]. Gradients of the adapter are accumulated
//! (`+=`) into f32 buffers, so layers that share a pair sum naturally. Work is queued on the
//! given stream (or the backend's default one); functions return once it is queued, except
//! `wegeft_unmerge`, which waits for its small host solve.

use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::{bf16, f16};

use super::context::CudaBackend;
use super::exec::{Exec, Scratch};
use super::product::Product;
use super::tune::{run_tuned, Pair, TuneKey};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::shape::{checked_len, LayerShape};

/// How the two K-extended GEMMs (`y = [x|u][W|C]^T`, `dx = [G|v][W;psi]`) are run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Path {
    /// `Composed`: measured on an H200 (BENCHMARKS.md), cuBLASLt for the frozen product plus
    /// the rank-r products in cuBLASLt was as fast as or faster than `FusedSm90` in the
    /// training step and at every backward of the layer benchmark (the fused GEMM's core runs
    /// at 0.95-0.97x cuBLAS's speed in NT form, 0.86-0.95x in NN, at 4096^3 since session 9;
    /// the forward at T=8192, d=4096 ties, 1.20x the frozen GEMM). `Fused`, `FusedSm90` and
    /// `Tuned` stay available.
    #[default]
    Auto,
    /// The fused K-extended GEMM (`crate::cuda::gemm`); an error when it is not built in.
    Fused,
    /// As `Fused`, with the sm_90a wgmma kernels for bf16/f16 on a compute capability 9.0
    /// device (TMA-fed where every operand allows a tensor map, cp.async-fed otherwise; the
    /// sm_80 kernels elsewhere and for f32). There, without dropout, the forward's u and C come
    /// from one launch (`wegeft_uc_*`, small layers) or the whole forward is one launch
    /// (`wegeft_fwd_*_tma`, layers whose x and W exceed 8 MiB), and a large layer's backward
    /// runs v, S, dpsi, dphi and dx in one launch (`wegeft_bwd_*_tma`; dphi after it with
    /// dropout; not yet run on a GPU).
    FusedSm90,
    /// The rank-r part written to the output first (`lowrank_addmm_*`, on the
    /// [`super::ProductEngine`]: cuBLASLt by default), then the frozen product in cuBLASLt
    /// added to it in the GEMM's epilogue (beta = 1).
    Composed,
    /// Per shape, the fastest of the above as measured on this device at the shape's first
    /// call ([`crate::cuda::tune`]); bitwise reproducible within a process, not across them.
    Tuned,
}

/// Whether the fused K-extended GEMM (`src/cuda/gemm.rs`) is compiled into this build.
pub const FUSED_GEMM_BUILT: bool = cfg!(wegeft_gemm);

/// Dropout on W inside `C = s (M .* W) phi` (and the matching `dphi`): element `(o, i)` of W
/// is kept iff [`dropout_keep`]`(seed, o, i, p)`, and kept elements are scaled by `1/(1-p)`.
/// The mask is never stored; backward regenerates it from `(seed, o, i)`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an element, `0 <= p < 1` (0: no mask).
    pub p: f32,
    /// The mask's seed; use a new one per step, the same one for a step's forward and backward.
    pub seed: u64,
}

impl Dropout {
    /// No dropout.
    pub const NONE: Dropout = Dropout { p: 0.0, seed: 0 };

    fn check(&self) -> Result<()> {
        if !(self.p >= 0.0 && self.p < 1.0) {
            return Err(Error::invalid("dropout.p", format!("must be in [0, 1), got {}", self.p)));
        }
        Ok(())
    }
}

/// The splitmix64-based hash of `kernels/common.cuh` (`mask_hash`): top 32 bits of the
/// splitmix64 finalizer of `seed + 0x9E3779B97F4A7C15 * (((row << 32) | col) + 1)`.
pub fn dropout_hash(seed: u64, row: u32, col: u32) -> u32 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15u64.wrapping_mul((((row as u64) << 32) | col as u64).wrapping_add(1)));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) as u32
}

/// Whether element `(row, col)` of W survives dropout with probability `p` and `seed`:
/// `hash >= ceil(p * 2^32)`, i.e. `hash / 2^32 >= p`. Mirrors the kernels exactly.
pub fn dropout_keep(seed: u64, row: u32, col: u32, p: f32) -> bool {
    if p <= 0.0 {
        return true;
    }
    let thresh = ((p as f64) * 4294967296.0).ceil() as u32;
    dropout_hash(seed, row, col) >= thresh
}

/// Where and how a call runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Launch<'a> {
    /// The stream to queue work on (`None`: the backend's default stream). It must belong to
    /// the backend's context.
    pub stream: Option<&'a CudaStream>,
    /// Fused or composed K-extended GEMMs.
    pub path: Path,
}

impl<'a> Launch<'a> {
    /// The default stream, [`Path::Auto`].
    pub fn new() -> Self {
        Self::default()
    }
    /// On `stream`.
    pub fn on(stream: &'a CudaStream) -> Self {
        Launch { stream: Some(stream), path: Path::Auto }
    }
    /// With path `path`.
    pub fn path(mut self, path: Path) -> Self {
        self.path = path;
        self
    }
}

/// The output of a K-extended product: `(d, ldd, m, n)`.
type Out = (CUdeviceptr, usize, usize, usize);

// ---- checks -------------------------------------------------------------------------------

fn reshape(s: &LayerShape) -> Result<LayerShape> {
    LayerShape::new(s.tokens, s.d_in, s.d_out, s.rank)
}

fn check_scale(scale: f32) -> Result<()> {
    if !scale.is_finite() {
        return Err(Error::invalid("scale", format!("must be finite, got {scale}")));
    }
    Ok(())
}

/// `Path::Fused` without the fused GEMM is refused before anything is launched.
fn check_path(path: Path) -> Result<()> {
    if matches!(path, Path::Fused | Path::FusedSm90) && !FUSED_GEMM_BUILT {
        return Err(Error::invalid("path", "Path::Fused asked for, but the fused K-extended GEMM is not built in"));
    }
    Ok(())
}

fn check_ptr(arg: &'static str, ptr: CUdeviceptr) -> Result<()> {
    if ptr == 0 {
        return Err(Error::invalid(arg, "null device pointer"));
    }
    if ptr % 16 != 0 {
        return Err(Error::Align { arg, addr: ptr as usize, align: 16 });
    }
    Ok(())
}

fn check_len(arg: &'static str, len: usize, (rows, cols): (usize, usize)) -> Result<()> {
    let needed = checked_len(arg, rows, cols)?;
    if len != needed {
        return Err(Error::Layout { arg, rows, cols, ld: cols, needed, len });
    }
    Ok(())
}

/// A device buffer argument of a safe entry point: its shape is checked before anything runs.
fn check_slice<T>(dev: &CudaBackend, arg: &'static str, s: &CudaSlice<T>, shape: (usize, usize)) -> Result<()> {
    check_len(arg, s.len(), shape)?;
    if s.context() != dev.context() {
        return Err(Error::invalid(arg, "buffer belongs to another CUDA context"));
    }
    Ok(())
}

fn kname(op: &str, d: DType) -> String {
    format!("{op}_{}", d.name())
}

macro_rules! dispatch {
    ($dtype:expr, $f:ident :: <T> ($($arg:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
        }
    };
}

// ---- the raw-pointer core -----------------------------------------------------------------

/// The layer algorithms, for any [`Exec`] (the device, or the tests' host interpreter).
pub(crate) trait Layer: Exec {
    /// `D[m x n] = A1 B1^T + A2 B2^T (+ bias)`, A1 `m x k1`, B1 `n x k1`, A2 `m x k2`, B2 `n x k2`.
    unsafe fn kext_nt<T: Element>(&self, stream: CUstream, path: Path, p1: Pair, p2: Pair, bias: Option<CUdeviceptr>, out: Out) -> Result<()> {
        let run = |path: Path| unsafe { self.kext_on::<T>(true, stream, path, p1, p2, bias, out) };
        if path != Path::Tuned {
            return run(path);
        }
        // SAFETY: each run overwrites D (beta = 0) and reads only the operands and the bias.
        unsafe { run_tuned(self, stream, TuneKey::new(true, T::DTYPE, p1, p2, bias.is_some(), (out.1, out.2, out.3)), &run) }
    }

    /// `D[m x n] = A1 B1 + A2 B2`, A1 `m x k1`, B1 `k1 x n`, A2 `m x k2`, B2 `k2 x n`.
    unsafe fn kext_nn<T: Element>(&self, stream: CUstream, path: Path, p1: Pair, p2: Pair, out: Out) -> Result<()> {
        let run = |path: Path| unsafe { self.kext_on::<T>(false, stream, path, p1, p2, None, out) };
        if path != Path::Tuned {
            return run(path);
        }
        // SAFETY: as in kext_nt.
        unsafe { run_tuned(self, stream, TuneKey::new(false, T::DTYPE, p1, p2, false, (out.1, out.2, out.3)), &run) }
    }

    /// [`Layer::kext_nt`] (`nt`) or [`Layer::kext_nn`] on `path` (not `Tuned`): the fused GEMM
    /// when `path` takes it, else `lowrank_addmm_*` for the second pair, then cuBLASLt adding the
    /// first pair's product to it.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kext_on<T: Element>(
        &self,
        nt: bool,
        stream: CUstream,
        path: Path,
        (a1, lda1, b1, ldb1, k1): Pair,
        (a2, lda2, b2, ldb2, k2): Pair,
        bias: Option<CUdeviceptr>,
        (d, ldd, m, n): Out,
    ) -> Result<()> {
        let dt = T::DTYPE;
        if self.kext_fused::<T>(nt, stream, path, ((a1, lda1, b1, ldb1, k1), (a2, lda2, b2, ldb2, k2), bias, (d, ldd, m, n)), false)? {
            return Ok(());
        }
        let (what, addmm) = if nt { ("frozen GEMM x W^T", "lowrank_addmm_nt") } else { ("frozen GEMM G W", "lowrank_addmm_nn") };
        // The rank-r term first, written to D; then the frozen GEMM adds itself to it (beta 1,
        // the bias in its epilogue). D is written, read once by the GEMM's epilogue and written
        // again; the other order (GEMM, then `D += A2 B2`) reads and writes D after the GEMM, a
        // pass of its own over T x d_out (45 us at T = 8192, d = 4096 on an H200).
        self.product(&kname(addmm, dt), dt, stream, Product::new(a2, lda2, b2, ldb2, d, ldd, m, n, k2))?;
        self.gemm(what, dt, stream, false, nt, m, n, k1, a1, lda1, b1, ldb1, bias, 1.0, d, ldd)
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn forward_impl<T: Element>(
        &self,
        s: &LayerShape,
        stream: CUstream,
        path: Path,
        x: CUdeviceptr,
        w: CUdeviceptr,
        bias: Option<CUdeviceptr>,
        phi: CUdeviceptr,
        psi: CUdeviceptr,
        scale: f32,
        drop: Dropout,
        u: CUdeviceptr,
        c: CUdeviceptr,
        y: CUdeviceptr,
    ) -> Result<()> {
        let (t, din, dout, r) = (s.tokens, s.d_in, s.d_out, s.rank);
        let dt = T::DTYPE;
        let (p1, p2, out) = ((x, din, w, din, din), (u, r, c, r, r), (y, dout, t, dout));
        // FusedSm90 without dropout: the whole forward in one launch (large layers), or u and
        // C in one launch with the GEMM as its programmatic dependent, multiplying x and W
        // while u and C are computed (small ones).
        let uc = super::exec::WegeftUc { tokens: t, d_in: din, d_out: dout, rank: r, x, w, psi, phi, u, c, scale };
        if drop.p == 0.0 && self.fused_forward::<T>(stream, path, &uc, bias, y)? {
            return Ok(());
        }
        if drop.p == 0.0 && self.fused_uc::<T>(stream, path, &uc)? {
            if self.kext_fused::<T>(true, stream, path, (p1, p2, bias, out), true)? {
                return Ok(());
            }
            return self.kext_nt::<T>(stream, path, p1, p2, bias, out);
        }
        self.product(&kname("lowrank_u", dt), dt, stream, Product::new(x, din, psi, din, u, r, t, r, din))?;
        self.product(
            &kname("wegeft_c", dt),
            dt,
            stream,
            Product::new(w, din, phi, r, c, r, dout, r, din).alpha(scale).dropout(drop.p, drop.seed),
        )?;
        self.kext_nt::<T>(stream, path, p1, p2, bias, out)
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn backward_impl<T: Element>(
        &self,
        s: &LayerShape,
        stream: CUstream,
        path: Path,
        x: CUdeviceptr,
        w: CUdeviceptr,
        psi: CUdeviceptr,
        scale: f32,
        drop: Dropout,
        u: CUdeviceptr,
        c: CUdeviceptr,
        g: CUdeviceptr,
        dx: Option<CUdeviceptr>,
        dphi: CUdeviceptr,
        dpsi: CUdeviceptr,
    ) -> Result<()> {
        const OP: &str = "wegeft_backward";
        let (t, din, dout, r) = (s.tokens, s.d_in, s.d_out, s.rank);
        let dt = T::DTYPE;
        let v = self.scratch(stream, checked_len("v", t, r)? * dt.size(), OP)?;
        let big_s = self.scratch(stream, checked_len("S", dout, r)? * 4, OP)?;
        // FusedSm90, large layers, dx wanted: v = G C, S = G^T u, dpsi += v^T x, dx and (without
        // dropout) dphi in one launch; with dropout dphi follows over the masked W.
        let dphi_in_launch = drop.p == 0.0;
        let one_launch = match dx {
            Some(dx) => {
                let dphi_in = if dphi_in_launch { dphi } else { 0 };
                let (vp, sp) = (v.ptr(), big_s.ptr());
                let bw = super::exec::WegeftBwd { tokens: t, d_in: din, d_out: dout, rank: r, g, w, c, psi, u, x, v: vp, s: sp, dpsi, dx, dphi: dphi_in, scale };
                self.fused_backward::<T>(stream, path, &bw)?
            }
            None => false,
        };
        if !one_launch {
            // v = G C (T x r); S = G^T u (d_out x r, f32).
            self.product(&kname("lowrank_v", dt), dt, stream, Product::new(g, dout, c, r, v.ptr(), r, t, r, dout))?;
            self.product(&kname("lowrank_s", dt), DType::F32, stream, Product::new(g, dout, u, r, big_s.ptr(), r, dout, r, t))?;
        }
        // dphi += s (M .* W)^T S; dpsi += v^T x.
        if !(one_launch && dphi_in_launch) {
            self.product(
                &kname("lowrank_dphi", dt),
                DType::F32,
                stream,
                Product::new(w, din, big_s.ptr(), r, dphi, r, din, r, dout).alpha(scale).beta(1.0).dropout(drop.p, drop.seed),
            )?;
        }
        if !one_launch {
            self.product(&kname("lowrank_dpsi", dt), DType::F32, stream, Product::new(v.ptr(), r, x, din, dpsi, din, r, din, t).beta(1.0))?;
        }
        if let (Some(dx), false) = (dx, one_launch) {
            self.kext_nn::<T>(stream, path, (g, dout, w, din, dout), (v.ptr(), r, psi, din, r), (dx, din, t, din))?;
        }
        Ok(())
    }

    unsafe fn merge_impl<T: Element>(&self, s: &LayerShape, stream: CUstream, w: CUdeviceptr, phi: CUdeviceptr, psi: CUdeviceptr, scale: f32) -> Result<()> {
        let (din, dout, r) = (s.d_in, s.d_out, s.rank);
        let dt = T::DTYPE;
        let c = self.scratch(stream, checked_len("C", dout, r)? * dt.size(), "wegeft_merge")?;
        self.product(&kname("wegeft_c", dt), dt, stream, Product::new(w, din, phi, r, c.ptr(), r, dout, r, din).alpha(scale))?;
        self.product(&kname("merge", dt), dt, stream, Product::new(c.ptr(), r, psi, din, w, din, dout, din, r).beta(1.0))
    }

    unsafe fn unmerge_impl<T: Element>(&self, s: &LayerShape, stream: CUstream, w: CUdeviceptr, phi: CUdeviceptr, psi: CUdeviceptr, scale: f32) -> Result<()> {
        const OP: &str = "wegeft_unmerge";
        let (din, dout, r) = (s.d_in, s.d_out, s.rank);
        let dt = T::DTYPE;
        // K0 = psi phi (r x r) on the device; psi to the host.
        let k0_dev = self.scratch(stream, checked_len("psi phi", r, r)? * 4, OP)?;
        self.product(&kname("unmerge_psiphi", dt), DType::F32, stream, Product::new(psi, din, phi, r, k0_dev.ptr(), r, r, r, din))?;
        let mut k0 = vec![0f32; r * r];
        let mut psi_h = vec![T::default(); checked_len("psi", r, din)?];
        self.download(&mut k0, k0_dev.ptr(), stream, OP)?;
        self.download(&mut psi_h, psi, stream, OP)?;
        self.sync(stream, OP)?;
        // K = I_r + s K0; Z = K^-1 (s psi), in f64.
        let sc = scale as f64;
        let mut k: Vec<f64> = k0.iter().map(|&v| sc * v as f64).collect();
        for i in 0..r {
            k[i * r + i] += 1.0;
        }
        let spsi: Vec<f64> = psi_h.iter().map(|v| sc * v.to_f32() as f64).collect();
        let z: Vec<f32> = crate::reference::solve(&k, &spsi, r, din)?.into_iter().map(|v| v as f32).collect();
        let z_dev = self.scratch(stream, z.len() * 4, OP)?;
        self.upload_f32(z_dev.ptr(), &z, stream, OP)?;
        // P = W' phi (d_out x r, f32); W <- W' - P Z.
        let p = self.scratch(stream, checked_len("W phi", dout, r)? * 4, OP)?;
        self.product(&kname("unmerge_wphi", dt), DType::F32, stream, Product::new(w, din, phi, r, p.ptr(), r, dout, r, din))?;
        self.product(&kname("unmerge", dt), dt, stream, Product::new(p.ptr(), r, z_dev.ptr(), din, w, din, dout, din, r).alpha(-1.0).beta(1.0))?;
        // `z` (host) must outlive its copy.
        self.sync(stream, OP)?;
        drop(z);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn lora_forward_impl<T: Element>(
        &self,
        s: &LayerShape,
        stream: CUstream,
        path: Path,
        x: CUdeviceptr,
        w: CUdeviceptr,
        bias: Option<CUdeviceptr>,
        a: CUdeviceptr,
        b: CUdeviceptr,
        scale: f32,
        xa: CUdeviceptr,
        y: CUdeviceptr,
    ) -> Result<()> {
        let (t, din, dout, r) = (s.tokens, s.d_in, s.d_out, s.rank);
        let dt = T::DTYPE;
        self.product(&kname("lowrank_u", dt), dt, stream, Product::new(x, din, a, din, xa, r, t, r, din).alpha(scale))?;
        self.kext_nt::<T>(stream, path, (x, din, w, din, din), (xa, r, b, r, r), bias, (y, dout, t, dout))
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn lora_backward_impl<T: Element>(
        &self,
        s: &LayerShape,
        stream: CUstream,
        path: Path,
        x: CUdeviceptr,
        w: CUdeviceptr,
        a: CUdeviceptr,
        b: CUdeviceptr,
        scale: f32,
        xa: CUdeviceptr,
        g: CUdeviceptr,
        dx: Option<CUdeviceptr>,
        da: CUdeviceptr,
        db: CUdeviceptr,
    ) -> Result<()> {
        let (t, din, dout, r) = (s.tokens, s.d_in, s.d_out, s.rank);
        let dt = T::DTYPE;
        let gb = self.scratch(stream, checked_len("G B", t, r)? * dt.size(), "lora_backward")?;
        // gb = s G B (T x r); dB += G^T xa (xa = s x A^T); dA += gb^T x; dx = G W + gb A.
        self.product(&kname("lowrank_v", dt), dt, stream, Product::new(g, dout, b, r, gb.ptr(), r, t, r, dout).alpha(scale))?;
        self.product(&kname("lowrank_s", dt), DType::F32, stream, Product::new(g, dout, xa, r, db, r, dout, r, t).beta(1.0))?;
        self.product(&kname("lowrank_dpsi", dt), DType::F32, stream, Product::new(gb.ptr(), r, x, din, da, din, r, din, t).beta(1.0))?;
        if let Some(dx) = dx {
            self.kext_nn::<T>(stream, path, (g, dout, w, din, dout), (gb.ptr(), r, a, din, r), (dx, din, t, din))?;
        }
        Ok(())
    }
}

impl<E: Exec> Layer for E {}

impl CudaBackend {
    fn stream_of<'a>(&'a self, launch: &Launch<'a>) -> Result<&'a CudaStream> {
        let s = launch.stream.unwrap_or(self.stream());
        if s.context() != self.context() {
            return Err(Error::invalid("stream", "stream belongs to another CUDA context"));
        }
        Ok(s)
    }

}

// ---- raw-pointer entry points (for frameworks) --------------------------------------------

/// Checks the pointers of a raw call (non-null, 16-byte aligned).
fn check_ptrs(ptrs: &[(&'static str, CUdeviceptr)]) -> Result<()> {
    ptrs.iter().try_for_each(|&(arg, p)| check_ptr(arg, p))
}

impl CudaBackend {
    /// Raw-pointer [`CudaBackend::wegeft_forward`]: every pointer is a contiguous row-major
    /// device buffer of `dtype` with the shape of [`LayerShape`] (`u`: `T x r`, `c`: `d_out x r`,
    /// `y`: `T x d_out`), 16-byte aligned; work is queued on `stream`.
    ///
    /// # Safety
    /// Every pointer must be a live allocation of this backend's context holding at least the
    /// elements its shape needs, `stream` must belong to the context, the outputs must not
    /// overlap the inputs, and the buffers must stay alive until the stream has run the work.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn wegeft_forward_raw(
        &self,
        dtype: DType,
        shape: &LayerShape,
        stream: CUstream,
        x: CUdeviceptr,
        w: CUdeviceptr,
        bias: Option<CUdeviceptr>,
        phi: CUdeviceptr,
        psi: CUdeviceptr,
        scale: f32,
        dropout: Dropout,
        u: CUdeviceptr,
        c: CUdeviceptr,
        y: CUdeviceptr,
        path: Path,
    ) -> Result<()> {
        let s = reshape(shape)?;
        check_path(path)?;
        check_scale(scale)?;
        dropout.check()?;
        check_ptrs(&[("x", x), ("W", w), ("phi", phi), ("psi", psi), ("u", u), ("C", c), ("y", y)])?;
        if let Some(b) = bias {
            check_ptr("b", b)?;
        }
        dispatch!(dtype, forward_impl_dispatch::<T>(self, &s, stream, path, x, w, bias, phi, psi, scale, dropout, u, c, y))
    }

    /// Raw-pointer [`CudaBackend::wegeft_backward`] (`dphi`, `dpsi`: f32, accumulated into).
    ///
    /// # Safety
    /// As for [`CudaBackend::wegeft_forward_raw`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn wegeft_backward_raw(
        &self,
        dtype: DType,
        shape: &LayerShape,
        stream: CUstream,
        x: CUdeviceptr,
        w: CUdeviceptr,
        psi: CUdeviceptr,
        scale: f32,
        dropout: Dropout,
        u: CUdeviceptr,
        c: CUdeviceptr,
        g: CUdeviceptr,
        dx: Option<CUdeviceptr>,
        dphi: CUdeviceptr,
        dpsi: CUdeviceptr,
        path: Path,
    ) -> Result<()> {
        let s = reshape(shape)?;
        check_path(path)?;
        check_scale(scale)?;
        dropout.check()?;
        check_ptrs(&[("x", x), ("W", w), ("psi", psi), ("u", u), ("C", c), ("G", g), ("dphi", dphi), ("dpsi", dpsi)])?;
        if let Some(p) = dx {
            check_ptr("dx", p)?;
        }
        dispatch!(dtype, backward_impl_dispatch::<T>(self, &s, stream, path, x, w, psi, scale, dropout, u, c, g, dx, dphi, dpsi))
    }

    /// Raw-pointer [`CudaBackend::wegeft_merge`].
    ///
    /// # Safety
    /// As for [`CudaBackend::wegeft_forward_raw`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn wegeft_merge_raw(&self, dtype: DType, shape: &LayerShape, stream: CUstream, w: CUdeviceptr, phi: CUdeviceptr, psi: CUdeviceptr, scale: f32) -> Result<()> {
        let s = reshape(shape)?;
        check_scale(scale)?;
        check_ptrs(&[("W", w), ("phi", phi), ("psi", psi)])?;
        dispatch!(dtype, merge_impl_dispatch::<T>(self, &s, stream, w, phi, psi, scale))
    }

    /// Raw-pointer [`CudaBackend::wegeft_unmerge`]. Synchronises `stream`.
    ///
    /// # Safety
    /// As for [`CudaBackend::wegeft_forward_raw`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn wegeft_unmerge_raw(&self, dtype: DType, shape: &LayerShape, stream: CUstream, w: CUdeviceptr, phi: CUdeviceptr, psi: CUdeviceptr, scale: f32) -> Result<()> {
        let s = reshape(shape)?;
        check_scale(scale)?;
        check_ptrs(&[("W", w), ("phi", phi), ("psi", psi)])?;
        dispatch!(dtype, unmerge_impl_dispatch::<T>(self, &s, stream, w, phi, psi, scale))
    }

    /// Raw-pointer [`CudaBackend::lora_forward`].
    ///
    /// # Safety
    /// As for [`CudaBackend::wegeft_forward_raw`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn lora_forward_raw(
        &self,
        dtype: DType,
        shape: &LayerShape,
        stream: CUstream,
        x: CUdeviceptr,
        w: CUdeviceptr,
        bias: Option<CUdeviceptr>,
        a: CUdeviceptr,
        b: CUdeviceptr,
        scale: f32,
        xa: CUdeviceptr,
        y: CUdeviceptr,
        path: Path,
    ) -> Result<()> {
        let s = reshape(shape)?;
        check_path(path)?;
        check_scale(scale)?;
        check_ptrs(&[("x", x), ("W", w), ("A", a), ("B", b), ("xa", xa), ("y", y)])?;
        if let Some(p) = bias {
            check_ptr("b", p)?;
        }
        dispatch!(dtype, lora_forward_dispatch::<T>(self, &s, stream, path, x, w, bias, a, b, scale, xa, y))
    }

    /// Raw-pointer [`CudaBackend::lora_backward`] (`da`, `db`: f32, accumulated into).
    ///
    /// # Safety
    /// As for [`CudaBackend::wegeft_forward_raw`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn lora_backward_raw(
        &self,
        dtype: DType,
        shape: &LayerShape,
        stream: CUstream,
        x: CUdeviceptr,
        w: CUdeviceptr,
        a: CUdeviceptr,
        b: CUdeviceptr,
        scale: f32,
        xa: CUdeviceptr,
        g: CUdeviceptr,
        dx: Option<CUdeviceptr>,
        da: CUdeviceptr,
        db: CUdeviceptr,
        path: Path,
    ) -> Result<()> {
        let s = reshape(shape)?;
        check_path(path)?;
        check_scale(scale)?;
        check_ptrs(&[("x", x), ("W", w), ("A", a), ("B", b), ("xa", xa), ("G", g), ("dA", da), ("dB", db)])?;
        if let Some(p) = dx {
            check_ptr("dx", p)?;
        }
        dispatch!(dtype, lora_backward_dispatch::<T>(self, &s, stream, path, x, w, a, b, scale, xa, g, dx, da, db))
    }

    /// Raw-pointer [`CudaBackend::frozen_forward`].
    ///
    /// # Safety
    /// As for [`CudaBackend::wegeft_forward_raw`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn frozen_forward_raw(&self, dtype: DType, shape: &LayerShape, stream: CUstream, x: CUdeviceptr, w: CUdeviceptr, bias: Option<CUdeviceptr>, y: CUdeviceptr) -> Result<()> {
        let s = reshape(shape)?;
        check_ptrs(&[("x", x), ("W", w), ("y", y)])?;
        if let Some(p) = bias {
            check_ptr("b", p)?;
        }
        self.lt_gemm("frozen_forward", dtype, stream, false, true, s.tokens, s.d_out, s.d_in, x, s.d_in, w, s.d_in, bias, 0.0, y, s.d_out)
    }

    /// Raw-pointer [`CudaBackend::frozen_backward`].
    ///
    /// # Safety
    /// As for [`CudaBackend::wegeft_forward_raw`].
    pub unsafe fn frozen_backward_raw(&self, dtype: DType, shape: &LayerShape, stream: CUstream, w: CUdeviceptr, g: CUdeviceptr, dx: CUdeviceptr) -> Result<()> {
        let s = reshape(shape)?;
        check_ptrs(&[("W", w), ("G", g), ("dx", dx)])?;
        self.lt_gemm("frozen_backward", dtype, stream, false, false, s.tokens, s.d_in, s.d_out, g, s.d_out, w, s.d_in, None, 0.0, dx, s.d_in)
    }
}

// Free functions so that `dispatch!` can name them with a type parameter.
#[allow(clippy::too_many_arguments)]
unsafe fn forward_impl_dispatch<T: Element>(
    d: &CudaBackend, s: &LayerShape, st: CUstream, path: Path, x: CUdeviceptr, w: CUdeviceptr, bias: Option<CUdeviceptr>,
    phi: CUdeviceptr, psi: CUdeviceptr, scale: f32, drop: Dropout, u: CUdeviceptr, c: CUdeviceptr, y: CUdeviceptr,
) -> Result<()> {
    d.forward_impl::<T>(s, st, path, x, w, bias, phi, psi, scale, drop, u, c, y)
}
#[allow(clippy::too_many_arguments)]
unsafe fn backward_impl_dispatch<T: Element>(
    d: &CudaBackend, s: &LayerShape, st: CUstream, path: Path, x: CUdeviceptr, w: CUdeviceptr, psi: CUdeviceptr, scale: f32,
    drop: Dropout, u: CUdeviceptr, c: CUdeviceptr, g: CUdeviceptr, dx: Option<CUdeviceptr>, dphi: CUdeviceptr, dpsi: CUdeviceptr,
) -> Result<()> {
    d.backward_impl::<T>(s, st, path, x, w, psi, scale, drop, u, c, g, dx, dphi, dpsi)
}
unsafe fn merge_impl_dispatch<T: Element>(d: &CudaBackend, s: &LayerShape, st: CUstream, w: CUdeviceptr, phi: CUdeviceptr, psi: CUdeviceptr, scale: f32) -> Result<()> {
    d.merge_impl::<T>(s, st, w, phi, psi, scale)
}
unsafe fn unmerge_impl_dispatch<T: Element>(d: &CudaBackend, s: &LayerShape, st: CUstream, w: CUdeviceptr, phi: CUdeviceptr, psi: CUdeviceptr, scale: f32) -> Result<()> {
    d.unmerge_impl::<T>(s, st, w, phi, psi, scale)
}
#[allow(clippy::too_many_arguments)]
unsafe fn lora_forward_dispatch<T: Element>(
    d: &CudaBackend, s: &LayerShape, st: CUstream, path: Path, x: CUdeviceptr, w: CUdeviceptr, bias: Option<CUdeviceptr>,
    a: CUdeviceptr, b: CUdeviceptr, scale: f32, xa: CUdeviceptr, y: CUdeviceptr,
) -> Result<()> {
    d.lora_forward_impl::<T>(s, st, path, x, w, bias, a, b, scale, xa, y)
}
#[allow(clippy::too_many_arguments)]
unsafe fn lora_backward_dispatch<T: Element>(
    d: &CudaBackend, s: &LayerShape, st: CUstream, path: Path, x: CUdeviceptr, w: CUdeviceptr, a: CUdeviceptr, b: CUdeviceptr,
    scale: f32, xa: CUdeviceptr, g: CUdeviceptr, dx: Option<CUdeviceptr>, da: CUdeviceptr, db: CUdeviceptr,
) -> Result<()> {
    d.lora_backward_impl::<T>(s, st, path, x, w, a, b, scale, xa, g, dx, da, db)
}

// ---- safe entry points on CudaSlice -------------------------------------------------------

impl CudaBackend {
    /// WeGeFT forward `y = x W^T + u C^T (+ b)`, saving `u = x psi^T` (`T x r`) and
    /// `C = s (M .* W) phi` (`d_out x r`) for the backward pass.
    ///
    /// Shapes: `x` `T x d_in`, `w` `d_out x d_in`, `bias` `d_out`, `phi` `d_in x r`,
    /// `psi` `r x d_in`, `y` `T x d_out` (overwritten).
    #[allow(clippy::too_many_arguments)]
    pub fn wegeft_forward<T: Element>(
        &self,
        shape: &LayerShape,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
        phi: &CudaSlice<T>,
        psi: &CudaSlice<T>,
        scale: f32,
        dropout: Dropout,
        u: &mut CudaSlice<T>,
        c: &mut CudaSlice<T>,
        y: &mut CudaSlice<T>,
        launch: Launch<'_>,
    ) -> Result<()> {
        let s = reshape(shape)?;
        check_slice(self, "x", x, s.x())?;
        check_slice(self, "W", w, s.w())?;
        if let Some(b) = bias {
            check_slice(self, "b", b, (1, s.d_out))?;
        }
        check_slice(self, "phi", phi, s.phi())?;
        check_slice(self, "psi", psi, s.psi())?;
        check_slice(self, "u", u, s.u())?;
        check_slice(self, "C", c, s.c())?;
        check_slice(self, "y", y, s.y())?;
        let st = self.stream_of(&launch)?;
        let (xp, _g1) = x.device_ptr(st);
        let (wp, _g2) = w.device_ptr(st);
        let bg = bias.map(|b| b.device_ptr(st));
        let (php, _g3) = phi.device_ptr(st);
        let (psp, _g4) = psi.device_ptr(st);
        let (up, _g5) = u.device_ptr_mut(st);
        let (cp, _g6) = c.device_ptr_mut(st);
        let (yp, _g7) = y.device_ptr_mut(st);
        // SAFETY: every buffer was checked to hold its matrix and to live on this context;
        // the guards keep cudarc's stream ordering until the work is queued.
        unsafe {
            self.wegeft_forward_raw(
                T::DTYPE, &s, st.cu_stream(), xp, wp, bg.as_ref().map(|g| g.0), php, psp, scale, dropout, up, cp, yp, launch.path,
            )
        }
    }

    /// WeGeFT backward from `G = dL/dy` (`T x d_out`), with `u`, `C` saved by the forward:
    /// `dx = G W + v psi` (overwritten; `None` skips it), `dphi += s (M .* W)^T (G^T u)`,
    /// `dpsi += (G C)^T x`. `dphi` (`d_in x r`) and `dpsi` (`r x d_in`) are f32 accumulators.
    #[allow(clippy::too_many_arguments)]
    pub fn wegeft_backward<T: Element>(
        &self,
        shape: &LayerShape,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        psi: &CudaSlice<T>,
        scale: f32,
        dropout: Dropout,
        u: &CudaSlice<T>,
        c: &CudaSlice<T>,
        g: &CudaSlice<T>,
        dx: Option<&mut CudaSlice<T>>,
        dphi: &mut CudaSlice<f32>,
        dpsi: &mut CudaSlice<f32>,
        launch: Launch<'_>,
    ) -> Result<()> {
        let s = reshape(shape)?;
        check_slice(self, "x", x, s.x())?;
        check_slice(self, "W", w, s.w())?;
        check_slice(self, "psi", psi, s.psi())?;
        check_slice(self, "u", u, s.u())?;
        check_slice(self, "C", c, s.c())?;
        check_slice(self, "G", g, s.y())?;
        if let Some(dx) = dx.as_deref() {
            check_slice(self, "dx", dx, s.x())?;
        }
        check_slice(self, "dphi", dphi, s.phi())?;
        check_slice(self, "dpsi", dpsi, s.psi())?;
        let st = self.stream_of(&launch)?;
        let (xp, _g1) = x.device_ptr(st);
        let (wp, _g2) = w.device_ptr(st);
        let (psp, _g3) = psi.device_ptr(st);
        let (up, _g4) = u.device_ptr(st);
        let (cp, _g5) = c.device_ptr(st);
        let (gp, _g6) = g.device_ptr(st);
        let dxg = dx.map(|d| d.device_ptr_mut(st));
        let (dphp, _g7) = dphi.device_ptr_mut(st);
        let (dpsp, _g8) = dpsi.device_ptr_mut(st);
        // SAFETY: as in wegeft_forward.
        unsafe {
            self.wegeft_backward_raw(
                T::DTYPE, &s, st.cu_stream(), xp, wp, psp, scale, dropout, up, cp, gp, dxg.as_ref().map(|g| g.0), dphp, dpsp, launch.path,
            )
        }
    }

    /// Merge in place: `W <- W + C psi` with `C = s W phi` (`W (I + s phi psi)`).
    pub fn wegeft_merge<T: Element>(
        &self,
        shape: &LayerShape,
        w: &mut CudaSlice<T>,
        phi: &CudaSlice<T>,
        psi: &CudaSlice<T>,
        scale: f32,
        stream: Option<&CudaStream>,
    ) -> Result<()> {
        let s = reshape(shape)?;
        check_slice(self, "W", w, s.w())?;
        check_slice(self, "phi", phi, s.phi())?;
        check_slice(self, "psi", psi, s.psi())?;
        let launch = Launch { stream, path: Path::Auto };
        let st = self.stream_of(&launch)?;
        let (php, _g1) = phi.device_ptr(st);
        let (psp, _g2) = psi.device_ptr(st);
        let (wp, _g3) = w.device_ptr_mut(st);
        // SAFETY: as in wegeft_forward.
        unsafe { self.wegeft_merge_raw(T::DTYPE, &s, st.cu_stream(), wp, php, psp, scale) }
    }

    /// Exact unmerge in place: `W <- W - (W phi) Z`, `Z = (I_r + s psi phi)^-1 s psi`
    /// (`W (I + s phi psi)^-1`). `Z` is solved on the host in f64; the call waits for the
    /// stream. [`Error::Numerical`] when `I_r + s psi phi` is singular.
    pub fn wegeft_unmerge<T: Element>(
        &self,
        shape: &LayerShape,
        w: &mut CudaSlice<T>,
        phi: &CudaSlice<T>,
        psi: &CudaSlice<T>,
        scale: f32,
        stream: Option<&CudaStream>,
    ) -> Result<()> {
        let s = reshape(shape)?;
        check_slice(self, "W", w, s.w())?;
        check_slice(self, "phi", phi, s.phi())?;
        check_slice(self, "psi", psi, s.psi())?;
        let launch = Launch { stream, path: Path::Auto };
        let st = self.stream_of(&launch)?;
        let (php, _g1) = phi.device_ptr(st);
        let (psp, _g2) = psi.device_ptr(st);
        let (wp, _g3) = w.device_ptr_mut(st);
        // SAFETY: as in wegeft_forward.
        unsafe { self.wegeft_unmerge_raw(T::DTYPE, &s, st.cu_stream(), wp, php, psp, scale) }
    }

    /// LoRA forward `y = x W^T + s (x A^T) B^T (+ b)`, saving `xa = s x A^T` (`T x r`, scale
    /// included) for the backward pass. `A` is `r x d_in`, `B` is `d_out x r`.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_forward<T: Element>(
        &self,
        shape: &LayerShape,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        scale: f32,
        xa: &mut CudaSlice<T>,
        y: &mut CudaSlice<T>,
        launch: Launch<'_>,
    ) -> Result<()> {
        let s = reshape(shape)?;
        check_slice(self, "x", x, s.x())?;
        check_slice(self, "W", w, s.w())?;
        if let Some(bb) = bias {
            check_slice(self, "b", bb, (1, s.d_out))?;
        }
        check_slice(self, "A", a, s.lora_a())?;
        check_slice(self, "B", b, s.lora_b())?;
        check_slice(self, "xa", xa, s.u())?;
        check_slice(self, "y", y, s.y())?;
        let st = self.stream_of(&launch)?;
        let (xp, _g1) = x.device_ptr(st);
        let (wp, _g2) = w.device_ptr(st);
        let bg = bias.map(|bb| bb.device_ptr(st));
        let (ap, _g3) = a.device_ptr(st);
        let (bp, _g4) = b.device_ptr(st);
        let (xap, _g5) = xa.device_ptr_mut(st);
        let (yp, _g6) = y.device_ptr_mut(st);
        // SAFETY: as in wegeft_forward.
        unsafe {
            self.lora_forward_raw(T::DTYPE, &s, st.cu_stream(), xp, wp, bg.as_ref().map(|g| g.0), ap, bp, scale, xap, yp, launch.path)
        }
    }

    /// LoRA backward with `xa = s x A^T` saved by the forward: `dx = G W + s (G B) A`
    /// (overwritten; `None` skips it), `dA += s (G B)^T x`, `dB += s G^T (x A^T)` (f32).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward<T: Element>(
        &self,
        shape: &LayerShape,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        scale: f32,
        xa: &CudaSlice<T>,
        g: &CudaSlice<T>,
        dx: Option<&mut CudaSlice<T>>,
        da: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
        launch: Launch<'_>,
    ) -> Result<()> {
        let s = reshape(shape)?;
        check_slice(self, "x", x, s.x())?;
        check_slice(self, "W", w, s.w())?;
        check_slice(self, "A", a, s.lora_a())?;
        check_slice(self, "B", b, s.lora_b())?;
        check_slice(self, "xa", xa, s.u())?;
        check_slice(self, "G", g, s.y())?;
        if let Some(dx) = dx.as_deref() {
            check_slice(self, "dx", dx, s.x())?;
        }
        check_slice(self, "dA", da, s.lora_a())?;
        check_slice(self, "dB", db, s.lora_b())?;
        let st = self.stream_of(&launch)?;
        let (xp, _g1) = x.device_ptr(st);
        let (wp, _g2) = w.device_ptr(st);
        let (ap, _g3) = a.device_ptr(st);
        let (bp, _g4) = b.device_ptr(st);
        let (xap, _g5) = xa.device_ptr(st);
        let (gp, _g6) = g.device_ptr(st);
        let dxg = dx.map(|d| d.device_ptr_mut(st));
        let (dap, _g7) = da.device_ptr_mut(st);
        let (dbp, _g8) = db.device_ptr_mut(st);
        // SAFETY: as in wegeft_forward.
        unsafe {
            self.lora_backward_raw(
                T::DTYPE, &s, st.cu_stream(), xp, wp, ap, bp, scale, xap, gp, dxg.as_ref().map(|g| g.0), dap, dbp, launch.path,
            )
        }
    }

    /// The frozen layer `y = x W^T (+ b)` through cuBLASLt (`shape.rank` is ignored).
    pub fn frozen_forward<T: Element>(
        &self,
        shape: &LayerShape,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
        y: &mut CudaSlice<T>,
        stream: Option<&CudaStream>,
    ) -> Result<()> {
        let s = reshape(shape)?;
        check_slice(self, "x", x, s.x())?;
        check_slice(self, "W", w, s.w())?;
        if let Some(b) = bias {
            check_slice(self, "b", b, (1, s.d_out))?;
        }
        check_slice(self, "y", y, s.y())?;
        let launch = Launch { stream, path: Path::Auto };
        let st = self.stream_of(&launch)?;
        let (xp, _g1) = x.device_ptr(st);
        let (wp, _g2) = w.device_ptr(st);
        let bg = bias.map(|b| b.device_ptr(st));
        let (yp, _g3) = y.device_ptr_mut(st);
        // SAFETY: as in wegeft_forward.
        unsafe { self.frozen_forward_raw(T::DTYPE, &s, st.cu_stream(), xp, wp, bg.as_ref().map(|g| g.0), yp) }
    }

    /// The frozen layer's input gradient `dx = G W` through cuBLASLt (overwrites `dx`).
    pub fn frozen_backward<T: Element>(
        &self,
        shape: &LayerShape,
        w: &CudaSlice<T>,
        g: &CudaSlice<T>,
        dx: &mut CudaSlice<T>,
        stream: Option<&CudaStream>,
    ) -> Result<()> {
        let s = reshape(shape)?;
        check_slice(self, "W", w, s.w())?;
        check_slice(self, "G", g, s.y())?;
        check_slice(self, "dx", dx, s.x())?;
        let launch = Launch { stream, path: Path::Auto };
        let st = self.stream_of(&launch)?;
        let (wp, _g1) = w.device_ptr(st);
        let (gp, _g2) = g.device_ptr(st);
        let (dxp, _g3) = dx.device_ptr_mut(st);
        // SAFETY: as in wegeft_forward.
        unsafe { self.frozen_backward_raw(T::DTYPE, &s, st.cu_stream(), wp, gp, dxp) }
    }
}
