// gemm_sm90.cuh — gemm_kext_{nt,nn}_{bf16,f16}_sm90: the sm_90a wgmma kernels fed by
// cp.async.
// Part of the K-extended GEMM module: included by gemm_kext.cu (the kernel contract), in
// the order listed there; not compiled on its own.
#pragma once

// ------------------------------------------------------------------------------------------
// sm_90a kernel: wgmma.mma_async (m64n256k16) fed by a cp.async pipeline.
//
// Not TMA: tensor maps would move layout logic into the launcher (one CUtensorMap per operand
// and call, passed as __grid_constant__) and need a warp-specialised mbarrier pipeline; this
// kernel instead has all 256 threads fill the shared tiles with cp.async (the same
// K-extension / zero-fill / scalar-fallback logic as the sm_80 kernel) directly in the wgmma
// canonical 128-byte-swizzle layouts, and a proxy fence hands them to the async proxy.
//   block tile 128 x 256 x 64, 2 warpgroups; warpgroup g computes rows 64g..64g+63 x 256
//   columns with 4 wgmma m64n256k16 per k tile (128 f32 accumulators per thread).
//   Why 128 x 256: per 64-deep k tile an SM moves 48 KiB from L2 for 1024 tensor cycles
//   (48 B/clk; a 128 x 128 tile needs 64 B/clk, at the limit of what L2 delivers per SM) and
//   reads 80 KiB of shared memory (80 B/clk, under the 128 B/clk of the SM).
//   4 stages x 48 KiB (+1 KiB to align the stages to 1024 B) = 193 KiB, one block per SM.
//   Pipeline: tile t+2 is loaded while tile t is multiplied; wgmma groups are kept one deep
//   (wait_group 1), so the slot refilled in iteration t (that of tile t-2) is no longer read.
//   Shared layouts (16-byte chunk c, stage base 1024-aligned):
//     K-major (A; B of NT), rows of 64 k = 128 B:  row r, chunk c at  r*128 + ((c ^ (r&7))*16)
//       descriptor: SW128, SBO = 1024 B (8-row groups), LBO unused (16 B); k16 step = +32 B.
//     N-major (B of NN): four 64-column quarters of 64 k-rows x 128 B each (8 KiB apart);
//       k-row k, chunk c of quarter h at  h*8192 + k*128 + ((c ^ (k&7))*16)
//       descriptor: SW128, transposed B, LBO = 8192 B (next 64 columns), SBO = 1024 B
//       (next 8 k-rows); k16 step = +2048 B.
//   The layouts were checked against the canonical-layout definitions (PTX ISA "Shared Memory
//   Matrix Layout"; cute make_gmma_desc: Swizzle<3,4,3> over ((8,m),(T,2k)) K-major and
//   ((T,8,m),(8,k)) MN-major) by kernels/test/emulate_sm90.py; the whole kernel runs on the
//   host, wgmma emulated from those definitions, in tests/emulation/gemm_on_host.cpp.
//   ptxas (CUDA 13.0, sm_90a): 168-177 registers, 0 spills, 0 stack.
//   Built for a target without sm_90a features, the same names run the sm_80 body on the
//   two 128 x 128 halves of the block's tile (correct, same launch geometry).
// ------------------------------------------------------------------------------------------
namespace h90 {
constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4, THREADS = 256;
constexpr int NACC = BN / 2;                      // f32 accumulators per thread (64 x 256 / 128)
static_assert(NACC == 128, "the wgmma wrappers below are m64n256k16: 128 accumulators");
constexpr int A_BYTES = BM * BK * 2;              // 16 KiB
constexpr int B_BYTES = BN * BK * 2;              // 32 KiB
constexpr int STAGE_BYTES = A_BYTES + B_BYTES;    // 48 KiB
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;
static_assert(STAGES >= 3, "the refill distance is STAGES - 2");
static_assert(SMEM_BYTES == 4 * 49152 + 1024, "mirrored as geom::H_SMEM in src/cuda/gemm.rs");
static_assert(THREADS == tc::THREADS && BM == tc::BM && BN == tc::Wide::BN &&
                  SMEM_BYTES >= tc::Wide::SMEM_BYTES,
              "the non-sm_90a fallback runs the sm_80 wide tile in an _sm90 launch");
}  // namespace h90

// The wgmma body is compiled for sm_90a, and on the host by tests/emulation/gemm_on_host.cpp
// (WEGEFT_HOST_EMULATION), which supplies the asynchronous helpers below with their PTX
// semantics.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(WEGEFT_HOST_EMULATION)
#define GK_WGMMA_BODY 1
#endif

#if defined(GK_WGMMA_BODY)
namespace h90 {
// Shared-memory matrix descriptor, 128-byte swizzle; offsets in bytes (multiples of 16).
__device__ __forceinline__ uint64_t desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = 0;
  d |= (uint64_t)((addr >> 4) & 0x3FFF);
  d |= (uint64_t)((lbo >> 4) & 0x3FFF) << 16;
  d |= (uint64_t)((sbo >> 4) & 0x3FFF) << 32;
  d |= (uint64_t)1 << 62;
  return d;
}

// The epilogue of both wgmma kernels: one warpgroup's 64 x 256 accumulators (+ bias, + beta
// D) to D, inside M x N only. Accumulator layout of m64nNk16: acc[4j + 2h + e] is row
// 16*wrow + lane/4 + 8h, column 8j + 2*(lane%4) + e of the warpgroup's tile, whose first row is
// m0 + 64 wg. Two adjacent outputs go as one 32-bit store when `pair_store` (D 4-byte aligned,
// ldd even); D is read only when `read_d` (beta != 0). Both are the kernel's, computed once.
template <typename T>
__device__ __forceinline__ void store_tile(const float (&acc)[NACC], int m0, int n0, int wg, int wrow, int lane, int M,
                                           int N, const T* __restrict__ bias, float beta, T* __restrict__ D, int ldd,
                                           bool pair_store, bool read_d) {
  // A whole tile inside D: quad_store16 (the general loop below, with bounds, beta and scalar
  // or 4-byte stores, unrolls to thousands of instructions; on an H200 the 4-byte stores'
  // half-used sectors and that code's instruction fetch were a fifth of the TMA kernel's time:
  // 0.183 -> 0.162 ms at 4096^3).
  if (m0 + BM <= M && n0 + BN <= N && gk::quad_store_ok(D, ldd, bias, read_d)) {
    const int q = lane & 3;
    T* d0 = D + (size_t)(m0 + wg * 64 + wrow * 16 + (lane >> 2)) * ldd + n0;
    T* d1 = d0 + (size_t)8 * ldd;
    // Column pair 8 j + 2q of row h of the lane: accumulators 4 j + 2 h and + 1. The bias
    // pairs of 8 column blocks are loaded before their stores (a load after a store waits for
    // it: the compiler cannot tell that D and bias do not overlap).
#pragma unroll
    for (int g = 0; g < BN / 64; ++g) {
      float b[8][2];
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        b[jj][0] = b[jj][1] = 0.f;
        if (bias != nullptr) gk::bias_word(bias, n0 + (8 * g + jj) * 8 + 2 * q, b[jj][0], b[jj][1]);
      }
#pragma unroll
      for (int g4 = 0; g4 < 2; ++g4) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t p[4];  // blocks j0 .. j0 + 3, this lane's pair
          const int j0 = 8 * g + 4 * g4;
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            const float* a = &acc[4 * (j0 + jj) + 2 * h];
            const float* bj = b[4 * g4 + jj];
            p[jj] = gk::Ty<T>::pack2(bias ? a[0] + bj[0] : a[0], bias ? a[1] + bj[1] : a[1]);
          }
          gk::quad_store16((h ? d1 : d0) + j0 * 8, p, q);
        }
      }
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const int col = n0 + j * 8 + (lane & 3) * 2;
    if (col >= N) continue;
    const bool has1 = col + 1 < N;
    float b0, b1;
    gk::bias_pair<T>(bias, col, has1, b0, b1);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wg * 64 + wrow * 16 + (lane >> 2) + h * 8;
      if (row >= M) continue;
      T* dp = D + (size_t)row * ldd + col;
      float v0 = acc[4 * j + 2 * h] + b0;
      float v1 = acc[4 * j + 2 * h + 1] + b1;
      gk::store_pair<T>(dp, v0, v1, has1, beta, read_d, pair_store);
    }
  }
}
}  // namespace h90
#endif

#if defined(GK_WGMMA_BODY) && !defined(WEGEFT_HOST_EMULATION)
namespace h90 {
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from touching accumulator registers across async wgmma boundaries.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <typename T, int TRANS_B>
struct Wgmma;
template <int TRANS_B>
struct Wgmma<__nv_bfloat16, TRANS_B> {
  __device__ __forceinline__ static void run(float (&d)[NACC], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, 1, 1, 0, %131;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(1), "n"(TRANS_B));
  }
};
template <int TRANS_B>
struct Wgmma<__half, TRANS_B> {
  __device__ __forceinline__ static void run(float (&d)[NACC], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, 1, 1, 0, %131;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(1), "n"(TRANS_B));
  }
};
// m64n64k16 (32 accumulators a thread), for the rank tiles of wegeft_{fwd,bwd}_*_tma; TRANS_A:
// A MN-major (the backward's reduction tiles, whose A is G^T or x^T).
template <typename T, int TRANS_B, int TRANS_A = 0>
struct Wgmma64;
template <int TRANS_B, int TRANS_A>
struct Wgmma64<__nv_bfloat16, TRANS_B, TRANS_A> {
  __device__ __forceinline__ static void run(float (&d)[32], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, %36, %35;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(1), "n"(TRANS_B), "n"(TRANS_A));
  }
};
template <int TRANS_B, int TRANS_A>
struct Wgmma64<__half, TRANS_B, TRANS_A> {
  __device__ __forceinline__ static void run(float (&d)[32], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, %36, %35;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(1), "n"(TRANS_B), "n"(TRANS_A));
  }
};
}  // namespace h90
#endif

#if defined(GK_WGMMA_BODY)
namespace h90 {
// The first row and column of block tile number `tile` (grouped order, gk::tile_coords).
__device__ __forceinline__ void tile_origin(int tile, int tiles_m, int tiles_n, int& m0, int& n0) {
  int tm, tn;
  gk::tile_coords(tile, tiles_m, tiles_n, tm, tn);
  m0 = tm * BM;
  n0 = tn * BN;
}

// One stage of a wgmma kernel (A then B at `stage`, the layouts above): warpgroup wg's 4
// m64n256k16 steps issued as one group, then a wait until at most this group is in flight
// (the previous stage's wgmmas are done). With NA = 32 accumulators the steps are m64n64k16
// (wegeft_fwd's rank tiles): B is the first 64 rows (NT) or the first 64-column quarter (NN)
// of the same layout, so the descriptors are the same.
// TA (with NA = 32 and NN): A is MN-major too, stored like an NN B tile's quarters (the
// warpgroup's 64 rows are quarter wg: 64 k-rows x 128 B, 8 KiB apart), descriptors alike.
template <typename T, bool NN, int NA, bool TA = false>
__device__ __forceinline__ void mma_stage(float (&acc)[NA], uint32_t stage, int wg) {
  static_assert(NA == NACC || NA == 32, "m64n256k16 or m64n64k16");
  static_assert(!TA || (NN && NA == 32), "an MN-major A only in the m64n64k16 reduction tiles (B MN-major too)");
  const uint32_t sb = stage + A_BYTES;
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < BK / 16; ++ks) {
    const uint64_t da = TA ? desc(stage + wg * 8192 + ks * 2048, 8192, 1024) : desc(stage + wg * (64 * 128) + ks * 32, 16, 1024);
    const uint64_t db = NN ? desc(sb + ks * 2048, 8192, 1024) : desc(sb + ks * 32, 16, 1024);
    if constexpr (NA == NACC)
      Wgmma<T, NN ? 1 : 0>::run(acc, da, db);
    else
      Wgmma64<T, NN ? 1 : 0, TA ? 1 : 0>::run(acc, da, db);
  }
  wgmma_commit();
  wgmma_wait<1>();
  fence_regs(acc);
}
}  // namespace h90
#endif

template <typename T, bool NN>
__device__ __forceinline__ void gemm_kext_h90(GEMM_KEXT_PARAMS(T)) {
  int tm, tn;
  gk::block_tile_coords((M + h90::BM - 1) / h90::BM, (N + h90::BN - 1) / h90::BN, tm, tn);
  const int m0 = tm * h90::BM;
  const int n0 = tn * h90::BN;
#if defined(GK_WGMMA_BODY)
  using namespace h90;
  GK_DYNAMIC_SMEM(smem_h90, 1024);
  const uint32_t smem_base = (gk::smem_u32(smem_h90) + 1023u) & ~1023u;

  const int tid = threadIdx.x;
  const int wg = tid >> 7;            // warpgroup: rows 64*wg .. 64*wg+63 of the block tile
  const int wrow = (tid & 127) >> 5;  // warp within the warpgroup: 16 rows each
  const int lane = tid & 31;

  const bool vec1 = ((((uintptr_t)A1 | (uintptr_t)B1) & 15) == 0) && (((lda1 | ldb1) & 7) == 0);
  const bool vec2 = ((((uintptr_t)A2 | (uintptr_t)B2) & 15) == 0) && (((lda2 | ldb2) & 7) == 0);
  const int KT1 = (K1 + BK - 1) / BK;
  const int KT2 = (K2 + BK - 1) / BK;
  const int KT = KT1 + KT2;

  // General loader (any tile, predicated, either pair).
  auto load_tile = [&](int t, int slot) {
    const bool second = t >= KT1;
    const T* A = second ? A2 : A1;
    const T* B = second ? B2 : B1;
    const int lda = second ? lda2 : lda1;
    const int ldb = second ? ldb2 : ldb1;
    const int K = second ? K2 : K1;
    const int kb = (second ? t - KT1 : t) * BK;
    const bool vec = second ? vec2 : vec1;
    const uint32_t sa = smem_base + slot * STAGE_BYTES;
    const uint32_t sb = sa + A_BYTES;
    // A: 128 rows x 8 chunks = 1024 chunks, 4 per thread.
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int idx = tid + p * THREADS;
      const int r = idx >> 3, c = idx & 7;
      gk::load_tile_chunk<T>(sa + gk::swz8(r, c, 128), A, lda, M, K, m0 + r, kb + c * 8, vec);
    }
    if (!NN) {
      // B: 256 rows x 8 chunks = 2048 chunks, 8 per thread.
#pragma unroll
      for (int p = 0; p < 8; ++p) {
        const int idx = tid + p * THREADS;
        const int r = idx >> 3, c = idx & 7;
        gk::load_tile_chunk<T>(sb + gk::swz8(r, c, 128), B, ldb, N, K, n0 + r, kb + c * 8, vec);
      }
    } else {
      // B: 64 k-rows x 32 chunks = 2048 chunks, 8 per thread; chunk cn lies in quarter cn >> 3.
#pragma unroll
      for (int p = 0; p < 8; ++p) {
        const int idx = tid + p * THREADS;
        const int r = idx >> 5, cn = idx & 31;
        const int h = cn >> 3, c = cn & 7;
        gk::load_tile_chunk<T>(sb + h * 8192 + gk::swz8(r, c, 128), B, ldb, K, N, kb + r, n0 + cn * 8, vec);
      }
    }
  };

  // Fast path for the full tiles of an aligned first pair (as in the sm_80 kernel). Chunk p of
  // a thread lies 32 rows (A, NT B) or 8 k-rows (NN B) below chunk 0, i.e. 4096 / 1024 bytes
  // further in the swizzled tile (the XOR pattern repeats every 8 rows).
  const int KF = vec1 ? K1 / BK : 0;
  const T* fa[4];
  const T* fb[8];
  int fa_n[4], fb_n[8];
  uint32_t fa_dst, fb_dst;
  {
    const int r = tid >> 3, c = tid & 7;
    fa_dst = gk::swz8(r, c, 128);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int gm = m0 + r + p * 32;
      fa[p] = A1 + ((size_t)(gm < M ? gm : 0) * lda1 + c * 8);
      fa_n[p] = gm < M ? 16 : 0;
    }
    if (!NN) {
      fb_dst = fa_dst;
#pragma unroll
      for (int p = 0; p < 8; ++p) {
        const int gn = n0 + r + p * 32;
        fb[p] = B1 + ((size_t)(gn < N ? gn : 0) * ldb1 + c * 8);
        fb_n[p] = gn < N ? 16 : 0;
      }
    } else {
      const int kr = tid >> 5, cn = tid & 31;
      fb_dst = (cn >> 3) * 8192 + gk::swz8(kr, cn & 7, 128);
      const int gn = n0 + cn * 8;
      const int nb = max(0, min(8, N - gn)) * 2;
#pragma unroll
      for (int p = 0; p < 8; ++p) {
        fb[p] = B1 + ((size_t)(kr + p * 8) * ldb1 + (gn < N ? gn : 0));
        fb_n[p] = nb;
      }
    }
  }
  auto load = [&](int t, int slot) {
    if (t < KF) {
      const uint32_t sa = smem_base + slot * STAGE_BYTES;
      const uint32_t sb = sa + A_BYTES;
      const int ka = t * BK;
#pragma unroll
      for (int p = 0; p < 4; ++p) gk::cp_async_16(sa + fa_dst + p * 4096, fa[p] + ka, fa_n[p]);
#pragma unroll
      for (int p = 0; p < 8; ++p) {
        const T* src = NN ? fb[p] + (size_t)ka * ldb1 : fb[p] + ka;
        gk::cp_async_16(sb + fb_dst + p * (NN ? 1024 : 4096), src, fb_n[p]);
      }
    } else if (t < KT) {
      load_tile(t, slot);
    }
  };

  float acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.f;
  fence_regs(acc);

  // Prologue: tiles 0 .. STAGES-3 in flight.
#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    load(s, s);
    gk::cp_async_commit();
  }

  for (int t = 0; t < KT; ++t) {
    gk::cp_async_wait<STAGES - 3>();  // this thread's part of tile t has landed
    fence_proxy_async();              // ... and is visible to the async (wgmma) proxy
    __syncthreads();                  // everyone's; wgmma(t-2) finished in every warpgroup
    {
      const int tl = t + STAGES - 2;  // refill the slot of tile t-2
      load(tl, tl % STAGES);
      gk::cp_async_commit();
    }
    mma_stage<T, NN>(acc, smem_base + (t % STAGES) * STAGE_BYTES, wg);
  }
  wgmma_wait<0>();
  fence_regs(acc);
  gk::cp_async_wait_all();

  const bool pair_store = ((((uintptr_t)D) & 3) == 0) && ((ldd & 1) == 0);
  const bool read_d = beta != 0.f;
  store_tile<T>(acc, m0, n0, wg, wrow, lane, M, N, bias, beta, D, ldd, pair_store, read_d);
#else
  // Built for a target without sm_90a features (the compute_80 PTX, sm_80, or plain sm_90):
  // the block's 128 x 256 tile with the sm_80 wide body (gemm_kext_*_wide). Same launch
  // geometry, and it needs less dynamic shared memory than an _sm90 launch provides, so a
  // launch of these names is correct everywhere.
  gemm_kext_tc_tile<T, NN, tc::Wide>(m0, n0, GEMM_KEXT_ARGS);
#endif
}

#define GEMM_KEXT_H90(NAME, T, NN)                                                       \
  extern "C" __global__ void __launch_bounds__(h90::THREADS, 1) NAME(GEMM_KEXT_PARAMS(T)) { \
    gemm_kext_h90<T, NN>(GEMM_KEXT_ARGS);                                                \
  }

GEMM_KEXT_H90(gemm_kext_nt_bf16_sm90, __nv_bfloat16, false)
GEMM_KEXT_H90(gemm_kext_nn_bf16_sm90, __nv_bfloat16, true)
GEMM_KEXT_H90(gemm_kext_nt_f16_sm90, __half, false)
GEMM_KEXT_H90(gemm_kext_nn_f16_sm90, __half, true)
