// gemm_tma.cuh — gemm_kext_{nt,nn}_{bf16,f16}_tma: the sm_90a wgmma kernels fed by TMA,
// warp-specialised.
// Part of the K-extended GEMM module: included by gemm_kext.cu (the kernel contract), in
// the order listed there; not compiled on its own.
#pragma once

// ------------------------------------------------------------------------------------------
// sm_90a kernel with the tensor memory accelerator: gemm_kext_{nt,nn}_{bf16,f16}_tma.
//
// The same block tile, shared layouts, wgmma descriptors and epilogue as the _sm90 kernel
// (gemm_sm90.cuh), but the tiles arrive by TMA (cp.async.bulk.tensor) and the block is warp-specialised:
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
// wegeft_fwd's schedule (wegeft_rank_tma.cuh). The next tile index from the grid's counter.
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
