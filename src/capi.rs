//! The C ABI (`include/wegeft.h`, built as `libwegeft.so` by the `cdylib` crate type).
//!
//! Every function returns an `int` status (`WEGEFT_OK` = 0, else one of the `WEGEFT_ERR_*`
//! codes) and leaves a message for [`wegeft_last_error`] in a thread-local buffer (empty after a
//! success). No panic crosses the boundary: each body runs under `catch_unwind` and a panic
//! becomes `WEGEFT_ERR_PANIC` with its message.
//!
//! Same math as [`crate::cpu`] (see its module docs), with the scale `s`:
//!
//! ```text
//! C = s W phi (d_out x r)    u = x psi^T (T x r)
//! forward:   y  = x W^T + u C^T (+ b)
//! backward:  v  = G C,  S = G^T u;  dx = G W + v psi;  dphi += s W^T S;  dpsi += v^T x
//! merge:     W <- W + C psi;        unmerge: W <- W (I + s phi psi)^-1
//! LoRA:      y = x W^T + s (x A^T) B^T (+ b); dx = G W + s (G B) A; dA += s (G B)^T x; dB += s G^T (x A^T)
//! ```
//!
//! **CPU entry points** (`wegeft_cpu_*`) take host matrices as [`WegeftConstMat`] /
//! [`WegeftMat`]: a pointer, the buffer's length in elements and a row stride `ld` (0 = the
//! number of columns), row-major. Checked before any work: null pointers, the dtype code,
//! every shape, `ld >= cols`, that each buffer's stated length covers its view, alignment to
//! the element size, and that no output overlaps another argument. What cannot be checked:
//! that a pointer really addresses as many elements as the length it comes with says.
//!
//! **CUDA entry points** (`wegeft_cuda_*`) take a handle from [`wegeft_cuda_create`], a
//! `CUstream` (NULL = the legacy default stream) and device pointers (`CUdeviceptr`, as
//! `uint64_t`) to contiguous row-major buffers of the call's dtype (`dphi`, `dpsi`, `dA`, `dB`:
//! `f32`). Checked: handle, dtype, shapes, non-null and 16-byte aligned pointers. Not
//! checkable: buffer sizes, that the pointers belong to the device's primary context (the one
//! PyTorch and the runtime API use), and overlap. Work is queued on the stream; the call does
//! not wait for it (except unmerge, which synchronises the stream). In a build without the
//! `cuda` feature the same symbols exist and return `WEGEFT_ERR_NO_CUDA`.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use half::{bf16, f16};

use crate::cpu;
use crate::dtype::{DType, Element};
use crate::error::Error;
use crate::shape::{LayerShape, Mat, MatMut};

/// Success.
pub const WEGEFT_OK: c_int = 0;
/// A required pointer (or the handle) was NULL.
pub const WEGEFT_ERR_NULL: c_int = 1;
/// A bad argument: dtype code, shape, length, stride, alignment, overlap, scale.
pub const WEGEFT_ERR_INVALID: c_int = 2;
/// A numerical failure (a singular `I_r + s psi phi` in unmerge).
pub const WEGEFT_ERR_NUMERICAL: c_int = 3;
/// CUDA unavailable: built without the `cuda` feature, no driver, or no such device.
pub const WEGEFT_ERR_NO_CUDA: c_int = 4;
/// An error reported by the CUDA driver, cuBLAS or a kernel launch.
pub const WEGEFT_ERR_CUDA: c_int = 5;
/// A panic inside the library (a bug), caught at the boundary.
pub const WEGEFT_ERR_PANIC: c_int = 6;

/// `dtype` codes.
pub const WEGEFT_F32: c_int = 0;
pub const WEGEFT_BF16: c_int = 1;
pub const WEGEFT_F16: c_int = 2;

/// Path codes of [`wegeft_cuda_set_path`] (see `crate::cuda::Path`).
pub const WEGEFT_PATH_AUTO: c_int = 0;
pub const WEGEFT_PATH_FUSED: c_int = 1;
pub const WEGEFT_PATH_FUSED_SM90: c_int = 2;
pub const WEGEFT_PATH_COMPOSED: c_int = 3;
pub const WEGEFT_PATH_TUNED: c_int = 4;

/// One layer call's shape: `x` is `tokens x d_in`, `W` `d_out x d_in`, `phi` `d_in x rank`,
/// `psi` `rank x d_in`, `y` and `G` `tokens x d_out` (LoRA: `A` `rank x d_in`, `B` `d_out x rank`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WegeftShape {
    pub tokens: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
}

/// A read-only host matrix: `data` holds `len` elements of the call's dtype; row `i` starts at
/// element `i * ld` (`ld` = 0 means the number of columns).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WegeftConstMat {
    pub data: *const c_void,
    pub len: usize,
    pub ld: usize,
}

/// A writable host matrix, as [`WegeftConstMat`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WegeftMat {
    pub data: *mut c_void,
    pub len: usize,
    pub ld: usize,
}

/// A failed call: its status and message.
struct Fail {
    status: c_int,
    msg: String,
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Numerical(_) => WEGEFT_ERR_NUMERICAL,
            Error::NoCuda(_) => WEGEFT_ERR_NO_CUDA,
            Error::Cuda { .. } => WEGEFT_ERR_CUDA,
            _ => WEGEFT_ERR_INVALID,
        };
        Fail { status, msg: e.to_string() }
    }
}

type R<T> = std::result::Result<T, Fail>;

fn null(arg: &str) -> Fail {
    Fail { status: WEGEFT_ERR_NULL, msg: format!("{arg}: NULL pointer") }
}

fn invalid(arg: &str, msg: impl std::fmt::Display) -> Fail {
    Fail { status: WEGEFT_ERR_INVALID, msg: format!("invalid argument {arg}: {msg}") }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    // Interior NULs cannot be represented in a C string; replace them.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

/// Runs one C call: catches panics, records the message, returns the status.
fn guard(f: impl FnOnce() -> R<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error("");
            WEGEFT_OK
        }
        Ok(Err(fail)) => {
            set_last_error(&fail.msg);
            fail.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            set_last_error(&format!("internal panic (a bug in wegeft, please report): {what}"));
            WEGEFT_ERR_PANIC
        }
    }
}

fn dtype_of(code: c_int) -> R<DType> {
    match code {
        WEGEFT_F32 => Ok(DType::F32),
        WEGEFT_BF16 => Ok(DType::BF16),
        WEGEFT_F16 => Ok(DType::F16),
        _ => Err(invalid(
            "dtype",
            format!("unknown dtype code {code} (WEGEFT_F32 = 0, WEGEFT_BF16 = 1, WEGEFT_F16 = 2)"),
        )),
    }
}

fn layer_shape(s: WegeftShape) -> R<LayerShape> {
    Ok(LayerShape::new(s.tokens, s.d_in, s.d_out, s.rank)?)
}

/// A byte range one argument occupies, for the overlap check.
#[derive(Clone, Copy)]
struct Region {
    arg: &'static str,
    start: usize,
    bytes: usize,
    writes: bool,
}

/// Every written region must be disjoint from every other region.
fn check_overlap(regions: &[Region]) -> R<()> {
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            if !(a.writes || b.writes) || a.bytes == 0 || b.bytes == 0 {
                continue;
            }
            if a.start < b.start + b.bytes && b.start < a.start + a.bytes {
                return Err(invalid(
                    a.arg,
                    format!("overlaps {} (an output must not share memory with another argument)", b.arg),
                ));
            }
        }
    }
    Ok(())
}

/// Checks a raw host buffer (non-null, aligned for `E`, `len` elements addressable) and
/// returns its region.
fn region<E>(arg: &'static str, ptr: *const c_void, len: usize, writes: bool) -> R<Region> {
    if ptr.is_null() {
        return Err(null(arg));
    }
    let align = std::mem::align_of::<E>();
    if (ptr as usize) % align != 0 {
        return Err(Error::Align { arg, addr: ptr as usize, align }.into());
    }
    let bytes = len
        .checked_mul(std::mem::size_of::<E>())
        .filter(|&b| b <= isize::MAX as usize && (ptr as usize).checked_add(b).is_some())
        .ok_or_else(|| invalid(arg, format!("length {len} elements is too large")))?;
    Ok(Region { arg, start: ptr as usize, bytes, writes })
}

/// `ld` as given, or `cols` for 0.
fn ld_or(ld: usize, cols: usize) -> usize {
    if ld == 0 {
        cols
    } else {
        ld
    }
}

/// A checked read-only view of a C matrix argument.
///
/// # Safety
/// `m.data` must address `m.len` readable elements of `T` that no one writes during the call.
unsafe fn view<'a, T>(
    arg: &'static str,
    m: WegeftConstMat,
    (rows, cols): (usize, usize),
    regions: &mut Vec<Region>,
) -> R<Mat<'a, T>> {
    regions.push(region::<T>(arg, m.data, m.len, false)?);
    let data = std::slice::from_raw_parts(m.data as *const T, m.len);
    Ok(Mat::strided(arg, data, rows, cols, ld_or(m.ld, cols))?)
}

/// A checked layout of a writable C matrix (the slice is made after the overlap check).
fn view_mut_region<T>(
    arg: &'static str,
    m: WegeftMat,
    (rows, cols): (usize, usize),
    regions: &mut Vec<Region>,
) -> R<()> {
    regions.push(region::<T>(arg, m.data, m.len, true)?);
    let ld = ld_or(m.ld, cols);
    // Layout check without making a slice: the same rule as MatMut::strided.
    let needed = if ld < cols {
        return Err(Error::Stride { arg, ld, cols }.into());
    } else {
        (rows - 1).checked_mul(ld).and_then(|v| v.checked_add(cols)).ok_or_else(|| invalid(arg, "size overflows"))?
    };
    if m.len < needed {
        return Err(Error::Layout { arg, rows, cols, ld, needed, len: m.len }.into());
    }
    Ok(())
}

/// # Safety
/// As [`view`], writable, and disjoint from every other argument (checked by the caller).
unsafe fn make_mut<'a, T>(arg: &'static str, m: WegeftMat, (rows, cols): (usize, usize)) -> R<MatMut<'a, T>> {
    let data = std::slice::from_raw_parts_mut(m.data as *mut T, m.len);
    Ok(MatMut::strided(arg, data, rows, cols, ld_or(m.ld, cols))?)
}

/// An optional vector of `n` elements (`ptr` NULL: absent); its length must be exactly `n`.
fn opt_vec_region<E>(arg: &'static str, ptr: *const c_void, len: usize, n: usize, writes: bool) -> R<Option<Region>> {
    if ptr.is_null() {
        return Ok(None);
    }
    if len != n {
        return Err(Error::Len { arg, expected: n, got: len }.into());
    }
    Ok(Some(region::<E>(arg, ptr, len, writes)?))
}

/// A required `f32` vector of exactly `n` elements.
fn vec_region(arg: &'static str, ptr: *const c_void, len: usize, n: usize, writes: bool) -> R<Region> {
    opt_vec_region::<f32>(arg, ptr, len, n, writes)?.ok_or_else(|| null(arg))
}

/// Runs `$f::<T>(...)` for the storage type of dtype code `$code`.
macro_rules! dispatch {
    ($code:expr, $f:ident ( $($a:expr),* $(,)? )) => {
        match dtype_of($code)? {
            DType::F32 => $f::<f32>($($a),*),
            DType::BF16 => $f::<bf16>($($a),*),
            DType::F16 => $f::<f16>($($a),*),
        }
    };
}

// ---- CPU ------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
unsafe fn cpu_forward<T: Element>(
    sh: WegeftShape,
    x: WegeftConstMat,
    w: WegeftConstMat,
    bias: *const c_void,
    bias_len: usize,
    phi: WegeftConstMat,
    psi: WegeftConstMat,
    scale: f32,
    y: WegeftMat,
    saved_u: *mut f32,
    saved_u_len: usize,
    saved_c: *mut f32,
    saved_c_len: usize,
) -> R<()> {
    let s = layer_shape(sh)?;
    let mut regions = Vec::new();
    let xm = view::<T>("x", x, s.x(), &mut regions)?;
    let wm = view::<T>("W", w, s.w(), &mut regions)?;
    let phim = view::<T>("phi", phi, s.phi(), &mut regions)?;
    let psim = view::<T>("psi", psi, s.psi(), &mut regions)?;
    regions.extend(opt_vec_region::<T>("b", bias, bias_len, s.d_out, false)?);
    view_mut_region::<T>("y", y, s.y(), &mut regions)?;
    regions.extend(opt_vec_region::<f32>("saved_u", saved_u as *const c_void, saved_u_len, s.tokens * s.rank, true)?);
    regions.extend(opt_vec_region::<f32>("saved_c", saved_c as *const c_void, saved_c_len, s.d_out * s.rank, true)?);
    check_overlap(&regions)?;
    let b = (!bias.is_null()).then(|| std::slice::from_raw_parts(bias as *const T, bias_len));
    let ym = make_mut::<T>("y", y, s.y())?;
    let saved = cpu::wegeft_forward(&s, xm, wm, b, phim, psim, scale, ym)?;
    if !saved_u.is_null() {
        std::slice::from_raw_parts_mut(saved_u, saved_u_len).copy_from_slice(&saved.u);
    }
    if !saved_c.is_null() {
        std::slice::from_raw_parts_mut(saved_c, saved_c_len).copy_from_slice(&saved.c);
    }
    Ok(())
}

/// WeGeFT forward on the CPU: `y = x W^T + u C^T (+ b)`, `C = s W phi`, `u = x psi^T`.
///
/// `bias` (`d_out` elements of `dtype`, `bias_len` must be `d_out`) may be NULL. `y` is
/// overwritten. `saved_u` (`tokens x rank`, f32) and `saved_c` (`d_out x rank`, f32) may be
/// NULL; when given they receive `u` and `C` for [`wegeft_cpu_backward`].
///
/// # Safety
/// Each pointer must address at least as many elements as its length argument says.
#[no_mangle]
pub unsafe extern "C" fn wegeft_cpu_forward(
    dtype: c_int,
    shape: WegeftShape,
    x: WegeftConstMat,
    w: WegeftConstMat,
    bias: *const c_void,
    bias_len: usize,
    phi: WegeftConstMat,
    psi: WegeftConstMat,
    scale: f32,
    y: WegeftMat,
    saved_u: *mut f32,
    saved_u_len: usize,
    saved_c: *mut f32,
    saved_c_len: usize,
) -> c_int {
    guard(|| {
        dispatch!(
            dtype,
            cpu_forward(shape, x, w, bias, bias_len, phi, psi, scale, y, saved_u, saved_u_len, saved_c, saved_c_len)
        )
    })
}

#[allow(clippy::too_many_arguments)]
unsafe fn cpu_backward<T: Element>(
    sh: WegeftShape,
    x: WegeftConstMat,
    w: WegeftConstMat,
    phi: WegeftConstMat,
    psi: WegeftConstMat,
    scale: f32,
    saved_u: *const f32,
    saved_u_len: usize,
    saved_c: *const f32,
    saved_c_len: usize,
    g: WegeftConstMat,
    dx: WegeftMat,
    dphi: *mut f32,
    dphi_len: usize,
    dpsi: *mut f32,
    dpsi_len: usize,
) -> R<()> {
    let s = layer_shape(sh)?;
    let mut regions = Vec::new();
    let xm = view::<T>("x", x, s.x(), &mut regions)?;
    let wm = view::<T>("W", w, s.w(), &mut regions)?;
    let phim = view::<T>("phi", phi, s.phi(), &mut regions)?;
    let psim = view::<T>("psi", psi, s.psi(), &mut regions)?;
    let gm = view::<T>("G", g, s.y(), &mut regions)?;
    if saved_u.is_null() != saved_c.is_null() {
        return Err(invalid("saved_u/saved_c", "give both (from wegeft_cpu_forward) or neither (recomputed)"));
    }
    regions.extend(opt_vec_region::<f32>("saved_u", saved_u as *const c_void, saved_u_len, s.tokens * s.rank, false)?);
    regions.extend(opt_vec_region::<f32>("saved_c", saved_c as *const c_void, saved_c_len, s.d_out * s.rank, false)?);
    if !dx.data.is_null() {
        view_mut_region::<T>("dx", dx, s.x(), &mut regions)?;
    }
    regions.push(vec_region("dphi", dphi as *const c_void, dphi_len, s.d_in * s.rank, true)?);
    regions.push(vec_region("dpsi", dpsi as *const c_void, dpsi_len, s.rank * s.d_in, true)?);
    check_overlap(&regions)?;
    let saved = (!saved_u.is_null()).then(|| cpu::Saved {
        u: std::slice::from_raw_parts(saved_u, saved_u_len).to_vec(),
        c: std::slice::from_raw_parts(saved_c, saved_c_len).to_vec(),
    });
    let dxm = if dx.data.is_null() { None } else { Some(make_mut::<T>("dx", dx, s.x())?) };
    let dphis = std::slice::from_raw_parts_mut(dphi, dphi_len);
    let dpsis = std::slice::from_raw_parts_mut(dpsi, dpsi_len);
    cpu::wegeft_backward(&s, xm, wm, phim, psim, scale, saved.as_ref(), gm, dxm, dphis, dpsis)?;
    Ok(())
}

/// WeGeFT backward on the CPU from `G = dL/dy`: `dx = G W + v psi` (overwritten; skipped when
/// `dx.data` is NULL), `dphi += s W^T S`, `dpsi += v^T x` (f32, `d_in x rank` and
/// `rank x d_in`, accumulated: zero them first, or call once per layer sharing the pair).
/// `saved_u`/`saved_c`: both from [`wegeft_cpu_forward`] of the same inputs, or both NULL
/// (recomputed from `phi`).
///
/// # Safety
/// Each pointer must address at least as many elements as its length argument says.
#[no_mangle]
pub unsafe extern "C" fn wegeft_cpu_backward(
    dtype: c_int,
    shape: WegeftShape,
    x: WegeftConstMat,
    w: WegeftConstMat,
    phi: WegeftConstMat,
    psi: WegeftConstMat,
    scale: f32,
    saved_u: *const f32,
    saved_u_len: usize,
    saved_c: *const f32,
    saved_c_len: usize,
    g: WegeftConstMat,
    dx: WegeftMat,
    dphi: *mut f32,
    dphi_len: usize,
    dpsi: *mut f32,
    dpsi_len: usize,
) -> c_int {
    guard(|| {
        dispatch!(
            dtype,
            cpu_backward(
                shape,
                x,
                w,
                phi,
                psi,
                scale,
                saved_u,
                saved_u_len,
                saved_c,
                saved_c_len,
                g,
                dx,
                dphi,
                dphi_len,
                dpsi,
                dpsi_len
            )
        )
    })
}

/// The shape of a merge: `tokens` is not used (0 is accepted).
fn merge_shape(sh: WegeftShape) -> R<LayerShape> {
    layer_shape(WegeftShape { tokens: sh.tokens.max(1), ..sh })
}

unsafe fn cpu_merge<T: Element>(
    sh: WegeftShape,
    w: WegeftMat,
    phi: WegeftConstMat,
    psi: WegeftConstMat,
    scale: f32,
    un: bool,
) -> R<()> {
    let s = merge_shape(sh)?;
    let mut regions = Vec::new();
    let phim = view::<T>("phi", phi, s.phi(), &mut regions)?;
    let psim = view::<T>("psi", psi, s.psi(), &mut regions)?;
    view_mut_region::<T>("W", w, s.w(), &mut regions)?;
    check_overlap(&regions)?;
    let wm = make_mut::<T>("W", w, s.w())?;
    if un {
        cpu::wegeft_unmerge(&s, wm, phim, psim, scale)?;
    } else {
        cpu::wegeft_merge(&s, wm, phim, psim, scale)?;
    }
    Ok(())
}

/// Merge in place on the CPU: `W <- W + s W phi psi`. `shape.tokens` is not used.
///
/// # Safety
/// Each pointer must address at least as many elements as its length argument says.
#[no_mangle]
pub unsafe extern "C" fn wegeft_cpu_merge(
    dtype: c_int,
    shape: WegeftShape,
    w: WegeftMat,
    phi: WegeftConstMat,
    psi: WegeftConstMat,
    scale: f32,
) -> c_int {
    guard(|| dispatch!(dtype, cpu_merge(shape, w, phi, psi, scale, false)))
}

/// Exact unmerge in place on the CPU: `W <- W (I + s phi psi)^-1` (Woodbury, an `r x r`
/// solve in f64). `WEGEFT_ERR_NUMERICAL`, `W` untouched, when `I_r + s psi phi` is singular.
///
/// # Safety
/// Each pointer must address at least as many elements as its length argument says.
#[no_mangle]
pub unsafe extern "C" fn wegeft_cpu_unmerge(
    dtype: c_int,
    shape: WegeftShape,
    w: WegeftMat,
    phi: WegeftConstMat,
    psi: WegeftConstMat,
    scale: f32,
) -> c_int {
    guard(|| dispatch!(dtype, cpu_merge(shape, w, phi, psi, scale, true)))
}

#[allow(clippy::too_many_arguments)]
unsafe fn cpu_lora_forward<T: Element>(
    sh: WegeftShape,
    x: WegeftConstMat,
    w: WegeftConstMat,
    bias: *const c_void,
    bias_len: usize,
    a: WegeftConstMat,
    b: WegeftConstMat,
    scale: f32,
    y: WegeftMat,
    saved_xa: *mut f32,
    saved_xa_len: usize,
) -> R<()> {
    let s = layer_shape(sh)?;
    let mut regions = Vec::new();
    let xm = view::<T>("x", x, s.x(), &mut regions)?;
    let wm = view::<T>("W", w, s.w(), &mut regions)?;
    let am = view::<T>("A", a, s.lora_a(), &mut regions)?;
    let bm = view::<T>("B", b, s.lora_b(), &mut regions)?;
    regions.extend(opt_vec_region::<T>("b", bias, bias_len, s.d_out, false)?);
    view_mut_region::<T>("y", y, s.y(), &mut regions)?;
    regions.extend(opt_vec_region::<f32>(
        "saved_xa",
        saved_xa as *const c_void,
        saved_xa_len,
        s.tokens * s.rank,
        true,
    )?);
    check_overlap(&regions)?;
    let bv = (!bias.is_null()).then(|| std::slice::from_raw_parts(bias as *const T, bias_len));
    let ym = make_mut::<T>("y", y, s.y())?;
    let saved = cpu::lora_forward(&s, xm, wm, bv, am, bm, scale, ym)?;
    if !saved_xa.is_null() {
        std::slice::from_raw_parts_mut(saved_xa, saved_xa_len).copy_from_slice(&saved.xa);
    }
    Ok(())
}

/// LoRA forward on the CPU: `y = x W^T + s (x A^T) B^T (+ b)`; `A` is `rank x d_in`, `B` is
/// `d_out x rank`. `bias` and `saved_xa` (`tokens x rank`, f32, receives `x A^T`) may be NULL.
///
/// # Safety
/// Each pointer must address at least as many elements as its length argument says.
#[no_mangle]
pub unsafe extern "C" fn wegeft_cpu_lora_forward(
    dtype: c_int,
    shape: WegeftShape,
    x: WegeftConstMat,
    w: WegeftConstMat,
    bias: *const c_void,
    bias_len: usize,
    a: WegeftConstMat,
    b: WegeftConstMat,
    scale: f32,
    y: WegeftMat,
    saved_xa: *mut f32,
    saved_xa_len: usize,
) -> c_int {
    guard(|| dispatch!(dtype, cpu_lora_forward(shape, x, w, bias, bias_len, a, b, scale, y, saved_xa, saved_xa_len)))
}

#[allow(clippy::too_many_arguments)]
unsafe fn cpu_lora_backward<T: Element>(
    sh: WegeftShape,
    x: WegeftConstMat,
    w: WegeftConstMat,
    a: WegeftConstMat,
    b: WegeftConstMat,
    scale: f32,
    saved_xa: *const f32,
    saved_xa_len: usize,
    g: WegeftConstMat,
    dx: WegeftMat,
    da: *mut f32,
    da_len: usize,
    db: *mut f32,
    db_len: usize,
) -> R<()> {
    let s = layer_shape(sh)?;
    let mut regions = Vec::new();
    let xm = view::<T>("x", x, s.x(), &mut regions)?;
    let wm = view::<T>("W", w, s.w(), &mut regions)?;
    let am = view::<T>("A", a, s.lora_a(), &mut regions)?;
    let bm = view::<T>("B", b, s.lora_b(), &mut regions)?;
    let gm = view::<T>("G", g, s.y(), &mut regions)?;
    regions.extend(opt_vec_region::<f32>(
        "saved_xa",
        saved_xa as *const c_void,
        saved_xa_len,
        s.tokens * s.rank,
        false,
    )?);
    if !dx.data.is_null() {
        view_mut_region::<T>("dx", dx, s.x(), &mut regions)?;
    }
    regions.push(vec_region("dA", da as *const c_void, da_len, s.rank * s.d_in, true)?);
    regions.push(vec_region("dB", db as *const c_void, db_len, s.d_out * s.rank, true)?);
    check_overlap(&regions)?;
    let saved = (!saved_xa.is_null())
        .then(|| cpu::LoraSaved { xa: std::slice::from_raw_parts(saved_xa, saved_xa_len).to_vec() });
    let dxm = if dx.data.is_null() { None } else { Some(make_mut::<T>("dx", dx, s.x())?) };
    let das = std::slice::from_raw_parts_mut(da, da_len);
    let dbs = std::slice::from_raw_parts_mut(db, db_len);
    cpu::lora_backward(&s, xm, wm, am, bm, scale, saved.as_ref(), gm, dxm, das, dbs)?;
    Ok(())
}

/// LoRA backward on the CPU: `dx = G W + s (G B) A` (skipped when `dx.data` is NULL),
/// `dA += s (G B)^T x`, `dB += s G^T (x A^T)` (f32, accumulated). `saved_xa` may be NULL.
///
/// # Safety
/// Each pointer must address at least as many elements as its length argument says.
#[no_mangle]
pub unsafe extern "C" fn wegeft_cpu_lora_backward(
    dtype: c_int,
    shape: WegeftShape,
    x: WegeftConstMat,
    w: WegeftConstMat,
    a: WegeftConstMat,
    b: WegeftConstMat,
    scale: f32,
    saved_xa: *const f32,
    saved_xa_len: usize,
    g: WegeftConstMat,
    dx: WegeftMat,
    da: *mut f32,
    da_len: usize,
    db: *mut f32,
    db_len: usize,
) -> c_int {
    guard(|| {
        dispatch!(
            dtype,
            cpu_lora_backward(shape, x, w, a, b, scale, saved_xa, saved_xa_len, g, dx, da, da_len, db, db_len)
        )
    })
}

/// The host arrays of a many-adapter call (CPU and CUDA): `scales` (`adapters` f32) and
/// `adapter_of_token` (`tokens` i32), checked (non-null, exact lengths, aligned) and their
/// regions recorded for the overlap check; the values are checked by the layer.
///
/// # Safety
/// Each pointer must address as many elements as its length says, unwritten during the call.
unsafe fn multi_host_args<'a>(
    adapters: usize,
    tokens: usize,
    scales: *const f32,
    scales_len: usize,
    adapter_of_token: *const i32,
    adapter_of_token_len: usize,
    regions: &mut Vec<Region>,
) -> R<(&'a [f32], &'a [i32])> {
    regions.push(vec_region("scales", scales as *const c_void, scales_len, adapters, false)?);
    let idx = adapter_of_token as *const c_void;
    let idx_region = opt_vec_region::<i32>("adapter_of_token", idx, adapter_of_token_len, tokens, false)?;
    regions.push(idx_region.ok_or_else(|| null("adapter_of_token"))?);
    Ok((std::slice::from_raw_parts(scales, scales_len), std::slice::from_raw_parts(adapter_of_token, adapter_of_token_len)))
}

#[allow(clippy::too_many_arguments)]
unsafe fn cpu_multi_forward<T: Element>(
    sh: WegeftShape,
    adapters: usize,
    x: WegeftConstMat,
    w: WegeftConstMat,
    bias: *const c_void,
    bias_len: usize,
    phi: *const c_void,
    phi_len: usize,
    psi: *const c_void,
    psi_len: usize,
    scales: *const f32,
    scales_len: usize,
    adapter_of_token: *const i32,
    adapter_of_token_len: usize,
    y: WegeftMat,
) -> R<()> {
    let s = layer_shape(sh)?;
    if adapters == 0 {
        return Err(Error::ZeroDim { what: "adapters" }.into());
    }
    let pair = adapters
        .checked_mul(s.d_in)
        .and_then(|v| v.checked_mul(s.rank))
        .ok_or_else(|| invalid("adapters", "adapters x d_in x rank overflows"))?;
    let mut regions = Vec::new();
    let xm = view::<T>("x", x, s.x(), &mut regions)?;
    let wm = view::<T>("W", w, s.w(), &mut regions)?;
    regions.extend(opt_vec_region::<T>("b", bias, bias_len, s.d_out, false)?);
    regions.push(opt_vec_region::<T>("phi", phi, phi_len, pair, false)?.ok_or_else(|| null("phi"))?);
    regions.push(opt_vec_region::<T>("psi", psi, psi_len, pair, false)?.ok_or_else(|| null("psi"))?);
    let (scs, idxs) =
        multi_host_args(adapters, s.tokens, scales, scales_len, adapter_of_token, adapter_of_token_len, &mut regions)?;
    view_mut_region::<T>("y", y, s.y(), &mut regions)?;
    check_overlap(&regions)?;
    let b = (!bias.is_null()).then(|| std::slice::from_raw_parts(bias as *const T, bias_len));
    let phis = std::slice::from_raw_parts(phi as *const T, phi_len);
    let psis = std::slice::from_raw_parts(psi as *const T, psi_len);
    let ym = make_mut::<T>("y", y, s.y())?;
    let path = cpu::multi::MultiPath::Auto;
    Ok(cpu::multi::wegeft_multi_forward_as(xm, wm, b, phis, psis, scs, s.rank, idxs, path, ym)?)
}

/// Many adapters in one batch on the CPU (multi-tenant serving): `y_t = h_t W^T (+ b)` with
/// `h_t = x_t + s_a (x_t psi_a^T) phi_a^T`, `a = adapter_of_token[t]` (`-1`: no adapter,
/// `h_t = x_t`) — for every token the output of its own adapter's layer, with one frozen GEMM
/// for the whole batch. The `adapters` pairs are stacked contiguously: `phi` is
/// `adapters x d_in x rank` and `psi` `adapters x rank x d_in` (`dtype`), `scales` holds
/// `adapters` f32. `shape.tokens` = `adapter_of_token_len`; `bias` may be NULL.
///
/// # Safety
/// Each pointer must address at least as many elements as its length argument says.
#[no_mangle]
pub unsafe extern "C" fn wegeft_cpu_multi_forward(
    dtype: c_int,
    shape: WegeftShape,
    adapters: usize,
    x: WegeftConstMat,
    w: WegeftConstMat,
    bias: *const c_void,
    bias_len: usize,
    phi: *const c_void,
    phi_len: usize,
    psi: *const c_void,
    psi_len: usize,
    scales: *const f32,
    scales_len: usize,
    adapter_of_token: *const i32,
    adapter_of_token_len: usize,
    y: WegeftMat,
) -> c_int {
    guard(|| {
        dispatch!(
            dtype,
            cpu_multi_forward(
                shape,
                adapters,
                x,
                w,
                bias,
                bias_len,
                phi,
                phi_len,
                psi,
                psi_len,
                scales,
                scales_len,
                adapter_of_token,
                adapter_of_token_len,
                y
            )
        )
    })
}

// ---- misc -----------------------------------------------------------------------------------

/// The message of the last failed call on this thread (empty after a success). Valid until
/// the next `wegeft_*` call on the same thread; never NULL.
#[no_mangle]
pub extern "C" fn wegeft_last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// The crate version, e.g. `"0.1.0"` (static).
#[no_mangle]
pub extern "C" fn wegeft_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// A static name for a status code (`"WEGEFT_OK"`, `"WEGEFT_ERR_NULL"`, ..., `"unknown"`).
#[no_mangle]
pub extern "C" fn wegeft_status_name(status: c_int) -> *const c_char {
    let s: &'static str = match status {
        WEGEFT_OK => "WEGEFT_OK\0",
        WEGEFT_ERR_NULL => "WEGEFT_ERR_NULL\0",
        WEGEFT_ERR_INVALID => "WEGEFT_ERR_INVALID\0",
        WEGEFT_ERR_NUMERICAL => "WEGEFT_ERR_NUMERICAL\0",
        WEGEFT_ERR_NO_CUDA => "WEGEFT_ERR_NO_CUDA\0",
        WEGEFT_ERR_CUDA => "WEGEFT_ERR_CUDA\0",
        WEGEFT_ERR_PANIC => "WEGEFT_ERR_PANIC\0",
        _ => "unknown\0",
    };
    s.as_ptr() as *const c_char
}

/// 1 when this library was built with the `cuda` feature, else 0.
#[no_mangle]
pub extern "C" fn wegeft_built_with_cuda() -> c_int {
    cfg!(feature = "cuda") as c_int
}

// ---- CUDA -----------------------------------------------------------------------------------

/// The opaque CUDA handle of the C ABI: one device's context (the primary context), its loaded
/// kernels and cuBLASLt handle.
pub struct WegeftCuda {
    #[cfg(feature = "cuda")]
    backend: crate::cuda::CudaBackend,
    /// The `WEGEFT_PATH_*` code of the K-extended products (forward, backward, LoRA).
    #[cfg(feature = "cuda")]
    path: std::sync::atomic::AtomicI32,
}

/// A device pointer (`CUdeviceptr`).
pub type WegeftDevicePtr = u64;

#[cfg(feature = "cuda")]
mod cuda_impl {
    use super::*;
    use crate::cuda::{Dropout, Path};
    use cudarc::driver::sys::CUstream;

    pub(super) fn create(device: c_int, out: *mut *mut WegeftCuda) -> R<()> {
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: out checked non-null; the caller gives a writable pointer.
        unsafe { *out = std::ptr::null_mut() };
        let ordinal =
            usize::try_from(device).map_err(|_| invalid("device", format!("negative device ordinal {device}")))?;
        let backend = crate::cuda::CudaBackend::new(ordinal)?;
        let path = std::sync::atomic::AtomicI32::new(WEGEFT_PATH_AUTO);
        unsafe { *out = Box::into_raw(Box::new(WegeftCuda { backend, path })) };
        Ok(())
    }

    /// The handle's backend and path.
    pub(super) fn handle<'a>(h: *const WegeftCuda) -> R<(&'a crate::cuda::CudaBackend, Path)> {
        if h.is_null() {
            return Err(null("handle"));
        }
        // SAFETY: a non-null handle comes from wegeft_cuda_create and is not yet destroyed.
        let h = unsafe { &*h };
        Ok((&h.backend, path_of(h.path.load(std::sync::atomic::Ordering::Relaxed))?))
    }

    fn path_of(code: c_int) -> R<Path> {
        Ok(match code {
            WEGEFT_PATH_AUTO => Path::Auto,
            WEGEFT_PATH_FUSED => Path::Fused,
            WEGEFT_PATH_FUSED_SM90 => Path::FusedSm90,
            WEGEFT_PATH_COMPOSED => Path::Composed,
            WEGEFT_PATH_TUNED => Path::Tuned,
            _ => return Err(invalid("path", format!("unknown path code {code} (WEGEFT_PATH_AUTO .. WEGEFT_PATH_TUNED)"))),
        })
    }

    pub(super) fn set_path(h: *mut WegeftCuda, code: c_int) -> R<()> {
        if h.is_null() {
            return Err(null("handle"));
        }
        let path = path_of(code)?;
        if matches!(path, Path::Fused | Path::FusedSm90) && !crate::cuda::FUSED_GEMM_BUILT {
            return Err(invalid("path", "a fused path asked for, but the fused K-extended GEMM is not built in"));
        }
        // SAFETY: as in `handle`.
        unsafe { &*h }.path.store(code, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn opt(p: WegeftDevicePtr) -> Option<u64> {
        (p != 0).then_some(p)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn forward(
        h: *const WegeftCuda,
        stream: *mut c_void,
        dtype: c_int,
        shape: WegeftShape,
        x: u64,
        w: u64,
        bias: u64,
        phi: u64,
        psi: u64,
        scale: f32,
        u: u64,
        c: u64,
        y: u64,
    ) -> R<()> {
        let (d, path) = handle(h)?;
        let dt = dtype_of(dtype)?;
        let s = layer_shape(shape)?;
        Ok(d.wegeft_forward_raw(
            dt,
            &s,
            stream as CUstream,
            x,
            w,
            opt(bias),
            phi,
            psi,
            scale,
            Dropout::NONE,
            u,
            c,
            y,
            path,
        )?)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn backward(
        h: *const WegeftCuda,
        stream: *mut c_void,
        dtype: c_int,
        shape: WegeftShape,
        x: u64,
        w: u64,
        psi: u64,
        scale: f32,
        u: u64,
        c: u64,
        g: u64,
        dx: u64,
        dphi: u64,
        dpsi: u64,
    ) -> R<()> {
        let (d, path) = handle(h)?;
        let dt = dtype_of(dtype)?;
        let s = layer_shape(shape)?;
        Ok(d.wegeft_backward_raw(
            dt,
            &s,
            stream as CUstream,
            x,
            w,
            psi,
            scale,
            Dropout::NONE,
            u,
            c,
            g,
            opt(dx),
            dphi,
            dpsi,
            path,
        )?)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn merge(
        h: *const WegeftCuda,
        stream: *mut c_void,
        dtype: c_int,
        shape: WegeftShape,
        w: u64,
        phi: u64,
        psi: u64,
        scale: f32,
        un: bool,
    ) -> R<()> {
        let (d, _) = handle(h)?;
        let dt = dtype_of(dtype)?;
        let s = merge_shape(shape)?;
        if un {
            Ok(d.wegeft_unmerge_raw(dt, &s, stream as CUstream, w, phi, psi, scale)?)
        } else {
            Ok(d.wegeft_merge_raw(dt, &s, stream as CUstream, w, phi, psi, scale)?)
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn lora_forward(
        h: *const WegeftCuda,
        stream: *mut c_void,
        dtype: c_int,
        shape: WegeftShape,
        x: u64,
        w: u64,
        bias: u64,
        a: u64,
        b: u64,
        scale: f32,
        xa: u64,
        y: u64,
    ) -> R<()> {
        let (d, path) = handle(h)?;
        let dt = dtype_of(dtype)?;
        let s = layer_shape(shape)?;
        Ok(d.lora_forward_raw(dt, &s, stream as CUstream, x, w, opt(bias), a, b, scale, xa, y, path)?)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn lora_backward(
        h: *const WegeftCuda,
        stream: *mut c_void,
        dtype: c_int,
        shape: WegeftShape,
        x: u64,
        w: u64,
        a: u64,
        b: u64,
        scale: f32,
        xa: u64,
        g: u64,
        dx: u64,
        da: u64,
        db: u64,
    ) -> R<()> {
        let (d, path) = handle(h)?;
        let dt = dtype_of(dtype)?;
        let s = layer_shape(shape)?;
        Ok(d.lora_backward_raw(dt, &s, stream as CUstream, x, w, a, b, scale, xa, g, opt(dx), da, db, path)?)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn multi_forward(
        h: *const WegeftCuda,
        stream: *mut c_void,
        dtype: c_int,
        shape: WegeftShape,
        adapters: usize,
        x: u64,
        w: u64,
        bias: u64,
        phi: u64,
        psi: u64,
        scales: *const f32,
        scales_len: usize,
        adapter_of_token: *const i32,
        adapter_of_token_len: usize,
        y: u64,
    ) -> R<()> {
        let (d, _) = handle(h)?;
        let dt = dtype_of(dtype)?;
        let s = layer_shape(shape)?;
        let (scs, idx) = multi_host_args(
            adapters,
            s.tokens,
            scales,
            scales_len,
            adapter_of_token,
            adapter_of_token_len,
            &mut Vec::new(),
        )?;
        Ok(d.wegeft_multi_forward_raw(dt, stream as CUstream, s.d_in, s.d_out, s.rank, x, w, opt(bias), phi, psi, scs, idx, y)?)
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Fail {
    Fail {
        status: WEGEFT_ERR_NO_CUDA,
        msg: "CUDA unavailable: wegeft was built without CUDA (cargo feature `cuda`)".into(),
    }
}

/// Opens CUDA device `device` (its primary context, the one the CUDA runtime and PyTorch
/// use) and stores a handle in `*out` (NULL on failure). `WEGEFT_ERR_NO_CUDA` when there is
/// no driver, no such device, a compute capability below 8.0, or the library was built
/// without CUDA.
///
/// # Safety
/// `out` must be NULL (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn wegeft_cuda_create(device: c_int, out: *mut *mut WegeftCuda) -> c_int {
    guard(|| {
        #[cfg(feature = "cuda")]
        {
            cuda_impl::create(device, out)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            if !out.is_null() {
                *out = std::ptr::null_mut();
            }
            Err(no_cuda())
        }
    })
}

/// Releases a handle from [`wegeft_cuda_create`] (NULL: nothing to do). Work already queued
/// with it must have finished.
///
/// # Safety
/// `handle` must be NULL or a live handle, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn wegeft_cuda_destroy(handle: *mut WegeftCuda) -> c_int {
    guard(|| {
        if !handle.is_null() {
            drop(Box::from_raw(handle));
        }
        Ok(())
    })
}

/// Runs a CUDA entry point, or reports a build without CUDA.
macro_rules! cuda_call {
    ($f:ident ( $($a:expr),* $(,)? )) => {
        guard(|| {
            #[cfg(feature = "cuda")]
            {
                cuda_impl::$f($($a),*)
            }
            #[cfg(not(feature = "cuda"))]
            {
                $(let _ = $a;)*
                Err(no_cuda())
            }
        })
    };
}

/// Puts the handle's later forward, backward and LoRA calls on `path`, a `WEGEFT_PATH_*` code:
/// `AUTO` (the default: the fused K-extended GEMM where its vector loads apply, else cuBLASLt +
/// the rank-r kernel), `FUSED`, `FUSED_SM90` (wgmma kernels on compute capability 9.0),
/// `COMPOSED`, or `TUNED` (per shape, the fastest of these as timed on the first call of that
/// shape, which waits for its stream: not inside a CUDA graph capture; results are bitwise
/// reproducible within a process, not across processes). Merge and unmerge are unaffected.
///
/// # Safety
/// `handle` must be NULL (an error) or a live handle.
#[no_mangle]
pub unsafe extern "C" fn wegeft_cuda_set_path(handle: *mut WegeftCuda, path: c_int) -> c_int {
    cuda_call!(set_path(handle, path))
}

/// Many adapters in one batch on the GPU: as [`wegeft_cpu_multi_forward`], on device pointers
/// (`x`, `w`, `bias` (0: none), `phi` `adapters x d_in x rank`, `psi` `adapters x rank x d_in`,
/// `y`: contiguous, `dtype`, 16-byte aligned). `scales` and `adapter_of_token` are HOST
/// arrays: checked (finite scales, indices `-1` or `0..adapters`), then copied to the device on
/// `stream` before the call returns, so they may be reused at once. `shape.rank` <= 256. One
/// kernel edits every token's input (`h`, stream-ordered scratch), one cuBLASLt GEMM does
/// `h W^T (+ b)`.
///
/// # Safety
/// Device pointers as for [`wegeft_cuda_forward`]; host pointers must address as many
/// elements as their lengths say.
#[no_mangle]
pub unsafe extern "C" fn wegeft_cuda_multi_forward(
    handle: *const WegeftCuda,
    stream: *mut c_void,
    dtype: c_int,
    shape: WegeftShape,
    adapters: usize,
    x: WegeftDevicePtr,
    w: WegeftDevicePtr,
    bias: WegeftDevicePtr,
    phi: WegeftDevicePtr,
    psi: WegeftDevicePtr,
    scales: *const f32,
    scales_len: usize,
    adapter_of_token: *const i32,
    adapter_of_token_len: usize,
    y: WegeftDevicePtr,
) -> c_int {
    cuda_call!(multi_forward(
        handle,
        stream,
        dtype,
        shape,
        adapters,
        x,
        w,
        bias,
        phi,
        psi,
        scales,
        scales_len,
        adapter_of_token,
        adapter_of_token_len,
        y
    ))
}

/// WeGeFT forward on the GPU: `u = x psi^T` (`tokens x rank`), `C = s W phi`
/// (`d_out x rank`), `y = x W^T + u C^T (+ b)`; `u` and `C` (dtype) are written for
/// [`wegeft_cuda_backward`]. `bias` may be 0 (none). Queued on `stream` (a `CUstream`).
///
/// # Safety
/// Device pointers must be live allocations of the device's primary context, holding at least
/// the elements their shapes need; outputs must not overlap inputs; buffers must live until
/// the stream has run the work.
#[no_mangle]
pub unsafe extern "C" fn wegeft_cuda_forward(
    handle: *const WegeftCuda,
    stream: *mut c_void,
    dtype: c_int,
    shape: WegeftShape,
    x: WegeftDevicePtr,
    w: WegeftDevicePtr,
    bias: WegeftDevicePtr,
    phi: WegeftDevicePtr,
    psi: WegeftDevicePtr,
    scale: f32,
    u: WegeftDevicePtr,
    c: WegeftDevicePtr,
    y: WegeftDevicePtr,
) -> c_int {
    cuda_call!(forward(handle, stream, dtype, shape, x, w, bias, phi, psi, scale, u, c, y))
}

/// WeGeFT backward on the GPU from `G`, with `u`, `C` from [`wegeft_cuda_forward`]:
/// `dx = G W + (G C) psi` (skipped when `dx` is 0), `dphi += s W^T G^T u`, `dpsi += (G C)^T x`
/// (`dphi`, `dpsi`: f32, accumulated).
///
/// # Safety
/// As [`wegeft_cuda_forward`].
#[no_mangle]
pub unsafe extern "C" fn wegeft_cuda_backward(
    handle: *const WegeftCuda,
    stream: *mut c_void,
    dtype: c_int,
    shape: WegeftShape,
    x: WegeftDevicePtr,
    w: WegeftDevicePtr,
    psi: WegeftDevicePtr,
    scale: f32,
    u: WegeftDevicePtr,
    c: WegeftDevicePtr,
    g: WegeftDevicePtr,
    dx: WegeftDevicePtr,
    dphi: WegeftDevicePtr,
    dpsi: WegeftDevicePtr,
) -> c_int {
    cuda_call!(backward(handle, stream, dtype, shape, x, w, psi, scale, u, c, g, dx, dphi, dpsi))
}

/// Merge in place on the GPU: `W <- W + s W phi psi`. `shape.tokens` is not used.
///
/// # Safety
/// As [`wegeft_cuda_forward`].
#[no_mangle]
pub unsafe extern "C" fn wegeft_cuda_merge(
    handle: *const WegeftCuda,
    stream: *mut c_void,
    dtype: c_int,
    shape: WegeftShape,
    w: WegeftDevicePtr,
    phi: WegeftDevicePtr,
    psi: WegeftDevicePtr,
    scale: f32,
) -> c_int {
    cuda_call!(merge(handle, stream, dtype, shape, w, phi, psi, scale, false))
}

/// Exact unmerge in place on the GPU: `W <- W (I + s phi psi)^-1`. Synchronises `stream`.
///
/// # Safety
/// As [`wegeft_cuda_forward`].
#[no_mangle]
pub unsafe extern "C" fn wegeft_cuda_unmerge(
    handle: *const WegeftCuda,
    stream: *mut c_void,
    dtype: c_int,
    shape: WegeftShape,
    w: WegeftDevicePtr,
    phi: WegeftDevicePtr,
    psi: WegeftDevicePtr,
    scale: f32,
) -> c_int {
    cuda_call!(merge(handle, stream, dtype, shape, w, phi, psi, scale, true))
}

/// LoRA forward on the GPU: `xa = s x A^T` (`tokens x rank`, dtype, scale included — unlike
/// the CPU's `saved_xa` — written for the backward), `y = x W^T + xa B^T (+ b)`.
///
/// # Safety
/// As [`wegeft_cuda_forward`].
#[no_mangle]
pub unsafe extern "C" fn wegeft_cuda_lora_forward(
    handle: *const WegeftCuda,
    stream: *mut c_void,
    dtype: c_int,
    shape: WegeftShape,
    x: WegeftDevicePtr,
    w: WegeftDevicePtr,
    bias: WegeftDevicePtr,
    a: WegeftDevicePtr,
    b: WegeftDevicePtr,
    scale: f32,
    xa: WegeftDevicePtr,
    y: WegeftDevicePtr,
) -> c_int {
    cuda_call!(lora_forward(handle, stream, dtype, shape, x, w, bias, a, b, scale, xa, y))
}

/// LoRA backward on the GPU: `dx = G W + s (G B) A` (skipped when `dx` is 0),
/// `dA += s (G B)^T x`, `dB += G^T xa` (f32, accumulated; `xa` as the forward wrote it, scale
/// included).
///
/// # Safety
/// As [`wegeft_cuda_forward`].
#[no_mangle]
pub unsafe extern "C" fn wegeft_cuda_lora_backward(
    handle: *const WegeftCuda,
    stream: *mut c_void,
    dtype: c_int,
    shape: WegeftShape,
    x: WegeftDevicePtr,
    w: WegeftDevicePtr,
    a: WegeftDevicePtr,
    b: WegeftDevicePtr,
    scale: f32,
    xa: WegeftDevicePtr,
    g: WegeftDevicePtr,
    dx: WegeftDevicePtr,
    da: WegeftDevicePtr,
    db: WegeftDevicePtr,
) -> c_int {
    cuda_call!(lora_backward(handle, stream, dtype, shape, x, w, a, b, scale, xa, g, dx, da, db))
}
