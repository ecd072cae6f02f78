//! Many WeGeFT adapters in one batch on the GPU: the launcher of `kernels/multi.cu`.
//!
//! Token `t` uses adapter `a = adapter_of_token[t]` (or none, `-1`); the `A` adapters' pairs
//! are stacked, `phi` `A x d_in x r` and `psi` `A x r x d_in`, with scales `s_a`:
//!
//! ```text
//! h_t = x_t + s_a (x_t psi_a^T) phi_a^T      (multi_edit_T, one block per token)
//! y   = h W^T (+ b)                          (the frozen GEMM, cuBLASLt, all tokens at once)
//! ```
//!
//! which equals `y_t = x_t W^T + (x_t psi_a^T)(s_a W phi_a)^T + b` for every token: no
//! `d_out x r` matrix per adapter and one GEMM for the whole batch, whatever the mix of
//! adapters. `h` (`T x d_in`, storage dtype) is written once and read once by the GEMM: a
//! `T d_in` round trip beside the GEMM's `T d_in d_out` multiply-adds. The kernel is
//! deterministic (fixed-order block reduction, no atomics); cuBLASLt is deterministic for a
//! fixed problem on a given device.
//!
//! For bf16/f16 storage `h` is rounded to the storage type once (the GEMM's A operand), so a
//! token's result differs from the single-adapter K-extended forward (which rounds `u`
//! instead) by about one rounding of `h` (relative `2^-8` for bf16).
//!
//! Wiring into the model's CUDA backend: `Backend::wegeft_multi_forward(rows, d_in, d_out,
//! rank, x, w, phi, psi, scales, adapter_of_row, y)` maps to [`CudaBackend::wegeft_multi_forward`]
//! with `bias = None` (f32 buffers), or, on raw pointers, [`CudaBackend::multi_edit_raw`] into a
//! scratch `h` followed by `frozen_forward_raw`.

use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::context::CudaBackend;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::cpu::multi::MultiPath;
use crate::shape::LayerShape;

/// The largest rank `multi_edit_T` takes (its shared `u`); larger ranks are an error.
pub const MULTI_MAX_RANK: usize = 256;

fn check_dims(tokens: usize, d_in: usize, rank: usize, adapters: usize) -> Result<()> {
    for (what, v) in [("tokens", tokens), ("d_in", d_in), ("rank", rank), ("adapters", adapters)] {
        if v == 0 {
            return Err(Error::ZeroDim { what });
        }
    }
    if rank > MULTI_MAX_RANK {
        return Err(Error::invalid("rank", format!("{rank} > {MULTI_MAX_RANK}, the most multi_edit takes")));
    }
    let lim = i32::MAX as usize;
    if tokens > lim || d_in > lim || d_in.saturating_mul(rank).saturating_mul(adapters) > i64::MAX as usize {
        return Err(Error::invalid("tokens x d_in", format!("{tokens} x {d_in} exceeds the kernel's index range")));
    }
    Ok(())
}

fn check_on<T>(dev: &CudaBackend, arg: &'static str, s: &CudaSlice<T>, expected: usize) -> Result<()> {
    if s.len() != expected {
        return Err(Error::Len { arg, expected, got: s.len() });
    }
    if s.context() != dev.context() {
        return Err(Error::invalid(arg, "buffer belongs to another CUDA context"));
    }
    Ok(())
}

impl CudaBackend {
    /// Raw-pointer per-token edit: `h_t = x_t + s_a (x_t psi_a^T) phi_a^T` for
    /// `a = idx[t] >= 0`, `h_t = x_t` for `a < 0`. `x` is `tokens x d_in` with row stride
    /// `ldx`, `h` the same with `ldh`; `idx` (`tokens` i32), `phi` (`adapters x d_in x rank`),
    /// `psi` (`adapters x rank x d_in`), `scales` (`adapters` f32) are contiguous device
    /// buffers; all on `stream`.
    ///
    /// # Safety
    /// Every pointer must be a live device allocation of this context holding what is stated
    /// above; every `idx[t]` must be `-1` or in `0..adapters` (the kernel does not check);
    /// `h` must not overlap the inputs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn multi_edit_raw(
        &self,
        dtype: DType,
        stream: CUstream,
        tokens: usize,
        d_in: usize,
        rank: usize,
        adapters: usize,
        x: CUdeviceptr,
        ldx: usize,
        idx: CUdeviceptr,
        phi: CUdeviceptr,
        psi: CUdeviceptr,
        scales: CUdeviceptr,
        h: CUdeviceptr,
        ldh: usize,
    ) -> Result<()> {
        check_dims(tokens, d_in, rank, adapters)?;
        for (arg, ld) in [("x", ldx), ("h", ldh)] {
            if ld < d_in {
                return Err(Error::Stride { arg, ld, cols: d_in });
            }
        }
        for (arg, p, align) in
            [("x", x, dtype.size()), ("idx", idx, 4), ("phi", phi, dtype.size()), ("psi", psi, dtype.size()), ("scales", scales, 4), ("h", h, dtype.size())]
        {
            if p == 0 {
                return Err(Error::invalid(arg, "null device pointer"));
            }
            if p % align as u64 != 0 {
                return Err(Error::Align { arg, addr: p as usize, align });
            }
        }
        let name = format!("multi_edit_{}", dtype.name());
        let func = self.function(&name)?;
        let (ldx, d_in, r, ldh) = (ldx as i64, d_in as i32, rank as i32, ldh as i64);
        // Kernel parameters: (x, ldx, idx, phi, psi, scales, d_in, r, h, ldh).
        let params = crate::cuda::arg::kargs![x, ldx, idx, phi, psi, scales, d_in, r, h, ldh];
        unsafe { self.launch("multi_edit", &func, (tokens as u32, 1, 1), (256, 1, 1), 0, stream, &params) }
    }

    /// Raw-pointer many-adapter forward on a caller's stream: `y = h W^T (+ b)` with
    /// `h_t = x_t + s_a (x_t psi_a^T) phi_a^T`, `a = adapter_of_token[t]` (`-1`: `h_t = x_t`).
    /// `x` (`T x d_in`), `w` (`d_out x d_in`), `bias` (`d_out`), `phi` (`A x d_in x rank`),
    /// `psi` (`A x rank x d_in`) and `y` (`T x d_out`) are contiguous device buffers of
    /// `dtype`, 16-byte aligned; `scales` (`A`) and `adapter_of_token` (`T`) are host slices,
    /// checked here (finite scales, every index `-1` or in `0..A`) and copied to stream-ordered
    /// scratch on `stream` (with `h`) before this returns, so the caller may reuse them at once.
    /// `rank <= MULTI_MAX_RANK`.
    ///
    /// # Safety
    /// The device pointers must be live allocations of this context holding at least the
    /// elements stated above, `y` must not overlap the inputs, and all must stay alive until
    /// `stream` has run the work.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn wegeft_multi_forward_raw(
        &self,
        dtype: DType,
        stream: CUstream,
        d_in: usize,
        d_out: usize,
        rank: usize,
        x: CUdeviceptr,
        w: CUdeviceptr,
        bias: Option<CUdeviceptr>,
        phi: CUdeviceptr,
        psi: CUdeviceptr,
        scales: &[f32],
        adapter_of_token: &[i32],
        y: CUdeviceptr,
    ) -> Result<()> {
        let (t, n_ad) = (adapter_of_token.len(), scales.len());
        check_dims(t, d_in, rank, n_ad)?;
        let shape = LayerShape::new(t, d_in, d_out, rank)?;
        if let Some(a) = scales.iter().position(|s| !s.is_finite()) {
            return Err(Error::invalid("scales", format!("scale of adapter {a} is {}", scales[a])));
        }
        crate::cpu::multi::group_tokens(adapter_of_token, n_ad)?;
        let bytes = |n: usize, what: &'static str| {
            n.checked_mul(dtype.size()).ok_or_else(|| Error::invalid(what, "size overflows"))
        };
        let idx = super::mem::DeviceBuf::new(self, stream, t * 4, "multi adapter_of_token")?;
        let sc = super::mem::DeviceBuf::new(self, stream, n_ad * 4, "multi scales")?;
        let h = super::mem::DeviceBuf::new(self, stream, bytes(t * d_in, "h")?, "multi h")?;
        // SAFETY: both scratch buffers hold the slices' bytes; pageable host memory is staged
        // before the call returns.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(idx.ptr(), adapter_of_token, stream)
                .map_err(super::context::cuda_err("multi adapter_of_token upload"))?;
            cudarc::driver::result::memcpy_htod_async(sc.ptr(), scales, stream)
                .map_err(super::context::cuda_err("multi scales upload"))?;
            self.multi_edit_raw(dtype, stream, t, d_in, rank, n_ad, x, d_in, idx.ptr(), phi, psi, sc.ptr(), h.ptr(), d_in)?;
            self.frozen_forward_raw(dtype, &shape, stream, h.ptr(), w, bias, y)
        }
    }

    /// The per-token edit on buffers: `h_t = x_t + s_a (x_t psi_a^T) phi_a^T`,
    /// `a = adapter_of_token[t]` (`-1`: `h_t = x_t`). `x`, `h`: `T x d_in`; `phi`:
    /// `A x d_in x rank`; `psi`: `A x rank x d_in`; `A = scales.len()`. Indices and lengths
    /// are checked on the host; runs on the default stream.
    #[allow(clippy::too_many_arguments)]
    pub fn multi_edit<T: Element + cudarc::driver::DeviceRepr>(
        &self,
        x: &CudaSlice<T>,
        phi: &CudaSlice<T>,
        psi: &CudaSlice<T>,
        scales: &[f32],
        adapter_of_token: &[i32],
        d_in: usize,
        rank: usize,
        h: &mut CudaSlice<T>,
    ) -> Result<()> {
        let (t, n_ad) = (adapter_of_token.len(), scales.len());
        check_dims(t, d_in, rank, n_ad)?;
        check_on(self, "x", x, t * d_in)?;
        check_on(self, "h", h, t * d_in)?;
        check_on(self, "phi", phi, n_ad * d_in * rank)?;
        check_on(self, "psi", psi, n_ad * rank * d_in)?;
        if let Some(a) = scales.iter().position(|s| !s.is_finite()) {
            return Err(Error::invalid("scales", format!("scale of adapter {a} is {}", scales[a])));
        }
        crate::cpu::multi::group_tokens(adapter_of_token, n_ad)?;
        let st = self.stream();
        let cuda = |e: cudarc::driver::DriverError| Error::Cuda { op: "multi_edit upload", msg: e.to_string() };
        let idx_d = st.clone_htod(adapter_of_token).map_err(cuda)?;
        let sc_d = st.clone_htod(scales).map_err(cuda)?;
        let (xp, _g1) = x.device_ptr(st);
        let (ip, _g2) = idx_d.device_ptr(st);
        let (php, _g3) = phi.device_ptr(st);
        let (psp, _g4) = psi.device_ptr(st);
        let (sp, _g5) = sc_d.device_ptr(st);
        let (hp, _g6) = h.device_ptr_mut(st);
        // SAFETY: every buffer was checked to hold its data and live on this context, every
        // index is -1 or in 0..A, and h is borrowed mutably (no overlap with the inputs).
        unsafe { self.multi_edit_raw(T::DTYPE, st.cu_stream(), t, d_in, rank, n_ad, xp, d_in, ip, php, psp, sp, hp, d_in) }
    }

    /// Many adapters in one batch: `y = h W^T (+ b)` with `h` from [`CudaBackend::multi_edit`]
    /// (`w`: `d_out x d_in`, `bias`: `d_out`, `y`: `T x d_out`, overwritten). Equal, per token,
    /// to `wegeft_forward` with that token's adapter (or `frozen_forward` without one).
    #[allow(clippy::too_many_arguments)]
    pub fn wegeft_multi_forward<T: Element + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
        phi: &CudaSlice<T>,
        psi: &CudaSlice<T>,
        scales: &[f32],
        adapter_of_token: &[i32],
        d_in: usize,
        d_out: usize,
        rank: usize,
        y: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.wegeft_multi_forward_path(x, w, bias, phi, psi, scales, adapter_of_token, d_in, d_out, rank, y, MultiPath::Auto)
    }

    /// [`CudaBackend::wegeft_multi_forward`] by a chosen [`MultiPath`]:
    /// * `InputEdit` (and `Auto`): `multi_edit_T` into a scratch `h`, then one frozen GEMM
    ///   over every token. On an H200 (`cuda_multi bench_multi`, BENCHMARKS.md) it beat
    ///   `KExtended` with 8 and 64 adapters at every size, and with one adapter everywhere but
    ///   4096 x 4096 at T = 1024 (0.173 vs 0.097 ms);
    /// * `KExtended`: for each maximal run of consecutive tokens with the same adapter (a
    ///   sequence, in the per-sequence serving case), the single-adapter K-extended forward
    ///   `y = [x | u][W | C_a]^T` on that run in place (no `h`, no gather; `C_a = s_a W phi_a`
    ///   rebuilt per run), the frozen GEMM on runs without an adapter. Many short runs make many
    ///   small GEMMs: `cuda_multi bench_multi` measures both (its second column is this path).
    ///   Runs whose rows would not be 16-byte aligned (`d_in` or `d_out` times the element size
    ///   not a multiple of 16, or `d_in r` for the stacked pairs) take the input edit instead.
    #[allow(clippy::too_many_arguments)]
    pub fn wegeft_multi_forward_path<T: Element + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
        phi: &CudaSlice<T>,
        psi: &CudaSlice<T>,
        scales: &[f32],
        adapter_of_token: &[i32],
        d_in: usize,
        d_out: usize,
        rank: usize,
        y: &mut CudaSlice<T>,
        path: MultiPath,
    ) -> Result<()> {
        let t = adapter_of_token.len();
        let e = T::DTYPE.size();
        let aligned = (d_in * e) % 16 == 0 && (d_out * e) % 16 == 0 && (d_in * rank * e) % 16 == 0;
        if path == MultiPath::KExtended && aligned {
            return self.multi_forward_runs(x, w, bias, phi, psi, scales, adapter_of_token, d_in, d_out, rank, y);
        }
        let shape = LayerShape::new(t.max(1), d_in, d_out, rank)?;
        check_on(self, "W", w, d_out * d_in)?;
        check_on(self, "y", y, t * d_out)?;
        if let Some(b) = bias {
            check_on(self, "b", b, d_out)?;
        }
        let st = self.stream();
        let mut h = st
            .alloc_zeros::<T>(t.max(1) * d_in)
            .map_err(|e| Error::Cuda { op: "multi h alloc", msg: e.to_string() })?;
        self.multi_edit(x, phi, psi, scales, adapter_of_token, d_in, rank, &mut h)?;
        let (hp, _g1) = h.device_ptr(st);
        let (wp, _g2) = w.device_ptr(st);
        let bg = bias.map(|b| b.device_ptr(st));
        let (yp, _g3) = y.device_ptr_mut(st);
        // SAFETY: h holds T x d_in, W d_out x d_in, y T x d_out (checked), all on this context.
        unsafe { self.frozen_forward_raw(T::DTYPE, &shape, st.cu_stream(), hp, wp, bg.as_ref().map(|g| g.0), yp) }
    }

    /// The `KExtended` path of [`CudaBackend::wegeft_multi_forward_path`] (alignment checked).
    #[allow(clippy::too_many_arguments)]
    fn multi_forward_runs<T: Element + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
        phi: &CudaSlice<T>,
        psi: &CudaSlice<T>,
        scales: &[f32],
        adapter_of_token: &[i32],
        d_in: usize,
        d_out: usize,
        rank: usize,
        y: &mut CudaSlice<T>,
    ) -> Result<()> {
        let (t, n_ad) = (adapter_of_token.len(), scales.len());
        check_dims(t, d_in, rank, n_ad)?;
        LayerShape::new(t, d_in, d_out, rank)?;
        check_on(self, "x", x, t * d_in)?;
        check_on(self, "W", w, d_out * d_in)?;
        check_on(self, "phi", phi, n_ad * d_in * rank)?;
        check_on(self, "psi", psi, n_ad * rank * d_in)?;
        check_on(self, "y", y, t * d_out)?;
        if let Some(b) = bias {
            check_on(self, "b", b, d_out)?;
        }
        crate::cpu::multi::group_tokens(adapter_of_token, n_ad)?;
        // Maximal runs of one adapter: (first token, end, adapter).
        let mut runs = Vec::new();
        let mut start = 0;
        for i in 1..=t {
            if i == t || adapter_of_token[i] != adapter_of_token[start] {
                runs.push((start, i, adapter_of_token[start]));
                start = i;
            }
        }
        let longest = runs.iter().map(|r| r.1 - r.0).max().unwrap_or(1);
        let st = self.stream();
        let alloc = |n: usize, op: &'static str| st.alloc_zeros::<T>(n).map_err(|e| Error::Cuda { op, msg: e.to_string() });
        let mut u = alloc(longest * rank, "multi u alloc")?;
        let mut c = alloc(d_out * rank, "multi C alloc")?;
        let e = T::DTYPE.size() as u64;
        let (xp, _g1) = x.device_ptr(st);
        let (wp, _g2) = w.device_ptr(st);
        let (php, _g3) = phi.device_ptr(st);
        let (psp, _g4) = psi.device_ptr(st);
        let bg = bias.map(|b| b.device_ptr(st));
        let (yp, _g5) = y.device_ptr_mut(st);
        let (up, _g6) = u.device_ptr_mut(st);
        let (cp, _g7) = c.device_ptr_mut(st);
        for (r0, r1, a) in runs {
            let s = LayerShape::new(r1 - r0, d_in, d_out, rank)?;
            let (xr, yr) = (xp + (r0 * d_in) as u64 * e, yp + (r0 * d_out) as u64 * e);
            // SAFETY: the run's rows lie inside x and y (checked lengths), the pair inside the
            // stacks (index checked by group_tokens), u holds >= the run's rows x r, C d_out x r;
            // every offset keeps 16-byte alignment (checked by the caller); one stream, in order.
            unsafe {
                if a < 0 {
                    self.frozen_forward_raw(T::DTYPE, &s, st.cu_stream(), xr, wp, bg.as_ref().map(|g| g.0), yr)?;
                } else {
                    let pa = (a as usize * d_in * rank) as u64 * e;
                    self.wegeft_forward_raw(
                        T::DTYPE, &s, st.cu_stream(), xr, wp, bg.as_ref().map(|g| g.0), php + pa, psp + pa, scales[a as usize],
                        super::Dropout::NONE, up, cp, yr, super::Path::Auto,
                    )?;
                }
            }
        }
        Ok(())
    }
}
