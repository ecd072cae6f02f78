#!/usr/bin/env bash
# Compile checks of kernels/gemm_kext.cu without a GPU (run from the crate root):
#   * compute_80 PTX (what build.rs embeds as the portable fallback),
#   * sm_80 and sm_90a cubins with ptxas -v: fails on any spill or stack frame,
#   * the standalone harness kernels/test/gemm_kext_check.cu (binary: target/gemm_kext_check;
#     scripts/gpu-check.sh builds the same into gpu-pack/bin).
# nvcc comes from the PyPI wheels in .cuda/ (scripts/setup-cuda.sh or the pip line in the
# task); override with CUDA_PY=/path/to/nvidia/cu13.
set -euo pipefail
CUDA_PY=${CUDA_PY:-$PWD/.cuda/py/nvidia/cu13}
NVCC="$CUDA_PY/bin/nvcc"
INC=(-I "$CUDA_PY/include" -I "$CUDA_PY/include/cccl")
OUT=${OUT:-$(mktemp -d)}
"$NVCC" -ptx -arch=compute_80 "${INC[@]}" kernels/gemm_kext.cu -o "$OUT/gemm_kext.ptx"
status=0
for a in 80 90a; do
  "$NVCC" -cubin -gencode "arch=compute_$a,code=sm_$a" "${INC[@]}" -Xptxas -v \
    kernels/gemm_kext.cu -o "$OUT/gemm_kext_sm_$a.cubin" 2> "$OUT/ptxas_$a.txt"
  # One line per kernel: name, registers, stack, spills.
  awk -v arch="sm_$a" '
    /Function properties for/ { name = $NF }
    /stack frame/ { stack = $1; st = $5; ld = $9; if (stack != 0 || st != 0 || ld != 0) bad = 1 }
    /Used [0-9]+ registers/ { for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1);
                              printf "%-7s %-26s %3s regs  stack %s  spill st %s ld %s\n", arch, name, regs, stack, st, ld }
    END { exit bad }' "$OUT/ptxas_$a.txt" || { echo "spills or stack in sm_$a"; status=1; }
done
mkdir -p target
# sm_80 and sm_90a machine code plus compute_80 PTX (JIT for anything newer); cuBLAS is
# dlopen'ed by the harness at run time, so no cuBLAS header or library is needed here.
"$NVCC" -O2 -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
  -gencode arch=compute_80,code=compute_80 "${INC[@]}" -L "$CUDA_PY/lib" -o target/gemm_kext_check \
  kernels/test/gemm_kext_check.cu -ldl
echo "harness: target/gemm_kext_check"
exit $status
