// Merging the adapter into W in place, and the exact inverse.
//
//   merge_T           W <- W + C psi                      (C = s W phi, from wegeft_c_T)
//   unmerge_wphi_T    P = W' phi          (d_out x r, f32)
//   unmerge_psiphi_T  K0 = psi phi        (r x r, f32; the host forms K = I_r + s K0 in f64)
//   unmerge_T         W <- W - P Z        (Z = K^-1 s psi, r x d_in, f32, solved on the host)
//
// All with the product signature of common.cuh; merge_T / unmerge_T run with beta = 1 and
// read-modify-write W (each element by exactly one thread).
#include "common.cuh"

using bf16 = __nv_bfloat16;
using f16 = __half;

#define WEGEFT_MERGE(T, SUF)                                                          \
    WEGEFT_PRODUCT_KERNEL(merge_##SUF, T, T, T, false, false, false)                  \
    WEGEFT_PRODUCT_KERNEL(unmerge_wphi_##SUF, T, T, float, false, false, false)       \
    WEGEFT_PRODUCT_KERNEL(unmerge_psiphi_##SUF, T, T, float, false, false, false)     \
    WEGEFT_PRODUCT_KERNEL(unmerge_##SUF, float, float, T, false, false, false)

WEGEFT_MERGE(float, f32)
WEGEFT_MERGE(bf16, bf16)
WEGEFT_MERGE(f16, f16)
