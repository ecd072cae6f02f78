// wegeft_rank_tma.cuh — wegeft_fwd_*_tma / wegeft_bwd_*_tma: the fused forward and
// backward in one launch each.
// Part of the K-extended GEMM module: included by gemm_kext.cu (the kernel contract), in
// the order listed there; not compiled on its own.
#pragma once

// ------------------------------------------------------------------------------------------
// The fused forward and backward in one launch each:
//   wegeft_fwd_{bf16,f16}_tma  u = x psi^T (T x r), C = scale W phi (d_out x r),
//                              y = [x | u] [W | C]^T (+ bias)                 (the NT TMA GEMM)
//   wegeft_bwd_{bf16,f16}_tma  v = G C (T x r), S = G^T u (d_out x r, f32), dpsi += v^T x
//                              (r x d_in, f32), dx = [G | v] [W ; psi]         (the NN TMA GEMM)
//                              and, when given dphi, dphi += scale W^T S (d_in x r, f32)
//
// The TMA kernel (gemm_tma.cuh), persistent, with the rank-r products as tiles of the same grid, taken
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
