// RMSNorm (HF LlamaRMSNorm) on f32 rows, one 256-thread block per row. As the CPU op
// (src/cpu/ops.rs), the row sums are accumulated in double:
//
//   rmsnorm_fwd_f32   rstd = 1 / sqrt(f32(sum_j x_j^2 / d) + eps),  y_j = w_j * (x_j * rstd)
//   rmsnorm_fwd_f32_bf16   the same with y stored in bf16
//   rmsnorm_bwd_f32   g_j = dy_j w_j,  c = f32(sum_j g_j x_j) rstd^3 / d,
//                     dx_j += rstd g_j - c x_j          (accumulates into dx)
#include "common.cuh"

constexpr int NORM_THREADS = 256;

// Sum of one double per thread over the block; every thread gets the total. Fixed order.
__device__ __forceinline__ double block_sum(double v, double* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = NORM_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    double t = sh[0];
    __syncthreads();
    return t;
}

// y stored as Y: f32, or bf16 (rounded once from the f32 value) when y is only read by products
// in bf16 (Backend::operand).
template <typename Y>
__device__ __forceinline__ void rmsnorm_fwd(const float* __restrict__ x, const float* __restrict__ w, Y* __restrict__ y,
                                            float* __restrict__ rstd, int dim, float eps) {
    __shared__ double sh[NORM_THREADS];
    const long long row = blockIdx.x;
    const float* xr = x + row * dim;
    double ss = 0.0;
    for (int j = threadIdx.x; j < dim; j += NORM_THREADS) ss += (double)xr[j] * (double)xr[j];
    ss = block_sum(ss, sh);
    float var = (float)(ss / (double)dim);
    float rs = 1.0f / sqrtf(var + eps);
    if (threadIdx.x == 0) rstd[row] = rs;
    Y* yr = y + row * dim;
    for (int j = threadIdx.x; j < dim; j += NORM_THREADS) yr[j] = wegeft::from_f32<Y>(w[j] * (xr[j] * rs));
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rmsnorm_fwd_f32(
    const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, float* __restrict__ rstd, int dim, float eps) {
    rmsnorm_fwd(x, w, y, rstd, dim, eps);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rmsnorm_fwd_f32_bf16(
    const float* __restrict__ x, const float* __restrict__ w, __nv_bfloat16* __restrict__ y, float* __restrict__ rstd, int dim,
    float eps) {
    rmsnorm_fwd(x, w, y, rstd, dim, eps);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rmsnorm_bwd_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ rstd, const float* __restrict__ dy,
    float* __restrict__ dx, int dim) {
    __shared__ double sh[NORM_THREADS];
    const long long row = blockIdx.x;
    const float* xr = x + row * dim;
    const float* gr = dy + row * dim;
    double dot = 0.0;
    for (int j = threadIdx.x; j < dim; j += NORM_THREADS) dot += (double)(gr[j] * w[j]) * (double)xr[j];
    dot = block_sum(dot, sh);
    float r = rstd[row];
    float c = (float)dot * r * r * r / (float)dim;
    float* dr = dx + row * dim;
    for (int j = threadIdx.x; j < dim; j += NORM_THREADS) dr[j] += r * (gr[j] * w[j]) - c * xr[j];
}
