// The rank-r products of a WeGeFT / LoRA layer (everything but the frozen d_out x d_in GEMM).
// Shapes as in src/shape.rs: x T x d_in, W d_out x d_in, phi d_in x r, psi r x d_in,
// G = dL/dy T x d_out. Every kernel is an instance of wegeft::tile_product (common.cuh) with
// the signature (A, lda, B, ldb, D, ldd, bias, M, N, K, alpha, beta, p, seed, work, ksplit):
//
//   lowrank_u_T      u = x psi^T                 (T x r)       A = x, B = psi^T
//   wegeft_c_T       C = s (M .* W) phi          (d_out x r)   A = W (dropout mask M), B = phi
//   lowrank_v_T      v = alpha G C               (T x r)       A = G, B = C
//   lowrank_s_T      S = alpha G^T u (+ beta S)  (d_out x r)   f32 out, reduction over tokens
//   lowrank_dpsi_T   dpsi = v^T x + beta dpsi    (r x d_in)    f32 out, reduction over tokens
//   lowrank_dphi_T   dphi = s (M .* W)^T S + beta dphi (d_in x r) f32 out (S is f32)
//   lowrank_addmm_nt_T  y = beta y + alpha u C^T + b   (the rank-r half of the forward)
//   lowrank_addmm_nn_T  dx = beta dx + alpha v psi     (the rank-r half of dx)
//   splitk_reduce_T  the fixed-order sum of split-K partials, then the same epilogue
#include "common.cuh"

using bf16 = __nv_bfloat16;
using f16 = __half;

#define WEGEFT_LOWRANK(T, SUF)                                                        \
    WEGEFT_PRODUCT_KERNEL(lowrank_u_##SUF, T, T, T, false, true, false)               \
    WEGEFT_PRODUCT_KERNEL(wegeft_c_##SUF, T, T, T, false, false, true)                \
    WEGEFT_PRODUCT_KERNEL(lowrank_v_##SUF, T, T, T, false, false, false)              \
    WEGEFT_PRODUCT_KERNEL(lowrank_s_##SUF, T, T, float, true, false, false)           \
    WEGEFT_PRODUCT_KERNEL(lowrank_dpsi_##SUF, T, T, float, true, false, false)        \
    WEGEFT_PRODUCT_KERNEL(lowrank_dphi_##SUF, T, float, float, true, false, true)     \
    WEGEFT_PRODUCT_KERNEL(lowrank_addmm_nt_##SUF, T, T, T, false, true, false)        \
    WEGEFT_PRODUCT_KERNEL(lowrank_addmm_nn_##SUF, T, T, T, false, false, false)       \
    extern "C" __global__ void splitk_reduce_##SUF(                                   \
        const float* __restrict__ work, int ksplit, int M, int N, T* __restrict__ D,  \
        long long ldd, const T* __restrict__ bias, float alpha, float beta)           \
    {                                                                                 \
        wegeft::splitk_reduce<T>(work, ksplit, M, N, D, ldd, bias, alpha, beta);      \
    }

WEGEFT_LOWRANK(float, f32)
WEGEFT_LOWRANK(bf16, bf16)
WEGEFT_LOWRANK(f16, f16)
