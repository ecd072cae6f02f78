// SwiGLU, elementwise, f32 compute. gate and up are stored as In (f32, or bf16 when the model
// keeps them in bf16 for the backward: Backend::stash), h as Out (f32, or bf16 when h is only
// read by products in bf16: Backend::operand); dh and the gradients are f32:
//   swiglu_fwd_In[_Out]   h = silu(a) * up,  silu(a) = a sig(a),  sig(a) = 1 / (1 + e^-a)
//   swiglu_bwd_In[_Out]   dgate = dh * up * sig(a) (1 + a (1 - sig(a))),  dup = dh * silu(a)
//                         (swiglu_bwd_bf16_bf16: bf16 gradients, rounded once, for products)
// (swiglu_fwd_f32 and swiglu_fwd_bf16 write f32; swiglu_fwd_f32_bf16 and swiglu_fwd_bf16_bf16
// write bf16, rounded once from the f32 value.)
#include "common.cuh"

template <typename In, typename Out>
__device__ __forceinline__ void swiglu_fwd(const In* __restrict__ gate, const In* __restrict__ up, Out* __restrict__ h, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float a = wegeft::to_f32(gate[i]);
        float sg = 1.0f / (1.0f + expf(-a));
        h[i] = wegeft::from_f32<Out>(a * sg * wegeft::to_f32(up[i]));
    }
}

template <typename T, typename Out>
__device__ __forceinline__ void swiglu_bwd(const T* __restrict__ gate, const T* __restrict__ up, const float* __restrict__ dh,
                                           Out* __restrict__ dgate, Out* __restrict__ dup, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float a = wegeft::to_f32(gate[i]);
        float sg = 1.0f / (1.0f + expf(-a));
        float g = dh[i];
        dgate[i] = wegeft::from_f32<Out>(g * wegeft::to_f32(up[i]) * sg * (1.0f + a * (1.0f - sg)));
        dup[i] = wegeft::from_f32<Out>(g * a * sg);
    }
}

using bf16 = __nv_bfloat16;

extern "C" __global__ void swiglu_fwd_f32(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ h, long long n) {
    swiglu_fwd(gate, up, h, n);
}

extern "C" __global__ void swiglu_fwd_bf16(const bf16* __restrict__ gate, const bf16* __restrict__ up, float* __restrict__ h, long long n) {
    swiglu_fwd(gate, up, h, n);
}

extern "C" __global__ void swiglu_fwd_f32_bf16(const float* __restrict__ gate, const float* __restrict__ up, bf16* __restrict__ h,
                                               long long n) {
    swiglu_fwd(gate, up, h, n);
}

extern "C" __global__ void swiglu_fwd_bf16_bf16(const bf16* __restrict__ gate, const bf16* __restrict__ up, bf16* __restrict__ h,
                                                long long n) {
    swiglu_fwd(gate, up, h, n);
}

extern "C" __global__ void swiglu_bwd_f32(const float* __restrict__ gate, const float* __restrict__ up, const float* __restrict__ dh,
                                          float* __restrict__ dgate, float* __restrict__ dup, long long n) {
    swiglu_bwd(gate, up, dh, dgate, dup, n);
}

extern "C" __global__ void swiglu_bwd_bf16(const bf16* __restrict__ gate, const bf16* __restrict__ up, const float* __restrict__ dh,
                                           float* __restrict__ dgate, float* __restrict__ dup, long long n) {
    swiglu_bwd(gate, up, dh, dgate, dup, n);
}

extern "C" __global__ void swiglu_bwd_bf16_bf16(const bf16* __restrict__ gate, const bf16* __restrict__ up,
                                                const float* __restrict__ dh, bf16* __restrict__ dgate, bf16* __restrict__ dup,
                                                long long n) {
    swiglu_bwd(gate, up, dh, dgate, dup, n);
}
