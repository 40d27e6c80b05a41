#!/usr/bin/env bash
# Runs every fuzz target (cargo fuzz, nightly) for a bounded time each, from the seeds kept in
# the repository plus a working corpus under build/fuzz-corpus/ (grown by earlier runs, never
# committed). Prints one line per target: executions, corpus size, and where a crash went.
# A crash fails the run; reproduce it with `cargo +nightly fuzz run TARGET ARTIFACT` in the
# target's crate, and keep it as a regression test.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 20)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-20}
cargo +nightly --version >/dev/null 2>&1 || { echo "fuzz.sh: needs a nightly toolchain (rustup toolchain install nightly)" >&2; exit 2; }
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
total=0
for crate in fuzz net-gateway/fuzz; do
  cd "$root/$crate"
  cargo +nightly fuzz build -O 2>&1 | tail -n 1
  for t in $(cargo +nightly fuzz list); do
    work="$root/build/fuzz-corpus/${crate//\//-}/$t"
    mkdir -p "$work"
    seeds=()
    for d in "seeds/$t" "corpus/$t"; do [ -d "$d" ] && seeds+=("$d"); done
    log=$(mktemp)
    start=$SECONDS
    if ! cargo +nightly fuzz run -O "$t" "$work" "${seeds[@]}" -- -max_total_time="$secs" -print_final_stats=1 \
        -rss_limit_mb=2048 -timeout=10 >"$log" 2>&1; then
      tail -n 40 "$log"
      echo "FUZZ-CRASH $crate $t: see $(grep -o 'artifacts/[^ ]*' "$log" | tail -n 1)" >&2
      exit 1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    echo "FUZZ $crate $t: ${execs:-?} executions in $((SECONDS - start)) s, corpus $(find "$work" -type f | wc -l) files"
    total=$((total + ${execs:-0}))
    rm -f "$log"
  done
done
echo "FUZZ: every target ran, $total executions in all"
