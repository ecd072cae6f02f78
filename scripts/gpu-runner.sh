#!/usr/bin/env bash
# The GPU machine's half of scripts/gpu-check.sh (copied to gpu-pack/run.sh). No Rust, no
# network: runs the packed binaries. Each step has its own timeout and its status goes into
# the summary table printed last; one failing or hanging step does not stop the others.
# Everything stays under RUNNER_BUDGET_S seconds (default 450); steps that would start after
# that are marked SKIP. Logs go to $OUT (the run tool brings them back) or gpu-pack/logs.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$here/bin"
logs="${OUT:-$here/logs}"
mkdir -p "$logs"
budget="${RUNNER_BUDGET_S:-450}"
start=$(date +%s)
export WEGEFT_REQUIRE_GPU=1
export WEGEFT_FIXTURES="$here/fixtures"

names=(); statuses=(); times=()
record() { names+=("$1"); statuses+=("$2"); times+=("$3"); }

# step NAME TIMEOUT_S COMMAND...: runs it with a timeout, output to $logs/NAME.log (and the
# last lines to the console), records PASS / FAIL(rc) / TIMEOUT / SKIP.
step() {
  local name="$1" limit="$2"; shift 2
  local now left t0 rc
  now=$(date +%s); left=$((budget - (now - start)))
  if [ "$left" -lt 15 ]; then
    record "$name" "SKIP (budget)" 0; echo "== $name: skipped, budget spent"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >"$logs/$name.log" 2>&1
  rc=$?
  tail -n 25 "$logs/$name.log"
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then record "$name" PASS "$dt"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record "$name" "TIMEOUT" "$dt"
  else record "$name" "FAIL (rc $rc)" "$dt"; fi
}

# --- environment: cuBLASLt and compute-sanitizer -------------------------------------------
libdirs=""
for d in /usr/local/cuda/lib64 /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/lib/x86_64-linux-gnu; do
  ls "$d"/libcublasLt.so* >/dev/null 2>&1 && libdirs="$libdirs:$d"
done
if command -v python3 >/dev/null 2>&1; then
  for d in $(python3 - 2>/dev/null <<'PY'
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()])
for r in roots:
    for p in glob.glob(os.path.join(r, "nvidia", "**", "libcublasLt.so*"), recursive=True):
        print(os.path.dirname(p))
PY
  ); do libdirs="$libdirs:$d"; done
fi
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
sanitizer=""
for c in "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer \
         /usr/local/cuda*/compute-sanitizer/compute-sanitizer; do
  [ -n "$c" ] && [ -x "$c" ] && { sanitizer="$c"; break; }
done
{
  echo "commit: $(cat "$here/COMMIT" 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "compute-sanitizer: ${sanitizer:-not found}"
} | tee "$logs/env.log"

# --- tests ---------------------------------------------------------------------------------
step ptxas 20 "$bin/ptxas"
for t in "$bin"/cuda_*; do
  [ -x "$t" ] || continue
  step "$(basename "$t")" 150 "$t"
done

# --- compute-sanitizer on the small case of every kernel ------------------------------------
if [ -n "$sanitizer" ]; then
  step memcheck 75 "$sanitizer" --tool memcheck --error-exitcode 99 --leak-check no "$bin/cuda_layer" sanitize_ --test-threads=1
  step racecheck 60 "$sanitizer" --tool racecheck --error-exitcode 99 "$bin/cuda_layer" sanitize_bf16 --test-threads=1
  step initcheck 60 "$sanitizer" --tool initcheck --error-exitcode 99 "$bin/cuda_layer" sanitize_f32 --test-threads=1
else
  record memcheck "SKIP (no compute-sanitizer)" 0
  record racecheck "SKIP (no compute-sanitizer)" 0
  record initcheck "SKIP (no compute-sanitizer)" 0
fi

# --- benchmarks ------------------------------------------------------------------------------
WEGEFT_BENCH_JSON="$logs/bench.jsonl" step bench 90 "$bin/layer_cuda"
if command -v python3 >/dev/null 2>&1; then
  step torch_baseline 90 python3 "$here/torch_baseline.py" --json "$logs/torch.jsonl"
else
  record torch_baseline "SKIP (no python3)" 0
fi

# --- summary -----------------------------------------------------------------------------------
echo
echo "== bench (wegeft, bf16)"; grep -v '^==' "$logs/bench.log" 2>/dev/null | tail -n 40
echo "== torch baseline (bf16)"; tail -n 30 "$logs/torch_baseline.log" 2>/dev/null
echo
echo "== summary ($(( $(date +%s) - start ))s of ${budget}s)"
printf '%-22s %-28s %s\n' step status seconds
fail=0
for i in "${!names[@]}"; do
  printf '%-22s %-28s %s\n' "${names[$i]}" "${statuses[$i]}" "${times[$i]}"
  case "${statuses[$i]}" in PASS|SKIP*) ;; *) fail=1 ;; esac
done
exit $fail
