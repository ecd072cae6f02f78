// SwiGLU on f32, elementwise:
//   swiglu_fwd_f32   h = silu(a) * up,  silu(a) = a sig(a),  sig(a) = 1 / (1 + e^-a)
//   swiglu_bwd_f32   dgate = dh * up * sig(a) (1 + a (1 - sig(a))),  dup = dh * silu(a)
#include "common.cuh"

extern "C" __global__ void swiglu_fwd_f32(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ h, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float a = gate[i];
        float sg = 1.0f / (1.0f + expf(-a));
        h[i] = a * sg * up[i];
    }
}

extern "C" __global__ void swiglu_bwd_f32(const float* __restrict__ gate, const float* __restrict__ up, const float* __restrict__ dh,
                                          float* __restrict__ dgate, float* __restrict__ dup, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float a = gate[i];
        float sg = 1.0f / (1.0f + expf(-a));
        float g = dh[i];
        dgate[i] = g * up[i] * sg * (1.0f + a * (1.0f - sg));
        dup[i] = g * a * sg;
    }
}
