// Small elementwise helpers of the model's CUDA backend (src/cuda/backend.rs). All f32 math;
// one thread per element in a grid-stride loop.
//
//   add_f32            y[i] += x[i]
//   add_out_f32        out[i] = a[i] + b[i]
//   add_bias_f32       y[r, c] += bias[c]                 (rows of width dim)
//   cast_f32_bf16      y[i] = bf16(x[i])                 (round to nearest even)
//   cast_bf16_f32      y[i] = x[i]  or  y[i] += x[i]     (accumulate != 0)
//   gather_rows_T      dst[r, :] = T(src[idx[r], :])     (rows of width dim; T = f32, bf16)
//   scatter_rows_f32   dst[idx[r], :] = src[r, :]
//   split_f32_bf16x2   y[r, :] = [bf16(x[r, :]) | bf16(x[r, :] - bf16(x[r, :]))]  (src/cuda/product.rs)
//   add_halves_f32     y[r, c] = d[r, c] + d[r, cols + c] (+ beta y[r, c])      (src/cuda/product.rs)
#include "common.cuh"

using bf16 = __nv_bfloat16;

#define GRID_STRIDE(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void add_f32(float* __restrict__ y, const float* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) { y[i] += x[i]; }
}

extern "C" __global__ void add_out_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                                       long long n) {
    GRID_STRIDE(i, n) { out[i] = a[i] + b[i]; }
}

extern "C" __global__ void add_bias_f32(float* __restrict__ y, const float* __restrict__ bias, long long rows, int dim) {
    GRID_STRIDE(i, rows * dim) { y[i] += bias[i % dim]; }
}

extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ y, long long n) {
    GRID_STRIDE(i, n) { y[i] = wegeft::from_f32<bf16>(x[i]); }
}

extern "C" __global__ void cast_bf16_f32(const bf16* __restrict__ x, float* __restrict__ y, long long n, int accumulate) {
    GRID_STRIDE(i, n) {
        float v = wegeft::to_f32(x[i]);
        y[i] = accumulate ? y[i] + v : v;
    }
}

template <typename T>
__device__ __forceinline__ void gather_rows(const float* __restrict__ src, const int* __restrict__ idx, T* __restrict__ dst,
                                            long long rows, int dim) {
    GRID_STRIDE(i, rows * dim) {
        long long r = i / dim;
        int c = (int)(i - r * dim);
        dst[i] = wegeft::from_f32<T>(src[(long long)idx[r] * dim + c]);
    }
}
extern "C" __global__ void gather_rows_f32(const float* __restrict__ src, const int* __restrict__ idx, float* __restrict__ dst,
                                           long long rows, int dim) {
    gather_rows<float>(src, idx, dst, rows, dim);
}
extern "C" __global__ void gather_rows_bf16(const float* __restrict__ src, const int* __restrict__ idx, bf16* __restrict__ dst,
                                            long long rows, int dim) {
    gather_rows<bf16>(src, idx, dst, rows, dim);
}

extern "C" __global__ void scatter_rows_f32(const float* __restrict__ src, const int* __restrict__ idx, float* __restrict__ dst,
                                            long long rows, int dim) {
    GRID_STRIDE(i, rows * dim) {
        long long r = i / dim;
        int c = (int)(i - r * dim);
        dst[(long long)idx[r] * dim + c] = src[i];
    }
}

// x = hi + lo with hi = bf16(x) and lo = bf16(x - hi): an f32 operand as two bf16 ones, for a
// bf16 product that carries x to about 2^-17 of its size (the rank-r dphi through cuBLASLt).
// x is rows x cols; row r of y (rows x 2 cols) is [hi(x[r, :]) | lo(x[r, :])], so that one
// product W^T y reads W once and gives W^T hi beside W^T lo (added by add_halves_f32).
extern "C" __global__ void split_f32_bf16x2(const float* __restrict__ x, bf16* __restrict__ y, long long rows, int cols) {
    GRID_STRIDE(i, rows * cols) {
        const long long r = i / cols, c = i - r * cols;
        const bf16 h = wegeft::from_f32<bf16>(x[i]);
        y[r * 2 * cols + c] = h;
        y[r * 2 * cols + cols + c] = wegeft::from_f32<bf16>(x[i] - wegeft::to_f32(h));
    }
}

// y[r, c] = d[r, c] + d[r, cols + c] (+ beta y[r, c] when beta != 0; y is not read otherwise):
// the two halves of split_f32_bf16x2's product, into y (row stride ldy).
extern "C" __global__ void add_halves_f32(const float* __restrict__ d, float* __restrict__ y, long long rows, int cols,
                                          long long ldy, float beta) {
    GRID_STRIDE(i, rows * cols) {
        const long long r = i / cols, c = i - r * cols;
        float v = d[r * 2 * cols + c] + d[r * 2 * cols + cols + c];
        if (beta != 0.0f) v += beta * y[r * ldy + c];
        y[r * ldy + c] = v;
    }
}
