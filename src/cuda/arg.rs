//! Kernel arguments that carry their type, checked against the kernel's signature before a
//! launch.
//!
//! `cuLaunchKernel` takes an array of untyped pointers: an argument of the wrong size or in the
//! wrong place is undefined behaviour that no test on the host can see. build.rs records each
//! kernel's parameter types from its PTX (`.param .u64`, `.u32`, `.f32`), and every launch of
//! the crate goes through [`check`], which compares them with the Rust values passed: a
//! mismatch is an [`Error::Cuda`] naming the kernel and the parameter, before anything runs.

use std::ffi::c_void;

use crate::error::{Error, Result};

/// A Rust type that can be passed by value to a kernel, with its PTX parameter type.
pub(crate) trait KernelArg: Copy {
    /// The PTX spelling of the parameter type (`u64` covers pointers and 64-bit integers).
    const PTX: &'static str;
}

impl KernelArg for i32 {
    const PTX: &'static str = "u32";
}
impl KernelArg for u32 {
    const PTX: &'static str = "u32";
}
impl KernelArg for i64 {
    const PTX: &'static str = "u64";
}
/// Also `CUdeviceptr`.
impl KernelArg for u64 {
    const PTX: &'static str = "u64";
}
impl KernelArg for f32 {
    const PTX: &'static str = "f32";
}
/// A TMA tensor map passed by value (`const __grid_constant__ CUtensorMap`: 128 bytes,
/// 128-byte aligned, `.param .align 128 .b8 name[128]` in the PTX).
impl KernelArg for cudarc::driver::sys::CUtensorMap {
    const PTX: &'static str = "align 128 b8";
}

/// One kernel argument: a pointer to the value (which must outlive the launch call) and its
/// PTX type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KArg {
    ptr: *mut c_void,
    ty: &'static str,
}

impl KArg {
    /// The argument `v` (read by the driver during the launch call only).
    pub(crate) fn new<T: KernelArg>(v: &T) -> Self {
        KArg { ptr: v as *const T as *mut c_void, ty: T::PTX }
    }
}

/// `[KArg::new(&a), KArg::new(&b), ...]`.
macro_rules! kargs {
    ($($v:expr),* $(,)?) => {
        [$($crate::cuda::arg::KArg::new(&$v)),*]
    };
}
pub(crate) use kargs;

/// Checks `args` against `signature` (comma-separated PTX types, as build.rs records them) of
/// kernel `name`, and returns the pointers for `cuLaunchKernel`.
pub(crate) fn check(name: &str, signature: &str, args: &[KArg]) -> Result<Vec<*mut c_void>> {
    let want: Vec<&str> = if signature.is_empty() { Vec::new() } else { signature.split(',').collect() };
    let mismatch = |msg: String| Error::Cuda { op: "kernel arguments", msg: format!("{name}: {msg}") };
    if want.len() != args.len() {
        return Err(mismatch(format!("the kernel takes {} parameters ({signature}), {} were passed", want.len(), args.len())));
    }
    for (i, (w, a)) in want.iter().zip(args).enumerate() {
        if *w != a.ty {
            return Err(mismatch(format!("parameter {i} is .{w} in the kernel, the launch passes .{}", a.ty)));
        }
    }
    Ok(args.iter().map(|a| a.ptr).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::MODULES;

    #[test]
    fn check_accepts_the_exact_signature_and_names_the_first_mismatch() {
        let (p, n, s) = (0u64, 3i32, 0.5f32);
        assert_eq!(check("k", "u64,u32,f32", &kargs![p, n, s]).unwrap().len(), 3);
        let e = check("k", "u64,u32,f32", &kargs![p, s, n]).unwrap_err().to_string();
        assert!(e.contains("k: parameter 1 is .u32 in the kernel, the launch passes .f32"), "{e}");
        let e = check("k", "u64,u32", &kargs![p]).unwrap_err().to_string();
        assert!(e.contains("takes 2 parameters (u64,u32), 1 were passed"), "{e}");
        let e = check("k", "u64,u32", &kargs![p, 1i64]).unwrap_err().to_string();
        assert!(e.contains("parameter 1 is .u32"), "{e}");
        assert!(check("k", "", &[]).unwrap().is_empty());
    }

    #[test]
    fn every_compiled_kernel_has_a_signature_of_known_types() {
        let mut n = 0;
        for m in MODULES {
            assert_eq!(m.kernels.len(), m.signatures.len(), "module {}", m.name);
            for (k, sig) in m.kernels.iter().zip(m.signatures) {
                assert!(!sig.is_empty(), "{k} has no parameters recorded");
                for t in sig.split(',') {
                    assert!(matches!(t, "u32" | "u64" | "f32" | "align 128 b8"), "{k}: parameter type {t:?} has no KernelArg");
                }
                n += 1;
            }
        }
        assert!(n > 40, "only {n} kernels");
        // Spot checks against the sources: gemm_kext's 16 parameters (M, N, K1, K2, A1, lda1,
        // B1, ldb1, A2, lda2, B2, ldb2, bias, beta, D, ldd).
        let sig = crate::cuda::kernels::signature_of("gemm_kext_nt_f32").unwrap();
        assert_eq!(sig, "u32,u32,u32,u32,u64,u32,u64,u32,u64,u32,u64,u32,u64,f32,u64,u32");
        // The TMA kernels: the four tensor maps (CUtensorMap by value), then the same 16.
        let sig = crate::cuda::kernels::signature_of("gemm_kext_nn_bf16_tma").unwrap();
        assert_eq!(sig, format!("{},u32,u32,u32,u32,u64,u32,u64,u32,u64,u32,u64,u32,u64,f32,u64,u32", ["align 128 b8"; 4].join(",")));
        // wegeft_fwd / wegeft_bwd: eleven maps, then (M, N, K1, r, out0, scale0, out1, scale1,
        // bias, D, ldd, S, dpsi), two more maps, (dphi, s_split, work).
        let map = "align 128 b8";
        for k in ["wegeft_fwd_bf16_tma", "wegeft_bwd_f16_tma"] {
            let sig = crate::cuda::kernels::signature_of(k).unwrap();
            let want = format!("{},u32,u32,u32,u32,u64,f32,u64,f32,u64,u64,u32,u64,u64,{map},{map},u64,u64,u64", [map; 11].join(","));
            assert_eq!(sig, want, "{k}");
        }
        assert_eq!(std::mem::size_of::<cudarc::driver::sys::CUtensorMap>(), 128);
        assert_eq!(std::mem::align_of::<cudarc::driver::sys::CUtensorMap>(), 128);
    }
}
