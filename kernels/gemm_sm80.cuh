// gemm_sm80.cuh — the sm_80 tensor-core kernels gemm_kext_{nt,nn}_{bf16,f16}[_wide]
// (mma.sync, ldmatrix, cp.async).
// Part of the K-extended GEMM module: included by gemm_kext.cu (the kernel contract), in
// the order listed there; not compiled on its own.
#pragma once

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
//   once; ~20 instructions and 4 cp.async a thread per tile, 6 in the wide one). Every other tile (the partial last tile of
//   K1, all K2 tiles, unaligned pairs) takes the general predicated loader.
//   Block order: grouped rasterisation (8 block-rows per group) for L2 reuse.
//   ptxas (CUDA 13.0): 124-128 registers (wide: 236-243), 0 spills, 0 stack, sm_80 and sm_90a.
//   Verified without a GPU by tests/emulation/gemm_on_host.cpp (run by `cargo test`): this
//   source compiled on the host, every block run as 256 fibers, cp.async / ldmatrix /
//   mma.m16n8k16 emulated with their PTX semantics, against a double-precision loop (odd
//   sizes, both load paths, bias, beta, NaN padding); and earlier by kernels/test/emulate_sm80.py,
//   a literal Python translation of the index math.

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
      gk::load_tile_chunk<T>(sa + gk::swz_k32(r, c), A, lda, M, K, m0 + r, kb + c * 8, vec);
    }
    if (!NN) {
      // B (N x K, k contiguous): the same K-major layout as A, BN rows.
#pragma unroll
      for (int p = 0; p < PB; ++p) {
        const int idx = tid + p * THREADS;
        const int r = idx >> 2, c = idx & 3;
        gk::load_tile_chunk<T>(sb + gk::swz_k32(r, c), B, ldb, N, K, n0 + r, kb + c * 8, vec);
      }
    } else {
      // B (K x N, n contiguous): N-major tile, 32 k-rows x BN/8 chunks.
#pragma unroll
      for (int p = 0; p < PB; ++p) {
        const int idx = tid + p * THREADS;
        const int r = idx >> Cfg::NN_ROW_SHIFT, c = idx & (Cfg::NN_ROW_CHUNKS - 1);
        gk::load_tile_chunk<T>(sb + gk::swz8(r, c, NN_ROW_BYTES), B, ldb, K, N, kb + r, n0 + c * 8, vec);
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
    if (KT > 0) load_frags(af[0], bf[0], smem_base, 0);  // K1 = K2 = 0: D = bias (+ beta D)
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
