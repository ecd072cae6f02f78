//! The `ptxas -v` report of the embedded kernels (written by build.rs, no GPU needed): every
//! expected kernel is compiled for every target, and none spills registers or uses local
//! memory.
#![cfg(feature = "cuda")]

use wegeft::cuda::kernels::{ptxas_rows, PTXAS_REPORT, MODULES};

const ARCHES: [&str; 2] = ["sm_80", "sm_90a"];
const DTYPES: [&str; 3] = ["f32", "bf16", "f16"];
const OPS: [&str; 14] = [
    "lowrank_u",
    "wegeft_c",
    "lowrank_v",
    "lowrank_s",
    "lowrank_dpsi",
    "lowrank_dphi",
    "lowrank_addmm_nt",
    "lowrank_addmm_nn",
    "splitk_reduce",
    "merge",
    "unmerge_wphi",
    "unmerge_psiphi",
    "unmerge",
    "multi_edit",
];

#[test]
fn every_expected_kernel_is_compiled_for_every_target() {
    let rows = ptxas_rows().unwrap();
    let mut missing = Vec::new();
    for op in OPS {
        for dt in DTYPES {
            let name = format!("{op}_{dt}");
            for arch in ARCHES {
                if !rows.iter().any(|r| r.kernel == name && r.arch == arch) {
                    missing.push(format!("{name} ({arch})"));
                }
            }
            if !MODULES.iter().any(|m| m.kernels.contains(&name.as_str())) {
                missing.push(format!("{name} (PTX)"));
            }
        }
    }
    assert!(missing.is_empty(), "kernels missing from the build: {missing:?}\nreport:\n{PTXAS_REPORT}");
}

/// The attention kernels (`kernels/attention.cu`): f32 and bf16 only, plus the bf16
/// tensor-core forwards.
const ATTN_OPS: [&str; 11] = [
    "attn_fwd64",
    "attn_fwd128",
    "attn_bwd_pre",
    "attn_bwd_dq64",
    "attn_bwd_dq128",
    "attn_bwd_dq_sw64",
    "attn_bwd_dq_sw128",
    "attn_bwd_dkdv64",
    "attn_bwd_dkdv128",
    "attn_decode_split",
    "attn_decode_combine",
];

#[test]
fn every_attention_kernel_is_compiled_for_every_target() {
    let rows = ptxas_rows().unwrap();
    let mut names: Vec<String> = ATTN_OPS.iter().flat_map(|op| ["f32", "bf16"].map(|dt| format!("{op}_{dt}"))).collect();
    names.push("attn_fwd_mma64_bf16".into());
    names.push("attn_fwd_mma128_bf16".into());
    names.push("attn_bwd_dq_mma64_bf16".into());
    names.push("attn_bwd_dkdv_mma64_bf16".into());
    let mut missing = Vec::new();
    for name in &names {
        for arch in ARCHES {
            if !rows.iter().any(|r| &r.kernel == name && r.arch == arch) {
                missing.push(format!("{name} ({arch})"));
            }
        }
        if !MODULES.iter().any(|m| m.name == "attention" && m.kernels.contains(&name.as_str())) {
            missing.push(format!("{name} (PTX)"));
        }
    }
    assert!(missing.is_empty(), "attention kernels missing from the build: {missing:?}\nreport:\n{PTXAS_REPORT}");
}

#[test]
fn no_kernel_spills_or_uses_local_memory() {
    let rows = ptxas_rows().unwrap();
    assert!(!rows.is_empty(), "empty ptxas report");
    let offenders: Vec<String> = rows
        .iter()
        .filter(|r| r.spill_stores > 0 || r.spill_loads > 0 || r.stack_frame > 0)
        .map(|r| {
            format!(
                "{} ({}): {} registers, {} B spill stores, {} B spill loads, {} B stack frame",
                r.kernel, r.arch, r.registers, r.spill_stores, r.spill_loads, r.stack_frame
            )
        })
        .collect();
    assert!(offenders.is_empty(), "kernels that spill or use local memory:\n{}", offenders.join("\n"));
}

#[test]
fn report_rows_are_well_formed() {
    for r in ptxas_rows().unwrap() {
        assert!(ARCHES.contains(&r.arch.as_str()), "unexpected arch in {r:?}");
        assert!(r.registers > 0 && r.registers <= 255, "implausible register count in {r:?}");
    }
}

#[test]
fn every_module_has_all_images() {
    for m in MODULES {
        assert!(m.ptx.contains(".entry"), "{}: PTX has no entry", m.name);
        assert!(m.ptx.contains(".target sm_80"), "{}: PTX is not for compute_80", m.name);
        // ELF magic.
        assert_eq!(&m.cubin_sm80[..4], b"\x7fELF", "{}: sm_80 cubin", m.name);
        assert_eq!(&m.cubin_sm90a[..4], b"\x7fELF", "{}: sm_90a cubin", m.name);
    }
}

/// Every kernel the model's backend (`src/cuda/backend.rs`, `src/cuda/attention.rs`) launches.
const MODEL_KERNELS: [&str; 25] = [
    "add_f32",
    "add_out_f32",
    "add_bias_f32",
    "cast_f32_bf16",
    "cast_bf16_f32",
    "gather_rows_f32",
    "gather_rows_bf16",
    "scatter_rows_f32",
    "embedding_f32",
    "embedding_bf16",
    "rmsnorm_fwd_f32",
    "rmsnorm_fwd_f32_bf16",
    "rmsnorm_bwd_f32",
    "rope_f32",
    "rope_bf16",
    "swiglu_fwd_f32",
    "swiglu_bwd_f32",
    "swiglu_fwd_bf16",
    "swiglu_bwd_bf16",
    "swiglu_fwd_f32_bf16",
    "swiglu_fwd_bf16_bf16",
    "swiglu_bwd_bf16_bf16",
    "xent_rows_f32",
    "xent_rows_bf16",
    "adamw_f32",
];

#[test]
fn every_model_kernel_is_compiled_for_every_target() {
    let rows = ptxas_rows().unwrap();
    let mut missing = Vec::new();
    for name in MODEL_KERNELS {
        for arch in ARCHES {
            if !rows.iter().any(|r| r.kernel == name && r.arch == arch) {
                missing.push(format!("{name} ({arch})"));
            }
        }
        if !MODULES.iter().any(|m| m.kernels.contains(&name)) {
            missing.push(format!("{name} (PTX)"));
        }
    }
    assert!(missing.is_empty(), "model kernels missing from the build: {missing:?}");
}

/// The fused K-extended GEMM (`kernels/gemm_kext.cu`, launched by `src/cuda/gemm.rs`): build.rs
/// sets `cfg(wegeft_gemm)` whenever `src/cuda/gemm.rs` is in the tree, which it always is in
/// this repository, so a `cuda` build without it (`Path::Fused` refused, `Auto` silently
/// composed) is a broken build, not a configuration.
#[test]
#[allow(clippy::assertions_on_constants)] // a constant of the build: this checks the build
fn fused_gemm_is_built_with_all_its_kernels() {
    assert!(
        wegeft::cuda::FUSED_GEMM_BUILT,
        "the `cuda` feature was built without the fused GEMM (cfg wegeft_gemm unset: is src/cuda/gemm.rs missing?)"
    );
    let rows = ptxas_rows().unwrap();
    let mut names = Vec::new();
    for form in ["nt", "nn"] {
        for dt in DTYPES {
            names.push(format!("gemm_kext_{form}_{dt}"));
        }
        // The sm_80 kernels' wide block tile (128 x 256; the launcher's `tc_wide`).
        for dt in ["bf16", "f16"] {
            names.push(format!("gemm_kext_{form}_{dt}_wide"));
        }
        // The sm_90a wgmma kernels (Path::FusedSm90): cp.async-fed and TMA-fed, bf16 and
        // f16 only (the _tma ones trap outside the sm_90a image; the launcher never picks them
        // there).
        for dt in ["bf16", "f16"] {
            names.push(format!("gemm_kext_{form}_{dt}_sm90"));
            names.push(format!("gemm_kext_{form}_{dt}_tma"));
        }
    }
    // The fused forward's u and C in one launch (FusedSm90, before the TMA kernel), and the
    // whole forward and most of the backward in one launch each (FusedSm90, sm_90a; they trap
    // elsewhere like the _tma kernels).
    for dt in ["bf16", "f16"] {
        names.push(format!("wegeft_uc_{dt}"));
        names.push(format!("wegeft_fwd_{dt}_tma"));
        names.push(format!("wegeft_bwd_{dt}_tma"));
    }
    let mut missing = Vec::new();
    for name in &names {
        for arch in ARCHES {
            if !rows.iter().any(|r| &r.kernel == name && r.arch == arch) {
                missing.push(format!("{name} ({arch})"));
            }
        }
        if !MODULES.iter().any(|m| m.name == "gemm_kext" && m.kernels.contains(&name.as_str())) {
            missing.push(format!("{name} (module gemm_kext)"));
        }
    }
    assert!(missing.is_empty(), "fused GEMM kernels missing from the build: {missing:?}\nreport:\n{PTXAS_REPORT}");
}
