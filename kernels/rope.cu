// Rotary position embedding, HF rotate-half convention, in place on rows of heads * hd, stored
// as f32 (rope_f32) or bf16 (rope_bf16: f32 math, each result rounded once; the gradients of q
// and k that only products read, Backend::operand).
// The cos / sin tables are the CPU's (`crate::cpu::ops::RopeCache`, f32 as transformers
// computes them: inv_freq_i = 1 / theta^((2i) / hd), a = f32(pos) inv_freq_i), uploaded once
// per (hd, theta, max_pos) and indexed [pos * hd/2 + i]:
//   forward:  (x_i, x_{i+hd/2}) <- (x_i cos a - x_{i+hd/2} sin a, x_{i+hd/2} cos a + x_i sin a)
//   inverse:  the rotation by -a (the backward).
// One thread per (row, head, i < hd/2).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rope(T* __restrict__ x, const unsigned* __restrict__ pos, const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, long long rows, int heads, int hd, int inverse) {
    const int half = hd / 2;
    const long long n = rows * heads * half;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (long long)gridDim.x * blockDim.x) {
        int i = (int)(t % half);
        long long rh = t / half;  // row * heads + head
        long long row = rh / heads;
        long long k = (long long)pos[row] * half + i;
        float c = cos_t[k], s = sin_t[k];
        if (inverse) s = -s;
        T* xr = x + rh * hd;
        float x1 = wegeft::to_f32(xr[i]), x2 = wegeft::to_f32(xr[i + half]);
        xr[i] = wegeft::from_f32<T>(x1 * c - x2 * s);
        xr[i + half] = wegeft::from_f32<T>(x2 * c + x1 * s);
    }
}

extern "C" __global__ void rope_f32(float* __restrict__ x, const unsigned* __restrict__ pos, const float* __restrict__ cos_t,
                                    const float* __restrict__ sin_t, long long rows, int heads, int hd, int inverse) {
    rope(x, pos, cos_t, sin_t, rows, heads, hd, inverse);
}

extern "C" __global__ void rope_bf16(__nv_bfloat16* __restrict__ x, const unsigned* __restrict__ pos, const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, long long rows, int heads, int hd, int inverse) {
    rope(x, pos, cos_t, sin_t, rows, heads, hd, inverse);
}
