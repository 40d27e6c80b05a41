#!/usr/bin/env bash
# Runs a job in the rig (QEMU TCG L1 with emulated AMD-V; our msb boots L2 guests inside).
#
#   tests/rig/run-rig.sh e2e            the end-to-end suite; fails if it ran no test
#                                       (RIG_E2E_ARGS="cli::" runs only the tests matching it;
#                                       RIG_E2E_THREADS=2 runs two at a time, default one)
#   tests/rig/run-rig.sh demo           msb run -- uname -a, and a failing command
#   tests/rig/run-rig.sh bench [N]      the boot benchmark
#   tests/rig/run-rig.sh run -- CMD...  msb run -- CMD...
#
# Needs what scripts/setup.sh builds: $MSB_HOME/rig/bzImage, $MSB_HOME/kernel/vmlinux and the
# static binaries in build/static.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
home=${MSB_HOME:-$HOME/.msb}
mode=${1:-e2e}; shift || true
for f in "$home/rig/bzImage" "$home/kernel/vmlinux" "$root/build/static/msb" "$root/build/static/msb-e2e"; do
  [ -f "$f" ] || { echo "run-rig.sh: $f is missing; run scripts/setup.sh first" >&2; exit 2; }
done
# A canary boot first (e2e and demo): an L1 in which no nested boot comes up (it happens;
# once one nested boot stalls, every later one in that L1 does too) is replaced by a fresh L1
# at once, up to three times, instead of failing every boot by its timeout.
canary='ok=0; for i in 1 2; do msb run --boot-timeout 30 -- true && { ok=1; break; }; done
[ "$ok" = 1 ] || { echo "RIG-CANARY: no nested boot comes up in this L1"; exit 3; }
'
case $mode in
  e2e)
    job='msb doctor || true
'"$canary"'msb-e2e --test-threads='"${RIG_E2E_THREADS:-1}"' '"${RIG_E2E_ARGS:-}"' 2>&1 | tee /tmp/e2e.log
rc=${PIPESTATUS:-0}
grep -q "^test result: ok" /tmp/e2e.log || rc=1
passed=$(sed -n "s/^test result: .* \([0-9][0-9]*\) passed.*/\1/p" /tmp/e2e.log | tail -n1)
retries=$(grep -c "E2E-RETRY" /tmp/e2e.log || true)
echo "RIG-E2E passed=${passed:-0} boot-retries=$retries"
[ "${passed:-0}" -gt 0 ] || { echo "RIG-E2E: no e2e test executed" ; exit 1; }
grep -q "^test result: ok" /tmp/e2e.log'
    ;;
  demo)
    job="$canary"'msb run -- uname -a; echo "exit status: $?"
msb run -- sh -c "echo hello from a microVM; echo on stderr >&2; exit 42"; echo "exit status: $?"
msb run -- no-such-command; echo "exit status: $?"
msb run -- uname -a | grep -q Linux
msb run msb/debian:12 -- python3 -c "print(6*7)"'
    ;;
  bench)
    job="msb-bench ${1:-5}"
    extra="--with-qemu --all-blobs"
    ;;
  run)
    [ "${1:-}" = -- ] && shift
    q=$(printf '%q ' "$@")
    job="msb run -- $q"
    ;;
  *) echo "run-rig.sh: unknown mode $mode (e2e, demo, bench, run)" >&2; exit 2 ;;
esac
rig() {
  python3 "$root/tests/rig/rig.py" --l1-kernel "$home/rig/bzImage" --guest-kernel "$home/kernel/vmlinux" \
    --bin-dir "$root/build/static" --images "$home/images" --job "$job" ${extra:-} ${RIG_TIMEOUT:+--timeout "$RIG_TIMEOUT"}
}
case $mode in e2e|demo) ;; *) rig; exit $? ;; esac
# An L1 occasionally comes up in which every nested boot stalls (nothing on the L2 console):
# the suite then fails with boot timeouts. A failed run that shows boot timeouts is repeated
# once in a fresh L1, loudly (RIG-RETRY); the second run must pass on its own.
log=$(mktemp); trap 'rm -f "$log"' EXIT
set +e
for attempt in 1 2 3; do
  rig 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  grep -q "RIG-CANARY: no nested boot" "$log" || break
  echo "RIG-RETRY: the canary boot failed in this L1 (attempt $attempt); starting a fresh L1"
done
set -e
[ "$mode" = e2e ] || exit "$rc"
if [ "$rc" -ne 0 ] && grep -q "did not become ready within" "$log"; then
  echo "RIG-RETRY: the suite failed with boot timeouts in this L1; running it once more in a fresh L1"
  rig; exit $?
fi
exit "$rc"
