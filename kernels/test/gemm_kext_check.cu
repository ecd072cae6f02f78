// gemm_kext_check.cu — standalone correctness and timing check of kernels/gemm_kext.cu.
// Not built by cargo. Build: kernels/test/compile_check.sh (-> target/gemm_kext_check), or
//
//   nvcc -O2 -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
//        -o gemm_kext_check kernels/test/gemm_kext_check.cu -ldl
//   (with the PyPI wheels add -I .../include -I .../include/cccl -L .../lib. cudart is linked
//    statically. libcublas is dlopen'ed at run time (no cuBLAS header or library is needed to
//    build, and the binary also runs where it is missing): see find_cublas below for where it
//    is looked for; GEMM_CHECK_CUBLAS=/path/to/libcublas.so.13 names it.)
//
// Run:  ./gemm_kext_check            every variant on the odd-size grid; exit 1 on any failure
//       ./gemm_kext_check --small    a subset of that grid (for compute-sanitizer)
//       ./gemm_kext_check --bench    4096^3 timings (K2 = 0 and 64) and cuBLAS if available,
//                                    then the sm_80 kernels' two tiles around the launcher's
//                                    rule (TILES lines);
//                                    exit 3 when cuBLAS could not be loaded
//       ./gemm_kext_check --kscan    bf16 at M = N = 4096, K = 1024 / 2048 / 4096, NT and NN:
//                                    cuBLAS and the TMA kernels, each fitted as fixed + per-k cost
//       ./gemm_kext_check --uc       the fused forward's routes (cuBLAS u, C + GEMM; wegeft_uc + the
//                                    GEMM as its programmatic dependent; wegeft_fwd in one launch)
//                                    and the backward's (cuBLAS v, S, dpsi + NN GEMM; wegeft_bwd) at
//                                    T = 8192, d = 4096, r = 64 and SmolLM2's layers
//                                    (exit 1: the routes' outputs differ)
//
// Inputs are multiples of 1/8 in [-1/2, 1/2] (and bias, old D likewise; beta = 1/2), so every
// product and partial sum is exact in f32 for these sizes: the f32 kernels must match the
// float64 reference exactly, and bf16/f16 results may differ only by the final rounding
// (relative 2^-8 / 2^-11). Each case cycles through layouts that exercise the fast path
// (lds multiples of 8), the slow scalar path of the second pair (odd lds), and of both pairs
// with misaligned base pointers and an odd ldd (scalar epilogue stores).

#include "../gemm_kext.cu"

#include <cuda.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <glob.h>
#include <library_types.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      exit(2);                                                                             \
    }                                                                                      \
  } while (0)

template <typename T>
using KernelFn = void (*)(int, int, int, int, const T*, int, const T*, int, const T*, int,
                          const T*, int, const T*, float, T*, int);

template <typename T>
using TmaKernelFn = void (*)(const CUtensorMap, const CUtensorMap, const CUtensorMap, const CUtensorMap, int, int,
                             int, int, const T*, int, const T*, int, const T*, int, const T*, int, const T*, float,
                             T*, int);

template <typename T>
struct Variant {
  const char* name;
  KernelFn<T> fn;
  bool nn;
  int tile_m, tile_n, threads, smem;
  // The _tma kernels: fn is then the _sm90 kernel the launcher falls back to when a map
  // cannot be made (an unaligned base, an ld not a multiple of 8, K1 = 0).
  TmaKernelFn<T> tma = nullptr;
  // A _tma variant launched persistent: grid = min(tiles, g_blocks), each block loops over
  // tiles (g_blocks: the SM count for --bench; 2 for the checks, so that small problems too
  // run several tiles per block).
  bool persist = false;
};
static int g_blocks = 2;

// ---- tensor maps (what src/cuda/gemm.rs does for the _tma kernels) ----
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
static EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = nullptr;
  if (!fn) {
    cudaDriverEntryPointQueryResult q;
    void* p = nullptr;
    CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
    if (q != cudaDriverEntryPointSuccess || !p) {
      fprintf(stderr, "cuTensorMapEncodeTiled not found\n");
      exit(2);
    }
    fn = (EncodeTiledFn)p;
  }
  return fn;
}
template <typename T>
static CUtensorMapDataType tmap_type();
template <>
CUtensorMapDataType tmap_type<__nv_bfloat16>() { return CU_TENSOR_MAP_DATA_TYPE_BFLOAT16; }
template <>
CUtensorMapDataType tmap_type<__half>() { return CU_TENSOR_MAP_DATA_TYPE_FLOAT16; }
template <>
CUtensorMapDataType tmap_type<float>() { return CU_TENSOR_MAP_DATA_TYPE_FLOAT32; }  // (no f32 _tma kernel)
// A rows x cols row-major matrix (ld elements) as a 2-d map with box_cols x box_rows boxes,
// 128-byte swizzle, zeros outside. False when TMA cannot address it.
template <typename T>
static bool make_map(CUtensorMap* m, const T* ptr, int rows, int cols, int ld, int box_cols, int box_rows) {
  if (ptr == nullptr || ((uintptr_t)ptr & 15) || (ld & 7) || rows < 1 || cols < 1) return false;
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)ld * sizeof(T)};
  const cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows};
  const cuuint32_t estr[2] = {1, 1};
  return encode_tiled()(m, tmap_type<T>(), 2, (void*)ptr, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}
static long g_tma_runs = 0, g_tma_fallbacks = 0;
// --uc: launch the _tma kernel as a programmatic dependent of the kernel before it.
static bool g_dependent = false;
// Launches a variant: the plain kernel, or for a _tma variant its maps and kernel (or, when a
// map cannot be made, the fallback kernel).
template <typename T>
static void launch(const Variant<T>& v, int grid, int M, int N, int K1, int K2, const T* A1, int lda1, const T* B1,
                   int ldb1, const T* A2, int lda2, const T* B2, int ldb2, const T* bias, float beta, T* D, int ldd) {
  if (v.tma) {
    CUtensorMap m[4];
    bool ok = K1 > 0 && make_map(&m[0], A1, M, K1, lda1, 64, 128) &&
              (v.nn ? make_map(&m[1], B1, K1, N, ldb1, 64, 64) : make_map(&m[1], B1, N, K1, ldb1, 64, 256));
    if (ok && K2 > 0)
      ok = make_map(&m[2], A2, M, K2, lda2, 64, 128) &&
           (v.nn ? make_map(&m[3], B2, K2, N, ldb2, 64, 64) : make_map(&m[3], B2, N, K2, ldb2, 64, 256));
    else if (ok)
      m[2] = m[0], m[3] = m[1];
    if (ok) {
      ++g_tma_runs;
      if (v.persist && grid > g_blocks) grid = g_blocks;
      if (g_dependent) {
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(grid);
        cfg.blockDim = dim3(288);
        cfg.dynamicSmemBytes = v.smem;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        CK(cudaLaunchKernelEx(&cfg, v.tma, m[0], m[1], m[2], m[3], M, N, K1, K2, A1, lda1, B1, ldb1, A2, lda2, B2, ldb2,
                              bias, beta, D, ldd));
        return;
      }
      v.tma<<<grid, 288, v.smem>>>(m[0], m[1], m[2], m[3], M, N, K1, K2, A1, lda1, B1, ldb1, A2, lda2, B2, ldb2, bias,
                                   beta, D, ldd);
      return;
    }
    ++g_tma_fallbacks;
  }
  v.fn<<<grid, v.threads, v.smem>>>(M, N, K1, K2, A1, lda1, B1, ldb1, A2, lda2, B2, ldb2, bias, beta, D, ldd);
}

static inline float to_f(float v) { return v; }
static inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
static inline float to_f(__half v) { return __half2float(v); }
template <typename T>
static inline T from_f(float v);
template <>
inline float from_f<float>(float v) { return v; }
template <>
inline __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
inline __half from_f<__half>(float v) { return __float2half_rn(v); }

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static float rnd8() {  // multiple of 1/8 in [-1/2, 1/2]
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return (float)((int)(g_rng % 9) - 4) / 8.0f;
}

// A host matrix with a given leading dimension, filled with rnd8 (padding filled with a
// large sentinel so that reading outside the view shows up as a wrong result).
struct HostMat {
  int rows = 0, cols = 0, ld = 0;
  std::vector<float> v;
  void init(int r, int c, int l) {
    rows = r, cols = c, ld = l;
    v.assign((size_t)(r > 0 ? (r - 1) * (size_t)l + c : 0) + 16, 1000.0f);
    for (int i = 0; i < r; ++i)
      for (int j = 0; j < c; ++j) v[(size_t)i * l + j] = rnd8();
  }
  float at(int i, int j) const { return v[(size_t)i * ld + j]; }
};

struct Case {
  int M, N, K1, K2;
  bool nn;
  int layout;  // 0: aligned lds; 1: second pair odd lds; 2: everything odd / misaligned
  bool bias;
  float beta;
};

struct Problem {
  Case c;
  HostMat A1, B1, A2, B2, D0;
  std::vector<float> bias;
  std::vector<double> ref;  // M x N
  int off;                  // element offset of every base pointer (layout 2: 1)
  int ldd;
};

static int round8(int x) { return (x + 7) / 8 * 8; }

static void make_problem(Problem& p, const Case& c) {
  p.c = c;
  auto ld_for = [&](int cols, bool second) {
    if (c.layout == 0) return round8(cols);
    if (c.layout == 1) return second ? cols + 1 : round8(cols) + 8;
    return cols + 3;
  };
  p.off = c.layout == 2 ? 1 : 0;
  p.A1.init(c.M, c.K1, ld_for(c.K1, false));
  p.A2.init(c.M, c.K2, ld_for(c.K2, true));
  if (!c.nn) {
    p.B1.init(c.N, c.K1, ld_for(c.K1, false));
    p.B2.init(c.N, c.K2, ld_for(c.K2, true));
  } else {
    p.B1.init(c.K1, c.N, ld_for(c.N, false));
    p.B2.init(c.K2, c.N, ld_for(c.N, true));
  }
  p.ldd = c.layout == 2 ? c.N + 1 : round8(c.N);
  p.D0.init(c.M, c.N, p.ldd);
  p.bias.resize(c.N);
  for (auto& b : p.bias) b = rnd8();
  p.ref.assign((size_t)c.M * c.N, 0.0);
  for (int i = 0; i < c.M; ++i)
    for (int j = 0; j < c.N; ++j) {
      double s = 0;
      for (int k = 0; k < c.K1; ++k)
        s += (double)p.A1.at(i, k) * (c.nn ? p.B1.at(k, j) : p.B1.at(j, k));
      for (int k = 0; k < c.K2; ++k)
        s += (double)p.A2.at(i, k) * (c.nn ? p.B2.at(k, j) : p.B2.at(j, k));
      if (c.bias) s += p.bias[j];
      if (c.beta != 0.f) s += (double)c.beta * p.D0.at(i, j);
      p.ref[(size_t)i * c.N + j] = s;
    }
}

// `n` elements of device memory at `p`, copied to the host.
template <typename E>
static std::vector<E> to_host(const E* p, size_t n) {
  std::vector<E> h(n);
  CK(cudaMemcpy(h.data(), p, n * sizeof(E), cudaMemcpyDeviceToHost));
  return h;
}
template <typename T>
static T* upload(const std::vector<float>& h, int off) {
  std::vector<T> t(h.size() + off);
  for (size_t i = 0; i < h.size(); ++i) t[i + off] = from_f<T>(h[i]);
  T* d = nullptr;
  CK(cudaMalloc(&d, t.size() * sizeof(T)));
  CK(cudaMemcpy(d, t.data(), t.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// Runs one variant on one problem; returns the worst error in units of the tolerance
// (> 1 = failure) and prints a line for failures.
template <typename T>
static double run_case(const Variant<T>& var, const Problem& p, double rel_tol) {
  const Case& c = p.c;
  T* dA1 = upload<T>(p.A1.v, p.off);
  T* dB1 = upload<T>(p.B1.v, p.off);
  T* dA2 = c.K2 ? upload<T>(p.A2.v, p.off) : nullptr;
  T* dB2 = c.K2 ? upload<T>(p.B2.v, p.off) : nullptr;
  T* dbias = c.bias ? upload<T>(p.bias, p.off) : nullptr;
  std::vector<float> d0 = p.D0.v;
  if (c.beta == 0.f)  // D must not be read: fill it with NaN
    for (auto& x : d0) x = NAN;
  T* dD = upload<T>(d0, p.off);
  const int tiles = ((c.M + var.tile_m - 1) / var.tile_m) * ((c.N + var.tile_n - 1) / var.tile_n);
  launch(var, tiles, c.M, c.N, c.K1, c.K2, dA1 + p.off, p.A1.ld, dB1 + p.off, p.B1.ld,
         dA2 ? dA2 + p.off : nullptr, p.A2.ld, dB2 ? dB2 + p.off : nullptr, p.B2.ld,
         dbias ? dbias + p.off : nullptr, c.beta, dD + p.off, p.ldd);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  const std::vector<T> out = to_host(dD, d0.size() + p.off);
  double worst = 0;
  int wi = -1, wj = -1;
  double wgot = 0, wref = 0;
  for (int i = 0; i < c.M; ++i)
    for (int j = 0; j < c.N; ++j) {
      const double r = p.ref[(size_t)i * c.N + j];
      const double g = to_f(out[(size_t)i * p.ldd + j + p.off]);
      double e = std::fabs(g - r) / (rel_tol * std::fmax(1.0, std::fabs(r)));
      if (!(e <= 1e300)) e = 1e300;  // NaN
      if (e > worst) worst = e, wi = i, wj = j, wgot = g, wref = r;
    }
  // Padding between rows of D must be untouched (it held rnd8 values or NaN).
  for (int i = 0; i + 1 < c.M; ++i)
    for (int j = c.N; j < p.ldd; ++j) {
      const float before = d0[(size_t)i * p.ldd + j];
      const float after = to_f(out[(size_t)i * p.ldd + j + p.off]);
      const bool same = (std::isnan(before) && std::isnan(after)) || to_f(from_f<T>(before)) == after;
      if (!same) {
        worst = 1e300;
        wi = i, wj = j, wgot = after, wref = before;
      }
    }
  if (worst > 1.0)
    printf("FAIL %-24s M=%d N=%d K1=%d K2=%d layout=%d bias=%d beta=%g: worst at (%d,%d) got %.6g "
           "want %.6g (%.3g x tol)\n",
           var.name, c.M, c.N, c.K1, c.K2, c.layout, (int)c.bias, c.beta, wi, wj, wgot, wref,
           worst);
  cudaFree(dA1);
  cudaFree(dB1);
  if (dA2) cudaFree(dA2);
  if (dB2) cudaFree(dB2);
  if (dbias) cudaFree(dbias);
  cudaFree(dD);
  return worst;
}

template <typename T>
static void set_smem(const Variant<T>& v) {
  if (v.smem > 48 * 1024) {
    CK(cudaFuncSetAttribute(v.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, v.smem));
    if (v.tma) CK(cudaFuncSetAttribute(v.tma, cudaFuncAttributeMaxDynamicSharedMemorySize, t90::SMEM_BYTES));
  }
}

static const int H_SMEM = h90::SMEM_BYTES;

static std::vector<Variant<__nv_bfloat16>> bf16_variants(bool sm90, bool tma) {
  std::vector<Variant<__nv_bfloat16>> v = {
      {"gemm_kext_nt_bf16", gemm_kext_nt_bf16, false, 128, 128, 256, tc::Narrow::SMEM_BYTES},
      {"gemm_kext_nn_bf16", gemm_kext_nn_bf16, true, 128, 128, 256, tc::Narrow::SMEM_BYTES},
      {"gemm_kext_nt_bf16_wide", gemm_kext_nt_bf16_wide, false, 128, 256, 256, tc::Wide::SMEM_BYTES},
      {"gemm_kext_nn_bf16_wide", gemm_kext_nn_bf16_wide, true, 128, 256, 256, tc::Wide::SMEM_BYTES}};
  if (sm90) {
    v.push_back({"gemm_kext_nt_bf16_sm90", gemm_kext_nt_bf16_sm90, false, 128, 256, 256, H_SMEM});
    v.push_back({"gemm_kext_nn_bf16_sm90", gemm_kext_nn_bf16_sm90, true, 128, 256, 256, H_SMEM});
  }
  if (tma) {
    v.push_back({"gemm_kext_nt_bf16_tma", gemm_kext_nt_bf16_sm90, false, 128, 256, 256, H_SMEM, gemm_kext_nt_bf16_tma});
    v.push_back({"gemm_kext_nt_bf16_tma_p", gemm_kext_nt_bf16_sm90, false, 128, 256, 256, H_SMEM, gemm_kext_nt_bf16_tma, true});
    v.push_back({"gemm_kext_nn_bf16_tma", gemm_kext_nn_bf16_sm90, true, 128, 256, 256, H_SMEM, gemm_kext_nn_bf16_tma});
    v.push_back({"gemm_kext_nn_bf16_tma_p", gemm_kext_nn_bf16_sm90, true, 128, 256, 256, H_SMEM, gemm_kext_nn_bf16_tma, true});
  }
  return v;
}
static std::vector<Variant<__half>> f16_variants(bool sm90, bool tma) {
  std::vector<Variant<__half>> v = {
      {"gemm_kext_nt_f16", gemm_kext_nt_f16, false, 128, 128, 256, tc::Narrow::SMEM_BYTES},
      {"gemm_kext_nn_f16", gemm_kext_nn_f16, true, 128, 128, 256, tc::Narrow::SMEM_BYTES},
      {"gemm_kext_nt_f16_wide", gemm_kext_nt_f16_wide, false, 128, 256, 256, tc::Wide::SMEM_BYTES},
      {"gemm_kext_nn_f16_wide", gemm_kext_nn_f16_wide, true, 128, 256, 256, tc::Wide::SMEM_BYTES}};
  if (sm90) {
    v.push_back({"gemm_kext_nt_f16_sm90", gemm_kext_nt_f16_sm90, false, 128, 256, 256, H_SMEM});
    v.push_back({"gemm_kext_nn_f16_sm90", gemm_kext_nn_f16_sm90, true, 128, 256, 256, H_SMEM});
  }
  if (tma) {
    v.push_back({"gemm_kext_nt_f16_tma", gemm_kext_nt_f16_sm90, false, 128, 256, 256, H_SMEM, gemm_kext_nt_f16_tma});
    v.push_back({"gemm_kext_nt_f16_tma_p", gemm_kext_nt_f16_sm90, false, 128, 256, 256, H_SMEM, gemm_kext_nt_f16_tma, true});
    v.push_back({"gemm_kext_nn_f16_tma", gemm_kext_nn_f16_sm90, true, 128, 256, 256, H_SMEM, gemm_kext_nn_f16_tma});
    v.push_back({"gemm_kext_nn_f16_tma_p", gemm_kext_nn_f16_sm90, true, 128, 256, 256, H_SMEM, gemm_kext_nn_f16_tma, true});
  }
  return v;
}
static std::vector<Variant<float>> f32_variants() {
  return {{"gemm_kext_nt_f32", gemm_kext_nt_f32, false, 64, 64, 256, 0},
          {"gemm_kext_nn_f32", gemm_kext_nn_f32, true, 64, 64, 256, 0}};
}

template <typename T>
static bool check_all(const std::vector<Variant<T>>& vars, const std::vector<Problem>& probs,
                      double tol) {
  bool ok = true;
  for (const auto& v : vars) {
    set_smem(v);
    double worst = 0;
    int n = 0;
    const long tma0 = g_tma_runs, fb0 = g_tma_fallbacks;
    for (const auto& p : probs) {
      if (p.c.nn != v.nn) continue;
      worst = std::fmax(worst, run_case(v, p, tol));
      ++n;
    }
    printf("%-24s %4d cases  worst error %.3g x tol (tol %.3g relative)  %s", v.name, n,
           worst, tol, worst <= 1.0 ? "ok" : "FAIL");
    if (v.tma) printf("  (%ld on TMA, %ld on the fallback)", g_tma_runs - tma0, g_tma_fallbacks - fb0);
    printf("\n");
    ok = ok && worst <= 1.0;
  }
  return ok;
}

// ------------------------------------------------------------------------------------------
// --bench: 4096^3
// ------------------------------------------------------------------------------------------
// cuBLAS through dlopen, declared here (ABI values of cublas_api.h, stable across 11-13) so
// that neither its header nor its library is needed to build.
typedef void* CublasHandle;
typedef int (*CreateFn)(CublasHandle*);
typedef int (*GemmExFn)(CublasHandle, int opA, int opB, int m, int n, int k, const void* alpha,
                        const void* A, cudaDataType Atype, int lda, const void* B,
                        cudaDataType Btype, int ldb, const void* beta, void* C,
                        cudaDataType Ctype, int ldc, int computeType, int algo);
typedef int (*VersionFn)(CublasHandle, int*);
enum { kCublasOpN = 0, kCublasOpT = 1, kCublasCompute32F = 68, kCublasGemmDefault = -1 };

struct Cublas {
  CublasHandle h = nullptr;
  GemmExFn gemm = nullptr;
  std::string path;
  int version = 0;
};

// Tries one libcublas: its libcublasLt (same folder) is loaded first, RTLD_GLOBAL, since a
// toolkit's lib64 has no RUNPATH to find it by.
static bool try_cublas(const std::string& lib_path, Cublas& cb, std::string& why) {
  const size_t slash = lib_path.rfind('/');
  if (slash != std::string::npos) {
    const std::string dir = lib_path.substr(0, slash);
    glob_t g;
    if (glob((dir + "/libcublasLt.so*").c_str(), 0, nullptr, &g) == 0) {
      for (size_t i = 0; i < g.gl_pathc; ++i)
        if (dlopen(g.gl_pathv[i], RTLD_NOW | RTLD_GLOBAL)) break;
      globfree(&g);
    }
  }
  void* lib = dlopen(lib_path.c_str(), RTLD_NOW);
  if (!lib) {
    const char* e = dlerror();
    why += "\n  " + lib_path + ": " + (e ? e : "dlopen failed");
    return false;
  }
  auto create = (CreateFn)dlsym(lib, "cublasCreate_v2");
  auto gemm = (GemmExFn)dlsym(lib, "cublasGemmEx");
  auto version = (VersionFn)dlsym(lib, "cublasGetVersion_v2");
  CublasHandle h = nullptr;
  int st = -1;
  if (create && gemm) st = create(&h);
  if (st != 0) {
    why += "\n  " + lib_path + ": cublasCreate_v2 " +
           (create && gemm ? "returned " + std::to_string(st) : std::string("not found"));
    return false;
  }
  cb.h = h;
  cb.gemm = gemm;
  cb.path = lib_path;
  if (version) version(h, &cb.version);
  return true;
}

// Where libcublas is looked for, in order: $GEMM_CHECK_CUBLAS (a file, or a folder), the
// loader's own search (LD_LIBRARY_PATH, ldconfig), the CUDA toolkit folders, then the NVIDIA
// wheels of any Python on the machine (PyTorch's: site-packages/nvidia/cu13/lib for CUDA 13,
// site-packages/nvidia/cublas/lib before that).
static bool find_cublas(Cublas& cb, std::string& why) {
  std::vector<std::string> cands;
  if (const char* env = getenv("GEMM_CHECK_CUBLAS")) {
    std::string e = env;
    if (!e.empty() && e.find(".so") == std::string::npos) {
      cands.push_back(e + "/libcublas.so.13");
      cands.push_back(e + "/libcublas.so.12");
      cands.push_back(e + "/libcublas.so");
    } else if (!e.empty()) {
      cands.push_back(e);
    }
  }
  cands.push_back("libcublas.so.13");
  cands.push_back("libcublas.so.12");
  cands.push_back("libcublas.so");
  const char* pats[] = {
      "/usr/local/cuda/lib64/libcublas.so.*[0-9]",
      "/usr/local/cuda/targets/*/lib/libcublas.so.*[0-9]",
      "/usr/local/cuda-*/lib64/libcublas.so.*[0-9]",
      "/usr/local/cuda-*/targets/*/lib/libcublas.so.*[0-9]",
      "/usr/lib/x86_64-linux-gnu/libcublas.so.*[0-9]",
      "/opt/*/.venv/lib/python3*/site-packages/nvidia/cu1*/lib/libcublas.so.*[0-9]",
      "/opt/*/.venv/lib/python3*/site-packages/nvidia/cublas/lib/libcublas.so.*[0-9]",
      "/opt/*/lib/python3*/site-packages/nvidia/cu1*/lib/libcublas.so.*[0-9]",
      "/opt/*/lib/python3*/site-packages/nvidia/cublas/lib/libcublas.so.*[0-9]",
      "/usr/local/lib/python3*/*-packages/nvidia/cu1*/lib/libcublas.so.*[0-9]",
      "/usr/local/lib/python3*/*-packages/nvidia/cublas/lib/libcublas.so.*[0-9]",
      "/usr/lib/python3*/*-packages/nvidia/cu1*/lib/libcublas.so.*[0-9]",
      "/usr/lib/python3*/*-packages/nvidia/cublas/lib/libcublas.so.*[0-9]",
      "/root/.local/lib/python3*/site-packages/nvidia/cu1*/lib/libcublas.so.*[0-9]",
      "/opt/conda/lib/libcublas.so.*[0-9]",
  };
  for (const char* pat : pats) {
    glob_t g;
    if (glob(pat, 0, nullptr, &g) == 0) {
      // Newest first (glob sorts ascending): .so.13 before .so.12.
      for (size_t i = g.gl_pathc; i-- > 0;) cands.push_back(g.gl_pathv[i]);
      globfree(&g);
    }
  }
  for (const auto& c : cands)
    if (try_cublas(c, cb, why)) return true;
  return false;
}

// Device buffers for the timings: `n` elements, uninitialised (device_alloc) or random multiples
// of 1/8 (device_random: timings are never taken on zeros).
template <typename T>
static T* device_alloc(size_t n) {
  T* p = nullptr;
  CK(cudaMalloc(&p, n * sizeof(T)));
  return p;
}
template <typename T>
static T* device_random(size_t n) {
  T* p = device_alloc<T>(n);
  std::vector<T> h(n);
  for (auto& x : h) x = from_f<T>(rnd8());
  CK(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

// Row-major D[M x N] = A[M x K] B^T (NT; B is N x K) or A B (NN; B is K x N), f32 accumulation,
// through cuBLAS's column-major GemmEx as D^T = op(B) A^T. `ta`: A is given transposed (stored
// K x M, ld lda). `d_type`: D's type (-1: the inputs'). Exits on a cuBLAS error (a timing of a
// failed call would be meaningless).
static void cublas_rowmajor(const Cublas* cb, bool nn, int M, int N, int K, const void* A, int lda, const void* B, int ldb,
                            void* D, int ldd, int cuda_type, bool ta = false, int d_type = -1) {
  const float one = 1.f, zero = 0.f;
  const cudaDataType t = (cudaDataType)cuda_type;
  const cudaDataType td = d_type < 0 ? t : (cudaDataType)d_type;
  const int st = cb->gemm(cb->h, nn ? kCublasOpN : kCublasOpT, ta ? kCublasOpT : kCublasOpN, N, M, K, &one, B, t, ldb, A, t,
                          lda, &zero, D, td, ldd, kCublasCompute32F, kCublasGemmDefault);
  if (st != 0) {
    fprintf(stderr, "cublasGemmEx failed: %d\n", st);
    exit(2);
  }
}

template <typename F>
static double time_ms(F&& f, int iters) {
  // Back-to-back launches between two events (mean): at 4096^3 each product reads 64 MB of
  // operands and takes ~0.2 ms, so the L2 (50-60 MB) holds little of one across launches.
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f();
  CK(cudaEventRecord(a));
  for (int i = 0; i < iters; ++i) f();
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  CK(cudaGetLastError());
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / iters;
}

template <typename T>
static void bench_variants(const std::vector<Variant<T>>& vars, const Cublas* cb, int cuda_type,
                           const char* dtype) {
  const int S = 4096, R = 64, ITERS = 50;
  T* A = device_random<T>((size_t)S * S);
  T* B = device_random<T>((size_t)S * S);
  T* A2 = device_random<T>((size_t)S * R);
  T* B2 = device_random<T>((size_t)S * R);
  T* D = device_alloc<T>((size_t)S * S);
  // cuBLAS first, so that every kernel line can give its ratio to it.
  double cublas_ms[2] = {0, 0};
  if (cb) {
    for (int nn = 0; nn < 2; ++nn) {
      double ms = time_ms([&] { cublas_rowmajor(cb, nn, S, S, S, A, S, B, S, D, S, cuda_type); }, ITERS);
      cublas_ms[nn] = ms;
      printf("cuBLAS %-4s %-12s M=N=K1=%d K2=0   %8.3f ms  %7.1f TFLOP/s\n", dtype, nn ? "NN" : "NT",
             S, ms, 2.0 * S * S * (double)S / ms / 1e9);
    }
  }
  for (const auto& v : vars) {
    set_smem(v);
    for (int k2 : {0, R}) {
      const int tiles = (S / v.tile_m) * (S / v.tile_n);
      // B2 is N x R (NT, ld R) or R x N (NN, ld S).
      const int ldb2 = v.nn ? S : R;
      double ms = time_ms(
          [&] {
            launch(v, tiles, S, S, S, k2, A, S, B, S, A2, R, B2, ldb2, (const T*)nullptr, 0.f, D, S);
          },
          ITERS);
      const double flops = 2.0 * S * S * (double)(S + k2);
      printf("%-24s M=N=K1=%d K2=%-3d %8.3f ms  %7.1f TFLOP/s", v.name, S, k2, ms, flops / ms / 1e9);
      // RATIO: time over cuBLAS's time for the plain 4096^3 product of the same form (for
      // K2 = 64 the kernel also does the rank-64 extension, 1.6% more work).
      if (cb) printf("  RATIO %.3f x cuBLAS %s", ms / cublas_ms[v.nn ? 1 : 0], v.nn ? "NN" : "NT");
      printf("\n");
    }
  }
  cudaFree(A);
  cudaFree(B);
  cudaFree(A2);
  cudaFree(B2);
  cudaFree(D);
}

// The sm_80 kernels' two block tiles (bf16, NT and NN) at shapes around the launcher's rule
// (src/cuda/gemm.rs `tc_wide`: the wide tile once its tiles give every SM one), beside cuBLAS:
// square outputs with fewer and more wide tiles than SMs, and SmolLM2's layer products at
// T = 4096 (K = 576 or 1536). One line each:
//   TILES NT M=.. N=.. K=.. narrow X ms wide Y ms cuBLAS Z ms wide_tiles W sms S rule wide|narrow
static void tile_scan(const Cublas* cb, int sms) {
  using T = __nv_bfloat16;
  const int ITERS = 50;
  const int shapes[][3] = {{1024, 1024, 4096}, {2048, 2048, 4096}, {3072, 3072, 4096},
                           {4096, 576, 576},   {4096, 1536, 576},  {4096, 576, 1536}};
  T* A = device_random<T>((size_t)4096 * 4096);
  T* B = device_random<T>((size_t)4096 * 4096);
  T* D = device_alloc<T>((size_t)4096 * 4096);
  const auto vars = bf16_variants(false, false);
  for (const auto& sh : shapes) {
    const int M = sh[0], N = sh[1], K = sh[2];
    for (int nn = 0; nn < 2; ++nn) {
      double ms[2] = {0, 0};  // narrow, wide
      for (const auto& v : vars) {
        if (v.nn != (nn == 1)) continue;
        set_smem(v);
        const int tiles = ((M + v.tile_m - 1) / v.tile_m) * ((N + v.tile_n - 1) / v.tile_n);
        // A: M x K (ld K); B: N x K (NT, ld K) or K x N (NN, ld N).
        const double t = time_ms(
            [&] {
              launch(v, tiles, M, N, K, 0, A, K, B, nn ? N : K, (const T*)nullptr, 8, (const T*)nullptr, 8,
                     (const T*)nullptr, 0.f, D, N);
            },
            ITERS);
        ms[v.tile_n == 256 ? 1 : 0] = t;
      }
      const double c = cb ? time_ms([&] { cublas_rowmajor(cb, nn, M, N, K, A, K, B, nn ? N : K, D, N, (int)CUDA_R_16BF); }, ITERS)
                          : 0.0;
      const int wide_tiles = ((M + 127) / 128) * ((N + 255) / 256);
      printf("TILES %s M=%d N=%d K=%d narrow %.4f ms wide %.4f ms cuBLAS %.4f ms wide_tiles %d sms %d rule %s\n",
             nn ? "NN" : "NT", M, N, K, ms[0], ms[1], c, wide_tiles, sms, wide_tiles >= sms ? "wide" : "narrow");
    }
  }
  cudaFree(A);
  cudaFree(B);
  cudaFree(D);
}

// --kscan: bf16 at M = N = 4096 for K = 1024, 2048 and 4096, NT and NN, cuBLAS and the TMA
// kernels as the launcher runs them (NT a block per tile, NN persistent). Time = fixed + K x
// per-k cost: the fit separates what a launch costs outside its K loops (epilogues, pipeline
// fill, the last wave) from the K loop's speed.
static void kscan(const Cublas* cb) {
  using T = __nv_bfloat16;
  const int S = 4096, ITERS = 50;
  const int Ks[3] = {1024, 2048, 4096};
  T* A = device_random<T>((size_t)S * S);
  T* B = device_random<T>((size_t)S * S);
  T* D = device_alloc<T>((size_t)S * S);
  auto fit = [&](const char* name, const double (&ms)[3]) {
    // least squares over the three points: ms = a + b K
    double mk = 0, mt = 0, skk = 0, skt = 0;
    for (int i = 0; i < 3; ++i) mk += Ks[i] / 3.0, mt += ms[i] / 3.0;
    for (int i = 0; i < 3; ++i) skk += (Ks[i] - mk) * (Ks[i] - mk), skt += (Ks[i] - mk) * (ms[i] - mt);
    const double b = skt / skk, a = mt - b * mk;
    printf("KSCAN %-24s K=1024 %.4f  K=2048 %.4f  K=4096 %.4f ms  fixed %.1f us  per 1024 of K %.1f us\n", name, ms[0],
           ms[1], ms[2], a * 1e3, b * 1024 * 1e3);
  };
  for (int nn = 0; nn < 2; ++nn) {
    Variant<T> tma;
    bool found = false;
    for (const auto& v : bf16_variants(true, true))
      if (v.tma && v.nn == (nn == 1) && v.persist == (nn == 1)) tma = v, found = true;
    if (!found) {
      fprintf(stderr, "kscan: no TMA variant for %s\n", nn ? "NN" : "NT");
      exit(2);
    }
    set_smem(tma);
    double ms_cb[3], ms_t[3];
    for (int i = 0; i < 3; ++i) {
      const int K = Ks[i];
      if (cb) ms_cb[i] = time_ms([&] { cublas_rowmajor(cb, nn, S, S, K, A, S, B, S, D, S, (int)CUDA_R_16BF); }, ITERS);
      ms_t[i] = time_ms(
          [&] {
            launch(tma, (S / tma.tile_m) * (S / tma.tile_n), S, S, K, 0, A, S, B, S, (const T*)nullptr, 8,
                   (const T*)nullptr, 8, (const T*)nullptr, 0.f, D, S);
          },
          ITERS);
    }
    if (cb) fit(nn ? "cuBLAS_NN" : "cuBLAS_NT", ms_cb);
    fit(tma.name, ms_t);
  }
  cudaFree(A);
  cudaFree(B);
  cudaFree(D);
}

// --uc: the fused forward (bf16) at T = 8192, d_in = d_out = 4096, r = 64 and at SmolLM2's
// layers (T = 4096; 576 -> 576, 576 -> 1536, 1536 -> 576; r = 8), each route the crate has or
// had, side by side: cuBLAS's frozen x W^T (the ratio's base); wegeft_uc alone; the NT TMA
// GEMM (K2 = r, a block per tile) alone; cuBLAS u and C, then the GEMM (FusedSm90's route for
// large layers until session 10); wegeft_uc, then the GEMM; the GEMM as wegeft_uc's
// programmatic dependent (FusedSm90's route for small layers); and wegeft_fwd, the whole
// forward in one launch (FusedSm90's route for large layers since session 10), workspace
// clear included. Inputs are multiples of 1/8, so u and C are exact sums in f32 in every
// kernel: the routes must give the same u, C and y, bit for bit (exit 1 otherwise). Then the
// backward's routes: cuBLAS v, S, dpsi and the NN TMA GEMM, against wegeft_bwd (all four in one
// launch).
static int uc_case(const Cublas* cb, int TT, int DI, int DO, int R, int sms) {
  using T = __nv_bfloat16;
  const int ITERS = 30;
  const float scale = 0.75f;
  printf("UC T=%d d_in=%d d_out=%d r=%d\n", TT, DI, DO, R);
  T* x = device_random<T>((size_t)TT * DI);
  T* w = device_random<T>((size_t)DO * DI);
  T* psi = device_random<T>((size_t)R * DI);
  T* phi = device_random<T>((size_t)DI * R);
  T* u = device_alloc<T>((size_t)TT * R);
  T* c = device_alloc<T>((size_t)DO * R);
  T* u2 = device_alloc<T>((size_t)TT * R);
  T* c2 = device_alloc<T>((size_t)DO * R);
  T* y = device_alloc<T>((size_t)TT * DO);
  T* y2 = device_alloc<T>((size_t)TT * DO);
  T* y3 = device_alloc<T>((size_t)TT * DO);
  Variant<T> v;
  bool found = false;
  for (const auto& c3 : bf16_variants(true, true))
    if (c3.tma && !c3.nn && !c3.persist) v = c3, found = true;
  if (!found) return 2;
  set_smem(v);
  const int tiles = ((TT + 127) / 128) * ((DO + 255) / 256);
  auto uc_launch = [&] {
    wegeft_uc_bf16<<<(TT + 63) / 64 + (DO + 63) / 64, uc::THREADS, uc::SMEM_BYTES>>>(TT, DI, DO, R, x, DI, psi, u, w, DI, phi, c,
                                                                                      scale);
  };
  auto gemm = [&](T* out, bool dep) {
    g_dependent = dep;
    launch(v, tiles, TT, DO, DI, R, x, DI, w, DI, u, R, c, R, (const T*)nullptr, 0.f, out, DO);
    g_dependent = false;
  };
  // wegeft_fwd: its seven maps (as src/cuda/gemm.rs makes them), workspace, grid.
  CUtensorMap fm[7];
  const bool maps = make_map(&fm[0], x, TT, DI, DI, 64, 128) && make_map(&fm[1], w, DO, DI, DI, 64, 256) &&
                    make_map(&fm[2], u2, TT, R, R, 64, 128) && make_map(&fm[3], c2, DO, R, R, 64, 256) &&
                    make_map(&fm[4], w, DO, DI, DI, 64, 128) && make_map(&fm[5], psi, R, DI, DI, 64, 64) &&
                    make_map(&fm[6], phi, DI, R, R, 64, 64);
  if (!maps) {
    printf("UC wegeft_fwd: a tensor map could not be made\n");
    return 1;
  }
  const int RC = (R + 63) / 64, TM = (TT + 127) / 128, CB = (DO + 127) / 128;
  const int fwd_tiles = (CB + TM) * RC + tiles;
  const size_t words = 1 + TM + CB;  // (wegeft_bwd below needs 1 + TM)
  unsigned* work = device_alloc<unsigned>(words);
  CK(cudaFuncSetAttribute(wegeft_fwd_bf16_tma, cudaFuncAttributeMaxDynamicSharedMemorySize, t90::SMEM_BYTES));
  auto fwd_launch = [&] {
    CK(cudaMemsetAsync(work, 0, words * sizeof(unsigned)));
    wegeft_fwd_bf16_tma<<<std::min(fwd_tiles, sms), t90::THREADS, t90::SMEM_BYTES>>>(
        fm[0], fm[1], fm[2], fm[3], fm[5], fm[4], fm[6], fm[0], fm[0], fm[0], fm[0], TT, DO, DI, R, u2, 1.f, c2, scale,
        (const T*)nullptr, y3, DO, (float*)nullptr, (float*)nullptr, fm[0], fm[0], (float*)nullptr, (T*)nullptr, work);
  };
  double frozen = 0;
  if (cb) {
    frozen = time_ms([&] { cublas_rowmajor(cb, false, TT, DO, DI, x, DI, w, DI, y, DO, (int)CUDA_R_16BF); }, ITERS);
    printf("UC cuBLAS x W^T (frozen)            %8.4f ms\n", frozen);
  }
  auto row = [&](const char* what, double ms) {
    printf("UC %-32s %8.4f ms", what, ms);
    if (frozen > 0) printf("  (%.3fx frozen)", ms / frozen);
    printf("\n");
  };
  row("wegeft_uc alone", time_ms(uc_launch, ITERS));
  row("TMA GEMM K2=r alone", time_ms([&] { gemm(y, false); }, ITERS));
  if (cb)
    row("cuBLAS u and C, then the GEMM", time_ms([&] {
          cublas_rowmajor(cb, false, TT, R, DI, x, DI, psi, DI, u, R, (int)CUDA_R_16BF);
          cublas_rowmajor(cb, true, DO, R, DI, w, DI, phi, R, c, R, (int)CUDA_R_16BF);
          gemm(y, false);
        }, ITERS));
  row("wegeft_uc, then the GEMM", time_ms([&] { uc_launch(); gemm(y, false); }, ITERS));
  row("wegeft_uc, GEMM as its dependent", time_ms([&] { uc_launch(); gemm(y2, true); }, ITERS));
  row("wegeft_fwd (one launch)", time_ms(fwd_launch, ITERS));
  CK(cudaDeviceSynchronize());
  // Two device buffers (T or f32) equal bit for bit.
  auto same = [&](const auto* p, const auto* q, size_t n) {
    const auto a = to_host(p, n), b = to_host(q, n);
    return std::memcmp(a.data(), b.data(), n * sizeof(a[0])) == 0;
  };
  // The last runs: y from wegeft_uc + the GEMM, y2 from the dependent launch, y3, u2, c2 from
  // wegeft_fwd.
  uc_launch();
  gemm(y, false);
  CK(cudaDeviceSynchronize());
  const bool dep_ok = same(y, y2, (size_t)TT * DO);
  const bool fwd_ok = same(u, u2, (size_t)TT * R) && same(c, c2, (size_t)DO * R) && same(y, y3, (size_t)TT * DO);
  printf("UC dependent launch gives the same y: %s\n", dep_ok ? "yes" : "NO (MISMATCH)");
  printf("UC wegeft_fwd gives the same u, C and y: %s\n", fwd_ok ? "yes" : "NO (MISMATCH)");

  // The backward: cuBLAS v = G C, S = G^T u, dpsi = v^T x and dphi = s W^T S (f32 out; S in
  // bf16 for cuBLAS, a stand-in of the crate's split product for the timing), then the NN TMA
  // GEMM dx = [G|v][W;psi] (persistent, as the crate launches it), against wegeft_bwd (all in
  // one launch). C and u here are random multiples of 1/8 too (v and S exact in f32): v, S and
  // dx must agree bit for bit; dpsi (sums of v x x in f32, in another order) within 1e-5 of its
  // largest element; dphi within 1e-5 of a double W^T S over S as computed (every 16th row).
  T* g = device_random<T>((size_t)TT * DO);
  T* cin = device_random<T>((size_t)DO * R);
  T* uin = device_random<T>((size_t)TT * R);
  T* vb = device_alloc<T>((size_t)TT * R);
  T* vb2 = device_alloc<T>((size_t)TT * R);
  T* dx = device_alloc<T>((size_t)TT * DI);
  T* dx2 = device_alloc<T>((size_t)TT * DI);
  float* sb = device_alloc<float>((size_t)DO * R);
  float* sb2 = device_alloc<float>((size_t)DO * R);
  float* dpsi = device_alloc<float>((size_t)R * DI);
  float* dpsi2 = device_alloc<float>((size_t)R * DI);
  float* dphi = device_alloc<float>((size_t)DI * R);
  float* dphi2 = device_alloc<float>((size_t)DI * R);
  T* sbf = device_alloc<T>((size_t)DO * R);          // S in bf16 for cuBLAS's dphi
  T* split = device_alloc<T>((size_t)2 * DO * R);    // wegeft_bwd's S_hi, S_lo
  Variant<T> vn;
  found = false;
  for (const auto& c3 : bf16_variants(true, true))
    if (c3.tma && c3.nn && c3.persist) vn = c3, found = true;
  if (!found) return 2;
  set_smem(vn);
  const int dx_tiles = ((TT + 127) / 128) * ((DI + 255) / 256);
  CUtensorMap dm[13];
  const bool dmaps = make_map(&dm[0], g, TT, DO, DO, 64, 128) && make_map(&dm[1], w, DO, DI, DI, 64, 64) &&
                     make_map(&dm[2], vb2, TT, R, R, 64, 128) && make_map(&dm[3], psi, R, DI, DI, 64, 64) &&
                     make_map(&dm[4], cin, DO, R, R, 64, 64) && make_map(&dm[7], g, TT, DO, DO, 64, 64) &&
                     make_map(&dm[8], uin, TT, R, R, 64, 64) && make_map(&dm[9], x, TT, DI, DI, 64, 64) &&
                     make_map(&dm[10], vb2, TT, R, R, 64, 64) && make_map(&dm[11], w, DO, DI, DI, 64, 64) &&
                     make_map(&dm[12], split, 2 * DO, R, R, 64, 64);
  if (!dmaps) {
    printf("UC wegeft_bwd: a tensor map could not be made\n");
    return 1;
  }
  dm[5] = dm[6] = dm[0];
  const int bwd_all = (TM + (DO + 127) / 128 + 2 * ((DI + 127) / 128)) * RC + dx_tiles;
  const size_t dwords = 1 + TM + CB;
  CK(cudaFuncSetAttribute(wegeft_bwd_bf16_tma, cudaFuncAttributeMaxDynamicSharedMemorySize, t90::SMEM_BYTES));
  auto bwd_launch = [&] {
    CK(cudaMemsetAsync(work, 0, dwords * sizeof(unsigned)));
    wegeft_bwd_bf16_tma<<<std::min(bwd_all, sms), t90::THREADS, t90::SMEM_BYTES>>>(
        dm[0], dm[1], dm[2], dm[3], dm[4], dm[5], dm[6], dm[7], dm[8], dm[9], dm[10], TT, DI, DO, R, vb2, 1.f, (T*)nullptr,
        scale, (const T*)nullptr, dx2, DI, sb2, dpsi2, dm[11], dm[12], dphi2, split, work);
  };
  auto nn_gemm = [&] { launch(vn, dx_tiles, TT, DI, DO, R, g, DO, w, DI, vb, R, psi, DI, (const T*)nullptr, 0.f, dx, DI); };
  auto rank_products = [&] {
    cublas_rowmajor(cb, true, TT, R, DO, g, DO, cin, R, vb, R, (int)CUDA_R_16BF);
    cublas_rowmajor(cb, true, DO, R, TT, g, DO, uin, R, sb, R, (int)CUDA_R_16BF, true, (int)CUDA_R_32F);
    cublas_rowmajor(cb, true, R, DI, TT, vb, R, x, DI, dpsi, DI, (int)CUDA_R_16BF, true, (int)CUDA_R_32F);
    cublas_rowmajor(cb, true, DI, R, DO, w, DI, sbf, R, dphi, R, (int)CUDA_R_16BF, true, (int)CUDA_R_32F);
  };
  if (cb) {
    const double fz = time_ms([&] { cublas_rowmajor(cb, true, TT, DI, DO, g, DO, w, DI, dx, DI, (int)CUDA_R_16BF); }, ITERS);
    printf("UC bwd: cuBLAS G W (frozen)         %8.4f ms\n", fz);
    frozen = fz;
    row("bwd: NN TMA GEMM K2=r alone", time_ms(nn_gemm, ITERS));
    row("bwd: cuBLAS v, S, dpsi, dphi, then the GEMM", time_ms([&] {
          rank_products();
          nn_gemm();
        }, ITERS));
  }
  row("bwd: wegeft_bwd (one launch)", time_ms(bwd_launch, ITERS));
  // The last runs, compared (dpsi from zero in both).
  bool bwd_ok = true;
  if (cb) {
    CK(cudaMemset(dpsi2, 0, (size_t)R * DI * sizeof(float)));
    bwd_launch();
    rank_products();
    nn_gemm();
    CK(cudaDeviceSynchronize());
    const std::vector<float> p1 = to_host(dpsi, (size_t)R * DI), p2 = to_host(dpsi2, (size_t)R * DI);
    double big = 0, diff = 0;
    for (size_t i = 0; i < p1.size(); ++i) big = std::max(big, (double)std::fabs(p1[i])), diff = std::max(diff, (double)std::fabs(p1[i] - p2[i]));
    const bool same_s = same(sb, sb2, (size_t)DO * R);
    // dphi (from zero) against scale W^T S in double over the S it stored, every 16th row.
    CK(cudaMemset(dphi2, 0, (size_t)DI * R * sizeof(float)));
    bwd_launch();
    CK(cudaDeviceSynchronize());
    const std::vector<float> sh = to_host(sb2, (size_t)DO * R), ph = to_host(dphi2, (size_t)DI * R);
    const std::vector<T> wh = to_host(w, (size_t)DO * DI);
    double pbig = 0, pdiff = 0;
    for (int i = 0; i < DI; i += 16)
      for (int j = 0; j < R; ++j) {
        double want = 0;
        for (int k = 0; k < DO; ++k) want += (double)to_f(wh[(size_t)k * DI + i]) * sh[(size_t)k * R + j];
        want *= scale;
        pbig = std::max(pbig, std::fabs(want));
        pdiff = std::max(pdiff, std::fabs(want - ph[(size_t)i * R + j]));
      }
    const bool dphi_ok = pdiff <= 1e-5 * std::max(pbig, 1e-30);
    bwd_ok = same(vb, vb2, (size_t)TT * R) && same(dx, dx2, (size_t)TT * DI) && same_s && diff <= 1e-5 * std::max(big, 1e-30) &&
             dphi_ok;
    printf("UC wegeft_bwd gives the same v, S and dx, dpsi within 1e-5 (%.1e) and dphi within 1e-5 (%.1e): %s\n",
           diff / std::max(big, 1e-30), pdiff / std::max(pbig, 1e-30), bwd_ok ? "yes" : "NO (MISMATCH)");
  }
  for (T* p : {x, w, psi, phi, u, c, u2, c2, y, y2, y3, g, cin, uin, vb, vb2, dx, dx2}) cudaFree(p);
  for (float* p : {sb, sb2, dpsi, dpsi2, dphi, dphi2}) cudaFree(p);
  cudaFree(sbf);
  cudaFree(split);
  cudaFree(work);
  return dep_ok && fwd_ok && bwd_ok ? 0 : 1;
}

static int uc_bench(const Cublas* cb) {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  int rc = 0;
  const int shapes[][4] = {{8192, 4096, 4096, 64}, {4096, 576, 576, 8}, {4096, 576, 1536, 8}, {4096, 1536, 576, 8}};
  for (const auto& s : shapes) rc = std::max(rc, uc_case(cb, s[0], s[1], s[2], s[3], sms));
  return rc;
}

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);  // line by line into a log, even if killed by a timeout
  const bool bench = argc > 1 && std::string(argv[1]) == "--bench";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  // The _sm90 kernels run wgmma on sm_90 and the sm_80 body elsewhere (test both when the
  // device can give them their shared memory).
  const bool sm90 = (prop.major == 9 && prop.minor == 0) || prop.sharedMemPerBlockOptin >= (size_t)H_SMEM;
  // The _tma kernels exist only in the sm_90a image.
  const bool tma = prop.major == 9 && prop.minor == 0;
  if (bench) g_blocks = prop.multiProcessorCount;
  printf("device: %s (sm_%d%d)%s\n", prop.name, prop.major, prop.minor,
         sm90 ? (prop.major == 9 ? ", testing the sm_90a wgmma kernels too"
                                 : ", testing the _sm90 names (sm_80 body) too")
              : "");

  if (argc > 1 && std::string(argv[1]) == "--uc") {
    if (!tma) {
      printf("uc: needs the sm_90a TMA kernels (compute capability 9.0)\n");
      return 3;
    }
    g_blocks = prop.multiProcessorCount;  // the persistent NN GEMM as the crate launches it
    Cublas cb;
    std::string why;
    const bool have = find_cublas(cb, why);
    return uc_bench(have ? &cb : nullptr);
  }
  if (argc > 1 && std::string(argv[1]) == "--kscan") {
    if (!tma) {
      printf("kscan: needs the sm_90a TMA kernels (compute capability 9.0)\n");
      return 3;
    }
    g_blocks = prop.multiProcessorCount;
    Cublas cb;
    std::string why;
    const bool have = find_cublas(cb, why);
    kscan(have ? &cb : nullptr);
    CK(cudaDeviceSynchronize());
    return have ? 0 : 3;
  }
  if (bench) {
    Cublas cb;
    std::string why;
    const bool have = find_cublas(cb, why);
    if (have)
      printf("cuBLAS: %s (version %d)\n", cb.path.c_str(), cb.version);
    else
      printf("cuBLAS not available: no comparison. Tried:%s\n", why.empty() ? " nothing found" : why.c_str());
    bench_variants(bf16_variants(sm90, tma), have ? &cb : nullptr, (int)CUDA_R_16BF, "bf16");
    bench_variants(f16_variants(sm90, tma), have ? &cb : nullptr, (int)CUDA_R_16F, "f16");
    tile_scan(have ? &cb : nullptr, prop.multiProcessorCount);
    CK(cudaDeviceSynchronize());
    return have ? 0 : 3;
  }
  const bool small = argc > 1 && std::string(argv[1]) == "--small";
  if (argc > 1 && !small) {
    fprintf(stderr, "usage: %s [--small | --bench | --kscan | --uc]\n", argv[0]);
    return 2;
  }

  // The odd-size grid: every combination, both forms, layouts / bias / beta cycling.
  // --small: M past one tile (129), N past one sm90 tile (577 > 256), K1 past one k-step and past the pipeline depth (33, 576)
  // and both the fast and the scalar paths; every layout / bias / beta still cycles.
  const std::vector<int> Ms = small ? std::vector<int>{1, 129} : std::vector<int>{1, 37, 129, 300};
  const std::vector<int> Ns = small ? std::vector<int>{40, 577} : std::vector<int>{8, 40, 136, 577};
  const std::vector<int> K1s = small ? std::vector<int>{1, 33, 576} : std::vector<int>{1, 16, 33, 576};
  const std::vector<int> K2s = small ? std::vector<int>{0, 8, 64} : std::vector<int>{0, 1, 8, 64};
  std::vector<Problem> probs;
  int idx = 0;
  for (int nn = 0; nn < 2; ++nn)
    for (int M : Ms)
      for (int N : Ns)
        for (int K1 : K1s)
          for (int K2 : K2s) {
            Case c{M, N, K1, K2, nn != 0, idx % 3, idx % 2 == 1, (idx / 2) % 2 ? 0.5f : 0.f};
            ++idx;
            probs.emplace_back();
            make_problem(probs.back(), c);
          }
  bool ok = true;
  ok &= check_all(f32_variants(), probs, 1e-6);
  ok &= check_all(bf16_variants(sm90, tma), probs, 1.0 / 256);   // bf16: 8 significant bits
  ok &= check_all(f16_variants(sm90, tma), probs, 1.0 / 2048);   // f16: 11 significant bits
  printf("%s\n", ok ? "ALL OK" : "SOME FAILED");
  return ok ? 0 : 1;
}
