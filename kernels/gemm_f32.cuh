// gemm_f32.cuh — gemm_kext_{nt,nn}_f32: the f32 FMA kernels.
// Part of the K-extended GEMM module: included by gemm_kext.cu (the kernel contract), in
// the order listed there; not compiled on its own.
#pragma once

// ------------------------------------------------------------------------------------------
// f32 kernel: plain FMA, 64x64 block tile, 16-deep k tiles, 4x4 outputs per thread.
// For tests and the f32 storage path; no alignment requirement at all.
// ------------------------------------------------------------------------------------------
namespace fm {
constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;
}

template <bool NN>
__device__ __forceinline__ void gemm_kext_fma(GEMM_KEXT_PARAMS(float)) {
  using namespace fm;
  __shared__ float As[BK][BM + 4];
  __shared__ float Bs[BK][BN + 4];
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  int tm, tn;
  gk::block_tile_coords((M + BM - 1) / BM, (N + BN - 1) / BN, tm, tn);
  const int m0 = tm * BM, n0 = tn * BN;
  const int KT1 = (K1 + BK - 1) / BK, KT2 = (K2 + BK - 1) / BK;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int t = 0; t < KT1 + KT2; ++t) {
    const bool second = t >= KT1;
    const float* A = second ? A2 : A1;
    const float* B = second ? B2 : B1;
    const int lda = second ? lda2 : lda1, ldb = second ? ldb2 : ldb1, K = second ? K2 : K1;
    const int kb = (second ? t - KT1 : t) * BK;
#pragma unroll
    for (int p = 0; p < (BM * BK) / THREADS; ++p) {
      const int idx = tid + p * THREADS;
      const int r = idx / BK, k = idx % BK;  // 16 consecutive threads read one row's k run
      const int gm = m0 + r, gk_ = kb + k;
      As[k][r] = (gm < M && gk_ < K) ? A[(size_t)gm * lda + gk_] : 0.f;
    }
#pragma unroll
    for (int p = 0; p < (BN * BK) / THREADS; ++p) {
      const int idx = tid + p * THREADS;
      if (!NN) {
        const int r = idx / BK, k = idx % BK;
        const int gn = n0 + r, gk_ = kb + k;
        Bs[k][r] = (gn < N && gk_ < K) ? B[(size_t)gn * ldb + gk_] : 0.f;
      } else {
        const int k = idx / BN, c = idx % BN;
        const int gk_ = kb + k, gn = n0 + c;
        Bs[k][c] = (gn < N && gk_ < K) ? B[(size_t)gk_ * ldb + gn] : 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  const bool read_d = beta != 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = m0 + ty + 16 * i;
    if (row >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = n0 + tx + 16 * j;
      if (col >= N) continue;
      float v = acc[i][j];
      if (bias != nullptr) v += bias[col];
      float* dp = D + (size_t)row * ldd + col;
      if (read_d) v = fmaf(beta, *dp, v);
      *dp = v;
    }
  }
}

extern "C" __global__ void __launch_bounds__(fm::THREADS) gemm_kext_nt_f32(GEMM_KEXT_PARAMS(float)) {
  gemm_kext_fma<false>(GEMM_KEXT_ARGS);
}
extern "C" __global__ void __launch_bounds__(fm::THREADS) gemm_kext_nn_f32(GEMM_KEXT_PARAMS(float)) {
  gemm_kext_fma<true>(GEMM_KEXT_ARGS);
}
