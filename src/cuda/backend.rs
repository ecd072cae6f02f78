//! [`Gpu`]: the [`Backend`] of the Llama model on one CUDA device.
//!
//! Storage: frozen weight matrices (projections, embedding, LM head, given by
//! [`Backend::upload_weight`]) are bf16 on the device (f32 with [`Gpu::new_f32`]); so are the
//! activations the model keeps for the backward ([`Backend::stash`]: q, k, v, the attention
//! output, gate and up) and those only products read ([`Backend::operand`]: the normed
//! inputs, SwiGLU's output, the attention output, and the gradients dq, dk, dv, datt, dgate,
//! dup), which the kernels that read them take as they are. Everything else — other
//! activations and gradients in flight, the residual stream, norm weights, adapter master
//! weights and their gradients, AdamW moments — is f32. Buffers an operation
//! overwrites are not cleared first ([`Backend::output`]). Every product runs with f32
//! accumulation:
//!
//! * frozen layers and the LM head: cuBLASLt, inputs in the weight's dtype (activations rounded
//!   to bf16 on the way in), f32 output (`dx += G W` accumulates in f32 through `beta = 1`);
//! * WeGeFT layers: the fused layer API ([`crate::cuda::layer`], `wegeft_*_raw`) in the
//!   weight's dtype, `phi`, `psi` rounded from their f32 masters at each call, `u`, `C` kept in
//!   that dtype for the backward, `dphi`, `dpsi` accumulated in f32;
//! * the LM head + cross-entropy: labelled rows only, in chunks of [`LM_CHUNK`] rows:
//!   `z = h E^T` (f32), then `xent_rows_*` (loss per row, `zg = c (softmax(z) - onehot)`),
//!   then `dh = zg E`; full-vocabulary probabilities exist for one chunk at a time;
//! * attention: the tensor-core kernels in bf16 (inputs rounded from f32, or stashed bf16;
//!   output and gradients written to bf16 operands, or widened to f32 buffers), the plain f32
//!   ones with `Gpu::new_f32`;
//! * RMSNorm, RoPE, SwiGLU, embedding, AdamW: f32 compute (`kernels/*.cu`; RMSNorm, RoPE and
//!   SwiGLU also write bf16 operands, SwiGLU reads stashed bf16 gate and up).
//!
//! Dropout uses the device mask of [`crate::cuda::dropout_keep`] (not the CPU's
//! [`crate::backend::Dropout::uniform`]): same `p` and seed, a different (equally valid) mask.
//!
//! All work goes on the device's default stream in order; temporaries are stream-ordered
//! allocations from the pool, so nothing waits for the device except downloads and uploads.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::CudaContext;
use half::bf16;
use rayon::prelude::*;

use super::arg::{kargs, KArg};
use super::attention;
use super::context::{cuda_err, CudaBackend};
use super::layer::{self, Path};
use crate::backend::{AdamHyper, AttnShape, Backend, Dropout};
use crate::cpu::ops::RopeCache;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::LayerShape;

/// Labelled rows of the LM head per chunk: `LM_CHUNK x vocab` f32 logits at a time (400 MB for
/// a 49152-token vocabulary), plus their gradient in the head's dtype.
pub const LM_CHUNK: usize = 2048;

const THREADS: u32 = 256;

/// A buffer on the device: `len` elements of `dtype` (f32 unless it holds a frozen weight).
pub struct GpuBuf {
    ptr: CUdeviceptr,
    len: usize,
    dtype: DType,
    stream: CUstream,
    // Keeps the context alive until the buffer's stream-ordered free is queued.
    _ctx: Arc<CudaContext>,
}

impl GpuBuf {
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The device address.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }
}

impl std::fmt::Debug for GpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuf({} x {})", self.len, self.dtype.name())
    }
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_async on this stream; freed once, in stream order.
        unsafe {
            let _ = self._ctx.bind_to_thread();
            let _ = cudarc::driver::result::free_async(self.ptr, self.stream);
        }
    }
}

/// What [`Gpu`]'s WeGeFT forward keeps: `u = x psi^T` (`T x r`) and `C = s W phi`
/// (`d_out x r`), in the weight's dtype.
#[derive(Debug)]
pub struct GpuSaved {
    pub u: GpuBuf,
    pub c: GpuBuf,
}

struct RopeTable {
    /// The frequencies the table was made from (they decide it, with `max_pos`).
    inv_freq: Vec<f32>,
    max_pos: usize,
    cos: GpuBuf,
    sin: GpuBuf,
}

/// A small host array and its device copy, kept while the next call passes the same values
/// (every layer passes the same positions, every projection the same adapter indices).
struct HostCopy {
    host: Vec<u32>,
    dev: GpuBuf,
}

/// The CUDA engine for the Llama model (see the module docs).
pub struct Gpu {
    dev: CudaBackend,
    weights: DType,
    path: std::cell::Cell<Path>,
    rope: Mutex<Option<RopeTable>>,
    positions: Mutex<Option<HostCopy>>,
    multi_idx: Mutex<Option<HostCopy>>,
    multi_scales: Mutex<Option<HostCopy>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("dev", &self.dev).field("weights", &self.weights).finish()
    }
}

fn need(arg: &'static str, b: &GpuBuf, n: usize) -> Result<()> {
    if b.len != n {
        return Err(Error::Len { arg, expected: n, got: b.len });
    }
    Ok(())
}

fn need_f32(arg: &'static str, b: &GpuBuf, n: usize) -> Result<()> {
    need(arg, b, n)?;
    if b.dtype != DType::F32 {
        return Err(Error::invalid(arg, format!("must be an f32 buffer, got {}", b.dtype.name())));
    }
    Ok(())
}

/// `b` holds `n` elements of f32 or of `narrow`, the dtype of stashed activations, operands
/// and operand copies (an argument that accepts those; see [`Gpu::narrow_dtype`]).
fn need_act(arg: &'static str, b: &GpuBuf, n: usize, narrow: DType) -> Result<()> {
    need(arg, b, n)?;
    if b.dtype != DType::F32 && b.dtype != narrow {
        return Err(Error::invalid(arg, format!("must be an f32 or {} buffer, got {}", narrow.name(), b.dtype.name())));
    }
    Ok(())
}

impl Gpu {
    /// Device `ordinal`, frozen weights in bf16. [`Error::NoCuda`] without a driver or device.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_weights(ordinal, DType::BF16)
    }

    /// Device `ordinal` with f32 frozen weights (every product in f32: the closest twin of the
    /// CPU path, for checks).
    pub fn new_f32(ordinal: usize) -> Result<Self> {
        Self::with_weights(ordinal, DType::F32)
    }

    /// Device `ordinal` with frozen weights stored as `weights` (f32 or bf16).
    pub fn with_weights(ordinal: usize, weights: DType) -> Result<Self> {
        if !matches!(weights, DType::F32 | DType::BF16) {
            return Err(Error::invalid("weights", format!("f32 or bf16, got {}", weights.name())));
        }
        // WEGEFT_LAYER_PATH=auto|composed|fused|fused_sm90|tuned picks the WeGeFT layers' path.
        let path = match std::env::var("WEGEFT_LAYER_PATH").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Path::Auto,
            Ok("composed") => Path::Composed,
            Ok("fused") => Path::Fused,
            Ok("fused_sm90") => Path::FusedSm90,
            Ok("tuned") => Path::Tuned,
            Ok(other) => {
                return Err(Error::invalid(
                    "WEGEFT_LAYER_PATH",
                    format!("unknown path {other:?} (auto, composed, fused, fused_sm90 or tuned)"),
                ))
            }
        };
        let dev = CudaBackend::new(ordinal)?;
        Ok(Gpu {
            dev,
            weights,
            path: std::cell::Cell::new(path),
            rope: Mutex::new(None),
            positions: Mutex::new(None),
            multi_idx: Mutex::new(None),
            multi_scales: Mutex::new(None),
        })
    }

    /// With the WeGeFT layers on `path` (default [`Path::Auto`], or `WEGEFT_LAYER_PATH`).
    pub fn with_path(self, path: Path) -> Self {
        self.path.set(path);
        self
    }

    /// Puts the WeGeFT layers of later calls on `path` (buffers and models stay valid: the
    /// path only picks kernels).
    pub fn set_path(&self, path: Path) {
        self.path.set(path);
    }

    /// The WeGeFT layers' path.
    pub fn path(&self) -> Path {
        self.path.get()
    }

    /// The device.
    pub fn device(&self) -> &CudaBackend {
        &self.dev
    }

    /// The dtype frozen weights are stored in.
    pub fn weight_dtype(&self) -> DType {
        self.weights
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    /// Peak bytes of the device memory pool in use since the last [`Gpu::reset_peak_memory`]
    /// (every buffer of this backend comes from that pool).
    pub fn peak_memory(&self) -> Result<u64> {
        self.pool_attr(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, false)
    }

    /// Resets the pool's high-water mark to the current use.
    pub fn reset_peak_memory(&self) -> Result<()> {
        self.pool_attr(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, true).map(|_| ())
    }

    fn pool_attr(&self, attr: cudarc::driver::sys::CUmemPool_attribute, reset: bool) -> Result<u64> {
        use cudarc::driver::sys::{cuDeviceGetDefaultMemPool, cuMemPoolGetAttribute, cuMemPoolSetAttribute, CUresult};
        self.dev.context().bind_to_thread().map_err(cuda_err("memory pool"))?;
        // SAFETY: plain driver queries on the context's device.
        unsafe {
            let mut pool = std::ptr::null_mut();
            if cuDeviceGetDefaultMemPool(&mut pool, self.dev.context().cu_device()) != CUresult::CUDA_SUCCESS {
                return Err(Error::Cuda { op: "cuDeviceGetDefaultMemPool", msg: "failed".into() });
            }
            let mut v: u64 = 0;
            let r = if reset {
                cuMemPoolSetAttribute(pool, attr, &mut v as *mut u64 as *mut c_void)
            } else {
                cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut c_void)
            };
            if r != CUresult::CUDA_SUCCESS {
                return Err(Error::Cuda { op: "cuMemPoolGetAttribute", msg: format!("{r:?}") });
            }
            Ok(v)
        }
    }

    fn stream(&self) -> CUstream {
        self.dev.stream().cu_stream()
    }

    /// The stream, with the context made current on this thread (for allocations and direct
    /// driver calls; launches bind it themselves).
    fn bound_stream(&self, op: &'static str) -> Result<CUstream> {
        self.dev.context().bind_to_thread().map_err(cuda_err(op))?;
        Ok(self.stream())
    }

    /// `n` uninitialised elements of `dtype`.
    fn alloc(&self, dtype: DType, n: usize) -> Result<GpuBuf> {
        let bytes = n.checked_mul(dtype.size()).ok_or_else(|| Error::invalid("buffer", format!("{n} elements overflow")))?;
        let stream = self.bound_stream("cuMemAllocAsync")?;
        let ctx = self.dev.context().clone();
        // SAFETY: the stream belongs to this context.
        let ptr = unsafe { cudarc::driver::result::malloc_async(stream, bytes.max(256)) }.map_err(cuda_err("cuMemAllocAsync"))?;
        Ok(GpuBuf { ptr, len: n, dtype, stream, _ctx: ctx })
    }

    fn zeros_of(&self, dtype: DType, n: usize) -> Result<GpuBuf> {
        let b = self.alloc(dtype, n)?;
        // SAFETY: `b` holds n * size bytes on this stream.
        unsafe { cudarc::driver::result::memset_d8_async(b.ptr, 0, n * dtype.size(), self.stream()) }
            .map_err(cuda_err("cuMemsetD8Async"))?;
        Ok(b)
    }

    /// Copies host data (any plain element type) into a new buffer of `dtype` (whose element
    /// size must be `size_of::<T>()`); returns once the copy is done.
    fn upload_raw<T: Copy>(&self, dtype: DType, data: &[T]) -> Result<GpuBuf> {
        debug_assert_eq!(std::mem::size_of::<T>(), dtype.size());
        let b = self.alloc(dtype, data.len())?;
        if !data.is_empty() {
            // SAFETY: `b` holds the bytes; the stream is synchronised before `data` can go.
            unsafe { cudarc::driver::result::memcpy_htod_async(b.ptr, data, self.stream()) }
                .map_err(cuda_err("cuMemcpyHtoDAsync"))?;
            self.dev.synchronize()?;
        }
        Ok(b)
    }

    fn grid(&self, n: usize) -> (u32, u32, u32) {
        (self.dev.grid_stride_blocks(n, THREADS), 1, 1)
    }

    fn run(&self, op: &'static str, kernel: &str, grid: (u32, u32, u32), block: u32, args: &[KArg]) -> Result<()> {
        let f = self.dev.function(kernel)?;
        // SAFETY: `launch` checks the arguments against the kernel's parameters; every caller
        // passes live buffers of the checked sizes.
        unsafe { self.dev.launch(op, &f, grid, (block, 1, 1), 0, self.stream(), args) }
    }

    /// `x` as a buffer of `dtype`: `x` itself, or a rounded copy (kept alive by the second
    /// element of the pair).
    fn as_dtype(&self, x: &GpuBuf, dtype: DType) -> Result<(CUdeviceptr, Option<GpuBuf>)> {
        if x.dtype == dtype {
            return Ok((x.ptr, None));
        }
        match (x.dtype, dtype) {
            (DType::F32, DType::BF16) => {
                let out = self.alloc(DType::BF16, x.len)?;
                let (xp, yp, n) = (x.ptr, out.ptr, x.len as i64);
                self.run("cast", "cast_f32_bf16", self.grid(x.len), THREADS, &kargs![xp, yp, n])?;
                Ok((out.ptr, Some(out)))
            }
            (a, b) => Err(Error::invalid("dtype", format!("no conversion from {} to {}", a.name(), b.name()))),
        }
    }

    /// The storage type attention runs in: bf16 (the tensor-core kernels, inputs rounded from
    /// the f32 activations, outputs and gradients widened back) when the frozen weights are
    /// bf16; f32 (the plain-FMA kernels) with `Gpu::new_f32`. Decoding with a KV cache is the
    /// exception: one query row per sequence has nothing for the tensor cores, so
    /// `attention_decode` reads the f32 cache directly (a prompt's prefill still runs in bf16).
    fn attention_dtype(&self) -> DType {
        if self.weight_dtype() == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        }
    }

    /// The dtype of stashed activations ([`Backend::stash`]) and of product operands
    /// ([`Backend::operand`]): bf16 with bf16 weights (every reader of such a buffer rounds it
    /// to bf16 anyway, except SwiGLU's backward), f32 (no change) with `Gpu::new_f32`. It is
    /// also [`Gpu::attention_dtype`].
    fn narrow_dtype(&self) -> DType {
        self.attention_dtype()
    }

    /// `y (+)= x` for an f32 `y` and an f32 or bf16 `x` of the same length.
    fn store_f32(&self, x: CUdeviceptr, x_dtype: DType, y: &GpuBuf, accumulate: bool) -> Result<()> {
        let n = y.len;
        let (xp, yp, nn) = (x, y.ptr, n as i64);
        match (x_dtype, accumulate) {
            (DType::F32, true) => self.run("add", "add_f32", self.grid(n), THREADS, &kargs![yp, xp, nn]),
            (DType::F32, false) => {
                let stream = self.bound_stream("cuMemcpyDtoDAsync")?;
                // SAFETY: both hold n f32 on this stream.
                unsafe { cudarc::driver::result::memcpy_dtod_async(y.ptr, x, n * 4, stream) }
                    .map_err(cuda_err("cuMemcpyDtoDAsync"))
            }
            (DType::BF16, acc) => {
                let a = acc as i32;
                self.run("cast", "cast_bf16_f32", self.grid(n), THREADS, &kargs![xp, yp, nn, a])
            }
            (d, _) => Err(Error::invalid("dtype", format!("cannot store {} into f32", d.name()))),
        }
    }

    /// `data` (4-byte values) as a device array, uploaded only when it differs from what
    /// `slot` holds (the upload synchronises the stream; a hit costs a host comparison).
    fn cached_upload(&self, slot: &Mutex<Option<HostCopy>>, data: &[u32]) -> Result<CUdeviceptr> {
        let mut p = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = p.as_ref() {
            if c.host == data {
                return Ok(c.dev.ptr);
            }
        }
        // Replacing the old copy frees it on this stream, after the kernels queued on it.
        let dev = self.upload_raw(DType::F32, data)?; // 4-byte elements, like f32
        let ptr = dev.ptr;
        *p = Some(HostCopy { host: data.to_vec(), dev });
        Ok(ptr)
    }

    /// The positions as a device array (every layer passes the same).
    fn positions(&self, positions: &[u32]) -> Result<CUdeviceptr> {
        self.cached_upload(&self.positions, positions)
    }

    /// The rope tables (the CPU's, uploaded) covering `max_pos`.
    fn rope_table(&self, head_dim: usize, rope: &crate::rope::Rope, max_pos: usize) -> Result<(CUdeviceptr, CUdeviceptr)> {
        let inv_freq = rope.inv_freq(head_dim)?;
        let mut t = self.rope.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = t.as_ref() {
            if c.inv_freq == inv_freq && c.max_pos >= max_pos {
                return Ok((c.cos.ptr, c.sin.ptr));
            }
        }
        let max_pos = max_pos.max(1).next_power_of_two().max(2048);
        let cache = RopeCache::for_rope(head_dim, rope, max_pos)?;
        let half = head_dim / 2;
        let mut cos = vec![0.0f32; max_pos * half];
        let mut sin = vec![0.0f32; max_pos * half];
        for p in 0..max_pos {
            for i in 0..half {
                let (c, s) = cache.get(p, i)?;
                cos[p * half + i] = c;
                sin[p * half + i] = s;
            }
        }
        let (cos, sin) = (self.upload_raw(DType::F32, &cos)?, self.upload_raw(DType::F32, &sin)?);
        let r = (cos.ptr, sin.ptr);
        *t = Some(RopeTable { inv_freq, max_pos, cos, sin });
        Ok(r)
    }

    /// The dtype of SwiGLU's `gate` and `up`: both f32, or both stashed in bf16.
    fn swiglu_input(&self, gate: &GpuBuf, up: &GpuBuf) -> Result<DType> {
        let n = gate.len;
        need_act("gate", gate, n, self.narrow_dtype())?;
        need_act("up", up, n, self.narrow_dtype())?;
        if gate.dtype != up.dtype {
            return Err(Error::invalid("up", format!("gate is {} but up is {}", gate.dtype.name(), up.dtype.name())));
        }
        Ok(gate.dtype)
    }

    fn layer_dropout(d: Option<Dropout>) -> Result<layer::Dropout> {
        match d {
            None => Ok(layer::Dropout::NONE),
            Some(d) => {
                d.check()?;
                Ok(layer::Dropout { p: d.p, seed: d.seed })
            }
        }
    }

    /// The shapes of a WeGeFT call; `x`, `phi`, `psi` may be in [`Gpu::narrow_dtype`]
    /// (operands, stashed activations, operand copies).
    fn check_wegeft(&self, s: &LayerShape, x: &GpuBuf, w: &GpuBuf, phi: &GpuBuf, psi: &GpuBuf) -> Result<LayerShape> {
        let s = LayerShape::new(s.tokens, s.d_in, s.d_out, s.rank)?;
        need_act("x", x, s.tokens * s.d_in, self.narrow_dtype())?;
        need("W", w, s.d_out * s.d_in)?;
        need_act("phi", phi, s.d_in * s.rank, self.narrow_dtype())?;
        need_act("psi", psi, s.rank * s.d_in, self.narrow_dtype())?;
        Ok(s)
    }
}

impl Backend for Gpu {
    type Buf = GpuBuf;
    type Saved = GpuSaved;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn zeros(&self, n: usize) -> Result<GpuBuf> {
        self.zeros_of(DType::F32, n)
    }

    /// Pool memory as it is: no memset (see [`Backend::output`]).
    fn output(&self, n: usize) -> Result<GpuBuf> {
        self.alloc(DType::F32, n)
    }

    /// Pool memory of the narrow dtype (bf16 with bf16 weights) (see [`Backend::operand`]).
    fn operand(&self, n: usize) -> Result<GpuBuf> {
        self.alloc(self.narrow_dtype(), n)
    }

    /// `buf` rounded to the narrow dtype (bf16 with bf16 weights), or copied (see
    /// [`Backend::operand_copy`]).
    fn operand_copy(&self, buf: &GpuBuf) -> Result<GpuBuf> {
        need_f32("buf", buf, buf.len)?;
        match self.as_dtype(buf, self.narrow_dtype())? {
            (_, Some(narrow)) => Ok(narrow),
            (_, None) => {
                let mut c = self.output(buf.len)?;
                self.copy_into(buf, &mut c, 0)?;
                Ok(c)
            }
        }
    }

    fn upload(&self, data: &[f32]) -> Result<GpuBuf> {
        self.upload_raw(DType::F32, data)
    }

    /// Frozen weights in the backend's weight dtype (bf16 by default, rounded to nearest even).
    fn upload_weight(&self, data: Vec<f32>) -> Result<GpuBuf> {
        match self.weights {
            DType::BF16 => {
                let h: Vec<bf16> = data.par_iter().map(|&v| bf16::from_f32(v)).collect();
                self.upload_raw(DType::BF16, &h)
            }
            _ => self.upload_raw(DType::F32, &data),
        }
    }

    fn download(&self, buf: &GpuBuf) -> Result<Vec<f32>> {
        self.dev.synchronize()?;
        if buf.len == 0 {
            return Ok(Vec::new());
        }
        match buf.dtype {
            DType::F32 => {
                let mut out = vec![0.0f32; buf.len];
                // SAFETY: the buffer holds len f32; the stream is idle.
                unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut out, buf.ptr) }.map_err(cuda_err("cuMemcpyDtoH"))?;
                Ok(out)
            }
            DType::BF16 => {
                let mut out = vec![bf16::ZERO; buf.len];
                // SAFETY: as above, bf16.
                unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut out, buf.ptr) }.map_err(cuda_err("cuMemcpyDtoH"))?;
                Ok(out.into_par_iter().map(|v| v.to_f32()).collect())
            }
            d => Err(Error::invalid("buf", format!("no download of {}", d.name()))),
        }
    }

    fn len(&self, buf: &GpuBuf) -> usize {
        buf.len
    }

    fn fill_zero(&self, buf: &mut GpuBuf) -> Result<()> {
        let stream = self.bound_stream("cuMemsetD8Async")?;
        // SAFETY: the buffer holds len elements on this stream.
        unsafe { cudarc::driver::result::memset_d8_async(buf.ptr, 0, buf.len * buf.dtype.size(), stream) }
            .map_err(cuda_err("cuMemsetD8Async"))
    }

    fn copy_into(&self, src: &GpuBuf, dst: &mut GpuBuf, dst_offset: usize) -> Result<()> {
        self.copy_range(src, 0, src.len, dst, dst_offset)
    }

    fn copy_range(&self, src: &GpuBuf, src_offset: usize, len: usize, dst: &mut GpuBuf, dst_offset: usize) -> Result<()> {
        if src.dtype != dst.dtype {
            return Err(Error::invalid("copy_range", format!("{} into {}", src.dtype.name(), dst.dtype.name())));
        }
        let s_ok = src_offset.checked_add(len).is_some_and(|e| e <= src.len);
        let d_ok = dst_offset.checked_add(len).is_some_and(|e| e <= dst.len);
        if !(s_ok && d_ok) {
            return Err(Error::invalid(
                "copy_range",
                format!("{len} elements from {src_offset} (of {}) to {dst_offset} (of {}) overrun", src.len, dst.len),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let sz = src.dtype.size();
        let stream = self.bound_stream("cuMemcpyDtoDAsync")?;
        // SAFETY: both ranges were checked to lie inside their buffers.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst.ptr + (dst_offset * sz) as u64,
                src.ptr + (src_offset * sz) as u64,
                len * sz,
                stream,
            )
        }
        .map_err(cuda_err("cuMemcpyDtoDAsync"))
    }

    fn add_assign(&self, y: &mut GpuBuf, x: &GpuBuf) -> Result<()> {
        need_f32("y", y, y.len)?;
        need_f32("x", x, y.len)?;
        self.store_f32(x.ptr, DType::F32, y, true)
    }

    fn add_bias(&self, y: &mut GpuBuf, bias: &GpuBuf, rows: usize, dim: usize) -> Result<()> {
        if dim == 0 || dim > i32::MAX as usize {
            return Err(Error::invalid("dim", format!("{dim} must be in 1..=i32::MAX")));
        }
        let n = rows.checked_mul(dim).ok_or(Error::Overflow { what: "y", rows, cols: dim })?;
        need_f32("y", y, n)?;
        need_f32("bias", bias, dim)?;
        if n == 0 {
            return Ok(());
        }
        let (yp, bp, r, d) = (y.ptr, bias.ptr, rows as i64, dim as i32);
        self.run("add_bias", "add_bias_f32", self.grid(n), THREADS, &kargs![yp, bp, r, d])
    }

    fn add(&self, a: &GpuBuf, b: &GpuBuf, out: &mut GpuBuf) -> Result<()> {
        let n = a.len;
        need_f32("a", a, n)?;
        need_f32("b", b, n)?;
        need_f32("out", out, n)?;
        let (ap, bp, op, nn) = (a.ptr, b.ptr, out.ptr, n as i64);
        self.run("add", "add_out_f32", self.grid(n), THREADS, &kargs![ap, bp, op, nn])
    }

    /// An f32 activation rounded to the narrow dtype (bf16 with bf16 weights) (the f32 buffer goes back to the pool).
    fn stash(&self, buf: GpuBuf) -> Result<GpuBuf> {
        let dt = self.narrow_dtype();
        if buf.dtype == dt {
            return Ok(buf);
        }
        match self.as_dtype(&buf, dt)? {
            (_, Some(narrow)) => Ok(narrow),
            (_, None) => Ok(buf),
        }
    }

    fn embedding_forward(&self, table: &GpuBuf, vocab: usize, dim: usize, ids: &[u32], out: &mut GpuBuf) -> Result<()> {
        if vocab == 0 || dim == 0 {
            return Err(Error::invalid("embedding", format!("vocab {vocab} and dim {dim} must be positive")));
        }
        need("table", table, vocab * dim)?;
        need_f32("out", out, ids.len() * dim)?;
        if let Some((t, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(Error::invalid("ids", format!("ids[{t}] = {id} is out of range for vocab {vocab}")));
        }
        if ids.is_empty() {
            return Ok(());
        }
        let idb = self.upload_raw(DType::F32, ids)?;
        let kernel = match table.dtype {
            DType::F32 => "embedding_f32",
            DType::BF16 => "embedding_bf16",
            d => return Err(Error::invalid("table", format!("f32 or bf16, got {}", d.name()))),
        };
        let (tp, ip, op, rows, d) = (table.ptr, idb.ptr, out.ptr, ids.len() as i64, dim as i32);
        self.run("embedding", kernel, self.grid(ids.len() * dim), THREADS, &kargs![tp, ip, op, rows, d])
    }

    fn rmsnorm_forward(
        &self,
        x: &GpuBuf,
        weight: &GpuBuf,
        rows: usize,
        dim: usize,
        eps: f32,
        y: &mut GpuBuf,
        rstd: &mut GpuBuf,
    ) -> Result<()> {
        if dim == 0 {
            return Err(Error::invalid("dim", "must be positive"));
        }
        if !(eps >= 0.0) {
            return Err(Error::invalid("eps", format!("must be >= 0, got {eps}")));
        }
        need_f32("x", x, rows * dim)?;
        need_f32("weight", weight, dim)?;
        need_act("y", y, rows * dim, self.narrow_dtype())?;
        need_f32("rstd", rstd, rows)?;
        if rows == 0 {
            return Ok(());
        }
        let kernel = if y.dtype == DType::F32 { "rmsnorm_fwd_f32" } else { "rmsnorm_fwd_f32_bf16" };
        let (xp, wp, yp, rp, d, e) = (x.ptr, weight.ptr, y.ptr, rstd.ptr, dim as i32, eps);
        self.run("rmsnorm_forward", kernel, (rows as u32, 1, 1), 256, &kargs![xp, wp, yp, rp, d, e])
    }

    fn rmsnorm_backward(
        &self,
        x: &GpuBuf,
        weight: &GpuBuf,
        rstd: &GpuBuf,
        dy: &GpuBuf,
        rows: usize,
        dim: usize,
        dx: &mut GpuBuf,
    ) -> Result<()> {
        if dim == 0 {
            return Err(Error::invalid("dim", "must be positive"));
        }
        need_f32("x", x, rows * dim)?;
        need_f32("weight", weight, dim)?;
        need_f32("rstd", rstd, rows)?;
        need_f32("dy", dy, rows * dim)?;
        need_f32("dx", dx, rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let (xp, wp, rp, gp, dp, d) = (x.ptr, weight.ptr, rstd.ptr, dy.ptr, dx.ptr, dim as i32);
        self.run("rmsnorm_backward", "rmsnorm_bwd_f32", (rows as u32, 1, 1), 256, &kargs![xp, wp, rp, gp, dp, d])
    }

    fn linear_forward(&self, x: &GpuBuf, w: &GpuBuf, rows: usize, d_in: usize, d_out: usize, y: &mut GpuBuf) -> Result<()> {
        LayerShape::new(rows, d_in, d_out, 1)?;
        need_act("x", x, rows * d_in, self.narrow_dtype())?;
        need("W", w, d_out * d_in)?;
        need_f32("y", y, rows * d_out)?;
        let (xp, _keep) = self.as_dtype(x, w.dtype)?;
        // SAFETY: the buffers hold the checked shapes, on this stream.
        unsafe {
            self.dev.lt_gemm_ex(
                "linear_forward", w.dtype, DType::F32, self.stream(), false, true, rows, d_out, d_in, xp, d_in, w.ptr, d_in, None,
                0.0, y.ptr, d_out,
            )
        }
    }

    /// Many adapters in one batch on the device: `h = x + s_a (x psi_a^T) phi_a^T` per row by
    /// `multi_edit_f32` (f32, the adapter stacks' dtype), then the one frozen product
    /// `y = h W^T` as [`Backend::linear_forward`] runs it.
    #[allow(clippy::too_many_arguments)]
    fn wegeft_multi_forward(
        &self,
        rows: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
        x: &GpuBuf,
        w: &GpuBuf,
        phi: &GpuBuf,
        psi: &GpuBuf,
        scales: &[f32],
        adapter_of_row: &[i32],
        y: &mut GpuBuf,
    ) -> Result<()> {
        crate::backend::check_multi(self, rows, d_in, d_out, rank, x, w, phi, psi, scales, adapter_of_row, y)?;
        need_f32("x", x, rows * d_in)?;
        need_f32("phi", phi, scales.len() * d_in * rank)?;
        need_f32("psi", psi, scales.len() * rank * d_in)?;
        if rank > super::multi::MULTI_MAX_RANK {
            // Past the edit kernel's rank: group the rows by adapter (the CPU's fallback).
            return crate::backend::multi_forward_by_groups(self, rows, d_in, d_out, rank, x, w, phi, psi, scales, adapter_of_row, y);
        }
        // Indices and scales as 4-byte device arrays, uploaded once per batch: every
        // projection of every layer passes the same ones.
        let idx: Vec<u32> = adapter_of_row.iter().map(|&a| a as u32).collect();
        let idx = self.cached_upload(&self.multi_idx, &idx)?;
        let sc: Vec<u32> = scales.iter().map(|s| s.to_bits()).collect();
        let sc = self.cached_upload(&self.multi_scales, &sc)?;
        let h = self.alloc(DType::F32, rows * d_in)?;
        // SAFETY: every buffer is live on this stream with the checked length; check_multi
        // checked every index against the number of adapters; `h` is fresh.
        unsafe {
            self.dev.multi_edit_raw(
                DType::F32, self.stream(), rows, d_in, rank, scales.len(), x.ptr, d_in, idx, phi.ptr, psi.ptr, sc,
                h.ptr, d_in,
            )?;
        }
        self.linear_forward(&h, w, rows, d_in, d_out, y)
    }

    fn linear_backward(
        &self,
        g: &GpuBuf,
        w: &GpuBuf,
        rows: usize,
        d_in: usize,
        d_out: usize,
        dx: &mut GpuBuf,
        accumulate: bool,
    ) -> Result<()> {
        LayerShape::new(rows, d_in, d_out, 1)?;
        need_act("G", g, rows * d_out, self.narrow_dtype())?;
        need("W", w, d_out * d_in)?;
        need_act("dx", dx, rows * d_in, self.narrow_dtype())?;
        if dx.dtype != DType::F32 && accumulate {
            return Err(Error::invalid("dx", "an operand is overwritten, not accumulated into"));
        }
        let (gp, _keep) = self.as_dtype(g, w.dtype)?;
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: as in linear_forward.
        unsafe {
            self.dev.lt_gemm_ex(
                "linear_backward", w.dtype, dx.dtype, self.stream(), false, false, rows, d_in, d_out, gp, d_out, w.ptr, d_in,
                None, beta, dx.ptr, d_in,
            )
        }
    }

    fn wegeft_forward(
        &self,
        shape: LayerShape,
        x: &GpuBuf,
        w: &GpuBuf,
        phi: &GpuBuf,
        psi: &GpuBuf,
        scale: f32,
        dropout: Option<Dropout>,
        y: &mut GpuBuf,
    ) -> Result<GpuSaved> {
        let s = self.check_wegeft(&shape, x, w, phi, psi)?;
        need_f32("y", y, s.tokens * s.d_out)?;
        let drop = Self::layer_dropout(dropout)?;
        let dt = w.dtype;
        let (xp, _k1) = self.as_dtype(x, dt)?;
        let (php, _k2) = self.as_dtype(phi, dt)?;
        let (psp, _k3) = self.as_dtype(psi, dt)?;
        let u = self.alloc(dt, s.tokens * s.rank)?;
        let c = self.alloc(dt, s.d_out * s.rank)?;
        let tmp = if dt == DType::F32 { None } else { Some(self.alloc(dt, s.tokens * s.d_out)?) };
        let yp = tmp.as_ref().map_or(y.ptr, |t| t.ptr);
        // SAFETY: every buffer holds its checked matrix in `dt`, on this stream.
        unsafe {
            self.dev.wegeft_forward_raw(dt, &s, self.stream(), xp, w.ptr, None, php, psp, scale, drop, u.ptr, c.ptr, yp, self.path())?;
        }
        if let Some(t) = tmp {
            self.store_f32(t.ptr, dt, y, false)?;
        }
        Ok(GpuSaved { u, c })
    }

    fn wegeft_backward(
        &self,
        shape: LayerShape,
        x: &GpuBuf,
        w: &GpuBuf,
        phi: &GpuBuf,
        psi: &GpuBuf,
        scale: f32,
        dropout: Option<Dropout>,
        saved: &GpuSaved,
        g: &GpuBuf,
        dx: Option<(&mut GpuBuf, bool)>,
        dphi: &mut GpuBuf,
        dpsi: &mut GpuBuf,
    ) -> Result<()> {
        let s = self.check_wegeft(&shape, x, w, phi, psi)?;
        need_act("G", g, s.tokens * s.d_out, self.narrow_dtype())?;
        need_f32("dphi", dphi, s.d_in * s.rank)?;
        need_f32("dpsi", dpsi, s.rank * s.d_in)?;
        let dt = w.dtype;
        if saved.u.dtype != dt || saved.u.len != s.tokens * s.rank || saved.c.dtype != dt || saved.c.len != s.d_out * s.rank {
            return Err(Error::invalid("saved", format!("u {:?}, C {:?} do not match the layer {s:?}", saved.u, saved.c)));
        }
        let drop = Self::layer_dropout(dropout)?;
        let (xp, _k1) = self.as_dtype(x, dt)?;
        let (psp, _k2) = self.as_dtype(psi, dt)?;
        let (gp, _k3) = self.as_dtype(g, dt)?;
        let mut target: Option<(&GpuBuf, bool, Option<GpuBuf>)> = None;
        if let Some((d, acc)) = dx {
            need_act("dx", d, s.tokens * s.d_in, self.narrow_dtype())?;
            if d.dtype != DType::F32 && acc {
                return Err(Error::invalid("dx", "an operand is overwritten, not accumulated into"));
            }
            // The layer writes `dt`: straight into `dx` when it has that type and is overwritten.
            let tmp = if d.dtype == dt && !acc { None } else { Some(self.alloc(dt, s.tokens * s.d_in)?) };
            target = Some((d, acc, tmp));
        }
        let dxp = target.as_ref().map(|(d, _, t)| t.as_ref().map_or(d.ptr, |t| t.ptr));
        // SAFETY: as in wegeft_forward.
        unsafe {
            self.dev.wegeft_backward_raw(
                dt, &s, self.stream(), xp, w.ptr, psp, scale, drop, saved.u.ptr, saved.c.ptr, gp, dxp, dphi.ptr, dpsi.ptr, self.path(),
            )?;
        }
        if let Some((d, acc, Some(t))) = target {
            self.store_f32(t.ptr, dt, d, acc)?;
        }
        Ok(())
    }

    fn rope(&self, x: &mut GpuBuf, heads: usize, head_dim: usize, positions: &[u32], rope: &crate::rope::Rope, inverse: bool) -> Result<()> {
        if heads == 0 || head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::invalid("rope", format!("heads {heads} > 0 and an even head_dim {head_dim} > 0 needed")));
        }
        rope.check(head_dim).map_err(|m| Error::invalid("rope", m))?;
        need_act("x", x, positions.len() * heads * head_dim, self.narrow_dtype())?;
        if positions.is_empty() {
            return Ok(());
        }
        let kernel = if x.dtype == DType::F32 { "rope_f32" } else { "rope_bf16" };
        let max_pos = positions.iter().map(|&p| p as usize).max().unwrap_or(0) + 1;
        let (cp, sp) = self.rope_table(head_dim, rope, max_pos)?;
        let pp = self.positions(positions)?;
        let n = positions.len() * heads * head_dim / 2;
        let xp = x.ptr;
        let (rows, h, hd, inv) = (positions.len() as i64, heads as i32, head_dim as i32, inverse as i32);
        self.run("rope", kernel, self.grid(n), THREADS, &kargs![xp, pp, cp, sp, rows, h, hd, inv])
    }

    fn attention_forward(
        &self,
        shape: AttnShape,
        q: &GpuBuf,
        k: &GpuBuf,
        v: &GpuBuf,
        out: &mut GpuBuf,
        lse: &mut GpuBuf,
    ) -> Result<()> {
        let s = shape.checked()?;
        let t = s.batch * s.seq;
        need_f32("q", q, t * s.heads * s.head_dim)?;
        need_f32("k", k, t * s.kv_heads * s.head_dim)?;
        need_f32("v", v, t * s.kv_heads * s.head_dim)?;
        let dt = self.attention_dtype();
        need_act("out", out, t * s.heads * s.head_dim, dt)?;
        need_f32("lse", lse, t * s.heads)?;
        let (qp, _qk) = self.as_dtype(q, dt)?;
        let (kp, _kk) = self.as_dtype(k, dt)?;
        let (vp, _vk) = self.as_dtype(v, dt)?;
        // The kernels write `dt`: into `out` itself when it is an operand of that type.
        let ob = if out.dtype == dt { None } else { Some(self.alloc(dt, out.len)?) };
        let op = ob.as_ref().map_or(out.ptr, |b| b.ptr);
        // SAFETY: the buffers hold the checked shapes in `dt`, on this stream.
        unsafe { attention::attention_forward_raw(&self.dev, self.stream(), dt, s, qp, kp, vp, op, lse.ptr)? };
        match &ob {
            Some(b) => self.store_f32(b.ptr, dt, out, false),
            None => Ok(()),
        }
    }

    fn attention_backward(
        &self,
        shape: AttnShape,
        q: &GpuBuf,
        k: &GpuBuf,
        v: &GpuBuf,
        out: &GpuBuf,
        lse: &GpuBuf,
        dout: &GpuBuf,
        dq: &mut GpuBuf,
        dk: &mut GpuBuf,
        dv: &mut GpuBuf,
    ) -> Result<()> {
        let s = shape.checked()?;
        let t = s.batch * s.seq;
        let (qn, kn) = (t * s.heads * s.head_dim, t * s.kv_heads * s.head_dim);
        let dt = self.attention_dtype();
        need_act("q", q, qn, dt)?;
        need_act("k", k, kn, dt)?;
        need_act("v", v, kn, dt)?;
        need_act("out", out, qn, dt)?;
        need_f32("lse", lse, t * s.heads)?;
        need_act("dout", dout, qn, dt)?;
        need_act("dq", dq, qn, dt)?;
        need_act("dk", dk, kn, dt)?;
        need_act("dv", dv, kn, dt)?;
        if dt == DType::F32 {
            // SAFETY: as in attention_forward.
            return unsafe {
                attention::attention_backward_raw(
                    &self.dev, self.stream(), dt, s, q.ptr, k.ptr, v.ptr, out.ptr, lse.ptr, dout.ptr, dq.ptr, dk.ptr, dv.ptr,
                )
            };
        }
        let (qp, _qk) = self.as_dtype(q, dt)?;
        let (kp, _kk) = self.as_dtype(k, dt)?;
        let (vp, _vk) = self.as_dtype(v, dt)?;
        let (op, _ok) = self.as_dtype(out, dt)?;
        let (gp, _gk) = self.as_dtype(dout, dt)?;
        // The kernels write `dt`: straight into a gradient of that type (an operand), else
        // into a fresh buffer widened afterwards.
        let direct = |b: &GpuBuf| -> Result<(CUdeviceptr, Option<GpuBuf>)> {
            if b.dtype == dt {
                return Ok((b.ptr, None));
            }
            let tmp = self.alloc(dt, b.len)?;
            Ok((tmp.ptr, Some(tmp)))
        };
        let ((dqp, dqt), (dkp, dkt), (dvp, dvt)) = (direct(dq)?, direct(dk)?, direct(dv)?);
        // SAFETY: as in attention_forward; the gradients go to `dt` buffers of their sizes.
        unsafe { attention::attention_backward_raw(&self.dev, self.stream(), dt, s, qp, kp, vp, op, lse.ptr, gp, dqp, dkp, dvp)? };
        for (t, d) in [(dqt, &*dq), (dkt, &*dk), (dvt, &*dv)] {
            if let Some(t) = t {
                self.store_f32(t.ptr, dt, d, false)?;
            }
        }
        Ok(())
    }

    fn attention_decode(
        &self,
        q: &GpuBuf,
        k_cache: &GpuBuf,
        v_cache: &GpuBuf,
        batch: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        len: usize,
        window: Option<usize>,
        out: &mut GpuBuf,
    ) -> Result<()> {
        AttnShape::new(batch, capacity.max(1), heads, kv_heads, head_dim)?.with_window(window)?;
        if len == 0 || len > capacity {
            return Err(Error::invalid("len", format!("must be in 1..={capacity}, got {len}")));
        }
        need_f32("q", q, batch * heads * head_dim)?;
        need_f32("k_cache", k_cache, batch * capacity * kv_heads * head_dim)?;
        need_f32("v_cache", v_cache, batch * capacity * kv_heads * head_dim)?;
        need_f32("out", out, batch * heads * head_dim)?;
        // SAFETY: as in attention_forward.
        unsafe {
            attention::attention_decode_raw(
                &self.dev, self.stream(), DType::F32, q.ptr, k_cache.ptr, v_cache.ptr, batch, heads, kv_heads, head_dim, capacity,
                len, window, out.ptr,
            )
        }
    }

    fn swiglu_forward(&self, gate: &GpuBuf, up: &GpuBuf, h: &mut GpuBuf) -> Result<()> {
        let n = gate.len;
        need_act("h", h, n, self.narrow_dtype())?;
        let kernel = match (self.swiglu_input(gate, up)?, h.dtype) {
            (DType::F32, DType::F32) => "swiglu_fwd_f32",
            (_, DType::F32) => "swiglu_fwd_bf16",
            (DType::F32, _) => "swiglu_fwd_f32_bf16",
            _ => "swiglu_fwd_bf16_bf16",
        };
        let (gp, upp, hp, nn) = (gate.ptr, up.ptr, h.ptr, n as i64);
        self.run("swiglu_forward", kernel, self.grid(n), THREADS, &kargs![gp, upp, hp, nn])
    }

    fn swiglu_backward(&self, gate: &GpuBuf, up: &GpuBuf, dh: &GpuBuf, dgate: &mut GpuBuf, dup: &mut GpuBuf) -> Result<()> {
        let n = gate.len;
        need_f32("dh", dh, n)?;
        need_act("dgate", dgate, n, self.narrow_dtype())?;
        need_act("dup", dup, n, self.narrow_dtype())?;
        let input = self.swiglu_input(gate, up)?;
        let kernel = match (input, dgate.dtype, dup.dtype) {
            (DType::F32, DType::F32, DType::F32) => "swiglu_bwd_f32",
            (_, DType::F32, DType::F32) => "swiglu_bwd_bf16",
            (DType::BF16, DType::BF16, DType::BF16) => "swiglu_bwd_bf16_bf16",
            (i, g, u) => {
                return Err(Error::invalid(
                    "dgate",
                    format!("dgate {}, dup {} from gate {}: bf16 gradients come from stashed gate and up", g.name(), u.name(), i.name()),
                ))
            }
        };
        let (gp, upp, dhp, dgp, dup_, nn) = (gate.ptr, up.ptr, dh.ptr, dgate.ptr, dup.ptr, n as i64);
        self.run("swiglu_backward", kernel, self.grid(n), THREADS, &kargs![gp, upp, dhp, dgp, dup_, nn])
    }

    fn logits(&self, h: &GpuBuf, head: &GpuBuf, rows: usize, dim: usize, vocab: usize, out: &mut GpuBuf) -> Result<()> {
        LayerShape::new(rows, dim, vocab, 1)?;
        need_f32("logits h", h, rows * dim)?;
        need("logits head", head, vocab * dim)?;
        need_f32("logits out", out, rows * vocab)?;
        let (hp, _keep) = self.as_dtype(h, head.dtype)?;
        // SAFETY: the buffers hold the checked shapes.
        unsafe {
            self.dev.lt_gemm_ex(
                "logits", head.dtype, DType::F32, self.stream(), false, true, rows, vocab, dim, hp, dim, head.ptr, dim, None, 0.0,
                out.ptr, vocab,
            )
        }
    }

    fn lm_head_loss(
        &self,
        h: &GpuBuf,
        head: &GpuBuf,
        dim: usize,
        vocab: usize,
        labels: &[i32],
        dh: Option<(&mut GpuBuf, f32)>,
    ) -> Result<f32> {
        let rows = labels.len();
        if dim == 0 || vocab == 0 {
            return Err(Error::invalid("lm_head", format!("dim {dim} and vocab {vocab} must be positive")));
        }
        need_f32("lm_head h", h, rows * dim)?;
        need("lm_head head", head, vocab * dim)?;
        if vocab > i32::MAX as usize {
            return Err(Error::invalid("vocab", "too large"));
        }
        for (t, &l) in labels.iter().enumerate() {
            if l >= vocab as i32 {
                return Err(Error::invalid("labels", format!("label {l} at row {t} is outside the vocabulary of {vocab}")));
            }
        }
        let dt = head.dtype;
        if !matches!(dt, DType::F32 | DType::BF16) {
            return Err(Error::invalid("lm_head head", format!("f32 or bf16, got {}", dt.name())));
        }
        let mut dh = dh;
        if let Some((d, _)) = dh.as_mut() {
            need_f32("lm_head dh", d, rows * dim)?;
            self.fill_zero(d)?;
        }
        let picked: Vec<i32> = (0..rows).filter(|&t| labels[t] >= 0).map(|t| t as i32).collect();
        if picked.is_empty() {
            return Ok(0.0);
        }
        let cap = LM_CHUNK.min(picked.len());
        let idx = self.upload_raw(DType::F32, &picked)?;
        let lab: Vec<i32> = picked.iter().map(|&t| labels[t as usize]).collect();
        let labd = self.upload_raw(DType::F32, &lab)?;
        let losses = self.alloc(DType::F32, picked.len())?;
        let hc = self.alloc(dt, cap * dim)?;
        let z = self.alloc(DType::F32, cap * vocab)?;
        let grad = dh.as_ref().map(|(_, c)| *c);
        let zg = if grad.is_some() { Some(self.alloc(dt, cap * vocab)?) } else { None };
        let dhc = if grad.is_some() { Some(self.alloc(DType::F32, cap * dim)?) } else { None };
        let (gather, xent) = match dt {
            DType::F32 => ("gather_rows_f32", "xent_rows_f32"),
            _ => ("gather_rows_bf16", "xent_rows_bf16"),
        };
        let mut start = 0;
        while start < picked.len() {
            let n = LM_CHUNK.min(picked.len() - start);
            let (hp, ip, hcp, nn, d) = (h.ptr, idx.ptr + (start * 4) as u64, hc.ptr, n as i64, dim as i32);
            self.run("lm_head gather", gather, self.grid(n * dim), THREADS, &kargs![hp, ip, hcp, nn, d])?;
            // SAFETY: hc holds n x dim, z n x vocab, head vocab x dim.
            unsafe {
                self.dev.lt_gemm_ex(
                    "lm_head logits", dt, DType::F32, self.stream(), false, true, n, vocab, dim, hc.ptr, dim, head.ptr, dim, None, 0.0,
                    z.ptr, vocab,
                )?;
            }
            let (zp, lp, op, v) = (z.ptr, labd.ptr + (start * 4) as u64, losses.ptr + (start * 4) as u64, vocab as i32);
            let zgp = zg.as_ref().map_or(0, |b| b.ptr);
            let (c, g) = (grad.unwrap_or(0.0), grad.is_some() as i32);
            self.run("lm_head xent", xent, (n as u32, 1, 1), 256, &kargs![zp, lp, op, zgp, v, c, g])?;
            if let (Some((d, _)), Some(zg), Some(dhc)) = (dh.as_mut(), zg.as_ref(), dhc.as_ref()) {
                // SAFETY: zg holds n x vocab, dhc n x dim.
                unsafe {
                    self.dev.lt_gemm_ex(
                        "lm_head dh", dt, DType::F32, self.stream(), false, false, n, dim, vocab, zg.ptr, vocab, head.ptr, dim, None,
                        0.0, dhc.ptr, dim,
                    )?;
                }
                let (sp, ip, dp, nn, dd) = (dhc.ptr, idx.ptr + (start * 4) as u64, d.ptr, n as i64, dim as i32);
                self.run("lm_head scatter", "scatter_rows_f32", self.grid(n * dim), THREADS, &kargs![sp, ip, dp, nn, dd])?;
            }
            start += n;
        }
        let per_row = self.download(&losses)?;
        Ok(per_row.iter().map(|&l| l as f64).sum::<f64>() as f32)
    }

    fn adamw_step(&self, param: &mut GpuBuf, grad: &GpuBuf, m: &mut GpuBuf, v: &mut GpuBuf, hp: AdamHyper) -> Result<()> {
        if hp.step == 0 {
            return Err(Error::invalid("adamw step", "steps count from 1"));
        }
        let n = param.len;
        need_f32("adamw param", param, n)?;
        need_f32("adamw grad", grad, n)?;
        need_f32("adamw m", m, n)?;
        need_f32("adamw v", v, n)?;
        // The step constants exactly as crate::train::optim::AdamW::step computes them.
        let t = hp.step.min(i32::MAX as u64) as i32;
        let decay = (1.0 - hp.lr * hp.weight_decay) as f32;
        let w1 = (1.0 - hp.beta1) as f32;
        let b2 = hp.beta2 as f32;
        let w2 = (1.0 - hp.beta2) as f32;
        let bc1 = 1.0 - hp.beta1.powi(t);
        let bc2 = 1.0 - hp.beta2.powi(t);
        let step_size = -(hp.lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = hp.eps as f32;
        let wd = (hp.weight_decay != 0.0) as i32;
        let (pp, gp, mp, vp, nn) = (param.ptr, grad.ptr, m.ptr, v.ptr, n as i64);
        self.run(
            "adamw",
            "adamw_f32",
            self.grid(n),
            THREADS,
            &kargs![pp, gp, mp, vp, nn, wd, decay, w1, b2, w2, step_size, bc2_sqrt, eps],
        )
    }
}
