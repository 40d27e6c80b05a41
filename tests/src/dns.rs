//! A DNS server for test hosts: fixed A records (see [`dns_server`]), bound in a test
//! namespace, answering only what the tests name.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// A DNS server with fixed A records: the test host, a private address, a mix, and a
/// rebinding answer (loopback).
pub fn dns_server(sock: UdpSocket, host: std::net::Ipv4Addr) -> Arc<AtomicUsize> {
    let asked = Arc::new(AtomicUsize::new(0));
    let a = asked.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf) else { return };
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            a.fetch_add(1, Ordering::SeqCst);
            let Some(query) = q.queries().first().cloned() else { continue };
            let name = query.name().to_ascii().trim_end_matches('.').to_string();
            let addrs: Vec<std::net::Ipv4Addr> = match (name.as_str(), query.query_type()) {
                (_, t) if t != RecordType::A => vec![],
                ("allowed.test", _) => vec![host],
                ("private.test", _) => vec!["10.0.0.1".parse().unwrap()],
                ("mixed.test", _) => vec!["10.1.2.3".parse().unwrap(), host, "127.0.0.1".parse().unwrap()],
                ("rebind.test", _) => vec!["127.0.0.1".parse().unwrap()],
                // Two names of one address, as on a CDN.
                ("web.test" | "other.test", _) => vec![host],
                // The secrets tests' TLS host (and any name below api.test).
                ("api.test" | "wrong.test", _) => vec![host],
                (n, _) if n.ends_with(".api.test") => vec![host],
                _ => vec![],
            };
            let known = [
                "allowed.test",
                "private.test",
                "mixed.test",
                "rebind.test",
                "web.test",
                "other.test",
                "api.test",
                "wrong.test",
            ]
            .contains(&name.as_str())
                || name.ends_with(".api.test");
            let mut r = Message::new();
            r.set_id(q.id());
            r.set_message_type(MessageType::Response);
            r.set_recursion_desired(q.recursion_desired());
            r.set_recursion_available(true);
            r.add_query(query.clone());
            r.set_response_code(if known { ResponseCode::NoError } else { ResponseCode::NXDomain });
            for ip in addrs {
                r.add_answer(Record::from_rdata(query.name().clone(), 60, RData::A(A(ip))));
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), from);
        }
    });
    asked
}
