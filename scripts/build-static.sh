#!/usr/bin/env bash
# Builds static (crt-static, glibc) binaries of msb, agentd and the test suites into DEST:
#   DEST/msb  DEST/agentd  DEST/msb-e2e  DEST/msb-bench, and DEST/msb-hooks (msb with the
#   test-only `test-hooks` feature, which only the e2e suite's lockdown tests run)
# Static binaries run in the guest initramfs and in the rig's busybox-only L1.
set -euo pipefail
dest=${1:?usage: build-static.sh DEST}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dest"
export RUSTFLAGS="-C target-feature=+crt-static"
export CARGO_TARGET_DIR="$root/target/static"
target=x86_64-unknown-linux-gnu
cd "$root"
cargo build --release --target $target -p msb-cli --bin msb --features test-hooks
cp "$CARGO_TARGET_DIR/$target/release/msb" "$dest/msb-hooks"
cargo build --release --target $target -p msb-agentd -p msb-cli --bin agentd --bin msb
cp "$CARGO_TARGET_DIR/$target/release/agentd" "$CARGO_TARGET_DIR/$target/release/msb" "$dest/"
# The e2e suite and benchmark are test-harness binaries; find them from cargo's JSON output.
cargo test --release --target $target -p msb-tests --test e2e --test bench --no-run --message-format=json \
  | python3 -c '
import json, sys, shutil
dest = sys.argv[1]
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"): continue
    name = m["target"]["name"]
    if name in ("e2e", "bench"):
        shutil.copy(m["executable"], f"{dest}/msb-{name}")
        print(f"built {dest}/msb-{name}")
' "$dest"
for b in msb msb-hooks agentd msb-e2e msb-bench; do
  [ -x "$dest/$b" ] || { echo "build-static.sh: $dest/$b was not built" >&2; exit 1; }
done
echo "static binaries in $dest"
