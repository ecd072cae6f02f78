// Host emulation of the model kernels of the CUDA backend (src/cuda/backend.rs):
// kernels/{elementwise,embedding,rmsnorm,rope,swiglu,adamw,xent}.cu compiled by g++ against a
// small shim (attention has its own, tests/emulation/attention_on_host.cpp): each block runs as blockDim
// fibers (fiber_block.h) meeting at a block barrier for __syncthreads, warps of 32 at their own
// barrier for __shfl_xor_sync, blocks one after another (so `static` stands in for __shared__).
// The program generates the inputs (a fixed xorshift stream), runs every kernel the way the
// Rust launchers do (grid-stride kernels on a deliberately small grid, so the stride loops
// run), and writes inputs and outputs as raw little-endian arrays into the directory argv[1];
// tests/kernel_emulation.rs reads them and compares against the CPU backend's ops.
//   g++ -std=c++20 -O1 -I .cuda/home/include -I kernels tests/emulation/model_kernels_on_host.cpp
#include <vector>
#include <memory>
#include <string>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "host_shim.h"
float g_shfl[32][32];
inline float __shfl_xor_sync(unsigned, float v, int o) {
    unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
    g_shfl[w][lane] = v;
    fb::sync_warp();
    float r = g_shfl[w][lane ^ (unsigned)o];
    fb::sync_warp();
    return r;
}
#define __fmul_rn(a, b) ((float)(a) * (float)(b))
#define __fadd_rn(a, b) ((float)(a) + (float)(b))
#define __fsub_rn(a, b) ((float)(a) - (float)(b))
#define __fdiv_rn(a, b) ((float)(a) / (float)(b))
#define __fsqrt_rn(a) sqrtf(a)
// common.cuh's tiled product (not used here) names nvcuda::wmma.
#include "wmma_host.h"
#include "elementwise.cu"
#include "embedding.cu"
#include "rmsnorm.cu"
#include "rope.cu"
#include "swiglu.cu"
#include "adamw.cu"
#include "xent.cu"

template <typename F>
void launch(unsigned grid, unsigned block, F f) {
    fb::run_grid({grid, 1, 1}, (int)block, f);
}

uint64_t rs = 12345;
float rnd(float scale = 1.0f) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return (float)((double)(rs >> 11) / (1ull << 53) * 2 - 1) * scale; }
std::vector<float> rv(size_t n, float scale = 1.0f, float mu = 0.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = mu + rnd(scale);
    return v;
}
std::vector<__nv_bfloat16> to_bf(const std::vector<float>& v) {
    std::vector<__nv_bfloat16> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = __float2bfloat16_rn(v[i]);
    return o;
}
std::vector<float> from_bf(const std::vector<__nv_bfloat16>& v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = __bfloat162float(v[i]);
    return o;
}

std::string dir;
template <typename T>
void dump(const char* name, const std::vector<T>& v) {
    std::string p = dir + "/" + name;
    FILE* f = fopen(p.c_str(), "wb");
    if (!f || fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) { fprintf(stderr, "cannot write %s\n", p.c_str()); exit(2); }
    fclose(f);
}

std::vector<float> widen(const std::vector<__nv_bfloat16>& v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = __bfloat162float(v[i]);
    return out;
}

int main(int argc, char** argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s OUTDIR\n", argv[0]); return 2; }
    dir = argv[1];
    // ---- rmsnorm: rows 5, dim 300, eps 1e-5 ----
    {
        const int rows = 5, dim = 300;
        auto x = rv(rows * dim, 3.0f), w = rv(dim, 0.3f, 1.0f), dy = rv(rows * dim), dx = rv(rows * dim);
        std::vector<float> y(rows * dim, NAN), rstd(rows, NAN);
        dump("rms_x", x); dump("rms_w", w); dump("rms_dy", dy); dump("rms_dx0", dx);
        launch(rows, 256, [&] { rmsnorm_fwd_f32(x.data(), w.data(), y.data(), rstd.data(), dim, 1e-5f); });
        launch(rows, 256, [&] { rmsnorm_bwd_f32(x.data(), w.data(), rstd.data(), dy.data(), dx.data(), dim); });
        dump("rms_y", y); dump("rms_rstd", rstd); dump("rms_dx", dx);
        // y stored in bf16 (an operand of bf16 products), widened for the comparison.
        std::vector<__nv_bfloat16> yb(rows * dim, __float2bfloat16_rn(NAN));
        std::vector<float> rstd2(rows, NAN);
        launch(rows, 256, [&] { rmsnorm_fwd_f32_bf16(x.data(), w.data(), yb.data(), rstd2.data(), dim, 1e-5f); });
        dump("rms_y_bf16", widen(yb)); dump("rms_rstd_bf16", rstd2);
    }
    // ---- rope: rows 6, heads 3, hd 16, theta 10000, positions below; tables as RopeCache ----
    {
        const int rows = 6, heads = 3, hd = 16, half = hd / 2, maxp = 32;
        std::vector<unsigned> pos = {0, 5, 3, 17, 2, 9};
        std::vector<float> cs(maxp * half), sn(maxp * half);
        for (int p = 0; p < maxp; ++p)
            for (int i = 0; i < half; ++i) {
                float inv = 1.0f / powf(10000.0f, (float)(2 * i) / (float)hd);
                float a = (float)p * inv;
                cs[p * half + i] = cosf(a);
                sn[p * half + i] = sinf(a);
            }
        auto x = rv(rows * heads * hd, 2.0f);
        dump("rope_x", x);
        for (int inv = 0; inv < 2; ++inv) {
            auto y = x;
            launch(2, 256, [&] { rope_f32(y.data(), pos.data(), cs.data(), sn.data(), rows, heads, hd, inv); });
            dump(inv ? "rope_inv" : "rope_fwd", y);
            // bf16 rows in place: the rounded inputs, each result rounded once.
            std::vector<__nv_bfloat16> yb(x.size());
            for (size_t i = 0; i < x.size(); ++i) yb[i] = __float2bfloat16_rn(x[i]);
            launch(2, 256, [&] { rope_bf16(yb.data(), pos.data(), cs.data(), sn.data(), rows, heads, hd, inv); });
            dump(inv ? "rope_inv_bf16" : "rope_fwd_bf16", widen(yb));
        }
    }
    // ---- swiglu: n 1000 ----
    {
        const long long n = 1000;
        auto g = rv(n, 6.0f), u = rv(n, 2.0f), dh = rv(n);
        std::vector<float> h(n, NAN), dg(n, NAN), du(n, NAN);
        launch(2, 256, [&] { swiglu_fwd_f32(g.data(), u.data(), h.data(), n); });
        launch(2, 256, [&] { swiglu_bwd_f32(g.data(), u.data(), dh.data(), dg.data(), du.data(), n); });
        dump("swi_g", g); dump("swi_u", u); dump("swi_dh", dh); dump("swi_h", h); dump("swi_dg", dg); dump("swi_du", du);
        // bf16 gate and up (stashed activations): the same inputs rounded to bf16.
        std::vector<__nv_bfloat16> gb(n), ub(n);
        for (long long i = 0; i < n; ++i) { gb[i] = __float2bfloat16_rn(g[i]); ub[i] = __float2bfloat16_rn(u[i]); }
        std::vector<float> hb(n, NAN), dgb(n, NAN), dub(n, NAN);
        launch(2, 256, [&] { swiglu_fwd_bf16(gb.data(), ub.data(), hb.data(), n); });
        launch(2, 256, [&] { swiglu_bwd_bf16(gb.data(), ub.data(), dh.data(), dgb.data(), dub.data(), n); });
        dump("swi_h_bf16", hb); dump("swi_dg_bf16", dgb); dump("swi_du_bf16", dub);
        // h stored in bf16, from f32 and from bf16 gate and up.
        std::vector<__nv_bfloat16> h2(n, __float2bfloat16_rn(NAN)), h3(n, __float2bfloat16_rn(NAN));
        launch(2, 256, [&] { swiglu_fwd_f32_bf16(g.data(), u.data(), h2.data(), n); });
        launch(2, 256, [&] { swiglu_fwd_bf16_bf16(gb.data(), ub.data(), h3.data(), n); });
        dump("swi_h_f32_bf16", widen(h2)); dump("swi_h_bf16_bf16", widen(h3));
        // bf16 gradients from bf16 gate and up.
        std::vector<__nv_bfloat16> dg2(n, __float2bfloat16_rn(NAN)), du2(n, __float2bfloat16_rn(NAN));
        launch(2, 256, [&] { swiglu_bwd_bf16_bf16(gb.data(), ub.data(), dh.data(), dg2.data(), du2.data(), n); });
        dump("swi_dg_bf16_bf16", widen(dg2)); dump("swi_du_bf16_bf16", widen(du2));
    }
    // ---- adamw: n 700, two steps, lr 1e-2, b1 0.9, b2 0.999, eps 1e-8, wd 0.01 (constants as backend.rs) ----
    {
        const long long n = 700;
        auto p = rv(n), g1 = rv(n, 0.1f), g2 = rv(n, 0.1f);
        std::vector<float> m(n, 0.0f), v(n, 0.0f);
        dump("adam_p0", p); dump("adam_g1", g1); dump("adam_g2", g2);
        const double lr = 1e-2, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.01;
        for (int t = 1; t <= 2; ++t) {
            float decay = (float)(1.0 - lr * wd), w1 = (float)(1.0 - b1), fb2 = (float)b2, w2 = (float)(1.0 - b2);
            double bc1 = 1.0 - pow(b1, t), bc2 = 1.0 - pow(b2, t);
            float step = (float)(-(lr / bc1)), bc2s = (float)sqrt(bc2), feps = (float)eps;
            const float* g = t == 1 ? g1.data() : g2.data();
            launch(2, 256, [&] { adamw_f32(p.data(), g, m.data(), v.data(), n, 1, decay, w1, fb2, w2, step, bc2s, feps); });
        }
        dump("adam_p", p); dump("adam_m", m); dump("adam_v", v);
    }
    // ---- xent: rows 3, vocab 1000, c 0.25, labels 5 999 0 (f32 and bf16 gradients) ----
    {
        const int rows = 3, vocab = 1000;
        auto z = rv(rows * vocab, 5.0f);
        std::vector<int> lab = {5, 999, 0};
        std::vector<float> loss(rows, NAN), zg(rows * vocab, NAN), loss2(rows, NAN);
        std::vector<__nv_bfloat16> zgb(rows * vocab);
        launch(rows, 256, [&] { xent_rows_f32(z.data(), lab.data(), loss.data(), zg.data(), vocab, 0.25f, 1); });
        launch(rows, 256, [&] { xent_rows_bf16(z.data(), lab.data(), loss2.data(), zgb.data(), vocab, 0.25f, 1); });
        dump("xent_z", z); dump("xent_loss", loss); dump("xent_zg", zg); dump("xent_loss_bf16", loss2); dump("xent_zg_bf16", from_bf(zgb));
    }
    // ---- embedding (f32 and bf16 tables): vocab 20, dim 33 ----
    {
        const int vocab = 20, dim = 33;
        std::vector<unsigned> ids = {3, 0, 19, 7, 7, 12, 1};
        auto t = rv(vocab * dim);
        auto tb = to_bf(t);
        std::vector<float> o(ids.size() * dim, NAN), ob(ids.size() * dim, NAN);
        launch(1, 256, [&] { embedding_f32(t.data(), ids.data(), o.data(), (long long)ids.size(), dim); });
        launch(1, 256, [&] { embedding_bf16(tb.data(), ids.data(), ob.data(), (long long)ids.size(), dim); });
        dump("emb_t", t); dump("emb_out", o); dump("emb_out_bf16", ob);
    }
    // ---- casts, add, gather, scatter: 9 rows of 70 ----
    {
        const int rows = 9, dim = 70;
        const long long n = rows * dim;
        auto x = rv(n, 3.0f), y = rv(n);
        std::vector<__nv_bfloat16> xb(n);
        launch(2, 256, [&] { cast_f32_bf16(x.data(), xb.data(), n); });
        auto acc = y;
        launch(2, 256, [&] { cast_bf16_f32(xb.data(), acc.data(), n, 1); });
        auto sum = y;
        launch(2, 256, [&] { add_f32(sum.data(), x.data(), n); });
        std::vector<float> sum2(n, NAN);
        launch(2, 256, [&] { add_out_f32(y.data(), x.data(), sum2.data(), n); });
        dump("ew_sum2", sum2);
        auto bias = rv(dim), biased = y;
        launch(2, 256, [&] { add_bias_f32(biased.data(), bias.data(), rows, dim); });
        dump("ew_bias", bias); dump("ew_biased", biased);
        std::vector<int> idx = {8, 0, 3, 5};
        std::vector<float> gath(idx.size() * dim, NAN), scat(n, 0.0f);
        std::vector<__nv_bfloat16> gathb(idx.size() * dim);
        launch(2, 256, [&] { gather_rows_f32(x.data(), idx.data(), gath.data(), (long long)idx.size(), dim); });
        launch(2, 256, [&] { gather_rows_bf16(x.data(), idx.data(), gathb.data(), (long long)idx.size(), dim); });
        launch(2, 256, [&] { scatter_rows_f32(gath.data(), idx.data(), scat.data(), (long long)idx.size(), dim); });
        // split_f32_bf16x2 on values over many binades (the f32 S of the bf16 dphi).
        std::vector<float> s(n);
        for (long long i = 0; i < n; ++i) s[i] = x[i] * std::ldexp(1.0f, (int)(i % 61) - 30);
        std::vector<__nv_bfloat16> hilo(2 * n, __float2bfloat16_rn(NAN));
        launch(2, 256, [&] { split_f32_bf16x2(s.data(), hilo.data(), rows, dim); });
        dump("split_x", s); dump("split_hilo", from_bf(hilo));
        // add_halves_f32: d (rows x 2 dim) into y (row stride dim + 3), once with beta 0 (y
        // not read: NaN there stays out), once with beta 0.5.
        auto d2 = rv(2 * n);
        std::vector<float> h0((long long)rows * (dim + 3), NAN), h1 = rv((long long)rows * (dim + 3));
        dump("halves_y1_before", h1);
        launch(2, 256, [&] { add_halves_f32(d2.data(), h0.data(), rows, dim, dim + 3, 0.0f); });
        launch(2, 256, [&] { add_halves_f32(d2.data(), h1.data(), rows, dim, dim + 3, 0.5f); });
        dump("halves_d", d2); dump("halves_y0", h0); dump("halves_y1", h1);
        dump("ew_x", x); dump("ew_y", y); dump("ew_xb", from_bf(xb)); dump("ew_acc", acc); dump("ew_sum", sum);
        dump("ew_gather", gath); dump("ew_gather_bf16", from_bf(gathb)); dump("ew_scatter", scat);
    }
    printf("model kernels emulated\n");
    return 0;
}
