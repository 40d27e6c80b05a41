#!/usr/bin/env python3
"""The rig: boots an "L1" Linux under QEMU TCG with an emulated AMD-V CPU, whose kvm_amd gives
a hardware-style /dev/kvm, and runs a job inside it where our msb boots real "L2" guests.

Used on hosts whose own /dev/kvm is the PVM software hypervisor (see
shared/research/tcg-rig.md). Workarounds applied here: L1 runs with 2 sockets (MTTCG) and the
harness sends a harmless key press through QEMU's monitor every 2 s, both against a QEMU 7.2
TCG lost-interrupt freeze of L1.

The job's exit status becomes this script's. Lines the job prints are passed through.
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time


class Cpio:
    """A newc cpio writer (device nodes without needing root)."""

    def __init__(self):
        self.buf = bytearray()
        self.ino = 0

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        self.ino += 1
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.buf += b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0"
        self.buf += b"\0" * (-len(self.buf) % 4)
        self.buf += data
        self.buf += b"\0" * (-len(self.buf) % 4)

    def dir(self, name):
        self._entry(name, 0o040755)

    def dirs_for(self, path, made):
        """Creates every missing parent directory of `path`."""
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in made:
                made.add(d)
                self.dir(d)

    def file(self, name, path_or_bytes, mode=0o755):
        data = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name, major, minor, mode=0o600):
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return bytes(self.buf)


INIT = r"""#!/bin/busybox sh
if [ -e /tmpfs-root ] && [ -z "$RIG_SWITCHED" ]; then
  # Root on a tmpfs instead of the initramfs (rootfs cannot be pivot_root'ed away from,
  # which passt's self-sandboxing does).
  /bin/busybox mkdir /newroot
  /bin/busybox mount -t tmpfs -o size=95% root /newroot
  for d in /*; do [ "$d" = /newroot ] || /bin/busybox cp -a "$d" /newroot/; done
  export RIG_SWITCHED=1
  exec /bin/busybox switch_root /newroot /init
fi
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mkdir -p /dev/pts; mount -t devpts -o ptmxmode=0666 devpts /dev/pts
ip link set lo up
echo "RIG: L1 up after $(cut -d' ' -f1 /proc/uptime) s; cpu: $(grep -o -w -E 'svm|npt' /proc/cpuinfo | sort -u | tr '\n' ' ')"
ls -l /dev/kvm
export MSB_HOME=/msb/home PATH=/msb/bin:/bin:/usr/bin HOME=/tmp MSB_RIG=1
cd /tmp
sh /job.sh
echo "RIG-EXIT $?"
sync
reboot -f
"""


def build_initramfs(args, job):
    c = Cpio()
    for d in ["bin", "dev", "proc", "sys", "tmp", "msb", "msb/bin", "msb/home", "msb/home/bin", "msb/home/kernel"]:
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", args.busybox)
    c.file("init", INIT.encode())
    c.file("job.sh", job.encode())
    for b in sorted(os.listdir(args.bin_dir)):
        c.file(f"msb/bin/{b}", os.path.join(args.bin_dir, b))
    c.file("msb/home/bin/agentd", os.path.join(args.bin_dir, "agentd"))
    c.file("msb/home/bin/busybox", args.busybox)
    c.file("msb/home/kernel/vmlinux", args.guest_kernel, 0o644)
    # The rig kernel doubles as a bzImage guest for the boot-protocol fallback test.
    c.dir("msb/home/rig")
    c.file("msb/home/rig/bzImage", args.l1_kernel, 0o644)
    made = {"bin", "dev", "proc", "sys", "tmp", "msb", "msb/bin", "msb/home", "msb/home/bin", "msb/home/kernel",
            "msb/home/rig"}
    # mke2fs formats each image sandbox's writable disk; tar2sqfs builds root filesystems
    # (`msb load` in L1). Both run as the host side would run them.
    for tool in ["mke2fs", "tar2sqfs"]:
        path = shutil.which(tool) or os.path.join("/usr/sbin", tool)
        if not os.path.exists(path):
            sys.exit(f"rig: {tool} not found; run scripts/setup.sh (it installs e2fsprogs and squashfs-tools-ng)")
        add_with_libs(c, [path], made)
        c.file(f"msb/bin/{tool}", os.path.realpath(path))
    if args.images and os.path.isdir(args.images):
        add_images(c, args.images, made, args.all_blobs)
    if args.with_qemu:
        add_qemu(c, made)
        c.file("tmpfs-root", b"", 0o644)
    return c.finish()


def add_images(c, store, made, all_blobs=False):
    """Puts the image store into L1's $MSB_HOME: every reference, every built root
    filesystem, and the small blobs (configs, manifests); layers stay behind (the root
    filesystems are built from them already) unless `all_blobs` (the benchmark's cold run
    rebuilds a root filesystem from them)."""
    for sub in ["images", "images/blobs", "images/blobs/sha256", "images/refs", "images/rootfs", "images/tmp"]:
        c.dir(f"msb/home/{sub}")
        made.add(f"msb/home/{sub}")
    for sub, small_only in [("refs", False), ("rootfs", False), ("blobs/sha256", True)]:
        d = os.path.join(store, sub)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            path = os.path.join(d, name)
            if os.path.isfile(path) and (all_blobs or not small_only or os.path.getsize(path) <= 1 << 20):
                c.file(f"msb/home/images/{sub}/{name}", path, 0o644)


def add_with_libs(c, binaries, made, extra=()):
    """Puts host binaries, their shared libraries and `extra` files into L1 at their paths."""
    files = set(binaries) | set(extra)
    for b in binaries:
        out = subprocess.run(["ldd", b], capture_output=True, text=True).stdout
        for line in out.splitlines():
            for tok in line.split():
                if tok.startswith("/"):
                    files.add(tok)
    for f in sorted(files):
        name = f.lstrip("/")
        if name in made:
            continue
        made.add(name)
        c.dirs_for(name, made)
        c.file(name, os.path.realpath(f), 0o755)


def add_qemu(c, made):
    """Puts QEMU, its shared libraries and its x86 firmware into L1, for side-by-side
    benchmarks (`-M microvm` on L1's KVM, booting the same kernel and initramfs), passt
    (the network benchmark's third network) and Debian's virtiofsd (the shared-directory
    benchmark's peer, shipped in qemu-system-common) when the host has them."""
    qemu = shutil.which("qemu-system-x86_64")
    vfsd = shutil.which("virtiofsd") or next(
        (p for p in ["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd"] if os.path.exists(p)), None)
    if vfsd:
        add_with_libs(c, [vfsd], made)
    passt = shutil.which("passt")
    if passt:
        # Debian's passt runs passt.avx2 where the CPU has AVX2 (L1's TCG CPU does).
        builds = [passt] + [p for p in [passt + ".avx2"] if os.path.exists(p)]
        add_with_libs(c, builds, made)
        for b in builds:
            c.file(f"msb/bin/{os.path.basename(b)}", os.path.realpath(b))
    fws = [os.path.join("/usr/share/qemu", fw)
           for fw in ["bios-microvm.bin", "pvh.bin", "linuxboot_dma.bin", "linuxboot.bin", "qboot.rom", "kvmvapic.bin"]]
    add_with_libs(c, [qemu], made, [f for f in fws if os.path.exists(f)])


def kicker(sock_path, stop):
    """Sends a key press to L1 every 2 s (see the module doc)."""
    s = None
    while not stop.is_set():
        try:
            if s is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock_path)
                s.setblocking(False)
            s.sendall(b"sendkey shift\n")
            try:
                s.recv(65536)
            except BlockingIOError:
                pass
        except OSError:
            s = None
        stop.wait(2)


def watchdog(proc, last, limit, stop):
    """Kills QEMU once L1's console has been silent for `limit` seconds: a frozen L1."""
    while not stop.wait(5):
        quiet = time.monotonic() - last[0]
        if quiet > limit:
            print(f"rig: L1 silent for {quiet:.0f} s (limit {limit} s); killing it", file=sys.stderr, flush=True)
            proc.kill()
            return


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--l1-kernel", required=True, help="rig kernel bzImage (KVM + kvm_amd built in)")
    p.add_argument("--guest-kernel", required=True, help="sandbox vmlinux")
    p.add_argument("--bin-dir", required=True, help="static msb, agentd and test binaries")
    p.add_argument("--busybox", default="/bin/busybox")
    p.add_argument("--memory", default="3072")
    p.add_argument("--timeout", type=int, default=1800, help="whole-run limit in seconds")
    p.add_argument("--silence", type=int, default=0,
                   help="kill L1 when its console stays silent this many seconds (0: never)")
    p.add_argument("--job", required=True, help="shell script to run inside L1")
    p.add_argument("--with-qemu", action="store_true", help="add QEMU to L1 (benchmarks)")
    p.add_argument("--images", help="the host's image store ($MSB_HOME/images), copied into L1")
    p.add_argument("--all-blobs", action="store_true", help="copy the image store's layer blobs too")
    args = p.parse_args()

    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        sys.exit("rig: qemu-system-x86_64 not found; install Debian's qemu-system-x86")
    work = tempfile.mkdtemp(prefix="msb-rig-")
    initrd = os.path.join(work, "l1.cpio")
    with open(initrd, "wb") as f:
        f.write(build_initramfs(args, args.job))
    mon = os.path.join(work, "monitor.sock")
    cmd = [
        qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-M", "q35", "-m", args.memory,
        "-smp", "2,sockets=2,cores=1", "-display", "none", "-nic", "none", "-no-reboot",
        "-serial", "stdio", "-monitor", f"unix:{mon},server,nowait",
        "-kernel", args.l1_kernel, "-initrd", initrd,
        "-append", "console=ttyS0 panic=-1 quiet loglevel=3 random.trust_cpu=on",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stop = threading.Event()
    threading.Thread(target=kicker, args=(mon, stop), daemon=True).start()
    timer = threading.Timer(args.timeout, proc.kill)
    timer.start()
    last = [time.monotonic()]
    if args.silence > 0:
        threading.Thread(target=watchdog, args=(proc, last, args.silence, stop), daemon=True).start()
    rc = None
    tail = []
    try:
        for raw in proc.stdout:
            last[0] = time.monotonic()
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            tail = (tail + [line])[-80:]
            if line.startswith("RIG-EXIT "):
                rc = int(line.split()[1])
            print(f"[{time.monotonic() - start:7.1f}s] {line}", flush=True)
    finally:
        stop.set()
        timer.cancel()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    if rc is None:
        print(f"rig: L1 ended without a job status after {time.monotonic() - start:.0f} s "
              f"(QEMU exit {proc.returncode}; whole-run limit {args.timeout} s, "
              f"silence limit {args.silence or 'none'} s)", file=sys.stderr)
        sys.exit(124)
    print(f"rig: job exit status {rc} after {time.monotonic() - start:.1f} s", flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
