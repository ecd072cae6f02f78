// A simple, complete causal GQA attention (forward, backward, decode) for the model's CUDA
// backend, one warp per output row: the stand-in for the tiled kernels of kernels/attention.cu
// (and, once those land, a test oracle). Storage T in {f32, bf16}, math f32, lse f32.
// Layout (src/backend.rs): q, out, dout, dq `B*S x H*hd`; k, v, dk, dv `B*S x KVH*hd`;
// lse `B*S x H`; query head h reads kv head h / (H / KVH); hd <= 128 (checked on the host).
// Lane l holds dims l, l + 32, l + 64, l + 96 of a row; dot products are warp sums (xor
// butterfly, the same order on every lane, so the result is deterministic).
//
//   attn_naive_fwd_T    warp per (b, i, h): online softmax over j <= i of s_ij = q_i.k_j scale,
//                       out_i = sum_j p_ij v_j, lse_i = m + log l
//   attn_naive_dq_T     warp per (b, i, h): D_i = dout_i.out_i, p_ij = exp(s_ij - lse_i),
//                       ds_ij = p_ij (dout_i.v_j - D_i), dq_i = scale sum_j ds_ij k_j
//   attn_naive_dkv_T    warp per (b, j, kvh): over the group's heads h and i >= j:
//                       dv_j = sum p_ij dout_i, dk_j = scale sum ds_ij q_i
//   attn_naive_decode_T warp per (b, h): q (batch x H*hd) against the caches
//                       (batch x capacity x KVH*hd), positions 0..len
#include "common.cuh"

using bf16 = __nv_bfloat16;
constexpr int AW = 4;  // elements per lane: hd <= 128

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ p, int hd, int lane, float (&r)[AW]) {
#pragma unroll
    for (int e = 0; e < AW; ++e) {
        int d = lane + 32 * e;
        r[e] = d < hd ? wegeft::to_f32(p[d]) : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ void store_row(T* __restrict__ p, int hd, int lane, const float (&r)[AW], float k) {
#pragma unroll
    for (int e = 0; e < AW; ++e) {
        int d = lane + 32 * e;
        if (d < hd) p[d] = wegeft::from_f32<T>(r[e] * k);
    }
}

__device__ __forceinline__ float dot_row(const float (&a)[AW], const float (&b)[AW]) {
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < AW; ++e) s += a[e] * b[e];
    return warp_sum(s);
}

template <typename T>
__device__ __forceinline__ void attn_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                                         float* __restrict__ lse, int B, int S, int H, int KVH, int hd, float scale) {
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= (long long)B * S * H) return;
    const int h = (int)(w % H);
    const long long row = w / H;
    const int i = (int)(row % S);
    const long long b = row / S;
    const int kvh = h / (H / KVH);
    float qv[AW], acc[AW], kv[AW], vv[AW];
    load_row(q + row * H * hd + (long long)h * hd, hd, lane, qv);
#pragma unroll
    for (int e = 0; e < AW; ++e) acc[e] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j <= i; ++j) {
        const long long kr = (b * S + j) * KVH * hd + (long long)kvh * hd;
        load_row(k + kr, hd, lane, kv);
        float s = dot_row(qv, kv) * scale;
        load_row(v + kr, hd, lane, vv);
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int e = 0; e < AW; ++e) acc[e] = acc[e] * corr + p * vv[e];
        m = mn;
    }
    store_row(out + row * H * hd + (long long)h * hd, hd, lane, acc, 1.0f / l);
    if (lane == 0) lse[row * H + h] = m + logf(l);
}

template <typename T>
__device__ __forceinline__ void attn_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ out,
                                        const float* __restrict__ lse, const T* __restrict__ dout, T* __restrict__ dq, int B, int S, int H,
                                        int KVH, int hd, float scale) {
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= (long long)B * S * H) return;
    const int h = (int)(w % H);
    const long long row = w / H;
    const int i = (int)(row % S);
    const long long b = row / S;
    const int kvh = h / (H / KVH);
    const long long qo = row * H * hd + (long long)h * hd;
    float qv[AW], dov[AW], ov[AW], acc[AW], kv[AW], vv[AW];
    load_row(q + qo, hd, lane, qv);
    load_row(dout + qo, hd, lane, dov);
    load_row(out + qo, hd, lane, ov);
    const float Di = dot_row(dov, ov);
    const float li = lse[row * H + h];
#pragma unroll
    for (int e = 0; e < AW; ++e) acc[e] = 0.0f;
    for (int j = 0; j <= i; ++j) {
        const long long kr = (b * S + j) * KVH * hd + (long long)kvh * hd;
        load_row(k + kr, hd, lane, kv);
        load_row(v + kr, hd, lane, vv);
        float p = expf(dot_row(qv, kv) * scale - li);
        float ds = p * (dot_row(dov, vv) - Di);
#pragma unroll
        for (int e = 0; e < AW; ++e) acc[e] += ds * kv[e];
    }
    store_row(dq + qo, hd, lane, acc, scale);
}

template <typename T>
__device__ __forceinline__ void attn_dkv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ out,
                                         const float* __restrict__ lse, const T* __restrict__ dout, T* __restrict__ dk, T* __restrict__ dv,
                                         int B, int S, int H, int KVH, int hd, float scale) {
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= (long long)B * S * KVH) return;
    const int kvh = (int)(w % KVH);
    const long long krow = w / KVH;
    const int j = (int)(krow % S);
    const long long b = krow / S;
    const int group = H / KVH;
    const long long ko = krow * KVH * hd + (long long)kvh * hd;
    float kv[AW], vv[AW], dka[AW], dva[AW], qv[AW], dov[AW], ov[AW];
    load_row(k + ko, hd, lane, kv);
    load_row(v + ko, hd, lane, vv);
#pragma unroll
    for (int e = 0; e < AW; ++e) dka[e] = dva[e] = 0.0f;
    for (int g = 0; g < group; ++g) {
        const int h = kvh * group + g;
        for (int i = j; i < S; ++i) {
            const long long row = b * S + i;
            const long long qo = row * H * hd + (long long)h * hd;
            load_row(q + qo, hd, lane, qv);
            load_row(dout + qo, hd, lane, dov);
            load_row(out + qo, hd, lane, ov);
            float Di = dot_row(dov, ov);
            float p = expf(dot_row(qv, kv) * scale - lse[row * H + h]);
            float ds = p * (dot_row(dov, vv) - Di);
#pragma unroll
            for (int e = 0; e < AW; ++e) {
                dva[e] += p * dov[e];
                dka[e] += ds * qv[e];
            }
        }
    }
    store_row(dk + ko, hd, lane, dka, scale);
    store_row(dv + ko, hd, lane, dva, 1.0f);
}

template <typename T>
__device__ __forceinline__ void attn_decode(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc, T* __restrict__ out,
                                            int batch, int H, int KVH, int hd, int capacity, int len, float scale) {
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= (long long)batch * H) return;
    const int h = (int)(w % H);
    const long long b = w / H;
    const int kvh = h / (H / KVH);
    float qv[AW], acc[AW], kv[AW], vv[AW];
    load_row(q + b * H * hd + (long long)h * hd, hd, lane, qv);
#pragma unroll
    for (int e = 0; e < AW; ++e) acc[e] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j < len; ++j) {
        const long long kr = (b * capacity + j) * KVH * hd + (long long)kvh * hd;
        load_row(kc + kr, hd, lane, kv);
        float s = dot_row(qv, kv) * scale;
        load_row(vc + kr, hd, lane, vv);
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int e = 0; e < AW; ++e) acc[e] = acc[e] * corr + p * vv[e];
        m = mn;
    }
    store_row(out + b * H * hd + (long long)h * hd, hd, lane, acc, 1.0f / l);
}

#define WEGEFT_ATTN_NAIVE(T, SUF)                                                                                                  \
    extern "C" __global__ void attn_naive_fwd_##SUF(const T* q, const T* k, const T* v, T* out, float* lse, int B, int S, int H,     \
                                                    int KVH, int hd, float scale) {                                                \
        attn_fwd<T>(q, k, v, out, lse, B, S, H, KVH, hd, scale);                                                                    \
    }                                                                                                                              \
    extern "C" __global__ void attn_naive_dq_##SUF(const T* q, const T* k, const T* v, const T* out, const float* lse, const T* dout, \
                                                   T* dq, int B, int S, int H, int KVH, int hd, float scale) {                      \
        attn_dq<T>(q, k, v, out, lse, dout, dq, B, S, H, KVH, hd, scale);                                                           \
    }                                                                                                                              \
    extern "C" __global__ void attn_naive_dkv_##SUF(const T* q, const T* k, const T* v, const T* out, const float* lse,             \
                                                    const T* dout, T* dk, T* dv, int B, int S, int H, int KVH, int hd,             \
                                                    float scale) {                                                                 \
        attn_dkv<T>(q, k, v, out, lse, dout, dk, dv, B, S, H, KVH, hd, scale);                                                      \
    }                                                                                                                              \
    extern "C" __global__ void attn_naive_decode_##SUF(const T* q, const T* kc, const T* vc, T* out, int batch, int H, int KVH,     \
                                                       int hd, int capacity, int len, float scale) {                               \
        attn_decode<T>(q, kc, vc, out, batch, H, KVH, hd, capacity, len, scale);                                                    \
    }

WEGEFT_ATTN_NAIVE(float, f32)
WEGEFT_ATTN_NAIVE(bf16, bf16)
