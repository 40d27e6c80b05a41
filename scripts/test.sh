#!/usr/bin/env bash
# Runs every test layer (needs scripts/setup.sh first):
#   1. cargo fmt --check, clippy -D warnings and rustdoc -D warnings,
#   2. unit and property tests, the layout check (DESIGN.md §3 dependency rules, `unsafe`
#      only in hypervisor/), and the bare-metal VMM tests on this host's /dev/kvm; then every
#      fuzz target for a bounded time (scripts/fuzz.sh; needs the nightly toolchain),
#   3. the end-to-end suite with real Linux guests: directly on hardware KVM, otherwise in
#      the TCG rig. A run in which no e2e test executed is a failure.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
home=${MSB_HOME:-$HOME/.msb}
cd "$root"
echo "== fmt, clippy and docs ($SECONDS s so far)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p msb-tests --test e2e --test bench -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace
echo "== unit, property, layout and bare-metal VMM tests ($SECONDS s so far)"
cargo test --workspace
echo "== fuzz targets, ${MSB_FUZZ_SECONDS:-20} s each ($SECONDS s so far)"
"$root/scripts/fuzz.sh" "${MSB_FUZZ_SECONDS:-20}"
echo "== end-to-end suite (real Linux guests; $SECONDS s so far)"
# The part run once more with every sandbox process in seccomp's log mode: nothing its filter
# would refuse may be recorded (the full run already fails on any one call; this one lists
# every call a path needs at once). The named-sandbox paths: start, exec, PTY, copies and the
# file API, shares, the network and secrets.
log_part="cli_lifecycle cli_pty images_msb_cp_round_trips_a_file images_the_sdk_file_api mounts_no_escape mounts_a_named_volume mounts_files_appear net::a_policy_tightened net::a_published net::an_explicit_rule net::the_default_network secrets::"
if "$root/build/static/msb" doctor | grep -q '^/dev/kvm: hardware'; then
  out=$(mktemp)
  MSB_HOME=$home "$root/build/static/msb-e2e" --test-threads=2 2>&1 | tee "$out"
  passed=$(sed -n 's/^test result: ok\. \([0-9]*\) passed.*/\1/p' "$out" | tail -n1)
  [ "${passed:-0}" -gt 0 ] || { echo "test.sh: no e2e test executed" >&2; exit 1; }
  echo "== end-to-end, seccomp log mode (a part; $SECONDS s so far)"
  rec=$(mktemp -u)
  # shellcheck disable=SC2086 # one filter per word
  MSB_HOME=$home MSB_SECCOMP=log MSB_SECCOMP_LOG_FILE=$rec "$root/build/static/msb-e2e" --test-threads=2 $log_part
  if [ -s "$rec" ]; then cat "$rec"; echo "test.sh: seccomp's log mode recorded the calls above" >&2; exit 1; fi
else
  MSB_HOME=$home "$root/tests/rig/run-rig.sh" e2e
  echo "== end-to-end, seccomp log mode (a part; $SECONDS s so far)"
  MSB_HOME=$home RIG_SECCOMP_LOG=1 RIG_E2E_ARGS="$log_part" "$root/tests/rig/run-rig.sh" e2e
fi
echo "== all tests passed ($SECONDS s)"
