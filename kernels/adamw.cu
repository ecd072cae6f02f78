// One AdamW step (torch.optim.AdamW semantics), f32, the exact operation order of the CPU
// optimiser (src/train/optim.rs); the host computes the step constants in f64:
//   p <- p * decay (when wd),  m <- m + w1 (g - m),  v <- v b2 + (w2 g) g,
//   p <- p + step_size * m / (sqrt(v) / bc2_sqrt + eps)
// with decay = 1 - lr wd, w1 = 1 - b1, w2 = 1 - b2, step_size = -lr / (1 - b1^t),
// bc2_sqrt = sqrt(1 - b2^t).
#include "common.cuh"

extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                                     long long n, int wd, float decay, float w1, float b2, float w2, float step_size,
                                     float bc2_sqrt, float eps) {
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (long long)gridDim.x * blockDim.x) {
        float gj = g[j];
        float pj = p[j];
        if (wd) pj = __fmul_rn(pj, decay);
        float mj = __fadd_rn(m[j], __fmul_rn(w1, __fsub_rn(gj, m[j])));
        float vj = __fadd_rn(__fmul_rn(v[j], b2), __fmul_rn(__fmul_rn(w2, gj), gj));
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vj), bc2_sqrt), eps);
        p[j] = __fadd_rn(pj, __fmul_rn(step_size, __fdiv_rn(mj, denom)));
        m[j] = mj;
        v[j] = vj;
    }
}
