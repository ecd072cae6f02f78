// wegeft_uc.cuh — wegeft_uc_{bf16,f16}: the fused forward's second operand pair, u and C,
// in one launch.
// Part of the K-extended GEMM module: included by gemm_kext.cu (the kernel contract), in
// the order listed there; not compiled on its own.
#pragma once

// ------------------------------------------------------------------------------------------
// The second operand pair of the fused forward, in one launch: wegeft_uc_{bf16,f16}
//
//   u = x psi^T      (T x r;     x T x d_in, ld ldx; psi r x d_in, ld d_in)    blocks 0 .. UB-1
//   C = alpha W phi  (d_out x r; W d_out x d_in, ld ldw; phi d_in x r, ld r)   blocks UB ..
// UB = ceil(T / 64); u and C are stored with ld r, rounded once from f32. Requires 1 <= r <= 64,
// r, ldx, ldw and d_in multiples of 8, every base 16-byte aligned (the launcher checks; the
// layer falls back to its separate products otherwise). Tails in T, d_out and d_in are
// zero-filled.
// Block: 128 threads (4 warps), a 64-row block of u or C; warp w owns rows 16w..16w+15 and all
// 64 columns (8 mma.m16n8k16 per k16 step, 32 f32 accumulators). K runs over d_in in tiles of
// 32 through a 3-stage cp.async pipeline, 24 KiB of dynamic shared memory: with the TMA
// GEMM's 200 KiB (and its 168 registers a thread) a block of each fits on an SM.
// Launch: grid ceil(T / 64) + ceil(d_out / 64), block 128, dynamic smem uc::SMEM_BYTES.
// The A tile (x or W rows) and psi use the sm_80 kernel's K-major swizzle (4 chunks a row);
// phi tiles are 32 k-rows x 64 columns, 8 chunks a row, chunk c of row k at
// k*128 + ((c ^ (k & 7)) * 16), read with ldmatrix.trans.
// On sm_90 the kernel first allows its dependent grid to launch (griddepcontrol
// .launch_dependents): the fused forward's GEMM, launched as a programmatic dependent, then
// multiplies x and W while this grid runs and waits for it only before its u / C k tiles.
// ------------------------------------------------------------------------------------------
namespace uc {
constexpr int BM = 64, BN = 64, BK = 32, STAGES = 3, THREADS = 128;
constexpr int A_BYTES = BM * BK * 2;              // 4 KiB
constexpr int B_BYTES = BN * BK * 2;              // 4 KiB
constexpr int STAGE_BYTES = A_BYTES + B_BYTES;    // 8 KiB
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;  // 24 KiB, dynamic
static_assert(SMEM_BYTES == 24576 && THREADS == 128 && BM == 64, "mirrored as geom::UC_* in src/cuda/gemm.rs");
}  // namespace uc

template <typename T>
__device__ __forceinline__ void wegeft_uc(int T_, int d_in, int d_out, int r, const T* __restrict__ x, int ldx,
                                          const T* __restrict__ psi, T* __restrict__ u, const T* __restrict__ w, int ldw,
                                          const T* __restrict__ phi, T* __restrict__ c, float alpha) {
  using namespace uc;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(WEGEFT_HOST_EMULATION)
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  GK_DYNAMIC_SMEM(smem_uc, 128);
  const uint32_t base = gk::smem_u32(smem_uc);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ub = (T_ + BM - 1) / BM;
  const bool is_c = (int)blockIdx.x >= ub;  // uniform over the block
  const int m0 = (is_c ? (int)blockIdx.x - ub : (int)blockIdx.x) * BM;
  const int rows = is_c ? d_out : T_;
  const T* A = is_c ? w : x;
  const int lda = is_c ? ldw : ldx;
  const int KT = (d_in + BK - 1) / BK;

  // Stage `slot` <- k tile t: A 64 rows x 4 chunks (2 per thread); B: psi 64 rows x 4 chunks
  // (u) or phi 32 k-rows x 8 chunks (C), 2 per thread. Out-of-range chunks are zero-filled.
  auto load = [&](int t, int slot) {
    if (t >= KT) return;
    const uint32_t sa = base + slot * STAGE_BYTES, sb = sa + A_BYTES;
    const int kb = t * BK;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int idx = tid + p * THREADS;
      const int rr = idx >> 2, ch = idx & 3;
      const int gm = m0 + rr, kk = kb + ch * 8;
      const bool ok = gm < rows && kk < d_in;
      gk::cp_async_16(sa + gk::swz_k32(rr, ch), ok ? (const void*)(A + (size_t)gm * lda + kk) : (const void*)A,
                      ok ? 16 : 0);
      if (!is_c) {
        const bool okb = rr < r && kk < d_in;
        gk::cp_async_16(sb + gk::swz_k32(rr, ch),
                        okb ? (const void*)(psi + (size_t)rr * d_in + kk) : (const void*)psi, okb ? 16 : 0);
      } else {
        const int kr = idx >> 3, cn = idx & 7;
        const bool okb = kb + kr < d_in && cn * 8 < r;
        gk::cp_async_16(sb + gk::swz8(kr, cn, 128),
                        okb ? (const void*)(phi + (size_t)(kb + kr) * r + cn * 8) : (const void*)phi, okb ? 16 : 0);
      }
    }
  };

  float acc[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[j][q] = 0.f;

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    load(st, st);
    gk::cp_async_commit();
  }
  for (int t = 0; t < KT; ++t) {
    gk::cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile t is in for everyone; the slot of tile t - 1 is free
    load(t + STAGES - 1, (t + STAGES - 1) % STAGES);
    gk::cp_async_commit();
    const uint32_t sa = base + (t % STAGES) * STAGE_BYTES, sb = sa + A_BYTES;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t af[4];
      {
        const int rr = warp * 16 + (lane & 15), ch = ks * 2 + (lane >> 4);
        gk::ldmatrix_x4(af, sa + gk::swz_k32(rr, ch));
      }
#pragma unroll
      for (int jp = 0; jp < 4; ++jp) {
        uint32_t bq[4];
        if (!is_c) {
          const int rr = jp * 16 + (lane & 7) + ((lane >> 4) << 3), ch = ks * 2 + ((lane >> 3) & 1);
          gk::ldmatrix_x4(bq, sb + gk::swz_k32(rr, ch));
        } else {
          const int kr = ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), cn = jp * 2 + (lane >> 4);
          gk::ldmatrix_x4_trans(bq, sb + gk::swz8(kr, cn, 128));
        }
        const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
        gk::Ty<T>::mma(acc[2 * jp], af, b0);
        gk::Ty<T>::mma(acc[2 * jp + 1], af, b1);
      }
    }
  }
  gk::cp_async_wait_all();

  T* out = is_c ? c : u;
  const float scale = is_c ? alpha : 1.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int col = j * 8 + (lane & 3) * 2;
    if (col >= r) continue;  // r is even: col + 1 < r too
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + warp * 16 + (lane >> 2) + h * 8;
      if (row >= rows) continue;
      *reinterpret_cast<uint32_t*>(out + (size_t)row * r + col) =
          gk::Ty<T>::pack2(scale * acc[j][2 * h], scale * acc[j][2 * h + 1]);
    }
  }
}

#define WEGEFT_UC(NAME, T)                                                                                             \
  extern "C" __global__ void __launch_bounds__(uc::THREADS) NAME(                                                      \
      int T_, int d_in, int d_out, int r, const T* __restrict__ x, int ldx, const T* __restrict__ psi,                 \
      T* __restrict__ u, const T* __restrict__ w, int ldw, const T* __restrict__ phi, T* __restrict__ c, float alpha) { \
    wegeft_uc<T>(T_, d_in, d_out, r, x, ldx, psi, u, w, ldw, phi, c, alpha);                                           \
  }
WEGEFT_UC(wegeft_uc_bf16, __nv_bfloat16)
WEGEFT_UC(wegeft_uc_f16, __half)
