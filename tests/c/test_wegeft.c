/*
 * The C ABI's test program (include/wegeft.h, libwegeft.so). Built and run by tests/c_abi.rs:
 *
 *   test_wegeft cpu FIXTURE.bin   the CPU entry points against a layer fixture (f32, strided,
 *                                 bf16), merge/unmerge, LoRA, every error path, the CUDA
 *                                 symbols' behaviour without a usable GPU
 *   test_wegeft cuda              the CUDA entry points against the library's own CPU path on
 *                                 a GPU (scripts/gpu-check.sh packs it, gpu-runner.sh runs it);
 *                                 exits 1 with a message when there is no driver or device
 *
 * FIXTURE.bin (written by tests/c_abi.rs from a ../shared/fixtures/layer/ case):
 * "WGFT", then tokens, d_in, d_out, rank as little-endian uint64, then float32 arrays
 * x, W, b, phi, psi, G, y, dx, dphi, dpsi, W_merged (row-major; scale 1).
 * Prints "abi shape=... const_mat=... mat=..." (tests/c_abi.rs compares with Rust's layout)
 * and "ok: N checks"; exit status 0 only if every check passed.
 */
#include "wegeft.h"

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0, checks = 0;

#define CHECK(cond, ...)                                              \
    do {                                                              \
        checks++;                                                     \
        if (!(cond)) {                                                \
            failures++;                                               \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);      \
            fprintf(stderr, __VA_ARGS__);                             \
            fprintf(stderr, "\n");                                    \
        }                                                             \
    } while (0)

/* A call that must succeed. */
#define OK(call)                                                                          \
    do {                                                                                  \
        int st_ = (call);                                                                 \
        CHECK(st_ == WEGEFT_OK, "%s -> %s: %s", #call, wegeft_status_name(st_), wegeft_last_error()); \
        CHECK(strcmp(wegeft_last_error(), "") == 0, "last error not cleared after success"); \
    } while (0)

/* A call that must fail with `status` and a message containing `needle`. */
#define FAILS(call, status, needle)                                                        \
    do {                                                                                   \
        int st_ = (call);                                                                  \
        CHECK(st_ == (status), "%s -> %s (%s), expected %s", #call, wegeft_status_name(st_), \
              wegeft_last_error(), wegeft_status_name(status));                            \
        CHECK(strstr(wegeft_last_error(), (needle)) != NULL, "%s: message \"%s\" lacks \"%s\"", \
              #call, wegeft_last_error(), (needle));                                       \
    } while (0)

/* max |got - want| <= tol * max |want| (relative to the largest reference element; the tiny
 * floor only keeps an all-zero reference from dividing by zero). A NaN or infinity in either
 * array is an infinite error: it can neither be skipped nor hide behind a later element. */
static void close_to(const char *what, const float *got, const float *want, size_t n, double tol) {
    double worst = 0, scale = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++)
        if (isfinite(want[i])) scale = fmax(scale, fabs(want[i]));
    scale = fmax(scale, 1e-30);
    for (size_t i = 0; i < n; i++) {
        double d = (isfinite(got[i]) && isfinite(want[i])) ? fabs((double)got[i] - want[i]) : INFINITY;
        if (d > worst) { worst = d; at = i; }
    }
    CHECK(worst <= tol * scale, "%s: worst |diff| %.3g at %zu (got %g, want %g), allowed %.3g (max |want| %.3g)", what,
          worst, at, n ? got[at] : 0.0, n ? want[at] : 0.0, tol * scale, scale);
}

static uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint16_t *to_bf16(const float *a, size_t n) {
    uint16_t *o = malloc(n * 2);
    for (size_t i = 0; i < n; i++) o[i] = f2bf(a[i]);
    return o;
}
static float *from_bf16(const uint16_t *a, size_t n) {
    float *o = malloc(n * 4);
    for (size_t i = 0; i < n; i++) o[i] = bf2f(a[i]);
    return o;
}

static wegeft_const_mat cm(const void *p, size_t len) { wegeft_const_mat m = {p, len, 0}; return m; }
static wegeft_mat mm(void *p, size_t len) { wegeft_mat m = {p, len, 0}; return m; }

typedef struct {
    size_t t, din, dout, r;
    float *x, *w, *b, *phi, *psi, *g, *y, *dx, *dphi, *dpsi, *wm;
} fixture;

static float *read_arr(FILE *f, size_t n, const char *what) {
    float *a = malloc(n * sizeof(float));
    if (!a || fread(a, sizeof(float), n, f) != n) {
        fprintf(stderr, "fixture: short read of %s\n", what);
        exit(2);
    }
    return a;
}

static fixture load(const char *path) {
    fixture fx;
    FILE *f = fopen(path, "rb");
    char magic[4];
    uint64_t dims[4];
    if (!f || fread(magic, 1, 4, f) != 4 || memcmp(magic, "WGFT", 4) != 0 || fread(dims, 8, 4, f) != 4) {
        fprintf(stderr, "%s: not a fixture file\n", path);
        exit(2);
    }
    fx.t = dims[0], fx.din = dims[1], fx.dout = dims[2], fx.r = dims[3];
    fx.x = read_arr(f, fx.t * fx.din, "x");
    fx.w = read_arr(f, fx.dout * fx.din, "W");
    fx.b = read_arr(f, fx.dout, "b");
    fx.phi = read_arr(f, fx.din * fx.r, "phi");
    fx.psi = read_arr(f, fx.r * fx.din, "psi");
    fx.g = read_arr(f, fx.t * fx.dout, "G");
    fx.y = read_arr(f, fx.t * fx.dout, "y");
    fx.dx = read_arr(f, fx.t * fx.din, "dx");
    fx.dphi = read_arr(f, fx.din * fx.r, "dphi");
    fx.dpsi = read_arr(f, fx.r * fx.din, "dpsi");
    fx.wm = read_arr(f, fx.dout * fx.din, "W_merged");
    fclose(f);
    return fx;
}

/* ---- CPU ------------------------------------------------------------------------------------ */

static void cpu_f32(const fixture *f) {
    wegeft_shape s = {f->t, f->din, f->dout, f->r};
    size_t nx = f->t * f->din, ny = f->t * f->dout, nw = f->dout * f->din, np = f->din * f->r;
    float *y = calloc(ny, 4), *dx = calloc(nx, 4), *dphi = calloc(np, 4), *dpsi = calloc(np, 4);
    float *u = calloc(f->t * f->r, 4), *c = calloc(f->dout * f->r, 4);

    OK(wegeft_cpu_forward(WEGEFT_F32, s, cm(f->x, nx), cm(f->w, nw), f->b, f->dout, cm(f->phi, np), cm(f->psi, np),
                          1.0f, mm(y, ny), u, f->t * f->r, c, f->dout * f->r));
    close_to("f32 forward y", y, f->y, ny, 1e-5);

    OK(wegeft_cpu_backward(WEGEFT_F32, s, cm(f->x, nx), cm(f->w, nw), cm(f->phi, np), cm(f->psi, np), 1.0f, u,
                           f->t * f->r, c, f->dout * f->r, cm(f->g, ny), mm(dx, nx), dphi, np, dpsi, np));
    close_to("f32 backward dx", dx, f->dx, nx, 1e-5);
    close_to("f32 backward dphi", dphi, f->dphi, np, 1e-5);
    close_to("f32 backward dpsi", dpsi, f->dpsi, np, 1e-5);

    /* Without saved u, C (recomputed), and accumulation: a second call doubles dphi, dpsi. */
    OK(wegeft_cpu_backward(WEGEFT_F32, s, cm(f->x, nx), cm(f->w, nw), cm(f->phi, np), cm(f->psi, np), 1.0f, NULL, 0,
                           NULL, 0, cm(f->g, ny), mm(NULL, 0), dphi, np, dpsi, np));
    float *twice = calloc(np, 4);
    for (size_t i = 0; i < np; i++) twice[i] = 2 * f->dphi[i];
    close_to("f32 backward dphi accumulated", dphi, twice, np, 1e-5);
    for (size_t i = 0; i < np; i++) twice[i] = 2 * f->dpsi[i];
    close_to("f32 backward dpsi accumulated", dpsi, twice, np, 1e-5);

    /* Strided x, y (row strides d_in + 3, d_out + 5): the same y; padding untouched. */
    size_t lx = f->din + 3, ly = f->dout + 5;
    float *xs = calloc(f->t * lx, 4), *ys = malloc(f->t * ly * 4), *yc = calloc(ny, 4);
    for (size_t i = 0; i < f->t; i++) memcpy(xs + i * lx, f->x + i * f->din, f->din * 4);
    for (size_t i = 0; i < f->t * ly; i++) ys[i] = 12345.0f;
    wegeft_const_mat xsm = {xs, f->t * lx, lx};
    wegeft_mat ysm = {ys, (f->t - 1) * ly + f->dout, ly}; /* the shortest buffer that fits */
    OK(wegeft_cpu_forward(WEGEFT_F32, s, xsm, cm(f->w, nw), f->b, f->dout, cm(f->phi, np), cm(f->psi, np), 1.0f, ysm,
                          NULL, 0, NULL, 0));
    int pad_ok = 1;
    for (size_t i = 0; i < f->t; i++) {
        memcpy(yc + i * f->dout, ys + i * ly, f->dout * 4);
        for (size_t j = f->dout; j < ly && i + 1 < f->t; j++) pad_ok &= ys[i * ly + j] == 12345.0f;
    }
    close_to("f32 strided forward y", yc, f->y, ny, 1e-5);
    CHECK(pad_ok, "strided forward wrote into the padding between rows");

    /* Merge, then unmerge back. */
    float *w2 = malloc(nw * 4);
    memcpy(w2, f->w, nw * 4);
    OK(wegeft_cpu_merge(WEGEFT_F32, s, mm(w2, nw), cm(f->phi, np), cm(f->psi, np), 1.0f));
    close_to("f32 merge", w2, f->wm, nw, 1e-5);
    wegeft_shape s0 = s;
    s0.tokens = 0; /* not used by unmerge */
    OK(wegeft_cpu_unmerge(WEGEFT_F32, s0, mm(w2, nw), cm(f->phi, np), cm(f->psi, np), 1.0f));
    close_to("f32 unmerge", w2, f->w, nw, 1e-5);

    free(y), free(dx), free(dphi), free(dpsi), free(u), free(c), free(twice), free(xs), free(ys), free(yc), free(w2);
}

static void cpu_bf16(const fixture *f) {
    wegeft_shape s = {f->t, f->din, f->dout, f->r};
    size_t nx = f->t * f->din, ny = f->t * f->dout, nw = f->dout * f->din, np = f->din * f->r;
    uint16_t *x = to_bf16(f->x, nx), *w = to_bf16(f->w, nw), *b = to_bf16(f->b, f->dout), *phi = to_bf16(f->phi, np),
             *psi = to_bf16(f->psi, np), *g = to_bf16(f->g, ny), *y = calloc(ny, 2), *dx = calloc(nx, 2);
    float *dphi = calloc(np, 4), *dpsi = calloc(np, 4);
    OK(wegeft_cpu_forward(WEGEFT_BF16, s, cm(x, nx), cm(w, nw), b, f->dout, cm(phi, np), cm(psi, np), 1.0f, mm(y, ny),
                          NULL, 0, NULL, 0));
    float *yf = from_bf16(y, ny);
    close_to("bf16 forward y", yf, f->y, ny, 3e-2);
    OK(wegeft_cpu_backward(WEGEFT_BF16, s, cm(x, nx), cm(w, nw), cm(phi, np), cm(psi, np), 1.0f, NULL, 0, NULL, 0,
                           cm(g, ny), mm(dx, nx), dphi, np, dpsi, np));
    float *dxf = from_bf16(dx, nx);
    close_to("bf16 backward dx", dxf, f->dx, nx, 3e-2);
    close_to("bf16 backward dphi", dphi, f->dphi, np, 3e-2);
    close_to("bf16 backward dpsi", dpsi, f->dpsi, np, 3e-2);
    free(x), free(w), free(b), free(phi), free(psi), free(g), free(y), free(dx), free(dphi), free(dpsi), free(yf), free(dxf);
}

/* LoRA with B = W phi and A = psi is WeGeFT's forward (s = 1): y must match the fixture. */
static void cpu_lora(const fixture *f) {
    wegeft_shape s = {f->t, f->din, f->dout, f->r};
    size_t nx = f->t * f->din, ny = f->t * f->dout, nw = f->dout * f->din, np = f->din * f->r;
    float *bm = calloc(f->dout * f->r, 4), *y = calloc(ny, 4), *xa = calloc(f->t * f->r, 4), *dx = calloc(nx, 4);
    float *da = calloc(np, 4), *db = calloc(f->dout * f->r, 4);
    for (size_t o = 0; o < f->dout; o++)
        for (size_t k = 0; k < f->r; k++) {
            double acc = 0;
            for (size_t i = 0; i < f->din; i++) acc += (double)f->w[o * f->din + i] * f->phi[i * f->r + k];
            bm[o * f->r + k] = (float)acc;
        }
    OK(wegeft_cpu_lora_forward(WEGEFT_F32, s, cm(f->x, nx), cm(f->w, nw), f->b, f->dout, cm(f->psi, np),
                               cm(bm, f->dout * f->r), 1.0f, mm(y, ny), xa, f->t * f->r));
    close_to("lora forward (B = W phi, A = psi) y", y, f->y, ny, 1e-5);
    OK(wegeft_cpu_lora_backward(WEGEFT_F32, s, cm(f->x, nx), cm(f->w, nw), cm(f->psi, np), cm(bm, f->dout * f->r),
                                1.0f, xa, f->t * f->r, cm(f->g, ny), mm(dx, nx), da, np, db, f->dout * f->r));
    close_to("lora backward dx", dx, f->dx, nx, 1e-5);
    close_to("lora backward dA (= dpsi)", da, f->dpsi, np, 1e-5);
    free(bm), free(y), free(xa), free(dx), free(da), free(db);
}

static void cpu_errors(const fixture *f) {
    wegeft_shape s = {f->t, f->din, f->dout, f->r};
    size_t nx = f->t * f->din, ny = f->t * f->dout, nw = f->dout * f->din, np = f->din * f->r;
    float *y = calloc(ny + 1, 4), *dphi = calloc(np, 4), *dpsi = calloc(np, 4), *w2 = malloc(nw * 4);
    float *u = calloc(f->t * f->r, 4);
    wegeft_const_mat x = cm(f->x, nx), w = cm(f->w, nw), phi = cm(f->phi, np), psi = cm(f->psi, np), g = cm(f->g, ny);

#define FWD(dt, sh, X, W, B, BL, Y) wegeft_cpu_forward(dt, sh, X, W, B, BL, phi, psi, 1.0f, Y, NULL, 0, NULL, 0)
    FAILS(FWD(WEGEFT_F32, s, cm(NULL, nx), w, NULL, 0, mm(y, ny)), WEGEFT_ERR_NULL, "x: NULL");
    FAILS(FWD(WEGEFT_F32, s, x, w, NULL, 0, mm(NULL, ny)), WEGEFT_ERR_NULL, "y: NULL");
    FAILS(FWD(7, s, x, w, NULL, 0, mm(y, ny)), WEGEFT_ERR_INVALID, "unknown dtype code 7");
    FAILS(FWD(-1, s, x, w, NULL, 0, mm(y, ny)), WEGEFT_ERR_INVALID, "dtype");
    FAILS(FWD(WEGEFT_F32, s, cm(f->x, nx - 1), w, NULL, 0, mm(y, ny)), WEGEFT_ERR_INVALID, "x:");
    FAILS(FWD(WEGEFT_F32, s, x, w, NULL, 0, mm(y, ny - 1)), WEGEFT_ERR_INVALID, "y:");
    wegeft_const_mat xld = {f->x, nx, f->din - 1};
    FAILS(FWD(WEGEFT_F32, s, xld, w, NULL, 0, mm(y, ny)), WEGEFT_ERR_INVALID, "row stride");
    FAILS(FWD(WEGEFT_F32, s, x, w, f->b, f->dout - 1, mm(y, ny)), WEGEFT_ERR_INVALID, "b: expected length");
    wegeft_shape s_r0 = s;
    s_r0.rank = 0;
    FAILS(FWD(WEGEFT_F32, s_r0, x, w, NULL, 0, mm(y, ny)), WEGEFT_ERR_INVALID, "rank must be positive");
    wegeft_shape s_big = s;
    s_big.d_in = (size_t)1 << 62;
    FAILS(FWD(WEGEFT_F32, s_big, x, w, NULL, 0, mm(y, ny)), WEGEFT_ERR_INVALID, "overflow");
    /* y on top of x: an output sharing memory with an input. */
    float *xy = calloc(nx + ny, 4);
    memcpy(xy, f->x, nx * 4);
    FAILS(FWD(WEGEFT_F32, s, cm(xy, nx), w, NULL, 0, mm(xy + 1, ny)), WEGEFT_ERR_INVALID, "overlaps");
    /* Misaligned f32 buffer. */
    FAILS(FWD(WEGEFT_F32, s, x, w, NULL, 0, mm((char *)y + 1, ny)), WEGEFT_ERR_INVALID, "aligned");
    /* A bf16 call given half the elements an f32 call would need: the lengths are in elements. */
    FAILS(FWD(WEGEFT_BF16, s, cm(f->x, nx / 2), w, NULL, 0, mm(y, ny)), WEGEFT_ERR_INVALID, "x:");
    /* Non-finite scale. */
    FAILS(wegeft_cpu_forward(WEGEFT_F32, s, x, w, NULL, 0, phi, psi, NAN, mm(y, ny), NULL, 0, NULL, 0),
          WEGEFT_ERR_INVALID, "scale");
    /* saved_u of the wrong length. */
    FAILS(wegeft_cpu_forward(WEGEFT_F32, s, x, w, NULL, 0, phi, psi, 1.0f, mm(y, ny), u, f->t * f->r + 1, NULL, 0),
          WEGEFT_ERR_INVALID, "saved_u");
#undef FWD

    FAILS(wegeft_cpu_backward(WEGEFT_F32, s, x, w, phi, psi, 1.0f, u, f->t * f->r, NULL, 0, g, mm(NULL, 0), dphi, np,
                              dpsi, np),
          WEGEFT_ERR_INVALID, "give both");
    FAILS(wegeft_cpu_backward(WEGEFT_F32, s, x, w, phi, psi, 1.0f, NULL, 0, NULL, 0, g, mm(NULL, 0), NULL, np, dpsi, np),
          WEGEFT_ERR_NULL, "dphi");
    FAILS(wegeft_cpu_backward(WEGEFT_F32, s, x, w, phi, psi, 1.0f, NULL, 0, NULL, 0, g, mm(NULL, 0), dphi, np - 1,
                              dpsi, np),
          WEGEFT_ERR_INVALID, "dphi");
    FAILS(wegeft_cpu_backward(WEGEFT_F32, s, x, w, phi, psi, 1.0f, NULL, 0, NULL, 0, g, mm(NULL, 0), dphi, np, dphi,
                              np),
          WEGEFT_ERR_INVALID, "overlaps");

    memcpy(w2, f->w, nw * 4);
    FAILS(wegeft_cpu_merge(WEGEFT_F32, s, mm(w2, nw), cm(NULL, np), psi, 1.0f), WEGEFT_ERR_NULL, "phi");
    FAILS(wegeft_cpu_merge(WEGEFT_F32, s, mm(w2, nw - 1), phi, psi, 1.0f), WEGEFT_ERR_INVALID, "W:");
    /* Rank 1, phi = e_0, psi = -e_0^T: I_1 + psi phi = 0, singular; W stays as it was. */
    {
        wegeft_shape s1 = {1, f->din, f->dout, 1};
        float *p1 = calloc(f->din, 4), *q1 = calloc(f->din, 4);
        p1[0] = 1.0f, q1[0] = -1.0f;
        FAILS(wegeft_cpu_unmerge(WEGEFT_F32, s1, mm(w2, nw), cm(p1, f->din), cm(q1, f->din), 1.0f),
              WEGEFT_ERR_NUMERICAL, "");
        CHECK(memcmp(w2, f->w, nw * 4) == 0, "a failed unmerge changed W");
        free(p1), free(q1);
    }
    FAILS(wegeft_cpu_lora_forward(WEGEFT_F32, s, x, w, NULL, 0, psi, cm(NULL, 1), 1.0f, mm(y, ny), NULL, 0),
          WEGEFT_ERR_NULL, "B");
    OK(wegeft_cpu_forward(WEGEFT_F32, s, x, w, NULL, 0, phi, psi, 1.0f, mm(y, ny), NULL, 0, NULL, 0));
    free(y), free(dphi), free(dpsi), free(w2), free(u), free(xy);
}

/* The CUDA symbols on a machine (or build) without a usable GPU. */
static void cuda_absent(void) {
    wegeft_shape s = {4, 8, 8, 2};
    wegeft_cuda *h = (wegeft_cuda *)&s; /* must be overwritten with NULL */
    int st = wegeft_cuda_create(0, &h);
    if (st == WEGEFT_OK) {
        /* A GPU is here: the `cuda` mode tests it; just release the handle. */
        CHECK(h != NULL, "create succeeded without a handle");
        OK(wegeft_cuda_destroy(h));
        printf("cuda: a device is present (tested by `test_wegeft cuda`)\n");
    } else {
        CHECK(st == WEGEFT_ERR_NO_CUDA, "create -> %s: %s", wegeft_status_name(st), wegeft_last_error());
        CHECK(h == NULL, "failed create left a non-NULL handle");
        if (!wegeft_built_with_cuda())
            CHECK(strstr(wegeft_last_error(), "built without CUDA") != NULL, "message: %s", wegeft_last_error());
        printf("cuda: %s\n", wegeft_last_error());
    }
    FAILS(wegeft_cuda_create(0, NULL), wegeft_built_with_cuda() ? WEGEFT_ERR_NULL : WEGEFT_ERR_NO_CUDA,
          wegeft_built_with_cuda() ? "out" : "built without CUDA");
    int want = wegeft_built_with_cuda() ? WEGEFT_ERR_NULL : WEGEFT_ERR_NO_CUDA;
    const char *msg = wegeft_built_with_cuda() ? "handle: NULL" : "built without CUDA";
    FAILS(wegeft_cuda_forward(NULL, NULL, WEGEFT_F32, s, 256, 256, 0, 256, 256, 1.0f, 256, 256, 256), want, msg);
    FAILS(wegeft_cuda_backward(NULL, NULL, WEGEFT_F32, s, 256, 256, 256, 1.0f, 256, 256, 256, 0, 256, 256), want, msg);
    FAILS(wegeft_cuda_merge(NULL, NULL, WEGEFT_F32, s, 256, 256, 256, 1.0f), want, msg);
    FAILS(wegeft_cuda_unmerge(NULL, NULL, WEGEFT_F32, s, 256, 256, 256, 1.0f), want, msg);
    FAILS(wegeft_cuda_lora_forward(NULL, NULL, WEGEFT_F32, s, 256, 256, 0, 256, 256, 1.0f, 256, 256), want, msg);
    FAILS(wegeft_cuda_lora_backward(NULL, NULL, WEGEFT_F32, s, 256, 256, 256, 256, 1.0f, 256, 256, 0, 256, 256), want,
          msg);
    FAILS(wegeft_cuda_set_path(NULL, WEGEFT_PATH_TUNED), want, msg);
    OK(wegeft_cuda_destroy(NULL));
}

/* ---- CUDA (on a GPU) ---------------------------------------------------------------------- */

typedef int (*cu_init_t)(unsigned);
typedef int (*cu_device_get_t)(int *, int);
typedef int (*cu_primary_retain_t)(void **, int);
typedef int (*cu_ctx_set_t)(void *);
typedef int (*cu_alloc_t)(unsigned long long *, size_t);
typedef int (*cu_free_t)(unsigned long long);
typedef int (*cu_htod_t)(unsigned long long, const void *, size_t);
typedef int (*cu_dtoh_t)(void *, unsigned long long, size_t);
typedef int (*cu_stream_create_t)(void **, unsigned);
typedef int (*cu_stream_sync_t)(void *);
typedef int (*cu_memset_t)(unsigned long long, unsigned char, size_t, void *);

static struct {
    cu_alloc_t alloc;
    cu_free_t free_;
    cu_htod_t htod;
    cu_dtoh_t dtoh;
    cu_memset_t memset8;
} cu;

/* Fills a device output with 0xFF bytes (NaN in f32 and bf16) on `stream` before the call that
 * writes it, so that an element the call leaves unwritten reads back as NaN and fails. */
static void poison(void *stream, unsigned long long p, size_t bytes) {
    if (cu.memset8(p, 0xFF, bytes, stream) != 0) {
        fprintf(stderr, "cuMemsetD8Async failed\n");
        exit(1);
    }
}

static unsigned long long dev_copy(const void *host, size_t bytes) {
    unsigned long long p = 0;
    if (cu.alloc(&p, bytes ? bytes : 16) != 0) {
        fprintf(stderr, "cuMemAlloc failed\n");
        exit(1);
    }
    if (host && cu.htod(p, host, bytes) != 0) {
        fprintf(stderr, "cuMemcpyHtoD failed\n");
        exit(1);
    }
    return p;
}

static float *host_of(unsigned long long p, size_t n, int dtype) {
    size_t es = dtype == WEGEFT_F32 ? 4 : 2;
    void *h = malloc(n * es);
    if (cu.dtoh(h, p, n * es) != 0) {
        fprintf(stderr, "cuMemcpyDtoH failed\n");
        exit(1);
    }
    if (dtype == WEGEFT_F32) return h;
    float *f = from_bf16(h, n);
    free(h);
    return f;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float urand(void) { /* uniform in [-1, 1) */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}

static int run_cuda(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "no CUDA driver (libcuda.so.1): %s\n", dlerror());
        return 1;
    }
    cu_init_t cu_init;
    cu_device_get_t dev_get;
    cu_primary_retain_t retain;
    cu_ctx_set_t ctx_set;
    cu_stream_create_t stream_create;
    cu_stream_sync_t stream_sync;
    /* POSIX's way to store a dlsym result in a function pointer (ISO C has no such cast). */
#define LOAD(var, name) (*(void **)(&(var)) = dlsym(lib, name))
    if (!LOAD(cu_init, "cuInit") || !LOAD(dev_get, "cuDeviceGet") || !LOAD(retain, "cuDevicePrimaryCtxRetain") ||
        !LOAD(ctx_set, "cuCtxSetCurrent") || !LOAD(stream_create, "cuStreamCreate") ||
        !LOAD(stream_sync, "cuStreamSynchronize") || !LOAD(cu.alloc, "cuMemAlloc_v2") ||
        !LOAD(cu.free_, "cuMemFree_v2") || !LOAD(cu.htod, "cuMemcpyHtoD_v2") || !LOAD(cu.dtoh, "cuMemcpyDtoH_v2") ||
        !LOAD(cu.memset8, "cuMemsetD8Async")) {
        fprintf(stderr, "no CUDA driver: libcuda.so.1 lacks a driver API function\n");
        return 1;
    }
#undef LOAD
    int dev;
    void *ctx = NULL, *stream = NULL;
    if (cu_init(0) != 0 || dev_get(&dev, 0) != 0) {
        fprintf(stderr, "no CUDA device (cuInit / cuDeviceGet failed)\n");
        return 1;
    }
    /* As a framework would: the primary context current, our own stream. */
    if (retain(&ctx, dev) != 0 || ctx_set(ctx) != 0 || stream_create(&stream, 0) != 0) {
        fprintf(stderr, "cuDevicePrimaryCtxRetain / cuCtxSetCurrent / cuStreamCreate failed\n");
        return 1;
    }
    wegeft_cuda *h = NULL;
    int st = wegeft_cuda_create(0, &h);
    if (st != WEGEFT_OK) {
        fprintf(stderr, "wegeft_cuda_create: %s: %s\n", wegeft_status_name(st), wegeft_last_error());
        return 1;
    }
    const size_t T = 37, DIN = 96, DOUT = 80, R = 8;
    const float scale = 0.5f;
    wegeft_shape s = {T, DIN, DOUT, R};
    size_t nx = T * DIN, ny = T * DOUT, nw = DOUT * DIN, np = DIN * R;
    float *x = malloc(nx * 4), *w = malloc(nw * 4), *b = malloc(DOUT * 4), *phi = malloc(np * 4),
          *psi = malloc(np * 4), *g = malloc(ny * 4);
    for (size_t i = 0; i < nx; i++) x[i] = urand();
    for (size_t i = 0; i < nw; i++) w[i] = urand() * 0.1f;
    for (size_t i = 0; i < DOUT; i++) b[i] = urand();
    for (size_t i = 0; i < np; i++) phi[i] = urand() * 0.3f, psi[i] = urand() * 0.3f;
    for (size_t i = 0; i < ny; i++) g[i] = urand();

    FAILS(wegeft_cuda_set_path(h, 9), WEGEFT_ERR_INVALID, "path");
    /* f32 and bf16 on the default path, then bf16 tuned (its first call times every path). */
    for (int pass = 0; pass < 3; pass++) {
        int dt = pass == 0 ? WEGEFT_F32 : WEGEFT_BF16;
        const char *name = pass == 0 ? "f32" : pass == 1 ? "bf16" : "bf16 tuned";
        double tol = pass == 0 ? 1e-4 : 2e-2;
        size_t es = pass == 0 ? 4 : 2;
        OK(wegeft_cuda_set_path(h, pass == 2 ? WEGEFT_PATH_TUNED : WEGEFT_PATH_AUTO));
        /* Inputs in the storage type; the CPU path on the same (rounded) inputs is the reference. */
        const void *hx = x, *hw = w, *hb = b, *hphi = phi, *hpsi = psi, *hg = g;
        uint16_t *bx = NULL, *bw = NULL, *bb = NULL, *bphi = NULL, *bpsi = NULL, *bg = NULL;
        if (pass > 0) {
            hx = bx = to_bf16(x, nx), hw = bw = to_bf16(w, nw), hb = bb = to_bf16(b, DOUT);
            hphi = bphi = to_bf16(phi, np), hpsi = bpsi = to_bf16(psi, np), hg = bg = to_bf16(g, ny);
        }
        void *ry = calloc(ny, es), *rdx = calloc(nx, es), *rw = malloc(nw * es);
        float *rdphi = calloc(np, 4), *rdpsi = calloc(np, 4);
        OK(wegeft_cpu_forward(dt, s, cm(hx, nx), cm(hw, nw), hb, DOUT, cm(hphi, np), cm(hpsi, np), scale, mm(ry, ny),
                              NULL, 0, NULL, 0));
        OK(wegeft_cpu_backward(dt, s, cm(hx, nx), cm(hw, nw), cm(hphi, np), cm(hpsi, np), scale, NULL, 0, NULL, 0,
                               cm(hg, ny), mm(rdx, nx), rdphi, np, rdpsi, np));
        memcpy(rw, hw, nw * es);
        OK(wegeft_cpu_merge(dt, s, mm(rw, nw), cm(hphi, np), cm(hpsi, np), scale));

        unsigned long long dx_ = dev_copy(hx, nx * es), dw = dev_copy(hw, nw * es), db = dev_copy(hb, DOUT * es),
                           dphi = dev_copy(hphi, np * es), dpsi = dev_copy(hpsi, np * es), dg = dev_copy(hg, ny * es),
                           du = dev_copy(NULL, T * R * es), dc = dev_copy(NULL, DOUT * R * es),
                           dy = dev_copy(NULL, ny * es), ddx = dev_copy(NULL, nx * es);
        float *zeros = calloc(np, 4);
        unsigned long long ddphi = dev_copy(zeros, np * 4), ddpsi = dev_copy(zeros, np * 4);
        poison(stream, du, T * R * es), poison(stream, dc, DOUT * R * es), poison(stream, dy, ny * es);
        OK(wegeft_cuda_forward(h, stream, dt, s, dx_, dw, db, dphi, dpsi, scale, du, dc, dy));
        poison(stream, ddx, nx * es); /* dphi, dpsi are accumulated into: they start at zero */
        OK(wegeft_cuda_backward(h, stream, dt, s, dx_, dw, dpsi, scale, du, dc, dg, ddx, ddphi, ddpsi));
        OK(wegeft_cuda_merge(h, stream, dt, s, dw, dphi, dpsi, scale));
        CHECK(stream_sync(stream) == 0, "cuStreamSynchronize failed");
        float *gy = host_of(dy, ny, dt), *gdx = host_of(ddx, nx, dt), *gdphi = host_of(ddphi, np, WEGEFT_F32),
              *gdpsi = host_of(ddpsi, np, WEGEFT_F32), *gw = host_of(dw, nw, dt);
        float *fy = pass ? from_bf16(ry, ny) : ry, *fdx = pass ? from_bf16(rdx, nx) : rdx,
              *fw = pass ? from_bf16(rw, nw) : rw;
        char what[64];
        snprintf(what, sizeof what, "cuda %s forward y", name), close_to(what, gy, fy, ny, tol);
        snprintf(what, sizeof what, "cuda %s backward dx", name), close_to(what, gdx, fdx, nx, tol);
        snprintf(what, sizeof what, "cuda %s backward dphi", name), close_to(what, gdphi, rdphi, np, tol);
        snprintf(what, sizeof what, "cuda %s backward dpsi", name), close_to(what, gdpsi, rdpsi, np, tol);
        snprintf(what, sizeof what, "cuda %s merge", name), close_to(what, gw, fw, nw, tol);
        /* Unmerge on the device brings W back. */
        OK(wegeft_cuda_unmerge(h, stream, dt, s, dw, dphi, dpsi, scale));
        float *gw0 = host_of(dw, nw, dt), *w0 = pass ? from_bf16(bw, nw) : w;
        snprintf(what, sizeof what, "cuda %s unmerge", name), close_to(what, gw0, w0, nw, pass ? 3e-2 : 1e-4);
        /* Many adapters in one batch: the device entry against the CPU one on the same inputs
         * (3 adapters, tokens cycling through none, 0, 1, 2). */
        {
            enum { NA = 3 };
            const float scales[NA] = {0.5f, 1.0f, 2.0f};
            float *sphi = malloc(NA * np * 4), *spsi = malloc(NA * np * 4);
            for (size_t a = 0; a < NA; a++)
                for (size_t i = 0; i < np; i++)
                    sphi[a * np + i] = phi[i] * (1.0f + (float)a), spsi[a * np + i] = psi[(i * 7 + a) % np];
            int32_t *idx = malloc(T * sizeof(int32_t));
            for (size_t t = 0; t < T; t++) idx[t] = (int32_t)(t % 4) - 1;
            const void *hsphi = sphi, *hspsi = spsi;
            uint16_t *bsphi = NULL, *bspsi = NULL;
            if (pass > 0) hsphi = bsphi = to_bf16(sphi, NA * np), hspsi = bspsi = to_bf16(spsi, NA * np);
            void *my = calloc(ny, es);
            OK(wegeft_cpu_multi_forward(dt, s, NA, cm(hx, nx), cm(hw, nw), hb, DOUT, hsphi, NA * np, hspsi, NA * np,
                                        scales, NA, idx, T, mm(my, ny)));
            unsigned long long mphi = dev_copy(hsphi, NA * np * es), mpsi = dev_copy(hspsi, NA * np * es),
                               mx = dev_copy(hx, nx * es), mw = dev_copy(hw, nw * es), mb = dev_copy(hb, DOUT * es),
                               mdy = dev_copy(NULL, ny * es);
            poison(stream, mdy, ny * es);
            OK(wegeft_cuda_multi_forward(h, stream, dt, s, NA, mx, mw, mb, mphi, mpsi, scales, NA, idx, T, mdy));
            idx[0] = NA; /* the host indices may be reused at once: the call has copied them */
            FAILS(wegeft_cuda_multi_forward(h, stream, dt, s, NA, mx, mw, mb, mphi, mpsi, scales, NA, idx, T, mdy),
                  WEGEFT_ERR_INVALID, "adapter");
            CHECK(stream_sync(stream) == 0, "cuStreamSynchronize failed");
            float *gmy = host_of(mdy, ny, dt), *fmy = pass ? from_bf16(my, ny) : my;
            snprintf(what, sizeof what, "cuda %s multi-adapter forward", name), close_to(what, gmy, fmy, ny, tol);
            unsigned long long mall[] = {mphi, mpsi, mx, mw, mb, mdy};
            for (size_t i = 0; i < sizeof mall / sizeof mall[0]; i++) cu.free_(mall[i]);
            free(gmy), free(sphi), free(spsi), free(idx), free(bsphi), free(bspsi), free(my);
            if (pass) free(fmy);
        }
        /* Error paths on the device entry points. */
        FAILS(wegeft_cuda_forward(h, stream, dt, s, 0, dw, db, dphi, dpsi, scale, du, dc, dy), WEGEFT_ERR_INVALID,
              "null device pointer");
        FAILS(wegeft_cuda_forward(h, stream, dt, s, dx_ + 2, dw, db, dphi, dpsi, scale, du, dc, dy),
              WEGEFT_ERR_INVALID, "aligned");
        FAILS(wegeft_cuda_forward(h, stream, 9, s, dx_, dw, db, dphi, dpsi, scale, du, dc, dy), WEGEFT_ERR_INVALID,
              "dtype");
        unsigned long long all[] = {dx_, dw, db, dphi, dpsi, dg, du, dc, dy, ddx, ddphi, ddpsi};
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) cu.free_(all[i]);
        free(gy), free(gdx), free(gdphi), free(gdpsi), free(gw), free(gw0), free(zeros);
        if (pass) free(fy), free(fdx), free(fw), free(w0);
        free(ry), free(rdx), free(rw), free(rdphi), free(rdpsi);
        free(bx), free(bw), free(bb), free(bphi), free(bpsi), free(bg);
    }
    OK(wegeft_cuda_destroy(h));
    free(x), free(w), free(b), free(phi), free(psi), free(g);
    return 0;
}

int main(int argc, char **argv) {
    printf("wegeft %s (cuda %s)\n", wegeft_version(), wegeft_built_with_cuda() ? "built in" : "not built");
    printf("abi shape=%zu const_mat=%zu mat=%zu\n", sizeof(wegeft_shape), sizeof(wegeft_const_mat), sizeof(wegeft_mat));
    CHECK(strlen(wegeft_version()) > 0, "empty version");
    CHECK(strcmp(wegeft_status_name(WEGEFT_ERR_NUMERICAL), "WEGEFT_ERR_NUMERICAL") == 0, "status name");
    CHECK(strcmp(wegeft_status_name(99), "unknown") == 0, "status name of 99");
    if (argc == 3 && strcmp(argv[1], "cpu") == 0) {
        fixture f = load(argv[2]);
        printf("fixture: tokens %zu, d_in %zu, d_out %zu, rank %zu\n", f.t, f.din, f.dout, f.r);
        cpu_f32(&f);
        cpu_bf16(&f);
        cpu_lora(&f);
        cpu_errors(&f);
        cuda_absent();
    } else if (argc == 2 && strcmp(argv[1], "cuda") == 0) {
        if (!wegeft_built_with_cuda()) {
            fprintf(stderr, "libwegeft was built without CUDA\n");
            return 1;
        }
        if (run_cuda() != 0) return 1;
    } else {
        fprintf(stderr, "usage: %s cpu FIXTURE.bin | %s cuda\n", argv[0], argv[0]);
        return 2;
    }
    if (failures) {
        fprintf(stderr, "%d of %d checks failed\n", failures, checks);
        return 1;
    }
    printf("ok: %d checks\n", checks);
    return 0;
}
