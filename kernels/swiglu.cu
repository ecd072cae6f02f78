// SwiGLU, elementwise, f32 compute; gate and up stored as T (f32, or bf16 when the model keeps
// them in bf16 for the backward: see Backend::stash), dh and every output f32:
//   swiglu_fwd_T   h = silu(a) * up,  silu(a) = a sig(a),  sig(a) = 1 / (1 + e^-a)
//   swiglu_bwd_T   dgate = dh * up * sig(a) (1 + a (1 - sig(a))),  dup = dh * silu(a)
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void swiglu_fwd(const T* __restrict__ gate, const T* __restrict__ up, float* __restrict__ h, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float a = wegeft::to_f32(gate[i]);
        float sg = 1.0f / (1.0f + expf(-a));
        h[i] = a * sg * wegeft::to_f32(up[i]);
    }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd(const T* __restrict__ gate, const T* __restrict__ up, const float* __restrict__ dh,
                                           float* __restrict__ dgate, float* __restrict__ dup, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float a = wegeft::to_f32(gate[i]);
        float sg = 1.0f / (1.0f + expf(-a));
        float g = dh[i];
        dgate[i] = g * wegeft::to_f32(up[i]) * sg * (1.0f + a * (1.0f - sg));
        dup[i] = g * a * sg;
    }
}

extern "C" __global__ void swiglu_fwd_f32(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ h, long long n) {
    swiglu_fwd(gate, up, h, n);
}

extern "C" __global__ void swiglu_bwd_f32(const float* __restrict__ gate, const float* __restrict__ up, const float* __restrict__ dh,
                                          float* __restrict__ dgate, float* __restrict__ dup, long long n) {
    swiglu_bwd(gate, up, dh, dgate, dup, n);
}

extern "C" __global__ void swiglu_fwd_bf16(const __nv_bfloat16* __restrict__ gate, const __nv_bfloat16* __restrict__ up,
                                           float* __restrict__ h, long long n) {
    swiglu_fwd(gate, up, h, n);
}

extern "C" __global__ void swiglu_bwd_bf16(const __nv_bfloat16* __restrict__ gate, const __nv_bfloat16* __restrict__ up,
                                           const float* __restrict__ dh, float* __restrict__ dgate, float* __restrict__ dup, long long n) {
    swiglu_bwd(gate, up, dh, dgate, dup, n);
}
