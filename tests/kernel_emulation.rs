//! The CUDA kernels' logic checked on the CPU: `tests/emulation/kernels_on_host.cpp` includes
//! `kernels/lowrank.cu` and `kernels/merge.cu`, runs every product kernel with each block as
//! 256 threads meeting at a barrier, and compares against a double-precision loop (see that
//! file). It also prints the device dropout hash, which must equal the Rust mirror
//! `wegeft::cuda::dropout_hash`. Needs a C++20 compiler (`$CXX` or `g++`) and the CUDA headers
//! of `bash scripts/setup-cuda.sh`; the real kernels still need a GPU run (tests/cuda_layer.rs).
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::process::Command;

#[test]
fn kernels_match_the_reference_when_emulated_on_the_host() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let include = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("include"))
        .filter(|p| p.join("cuda_bf16.h").is_file())
        .unwrap_or_else(|| root.join(".cuda/home/include"));
    assert!(include.join("cuda_bf16.h").is_file(), "CUDA headers not found at {} (run bash scripts/setup-cuda.sh)", include.display());
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("wegeft_kernels_on_host");
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-w", "-pthread"])
        .arg("-I")
        .arg(&include)
        .arg("-I")
        .arg(root.join("kernels"))
        .arg(root.join("tests/emulation/kernels_on_host.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?} (set CXX): {e}"));
    assert!(out.status.success(), "compiling the host emulation failed:\n{}", String::from_utf8_lossy(&out.stderr));
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

/// `tests/emulation/attention_on_host.cpp` includes `kernels/attention.cu` with host versions
/// of the warp primitives (shfl_xor, ldmatrix .x4 / .trans, mma.m16n8k16 bf16, cp.async) that
/// follow their PTX semantics, runs every attention kernel (tensor-core forward for hd 64 and
/// 128, tensor-core backward for hd 64, plain forward / backward for f32 and bf16, split decode) on small shapes — S not a
/// multiple of any tile, S = 1, GQA, odd head dims — and compares against a double-precision
/// loop (f32 within 2e-5, bf16 within 2e-2 of the largest reference value).
#[test]
fn attention_kernels_match_the_reference_when_emulated_on_the_host() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let include = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("include"))
        .filter(|p| p.join("cuda_bf16.h").is_file())
        .unwrap_or_else(|| root.join(".cuda/home/include"));
    assert!(include.join("cuda_bf16.h").is_file(), "CUDA headers not found at {} (run bash scripts/setup-cuda.sh)", include.display());
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("wegeft_attention_on_host");
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-w", "-pthread"])
        .arg("-I")
        .arg(&include)
        .arg("-I")
        .arg(root.join("kernels"))
        .arg(root.join("tests/emulation/attention_on_host.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?} (set CXX): {e}"));
    assert!(out.status.success(), "compiling the attention host emulation failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let run = Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    println!("{text}");
    assert!(run.status.success() && text.contains(" 0 failures"), "emulated attention kernels disagree with the reference:\n{text}");
    assert!(text.contains("56 checks"), "expected 56 checks:\n{text}");
}
