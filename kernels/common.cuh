// Helpers shared by every kernel file: storage <-> f32 conversions, the dropout mask on W,
// and the small tiled matrix product that the rank-r kernels are built from.
//
// Conventions (see DEVELOPERS.md): row-major matrices with a row stride ("ld") in elements;
// storage f32, bf16 or f16; compute and accumulation always f32. Kernels are dumb: the Rust
// launchers check shapes, strides and alignment before any launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace wegeft {

// ---- conversions -------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// ---- dropout on W ------------------------------------------------------------------------
//
// A counter-based mask: element (row, col) of W is kept iff hash(seed, row, col) / 2^32 >= p,
// and a kept element is scaled by 1 / (1 - p). The hash is the splitmix64 finalizer of
// seed + golden * (((row << 32) | col) + 1); its top 32 bits are the uniform draw. Nothing is
// stored: the backward pass regenerates the same mask from (seed, row, col). The Rust mirror
// is `wegeft::cuda::dropout_keep`; keep the two identical.

__device__ __forceinline__ uint32_t mask_hash(uint64_t seed, uint32_t row, uint32_t col) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * ((((uint64_t)row << 32) | (uint64_t)col) + 1ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (uint32_t)(z >> 32);
}

// The integer threshold equivalent to `u >= p` for u = hash / 2^32: hash >= ceil(p * 2^32).
// (p < 1, so the threshold fits in 32 bits.) Computed in double, as the host mirror does.
__device__ __forceinline__ uint32_t mask_threshold(float p) {
    return (uint32_t)ceil((double)p * 4294967296.0);
}

// Multiplier of W[row, col] under dropout: 0 or keep_scale = 1 / (1 - p).
__device__ __forceinline__ float mask_factor(uint64_t seed, uint32_t row, uint32_t col, uint32_t thresh, float keep_scale) {
    return mask_hash(seed, row, col) >= thresh ? keep_scale : 0.0f;
}

// ---- tiled product -----------------------------------------------------------------------
//
// D[M x N] = epilogue( sum_k A(m, k) B(k, n) ), with
//   A(m, k) = TRANS_A ? A[k * lda + m] : A[m * lda + k]
//   B(k, n) = TRANS_B ? B[n * ldb + k] : B[k * ldb + n]
// and, when MASK_A, A(m, k) multiplied by the dropout factor of W at (row, col) =
// TRANS_A ? (k, m) : (m, k) (A *is* W or W^T in every masked product).
//
// One 256-thread block computes a 64 x 64 tile of D over the K range of its grid.z slice
// (split-K). With ksplit == 1 it applies the epilogue itself:
//   D = alpha * acc + (beta != 0 ? beta * D : 0) + (bias ? bias[n] : 0)
// (D is not read when beta == 0, so it may hold garbage). With ksplit > 1 it stores the raw
// partial sums in work[z][M][N] (f32) and `splitk_reduce` adds the slices in a fixed order:
// the result does not depend on scheduling, and no float atomics are used anywhere.
constexpr int TM = 64, TN = 64, TK = 16, THREADS = 256;

template <typename TA, typename TB, typename TD, bool TRANS_A, bool TRANS_B, bool MASK_A>
__device__ __forceinline__ void tile_product(
    const TA* __restrict__ A, long long lda, const TB* __restrict__ B, long long ldb,
    TD* __restrict__ D, long long ldd, const TD* __restrict__ bias,
    int M, int N, int K, float alpha, float beta, float p, unsigned long long seed,
    float* __restrict__ work, int ksplit)
{
    __shared__ float As[TK][TM + 4];
    __shared__ float Bs[TK][TN + 4];

    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.x * TM, n0 = blockIdx.y * TN;
    // The K range of this slice: whole TK steps, the last slice takes the remainder.
    const int kchunk = ((K + ksplit - 1) / ksplit + TK - 1) / TK * TK;
    const int kbeg = blockIdx.z * kchunk;
    const int kend = min(K, kbeg + kchunk);
    const float keep_scale = MASK_A ? 1.0f / (1.0f - p) : 1.0f;
    const bool masked = MASK_A && p > 0.0f;
    const uint32_t thresh = masked ? mask_threshold(p) : 0u;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (int k0 = kbeg; k0 < kend; k0 += TK) {
        // Load the A tile (TM x TK) and B tile (TK x TN): 4 elements each per thread, with
        // consecutive threads on the contiguous dimension of the operand.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + THREADS * i;
            int mm, kk;
            if (TRANS_A) { mm = e % TM; kk = e / TM; } else { kk = e % TK; mm = e / TK; }
            const int gm = m0 + mm, gk = k0 + kk;
            float v = 0.0f;
            if (gm < M && gk < kend) {
                v = TRANS_A ? to_f32(A[(long long)gk * lda + gm]) : to_f32(A[(long long)gm * lda + gk]);
                if (masked) {
                    v *= TRANS_A ? mask_factor(seed, gk, gm, thresh, keep_scale) : mask_factor(seed, gm, gk, thresh, keep_scale);
                }
            }
            As[kk][mm] = v;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + THREADS * i;
            int nn, kk;
            if (TRANS_B) { kk = e % TK; nn = e / TK; } else { nn = e % TN; kk = e / TN; }
            const int gn = n0 + nn, gk = k0 + kk;
            float v = 0.0f;
            if (gn < N && gk < kend) {
                v = TRANS_B ? to_f32(B[(long long)gn * ldb + gk]) : to_f32(B[(long long)gk * ldb + gn]);
            }
            Bs[kk][nn] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx + 16 * j;
            if (n >= N) continue;
            if (ksplit > 1) {
                work[((long long)blockIdx.z * M + m) * N + n] = acc[i][j];
            } else {
                float out = alpha * acc[i][j];
                if (beta != 0.0f) out += beta * to_f32(D[(long long)m * ldd + n]);
                if (bias != nullptr) out += to_f32(bias[n]);
                D[(long long)m * ldd + n] = from_f32<TD>(out);
            }
        }
    }
}

// Sums the ksplit partial products of `tile_product` in slice order and applies the epilogue.
template <typename TD>
__device__ __forceinline__ void splitk_reduce(
    const float* __restrict__ work, int ksplit, int M, int N, TD* __restrict__ D, long long ldd,
    const TD* __restrict__ bias, float alpha, float beta)
{
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)M * N) return;
    const int m = (int)(idx / N), n = (int)(idx % N);
    float acc = 0.0f;
    for (int z = 0; z < ksplit; ++z) acc += work[(long long)z * M * N + idx];
    float out = alpha * acc;
    if (beta != 0.0f) out += beta * to_f32(D[(long long)m * ldd + n]);
    if (bias != nullptr) out += to_f32(bias[n]);
    D[(long long)m * ldd + n] = from_f32<TD>(out);
}

}  // namespace wegeft

// Declares `extern "C"` kernel NAME computing a tile product with the common signature
//   (A, lda, B, ldb, D, ldd, bias, M, N, K, alpha, beta, p, seed, work, ksplit)
// that every rank-r launcher in src/cuda/layer.rs uses.
#define WEGEFT_PRODUCT_KERNEL(NAME, TA, TB, TD, TRANS_A, TRANS_B, MASK_A)                           \
    extern "C" __global__ void __launch_bounds__(wegeft::THREADS) NAME(                             \
        const TA* __restrict__ A, long long lda, const TB* __restrict__ B, long long ldb,           \
        TD* __restrict__ D, long long ldd, const TD* __restrict__ bias, int M, int N, int K,       \
        float alpha, float beta, float p, unsigned long long seed, float* __restrict__ work,       \
        int ksplit)                                                                                 \
    {                                                                                               \
        wegeft::tile_product<TA, TB, TD, TRANS_A, TRANS_B, MASK_A>(                                 \
            A, lda, B, ldb, D, ldd, bias, M, N, K, alpha, beta, p, seed, work, ksplit);             \
    }
