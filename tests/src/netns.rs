//! Test hosts for network tests: a network namespace of this machine joined to it by a veth
//! pair, addressed only from the documentation ranges (198.51.100.0/24, 203.0.113.0/24),
//! with listeners bound inside it. Nothing here reaches any other network.
//!
//! Uses `ip`, `unshare` and `nsenter` (busybox's in the rig's L1, iproute2's and
//! util-linux's on a host) and needs root, as the e2e suite does.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn interfaces() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A namespace holding `host` (its address on the veth) with this machine's end of the pair
/// at `local` (an address of this machine's own, so of the `host` group).
pub struct TestNet {
    holder: Child,
    pub link: String,
    pub host: Ipv4Addr,
    pub local: Ipv4Addr,
}

impl TestNet {
    /// `index` keeps concurrent tests apart: the pair is `msbt{index}`, the addresses
    /// `198.51.100.{2+index*4}` (host) and `.{1+index*4}` (local), a /30.
    pub fn new(index: u8) -> TestNet {
        assert!(index < 60);
        let link = format!("msbt{index}");
        let _ = Command::new("ip").args(["link", "del", &link]).output();
        // The rig's L1 boots with loopback down; the tests listen on it.
        run(&["ip", "link", "set", "lo", "up"]);
        let holder = Command::new("unshare")
            .args(["-n", "sleep", "100000"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare -n sleep");
        let before = interfaces();
        run(&["ip", "link", "add", &link, "type", "veth"]);
        // busybox names the peer itself (vethN); iproute2 too, without `peer name`.
        let peer = interfaces()
            .into_iter()
            .find(|i| !before.contains(i) && *i != link)
            .expect("the veth pair's other end appeared");
        let pid = holder.id().to_string();
        // The namespace exists once the holder has run: wait for its netns to differ.
        let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
        for _ in 0..200 {
            if std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|n| n != mine) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        run(&["ip", "link", "set", &peer, "netns", &pid]);
        let (host, local) = (Ipv4Addr::new(198, 51, 100, 2 + index * 4), Ipv4Addr::new(198, 51, 100, 1 + index * 4));
        let inside = |args: &[&str]| {
            let mut a = vec!["nsenter", "-t", &pid, "-n"];
            a.extend_from_slice(args);
            run(&a);
        };
        inside(&["ip", "link", "set", "lo", "up"]);
        inside(&["ip", "addr", "add", &format!("{host}/30"), "dev", &peer]);
        inside(&["ip", "link", "set", &peer, "up"]);
        inside(&["ip", "route", "add", "default", "via", &local.to_string()]);
        run(&["ip", "addr", "add", &format!("{local}/30"), "dev", &link]);
        run(&["ip", "link", "set", &link, "up"]);
        TestNet { holder, link, host, local }
    }

    /// Runs `f` on a thread inside the namespace (sockets it binds stay there).
    pub fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = std::fs::File::open(format!("/proc/{}/ns/net", self.holder.id())).expect("the namespace");
        std::thread::spawn(move || {
            rustix::thread::move_into_link_name_space(ns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
                .expect("setns");
            f()
        })
        .join()
        .expect("the namespace thread")
    }

    /// A TCP listener on the test host.
    pub fn tcp(&self, port: u16) -> TcpListener {
        let at = SocketAddr::from((self.host, port));
        self.inside(move || TcpListener::bind(at).expect("bind in the namespace"))
    }

    /// A UDP socket on the test host.
    pub fn udp(&self, port: u16) -> UdpSocket {
        let at = SocketAddr::from((self.host, port));
        self.inside(move || UdpSocket::bind(at).expect("bind in the namespace"))
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = Command::new("ip").args(["link", "del", &self.link]).output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_test_host_is_reachable_from_here_and_only_on_its_own_address() {
        if !rustix::process::geteuid().is_root() {
            panic!("network namespaces need root (the e2e suite runs as root)");
        }
        let net = TestNet::new(59);
        let l = net.tcp(8080);
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"from the namespace").unwrap();
        });
        let mut c = std::net::TcpStream::connect((net.host, 8080)).unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        t.join().unwrap();
        assert_eq!(got, "from the namespace");
        assert!(std::net::TcpStream::connect(("127.0.0.1", 8080)).is_err(), "not bound here");
    }
}
