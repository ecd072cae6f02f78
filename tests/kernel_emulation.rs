//! The CUDA kernels' logic checked on the CPU: `tests/emulation/kernels_on_host.cpp` includes
//! `kernels/lowrank.cu` and `kernels/merge.cu`, runs every product kernel with each block as
//! 256 threads meeting at a barrier, and compares against a double-precision loop (see that
//! file). It also prints the device dropout hash, which must equal the Rust mirror
//! `wegeft::cuda::dropout_hash`. Needs a C++20 compiler (`$CXX` or `g++`) and the CUDA headers
//! of `bash scripts/setup-cuda.sh`; the real kernels still need a GPU run (tests/cuda_layer.rs).
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::process::Command;

/// Compiles `tests/emulation/<source>` (which includes kernels from `kernels/`) with the host
/// C++ compiler (`$CXX` or `g++`) against the CUDA headers of `bash scripts/setup-cuda.sh` (or
/// `$CUDA_HOME/include`) into `<target tmp>/<exe>`; returns the executable.
fn build_emulation(source: &str, exe: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let include = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("include"))
        .filter(|p| p.join("cuda_bf16.h").is_file())
        .unwrap_or_else(|| root.join(".cuda/home/include"));
    assert!(include.join("cuda_bf16.h").is_file(), "CUDA headers not found at {} (run bash scripts/setup-cuda.sh)", include.display());
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(exe);
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-w", "-pthread"])
        .arg("-I")
        .arg(&include)
        .arg("-I")
        .arg(root.join("kernels"))
        .arg(root.join("tests/emulation").join(source))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?} (set CXX): {e}"));
    assert!(out.status.success(), "compiling {source} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

#[test]
fn kernels_match_the_reference_when_emulated_on_the_host() {
    let exe = build_emulation("kernels_on_host.cpp", "wegeft_kernels_on_host");
    let run = Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    println!("{}", text.lines().filter(|l| !l.starts_with("hash ")).collect::<Vec<_>>().join("\n"));
    assert!(run.status.success() && text.contains("0 failures"), "emulated kernels disagree with the reference:\n{text}");
    let mut hashes = 0;
    for l in text.lines().filter(|l| l.starts_with("hash ")) {
        let f: Vec<u64> = l[5..].split(' ').map(|v| v.parse().unwrap()).collect();
        let want = wegeft::cuda::dropout_hash(f[0], f[1] as u32, f[2] as u32) as u64;
        assert_eq!(f[3], want, "device mask hash differs from the Rust mirror at seed {} row {} col {}", f[0], f[1], f[2]);
        hashes += 1;
    }
    assert!(hashes >= 27, "expected the hash table, got {hashes} rows");
}

// ---- the model kernels (src/cuda/backend.rs) against the CPU ops ------------------------------

fn read_f32(dir: &std::path::Path, name: &str) -> Vec<f32> {
    let b = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Worst error relative to max |want| (and no NaN: every output starts as NaN in the emulation).
fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (*g as f64 - *w as f64).abs() / scale;
        let e = if e.is_nan() { f64::INFINITY } else { e }; // NaN: an unwritten output
        if e > worst {
            worst = e;
            at = i;
        }
    }
    assert!(worst <= tol, "{what}: worst relative error {worst:e} at {at} (got {}, want {}), tolerance {tol:e}", got[at], want[at]);
}

fn bf(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// `tests/emulation/model_kernels_on_host.cpp` runs the model kernels on the host (the sizes
/// and parameters below are the ones it uses); every output against the CPU backend's op.
#[test]
fn model_kernels_match_the_cpu_ops_when_emulated_on_the_host() {
    use wegeft::backend::{AdamHyper, Backend};
    use wegeft::cpu::Cpu;
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let exe = build_emulation("model_kernels_on_host.cpp", "wegeft_model_kernels_on_host");
    let dir = tmp.join("model_kernels_on_host");
    std::fs::create_dir_all(&dir).unwrap();
    let run = Command::new(&exe).arg(&dir).output().unwrap();
    assert!(run.status.success(), "emulation failed: {}", String::from_utf8_lossy(&run.stderr));
    let r = |n: &str| read_f32(&dir, n);

    // rmsnorm (rows 5, dim 300, eps 1e-5)
    let (x, w, dy) = (r("rms_x"), r("rms_w"), r("rms_dy"));
    let (mut y, mut rstd) = (vec![0.0f32; 1500], vec![0.0f32; 5]);
    Cpu.rmsnorm_forward(&x, &w, 5, 300, 1e-5, &mut y, &mut rstd).unwrap();
    close("rmsnorm y", &r("rms_y"), &y, 1e-6);
    close("rmsnorm rstd", &r("rms_rstd"), &rstd, 1e-6);
    let mut dx = r("rms_dx0");
    Cpu.rmsnorm_backward(&x, &w, &rstd, &dy, 5, 300, &mut dx).unwrap();
    close("rmsnorm dx (accumulated)", &r("rms_dx"), &dx, 1e-6);
    assert_eq!(r("rms_y_bf16"), bf(&r("rms_y")), "rmsnorm_fwd_f32_bf16: the f32 kernel's y, rounded once");
    assert_eq!(r("rms_rstd_bf16"), r("rms_rstd"), "rmsnorm_fwd_f32_bf16 rstd");

    // rope (rows 6, heads 3, hd 16, theta 10000)
    let pos = [0u32, 5, 3, 17, 2, 9];
    for (name, inverse) in [("rope_fwd", false), ("rope_inv", true)] {
        let mut q = r("rope_x");
        Cpu.rope(&mut q, 3, 16, &pos, &wegeft::rope::Rope::new(10000.0), inverse).unwrap();
        close(name, &r(name), &q, 1e-6);
        // rope_bf16: the CPU op on the rounded rows, rounded once.
        let mut qb = bf(&r("rope_x"));
        Cpu.rope(&mut qb, 3, 16, &pos, &wegeft::rope::Rope::new(10000.0), inverse).unwrap();
        assert_eq!(r(&format!("{name}_bf16")), bf(&qb), "{name} on bf16 rows");
    }

    // swiglu (n 1000)
    let (g, u, dh) = (r("swi_g"), r("swi_u"), r("swi_dh"));
    let mut h = vec![0.0f32; 1000];
    Cpu.swiglu_forward(&g, &u, &mut h).unwrap();
    close("swiglu h", &r("swi_h"), &h, 1e-6);
    let (mut dg, mut du) = (vec![0.0f32; 1000], vec![0.0f32; 1000]);
    Cpu.swiglu_backward(&g, &u, &dh, &mut dg, &mut du).unwrap();
    close("swiglu dgate", &r("swi_dg"), &dg, 1e-6);
    close("swiglu dup", &r("swi_du"), &du, 1e-6);
    // The bf16-input kernels (gate and up stashed in bf16) compute on the widened values.
    let (gb, ub) = (bf(&g), bf(&u));
    Cpu.swiglu_forward(&gb, &ub, &mut h).unwrap();
    close("swiglu h (bf16 in)", &r("swi_h_bf16"), &h, 1e-6);
    Cpu.swiglu_backward(&gb, &ub, &dh, &mut dg, &mut du).unwrap();
    close("swiglu dgate (bf16 in)", &r("swi_dg_bf16"), &dg, 1e-6);
    close("swiglu dup (bf16 in)", &r("swi_du_bf16"), &du, 1e-6);
    // bf16 h: the f32-output kernels' h, rounded once.
    assert_eq!(r("swi_h_f32_bf16"), bf(&r("swi_h")), "swiglu_fwd_f32_bf16");
    assert_eq!(r("swi_h_bf16_bf16"), bf(&r("swi_h_bf16")), "swiglu_fwd_bf16_bf16");
    assert_eq!(r("swi_dg_bf16_bf16"), bf(&r("swi_dg_bf16")), "swiglu_bwd_bf16_bf16 dgate");
    assert_eq!(r("swi_du_bf16_bf16"), bf(&r("swi_du_bf16")), "swiglu_bwd_bf16_bf16 dup");

    // AdamW: two steps; the same f32 operations in the same order as the CPU optimiser.
    let (mut p, mut m, mut v) = (r("adam_p0"), vec![0.0f32; 700], vec![0.0f32; 700]);
    for (step, gname) in [(1u64, "adam_g1"), (2, "adam_g2")] {
        let hp = AdamHyper { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step };
        Cpu.adamw_step(&mut p, &r(gname), &mut m, &mut v, hp).unwrap();
    }
    assert_eq!(r("adam_p"), p, "adamw p (bitwise)");
    assert_eq!(r("adam_m"), m, "adamw m (bitwise)");
    assert_eq!(r("adam_v"), v, "adamw v (bitwise)");

    // xent (rows 3, vocab 1000, c 0.25, labels 5 999 0): f64 softmax / cross-entropy.
    let z = r("xent_z");
    let labels = [5usize, 999, 0];
    let (mut loss, mut zg) = (vec![0.0f32; 3], vec![0.0f32; 3000]);
    for (row, &l) in labels.iter().enumerate() {
        let zr = &z[row * 1000..(row + 1) * 1000];
        let mx = zr.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
        let lse = mx + zr.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
        loss[row] = (lse - zr[l] as f64) as f32;
        for (j, &v) in zr.iter().enumerate() {
            zg[row * 1000 + j] = (0.25 * ((v as f64 - lse).exp() - if j == l { 1.0 } else { 0.0 })) as f32;
        }
    }
    close("xent loss", &r("xent_loss"), &loss, 1e-6);
    close("xent zg", &r("xent_zg"), &zg, 1e-6);
    assert_eq!(r("xent_loss_bf16"), r("xent_loss"), "the loss does not depend on the gradient's dtype");
    close("xent zg bf16", &r("xent_zg_bf16"), &zg, 4e-3);

    // embedding (vocab 20, dim 33)
    let ids = [3u32, 0, 19, 7, 7, 12, 1];
    let t = r("emb_t");
    let mut e = vec![0.0f32; ids.len() * 33];
    Cpu.embedding_forward(&t, 20, 33, &ids, &mut e).unwrap();
    assert_eq!(r("emb_out"), e, "embedding f32");
    Cpu.embedding_forward(&bf(&t), 20, 33, &ids, &mut e).unwrap();
    assert_eq!(r("emb_out_bf16"), e, "embedding bf16 (the host's round-to-nearest-even table)");

    // casts, add, gather, scatter (9 rows of 70; rows 8 0 3 5)
    let (x, y) = (r("ew_x"), r("ew_y"));
    assert_eq!(r("ew_xb"), bf(&x), "cast_f32_bf16 rounds as half::bf16::from_f32");
    let acc: Vec<f32> = y.iter().zip(bf(&x)).map(|(a, b)| a + b).collect();
    assert_eq!(r("ew_acc"), acc, "cast_bf16_f32 accumulate");
    let sum: Vec<f32> = y.iter().zip(&x).map(|(a, b)| a + b).collect();
    assert_eq!(r("ew_sum"), sum, "add_f32");
    assert_eq!(r("ew_sum2"), sum, "add_out_f32");
    let mut biased = y.clone();
    Cpu.add_bias(&mut biased, &r("ew_bias"), 9, 70).unwrap();
    assert_eq!(r("ew_biased"), biased, "add_bias_f32");
    let idx = [8usize, 0, 3, 5];
    let gath: Vec<f32> = idx.iter().flat_map(|&i| x[i * 70..(i + 1) * 70].to_vec()).collect();
    assert_eq!(r("ew_gather"), gath, "gather_rows_f32");
    assert_eq!(r("ew_gather_bf16"), bf(&gath), "gather_rows_bf16");
    let mut scat = vec![0.0f32; 630];
    for (k, &i) in idx.iter().enumerate() {
        scat[i * 70..(i + 1) * 70].copy_from_slice(&gath[k * 70..(k + 1) * 70]);
    }
    assert_eq!(r("ew_scatter"), scat, "scatter_rows_f32");

    // split_f32_bf16x2 (9 x 70 into 9 x 140): each row [hi | lo], hi = bf16(x), lo = bf16(x - hi),
    // and hi + lo is x to 2^-16 of |x|.
    let (rows, dim) = (9usize, 70usize);
    let sx = r("split_x");
    let hilo = r("split_hilo");
    let hi: Vec<f32> = (0..rows).flat_map(|i| hilo[i * 2 * dim..i * 2 * dim + dim].to_vec()).collect();
    let lo: Vec<f32> = (0..rows).flat_map(|i| hilo[i * 2 * dim + dim..(i + 1) * 2 * dim].to_vec()).collect();
    assert_eq!(hi, bf(&sx), "split_f32_bf16x2 hi");
    let want_lo: Vec<f32> = sx.iter().zip(&hi).map(|(x, h)| x - h).collect();
    assert_eq!(lo, bf(&want_lo), "split_f32_bf16x2 lo");
    for ((x, h), l) in sx.iter().zip(&hi).zip(&lo) {
        assert!(((h + l) as f64 - *x as f64).abs() <= x.abs() as f64 * 2f64.powi(-16), "split of {x}: {h} + {l}");
    }
    // add_halves_f32 into a row stride of dim + 3: beta 0 writes only the first dim columns of
    // each row (the NaN padding stays), beta 0.5 adds half the old value.
    let (d2, before) = (r("halves_d"), r("halves_y1_before"));
    let (y0, y1) = (r("halves_y0"), r("halves_y1"));
    for i in 0..rows {
        for c in 0..dim + 3 {
            let at = i * (dim + 3) + c;
            if c < dim {
                let sum = d2[i * 2 * dim + c] + d2[i * 2 * dim + dim + c];
                assert_eq!(y0[at], sum, "add_halves_f32 beta 0 [{i}, {c}]");
                // (a compiler may fuse the multiply-add: one rounding fewer)
                let want = sum as f64 + 0.5 * before[at] as f64;
                assert!((y1[at] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "add_halves_f32 beta 0.5 [{i}, {c}]: {} vs {want}", y1[at]);
            } else {
                assert!(y0[at].is_nan(), "add_halves_f32 wrote the padding [{i}, {c}]");
                assert_eq!(y1[at], before[at], "add_halves_f32 wrote the padding [{i}, {c}]");
            }
        }
    }
}

/// `tests/emulation/gemm_on_host.cpp` compiles the fused K-extended GEMM (`kernels/gemm_kext.cu`)
/// on the host and runs the sm_80 tensor-core kernels (bf16, f16; NT and NN; the 128 x 128 and
/// the wide 128 x 256 block tiles), the sm_90a wgmma
/// ones and the f32 FMA ones with every block as 256 fibers and cp.async, ldmatrix,
/// mma.m16n8k16 and wgmma.mma_async (asynchronous up to its wait_group) emulated with their PTX
/// semantics, and the sm_90a TMA kernels as 288 fibers with mbarriers (phases, transaction
/// counts) and TMA boxes (128-byte swizzle, zero fill) emulated too, a block per tile and 2
/// persistent blocks over 9 tiles; against a double-precision loop: odd sizes, K1 or K2 zero,
/// more k tiles than pipeline stages, aligned / odd-ld / misaligned layouts, bias, beta, NaN row
/// padding that must not be read, D padding that must not be written, no shared memory changed
/// under an in-flight wgmma, no barrier wait that cannot end; whole tiles through the epilogues'
/// 16-byte quad-transpose stores (shuffles emulated); the fused forward's `wegeft_uc`
/// (u and C in one grid); and `wegeft_fwd_*_tma` / `wegeft_bwd_*_tma` (u, C and y, or v,
/// S = G^T u, dpsi and dx, in one grid: rank and reduction tiles (MN-major A emulated) through
/// the tile counter, flags and named barrier, on one block and on many; every TMA read of a rank
/// tile's output must come after a wait on the flags of its rows). (Releasing a stage before its wgmmas are
/// done, waiting on the wrong phase, or not releasing a tile's last stage each fail it: checked
/// by hand on 2026-11-29; a wrong transpose or phi swizzle fails it: 2026-11-30; in
/// `wegeft_fwd`, waiting on a wrong u or C flag, or on one C block of two, fails it, and posting
/// a wrong flag deadlocks; in `wegeft_bwd`, a dpsi tile reading v without its rows' flag, or
/// a wrong second box of G^T, fails it: 2026-11-30, session 10; in the wide sm_80 tile, NN's B
/// loader stepping 16 k-rows a pass instead of 8, waiting for one tile too few before reading
/// the next tile's fragments, or reading them without the barrier, fails it: session 11.)
#[test]
fn gemm_core_matches_the_reference_when_emulated_on_the_host() {
    let exe = build_emulation("gemm_on_host.cpp", "wegeft_gemm_on_host");
    let run = Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    println!("{text}");
    assert!(run.status.success() && text.contains(" 0 failures"), "emulated GEMM kernels disagree with the reference:\n{text}");
    assert!(text.contains("278 checks"), "expected 278 checks:\n{text}");
}

/// `tests/emulation/attention_on_host.cpp` includes `kernels/attention.cu` with host versions
/// of the warp primitives (shfl_xor, ldmatrix .x4 / .trans, mma.m16n8k16 bf16, cp.async) that
/// follow their PTX semantics, runs every attention kernel (tensor-core forward for hd 64 and
/// 128, tensor-core backward for hd 64, plain forward / backward for f32 and bf16, split decode) on small shapes — S not a
/// multiple of any tile, S = 1, GQA, odd head dims, sliding windows of 1 key, shorter than a
/// tile, across tiles and longer than the sequence — and compares against a double-precision
/// loop (f32 within 2e-5, bf16 within 2e-2 of the largest reference value). `cp.async` is
/// emulated asynchronously: the destination holds NaN until a `cp.async.wait_group` covering
/// the copy (so a missing wait or barrier in the pipeline gives NaN outputs), misaligned
/// `cp.async` / `ldmatrix` addresses abort, and a block that exits with copies in flight fails
/// the run; the decode cache past `len` (and before a window) is NaN, so reading it shows.
#[test]
fn attention_kernels_match_the_reference_when_emulated_on_the_host() {
    let exe = build_emulation("attention_on_host.cpp", "wegeft_attention_on_host");
    let run = Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    println!("{text}");
    assert!(run.status.success() && text.contains(" 0 failures"), "emulated attention kernels disagree with the reference:\n{text}");
    assert!(text.contains("141 checks"), "expected 141 checks:\n{text}");
}
