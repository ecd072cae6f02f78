// Host emulation of the wegeft kernels (kernels/lowrank.cu, kernels/merge.cu), for machines
// without a GPU: each block runs as 256 fibers (fiber_block.h) meeting at a block barrier for
// __syncthreads, blocks one after another (so `static` stands in for __shared__). Every
// product kernel is checked, in the configurations the launchers use (src/cuda/layer.rs), with
// odd sizes, split-K and its reduction, alpha/beta/bias and the dropout mask, against a
// double-precision loop and a host mirror of the mask; outputs start as NaN and the padding
// between rows must stay untouched. Built and run by tests/kernel_emulation.rs:
//   g++ -std=c++20 -O1 -I .cuda/home/include -I kernels tests/emulation/kernels_on_host.cpp
#include <vector>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "host_shim.h"
#include "wmma_host.h"
#include "lowrank.cu"
#include "merge.cu"
#include "multi.cu"

template <typename F>
void launch(dim3e grid, F f) {
    fb::run_grid(grid, 256, f);
}

uint64_t rs = 12345;
double rnd() { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return (double)(rs >> 11) / (1ull << 53) * 2 - 1; }

// Host mirror of the mask (as in layer.rs).
uint32_t hmask(uint64_t seed, uint32_t row, uint32_t col) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * ((((uint64_t)row << 32) | col) + 1ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull; z = (z ^ (z >> 27)) * 0x94D049BB133111EBull; z ^= z >> 31;
    return (uint32_t)(z >> 32);
}

int fails = 0;
template <typename TA, typename TB, typename TD>
void test(const char* name, void (*k)(const TA*, long long, const TB*, long long, TD*, long long, const TD*, int, int, int, float, float, float, unsigned long long, float*, int),
          void (*red)(const float*, int, int, int, TD*, long long, const TD*, float, float),
          bool ta, bool tb, bool mask, int M, int N, int K, int ksplit, float alpha, float beta, bool bias, float p) {
    long long lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 1, ldd = N + 2;
    long long arows = ta ? K : M, brows = tb ? N : K;
    std::vector<TA> A(arows * lda); std::vector<TB> B(brows * ldb); std::vector<TD> D(M * ldd), bv(N);
    std::vector<double> Ah(A.size()), Bh(B.size()), D0(D.size()), bh(N);
    for (size_t i = 0; i < A.size(); ++i) { A[i] = wegeft::from_f32<TA>((float)rnd()); Ah[i] = wegeft::to_f32(A[i]); }
    for (size_t i = 0; i < B.size(); ++i) { B[i] = wegeft::from_f32<TB>((float)rnd()); Bh[i] = wegeft::to_f32(B[i]); }
    for (size_t i = 0; i < D.size(); ++i) { D[i] = wegeft::from_f32<TD>(beta != 0 ? (float)rnd() : NAN); D0[i] = wegeft::to_f32(D[i]); }
    for (int i = 0; i < N; ++i) { bv[i] = wegeft::from_f32<TD>((float)rnd()); bh[i] = wegeft::to_f32(bv[i]); }
    uint64_t seed = 777;
    uint32_t thresh = (uint32_t)ceil((double)p * 4294967296.0);
    std::vector<float> work((size_t)ksplit * M * N);
    dim3e grid{(unsigned)((M + 63) / 64), (unsigned)((N + 63) / 64), (unsigned)ksplit};
    const TD* bp = bias ? bv.data() : nullptr;
    launch(grid, [&] { k(A.data(), lda, B.data(), ldb, D.data(), ldd, bp, M, N, K, alpha, beta, p, seed, work.data(), ksplit); });
    if (ksplit > 1) {
        long long total = (long long)M * N;
        for (long long b0 = 0; b0 < (total + 255) / 256; ++b0) {
            // The reduce kernel has no __syncthreads: run its threads serially.
            for (unsigned t = 0; t < 256; ++t) { threadIdx = {t, 0, 0}; blockIdx = {(unsigned)b0, 0, 0};
                red(work.data(), ksplit, M, N, D.data(), ldd, bp, alpha, beta); }
        }
    }
    double worst = 0, scale = 1e-30;
    std::vector<double> want(M * N);
    for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) {
        double acc = 0;
        for (int kk = 0; kk < K; ++kk) {
            double a = ta ? Ah[(size_t)kk * lda + m] : Ah[(size_t)m * lda + kk];
            if (mask && p > 0) { uint32_t r = ta ? kk : m, c = ta ? m : kk; a *= hmask(seed, r, c) >= thresh ? 1.0 / (1.0 - p) : 0.0; }
            double b = tb ? Bh[(size_t)n * ldb + kk] : Bh[(size_t)kk * ldb + n];
            acc += a * b;
        }
        double w = alpha * acc + (beta != 0 ? beta * D0[(size_t)m * ldd + n] : 0) + (bias ? bh[n] : 0);
        want[m * N + n] = w; scale = std::max(scale, fabs(w));
    }
    for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) {
        double g = wegeft::to_f32(D[(size_t)m * ldd + n]);
        double e = fabs(g - want[m * N + n]) / scale;
        if (std::isnan(e)) e = INFINITY;  // an unwritten output
        if (e > worst) worst = e;
    }
    // Padding between rows must be untouched.
    bool pad_ok = true;
    for (int m = 0; m < M; ++m) for (int n = N; n < ldd; ++n) {
        double g = wegeft::to_f32(D[(size_t)m * ldd + n]), w0 = D0[(size_t)m * ldd + n];
        if (!(g == w0 || (std::isnan(g) && std::isnan(w0)))) pad_ok = false;
    }
    double tol = sizeof(TD) == 4 ? 1e-5 : 1e-2;
    bool ok = worst <= tol && pad_ok;
    if (!ok) fails++;
    printf("%-22s M=%3d N=%3d K=%4d split=%d beta=%g bias=%d p=%.2f  worst %.2e pad %s  %s\n", name, M, N, K, ksplit, beta, bias, p, worst, pad_ok ? "ok" : "WRITTEN", ok ? "ok" : "FAIL");
}

// multi_edit (kernels/multi.cu): h_t = x_t + s_a (x_t psi_a^T) phi_a^T per token, a = idx[t]
// (a < 0: h_t = x_t), one block per token; strided x and h, padding untouched.
template <typename T>
void test_multi(const char* name, void (*k)(const T*, long long, const int*, const T*, const T*, const float*, int, int, T*, long long),
                int tokens, int d_in, int r, int A) {
    long long ldx = d_in + 3, ldh = d_in + 1;
    std::vector<T> x(tokens * ldx), phi((size_t)A * d_in * r), psi((size_t)A * r * d_in), h(tokens * ldh);
    std::vector<double> xh(x.size()), phih(phi.size()), psih(psi.size());
    std::vector<float> sc(A);
    std::vector<int> idx(tokens);
    for (size_t i = 0; i < x.size(); ++i) { x[i] = wegeft::from_f32<T>((float)rnd()); xh[i] = wegeft::to_f32(x[i]); }
    for (size_t i = 0; i < phi.size(); ++i) { phi[i] = wegeft::from_f32<T>((float)(0.2 * rnd())); phih[i] = wegeft::to_f32(phi[i]); }
    for (size_t i = 0; i < psi.size(); ++i) { psi[i] = wegeft::from_f32<T>((float)(0.2 * rnd())); psih[i] = wegeft::to_f32(psi[i]); }
    for (int a = 0; a < A; ++a) sc[a] = a % 2 ? 2.0f : -0.5f;
    for (int t = 0; t < tokens; ++t) idx[t] = (t * 7 + 3) % (A + 1) - 1;
    for (auto& v : h) v = wegeft::from_f32<T>(NAN);
    launch(dim3e{(unsigned)tokens, 1, 1}, [&] { k(x.data(), ldx, idx.data(), phi.data(), psi.data(), sc.data(), d_in, r, h.data(), ldh); });
    double worst = 0; bool pad_ok = true;
    for (int t = 0; t < tokens; ++t) {
        int a = idx[t];
        std::vector<double> u(r, 0.0);
        if (a >= 0) for (int j = 0; j < r; ++j) for (int kk = 0; kk < d_in; ++kk)
            u[j] += xh[t * ldx + kk] * psih[((size_t)a * r + j) * d_in + kk];
        for (int kk = 0; kk < d_in; ++kk) {
            double want = xh[t * ldx + kk];
            if (a >= 0) { double acc = 0; for (int j = 0; j < r; ++j) acc += u[j] * phih[((size_t)a * d_in + kk) * r + j]; want += sc[a] * acc; }
            double g = wegeft::to_f32(h[t * ldh + kk]);
            double e = fabs(g - want) / std::max(1.0, fabs(want));
            if (std::isnan(e)) e = INFINITY;  // an unwritten output
        if (e > worst) worst = e;
        }
        for (long long kk = d_in; kk < ldh && t + 1 < tokens; ++kk) if (!std::isnan(wegeft::to_f32(h[t * ldh + kk]))) pad_ok = false;
    }
    double tol = sizeof(T) == 4 ? 1e-5 : 1e-2;
    bool ok = worst <= tol && pad_ok;
    if (!ok) fails++;
    printf("%-22s T=%3d d_in=%4d r=%3d A=%d  worst %.2e pad %s  %s\n", name, tokens, d_in, r, A, worst, pad_ok ? "ok" : "WRITTEN", ok ? "ok" : "FAIL");
}

int main() {
    // The product kernels, in the configurations the launchers use (see layer.rs).
    test("lowrank_u_f32", lowrank_u_f32, splitk_reduce_f32, false, true, false, 70, 37, 300, 1, 1.f, 0.f, false, 0.f);
    test("lowrank_u_f32", lowrank_u_f32, splitk_reduce_f32, false, true, false, 70, 37, 300, 3, 0.5f, 0.f, false, 0.f);
    test("lowrank_u_bf16", lowrank_u_bf16, splitk_reduce_bf16, false, true, false, 65, 8, 520, 3, 1.f, 0.f, false, 0.f);
    test("wegeft_c_f32", wegeft_c_f32, splitk_reduce_f32, false, false, true, 71, 9, 200, 2, 0.75f, 0.f, false, 0.3f);
    test("wegeft_c_f16", wegeft_c_f16, splitk_reduce_f16, false, false, true, 71, 1, 83, 1, 0.75f, 0.f, false, 0.f);
    test("lowrank_v_bf16", lowrank_v_bf16, splitk_reduce_bf16, false, false, false, 37, 64, 71, 1, 1.f, 0.f, false, 0.f);
    test("lowrank_s_f32", lowrank_s_f32, splitk_reduce_f32, true, false, false, 71, 8, 600, 3, 1.f, 0.f, false, 0.f);
    test("lowrank_s_bf16(lora)", lowrank_s_bf16, splitk_reduce_f32, true, false, false, 71, 8, 600, 1, 1.f, 1.f, false, 0.f);
    test("lowrank_dpsi_f32", lowrank_dpsi_f32, splitk_reduce_f32, true, false, false, 8, 83, 600, 3, 1.f, 1.f, false, 0.f);
    test("lowrank_dphi_f32", lowrank_dphi_f32, splitk_reduce_f32, true, false, true, 83, 8, 300, 2, 0.75f, 1.f, false, 0.25f);
    test("lowrank_dphi_bf16", lowrank_dphi_bf16, splitk_reduce_f32, true, false, true, 83, 65, 71, 1, 0.75f, 1.f, false, 0.f);
    test("lowrank_addmm_nt_f32", lowrank_addmm_nt_f32, splitk_reduce_f32, false, true, false, 37, 71, 8, 1, 1.f, 1.f, true, 0.f);
    test("lowrank_addmm_nn_bf16", lowrank_addmm_nn_bf16, splitk_reduce_bf16, false, false, false, 37, 83, 65, 1, 1.f, 1.f, false, 0.f);
    test("merge_f32", merge_f32, splitk_reduce_f32, false, false, false, 71, 83, 8, 1, 1.f, 1.f, false, 0.f);
    test("unmerge_wphi_f32", unmerge_wphi_f32, splitk_reduce_f32, false, false, false, 71, 8, 300, 2, 1.f, 0.f, false, 0.f);
    test("unmerge_psiphi_bf16", unmerge_psiphi_bf16, splitk_reduce_f32, false, false, false, 8, 8, 300, 2, 1.f, 0.f, false, 0.f);
    // Tensor-core (TF32 WMMA) path of the 16-bit kernels: several tiles, every warp, tails.
    test("lowrank_u_bf16(tc)", lowrank_u_bf16, splitk_reduce_bf16, false, true, false, 130, 70, 45, 1, 1.f, 0.f, false, 0.f);
    test("wegeft_c_bf16(tc)", wegeft_c_bf16, splitk_reduce_bf16, false, false, true, 130, 70, 300, 2, 0.5f, 0.f, false, 0.2f);
    test("lowrank_s_f16(tc)", lowrank_s_f16, splitk_reduce_f32, true, false, false, 130, 70, 300, 3, 1.f, 0.f, false, 0.f);
    test("lowrank_dphi_bf16(tc)", lowrank_dphi_bf16, splitk_reduce_f32, true, false, true, 130, 70, 200, 2, 0.75f, 1.f, false, 0.3f);
    test("lowrank_addmm_nt_f16(tc)", lowrank_addmm_nt_f16, splitk_reduce_f16, false, true, false, 130, 70, 24, 1, 1.f, 1.f, true, 0.f);
    test("merge_bf16(tc)", merge_bf16, splitk_reduce_bf16, false, false, false, 130, 70, 9, 1, 1.f, 1.f, false, 0.f);
    test("unmerge_f16", unmerge_f16, splitk_reduce_f16, false, false, false, 71, 83, 8, 1, -1.f, 1.f, false, 0.f);
    // The multi-adapter input edit: ranks below, at and above one chunk of 8, up to 64.
    test_multi<float>("multi_edit_f32", multi_edit_f32, 9, 300, 9, 3);
    test_multi<bf16>("multi_edit_bf16", multi_edit_bf16, 7, 577, 8, 4);
    test_multi<f16>("multi_edit_f16", multi_edit_f16, 5, 70, 1, 2);
    test_multi<float>("multi_edit_f32(r64)", multi_edit_f32, 4, 520, 64, 5);
    // The device hash (common.cuh) for the Rust mirror to compare against.
    const uint64_t seeds[3] = {0, 42, 0xDEADBEEFull};
    for (uint64_t s : seeds)
        for (uint32_t r = 0; r < 1000; r += 333)
            for (uint32_t c = 0; c < 70000; c += 23333) printf("hash %llu %u %u %u\n", (unsigned long long)s, r, c, wegeft::mask_hash(s, r, c));
    printf("%d failures\n", fails);
    return fails != 0;
}
