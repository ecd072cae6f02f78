// Many WeGeFT adapters in one batch: the per-token input-side edit
//
//   a = idx[t]                         (adapter of token t; a < 0: none)
//   u = x_t psi_a^T                    (r)        psi_a = psi + a * r * d_in   (r x d_in)
//   h_t = x_t + s_a u phi_a^T          (d_in)     phi_a = phi + a * d_in * r   (d_in x r)
//
// after which every token goes through the one shared frozen GEMM y = h W^T (+ b)
// (src/cuda/multi.rs), because x W'^T = h W^T for W' = W + s W phi psi. Storage T (f32, bf16,
// f16) for x, phi, psi, h; f32 scales; compute and accumulation in f32; h rounded once.
//
// One 256-thread block per token. u: the threads stride over d_in with MULTI_J accumulators
// (a chunk of MULTI_J columns of u at a time), then a shared-memory tree reduction in a fixed
// order (deterministic, no atomics, no warp shuffles: the host emulation runs it as is).
// Then each thread writes the h elements k = tid, tid + 256, ... The launcher checks
// 1 <= r <= MULTI_MAX_RANK and every index (a in -1..A).
#include "common.cuh"

using bf16 = __nv_bfloat16;
using f16 = __half;

namespace wegeft {

constexpr int MULTI_THREADS = 256, MULTI_J = 8, MULTI_MAX_RANK = 256;

template <typename T>
__device__ __forceinline__ void multi_edit(
    const T* __restrict__ x, long long ldx, const int* __restrict__ idx, const T* __restrict__ phi,
    const T* __restrict__ psi, const float* __restrict__ scales, int d_in, int r, T* __restrict__ h, long long ldh)
{
    __shared__ float red[MULTI_J][MULTI_THREADS];
    __shared__ float u[MULTI_MAX_RANK];
    const int t = blockIdx.x, tid = threadIdx.x;
    const int a = idx[t];
    const T* xt = x + (long long)t * ldx;
    T* ht = h + (long long)t * ldh;
    if (a < 0) {
        for (int k = tid; k < d_in; k += MULTI_THREADS) ht[k] = xt[k];
        return;  // the whole block takes this branch: no barrier is skipped by some threads only
    }
    const T* ps = psi + (long long)a * r * d_in;
    const T* ph = phi + (long long)a * d_in * r;
    for (int j0 = 0; j0 < r; j0 += MULTI_J) {
        float acc[MULTI_J];
#pragma unroll
        for (int jj = 0; jj < MULTI_J; ++jj) acc[jj] = 0.f;
        for (int k = tid; k < d_in; k += MULTI_THREADS) {
            const float xk = to_f32(xt[k]);
#pragma unroll
            for (int jj = 0; jj < MULTI_J; ++jj)
                if (j0 + jj < r) acc[jj] = fmaf(xk, to_f32(ps[(long long)(j0 + jj) * d_in + k]), acc[jj]);
        }
#pragma unroll
        for (int jj = 0; jj < MULTI_J; ++jj) red[jj][tid] = acc[jj];
        __syncthreads();
        for (int stride = MULTI_THREADS / 2; stride > 0; stride >>= 1) {
            if (tid < stride) {
#pragma unroll
                for (int jj = 0; jj < MULTI_J; ++jj) red[jj][tid] += red[jj][tid + stride];
            }
            __syncthreads();
        }
        if (tid < MULTI_J && j0 + tid < r) u[j0 + tid] = red[tid][0];
        __syncthreads();
    }
    const float s = scales[a];
    for (int k = tid; k < d_in; k += MULTI_THREADS) {
        const T* row = ph + (long long)k * r;
        float acc = 0.f;
        for (int j = 0; j < r; ++j) acc = fmaf(u[j], to_f32(row[j]), acc);
        ht[k] = from_f32<T>(fmaf(s, acc, to_f32(xt[k])));
    }
}

}  // namespace wegeft

#define WEGEFT_MULTI(T, SUF)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) multi_edit_##SUF(                               \
        const T* __restrict__ x, long long ldx, const int* __restrict__ idx, const T* __restrict__ phi, \
        const T* __restrict__ psi, const float* __restrict__ scales, int d_in, int r, T* __restrict__ h,  \
        long long ldh)                                                                                \
    {                                                                                                 \
        wegeft::multi_edit<T>(x, ldx, idx, phi, psi, scales, d_in, r, h, ldh);                        \
    }

WEGEFT_MULTI(float, f32)
WEGEFT_MULTI(bf16, bf16)
WEGEFT_MULTI(f16, f16)
