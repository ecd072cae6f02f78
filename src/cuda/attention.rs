//! Causal grouped-query attention on the GPU (`kernels/attention.cu`): forward, backward and
//! one decoding step, with the semantics of the [`Backend`](crate::backend::Backend) trait's
//! `attention_forward`, `attention_backward` and `attention_decode` (and of their CPU twins in
//! [`crate::cpu::ops`]).
//!
//! Rows are tokens `t = b S + i`; `q`, `out`, `dout`, `dq` are `B*S x H*hd`, `k`, `v`, `dk`,
//! `dv` are `B*S x KVH*hd`, `lse` is `B*S x H` (always f32). Query head `h` reads kv head
//! `h / (H / KVH)`, `scale = 1 / sqrt(hd)`:
//!
//! ```text
//! s_ij = scale q_i . k_j  (j0(i) <= j <= i)    lse_i = log sum_j exp(s_ij)    p_ij = exp(s_ij - lse_i)
//! out_i = sum_j p_ij v_j
//! D_i = dout_i . out_i    dp_ij = dout_i . v_j    ds_ij = p_ij (dp_ij - D_i)
//! dq_i = scale sum_j ds_ij k_j    dk_j = scale sum_{i >= j, h in group} ds_ij q_i
//! dv_j = sum_{i >= j, h in group} p_ij dout_i
//! ```
//!
//! `j0(i) = 0`, or with a sliding window ([`AttnShape::window`]) `i + 1 - window`: key tiles
//! wholly outside the window are skipped like those past the diagonal.
//!
//! * Forward: FlashAttention-2 style, the `S x S` scores never reach global memory. bf16 with
//!   `hd` in {64, 128} and 16-byte aligned buffers runs the tensor-core kernel (mma.m16n8k16,
//!   ldmatrix, cp.async; 64 query rows per block, key tiles of 64, online softmax, key tiles
//!   past the diagonal skipped); every other case (f32, other `hd <= 128`, unaligned) runs the
//!   plain-FMA tiled kernel with the same math.
//! * Backward: `D = rowsum(dout * out)` (one kernel), then `dq` over query tiles and `dk`, `dv`
//!   over key tiles of one kv head, the block summing over the query heads of the group in a
//!   fixed order (no atomics). bf16 with `hd = 64` and 16-byte aligned buffers runs both on the
//!   tensor cores (64 x 64 tiles, `P` / `dS` recomputed in registers and re-packed as bf16 A
//!   fragments); everything else the plain-FMA kernels. Scratch: `B*S*H` floats for `D`.
//! * Decode: the cache positions `0..len` are split in chunks of 256, one block per (sequence,
//!   head, chunk) writing its (max, sum, unnormalised output); a second kernel merges the
//!   chunks in order. Scratch: `B*H*ceil(len/256)*(hd+2)` floats.
//!
//! No atomics anywhere: two runs on one device give the same bits. Supported: dtype f32 or
//! bf16 (f16 is refused), `head_dim <= 128`.

use super::arg::kargs;

use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::context::CudaBackend;
use super::mem::DeviceBuf;
use crate::backend::AttnShape;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

/// The largest supported head dimension.
pub const MAX_HEAD_DIM: usize = 128;
const THREADS: u32 = 128;
const DEC_CHUNK: usize = 256;

fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 => Ok(()),
        DType::F16 => Err(Error::invalid("dtype", "attention supports f32 and bf16, got f16")),
    }
}

fn check_head_dim(hd: usize) -> Result<()> {
    if hd == 0 || hd > MAX_HEAD_DIM {
        return Err(Error::invalid("head_dim", format!("must be in 1..={MAX_HEAD_DIM}, got {hd}")));
    }
    Ok(())
}

fn to_i32(arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(arg, format!("{v} does not fit a 32-bit kernel argument")))
}

fn grid_y(arg: &'static str, v: usize) -> Result<u32> {
    if v == 0 || v > 65535 {
        return Err(Error::invalid(arg, format!("{v} blocks along grid y; the device allows 1..=65535")));
    }
    Ok(v as u32)
}

/// Re-validates `shape` (all positive, `heads % kv_heads == 0`, sizes representable) and the
/// kernels' limits.
fn check_shape(shape: AttnShape) -> Result<AttnShape> {
    let s = shape.checked()?;
    check_head_dim(s.head_dim)?;
    to_i32("batch * seq", s.tokens())?;
    to_i32("heads * head_dim", s.q_width())?;
    grid_y("batch * heads", s.batch * s.heads)?;
    Ok(s)
}

/// Non-null and aligned to `align` bytes.
fn check_ptr(arg: &'static str, p: CUdeviceptr, align: usize) -> Result<()> {
    if p == 0 {
        return Err(Error::invalid(arg, "null device pointer"));
    }
    if p as usize % align != 0 {
        return Err(Error::Align { arg, addr: p as usize, align });
    }
    Ok(())
}

/// The kernels' `win`: the sliding window clipped to the sequence (`seq`: plain causal).
fn kernel_window(s: &AttnShape) -> i32 {
    s.window.map_or(s.seq, |w| w.min(s.seq)) as i32
}

fn kname(op: &str, dtype: DType) -> String {
    format!("{op}_{}", dtype.name())
}

/// The plain kernels come in two widths: `hd <= 64` and `hd <= 128`.
fn plain_width(hd: usize) -> usize {
    if hd <= 64 {
        64
    } else {
        128
    }
}

/// Whether the forward runs on the tensor cores for these arguments.
fn uses_mma(dtype: DType, hd: usize, ptrs: &[CUdeviceptr]) -> bool {
    dtype == DType::BF16 && (hd == 64 || hd == 128) && ptrs.iter().all(|&p| p % 16 == 0)
}

/// Causal GQA attention forward on raw device pointers: `out = softmax(q k^T / sqrt(hd) +
/// causal mask) v` per head, `lse` (`B*S x H`, f32) the per-row log-sum-exp of the scaled
/// scores. `q`, `k`, `v`, `out` are contiguous row-major buffers of `dtype` (f32 or bf16),
/// aligned to their element size (bf16 with `hd` 64 or 128 and 16-byte aligned buffers takes
/// the tensor-core kernel); work is queued on `stream`.
///
/// # Safety
/// Every pointer must be a live allocation of `dev`'s context holding the elements its shape
/// needs; `stream` must belong to that context; `out` and `lse` must not overlap the inputs;
/// the buffers must stay alive until the stream has run the work.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attention_forward_raw(
    dev: &CudaBackend,
    stream: CUstream,
    dtype: DType,
    shape: AttnShape,
    q: CUdeviceptr,
    k: CUdeviceptr,
    v: CUdeviceptr,
    out: CUdeviceptr,
    lse: CUdeviceptr,
) -> Result<()> {
    check_dtype(dtype)?;
    let s = check_shape(shape)?;
    let es = dtype.size();
    for (arg, p) in [("q", q), ("k", k), ("v", v), ("out", out)] {
        check_ptr(arg, p, es)?;
    }
    check_ptr("lse", lse, 4)?;
    let (seq, heads, kvh, hd) = (s.seq as i32, s.heads as i32, s.kv_heads as i32, s.head_dim as i32);
    let win = kernel_window(&s);
    let by = grid_y("batch * heads", s.batch * s.heads)?;
    if uses_mma(dtype, s.head_dim, &[q, k, v, out]) {
        let f = dev.function(&format!("attn_fwd_mma{}_bf16", s.head_dim))?;
        let scale_log2 = std::f32::consts::LOG2_E / (s.head_dim as f32).sqrt();
        let gx = s.seq.div_ceil(64) as u32;
        let params = kargs![q, k, v, out, lse, seq, heads, kvh, win, scale_log2];
        return dev.launch("attention forward", &f, (gx, by, 1), (THREADS, 1, 1), 0, stream, &params);
    }
    let w = plain_width(s.head_dim);
    let f = dev.function(&kname(&format!("attn_fwd{w}"), dtype))?;
    let rows = (THREADS as usize) / (w / 16);
    let gx = s.seq.div_ceil(rows) as u32;
    let scale = 1.0f32 / (s.head_dim as f32).sqrt();
    let params = kargs![q, k, v, out, lse, seq, heads, kvh, hd, win, scale];
    dev.launch("attention forward", &f, (gx, by, 1), (THREADS, 1, 1), 0, stream, &params)
}

/// Attention backward on raw device pointers. With `P = exp(q k^T / sqrt(hd) - lse)`:
/// `dV = P^T dO`, `dP = dO V^T`, `dS = P (dP - rowsum(dO * O))`, `dq = dS k / sqrt(hd)`,
/// `dk = dS^T q / sqrt(hd)` (summed over the query heads of a group, in order). Overwrites
/// `dq`, `dk`, `dv`. Layouts as in [`attention_forward_raw`]; `lse` f32; uses `B*S*H` floats
/// of stream-ordered scratch.
///
/// # Safety
/// As for [`attention_forward_raw`]; `dq`, `dk`, `dv` must not overlap anything else.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attention_backward_raw(
    dev: &CudaBackend,
    stream: CUstream,
    dtype: DType,
    shape: AttnShape,
    q: CUdeviceptr,
    k: CUdeviceptr,
    v: CUdeviceptr,
    out: CUdeviceptr,
    lse: CUdeviceptr,
    dout: CUdeviceptr,
    dq: CUdeviceptr,
    dk: CUdeviceptr,
    dv: CUdeviceptr,
) -> Result<()> {
    check_dtype(dtype)?;
    let s = check_shape(shape)?;
    grid_y("batch * kv_heads", s.batch * s.kv_heads)?;
    let es = dtype.size();
    for (arg, p) in [("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout), ("dq", dq), ("dk", dk), ("dv", dv)] {
        check_ptr(arg, p, es)?;
    }
    check_ptr("lse", lse, 4)?;
    let rows_heads = s.tokens() * s.heads;
    let d = DeviceBuf::new(dev, stream, rows_heads * 4, "attention backward scratch")?;
    let dp = d.ptr();
    let (seq, heads, kvh, hd) = (s.seq as i32, s.heads as i32, s.kv_heads as i32, s.head_dim as i32);
    let win = kernel_window(&s);
    let scale = 1.0f32 / (s.head_dim as f32).sqrt();

    // D = rowsum(dout * out): one warp per (row, head).
    let f = dev.function(&kname("attn_bwd_pre", dtype))?;
    let rh = rows_heads as i64;
    let warps = (THREADS / 32) as usize;
    let gx = u32::try_from(rows_heads.div_ceil(warps))
        .map_err(|_| Error::invalid("shape", format!("{rows_heads} rows x heads is too many for one launch")))?;
    let params = kargs![out, dout, dp, rh, hd];
    dev.launch("attention backward (D)", &f, (gx, 1, 1), (THREADS, 1, 1), 0, stream, &params)?;

    if uses_mma(dtype, s.head_dim, &[q, k, v, dout, dq, dk, dv]) && s.head_dim == 64 {
        let gx = s.seq.div_ceil(64) as u32;
        let f = dev.function("attn_bwd_dq_mma64_bf16")?;
        let params = kargs![q, k, v, lse, dp, dout, dq, seq, heads, kvh, win, scale];
        dev.launch("attention backward (dq)", &f, (gx, (s.batch * s.heads) as u32, 1), (THREADS, 1, 1), 0, stream, &params)?;
        let f = dev.function("attn_bwd_dkdv_mma64_bf16")?;
        let params = kargs![q, k, v, lse, dp, dout, dk, dv, seq, heads, kvh, win, scale];
        let grid = (gx, (s.batch * s.kv_heads) as u32, 1);
        return dev.launch("attention backward (dk, dv)", &f, grid, (THREADS, 1, 1), 0, stream, &params);
    }
    let w = plain_width(s.head_dim);
    let rows = (THREADS as usize) / (w / 16);
    // A window shorter than the sequence has its own dq kernel (the causal one stays lean).
    let dq_kernel = if (win as usize) < s.seq { "attn_bwd_dq_sw" } else { "attn_bwd_dq" };
    let f = dev.function(&kname(&format!("{dq_kernel}{w}"), dtype))?;
    let params = kargs![q, k, v, lse, dp, dout, dq, seq, heads, kvh, hd, win, scale];
    let grid = (s.seq.div_ceil(rows) as u32, (s.batch * s.heads) as u32, 1);
    dev.launch("attention backward (dq)", &f, grid, (THREADS, 1, 1), 0, stream, &params)?;

    let f = dev.function(&kname(&format!("attn_bwd_dkdv{w}"), dtype))?;
    let params = kargs![q, k, v, lse, dp, dout, dk, dv, seq, heads, kvh, hd, win, scale];
    let grid = (s.seq.div_ceil(rows) as u32, (s.batch * s.kv_heads) as u32, 1);
    dev.launch("attention backward (dk, dv)", &f, grid, (THREADS, 1, 1), 0, stream, &params)
}

/// Checked arguments of a decode call.
fn check_decode(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    window: Option<usize>,
) -> Result<AttnShape> {
    let s = AttnShape::new(batch, capacity.max(1), heads, kv_heads, head_dim)?.with_window(window)?;
    check_head_dim(head_dim)?;
    if capacity == 0 {
        return Err(Error::ZeroDim { what: "capacity" });
    }
    if len == 0 {
        return Err(Error::ZeroDim { what: "len" });
    }
    if len > capacity {
        return Err(Error::invalid("len", format!("{len} exceeds the cache capacity {capacity}")));
    }
    to_i32("batch * capacity", batch * capacity)?;
    to_i32("heads * head_dim", s.q_width())?;
    grid_y("batch * heads", batch * heads)?;
    Ok(s)
}

/// One decoding step on raw device pointers: `q` (`batch x H*hd`) holds one new token per
/// sequence; `k_cache`, `v_cache` are `batch x capacity x KVH*hd` and already hold the new
/// token's key and value at position `len - 1`. Attention over positions `0..len`, or the
/// last `window` of them (`out_b = sum_j softmax_j(q_b . k_bj / sqrt(hd)) v_bj` per head);
/// writes `out` (`batch x H*hd`). Chunks of 256 positions merged in order (deterministic);
/// uses `batch*H*ceil(positions/256)*(hd+2)` floats of stream-ordered scratch.
///
/// # Safety
/// As for [`attention_forward_raw`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attention_decode_raw(
    dev: &CudaBackend,
    stream: CUstream,
    dtype: DType,
    q: CUdeviceptr,
    k_cache: CUdeviceptr,
    v_cache: CUdeviceptr,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    window: Option<usize>,
    out: CUdeviceptr,
) -> Result<()> {
    check_dtype(dtype)?;
    let s = check_decode(batch, heads, kv_heads, head_dim, capacity, len, window)?;
    let es = dtype.size();
    for (arg, p) in [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)] {
        check_ptr(arg, p, es)?;
    }
    let start = s.first_key(len - 1);
    let nchunks = (len - start).div_ceil(DEC_CHUNK);
    let work = DeviceBuf::new(dev, stream, batch * heads * nchunks * (head_dim + 2) * 4, "attention decode scratch")?;
    let wp = work.ptr();
    let (h, kvh, hd, cap, j0, l, nc) =
        (heads as i32, kv_heads as i32, head_dim as i32, capacity as i32, start as i32, len as i32, nchunks as i32);
    let scale = 1.0f32 / (head_dim as f32).sqrt();
    let by = (batch * heads) as u32;
    let f = dev.function(&kname("attn_decode_split", dtype))?;
    let params = kargs![q, k_cache, v_cache, wp, h, kvh, hd, cap, j0, l, scale];
    dev.launch("attention decode", &f, (nchunks as u32, by, 1), (THREADS, 1, 1), 0, stream, &params)?;
    let f = dev.function(&kname("attn_decode_combine", dtype))?;
    let params = kargs![wp, out, hd, nc];
    dev.launch("attention decode (combine)", &f, (by, 1, 1), (THREADS, 1, 1), 0, stream, &params)
}

// ---- safe entry points ------------------------------------------------------------------------

fn check_buf<T>(dev: &CudaBackend, arg: &'static str, s: &CudaSlice<T>, rows: usize, cols: usize) -> Result<()> {
    let needed = rows
        .checked_mul(cols)
        .ok_or(Error::Overflow { what: arg, rows, cols })?;
    if s.len() != needed {
        return Err(Error::Layout { arg, rows, cols, ld: cols, needed, len: s.len() });
    }
    if s.context() != dev.context() {
        return Err(Error::invalid(arg, "buffer belongs to another CUDA context"));
    }
    Ok(())
}

fn check_stream(dev: &CudaBackend, stream: &CudaStream) -> Result<()> {
    if stream.context() != dev.context() {
        return Err(Error::invalid("stream", "stream belongs to another CUDA context"));
    }
    Ok(())
}

/// `attention_forward_raw` on device slices of `T` (f32 or bf16), every length checked
/// against `shape` before anything is queued on `stream`: `q`, `out` `B*S x H*hd`, `k`, `v`
/// `B*S x KVH*hd`, `lse` `B*S x H`.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: Element>(
    dev: &CudaBackend,
    stream: &CudaStream,
    shape: AttnShape,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    out: &mut CudaSlice<T>,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    check_dtype(T::DTYPE)?;
    let s = check_shape(shape)?;
    check_stream(dev, stream)?;
    let n = s.tokens();
    check_buf(dev, "q", q, n, s.q_width())?;
    check_buf(dev, "k", k, n, s.kv_width())?;
    check_buf(dev, "v", v, n, s.kv_width())?;
    check_buf(dev, "out", out, n, s.q_width())?;
    check_buf(dev, "lse", lse, n, s.heads)?;
    let (qp, _g1) = q.device_ptr(stream);
    let (kp, _g2) = k.device_ptr(stream);
    let (vp, _g3) = v.device_ptr(stream);
    let (op, _g4) = out.device_ptr_mut(stream);
    let (lp, _g5) = lse.device_ptr_mut(stream);
    // SAFETY: every buffer was checked to hold its matrix and to live on this context; the
    // guards keep cudarc's stream ordering until the work is queued; `&mut` keeps the outputs
    // apart from the inputs.
    unsafe { attention_forward_raw(dev, stream.cu_stream(), T::DTYPE, s, qp, kp, vp, op, lp) }
}

/// `attention_backward_raw` on device slices (lengths as in [`attention_forward`]; `dout`,
/// `dq` like `q`; `dk`, `dv` like `k`), checked before anything is queued.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Element>(
    dev: &CudaBackend,
    stream: &CudaStream,
    shape: AttnShape,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    out: &CudaSlice<T>,
    lse: &CudaSlice<f32>,
    dout: &CudaSlice<T>,
    dq: &mut CudaSlice<T>,
    dk: &mut CudaSlice<T>,
    dv: &mut CudaSlice<T>,
) -> Result<()> {
    check_dtype(T::DTYPE)?;
    let s = check_shape(shape)?;
    grid_y("batch * kv_heads", s.batch * s.kv_heads)?;
    check_stream(dev, stream)?;
    let n = s.tokens();
    check_buf(dev, "q", q, n, s.q_width())?;
    check_buf(dev, "k", k, n, s.kv_width())?;
    check_buf(dev, "v", v, n, s.kv_width())?;
    check_buf(dev, "out", out, n, s.q_width())?;
    check_buf(dev, "lse", lse, n, s.heads)?;
    check_buf(dev, "dout", dout, n, s.q_width())?;
    check_buf(dev, "dq", dq, n, s.q_width())?;
    check_buf(dev, "dk", dk, n, s.kv_width())?;
    check_buf(dev, "dv", dv, n, s.kv_width())?;
    let (qp, _g1) = q.device_ptr(stream);
    let (kp, _g2) = k.device_ptr(stream);
    let (vp, _g3) = v.device_ptr(stream);
    let (op, _g4) = out.device_ptr(stream);
    let (lp, _g5) = lse.device_ptr(stream);
    let (gp, _g6) = dout.device_ptr(stream);
    let (dqp, _g7) = dq.device_ptr_mut(stream);
    let (dkp, _g8) = dk.device_ptr_mut(stream);
    let (dvp, _g9) = dv.device_ptr_mut(stream);
    // SAFETY: as in `attention_forward`.
    unsafe { attention_backward_raw(dev, stream.cu_stream(), T::DTYPE, s, qp, kp, vp, op, lp, gp, dqp, dkp, dvp) }
}

/// `attention_decode_raw` on device slices: `q`, `out` `batch x H*hd`, the caches
/// `batch*capacity x KVH*hd`; checked before anything is queued.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode<T: Element>(
    dev: &CudaBackend,
    stream: &CudaStream,
    q: &CudaSlice<T>,
    k_cache: &CudaSlice<T>,
    v_cache: &CudaSlice<T>,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    window: Option<usize>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    check_dtype(T::DTYPE)?;
    let s = check_decode(batch, heads, kv_heads, head_dim, capacity, len, window)?;
    check_stream(dev, stream)?;
    check_buf(dev, "q", q, batch, s.q_width())?;
    check_buf(dev, "k_cache", k_cache, batch * capacity, s.kv_width())?;
    check_buf(dev, "v_cache", v_cache, batch * capacity, s.kv_width())?;
    check_buf(dev, "out", out, batch, s.q_width())?;
    let (qp, _g1) = q.device_ptr(stream);
    let (kp, _g2) = k_cache.device_ptr(stream);
    let (vp, _g3) = v_cache.device_ptr(stream);
    let (op, _g4) = out.device_ptr_mut(stream);
    // SAFETY: as in `attention_forward`.
    unsafe {
        attention_decode_raw(
            dev,
            stream.cu_stream(),
            T::DTYPE,
            qp,
            kp,
            vp,
            batch,
            heads,
            kv_heads,
            head_dim,
            capacity,
            len,
            window,
            op,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_core_path_needs_bf16_hd_64_or_128_and_alignment() {
        assert!(uses_mma(DType::BF16, 64, &[256, 512]));
        assert!(uses_mma(DType::BF16, 128, &[256]));
        assert!(!uses_mma(DType::F32, 64, &[256]));
        assert!(!uses_mma(DType::BF16, 96, &[256]));
        assert!(!uses_mma(DType::BF16, 64, &[256, 258]));
    }

    #[test]
    fn shapes_are_checked() {
        let ok = AttnShape { batch: 2, seq: 5, heads: 4, kv_heads: 2, head_dim: 64, window: None };
        assert!(check_shape(ok).is_ok());
        assert!(check_shape(AttnShape { head_dim: 129, ..ok }).is_err());
        assert!(check_shape(AttnShape { kv_heads: 3, ..ok }).is_err());
        assert!(check_shape(AttnShape { seq: 0, ..ok }).is_err());
        assert!(check_shape(AttnShape { batch: 70000, heads: 1, kv_heads: 1, ..ok }).is_err());
        assert!(check_shape(AttnShape { window: Some(0), ..ok }).is_err());
        assert!(check_shape(AttnShape { window: Some(3), ..ok }).is_ok());
        assert!(check_decode(1, 4, 2, 64, 8, 9, None).is_err());
        assert!(check_decode(1, 4, 2, 64, 8, 0, None).is_err());
        assert!(check_decode(1, 4, 2, 64, 8, 8, None).is_ok());
        assert!(check_decode(1, 4, 2, 64, 8, 8, Some(0)).is_err());
        assert!(check_decode(1, 4, 2, 64, 8, 8, Some(3)).is_ok());
        assert!(check_dtype(DType::F16).is_err());
        assert!(check_ptr("q", 0, 2).is_err());
        assert!(check_ptr("q", 3, 2).is_err());
    }
}
