// gemm_common.cuh — what every kernel of the K-extended GEMM module shares: the PTX
// helpers, storage-type traits, epilogue stores, swizzles, tile order and chunk loaders.
// Part of the K-extended GEMM module: included by gemm_kext.cu (the kernel contract), in
// the order listed there; not compiled on its own.
#pragma once

// ------------------------------------------------------------------------------------------
// PTX helpers. tests/emulation/gemm_on_host.cpp compiles the module with a host C++ compiler
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


// The 16-byte chunk at (row, col) of a row-major matrix P (leading dimension ld, rows x cols
// in range) into dst: a row at or past `rows` reads as zeros, and so do the chunk's elements
// at or past `cols` (load_chunk). A K-major tile's chunk is (row of M or N, k); an N-major
// one's (k, column of N).
template <typename T>
__device__ __forceinline__ void load_tile_chunk(uint32_t dst, const T* P, int ld, int rows, int cols, int row, int col,
                                                bool vec) {
  const int nv = row < rows ? cols - col : 0;
  const T* src = P + ((size_t)(row < rows ? row : 0) * ld + (col < cols ? col : 0));
  load_chunk<T>(dst, src, nv, vec, P);
}

}  // namespace gk

// The kernels' common parameter list (see the contract in gemm_kext.cu).
#define GEMM_KEXT_PARAMS(T)                                                                  \
  int M, int N, int K1, int K2, const T *__restrict__ A1, int lda1, const T *__restrict__ B1, \
      int ldb1, const T *__restrict__ A2, int lda2, const T *__restrict__ B2, int ldb2,       \
      const T *__restrict__ bias, float beta, T *__restrict__ D, int ldd
#define GEMM_KEXT_ARGS M, N, K1, K2, A1, lda1, B1, ldb1, A2, lda2, B2, ldb2, bias, beta, D, ldd
