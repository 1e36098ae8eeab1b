#!/usr/bin/env bash
# Runs each fuzz target of Courier's protocol core for a fixed time.
#
#   runtime/fuzz/run.sh SECONDS [TARGET...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). cargo-fuzz passes
# nightly-only flags to rustc; on a stable toolchain RUSTC_BOOTSTRAP=1 lets
# it. Seeds (real frames, see runtime/examples/fuzz_seeds.rs) are rewritten
# into seeds/ first; what the fuzzer learns goes to corpus/ (not committed).
# Crashes land in artifacts/<target>/ and make the script fail. A summary of
# executions per target is printed at the end and kept in summary.txt.
#
# Environment: FUZZ_SANITIZER (default "none": the runtime crate forbids
# unsafe code, so AddressSanitizer mostly watches dependencies, at half the
# speed; "address" turns it on), FUZZ_JOBS (default 1: libFuzzer processes
# per target).
set -euo pipefail
shopt -s nullglob
secs=${1:?usage: run.sh SECONDS [TARGET...]}
shift
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(frame handshake envelope cbor)
fi
sanitizer=${FUZZ_SANITIZER:-none}
jobs=${FUZZ_JOBS:-1}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

(cd "$root" && cargo run -q -p courier-runtime --features __fuzzing --example fuzz_seeds -- "$here/seeds")

cd "$here"
summary="$here/summary.txt"
: >"$summary"
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$here/artifacts/$t/last-run.log"
    echo "== $t: ${secs}s (sanitizer $sanitizer)"
    par=()
    if [ "$jobs" -gt 1 ]; then
        par=(-jobs="$jobs" -workers="$jobs")
    fi
    set +e
    cargo fuzz run -s "$sanitizer" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=512 \
        -max_len=8192 -timeout=10 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        "${par[@]}" >"$log" 2>&1
    rc=$?
    set -e
    execs=$(awk '/stat::number_of_executed_units/ {s += $2} END {print s + 0}' "$log" fuzz-*.log)
    rm -f fuzz-*.log
    crashes=$(find "artifacts/$t" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)
    corpus=$(find "corpus/$t" -type f | wc -l)
    line="$t: $execs executions in ${secs}s, corpus $corpus inputs, $crashes crash files, exit $rc"
    echo "$line" | tee -a "$summary"
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        tail -n 40 "$log"
    fi
done
echo
cat "$summary"
exit "$failed"
