//! Build script.
//!
//! Without feature `cuda` it only declares the `wegeft_gemm` cfg. With it, it compiles every
//! `kernels/*.cu` with nvcc to
//!
//! * PTX for `compute_80` (JIT-compiled by the driver on any card without a matching cubin),
//! * a cubin for `sm_80` (runs on every 8.x card) and one for `sm_90a` (H100/H200),
//!
//! records what `ptxas -v` says about every kernel (registers, spills, stack frame, shared
//! memory) and generates `$OUT_DIR/kernels.rs`, which `src/cuda/kernels.rs` includes: the
//! embedded images and the `PTXAS_REPORT` table.
//!
//! nvcc is looked for in `$NVCC`, then `$CUDA_HOME/bin`, then `PATH`, then the project's
//! `.cuda/bin` (installed by `bash scripts/setup-cuda.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The cubin targets every kernel file is compiled for: (label, `-gencode` value).
const CUBIN_TARGETS: &[(&str, &str)] = &[("sm_80", "arch=compute_80,code=sm_80"), ("sm_90a", "arch=compute_90a,code=sm_90a")];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(wegeft_gemm)");
    println!("cargo:rerun-if-changed=build.rs");
    // Watch the folder, not the file: a missing file would make cargo rerun this every build.
    println!("cargo:rerun-if-changed=src/cuda");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    // The K-extended GEMM launcher lives in its own file; the backend calls it when present.
    if manifest.join("src/cuda/gemm.rs").is_file() {
        println!("cargo:rustc-cfg=wegeft_gemm");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "PATH", "WEGEFT_NVCC_FLAGS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let kdir = manifest.join("kernels");
    println!("cargo:rerun-if-changed={}", kdir.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let nvcc = find_nvcc(&manifest).unwrap_or_else(|| {
        panic!(
            "\n\nfeature `cuda` needs nvcc (CUDA 13.0) and none was found in $NVCC, $CUDA_HOME/bin, \
             PATH or {}/.cuda/bin.\nInstall it without root or GPU with:\n\n    bash scripts/setup-cuda.sh\n\n",
            manifest.display()
        )
    });

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .unwrap_or_else(|e| panic!("{}: {e}", kdir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    for p in &sources {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();
    if sources.is_empty() {
        panic!("no kernels/*.cu files found in {}", kdir.display());
    }

    // nvcc runs only when a kernel file, the flags, nvcc or this script changed since the
    // last run.
    let mut stamp = format!("{}\n{:?}\n", nvcc.display(), std::env::var("WEGEFT_NVCC_FLAGS").ok());
    let mut all: Vec<PathBuf> = std::fs::read_dir(&kdir).unwrap().filter_map(|e| e.ok().map(|e| e.path())).collect();
    all.sort();
    all.push(manifest.join("build.rs"));
    for p in all {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&std::fs::read(&p).unwrap_or_default(), &mut h);
        stamp.push_str(&format!("{} {:x}\n", p.display(), std::hash::Hasher::finish(&h)));
    }
    let stamp_path = out.join("kernels.stamp");
    if std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) && out.join("kernels.rs").is_file() {
        return;
    }
    let _ = std::fs::remove_file(&stamp_path);

    // Every (file, target) pair is one nvcc run; run them on all cores.
    let mut jobs: Vec<(PathBuf, Option<(&str, &str)>)> = Vec::new();
    for src in &sources {
        jobs.push((src.clone(), None));
        for t in CUBIN_TARGETS {
            jobs.push((src.clone(), Some(*t)));
        }
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(jobs.len());
    let queue = std::sync::Mutex::new(jobs.into_iter().enumerate().collect::<Vec<_>>());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let job = queue.lock().unwrap().pop();
                let Some((i, (src, target))) = job else { break };
                let r = compile(&nvcc, &kdir, &out, &src, target);
                results.lock().unwrap().push((i, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);
    let mut report = String::from("# kernel\tarch\tregisters\tspill_stores\tspill_loads\tstack_frame\tsmem\n");
    let mut failures = Vec::new();
    for (_, r) in results {
        match r {
            Ok(Some(rows)) => report.push_str(&rows),
            Ok(None) => {}
            Err(e) => failures.push(e),
        }
    }
    if !failures.is_empty() {
        panic!("\n\nnvcc failed:\n{}\n", failures.join("\n"));
    }
    std::fs::write(out.join("ptxas_report.tsv"), &report).unwrap();

    let mut gen = String::from(
        "/// The kernel images compiled from `kernels/*.cu` by build.rs.\n\
         pub const MODULES: &[EmbeddedModule] = &[\n",
    );
    for src in &sources {
        let stem = src.file_stem().unwrap().to_str().unwrap();
        let ptx = out.join(format!("{stem}.ptx"));
        let (entries, signatures): (Vec<String>, Vec<String>) =
            ptx_entries(&std::fs::read_to_string(&ptx).unwrap()).into_iter().unzip();
        gen.push_str(&format!(
            "    EmbeddedModule {{\n        name: {stem:?},\n        ptx: include_str!({:?}),\n        \
             cubin_sm80: include_bytes!({:?}),\n        cubin_sm90a: include_bytes!({:?}),\n        \
             kernels: &{entries:?},\n        signatures: &{signatures:?},\n    }},\n",
            ptx.display().to_string(),
            out.join(format!("{stem}.sm_80.cubin")).display().to_string(),
            out.join(format!("{stem}.sm_90a.cubin")).display().to_string(),
        ));
    }
    gen.push_str("];\n\n");
    gen.push_str(&format!(
        "/// `ptxas -v` for every kernel and target, one tab-separated row each:\n\
         /// `kernel arch registers spill_stores spill_loads stack_frame smem` (bytes).\n\
         pub const PTXAS_REPORT: &str = include_str!({:?});\n",
        out.join("ptxas_report.tsv").display().to_string()
    ));
    std::fs::write(out.join("kernels.rs"), gen).unwrap();
    std::fs::write(stamp_path, stamp).unwrap();
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let ok = |p: &Path| p.is_file();
    if let Some(p) = std::env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if !ok(&p) {
            panic!("\n\nNVCC={} is not a file. Unset it, or install nvcc 13.0 with:\n\n    bash scripts/setup-cuda.sh\n\n", p.display());
        }
        return Some(p);
    }
    if let Some(h) = std::env::var_os("CUDA_HOME") {
        let p = PathBuf::from(h).join("bin/nvcc");
        if ok(&p) {
            return Some(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if ok(&p) {
                return Some(p);
            }
        }
    }
    let p = manifest.join(".cuda/bin/nvcc");
    ok(&p).then_some(p)
}

/// Compiles `src` to PTX (`target == None`) or to a cubin, returning the ptxas report rows.
fn compile(
    nvcc: &Path,
    kdir: &Path,
    out: &Path,
    src: &Path,
    target: Option<(&str, &str)>,
) -> Result<Option<String>, String> {
    let stem = src.file_stem().unwrap().to_str().unwrap();
    let mut cmd = Command::new(nvcc);
    cmd.arg("-std=c++17").arg("-O3").arg("-lineinfo").arg("-I").arg(kdir);
    if let Ok(extra) = std::env::var("WEGEFT_NVCC_FLAGS") {
        cmd.args(extra.split_whitespace());
    }
    let dest = match target {
        None => {
            cmd.arg("-ptx").arg("-arch=compute_80");
            out.join(format!("{stem}.ptx"))
        }
        Some((label, gencode)) => {
            cmd.arg("-cubin").arg("-gencode").arg(gencode).arg("-Xptxas").arg("-v");
            out.join(format!("{stem}.{label}.cubin"))
        }
    };
    cmd.arg("-o").arg(&dest).arg(src);
    let output = cmd.output().map_err(|e| format!("{}: cannot run {}: {e}", src.display(), nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("{:?}\n{}{}", cmd, String::from_utf8_lossy(&output.stdout), stderr));
    }
    Ok(target.map(|(label, _)| parse_ptxas(&stderr, label)))
}

/// Turns `ptxas -v` output into report rows. The lines for one entry look like:
///
/// ```text
/// ptxas info    : Compiling entry function 'k' for 'sm_90a'
/// ptxas info    : Function properties for k
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 10 registers, used 0 barriers, 372 bytes cmem[0], 8 bytes smem
/// ```
fn parse_ptxas(text: &str, arch: &str) -> String {
    #[derive(Default)]
    struct Entry {
        name: String,
        regs: u64,
        stores: u64,
        loads: u64,
        stack: u64,
        smem: u64,
    }
    fn num_before(line: &str, unit: &str) -> Option<u64> {
        let i = line.find(unit)?;
        line[..i].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
    }
    let mut rows = String::new();
    let mut cur: Option<Entry> = None;
    let flush = |e: Option<Entry>, rows: &mut String| {
        if let Some(e) = e {
            rows.push_str(&format!("{}\t{arch}\t{}\t{}\t{}\t{}\t{}\n", e.name, e.regs, e.stores, e.loads, e.stack, e.smem));
        }
    };
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            flush(cur.take(), &mut rows);
            let name = rest.split('\'').next().unwrap_or("").to_string();
            cur = Some(Entry { name, ..Default::default() });
        } else if let Some(e) = cur.as_mut() {
            if line.contains("bytes stack frame") {
                e.stack = e.stack.max(num_before(line, "bytes stack frame").unwrap_or(0));
                e.stores = e.stores.max(num_before(line, "bytes spill stores").unwrap_or(0));
                e.loads = e.loads.max(num_before(line, "bytes spill loads").unwrap_or(0));
            } else if line.contains("Used ") && line.contains("registers") {
                e.regs = num_before(line, "registers").unwrap_or(0);
                e.smem = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    flush(cur.take(), &mut rows);
    rows
}

/// The `.entry` functions of a PTX file: each name with its parameter types in order
/// (`"u64,u32,f32"`, PTX's spelling: pointers and 64-bit integers are `u64`).
fn ptx_entries(ptx: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = ptx.lines().map(str::trim);
    while let Some(l) = lines.next() {
        let Some(i) = l.find(".entry ") else { continue };
        let name = l[i + 7..].split(|c: char| c == '(' || c.is_whitespace()).next().unwrap_or("");
        if name.is_empty() {
            continue;
        }
        // `.entry name(` then one `.param .TYPE name_param_N,` per line up to `)`; a kernel
        // without parameters is `.entry name()`.
        let mut params = Vec::new();
        if !l.ends_with("()") {
            for p in lines.by_ref() {
                if let Some(rest) = p.strip_prefix(".param ") {
                    let ty = rest.split_whitespace().take_while(|t| !t.contains("_param_")).collect::<Vec<_>>();
                    params.push(ty.join(" ").replace('.', ""));
                }
                if p.starts_with(')') || p.ends_with(')') {
                    break;
                }
            }
        }
        out.push((name.to_string(), params.join(",")));
    }
    out
}
