// gemm_kext.cu — the K-extended GEMM core of wegeft (fused WeGeFT forward and input gradient).
//
// ===================================== KERNEL CONTRACT =====================================
// All matrices are row-major; a leading dimension (ld*) is the distance in ELEMENTS between
// two consecutive rows. Compute is f32 (tensor-core f32 accumulation for bf16/f16).
//
//   NT form (forward, y = [x|u] [W|C]^T + b):
//     D[M x N] = A1[M x K1] * B1[N x K1]^T + A2[M x K2] * B2[N x K2]^T  (+ bias[N])  (+ beta * D)
//   NN form (input gradient, dx = [G|v] [W;psi]):
//     D[M x N] = A1[M x K1] * B1[K1 x N]   + A2[M x K2] * B2[K2 x N]    (+ bias[N])  (+ beta * D)
//
//   * One accumulator: the K loop runs over the K1 tiles of (A1,B1), then over the K2 tiles of
//     (A2,B2); one epilogue. K2 may be 0 (a plain GEMM; A2/B2 are then never read and may be
//     null). K1 may be 0 too (then only the second pair contributes).
//   * bias: optional (nullptr = none), N elements in the storage dtype, added in f32.
//   * beta: if beta == 0.0f the old D is NOT read (NaN garbage in D cannot propagate);
//     otherwise D_new = acc + bias + beta * D_old, computed in f32 and rounded once (RN).
//   * M, N >= 1 ; K1, K2 >= 0; every ld >= the number of columns of its matrix; all of them fit
//     in a signed 32-bit int (row offsets are computed in 64 bits).
//   * Tails: any M, N, K1, K2. Out-of-range rows/columns are zero-filled in shared memory
//     (cp.async with src-size < 16 zero-fills the rest of a 16-byte chunk) and never stored.
//   * Alignment: none required beyond the natural 2-byte (bf16/f16) or 4-byte (f32) alignment.
//     The tensor-core kernels test at run time, per operand pair, whether both base pointers
//     are 16-byte aligned and both lds are multiples of 8 elements; if so that pair is fed by
//     16-byte cp.async (the fast path), otherwise by predicated scalar loads stored into the
//     same swizzled shared layout (correct, slower). The epilogue stores two adjacent outputs
//     as one 32-bit word when D is 4-byte aligned and ldd is even, else element by element.
//     So no layout is rejected for alignment; the launcher (src/cuda/gemm.rs) reports which
//     pairs are fast (`GemmKext::fast_path`), and callers should pad rows to 8 elements.
//   * D must not alias A1, B1, A2, B2 or bias.
//
// Kernels (extern "C", the same parameter list for all):
//   gemm_kext_nt_bf16  gemm_kext_nt_f16  gemm_kext_nn_bf16  gemm_kext_nn_f16      (sm_80+)
//   gemm_kext_nt_bf16_wide  gemm_kext_nt_f16_wide  gemm_kext_nn_bf16_wide  gemm_kext_nn_f16_wide
//       (sm_80+, the same body with a 128 x 256 block tile)
//   gemm_kext_nt_f32   gemm_kext_nn_f32                                           (any, FMA)
//   gemm_kext_nt_bf16_sm90  gemm_kext_nn_bf16_sm90  gemm_kext_nt_f16_sm90  gemm_kext_nn_f16_sm90
//       (wgmma in the sm_90a cubin; built for any other target they run the sm_80 body)
//   gemm_kext_nt_bf16_tma   gemm_kext_nn_bf16_tma   gemm_kext_nt_f16_tma   gemm_kext_nn_f16_tma
//       (TMA + wgmma, warp-specialised; sm_90a only; four CUtensorMap parameters first)
//
//   (int M, int N, int K1, int K2,
//    const T* A1, int lda1, const T* B1, int ldb1,
//    const T* A2, int lda2, const T* B2, int ldb2,
//    const T* bias, float beta, T* D, int ldd)
//
// Launch geometry (the launcher computes it; constants below, mirrored in gemm.rs):
//   tensor-core sm_80: block 256 threads, grid.x = ceil(M/128) * ceil(N/128),
//                      dynamic smem = tc::Narrow::SMEM_BYTES = 65536 B (needs the opt-in
//                      attribute); _wide: grid.x = ceil(M/128) * ceil(N/256), dynamic smem
//                      tc::Wide::SMEM_BYTES = 98304 B.
//   f32 FMA:           block 256 threads, grid.x = ceil(M/64) * ceil(N/64), no dynamic smem.
//   sm_90a:            block 256 threads, grid.x = ceil(M/128) * ceil(N/256),
//                      dynamic smem = h90::SMEM_BYTES = 4 * 48 KiB + 1 KiB = 197632 B.
//   sm_90a TMA:        block 288 threads, the same grid and dynamic smem (t90::SMEM_BYTES),
//                      or fewer blocks (persistent); waits (griddepcontrol.wait) before the
//                      second pair, so it may be launched as a programmatic dependent of the
//                      kernel that writes that pair.
//
// Also here, for the fused forward: wegeft_uc_bf16 / wegeft_uc_f16 compute its second pair,
// u = x psi^T and C = alpha W phi, in one launch (section "The second operand pair" below); and
// built on the TMA kernel, wegeft_fwd_{bf16,f16}_tma (u, C and y) and wegeft_bwd_{bf16,f16}_tma
// (v, S, dpsi, dphi and dx), the whole forward and backward in one launch each (last section).
// ===========================================================================================
//
// Design of the sm_80 tensor-core kernels
//   block tile 128 x BN x 32, 8 warps as 2 (M) x 4 (N), in two sizes (tc::Narrow, tc::Wide):
//     BN = 128 (gemm_kext_{nt,nn}_{bf16,f16}): warp tile 64 x 32
//       -> per k16 step a warp issues 4 (A) + 2 (B) ldmatrix.x4 and 16 mma.m16n8k16,
//          64 f32 accumulators per thread; __launch_bounds__(256, 2) caps registers at 128 so
//          two blocks share an SM (2 x 64 KiB smem fits the 164 KiB of an A100 and 228 KiB of
//          an H100).
//     BN = 256 (..._wide): warp tile 64 x 64
//       -> per k16 step 4 (A) + 4 (B) ldmatrix.x4 and 32 mma, 128 accumulators a thread;
//          __launch_bounds__(256, 1) (236-243 registers), one block an SM, 96 KiB of smem
//          (fits every sm_80+ part, the 99 KiB of an sm_86 / sm_89 included). Its fragments
//          are double-buffered: the next k16 step's (across tiles too: the barrier comes
//          before the last step's mma) are read while this step's mma run, so neither the
//          ldmatrix latency nor the barrier leaves the tensor pipe idle.
//     Why two: mma.sync on Hopper is fed from shared memory (128 B a cycle an SM) at a rate
//     that bounds it well below the tensor cores' peak. Per FLOP the narrow tile moves 3/64 B
//     through ldmatrix plus 1/64 B of cp.async stores; the wide one 2/64 plus 0.75/64: 0.0625
//     against 0.043 B a FLOP, about 45% more FLOPs a cycle at the same efficiency (the narrow
//     tile measured 0.37-0.41x cuBLAS on an H200; this count caps it near 0.6x, the wide one
//     near mma.sync's own limit). The wide tile gives half as many tiles, so the launcher
//     takes it only once they give every SM one (src/cuda/gemm.rs, `tc_wide`).
//   4-stage cp.async pipeline (3 tiles in flight while one is computed), one __syncthreads per
//   k tile. Stage = A tile 128x32 (8 KiB) + B tile BN x 32 (8 or 16 KiB).
//   Shared layouts (all 16-byte chunks, XOR-swizzled so that both the cp.async stores and the
//   ldmatrix reads touch 8 distinct 16-byte bank groups per 8-lane phase — conflict free):
//     "K-major" tile (A, and B of NT): 128 (BN) rows x 32 k = 4 chunks of 8 per 64-byte row;
//        chunk c of row r lives at  r*64 + ((c ^ ((r >> 1) & 3)) * 16).
//        (8 consecutive rows = 512 bytes; rows r and r^1 share a 128-byte line, the XOR with
//         (r>>1)&3 spreads the 4 line-pairs over the 4 chunk slots.)
//     "N-major" tile (B of NN): 32 k-rows x BN n = BN/8 chunks per 2 BN-byte row;
//        chunk c of row k lives at  k*2BN + ((c ^ (k & 7)) * 16).
//   Fragments: A via ldmatrix.x4; B of NT via ldmatrix.x4 (rows = n, so the non-transposed
//   8x8 gives the "col" B fragment directly); B of NN via ldmatrix.x4.trans (rows = k).
//   K extension: tile t < KT1 = ceil(K1/32) reads (A1,B1) at k = 32 t, tile t >= KT1 reads
//   (A2,B2) at k = 32 (t - KT1). The partial last tile of each pair is zero-filled.
//   Loads: the full k tiles of the first pair (k + 32 <= K1), when that pair passes the
//   alignment test, take a hoisted path (per-thread source pointers and byte counts computed
//   once; ~20 instructions and 4 cp.async per tile). Every other tile (the partial last tile of
//   K1, all K2 tiles, unaligned pairs) takes the general predicated loader.
//   Block order: grouped rasterisation (8 block-rows per group) for L2 reuse.
//   ptxas (CUDA 13.0): 124-128 registers (wide: 236-243), 0 spills, 0 stack, sm_80 and sm_90a.
//   Verified without a GPU by tests/emulation/gemm_on_host.cpp (run by `cargo test`): this
//   source compiled on the host, every block run as 256 fibers, cp.async / ldmatrix /
//   mma.m16n8k16 emulated with their PTX semantics, against a double-precision loop (odd
//   sizes, both load paths, bias, beta, NaN padding); and earlier by kernels/test/emulate_sm80.py,
//   a literal Python translation of the index math.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// ------------------------------------------------------------------------------------------
// PTX helpers. tests/emulation/gemm_on_host.cpp compiles this file with a host C++ compiler
// (WEGEFT_HOST_EMULATION) and supplies these with the instructions' PTX semantics instead.
// ------------------------------------------------------------------------------------------
#ifndef WEGEFT_HOST_EMULATION
// The dynamic shared memory of a block, aligned to `align` bytes.
#define GK_DYNAMIC_SMEM(name, align) extern __shared__ __align__(align) unsigned char name[]

namespace gk {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared, bypassing L1. Reads `src_bytes` (0..16) bytes and
// zero-fills the rest of the 16-byte destination. With src_bytes == 0 nothing is read.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a b: mma.sync m16n8k16, row-major A, column-major B, f32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                     const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace gk
#endif  // WEGEFT_HOST_EMULATION

namespace gk {

// Storage-type traits: the mma instruction and f32 <-> storage conversions.
template <typename T>
struct Ty;
template <>
struct Ty<__nv_bfloat16> {
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    mma_m16n8k16<__nv_bfloat16>(d, a, b);
  }
  __device__ __forceinline__ static float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_f32(float v) {
    return __float2bfloat16_rn(v);
  }
  // Two values packed in one 32-bit word, the lower column in the low half.
  __device__ __forceinline__ static uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <>
struct Ty<__half> {
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    mma_m16n8k16<__half>(d, a, b);
  }
  __device__ __forceinline__ static float to_f32(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_f32(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// The epilogues' bias for outputs col and col + 1 (0 without a bias; b1 only when has1).
template <typename T>
__device__ __forceinline__ void bias_pair(const T* bias, int col, bool has1, float& b0, float& b1) {
  b0 = 0.f;
  b1 = 0.f;
  if (bias != nullptr) {
    b0 = Ty<T>::to_f32(bias[col]);
    if (has1) b1 = Ty<T>::to_f32(bias[col + 1]);
  }
}

// The epilogues' store of one or two adjacent outputs of D (dp[0], and dp[1] when has1):
// + beta * D when read_d (beta != 0; D is not read otherwise), rounded once; one 32-bit store
// when pair_store (D 4-byte aligned, ldd even).
template <typename T>
__device__ __forceinline__ void store_pair(T* dp, float v0, float v1, bool has1, float beta, bool read_d, bool pair_store) {
  if (read_d) {
    v0 = fmaf(beta, Ty<T>::to_f32(dp[0]), v0);
    if (has1) v1 = fmaf(beta, Ty<T>::to_f32(dp[1]), v1);
  }
  if (has1 && pair_store) {
    *reinterpret_cast<uint32_t*>(dp) = Ty<T>::pack2(v0, v1);
  } else {
    dp[0] = Ty<T>::from_f32(v0);
    if (has1) dp[1] = Ty<T>::from_f32(v1);
  }
}

// The tensor-core epilogues' fast store. A quad of lanes (q = lane % 4) holds one row of 4
// column blocks of 8, lane q the pair of columns 2q, 2q + 1 of each, packed in p[0..3]; a 4 x 4
// transpose within the quad (round k: lane q sends its pair of block q ^ k and receives lane
// (q ^ k)'s pair of block q, word q ^ k of it) leaves lane q with block q, stored as 16
// contiguous bytes at row + 8 q (which must be 16-byte aligned). Full 32-byte sectors, a
// quarter of the store instructions of pair stores.
template <typename T>
__device__ __forceinline__ void quad_store16(T* row, const uint32_t (&p)[4], int q) {
  uint32_t o[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int src = q ^ k;
    const uint32_t send = src == 0 ? p[0] : src == 1 ? p[1] : src == 2 ? p[2] : p[3];
    const uint32_t got = k == 0 ? send : __shfl_xor_sync(0xffffffffu, send, k);
    if (src == 0) o[0] = got;
    if (src == 1) o[1] = got;
    if (src == 2) o[2] = got;
    if (src == 3) o[3] = got;
  }
  *reinterpret_cast<uint4*>(row + 8 * q) = make_uint4(o[0], o[1], o[2], o[3]);
}

// Whether an epilogue may take quad_store16 for a whole tile: no old D to read, D 16-byte
// aligned with ldd a multiple of 8 (every row start 16-byte aligned), a 4-byte aligned bias (or
// none, read as 32-bit pairs).
template <typename T>
__device__ __forceinline__ bool quad_store_ok(const T* D, int ldd, const T* bias, bool read_d) {
  return !read_d && (((uintptr_t)D) & 15) == 0 && (ldd & 7) == 0 && ((uintptr_t)bias & 3) == 0;
}

// The bias of columns col and col + 1 as one 32-bit load (4-byte aligned, see quad_store_ok).
template <typename T>
__device__ __forceinline__ void bias_word(const T* bias, int col, float& b0, float& b1) {
  const uint32_t w = *reinterpret_cast<const uint32_t*>(bias + col);
  b0 = Ty<T>::to_f32(*reinterpret_cast<const T*>(&w));
  b1 = Ty<T>::to_f32(*(reinterpret_cast<const T*>(&w) + 1));
}

// Byte offsets of 16-byte chunk c of row r in the kernels' XOR-swizzled shared tiles:
//   swz_k32: a K-major tile of 32 k (64-byte rows, 4 chunks; rows r and r ^ 1 share a 128-byte
//            line, so the chunk is XORed with (r >> 1) & 3), the sm_80-style kernels' A tiles
//            and NT B tiles;
//   swz8:    rows of `row_bytes` (8 or more chunks), the chunk XORed with r & 7 (the 128-byte
//            swizzle of the wgmma layouts, and the sm_80-style NN B tiles).
__device__ __forceinline__ int swz_k32(int r, int c) { return r * 64 + ((c ^ ((r >> 1) & 3)) << 4); }
__device__ __forceinline__ int swz8(int r, int c, int row_bytes) { return r * row_bytes + ((c ^ (r & 7)) << 4); }

// Grouped rasterisation: consecutive block ids walk down GROUP_M block-rows before moving to
// the next block-column, so that the B tiles of a column stay in L2 while A is streamed.
__device__ __forceinline__ void tile_coords(int pid, int tiles_m, int tiles_n, int& tm, int& tn) {
  constexpr int GROUP_M = 8;
  const int in_group = GROUP_M * tiles_n;
  const int group = pid / in_group;
  const int first_m = group * GROUP_M;
  const int gsize = min(tiles_m - first_m, GROUP_M);
  const int r = pid - group * in_group;
  tm = first_m + r % gsize;
  tn = r / gsize;
}
__device__ __forceinline__ void block_tile_coords(int tiles_m, int tiles_n, int& tm, int& tn) {
  tile_coords(blockIdx.x, tiles_m, tiles_n, tm, tn);
}

// Load up to 8 consecutive 16-bit elements (n_valid of them, 0..8) with scalar loads and
// zero-fill the rest. Slow path for operands that fail the 16-byte alignment test.
__device__ __forceinline__ uint4 load8_scalar(const unsigned short* p, int n_valid) {
  unsigned short e[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = (i < n_valid) ? p[i] : (unsigned short)0;
  uint4 v;
  v.x = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
  v.y = (uint32_t)e[2] | ((uint32_t)e[3] << 16);
  v.z = (uint32_t)e[4] | ((uint32_t)e[5] << 16);
  v.w = (uint32_t)e[6] | ((uint32_t)e[7] << 16);
  return v;
}

// One 16-byte chunk global -> shared: 8 elements of which n_valid (clamped to 0..8) are in
// range. `vec` selects cp.async (the pointer is then 16-byte aligned by the caller's test).
template <typename T>
__device__ __forceinline__ void load_chunk(uint32_t dst, const T* src, int n_valid, bool vec,
                                           const T* safe) {
  n_valid = max(0, min(8, n_valid));
  if (vec) {
    cp_async_16(dst, n_valid > 0 ? (const void*)src : (const void*)safe, n_valid * 2);
  } else {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (n_valid > 0) v = load8_scalar(reinterpret_cast<const unsigned short*>(src), n_valid);
    st_shared_v4(dst, v);
  }
}

}  // namespace gk

// ------------------------------------------------------------------------------------------
// sm_80 tensor-core kernels (mma.sync m16n8k16, ldmatrix, 4-stage cp.async), two block tiles
// ------------------------------------------------------------------------------------------
namespace tc {
constexpr int BM = 128, BK = 32, STAGES = 4, THREADS = 256;
constexpr int WM = 64;                              // warp tile rows; 8 warps as 2 (M) x 4 (N)
constexpr int MI = WM / 16;                         // 4 mma row blocks per warp
constexpr int A_BYTES = BM * BK * 2;                // 8 KiB
static_assert(BK == 32, "the K-major swizzle assumes 4 chunks per row");
static_assert(THREADS == 32 * (BM / WM) * 4, "8 warps");
// The block tile's N extent: 128 (`Narrow`, warp tile 64 x 32, two blocks an SM) or 256
// (`Wide`, warp tile 64 x 64, one block an SM). See "Design of the sm_80 tensor-core kernels".
template <int BN_>
struct Tile {
  static constexpr int BN = BN_;
  static constexpr int WN = BN / 4;                         // warp tile columns
  static constexpr int NJ = WN / 8;                         // mma column blocks per warp: 4 or 8
  static constexpr int B_BYTES = BN * BK * 2;               // 8 or 16 KiB
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;   // 64 or 96 KiB
  static constexpr int B_CHUNKS = BN * BK / 8 / THREADS;    // B chunks a thread a tile: 2 or 4
  static constexpr int NN_ROW_CHUNKS = BN / 8;              // chunks of a row of NN's B tile
  static constexpr int NN_ROW_SHIFT = BN == 128 ? 4 : 5;     // log2 of it (ids are >= 0: shifts)
  static constexpr int MIN_BLOCKS = BN == 128 ? 2 : 1;      // __launch_bounds__'s blocks an SM
  // Double-buffered fragments (the next k16 step's read during this one's mma): the wide tile
  // only; in the narrow one's 128 registers they would spill.
  static constexpr bool FRAG_PIPELINE = BN == 256;
  static_assert((1 << NN_ROW_SHIFT) == NN_ROW_CHUNKS, "NN_ROW_SHIFT");
  static_assert(NJ % 4 == 0, "the epilogue's quad_store16 takes a warp row's column blocks by 4");
  static_assert(THREADS * 16 % (BN * 2) == 0, "a pass of NN's B loader covers whole rows");
};
using Narrow = Tile<128>;
using Wide = Tile<256>;
static_assert(Narrow::SMEM_BYTES == 65536, "mirrored as geom::TC_SMEM in src/cuda/gemm.rs");
static_assert(Wide::SMEM_BYTES == 98304, "mirrored as geom::TC_WIDE_SMEM in src/cuda/gemm.rs");
static_assert(A_BYTES == THREADS * 2 * 16, "A: two chunks a thread a tile");
}  // namespace tc

// One BM x Cfg::BN output tile with origin (m0, n0) (multiples of the tile, inside M x N).
template <typename T, bool NN, typename Cfg>
__device__ __forceinline__ void gemm_kext_tc_tile(int m0, int n0, int M, int N, int K1, int K2,
                                                  const T* __restrict__ A1, int lda1,
                                                  const T* __restrict__ B1, int ldb1,
                                                  const T* __restrict__ A2, int lda2,
                                                  const T* __restrict__ B2, int ldb2,
                                                  const T* __restrict__ bias, float beta,
                                                  T* __restrict__ D, int ldd) {
  using namespace tc;
  constexpr int BN = Cfg::BN, WN = Cfg::WN, NJ = Cfg::NJ;
  constexpr int B_BYTES = Cfg::B_BYTES, STAGE_BYTES = Cfg::STAGE_BYTES, PB = Cfg::B_CHUNKS;
  constexpr int NN_ROW_BYTES = BN * 2;
  constexpr int NN_PASS_ROWS = THREADS / Cfg::NN_ROW_CHUNKS;  // k-rows of NN's B a pass: 16 or 8
  (void)B_BYTES;
  GK_DYNAMIC_SMEM(smem_tc, 128);
  const uint32_t smem_base = gk::smem_u32(smem_tc);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp >> 2;  // 0..1
  const int wn = warp & 3;   // 0..3

  // Fast-path test per operand pair (uniform over the grid).
  const bool vec1 = ((((uintptr_t)A1 | (uintptr_t)B1) & 15) == 0) && (((lda1 | ldb1) & 7) == 0);
  const bool vec2 = ((((uintptr_t)A2 | (uintptr_t)B2) & 15) == 0) && (((lda2 | ldb2) & 7) == 0);

  const int KT1 = (K1 + BK - 1) / BK;
  const int KT2 = (K2 + BK - 1) / BK;
  const int KT = KT1 + KT2;

  // ---- global -> shared for k tile `t` into stage `slot` ----
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
    // A tile: 128 rows x 4 chunks = 512 chunks, 2 per thread.
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int idx = tid + p * THREADS;
      const int r = idx >> 2, c = idx & 3;
      const int gm = m0 + r, kk = kb + c * 8;
      const int nv = (gm < M) ? K - kk : 0;
      const T* src = A + ((size_t)(gm < M ? gm : 0) * lda + (kk < K ? kk : 0));
      gk::load_chunk<T>(sa + gk::swz_k32(r, c), src, nv, vec, A);
    }
    if (!NN) {
      // B (N x K, k contiguous): the same K-major layout as A, BN rows.
#pragma unroll
      for (int p = 0; p < PB; ++p) {
        const int idx = tid + p * THREADS;
        const int r = idx >> 2, c = idx & 3;
        const int gn = n0 + r, kk = kb + c * 8;
        const int nv = (gn < N) ? K - kk : 0;
        const T* src = B + ((size_t)(gn < N ? gn : 0) * ldb + (kk < K ? kk : 0));
        gk::load_chunk<T>(sb + gk::swz_k32(r, c), src, nv, vec, B);
      }
    } else {
      // B (K x N, n contiguous): N-major tile, 32 k-rows x BN/8 chunks.
#pragma unroll
      for (int p = 0; p < PB; ++p) {
        const int idx = tid + p * THREADS;
        const int r = idx >> Cfg::NN_ROW_SHIFT, c = idx & (Cfg::NN_ROW_CHUNKS - 1);
        const int kk = kb + r, gn = n0 + c * 8;
        const int nv = (kk < K) ? N - gn : 0;
        const T* src = B + ((size_t)(kk < K ? kk : 0) * ldb + (gn < N ? gn : 0));
        gk::load_chunk<T>(sb + gk::swz8(r, c, NN_ROW_BYTES), src, nv, vec, B);
      }
    }
  };

  // ---- fast path: the full (unpredicated in k) tiles of pair 1 when it is 16-byte aligned ----
  // Everything but the k offset is hoisted: per chunk a source pointer (row clamped into
  // range) and a byte count (16, or 0 for a row outside M / N; for NN's B the N tail gives a
  // partial count). Chunk p lies 64 p rows (A, NT B) or NN_PASS_ROWS p k-rows (NN B) below
  // chunk 0: 4096 p bytes further in the swizzled stage (a pass of 256 threads writes 4 KiB),
  // and the XOR patterns repeat every 8 rows.
  const int KF = vec1 ? K1 / BK : 0;  // tiles 0..KF-1 take the fast path
  const T* fa[2];
  const T* fb[PB];
  int fa_n[2], fb_n[PB];
  uint32_t fa_dst, fb_dst;
  {
    const int r = tid >> 2, c = tid & 3;
    fa_dst = gk::swz_k32(r, c);
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int gm = m0 + r + p * 64;
      fa[p] = A1 + ((size_t)(gm < M ? gm : 0) * lda1 + c * 8);
      fa_n[p] = gm < M ? 16 : 0;
    }
    if (!NN) {
      fb_dst = fa_dst;
#pragma unroll
      for (int p = 0; p < PB; ++p) {
        const int gn = n0 + r + p * 64;
        fb[p] = B1 + ((size_t)(gn < N ? gn : 0) * ldb1 + c * 8);
        fb_n[p] = gn < N ? 16 : 0;
      }
    } else {
      const int kr = tid >> Cfg::NN_ROW_SHIFT, cn = tid & (Cfg::NN_ROW_CHUNKS - 1);
      fb_dst = gk::swz8(kr, cn, NN_ROW_BYTES);
      const int gn = n0 + cn * 8;
      const int nb = max(0, min(8, N - gn)) * 2;
#pragma unroll
      for (int p = 0; p < PB; ++p) {
        fb[p] = B1 + ((size_t)(kr + p * NN_PASS_ROWS) * ldb1 + (gn < N ? gn : 0));
        fb_n[p] = nb;
      }
    }
  }
  auto load_tile_fast = [&](int t, int slot) {
    const uint32_t sa = smem_base + slot * STAGE_BYTES;
    const uint32_t sb = sa + A_BYTES;
    const int ka = t * BK;
#pragma unroll
    for (int p = 0; p < 2; ++p) gk::cp_async_16(sa + fa_dst + p * 4096, fa[p] + ka, fa_n[p]);
#pragma unroll
    for (int p = 0; p < PB; ++p) {
      const T* src = NN ? fb[p] + (size_t)ka * ldb1 : fb[p] + ka;
      gk::cp_async_16(sb + fb_dst + p * 4096, src, fb_n[p]);
    }
  };
  auto load = [&](int t, int slot) {
    if (t < KF)
      load_tile_fast(t, slot);
    else if (t < KT)
      load_tile(t, slot);
  };

  // ---- per-lane ldmatrix offsets (bytes within a stage's A / B tile) ----
  uint32_t a_off[2];
  {
    const int r = wm * WM + (lane & 15);
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const int c = ks * 2 + (lane >> 4);
      a_off[ks] = gk::swz_k32(r, c);
    }
  }
  // NT: indexed by ks (add 16 rows = 1024 bytes per n16 pair jp); NN: indexed by the n16 pair
  // jp (add ks * 16 k-rows).
  constexpr int NB_OFF = NN ? NJ / 2 : BK / 16;
  uint32_t b_off[NB_OFF];
  if (!NN) {
    const int r = wn * WN + (lane & 7) + ((lane >> 4) << 3);
#pragma unroll
    for (int ks = 0; ks < NB_OFF; ++ks) {
      const int c = ks * 2 + ((lane >> 3) & 1);
      b_off[ks] = gk::swz_k32(r, c);
    }
  } else {
    const int kr = (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
    for (int jp = 0; jp < NB_OFF; ++jp) {
      const int c = wn * (WN / 8) + jp * 2 + (lane >> 4);
      b_off[jp] = gk::swz8(kr, c, NN_ROW_BYTES);
    }
  }

  float acc[MI][NJ][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

  // The fragments of k16 step ks of the tile in the stage at sa, and their mma.
  constexpr int KS = BK / 16;
  using AFrag = uint32_t[MI][4];
  using BFrag = uint32_t[NJ][2];
  auto load_frags = [&](AFrag& af, BFrag& bf, uint32_t sa, int ks) {
    const uint32_t sb = sa + A_BYTES;
#pragma unroll
    for (int i = 0; i < MI; ++i) gk::ldmatrix_x4(af[i], sa + a_off[ks] + i * 16 * 64);
#pragma unroll
    for (int jp = 0; jp < NJ / 2; ++jp) {
      uint32_t r[4];
      if (!NN)
        gk::ldmatrix_x4(r, sb + b_off[ks] + jp * 16 * 64);
      else
        gk::ldmatrix_x4_trans(r, sb + ks * 16 * NN_ROW_BYTES + b_off[jp]);
      bf[2 * jp][0] = r[0];
      bf[2 * jp][1] = r[1];
      bf[2 * jp + 1][0] = r[2];
      bf[2 * jp + 1][1] = r[3];
    }
  };
  auto mma_step = [&](const AFrag& af, const BFrag& bf) {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) gk::Ty<T>::mma(acc[i][j], af[i], bf[j]);
  };

  // ---- prologue: tiles 0 .. STAGES-2 in flight ----
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    load(s, s);
    gk::cp_async_commit();
  }

  // ---- main loop ----
  if constexpr (!Cfg::FRAG_PIPELINE) {
    for (int t = 0; t < KT; ++t) {
      gk::cp_async_wait<STAGES - 2>();  // this thread's copies of tile t have landed
      __syncthreads();                  // ... everybody's; and tile t-1's slot is free
      {
        const int tl = t + STAGES - 1;
        load(tl, tl % STAGES);
        gk::cp_async_commit();
      }
      const uint32_t sa = smem_base + (t % STAGES) * STAGE_BYTES;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        AFrag af;
        BFrag bf;
        load_frags(af, bf, sa, ks);
        mma_step(af, bf);
      }
    }
  } else {
    // Tile 0 landed and its first fragments read before the loop. At step 0 of tile t the
    // copies of tile t + STAGES - 1 go into the slot of tile t - 1, whose last fragments every
    // warp read before the barrier of step KS - 1 of tile t - 1. At step KS - 1 of tile t: wait
    // for tile t + 1 (all but the newest STAGES - 2 groups: tiles 0 .. t + 1) and a barrier
    // (everybody's copies visible; after it tile t's slot is read no more: this step's mma
    // take their fragments from registers). Two fragment buffers: step ks + 1's (the next
    // tile's first at the last step) are read from shared memory while step ks's mma run.
    static_assert(KS % 2 == 0, "buffer ks & 1 is the same for every tile");
    AFrag af[2];
    BFrag bf[2];
    gk::cp_async_wait<STAGES - 2>();
    __syncthreads();
    load_frags(af[0], bf[0], smem_base, 0);
    for (int t = 0; t < KT; ++t) {
      const uint32_t sa = smem_base + (t % STAGES) * STAGE_BYTES;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        if (ks == 0) {
          const int tl = t + STAGES - 1;
          load(tl, tl % STAGES);
          gk::cp_async_commit();
        }
        if (ks + 1 < KS) {
          load_frags(af[(ks + 1) & 1], bf[(ks + 1) & 1], sa, ks + 1);
        } else {
          gk::cp_async_wait<STAGES - 2>();
          __syncthreads();
          if (t + 1 < KT) load_frags(af[0], bf[0], smem_base + ((t + 1) % STAGES) * STAGE_BYTES, 0);
        }
        mma_step(af[ks & 1], bf[ks & 1]);
      }
    }
  }
  gk::cp_async_wait_all();

  // ---- epilogue: D = acc (+ bias) (+ beta * D) ----
  const bool pair_store = ((((uintptr_t)D) & 3) == 0) && ((ldd & 1) == 0);
  const bool read_d = beta != 0.f;
  // A whole tile inside D: each warp row's column blocks leave by 4 through gk::quad_store16.
  if (m0 + BM <= M && n0 + BN <= N && gk::quad_store_ok(D, ldd, bias, read_d)) {
    const int q = lane & 3;
#pragma unroll
    for (int jq = 0; jq < NJ / 4; ++jq) {
      const int c0 = n0 + wn * WN + jq * 32;  // column blocks j = 4 jq .. 4 jq + 3
      float b[4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        b[j][0] = b[j][1] = 0.f;
        if (bias != nullptr) gk::bias_word(bias, c0 + j * 8 + 2 * q, b[j][0], b[j][1]);
      }
#pragma unroll
      for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = m0 + wm * WM + i * 16 + (lane >> 2) + h * 8;
          uint32_t p[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float* a = &acc[i][4 * jq + j][2 * h];
            p[j] = gk::Ty<T>::pack2(bias ? a[0] + b[j][0] : a[0], bias ? a[1] + b[j][1] : a[1]);
          }
          gk::quad_store16(D + (size_t)row * ldd + c0, p, q);
        }
      }
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    const int col = n0 + wn * WN + j * 8 + (lane & 3) * 2;
    if (col >= N) continue;
    const bool has1 = col + 1 < N;
    float b0, b1;
    gk::bias_pair<T>(bias, col, has1, b0, b1);
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + wm * WM + i * 16 + (lane >> 2) + h * 8;
        if (row >= M) continue;
        T* dp = D + (size_t)row * ldd + col;
        float v0 = acc[i][j][2 * h] + b0;
        float v1 = acc[i][j][2 * h + 1] + b1;
        gk::store_pair<T>(dp, v0, v1, has1, beta, read_d, pair_store);
      }
    }
  }
}

#define GEMM_KEXT_PARAMS(T)                                                                  \
  int M, int N, int K1, int K2, const T *__restrict__ A1, int lda1, const T *__restrict__ B1, \
      int ldb1, const T *__restrict__ A2, int lda2, const T *__restrict__ B2, int ldb2,       \
      const T *__restrict__ bias, float beta, T *__restrict__ D, int ldd
#define GEMM_KEXT_ARGS M, N, K1, K2, A1, lda1, B1, ldb1, A2, lda2, B2, ldb2, bias, beta, D, ldd

// The sm_80 kernels: one BM x Cfg::BN tile per block, in grouped order.
template <typename T, bool NN, typename Cfg>
__device__ __forceinline__ void gemm_kext_tc(GEMM_KEXT_PARAMS(T)) {
  int tm, tn;
  gk::block_tile_coords((M + tc::BM - 1) / tc::BM, (N + Cfg::BN - 1) / Cfg::BN, tm, tn);
  gemm_kext_tc_tile<T, NN, Cfg>(tm * tc::BM, tn * Cfg::BN, GEMM_KEXT_ARGS);
}

#define GEMM_KEXT_TC(NAME, T, NN, CFG)                                                               \
  extern "C" __global__ void __launch_bounds__(tc::THREADS, CFG::MIN_BLOCKS) NAME(GEMM_KEXT_PARAMS(T)) { \
    gemm_kext_tc<T, NN, CFG>(GEMM_KEXT_ARGS);                                                        \
  }

GEMM_KEXT_TC(gemm_kext_nt_bf16, __nv_bfloat16, false, tc::Narrow)
GEMM_KEXT_TC(gemm_kext_nt_f16, __half, false, tc::Narrow)
GEMM_KEXT_TC(gemm_kext_nn_bf16, __nv_bfloat16, true, tc::Narrow)
GEMM_KEXT_TC(gemm_kext_nn_f16, __half, true, tc::Narrow)
GEMM_KEXT_TC(gemm_kext_nt_bf16_wide, __nv_bfloat16, false, tc::Wide)
GEMM_KEXT_TC(gemm_kext_nt_f16_wide, __half, false, tc::Wide)
GEMM_KEXT_TC(gemm_kext_nn_bf16_wide, __nv_bfloat16, true, tc::Wide)
GEMM_KEXT_TC(gemm_kext_nn_f16_wide, __half, true, tc::Wide)

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
      const int gm = m0 + r, kk = kb + c * 8;
      const int nv = (gm < M) ? K - kk : 0;
      const T* src = A + ((size_t)(gm < M ? gm : 0) * lda + (kk < K ? kk : 0));
      gk::load_chunk<T>(sa + gk::swz8(r, c, 128), src, nv, vec, A);
    }
    if (!NN) {
      // B: 256 rows x 8 chunks = 2048 chunks, 8 per thread.
#pragma unroll
      for (int p = 0; p < 8; ++p) {
        const int idx = tid + p * THREADS;
        const int r = idx >> 3, c = idx & 7;
        const int gn = n0 + r, kk = kb + c * 8;
        const int nv = (gn < N) ? K - kk : 0;
        const T* src = B + ((size_t)(gn < N ? gn : 0) * ldb + (kk < K ? kk : 0));
        gk::load_chunk<T>(sb + gk::swz8(r, c, 128), src, nv, vec, B);
      }
    } else {
      // B: 64 k-rows x 32 chunks = 2048 chunks, 8 per thread; chunk cn lies in quarter cn >> 3.
#pragma unroll
      for (int p = 0; p < 8; ++p) {
        const int idx = tid + p * THREADS;
        const int r = idx >> 5, cn = idx & 31;
        const int h = cn >> 3, c = cn & 7;
        const int kk = kb + r, gn = n0 + cn * 8;
        const int nv = (kk < K) ? N - gn : 0;
        const T* src = B + ((size_t)(kk < K ? kk : 0) * ldb + (gn < N ? gn : 0));
        gk::load_chunk<T>(sb + h * 8192 + gk::swz8(r, c, 128), src, nv, vec, B);
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

// ------------------------------------------------------------------------------------------
// sm_90a kernel with the tensor memory accelerator: gemm_kext_{nt,nn}_{bf16,f16}_tma.
//
// The same block tile, shared layouts, wgmma descriptors and epilogue as the _sm90 kernel
// above, but the tiles arrive by TMA (cp.async.bulk.tensor) and the block is warp-specialised:
//   warps 0-7 (two warpgroups) only multiply: warpgroup g owns rows 64g..64g+63 x 256;
//   warp 8 is the producer: one lane issues a stage's copies (A: one 64 x 128 box; B of NT:
//   one 64 x 256 box; B of NN: four 64 x 64 boxes, one per 64-column quarter) and posts the
//   byte count on the stage's `full` mbarrier; the consumers wait on it, run the stage's 4
//   wgmma k16 steps, and once wgmma.wait_group 1 says that the previous stage's wgmmas are done,
//   one thread per warpgroup arrives on that stage's `empty` mbarrier (2 arrivals free it).
//   No __syncthreads in the K loop, no load instructions in the multiplying warps.
// TMA's 128-byte swizzle (box rows of 64 elements = 128 B, destinations 1024-aligned) writes
// exactly the layouts the _sm90 kernel builds with cp.async (row r, chunk c at
// r*128 + ((c ^ (r & 7)) * 16)), so the descriptors are the same. Tails: the box parts outside
// the tensor (rows past M or N, columns past K1 or K2) arrive as zeros; the epilogue stores
// only inside D.
// Parameters: the four tensor maps (A1, B1, A2, B2; built by the launcher over the same
// matrices as the pointers; for K2 = 0 any valid map, it is not read), then the common list.
// The launcher uses these kernels only when every map can be made (16-byte aligned bases, lds
// multiples of 8 elements, K1 > 0) and on a device of compute capability 9.0, whose module
// image is the sm_90a cubin; in any other image the body traps. On the host, the whole kernel
// runs in tests/emulation/gemm_on_host.cpp (288 fibers a block; TMA and mbarriers emulated).
// Geometry: 288 threads, dynamic smem t90::SMEM_BYTES; grid.x = ceil(M/128) * ceil(N/256)
// (a block per tile) or fewer: the blocks then loop over the tiles (persistent).
// Measured on an H200 (BENCHMARKS.md, session 9): the K loop runs at cuBLAS's speed (37.0-37.4
// us per 1024 of K at 4096 x 4096 against cuBLAS's 36.4-37.0); what is left is per launch
// (15-20 us against cuBLAS's 12-13: pipeline fill, the last tile's epilogue, the last wave).
// Tried and dropped: 2-CTA clusters sharing the B tile by TMA multicast (each CTA fetching
// half of it into both; the stage freed by the four consumer warpgroups of the cluster): no
// faster (0.186 against 0.181 ms), since the loop is not bound by L2 bandwidth; and with a
// `.release.cluster` remote arrival, which compiles to a MEMBAR, twice as slow.
// ------------------------------------------------------------------------------------------
#include <cuda.h>

namespace t90 {
constexpr int STAGES = 4;  // the block tile and the stage layout are h90's
constexpr int CONSUMERS = 256, THREADS = CONSUMERS + 32;
constexpr int A_BYTES = h90::A_BYTES, STAGE_BYTES = h90::STAGE_BYTES;
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;
static_assert(SMEM_BYTES == 4 * 49152 + 1024, "mirrored as geom::T_SMEM in src/cuda/gemm.rs");
}  // namespace t90

// The PTX of the helpers below; tests/emulation/gemm_on_host.cpp supplies them with the
// instructions' semantics (mbarrier phases and transaction counts, the TMA box with its
// swizzle and zero fill) and runs this kernel on the host.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(WEGEFT_HOST_EMULATION)
namespace t90 {
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (TMA) and the other threads.
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// Programmatic dependent launch: waits until the grid this one was launched as a dependent of
// (attribute PROGRAMMATIC_STREAM_SERIALIZATION) has completed and its writes are visible;
// returns at once for a grid launched without that attribute (stream order already holds).
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
// One box of a 2-d tensor map at element coordinates (c0 innermost, c1 rows) into shared
// memory at dst; completion counted in bytes on the mbarrier.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
// wegeft_fwd's schedule (below). The next tile index from the grid's counter.
__device__ __forceinline__ int take_tile(unsigned* counter) { return (int)atomicAdd(counter, 1u); }
// Waits until *flag >= want (acquire, gpu scope: the stores released before the flag's
// increments are visible to this thread), then orders this thread's later TMA copies (async
// proxy) after that (generic proxy). A wait that has not ended after FLAG_WAIT_NS traps: a
// launch error the caller sees at its next synchronisation, instead of a kernel that never
// ends (the rank tiles a wait depends on take microseconds; under compute-sanitizer, far less
// than that bound).
constexpr unsigned long long FLAG_WAIT_NS = 30ull * 1000 * 1000 * 1000;
__device__ __forceinline__ void flag_wait(const unsigned* flag, unsigned want) {
  unsigned long long t0;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t0));
  for (;;) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(flag) : "memory");
    if (v >= want) break;
    __nanosleep(32);
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
    if (t - t0 > FLAG_WAIT_NS) __trap();
  }
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
}
// *flag += 1 (release, gpu scope).
__device__ __forceinline__ void flag_post(unsigned* flag) {
  asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(flag) : "memory");
}
// After a thread's global stores that other blocks read by TMA: ordered before the async proxy's
// accesses and made visible at gpu scope (before the barrier that precedes flag_post).
__device__ __forceinline__ void publish_fence() {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
  __threadfence();
}
// A barrier of the two consumer warpgroups only (named barrier 1; the producer warp is not in it).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }
}  // namespace t90
#endif

// The stage ring of both TMA kernels.
#if defined(GK_WGMMA_BODY)
namespace t90 {
// Thread 0 initialises the barriers: full[s] expects the producer's arrival (with the stage's
// bytes), empty[s] one arrival per consumer warpgroup. The caller then syncs the block.
__device__ __forceinline__ void ring_init(uint32_t full0, uint32_t empty0) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, 2);
    }
    mbar_fence_init();
  }
}

// Producer: the stage of k tile number `it` (counted over all of the block's tiles: stage
// it % STAGES, its (it / STAGES)-th use), once both warpgroups have freed its previous use; its
// full barrier then expects `bytes` (and the producer's arrival is made). Returns the stage.
// With `stage_tile` (wegeft_fwd), `tile` is written to its entry for the stage first: the
// consumers read it after their wait on the stage, which acquires the arrival.
__device__ __forceinline__ int ring_acquire(int it, uint32_t full0, uint32_t empty0, uint32_t bytes,
                                            int* stage_tile = nullptr, int tile = 0) {
  const int s = it % STAGES;
  if (it >= STAGES) mbar_wait(empty0 + 8 * s, ((it / STAGES) - 1) & 1);
  if (stage_tile != nullptr) stage_tile[s] = tile;
  mbar_expect_tx(full0 + 8 * s, bytes);
  return s;
}

// Producer: one k tile of a D tile into the stage at `stage` (A then B, the layouts of
// h90): the 64 x 128 box of A at (kb, m0), and B's 64 x 256 box at (kb, n0) (NT) or its four
// 64 x 64 boxes at (n0 + 64 h, kb) (NN), their bytes counted on `full`.
template <bool NN>
__device__ __forceinline__ void load_d_stage(uint32_t stage, const CUtensorMap* ma, const CUtensorMap* mb, uint32_t full,
                                             int kb, int m0, int n0) {
  const uint32_t sb = stage + A_BYTES;
  tma_load_2d(stage, ma, full, kb, m0);
  if (!NN) {
    tma_load_2d(sb, mb, full, kb, n0);
  } else {
#pragma unroll
    for (int h = 0; h < 4; ++h) tma_load_2d(sb + h * 8192, mb, full, n0 + 64 * h, kb);
  }
}

// Consumers, after a tile's stores that other blocks read by TMA: every thread fences them,
// the two warpgroups meet, and one thread adds 1 to `flag` (release), which producers wait on.
__device__ __forceinline__ void publish(unsigned* flag) {
  publish_fence();
  consumers_sync();
  if (threadIdx.x == 0) flag_post(flag);
}

// Consumers: one tile's KT k tiles from the ring (k tile numbers it .. it + KT - 1; `it` is
// advanced) into acc, zeroed first; each stage is freed once the next one's wgmmas are issued
// and wgmma.wait_group 1 says its own are done, the last one after wait_group 0.
template <typename T, bool NN, int NA, bool TA = false>
__device__ __forceinline__ void consume_tile(float (&acc)[NA], int& it, int KT, uint32_t smem_base, uint32_t full0,
                                             uint32_t empty0, int wg, bool releaser) {
  using namespace h90;
#pragma unroll
  for (int i = 0; i < NA; ++i) acc[i] = 0.f;
  fence_regs(acc);
  for (int t = 0; t < KT; ++t, ++it) {
    const int s = it % STAGES;
    mbar_wait(full0 + 8 * s, (it / STAGES) & 1);
    mma_stage<T, NN, NA, TA>(acc, smem_base + s * STAGE_BYTES, wg);
    if (t > 0 && releaser) mbar_arrive(empty0 + 8 * ((it - 1) % STAGES));
  }
  wgmma_wait<0>();
  fence_regs(acc);
  if (releaser) mbar_arrive(empty0 + 8 * ((it - 1) % STAGES));  // the tile's last stage
}
}  // namespace t90
#endif

template <typename T, bool NN>
__device__ __forceinline__ void gemm_kext_t90(const CUtensorMap* ma1, const CUtensorMap* mb1, const CUtensorMap* ma2,
                                              const CUtensorMap* mb2, GEMM_KEXT_PARAMS(T)) {
#if defined(GK_WGMMA_BODY)
  using namespace h90;
  using t90::STAGES;
  const int tiles_m = (M + BM - 1) / BM;
  const int tiles_n = (N + BN - 1) / BN;
  const int tiles = tiles_m * tiles_n;
  GK_DYNAMIC_SMEM(smem_t90, 1024);
  const uint32_t smem_base = (gk::smem_u32(smem_t90) + 1023u) & ~1023u;
  __shared__ __align__(8) uint64_t bars[2 * STAGES];
  const uint32_t full0 = gk::smem_u32(&bars[0]);
  const uint32_t empty0 = gk::smem_u32(&bars[STAGES]);
  const int tid = threadIdx.x;
  const int KT1 = (K1 + BK - 1) / BK;
  const int KT = KT1 + (K2 + BK - 1) / BK;

  t90::ring_init(full0, empty0);
  __syncthreads();

  // Tiles blockIdx.x, blockIdx.x + gridDim.x, ... (grid = tiles: one each; a smaller grid
  // makes the block persistent, and the producer then fetches the next tile's first stages
  // while the consumers store the last one). `it` counts k tiles over all of the block's
  // tiles: stage it % STAGES, its (it / STAGES)-th use.
  if (tid >= t90::CONSUMERS) {
    // Producer warp: lane 0 issues every copy; a stage is refilled once both warpgroups
    // have freed its previous use.
    if (tid == t90::CONSUMERS) {
      int it = 0;
      bool waited = false;
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        int m0, n0;
        tile_origin(tile, tiles_m, tiles_n, m0, n0);
        for (int t = 0; t < KT; ++t, ++it) {
          const int s = t90::ring_acquire(it, full0, empty0, t90::STAGE_BYTES);
          const uint32_t full = full0 + 8 * s;
          const bool second = t >= KT1;
          // The second pair (u and C in the fused forward) may be written by the grid this one
          // was launched as a programmatic dependent of (wegeft_uc_*): the first pair's k tiles
          // (x, W) are fetched and multiplied while that grid still runs.
          if (second && !waited) {
            t90::grid_dependency_wait();
            waited = true;
          }
          const int kb = (second ? t - KT1 : t) * BK;
          t90::load_d_stage<NN>(smem_base + s * t90::STAGE_BYTES, second ? ma2 : ma1, second ? mb2 : mb1, full, kb, m0, n0);
        }
      }
    }
    return;
  }

  const int wg = tid >> 7;
  const int wrow = (tid & 127) >> 5;
  const int lane = tid & 31;
  const bool releaser = (tid & 127) == 0;  // one arrival per warpgroup
  const bool pair_store = ((((uintptr_t)D) & 3) == 0) && ((ldd & 1) == 0);
  const bool read_d = beta != 0.f;
  float acc[NACC];
  int it = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    int m0, n0;
    tile_origin(tile, tiles_m, tiles_n, m0, n0);
    t90::consume_tile<T, NN>(acc, it, KT, smem_base, full0, empty0, wg, releaser);
    store_tile<T>(acc, m0, n0, wg, wrow, lane, M, N, bias, beta, D, ldd, pair_store, read_d);
  }
#else
  __trap();  // never launched outside an sm_90a image (see above)
#endif
}

#define GEMM_KEXT_T90(NAME, T, NN)                                                                                  \
  extern "C" __global__ void __launch_bounds__(t90::THREADS, 1)                                                    \
      NAME(const __grid_constant__ CUtensorMap ma1, const __grid_constant__ CUtensorMap mb1,                       \
           const __grid_constant__ CUtensorMap ma2, const __grid_constant__ CUtensorMap mb2, GEMM_KEXT_PARAMS(T)) { \
    gemm_kext_t90<T, NN>(&ma1, &mb1, &ma2, &mb2, GEMM_KEXT_ARGS);                                                   \
  }

GEMM_KEXT_T90(gemm_kext_nt_bf16_tma, __nv_bfloat16, false)
GEMM_KEXT_T90(gemm_kext_nn_bf16_tma, __nv_bfloat16, true)
GEMM_KEXT_T90(gemm_kext_nt_f16_tma, __half, false)
GEMM_KEXT_T90(gemm_kext_nn_f16_tma, __half, true)

// ------------------------------------------------------------------------------------------
// The fused forward and backward in one launch each:
//   wegeft_fwd_{bf16,f16}_tma  u = x psi^T (T x r), C = scale W phi (d_out x r),
//                              y = [x | u] [W | C]^T (+ bias)                 (the NT TMA GEMM)
//   wegeft_bwd_{bf16,f16}_tma  v = G C (T x r), S = G^T u (d_out x r, f32), dpsi += v^T x
//                              (r x d_in, f32), dx = [G | v] [W ; psi]         (the NN TMA GEMM)
//                              and, when given dphi, dphi += scale W^T S (d_in x r, f32)
//
// The TMA kernel above, persistent, with the rank-r products as tiles of the same grid, taken
// before the block tiles of D: they are read at the TMA pipeline's bandwidth, without launches
// of their own, while other blocks already run the GEMM. (wegeft_uc overlapped with the GEMM
// as a second grid beside it, but its blocks, with 16 KiB in flight each, read far slower than
// the SMs can: BENCHMARKS.md, session 9.) Each such tile is 128 rows x 64 columns of its
// output; per k tile a 64 x 128 A tile (16 KiB) and a 64 x 64 B box (8 KiB: K-major like 64
// rows of an NT B tile, or N-major like a 64-column quarter of an NN B tile); each warpgroup
// runs m64n64k16 (32 accumulators) on its 64 rows.
//   kind 0, "rank tile", writes A2 (rows M, K = K1): forward u (A = x through A1's map, B =
//           psi K-major), backward v (A = G through A1's map, B = C N-major); bf16 / f16 out;
//   kind 1, rank tile, writes B2 (rows N, K = K1; forward only): C (A = W by a 64 x 128 map,
//           B = phi N-major, times scale);
//   kind 2, "reduction tile" (backward only; rows d_out = K1, K = T = M): S = G^T u, A = G^T
//           MN-major (two 64 x 64 boxes of G a k tile), B = u N-major; f32 stores;
//   kind 3, reduction tile (backward only; rows d_in = N, K = T): dpsi^T = x^T v, A = x^T
//           MN-major, B = v N-major; added to dpsi (f32, r x d_in); its producer waits for the
//           flag of the v rows of each k tile;
//   kind 4, reduction tile (backward with dphi only; rows d_in = N, K = 2 d_out): dphi =
//           scale W^T S, A = W^T MN-major, B = S as two halves in T, S_hi = T(S) then S_lo =
//           T(S - S_hi) (written by the kind-2 tiles to `s_split`, 2 d_out x r: the product
//           keeps S's f32 precision), the k tiles over d_out twice; added to dphi; its producer
//           waits for the flag of the S rows of each k tile (posted by the kind-2 tiles).
// A rank tile's epilogue stores the rows and columns inside its output (times its scale),
// rounded once, exactly as the D tiles then read them.
// Tile index i, handed out by a counter in global memory (atomicAdd by the producer lane, which
// writes i beside the stage's barrier for the consumers; -1 ends the block), in this order:
// kind 1 (forward), kind 0, each over its 128-row blocks (and RC = ceil(r / 64) column chunks a
// block); then the block tiles of D (128 x 256, gk::tile_coords), with the backward's tiles of
// kinds 2, 3 and 4 (in that order) spread among the first three quarters of them.
// A rank tile, once every consumer thread's stores are fenced and the two warpgroups have met
// (t90::publish), adds 1 to its block's flag (release, gpu scope). The producer of a tile
// of D, before its first second-pair k tile, waits (acquire) until the flags of its 128 rows
// of A2 and (forward) of its 256 rows of B2 (two blocks) reach RC, then fences the async proxy:
// its TMA reads see those stores; a kind-3 tile's producer does the same before each k tile.
// Deadlock-free whatever the residency: a rank tile waits for nothing, every tile that a wait
// depends on is taken (by a running block) before the waiting one, and a block runs its tiles
// in order. (Should a flag still never come, the wait traps after 30 s: t90::flag_wait.)
// Workspace `work` (u32, 1 + TM + R1): [0] the counter, [1, 1 + TM) the kind-0 flags, then the
// kind-1 flags (forward: R1 = ceil(N / 128)) or the kind-2 flags (backward: R1 = ceil(K1 /
// 128)); zero at launch (the launcher clears it before each launch, in stream order).
// Requires (the launcher checks): r and every ld of a mapped operand a multiple of 8, 16-byte
// aligned bases; the rank outputs, S and dpsi packed (ld r, r, d_in); ldd >= N.
// Parameters: the maps of A1, B1, A2, B2 (those of gemm_kext_{nt,nn}_*_tma), kind 0's B
// (64 x 64), kind 1's A (64 x 128) and B (64 x 64), kinds 2 and 3's A and B (64 x 64 each; a
// map a kernel does not read may be any valid one); then (M, N, K1, r, out0, scale0, out1,
// scale1 (backward: dphi's scale), bias, D, ldd, S, dpsi, kind 4's A and B maps, dphi (null: no
// kind 4), s_split, work).
// Geometry: 288 threads, dynamic smem t90::SMEM_BYTES, any grid (the launcher: min(tiles, SMs)).
// Host-emulated (tests/emulation/gemm_on_host.cpp), with the flags and the counter; not yet run
// on a GPU.
// ------------------------------------------------------------------------------------------
namespace wf {
constexpr int RANK_N = 64;                                    // columns of a rank tile
constexpr int RANK_B_BYTES = RANK_N * h90::BK * 2;            // 8 KiB: its B box
constexpr int RANK_STAGE_BYTES = h90::A_BYTES + RANK_B_BYTES;  // 24 KiB a k tile
constexpr int ROWS = h90::BM;                                 // rows a rank tile (A box rows)
static_assert(h90::BN == 2 * ROWS, "a D tile reads two kind-1 blocks");
static_assert(ROWS == 2 * 64 && h90::A_BYTES == 2 * 8192, "an MN-major A tile is two 64 x 64 boxes");
}  // namespace wf

#if defined(GK_WGMMA_BODY)
namespace wf {
// A tile's 64 x 64 per warpgroup (m64n64k16 layout: acc[4j + 2h + e] is row 16 wrow + lane / 4
// + 8 h, column 8 j + 2 (lane % 4) + e), inside rows x r only (r is a multiple of 8: a pair is
// either in or out), passed to put(row, col, v0, v1).
template <typename F>
__device__ __forceinline__ void each_pair(const float (&acc)[32], int row0, int col0, int wg, int wrow, int lane, int rows,
                                          int r, F put) {
#pragma unroll
  for (int j = 0; j < RANK_N / 8; ++j) {
    const int col = col0 + 8 * j + 2 * (lane & 3);
    if (col >= r) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + wg * 64 + wrow * 16 + (lane >> 2) + 8 * h;
      if (row >= rows) continue;
      put(row, col, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
    }
  }
}
}  // namespace wf
#endif

// NN = false: wegeft_fwd (kinds 0 with a K-major B, and 1); NN = true: wegeft_bwd (kinds 0 with
// an N-major B, 2 and 3).
template <typename T, bool NN>
__device__ __forceinline__ void wegeft_rank_t90(const CUtensorMap* ma1, const CUtensorMap* mb1, const CUtensorMap* ma2,
                                                const CUtensorMap* mb2, const CUtensorMap* mr0b, const CUtensorMap* mr1a,
                                                const CUtensorMap* mr1b, const CUtensorMap* mr2a, const CUtensorMap* mr2b,
                                                const CUtensorMap* mr3a, const CUtensorMap* mr3b, int M, int N, int K1,
                                                int r, T* __restrict__ out0, float scale0, T* __restrict__ out1,
                                                float scale1, const T* __restrict__ bias, T* __restrict__ D, int ldd,
                                                float* __restrict__ s_out, float* __restrict__ dpsi,
                                                const CUtensorMap* mr4a, const CUtensorMap* mr4b,
                                                float* __restrict__ dphi, T* __restrict__ s_split,
                                                unsigned* __restrict__ work) {
#if defined(GK_WGMMA_BODY)
  using namespace h90;
  using t90::STAGES;
  const int RC = (r + wf::RANK_N - 1) / wf::RANK_N;
  const int TM = (M + BM - 1) / BM, TN = (N + BN - 1) / BN;
  // Tiles of each kind, in the counter's order: kind 1, kind 0, kind 2, kind 3.
  const int n1 = NN ? 0 : ((N + wf::ROWS - 1) / wf::ROWS) * RC;
  const int n0 = TM * RC;
  const int n2 = NN ? ((K1 + wf::ROWS - 1) / wf::ROWS) * RC : 0;
  const int n3 = NN ? ((N + wf::ROWS - 1) / wf::ROWS) * RC : 0;
  const int n4 = NN && dphi != nullptr ? n3 : 0;
  const int R1 = (n1 + n2) / RC;  // the blocks of flag1: kind 1's, or kind 2's
  const int nd = TM * TN, ne = n2 + n3 + n4;
  const int tiles = n1 + n0 + ne + nd;
  // The reduction tiles gate nothing but dpsi's wait on v: they are spread over the first three
  // quarters of the D tiles (one every `stride` tiles from the first), so that a few SMs at a
  // time read G and x beside the GEMM instead of all of them at once.
  const int stride = ne > 0 ? max(1, (ne + nd) * 3 / (4 * ne)) : 1;
  const int KT1 = (K1 + BK - 1) / BK, KT2 = (r + BK - 1) / BK, KTM = (M + BK - 1) / BK;
  unsigned* const flag0 = work + 1;
  unsigned* const flag1 = work + 1 + TM;
  // Tile number `tile` (< tiles): its kind (0-4, or KIND_D: a tile of D), index j within the
  // kind (for D: in the grouped order), and for kinds 0-4 its first row and column.
  constexpr int KIND_D = 5;
  auto decode = [&](int tile, int& kind, int& j, int& row0, int& col0) {
    if (tile < n1 + n0) {
      kind = tile < n1 ? 1 : 0;
      j = tile < n1 ? tile : tile - n1;
    } else {
      const int p = tile - n1 - n0, e = p / stride;
      if (p % stride == 0 && e < ne) {
        kind = e < n2 ? 2 : e < n2 + n3 ? 3 : 4;
        j = e < n2 ? e : e < n2 + n3 ? e - n2 : e - n2 - n3;
      } else {
        kind = KIND_D;
        j = p - min(e + 1, ne);
      }
    }
    row0 = (j / RC) * wf::ROWS;
    col0 = (j % RC) * wf::RANK_N;
  };
  GK_DYNAMIC_SMEM(smem_wf, 1024);
  const uint32_t smem_base = (gk::smem_u32(smem_wf) + 1023u) & ~1023u;
  __shared__ __align__(8) uint64_t bars[2 * STAGES];
  __shared__ int stage_tile[STAGES];  // the tile of the k tile in each stage (-1: no more)
  const uint32_t full0 = gk::smem_u32(&bars[0]);
  const uint32_t empty0 = gk::smem_u32(&bars[STAGES]);
  const int tid = threadIdx.x;
  t90::ring_init(full0, empty0);
  __syncthreads();

  if (tid >= t90::CONSUMERS) {
    if (tid == t90::CONSUMERS) {
      // Producer lane: takes tiles until none is left, posting each k tile's tile index in
      // stage_tile before the arrival that the consumers' wait on the stage acquires.
      int it = 0;
      for (;;) {
        const int tile = t90::take_tile(work);
        if (tile >= tiles) {
          t90::ring_acquire(it, full0, empty0, 0, stage_tile, -1);  // no bytes: the arrival ends it
          break;
        }
        int kind, j, row0, col0;
        decode(tile, kind, j, row0, col0);
        if (kind != KIND_D) {
          const bool reduction = kind >= 2;
          const int kt = kind == 4 ? 2 * KT1 : reduction ? KTM : KT1;
          for (int t = 0; t < kt; ++t, ++it) {
            // Kind 4 runs over d_out twice (S_hi, then S_lo: rows K1.. of s_split).
            const int kb = (kind == 4 && t >= KT1 ? t - KT1 : t) * BK;
            if (kind == 3) t90::flag_wait(flag0 + kb / BM, RC);  // the rows of v this k tile reads
            if (kind == 4) t90::flag_wait(flag1 + kb / BM, RC);  // the rows of S this k tile reads
            const int s = t90::ring_acquire(it, full0, empty0, wf::RANK_STAGE_BYTES, stage_tile, tile);
            const uint32_t full = full0 + 8 * s;
            const uint32_t sa = smem_base + s * t90::STAGE_BYTES, sb = sa + t90::A_BYTES;
            if (reduction) {
              // A^T of a row-major K x rows matrix: two 64 x 64 boxes (64 of its columns, 64 k
              // rows); B: 64 columns of a K x r matrix, 64 k rows.
              const CUtensorMap* a = kind == 2 ? mr2a : kind == 3 ? mr3a : mr4a;
              t90::tma_load_2d(sa, a, full, row0, kb);
              t90::tma_load_2d(sa + 8192, a, full, row0 + 64, kb);
              const int kbb = kind == 4 && t >= KT1 ? K1 + kb : kb;
              t90::tma_load_2d(sb, kind == 2 ? mr2b : kind == 3 ? mr3b : mr4b, full, col0, kbb);
            } else {
              t90::tma_load_2d(sa, kind == 1 ? mr1a : ma1, full, kb, row0);
              if (kind == 1 || NN)
                t90::tma_load_2d(sb, kind == 1 ? mr1b : mr0b, full, col0, kb);  // N-major: (columns, k rows)
              else
                t90::tma_load_2d(sb, mr0b, full, kb, col0);  // K-major: (k, rows)
            }
          }
        } else {
          int m0, n0d;
          tile_origin(j, TM, TN, m0, n0d);
          for (int t = 0; t < KT1 + KT2; ++t, ++it) {
            const bool second = t >= KT1;
            if (t == KT1) {
              // The rows of A2 (and of B2) that this tile reads, from rank tiles of any block.
              t90::flag_wait(flag0 + m0 / BM, RC);
              if (!NN) {
                const int b = n0d / wf::ROWS;
                t90::flag_wait(flag1 + b, RC);
                if (b + 1 < R1) t90::flag_wait(flag1 + b + 1, RC);
              }
            }
            const int s = t90::ring_acquire(it, full0, empty0, t90::STAGE_BYTES, stage_tile, tile);
            const int kb = (second ? t - KT1 : t) * BK;
            t90::load_d_stage<NN>(smem_base + s * t90::STAGE_BYTES, second ? ma2 : ma1, second ? mb2 : mb1, full0 + 8 * s, kb,
                                  m0, n0d);
          }
        }
      }
    }
    return;
  }

  const int wg = tid >> 7;
  const int wrow = (tid & 127) >> 5;
  const int lane = tid & 31;
  const bool releaser = (tid & 127) == 0;
  const bool pair_store = ((((uintptr_t)D) & 3) == 0) && ((ldd & 1) == 0);
  int it = 0;
  for (;;) {
    // The next tile: the one whose first k tile is in the next stage (waiting on it is the
    // first wait of consume_tile too, which then returns at once).
    const int s0 = it % STAGES;
    t90::mbar_wait(full0 + 8 * s0, (it / STAGES) & 1);
    const int tile = stage_tile[s0];
    if (tile < 0) break;
    int kind, j, row0, col0;
    decode(tile, kind, j, row0, col0);
    if (kind != KIND_D) {
      float racc[32];
      if (kind >= 2) {
        if constexpr (NN) {
          t90::consume_tile<T, true, 32, true>(racc, it, kind == 4 ? 2 * KT1 : KTM, smem_base, full0, empty0, wg, releaser);
          if (kind == 2) {
            // S (K1 x r, f32), stored; with dphi also its two halves in T for the kind-4 tiles,
            // then the flag of its rows.
            wf::each_pair(racc, row0, col0, wg, wrow, lane, K1, r, [&](int row, int col, float a, float b) {
              *reinterpret_cast<float2*>(s_out + (size_t)row * r + col) = make_float2(a, b);
              if (dphi != nullptr) {
                const uint32_t hi = gk::Ty<T>::pack2(a, b);
                const float ha = gk::Ty<T>::to_f32(*reinterpret_cast<const T*>(&hi));
                const float hb = gk::Ty<T>::to_f32(*(reinterpret_cast<const T*>(&hi) + 1));
                *reinterpret_cast<uint32_t*>(s_split + (size_t)row * r + col) = hi;
                *reinterpret_cast<uint32_t*>(s_split + (size_t)(K1 + row) * r + col) = gk::Ty<T>::pack2(a - ha, b - hb);
              }
            });
            if (dphi != nullptr) {
              t90::publish(flag1 + j / RC);
            }
          } else if (kind == 3) {  // dpsi (r x N, f32) += the tile of dpsi^T
            wf::each_pair(racc, row0, col0, wg, wrow, lane, N, r, [&](int row, int col, float a, float b) {
              dpsi[(size_t)col * N + row] += a;
              dpsi[(size_t)(col + 1) * N + row] += b;
            });
          } else {  // dphi (N x r, f32) += scale1 (W^T S)
            wf::each_pair(racc, row0, col0, wg, wrow, lane, N, r, [&](int row, int col, float a, float b) {
              float2* p = reinterpret_cast<float2*>(dphi + (size_t)row * r + col);
              const float2 o = *p;
              *p = make_float2(fmaf(scale1, a, o.x), fmaf(scale1, b, o.y));
            });
          }
        }
      } else {
        if (kind == 1 || NN)
          t90::consume_tile<T, true>(racc, it, KT1, smem_base, full0, empty0, wg, releaser);
        else
          t90::consume_tile<T, false>(racc, it, KT1, smem_base, full0, empty0, wg, releaser);
        T* out = kind == 1 ? out1 : out0;
        const float sc = kind == 1 ? scale1 : scale0;
        wf::each_pair(racc, row0, col0, wg, wrow, lane, kind == 1 ? N : M, r, [&](int row, int col, float a, float b) {
          *reinterpret_cast<uint32_t*>(out + (size_t)row * r + col) = gk::Ty<T>::pack2(sc * a, sc * b);
        });
        t90::publish((kind == 1 ? flag1 : flag0) + j / RC);
      }
    } else {
      int m0, n0d;
      tile_origin(j, TM, TN, m0, n0d);
      float acc[NACC];
      t90::consume_tile<T, NN>(acc, it, KT1 + KT2, smem_base, full0, empty0, wg, releaser);
      store_tile<T>(acc, m0, n0d, wg, wrow, lane, M, N, bias, 0.f, D, ldd, pair_store, false);
    }
  }
#else
  __trap();  // never launched outside an sm_90a image
#endif
}

#define WEGEFT_RANK_T90(NAME, T, NN)                                                                                      \
  extern "C" __global__ void __launch_bounds__(t90::THREADS, 1)                                                         \
      NAME(const __grid_constant__ CUtensorMap ma1, const __grid_constant__ CUtensorMap mb1,                              \
           const __grid_constant__ CUtensorMap ma2, const __grid_constant__ CUtensorMap mb2,                              \
           const __grid_constant__ CUtensorMap mr0b, const __grid_constant__ CUtensorMap mr1a,                            \
           const __grid_constant__ CUtensorMap mr1b, const __grid_constant__ CUtensorMap mr2a,                            \
           const __grid_constant__ CUtensorMap mr2b, const __grid_constant__ CUtensorMap mr3a,                            \
           const __grid_constant__ CUtensorMap mr3b, int M, int N, int K1, int r, T* __restrict__ out0, float scale0,    \
           T* __restrict__ out1, float scale1, const T* __restrict__ bias, T* __restrict__ D, int ldd,                   \
           float* __restrict__ s_out, float* __restrict__ dpsi, const __grid_constant__ CUtensorMap mr4a,                 \
           const __grid_constant__ CUtensorMap mr4b, float* __restrict__ dphi, T* __restrict__ s_split,                   \
           unsigned* __restrict__ work) {                                                                                 \
    wegeft_rank_t90<T, NN>(&ma1, &mb1, &ma2, &mb2, &mr0b, &mr1a, &mr1b, &mr2a, &mr2b, &mr3a, &mr3b, M, N, K1, r, out0,    \
                           scale0, out1, scale1, bias, D, ldd, s_out, dpsi, &mr4a, &mr4b, dphi, s_split, work);           \
  }

WEGEFT_RANK_T90(wegeft_fwd_bf16_tma, __nv_bfloat16, false)
WEGEFT_RANK_T90(wegeft_fwd_f16_tma, __half, false)
WEGEFT_RANK_T90(wegeft_bwd_bf16_tma, __nv_bfloat16, true)
WEGEFT_RANK_T90(wegeft_bwd_f16_tma, __half, true)
