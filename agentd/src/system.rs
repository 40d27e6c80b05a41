//! PID 1 duties: mounts, the boot timer, the agent channel, power off.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sys::termios;

use crate::log;

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = mount(Some(source), target, Some(fstype), flags, data) {
        if e != nix::errno::Errno::EBUSY {
            log(&format!("mount {fstype} on {target}: {e}"));
        }
    }
}

pub fn early_setup() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"));
    mark_boot_timer();
    mount_fs("proc", "/proc", "proc", nosuid, None);
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None);
    mount_fs("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("ptmxmode=0666"));
    mount_fs("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"));
    mount_fs("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"));
    // One cgroup per exec lives here (see exec.rs): the unit a deadline kills. agentd moves
    // in and out of a cgroup for every spawn; `favordynmods` makes such moves cheap (no RCU
    // grace period), at a small cost to fork and exit. Kernels without it mount plainly.
    let cg = crate::exec::CGROUP_ROOT;
    let _ = std::fs::create_dir_all(cg);
    if mount(Some("cgroup2"), cg, Some("cgroup2"), nosuid, Some("favordynmods")).is_err() {
        mount_fs("cgroup2", cg, "cgroup2", nosuid, None);
    }
    std::env::set_var("PATH", crate::exec::DEFAULT_PATH);
}

/// Whether the kernel command line asks for a read-only root
/// ([`msb_protocol::READ_ONLY_CMDLINE`]).
pub fn read_only_requested() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|a| a == msb_protocol::READ_ONLY_CMDLINE))
        .unwrap_or(false)
}

/// Makes `/` read-only for everything after the agent's own set-up, with a fresh writable
/// tmpfs on `/tmp` (sticky, world-writable, no setuid or devices). A workload needs
/// CAP_SYS_ADMIN to undo it, which the restricted profile never has.
pub fn make_root_read_only() -> Result<(), String> {
    let _ = std::fs::create_dir_all("/tmp");
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_or("tmpfs", "/tmp", Some("tmpfs"), nosuid, Some("mode=1777"))?;
    mount_or("/", "/", None, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None)
}

/// Whether the kernel command line asks for an image root ([`msb_protocol::ROOT_CMDLINE`]).
pub fn image_root_requested() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|a| a == msb_protocol::ROOT_CMDLINE))
        .unwrap_or(false)
}

/// The guest's side of the network, from the kernel command line
/// ([`msb_protocol::NET_CMDLINE`]): `(address/prefix, gateway)` for IPv4 and IPv6.
#[derive(Debug, PartialEq, Eq)]
pub struct NetBoot {
    pub v4: (std::net::Ipv4Addr, u8, std::net::Ipv4Addr),
    pub v6: (std::net::Ipv6Addr, u8, std::net::Ipv6Addr),
}

/// Parses the `msb.net=` entry of `cmdline`; `None` when absent (no network) or malformed.
pub fn net_boot(cmdline: &str) -> Option<NetBoot> {
    let v = cmdline.split_whitespace().find_map(|a| a.strip_prefix(msb_protocol::NET_CMDLINE))?;
    let parts: Vec<&str> = v.split(',').collect();
    let [a4, g4, a6, g6] = parts[..] else { return None };
    let (ip4, p4) = a4.split_once('/')?;
    let (ip6, p6) = a6.split_once('/')?;
    let (p4, p6): (u8, u8) = (p4.parse().ok()?, p6.parse().ok()?);
    if p4 > 32 || p6 > 128 {
        return None;
    }
    Some(NetBoot { v4: (ip4.parse().ok()?, p4, g4.parse().ok()?), v6: (ip6.parse().ok()?, p6, g6.parse().ok()?) })
}

fn ip(args: &[&str]) {
    match std::process::Command::new("/bin/busybox").arg("ip").args(args).status() {
        Ok(s) if s.success() => {}
        Ok(s) => log(&format!("ip {}: {s}", args.join(" "))),
        Err(e) => log(&format!("ip {}: {e}", args.join(" "))),
    }
}

/// Brings up loopback and, when the command line gives one, `eth0` with its addresses and
/// default routes (IPv6 without duplicate-address detection or router advertisements: the
/// gateway is the only other host on the link). Failures are logged; the guest then has
/// less network, never more. Returns the configuration, for [`write_resolv_conf`].
pub fn configure_network() -> Option<NetBoot> {
    ip(&["link", "set", "lo", "up"]);
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let net = net_boot(&cmdline)?;
    for (knob, v) in [("accept_dad", "0"), ("accept_ra", "0"), ("autoconf", "0"), ("router_solicitations", "0")] {
        for dev in ["default", "eth0"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/{knob}"), v);
        }
    }
    let (a4, p4, g4) = net.v4;
    let (a6, p6, g6) = net.v6;
    ip(&["addr", "add", &format!("{a4}/{p4}"), "dev", "eth0"]);
    ip(&["-6", "addr", "add", &format!("{a6}/{p6}"), "dev", "eth0"]);
    ip(&["link", "set", "eth0", "up"]);
    ip(&["route", "add", "default", "via", &g4.to_string()]);
    ip(&["-6", "route", "add", "default", "via", &g6.to_string()]);
    Some(net)
}

/// Points the root's `/etc/resolv.conf` at the gateway (which answers every DNS query).
pub fn write_resolv_conf(net: &NetBoot) {
    let _ = std::fs::create_dir_all("/etc");
    // A symlink (systemd images) would send the write elsewhere in the root: replace it.
    if std::fs::symlink_metadata("/etc/resolv.conf").is_ok_and(|m| !m.is_file()) {
        let _ = std::fs::remove_file("/etc/resolv.conf");
    }
    if let Err(e) = std::fs::write("/etc/resolv.conf", format!("nameserver {}\noptions edns0\n", net.v4.2)) {
        log(&format!("writing /etc/resolv.conf: {e}"));
    }
}

/// The block device whose virtio serial is `serial` (`/sys/block/*/serial`), waiting up to
/// 5 s for it to appear.
fn disk_with_serial(serial: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for entry in std::fs::read_dir("/sys/block").map_err(|e| format!("/sys/block: {e}"))?.flatten() {
            let found = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
            if found.trim_end_matches(['\0', '\n']) == serial {
                return Ok(format!("/dev/{}", entry.file_name().to_string_lossy()));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no disk with serial {serial} appeared within 5 s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn mount_or(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("creating {target}: {e}"))?;
    mount(Some(source), target, fstype, flags, data)
        .map_err(|e| format!("mounting {source} on {target} ({}): {e}", fstype.unwrap_or("move")))
}

/// Makes the image the root: its read-only squashfs (disk `msb-image`) is the lower layer,
/// the sandbox's writable ext4 (disk `msb-root`) holds the upper layer, and the overlay of
/// both becomes `/`, with /dev, /proc and /sys moved in and a fresh /run. agentd keeps
/// running from the initramfs (its exec helper is `/proc/self/exe`, reachable from any root).
///
/// Invariant: on any failure agentd does not serve (a command must never run in a root that
/// is not the one asked for); the error reaches the console and the host reports it.
pub fn switch_to_image_root() -> Result<(), String> {
    let image = disk_with_serial(msb_protocol::IMAGE_DISK_SERIAL)?;
    let writable = disk_with_serial(msb_protocol::ROOT_DISK_SERIAL)?;
    mount_or(&image, "/.msb/image", Some("squashfs"), MsFlags::MS_RDONLY, None)?;
    // noinit_itable: the disk is fresh and sparse (reads of unwritten blocks are zeros), so
    // the kernel need not spend guest CPU zeroing inode tables in the background.
    mount_or(&writable, "/.msb/rw", Some("ext4"), MsFlags::empty(), Some("noinit_itable"))?;
    for d in ["/.msb/rw/upper", "/.msb/rw/work"] {
        std::fs::create_dir_all(d).map_err(|e| format!("creating {d}: {e}"))?;
    }
    let opts = "lowerdir=/.msb/image,upperdir=/.msb/rw/upper,workdir=/.msb/rw/work";
    mount_or("overlay", "/.msb/root", Some("overlay"), MsFlags::empty(), Some(opts))?;
    for d in ["/dev", "/proc", "/sys"] {
        mount_or(d, &format!("/.msb/root{d}"), None, MsFlags::MS_MOVE, None)?;
    }
    std::env::set_current_dir("/.msb/root").map_err(|e| format!("entering the new root: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("moving the new root onto /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot into the new root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("entering /: {e}"))?;
    mount_or("tmpfs", "/run", Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    // /tmp is the image's (on the writable disk, as in a container); make sure it exists.
    if std::fs::create_dir_all("/tmp").is_ok() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions("/tmp", std::fs::Permissions::from_mode(0o1777));
    }
    Ok(())
}

/// One shared directory from the kernel command line: its virtio-fs tag, where it goes, and
/// whether it is read-only.
#[derive(Debug, PartialEq, Eq)]
pub struct MountBoot {
    pub tag: String,
    pub path: String,
    pub read_only: bool,
}

/// Parses the `msb.mounts=` entry of `cmdline` ([`msb_protocol::MOUNTS_CMDLINE`]). Entries
/// that are not `TAG:/ABSOLUTE/PATH[:ro]` with a plain tag and a path without `..` are left
/// out (the host never writes such; nothing the guest reads here came from the workload).
pub fn mounts_boot(cmdline: &str) -> Vec<MountBoot> {
    let Some(v) = cmdline.split_whitespace().find_map(|a| a.strip_prefix(msb_protocol::MOUNTS_CMDLINE)) else {
        return Vec::new();
    };
    v.split(',')
        .filter_map(|e| {
            let mut parts = e.split(':');
            let (tag, path, flag) = (parts.next()?, parts.next()?, parts.next());
            let tag_ok = !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            let path_ok = path.starts_with('/')
                && path.len() > 1
                && !path[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..");
            let read_only = match flag {
                None => false,
                Some("ro") => true,
                Some(_) => return None,
            };
            (tag_ok && path_ok && parts.next().is_none()).then(|| MountBoot {
                tag: tag.into(),
                path: path.into(),
                read_only,
            })
        })
        .collect()
}

/// Mounts each shared directory at its path in the current root (`nosuid,nodev`, read-only
/// where asked; the host refuses changes to a read-only one whatever this mount says).
/// Invariant: a mount that fails stops the boot, like the root: a workload must not run
/// writing into its own root where it expects the host's directory.
pub fn mount_shared_dirs() -> Result<(), String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for m in mounts_boot(&cmdline) {
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if m.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        mount_or(&m.tag, &m.path, Some("virtiofs"), flags, None)?;
    }
    Ok(())
}

/// Writes one byte to the boot-timer MMIO page. `busybox devmem` does the mapping, so that
/// agentd itself needs no `unsafe`; it runs in the background and agentd does not wait.
fn mark_boot_timer() {
    let addr = format!("{:#x}", msb_protocol::BOOT_TIMER_ADDR);
    if let Err(e) = std::process::Command::new("/bin/busybox").args(["devmem", &addr, "8", "1"]).spawn() {
        log(&format!("boot timer: {e}"));
    }
}

/// Finds the virtio-console port named `name` (`/sys/class/virtio-ports/*/name`).
fn find_port(name: &str) -> Option<String> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Some(format!("/dev/{}", entry.file_name().to_string_lossy()));
        }
    }
    None
}

/// Opens the agent channel: `path`, or the virtio port named `msb.agent` when `path` is
/// `None`, waiting up to 10 s for it to appear. A tty (as in tests on a pty) is put into raw
/// mode: no echo, no line editing, no newline translation.
pub fn open_channel(path: Option<&str>) -> Result<File, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let path = loop {
        let found = match path {
            Some(p) => Path::new(p).exists().then(|| p.to_string()),
            None => find_port(msb_protocol::AGENT_PORT_NAME),
        };
        match found {
            Some(p) => break p,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            None => {
                return Err(format!("agent channel {} did not appear within 10 s", path.unwrap_or("port msb.agent")))
            }
        }
    };
    let path = path.as_str();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("opening agent channel {path}: {e}"))?;
    if let Ok(mut t) = termios::tcgetattr(&f) {
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(&f, termios::SetArg::TCSANOW, &t).map_err(|e| format!("raw mode on {path}: {e}"))?;
    }
    Ok(f)
}

/// Syncs and asks the kernel to restart, which the VMM sees as the end of the VM (the
/// kernel is booted with `reboot=k`; x86 without ACPI cannot power off by itself).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mounts_entry_is_parsed_and_odd_entries_left_out() {
        let line =
            "quiet msb.mounts=msb-fs-0:/work,msb-fs-1:/data/in:ro,bad tag:/x,t:/a/../b,t:rel,t:/x:rw,t:/y:ro:z x";
        assert_eq!(
            mounts_boot(line),
            vec![
                MountBoot { tag: "msb-fs-0".into(), path: "/work".into(), read_only: false },
                MountBoot { tag: "msb-fs-1".into(), path: "/data/in".into(), read_only: true },
            ]
        );
        assert!(mounts_boot("quiet").is_empty());
    }

    #[test]
    fn the_network_entry_is_parsed_or_ignored_whole() {
        let line = "console=ttyS0 msb.net=192.168.127.2/24,192.168.127.1,fd6d:7362::2/64,fd6d:7362::1 quiet";
        let n = net_boot(line).unwrap();
        assert_eq!(n.v4, ("192.168.127.2".parse().unwrap(), 24, "192.168.127.1".parse().unwrap()));
        assert_eq!(n.v6, ("fd6d:7362::2".parse().unwrap(), 64, "fd6d:7362::1".parse().unwrap()));
        assert_eq!(net_boot("console=ttyS0 quiet"), None, "no entry: no network");
        for bad in [
            "msb.net=192.168.127.2/24,192.168.127.1",
            "msb.net=192.168.127.2/33,192.168.127.1,fd6d::2/64,fd6d::1",
            "msb.net=192.168.127.2,192.168.127.1,fd6d::2/64,fd6d::1",
            "msb.net=eth0;reboot/24,192.168.127.1,fd6d::2/64,fd6d::1",
            "msb.net=1.2.3.4/24,1.2.3.1,fd6d::2/129,fd6d::1",
        ] {
            assert_eq!(net_boot(bad), None, "{bad}");
        }
    }
}
