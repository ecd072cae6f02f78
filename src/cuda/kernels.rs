//! The kernels compiled from `kernels/*.cu` by `build.rs`, embedded in the library: PTX for
//! `compute_80` and cubins for `sm_80` and `sm_90a` of every file, and what `ptxas -v` said
//! about every kernel.

/// One compiled `kernels/NAME.cu`.
#[derive(Debug)]
pub struct EmbeddedModule {
    /// The file stem (`lowrank` for `kernels/lowrank.cu`).
    pub name: &'static str,
    /// PTX for `compute_80`: JIT-compiled by the driver on cards with no matching cubin.
    pub ptx: &'static str,
    /// SASS for `sm_80` (runs on every compute capability 8.x card).
    pub cubin_sm80: &'static [u8],
    /// SASS for `sm_90a` (compute capability 9.0: H100, H200).
    pub cubin_sm90a: &'static [u8],
    /// The `extern "C"` kernels (`.entry` functions) of the module.
    pub kernels: &'static [&'static str],
    /// Each kernel's parameter types, comma-separated, as the PTX declares them (`u64` for
    /// pointers and 64-bit integers, `u32`, `f32`); launches are checked against them.
    pub signatures: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The module that defines kernel `name`, if any.
pub fn module_of(name: &str) -> Option<&'static EmbeddedModule> {
    lookup(name).map(|(m, _)| m)
}

/// The parameter types of kernel `name` (see [`EmbeddedModule::signatures`]).
pub fn signature_of(name: &str) -> Option<&'static str> {
    lookup(name).map(|(m, i)| m.signatures[i])
}

/// The module that defines kernel `name` and the kernel's index in it.
pub fn lookup(name: &str) -> Option<(&'static EmbeddedModule, usize)> {
    MODULES.iter().find_map(|m| m.kernels.iter().position(|k| *k == name).map(|i| (m, i)))
}

/// One row of [`PTXAS_REPORT`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxasRow {
    pub kernel: String,
    pub arch: String,
    pub registers: u32,
    pub spill_stores: u64,
    pub spill_loads: u64,
    /// Bytes of local memory (stack frame) per thread.
    pub stack_frame: u64,
    /// Static shared memory in bytes.
    pub smem: u64,
}

/// Parses [`PTXAS_REPORT`] (rows of `kernel arch registers spill_stores spill_loads
/// stack_frame smem`, tab-separated; `#` starts a comment line).
pub fn ptxas_rows() -> crate::Result<Vec<PtxasRow>> {
    let mut rows = Vec::new();
    for (i, line) in PTXAS_REPORT.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let bad = || crate::Error::invalid("PTXAS_REPORT", format!("line {}: {line:?}", i + 1));
        if f.len() != 7 {
            return Err(bad());
        }
        let n = |s: &str| s.parse::<u64>().map_err(|_| bad());
        rows.push(PtxasRow {
            kernel: f[0].to_string(),
            arch: f[1].to_string(),
            registers: n(f[2])? as u32,
            spill_stores: n(f[3])?,
            spill_loads: n(f[4])?,
            stack_frame: n(f[5])?,
            smem: n(f[6])?,
        });
    }
    Ok(rows)
}
