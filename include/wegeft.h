/*
 * wegeft.h — the C ABI of the wegeft crate (libwegeft.so; `cargo build --release`, or with
 * `--features cuda` for the GPU entry points). Hand-written; tests/c_abi.rs checks that it
 * declares exactly the library's exported functions with the signatures of src/capi.rs.
 *
 * WeGeFT: a frozen W (d_out x d_in) adapted by phi (d_in x r) and psi (r x d_in), scale s:
 *   C = s W phi (d_out x r),  u = x psi^T (T x r)
 *   forward:   y  = x W^T + u C^T (+ b)
 *   backward:  v  = G C, S = G^T u;  dx = G W + v psi;  dphi += s W^T S;  dpsi += v^T x
 *   merge:     W <- W + C psi;       unmerge: W <- W (I + s phi psi)^-1 (exact)
 *   LoRA:      y = x W^T + s (x A^T) B^T (+ b), A r x d_in, B d_out x r;
 *              dx = G W + s (G B) A;  dA += s (G B)^T x;  dB += s G^T (x A^T)
 *   many adapters in one batch (serving): y_t = (x_t + s_a (x_t psi_a^T) phi_a^T) W^T (+ b)
 *
 * Every function returns WEGEFT_OK (0) or an error status, and sets a thread-local message
 * (wegeft_last_error(), empty after a success). No function aborts or unwinds into C.
 * Matrices are row-major; dtype is one of WEGEFT_F32 / WEGEFT_BF16 / WEGEFT_F16 (storage;
 * compute is f32). Gradients of phi/psi (A/B) are always f32 and accumulated into.
 *
 * CPU entry points take wegeft_mat / wegeft_const_mat: the pointer, the buffer length in
 * elements, and the row stride ld in elements (0 = the number of columns). Checked before any
 * work: NULL pointers, dtype, shapes, ld >= cols, that len covers the view, alignment, and
 * that no output overlaps another argument. NOT checkable: that `data` really addresses `len`
 * elements — passing a length larger than the allocation is undefined behaviour.
 *
 * CUDA entry points take device pointers (CUdeviceptr as uint64_t) to contiguous row-major
 * buffers of the call's dtype, 16-byte aligned, and a CUstream (void *; NULL = the legacy
 * default stream) of the device's primary context (the one the CUDA runtime and PyTorch use).
 * Checked: handle, dtype, shapes, non-NULL and aligned pointers. NOT checkable: buffer sizes,
 * overlap, the pointers' context. Work is queued on the stream; calls return before it runs
 * (unmerge synchronises the stream). A library built without CUDA exports the same functions;
 * they return WEGEFT_ERR_NO_CUDA.
 */
#ifndef WEGEFT_H
#define WEGEFT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. */
#define WEGEFT_OK            0 /* success */
#define WEGEFT_ERR_NULL      1 /* a required pointer (or the handle) was NULL */
#define WEGEFT_ERR_INVALID   2 /* bad dtype, shape, length, stride, alignment, overlap, scale */
#define WEGEFT_ERR_NUMERICAL 3 /* singular I_r + s psi phi in unmerge (W left untouched) */
#define WEGEFT_ERR_NO_CUDA   4 /* built without CUDA, no driver, no such device, cc < 8.0 */
#define WEGEFT_ERR_CUDA      5 /* the CUDA driver, cuBLAS or a kernel launch failed */
#define WEGEFT_ERR_PANIC     6 /* an internal bug, caught at the boundary */

/* dtype codes (storage type of x, W, b, phi, psi, y, G, dx; A, B for LoRA). */
#define WEGEFT_F32  0
#define WEGEFT_BF16 1
#define WEGEFT_F16  2

/* K-extended product paths of wegeft_cuda_set_path. */
#define WEGEFT_PATH_AUTO       0 /* COMPOSED (the faster on an H200 at every measured shape) */
#define WEGEFT_PATH_FUSED      1 /* the fused K-extended GEMM (sm_80 kernels) */
#define WEGEFT_PATH_FUSED_SM90 2 /* the fused GEMM's wgmma kernels on compute capability 9.0 */
#define WEGEFT_PATH_COMPOSED   3 /* cuBLASLt for x W^T / G W, then the rank-r product */
#define WEGEFT_PATH_TUNED      4 /* per shape, the fastest of the above, timed at its first call */

/* x: tokens x d_in, W: d_out x d_in, phi: d_in x rank, psi: rank x d_in, y and G: tokens x d_out. */
typedef struct wegeft_shape {
    size_t tokens;
    size_t d_in;
    size_t d_out;
    size_t rank;
} wegeft_shape;

/* A read-only host matrix: len elements at data; row i starts at element i * ld (0: ld = cols). */
typedef struct wegeft_const_mat {
    const void *data;
    size_t len;
    size_t ld;
} wegeft_const_mat;

/* A writable host matrix, as wegeft_const_mat. */
typedef struct wegeft_mat {
    void *data;
    size_t len;
    size_t ld;
} wegeft_mat;

/* Opaque CUDA handle (one device's primary context, loaded kernels, cuBLASLt). */
typedef struct WegeftCuda wegeft_cuda;

/* ---- misc ---- */

/* The last failed call's message on this thread ("" after a success); valid until the next
 * wegeft call on the same thread; never NULL. */
const char *wegeft_last_error(void);
/* The library version, e.g. "0.1.0" (static). */
const char *wegeft_version(void);
/* A static name for a status code ("WEGEFT_OK", ..., "unknown"). */
const char *wegeft_status_name(int status);
/* 1 if built with the cuda feature, else 0. */
int wegeft_built_with_cuda(void);

/* ---- CPU ---- */

/* y = x W^T + u C^T (+ b). bias (d_out elements, bias_len == d_out) may be NULL. saved_u
 * (tokens x rank, f32) and saved_c (d_out x rank, f32) may be NULL; if given they receive u
 * and C for wegeft_cpu_backward. */
int wegeft_cpu_forward(int dtype, wegeft_shape shape, wegeft_const_mat x, wegeft_const_mat w,
                       const void *bias, size_t bias_len, wegeft_const_mat phi,
                       wegeft_const_mat psi, float scale, wegeft_mat y, float *saved_u,
                       size_t saved_u_len, float *saved_c, size_t saved_c_len);

/* dx = G W + v psi (overwritten; skipped if dx.data is NULL); dphi += s W^T S (d_in x rank),
 * dpsi += v^T x (rank x d_in), both f32 and accumulated. saved_u/saved_c: both from
 * wegeft_cpu_forward of the same inputs, or both NULL (recomputed). */
int wegeft_cpu_backward(int dtype, wegeft_shape shape, wegeft_const_mat x, wegeft_const_mat w,
                        wegeft_const_mat phi, wegeft_const_mat psi, float scale,
                        const float *saved_u, size_t saved_u_len, const float *saved_c,
                        size_t saved_c_len, wegeft_const_mat g, wegeft_mat dx, float *dphi,
                        size_t dphi_len, float *dpsi, size_t dpsi_len);

/* W <- W + s W phi psi, in place. shape.tokens is not used. */
int wegeft_cpu_merge(int dtype, wegeft_shape shape, wegeft_mat w, wegeft_const_mat phi,
                     wegeft_const_mat psi, float scale);

/* W <- W (I + s phi psi)^-1, in place (exact; an r x r solve in f64). */
int wegeft_cpu_unmerge(int dtype, wegeft_shape shape, wegeft_mat w, wegeft_const_mat phi,
                       wegeft_const_mat psi, float scale);

/* LoRA: y = x W^T + s (x A^T) B^T (+ b). bias and saved_xa (tokens x rank, f32) may be NULL. */
int wegeft_cpu_lora_forward(int dtype, wegeft_shape shape, wegeft_const_mat x, wegeft_const_mat w,
                            const void *bias, size_t bias_len, wegeft_const_mat a,
                            wegeft_const_mat b, float scale, wegeft_mat y, float *saved_xa,
                            size_t saved_xa_len);

/* LoRA: dx = G W + s (G B) A (skipped if dx.data is NULL); dA += s (G B)^T x;
 * dB += s G^T (x A^T) (f32, accumulated). saved_xa may be NULL. */
int wegeft_cpu_lora_backward(int dtype, wegeft_shape shape, wegeft_const_mat x, wegeft_const_mat w,
                             wegeft_const_mat a, wegeft_const_mat b, float scale,
                             const float *saved_xa, size_t saved_xa_len, wegeft_const_mat g,
                             wegeft_mat dx, float *da, size_t da_len, float *db, size_t db_len);

/* Many adapters in one batch (multi-tenant serving): y_t = h_t W^T (+ b) with
 * h_t = x_t + s_a (x_t psi_a^T) phi_a^T, a = adapter_of_token[t] (-1: no adapter, h_t = x_t):
 * every token gets its own adapter's layer output, with one frozen GEMM for the whole batch.
 * The pairs are stacked contiguously: phi is adapters x d_in x rank, psi adapters x rank x d_in
 * (dtype); scales holds adapters floats. shape.tokens = adapter_of_token_len; bias may be NULL. */
int wegeft_cpu_multi_forward(int dtype, wegeft_shape shape, size_t adapters, wegeft_const_mat x,
                             wegeft_const_mat w, const void *bias, size_t bias_len, const void *phi,
                             size_t phi_len, const void *psi, size_t psi_len, const float *scales,
                             size_t scales_len, const int32_t *adapter_of_token,
                             size_t adapter_of_token_len, wegeft_mat y);

/* ---- CUDA ---- */

/* Opens device `device` (its primary context); *out receives a handle (NULL on failure).
 * Scratch memory comes from the device's default stream-ordered pool, whose release
 * threshold this raises to the maximum (freed blocks stay cached in the pool; that setting
 * is per device, so it applies to other users of the default pool in the process). */
int wegeft_cuda_create(int device, wegeft_cuda **out);
/* Releases a handle (NULL: nothing to do); its queued work must have finished. */
int wegeft_cuda_destroy(wegeft_cuda *handle);
/* Puts the handle's later forward, backward and LoRA calls on a WEGEFT_PATH_* path (default
 * WEGEFT_PATH_AUTO). TUNED times the paths on the first call of each shape (waiting for its
 * stream, so not during a CUDA graph capture) and keeps the fastest: results are bitwise
 * reproducible within a process, not across processes. */
int wegeft_cuda_set_path(wegeft_cuda *handle, int path);

/* u = x psi^T, C = s W phi (both dtype, written for the backward), y = x W^T + u C^T (+ b);
 * bias may be 0. */
int wegeft_cuda_forward(const wegeft_cuda *handle, void *stream, int dtype, wegeft_shape shape,
                        uint64_t x, uint64_t w, uint64_t bias, uint64_t phi, uint64_t psi,
                        float scale, uint64_t u, uint64_t c, uint64_t y);

/* dx = G W + (G C) psi (skipped if dx is 0); dphi += s W^T G^T u; dpsi += (G C)^T x
 * (dphi, dpsi f32, accumulated). */
int wegeft_cuda_backward(const wegeft_cuda *handle, void *stream, int dtype, wegeft_shape shape,
                         uint64_t x, uint64_t w, uint64_t psi, float scale, uint64_t u,
                         uint64_t c, uint64_t g, uint64_t dx, uint64_t dphi, uint64_t dpsi);

/* W <- W + s W phi psi, in place. shape.tokens is not used. */
int wegeft_cuda_merge(const wegeft_cuda *handle, void *stream, int dtype, wegeft_shape shape,
                      uint64_t w, uint64_t phi, uint64_t psi, float scale);

/* W <- W (I + s phi psi)^-1, in place; synchronises the stream. */
int wegeft_cuda_unmerge(const wegeft_cuda *handle, void *stream, int dtype, wegeft_shape shape,
                        uint64_t w, uint64_t phi, uint64_t psi, float scale);

/* LoRA: xa = s x A^T (dtype, scale included, written for the backward; unlike the CPU's
 * saved_xa), y = x W^T + xa B^T (+ b). */
int wegeft_cuda_lora_forward(const wegeft_cuda *handle, void *stream, int dtype,
                             wegeft_shape shape, uint64_t x, uint64_t w, uint64_t bias,
                             uint64_t a, uint64_t b, float scale, uint64_t xa, uint64_t y);

/* LoRA: dx = G W + s (G B) A (skipped if dx is 0); dA += s (G B)^T x; dB += G^T xa (f32;
 * xa from wegeft_cuda_lora_forward, scale included). */
int wegeft_cuda_lora_backward(const wegeft_cuda *handle, void *stream, int dtype,
                              wegeft_shape shape, uint64_t x, uint64_t w, uint64_t a,
                              uint64_t b, float scale, uint64_t xa, uint64_t g, uint64_t dx,
                              uint64_t da, uint64_t db);

/* Many adapters in one batch on the GPU, as wegeft_cpu_multi_forward on device pointers (x, w,
 * bias (0: none), phi, psi, y: contiguous, dtype). scales and adapter_of_token are HOST arrays:
 * checked, then copied to the device on `stream` before the call returns (reusable at once).
 * shape.rank <= 256. */
int wegeft_cuda_multi_forward(const wegeft_cuda *handle, void *stream, int dtype, wegeft_shape shape,
                              size_t adapters, uint64_t x, uint64_t w, uint64_t bias, uint64_t phi,
                              uint64_t psi, const float *scales, size_t scales_len,
                              const int32_t *adapter_of_token, size_t adapter_of_token_len,
                              uint64_t y);

#ifdef __cplusplus
}
#endif

#endif /* WEGEFT_H */
