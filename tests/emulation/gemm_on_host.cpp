// Host emulation of the K-extended GEMM core (kernels/gemm_kext.cu), for machines without a
// GPU: the kernel source itself, compiled by a host C++ compiler, run with every block as 256
// fibers (fiber_block.h) and the PTX helpers it uses supplied here with the instructions'
// semantics:
//   cp.async.cg 16 (src-size zero-fill; the destination reads as NaN until a wait_group that
//     covers the copy; misaligned addresses abort; a block may not exit with copies in flight),
//   st.shared.v4, ldmatrix .x4 / .x4.trans (the 32 lanes' row addresses gathered at a warp
//     barrier; misaligned rows abort), mma.sync m16n8k16 bf16 / f16 (fragments gathered at a
//     warp barrier, f32 accumulation), and for the sm_90a kernel wgmma.mma_async m64n256k16
//     from shared-memory descriptors with the 128-byte swizzle, asynchronous up to
//     wgmma.wait_group (a read of shared memory that changes while in flight is reported).
// So the real index math of the sm_80 tensor-core kernel — swizzles, the hoisted fast loader
// and the predicated one, ldmatrix lane addresses, fragment order, K extension, the 4-stage
// pipeline and its barriers, the epilogue's bias / beta / paired stores — runs, and so do the
// f32 FMA kernel and the sm_90a kernel (its loaders into the wgmma layouts, descriptors,
// 2-deep refill distance, accumulator layout, epilogue), and the sm_90a TMA kernel (288 fibers:
// its producer warp, the full/empty mbarrier ring with phases across the tiles of a persistent
// block, the TMA boxes with their swizzle and zero fill, emulated below). The wgmma emulation encodes the PTX
// ISA's descriptor and canonical-layout definitions; that the hardware reads them so is shown
// only on a GPU (tests/cuda_layer.rs). Every case compares against a double-precision loop over the inputs as
// stored: odd M, N, K1, K2 (K1 or K2 zero), more k tiles than pipeline stages, NT and NN,
// bf16 and f16, aligned (16-byte cp.async path), odd leading dimensions and misaligned bases
// (scalar path), bias, beta = 0 (D starts as NaN, so it must not be read) and beta != 0. Each
// matrix's row padding and the row after it hold NaN (a read past a tail shows in the result)
// and D's padding must come back untouched. Whole tiles with an aligned D take the epilogues'
// 16-byte stores after a quad transpose (__shfl_xor_sync emulated at a warp barrier). Also the
// fused forward's wegeft_uc kernel (u = x psi^T and C = alpha W phi in one grid, 128 fibers a
// block), against double loops, with a sentinel row after u and C; and wegeft_fwd_*_tma /
// wegeft_bwd_*_tma (u, C and y, or v, S, dpsi, dphi and dx, in one persistent grid: the tile counter, the flags
// and the consumers' named barrier emulated; a TMA read of a rank tile's output without a wait
// on its rows' flags fails).
// Built and run by tests/kernel_emulation.rs:
//   g++ -std=c++20 -O1 -I .cuda/home/include -I kernels tests/emulation/gemm_on_host.cpp
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <map>

#include "host_shim.h"
#define __grid_constant__

// ---- the PTX helpers of gemm_kext.cu (gemm_common.cuh ...), with PTX semantics ---------------

constexpr int SMEM = 4 * 49152 + 1024;  // h90::SMEM_BYTES (tc::SMEM_BYTES is 65536)
alignas(1024) unsigned char g_smem[SMEM];
#define GK_DYNAMIC_SMEM(name, align) unsigned char* name = g_smem

int g_failures = 0;
[[noreturn]] void die(const char* what, uint32_t addr) {
    std::printf("FATAL: %s (shared offset %u, thread %u, block %u)\n", what, addr, threadIdx.x, blockIdx.x);
    std::exit(3);
}

struct PendCopy {
    uint32_t dst;
    unsigned char data[16];
};
struct Lane {
    std::vector<std::vector<PendCopy>> groups;  // committed, oldest first
    std::vector<PendCopy> open;                 // issued since the last commit
};
std::vector<Lane> g_lanes(288);
int g_leftover = 0;

// Per-warp exchange area for the collective instructions.
struct WarpX {
    uint32_t addr[32];
    uint32_t a[32][4];
    uint32_t b[32][2];
};
WarpX g_wx[8];

namespace gk {

// Shared objects outside the dynamic buffer (the TMA kernel's static mbarrier array) get
// addresses past it: each 64 KiB window of host memory that holds one is given its own 64 KiB
// of addresses, in the order first seen, so that address arithmetic within an array (full0 +
// 8 s) stays right. Only the mbarrier helpers take those addresses (every other shared access
// checks its address against the buffer, and an mbarrier address that was never initialised
// aborts).
inline std::vector<uintptr_t> g_static_windows;
inline uint32_t smem_u32(const void* p) {
    const auto off = (const unsigned char*)p - g_smem;
    if (off >= 0 && off < SMEM) return (uint32_t)off;
    const uintptr_t w = (uintptr_t)p >> 16;
    size_t i = 0;
    while (i < g_static_windows.size() && g_static_windows[i] != w) ++i;
    if (i == g_static_windows.size()) g_static_windows.push_back(w);
    return (uint32_t)(SMEM + (i << 16) + ((uintptr_t)p & 0xFFFF));
}

inline void land(const PendCopy& c) { std::memcpy(g_smem + c.dst, c.data, 16); }

inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
    if (dst % 16 || dst + 16 > (uint32_t)SMEM) die("cp.async destination misaligned or outside shared memory", dst);
    if (src_bytes < 0 || src_bytes > 16) die("cp.async src-size outside 0..16", dst);
    if (src_bytes > 0 && ((uintptr_t)src % 16)) die("cp.async source not 16-byte aligned", dst);
    PendCopy c;
    c.dst = dst;
    std::memset(c.data, 0, 16);
    if (src_bytes > 0) std::memcpy(c.data, src, src_bytes);
    std::memset(g_smem + dst, 0xFF, 16);  // in flight: reads as NaN until waited for
    g_lanes[threadIdx.x].open.push_back(c);
}
inline void cp_async_commit() {
    Lane& l = g_lanes[threadIdx.x];
    l.groups.push_back(std::move(l.open));
    l.open.clear();
}
template <int N>
inline void cp_async_wait() {
    Lane& l = g_lanes[threadIdx.x];
    while ((int)l.groups.size() > N) {
        for (const auto& c : l.groups.front()) land(c);
        l.groups.erase(l.groups.begin());
    }
}
inline void cp_async_wait_all() {
    cp_async_commit();
    cp_async_wait<0>();
}

inline void st_shared_v4(uint32_t addr, uint4 v) {
    if (addr % 16 || addr + 16 > (uint32_t)SMEM) die("st.shared.v4 misaligned or outside shared memory", addr);
    std::memcpy(g_smem + addr, &v, 16);
}

// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; lane l receives, of
// each matrix, row l/4, elements 2(l%4) and 2(l%4)+1 (.trans: column l/4, rows 2(l%4), 2(l%4)+1).
inline void ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
    const int lane = threadIdx.x % 32;
    WarpX& x = g_wx[threadIdx.x / 32];
    if (addr % 16 || addr + 16 > (uint32_t)SMEM) die("ldmatrix row address misaligned or outside shared memory", addr);
    x.addr[lane] = addr;
    fb::sync_warp();
    for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!trans) {
            const uint16_t* row = (const uint16_t*)(g_smem + x.addr[8 * i + lane / 4]);
            lo = row[2 * (lane % 4)];
            hi = row[2 * (lane % 4) + 1];
        } else {
            lo = ((const uint16_t*)(g_smem + x.addr[8 * i + 2 * (lane % 4)]))[lane / 4];
            hi = ((const uint16_t*)(g_smem + x.addr[8 * i + 2 * (lane % 4) + 1]))[lane / 4];
        }
        r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    fb::sync_warp();
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix(r, addr, true); }

template <typename T>
inline float half_of(uint32_t w, int hi) {
    const uint16_t bits = (uint16_t)(hi ? w >> 16 : w & 0xffff);
    T v;
    std::memcpy(&v, &bits, 2);
    if constexpr (std::is_same<T, __half>::value)
        return __half2float(v);
    else
        return __bfloat162float(v);
}

// mma.m16n8k16.row.col: lane L (g = L/4, t = L%4) holds A[g][2t..2t+1] (a0), A[g+8][2t..] (a1),
// A[g][2t+8..] (a2), A[g+8][2t+8..] (a3), B[2t..2t+1][g] (b0), B[2t+8..2t+9][g] (b1), and
// D[g][2t..2t+1] (d0, d1), D[g+8][2t..2t+1] (d2, d3).
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    const int lane = threadIdx.x % 32;
    WarpX& x = g_wx[threadIdx.x / 32];
    for (int i = 0; i < 4; ++i) x.a[lane][i] = a[i];
    x.b[lane][0] = b[0];
    x.b[lane][1] = b[1];
    fb::sync_warp();
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L) {
        const int g = L / 4, t = L % 4;
        for (int h = 0; h < 2; ++h) {
            A[g][2 * t + h] = half_of<T>(x.a[L][0], h);
            A[g + 8][2 * t + h] = half_of<T>(x.a[L][1], h);
            A[g][2 * t + 8 + h] = half_of<T>(x.a[L][2], h);
            A[g + 8][2 * t + 8 + h] = half_of<T>(x.a[L][3], h);
            B[2 * t + h][g] = half_of<T>(x.b[L][0], h);
            B[2 * t + 8 + h][g] = half_of<T>(x.b[L][1], h);
        }
    }
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        float acc = d[e];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        d[e] = acc;
    }
    fb::sync_warp();
}

}  // namespace gk

// ---- the asynchronous warpgroup MMA of the sm_90a kernel -----------------------------------
//
// wgmma.mma_async m64n256k16 (f32 += bf16/f16 x bf16/f16), operands in shared memory named by
// matrix descriptors: bits 0-13 start address >> 4, 16-29 leading byte offset >> 4, 32-45
// stride byte offset >> 4, 62-63 swizzle mode (1: 128-byte). With the 128-byte swizzle the
// 16-byte chunk bits [4:6] of every address are XORed with its bits [7:9]. Addresses, before
// the swizzle (PTX ISA, "Matrix Descriptor" and the canonical layouts):
//   K-major (A; B when not transposed): element (row, k) at start + (row / 8) SBO + (row % 8) 128 + 2 k;
//   MN-major (B transposed: k-rows of contiguous n): (k, n) at
//     start + (n / 64) LBO + (k / 8) SBO + (k % 8) 128 + 2 (n % 64).
// Accumulator d[i] of thread t of the warpgroup holds row 16 (t / 32) + (t % 32) / 4 + 8 ((i >> 1) & 1),
// column 8 (i >> 2) + 2 (t % 4) + (i & 1) of the 64 x 256 tile.
// Asynchrony: an mma is computed when issued and again when a wgmma.wait_group retires it; the
// two must agree (shared memory a wgmma reads may not change while it is in flight), and the
// retiring result is added to the accumulators.
namespace h90emu {
struct Op {
    uint64_t da, db;
    int trans_a, trans_b;
    bool f16;
    int n;  // accumulators a thread: 128 (m64n256k16) or 32 (m64n64k16)
    float* acc;
    std::vector<float> issued;
};
struct Lane {
    std::vector<std::vector<Op>> groups;
    std::vector<Op> open;
};
std::vector<Lane> lanes(288);
int races = 0;

inline uint32_t swz(uint32_t a) { return a ^ (((a >> 7) & 7) << 4); }
inline float elem(uint32_t addr, bool f16) {
    if (addr + 2 > (uint32_t)SMEM) die("wgmma operand outside shared memory", addr);
    uint16_t bits;
    std::memcpy(&bits, g_smem + addr, 2);
    return f16 ? gk::half_of<__half>(bits, 0) : gk::half_of<__nv_bfloat16>(bits, 0);
}
inline void compute(const Op& op, float* out) {
    if ((op.da >> 62) != 1 || (op.db >> 62) != 1) die("wgmma descriptor without the 128-byte swizzle", 0);
    const uint32_t sa = (uint32_t)(op.da & 0x3FFF) << 4, sba = (uint32_t)((op.da >> 32) & 0x3FFF) << 4;
    const uint32_t lba = (uint32_t)((op.da >> 16) & 0x3FFF) << 4;
    const uint32_t sb = (uint32_t)(op.db & 0x3FFF) << 4, lbb = (uint32_t)((op.db >> 16) & 0x3FFF) << 4;
    const uint32_t sbb = (uint32_t)((op.db >> 32) & 0x3FFF) << 4;
    const int t = threadIdx.x % 128, w = t / 32, lane = t % 32;
    float A[2][16];  // the two rows this thread's accumulators touch
    for (int h = 0; h < 2; ++h) {
        const int row = 16 * w + lane / 4 + 8 * h;
        for (int k = 0; k < 16; ++k)
            A[h][k] = elem(swz(op.trans_a ? sa + (row / 64) * lba + (k / 8) * sba + (k % 8) * 128 + 2 * (row % 64)
                                          : sa + (row / 8) * sba + (row % 8) * 128 + 2 * k),
                           op.f16);
    }
    for (int i = 0; i < op.n; ++i) {
        const int h = (i >> 1) & 1, col = 8 * (i >> 2) + 2 * (lane % 4) + (i & 1);
        float acc = 0.0f;
        for (int k = 0; k < 16; ++k) {
            const uint32_t b = op.trans_b ? sb + (col / 64) * lbb + (k / 8) * sbb + (k % 8) * 128 + 2 * (col % 64)
                                          : sb + (col / 8) * sbb + (col % 8) * 128 + 2 * k;
            acc += A[h][k] * elem(swz(b), op.f16);
        }
        out[i] = acc;
    }
}
inline void retire(Op& op) {
    std::vector<float> now(op.n);
    compute(op, now.data());
    if (std::memcmp(now.data(), op.issued.data(), op.n * sizeof(float)) != 0) {
        if (races++ == 0) std::printf("RACE: shared memory read by a wgmma changed while it was in flight (thread %u, block %u)\n", threadIdx.x, blockIdx.x);
    }
    for (int i = 0; i < op.n; ++i) op.acc[i] += now[i];
}
}  // namespace h90emu

namespace h90 {
inline void fence_proxy_async() {}
inline void wgmma_fence() {}
template <int N>
inline void fence_regs(float (&)[N]) {}
inline void wgmma_commit() {
    auto& l = h90emu::lanes[threadIdx.x];
    l.groups.push_back(std::move(l.open));
    l.open.clear();
}
template <int N>
inline void wgmma_wait() {
    auto& l = h90emu::lanes[threadIdx.x];
    while ((int)l.groups.size() > N) {
        for (auto& op : l.groups.front()) h90emu::retire(op);
        l.groups.erase(l.groups.begin());
    }
}
template <typename T, int TRANS_B>
struct Wgmma {
    template <int N>
    static void run(float (&d)[N], uint64_t da, uint64_t db) {
        static_assert(N == 128, "m64n256k16: 128 accumulators per thread");
        issue(d, N, da, db);
    }
    static void issue(float* d, int n, uint64_t da, uint64_t db, int trans_a = 0) {
        h90emu::Op op{da, db, trans_a, TRANS_B, std::is_same<T, __half>::value, n, d, std::vector<float>(n)};
        h90emu::compute(op, op.issued.data());
        h90emu::lanes[threadIdx.x].open.push_back(std::move(op));
    }
};
// m64n64k16: the first 64 columns of the same operand layouts (TRANS_A: A MN-major, its
// element (row, k) at start + (row / 64) LBO + (k / 8) SBO + (k % 8) 128 + 2 (row % 64)).
template <typename T, int TRANS_B, int TRANS_A = 0>
struct Wgmma64 {
    static void run(float (&d)[32], uint64_t da, uint64_t db) { Wgmma<T, TRANS_B>::issue(d, 32, da, db, TRANS_A); }
};
}  // namespace h90

// ---- mbarriers and TMA of the sm_90a TMA kernel -------------------------------------------
//
// mbarrier (PTX ISA "Parallel Synchronization and Communication Instructions: mbarrier"): a
// phase completes when its pending arrival count reaches zero and its transaction count is
// zero; then the next phase starts with the initial count. try_wait.parity P is true once the
// phase of parity P has completed, i.e. when the current phase's parity differs from P.
// arrive.expect_tx adds the bytes to the transaction count, then arrives; a TMA copy subtracts
// its bytes when it lands (here at issue: the data is in shared memory before the barrier can
// complete, as on the device). A negative transaction count, or a wait no other thread can end
// (the fiber scheduler's deadlock check), aborts.
// cp.async.bulk.tensor.2d with a 128-byte swizzle: box element (r, c) of the map's box comes
// from global (c1 + r, c0 + c), zero outside the tensor; row r of the box is 128 bytes at
// dst + 128 r, its 16-byte chunk j at chunk j ^ ((address >> 7) & 7). The destination must be
// 1024-byte aligned (the swizzle atom). The emulation's tensor map (made by `tma_map` below;
// the launcher's are cuTensorMapEncodeTiled's) holds base, element size, columns, rows, row
// stride in bytes, and the box's columns and rows.
namespace t90emu {
struct Bar {
    int count = 0, pending = 0;
    long tx = 0;
    unsigned phase = 0;  // completed phases
    bool live = false;
};
inline std::map<uint32_t, Bar> bars;
inline Bar& bar(uint32_t a) {
    auto it = bars.find(a);
    if (it == bars.end() || !it->second.live) die("mbarrier used before mbarrier.init", a);
    return it->second;
}
inline void settle(Bar& b) {
    if (b.tx < 0) die("mbarrier transaction count below zero", 0);
    if (b.pending == 0 && b.tx == 0) {
        ++b.phase;
        b.pending = b.count;
    }
    ++fb::g_block.progress;
}
inline int copies = 0;
}  // namespace t90emu

template <typename T>
CUtensorMap tma_map(const T* ptr, int rows, int cols, int ld, int box_cols, int box_rows) {
    CUtensorMap m;
    std::memset(&m, 0, sizeof m);
    const uint64_t v[7] = {(uint64_t)(uintptr_t)ptr, sizeof(T), (uint64_t)cols, (uint64_t)rows, (uint64_t)ld * sizeof(T),
                           (uint64_t)box_cols, (uint64_t)box_rows};
    std::memcpy(m.opaque, v, sizeof v);
    return m;
}

namespace t90 {
inline void mbar_init(uint32_t a, uint32_t count) {
    t90emu::Bar& b = t90emu::bars[a];
    b = t90emu::Bar{(int)count, (int)count, 0, 0, true};
}
inline void mbar_fence_init() {}
inline void mbar_arrive(uint32_t a) {
    t90emu::Bar& b = t90emu::bar(a);
    if (b.pending <= 0) die("mbarrier arrival beyond the expected count", a);
    --b.pending;
    t90emu::settle(b);
}
inline void mbar_expect_tx(uint32_t a, uint32_t bytes) {
    t90emu::bar(a).tx += bytes;
    mbar_arrive(a);
}
inline void mbar_wait(uint32_t a, uint32_t parity) {
    while ((t90emu::bar(a).phase & 1) == (parity & 1)) fb::yield_to_scheduler();
}
inline void grid_dependency_wait() {}  // one grid at a time here: its prerequisites are done
// wegeft_fwd's and wegeft_bwd's schedule. Blocks run one after another here, so the first
// block takes every tile and a D tile's flags are posted by its own consumers (a flag wait yields to them; one
// that no fiber can end is the scheduler's deadlock). Counted: tiles taken, flag waits that
// had to wait.
// With take_cap > 0 a block takes at most that many tiles (then it is told that none are left,
// as if other blocks had taken them), so that the blocks after it take the rest: y tiles then
// read rank tiles of earlier blocks through the flags.
// The producer's TMA reads of u, C, v and S's halves are checked against the flags it waited
// for since it took its tile (`waited`): every 128-row block such a box touches must have had
// its flag waited for (check_rank registers those outputs and their flags in `guard`).
inline int tiles_taken = 0, flag_stalls = 0, take_cap = 0, taken_here = 0;
inline unsigned taken_block = ~0u;
inline std::vector<const unsigned*> waited;
struct Guard {
    const void* base = nullptr;  // a rank or reduction tile's output that TMA reads back
    int rows = 0;
    const unsigned* flags = nullptr;
    int period = 0;  // > 0: row r is row r % period of the flags' rows (S_hi, then S_lo)
};
inline Guard guard[3];
inline int unguarded_reads = 0;
inline int take_tile(unsigned* counter) {
    if (taken_block != blockIdx.x) taken_block = blockIdx.x, taken_here = 0;
    if (take_cap > 0 && taken_here == take_cap) return 1 << 30;
    ++taken_here;
    ++tiles_taken;
    waited.clear();
    return (int)(*counter)++;
}
inline void flag_wait(const unsigned* flag, unsigned want) {
    if (*flag < want) ++flag_stalls;
    while (*flag < want) fb::yield_to_scheduler();
    waited.push_back(flag);
}
inline void check_guarded_read(const void* base, int c1, int box_rows) {
    for (const Guard& g : guard) {
        if (g.base == nullptr || g.base != base) continue;
        for (int row = std::max(c1, 0); row < std::min(c1 + box_rows, g.rows); ++row)
            if (std::find(waited.begin(), waited.end(), g.flags + (g.period ? row % g.period : row) / 128) == waited.end()) {
                ++unguarded_reads;
                break;
            }
    }
}
inline void flag_post(unsigned* flag) {
    ++*flag;
    ++fb::g_block.progress;
}
inline void publish_fence() {}
inline void consumers_sync() {
    if (threadIdx.x >= 256) die("consumers_sync outside the consumer warpgroups", 0);
    fb::sync_named(1, 256);
}
inline void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t a, int c0, int c1) {
    uint64_t v[7];
    std::memcpy(v, map->opaque, sizeof v);
    const auto* base = (const unsigned char*)(uintptr_t)v[0];
    const int es = (int)v[1], cols = (int)v[2], rows = (int)v[3], bc = (int)v[5], br = (int)v[6];
    const uint64_t ld = v[4];
    if (dst % 1024) die("TMA destination not 1024-byte aligned (the 128-byte swizzle atom)", dst);
    if (bc * es != 128) die("TMA box rows must be 128 bytes for the 128-byte swizzle", dst);
    if (dst + (uint32_t)(br * 128) > (uint32_t)SMEM) die("TMA box outside shared memory", dst);
    for (int r = 0; r < br; ++r)
        for (int c = 0; c < bc; ++c) {
            const uint32_t lin = dst + r * 128 + c * es;
            const uint32_t at = lin ^ (((lin >> 7) & 7) << 4);
            const int gr = c1 + r, gc = c0 + c;
            if (gr >= 0 && gr < rows && gc >= 0 && gc < cols)
                std::memcpy(g_smem + at, base + gr * ld + (uint64_t)gc * es, es);
            else
                std::memset(g_smem + at, 0, es);
        }
    ++t90emu::copies;
    check_guarded_read(base, c1, br);
    t90emu::Bar& b = t90emu::bar(a);
    b.tx -= (long)br * 128;
    t90emu::settle(b);
}
}  // namespace t90

// __shfl_xor_sync over the calling warp (the epilogue's quad transpose): every lane posts its
// value at a warp barrier and takes lane ^ k's.
inline uint32_t __shfl_xor_sync(unsigned mask, uint32_t v, int k) {
    if (mask != 0xffffffffu) die("__shfl_xor_sync with a partial mask", 0);
    static uint32_t posted[9][32];  // 288 threads: 9 warps
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    posted[w][lane] = v;
    fb::sync_warp();
    const uint32_t r = posted[w][lane ^ k];
    fb::sync_warp();
    return r;
}

#include "gemm_kext.cu"

// ---- the cases -----------------------------------------------------------------------------

uint64_t g_rs = 0x9E3779B97F4A7C15ull;
float rnd() {
    g_rs ^= g_rs << 13;
    g_rs ^= g_rs >> 7;
    g_rs ^= g_rs << 17;
    return (float)((double)(g_rs >> 11) / (double)(1ull << 53) * 2.0 - 1.0);
}

template <typename T>
T from_f(float v) {
    if constexpr (std::is_same<T, float>::value)
        return v;
    else if constexpr (std::is_same<T, __half>::value)
        return __float2half_rn(v);
    else
        return __float2bfloat16_rn(v);
}
template <typename T>
double to_d(T v) {
    if constexpr (std::is_same<T, float>::value)
        return v;
    else if constexpr (std::is_same<T, __half>::value)
        return __half2float(v);
    else
        return __bfloat162float(v);
}

// A rows x cols matrix at leading dimension ld inside a buffer that starts `shift` elements
// past a 16-byte boundary; the row padding and one row after the matrix are NaN.
template <typename T>
struct Mat {
    std::vector<T> buf;
    T* p = nullptr;
    int rows = 0, cols = 0, ld = 0;
    Mat(int r, int c, int ld_, int shift, bool nan_pad = true) : rows(r), cols(c), ld(ld_) {
        buf.resize((size_t)(r + 1) * ld_ + shift + 16);
        T* base = buf.data();
        while ((uintptr_t)base % 16) ++base;
        p = base + shift;
        for (size_t i = 0; i < (size_t)(r + 1) * ld_; ++i) p[i] = from_f<T>(nan_pad ? NAN : 0.0f);
        for (int i = 0; i < r; ++i)
            for (int j = 0; j < c; ++j) p[(size_t)i * ld + j] = from_f<T>(rnd());
    }
    double at(int i, int j) const { return to_d(p[(size_t)i * ld + j]); }
};

struct Case {
    int M, N, K1, K2;
};

// At a thread's exit: cp.async copies or wgmma groups it left in flight are counted (a failure
// at the end) and dropped, so that the next block starts clean.
void reap_lanes() {
    Lane& l = g_lanes[threadIdx.x];
    auto& w = h90emu::lanes[threadIdx.x];
    if (!l.groups.empty() || !l.open.empty() || !w.groups.empty() || !w.open.empty()) {
        ++g_leftover;
        l.groups.clear();
        l.open.clear();
        w.groups.clear();
        w.open.clear();
    }
}
int g_checks = 0;

// layout 0: aligned, lds multiples of 8 (the 16-byte cp.async path); 1: odd lds; 2: bases one
// element past 16-byte alignment (both scalar paths).
template <typename T>
using TmaKernel = void (*)(const CUtensorMap, const CUtensorMap, const CUtensorMap, const CUtensorMap, int, int, int, int,
                           const T*, int, const T*, int, const T*, int, const T*, int, const T*, float, T*, int);

// `tma`: run that kernel (288 threads, the maps made here as the launcher makes them; layout 0
// only) on min(tiles, grid_cap) blocks (grid_cap 0: a block per tile) instead of `kernel`.
template <typename T, bool NN>
void check(const char* name, void (*kernel)(int, int, int, int, const T*, int, const T*, int, const T*, int, const T*, int,
                                            const T*, float, T*, int),
           int bm, int bn, Case c, int layout, bool bias, float beta, double tol, TmaKernel<T> tma = nullptr,
           int grid_cap = 0) {
    const int M = c.M, N = c.N, K1 = c.K1, K2 = c.K2;
    // Odd leading dimensions are never multiples of 8.
    auto ld_of = [&](int cols) { return layout == 1 ? cols + 1 + cols % 2 : (cols + 7) / 8 * 8 + 8; };
    const int shift = layout == 2 ? 1 : 0;
    Mat<T> A1(M, K1, ld_of(std::max(K1, 1)), shift), A2(M, K2, ld_of(std::max(K2, 1)), shift);
    Mat<T> B1(NN ? K1 : N, NN ? N : K1, ld_of(NN ? N : std::max(K1, 1)), shift);
    Mat<T> B2(NN ? K2 : N, NN ? N : K2, ld_of(NN ? N : std::max(K2, 1)), shift);
    Mat<T> bv(1, N, N, 0);
    // layout 0: a multiple of 8 (with the aligned D: the wgmma kernels' 16-byte stores of whole
    // tiles, paired stores elsewhere); otherwise odd (scalar stores).
    const int ldd = layout == 0 ? (N + 7) / 8 * 8 + 8 : N + 5;
    Mat<T> D(M, N, ldd, layout == 2 ? 1 : 0, false);
    // D's padding and extra row hold a sentinel; with beta == 0 D itself starts as NaN.
    const float sentinel = 7.0f;
    for (int i = 0; i <= M; ++i)
        for (int j = 0; j < ldd; ++j)
            if (i == M || j >= N) D.p[(size_t)i * ldd + j] = from_f<T>(sentinel);
            else if (beta == 0.0f) D.p[(size_t)i * ldd + j] = from_f<T>(NAN);
    std::vector<double> want((size_t)M * N);
    double scale = 0;
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            double s = 0;
            for (int k = 0; k < K1; ++k) s += A1.at(i, k) * (NN ? B1.at(k, j) : B1.at(j, k));
            for (int k = 0; k < K2; ++k) s += A2.at(i, k) * (NN ? B2.at(k, j) : B2.at(j, k));
            if (bias) s += bv.at(0, j);
            if (beta != 0.0f) s += beta * D.at(i, j);
            want[(size_t)i * N + j] = s;
            scale = std::max(scale, std::fabs(s));
        }
    const int tiles = ((M + bm - 1) / bm) * ((N + bn - 1) / bn);
    const T* a2 = K2 ? A2.p : nullptr;
    const T* b2 = K2 ? B2.p : nullptr;
    CUtensorMap maps[4];
    if (tma) {
        if (layout != 0 || K1 == 0) die("the TMA kernel takes aligned operands with K1 > 0 only (the launcher's rule)", 0);
        maps[0] = tma_map(A1.p, M, K1, A1.ld, 64, 128);
        maps[1] = NN ? tma_map(B1.p, K1, N, B1.ld, 64, 64) : tma_map(B1.p, N, K1, B1.ld, 64, 256);
        maps[2] = K2 ? tma_map(A2.p, M, K2, A2.ld, 64, 128) : maps[0];
        maps[3] = K2 ? (NN ? tma_map(B2.p, K2, N, B2.ld, 64, 64) : tma_map(B2.p, N, K2, B2.ld, 64, 256)) : maps[1];
    }
    const int grid = tma && grid_cap > 0 ? std::min(tiles, grid_cap) : tiles;
    fb::run_grid({(unsigned)grid, 1, 1}, tma ? 288 : 256, [&] {
        if (tma)
            tma(maps[0], maps[1], maps[2], maps[3], M, N, K1, K2, A1.p, A1.ld, B1.p, B1.ld, a2, A2.ld, b2, B2.ld,
                bias ? bv.p : nullptr, beta, D.p, ldd);
        else
            kernel(M, N, K1, K2, A1.p, A1.ld, B1.p, B1.ld, a2, A2.ld, b2, B2.ld, bias ? bv.p : nullptr, beta, D.p, ldd);
        reap_lanes();
    });
    double worst = 0;
    int at = 0;
    bool pad_ok = true;
    for (int i = 0; i <= M; ++i)
        for (int j = 0; j < ldd; ++j) {
            const double g = D.at(i, j);
            if (i == M || j >= N) {
                pad_ok &= g == sentinel;
                continue;
            }
            const double e = std::fabs(g - want[(size_t)i * N + j]) / std::max(scale, 1e-30);
            const double ee = std::isnan(e) ? INFINITY : e;
            if (ee > worst) worst = ee, at = i * N + j;
        }
    const bool ok = worst <= tol && pad_ok;
    ++g_checks;
    if (!ok) ++g_failures;
    std::printf("%s %-23s M%-4d N%-4d K1 %-4d K2 %-3d layout %d bias %d beta %.1f  err %.2e (tol %.0e)%s\n", ok ? "ok  " : "FAIL",
                name, M, N, K1, K2, layout, bias, beta, worst, tol, pad_ok ? "" : "  PADDING WRITTEN");
    if (worst > tol) std::printf("      worst at row %d col %d: want %g\n", at / N, at % N, want[at]);
}

// wegeft_uc (u = x psi^T and C = alpha W phi in one grid, 128 threads a block) against double
// loops; u and C are followed by a sentinel row that must stay untouched.
template <typename T>
void check_uc(const char* name, void (*kernel)(int, int, int, int, const T*, int, const T*, T*, const T*, int, const T*, T*, float),
              int Tn, int din, int dout, int r, double tol) {
    const int ldx = din + 8, ldw = din + 16;
    Mat<T> x(Tn, din, ldx, 0), psi(r, din, din, 0), w(dout, din, ldw, 0), phi(din, r, r, 0);
    Mat<T> u(Tn, r, r, 0, false), c(dout, r, r, 0, false);
    const float sentinel = 7.0f, alpha = 0.75f;
    for (int j = 0; j < r; ++j) u.p[(size_t)Tn * r + j] = from_f<T>(sentinel), c.p[(size_t)dout * r + j] = from_f<T>(sentinel);
    for (int i = 0; i < Tn * r; ++i) u.p[i] = from_f<T>(NAN);
    for (int i = 0; i < dout * r; ++i) c.p[i] = from_f<T>(NAN);
    const int grid = (Tn + 63) / 64 + (dout + 63) / 64;
    fb::run_grid({(unsigned)grid, 1, 1}, 128, [&] {
        kernel(Tn, din, dout, r, x.p, ldx, psi.p, u.p, w.p, ldw, phi.p, c.p, alpha);
        reap_lanes();
    });
    double worst = 0, scale = 0;
    bool pad_ok = true;
    for (int pass = 0; pass < 2; ++pass)
        for (int i = 0; i < (pass ? dout : Tn); ++i)
            for (int j = 0; j < r; ++j) {
                double want = 0;
                for (int k = 0; k < din; ++k) want += pass ? w.at(i, k) * phi.at(k, j) : x.at(i, k) * psi.at(j, k);
                if (pass) want *= alpha;
                const double got = pass ? c.at(i, j) : u.at(i, j);
                scale = std::max(scale, std::fabs(want));
                const double e = std::fabs(got - want);
                worst = std::max(worst, std::isnan(e) ? INFINITY : e);
            }
    for (int j = 0; j < r; ++j) pad_ok &= u.at(Tn, j) == sentinel && c.at(dout, j) == sentinel;
    const double rel = worst / std::max(scale, 1e-30);
    const bool ok = rel <= tol && pad_ok;
    ++g_checks;
    if (!ok) ++g_failures;
    std::printf("%s %-23s T%-4d d_in %-4d d_out %-4d r %-3d  err %.2e (tol %.0e)%s\n", ok ? "ok  " : "FAIL", name, Tn, din, dout, r,
                rel, tol, pad_ok ? "" : "  PADDING WRITTEN");
}

// wegeft_fwd / wegeft_bwd (the rank-r products and the K-extended GEMM in one grid: rank and
// reduction tiles first, then the tiles of D, through the counter and the flags) against double
// loops:
//   fwd: u = x psi^T, C = scale W phi, y = x W^T + u C^T + bias over the u and C it stored;
//   bwd: v = G C, S = G^T u, dpsi = dpsi0 + v^T x and dx = G W + v psi over the v it stored,
//        and with `with_dphi` dphi = dphi0 + scale W^T S over the S it stored.
// The rank outputs and D are NaN before the run and have a sentinel row after them; D's row
// padding must stay untouched. `cap`: tiles a block takes (0: the first block takes all); the
// grid then has enough blocks, plus one that takes none.
template <typename T>
using RankKernel = void (*)(const CUtensorMap, const CUtensorMap, const CUtensorMap, const CUtensorMap, const CUtensorMap,
                            const CUtensorMap, const CUtensorMap, const CUtensorMap, const CUtensorMap, const CUtensorMap,
                            const CUtensorMap, int, int, int, int, T*, float, T*, float, const T*, T*, int, float*, float*,
                            const CUtensorMap, const CUtensorMap, float*, T*, unsigned*);
template <typename T>
void check_rank(const char* name, RankKernel<T> kernel, bool dx, int Tn, int din, int dout, int r, bool bias, int cap,
                double tol, bool with_dphi = false) {
    with_dphi &= dx;
    // Forward: A1 = x (T x d_in), B1 = W (d_out x d_in), kind 0 = u (B psi), kind 1 = C (A W, B phi).
    // Backward: A1 = G (T x d_out), B1 = W (d_out x d_in, NN), kind 0 = v (B C), B2 = psi (NN).
    const int M = Tn, N = dx ? din : dout, K1 = dx ? dout : din;
    Mat<T> a1(M, K1, K1, 0), w(dout, din, din, 0), psi(r, din, din, 0), phi(din, r, r, 0), cin(dout, r, r, 0), bv(1, N, N, 0);
    Mat<T> uin(M, r, r, 0), xin(M, din, din, 0);  // the backward's u and x
    Mat<float> sv(dout, r, r, 0, false), dpsi(r, din, din, 0, false), dphi(din, r, r, 0, false);
    Mat<T> split(2 * dout, r, r, 0, false);  // S_hi, then S_lo
    std::vector<double> dpsi0((size_t)r * din), dphi0((size_t)din * r);
    for (int i = 0; i < r * din; ++i) dpsi0[i] = dpsi.p[i] = rnd();
    for (int i = 0; i < din * r; ++i) dphi0[i] = dphi.p[i] = rnd();
    for (int i = 0; i < dout * r; ++i) sv.p[i] = NAN;
    const int ldd = N % 8 == 0 ? N : N + 3;
    Mat<T> o0(M, r, r, 0, false), o1(dout, r, r, 0, false), d(M, N, ldd, 0, false);
    const float sentinel = 7.0f, scale = 0.75f;
    for (int i = 0; i <= M; ++i)
        for (int j = 0; j < ldd; ++j) d.p[(size_t)i * ldd + j] = from_f<T>(i == M || j >= N ? sentinel : NAN);
    for (int j = 0; j < r; ++j) o0.p[(size_t)M * r + j] = from_f<T>(sentinel), o1.p[(size_t)dout * r + j] = from_f<T>(sentinel);
    for (int i = 0; i < M * r; ++i) o0.p[i] = from_f<T>(NAN);
    for (int i = 0; i < dout * r; ++i) o1.p[i] = from_f<T>(NAN);
    const int RC = (r + 63) / 64, TM = (M + 127) / 128, R1 = dx ? 0 : (N + 127) / 128, TN = (N + 255) / 256;
    const int reduction = dx ? ((dout + 127) / 128 + (with_dphi ? 2 : 1) * ((din + 127) / 128)) * RC : 0;
    const int tiles = (R1 + TM) * RC + reduction + TM * TN;
    std::vector<unsigned> work(1 + TM + (dx ? (dout + 127) / 128 : R1), 0u);
    CUtensorMap m[13];
    m[0] = tma_map(a1.p, M, K1, K1, 64, 128);
    if (!dx) {
        m[1] = tma_map(w.p, dout, din, din, 64, 256);
        m[2] = tma_map(o0.p, M, r, r, 64, 128);
        m[3] = tma_map(o1.p, dout, r, r, 64, 256);
        m[4] = tma_map(psi.p, r, din, din, 64, 64);
        m[5] = tma_map(w.p, dout, din, din, 64, 128);
        m[6] = tma_map(phi.p, din, r, r, 64, 64);
        for (int i = 7; i < 13; ++i) m[i] = m[0];  // no reduction tiles: never read
    } else {
        m[1] = tma_map(w.p, dout, din, din, 64, 64);
        m[2] = tma_map(o0.p, M, r, r, 64, 128);
        m[3] = tma_map(psi.p, r, din, din, 64, 64);
        m[4] = tma_map(cin.p, dout, r, r, 64, 64);
        m[5] = m[6] = m[0];
        m[7] = tma_map(a1.p, M, K1, K1, 64, 64);  // G^T's boxes
        m[8] = tma_map(uin.p, M, r, r, 64, 64);
        m[9] = tma_map(xin.p, M, din, din, 64, 64);
        m[10] = tma_map(o0.p, M, r, r, 64, 64);  // v, as kind 3's B
        m[11] = tma_map(w.p, dout, din, din, 64, 64);  // W^T's boxes
        m[12] = tma_map(split.p, 2 * dout, r, r, 64, 64);
    }
    const int grid = cap > 0 ? (tiles + cap - 1) / cap + 1 : 2;
    t90::take_cap = cap;
    t90::taken_block = ~0u;
    t90::guard[0] = {o0.p, M, work.data() + 1};
    t90::guard[1] = dx ? t90::Guard{} : t90::Guard{o1.p, dout, work.data() + 1 + TM};
    t90::guard[2] = with_dphi ? t90::Guard{split.p, 2 * dout, work.data() + 1 + TM, dout} : t90::Guard{};
    const int taken_before = t90::tiles_taken, unguarded_before = t90::unguarded_reads;
    fb::run_grid({(unsigned)grid, 1, 1}, 288, [&] {
        kernel(m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10], M, N, K1, r, o0.p, 1.0f,
               dx ? nullptr : o1.p, scale, bias ? bv.p : nullptr, d.p, ldd, dx ? sv.p : nullptr, dx ? dpsi.p : nullptr,
               m[11], m[12], with_dphi ? dphi.p : nullptr, with_dphi ? split.p : nullptr, work.data());
        reap_lanes();
    });
    t90::take_cap = 0;
    t90::guard[0] = t90::guard[1] = t90::guard[2] = {};
    const int unguarded = t90::unguarded_reads - unguarded_before;
    // The rank outputs against double loops over the inputs; D against them as stored.
    double worst_r = 0, scale_r = 0, worst_d = 0, scale_d = 0;
    for (int pass = 0; pass < (dx ? 1 : 2); ++pass)
        for (int i = 0; i < (pass ? dout : M); ++i)
            for (int j = 0; j < r; ++j) {
                double want = 0;
                for (int k = 0; k < K1; ++k)
                    want += pass ? w.at(i, k) * phi.at(k, j) : dx ? a1.at(i, k) * cin.at(k, j) : a1.at(i, k) * psi.at(j, k);
                if (pass) want *= scale;
                const double e = std::fabs((pass ? o1.at(i, j) : o0.at(i, j)) - want);
                scale_r = std::max(scale_r, std::fabs(want));
                worst_r = std::max(worst_r, std::isnan(e) ? INFINITY : e);
            }
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            double want = bias ? bv.at(0, j) : 0.0;
            for (int k = 0; k < K1; ++k) want += a1.at(i, k) * (dx ? w.at(k, j) : w.at(j, k));
            for (int k = 0; k < r; ++k) want += o0.at(i, k) * (dx ? psi.at(k, j) : o1.at(j, k));
            const double e = std::fabs(d.at(i, j) - want);
            scale_d = std::max(scale_d, std::fabs(want));
            worst_d = std::max(worst_d, std::isnan(e) ? INFINITY : e);
        }
    // The backward's reductions: S = G^T u against a double loop, dpsi - dpsi0 against v^T x
    // over the v it stored (f32 outputs: the inputs' rounding only).
    if (dx) {
        for (int pass = 0; pass < 2; ++pass)
            for (int i = 0; i < (pass ? r : dout); ++i)
                for (int j = 0; j < (pass ? din : r); ++j) {
                    double want = 0;
                    for (int k = 0; k < M; ++k) want += pass ? o0.at(k, i) * xin.at(k, j) : a1.at(k, i) * uin.at(k, j);
                    const double got = pass ? dpsi.at(i, j) - dpsi0[(size_t)i * din + j] : sv.at(i, j);
                    const double e = std::fabs(got - want);
                    scale_r = std::max(scale_r, std::fabs(want));
                    worst_r = std::max(worst_r, std::isnan(e) ? INFINITY : e);
                }
        // dphi - dphi0 against scale W^T S over the S it stored (f32); without dphi, untouched.
        double worst_p = 0, scale_p = 0;
        for (int i = 0; i < din; ++i)
            for (int j = 0; j < r; ++j) {
                double want = 0;
                for (int k = 0; k < dout; ++k) want += w.at(k, i) * sv.at(k, j);
                want *= scale;
                const double got = dphi.at(i, j) - dphi0[(size_t)i * r + j];
                if (!with_dphi) {
                    if (got != 0.0) worst_p = INFINITY;
                    continue;
                }
                scale_p = std::max(scale_p, std::fabs(want));
                const double e = std::fabs(got - want);
                worst_p = std::max(worst_p, std::isnan(e) ? INFINITY : e);
            }
        // The dphi error against its own scale, folded into the rank outputs' relative one.
        worst_r = std::max(worst_r, worst_p / std::max(scale_p, 1e-30) * scale_r);
    }
    bool pad_ok = true;
    for (int i = 0; i <= M; ++i)
        for (int j = 0; j < ldd; ++j)
            if (i == M || j >= N) pad_ok &= d.at(i, j) == sentinel;
    for (int j = 0; j < r; ++j) pad_ok &= o0.at(M, j) == sentinel && (dx || o1.at(dout, j) == sentinel);
    // Every tile handed out (the counter went past the last one; each D element checked above
    // says its tile ran once), every rank tile's flag posted.
    bool work_ok = (int)work[0] >= tiles && t90::tiles_taken - taken_before >= tiles;
    for (int i = 0; i < TM + R1; ++i) work_ok &= work[1 + i] == (unsigned)RC;
    if (with_dphi)
        for (int i = 0; i < (dout + 127) / 128; ++i) work_ok &= work[1 + TM + i] == (unsigned)RC;
    const double e_r = worst_r / std::max(scale_r, 1e-30), e_d = worst_d / std::max(scale_d, 1e-30);
    const bool ok = e_r <= tol && e_d <= tol && pad_ok && work_ok && unguarded == 0;
    ++g_checks;
    if (!ok) ++g_failures;
    std::printf("%s %-23s T%-4d d_in %-4d d_out %-4d r %-3d bias %d cap %d  err %s %.2e %s %.2e (tol %.0e)%s%s%s\n",
                ok ? "ok  " : "FAIL", name, Tn, din, dout, r, bias, cap, dx ? (with_dphi ? "v,S,dpsi,dphi" : "v,S,dpsi") : "u,C", e_r,
                dx ? "dx" : "y", e_d, tol,
                pad_ok ? "" : "  PADDING WRITTEN", work_ok ? "" : "  COUNTER/FLAGS WRONG",
                unguarded ? "  RANK OUTPUT READ WITHOUT WAITING FOR ITS FLAG" : "");
}

int main() {
    // The fused forward's u and C: tails in T, d_out and d_in (not a multiple of the 32-deep k
    // tile), r from 8 to 64, more k tiles than the 3 stages.
    const int uc_cases[][4] = {{1, 8, 1, 8}, {70, 40, 130, 8}, {128, 96, 64, 64}, {65, 200, 7, 24}, {130, 256, 129, 56}};
    for (const auto& uc : uc_cases) {
        check_uc<__nv_bfloat16>("wegeft_uc_bf16", wegeft_uc_bf16, uc[0], uc[1], uc[2], uc[3], 1e-2);
        check_uc<__half>("wegeft_uc_f16", wegeft_uc_f16, uc[0], uc[1], uc[2], uc[3], 2e-3);
    }
    // More k tiles than the 4 pipeline stages (K1 160 + K2 64: 7), a K1 tail, K1 = 0, K2 = 0,
    // tiles cut by M and N, one row, one column block of 8.
    const Case cases[] = {{1, 8, 1, 0}, {37, 40, 33, 8}, {129, 136, 72, 40}, {37, 136, 160, 64}, {129, 8, 16, 1}, {70, 40, 0, 33}};
    int layout = 0;
    for (const Case& c : cases) {
        for (int v = 0; v < 2; ++v) {
            const bool bias = (layout + v) % 2 == 0;
            const float beta = v == 0 ? 0.0f : 0.5f;
            check<__nv_bfloat16, false>("gemm_kext_nt_bf16", gemm_kext_nt_bf16, 128, 128, c, layout, bias, beta, 1e-2);
            check<__nv_bfloat16, true>("gemm_kext_nn_bf16", gemm_kext_nn_bf16, 128, 128, c, layout, bias, beta, 1e-2);
            check<__half, false>("gemm_kext_nt_f16", gemm_kext_nt_f16, 128, 128, c, (layout + 1) % 3, bias, beta, 2e-3);
            check<__half, true>("gemm_kext_nn_f16", gemm_kext_nn_f16, 128, 128, c, (layout + 1) % 3, bias, beta, 2e-3);
            check<float, false>("gemm_kext_nt_f32", gemm_kext_nt_f32, 64, 64, c, layout == 0 ? 0 : 1, bias, beta, 1e-5);
            check<float, true>("gemm_kext_nn_f32", gemm_kext_nn_f32, 64, 64, c, layout == 0 ? 0 : 1, bias, beta, 1e-5);
            layout = (layout + 1) % 3;
        }
    }
    // The sm_90a kernel (128 x 256 x 64 tiles, wgmma): the cases above, and two column tiles
    // with 6 k tiles through its 4 stages.
    const Case wcases[] = {{1, 8, 1, 0}, {37, 40, 33, 8}, {129, 136, 72, 40}, {70, 40, 0, 33}, {130, 300, 320, 64}};
    for (const Case& c : wcases) {
        for (int v = 0; v < 2; ++v) {
            const bool bias = (layout + v) % 2 == 0;
            const float beta = v == 0 ? 0.0f : 0.5f;
            check<__nv_bfloat16, false>("gemm_kext_nt_bf16_sm90", gemm_kext_nt_bf16_sm90, 128, 256, c, layout, bias, beta, 1e-2);
            check<__nv_bfloat16, true>("gemm_kext_nn_bf16_sm90", gemm_kext_nn_bf16_sm90, 128, 256, c, layout, bias, beta, 1e-2);
            check<__half, false>("gemm_kext_nt_f16_sm90", gemm_kext_nt_f16_sm90, 128, 256, c, (layout + 1) % 3, bias, beta, 2e-3);
            check<__half, true>("gemm_kext_nn_f16_sm90", gemm_kext_nn_f16_sm90, 128, 256, c, (layout + 1) % 3, bias, beta, 2e-3);
            // The sm_80 kernels' wide tile (the same 128 x 256 block tile, mma.sync).
            check<__nv_bfloat16, false>("gemm_kext_nt_bf16_wide", gemm_kext_nt_bf16_wide, 128, 256, c, (layout + 2) % 3, bias, beta, 1e-2);
            check<__nv_bfloat16, true>("gemm_kext_nn_bf16_wide", gemm_kext_nn_bf16_wide, 128, 256, c, (layout + 2) % 3, bias, beta, 1e-2);
            check<__half, false>("gemm_kext_nt_f16_wide", gemm_kext_nt_f16_wide, 128, 256, c, layout, bias, beta, 2e-3);
            check<__half, true>("gemm_kext_nn_f16_wide", gemm_kext_nn_f16_wide, 128, 256, c, layout, bias, beta, 2e-3);
            layout = (layout + 1) % 3;
        }
    }
    // The TMA kernel (same tile; 288 threads: two consumer warpgroups and a producer warp):
    // the aligned layout only (the launcher takes it for nothing else), K1 > 0; a block per tile,
    // and 2 blocks looping over all tiles (the persistent launch), which runs the stage ring
    // through many phases across tiles. Case 5: 9 tiles of 5 k tiles each on 2 blocks.
    const Case tcases[] = {{1, 8, 1, 0}, {37, 40, 33, 8}, {129, 136, 72, 40}, {130, 300, 320, 64}, {300, 520, 200, 16}};
    for (const Case& c : tcases) {
        for (int v = 0; v < 2; ++v) {
            const bool bias = v == 0;
            const float beta = v == 0 ? 0.0f : 0.5f;
            const int cap = v == 0 ? 0 : 2;
            check<__nv_bfloat16, false>("gemm_kext_nt_bf16_tma", nullptr, 128, 256, c, 0, bias, beta, 1e-2, gemm_kext_nt_bf16_tma, cap);
            check<__nv_bfloat16, true>("gemm_kext_nn_bf16_tma", nullptr, 128, 256, c, 0, bias, beta, 1e-2, gemm_kext_nn_bf16_tma, cap);
            check<__half, false>("gemm_kext_nt_f16_tma", nullptr, 128, 256, c, 0, !bias, beta, 2e-3, gemm_kext_nt_f16_tma, cap);
            check<__half, true>("gemm_kext_nn_f16_tma", nullptr, 128, 256, c, 0, !bias, beta, 2e-3, gemm_kext_nn_f16_tma, cap);
        }
    }
    // Whole tiles (the tensor-core kernels' 16-byte epilogue with its quad transpose: aligned D,
    // ldd a multiple of 8, beta 0), with and without a bias; and tiles cut by M and N next to them.
    const Case fcases[] = {{256, 512, 72, 8}, {200, 300, 64, 0}};
    for (const Case& c : fcases) {
        for (int b = 0; b < 2; ++b) {
            check<__nv_bfloat16, false>("gemm_kext_nt_bf16", gemm_kext_nt_bf16, 128, 128, c, 0, b, 0.0f, 1e-2);
            check<__half, true>("gemm_kext_nn_f16", gemm_kext_nn_f16, 128, 128, c, 0, !b, 0.0f, 2e-3);
            check<__half, false>("gemm_kext_nt_f16_wide", gemm_kext_nt_f16_wide, 128, 256, c, 0, b, 0.0f, 2e-3);
            check<__nv_bfloat16, true>("gemm_kext_nn_bf16_wide", gemm_kext_nn_bf16_wide, 128, 256, c, 0, !b, 0.0f, 1e-2);
            check<__nv_bfloat16, false>("gemm_kext_nt_bf16_sm90", gemm_kext_nt_bf16_sm90, 128, 256, c, 0, b, 0.0f, 1e-2);
            check<__half, true>("gemm_kext_nn_f16_sm90", gemm_kext_nn_f16_sm90, 128, 256, c, 0, b, 0.0f, 2e-3);
            check<__nv_bfloat16, false>("gemm_kext_nt_bf16_tma", nullptr, 128, 256, c, 0, b, 0.0f, 1e-2, gemm_kext_nt_bf16_tma, 2);
            check<__half, true>("gemm_kext_nn_f16_tma", nullptr, 128, 256, c, 0, !b, 0.0f, 2e-3, gemm_kext_nn_f16_tma);
        }
    }
    // No K at all (K1 = K2 = 0: D = bias + beta D): the tensor-core kernels read no stage.
    for (int b = 0; b < 2; ++b) {
        const Case c = {37, 300, 0, 0};
        check<__nv_bfloat16, false>("gemm_kext_nt_bf16", gemm_kext_nt_bf16, 128, 128, c, b, true, 0.5f, 1e-2);
        check<__half, true>("gemm_kext_nn_f16_wide", gemm_kext_nn_f16_wide, 128, 256, c, b, true, 0.5f, 2e-3);
    }
    // The fused forward and input gradient in one grid: a single tile of each kind; tails in T,
    // d_in (not a multiple of 64) and d_out (a D tile reading one kind-1 block, an odd ldd); two
    // rank chunks (r 72: a partial one, and two second-pair k tiles); more k tiles than stages;
    // on one block (flags posted by its own consumers) and on many (cap 3: D tiles after the
    // rank tiles of earlier blocks).
    // The last: 27 tiles of dx against 6 reduction tiles, which the backward spreads among them.
    const int rank_cases[][4] = {{1, 8, 8, 8}, {130, 72, 300, 8}, {200, 136, 136, 72}, {257, 320, 520, 64}, {1100, 520, 8, 8}};
    for (const auto& f : rank_cases) {
        for (int cap : {0, 3}) {
            check_rank<__nv_bfloat16>("wegeft_fwd_bf16_tma", wegeft_fwd_bf16_tma, false, f[0], f[1], f[2], f[3], cap == 0, cap, 1e-2);
            check_rank<__half>("wegeft_fwd_f16_tma", wegeft_fwd_f16_tma, false, f[0], f[1], f[2], f[3], cap != 0, cap, 2e-3);
            check_rank<__nv_bfloat16>("wegeft_bwd_bf16_tma", wegeft_bwd_bf16_tma, true, f[0], f[1], f[2], f[3], false, cap, 1e-2,
                                      cap == 0);
            check_rank<__half>("wegeft_bwd_f16_tma", wegeft_bwd_f16_tma, true, f[0], f[1], f[2], f[3], false, cap, 2e-3, cap != 0);
        }
    }
    std::printf("wegeft_fwd / wegeft_bwd: %d tiles taken, %d flag waits that waited\n", t90::tiles_taken, t90::flag_stalls);
    std::printf("TMA boxes copied: %d\n", t90emu::copies);
    std::printf("wgmma reads of shared memory that changed in flight: %d\n", h90emu::races);
    if (h90emu::races) ++g_failures;
    std::printf("blocks that exited with cp.async in flight: %d\n", g_leftover);
    if (g_leftover) ++g_failures;
    std::printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
