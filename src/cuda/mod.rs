//! The CUDA backend (feature `cuda`). On the `gemm` branch this holds only the K-extended
//! GEMM launcher; the `cuda` branch brings the context, the kernel registry and the rest.

// Called by the layer launchers of the `cuda` branch; until they are merged nothing uses it.
#[allow(dead_code)]
pub(crate) mod gemm;
