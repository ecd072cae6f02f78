//! A WeGeFT linear layer for [candle](https://github.com/huggingface/candle) (feature `candle`):
//! a `candle_core::CustomOp3` over `(x, phi, psi)` whose forward runs this crate's CPU layer
//! ([`crate::cpu::wegeft_forward`]) and whose backward returns `dx`, `dphi`, `dpsi` from
//! [`crate::cpu::wegeft_backward`], so candle's autograd (`Tensor::backward`, `candle_nn`
//! optimisers) trains the pair like any other parameter.
//!
//! With the frozen `W` (`d_out x d_in`), optional bias `b`, trainable `phi` (`d_in x r`) and
//! `psi` (`r x d_in`), scale `s`, and `x` of shape `(..., d_in)` flattened to `T x d_in`:
//!
//! ```text
//! C = s W phi,  u = x psi^T
//! y  = x W^T + u C^T (+ b)                          shape (..., d_out)
//! dx = G W + (G C) psi;  dphi = s W^T G^T u;  dpsi = (G C)^T x
//! ```
//!
//! `W` and `b` are frozen (no gradient), copied once to host memory when the layer is built.
//! A pair shared by several layers (the WeGeFT setup: one pair per module type) is the same
//! `phi`/`psi` tensor in each layer; candle sums the gradients.
//!
//! Storage dtypes: `f32`, `bf16`, `f16` (all of `x`, `W`, `b`, `phi`, `psi` the same); compute
//! in f32. Devices: CPU only. candle's `cuda` feature (candle-kernels, cudarc with
//! `cuda-version-from-build-system` + `dynamic-linking`) cannot be unified with this crate's
//! cudarc features (`cuda-13000` + `dynamic-loading`, which let the crate build and run its CPU
//! tests without a CUDA toolkit or driver): with candle-core 0.11.1 `cuda` and this crate's
//! cudarc in one build, cudarc 0.19.10's build script stops with "Both `dynamic-loading` and
//! `dynamic-linking` features are active". So a CUDA forward for candle is not provided: on a
//! CUDA tensor the op returns candle's "no cuda implementation for wegeft" error. (Frameworks
//! on the GPU can call the raw-pointer entry points, `CudaBackend::*_raw` or the C ABI.)

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor, WithDType};
use half::{bf16, f16};

use crate::cpu::{self, Saved};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::shape::{LayerShape, Mat, MatMut};

/// A host copy of a frozen tensor, in its storage type.
#[derive(Clone, Debug)]
enum Host {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Host {
    fn of(t: &Tensor) -> Result<Host> {
        let cand = |e: candle_core::Error| Error::invalid("W", format!("candle: {e}"));
        let flat = t.to_device(&Device::Cpu).and_then(|t| t.flatten_all()).map_err(cand)?;
        Ok(match t.dtype() {
            candle_core::DType::F32 => Host::F32(flat.to_vec1().map_err(cand)?),
            candle_core::DType::BF16 => Host::BF16(flat.to_vec1().map_err(cand)?),
            candle_core::DType::F16 => Host::F16(flat.to_vec1().map_err(cand)?),
            other => return Err(Error::invalid("W", format!("dtype {other:?}: wegeft stores f32, bf16 or f16"))),
        })
    }
    fn dtype(&self) -> candle_core::DType {
        match self {
            Host::F32(_) => candle_core::DType::F32,
            Host::BF16(_) => candle_core::DType::BF16,
            Host::F16(_) => candle_core::DType::F16,
        }
    }
}

/// The frozen part of a layer: `W` (`d_out x d_in`) and the optional bias.
#[derive(Debug)]
struct Frozen {
    w: Host,
    b: Option<Host>,
    d_out: usize,
    d_in: usize,
}

/// A linear layer adapted with WeGeFT: `y = x W^T + s x psi^T (W phi)^T (+ b)`.
///
/// Use it as a `candle_nn::Module`; `phi` and `psi` are usually `candle_core::Var`s (shared by
/// the layers of one module type) handed to an optimiser.
#[derive(Clone, Debug)]
pub struct WegeftLinear {
    frozen: Arc<Frozen>,
    phi: Tensor,
    psi: Tensor,
    scale: f32,
}

impl WegeftLinear {
    /// A layer over the frozen `w` (`d_out x d_in`) and `b` (`d_out`), with the trainable pair
    /// `phi` (`d_in x r`), `psi` (`r x d_in`) and scale `s` (`alpha / r`, or 1). `w` and `b`
    /// are copied to host memory now. All tensors must have one dtype among f32, bf16, f16.
    pub fn new(w: &Tensor, b: Option<&Tensor>, phi: &Tensor, psi: &Tensor, scale: f32) -> Result<Self> {
        let dims2 = |arg: &'static str, t: &Tensor| -> Result<(usize, usize)> {
            t.dims2().map_err(|_| Error::invalid(arg, format!("expected a matrix, got shape {:?}", t.dims())))
        };
        let (d_out, d_in) = dims2("W", w)?;
        let (pr, r) = dims2("phi", phi)?;
        if pr != d_in {
            return Err(Error::Shape { arg: "phi", expected: (d_in, r), got: (pr, r) });
        }
        let psi_shape = dims2("psi", psi)?;
        if psi_shape != (r, d_in) {
            return Err(Error::Shape { arg: "psi", expected: (r, d_in), got: psi_shape });
        }
        LayerShape::new(1, d_in, d_out, r)?;
        if !scale.is_finite() {
            return Err(Error::invalid("scale", format!("must be finite, got {scale}")));
        }
        let wh = Host::of(w)?;
        let b = match b {
            Some(b) => {
                if b.dims() != [d_out] {
                    return Err(Error::invalid("b", format!("expected shape [{d_out}], got {:?}", b.dims())));
                }
                Some(Host::of(b)?)
            }
            None => None,
        };
        for (arg, dt) in [("b", b.as_ref().map(Host::dtype)), ("phi", Some(phi.dtype())), ("psi", Some(psi.dtype()))] {
            if let Some(dt) = dt {
                if dt != wh.dtype() {
                    return Err(Error::DType { arg, expected: wh.dtype().as_str(), got: dt.as_str() });
                }
            }
        }
        Ok(WegeftLinear {
            frozen: Arc::new(Frozen { w: wh, b, d_out, d_in }),
            phi: phi.clone(),
            psi: psi.clone(),
            scale,
        })
    }

    /// `phi` (`d_in x r`).
    pub fn phi(&self) -> &Tensor {
        &self.phi
    }
    /// `psi` (`r x d_in`).
    pub fn psi(&self) -> &Tensor {
        &self.psi
    }
    /// The scale `s`.
    pub fn scale(&self) -> f32 {
        self.scale
    }
}

impl candle_nn::Module for WegeftLinear {
    /// `y = x W^T + u C^T (+ b)` for `x` of shape `(..., d_in)`; records the op for autograd.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let op = WegeftOp { frozen: self.frozen.clone(), scale: self.scale, saved: Mutex::new(None) };
        x.contiguous()?.apply_op3(&self.phi.contiguous()?, &self.psi.contiguous()?, op)
    }
}

/// The candle op of one forward call; keeps `u`, `C` for its backward.
struct WegeftOp {
    frozen: Arc<Frozen>,
    scale: f32,
    saved: Mutex<Option<Saved>>,
}

fn cerr(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("wegeft: {e}"))
}

/// The contiguous elements of a CPU storage under `layout`.
fn contiguous<'a, T: WithDType>(arg: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(candle_core::Error::Msg(format!("wegeft: {arg} must be contiguous"))),
    }
}

impl WegeftOp {
    /// `(T, r)` from `x` (`(..., d_in)`) and `phi` (`d_in x r`).
    fn shape_of(&self, x: &Shape, phi: &Shape) -> candle_core::Result<LayerShape> {
        let d_in = self.frozen.d_in;
        let xd = x.dims();
        if xd.last() != Some(&d_in) {
            return Err(cerr(Error::invalid("x", format!("last dimension must be d_in = {d_in}, got shape {xd:?}"))));
        }
        let r = phi.dims2()?.1;
        LayerShape::new(x.elem_count() / d_in, d_in, self.frozen.d_out, r).map_err(cerr)
    }

    fn fwd<T: HostElem>(
        &self,
        w: &[T],
        b: Option<&[T]>,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let sh = self.shape_of(l1.shape(), l2.shape())?;
        let (x, phi, psi) =
            (contiguous::<T>("x", s1, l1)?, contiguous::<T>("phi", s2, l2)?, contiguous::<T>("psi", s3, l3)?);
        let mut y = vec![T::zero(); sh.tokens * sh.d_out];
        let saved = (|| {
            cpu::wegeft_forward(
                &sh,
                Mat::new("x", x, sh.tokens, sh.d_in)?,
                Mat::new("W", w, sh.d_out, sh.d_in)?,
                b,
                Mat::new("phi", phi, sh.d_in, sh.rank)?,
                Mat::new("psi", psi, sh.rank, sh.d_in)?,
                self.scale,
                MatMut::new("y", &mut y, sh.tokens, sh.d_out)?,
            )
        })()
        .map_err(cerr)?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().unwrap() = sh.d_out;
        Ok((T::to_cpu_storage_owned(y), Shape::from(dims)))
    }

    fn bwd_typed<T: HostElem>(
        &self,
        w: &[T],
        x: &Tensor,
        phi: &Tensor,
        psi: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let sh = self.shape_of(x.shape(), phi.shape())?;
        let host =
            |t: &Tensor| -> candle_core::Result<Vec<T>> { t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<T>() };
        let (xv, phiv, psiv, gv) = (host(x)?, host(phi)?, host(psi)?, host(g)?);
        let mut dx = vec![T::zero(); sh.tokens * sh.d_in];
        let mut dphi = vec![0f32; sh.d_in * sh.rank];
        let mut dpsi = vec![0f32; sh.rank * sh.d_in];
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        (|| {
            cpu::wegeft_backward(
                &sh,
                Mat::new("x", &xv, sh.tokens, sh.d_in)?,
                Mat::new("W", w, sh.d_out, sh.d_in)?,
                Mat::new("phi", &phiv, sh.d_in, sh.rank)?,
                Mat::new("psi", &psiv, sh.rank, sh.d_in)?,
                self.scale,
                saved.as_ref(),
                Mat::new("G", &gv, sh.tokens, sh.d_out)?,
                Some(MatMut::new("dx", &mut dx, sh.tokens, sh.d_in)?),
                &mut dphi,
                &mut dpsi,
            )
        })()
        .map_err(cerr)?;
        let dev = x.device();
        Ok((
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(dphi, phi.shape(), dev)?.to_dtype(phi.dtype())?,
            Tensor::from_vec(dpsi, psi.shape(), dev)?.to_dtype(psi.dtype())?,
        ))
    }
}

/// A storage type of this crate that candle also has, with its [`Host`] variant.
trait HostElem: Element + WithDType {
    fn slice(h: &Host) -> Option<&[Self]>;
}
impl HostElem for f32 {
    fn slice(h: &Host) -> Option<&[Self]> {
        if let Host::F32(v) = h {
            Some(v)
        } else {
            None
        }
    }
}
impl HostElem for bf16 {
    fn slice(h: &Host) -> Option<&[Self]> {
        if let Host::BF16(v) = h {
            Some(v)
        } else {
            None
        }
    }
}
impl HostElem for f16 {
    fn slice(h: &Host) -> Option<&[Self]> {
        if let Host::F16(v) = h {
            Some(v)
        } else {
            None
        }
    }
}

impl WegeftOp {
    /// The frozen `W` and `b` as `T` (checked to share one dtype when the layer was built).
    fn frozen_as<T: HostElem>(&self) -> candle_core::Result<(&[T], Option<&[T]>)> {
        let f = &*self.frozen;
        let mismatch = || cerr(Error::invalid("W", "frozen weight dtype changed"));
        let w = T::slice(&f.w).ok_or_else(mismatch)?;
        let b = match &f.b {
            Some(b) => Some(T::slice(b).ok_or_else(mismatch)?),
            None => None,
        };
        Ok((w, b))
    }

    fn check_dtypes(&self, got: &[candle_core::DType]) -> candle_core::Result<()> {
        let want = self.frozen.w.dtype();
        for (arg, &dt) in ["x", "phi", "psi", "G"].iter().zip(got) {
            if dt != want {
                return Err(cerr(Error::DType { arg, expected: want.as_str(), got: dt.as_str() }));
            }
        }
        Ok(())
    }

    fn cpu_fwd_as<T: HostElem>(
        &self,
        a: (&CpuStorage, &Layout),
        b: (&CpuStorage, &Layout),
        c: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (w, bias) = self.frozen_as::<T>()?;
        self.fwd::<T>(w, bias, a, b, c)
    }

    fn bwd_as<T: HostElem>(
        &self,
        x: &Tensor,
        phi: &Tensor,
        psi: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (w, _) = self.frozen_as::<T>()?;
        self.bwd_typed::<T>(w, x, phi, psi, g)
    }
}

impl CustomOp3 for WegeftOp {
    fn name(&self) -> &'static str {
        "wegeft"
    }

    /// `y = x W^T + u C^T (+ b)` through [`crate::cpu::wegeft_forward`]; keeps `u`, `C`.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check_dtypes(&[s1.dtype(), s2.dtype(), s3.dtype()])?;
        let (a, b, c) = ((s1, l1), (s2, l2), (s3, l3));
        match self.frozen.w {
            Host::F32(_) => self.cpu_fwd_as::<f32>(a, b, c),
            Host::BF16(_) => self.cpu_fwd_as::<bf16>(a, b, c),
            Host::F16(_) => self.cpu_fwd_as::<f16>(a, b, c),
        }
    }

    /// `(dx, dphi, dpsi)` through [`crate::cpu::wegeft_backward`] (with the forward's `u`, `C`).
    fn bwd(
        &self,
        x: &Tensor,
        phi: &Tensor,
        psi: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.check_dtypes(&[x.dtype(), phi.dtype(), psi.dtype(), grad_y.dtype()])?;
        let (dx, dphi, dpsi) = match self.frozen.w {
            Host::F32(_) => self.bwd_as::<f32>(x, phi, psi, grad_y)?,
            Host::BF16(_) => self.bwd_as::<bf16>(x, phi, psi, grad_y)?,
            Host::F16(_) => self.bwd_as::<f16>(x, phi, psi, grad_y)?,
        };
        Ok((Some(dx), Some(dphi), Some(dpsi)))
    }
}
