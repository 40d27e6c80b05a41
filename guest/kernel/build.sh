#!/usr/bin/env bash
# Build a kernel from Debian's linux-source-6.1 with our config fragment(s).
#
#   guest/kernel/build.sh guest DEST   -> DEST/vmlinux  (the sandbox kernel, PVH-bootable ELF)
#   guest/kernel/build.sh rig DEST     -> DEST/bzImage  (the rig's L1 kernel, with KVM + kvm_amd)
#
# Results are cached by the hash of the fragments, this script and the source version, under
# $MSB_KERNEL_CACHE (default ~/.cache/msb/kernel), so a rebuild only happens when one of them
# changes. Needs: build-essential flex bison bc libelf-dev libssl-dev linux-source-6.1.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
flavor=${1:?usage: build.sh guest|rig DEST}
dest=${2:?usage: build.sh guest|rig DEST}
src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "build.sh: $src_tar missing; run: apt-get install linux-source-6.1" >&2; exit 1; }
case $flavor in
  guest) frags=("$here/guest.frag"); artefact=vmlinux ;;
  rig) frags=("$here/guest.frag" "$here/rig.frag"); artefact=arch/x86/boot/bzImage ;;
  *) echo "build.sh: unknown flavor '$flavor' (want guest or rig)" >&2; exit 2 ;;
esac
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c %s "$src_tar")
hash=$( (cat "${frags[@]}" "$here/build.sh"; echo "$srcver") | sha256sum | cut -c1-16)
cache=${MSB_KERNEL_CACHE:-$HOME/.cache/msb/kernel}/$flavor-$hash
out_name=$(basename "$artefact")
mkdir -p "$dest"
if [ -f "$cache/$out_name" ]; then
  echo "kernel: $flavor cached at $cache"
else
  work=${MSB_KERNEL_WORK:-$HOME/.cache/msb/kernel-src}/$flavor
  rm -rf "$work"; mkdir -p "$work"
  echo "kernel: building $flavor ($hash) in $work, about 4 minutes on 2 cores"
  tar -C "$work" -xf "$src_tar" --strip-components=1
  (
    cd "$work"
    make -s ARCH=x86_64 tinyconfig
    scripts/kconfig/merge_config.sh -m .config "${frags[@]}" >/dev/null
    make -s ARCH=x86_64 olddefconfig
    # Every fragment setting (the last one wins, as in merge_config) must have survived
    # olddefconfig, or the kernel is not what we asked for.
    missing=0
    while IFS='=' read -r key val; do
      if [ "$val" = n ]; then
        grep -q "^$key=" .config && { echo "kernel: $key should be off" >&2; missing=1; }
      else
        grep -qx "$key=$val" .config || { echo "kernel: $key=$val did not survive olddefconfig" >&2; missing=1; }
      fi
    done < <(cat "${frags[@]}" | grep -E '^CONFIG_' | awk -F= '{v[$1]=$2; if (!($1 in o)) {o[$1]=n++; k[n-1]=$1}} END {for (i=0;i<n;i++) print k[i] "=" v[k[i]]}')
    [ $missing = 0 ] || exit 1
    make -s ARCH=x86_64 -j"$(nproc)" "$( [ "$flavor" = rig ] && echo bzImage || echo vmlinux)"
  )
  mkdir -p "$cache.tmp"
  if [ "$flavor" = guest ]; then strip -o "$cache.tmp/vmlinux" "$work/vmlinux"; else cp "$work/$artefact" "$cache.tmp/"; fi
  cp "$work/.config" "$cache.tmp/config"
  rm -rf "$cache"; mv "$cache.tmp" "$cache"
  rm -rf "$work"
fi
cp "$cache/$out_name" "$dest/$out_name"
echo "kernel: $dest/$out_name"
