#!/usr/bin/env bash
# One command to set up msb on a fresh Debian 12 machine and show it working:
#   1. installs the Debian packages it needs (when run as root),
#   2. builds the guest kernel and the rig's L1 kernel (cached by config hash),
#   3. builds msb, agentd and the test binaries (static), installs the kernel and agentd
#      into $MSB_HOME (default ~/.msb),
#   4. builds the default image msb/debian:12 from Debian's packages (cached) and loads it,
#   5. runs a demo, ending with Python printing 42 in a sandbox of that image: directly on
#      hardware KVM, or through the TCG rig on a host whose /dev/kvm is the PVM software
#      hypervisor.
# Pass --no-demo to skip step 5.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
home=${MSB_HOME:-$HOME/.msb}
demo=1
[ "${1:-}" = --no-demo ] && demo=0

packages=(build-essential flex bison bc libelf-dev libssl-dev cpio busybox-static linux-source-6.1
  xz-utils binutils python3 qemu-system-x86 seabios e2fsprogs squashfs-tools-ng mmdebstrap
  docker-registry skopeo apache2-utils openssl passt)
missing=()
for p in "${packages[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages: ${missing[*]}; install them (as root: apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

mkdir -p "$home/kernel" "$home/rig" "$home/bin"
"$root/guest/kernel/build.sh" guest "$home/kernel"
"$root/guest/kernel/build.sh" rig "$home/rig"
"$root/scripts/build-static.sh" "$root/build/static"
install -m 0755 "$root/build/static/agentd" "$home/bin/agentd"
install -m 0755 "$root/build/static/msb" "$home/bin/msb"
echo "setup: msb installed as $home/bin/msb (kernel, agentd and busybox found by \`msb doctor\`)"
# The default image, msb/debian:12 (Debian 12 with python3, curl, openssl, ca-certificates),
# built from Debian's packages (cached like the kernels) and loaded into the local store.
image=$("$root/guest/image/build.sh")
MSB_HOME=$home "$home/bin/msb" load -i "$image"

[ $demo = 1 ] || exit 0
# `msb doctor` exits 1 where sandboxes cannot boot directly (a PVM host): that is an answer
# here, not a failure, so its status must not end this script.
report=$(MSB_HOME=$home "$home/bin/msb" doctor) || true
kind=$(printf '%s\n' "$report" | sed -n 's#^/dev/kvm: ##p')
echo "setup: /dev/kvm: ${kind:-unknown}"
case $kind in
  hardware*)
    MSB_HOME=$home "$home/bin/msb" run -- uname -a
    MSB_HOME=$home "$home/bin/msb" run -- sh -c 'echo hello from a microVM; exit 42' || echo "exit status: $?"
    MSB_HOME=$home "$home/bin/msb" run msb/debian:12 -- python3 -c 'print(6*7)'
    ;;
  *)
    echo "setup: this host cannot boot Linux guests directly; running the demo in the TCG rig"
    MSB_HOME=$home "$root/tests/rig/run-rig.sh" demo
    ;;
esac
