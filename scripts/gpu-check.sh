#!/usr/bin/env bash
# Builds everything the GPU machine needs and packs it into the ignored gpu-pack/:
# release test binaries and the GPU benchmarks (layer_cuda, attention_cuda; feature cuda, debug info stripped), the
# standalone fused-GEMM check kernels/test/gemm_kext_check.cu (nvcc: sm_80 + sm_90a cubins and
# compute_80 PTX, cudart static, cuBLAS dlopen'ed there), the layer fixtures, the runner
# (gpu-pack/run.sh), its summary maker (summary.py) and the PyTorch side-by-side script.
# The GPU machine has the driver, compute-sanitizer, PyTorch and peft, but no Rust and no
# network. (The PyPI wheel nvidia-cuda-sanitizer-api 13.0.85, once packed too, ran there but
# failed on every program with "couldn't find exit code"; the machine's own 2025.3.1 works.)
# The pack records the commit it was built from (COMMIT); a commit made
# while it builds is an error.
#
#   bash scripts/gpu-check.sh          # here
#   bash gpu-pack/run.sh               # there (the run tool: carry ["gpu-pack"])
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
pack="$root/gpu-pack"
limit_mib=64
# Test targets whose binaries go to the GPU: every tests/cuda_*.rs plus the ptxas check.
gpu_tests="ptxas $(ls tests/cuda_*.rs 2>/dev/null | xargs -n1 basename 2>/dev/null | sed 's/\.rs$//' | tr '\n' ' ')"

head0="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
dirty0="$(git status --porcelain 2>/dev/null)"
bash scripts/setup-cuda.sh >/dev/null
command -v python3 >/dev/null || { echo "gpu-check.sh: needs python3 to read cargo's JSON" >&2; exit 1; }

rm -rf "$pack"
mkdir -p "$pack/bin" "$pack/fixtures"
json="$(mktemp)"
trap 'rm -f "$json"' EXIT

echo "gpu-check.sh: building release test binaries (features cuda)..." >&2
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_BENCH_DEBUG=0 \
  cargo test --release --features cuda --no-run --message-format=json >"$json"
echo "gpu-check.sh: building the GPU benchmark..." >&2
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_BENCH_DEBUG=0 \
  cargo bench --features cuda --bench layer_cuda --bench model_cuda --bench attention_cuda --no-run --message-format=json >>"$json"

# Pick the executables of the wanted test targets and of the benchmark.
python3 - "$json" "$pack/bin" $gpu_tests <<'PY'
import json, shutil, sys, os
src, dest, wanted = sys.argv[1], sys.argv[2], set(sys.argv[3:])
found = {}
for line in open(src):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    kinds = set(t["kind"])
    if ("test" in kinds and t["name"] in wanted) or ("bench" in kinds and t["name"] in ("layer_cuda", "model_cuda", "attention_cuda")):
        found[t["name"]] = m["executable"]
for line in open(src):  # the C ABI library (the crate's cdylib), for tests/c/test_wegeft.c
    m = json.loads(line) if line.startswith("{") else {}
    if m.get("reason") == "compiler-artifact" and "cdylib" in m["target"]["kind"]:
        found.update({"libwegeft.so": f for f in m["filenames"] if f.endswith(".so")})
missing = (wanted | {"layer_cuda", "model_cuda", "attention_cuda", "libwegeft.so"}) - set(found)
if missing:
    sys.exit(f"gpu-check.sh: no executable for {sorted(missing)}")
for name, exe in sorted(found.items()):
    shutil.copy2(exe, os.path.join(dest, name))
    print(f"  {name:<12} <- {exe}", file=sys.stderr)
PY

# The C ABI test program against the packed library (the runner's c_abi step).
cc -std=c11 -O2 -I include tests/c/test_wegeft.c -o "$pack/bin/test_wegeft_c" -L "$pack/bin" \
  -Wl,-rpath,'$ORIGIN' -lwegeft -ldl -lm

# The standalone fused-GEMM check (rebuilt only when its sources change: nvcc takes minutes).
cuda_py="${CUDA_PY:-$root/.cuda/py/nvidia/cu13}"
nvcc="$cuda_py/bin/nvcc"
[ -x "$nvcc" ] || { echo "gpu-check.sh: no nvcc at $nvcc (scripts/setup-cuda.sh)" >&2; exit 1; }
gk_cache="${CARGO_TARGET_DIR:-$root/target}/gpu-pack-cache"
mkdir -p "$gk_cache"
# Named by a hash of its sources: a target folder shared by several checkouts cannot hand
# one of them another's binary.
gk_hash="$(cat kernels/gemm_kext.cu kernels/gemm_*.cuh kernels/wegeft_*.cuh kernels/test/gemm_kext_check.cu kernels/common.cuh | sha256sum | head -c 16)"
gk="$gk_cache/gemm_kext_check-$gk_hash"
if [ ! -x "$gk" ]; then
  echo "gpu-check.sh: building kernels/test/gemm_kext_check.cu (nvcc)..." >&2
  "$nvcc" -O2 -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
    -gencode arch=compute_80,code=compute_80 -I "$cuda_py/include" -I "$cuda_py/include/cccl" \
    -L "$cuda_py/lib" -o "$gk.tmp" kernels/test/gemm_kext_check.cu -ldl
  mv "$gk.tmp" "$gk"
fi
cp "$gk" "$pack/bin/gemm_kext_check"
echo "  gemm_kext_check <- $gk" >&2

for f in "$pack"/bin/*; do strip --strip-debug "$f" 2>/dev/null || true; done
ls -la "$pack/bin" >&2
# Each Rust binary carries the same kernel images (PTX + cubins, ~20 MB): xz -9 (a 64 MiB
# window) stores them once across the binaries — ~250 MB of binaries become ~4 MB (gzip's 32 KiB
# window gave ~49 MB, near the run tool's 64 MiB). run.sh unpacks (tar xJf, or Python's lzma).
tar cf - -C "$pack" bin | xz -9 -T1 >"$pack/bin.tar.xz"
rm -rf "$pack/bin"

fixtures="${WEGEFT_FIXTURES:-$root/../shared/fixtures}"
[ -d "$fixtures/layer" ] || { echo "gpu-check.sh: fixtures not found at $fixtures/layer" >&2; exit 1; }
cp -r "$fixtures/layer" "$pack/fixtures/"
cp scripts/gpu-runner.sh "$pack/run.sh"
cp scripts/torch_baseline.py "$pack/torch_baseline.py"
cp scripts/torch_model.py "$pack/torch_model.py"
cp scripts/torch_sdpa.py "$pack/torch_sdpa.py"
cp scripts/gpu_summary.py "$pack/summary.py"
mkdir -p "$pack/python"
cp examples/python/wegeft.py examples/python/wegeft_torch.py examples/python/test_wegeft_torch.py "$pack/python/"
head1="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$head1" != "$head0" ] || [ "$(git status --porcelain 2>/dev/null)" != "$dirty0" ]; then
  echo "gpu-check.sh: the tree changed while the pack was built ($head0 -> $head1); run it again" >&2
  exit 1
fi
echo "$head0" >"$pack/COMMIT"
if [ -n "$dirty0" ]; then
  echo "(with uncommitted changes)" >>"$pack/COMMIT"
  echo "gpu-check.sh: WARNING: the tree has uncommitted changes; the pack's results will not name a commit" >&2
fi

size_kib=$(du -sk "$pack" | cut -f1)
if [ "$size_kib" -gt $((limit_mib * 1024)) ]; then
  echo "gpu-check.sh: gpu-pack is $((size_kib / 1024)) MiB, over the ${limit_mib} MiB the run tool carries" >&2
  exit 1
fi
echo "gpu-check.sh: gpu-pack/ ready ($((size_kib / 1024)) MiB, commit $(head -1 "$pack/COMMIT"))" >&2
ls -la "$pack" >&2
echo
echo "On the GPU machine run:   bash gpu-pack/run.sh"
echo "(run tool: command \"bash gpu-pack/run.sh\", carry [\"gpu-pack\"], timeout_s 540; the runner keeps to"
echo " RUNNER_BUDGET_S=450 s; logs come back as \$OUT/all.log, summary.md, logs.tar.gz)"
