// Embedding lookup (frozen table, no backward): out[t, :] = table[ids[t], :], f32 out.
// embedding_f32 reads an f32 table, embedding_bf16 a bf16 one. Ids are checked on the host.
#include "common.cuh"

using bf16 = __nv_bfloat16;

template <typename T>
__device__ __forceinline__ void embedding(const T* __restrict__ table, const unsigned* __restrict__ ids, float* __restrict__ out,
                                          long long rows, int dim) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < rows * dim; i += (long long)gridDim.x * blockDim.x) {
        long long t = i / dim;
        int c = (int)(i - t * dim);
        out[i] = wegeft::to_f32(table[(long long)ids[t] * dim + c]);
    }
}

extern "C" __global__ void embedding_f32(const float* __restrict__ table, const unsigned* __restrict__ ids, float* __restrict__ out,
                                         long long rows, int dim) {
    embedding<float>(table, ids, out, rows, dim);
}
extern "C" __global__ void embedding_bf16(const bf16* __restrict__ table, const unsigned* __restrict__ ids, float* __restrict__ out,
                                          long long rows, int dim) {
    embedding<bf16>(table, ids, out, rows, dim);
}
