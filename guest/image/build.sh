#!/usr/bin/env bash
# Builds msb's default image, msb/debian:12 — Debian 12 (minbase) with python3, curl, openssl
# and ca-certificates, plus an unprivileged user `msb` (1000) — from Debian's packages with
# mmdebstrap, packs it as a one-layer OCI image layout tar, and prints its path.
#
#   guest/image/build.sh [OUT_DIR]
#
# The result is cached by the hash of this script and its packer under $MSB_IMAGE_CACHE
# (default ~/.cache/msb/images), like the kernels, so a rebuild only happens when they change.
# Needs (as root): mmdebstrap, and apt access to a Debian mirror (the system's sources).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ref=msb/debian:12
hash=$(cat "$here/build.sh" "$here/pack-oci.py" | sha256sum | cut -c1-16)
cache=${MSB_IMAGE_CACHE:-$HOME/.cache/msb/images}
out=$cache/debian-12-$hash.oci.tar
if [ -f "$out" ]; then
  echo "image: $ref cached at $out" >&2
else
  command -v mmdebstrap >/dev/null || { echo "image: mmdebstrap is missing (apt-get install mmdebstrap)" >&2; exit 1; }
  mkdir -p "$cache"
  work=$(mktemp -d "$cache/build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
  echo "image: building $ref ($hash) with mmdebstrap from ${mirror:-the default mirror}, about 2 minutes" >&2
  mmdebstrap --quiet --variant=minbase --format=tar \
    --include=python3,curl,openssl,ca-certificates \
    --customize-hook='chroot "$1" useradd --create-home --uid 1000 --user-group --shell /bin/bash msb' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/locale/*' \
    bookworm "$work/rootfs.tar" ${mirror:+"$mirror"}
  python3 "$here/pack-oci.py" "$work/rootfs.tar" "$ref" "$work/image.oci.tar"
  mv "$work/image.oci.tar" "$out.tmp" && mv "$out.tmp" "$out"
fi
if [ -n "${1:-}" ]; then
  mkdir -p "$1" && cp "$out" "$1/" && echo "$1/$(basename "$out")"
else
  echo "$out"
fi
