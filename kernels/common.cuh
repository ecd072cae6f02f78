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
#ifndef WEGEFT_HOST_EMULATION
#include <mma.h>
#endif

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
//
// The tiles are staged in shared memory as f32. For 16-bit A (bf16 / f16 storage) the
// 64 x 64 x 16 step runs on the tensor cores as TF32 WMMA (m16n16k8, f32 accumulation): every
// bf16 or f16 value is exact in TF32, so the products are exact and only the f32 accumulation
// order differs from the FMA loop. An f32 B operand (S in dphi) is split into two TF32 terms
// (hi + lo, two products), which keeps ~2^-22 relative precision. Dropout zeroes elements in
// the tile and scales the sum by 1 / (1 - p), so kept values stay exact. f32 storage keeps the
// FMA loop (4 x 4 outputs per thread).
constexpr int TM = 64, TN = 64, TK = 16, THREADS = 256, PAD = 4;

template <typename TA, typename TB, typename TD, bool TRANS_A, bool TRANS_B, bool MASK_A>
__device__ __forceinline__ void tile_product(
    const TA* __restrict__ A, long long lda, const TB* __restrict__ B, long long ldb,
    TD* __restrict__ D, long long ldd, const TD* __restrict__ bias,
    int M, int N, int K, float alpha, float beta, float p, unsigned long long seed,
    float* __restrict__ work, int ksplit)
{
    constexpr bool TC = sizeof(TA) == 2;
    // WMMA loads and stores need 256-bit aligned rows: TM + PAD floats = 272 bytes.
    __shared__ __align__(32) float As[TK][TM + PAD];
    __shared__ __align__(32) float Bs[TK][TN + PAD];

    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.x * TM, n0 = blockIdx.y * TN;
    // The K range of this slice: whole TK steps, the last slice takes the remainder.
    const int kchunk = ((K + ksplit - 1) / ksplit + TK - 1) / TK * TK;
    const int kbeg = blockIdx.z * kchunk;
    const int kend = min(K, kbeg + kchunk);
    const bool masked = MASK_A && p > 0.0f;
    const float keep_scale = masked ? 1.0f / (1.0f - p) : 1.0f;
    const uint32_t thresh = masked ? mask_threshold(p) : 0u;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    const int warp = tid / 32, wm = warp % 4, wn = warp / 4;
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float> fc0, fc1;
    if constexpr (TC) {
        nvcuda::wmma::fill_fragment(fc0, 0.0f);
        nvcuda::wmma::fill_fragment(fc1, 0.0f);
    }

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
                // Dropped elements become 0; the 1 / (1 - p) of kept ones is applied to the
                // sum (keep_scale below), so kept values stay exact in the TF32 path.
                if (masked && (TRANS_A ? mask_hash(seed, gk, gm) : mask_hash(seed, gm, gk)) < thresh) v = 0.0f;
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
        if constexpr (TC) {
            // Warp w owns rows 16 (w % 4) .. + 16 and columns 32 (w / 4) .. + 32 of the tile.
#pragma unroll
            for (int kk = 0; kk < TK; kk += 8) {
                nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, nvcuda::wmma::precision::tf32, nvcuda::wmma::col_major> fa;
                nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8, nvcuda::wmma::precision::tf32, nvcuda::wmma::row_major> fb0, fb1;
                nvcuda::wmma::load_matrix_sync(fa, &As[kk][wm * 16], TM + PAD);
                nvcuda::wmma::load_matrix_sync(fb0, &Bs[kk][wn * 32], TN + PAD);
                nvcuda::wmma::load_matrix_sync(fb1, &Bs[kk][wn * 32 + 16], TN + PAD);
#pragma unroll
                for (int t = 0; t < fa.num_elements; ++t) fa.x[t] = nvcuda::wmma::__float_to_tf32(fa.x[t]);
                if constexpr (sizeof(TB) == 4) {
                    // f32 B (S in dphi): B = hi + lo, both TF32, two products: ~2^-22 relative.
                    decltype(fb0) lo0, lo1;
#pragma unroll
                    for (int t = 0; t < fb0.num_elements; ++t) {
                        float h0 = nvcuda::wmma::__float_to_tf32(fb0.x[t]);
                        float h1 = nvcuda::wmma::__float_to_tf32(fb1.x[t]);
                        lo0.x[t] = nvcuda::wmma::__float_to_tf32(fb0.x[t] - h0);
                        lo1.x[t] = nvcuda::wmma::__float_to_tf32(fb1.x[t] - h1);
                        fb0.x[t] = h0;
                        fb1.x[t] = h1;
                    }
                    nvcuda::wmma::mma_sync(fc0, fa, lo0, fc0);
                    nvcuda::wmma::mma_sync(fc1, fa, lo1, fc1);
                } else {
#pragma unroll
                    for (int t = 0; t < fb0.num_elements; ++t) {
                        fb0.x[t] = nvcuda::wmma::__float_to_tf32(fb0.x[t]);
                        fb1.x[t] = nvcuda::wmma::__float_to_tf32(fb1.x[t]);
                    }
                }
                nvcuda::wmma::mma_sync(fc0, fa, fb0, fc0);
                nvcuda::wmma::mma_sync(fc1, fa, fb1, fc1);
            }
        } else {
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
        }
        __syncthreads();
    }
    if constexpr (TC) {
        // Through shared memory into the FMA loop's layout, for the one epilogue below.
        __shared__ __align__(32) float Cs[TM][TN + PAD];
        nvcuda::wmma::store_matrix_sync(&Cs[wm * 16][wn * 32], fc0, TN + PAD, nvcuda::wmma::mem_row_major);
        nvcuda::wmma::store_matrix_sync(&Cs[wm * 16][wn * 32 + 16], fc1, TN + PAD, nvcuda::wmma::mem_row_major);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = Cs[ty + 16 * i][tx + 16 * j];
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
                work[((long long)blockIdx.z * M + m) * N + n] = keep_scale * acc[i][j];
            } else {
                float out = alpha * (keep_scale * acc[i][j]);
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
