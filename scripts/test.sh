#!/usr/bin/env bash
# Runs every test layer (needs scripts/setup.sh first):
#   1. cargo fmt --check, clippy -D warnings and rustdoc -D warnings,
#   2. unit and property tests, the layout check (DESIGN.md §3 dependency rules, `unsafe`
#      only in hypervisor/), and the bare-metal VMM tests on this host's /dev/kvm,
#   3. the end-to-end suite with real Linux guests: directly on hardware KVM, otherwise in
#      the TCG rig. A run in which no e2e test executed is a failure.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
home=${MSB_HOME:-$HOME/.msb}
cd "$root"
echo "== fmt, clippy and docs"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p msb-tests --test e2e --test bench -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace
echo "== unit, property, layout and bare-metal VMM tests"
cargo test --workspace
echo "== end-to-end suite (real Linux guests)"
if "$root/build/static/msb" doctor | grep -q '^/dev/kvm: hardware'; then
  out=$(mktemp)
  MSB_HOME=$home "$root/build/static/msb-e2e" --test-threads=2 2>&1 | tee "$out"
  passed=$(sed -n 's/^test result: ok\. \([0-9]*\) passed.*/\1/p' "$out" | tail -n1)
  [ "${passed:-0}" -gt 0 ] || { echo "test.sh: no e2e test executed" >&2; exit 1; }
else
  MSB_HOME=$home "$root/tests/rig/run-rig.sh" e2e
fi
echo "== all tests passed"
