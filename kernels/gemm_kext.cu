// gemm_kext.cu — the K-extended GEMM core of wegeft (fused WeGeFT forward and input gradient).
//
// ===================================== KERNEL CONTRACT =====================================
// All matrices are row-major; a leading dimension (ld*) is the distance in ELEMENTS between
// two consecutive rows. Compute is f32 (tensor-core f32 accumulation for bf16/f16).
//
//   NT form (forward, y = [x|u] [W|C]^T + b):
//     D[M x N] = A1[M x K1] * B1[N x K1]^T + A2[M x K2] * B2[N x K2]^T  (+ bias[N])  (+ beta * D)
//   NN form (input gradient, dx = [G|v] [W;psi]):
//     D[M x N] = A1[M x K1] * B1[K1 x N]   + A2[M x K2] * B2[K2 x N]    (+ bias[N])  (+ beta * D)
//
//   * One accumulator: the K loop runs over the K1 tiles of (A1,B1), then over the K2 tiles of
//     (A2,B2); one epilogue. K2 may be 0 (a plain GEMM; A2/B2 are then never read and may be
//     null). K1 may be 0 too (then only the second pair contributes).
//   * bias: optional (nullptr = none), N elements in the storage dtype, added in f32.
//   * beta: if beta == 0.0f the old D is NOT read (NaN garbage in D cannot propagate);
//     otherwise D_new = acc + bias + beta * D_old, computed in f32 and rounded once (RN).
//   * M, N >= 1 ; K1, K2 >= 0; every ld >= the number of columns of its matrix; all of them fit
//     in a signed 32-bit int (row offsets are computed in 64 bits).
//   * Tails: any M, N, K1, K2. Out-of-range rows/columns are zero-filled in shared memory
//     (cp.async with src-size < 16 zero-fills the rest of a 16-byte chunk) and never stored.
//   * Alignment: none required beyond the natural 2-byte (bf16/f16) or 4-byte (f32) alignment.
//     The tensor-core kernels test at run time, per operand pair, whether both base pointers
//     are 16-byte aligned and both lds are multiples of 8 elements; if so that pair is fed by
//     16-byte cp.async (the fast path), otherwise by predicated scalar loads stored into the
//     same swizzled shared layout (correct, slower). The epilogue stores two adjacent outputs
//     as one 32-bit word when D is 4-byte aligned and ldd is even, else element by element.
//     So no layout is rejected for alignment; the launcher (src/cuda/gemm.rs) reports which
//     pairs are fast (`GemmKext::fast_path`), and callers should pad rows to 8 elements.
//   * D must not alias A1, B1, A2, B2 or bias.
//
// Kernels (extern "C", the same parameter list for all):
//   gemm_kext_nt_bf16  gemm_kext_nt_f16  gemm_kext_nn_bf16  gemm_kext_nn_f16      (sm_80+)
//   gemm_kext_nt_bf16_wide  gemm_kext_nt_f16_wide  gemm_kext_nn_bf16_wide  gemm_kext_nn_f16_wide
//       (sm_80+, the same body with a 128 x 256 block tile)
//   gemm_kext_nt_f32   gemm_kext_nn_f32                                           (any, FMA)
//   gemm_kext_nt_bf16_sm90  gemm_kext_nn_bf16_sm90  gemm_kext_nt_f16_sm90  gemm_kext_nn_f16_sm90
//       (wgmma in the sm_90a cubin; built for any other target they run the sm_80 body)
//   gemm_kext_nt_bf16_tma   gemm_kext_nn_bf16_tma   gemm_kext_nt_f16_tma   gemm_kext_nn_f16_tma
//       (TMA + wgmma, warp-specialised; sm_90a only; four CUtensorMap parameters first)
//
//   (int M, int N, int K1, int K2,
//    const T* A1, int lda1, const T* B1, int ldb1,
//    const T* A2, int lda2, const T* B2, int ldb2,
//    const T* bias, float beta, T* D, int ldd)
//
// Launch geometry (the launcher computes it; the constants are in the kernels' files, mirrored
// in gemm.rs):
//   tensor-core sm_80: block 256 threads, grid.x = ceil(M/128) * ceil(N/128),
//                      dynamic smem = tc::Narrow::SMEM_BYTES = 65536 B (needs the opt-in
//                      attribute); _wide: grid.x = ceil(M/128) * ceil(N/256), dynamic smem
//                      tc::Wide::SMEM_BYTES = 98304 B.
//   f32 FMA:           block 256 threads, grid.x = ceil(M/64) * ceil(N/64), no dynamic smem.
//   sm_90a:            block 256 threads, grid.x = ceil(M/128) * ceil(N/256),
//                      dynamic smem = h90::SMEM_BYTES = 4 * 48 KiB + 1 KiB = 197632 B.
//   sm_90a TMA:        block 288 threads, the same grid and dynamic smem (t90::SMEM_BYTES),
//                      or fewer blocks (persistent); waits (griddepcontrol.wait) before the
//                      second pair, so it may be launched as a programmatic dependent of the
//                      kernel that writes that pair.
//
// Also here, for the fused forward: wegeft_uc_bf16 / wegeft_uc_f16 compute its second pair,
// u = x psi^T and C = alpha W phi, in one launch (wegeft_uc.cuh); and
// built on the TMA kernel, wegeft_fwd_{bf16,f16}_tma (u, C and y) and wegeft_bwd_{bf16,f16}_tma
// (v, S, dpsi, dphi and dx), the whole forward and backward in one launch each
// (wegeft_rank_tma.cuh).
// ===========================================================================================
//
// The module's source, one concept per file (included below in this order):
//   gemm_common.cuh      PTX helpers (host-emulated in tests/emulation/gemm_on_host.cpp), storage
//                        traits, epilogue stores, swizzles, grouped tile order, chunk loaders
//   gemm_sm80.cuh        the sm_80 tensor-core kernels (both block tiles) and their design
//   wegeft_uc.cuh        wegeft_uc_*: u and C in one launch
//   gemm_f32.cuh         the f32 FMA kernels
//   gemm_sm90.cuh        the sm_90a wgmma kernels fed by cp.async (_sm90)
//   gemm_tma.cuh         the sm_90a wgmma kernels fed by TMA (_tma)
//   wegeft_rank_tma.cuh  wegeft_fwd_*_tma / wegeft_bwd_*_tma, built on the TMA kernels

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "gemm_common.cuh"
#include "gemm_sm80.cuh"
#include "wegeft_uc.cuh"
#include "gemm_f32.cuh"
#include "gemm_sm90.cuh"
#include "gemm_tma.cuh"
#include "wegeft_rank_tma.cuh"
