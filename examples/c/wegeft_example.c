/*
 * A WeGeFT layer from C through libwegeft.so (include/wegeft.h): forward, backward, then merge
 * the adapter into W and check that the merged layer gives the same y. Build and run from the
 * repository root:
 *
 *   cargo build --release            # target/release/libwegeft.so (add --features cuda for GPU)
 *   cc -std=c11 -O2 -I include examples/c/wegeft_example.c -o wegeft_example \
 *      -L target/release -Wl,-rpath,"$PWD/target/release" -lwegeft -lm
 *   ./wegeft_example
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "wegeft.h"

enum { T = 4, DIN = 8, DOUT = 6, R = 2 };

static int check(int status, const char *what) {
    if (status != WEGEFT_OK) {
        fprintf(stderr, "%s: %s: %s\n", what, wegeft_status_name(status), wegeft_last_error());
        exit(1);
    }
    return status;
}

int main(void) {
    float x[T * DIN], w[DOUT * DIN], b[DOUT], phi[DIN * R], psi[R * DIN], g[T * DOUT];
    float y[T * DOUT], dx[T * DIN], dphi[DIN * R] = {0}, dpsi[R * DIN] = {0};
    for (int i = 0; i < T * DIN; i++) x[i] = sinf(0.3f * i);
    for (int i = 0; i < DOUT * DIN; i++) w[i] = 0.2f * cosf(0.7f * i);
    for (int i = 0; i < DOUT; i++) b[i] = 0.1f * i;
    for (int i = 0; i < DIN * R; i++) phi[i] = 0.1f * sinf(1.3f * i), psi[i] = 0.1f * cosf(0.9f * i);
    for (int i = 0; i < T * DOUT; i++) g[i] = 1.0f; /* dL/dy for L = sum(y) */
    const float scale = 2.0f;                      /* s = alpha / r */
    wegeft_shape s = {T, DIN, DOUT, R};
    /* Matrices: pointer, length in elements, row stride (0 = contiguous). */
    wegeft_const_mat xm = {x, T * DIN, 0}, wm = {w, DOUT * DIN, 0}, phim = {phi, DIN * R, 0},
                     psim = {psi, R * DIN, 0}, gm = {g, T * DOUT, 0};
    wegeft_mat ym = {y, T * DOUT, 0}, dxm = {dx, T * DIN, 0};

    printf("wegeft %s\n", wegeft_version());
    /* y = x W^T + s (x psi^T) (W phi)^T + b */
    check(wegeft_cpu_forward(WEGEFT_F32, s, xm, wm, b, DOUT, phim, psim, scale, ym, NULL, 0, NULL, 0), "forward");
    /* dx = G W + v psi; dphi += s W^T G^T u; dpsi += v^T x (accumulated: start from zeros) */
    check(wegeft_cpu_backward(WEGEFT_F32, s, xm, wm, phim, psim, scale, NULL, 0, NULL, 0, gm, dxm, dphi, DIN * R,
                              dpsi, R * DIN),
          "backward");
    printf("y[0] = %.6f, dphi[0] = %.6f, dpsi[0] = %.6f\n", y[0], dphi[0], dpsi[0]);

    /* W <- W + s W phi psi: the plain layer x W'^T + b now gives the same y. */
    float wmerged[DOUT * DIN];
    for (int i = 0; i < DOUT * DIN; i++) wmerged[i] = w[i];
    wegeft_mat wmm = {wmerged, DOUT * DIN, 0};
    check(wegeft_cpu_merge(WEGEFT_F32, s, wmm, phim, psim, scale), "merge");
    double worst = 0;
    for (int t = 0; t < T; t++)
        for (int o = 0; o < DOUT; o++) {
            double acc = b[o];
            for (int i = 0; i < DIN; i++) acc += (double)x[t * DIN + i] * wmerged[o * DIN + i];
            worst = fmax(worst, fabs(acc - y[t * DOUT + o]));
        }
    printf("max |y - y_merged| = %.3g\n", worst);

    /* Bad input is an error status with a message, never a crash. */
    wegeft_mat short_y = {y, T * DOUT - 1, 0};
    int st = wegeft_cpu_forward(WEGEFT_F32, s, xm, wm, b, DOUT, phim, psim, scale, short_y, NULL, 0, NULL, 0);
    printf("a short y: %s: %s\n", wegeft_status_name(st), wegeft_last_error());

    /* The GPU entry points need a build with --features cuda and a device. */
    wegeft_cuda *h = NULL;
    st = wegeft_cuda_create(0, &h);
    printf("cuda: %s%s%s\n", wegeft_status_name(st), st ? ": " : "", wegeft_last_error());
    wegeft_cuda_destroy(h);
    return worst < 1e-4 && st != WEGEFT_ERR_PANIC ? 0 : 1;
}
