//! The C ABI from C and from Python: `include/wegeft.h` against the exports of `libwegeft.so`
//! (the crate's `cdylib`, built by cargo next to this test) and against `src/capi.rs`; then
//! `tests/c/test_wegeft.c` and `examples/c/wegeft_example.c`, compiled with the system C
//! compiler (`cc`, or `$CC`), linked against the library, and run: the CPU path on every layer
//! fixture (written to a flat binary file the C program reads), the error paths, and the CUDA
//! entry points' clean failure where there is no GPU. The ctypes bindings
//! (`examples/python/wegeft.py`) run the same fixtures through `examples/python/test_wegeft.py`
//! (`python3`, or `$PYTHON`; standard library only).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `libwegeft.so` cargo built with this test: `target/<profile>/deps/` holds it (cargo
/// builds the library with all its crate types when a test depends on it).
fn library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        let p = dir.join("libwegeft.so");
        if p.is_file() {
            return p;
        }
    }
    panic!("libwegeft.so not found next to {} (the cdylib crate type is missing?)", exe.display());
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wegeft-c-abi-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs a C program against `lib`: cargo's LD_LIBRARY_PATH for tests lists `target/<profile>`,
/// where an older `cargo build` may have left another `libwegeft.so` (the rpath would lose).
fn run_c(exe: &Path, args: &[&str], lib: &Path) -> (bool, String, String) {
    run(Command::new(exe).args(args).env("LD_LIBRARY_PATH", lib.parent().unwrap()))
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Compiles C sources with the system compiler, strict warnings as errors, linked against
/// `lib` (with an rpath to it).
fn compile(sources: &[PathBuf], out: &Path, lib: &Path) {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let libdir = lib.parent().unwrap();
    let mut cmd = Command::new(&cc);
    cmd.args(["-std=c11", "-O1", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-Wno-unused-function"])
        .arg("-I")
        .arg(root().join("include"))
        .args(sources)
        .arg("-o")
        .arg(out)
        .arg("-L")
        .arg(libdir)
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .args(["-lwegeft", "-ldl", "-lm"]);
    let (ok, so, se) = run(&mut cmd);
    assert!(ok, "{cc} failed: {cmd:?}\n{so}\n{se}");
}

// ---- the header against the library and src/capi.rs ------------------------------------------

/// `name -> [(type, param name)] and the return type`, from the header's prototypes.
fn header_functions() -> BTreeMap<String, (String, Vec<(String, String)>)> {
    let text = std::fs::read_to_string(root().join("include/wegeft.h")).unwrap();
    // Strip comments and preprocessor lines.
    let mut code = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("/*") {
        code.push_str(&rest[..i]);
        let j = rest[i..].find("*/").expect("unterminated comment") + i + 2;
        rest = &rest[j..];
    }
    code.push_str(rest);
    let code: String = code.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join(" ");
    let mut out = BTreeMap::new();
    for decl in code.split(';') {
        let decl = decl.split_whitespace().collect::<Vec<_>>().join(" ");
        let Some(open) = decl.find("wegeft_").filter(|_| decl.contains('(') && !decl.contains("typedef")) else {
            continue;
        };
        let paren = decl.find('(').unwrap();
        if paren < open {
            continue;
        }
        let ret = decl[..open].trim().trim_start_matches("extern \"C\" {").trim().to_string();
        let name = decl[open..paren].trim().to_string();
        let params = decl[paren + 1..decl.rfind(')').unwrap()].trim();
        let params = if params == "void" {
            vec![]
        } else {
            params
                .split(',')
                .map(|p| {
                    let p = p.trim();
                    let cut = p.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap() + 1;
                    (norm_c(&p[..cut]), p[cut..].to_string())
                })
                .collect()
        };
        assert!(out.insert(name.clone(), (norm_c(&ret), params)).is_none(), "{name} declared twice in the header");
    }
    out
}

/// `const void *` / `const void*` / `const  void *` -> `const void *`.
fn norm_c(t: &str) -> String {
    t.replace('*', " * ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The C spelling of a Rust FFI type of src/capi.rs.
fn c_of_rust(t: &str) -> String {
    let t = t.trim();
    if let Some(inner) = t.strip_prefix("*const ") {
        return norm_c(&format!("const {} *", c_of_rust(inner)));
    }
    if let Some(inner) = t.strip_prefix("*mut ") {
        return norm_c(&format!("{} *", c_of_rust(inner)));
    }
    match t {
        "c_int" => "int",
        "usize" => "size_t",
        "f32" => "float",
        "u64" | "WegeftDevicePtr" => "uint64_t",
        "i32" => "int32_t",
        "c_void" => "void",
        "c_char" => "char",
        "WegeftShape" => "wegeft_shape",
        "WegeftConstMat" => "wegeft_const_mat",
        "WegeftMat" => "wegeft_mat",
        "WegeftCuda" => "wegeft_cuda",
        other => panic!("src/capi.rs: no C spelling for the Rust type `{other}`"),
    }
    .to_string()
}

/// The same map from src/capi.rs's `extern "C" fn`s.
fn rust_functions() -> BTreeMap<String, (String, Vec<(String, String)>)> {
    let text = std::fs::read_to_string(root().join("src/capi.rs")).unwrap();
    let mut out = BTreeMap::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("extern \"C\" fn ") {
        let decl = &rest[i + "extern \"C\" fn ".len()..];
        let paren = decl.find('(').unwrap();
        let name = decl[..paren].to_string();
        let close = decl.find(')').unwrap();
        let params: Vec<(String, String)> = decl[paren + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (n, t) = p.split_once(':').unwrap();
                (c_of_rust(t), n.trim().to_string())
            })
            .collect();
        let after = decl[close + 1..].trim_start();
        let ret = after.strip_prefix("->").map(|r| r.split('{').next().unwrap().trim()).unwrap_or("void");
        let ret = if ret == "void" { "void".to_string() } else { c_of_rust(ret) };
        rest = &decl[close..];
        assert!(out.insert(name.clone(), (ret, params)).is_none(), "{name} defined twice in src/capi.rs");
    }
    assert!(!out.is_empty());
    out
}

#[test]
fn header_matches_the_exports_and_the_rust_signatures() {
    let header = header_functions();
    let rust = rust_functions();
    assert_eq!(header.keys().collect::<Vec<_>>(), rust.keys().collect::<Vec<_>>(), "functions: header vs src/capi.rs");
    for (name, h) in &header {
        assert_eq!(h, &rust[name], "{name}: header (left) vs src/capi.rs (right)");
    }
    // The library's dynamic symbol table: exactly the header's functions.
    let lib = library();
    let (ok, nm, err) = run(Command::new("nm").args(["-D", "--defined-only"]).arg(&lib));
    assert!(ok, "nm -D {}: {err}", lib.display());
    let exported: Vec<String> = nm
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[1] == "T" && f[2].starts_with("wegeft")).then(|| f[2].to_string())
        })
        .collect();
    assert_eq!(exported, header.keys().cloned().collect::<Vec<_>>(), "nm -D {} vs include/wegeft.h", lib.display());
    println!("{} functions: header = src/capi.rs = exports of {}", header.len(), lib.display());
}

// ---- the C programs ------------------------------------------------------------------------------

/// Writes a fixture case as the flat file test_wegeft.c reads (see its header comment).
fn write_fixture(case: &common::LayerCase, path: &Path) {
    let f = common::load_f64(&case.file);
    let get = |k: &str| -> &Vec<f64> {
        &f.get(&format!("layer.{k}")).unwrap_or_else(|| panic!("{}: no layer.{k}", case.file)).1
    };
    let (t, din, dout, r) = (case.t, case.d_in, case.d_out, case.rank);
    // phi = in_proj^T (d_in x r), psi = out_proj^T (r x d_in); their gradients likewise.
    let arrays: Vec<Vec<f64>> = vec![
        get("x").clone(),
        get("W").clone(),
        get("b").clone(),
        common::t(get("in_proj"), r, din),
        common::t(get("out_proj"), din, r),
        get("G").clone(),
        get("y").clone(),
        get("dx").clone(),
        common::t(get("d_in_proj"), r, din),
        common::t(get("d_out_proj"), din, r),
        get("W_merged").clone(),
    ];
    let sizes =
        [t * din, dout * din, dout, din * r, r * din, t * dout, t * dout, t * din, din * r, r * din, dout * din];
    let mut bytes = b"WGFT".to_vec();
    for d in [t, din, dout, r] {
        bytes.extend((d as u64).to_le_bytes());
    }
    for (a, n) in arrays.iter().zip(sizes) {
        assert_eq!(a.len(), n, "{}", case.file);
        bytes.extend(a.iter().flat_map(|&v| (v as f32).to_le_bytes()));
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn c_program_on_the_fixtures_and_error_paths() {
    let lib = library();
    let dir = tmpdir("test");
    let exe = dir.join("test_wegeft");
    compile(&[root().join("tests/c/test_wegeft.c")], &exe, &lib);
    let abi = format!(
        "abi shape={} const_mat={} mat={}",
        std::mem::size_of::<wegeft::capi::WegeftShape>(),
        std::mem::size_of::<wegeft::capi::WegeftConstMat>(),
        std::mem::size_of::<wegeft::capi::WegeftMat>()
    );
    for case in common::layer_cases() {
        let bin = dir.join(format!("{}.bin", case.file));
        write_fixture(&case, &bin);
        let (ok, out, err) = run_c(&exe, &["cpu", bin.to_str().unwrap()], &lib);
        println!("{}:\n{out}{err}", case.file);
        assert!(ok, "test_wegeft cpu {} failed:\n{out}\n{err}", case.file);
        assert!(out.contains(&abi), "C struct sizes differ from Rust's ({abi}):\n{out}");
        assert!(out.contains("ok: "), "{out}");
    }
    // The CUDA mode: passes on a GPU, else fails cleanly with a reason (never a crash).
    let (ok, out, err) = run_c(&exe, &["cuda"], &lib);
    println!("test_wegeft cuda:\n{out}{err}");
    if !ok {
        let clean = ["built without CUDA", "no CUDA driver", "no CUDA device", "WEGEFT_ERR_NO_CUDA"];
        assert!(clean.iter().any(|m| err.contains(m)), "test_wegeft cuda failed without a clean reason:\n{out}\n{err}");
        if std::env::var_os("WEGEFT_REQUIRE_GPU").is_some_and(|v| v == "1") {
            panic!("WEGEFT_REQUIRE_GPU=1 but test_wegeft cuda did not run: {err}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The ctypes bindings' prototypes against the library: every fixture in f32 and bf16 storage
/// (forward with and without bias, backward saved / recomputed / accumulating, merge, unmerge),
/// the error paths as `WegeftError`s, and a CUDA handle (or its clean absence).
#[test]
fn python_bindings_on_the_fixtures_and_error_paths() {
    let lib = library();
    let dir = tmpdir("python");
    let mut cmd = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()));
    cmd.arg(root().join("examples/python/test_wegeft.py")).arg("--lib").arg(&lib);
    if std::env::var_os("WEGEFT_REQUIRE_GPU").is_some_and(|v| v == "1") {
        cmd.arg("--require-gpu");
    }
    for case in common::layer_cases() {
        let bin = dir.join(format!("{}.bin", case.file));
        write_fixture(&case, &bin);
        cmd.arg(bin);
    }
    let (ok, out, err) = run(&mut cmd);
    println!("{out}{err}");
    assert!(ok && out.contains("ok: "), "examples/python/test_wegeft.py failed:\n{out}\n{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn c_example_builds_and_runs() {
    let lib = library();
    let dir = tmpdir("example");
    let exe = dir.join("wegeft_example");
    compile(&[root().join("examples/c/wegeft_example.c")], &exe, &lib);
    let (ok, out, err) = run_c(&exe, &[], &lib);
    println!("{out}{err}");
    assert!(ok, "examples/c/wegeft_example failed:\n{out}\n{err}");
    assert!(out.contains("max |y - y_merged| ="), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

/// f16 (which the C program does not cover) and bf16 through the ABI from Rust: bit-identical to
/// `cpu::wegeft_forward` / `_backward` / `_merge` called directly, with strided `x`.
#[test]
fn half_dtypes_through_the_abi_equal_the_cpu_layer() {
    use wegeft::capi::*;
    use wegeft::{cpu, Element, LayerShape, Mat, MatMut};
    fn case<T: Element + PartialEq>(code: std::ffi::c_int) {
        let (t, din, dout, r, ld) = (9usize, 24usize, 20usize, 4usize, 27usize);
        let v = |seed: u64, n: usize| -> Vec<T> {
            common::rand_vec(seed, n).iter().map(|&x| T::from_f32(x as f32 * 0.5)).collect()
        };
        let (x, w, b, phi, psi, g) =
            (v(1, t * ld), v(2, dout * din), v(3, dout), v(4, din * r), v(5, r * din), v(6, t * dout));
        let sh = WegeftShape { tokens: t, d_in: din, d_out: dout, rank: r };
        let cm = |d: &[T], ld: usize| WegeftConstMat { data: d.as_ptr().cast(), len: d.len(), ld };
        let (mut y, mut dx) = (vec![T::default(); t * dout], vec![T::default(); t * din]);
        let (mut dphi, mut dpsi) = (vec![0f32; din * r], vec![0f32; r * din]);
        let mut wm = w.clone();
        unsafe {
            let ym = WegeftMat { data: y.as_mut_ptr().cast(), len: y.len(), ld: 0 };
            let st = wegeft_cpu_forward(
                code,
                sh,
                cm(&x, ld),
                cm(&w, 0),
                b.as_ptr().cast(),
                dout,
                cm(&phi, 0),
                cm(&psi, 0),
                0.75,
                ym,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                0,
            );
            assert_eq!(st, WEGEFT_OK);
            let dxm = WegeftMat { data: dx.as_mut_ptr().cast(), len: dx.len(), ld: 0 };
            let st = wegeft_cpu_backward(
                code,
                sh,
                cm(&x, ld),
                cm(&w, 0),
                cm(&phi, 0),
                cm(&psi, 0),
                0.75,
                std::ptr::null(),
                0,
                std::ptr::null(),
                0,
                cm(&g, 0),
                dxm,
                dphi.as_mut_ptr(),
                dphi.len(),
                dpsi.as_mut_ptr(),
                dpsi.len(),
            );
            assert_eq!(st, WEGEFT_OK);
            let wmm = WegeftMat { data: wm.as_mut_ptr().cast(), len: wm.len(), ld: 0 };
            assert_eq!(wegeft_cpu_merge(code, sh, wmm, cm(&phi, 0), cm(&psi, 0), 0.75), WEGEFT_OK);
        }
        let s = LayerShape::new(t, din, dout, r).unwrap();
        fn m<'a, T>(n: &'static str, d: &'a [T], r: usize, c: usize) -> Mat<'a, T> {
            Mat::new(n, d, r, c).unwrap()
        }
        let xs = Mat::strided("x", &x, t, din, ld).unwrap();
        let (mut y2, mut dx2) = (vec![T::default(); t * dout], vec![T::default(); t * din]);
        let (mut dphi2, mut dpsi2) = (vec![0f32; din * r], vec![0f32; r * din]);
        cpu::wegeft_forward(
            &s,
            xs,
            m("W", &w, dout, din),
            Some(&b),
            m("phi", &phi, din, r),
            m("psi", &psi, r, din),
            0.75,
            MatMut::new("y", &mut y2, t, dout).unwrap(),
        )
        .unwrap();
        cpu::wegeft_backward(
            &s,
            xs,
            m("W", &w, dout, din),
            m("phi", &phi, din, r),
            m("psi", &psi, r, din),
            0.75,
            None,
            m("G", &g, t, dout),
            Some(MatMut::new("dx", &mut dx2, t, din).unwrap()),
            &mut dphi2,
            &mut dpsi2,
        )
        .unwrap();
        let mut wm2 = w.clone();
        cpu::wegeft_merge(
            &s,
            MatMut::new("W", &mut wm2, dout, din).unwrap(),
            m("phi", &phi, din, r),
            m("psi", &psi, r, din),
            0.75,
        )
        .unwrap();
        assert!(
            y == y2 && dx == dx2 && dphi == dphi2 && dpsi == dpsi2 && wm == wm2,
            "{:?}: ABI and cpu:: differ",
            T::DTYPE
        );
        assert!(y.iter().any(|e| e.to_f32() != 0.0));
    }
    case::<half::f16>(WEGEFT_F16);
    case::<half::bf16>(WEGEFT_BF16);
    case::<f32>(WEGEFT_F32);
}

/// `wegeft_cpu_multi_forward` in each storage type: every token's row equals its own adapter's
/// single-adapter layer (`cpu::wegeft_forward`, or the frozen layer for `-1`) within the type's
/// rounding, with a strided `x`; then the error paths (a bad index, a NaN scale, a short stack,
/// NULL pointers, `y` overlapping `x`) are statuses with messages naming the argument.
#[test]
fn multi_adapter_forward_through_the_abi() {
    use wegeft::capi::*;
    use wegeft::{cpu, Element, LayerShape, Mat, MatMut};
    fn case<T: Element>(code: std::ffi::c_int) {
        let (t, din, dout, r, n_ad, ld) = (11usize, 24usize, 20usize, 4usize, 3usize, 27usize);
        let v = |seed: u64, n: usize| -> Vec<T> {
            common::rand_vec(seed, n).iter().map(|&x| T::from_f32(x as f32 * 0.5)).collect()
        };
        let (x, w, b, phi, psi) = (v(1, t * ld), v(2, dout * din), v(3, dout), v(4, n_ad * din * r), v(5, n_ad * r * din));
        let scales = [0.5f32, 1.0, 2.0];
        let idx: Vec<i32> = (0..t).map(|i| [2, -1, 0, 1, 1][i % 5]).collect();
        let sh = WegeftShape { tokens: t, d_in: din, d_out: dout, rank: r };
        let cm = |d: &[T], ld: usize| WegeftConstMat { data: d.as_ptr().cast(), len: d.len(), ld };
        let mut y = vec![T::from_f32(f32::NAN); t * dout];
        let call = |y: &mut [T], idx: &[i32], scales: &[f32], phi_len: usize, phi_ptr: *const T| unsafe {
            let ym = WegeftMat { data: y.as_mut_ptr().cast(), len: y.len(), ld: 0 };
            wegeft_cpu_multi_forward(
                code,
                sh,
                n_ad,
                cm(&x, ld),
                cm(&w, 0),
                b.as_ptr().cast(),
                dout,
                phi_ptr.cast(),
                phi_len,
                psi.as_ptr().cast(),
                psi.len(),
                scales.as_ptr(),
                scales.len(),
                idx.as_ptr(),
                idx.len(),
                ym,
            )
        };
        assert_eq!(call(&mut y, &idx, &scales, phi.len(), phi.as_ptr()), WEGEFT_OK, "{}", last_error());
        let one = LayerShape::new(1, din, dout, r).unwrap();
        let tol = T::tolerance() * 4.0;
        for (tk, &a) in idx.iter().enumerate() {
            let xt = Mat::new("x", &x[tk * ld..tk * ld + din], 1, din).unwrap();
            let mut want = vec![T::default(); dout];
            let wm = Mat::new("W", &w, dout, din).unwrap();
            if a < 0 {
                cpu::frozen_forward(xt, wm, Some(&b), MatMut::new("y", &mut want, 1, dout).unwrap()).unwrap();
            } else {
                let a = a as usize;
                let p = Mat::new("phi", &phi[a * din * r..(a + 1) * din * r], din, r).unwrap();
                let q = Mat::new("psi", &psi[a * r * din..(a + 1) * r * din], r, din).unwrap();
                cpu::wegeft_forward(&one, xt, wm, Some(&b), p, q, scales[a], MatMut::new("y", &mut want, 1, dout).unwrap())
                    .unwrap();
            }
            let got = &y[tk * dout..(tk + 1) * dout];
            let scale = want.iter().map(|e| e.to_f32().abs()).fold(1e-6f32, f32::max) as f64;
            for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                let d = (g.to_f32() - e.to_f32()).abs() as f64;
                assert!(d <= tol * scale, "{:?} token {tk} (adapter {a}) y[{j}]: {} vs {}", T::DTYPE, g.to_f32(), e.to_f32());
            }
        }
        // Error paths.
        let fails = |st: std::ffi::c_int, status: std::ffi::c_int, needle: &str| {
            let msg = last_error();
            assert!(st == status && msg.contains(needle), "{:?}: status {st}, want {status} with {needle:?}: {msg}", T::DTYPE);
        };
        let mut bad = idx.clone();
        bad[4] = 3;
        fails(call(&mut y, &bad, &scales, phi.len(), phi.as_ptr()), WEGEFT_ERR_INVALID, "adapter");
        fails(call(&mut y, &idx, &[0.5, f32::NAN, 1.0], phi.len(), phi.as_ptr()), WEGEFT_ERR_INVALID, "scale");
        fails(call(&mut y, &idx, &scales, phi.len() - 1, phi.as_ptr()), WEGEFT_ERR_INVALID, "phi");
        fails(call(&mut y, &idx, &scales, phi.len(), std::ptr::null()), WEGEFT_ERR_NULL, "phi");
        fails(call(&mut y, &idx[1..], &scales, phi.len(), phi.as_ptr()), WEGEFT_ERR_INVALID, "adapter_of_token");
        let st = unsafe {
            let ym = WegeftMat { data: x.as_ptr() as *mut std::ffi::c_void, len: t * dout, ld: 0 };
            wegeft_cpu_multi_forward(
                code, sh, n_ad, cm(&x, ld), cm(&w, 0), std::ptr::null(), 0, phi.as_ptr().cast(), phi.len(),
                psi.as_ptr().cast(), psi.len(), scales.as_ptr(), 3, idx.as_ptr(), t, ym,
            )
        };
        fails(st, WEGEFT_ERR_INVALID, "overlaps");
    }
    fn last_error() -> String {
        unsafe { std::ffi::CStr::from_ptr(wegeft::capi::wegeft_last_error()) }.to_string_lossy().into_owned()
    }
    case::<f32>(WEGEFT_F32);
    case::<half::bf16>(WEGEFT_BF16);
    case::<half::f16>(WEGEFT_F16);
}
