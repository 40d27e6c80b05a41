//! The request-head path of an intercepted HTTP/1 flow, on guest bytes: the framer, then
//! the head parser; a parsed head written out again parses to the same head, and nothing
//! panics or loops.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_net_gateway::http1::{Requests, Step};
use msb_net_gateway::tls::{parse_head, serialize_head};

fuzz_target!(|data: &[u8]| {
    let mut r = Requests::default();
    let mut at = 0;
    for _ in 0..64 {
        if at >= data.len() {
            break;
        }
        match r.step(&data[at..]) {
            Step::Forward(n) => at += n.max(1),
            Step::Head { len, .. } => {
                if let Some((head, version)) = parse_head(&data[at..at + len]) {
                    let again = serialize_head(&head, version);
                    let (back, v2) = parse_head(&again).expect("a written head parses");
                    assert_eq!((back.method.as_str(), &back.target[..], v2), (head.method.as_str(), &head.target[..], version));
                    assert_eq!(back.headers.len(), head.headers.len());
                }
                r.accept_head(len);
            }
            Step::NeedMore | Step::Bad(_) => break,
        }
    }
});
