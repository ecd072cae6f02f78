//! The CUDA device: driver check, context, default stream, the embedded kernel modules and the
//! lazily created cuBLASLt handle.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUstream};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::arg::{self, KArg};
use super::kernels::{self, EmbeddedModule};
use crate::error::{Error, Result};

/// Which compiled image of the kernels a device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    /// The `sm_90a` cubin (compute capability 9.0).
    Sm90a,
    /// The `sm_80` cubin (compute capability 8.x).
    Sm80,
    /// The `compute_80` PTX, JIT-compiled by the driver (any other card of capability >= 8.0).
    Ptx,
}

/// What runs the rank-r products of the layers (`u = x psi^T`, `C = s W phi`, `v = G C`,
/// `S = G^T u`, `dphi`, `dpsi`, the rank-r halves of the composed forward and `dx`, merge and
/// unmerge): skinny GEMMs that are memory-bound on a large layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProductEngine {
    /// cuBLASLt wherever it takes the operands: every product but a masked one (dropout on
    /// W) and one with an f32 operand beside 16-bit ones (f16 `dphi`, whose `S` is f32; the
    /// bf16 `dphi` runs as two bf16 products, `S` split into a high and a low bf16 part;
    /// unmerge's `P Z`); the tile kernels for those.
    #[default]
    CublasLt = 0,
    /// The tile kernels of `kernels/lowrank.cu` and `merge.cu` for every product.
    Tiles = 1,
}

/// One CUDA device with its context, a default stream and the loaded `wegeft` kernels.
///
/// Every launcher of the crate takes a `&CudaBackend`. Work goes on the stream a call is given
/// or, without one, on [`CudaBackend::stream`].
pub struct CudaBackend {
    // Dropped first, while the context is still alive.
    pub(crate) blas: OnceLock<std::result::Result<super::blas::Lt, String>>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    image: Image,
    cc: (i32, i32),
    sm_count: u32,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, Kernel>>,
    pub(crate) tuned: super::tune::TuneTable,
    /// Kernel launches and cuBLASLt matmuls enqueued so far ([`CudaBackend::launch_count`]).
    launches: std::sync::atomic::AtomicU64,
    /// [`ProductEngine`] as its index (0: cuBLASLt, 1: tiles).
    engine: std::sync::atomic::AtomicU8,
}

/// A loaded kernel with its name and parameter types (see [`super::arg`]).
#[derive(Clone, Debug)]
pub(crate) struct Kernel {
    pub(crate) func: CudaFunction,
    name: &'static str,
    signature: &'static str,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ctx.ordinal())
            .field("compute_capability", &self.cc)
            .field("sm_count", &self.sm_count)
            .field("image", &self.image)
            .finish()
    }
}

/// Maps a driver error of operation `op` to [`Error::Cuda`].
pub(crate) fn cuda_err(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda { op, msg: e.to_string() }
}

/// Whether a CUDA driver library can be loaded on this machine (no device is touched).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl CudaBackend {
    /// Opens device `ordinal`: checks that the driver is present and the device exists
    /// ([`Error::NoCuda`] otherwise), creates the context and picks the kernel image for the
    /// device's compute capability (`sm_90a` cubin on 9.0, `sm_80` cubin on 8.x, the PTX
    /// elsewhere). Modules are loaded on first use of one of their kernels. Raises the release
    /// threshold of the device's default memory pool to the maximum (per device: it applies to
    /// every user of that pool in the process), so that freed scratch stays cached.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(Error::NoCuda("no CUDA driver library (libcuda) found".into()));
        }
        let count = CudaContext::device_count().map_err(|e| Error::NoCuda(format!("cuInit / device count failed: {e}")))?;
        if count <= 0 {
            return Err(Error::NoCuda("the CUDA driver reports no device".into()));
        }
        if ordinal >= count as usize {
            return Err(Error::NoCuda(format!("device {ordinal} asked for, {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("cuCtxCreate"))?;
        let cc = ctx.compute_capability().map_err(cuda_err("compute capability"))?;
        if cc.0 < 8 {
            return Err(Error::NoCuda(format!(
                "device {ordinal} has compute capability {}.{}; wegeft needs 8.0 or newer",
                cc.0, cc.1
            )));
        }
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("multiprocessor count"))? as u32;
        let image = match cc {
            (9, 0) => Image::Sm90a,
            (8, _) => Image::Sm80,
            _ => Image::Ptx,
        };
        let image = match std::env::var("WEGEFT_CUDA_IMAGE").as_deref() {
            Ok("ptx") => Image::Ptx,
            _ => image,
        };
        // Scratch memory (split-K partials, cuBLASLt workspace) comes from the stream-ordered
        // pool; keep freed blocks in the pool instead of returning them to the driver at every
        // synchronisation, so steady-state calls allocate nothing.
        // SAFETY: plain driver calls on the device of the context just created.
        unsafe {
            let mut pool: cudarc::driver::sys::CUmemoryPool = std::ptr::null_mut();
            if cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                let mut threshold: u64 = u64::MAX;
                let _ = cudarc::driver::sys::cuMemPoolSetAttribute(
                    pool,
                    cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut c_void,
                );
            }
        }
        let stream = ctx.default_stream();
        Ok(CudaBackend {
            blas: OnceLock::new(),
            ctx,
            stream,
            image,
            cc,
            sm_count,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            tuned: Default::default(),
            launches: Default::default(),
            engine: Default::default(),
        })
    }

    /// Runs the rank-r products of later calls on `engine` (default [`ProductEngine::CublasLt`]).
    pub fn set_product_engine(&self, engine: ProductEngine) {
        self.engine.store(engine as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// The engine of the rank-r products.
    pub fn product_engine(&self) -> ProductEngine {
        match self.engine.load(std::sync::atomic::Ordering::Relaxed) {
            0 => ProductEngine::CublasLt,
            _ => ProductEngine::Tiles,
        }
    }

    /// How many kernel launches and cuBLASLt matmuls this backend has enqueued since it was
    /// created (memory copies and sets not counted): the host's share of a step is about this
    /// many launch overheads (a few microseconds each), which is what capturing the step in a
    /// CUDA graph would save.
    pub fn launch_count(&self) -> u64 {
        self.launches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts one enqueued launch (see [`CudaBackend::launch_count`]).
    pub(crate) fn count_launch(&self) {
        self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The driver context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream used when a call is given none.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }
    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    /// Blocks of `threads` for a grid-stride kernel over `n` elements: one element per thread,
    /// at least 1 block and at most 16 per SM.
    pub(crate) fn grid_stride_blocks(&self, n: usize, threads: u32) -> u32 {
        n.div_ceil(threads as usize).clamp(1, self.sm_count as usize * 16) as u32
    }
    /// Which compiled image the kernels are loaded from.
    pub fn image(&self) -> Image {
        self.image
    }
    /// The device name, as the driver reports it.
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(cuda_err("device name"))
    }
    /// `n` zeroed elements of `T` on the default stream. A size whose bytes overflow, or more
    /// than the device can give (`CUDA_ERROR_OUT_OF_MEMORY`), is an [`Error::Cuda`] naming the
    /// bytes asked for; the device stays usable.
    pub fn alloc_zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<cudarc::driver::CudaSlice<T>> {
        let bytes = n.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| Error::Cuda {
            op: "alloc_zeros",
            msg: format!("{n} elements of {} bytes overflow usize", std::mem::size_of::<T>()),
        })?;
        self.ctx.bind_to_thread().map_err(cuda_err("alloc_zeros"))?;
        self.stream
            .alloc_zeros::<T>(n)
            .map_err(|e| Error::Cuda { op: "alloc_zeros", msg: format!("{bytes} bytes: {e}") })
    }
    /// Waits for all work on the default stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("stream synchronize"))
    }

    fn module(&self, m: &'static EmbeddedModule) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(md) = mods.get(m.name) {
            return Ok(md.clone());
        }
        let ptx = match self.image {
            Image::Sm90a => Ptx::from_binary(m.cubin_sm90a.to_vec()),
            Image::Sm80 => Ptx::from_binary(m.cubin_sm80.to_vec()),
            Image::Ptx => Ptx::from_src(m.ptx),
        };
        let md = self.ctx.load_module(ptx).map_err(|e| Error::Cuda {
            op: "cuModuleLoadData",
            msg: format!("module {} ({:?} image): {e}", m.name, self.image),
        })?;
        mods.insert(m.name, md.clone());
        Ok(md)
    }

    /// The kernel `name` (an `extern "C"` function of one of the `kernels/*.cu` files), from
    /// the image for this device; modules are loaded and functions looked up once, then cached.
    pub(crate) fn function(&self, name: &str) -> Result<Kernel> {
        if let Some(f) = self.functions.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(f.clone());
        }
        let (m, i) = kernels::lookup(name)
            .ok_or_else(|| Error::Cuda { op: "kernel lookup", msg: format!("no kernel named {name} is compiled in") })?;
        let func = self.module(m)?.load_function(name).map_err(|e| Error::Cuda {
            op: "cuModuleGetFunction",
            msg: format!("{name}: {e}"),
        })?;
        let k = Kernel { func, name: m.kernels[i], signature: m.signatures[i] };
        self.functions.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), k.clone());
        Ok(k)
    }

    /// Whether a kernel of this name is compiled in.
    pub fn has_kernel(&self, name: &str) -> bool {
        kernels::module_of(name).is_some()
    }

    /// Launches kernel `k` on the raw `stream` with arguments `args` (in the kernel's
    /// parameter order). Their number and types are checked against the kernel's signature
    /// first (an [`Error::Cuda`] naming the parameter, nothing launched).
    ///
    /// # Safety
    /// Every device pointer among `args` must be valid for what the kernel does with it, and
    /// `stream` must belong to this context.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn launch(
        &self,
        op: &'static str,
        k: &Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        stream: CUstream,
        args: &[KArg],
    ) -> Result<()> {
        unsafe { self.launch_as(op, k, (grid, block, smem), stream, args, false) }
    }

    /// [`CudaBackend::launch`], or with `dependent` as a programmatic dependent of the kernel
    /// launched before it on `stream` (`cuLaunchKernelEx` with the launch attribute
    /// `PROGRAMMATIC_STREAM_SERIALIZATION`): its blocks may then start once that kernel's
    /// blocks have all run `griddepcontrol.launch_dependents`, so the kernel must run
    /// `griddepcontrol.wait` before it reads anything the earlier one writes (the `_tma` GEMM
    /// kernels do, before their second operand pair).
    ///
    /// # Safety
    /// As for [`CudaBackend::launch`]; with `dependent`, `k` must wait as said above.
    pub(crate) unsafe fn launch_as(
        &self,
        op: &'static str,
        k: &Kernel,
        (grid, block, smem): ((u32, u32, u32), (u32, u32, u32), u32),
        stream: CUstream,
        args: &[KArg],
        dependent: bool,
    ) -> Result<()> {
        use cudarc::driver::sys;
        let mut params = arg::check(k.name, k.signature, args)?;
        self.ctx.bind_to_thread().map_err(cuda_err(op))?;
        self.count_launch();
        let how = if dependent { " (dependent launch)" } else { "" };
        let failed = |e: cudarc::driver::DriverError| Error::Cuda { op, msg: format!("{}{how} with grid {grid:?} block {block:?}: {e}", k.name) };
        if !dependent {
            // SAFETY: the arguments match the kernel's parameters in number and type (checked
            // above); the caller vouches for the pointers and the stream.
            return unsafe { cudarc::driver::result::launch_kernel(k.func.cu_function(), grid, block, smem, stream, &mut params) }
                .map_err(failed);
        }
        let mut value = sys::CUlaunchAttributeValue { pad: [0; 64] };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: smem,
            hStream: stream,
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as above; `config` and the attribute it points to outlive the call.
        unsafe { sys::cuLaunchKernelEx(&config, k.func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()).result() }.map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn backend_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::CudaBackend>();
    }
}
