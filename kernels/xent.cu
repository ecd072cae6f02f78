// The softmax / cross-entropy half of the chunked LM head (src/cuda/backend.rs): on a chunk of
// `rows` f32 logit rows z (rows x vocab, from a cuBLASLt GEMM h E^T), one 256-thread block per
// row:
//   loss[r] = max + log(sum_v exp(z_v - max)) - z[label_r]    (sums in double)
//   with grad != 0:  zg[r, v] = c exp(z_v - lse) - c [v == label_r]   (stored as T)
// so that dh = zg E follows as a second GEMM (zg in the dtype of E: xent_rows_f32 for an f32
// head, xent_rows_bf16 for a bf16 one). Labels are valid (checked on the host).
#include "common.cuh"

using bf16 = __nv_bfloat16;
constexpr int XENT_THREADS = 256;

template <typename T>
__device__ __forceinline__ void xent_rows(const float* __restrict__ z, const int* __restrict__ labels, float* __restrict__ loss,
                                          T* __restrict__ zg, int vocab, float c, int grad) {
    __shared__ double sh[XENT_THREADS];
    __shared__ float shm[XENT_THREADS];
    const long long row = blockIdx.x;
    const float* zr = z + row * vocab;
    float mx = -INFINITY;
    for (int v = threadIdx.x; v < vocab; v += XENT_THREADS) mx = fmaxf(mx, zr[v]);
    shm[threadIdx.x] = mx;
    __syncthreads();
    for (int s = XENT_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) shm[threadIdx.x] = fmaxf(shm[threadIdx.x], shm[threadIdx.x + s]);
        __syncthreads();
    }
    mx = shm[0];
    double sum = 0.0;
    for (int v = threadIdx.x; v < vocab; v += XENT_THREADS) sum += (double)expf(zr[v] - mx);
    sh[threadIdx.x] = sum;
    __syncthreads();
    for (int s = XENT_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    sum = sh[0];
    const int label = labels[row];
    if (threadIdx.x == 0) loss[row] = (float)((double)mx + log(sum) - (double)zr[label]);
    if (grad) {
        float k = (float)((double)c / sum);
        T* gr = zg + row * vocab;
        for (int v = threadIdx.x; v < vocab; v += XENT_THREADS) {
            float p = expf(zr[v] - mx) * k;
            gr[v] = wegeft::from_f32<T>(v == label ? p - c : p);
        }
    }
}

extern "C" __global__ void __launch_bounds__(XENT_THREADS) xent_rows_f32(
    const float* __restrict__ z, const int* __restrict__ labels, float* __restrict__ loss, float* __restrict__ zg, int vocab,
    float c, int grad) {
    xent_rows<float>(z, labels, loss, zg, vocab, c, grad);
}
extern "C" __global__ void __launch_bounds__(XENT_THREADS) xent_rows_bf16(
    const float* __restrict__ z, const int* __restrict__ labels, float* __restrict__ loss, bf16* __restrict__ zg, int vocab,
    float c, int grad) {
    xent_rows<bf16>(z, labels, loss, zg, vocab, c, grad);
}
