// Causal grouped-query attention: forward, backward, decode. Launched by src/cuda/attention.rs.
//
// Layout (the CPU backend's, src/cpu/ops.rs): rows t = b * S + i; q, out, dout, dq are
// `B*S x H*hd`, k, v, dk, dv are `B*S x KVH*hd`, lse and D are `B*S x H` (f32). Query head h
// reads kv head h / (H / KVH). scale = 1 / sqrt(hd). `win` (1 <= win <= S; S: plain causal) is
// a sliding window: query i sees keys i - win < j <= i. Key tiles wholly outside every row's
// window are skipped (before the first row's window, after the diagonal); the others are masked
// element-wise.
//
//   s_ij = scale q_i . k_j (i - win < j <= i)    lse_i = log sum_j exp(s_ij)    p_ij = exp(s_ij - lse_i)
//   out_i = sum_j p_ij v_j
//   D_i = dout_i . out_i     dp_ij = dout_i . v_j     ds_ij = p_ij (dp_ij - D_i)
//   dq_i = scale sum_j ds_ij k_j     dk_j = scale sum_{i, h in group} ds_ij q_i
//   dv_j = sum_{i, h in group} p_ij dout_i
//
// No kernel writes an S x S matrix; nothing uses atomics, every sum runs in a fixed order, so
// two runs give the same bits.
//
// Kernels (T in {f32, bf16}; every one is `extern "C"` NAME_T):
//   attn_fwd_mma64_bf16, attn_fwd_mma128_bf16 (bf16, hd = 64 / 128, 16-byte aligned rows):
//       FlashAttention-2 forward on tensor cores. Block = 4 warps = 64 query rows (16 per
//       warp), grid (ceil(S / 64), B * H), heavy (late) query tiles scheduled first. Per key
//       tile of 64: K and V tiles land in shared memory by cp.async, K(t+1) loading during
//       softmax and P V(t), V(t+1) during Q K(t+1)^T (rows past S zero-filled,
//       16-byte chunks XOR-swizzled by row & 7 so ldmatrix reads are conflict free); S = Q K^T
//       by mma.m16n8k16 (Q fragments stay in registers, K via ldmatrix), online softmax in
//       registers (row max / sum over the 4 lanes of a quad), P re-packed from the accumulator
//       layout straight into A fragments, O += P V (V via ldmatrix.trans). Key tiles past the
//       diagonal are never visited; the diagonal tile is masked element-wise.
//   attn_bwd_dq_mma64_bf16, attn_bwd_dkdv_mma64_bf16 (bf16, hd = 64, 16-byte aligned rows):
//       FlashAttention-2 backward on tensor cores, 64 x 64 tiles, 4 warps of 16 rows. dq: per
//       query tile, over key tiles <= diag: S = Q K^T, P, dP = dO V^T, dS = P (dP - D),
//       dq += dS K. dk / dv: per key tile, over the group's query heads and query tiles >= diag:
//       S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T, dK += dS^T Q. P / dS go from the
//       accumulator layout straight into bf16 A fragments; B operands via ldmatrix(.trans).
//   attn_fwd64_T, attn_fwd128_T: the plain-FMA forward for any hd <= 64 / 128 (f32 always,
//       bf16 when the tensor-core kernel does not apply). 128 threads; each query row is owned
//       by hd_max / 16 consecutive lanes holding 16 dims each; key tiles of 32 in shared memory.
//   attn_bwd_pre_T: D = rowsum(dout * out), one warp per (row, head).
//   attn_bwd_dq64_T, attn_bwd_dq128_T: dq over query-row tiles, looping over key tiles <= diag;
//       attn_bwd_dq_sw64_T, attn_bwd_dq_sw128_T the same with a sliding window shorter than S.
//   attn_bwd_dkdv64_T, attn_bwd_dkdv128_T: dk, dv over key-row tiles of one kv head, looping
//       over the query heads of its group and the query tiles >= diag, all in one block (the
//       group sum is a plain ordered loop, no atomics).
//   attn_decode_split_T: one (sequence, head, chunk of 256 cache positions) per block:
//       partial (max, sum, unnormalised output) into a float workspace.
//   attn_decode_combine_T: merges the chunks of one (sequence, head) in chunk order.
#include <cstdint>
#include <cuda_bf16.h>

namespace wegeft_attn {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// ---- warp primitives (the host emulation, tests/emulation/attention_on_host.cpp, defines
// ---- its own versions with the PTX semantics) -------------------------------------------
#ifndef WEGEFT_HOST_EMULATION
__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ void block_sync() { __syncthreads(); }
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
// 16 bytes global -> shared; `bytes` < 16 zero-fills the rest (0: all zero, src not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
// d += a b, m16n8k16, bf16 inputs, f32 accumulate.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// ============================================================================================
// Tensor-core forward (bf16, hd = HD in {64, 128}).
// ============================================================================================

constexpr int MMA_BM = 64;   // query rows per block (16 per warp)
constexpr int MMA_BN = 64;   // keys per tile
constexpr int MMA_THREADS = 128;

// Element offset of 16-byte chunk `c` of row `r` in a swizzled tile of rows of HD bf16.
template <int HD> __device__ __forceinline__ int swz(int r, int c) { return r * HD + ((c ^ (r & 7)) << 3); }

// Loads rows [row0, row0 + ROWS) of a `rows x ld` bf16 matrix (columns [col0, col0 + HD)) into
// a swizzled tile; rows >= nrows are zero-filled.
template <int HD, int ROWS>
__device__ __forceinline__ void load_tile(__nv_bfloat16* tile, const __nv_bfloat16* __restrict__ g, long long ld,
                                          int row0, int nrows, int tid) {
    constexpr int CH = HD / 8;
#pragma unroll
    for (int it = 0; it < ROWS * CH / MMA_THREADS; ++it) {
        const int e = tid + it * MMA_THREADS, r = e / CH, c = e % CH;
        const bool ok = row0 + r < nrows;
        const __nv_bfloat16* src = ok ? g + (long long)(row0 + r) * ld + c * 8 : g;
        cp_async_16(tile + swz<HD>(r, c), src, ok ? 16 : 0);
    }
}

template <int HD>
__device__ __forceinline__ void attn_fwd_mma(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                             const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ out,
                                             float* __restrict__ lse, int S, int H, int KVH, int win, float scale_log2) {
    __shared__ __align__(128) __nv_bfloat16 Qs[MMA_BM * HD];
    __shared__ __align__(128) __nv_bfloat16 Ks[MMA_BN * HD];
    __shared__ __align__(128) __nv_bfloat16 Vs[MMA_BN * HD];
    constexpr int KS = HD / 16;  // k16 steps over the head dim
    constexpr int NT = MMA_BN / 8;  // 8-key accumulator tiles of S
    constexpr int ND = HD / 8;   // 8-dim accumulator tiles of O

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, tig = lane & 3;
    const int qtile = gridDim.x - 1 - blockIdx.x;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, kvh = h / (H / KVH);
    const int q0 = qtile * MMA_BM;
    const long long qld = (long long)H * HD, kld = (long long)KVH * HD;
    const __nv_bfloat16* qg = q + (long long)b * S * qld + (long long)h * HD;
    const __nv_bfloat16* kg = k + (long long)b * S * kld + (long long)kvh * HD;
    const __nv_bfloat16* vg = v + (long long)b * S * kld + (long long)kvh * HD;

    // Key tiles from the one holding the first row's first key (i - win + 1) to the diagonal.
    const int kt0 = max(0, q0 - win + 1) / MMA_BN;
    // Two cp.async groups per key tile, K (with Q for the first) then V, so that each load
    // overlaps compute: K(t+1) streams in during softmax and P V(t), V(t+1) during Q K(t+1)^T.
    load_tile<HD, MMA_BM>(Qs, qg, qld, q0, S, tid);
    load_tile<HD, MMA_BN>(Ks, kg, kld, kt0 * MMA_BN, S, tid);
    cp_async_commit();
    load_tile<HD, MMA_BN>(Vs, vg, kld, kt0 * MMA_BN, S, tid);
    cp_async_commit();
    cp_async_wait<1>();  // Q and K(0)
    block_sync();

    // Q fragments: A of m16k16 for each k step, rows warp*16 .. +16.
    uint32_t qf[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) ldsm_x4(qf[ks], Qs + swz<HD>(warp * 16 + (lane & 15), 2 * ks + (lane >> 4)));

    float o[ND][4];
#pragma unroll
    for (int i = 0; i < ND; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    // Row statistics (log2 domain) of rows g and g + 8 of the warp's 16.
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    const int row0 = q0 + warp * 16 + g, row1 = row0 + 8;
    const int kend = min(S, q0 + MMA_BM);  // causal: keys < kend
    const int ntiles = (kend + MMA_BN - 1) / MMA_BN;

    for (int kt = kt0; kt < ntiles; ++kt) {
        const int k0 = kt * MMA_BN;
        if (kt > kt0) {
            cp_async_wait<1>();  // K(kt) landed (V(kt) may still be in flight)
            block_sync();
        }
        float s[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
            for (int nt = 0; nt < NT; nt += 2) {
                uint32_t bf[4];
                ldsm_x4(bf, Ks + swz<HD>(nt * 8 + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1)));
                mma_bf16(s[nt], qf[ks], bf[0], bf[1]);
                mma_bf16(s[nt + 1], qf[ks], bf[2], bf[3]);
            }
        }
        // Scale into the log2 domain and mask (causal, window and past the end).
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + nt * 8 + 2 * tig + (e & 1);
                const int row = e < 2 ? row0 : row1;
                float x = s[nt][e] * scale_log2;
                if (key > row || key >= S || key <= row - win) x = -INFINITY;
                s[nt][e] = x;
            }
            mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
        }
        mx0 = fmaxf(mx0, shfl_xor(mx0, 1));
        mx0 = fmaxf(mx0, shfl_xor(mx0, 2));
        mx1 = fmaxf(mx1, shfl_xor(mx1, 1));
        mx1 = fmaxf(mx1, shfl_xor(mx1, 2));
        // A row whose keys are all masked so far keeps base 0 (its p are all 0).
        const float base0 = mx0 == -INFINITY ? 0.0f : mx0, base1 = mx1 == -INFINITY ? 0.0f : mx1;
        const float c0 = exp2f(m0 - base0), c1 = exp2f(m1 - base1);
        m0 = mx0;
        m1 = mx1;
        float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - base0);
            s[nt][1] = exp2f(s[nt][1] - base0);
            s[nt][2] = exp2f(s[nt][2] - base1);
            s[nt][3] = exp2f(s[nt][3] - base1);
            rs0 += s[nt][0] + s[nt][1];
            rs1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * c0 + rs0;
        l1 = l1 * c1 + rs1;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
            o[i][0] *= c0;
            o[i][1] *= c0;
            o[i][2] *= c1;
            o[i][3] *= c1;
        }
        cp_async_wait<0>();  // V(kt) landed
        block_sync();        // ... for every thread, and every warp is done reading K(kt)
        if (kt + 1 < ntiles) {
            load_tile<HD, MMA_BN>(Ks, kg, kld, k0 + MMA_BN, S, tid);
            cp_async_commit();
        }
        // O += P V: P's accumulator tiles (2 ks, 2 ks + 1) are the A fragment of key step ks.
#pragma unroll
        for (int ks = 0; ks < MMA_BN / 16; ++ks) {
            uint32_t pa[4];
            pa[0] = pack_bf16(s[2 * ks][0], s[2 * ks][1]);
            pa[1] = pack_bf16(s[2 * ks][2], s[2 * ks][3]);
            pa[2] = pack_bf16(s[2 * ks + 1][0], s[2 * ks + 1][1]);
            pa[3] = pack_bf16(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
            for (int nd = 0; nd < ND; nd += 2) {
                uint32_t bf[4];
                ldsm_x4_t(bf, Vs + swz<HD>(ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), nd + (lane >> 4)));
                mma_bf16(o[nd], pa, bf[0], bf[1]);
                mma_bf16(o[nd + 1], pa, bf[2], bf[3]);
            }
        }
        block_sync();  // every warp is done reading V(kt)
        if (kt + 1 < ntiles) {
            load_tile<HD, MMA_BN>(Vs, vg, kld, k0 + MMA_BN, S, tid);
            cp_async_commit();
        }
    }
    // The quad's partial row sums -> the row's.
    l0 += shfl_xor(l0, 1);
    l0 += shfl_xor(l0, 2);
    l1 += shfl_xor(l1, 1);
    l1 += shfl_xor(l1, 2);
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    const float LN2 = 0.69314718055994531f;
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
        const int col = nd * 8 + 2 * tig;
        if (row0 < S) {
            __nv_bfloat162 v2 = __floats2bfloat162_rn(o[nd][0] * inv0, o[nd][1] * inv0);
            *reinterpret_cast<__nv_bfloat162*>(out + ((long long)b * S + row0) * qld + (long long)h * HD + col) = v2;
        }
        if (row1 < S) {
            __nv_bfloat162 v2 = __floats2bfloat162_rn(o[nd][2] * inv1, o[nd][3] * inv1);
            *reinterpret_cast<__nv_bfloat162*>(out + ((long long)b * S + row1) * qld + (long long)h * HD + col) = v2;
        }
    }
    if (tig == 0) {
        if (row0 < S) lse[((long long)b * S + row0) * H + h] = (m0 + log2f(l0)) * LN2;
        if (row1 < S) lse[((long long)b * S + row1) * H + h] = (m1 + log2f(l1)) * LN2;
    }
}

// ============================================================================================
// Tensor-core backward (bf16, hd = HD = 64): dq over query tiles, dk / dv over key tiles.
// ============================================================================================

// acc[nt] += A B^T for the warp's 16 rows: A = rows ar0 .. ar0 + 16 of swizzled tile As
// (16 x HD), B = rows br0 .. br0 + 8 NT of swizzled tile Bs (N x HD); acc in the m16n8
// accumulator layout (lane: rows g, g + 8, columns 2 tig, 2 tig + 1 of each 8-column tile).
template <int HD, int NT>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const __nv_bfloat16* As, int ar0,
                                        const __nv_bfloat16* Bs, int br0, int lane) {
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
        uint32_t a[4];
        ldsm_x4(a, As + swz<HD>(ar0 + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
            uint32_t b[4];
            ldsm_x4(b, Bs + swz<HD>(br0 + nt * 8 + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1)));
            mma_bf16(acc[nt], a, b[0], b[1]);
            mma_bf16(acc[nt + 1], a, b[2], b[3]);
        }
    }
}

// acc[nd] += P B for the warp's 16 rows: P (16 x 16 KSTEPS) given as accumulator tiles p[2 KSTEPS]
// (rounded to bf16 here), B = rows br0 .. br0 + 16 KSTEPS of swizzled tile Bs (K x HD).
template <int HD, int KSTEPS>
__device__ __forceinline__ void mma_pb(float (&acc)[HD / 8][4], const float (&p)[2 * KSTEPS][4],
                                       const __nv_bfloat16* Bs, int br0, int lane) {
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
        uint32_t pa[4];
        pa[0] = pack_bf16(p[2 * ks][0], p[2 * ks][1]);
        pa[1] = pack_bf16(p[2 * ks][2], p[2 * ks][3]);
        pa[2] = pack_bf16(p[2 * ks + 1][0], p[2 * ks + 1][1]);
        pa[3] = pack_bf16(p[2 * ks + 1][2], p[2 * ks + 1][3]);
#pragma unroll
        for (int nd = 0; nd < HD / 8; nd += 2) {
            uint32_t b[4];
            ldsm_x4_t(b, Bs + swz<HD>(br0 + ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), nd + (lane >> 4)));
            mma_bf16(acc[nd], pa, b[0], b[1]);
            mma_bf16(acc[nd + 1], pa, b[2], b[3]);
        }
    }
}

template <int N> __device__ __forceinline__ void zero(float (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0.0f;
}

// Stores the warp's 16 x HD accumulator (times `mul`) as bf16 rows r0 + g, r0 + g + 8 (< S).
template <int HD>
__device__ __forceinline__ void store_rows(const float (&acc)[HD / 8][4], float mul, __nv_bfloat16* base, long long ld,
                                           int r0, int S, int lane) {
    const int g = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int nd = 0; nd < HD / 8; ++nd) {
        const int col = nd * 8 + 2 * tig;
        if (r0 + g < S)
            *reinterpret_cast<__nv_bfloat162*>(base + (long long)(r0 + g) * ld + col) =
                __floats2bfloat162_rn(acc[nd][0] * mul, acc[nd][1] * mul);
        if (r0 + g + 8 < S)
            *reinterpret_cast<__nv_bfloat162*>(base + (long long)(r0 + g + 8) * ld + col) =
                __floats2bfloat162_rn(acc[nd][2] * mul, acc[nd][3] * mul);
    }
}

constexpr float LOG2E = 1.4426950408889634f;

// dq for query rows q0 .. q0 + 64 of head h: per key tile (<= diagonal) S = Q K^T,
// P = exp(scale S - lse), dP = dO V^T, dS = P (dP - D), dq += dS K; dq *= scale at the end.
template <int HD>
__device__ __forceinline__ void attn_bwd_dq_mma(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                                const __nv_bfloat16* __restrict__ v, const float* __restrict__ lse,
                                                const float* __restrict__ D, const __nv_bfloat16* __restrict__ dout,
                                                __nv_bfloat16* __restrict__ dq, int S, int H, int KVH, int win, float scale) {
    __shared__ __align__(128) __nv_bfloat16 Qs[MMA_BM * HD];
    __shared__ __align__(128) __nv_bfloat16 Gs[MMA_BM * HD];  // dout
    __shared__ __align__(128) __nv_bfloat16 Ks[MMA_BN * HD];
    __shared__ __align__(128) __nv_bfloat16 Vs[MMA_BN * HD];
    constexpr int NT = MMA_BN / 8, ND = HD / 8;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, tig = lane & 3;
    const int qtile = gridDim.x - 1 - blockIdx.x;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, kvh = h / (H / KVH);
    const int q0 = qtile * MMA_BM;
    const long long qld = (long long)H * HD, kld = (long long)KVH * HD;
    const __nv_bfloat16* qg = q + (long long)b * S * qld + (long long)h * HD;
    const __nv_bfloat16* gg = dout + (long long)b * S * qld + (long long)h * HD;
    const __nv_bfloat16* kg = k + (long long)b * S * kld + (long long)kvh * HD;
    const __nv_bfloat16* vg = v + (long long)b * S * kld + (long long)kvh * HD;
    // Key tiles from the one holding the first row's first key to the diagonal.
    const int kbeg = max(0, q0 - win + 1) / MMA_BN * MMA_BN;
    // cp.async groups: (Q, dO, V(first)), K(first); then per key tile V(t+1) streams in during
    // S / dS / dq += dS K(t), and K(t+1) during dO V(t+1)^T.
    load_tile<HD, MMA_BM>(Qs, qg, qld, q0, S, tid);
    load_tile<HD, MMA_BM>(Gs, gg, qld, q0, S, tid);
    load_tile<HD, MMA_BN>(Vs, vg, kld, kbeg, S, tid);
    cp_async_commit();
    load_tile<HD, MMA_BN>(Ks, kg, kld, kbeg, S, tid);
    cp_async_commit();
    const int row0 = q0 + warp * 16 + g, row1 = row0 + 8;
    const float sl2 = scale * LOG2E;
    const long long t0 = (long long)b * S + min(row0, S - 1), t1 = (long long)b * S + min(row1, S - 1);
    const float lse0 = lse[t0 * H + h] * LOG2E, lse1 = lse[t1 * H + h] * LOG2E;
    const float d0 = D[t0 * H + h], d1 = D[t1 * H + h];
    float acc[ND][4];
    zero(acc);
    const int kend = min(S, q0 + MMA_BM);
    for (int k0 = kbeg; k0 < kend; k0 += MMA_BN) {
        const bool more = k0 + MMA_BN < kend;
        cp_async_wait<1>();  // V(t) (and Q, dO) landed
        block_sync();
        float sc[NT][4], dp[NT][4];
        zero(dp);
        mma_abt<HD, NT>(dp, Gs, warp * 16, Vs, 0, lane);
        cp_async_wait<0>();  // K(t) landed
        block_sync();        // ... for all threads, and every warp is done reading V(t)
        if (more) {
            load_tile<HD, MMA_BN>(Vs, vg, kld, k0 + MMA_BN, S, tid);
            cp_async_commit();
        }
        zero(sc);
        mma_abt<HD, NT>(sc, Qs, warp * 16, Ks, 0, lane);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + nt * 8 + 2 * tig + (e & 1);
                const int row = e < 2 ? row0 : row1;
                const float p = (key > row || key >= S || key <= row - win) ? 0.0f
                                                                           : exp2f(sc[nt][e] * sl2 - (e < 2 ? lse0 : lse1));
                sc[nt][e] = p * (dp[nt][e] - (e < 2 ? d0 : d1));  // dS
            }
        }
        mma_pb<HD, MMA_BN / 16>(acc, sc, Ks, 0, lane);
        block_sync();  // every warp is done reading K(t)
        if (more) {
            load_tile<HD, MMA_BN>(Ks, kg, kld, k0 + MMA_BN, S, tid);
            cp_async_commit();
        }
    }
    store_rows<HD>(acc, scale, dq + (long long)b * S * qld + (long long)h * HD, qld, q0 + warp * 16, S, lane);
}

// dk, dv for key rows k0 .. k0 + 64 of kv head kvh: for each query head of the group (in
// order) and each query tile from the diagonal on, S^T = K Q^T, P^T = exp(scale S^T - lse),
// dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q; dK *= scale at the end.
template <int HD>
__device__ __forceinline__ void attn_bwd_dkdv_mma(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                                  const __nv_bfloat16* __restrict__ v, const float* __restrict__ lse,
                                                  const float* __restrict__ D, const __nv_bfloat16* __restrict__ dout,
                                                  __nv_bfloat16* __restrict__ dk, __nv_bfloat16* __restrict__ dv, int S,
                                                  int H, int KVH, int win, float scale) {
    __shared__ __align__(128) __nv_bfloat16 Ks[MMA_BN * HD];
    __shared__ __align__(128) __nv_bfloat16 Vs[MMA_BN * HD];
    __shared__ __align__(128) __nv_bfloat16 Qs[MMA_BM * HD];
    __shared__ __align__(128) __nv_bfloat16 Gs[MMA_BM * HD];  // dout
    __shared__ float Ls[MMA_BM], Ds[MMA_BM];
    constexpr int NT = MMA_BM / 8, ND = HD / 8;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, tig = lane & 3;
    const int ktile = gridDim.x - 1 - blockIdx.x;  // early keys see the most queries: first
    const int bg = blockIdx.y, b = bg / KVH, kvh = bg % KVH, group = H / KVH;
    const int k0 = ktile * MMA_BN;
    const long long qld = (long long)H * HD, kld = (long long)KVH * HD;
    // cp.async groups: (K, V, Q(first)), dO(first); then per query tile Q(next) streams in
    // during dV += P^T dO, and dO(next) during the next K Q^T.
    auto load_q = [&](int hh, int q0) {
        const int h = kvh * group + hh;
        load_tile<HD, MMA_BM>(Qs, q + (long long)b * S * qld + (long long)h * HD, qld, q0, S, tid);
        cp_async_commit();
        if (tid < MMA_BM) {
            const bool ok = q0 + tid < S;
            const long long t = (long long)b * S + (ok ? q0 + tid : 0);
            Ls[tid] = ok ? lse[t * H + h] * LOG2E : 0.0f;
            Ds[tid] = ok ? D[t * H + h] : 0.0f;
        }
    };
    auto load_do = [&](int hh, int q0) {
        const int h = kvh * group + hh;
        load_tile<HD, MMA_BM>(Gs, dout + (long long)b * S * qld + (long long)h * HD, qld, q0, S, tid);
        cp_async_commit();
    };
    load_tile<HD, MMA_BN>(Ks, k + (long long)b * S * kld + (long long)kvh * HD, kld, k0, S, tid);
    load_tile<HD, MMA_BN>(Vs, v + (long long)b * S * kld + (long long)kvh * HD, kld, k0, S, tid);
    load_q(0, k0);
    load_do(0, k0);
    const int key0 = k0 + warp * 16 + g, key1 = key0 + 8;
    const float sl2 = scale * LOG2E;
    float dka[ND][4], dva[ND][4];
    zero(dka);
    zero(dva);
    // Query tiles in order: every head of the group, each from the diagonal tile to the one
    // holding the last key's last query (key + win - 1).
    const int qend = min(S, k0 + MMA_BN - 1 + win);
    int hh = 0, q0 = k0;
    while (true) {
        int nh = hh, nq = q0 + MMA_BM;
        if (nq >= qend) {
            ++nh;
            nq = k0;
        }
        const bool more = nh < group;
        cp_async_wait<1>();  // K, V, Q(t) landed
        block_sync();        // ... and Ls / Ds of tile t are visible
        float st[NT][4], dpt[NT][4];
        zero(st);
        mma_abt<HD, NT>(st, Ks, warp * 16, Qs, 0, lane);   // S^T: keys x queries
        cp_async_wait<0>();  // dO(t) landed
        block_sync();
        zero(dpt);
        mma_abt<HD, NT>(dpt, Vs, warp * 16, Gs, 0, lane);  // dP^T
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int qi = nt * 8 + 2 * tig + (e & 1);
                const int query = q0 + qi;
                const int key = e < 2 ? key0 : key1;
                const float p = (query < key || query >= S || query >= key + win) ? 0.0f : exp2f(st[nt][e] * sl2 - Ls[qi]);
                st[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - Ds[qi]);  // dS^T
            }
        }
        mma_pb<HD, MMA_BM / 16>(dka, dpt, Qs, 0, lane);
        block_sync();  // every warp is done reading Q(t), Ls, Ds
        if (more) load_q(nh, nq);
        mma_pb<HD, MMA_BM / 16>(dva, st, Gs, 0, lane);
        block_sync();  // every warp is done reading dO(t)
        if (!more) break;
        load_do(nh, nq);
        hh = nh;
        q0 = nq;
    }
    store_rows<HD>(dka, scale, dk + (long long)b * S * kld + (long long)kvh * HD, kld, k0 + warp * 16, S, lane);
    store_rows<HD>(dva, 1.0f, dv + (long long)b * S * kld + (long long)kvh * HD, kld, k0 + warp * 16, S, lane);
}

// ============================================================================================
// Plain-FMA kernels (any hd <= HDMAX, f32 or bf16 storage, f32 math).
// ============================================================================================

constexpr int THREADS = 128;
constexpr int DPT = 16;  // dims per thread

// Reduction over the TPR consecutive lanes that own one row (fixed butterfly order).
template <int TPR> __device__ __forceinline__ float row_sum(float x) {
#pragma unroll
    for (int m = 1; m < TPR; m <<= 1) x += shfl_xor(x, m);
    return x;
}

// Loads `nrows` rows starting at row0 (rows >= limit -> 0), columns [0, hd) of a strided
// matrix into a float tile [rows][HDMAX].
template <typename T, int HDMAX, int ROWS>
__device__ __forceinline__ void load_rows_f32(float* tile, const T* __restrict__ g, long long ld, int row0, int limit,
                                              int hd, int tid) {
    for (int e = tid; e < ROWS * HDMAX; e += THREADS) {
        const int r = e / HDMAX, c = e % HDMAX;
        float x = 0.0f;
        if (row0 + r < limit && c < hd) x = to_f(g[(long long)(row0 + r) * ld + c]);
        tile[e] = x;
    }
}

template <typename T, int HDMAX>
__device__ __forceinline__ void attn_fwd_plain(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                               T* __restrict__ out, float* __restrict__ lse, int S, int H, int KVH,
                                               int hd, int win, float scale) {
    constexpr int TPR = HDMAX / DPT, ROWS = THREADS / TPR, KT = 32;
    __shared__ float Ks[KT * HDMAX];
    __shared__ float Vs[KT * HDMAX];
    const int tid = threadIdx.x, r = tid / TPR, part = tid % TPR;
    const int qtile = gridDim.x - 1 - blockIdx.x;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, kvh = h / (H / KVH);
    const long long qld = (long long)H * hd, kld = (long long)KVH * hd;
    const int i = qtile * ROWS + r;
    const int ic = min(i, S - 1);  // rows past the end compute row S-1's answer, never written
    const T* qrow = q + ((long long)b * S + ic) * qld + (long long)h * hd;
    float qr[DPT], acc[DPT];
#pragma unroll
    for (int j = 0; j < DPT; ++j) {
        const int d = part * DPT + j;
        qr[j] = d < hd ? to_f(qrow[d]) * scale : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int kend = min(S, qtile * ROWS + ROWS);
    for (int k0 = max(0, qtile * ROWS - win + 1) / KT * KT; k0 < kend; k0 += KT) {
        block_sync();
        load_rows_f32<T, HDMAX, KT>(Ks, k + (long long)b * S * kld + (long long)kvh * hd, kld, k0, S, hd, tid);
        load_rows_f32<T, HDMAX, KT>(Vs, v + (long long)b * S * kld + (long long)kvh * hd, kld, k0, S, hd, tid);
        block_sync();
        float s[KT];
        float mx = m;
#pragma unroll
        for (int j = 0; j < KT; ++j) {
            float x = 0.0f;
#pragma unroll
            for (int d = 0; d < DPT; ++d) x = fmaf(qr[d], Ks[j * HDMAX + part * DPT + d], x);
            x = row_sum<TPR>(x);
            s[j] = (k0 + j <= ic && k0 + j > ic - win) ? x : -INFINITY;
            mx = fmaxf(mx, s[j]);
        }
        // m = -inf until the row's first key (acc = l = 0 until then); a row with no key yet
        // keeps base 0, so that no -inf - -inf is taken.
        const float base = mx == -INFINITY ? 0.0f : mx;
        const float c = expf(m - base);
        m = mx;
        l *= c;
#pragma unroll
        for (int d = 0; d < DPT; ++d) acc[d] *= c;
#pragma unroll
        for (int j = 0; j < KT; ++j) {
            const float p = expf(s[j] - base);
            l += p;
#pragma unroll
            for (int d = 0; d < DPT; ++d) acc[d] = fmaf(p, Vs[j * HDMAX + part * DPT + d], acc[d]);
        }
    }
    if (i < S) {
        const float inv = 1.0f / l;
        T* orow = out + ((long long)b * S + i) * qld + (long long)h * hd;
#pragma unroll
        for (int j = 0; j < DPT; ++j) {
            const int d = part * DPT + j;
            if (d < hd) orow[d] = from_f<T>(acc[j] * inv);
        }
        if (part == 0) lse[((long long)b * S + i) * H + h] = m + logf(l);
    }
}

// D[t, h] = dout[t, h, :] . out[t, h, :]; one warp per (t, h), fixed reduction order.
template <typename T>
__device__ __forceinline__ void attn_bwd_pre(const T* __restrict__ out, const T* __restrict__ dout, float* __restrict__ D,
                                             long long rows_heads, int hd) {
    const long long w = (long long)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const bool ok = w < rows_heads;
    const long long wc = ok ? w : 0;
    float x = 0.0f;
    for (int d = lane; d < hd; d += 32) x = fmaf(to_f(dout[wc * hd + d]), to_f(out[wc * hd + d]), x);
    x = row_sum<32>(x);
    if (ok && lane == 0) D[w] = x;
}

// WIN: whether `win` can cut keys off (a sliding window shorter than S). Without one, the mask
// is the causal bound alone: the second bound's compare costs this kernel ~20 registers (from
// 108 to more than ptxas's 128 with spills), so the causal kernel keeps the cheaper loop.
template <typename T, int HDMAX, bool WIN>
__device__ __forceinline__ void attn_bwd_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                            const float* __restrict__ lse, const float* __restrict__ D,
                                            const T* __restrict__ dout, T* __restrict__ dq, int S, int H, int KVH,
                                            int hd, int win, float scale) {
    constexpr int TPR = HDMAX / DPT, ROWS = THREADS / TPR, KT = 32;
    __shared__ float Ks[KT * HDMAX];
    __shared__ float Vs[KT * HDMAX];
    const int tid = threadIdx.x, r = tid / TPR, part = tid % TPR;
    const int qtile = gridDim.x - 1 - blockIdx.x;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, kvh = h / (H / KVH);
    const long long qld = (long long)H * hd, kld = (long long)KVH * hd;
    const int i = qtile * ROWS + r;
    const int ic = min(i, S - 1);
    const long long trow = (long long)b * S + ic;
    float qr[DPT], dor[DPT], acc[DPT];
#pragma unroll
    for (int j = 0; j < DPT; ++j) {
        const int d = part * DPT + j;
        qr[j] = d < hd ? to_f(q[trow * qld + (long long)h * hd + d]) * scale : 0.0f;
        dor[j] = d < hd ? to_f(dout[trow * qld + (long long)h * hd + d]) : 0.0f;
        acc[j] = 0.0f;
    }
    const float li = lse[trow * H + h], di = D[trow * H + h];
    const int kend = min(S, qtile * ROWS + ROWS);
    for (int k0 = WIN ? max(0, qtile * ROWS - win + 1) / KT * KT : 0; k0 < kend; k0 += KT) {
        block_sync();
        load_rows_f32<T, HDMAX, KT>(Ks, k + (long long)b * S * kld + (long long)kvh * hd, kld, k0, S, hd, tid);
        load_rows_f32<T, HDMAX, KT>(Vs, v + (long long)b * S * kld + (long long)kvh * hd, kld, k0, S, hd, tid);
        block_sync();
#pragma unroll 4
        for (int j = 0; j < KT; ++j) {
            float x = 0.0f, y = 0.0f;
#pragma unroll
            for (int d = 0; d < DPT; ++d) {
                x = fmaf(qr[d], Ks[j * HDMAX + part * DPT + d], x);
                y = fmaf(dor[d], Vs[j * HDMAX + part * DPT + d], y);
            }
            x = row_sum<TPR>(x);
            y = row_sum<TPR>(y);
            const float p = (k0 + j <= ic && (!WIN || k0 + j > ic - win)) ? expf(x - li) : 0.0f;
            const float ds = p * (y - di);
#pragma unroll
            for (int d = 0; d < DPT; ++d) acc[d] = fmaf(ds, Ks[j * HDMAX + part * DPT + d], acc[d]);
        }
    }
    if (i < S) {
#pragma unroll
        for (int j = 0; j < DPT; ++j) {
            const int d = part * DPT + j;
            if (d < hd) dq[trow * qld + (long long)h * hd + d] = from_f<T>(acc[j] * scale);
        }
    }
}

template <typename T, int HDMAX>
__device__ __forceinline__ void attn_bwd_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                              const float* __restrict__ lse, const float* __restrict__ D,
                                              const T* __restrict__ dout, T* __restrict__ dk, T* __restrict__ dv, int S,
                                              int H, int KVH, int hd, int win, float scale) {
    constexpr int TPR = HDMAX / DPT, ROWS = THREADS / TPR, QT = 32;
    __shared__ float Qs[QT * HDMAX];
    __shared__ float Os[QT * HDMAX];  // dout rows
    __shared__ float Ls[QT], Ds[QT];
    const int tid = threadIdx.x, r = tid / TPR, part = tid % TPR;
    const int ktile = blockIdx.x;
    const int bg = blockIdx.y, b = bg / KVH, kvh = bg % KVH, group = H / KVH;
    const long long qld = (long long)H * hd, kld = (long long)KVH * hd;
    const int j = ktile * ROWS + r;
    const int jc = min(j, S - 1);
    const long long trow = (long long)b * S + jc;
    float kr[DPT], vr[DPT], dkacc[DPT], dvacc[DPT];
#pragma unroll
    for (int x = 0; x < DPT; ++x) {
        const int d = part * DPT + x;
        kr[x] = d < hd ? to_f(k[trow * kld + (long long)kvh * hd + d]) * scale : 0.0f;
        vr[x] = d < hd ? to_f(v[trow * kld + (long long)kvh * hd + d]) : 0.0f;
        dkacc[x] = dvacc[x] = 0.0f;
    }
    const int qbeg = (ktile * ROWS) / QT * QT;  // first query tile with a row >= this block's keys
    const int qend = min(S, ktile * ROWS + ROWS - 1 + win);  // past the last key's last query
    for (int hh = 0; hh < group; ++hh) {
        const int h = kvh * group + hh;
        for (int q0 = qbeg; q0 < qend; q0 += QT) {
            block_sync();
            load_rows_f32<T, HDMAX, QT>(Qs, q + (long long)b * S * qld + (long long)h * hd, qld, q0, S, hd, tid);
            load_rows_f32<T, HDMAX, QT>(Os, dout + (long long)b * S * qld + (long long)h * hd, qld, q0, S, hd, tid);
            if (tid < QT) {
                const bool ok = q0 + tid < S;
                const long long t = (long long)b * S + (ok ? q0 + tid : 0);
                Ls[tid] = ok ? lse[t * H + h] : 0.0f;
                Ds[tid] = ok ? D[t * H + h] : 0.0f;
            }
            block_sync();
#pragma unroll 2
            for (int ii = 0; ii < QT; ++ii) {
                float x = 0.0f, y = 0.0f;
#pragma unroll
                for (int d = 0; d < DPT; ++d) {
                    x = fmaf(kr[d], Qs[ii * HDMAX + part * DPT + d], x);
                    y = fmaf(vr[d], Os[ii * HDMAX + part * DPT + d], y);
                }
                x = row_sum<TPR>(x);
                y = row_sum<TPR>(y);
                const int i = q0 + ii;
                const float p = (i >= jc && i < S && i < jc + win) ? expf(x - Ls[ii]) : 0.0f;
                const float ds = p * (y - Ds[ii]);
#pragma unroll
                for (int d = 0; d < DPT; ++d) {
                    dvacc[d] = fmaf(p, Os[ii * HDMAX + part * DPT + d], dvacc[d]);
                    dkacc[d] = fmaf(ds, Qs[ii * HDMAX + part * DPT + d], dkacc[d]);
                }
            }
        }
    }
    if (j < S) {
#pragma unroll
        for (int x = 0; x < DPT; ++x) {
            const int d = part * DPT + x;
            if (d < hd) {
                dk[trow * kld + (long long)kvh * hd + d] = from_f<T>(dkacc[x] * scale);
                dv[trow * kld + (long long)kvh * hd + d] = from_f<T>(dvacc[x]);
            }
        }
    }
}

// ---- decode ---------------------------------------------------------------------------------

constexpr int DEC_CHUNK = 256;

// Block (chunk c, sequence*head bh): scores of cache positions [j0, min(len, j0 + 256)),
// j0 = start + c*256 (start = len - window, or 0),
// then work[(bh * nchunks + c) * (hd + 2) + ...] = (max, sum of exp(s - max), sum exp(s - max) v).
// Reads are coalesced: a warp reads one cache row per score (lanes over d, then a fixed-order
// shuffle reduction), and for the weighted sum of V the threads run over d with G = THREADS / hd
// groups taking every G-th position (summed in group order at the end: deterministic).
template <typename T>
__device__ __forceinline__ void attn_decode_split(const T* __restrict__ q, const T* __restrict__ kc,
                                                  const T* __restrict__ vc, float* __restrict__ work, int H, int KVH,
                                                  int hd, int capacity, int start, int len, float scale) {
    __shared__ float qs[128];
    __shared__ float ps[DEC_CHUNK];
    __shared__ float red[THREADS / 32];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int c = blockIdx.x, nchunks = gridDim.x;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, kvh = h / (H / KVH);
    const long long kld = (long long)KVH * hd;
    const T* kb = kc + (long long)b * capacity * kld + (long long)kvh * hd;
    const T* vb = vc + (long long)b * capacity * kld + (long long)kvh * hd;
    if (tid < hd) qs[tid] = to_f(q[((long long)b * H + h) * hd + tid]) * scale;
    block_sync();
    const int j0 = start + c * DEC_CHUNK, j1 = min(len, j0 + DEC_CHUNK);
    for (int jj = warp; jj < DEC_CHUNK; jj += THREADS / 32) {
        const int jpos = j0 + jj;
        float s = -INFINITY;
        if (jpos < j1) {  // warp-uniform
            const T* krow = kb + (long long)jpos * kld;
            float part = 0.0f;
#pragma unroll 1  // (at most 4 trips; unrolled, ptxas spilled 4 bytes for sm_80 bf16)
            for (int d = lane; d < hd; d += 32) part = fmaf(qs[d], to_f(krow[d]), part);
            s = row_sum<32>(part);
        }
        if (lane == 0) ps[jj] = s;
    }
    block_sync();
    float mx = -INFINITY;
    for (int jj = tid; jj < DEC_CHUNK; jj += THREADS) mx = fmaxf(mx, ps[jj]);
#pragma unroll
    for (int m = 1; m < 32; m <<= 1) mx = fmaxf(mx, shfl_xor(mx, m));
    if (lane == 0) red[warp] = mx;
    block_sync();
    mx = red[0];
#pragma unroll
    for (int w = 1; w < THREADS / 32; ++w) mx = fmaxf(mx, red[w]);
    block_sync();
    float l = 0.0f;
    for (int jj = tid; jj < DEC_CHUNK; jj += THREADS) {
        const float p = ps[jj] == -INFINITY ? 0.0f : expf(ps[jj] - mx);
        ps[jj] = p;
        l += p;
    }
    l = row_sum<32>(l);
    if (lane == 0) red[warp] = l;
    block_sync();
    float* wrow = work + ((long long)bh * nchunks + c) * (hd + 2);
    if (tid == 0) {
        float t = 0.0f;
        for (int w = 0; w < THREADS / 32; ++w) t += red[w];
        wrow[0] = mx;
        wrow[1] = t;
    }
    // ps now holds the probabilities (every thread wrote its own entries; the barrier after
    // red[] made them visible). V: group g of hd threads takes positions j0 + g, j0 + g + G, ...
    const int groups = THREADS / hd, g = tid / hd, d = tid % hd;
    __shared__ float vpart[THREADS];
    if (g < groups) {
        float acc = 0.0f;
        for (int jpos = j0 + g; jpos < j1; jpos += groups) acc = fmaf(ps[jpos - j0], to_f(vb[(long long)jpos * kld + d]), acc);
        vpart[g * hd + d] = acc;
    }
    block_sync();
    if (tid < hd) {
        float acc = 0.0f;
        for (int gg = 0; gg < groups; ++gg) acc += vpart[gg * hd + tid];
        wrow[2 + tid] = acc;
    }
}

template <typename T>
__device__ __forceinline__ void attn_decode_combine(const float* __restrict__ work, T* __restrict__ out, int hd,
                                                    int nchunks) {
    const int bh = blockIdx.x, tid = threadIdx.x;
    if (tid >= hd) return;
    const float* w = work + (long long)bh * nchunks * (hd + 2);
    float M = -INFINITY;
    for (int c = 0; c < nchunks; ++c) M = fmaxf(M, w[c * (hd + 2)]);
    float L = 0.0f, acc = 0.0f;
    for (int c = 0; c < nchunks; ++c) {
        const float f = expf(w[c * (hd + 2)] - M);
        L = fmaf(w[c * (hd + 2) + 1], f, L);
        acc = fmaf(w[c * (hd + 2) + 2 + tid], f, acc);
    }
    out[(long long)bh * hd + tid] = from_f<T>(acc / L);
}

}  // namespace wegeft_attn

// ---- entry points ---------------------------------------------------------------------------

#define ATTN_FWD_MMA(HD)                                                                                            \
    extern "C" __global__ void __launch_bounds__(wegeft_attn::MMA_THREADS) attn_fwd_mma##HD##_bf16(                 \
        const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,                                    \
        const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ out, float* __restrict__ lse, int S, int H, \
        int KVH, int win, float scale_log2) {                                                                        \
        wegeft_attn::attn_fwd_mma<HD>(q, k, v, out, lse, S, H, KVH, win, scale_log2);                                \
    }
ATTN_FWD_MMA(64)
ATTN_FWD_MMA(128)

#define ATTN_BWD_MMA(HD)                                                                                            \
    extern "C" __global__ void __launch_bounds__(wegeft_attn::MMA_THREADS, 2) attn_bwd_dq_mma##HD##_bf16(              \
        const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,                                    \
        const __nv_bfloat16* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ D,             \
        const __nv_bfloat16* __restrict__ dout, __nv_bfloat16* __restrict__ dq, int S, int H, int KVH, int win,       \
        float scale) {                                                                                               \
        wegeft_attn::attn_bwd_dq_mma<HD>(q, k, v, lse, D, dout, dq, S, H, KVH, win, scale);                         \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(wegeft_attn::MMA_THREADS) attn_bwd_dkdv_mma##HD##_bf16(            \
        const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,                                    \
        const __nv_bfloat16* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ D,             \
        const __nv_bfloat16* __restrict__ dout, __nv_bfloat16* __restrict__ dk, __nv_bfloat16* __restrict__ dv,      \
        int S, int H, int KVH, int win, float scale) {                                                               \
        wegeft_attn::attn_bwd_dkdv_mma<HD>(q, k, v, lse, D, dout, dk, dv, S, H, KVH, win, scale);                   \
    }
ATTN_BWD_MMA(64)

#define ATTN_PLAIN(T, SUF, HDMAX)                                                                                     \
    extern "C" __global__ void __launch_bounds__(wegeft_attn::THREADS) attn_fwd##HDMAX##_##SUF(                       \
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,               \
        float* __restrict__ lse, int S, int H, int KVH, int hd, int win, float scale) {                               \
        wegeft_attn::attn_fwd_plain<T, HDMAX>(q, k, v, out, lse, S, H, KVH, hd, win, scale);                          \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(wegeft_attn::THREADS) attn_bwd_dq##HDMAX##_##SUF(                    \
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ lse,     \
        const float* __restrict__ D, const T* __restrict__ dout, T* __restrict__ dq, int S, int H, int KVH, int hd,   \
        int win, float scale) {                                                                                       \
        wegeft_attn::attn_bwd_dq<T, HDMAX, false>(q, k, v, lse, D, dout, dq, S, H, KVH, hd, win, scale);              \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(wegeft_attn::THREADS, 1) attn_bwd_dq_sw##HDMAX##_##SUF(              \
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ lse,     \
        const float* __restrict__ D, const T* __restrict__ dout, T* __restrict__ dq, int S, int H, int KVH, int hd,   \
        int win, float scale) {                                                                                       \
        wegeft_attn::attn_bwd_dq<T, HDMAX, true>(q, k, v, lse, D, dout, dq, S, H, KVH, hd, win, scale);               \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(wegeft_attn::THREADS, 1) attn_bwd_dkdv##HDMAX##_##SUF(                  \
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ lse,     \
        const float* __restrict__ D, const T* __restrict__ dout, T* __restrict__ dk, T* __restrict__ dv, int S,       \
        int H, int KVH, int hd, int win, float scale) {                                                               \
        wegeft_attn::attn_bwd_dkdv<T, HDMAX>(q, k, v, lse, D, dout, dk, dv, S, H, KVH, hd, win, scale);               \
    }

#define ATTN_TYPED(T, SUF)                                                                                            \
    ATTN_PLAIN(T, SUF, 64)                                                                                            \
    ATTN_PLAIN(T, SUF, 128)                                                                                           \
    extern "C" __global__ void __launch_bounds__(wegeft_attn::THREADS) attn_bwd_pre_##SUF(                            \
        const T* __restrict__ out, const T* __restrict__ dout, float* __restrict__ D, long long rows_heads, int hd) { \
        wegeft_attn::attn_bwd_pre<T>(out, dout, D, rows_heads, hd);                                                   \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(wegeft_attn::THREADS) attn_decode_split_##SUF(                       \
        const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc, float* __restrict__ work, int H, \
        int KVH, int hd, int capacity, int start, int len, float scale) {                                             \
        wegeft_attn::attn_decode_split<T>(q, kc, vc, work, H, KVH, hd, capacity, start, len, scale);                  \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(wegeft_attn::THREADS) attn_decode_combine_##SUF(                     \
        const float* __restrict__ work, T* __restrict__ out, int hd, int nchunks) {                                   \
        wegeft_attn::attn_decode_combine<T>(work, out, hd, nchunks);                                                  \
    }

ATTN_TYPED(float, f32)
ATTN_TYPED(__nv_bfloat16, bf16)
