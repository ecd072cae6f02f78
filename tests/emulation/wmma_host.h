// The WMMA stand-in shared by the host emulations (kernels_on_host.cpp, and
// model_kernels_on_host.cpp, which includes common.cuh's tiled product without using it).
#pragma once
#include <cstring>
#include <type_traits>

// WMMA stand-in: every lane of a warp holds and computes the whole 16 x 16 tile (the real
// fragments are spread over the lanes); lanes store identical values, so the result is the
// collective operation's. TF32 rounding is emulated (round to nearest, 10-bit mantissa).
#define WEGEFT_HOST_EMULATION 1
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    static constexpr int R = std::is_same<Use, matrix_b>::value ? K : M;
    static constexpr int C = std::is_same<Use, matrix_a>::value ? K : N;
    static constexpr int num_elements = R * C;
    float x[R * C];
};
inline float __float_to_tf32(float v) {
    uint32_t u; std::memcpy(&u, &v, 4); u = (u + 0x1000u) & ~0x1FFFu; std::memcpy(&v, &u, 4); return v;
}
template <typename F> void fill_fragment(F& f, float v) { for (auto& e : f.x) e = v; }
template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<matrix_a, M, N, K, T, col_major>& f, const float* p, unsigned ldm) {
    for (int i = 0; i < M; ++i) for (int k = 0; k < K; ++k) f.x[i * K + k] = p[i + (size_t)k * ldm];
}
template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<matrix_b, M, N, K, T, row_major>& f, const float* p, unsigned ldm) {
    for (int k = 0; k < K; ++k) for (int j = 0; j < N; ++j) f.x[k * N + j] = p[(size_t)k * ldm + j];
}
template <int M, int N, int K, typename TA, typename TB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, col_major>& a,
              const fragment<matrix_b, M, N, K, TB, row_major>& b, const fragment<accumulator, M, N, K, float>& c) {
    float out[M * N];
    for (int i = 0; i < M; ++i) for (int j = 0; j < N; ++j) {
        float acc = c.x[i * N + j];
        for (int k = 0; k < K; ++k) acc = fmaf(a.x[i * K + k], b.x[k * N + j], acc);
        out[i * N + j] = acc;
    }
    std::memcpy(d.x, out, sizeof out);
}
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t) {
    for (int i = 0; i < M; ++i) for (int j = 0; j < N; ++j) p[(size_t)i * ldm + j] = f.x[i * N + j];
}
}}  // namespace nvcuda::wmma
