#!/usr/bin/env bash
# The GPU machine's half of scripts/gpu-check.sh (copied to gpu-pack/run.sh). No Rust, no
# network: runs the packed binaries. Each step has its own timeout and its status goes into
# the summary printed last; one failing or hanging step does not stop the others.
#
# Steps, in this order (timeout in seconds; each is also cut to what the budget has left, and a
# step that would start with under 15 s left is marked SKIP):
#   env            nvidia-smi, driver, libraries found, compute-sanitizer found
#   ptxas (20)     the embedded kernels' ptxas report (no spills, every kernel present)
#   cuda_* (90)    the CUDA backend against the float64 reference, WEGEFT_REQUIRE_GPU=1, one test
#                  at a time
#   gemm_check (90)   every fused-GEMM variant (the sm_80 kernels' both tiles included) on the
#                     odd-size grid vs a CPU loop
#   c_abi (60)        tests/c/test_wegeft.c cuda: the C ABI's CUDA entry points vs its CPU path
#   bench (90)        benches/layer_cuda: WeGeFT / LoRA / frozen cuBLASLt, ratios (every path
#                     checked against the composed one)
#   model_bench (90)  benches/model_cuda: a SmolLM2-shaped training step, B=16 S=512 r=8, each layer path
#   torch_model (90)  torch_model.py: the same step in transformers (official-style WeGeFT, peft LoRA,
#                     and our kernels inside transformers through examples/python/wegeft_torch.py)
#   torch_baseline (90)  PyTorch: F.linear, official-style WeGeFT, LoRA, peft LoRA
#   gemm_bench (60)   the GEMM core at 4096^3 vs cuBLAS (every variant: sm_80 128 x 128 and _wide,
#                     _sm90, _tma)
#   gemm_kscan (30)   bf16 NT and NN at K = 1024 / 2048 / 4096, cuBLAS and the TMA kernels: fixed cost
#                     per launch (epilogue, pipeline fill) and cost per 1024 of K
#   gemm_uc (45)      the fused forward's routes at T=8192 d=4096 r=64 and SmolLM2's layers:
#                     cuBLAS u, C + the TMA GEMM; wegeft_uc + the GEMM as its programmatic
#                     dependent; wegeft_fwd in one launch (the same u, C and y required); and the
#                     backward's: cuBLAS v, S, dpsi, dphi + the NN TMA GEMM; wegeft_bwd (the
#                     same v, S and dx; dpsi and dphi within 1e-5)
#   sanitizers (150, cuda_layer's racecheck 240; all side by side): compute-sanitizer memcheck (also tracking the
#                  stream-ordered pool), racecheck, initcheck, synccheck on cuda_layer sanitize_*
#                  (f32, bf16, f16: every kernel of kernels/*.cu, each path, split-K, merge,
#                  dropout); memcheck on gemm_check --small, cuda_model's op-by-op cases,
#                  cuda_multi sanitize_multi; memcheck / racecheck / synccheck on cuda_attention
#   torch_abi (90)    examples/python/test_wegeft_torch.py: the PyTorch layer over the C ABI (CPU
#                     and CUDA tensors) vs the official formulation, training, merge; its bench
#   multi_bench (45)  tests/cuda_multi bench_multi: 1/8/64 adapters in one batch vs one after
#                     another (WeGeFT, LoRA), a markdown table in its log
#   attn_bench (40) / attn_torch (60)  benches/attention_cuda vs PyTorch SDPA (B=16, S=512/2048)
#
# Total under RUNNER_BUDGET_S seconds (default 450; the run tool's timeout_s should be ~540).
# RUNNER_STEPS='regex' runs only the steps whose whole name matches (e.g. a second call for what
# the first one skipped: RUNNER_STEPS='.*memcheck|.*racecheck|initcheck' bash gpu-pack/run.sh).
# Logs: /tmp/gpu-pack-run.*/logs/NAME.log (the path is printed at the end); with $OUT set
# (the run tool), $OUT/all.log grows after every step (so it survives a kill), and at the end
# $OUT/summary.md and $OUT/logs.tar.gz.
# Exit status: 0 only if every step passed (SKIP for budget or a missing tool counts as a
# failure too: the run is meant to check everything).
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Scratch (unpacked binaries, logs) outside the pack: unpacked, the binaries would take the
# pack past the 64 MiB the run tool carries if it were carried again after a run here.
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-pack-run.XXXXXX" 2>/dev/null)" || { work="$here/.run"; mkdir -p "$work"; }
bin="$work/bin"
[ -f "$here/bin.tar.xz" ] || bin="$here/bin"  # an unpacked pack
logs="$work/logs"
rm -rf "$logs"
mkdir -p "$logs"
unpack_msg=""
if [ -f "$here/bin.tar.xz" ]; then
  tar xJf "$here/bin.tar.xz" -C "$work" 2>"$logs/unpack.err" ||
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$here/bin.tar.xz" "$work" \
      2>>"$logs/unpack.err" ||
    unpack_msg="unpacking bin.tar.xz failed: $(head -c 300 "$logs/unpack.err")"
fi
out="${OUT:-}"
[ -n "$out" ] && mkdir -p "$out" && : >"$out/all.log"
budget="${RUNNER_BUDGET_S:-450}"
start=$(date +%s)
export WEGEFT_REQUIRE_GPU=1
export WEGEFT_FIXTURES="$here/fixtures"
export PYTHONUNBUFFERED=1
export RUST_BACKTRACE=0  # panics print file:line and the message (assert_close: the worst element)
steps="$logs/steps.tsv"
: >"$steps"

# record NAME STATUS SECONDS
record() { selected "$1" && printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$steps"; return 0; }
# selected NAME: the step is wanted (every step, or those matching RUNNER_STEPS).
selected() { [ -z "${RUNNER_STEPS:-}" ] || [[ "$1" =~ ^(${RUNNER_STEPS})$ ]]; }

# step NAME TIMEOUT_S COMMAND...: runs it with a timeout, stdout and stderr to
# $logs/NAME.log, records PASS / FAIL (rc N) / TIMEOUT / SKIP (budget), then shows it (its last
# lines on the console, the whole log appended to $OUT/all.log).
step() { run_step "$@" && show "$1"; }

# run_step NAME TIMEOUT_S COMMAND...: step without the showing (for steps run side by side:
# `run_step ... &` each, `wait`, then `show` each); returns 1 when nothing ran.
run_step() {
  local name="$1" limit="$2"; shift 2
  local now left t0 rc dt
  if ! selected "$name"; then
    echo "== $name: not selected (RUNNER_STEPS)"; return 1
  fi
  now=$(date +%s); left=$((budget - (now - start)))
  if [ "$left" -lt 15 ]; then
    record "$name" "SKIP (budget)" 0; echo "== $name: skipped, budget spent"; return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  t0=$(date +%s)
  { echo "\$ $*"; echo; } >"$logs/$name.log"
  timeout --kill-after=5 "$limit" "$@" >>"$logs/$name.log" 2>&1 </dev/null
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  echo "$rc $dt" >"$logs/$name.rc"
  if [ $rc -eq 0 ]; then record "$name" PASS "$dt"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record "$name" "TIMEOUT (${limit}s)" "$dt"
  else record "$name" "FAIL (rc $rc)" "$dt"; fi
  return 0
}

# show NAME: the finished step's last log lines on the console, its whole log into all.log.
show() {
  local name="$1" rc dt
  [ -f "$logs/$name.rc" ] || return 0
  read -r rc dt <"$logs/$name.rc"
  echo "== $name: rc $rc, ${dt}s"
  tail -n 15 "$logs/$name.log"
  if [ -n "$out" ]; then
    { echo "=================== $name: rc $rc, ${dt}s"; cat "$logs/$name.log"; echo; } >>"$out/all.log"
  fi
}

# --- environment: cuBLAS(Lt), compute-sanitizer, python ----------------------------------------
libdirs=""
for d in /usr/local/cuda/lib64 /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/lib/x86_64-linux-gnu; do
  ls "$d"/libcublasLt.so* >/dev/null 2>&1 && libdirs="$libdirs:$d"
done
py=""
command -v python3 >/dev/null 2>&1 && py="$(command -v python3)"
if [ -n "$py" ]; then
  # The NVIDIA wheels (PyTorch's): nvidia/cu13/lib (CUDA 13), nvidia/cublas/lib (before).
  for d in $(timeout 30 "$py" - 2>/dev/null <<'PY'
import glob, os, site
roots = set(site.getsitepackages() + [site.getusersitepackages()])
seen = set()
for r in sorted(roots):
    for p in sorted(glob.glob(os.path.join(r, "nvidia", "**", "libcublasLt.so*"), recursive=True)):
        d = os.path.dirname(p)
        if d not in seen:
            seen.add(d)
            print(d)
PY
  ); do libdirs="$libdirs:$d"; done
fi
# For our binaries (cudarc dlopens libcublasLt / libcublas by name). PyTorch keeps the
# original: a toolkit folder ahead of its own wheels could give it a cuBLAS it was not built for.
orig_ldp="${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# compute-sanitizer: the machine's (the toolkit's, version 2025.3.1 with driver 580 there).
sanitizer=""
for c in "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer \
         /usr/local/cuda*/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
  [ -n "$c" ] && [ -x "$c" ] && { sanitizer="$c"; break; }
done
gpu="$(timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1)"
[ -n "$gpu" ] || gpu="(nvidia-smi printed nothing)"
{
  echo "commit: $(tr '\n' ' ' <"$here/COMMIT" 2>/dev/null)"
  echo "gpu (name, driver): $gpu"
  timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | head -3
  echo "host: $(uname -srm); $(nproc) cpus"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "compute-sanitizer: ${sanitizer:-not found} $([ -n "$sanitizer" ] && timeout 20 "$sanitizer" --version 2>&1 | tail -1)"
  echo "libraries: $(ldconfig -p 2>/dev/null | grep -oE 'lib(cuda|cublasLt)\.so[.0-9]*' | sort -u | tr '\n' ' ')"
  timeout 20 nvidia-smi --query-gpu=persistence_mode,clocks.sm,temperature.gpu --format=csv 2>&1 | tail -1
  echo "python3: ${py:-not found}"
  [ -n "$unpack_msg" ] && echo "$unpack_msg"
  ls -la "$bin"
} >"$logs/env.log" 2>&1
cat "$logs/env.log"
[ -n "$out" ] && { echo "=================== env"; cat "$logs/env.log"; echo; } >>"$out/all.log"

# have NAME: the packed binary exists (else recorded as MISSING, a failure).
have() { [ -x "$bin/$1" ] && return 0; record "$1" "MISSING (bin/$1)" 0; return 1; }

# --- correctness ---------------------------------------------------------------------------------
have ptxas && step ptxas 20 "$bin/ptxas"
n_cuda=0
for t in "$bin"/cuda_*; do
  [ -x "$t" ] || continue
  n_cuda=$((n_cuda + 1))
  # One test at a time: a sticky device error then names its test, and cuda_oom's
  # device-filling test cannot starve the others.
  step "$(basename "$t")" 90 "$t" --test-threads=1
done
[ $n_cuda -gt 0 ] || record "cuda_*" "MISSING (bin/cuda_*)" 0
have gemm_kext_check && step gemm_check 90 "$bin/gemm_kext_check"
# The C ABI (include/wegeft.h) on the GPU: wegeft_cuda_* against the library's CPU path.
have test_wegeft_c && step c_abi 60 "$bin/test_wegeft_c" cuda

py_step() {  # py_step NAME TIMEOUT SCRIPT ARGS...: a PyTorch script (its own LD_LIBRARY_PATH)
  local name="$1" limit="$2"; shift 2
  if [ -n "$py" ]; then step "$name" "$limit" env LD_LIBRARY_PATH="$orig_ldp" "$py" -u "$@"
  else record "$name" "SKIP (no python3)" 0; fi
}
# --- benchmarks: the layer, the GEMM core and the training step against PyTorch ---------------------
have layer_cuda && WEGEFT_BENCH_ITERS=30 WEGEFT_BENCH_JSON="$logs/bench.jsonl" step bench 90 "$bin/layer_cuda"
have model_cuda && WEGEFT_BENCH_JSON="$logs/model.jsonl" step model_bench 90 "$bin/model_cuda"
py_step torch_model 90 "$here/torch_model.py" --json "$logs/torch_model.jsonl" --wegeft-lib "$bin/libwegeft.so"
py_step torch_baseline 90 "$here/torch_baseline.py" --iters 30 --json "$logs/torch.jsonl"
[ -x "$bin/gemm_kext_check" ] && step gemm_bench 60 "$bin/gemm_kext_check" --bench
[ -x "$bin/gemm_kext_check" ] && step gemm_kscan 30 "$bin/gemm_kext_check" --kscan
[ -x "$bin/gemm_kext_check" ] && step gemm_uc 45 "$bin/gemm_kext_check" --uc

# --- compute-sanitizer on the small cases, side by side (each tool instruments on the CPU) --------
san_steps="gemm_memcheck memcheck racecheck initcheck synccheck model_memcheck multi_memcheck attn_memcheck attn_racecheck attn_synccheck"
if [ -n "$sanitizer" ]; then
  san=("$sanitizer" --error-exitcode 99 --print-limit 30)
  # memcheck also tracks the stream-ordered pool (use after free, overruns into a neighbour:
  # freed blocks stay mapped in the pool, so plain memcheck cannot see them).
  mem=("${san[@]}" --tool memcheck --leak-check no --track-stream-ordered-races all --padding 256)
  started=""
  bg() { run_step "$@" & started="$started $1"; }
  [ -x "$bin/gemm_kext_check" ] && bg gemm_memcheck 150 "${mem[@]}" "$bin/gemm_kext_check" --small
  if [ -x "$bin/cuda_layer" ]; then
    # Every dtype under every tool: the f32 fused GEMM (fm::) and the bf16/f16 tensor-core and
    # sm90 ones are different code, and each kernel is instantiated per dtype.
    bg memcheck 150 "${mem[@]}" "$bin/cuda_layer" sanitize_ --test-threads=1
    # racecheck instruments every shared-memory access: 84 s of 150 in session 9, before the
    # one-launch kernels' and the wide sm_80 tile's cases joined sanitize_.
    bg racecheck 240 "${san[@]}" --tool racecheck "$bin/cuda_layer" sanitize_ --test-threads=1
    bg initcheck 150 "${san[@]}" --tool initcheck "$bin/cuda_layer" sanitize_ --test-threads=1
    bg synccheck 150 "${san[@]}" --tool synccheck "$bin/cuda_layer" sanitize_ --test-threads=1
  fi
  # The model-op kernels (embedding, rmsnorm, rope, swiglu, xent, adamw, elementwise, the LM
  # head's chunks) and multi_edit, on their small op-by-op cases.
  [ -x "$bin/cuda_model" ] && bg model_memcheck 150 "${mem[@]}" "$bin/cuda_model" elementwise_ops_match_cpu products_match_cpu --test-threads=1
  [ -x "$bin/cuda_multi" ] && bg multi_memcheck 150 "${mem[@]}" "$bin/cuda_multi" sanitize_multi --test-threads=1
  if [ -x "$bin/cuda_attention" ]; then
    bg attn_memcheck 150 "${mem[@]}" "$bin/cuda_attention" sanitize_attention --test-threads=1
    bg attn_racecheck 150 "${san[@]}" --tool racecheck "$bin/cuda_attention" sanitize_attention --test-threads=1
    bg attn_synccheck 150 "${san[@]}" --tool synccheck "$bin/cuda_attention" sanitize_attention --test-threads=1
  fi
  wait
  for s in $started; do show "$s"; done
else
  for s in $san_steps; do record "$s" "SKIP (no compute-sanitizer)" 0; done
fi

# --- the library from PyTorch (ctypes), in PyTorch's own environment as a user runs it (the
# library's cudarc then finds cuBLASLt through the copy PyTorch has loaded) ------------------------
[ -f "$bin/libwegeft.so" ] && py_step torch_abi 90 "$here/python/test_wegeft_torch.py" \
  --lib "$bin/libwegeft.so" --device all --bench

# --- the other benchmarks ----------------------------------------------------------------------
have cuda_multi && WEGEFT_BENCH_ITERS=20 step multi_bench 45 "$bin/cuda_multi" bench_ --ignored --nocapture --test-threads=1
have attention_cuda && WEGEFT_BENCH_ITERS=20 step attn_bench 40 "$bin/attention_cuda"
py_step attn_torch 60 "$here/torch_sdpa.py" --iters 20

# --- logs of the failed steps, then the summary (last) ----------------------------------------------
while IFS=$'\t' read -r name status secs; do
  case "$status" in PASS) continue ;; esac
  [ -f "$logs/$name.log" ] || continue
  echo
  echo "== $name: $status. Error lines (first 25), then the log's last 25 lines (stdout and stderr):"
  grep -n -A2 -E "panicked at|^FAIL|FAILED|[Ee]rror|Traceback|Invalid|out of bounds|Hazard" "$logs/$name.log" | head -n 25
  echo "   ..."
  tail -n 25 "$logs/$name.log"
done <"$steps"

total=$(( $(date +%s) - start ))
summary="$logs/summary.md"
if [ -n "$py" ] && [ -f "$here/summary.py" ] && \
   timeout 30 "$py" "$here/summary.py" --logs "$logs" --gpu "$gpu" --commit "$(tr '\n' ' ' <"$here/COMMIT" 2>/dev/null)" \
     --total "$total" --budget "$budget" >"$summary" 2>"$logs/summary.err"; then
  :
else
  # Without python3: the step table alone.
  {
    echo "## GPU check: $gpu, commit $(tr '\n' ' ' <"$here/COMMIT" 2>/dev/null), ${total}s of ${budget}s"
    echo "(summary.py failed or no python3: $(tail -n 3 "$logs/summary.err" 2>/dev/null | tr '\n' ' '))"
    echo
    echo "| step | status | s |"
    echo "|---|---|---|"
    while IFS=$'\t' read -r name status secs; do echo "| $name | $status | $secs |"; done <"$steps"
  } >"$summary"
fi
[ -n "${RUNNER_STEPS:-}" ] && echo "partial run: only the steps matching RUNNER_STEPS='${RUNNER_STEPS}'" >>"$summary"
fail=0
while IFS=$'\t' read -r name status secs; do
  [ "$status" = PASS ] || fail=1
done <"$steps"
echo "overall: $([ $fail -eq 0 ] && echo PASS || echo FAIL)" >>"$summary"
if [ -n "$out" ]; then
  cp "$summary" "$out/summary.md"
  tar czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null
fi
echo "logs: $logs${out:+ (and $out)}"
echo
cat "$summary"
exit $fail
