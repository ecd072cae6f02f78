// Host emulation of kernels/attention.cu, for machines without a GPU. Each block runs as 128
// fibers (fiber_block.h; blocks one after another, so `static` stands in for __shared__); the
// warp primitives the kernels use (shfl_xor, ldmatrix .x4 / .x4.trans, mma.m16n8k16 bf16,
// cp.async) are emulated with their PTX semantics through a per-warp exchange area and a
// 32-thread barrier, so the tensor-core kernel's fragment index math (swizzle, ldmatrix lane addresses,
// accumulator -> A-fragment re-packing of P, quad reductions) really runs. Every kernel is
// checked against a double-precision loop on small shapes: S not a multiple of any tile, S = 1,
// GQA, several head dims; outputs start as NaN. Built and run by tests/kernel_emulation.rs:
//   g++ -std=c++20 -O1 -I .cuda/home/include -I kernels tests/emulation/attention_on_host.cpp
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>
#include <cuda_bf16.h>

#include "host_shim.h"

constexpr int NT = 128;
struct WarpX {
    const void* ptr[32];
    uint32_t a[32][4];
    uint32_t b[32][2];
    float f[32];
};
WarpX g_x[NT / 32];

namespace wegeft_attn {
inline int lane_id() { return threadIdx.x % 32; }
inline WarpX& wx() { return g_x[threadIdx.x / 32]; }
inline void wsync() { fb::sync_warp(); }
inline void block_sync() { fb::sync_block(); }
inline float shfl_xor(float v, int m) {
    wx().f[lane_id()] = v;
    wsync();
    float r = wx().f[lane_id() ^ m];
    wsync();
    return r;
}
struct PendCopy { void* dst; unsigned char data[16]; int bytes; };
// Each thread's committed cp.async groups (oldest first) and the copies issued since.
std::vector<std::vector<std::vector<PendCopy>>> g_groups(NT);
std::vector<std::vector<PendCopy>> g_cur(NT);
#define t_groups g_groups[threadIdx.x]
#define t_cur g_cur[threadIdx.x]
inline void land(const PendCopy& c) { std::memset(c.dst, 0, 16); if (c.bytes > 0) std::memcpy(c.dst, c.data, c.bytes); }
inline void cp_async_16(void* dst, const void* src, int bytes) {
    if (((uintptr_t)dst & 15) || (bytes > 0 && ((uintptr_t)src & 15))) { std::printf("MISALIGNED cp.async dst %p src %p\n", dst, src); std::abort(); }
    PendCopy c; c.dst = dst; c.bytes = bytes;
    if (bytes > 0) std::memcpy(c.data, src, bytes);
    std::memset(dst, 0xFF, 16);  // poison: in flight, contents undefined until waited
    t_cur.push_back(c);
}
inline void cp_async_commit() { t_groups.push_back(t_cur); t_cur.clear(); }
inline void cp_async_wait_all() { cp_async_commit(); for (auto& g : t_groups) for (auto& c : g) land(c); t_groups.clear(); }
template <int N> inline void cp_async_wait() {
    while ((int)t_groups.size() > N) { for (auto& c : t_groups.front()) land(c); t_groups.erase(t_groups.begin()); }
}
std::atomic<int> g_leftover{0};
// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives row l/4,
// elements 2(l%4), 2(l%4)+1 of each matrix (.trans: column l/4, rows 2(l%4), 2(l%4)+1).
inline void ldsm_x4(uint32_t (&r)[4], const void* p) {
    const int l = lane_id();
    if ((uintptr_t)p & 15) { std::printf("MISALIGNED ldmatrix\n"); std::abort(); }
    wx().ptr[l] = p;
    wsync();
    for (int i = 0; i < 4; ++i) {
        const uint16_t* row = (const uint16_t*)wx().ptr[8 * i + l / 4];
        r[i] = (uint32_t)row[2 * (l % 4)] | ((uint32_t)row[2 * (l % 4) + 1] << 16);
    }
    wsync();
}
inline void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
    const int l = lane_id();
    if ((uintptr_t)p & 15) { std::printf("MISALIGNED ldmatrix.trans\n"); std::abort(); }
    wx().ptr[l] = p;
    wsync();
    for (int i = 0; i < 4; ++i) {
        const uint16_t* r0 = (const uint16_t*)wx().ptr[8 * i + 2 * (l % 4)];
        const uint16_t* r1 = (const uint16_t*)wx().ptr[8 * i + 2 * (l % 4) + 1];
        r[i] = (uint32_t)r0[l / 4] | ((uint32_t)r1[l / 4] << 16);
    }
    wsync();
}
inline float bf_lo(uint32_t x) { uint32_t u = x << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float bf_hi(uint32_t x) { uint32_t u = x & 0xffff0000u; float f; std::memcpy(&f, &u, 4); return f; }
// mma.m16n8k16.row.col: lane L (g = L/4, t = L%4) holds A[g][2t..], A[g+8][2t..], A[g][2t+8..],
// A[g+8][2t+8..] (a0..a3), B[2t..2t+1][g] (b0), B[2t+8..2t+9][g] (b1) and D[g][2t..2t+1],
// D[g+8][2t..2t+1].
inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const int l = lane_id();
    for (int i = 0; i < 4; ++i) wx().a[l][i] = a[i];
    wx().b[l][0] = b0;
    wx().b[l][1] = b1;
    wsync();
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L) {
        const int g = L / 4, t = L % 4;
        const uint32_t* x = wx().a[L];
        A[g][2 * t] = bf_lo(x[0]); A[g][2 * t + 1] = bf_hi(x[0]);
        A[g + 8][2 * t] = bf_lo(x[1]); A[g + 8][2 * t + 1] = bf_hi(x[1]);
        A[g][2 * t + 8] = bf_lo(x[2]); A[g][2 * t + 9] = bf_hi(x[2]);
        A[g + 8][2 * t + 8] = bf_lo(x[3]); A[g + 8][2 * t + 9] = bf_hi(x[3]);
        B[2 * t][g] = bf_lo(wx().b[L][0]); B[2 * t + 1][g] = bf_hi(wx().b[L][0]);
        B[2 * t + 8][g] = bf_lo(wx().b[L][1]); B[2 * t + 9][g] = bf_hi(wx().b[L][1]);
    }
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        float acc = d[e];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        d[e] = acc;
    }
    wsync();
}
}  // namespace wegeft_attn

#include "attention.cu"

// ---- launching ---------------------------------------------------------------------------

void launch(dim3e grid, const std::function<void()>& kernel) {
    fb::run_grid(grid, NT, [&] {
        kernel();
        if (!wegeft_attn::t_groups.empty() || !wegeft_attn::t_cur.empty()) {
            std::printf("cp.async left in flight at block exit\n");
            ++wegeft_attn::g_leftover;
            wegeft_attn::t_groups.clear();
            wegeft_attn::t_cur.clear();
        }
    });
}

// ---- reference (double) ------------------------------------------------------------------

// win: a sliding window (query i sees keys i - win < j <= i); 0 for none.
struct Shape { int B, S, H, KVH, hd, win = 0; };

struct Ref {
    std::vector<double> out, lse, dq, dk, dv;
};

// Causal GQA attention forward and backward in double, from inputs as the device sees them.
Ref reference(const Shape& s, const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
              const std::vector<float>& dout) {
    const int qw = s.H * s.hd, kw = s.KVH * s.hd, grp = s.H / s.KVH;
    const double scale = 1.0 / std::sqrt((double)s.hd);
    const size_t n = (size_t)s.B * s.S;
    Ref r;
    r.out.assign(n * qw, 0);
    r.lse.assign(n * s.H, 0);
    r.dq.assign(n * qw, 0);
    r.dk.assign(n * kw, 0);
    r.dv.assign(n * kw, 0);
    std::vector<double> p(s.S), dp(s.S);
    for (int b = 0; b < s.B; ++b)
        for (int h = 0; h < s.H; ++h) {
            const int g = h / grp;
            for (int i = 0; i < s.S; ++i) {
                const size_t ti = (size_t)b * s.S + i;
                const int j0 = s.win > 0 ? std::max(0, i - s.win + 1) : 0;
                double m = -INFINITY;
                for (int j = j0; j <= i; ++j) {
                    const size_t tj = (size_t)b * s.S + j;
                    double x = 0;
                    for (int d = 0; d < s.hd; ++d) x += (double)q[ti * qw + h * s.hd + d] * k[tj * kw + g * s.hd + d];
                    p[j] = x * scale;
                    m = std::max(m, p[j]);
                }
                double l = 0;
                for (int j = j0; j <= i; ++j) l += std::exp(p[j] - m);
                const double lse = m + std::log(l);
                r.lse[ti * s.H + h] = lse;
                for (int j = j0; j <= i; ++j) p[j] = std::exp(p[j] - lse);
                double D = 0;
                for (int d = 0; d < s.hd; ++d) {
                    double o = 0;
                    for (int j = j0; j <= i; ++j) o += p[j] * v[((size_t)b * s.S + j) * kw + g * s.hd + d];
                    r.out[ti * qw + h * s.hd + d] = o;
                    D += o * dout[ti * qw + h * s.hd + d];
                }
                for (int j = j0; j <= i; ++j) {
                    const size_t tj = (size_t)b * s.S + j;
                    double x = 0;
                    for (int d = 0; d < s.hd; ++d) x += (double)dout[ti * qw + h * s.hd + d] * v[tj * kw + g * s.hd + d];
                    const double ds = p[j] * (x - D);
                    for (int d = 0; d < s.hd; ++d) {
                        r.dq[ti * qw + h * s.hd + d] += scale * ds * k[tj * kw + g * s.hd + d];
                        r.dk[tj * kw + g * s.hd + d] += scale * ds * q[ti * qw + h * s.hd + d];
                        r.dv[tj * kw + g * s.hd + d] += p[j] * dout[ti * qw + h * s.hd + d];
                    }
                }
            }
        }
    return r;
}

// ---- checks ------------------------------------------------------------------------------

int g_failures = 0, g_checks = 0;

template <typename T> float tof(T x) { return (float)x; }
template <> float tof<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> T fromf(float x) { return (T)x; }
template <> __nv_bfloat16 fromf<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

template <typename T>
void check(const char* what, const char* name, const std::vector<T>& got, const std::vector<double>& want, double tol) {
    ++g_checks;
    double worst = 0, scale = 0;
    size_t at = 0;
    for (double w : want) scale = std::max(scale, std::fabs(w));
    for (size_t i = 0; i < want.size(); ++i) {
        const double g = tof(got[i]);
        const double e = std::isfinite(g) ? std::fabs(g - want[i]) : INFINITY;
        if (!(e <= worst)) { worst = e; at = i; }
    }
    // Relative to the largest reference value (at least 0.1: S = 1 gives dq = dk = 0 exactly).
    const double rel = worst / std::max(scale, 0.1);
    const bool ok = rel <= tol;
    if (!ok) ++g_failures;
    std::printf("%-4s %-40s %-4s max|err|/max|ref| = %.2e (tol %.0e) at %zu: got %g want %g\n", ok ? "ok" : "FAIL", what, name,
                rel, tol, at, (double)tof(got[at]), want[at]);
}

template <typename T>
std::vector<T> rnd(std::mt19937& rng, size_t n, float amp, std::vector<float>& seen) {
    std::uniform_real_distribution<float> u(-amp, amp);
    std::vector<T> x(n);
    seen.resize(n);
    for (size_t i = 0; i < n; ++i) {
        x[i] = fromf<T>(u(rng));
        seen[i] = tof(x[i]);
    }
    return x;
}

template <typename T> std::vector<T> nans(size_t n) { return std::vector<T>(n, fromf<T>(NAN)); }

template <typename T>
void run_case(const Shape& s, bool mma, double tol, std::mt19937& rng) {
    const size_t n = (size_t)s.B * s.S, qn = n * s.H * s.hd, kn = n * s.KVH * s.hd;
    std::vector<float> qf, kf, vf, gf;
    auto q = rnd<T>(rng, qn, 1.5f, qf);
    auto k = rnd<T>(rng, kn, 1.5f, kf);
    auto v = rnd<T>(rng, kn, 1.0f, vf);
    auto dout = rnd<T>(rng, qn, 1.0f, gf);
    Ref ref = reference(s, qf, kf, vf, gf);
    char what[160];
    std::snprintf(what, sizeof what, "%s B%d S%d H%d KVH%d hd%d win%d %s", sizeof(T) == 4 ? "f32" : "bf16", s.B, s.S, s.H,
                  s.KVH, s.hd, s.win, mma ? "mma" : "plain");
    auto out = nans<T>(qn);
    std::vector<float> lse(n * s.H, NAN);
    const float scale = 1.0f / std::sqrt((float)s.hd);
    const int W = s.hd <= 64 ? 64 : 128, rows = NT / (W / 16);
    const int win = s.win > 0 ? std::min(s.win, s.S) : s.S;  // the kernels' argument
    if (mma) {
        const float sl2 = 1.4426950408889634f * scale;
        dim3e grid{(unsigned)((s.S + 63) / 64), (unsigned)(s.B * s.H), 1};
        auto* qb = (const __nv_bfloat16*)q.data();
        auto* kb = (const __nv_bfloat16*)k.data();
        auto* vb = (const __nv_bfloat16*)v.data();
        auto* ob = (__nv_bfloat16*)out.data();
        if (s.hd == 64) launch(grid, [&] { attn_fwd_mma64_bf16(qb, kb, vb, ob, lse.data(), s.S, s.H, s.KVH, win, sl2); });
        else launch(grid, [&] { attn_fwd_mma128_bf16(qb, kb, vb, ob, lse.data(), s.S, s.H, s.KVH, win, sl2); });
    } else {
        dim3e grid{(unsigned)((s.S + rows - 1) / rows), (unsigned)(s.B * s.H), 1};
        launch(grid, [&] {
            if constexpr (sizeof(T) == 4) {
                if (W == 64) attn_fwd64_f32(q.data(), k.data(), v.data(), out.data(), lse.data(), s.S, s.H, s.KVH, s.hd, win, scale);
                else attn_fwd128_f32(q.data(), k.data(), v.data(), out.data(), lse.data(), s.S, s.H, s.KVH, s.hd, win, scale);
            } else {
                if (W == 64) attn_fwd64_bf16(q.data(), k.data(), v.data(), out.data(), lse.data(), s.S, s.H, s.KVH, s.hd, win, scale);
                else attn_fwd128_bf16(q.data(), k.data(), v.data(), out.data(), lse.data(), s.S, s.H, s.KVH, s.hd, win, scale);
            }
        });
    }
    check(what, "out", out, ref.out, tol);
    check(what, "lse", lse, ref.lse, sizeof(T) == 4 ? tol : 1e-3);
    if (mma && s.hd != 64) return;  // the tensor-core backward exists for hd = 64 only

    // Backward from the kernel's own out and lse (as the model does).
    std::vector<float> D(n * s.H, NAN);
    auto dq = nans<T>(qn);
    auto dk = nans<T>(kn);
    auto dv = nans<T>(kn);
    const long long rh = (long long)n * s.H;
    launch({(unsigned)((rh + 3) / 4), 1, 1}, [&] {
        if constexpr (sizeof(T) == 4) attn_bwd_pre_f32(out.data(), dout.data(), D.data(), rh, s.hd);
        else attn_bwd_pre_bf16(out.data(), dout.data(), D.data(), rh, s.hd);
    });
    dim3e gq{(unsigned)((s.S + rows - 1) / rows), (unsigned)(s.B * s.H), 1};
    dim3e gk{(unsigned)((s.S + rows - 1) / rows), (unsigned)(s.B * s.KVH), 1};
#define ARGS_DQ q.data(), k.data(), v.data(), lse.data(), D.data(), dout.data(), dq.data(), s.S, s.H, s.KVH, s.hd, win, scale
#define ARGS_DKDV q.data(), k.data(), v.data(), lse.data(), D.data(), dout.data(), dk.data(), dv.data(), s.S, s.H, s.KVH, s.hd, win, scale
    if (mma) {
        // The tensor-core backward: 64-row tiles, grid (ceil(S / 64), B * H) and (.., B * KVH).
        auto* qb = (const __nv_bfloat16*)q.data();
        auto* kb = (const __nv_bfloat16*)k.data();
        auto* vb = (const __nv_bfloat16*)v.data();
        auto* gb = (const __nv_bfloat16*)dout.data();
        const unsigned nt = (unsigned)((s.S + 63) / 64);
        launch({nt, (unsigned)(s.B * s.H), 1}, [&] {
            attn_bwd_dq_mma64_bf16(qb, kb, vb, lse.data(), D.data(), gb, (__nv_bfloat16*)dq.data(), s.S, s.H, s.KVH, win, scale);
        });
        launch({nt, (unsigned)(s.B * s.KVH), 1}, [&] {
            attn_bwd_dkdv_mma64_bf16(qb, kb, vb, lse.data(), D.data(), gb, (__nv_bfloat16*)dk.data(), (__nv_bfloat16*)dv.data(),
                                     s.S, s.H, s.KVH, win, scale);
        });
    } else {
        launch(gq, [&] {
            // A window shorter than S: the sliding-window dq kernel, as src/cuda/attention.rs picks it.
            if (win < s.S) {
                if constexpr (sizeof(T) == 4) { if (W == 64) attn_bwd_dq_sw64_f32(ARGS_DQ); else attn_bwd_dq_sw128_f32(ARGS_DQ); }
                else { if (W == 64) attn_bwd_dq_sw64_bf16(ARGS_DQ); else attn_bwd_dq_sw128_bf16(ARGS_DQ); }
            } else {
                if constexpr (sizeof(T) == 4) { if (W == 64) attn_bwd_dq64_f32(ARGS_DQ); else attn_bwd_dq128_f32(ARGS_DQ); }
                else { if (W == 64) attn_bwd_dq64_bf16(ARGS_DQ); else attn_bwd_dq128_bf16(ARGS_DQ); }
            }
        });
        launch(gk, [&] {
            if constexpr (sizeof(T) == 4) { if (W == 64) attn_bwd_dkdv64_f32(ARGS_DKDV); else attn_bwd_dkdv128_f32(ARGS_DKDV); }
            else { if (W == 64) attn_bwd_dkdv64_bf16(ARGS_DKDV); else attn_bwd_dkdv128_bf16(ARGS_DKDV); }
        });
    }
    check(what, "dq", dq, ref.dq, tol);
    check(what, "dk", dk, ref.dk, tol);
    check(what, "dv", dv, ref.dv, tol);
}

template <typename T>
void run_decode(int B, int H, int KVH, int hd, int cap, int len, double tol, std::mt19937& rng, int win = 0) {
    // The cache as a B x cap sequence; the decode's answer is the forward's row len-1 of the
    // first len positions (the last `win` of them, with a window), with q in place of that
    // row's query. Positions outside that range are poisoned with NaN.
    const int start = win > 0 ? std::max(0, len - win) : 0;
    const int qw = H * hd, kw = KVH * hd;
    std::vector<float> qf, kf, vf;
    auto q = rnd<T>(rng, (size_t)B * qw, 1.5f, qf);
    auto kc = rnd<T>(rng, (size_t)B * cap * kw, 1.5f, kf);
    auto vc = rnd<T>(rng, (size_t)B * cap * kw, 1.0f, vf);
    for (int b = 0; b < B; ++b) for (int j = 0; j < cap; ++j) for (int e = 0; e < kw; ++e) {
        if (j >= start && j < len) continue;
        kc[((size_t)b * cap + j) * kw + e] = fromf<T>(NAN); vc[((size_t)b * cap + j) * kw + e] = fromf<T>(NAN); }
    std::vector<double> want((size_t)B * qw);
    const double scale = 1.0 / std::sqrt((double)hd);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) {
            const int g = h / (H / KVH);
            std::vector<double> p(len);
            double m = -INFINITY, l = 0;
            for (int j = start; j < len; ++j) {
                double x = 0;
                for (int d = 0; d < hd; ++d) x += (double)qf[b * qw + h * hd + d] * kf[((size_t)b * cap + j) * kw + g * hd + d];
                p[j] = x * scale;
                m = std::max(m, p[j]);
            }
            for (int j = start; j < len; ++j) l += (p[j] = std::exp(p[j] - m));
            for (int d = 0; d < hd; ++d) {
                double o = 0;
                for (int j = start; j < len; ++j) o += p[j] / l * vf[((size_t)b * cap + j) * kw + g * hd + d];
                want[b * qw + h * hd + d] = o;
            }
        }
    const int nch = (len - start + 255) / 256;
    std::vector<float> work((size_t)B * H * nch * (hd + 2), NAN);
    auto out = nans<T>((size_t)B * qw);
    const float sc = 1.0f / std::sqrt((float)hd);
    launch({(unsigned)nch, (unsigned)(B * H), 1}, [&] {
        if constexpr (sizeof(T) == 4) attn_decode_split_f32(q.data(), kc.data(), vc.data(), work.data(), H, KVH, hd, cap, start, len, sc);
        else attn_decode_split_bf16(q.data(), kc.data(), vc.data(), work.data(), H, KVH, hd, cap, start, len, sc);
    });
    launch({(unsigned)(B * H), 1, 1}, [&] {
        if constexpr (sizeof(T) == 4) attn_decode_combine_f32(work.data(), out.data(), hd, nch);
        else attn_decode_combine_bf16(work.data(), out.data(), hd, nch);
    });
    char what[160];
    std::snprintf(what, sizeof what, "decode %s B%d H%d KVH%d hd%d cap%d len%d win%d", sizeof(T) == 4 ? "f32" : "bf16", B, H,
                  KVH, hd, cap, len, win);
    check(what, "out", out, want, tol);
}

int main() {
    std::mt19937 rng(1234);
    // plain kernels, f32: tails, S = 1, GQA, head dims below / at / between the two widths
    run_case<float>({2, 37, 2, 1, 16}, false, 2e-5, rng);
    run_case<float>({1, 1, 3, 1, 64}, false, 2e-5, rng);
    run_case<float>({1, 70, 3, 1, 64}, false, 2e-5, rng);
    run_case<float>({1, 45, 1, 1, 80}, false, 2e-5, rng);
    run_case<float>({1, 33, 2, 2, 128}, false, 2e-5, rng);
    // plain kernels, bf16 storage
    run_case<__nv_bfloat16>({1, 21, 4, 1, 32}, false, 2e-2, rng);
    run_case<__nv_bfloat16>({1, 40, 2, 1, 128}, false, 2e-2, rng);
    // tensor-core forward: one partial tile, several tiles with a tail, S = 1, GQA, hd 64 / 128
    run_case<__nv_bfloat16>({2, 50, 4, 2, 64}, true, 2e-2, rng);
    run_case<__nv_bfloat16>({1, 150, 3, 1, 64}, true, 2e-2, rng);
    run_case<__nv_bfloat16>({1, 1, 2, 1, 64}, true, 2e-2, rng);
    run_case<__nv_bfloat16>({1, 100, 4, 2, 128}, true, 2e-2, rng);
    // decode: one chunk, several chunks with a tail, len = 1, len < capacity
    run_decode<float>(2, 4, 2, 64, 300, 300, 2e-5, rng);
    run_decode<float>(1, 3, 1, 80, 600, 513, 2e-5, rng);
    run_decode<float>(2, 2, 2, 16, 8, 1, 2e-5, rng);
    run_decode<__nv_bfloat16>(2, 4, 1, 128, 400, 257, 2e-2, rng);
    // Tile boundaries (S = 64, 65, 128, 191), SmolLM2's heads (9 / 3), hd 128 over several
    // tiles, plain hd 100; decode with the cache past `len` poisoned with NaN.
    run_case<__nv_bfloat16>({1, 64, 2, 1, 64}, true, 2e-2, rng);
    run_case<__nv_bfloat16>({1, 128, 2, 2, 64}, true, 2e-2, rng);
    run_case<__nv_bfloat16>({2, 65, 9, 3, 64}, true, 2e-2, rng);
    run_case<__nv_bfloat16>({1, 191, 2, 1, 64}, true, 2e-2, rng);
    run_case<__nv_bfloat16>({1, 200, 2, 1, 128}, true, 2e-2, rng);
    run_case<__nv_bfloat16>({1, 129, 4, 2, 128}, false, 2e-2, rng);
    run_case<float>({2, 65, 9, 3, 64}, false, 2e-5, rng);
    run_case<float>({1, 97, 2, 1, 100}, false, 2e-5, rng);
    run_decode<float>(2, 9, 3, 64, 700, 512, 2e-5, rng);
    run_decode<float>(1, 2, 1, 128, 256, 256, 2e-5, rng);
    run_decode<__nv_bfloat16>(1, 2, 2, 64, 1000, 769, 2e-2, rng);
    // Sliding windows: shorter than a tile (rows whose first key tiles are all masked), one
    // key, across tile boundaries, longer than the sequence; the plain kernels with windows
    // shorter than a row block and a key tile; decode over the last `win` positions only
    // (the rest of the cache poisoned), across a chunk boundary.
    run_case<__nv_bfloat16>({1, 150, 3, 1, 64, 5}, true, 2e-2, rng);
    run_case<__nv_bfloat16>({2, 65, 9, 3, 64, 1}, true, 2e-2, rng);
    run_case<__nv_bfloat16>({1, 200, 2, 1, 64, 70}, true, 2e-2, rng);
    run_case<__nv_bfloat16>({1, 191, 4, 2, 128, 64}, true, 2e-2, rng);
    run_case<__nv_bfloat16>({1, 50, 2, 1, 64, 400}, true, 2e-2, rng);
    run_case<float>({2, 70, 4, 2, 64, 3}, false, 2e-5, rng);
    run_case<float>({1, 97, 2, 1, 100, 40}, false, 2e-5, rng);
    run_case<float>({1, 45, 3, 1, 16, 1}, false, 2e-5, rng);
    run_case<__nv_bfloat16>({1, 129, 4, 2, 128, 33}, false, 2e-2, rng);
    run_decode<float>(2, 4, 2, 64, 700, 600, 2e-5, rng, 300);
    run_decode<float>(1, 3, 1, 80, 64, 20, 2e-5, rng, 1);
    run_decode<__nv_bfloat16>(1, 2, 2, 64, 100, 50, 2e-2, rng, 64);
    std::printf("blocks that exited with cp.async in flight: %d\n", wegeft_attn::g_leftover.load());
    std::printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 && wegeft_attn::g_leftover == 0 ? 0 : 1;
}
