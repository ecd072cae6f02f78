#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECONDS each (default 60), one after the other, and
# prints a table: target, executions, executions per second, corpus size, crashes.
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Built in release
# mode with debug assertions and overflow checks (an overflow is a crash), no sanitizer (the
# readers are safe Rust; ASan halves the speed). Each target starts from its committed seeds
# (fuzz/seeds/<target>/) plus what earlier runs kept (fuzz/corpus/<target>/, ignored by git).
# Crash inputs land in fuzz/artifacts/<target>/; keep each one as a regression test
# (tests/fuzz_regressions.rs). Env: FUZZ_RUNS=N also stops a target after N executions;
# FUZZ_TARGET_DIR overrides the build directory (default fuzz/target).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then targets=(gguf tokenizer adapter safetensors jsonl); fi
tdir=()
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then tdir=(--target-dir "$FUZZ_TARGET_DIR"); fi
flags=(-s none -a "${tdir[@]}")
cargo +nightly fuzz build "${flags[@]}" >&2
extra=()
if [ -n "${FUZZ_RUNS:-}" ]; then extra+=("-runs=$FUZZ_RUNS"); fi
rows=()
total_crashes=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="fuzz/artifacts/$t/last-run.log"
    before=$(find "fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)
    set +e
    cargo +nightly fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" "${extra[@]}" >"$log" 2>&1
    rc=$?
    set -e
    after=$(find "fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)
    crashes=$((after - before))
    total_crashes=$((total_crashes + crashes))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n1)
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    rows+=("| $t | ${execs:-?} | ${rate:-?} | $corpus | $crashes | $rc |")
    echo "$t: ${execs:-?} executions, ${rate:-?}/s, $crashes new crash files (exit $rc; log $log)" >&2
done
echo "| target | executions | exec/s | corpus | crashes | exit |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
[ "$total_crashes" -eq 0 ]
