//! A guest for tests: a smoltcp interface with the guest's addresses (IPv4 and IPv6), routed
//! via the gateway.

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use crate::stack::{Frames, NetConfig};

/// A guest: a smoltcp interface with the guest's addresses, routed via the gateway.
pub(crate) struct Guest {
    pub iface: Interface,
    pub dev: Frames,
    pub sockets: SocketSet<'static>,
}

impl Guest {
    pub fn new(cfg: &NetConfig) -> Self {
        let mut dev = Frames::default();
        let c = Config::new(HardwareAddress::Ethernet(EthernetAddress(cfg.guest_mac)));
        let mut iface = Interface::new(c, &mut dev, Instant::from_millis(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(cfg.guest_v4), cfg.prefix_v4));
            let _ = a.push(IpCidr::new(IpAddress::Ipv6(cfg.guest_v6), cfg.prefix_v6));
        });
        iface.routes_mut().add_default_ipv4_route(cfg.gateway_v4).unwrap();
        iface.routes_mut().add_default_ipv6_route(cfg.gateway_v6).unwrap();
        Guest { iface, dev, sockets: SocketSet::new(Vec::new()) }
    }

    /// A TCP socket connecting from `local_port` to `ip:port`.
    pub fn connect(&mut self, ip: IpAddress, port: u16, local_port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 65536]), tcp::SocketBuffer::new(vec![0; 65536]));
        s.connect(self.iface.context(), (ip, port), local_port).unwrap();
        self.sockets.add(s)
    }
}
