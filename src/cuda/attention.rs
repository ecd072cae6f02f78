//! Causal GQA attention on the device: forward, backward and one decoding step, on raw device
//! pointers, with the layout of the [`crate::backend::Backend`] attention methods (`q`, `out`,
//! `dout`, `dq`: `B*S x H*hd`; `k`, `v`, `dk`, `dv`: `B*S x KVH*hd`; `lse`: `B*S x H`, f32;
//! the others of `dtype`, f32 or bf16).
//!
//! This file is the simple, complete implementation (`kernels/attention_naive.cu`, one warp
//! per output row, f32 math, `hd <= 128`): the tiled kernels of the attention work replace it
//! behind the same three functions.
//!
//! ```text
//! s_ij = q_i . k_j / sqrt(hd)  (j <= i)    lse_i = log sum_j exp(s_ij)    out_i = sum_j exp(s_ij - lse_i) v_j
//! D_i = dout_i . out_i    ds_ij = p_ij (dout_i . v_j - D_i)
//! dq_i = sum_j ds_ij k_j / sqrt(hd)    dk_j = sum_i ds_ij q_i / sqrt(hd)    dv_j = sum_i p_ij dout_i
//! ```
//! (`dk`, `dv` summed over the query heads of a group.) Deterministic: no atomics.

use std::ffi::c_void;

use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::context::CudaBackend;
use crate::backend::AttnShape;
use crate::dtype::DType;
use crate::error::{Error, Result};

const THREADS: u32 = 128;

fn check(dtype: DType, head_dim: usize, ptrs: &[(&'static str, CUdeviceptr)]) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(Error::invalid("dtype", format!("attention runs on f32 or bf16, got {}", dtype.name())));
    }
    if head_dim == 0 || head_dim > 128 {
        return Err(Error::invalid("head_dim", format!("must be in 1..=128, got {head_dim}")));
    }
    for &(arg, p) in ptrs {
        if p == 0 {
            return Err(Error::invalid(arg, "null device pointer"));
        }
    }
    Ok(())
}

fn check_shape(s: &AttnShape) -> Result<()> {
    AttnShape::new(s.batch, s.seq, s.heads, s.kv_heads, s.head_dim)?;
    if s.batch * s.seq * s.heads.max(s.kv_heads) > (i32::MAX as usize) / 32 {
        return Err(Error::invalid("shape", format!("{s:?} is too large for one launch")));
    }
    Ok(())
}

fn grid(warps: usize) -> (u32, u32, u32) {
    (((warps * 32).div_ceil(THREADS as usize)) as u32, 1, 1)
}

fn scale(hd: usize) -> f32 {
    1.0 / (hd as f32).sqrt()
}

fn i32of(v: usize) -> i32 {
    v as i32
}

/// Causal attention forward: writes `out` (`dtype`) and `lse` (f32).
///
/// # Safety
/// Every pointer must be a live device allocation of `dev`'s context of the size the layout
/// gives, `stream` must belong to the context, and the outputs must not overlap the inputs.
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
    check_shape(&shape)?;
    check(dtype, shape.head_dim, &[("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse)])?;
    let f = dev.function(&format!("attn_naive_fwd_{}", dtype.name()))?;
    let (mut q, mut k, mut v, mut out, mut lse) = (q, k, v, out, lse);
    let (mut b, mut s, mut h, mut kvh, mut hd) =
        (i32of(shape.batch), i32of(shape.seq), i32of(shape.heads), i32of(shape.kv_heads), i32of(shape.head_dim));
    let mut sc = scale(shape.head_dim);
    let mut params: [*mut c_void; 11] = [
        &mut q as *mut _ as _,
        &mut k as *mut _ as _,
        &mut v as *mut _ as _,
        &mut out as *mut _ as _,
        &mut lse as *mut _ as _,
        &mut b as *mut _ as _,
        &mut s as *mut _ as _,
        &mut h as *mut _ as _,
        &mut kvh as *mut _ as _,
        &mut hd as *mut _ as _,
        &mut sc as *mut _ as _,
    ];
    dev.launch("attention_forward", &f, grid(shape.batch * shape.seq * shape.heads), (THREADS, 1, 1), 0, stream, &mut params)
}

/// Causal attention backward: overwrites `dq`, `dk`, `dv` (`dtype`) from `dout` and the
/// forward's `out`, `lse`.
///
/// # Safety
/// As for [`attention_forward_raw`].
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
    check_shape(&shape)?;
    check(
        dtype,
        shape.head_dim,
        &[("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse), ("dout", dout), ("dq", dq), ("dk", dk), ("dv", dv)],
    )?;
    let fq = dev.function(&format!("attn_naive_dq_{}", dtype.name()))?;
    let fkv = dev.function(&format!("attn_naive_dkv_{}", dtype.name()))?;
    let (mut q, mut k, mut v, mut out, mut lse, mut dout, mut dq, mut dk, mut dv) = (q, k, v, out, lse, dout, dq, dk, dv);
    let (mut b, mut s, mut h, mut kvh, mut hd) =
        (i32of(shape.batch), i32of(shape.seq), i32of(shape.heads), i32of(shape.kv_heads), i32of(shape.head_dim));
    let mut sc = scale(shape.head_dim);
    let mut pq: [*mut c_void; 13] = [
        &mut q as *mut _ as _,
        &mut k as *mut _ as _,
        &mut v as *mut _ as _,
        &mut out as *mut _ as _,
        &mut lse as *mut _ as _,
        &mut dout as *mut _ as _,
        &mut dq as *mut _ as _,
        &mut b as *mut _ as _,
        &mut s as *mut _ as _,
        &mut h as *mut _ as _,
        &mut kvh as *mut _ as _,
        &mut hd as *mut _ as _,
        &mut sc as *mut _ as _,
    ];
    dev.launch("attention_backward dq", &fq, grid(shape.batch * shape.seq * shape.heads), (THREADS, 1, 1), 0, stream, &mut pq)?;
    let mut pkv: [*mut c_void; 14] = [
        &mut q as *mut _ as _,
        &mut k as *mut _ as _,
        &mut v as *mut _ as _,
        &mut out as *mut _ as _,
        &mut lse as *mut _ as _,
        &mut dout as *mut _ as _,
        &mut dk as *mut _ as _,
        &mut dv as *mut _ as _,
        &mut b as *mut _ as _,
        &mut s as *mut _ as _,
        &mut h as *mut _ as _,
        &mut kvh as *mut _ as _,
        &mut hd as *mut _ as _,
        &mut sc as *mut _ as _,
    ];
    dev.launch("attention_backward dkv", &fkv, grid(shape.batch * shape.seq * shape.kv_heads), (THREADS, 1, 1), 0, stream, &mut pkv)
}

/// One decoding step: `q` (`batch x heads*hd`) against the caches (`batch x capacity x
/// kv_heads*hd`, positions `0..len`); writes `out` (`batch x heads*hd`).
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
    out: CUdeviceptr,
) -> Result<()> {
    AttnShape::new(batch, capacity, heads, kv_heads, head_dim)?;
    if len == 0 || len > capacity {
        return Err(Error::invalid("len", format!("must be in 1..={capacity}, got {len}")));
    }
    if batch * capacity * heads > i32::MAX as usize / 32 {
        return Err(Error::invalid("batch", "too large for one launch"));
    }
    check(dtype, head_dim, &[("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)])?;
    let f = dev.function(&format!("attn_naive_decode_{}", dtype.name()))?;
    let (mut q, mut kc, mut vc, mut out) = (q, k_cache, v_cache, out);
    let (mut b, mut h, mut kvh, mut hd, mut cap, mut l) =
        (i32of(batch), i32of(heads), i32of(kv_heads), i32of(head_dim), i32of(capacity), i32of(len));
    let mut sc = scale(head_dim);
    let mut params: [*mut c_void; 11] = [
        &mut q as *mut _ as _,
        &mut kc as *mut _ as _,
        &mut vc as *mut _ as _,
        &mut out as *mut _ as _,
        &mut b as *mut _ as _,
        &mut h as *mut _ as _,
        &mut kvh as *mut _ as _,
        &mut hd as *mut _ as _,
        &mut cap as *mut _ as _,
        &mut l as *mut _ as _,
        &mut sc as *mut _ as _,
    ];
    dev.launch("attention_decode", &f, grid(batch * heads), (THREADS, 1, 1), 0, stream, &mut params)
}
