//! Launchers of the K-extended GEMM core (`kernels/gemm_kext.cu`: the contract, and the kernels'
//! files it includes).
//!
//! Row-major everywhere; a leading dimension is the distance between two rows, in elements.
//!
//! * NT form (`gemm_kext_nt`, the fused forward `y = [x|u] [W|C]^T + b`):
//!   `D[M x N] = A1[M x K1] B1[N x K1]^T + A2[M x K2] B2[N x K2]^T (+ bias[N]) (+ beta D)`.
//! * NN form (`gemm_kext_nn`, the input gradient `dx = [G|v] [W ; psi]`):
//!   `D[M x N] = A1[M x K1] B1[K1 x N] + A2[M x K2] B2[K2 x N] (+ bias[N]) (+ beta D)`.
//!
//! One accumulator (f32) runs over the `K1` columns of the first pair and then the `K2`
//! columns of the second; `K2 = 0` makes it a plain GEMM (the second pair is then ignored).
//! `beta = 0` means `D` is not read at all, so garbage (NaN) in `D` does not propagate.
//!
//! Kernels are dumb, launchers are strict: everything the kernel assumes is checked here
//! (positive sizes, `ld >= cols`, non-null pointers, element alignment, 32-bit ranges, finite
//! `beta`). The launcher cannot see the buffer lengths behind raw device pointers, hence the
//! functions are `unsafe`: the caller promises that every matrix view fits its allocation.
//!
//! Alignment: the bf16/f16 kernels take a fast path (16-byte `cp.async`) for an operand pair
//! when both of its base pointers are 16-byte aligned and both leading dimensions are
//! multiples of 8 elements; otherwise that pair is loaded with predicated scalar loads
//! (correct, several times slower). The test is made by the kernel itself, per pair, so no
//! layout is rejected; `tune::vector_loads` tells a caller whether a pair is fast, and callers
//! that allocate their own buffers (`u`, `v`, `C`) should pad their rows to 8 elements.
//!
//! Kernel selection: `gemm_kext_{nt,nn}_{f32,bf16,f16}`, for bf16/f16 with the wide block tile
//! (`_wide`, 128 x 256) once its tiles give every SM one (`tc_wide`); with `GemmOptions::use_sm90` on a
//! compute-capability 9.0 device the bf16/f16 forms use the wgmma kernels instead: the
//! `_tma` ones (tiles fetched by the tensor memory accelerator, warp-specialised; 0.95-0.97x
//! (NT) and 0.86-0.95x (NN) cuBLAS's speed at 4096^3 on an H200, against 0.60x for `_sm90`)
//! when the device runs the sm_90a image and every operand can be described by a tensor map
//! (`GemmKext::tma_ready`: bases 16-byte aligned, lds multiples of 8 elements, K1 > 0),
//! else the `_sm90` ones (cp.async).
//! Their wgmma body exists only in the sm_90a cubin; built for any other target (e.g. when a
//! registry JIT-compiles the compute_80 PTX) an `_sm90` kernel runs the sm_80 body, which has
//! the same launch geometry, so that choice is always safe; a `_tma` kernel traps there and
//! is never chosen there.
//!
//! Also here, the one-launch kernels built on the TMA kernels: `wegeft_fwd_*_tma` (u, C and y)
//! and `wegeft_bwd_*_tma` (v, S, dpsi and dx), launched by `wegeft_fwd` / `wegeft_bwd`
//! with a workspace cleared in stream order; and `wegeft_uc_*` (`wegeft_uc`).
//!
//! Kernels come from `CudaBackend::function` (the crate's kernel registry) and run on the
//! caller's raw stream through `CudaBackend::launch`; the launcher sets `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` before each launch that
//! needs more than 48 KiB of dynamic shared memory.
//!
//! Example, the fused forward `y = [x | u] [W | C]^T + b` for `T` tokens (rows of `u` and `C`
//! padded to `r8 = r` rounded up to 8 so that the second pair also takes the fast path):
//!
//! ```text
//! let g = GemmKext {
//!     m: t, n: d_out, k1: d_in, k2: r,
//!     a1: x, lda1: d_in, b1: w, ldb1: d_in,
//!     a2: u, lda2: r8, b2: c, ldb2: r8,
//!     bias: Some(b), beta: 0.0, d: y, ldd: d_out,
//! };
//! unsafe { gemm_kext_nt::<bf16>(&dev, stream, &g, GemmOptions::default())? };
//! ```
//! and the input gradient `dx = [G | v] [W ; psi]`: `gemm_kext_nn` with `m: t, n: d_in,
//! k1: d_out, k2: r, a1: G (ld d_out), b1: W (ld d_in), a2: v (ld r8), b2: psi (ld d_in),
//! d: dx (ld d_in)`; `beta: 1.0` accumulates into an existing `dx`.

use super::arg::kargs;

use cudarc::driver::sys::{CUdeviceptr, CUfunction_attribute, CUstream, CUtensorMap};

use super::context::CudaBackend;

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

/// Geometry of the kernels, mirrored from `kernels/gemm_kext.cu` and its `.cuh` files.
mod geom {
    /// sm_80 tensor-core kernels: 128 x 128 block tile, 256 threads, 4 stages x 16 KiB; the
    /// `_wide` ones: 128 x 256, 4 stages x 24 KiB.
    pub const TC_TILE: (usize, usize) = (128, 128);
    pub const TC_THREADS: u32 = 256;
    pub const TC_SMEM: u32 = 4 * (128 * 32 * 2 + 128 * 32 * 2);
    pub const TC_WIDE_TILE: (usize, usize) = (128, 256);
    pub const TC_WIDE_SMEM: u32 = 4 * (128 * 32 * 2 + 256 * 32 * 2);
    /// f32 FMA kernels: 64 x 64 block tile, 256 threads, static shared memory only.
    pub const FMA_TILE: (usize, usize) = (64, 64);
    pub const FMA_THREADS: u32 = 256;
    /// sm_90a wgmma kernels: 128 x 256 x 64 block tile, 2 warpgroups, 4 stages x 48 KiB plus
    /// 1 KiB to align the stages to 1024 bytes (the 128-byte swizzle pattern).
    pub const H_TILE: (usize, usize) = (128, 256);
    pub const H_THREADS: u32 = 256;
    pub const H_SMEM: u32 = 4 * (128 * 64 * 2 + 256 * 64 * 2) + 1024;
    /// sm_90a TMA kernels: the same tile and stages, 2 consumer warpgroups + 1 producer warp.
    pub const T_THREADS: u32 = 288;
    pub const T_SMEM: u32 = H_SMEM;
    /// TMA boxes (columns x rows): A tiles, B tiles of NT, and one 64-column quarter of a B
    /// tile of NN (four per stage).
    pub const T_BOX_A: (u32, u32) = (64, 128);
    pub const T_BOX_B_NT: (u32, u32) = (64, 256);
    pub const T_BOX_B_NN: (u32, u32) = (64, 64);
    /// `wegeft_fwd_*_tma`'s rank tiles: B boxes of 64 x 64 (psi K-major, phi N-major), and
    /// 128-row blocks of y, u and C for its flags.
    pub const WF_BOX_RANK: (u32, u32) = (64, 64);
    pub const WF_BLOCK_ROWS: usize = 128;
    /// `wegeft_uc_*`: 64 rows of u or C a block, 128 threads, 3 stages x 8 KiB (dynamic).
    pub const UC_ROWS: usize = 64;
    pub const UC_THREADS: u32 = 128;
    pub const UC_SMEM: u32 = 3 * (64 * 32 * 2 + 64 * 32 * 2);
}

/// Which product: `B` stored `N x K` (NT, forward) or `K x N` (NN, input gradient).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    Nt,
    Nn,
}

impl Form {
    fn name(self) -> &'static str {
        match self {
            Form::Nt => "nt",
            Form::Nn => "nn",
        }
    }
    fn op(self) -> &'static str {
        match self {
            Form::Nt => "gemm_kext_nt",
            Form::Nn => "gemm_kext_nn",
        }
    }
}

/// One K-extended GEMM call: raw device pointers (0 = null), leading dimensions in elements.
///
/// NT: `A1` is `m x k1`, `B1` is `n x k1`, `A2` is `m x k2`, `B2` is `n x k2`.
/// NN: `A1` is `m x k1`, `B1` is `k1 x n`, `A2` is `m x k2`, `B2` is `k2 x n`.
/// `D` is `m x n`; `bias` has `n` elements; all in the same storage dtype.
/// With `k2 == 0`, `a2`/`b2`/`lda2`/`ldb2` are ignored (pass 0).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GemmKext {
    pub m: usize,
    pub n: usize,
    pub k1: usize,
    pub k2: usize,
    pub a1: CUdeviceptr,
    pub lda1: usize,
    pub b1: CUdeviceptr,
    pub ldb1: usize,
    pub a2: CUdeviceptr,
    pub lda2: usize,
    pub b2: CUdeviceptr,
    pub ldb2: usize,
    pub bias: Option<CUdeviceptr>,
    pub beta: f32,
    pub d: CUdeviceptr,
    pub ldd: usize,
}

/// Launch options.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GemmOptions {
    /// Use the sm_90a wgmma kernels for bf16/f16 when the device has compute capability 9.0
    /// (ignored elsewhere and for f32): the TMA ones (`_tma`) when every operand can be
    /// described by a tensor map ([`GemmKext::tma_ready`]) and the device runs the sm_90a
    /// image, else the cp.async ones (`_sm90`).
    pub use_sm90: bool,
    /// The kernel launched just before on the stream is `wegeft_uc_*` writing this product's
    /// second operand pair: a `_tma` kernel is then launched as its programmatic dependent
    /// ([`CudaBackend::launch_as`]), multiplying the first pair while it runs and waiting
    /// for it before the second (`griddepcontrol.wait`); any other kernel is launched as usual
    /// (after it, in stream order).
    pub dependent: bool,
}

/// What the launcher decided: kernel name and launch geometry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub kernel: String,
    pub grid: u32,
    pub block: u32,
    pub smem: u32,
    /// A `_tma` kernel: its first four parameters are the tensor maps of A1, B1, A2, B2.
    pub tma: bool,
}

impl GemmKext {
    /// Whether TMA can read every operand (what `cuTensorMapEncodeTiled` requires of a 2-d
    /// map: 16-byte aligned base, row stride a multiple of 16 bytes) and K1 > 0 (a map needs
    /// a non-empty extent). The second pair only counts when K2 > 0.
    pub(crate) fn tma_ready(&self, dtype: DType) -> bool {
        let fits = |p: CUdeviceptr, ld: usize| p != 0 && p % 16 == 0 && (ld * dtype.size()) % 16 == 0;
        self.k1 > 0 && fits(self.a1, self.lda1) && fits(self.b1, self.ldb1) && (self.k2 == 0 || (fits(self.a2, self.lda2) && fits(self.b2, self.ldb2)))
    }

    /// Every check the kernel relies on, then the kernel name and geometry.
    /// `sm90` says whether the `_sm90` kernels may be used (device 9.0 and asked for);
    /// `tma` whether the device runs the sm_90a image, where the `_tma` kernels exist; `sms`
    /// is the device's number of SMs (which sm_80 tile, [`tc_wide`]).
    pub(crate) fn plan(&self, form: Form, dtype: DType, sm90: bool, tma: bool, sms: u32) -> Result<Plan> {
        let g = self;
        for (what, v) in [("m", g.m), ("n", g.n), ("k1", g.k1)] {
            if v == 0 {
                return Err(Error::ZeroDim { what });
            }
        }
        // Shapes (rows, cols) of every operand, as stored.
        let (b1_shape, b2_shape) = match form {
            Form::Nt => ((g.n, g.k1), (g.n, g.k2)),
            Form::Nn => ((g.k1, g.n), (g.k2, g.n)),
        };
        let mut mats: Vec<(&'static str, CUdeviceptr, usize, (usize, usize))> = vec![
            ("A1", g.a1, g.lda1, (g.m, g.k1)),
            ("B1", g.b1, g.ldb1, b1_shape),
            ("D", g.d, g.ldd, (g.m, g.n)),
        ];
        if g.k2 > 0 {
            mats.push(("A2", g.a2, g.lda2, (g.m, g.k2)));
            mats.push(("B2", g.b2, g.ldb2, b2_shape));
        }
        let esize = dtype.size();
        let i32_max = i32::MAX as usize;
        for &(arg, ptr, ld, (rows, cols)) in &mats {
            if ptr == 0 {
                return Err(Error::invalid(
                    arg,
                    format!("null device pointer for a {rows}x{cols} matrix"),
                ));
            }
            if ld < cols {
                return Err(Error::Stride { arg, ld, cols });
            }
            if ld > i32_max || rows > i32_max {
                return Err(Error::invalid(
                    arg,
                    format!("{rows}x{cols} with ld {ld} exceeds the 32-bit index range"),
                ));
            }
            if ptr % esize as u64 != 0 {
                return Err(Error::Align {
                    arg,
                    addr: ptr as usize,
                    align: esize,
                });
            }
            // The last element must be addressable: (rows-1)*ld + cols elements from ptr.
            let span = (rows - 1)
                .checked_mul(ld)
                .and_then(|v| v.checked_add(cols))
                .and_then(|v| v.checked_mul(esize))
                .ok_or(Error::Overflow {
                    what: arg,
                    rows,
                    cols: ld,
                })?;
            if (ptr as u128) + (span as u128) > u64::MAX as u128 {
                return Err(Error::Overflow {
                    what: arg,
                    rows,
                    cols: ld,
                });
            }
        }
        if g.k2 > i32_max {
            return Err(Error::invalid(
                "k2",
                format!("{} exceeds the 32-bit index range", g.k2),
            ));
        }
        if let Some(bias) = g.bias {
            if bias == 0 {
                return Err(Error::invalid(
                    "bias",
                    "null device pointer (use None for no bias)",
                ));
            }
            if bias % esize as u64 != 0 {
                return Err(Error::Align {
                    arg: "bias",
                    addr: bias as usize,
                    align: esize,
                });
            }
        }
        if !g.beta.is_finite() {
            return Err(Error::invalid(
                "beta",
                format!("must be finite, got {}", g.beta),
            ));
        }

        let half = dtype != DType::F32;
        let tma = half && sm90 && tma && self.tma_ready(dtype);
        let (tile, block, smem, suffix) = if !half {
            (geom::FMA_TILE, geom::FMA_THREADS, 0, "")
        } else if tma {
            (geom::H_TILE, geom::T_THREADS, geom::T_SMEM, "_tma")
        } else if sm90 {
            (geom::H_TILE, geom::H_THREADS, geom::H_SMEM, "_sm90")
        } else if tc_wide(g.m, g.n, sms) {
            (geom::TC_WIDE_TILE, geom::TC_THREADS, geom::TC_WIDE_SMEM, "_wide")
        } else {
            (geom::TC_TILE, geom::TC_THREADS, geom::TC_SMEM, "")
        };
        let blocks = g.m.div_ceil(tile.0) as u64 * g.n.div_ceil(tile.1) as u64;
        if blocks > i32::MAX as u64 {
            return Err(Error::invalid(
                "m x n",
                format!("{}x{} needs {blocks} blocks, over the grid limit", g.m, g.n),
            ));
        }
        Ok(Plan {
            kernel: format!("gemm_kext_{}_{}{}", form.name(), dtype.name(), suffix),
            grid: blocks as u32,
            block,
            smem,
            tma,
        })
    }
}

/// Which block tile the sm_80 kernels take for an `m x n` output on a device of `sms` SMs: the
/// wide one (`gemm_kext_*_wide`, 128 x 256, warp tiles of 64 x 64, one block an SM) once its
/// tiles give every SM one at least; the narrow one (128 x 128, warp tiles of 64 x 32, two
/// blocks an SM) below that, where twice as many tiles spread the work over more SMs. Per
/// k16 step a wide warp reads 4 KiB of shared memory for 32 mma against the narrow warp's
/// 3 KiB for 16 (a third less a FLOP), and its block writes a quarter less a FLOP into
/// shared memory: with mma.sync bound by shared-memory bandwidth on Hopper, about 45% more
/// FLOPs a cycle at the same efficiency (kernels/gemm_sm80.cuh, "Design of the sm_80
/// tensor-core kernels"). A rule from that count, not from a measurement (none yet: see
/// BENCHMARKS.md).
pub(crate) fn tc_wide(m: usize, n: usize, sms: u32) -> bool {
    let (bm, bn) = geom::TC_WIDE_TILE;
    m.div_ceil(bm).saturating_mul(n.div_ceil(bn)) >= (sms as usize).max(1)
}

/// `D = A1 B1^T + A2 B2^T (+ bias) (+ beta D)` — the fused WeGeFT forward
/// (`A1 = x`, `B1 = W`, `A2 = u`, `B2 = C`, `D = y`). See the module docs for the contract.
///
/// # Safety
/// Every pointer must be a live device allocation of the stream's context holding its
/// matrix view (`(rows - 1) * ld + cols` elements of `T`); `D` must not overlap the inputs.
pub(crate) unsafe fn gemm_kext_nt<T: Element>(
    dev: &CudaBackend,
    stream: CUstream,
    g: &GemmKext,
    opts: GemmOptions,
) -> Result<()> {
    unsafe { launch::<T>(Form::Nt, dev, stream, g, opts) }
}

/// `D = A1 B1 + A2 B2 (+ bias) (+ beta D)` — the fused WeGeFT input gradient
/// (`A1 = G`, `B1 = W`, `A2 = v`, `B2 = psi`, `D = dx`). See the module docs for the contract.
///
/// # Safety
/// As for [`gemm_kext_nt`].
pub(crate) unsafe fn gemm_kext_nn<T: Element>(
    dev: &CudaBackend,
    stream: CUstream,
    g: &GemmKext,
    opts: GemmOptions,
) -> Result<()> {
    unsafe { launch::<T>(Form::Nn, dev, stream, g, opts) }
}

unsafe fn launch<T: Element>(form: Form, dev: &CudaBackend, stream: CUstream, g: &GemmKext, opts: GemmOptions) -> Result<()> {
    let op = form.op();
    let cuda = |e: cudarc::driver::DriverError| Error::Cuda { op, msg: e.to_string() };
    let dtype = T::DTYPE;
    let sm90 = opts.use_sm90 && dtype != DType::F32 && dev.compute_capability() == (9, 0);
    let sms = dev.sm_count();
    let mut plan = g.plan(form, dtype, sm90, dev.image() == super::context::Image::Sm90a, sms)?;
    // The tensor maps first: should the driver refuse one (tma_ready mirrors its documented
    // rules), the cp.async kernel runs instead.
    let maps = if plan.tma { tensor_maps(form, dtype, g).ok() } else { None };
    if plan.tma && maps.is_none() {
        plan = g.plan(form, dtype, sm90, false, sms)?;
    }
    let func = dev.function(&plan.kernel)?;
    if plan.smem > 48 * 1024 {
        // cuFuncSetAttribute acts on the current context.
        dev.context().bind_to_thread().map_err(cuda)?;
        func.func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, plan.smem as i32)
            .map_err(cuda)?;
    }
    // All narrowing below was range-checked by `plan`.
    let (m, n, k1, k2) = (g.m as i32, g.n as i32, g.k1 as i32, g.k2 as i32);
    let (a2, b2, lda2, ldb2) =
        if g.k2 > 0 { (g.a2, g.b2, g.lda2 as i32, g.ldb2 as i32) } else { (0, 0, 0, 0) };
    let (a1, b1, d) = (g.a1, g.b1, g.d);
    let (lda1, ldb1, ldd) = (g.lda1 as i32, g.ldb1 as i32, g.ldd as i32);
    let bias: CUdeviceptr = g.bias.unwrap_or(0);
    let beta = g.beta;
    // The kernel's parameter order: (M, N, K1, K2, A1, lda1, B1, ldb1, A2, lda2, B2, ldb2,
    // bias, beta, D, ldd).
    let (grid, block) = ((plan.grid, 1, 1), (plan.block, 1, 1));
    if let Some([ma1, mb1, ma2, mb2]) = maps {
        let grid = (tma_grid(form, plan.grid, dev.sm_count()), 1, 1);
        let params = kargs![ma1, mb1, ma2, mb2, m, n, k1, k2, a1, lda1, b1, ldb1, a2, lda2, b2, ldb2, bias, beta, d, ldd];
        // SAFETY: the operands are the caller's (see `gemm_kext_nt`); the `_tma` kernels wait
        // (griddepcontrol.wait) before their second pair, so they may be launched as a dependent.
        return unsafe { dev.launch_as(op, &func, (grid, block, plan.smem), stream, &params, opts.dependent) };
    }
    let params = kargs![m, n, k1, k2, a1, lda1, b1, ldb1, a2, lda2, b2, ldb2, bias, beta, d, ldd];
    unsafe { dev.launch(op, &func, grid, block, plan.smem, stream, &params) }
}

pub(crate) use super::exec::WegeftUc;

impl WegeftUc {
    /// Whether the kernel takes it: bf16 or f16; rank a multiple of 8 up to 64 (a block's 64
    /// columns, whole 16-byte chunks); d_in a multiple of 8 and every base 16-byte aligned (its
    /// cp.async loads); sizes within `i32`.
    pub(crate) fn applies<T: Element>(&self) -> bool {
        let aligned = [self.x, self.w, self.psi, self.phi, self.u, self.c].iter().all(|p| p % 16 == 0);
        matches!(T::DTYPE, DType::BF16 | DType::F16)
            && self.rank >= 8
            && self.rank <= 64
            && self.rank % 8 == 0
            && self.d_in % 8 == 0
            && self.tokens >= 1
            && self.d_out >= 1
            && aligned
            && [self.tokens, self.d_in, self.d_out].iter().all(|&v| v <= i32::MAX as usize / 2)
    }

    fn grid(&self) -> usize {
        self.tokens.div_ceil(geom::UC_ROWS) + self.d_out.div_ceil(geom::UC_ROWS)
    }

    /// Whether the layer should take it (a measured policy, not the kernel's contract): only
    /// while x and W together are at most [`UC_MAX_BYTES`]. On an H200 (BENCHMARKS.md, session
    /// 9) the one launch made the FusedSm90 forward faster at the SmolLM2 shapes 576->576 and
    /// 576->1536 (T = 4096: 5.4 and 6.5 MB; 0.029 -> 0.023 and 0.035 -> 0.032 ms), slower at
    /// 1536->576 (14.4 MB; 0.041 -> 0.044 ms) and at T = 8192, 4096->4096 (100 MB; 0.406 ->
    /// 0.457 ms): with 16 KiB in flight a block, the kernel reads far slower than cuBLASLt's
    /// two products, and the GEMM waits for it before its second pair.
    pub(crate) fn worth_it(&self) -> bool {
        !large_layer(self.tokens, self.d_in, self.d_out)
    }
}

/// The most bytes of x and W for which the layer computes u and C in one launch
/// ([`WegeftUc::worth_it`]).
pub(crate) const UC_MAX_BYTES: usize = 8 << 20;

/// Whether a layer counts as large for the one-launch kernels' policy ([`WegeftUc::one_launch_worth_it`],
/// [`WegeftBwd::worth_it`]): x and W together above [`UC_MAX_BYTES`] (bf16 / f16).
fn large_layer(tokens: usize, d_in: usize, d_out: usize) -> bool {
    tokens.saturating_add(d_out).saturating_mul(d_in).saturating_mul(2) > UC_MAX_BYTES
}

/// What `wegeft_{fwd,dx}_*_tma` share: bf16 or f16; rank a multiple of 8 (the rank outputs are
/// then tensor maps with rows of whole 16-byte chunks); the leading dimensions of the operands
/// read by TMA (`lds`) multiples of 8; every base non-null and 16-byte aligned; sizes within
/// `i32`.
fn rank_kernel_applies<T: Element>(s: (usize, usize, usize, usize), lds: &[usize], ptrs: &[CUdeviceptr]) -> bool {
    let (tokens, d_in, d_out, rank) = s;
    matches!(T::DTYPE, DType::BF16 | DType::F16)
        && rank >= 8
        && rank % 8 == 0
        && lds.iter().all(|ld| ld % 8 == 0)
        && tokens >= 1
        && d_out >= 1
        && ptrs.iter().all(|p| *p != 0 && p % 16 == 0)
        && [tokens, d_in, d_out, rank].iter().all(|&v| v <= i32::MAX as usize / 2)
}

/// The grid's tiles: the rank tiles (`rank_blocks` blocks of 128 rows, each `ceil(rank / 64)`
/// tiles of 64 columns) and the 128 x 256 tiles of a `rows x cols` D.
fn rank_kernel_tiles(rank_blocks: usize, rank: usize, rows: usize, cols: usize) -> usize {
    rank_blocks * rank.div_ceil(geom::WF_BOX_RANK.0 as usize) + rows.div_ceil(geom::H_TILE.0) * cols.div_ceil(geom::H_TILE.1)
}

impl WegeftUc {
    /// Whether `wegeft_fwd_*_tma` takes it (the whole forward in one launch), see
    /// `rank_kernel_applies`.
    pub(crate) fn one_launch_applies<T: Element>(&self) -> bool {
        // x, W and psi (ld d_in), u, C and phi (ld r) are tensor maps; y is not.
        rank_kernel_applies::<T>((self.tokens, self.d_in, self.d_out, self.rank), &[self.d_in], &[self.x, self.w, self.psi, self.phi, self.u, self.c])
    }

    /// Whether the layer should take `wegeft_fwd` (a policy, not the kernel's contract): for
    /// the layers above [`UC_MAX_BYTES`], where `wegeft_uc` beside the GEMM was measured slower
    /// than the separate cuBLASLt products (BENCHMARKS.md, session 9); below it `wegeft_uc` and
    /// the dependent GEMM stay, measured faster there. `wegeft_fwd` itself has not yet run on a
    /// GPU (host-emulated only): the next GPU check measures it against both.
    pub(crate) fn one_launch_worth_it(&self) -> bool {
        large_layer(self.tokens, self.d_in, self.d_out)
    }

    /// `wegeft_fwd`'s tiles: the rank tiles (of C, then of u) and the tiles of y.
    fn one_launch_tiles(&self) -> usize {
        let blocks = self.d_out.div_ceil(geom::WF_BLOCK_ROWS) + self.tokens.div_ceil(geom::WF_BLOCK_ROWS);
        rank_kernel_tiles(blocks, self.rank, self.tokens, self.d_out)
    }

    /// `wegeft_fwd`'s workspace in u32 words: the tile counter, a flag per 128-row block of u,
    /// then of C.
    fn one_launch_words(&self) -> usize {
        1 + self.tokens.div_ceil(geom::WF_BLOCK_ROWS) + self.d_out.div_ceil(geom::WF_BLOCK_ROWS)
    }
}

pub(crate) use super::exec::WegeftBwd;

impl WegeftBwd {
    /// Whether `wegeft_bwd_*_tma` takes it, see `rank_kernel_applies`.
    pub(crate) fn applies<T: Element>(&self) -> bool {
        // G and C (lds d_out, r), W, psi and x (ld d_in), u and v (ld r) are tensor maps; dx,
        // S, dpsi and dphi are not (f32 ones: stored in pairs, 8-byte aligned; dphi may be 0).
        let f32_ok = [self.s, self.dpsi].iter().all(|p| *p != 0 && p % 8 == 0) && self.dphi % 8 == 0 && self.scale.is_finite();
        f32_ok
            && rank_kernel_applies::<T>(
                (self.tokens, self.d_in, self.d_out, self.rank),
                &[self.d_in, self.d_out],
                &[self.g, self.w, self.c, self.psi, self.u, self.x, self.v, self.dx],
            )
    }

    /// Whether the layer should take it: the layers where the forward takes `wegeft_fwd` (a
    /// policy; not yet run on a GPU, host-emulated only).
    pub(crate) fn worth_it(&self) -> bool {
        large_layer(self.tokens, self.d_in, self.d_out)
    }

    /// `wegeft_bwd`'s tiles: v's rank tiles, the reduction tiles of S (d_out rows), of dpsi^T
    /// and (with dphi) of dphi (d_in rows each), the tiles of dx.
    fn tiles(&self) -> usize {
        let rows = geom::WF_BLOCK_ROWS;
        let dphi_blocks = if self.dphi != 0 { self.d_in.div_ceil(rows) } else { 0 };
        let blocks = self.tokens.div_ceil(rows) + self.d_out.div_ceil(rows) + self.d_in.div_ceil(rows) + dphi_blocks;
        rank_kernel_tiles(blocks, self.rank, self.tokens, self.d_in)
    }

    /// `wegeft_bwd`'s workspace in u32 words: the tile counter, a flag per 128-row block of v,
    /// then of S.
    fn words(&self) -> usize {
        1 + self.tokens.div_ceil(geom::WF_BLOCK_ROWS) + self.d_out.div_ceil(geom::WF_BLOCK_ROWS)
    }
}

/// One launch of `wegeft_{fwd,bwd}_*_tma` (`kernels/wegeft_rank_tma.cuh`): the kernel, its thirteen
/// maps (A1, B1, A2, B2, kind 0's B, kind 1's A and B, kinds 2, 3 and 4's A and B), sizes,
/// outputs, the grid's tiles and the workspace's words.
struct RankLaunch {
    op: &'static str,
    kernel: &'static str,
    maps: [CUtensorMap; 13],
    m: usize,
    n: usize,
    k1: usize,
    rank: usize,
    out0: (CUdeviceptr, f32),
    out1: (CUdeviceptr, f32),
    bias: Option<CUdeviceptr>,
    d: CUdeviceptr,
    ldd: usize,
    /// The backward's S, dpsi and dphi (f32; 0 in the forward; dphi 0: not computed) and S's
    /// two halves in the storage type for dphi (2 d_out x r).
    s: CUdeviceptr,
    dpsi: CUdeviceptr,
    dphi: CUdeviceptr,
    s_split: CUdeviceptr,
    tiles: usize,
    words: usize,
}

/// Enqueues `l`: its workspace allocated and cleared on `stream`, the kernel on min(tiles, SMs)
/// blocks, the workspace freed after it (stream order). The caller has checked the operands
/// (`rank_kernel_applies`: every size fits i32).
unsafe fn rank_launch(dev: &CudaBackend, stream: CUstream, l: &RankLaunch) -> Result<()> {
    let op = l.op;
    let cuda = |e: cudarc::driver::DriverError| Error::Cuda { op, msg: e.to_string() };
    if dev.image() != super::context::Image::Sm90a {
        return Err(Error::invalid(op, "needs a compute capability 9.0 device running the sm_90a image"));
    }
    let tiles = u32::try_from(l.tiles).map_err(|_| Error::invalid(op, "grid too large"))?;
    let grid = tiles.min(dev.sm_count().max(1));
    let bytes = l.words * 4;
    let work = super::mem::DeviceBuf::new(dev, stream, bytes, op)?;
    // SAFETY: `work` was just allocated on this stream with `bytes` (or more) bytes.
    unsafe { cudarc::driver::result::memset_d8_async(work.ptr(), 0, bytes, stream) }.map_err(cuda)?;
    let func = dev.function(l.kernel)?;
    dev.context().bind_to_thread().map_err(cuda)?;
    func.func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, geom::T_SMEM as i32).map_err(cuda)?;
    let [ma1, mb1, ma2, mb2, mr0b, mr1a, mr1b, mr2a, mr2b, mr3a, mr3b, mr4a, mr4b] = l.maps;
    let (m, n, k1, r, ldd) = (l.m as i32, l.n as i32, l.k1 as i32, l.rank as i32, l.ldd as i32);
    let ((o0, s0), (o1, s1)) = (l.out0, l.out1);
    let params = kargs![
        ma1,
        mb1,
        ma2,
        mb2,
        mr0b,
        mr1a,
        mr1b,
        mr2a,
        mr2b,
        mr3a,
        mr3b,
        m,
        n,
        k1,
        r,
        o0,
        s0,
        o1,
        s1,
        l.bias.unwrap_or(0),
        l.d,
        ldd,
        l.s,
        l.dpsi,
        mr4a,
        mr4b,
        l.dphi,
        l.s_split,
        work.ptr()
    ];
    // SAFETY: the operands are the caller's; `work` is freed after the kernel, in stream order,
    // when dropped at the end of this function.
    unsafe { dev.launch(op, &func, (grid, 1, 1), (geom::T_THREADS, 1, 1), geom::T_SMEM, stream, &params) }
}

/// The error of `wegeft_{uc,fwd,bwd}` asked for a layer it does not take.
fn refused<T: Element>(op: &'static str, multiples_of_8: &str, (t, din, dout, r): (usize, usize, usize, usize)) -> Error {
    Error::invalid(
        op,
        format!(
            "needs bf16/f16, {multiples_of_8} multiples of 8 and 16-byte aligned operands (got {:?}, T {t}, d_in {din}, d_out {dout}, r {r})",
            T::DTYPE
        ),
    )
}

/// Checks a one-launch kernel's extra pointers (`y` / `dx`, the bias): non-null, element-aligned.
fn check_out_ptrs<T: Element>(ptrs: &[(&'static str, Option<CUdeviceptr>)]) -> Result<()> {
    let esize = T::DTYPE.size() as u64;
    for &(arg, p) in ptrs {
        match p {
            Some(0) => return Err(Error::invalid(arg, "null device pointer")),
            Some(p) if p % esize != 0 => return Err(Error::Align { arg, addr: p as usize, align: esize as usize }),
            _ => {}
        }
    }
    Ok(())
}

/// The whole fused forward in one launch, `wegeft_fwd_{bf16,f16}_tma` (`kernels/wegeft_rank_tma.cuh`):
/// `u = x psi^T`, `C = scale W phi` and `y = [x|u] [W|C]^T (+ bias)` (y `tokens x d_out`,
/// packed) by one persistent grid, u and C as tiles taken before those of y. Its workspace (a
/// tile counter and a flag per 128 rows of u and of C) is allocated and cleared on `stream`
/// before the launch and freed after it, in stream order. `Ok(false)`: nothing was launched
/// because the driver refused a tensor map (the caller computes the forward otherwise); an
/// error when [`WegeftUc::one_launch_applies`] does not hold or the device is not running the
/// sm_90a image (where the kernel traps).
///
/// # Safety
/// The pointers must be valid device memory of the packed shapes of `uc`, `bias` `d_out`
/// elements and `y` `tokens x d_out`, on this context; y must not overlap the inputs.
pub(crate) unsafe fn wegeft_fwd<T: Element>(dev: &CudaBackend, stream: CUstream, uc: &WegeftUc, bias: Option<CUdeviceptr>, y: CUdeviceptr) -> Result<bool> {
    const OP: &str = "wegeft_fwd";
    if !uc.one_launch_applies::<T>() {
        return Err(refused::<T>(OP, "rank and d_in", (uc.tokens, uc.d_in, uc.d_out, uc.rank)));
    }
    check_out_ptrs::<T>(&[("y", Some(y)), ("bias", bias)])?;
    let dt = T::DTYPE;
    let (t, din, dout, r) = (uc.tokens, uc.d_in, uc.d_out, uc.rank);
    let maps = (|| -> Result<[CUtensorMap; 13]> {
        let x = tensor_map(dt, uc.x, t, din, din, geom::T_BOX_A)?;
        Ok([
            x,
            tensor_map(dt, uc.w, dout, din, din, geom::T_BOX_B_NT)?,
            tensor_map(dt, uc.u, t, r, r, geom::T_BOX_A)?,
            tensor_map(dt, uc.c, dout, r, r, geom::T_BOX_B_NT)?,
            tensor_map(dt, uc.psi, r, din, din, geom::WF_BOX_RANK)?,
            tensor_map(dt, uc.w, dout, din, din, geom::T_BOX_A)?,
            tensor_map(dt, uc.phi, din, r, r, geom::WF_BOX_RANK)?,
            x, // no reduction tiles in the forward: never read
            x,
            x,
            x,
            x,
            x,
        ])
    })();
    let Ok(maps) = maps else { return Ok(false) };
    let kernel = if dt == DType::BF16 { "wegeft_fwd_bf16_tma" } else { "wegeft_fwd_f16_tma" };
    let l = RankLaunch {
        op: OP,
        kernel,
        maps,
        m: t,
        n: dout,
        k1: din,
        rank: r,
        out0: (uc.u, 1.0),
        out1: (uc.c, uc.scale),
        bias,
        d: y,
        ldd: dout,
        s: 0,
        dpsi: 0,
        dphi: 0,
        s_split: 0,
        tiles: uc.one_launch_tiles(),
        words: uc.one_launch_words(),
    };
    // SAFETY: the caller's operands (above).
    unsafe { rank_launch(dev, stream, &l)? };
    Ok(true)
}

/// The backward in one launch, `wegeft_bwd_{bf16,f16}_tma`: `v = G C`, `S = G^T u` (f32,
/// overwritten), `dpsi += v^T x` (f32), `dx = [G|v] [W;psi]` (dx `tokens x d_in`, packed,
/// overwritten) and, unless `bw.dphi` is 0, `dphi += scale W^T S` (f32): v as rank tiles taken
/// first, S, dpsi and dphi as reduction tiles spread among the tiles of dx. Workspace (and, for
/// dphi, S's two halves in the storage type), `Ok(false)` and errors as for [`wegeft_fwd`].
///
/// # Safety
/// The pointers must be valid device memory of the packed shapes of `bw`, on this context; the
/// outputs (v, S, dpsi, dx) must not overlap the inputs or each other.
pub(crate) unsafe fn wegeft_bwd<T: Element>(dev: &CudaBackend, stream: CUstream, bw: &WegeftBwd) -> Result<bool> {
    const OP: &str = "wegeft_bwd";
    if !bw.applies::<T>() {
        return Err(refused::<T>(OP, "rank, d_in and d_out", (bw.tokens, bw.d_in, bw.d_out, bw.rank)));
    }
    let dt = T::DTYPE;
    let (t, din, dout, r) = (bw.tokens, bw.d_in, bw.d_out, bw.rank);
    // S's two halves in T for dphi's tiles (2 d_out x r), freed after the kernel (stream order).
    let split = if bw.dphi != 0 { Some(super::mem::DeviceBuf::new(dev, stream, 2 * dout * r * dt.size(), OP)?) } else { None };
    let split_ptr = split.as_ref().map_or(0, |b| b.ptr());
    let maps = (|| -> Result<[CUtensorMap; 13]> {
        let g = tensor_map(dt, bw.g, t, dout, dout, geom::T_BOX_A)?;
        Ok([
            g,
            tensor_map(dt, bw.w, dout, din, din, geom::T_BOX_B_NN)?,
            tensor_map(dt, bw.v, t, r, r, geom::T_BOX_A)?,
            tensor_map(dt, bw.psi, r, din, din, geom::T_BOX_B_NN)?,
            tensor_map(dt, bw.c, dout, r, r, geom::WF_BOX_RANK)?,
            g, // no kind-1 tiles in the backward: never read
            g,
            // S = G^T u and dpsi^T = x^T v: 64 x 64 boxes of G, u, x and v.
            tensor_map(dt, bw.g, t, dout, dout, geom::WF_BOX_RANK)?,
            tensor_map(dt, bw.u, t, r, r, geom::WF_BOX_RANK)?,
            tensor_map(dt, bw.x, t, din, din, geom::WF_BOX_RANK)?,
            tensor_map(dt, bw.v, t, r, r, geom::WF_BOX_RANK)?,
            // dphi = scale W^T S: 64 x 64 boxes of W, and of [S_hi; S_lo] (without dphi: not read).
            tensor_map(dt, bw.w, dout, din, din, geom::WF_BOX_RANK)?,
            if split_ptr != 0 { tensor_map(dt, split_ptr, 2 * dout, r, r, geom::WF_BOX_RANK)? } else { g },
        ])
    })();
    let Ok(maps) = maps else { return Ok(false) };
    let kernel = if dt == DType::BF16 { "wegeft_bwd_bf16_tma" } else { "wegeft_bwd_f16_tma" };
    let l = RankLaunch {
        op: OP,
        kernel,
        maps,
        m: t,
        n: din,
        k1: dout,
        rank: r,
        out0: (bw.v, 1.0),
        out1: (0, bw.scale), // the backward's scale1 is dphi's scale
        bias: None,
        d: bw.dx,
        ldd: din,
        s: bw.s,
        dpsi: bw.dpsi,
        dphi: bw.dphi,
        s_split: split_ptr,
        tiles: bw.tiles(),
        words: bw.words(),
    };
    // SAFETY: the caller's operands (above).
    unsafe { rank_launch(dev, stream, &l)? };
    Ok(true)
}

/// Launches `wegeft_uc_*` for `uc` on `stream`; an error when [`WegeftUc::applies`] does not
/// hold.
///
/// # Safety
/// The pointers must be valid device memory of the packed shapes above, on this context.
pub(crate) unsafe fn wegeft_uc<T: Element>(dev: &CudaBackend, stream: CUstream, uc: &WegeftUc) -> Result<()> {
    const OP: &str = "wegeft_uc";
    if !uc.applies::<T>() {
        return Err(refused::<T>(OP, "rank (up to 64) and d_in", (uc.tokens, uc.d_in, uc.d_out, uc.rank)));
    }
    let name = if T::DTYPE == DType::BF16 { "wegeft_uc_bf16" } else { "wegeft_uc_f16" };
    let func = dev.function(name)?;
    let grid = u32::try_from(uc.grid()).map_err(|_| Error::invalid("wegeft_uc", "grid too large"))?;
    // Checked by `applies`: every size fits i32.
    let (t, din, dout, r) = (uc.tokens as i32, uc.d_in as i32, uc.d_out as i32, uc.rank as i32);
    let params = kargs![t, din, dout, r, uc.x, din, uc.psi, uc.u, uc.w, din, uc.phi, uc.c, uc.scale];
    unsafe { dev.launch(OP, &func, (grid, 1, 1), (geom::UC_THREADS, 1, 1), geom::UC_SMEM, stream, &params) }
}

/// The grid of a `_tma` launch over `tiles` block tiles: the NT kernel a block per tile, the
/// NN kernel persistent (one block per SM, each looping over tiles, the next tile's first
/// stages fetched while the last one is stored). Measured at 4096^3 on an H200 with the
/// 16-byte epilogue (BENCHMARKS.md, session 9, four runs of bf16 and f16): with K2 = 64, as in
/// the layer, a block per tile took 0.168 ms for NT in all four against 0.173-0.183 ms
/// persistent; for NN persistent was 1-3% faster in seven of eight.
fn tma_grid(form: Form, tiles: u32, sms: u32) -> u32 {
    match form {
        Form::Nt => tiles,
        Form::Nn => tiles.min(sms.max(1)),
    }
}

/// The tensor maps of a `_tma` launch: A1, B1, A2, B2 as 2-d maps (128-byte swizzle, zeros
/// outside the matrix) with the kernel's boxes. For K2 = 0 the second pair's maps repeat the
/// first's (the kernel never reads them).
fn tensor_maps(form: Form, dtype: DType, g: &GemmKext) -> Result<[CUtensorMap; 4]> {
    let b_map = |p: CUdeviceptr, ld: usize, k: usize| match form {
        Form::Nt => tensor_map(dtype, p, g.n, k, ld, geom::T_BOX_B_NT),
        Form::Nn => tensor_map(dtype, p, k, g.n, ld, geom::T_BOX_B_NN),
    };
    let (ma1, mb1) = (tensor_map(dtype, g.a1, g.m, g.k1, g.lda1, geom::T_BOX_A)?, b_map(g.b1, g.ldb1, g.k1)?);
    if g.k2 == 0 {
        return Ok([ma1, mb1, ma1, mb1]);
    }
    Ok([ma1, mb1, tensor_map(dtype, g.a2, g.m, g.k2, g.lda2, geom::T_BOX_A)?, b_map(g.b2, g.ldb2, g.k2)?])
}

/// A `rows x cols` row-major matrix at `ptr` (row stride `ld` elements) as a 2-d tensor map
/// with `(cols, rows)` boxes of `bx`.
fn tensor_map(dtype: DType, ptr: CUdeviceptr, rows: usize, cols: usize, ld: usize, bx: (u32, u32)) -> Result<CUtensorMap> {
    use cudarc::driver::sys::{
        CUresult, CUtensorMapDataType_enum as Ty, CUtensorMapFloatOOBfill_enum as Oob, CUtensorMapInterleave_enum as Il,
        CUtensorMapL2promotion_enum as L2, CUtensorMapSwizzle_enum as Sw,
    };
    let ty = match dtype {
        DType::BF16 => Ty::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => Ty::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::F32 => Ty::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
    };
    let dims = [cols as u64, rows as u64];
    let strides = [(ld * dtype.size()) as u64];
    let boxd = [bx.0, bx.1];
    let elem = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::zeroed();
    // SAFETY: every array has the rank's length (2; the strides rank - 1); the map is written
    // by the call (host memory only, nothing is enqueued).
    let r = unsafe {
        cudarc::driver::sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            ty,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            elem.as_ptr(),
            Il::CU_TENSOR_MAP_INTERLEAVE_NONE,
            Sw::CU_TENSOR_MAP_SWIZZLE_128B,
            L2::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            Oob::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != CUresult::CUDA_SUCCESS {
        return Err(Error::Cuda { op: "cuTensorMapEncodeTiled", msg: format!("{rows}x{cols} (ld {ld}) at {ptr:#x}: {r:?}") });
    }
    // SAFETY: initialised by the successful call (and zeroed before it).
    Ok(unsafe { map.assume_init() })
}

#[cfg(test)]
mod tests {
    #[test]
    fn wegeft_uc_applies_to_its_contract_and_is_taken_for_small_layers_only() {
        let uc = |tokens, d_in, d_out, rank, x| super::WegeftUc {
            tokens,
            d_in,
            d_out,
            rank,
            x,
            w: 256,
            psi: 512,
            phi: 768,
            u: 1024,
            c: 1280,
            scale: 1.0,
        };
        use half::{bf16, f16};
        assert!(uc(4096, 576, 576, 8, 0).applies::<bf16>() && uc(4096, 576, 576, 8, 0).applies::<f16>());
        assert!(!uc(4096, 576, 576, 8, 0).applies::<f32>());
        assert!(!uc(4096, 576, 576, 8, 8).applies::<bf16>(), "x not 16-byte aligned");
        for (r, ok) in [(1, false), (8, true), (12, false), (64, true), (72, false)] {
            assert_eq!(uc(64, 64, 64, r, 0).applies::<bf16>(), ok, "rank {r}");
        }
        assert!(!uc(64, 60, 64, 8, 0).applies::<bf16>(), "d_in not a multiple of 8");
        // The measured policy: the SmolLM2 576 -> 576 and 576 -> 1536 layers at T = 4096, not
        // 1536 -> 576 nor T = 8192 4096 -> 4096.
        assert!(uc(4096, 576, 576, 8, 0).worth_it() && uc(4096, 576, 1536, 8, 0).worth_it());
        assert!(!uc(4096, 1536, 576, 8, 0).worth_it() && !uc(8192, 4096, 4096, 64, 0).worth_it());
    }

    #[test]
    fn wegeft_fwd_applies_to_its_contract_and_sizes_its_grid_and_workspace() {
        let uc = |tokens, d_in, d_out, rank, x| super::WegeftUc { tokens, d_in, d_out, rank, x, w: 256, psi: 512, phi: 768, u: 1024, c: 1280, scale: 1.0 };
        use half::{bf16, f16};
        let big = uc(8192, 4096, 4096, 64, 16);
        assert!(big.one_launch_applies::<bf16>() && big.one_launch_applies::<f16>() && !big.one_launch_applies::<f32>());
        // Any rank that is a multiple of 8 (several 64-column rank tiles per block beyond 64).
        for (r, ok) in [(1, false), (8, true), (12, false), (64, true), (72, true), (256, true)] {
            assert_eq!(uc(64, 64, 64, r, 16).one_launch_applies::<bf16>(), ok, "rank {r}");
        }
        assert!(!uc(64, 60, 64, 8, 16).one_launch_applies::<bf16>(), "d_in not a multiple of 8");
        assert!(uc(64, 64, 60, 8, 16).one_launch_applies::<bf16>(), "any d_out (y is not a tensor map)");
        assert!(!uc(64, 64, 64, 8, 8).one_launch_applies::<bf16>(), "x not 16-byte aligned");
        assert!(!uc(64, 64, 64, 8, 0).one_launch_applies::<bf16>(), "x null");
        // The policy: wegeft_uc where it was measured faster, the one launch above that.
        assert!(big.one_launch_worth_it() && !uc(4096, 576, 576, 8, 16).one_launch_worth_it());
        // T = 8192, d = 4096, r = 64: 32 C tiles and 64 u tiles, then 64 x 16 tiles of y; a
        // counter and 64 + 32 flags.
        assert_eq!(big.one_launch_tiles(), 32 + 64 + 64 * 16);
        assert_eq!(big.one_launch_words(), 1 + 64 + 32);
        // Tails, and r = 72: two 64-column chunks per 128-row block.
        let odd = uc(200, 136, 300, 72, 16);
        assert_eq!(odd.one_launch_tiles(), (3 + 2) * 2 + 2 * 2);
        assert_eq!(odd.one_launch_words(), 1 + 2 + 3);
        // The backward: v's rank tiles, S's and dpsi^T's reduction tiles, the tiles of dx.
        let bw = |tokens, d_in, d_out, rank| super::WegeftBwd {
            tokens,
            d_in,
            d_out,
            rank,
            g: 16,
            w: 256,
            c: 512,
            psi: 768,
            u: 1024,
            x: 1280,
            v: 1536,
            s: 1792,
            dpsi: 2048,
            dx: 2304,
            dphi: 2560,
            scale: 0.5,
        };
        let b = bw(8192, 4096, 4096, 64);
        assert!(b.applies::<bf16>() && b.worth_it() && !b.applies::<f32>());
        assert_eq!((b.tiles(), b.words()), (64 + 32 + 32 + 32 + 64 * 16, 1 + 64 + 32));
        assert_eq!(super::WegeftBwd { dphi: 0, ..b }.tiles(), 64 + 32 + 32 + 64 * 16, "without dphi");
        // v: 2 row blocks, S: 3 (d_out 304), dpsi^T and dphi: 2 each (d_in 136), each x 2
        // chunks; dx: 2 x 1 tiles (d_in 136 < 256).
        let odd = bw(200, 136, 304, 72);
        assert_eq!((odd.tiles(), odd.words()), ((2 + 3 + 2 + 2) * 2 + 2, 1 + 2 + 3));
        assert!(!super::WegeftBwd { dphi: 2564, ..bw(64, 64, 64, 8) }.applies::<bf16>(), "dphi not 8-byte aligned");
        assert!(!bw(4096, 576, 576, 8).worth_it(), "the forward's policy: SmolLM2 at T = 4096 stays as it was");
        assert!(!bw(64, 64, 64, 12).applies::<bf16>() && !super::WegeftBwd { g: 8, ..bw(64, 64, 64, 8) }.applies::<bf16>());
        assert!(!super::WegeftBwd { dpsi: 2052, ..bw(64, 64, 64, 8) }.applies::<bf16>(), "dpsi not 8-byte aligned");
        assert!(!bw(64, 64, 60, 8).applies::<bf16>(), "d_out is G's ld");
    }

    use super::*;

    fn nt(m: usize, n: usize, k1: usize, k2: usize) -> GemmKext {
        GemmKext {
            m,
            n,
            k1,
            k2,
            a1: 0x1000,
            lda1: k1,
            b1: 0x100000,
            ldb1: k1,
            a2: 0x200000,
            lda2: k2,
            b2: 0x300000,
            ldb2: k2,
            bias: None,
            beta: 0.0,
            d: 0x400000,
            ldd: n,
        }
    }

    #[test]
    fn plan_picks_kernel_and_grid() {
        let g = nt(300, 577, 576, 8);
        let p = g.plan(Form::Nt, DType::BF16, false, false, 132).unwrap();
        assert_eq!(p.kernel, "gemm_kext_nt_bf16");
        assert_eq!(p.grid, 3 * 5);
        assert_eq!((p.block, p.smem), (256, 65536));
        let p = g.plan(Form::Nt, DType::F32, false, false, 132).unwrap();
        assert_eq!(p.kernel, "gemm_kext_nt_f32");
        assert_eq!(p.grid, 5 * 10);
        assert_eq!(p.smem, 0);
        let mut g2 = g;
        // NN: B1 is k1 x n and B2 is k2 x n, so their lds must cover n = 577.
        g2.k1 = 300;
        g2.lda1 = 300;
        g2.ldb1 = 584;
        g2.ldb2 = 584;
        let p = g2.plan(Form::Nn, DType::F16, true, false, 132).unwrap();
        assert_eq!(p.kernel, "gemm_kext_nn_f16_sm90");
        assert_eq!(p.grid, 3 * 3);
        assert_eq!(p.smem, 4 * 49152 + 1024);
        assert!(!p.tma);
    }

    #[test]
    fn plan_takes_the_wide_sm80_tile_once_its_tiles_fill_the_device() {
        // 4096 x 4096: 32 x 16 = 512 wide tiles, more than 132 SMs.
        let g = nt(4096, 4096, 4096, 64);
        let p = g.plan(Form::Nt, DType::BF16, false, false, 132).unwrap();
        assert_eq!((p.kernel.as_str(), p.grid, p.block, p.smem), ("gemm_kext_nt_bf16_wide", 512, 256, 98304));
        let mut h = g;
        h.ldb1 = 4096;
        h.ldb2 = 4096;
        assert_eq!(h.plan(Form::Nn, DType::F16, false, false, 132).unwrap().kernel, "gemm_kext_nn_f16_wide");
        // 1300 x 2900: 11 x 12 = 132 wide tiles: wide on 132 SMs, narrow on 133 (11 x 23 tiles).
        let g = nt(1300, 2900, 64, 8);
        assert_eq!(g.plan(Form::Nt, DType::BF16, false, false, 132).unwrap().kernel, "gemm_kext_nt_bf16_wide");
        let p = g.plan(Form::Nt, DType::BF16, false, false, 133).unwrap();
        assert_eq!((p.kernel.as_str(), p.grid, p.smem), ("gemm_kext_nt_bf16", 11 * 23, 65536));
        assert!(tc_wide(1, 1, 0) && tc_wide(1, 1, 1) && !tc_wide(1, 1, 2));
        // Not for f32, nor where the sm_90 kernels are asked for.
        assert_eq!(g.plan(Form::Nt, DType::F32, false, false, 1).unwrap().kernel, "gemm_kext_nt_f32");
        assert_eq!(g.plan(Form::Nt, DType::BF16, true, false, 1).unwrap().kernel, "gemm_kext_nt_bf16_sm90");
    }

    #[test]
    fn tma_grid_is_persistent_for_nn_only() {
        assert_eq!(tma_grid(Form::Nn, 512, 132), 132);
        assert_eq!(tma_grid(Form::Nn, 9, 132), 9);
        assert_eq!(tma_grid(Form::Nn, 9, 0), 1);
        assert_eq!(tma_grid(Form::Nt, 512, 132), 512);
    }

    #[test]
    fn plan_takes_the_tma_kernels_only_where_every_map_can_be_made() {
        // lds multiples of 8, bases 16-byte aligned: TMA on an sm_90a image.
        let mut g = nt(300, 577, 576, 8);
        g.lda2 = 8;
        g.ldb2 = 8;
        assert!(g.tma_ready(DType::BF16));
        let p = g.plan(Form::Nt, DType::BF16, true, true, 132).unwrap();
        assert_eq!((p.kernel.as_str(), p.block, p.smem, p.tma), ("gemm_kext_nt_bf16_tma", 288, 4 * 49152 + 1024, true));
        assert_eq!(p.grid, 3 * 3);
        // Not asked for sm90, not the sm_90a image, f32: no TMA.
        assert!(!g.plan(Form::Nt, DType::BF16, false, true, 132).unwrap().tma);
        assert_eq!(g.plan(Form::Nt, DType::BF16, true, false, 132).unwrap().kernel, "gemm_kext_nt_bf16_sm90");
        assert!(!g.plan(Form::Nt, DType::F32, true, true, 132).unwrap().tma);
        // Any operand a map cannot describe: the cp.async kernel.
        for f in [
            (|g: &mut GemmKext| g.lda2 = 12) as fn(&mut GemmKext),
            |g| g.b1 += 8,
            |g| g.ldb1 = 580,
            |g| g.a2 += 2,
        ] {
            let mut h = g;
            f(&mut h);
            assert!(!h.tma_ready(DType::BF16), "{h:?}");
            assert_eq!(h.plan(Form::Nt, DType::BF16, true, true, 132).unwrap().kernel, "gemm_kext_nt_bf16_sm90");
        }
        // K2 = 0: the second pair does not count, whatever it holds.
        let mut h = g;
        h.k2 = 0;
        h.lda2 = 3;
        assert!(h.tma_ready(DType::BF16));
        // K1 = 0 has no first map (and plan refuses it anyway).
        h.k1 = 0;
        assert!(!h.tma_ready(DType::BF16));
    }

    #[test]
    fn plan_rejects_bad_arguments() {
        let ok = nt(37, 40, 33, 1);
        assert!(ok.plan(Form::Nt, DType::F16, false, false, 132).is_ok());
        let bad = |f: &dyn Fn(&mut GemmKext), form: Form| {
            let mut g = ok;
            f(&mut g);
            g.plan(form, DType::F16, false, false, 132).unwrap_err().to_string()
        };
        assert!(bad(&|g| g.m = 0, Form::Nt).contains("m must be positive"));
        assert!(bad(&|g| g.k1 = 0, Form::Nt).contains("k1"));
        assert!(bad(&|g| g.lda1 = 32, Form::Nt).contains("A1"));
        assert!(bad(&|g| g.ldb2 = 0, Form::Nt).contains("B2"));
        // NN: B1 is k1 x n, so its ld must cover n = 40 (33 is too small).
        assert!(bad(&|_| (), Form::Nn).contains("B1"));
        assert!(bad(&|g| g.ldd = 39, Form::Nt).contains("D"));
        assert!(bad(&|g| g.a1 = 0, Form::Nt).contains("null"));
        assert!(bad(&|g| g.b1 = 0x1001, Form::Nt).contains("aligned"));
        assert!(bad(&|g| g.bias = Some(0x3), Form::Nt).contains("bias"));
        assert!(bad(&|g| g.beta = f32::NAN, Form::Nt).contains("beta"));
        assert!(bad(&|g| g.lda1 = 1 << 31, Form::Nt).contains("32-bit"));
        // k2 = 0: the second pair is ignored entirely.
        let mut g = ok;
        g.k2 = 0;
        g.a2 = 0;
        g.b2 = 0;
        g.lda2 = 0;
        g.ldb2 = 0;
        assert!(g.plan(Form::Nt, DType::BF16, false, false, 132).is_ok());
    }

    #[test]
    fn vector_loads_test_matches_the_kernel_condition() {
        use super::super::tune::vector_loads;
        let mut g = nt(64, 64, 64, 4);
        g.lda2 = 8;
        g.ldb2 = 8;
        let pairs = |g: &GemmKext| ((g.a1, g.lda1, g.b1, g.ldb1), (g.a2, g.lda2, g.b2, g.ldb2));
        let fast = |g: &GemmKext, d: DType| (vector_loads(d, pairs(g).0), vector_loads(d, pairs(g).1));
        assert_eq!(fast(&g, DType::BF16), (true, true));
        g.ldb2 = 4;
        assert_eq!(fast(&g, DType::BF16), (true, false));
        g.a1 += 8;
        assert_eq!(fast(&g, DType::BF16), (false, false));
        g.a1 -= 8;
        assert_eq!(fast(&g, DType::F32), (false, false));
    }
}
